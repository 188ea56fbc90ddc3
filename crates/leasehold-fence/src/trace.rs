//! W3C trace context (`traceparent`) on the wire, so one trace follows a
//! worker's acquire into the coordinator.
//!
//! The worker library sends a `traceparent` with its calls; the coordinator
//! reads it and records the trace id in the call's span (and, with its
//! `otlp` feature, makes its span a child of the worker's). The format is
//! the [W3C Trace Context](https://www.w3.org/TR/trace-context/) header:
//!
//! ```text
//! traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
//!              ^^ ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^ ^^^^^^^^^^^^^^^^ ^^
//!         version trace id (16 bytes)              parent id (8)    flags
//! ```
//!
//! ```
//! use leasehold_fence::trace::TraceParent;
//!
//! let tp = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")?;
//! assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! assert!(tp.sampled());
//! assert_eq!(tp.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
//! # Ok::<(), leasehold_fence::trace::TraceParentError>(())
//! ```

use std::fmt;

/// The gRPC metadata key (and HTTP header) that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A parsed `traceparent`: which trace a call belongs to, and which span
/// of the caller's made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace's id; never all zeros.
    pub trace_id: [u8; 16],
    /// The caller's span; never all zeros.
    pub parent_id: [u8; 8],
    /// Trace flags; bit 0 says the caller records (samples) this trace.
    pub flags: u8,
}

/// Why a `traceparent` value was refused (the call then starts a trace of
/// its own; a bad header never fails a call).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    /// Not `version-traceid-parentid-flags` with the right lengths.
    #[error("traceparent must look like 00-<32 hex digits>-<16 hex digits>-<2 hex digits>")]
    Shape,
    /// A field is not lowercase hexadecimal.
    #[error("traceparent fields must be lowercase hexadecimal")]
    NotHex,
    /// Version `ff`, or extra fields after a version-00 value.
    #[error("traceparent version is not supported (ff, or extra fields with version 00)")]
    Version,
    /// An all-zero trace id or parent id.
    #[error("traceparent ids must not be all zeros")]
    ZeroId,
}

impl TraceParent {
    /// A trace context made of the given ids (for a caller that has none
    /// yet: pass random bytes), sampled. `None` if an id is all zeros.
    pub fn new(trace_id: [u8; 16], parent_id: [u8; 8]) -> Option<Self> {
        let tp = TraceParent {
            trace_id,
            parent_id,
            flags: 1,
        };
        (!tp.has_zero_id()).then_some(tp)
    }

    /// The same trace, called from another span of the caller's.
    pub fn child(self, parent_id: [u8; 8]) -> Self {
        TraceParent { parent_id, ..self }
    }

    /// Parses a header value (the spec's rules: lowercase hex, version `ff`
    /// refused, later versions read by their first four fields).
    pub fn parse(value: &str) -> Result<Self, TraceParentError> {
        let v = value.trim_matches(|c| c == ' ' || c == '\t').as_bytes();
        if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return Err(TraceParentError::Shape);
        }
        let version = hex_byte(&v[0..2])?;
        if version == 0xff {
            return Err(TraceParentError::Version);
        }
        if v.len() > 55 && (version == 0 || v[55] != b'-') {
            return Err(if version == 0 {
                TraceParentError::Version
            } else {
                TraceParentError::Shape
            });
        }
        let mut tp = TraceParent {
            trace_id: [0; 16],
            parent_id: [0; 8],
            flags: hex_byte(&v[53..55])?,
        };
        for (i, b) in tp.trace_id.iter_mut().enumerate() {
            *b = hex_byte(&v[3 + 2 * i..5 + 2 * i])?;
        }
        for (i, b) in tp.parent_id.iter_mut().enumerate() {
            *b = hex_byte(&v[36 + 2 * i..38 + 2 * i])?;
        }
        if tp.has_zero_id() {
            return Err(TraceParentError::ZeroId);
        }
        Ok(tp)
    }

    /// The trace id as 32 lowercase hex digits (as tracing backends show it).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The parent id as 16 lowercase hex digits.
    pub fn parent_id_hex(&self) -> String {
        hex(&self.parent_id)
    }

    /// Whether the caller samples this trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    fn has_zero_id(&self) -> bool {
        self.trace_id == [0; 16] || self.parent_id == [0; 8]
    }

    /// The trace context a request carries, if it carries a valid one.
    #[cfg(feature = "grpc")]
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<Self> {
        let value = metadata.get(TRACEPARENT)?.to_str().ok()?;
        Self::parse(value).ok()
    }

    /// Puts this trace context on a request's metadata (replacing any).
    #[cfg(feature = "grpc")]
    pub fn attach(&self, metadata: &mut tonic::metadata::MetadataMap) {
        // Hex digits and dashes: always a valid ASCII metadata value.
        if let Ok(v) = self.to_string().parse() {
            metadata.insert(TRACEPARENT, v);
        }
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn hex_byte(two: &[u8]) -> Result<u8, TraceParentError> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(TraceParentError::NotHex),
    };
    Ok(digit(two[0])? << 4 | digit(two[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parse_table() {
        let cases: &[(&str, Result<&str, TraceParentError>)] = &[
            (GOOD, Ok(GOOD)),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                Ok("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            ),
            // A later version is read by its first four fields.
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                Ok(GOOD),
            ),
            (
                " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
                Ok(GOOD),
            ),
            ("", Err(TraceParentError::Shape)),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                Err(TraceParentError::Shape),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
                Err(TraceParentError::Shape),
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                Err(TraceParentError::NotHex),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                Err(TraceParentError::NotHex),
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Err(TraceParentError::Version),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                Err(TraceParentError::Version),
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                Err(TraceParentError::ZeroId),
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                Err(TraceParentError::ZeroId),
            ),
        ];
        for (input, want) in cases {
            let got = TraceParent::parse(input).map(|t| t.to_string());
            assert_eq!(got, want.clone().map(str::to_owned), "{input:?}");
        }
    }

    #[test]
    fn new_refuses_zero_ids_and_child_keeps_the_trace() {
        assert_eq!(TraceParent::new([0; 16], [1; 8]), None);
        assert_eq!(TraceParent::new([1; 16], [0; 8]), None);
        let tp = TraceParent::new([0xab; 16], [1; 8]).unwrap();
        let child = tp.child([2; 8]);
        assert_eq!(child.trace_id, tp.trace_id);
        assert_eq!(child.parent_id_hex(), "0202020202020202");
        assert!(child.sampled());
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn metadata_round_trip_and_bad_values_are_ignored() {
        let tp = TraceParent::parse(GOOD).unwrap();
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(TraceParent::from_metadata(&md), None);
        tp.attach(&mut md);
        assert_eq!(TraceParent::from_metadata(&md), Some(tp));
        md.insert(TRACEPARENT, "garbage".parse().unwrap());
        assert_eq!(TraceParent::from_metadata(&md), None);
    }
}
