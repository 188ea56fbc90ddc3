//! Keys and record encodings of the table in sled and in the log: a
//! version byte, then fixed fields, then length-prefixed strings.

use std::time::Duration;

use crate::lease::{EndKind, FencingToken, Holder, LeaseId, RequestId, Resource};
use crate::state::{LeaseRecord, RequestRecord};

use super::GrantRecord;

pub(super) fn lease_key(resource: &Resource) -> Vec<u8> {
    tagged(b'L', resource.as_str().as_bytes())
}

pub(super) fn request_key(key: &RequestId) -> Vec<u8> {
    tagged(b'R', key.as_str().as_bytes())
}

pub(super) fn history_prefix(resource: &Resource) -> Vec<u8> {
    // Resources never contain `\0` (no control characters), so the separator
    // keeps "a" from matching the history of "ab".
    let mut k = tagged(b'H', resource.as_str().as_bytes());
    k.push(0);
    k
}

pub(super) fn history_key(resource: &Resource, token: FencingToken) -> Vec<u8> {
    let mut k = history_prefix(resource);
    k.extend_from_slice(&token.0.to_be_bytes());
    k
}

/// The token at the end of a [`history_key`].
pub(super) fn history_token(key: &[u8]) -> Option<u64> {
    let at = key.len().checked_sub(8)?;
    Decoder::new(&key[at..]).u64()
}

pub(super) fn tagged(tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(rest.len() + 1);
    k.push(tag);
    k.extend_from_slice(rest);
    k
}

// ---- record encoding: version byte, then fixed fields, then length-prefixed strings ----

pub(super) const VERSION: u8 = 1;

pub(super) struct Encoder(Vec<u8>);

impl Encoder {
    pub(super) fn new() -> Self {
        Encoder(vec![VERSION])
    }
    pub(super) fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(super) fn bytes(mut self, b: &[u8]) -> Self {
        // Every string is validated to at most 512 bytes, so u16 suffices.
        self.0.extend_from_slice(&(b.len() as u16).to_be_bytes());
        self.0.extend_from_slice(b);
        self
    }
}

pub(super) struct Decoder<'a>(&'a [u8]);

impl<'a> Decoder<'a> {
    pub(super) fn new(b: &'a [u8]) -> Self {
        Decoder(b)
    }
    pub(super) fn versioned(b: &'a [u8]) -> Option<Self> {
        match b.split_first() {
            Some((&VERSION, rest)) => Some(Decoder(rest)),
            _ => None,
        }
    }
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    pub(super) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    pub(super) fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().ok()?) as usize;
        self.take(len)
    }
    pub(super) fn text(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }
    pub(super) fn lease_id(&mut self) -> Option<LeaseId> {
        Some(LeaseId(self.take(16)?.try_into().ok()?))
    }
}

pub(super) fn encode_lease(r: &LeaseRecord) -> Vec<u8> {
    let mut e = Encoder::new();
    e.0.extend_from_slice(&r.lease_id.0);
    e.u64(r.token.0)
        .u64(r.ttl.as_millis() as u64)
        .u64(r.acquired_unix_ms)
        .bytes(r.holder.as_str().as_bytes())
        .bytes(
            r.request_id
                .as_ref()
                .map_or(&b""[..], |k| k.as_str().as_bytes()),
        )
        .0
}

pub(super) fn decode_lease(resource: &[u8], v: &[u8]) -> Option<LeaseRecord> {
    let mut d = Decoder::versioned(v)?;
    let lease_id = d.lease_id()?;
    let token = FencingToken(d.u64()?);
    let ttl = Duration::from_millis(d.u64()?);
    let acquired_unix_ms = d.u64()?;
    let holder = Holder::new(d.text()?).ok()?;
    let request_id = RequestId::new_optional(d.text()?).ok()?;
    let resource = Resource::new(std::str::from_utf8(resource).ok()?).ok()?;
    Some(LeaseRecord {
        resource,
        lease_id,
        token,
        holder,
        ttl,
        acquired_unix_ms,
        request_id,
    })
}

pub(super) fn encode_request(r: &LeaseRecord) -> Vec<u8> {
    let mut e = Encoder::new()
        .bytes(r.resource.as_str().as_bytes())
        .bytes(r.holder.as_str().as_bytes())
        .u64(r.ttl.as_millis() as u64);
    e.0.extend_from_slice(&r.lease_id.0);
    e.u64(r.token.0).u64(r.acquired_unix_ms).0
}

pub(super) fn decode_request(v: &[u8]) -> Option<RequestRecord> {
    let mut d = Decoder::versioned(v)?;
    Some(RequestRecord {
        resource: Resource::new(d.text()?).ok()?,
        holder: Holder::new(d.text()?).ok()?,
        ttl: Duration::from_millis(d.u64()?),
        lease_id: d.lease_id()?,
        token: FencingToken(d.u64()?),
        recorded_unix_ms: d.u64()?,
    })
}

pub(super) fn end_code(how: Option<EndKind>) -> u64 {
    match how {
        None => 0,
        Some(EndKind::Released) => 1,
        Some(EndKind::Expired) => 2,
        Some(EndKind::Revoked) => 3,
    }
}

pub(super) fn encode_history(r: &LeaseRecord, ended: Option<(EndKind, u64)>) -> Vec<u8> {
    Encoder::new()
        .u64(r.ttl.as_millis() as u64)
        .u64(r.acquired_unix_ms)
        .u64(end_code(ended.map(|e| e.0)))
        .u64(ended.map_or(0, |e| e.1))
        .bytes(r.holder.as_str().as_bytes())
        .0
}

pub(super) fn decode_history(token: FencingToken, v: &[u8]) -> Option<GrantRecord> {
    let mut d = Decoder::versioned(v)?;
    let ttl = Duration::from_millis(d.u64()?);
    let acquired_unix_ms = d.u64()?;
    let how = match d.u64()? {
        0 => None,
        1 => Some(EndKind::Released),
        2 => Some(EndKind::Expired),
        3 => Some(EndKind::Revoked),
        _ => return None,
    };
    let at = d.u64()?;
    Some(GrantRecord {
        token,
        holder: d.text()?.to_owned(),
        ttl,
        acquired_unix_ms,
        ended: how.map(|h| (h, at)),
    })
}
