//! The serde form of the table's changes, as they travel in the Raft log and
//! sit in the applied state and its snapshots.
//!
//! Plain strings and numbers: the domain types validate on the way back
//! ([`WireRecord::to_record`]), so a damaged entry is a clear error rather
//! than an invalid value inside the table.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::lease::{EndKind, FencingToken, Holder, LeaseId, RequestId, Resource};
use crate::state::{Change, LeaseRecord, RequestRecord};

/// A lease record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRecord {
    /// The resource.
    pub resource: String,
    /// The holder's secret id.
    pub lease_id: [u8; 16],
    /// The grant's token.
    pub token: u64,
    /// Who holds it.
    pub holder: String,
    /// Its TTL.
    pub ttl: Duration,
    /// When it was granted (Unix ms).
    pub acquired_unix_ms: u64,
    /// The idempotency key that asked for it.
    pub request_id: Option<String>,
}

/// An idempotency key's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRequest {
    /// The Acquire's resource.
    pub resource: String,
    /// The Acquire's holder.
    pub holder: String,
    /// The Acquire's TTL.
    pub ttl: Duration,
    /// The lease the key was granted.
    pub lease_id: [u8; 16],
    /// Its token.
    pub token: u64,
    /// When the key was recorded (Unix ms).
    pub recorded_unix_ms: u64,
}

/// One change of the table, as it is replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireChange {
    /// A lease was granted.
    Granted(WireRecord),
    /// A lease's TTL changed.
    TtlChanged(WireRecord),
    /// A lease ended.
    Ended {
        /// The lease.
        record: WireRecord,
        /// 0 released, 1 expired, 2 revoked.
        how: u8,
        /// When (Unix ms).
        at_unix_ms: u64,
    },
    /// Idempotency keys dropped after their retention.
    RequestsCollected(Vec<String>),
}

/// A replicated record that does not make a valid domain value.
#[derive(Debug, thiserror::Error)]
#[error("a replicated lease record is invalid ({0}); the node's data is damaged: move its data directory aside and let it catch up from the leader")]
pub struct InvalidRecord(String);

impl WireRecord {
    /// The wire form of a record.
    pub fn from_record(r: &LeaseRecord) -> Self {
        WireRecord {
            resource: r.resource.as_str().to_owned(),
            lease_id: r.lease_id.0,
            token: r.token.0,
            holder: r.holder.as_str().to_owned(),
            ttl: r.ttl,
            acquired_unix_ms: r.acquired_unix_ms,
            request_id: r.request_id.as_ref().map(|k| k.as_str().to_owned()),
        }
    }

    /// Back to the domain record, validating every field.
    pub fn to_record(&self) -> Result<LeaseRecord, InvalidRecord> {
        let bad = |e: crate::lease::InvalidField| InvalidRecord(e.to_string());
        Ok(LeaseRecord {
            resource: Resource::new(self.resource.clone()).map_err(bad)?,
            lease_id: LeaseId(self.lease_id),
            token: FencingToken(self.token),
            holder: Holder::new(self.holder.clone()).map_err(bad)?,
            ttl: self.ttl,
            acquired_unix_ms: self.acquired_unix_ms,
            request_id: match &self.request_id {
                Some(k) => RequestId::new_optional(k.clone()).map_err(bad)?,
                None => None,
            },
        })
    }
}

impl WireRequest {
    /// Back to the domain record, validating every field.
    pub fn to_record(&self, key: &str) -> Result<(RequestId, RequestRecord), InvalidRecord> {
        let bad = |e: crate::lease::InvalidField| InvalidRecord(e.to_string());
        let id = RequestId::new_optional(key.to_owned())
            .map_err(bad)?
            .ok_or_else(|| InvalidRecord("an empty request_id".into()))?;
        Ok((
            id,
            RequestRecord {
                resource: Resource::new(self.resource.clone()).map_err(bad)?,
                holder: Holder::new(self.holder.clone()).map_err(bad)?,
                ttl: self.ttl,
                lease_id: LeaseId(self.lease_id),
                token: FencingToken(self.token),
                recorded_unix_ms: self.recorded_unix_ms,
            },
        ))
    }
}

fn end_code(how: EndKind) -> u8 {
    match how {
        EndKind::Released => 0,
        EndKind::Expired => 1,
        EndKind::Revoked => 2,
    }
}

/// The end a code of [`WireChange::Ended`] stands for.
pub fn end_kind(code: u8) -> Option<EndKind> {
    match code {
        0 => Some(EndKind::Released),
        1 => Some(EndKind::Expired),
        2 => Some(EndKind::Revoked),
        _ => None,
    }
}

/// The wire form of a change; `None` for one the log need not carry (a
/// renewal that kept the TTL: every new leader gives leases a full TTL anyway).
pub fn to_wire(change: &Change) -> Option<WireChange> {
    Some(match change {
        Change::Granted(r) => WireChange::Granted(WireRecord::from_record(r)),
        Change::Renewed {
            record,
            ttl_changed: true,
        } => WireChange::TtlChanged(WireRecord::from_record(record)),
        Change::Renewed { .. } => return None,
        Change::Ended {
            record,
            how,
            at_unix_ms,
        } => WireChange::Ended {
            record: WireRecord::from_record(record),
            how: end_code(*how),
            at_unix_ms: *at_unix_ms,
        },
        Change::RequestsCollected(keys) => {
            WireChange::RequestsCollected(keys.iter().map(|k| k.as_str().to_owned()).collect())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_the_wire() {
        let record = LeaseRecord {
            resource: Resource::new("jobs/a").unwrap(),
            lease_id: LeaseId([7; 16]),
            token: FencingToken(42),
            holder: Holder::new("w1").unwrap(),
            ttl: Duration::from_millis(1500),
            acquired_unix_ms: 1_700_000_000_000,
            request_id: RequestId::new_optional("k1").unwrap(),
        };
        let wire = WireRecord::from_record(&record);
        let json = serde_json::to_vec(&wire).unwrap();
        let back: WireRecord = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.to_record().unwrap(), record);
        // An invalid resource is refused on the way back.
        let bad = WireRecord {
            resource: String::new(),
            ..wire
        };
        assert!(bad.to_record().is_err());
    }

    #[test]
    fn renewals_that_keep_the_ttl_are_not_replicated() {
        let record = LeaseRecord {
            resource: Resource::new("r").unwrap(),
            lease_id: LeaseId([1; 16]),
            token: FencingToken(1),
            holder: Holder::new("h").unwrap(),
            ttl: Duration::from_secs(1),
            acquired_unix_ms: 0,
            request_id: None,
        };
        let kept = Change::Renewed {
            record: record.clone(),
            ttl_changed: false,
        };
        let changed = Change::Renewed {
            record,
            ttl_changed: true,
        };
        assert_eq!(to_wire(&kept), None);
        assert!(matches!(to_wire(&changed), Some(WireChange::TtlChanged(_))));
    }
}
