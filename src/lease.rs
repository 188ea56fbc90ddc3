//! Domain types: the validated values the core works with.
//!
//! Everything that arrives from the wire is converted into these types in one
//! place (the service layer calls the constructors here), and the constructors
//! are where validation happens. The state machine therefore only ever sees
//! valid resources, holders, request ids and TTLs, and never has to re-check.
//!
//! | value        | limit                                   |
//! |--------------|-----------------------------------------|
//! | `resource`   | 1..=512 bytes of UTF-8, no control chars|
//! | `holder`     | 1..=256 bytes of UTF-8, no control chars|
//! | `request_id` | 0..=128 bytes (empty = no key)          |
//! | `lease_id`   | 32 hex digits (128 random bits)         |

use std::fmt;
use std::time::Duration;

use rand::RngCore;

/// Longest resource name, in bytes.
pub const MAX_RESOURCE_LEN: usize = leasehold_fence::MAX_RESOURCE_LEN;
/// Longest holder name, in bytes.
pub const MAX_HOLDER_LEN: usize = 256;
/// Longest idempotency key, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A request field that failed validation: names the field and its limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidField {
    /// The field's name on the wire (`resource`, `ttl_ms`, ...).
    pub field: &'static str,
    /// What is wrong and what is allowed.
    pub reason: String,
}

impl InvalidField {
    /// A validation failure of `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        InvalidField {
            field,
            reason: reason.into(),
        }
    }
}

/// The one rule for names (resources here, in the client and in the guard
/// alike), with the field's name put in front.
fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), InvalidField> {
    leasehold_fence::check_name(value, max).map_err(|e| InvalidField::new(field, e.to_string()))
}

/// The name of a leased thing: 1..=512 bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resource(String);

impl Resource {
    /// Validates a resource name.
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidField> {
        let value = value.into();
        check_text("resource", &value, MAX_RESOURCE_LEN)?;
        Ok(Resource(value))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// Lets ordered maps keyed by `Resource` be ranged by `&str` (pagination).
// Sound: `Resource` compares, hashes and orders exactly as its string does.
impl std::borrow::Borrow<str> for Resource {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who holds (or asks for) a lease: 1..=256 bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Holder(String);

impl Holder {
    /// Validates a holder name.
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidField> {
        let value = value.into();
        check_text("holder", &value, MAX_HOLDER_LEN)?;
        Ok(Holder(value))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An idempotency key for Acquire: 1..=128 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// Validates a key; the empty string means "no key" and gives `None`.
    pub fn new_optional(value: impl Into<String>) -> Result<Option<Self>, InvalidField> {
        let value = value.into();
        if value.is_empty() {
            return Ok(None);
        }
        if value.len() > MAX_REQUEST_ID_LEN {
            return Err(InvalidField::new(
                "request_id",
                format!(
                    "is {} bytes long; the limit is {MAX_REQUEST_ID_LEN} bytes",
                    value.len()
                ),
            ));
        }
        Ok(Some(RequestId(value)))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// 128 random bits that identify one lease. Knowing it is the proof of
/// holding the lease, so it is only ever sent to the holder.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub [u8; 16]);

impl LeaseId {
    /// A fresh id from the operating system's random source.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        LeaseId(bytes)
    }

    /// Parses the 32-hex-digit form sent to clients.
    pub fn parse(text: &str) -> Result<Self, InvalidField> {
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| {
            InvalidField::new("lease_id", "must be the 32 hex digits the server returned")
        })?;
        Ok(LeaseId(bytes))
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ids are secrets: logs show a prefix, enough to correlate.
        write!(f, "LeaseId({}…)", &hex::encode(&self.0[..4]))
    }
}

/// A fencing token: larger than every token granted before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The server's bounds on TTLs and waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Shortest TTL a lease may have.
    pub min_ttl: Duration,
    /// Longest TTL a lease may have.
    pub max_ttl: Duration,
    /// Longest an Acquire may wait in line.
    pub max_wait: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            min_ttl: Duration::from_millis(100),
            max_ttl: Duration::from_secs(3600),
            max_wait: Duration::from_secs(300),
        }
    }
}

impl Bounds {
    /// Validates a TTL in milliseconds.
    pub fn ttl(&self, field: &'static str, ttl_ms: u64) -> Result<Duration, InvalidField> {
        let ttl = Duration::from_millis(ttl_ms);
        if ttl < self.min_ttl || ttl > self.max_ttl {
            return Err(InvalidField::new(
                field,
                format!(
                    "is {ttl_ms} ms; it must be within {} ..= {} ms",
                    self.min_ttl.as_millis(),
                    self.max_ttl.as_millis()
                ),
            ));
        }
        Ok(ttl)
    }

    /// Validates a wait in milliseconds.
    pub fn wait(&self, wait_ms: u64) -> Result<Duration, InvalidField> {
        let wait = Duration::from_millis(wait_ms);
        if wait > self.max_wait {
            return Err(InvalidField::new(
                "wait_ms",
                format!(
                    "is {wait_ms} ms; the limit is {} ms",
                    self.max_wait.as_millis()
                ),
            ));
        }
        Ok(wait)
    }
}

/// How a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndKind {
    /// Its holder released it.
    Released,
    /// Its TTL ran out before a renewal.
    Expired,
    /// An operator revoked it.
    Revoked,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_table() {
        let long = |n| "x".repeat(n);
        let cases: Vec<(Result<(), InvalidField>, Option<&str>)> = vec![
            (Resource::new("jobs/1").map(drop), None),
            (Resource::new("").map(drop), Some("resource")),
            (Resource::new(long(512)).map(drop), None),
            (Resource::new(long(513)).map(drop), Some("resource")),
            (Resource::new("a\nb").map(drop), Some("resource")),
            (Holder::new(long(256)).map(drop), None),
            (Holder::new(long(257)).map(drop), Some("holder")),
            (Holder::new("").map(drop), Some("holder")),
            (Holder::new("worker\u{7}").map(drop), Some("holder")),
            (RequestId::new_optional(long(128)).map(drop), None),
            (
                RequestId::new_optional(long(129)).map(drop),
                Some("request_id"),
            ),
            (LeaseId::parse("zz").map(drop), Some("lease_id")),
            (
                Bounds::default().ttl("ttl_ms", 99).map(drop),
                Some("ttl_ms"),
            ),
            (Bounds::default().ttl("ttl_ms", 100).map(drop), None),
            (
                Bounds::default().ttl("ttl_ms", 3_600_001).map(drop),
                Some("ttl_ms"),
            ),
            (Bounds::default().ttl("ttl_ms", 3_600_000).map(drop), None),
            (Bounds::default().wait(300_000).map(drop), None),
            (Bounds::default().wait(300_001).map(drop), Some("wait_ms")),
        ];
        for (i, (got, want)) in cases.into_iter().enumerate() {
            assert_eq!(got.err().map(|e| e.field), want, "case {i}");
        }
        assert_eq!(RequestId::new_optional("").unwrap(), None);
    }

    #[test]
    fn lease_id_round_trips_and_hides_in_debug() {
        let id = LeaseId::random();
        assert_eq!(LeaseId::parse(&id.to_string()).unwrap(), id);
        assert_eq!(id.to_string().len(), 32);
        assert!(!format!("{id:?}").contains(&id.to_string()));
    }
}
