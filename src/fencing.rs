//! Carrying a fencing token from a worker to a storage service.
//!
//! A worker that holds a lease sends two values with every write: the
//! lease's resource and its fencing token. The storage service checks the
//! token with a [`guard`](crate::guard) before writing. This module is the
//! wire format of that pair and the helpers on both sides:
//!
//! | transport      | resource                 | token                 |
//! |----------------|--------------------------|-----------------------|
//! | gRPC metadata  | [`RESOURCE_METADATA_KEY`] (`leasehold-resource`) | [`TOKEN_METADATA_KEY`] (`leasehold-token`) |
//! | HTTP header    | [`RESOURCE_HEADER`] (`Leasehold-Resource`)        | [`TOKEN_HEADER`] (`Leasehold-Token`)          |
//!
//! # Values
//!
//! - **token**: the decimal form of a `u64`, digits only (`34`).
//! - **resource**: the resource name, 1..=512 bytes of UTF-8 without
//!   control characters (the coordinator's own rule), sent with every byte
//!   outside printable ASCII (`!`..=`~`) and `%` itself percent-encoded as
//!   `%XX`. A plain ASCII name without spaces or `%` is therefore sent as is
//!   (`orders`), and `café 1` is sent as `caf%C3%A9%201`. The encoding keeps
//!   header values within the gRPC spec's printable ASCII, and is the one
//!   gRPC itself uses for `grpc-message`. Receivers also accept raw UTF-8
//!   bytes and spaces.
//!
//! A value sent twice (two `leasehold-token` entries) is rejected rather
//! than guessed at.
//!
//! # Server side
//!
//! Install [`require_fence`] (every method needs a fence) or
//! [`optional_fence`] (methods decide) as the service's interceptor; it
//! parses the metadata into a [`Fence`] stored in the request's extensions,
//! and answers `INVALID_ARGUMENT`, naming the key and its expected form,
//! when a value is malformed. Handlers read it with [`Fence::from_request`].
//!
//! ```
//! use leasehold::fencing::{self, Fence};
//! use tonic::Request;
//!
//! # fn handler(req: Request<()>) -> Result<(), tonic::Status> {
//! // In a handler of a service built with `XServer::with_interceptor(svc, fencing::require_fence)`:
//! let fence: &Fence = Fence::from_request(&req)?;
//! // ... guard.write(&fence.resource, fence.token, ...) ...
//! # Ok(()) }
//! let mut req = Request::new(());
//! fencing::attach(&mut req, "orders", 34)?;
//! let req = fencing::require_fence(req)?;
//! handler(req)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Client side
//!
//! [`attach`] or [`Fence::attach_to`] add the metadata to a request;
//! [`Fence::header_values`] gives the HTTP header values.

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Request, Status};

/// gRPC metadata key carrying the lease's resource.
pub const RESOURCE_METADATA_KEY: &str = "leasehold-resource";
/// gRPC metadata key carrying the lease's fencing token.
pub const TOKEN_METADATA_KEY: &str = "leasehold-token";
/// HTTP header carrying the lease's resource (same value as the metadata).
pub const RESOURCE_HEADER: &str = "Leasehold-Resource";
/// HTTP header carrying the lease's fencing token (same value as the metadata).
pub const TOKEN_HEADER: &str = "Leasehold-Token";
/// Longest resource name, in bytes (after percent-decoding).
pub const MAX_RESOURCE_LEN: usize = 512;

const TOKEN_FORM: &str = "the lease's fencing token as a decimal u64, e.g. `34`";
const RESOURCE_FORM: &str = "the lease's resource: 1..=512 bytes of UTF-8 without control \
                             characters, with bytes outside printable ASCII and `%` \
                             percent-encoded (%XX)";

/// A fence value that is missing or malformed. Converts into
/// `Status::invalid_argument` with the same message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// The request does not carry `key`.
    #[error("missing `{key}`: send {expected}")]
    Missing {
        /// The metadata key (HTTP: the same name, case-insensitive).
        key: &'static str,
        /// What the value must look like.
        expected: &'static str,
    },
    /// The request carries `key`, but its value is not acceptable.
    #[error("malformed `{key}` ({problem}): send {expected}")]
    Malformed {
        /// The metadata key (HTTP: the same name, case-insensitive).
        key: &'static str,
        /// What is wrong with the value.
        problem: String,
        /// What the value must look like.
        expected: &'static str,
    },
}

impl FenceError {
    fn token(problem: impl Into<String>) -> Self {
        FenceError::Malformed {
            key: TOKEN_METADATA_KEY,
            problem: problem.into(),
            expected: TOKEN_FORM,
        }
    }

    fn resource(problem: impl Into<String>) -> Self {
        FenceError::Malformed {
            key: RESOURCE_METADATA_KEY,
            problem: problem.into(),
            expected: RESOURCE_FORM,
        }
    }

    /// The metadata key the error is about.
    pub fn key(&self) -> &'static str {
        match self {
            FenceError::Missing { key, .. } | FenceError::Malformed { key, .. } => key,
        }
    }
}

impl From<FenceError> for Status {
    fn from(e: FenceError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

/// The resource and fencing token a write is fenced by.
///
/// The fields are public for reading and destructuring; values built by hand
/// are validated when they are attached ([`Fence::attach_to`]) or received.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The leased resource; the guard keeps one high-water mark per resource.
    pub resource: String,
    /// The lease's fencing token.
    pub token: u64,
}

impl Fence {
    /// A fence, after checking the resource name.
    pub fn new(resource: impl Into<String>, token: u64) -> Result<Self, FenceError> {
        let resource = resource.into();
        check_resource(&resource)?;
        Ok(Fence { resource, token })
    }

    /// Parses the two wire values (metadata or HTTP header values, as bytes).
    pub fn parse(resource: &[u8], token: &[u8]) -> Result<Self, FenceError> {
        let token = parse_token(token)?;
        let resource = decode_resource(resource)?;
        Ok(Fence { resource, token })
    }

    /// Parses the fence from gRPC metadata.
    pub fn from_metadata(metadata: &MetadataMap) -> Result<Self, FenceError> {
        let resource = single(metadata, RESOURCE_METADATA_KEY, RESOURCE_FORM)?;
        let token = single(metadata, TOKEN_METADATA_KEY, TOKEN_FORM)?;
        Fence::parse(resource.as_bytes(), token.as_bytes())
    }

    /// The fence an interceptor ([`require_fence`], [`optional_fence`])
    /// stored in the request.
    ///
    /// Errors: `INVALID_ARGUMENT` naming the missing or malformed key if the
    /// request carries no valid fence; `INTERNAL` if it carries one but no
    /// interceptor parsed it (the server forgot to install one).
    pub fn from_request<T>(req: &Request<T>) -> Result<&Fence, Status> {
        if let Some(fence) = req.extensions().get::<Fence>() {
            return Ok(fence);
        }
        match Fence::from_metadata(req.metadata()) {
            Err(e) => Err(e.into()),
            Ok(_) => Err(Status::internal(
                "the server reads fencing tokens without parsing them: install \
                 `leasehold::fencing::require_fence` or `optional_fence` as the service's \
                 interceptor",
            )),
        }
    }

    /// Adds this fence's metadata to `req`, replacing any already there.
    pub fn attach_to<T>(&self, req: &mut Request<T>) -> Result<(), FenceError> {
        attach(req, &self.resource, self.token)
    }

    /// The values of the [`RESOURCE_HEADER`] and [`TOKEN_HEADER`] HTTP
    /// headers (the same as the gRPC metadata values).
    pub fn header_values(&self) -> Result<(String, String), FenceError> {
        check_resource(&self.resource)?;
        Ok((encode_resource(&self.resource), self.token.to_string()))
    }
}

/// Adds the fence metadata for `resource` and `token` to `req`, replacing
/// any already there. Fails only if the resource name is invalid.
pub fn attach<T>(req: &mut Request<T>, resource: &str, token: u64) -> Result<(), FenceError> {
    check_resource(resource)?;
    let value = AsciiMetadataValue::try_from(encode_resource(resource).as_str())
        .map_err(|_| FenceError::resource("cannot be encoded as a metadata value"))?;
    let metadata = req.metadata_mut();
    metadata.insert(RESOURCE_METADATA_KEY, value);
    metadata.insert(TOKEN_METADATA_KEY, AsciiMetadataValue::from(token));
    Ok(())
}

/// A tonic interceptor for services whose every method needs a fence:
/// parses the metadata into a [`Fence`] in the request's extensions, or
/// answers `INVALID_ARGUMENT` naming the missing or malformed key.
///
/// Install it with `XServer::with_interceptor(service, require_fence)`.
pub fn require_fence(mut req: Request<()>) -> Result<Request<()>, Status> {
    let fence = Fence::from_metadata(req.metadata())?;
    req.extensions_mut().insert(fence);
    Ok(req)
}

/// A tonic interceptor for services where only some methods need a fence
/// (writes, not reads): like [`require_fence`], but a request carrying
/// neither key passes through without a [`Fence`], and the methods that need
/// one get `INVALID_ARGUMENT` from [`Fence::from_request`]. A request with
/// only one of the two keys, or a malformed value, is still rejected here.
pub fn optional_fence(req: Request<()>) -> Result<Request<()>, Status> {
    let metadata = req.metadata();
    if metadata.get(RESOURCE_METADATA_KEY).is_none() && metadata.get(TOKEN_METADATA_KEY).is_none() {
        return Ok(req);
    }
    require_fence(req)
}

fn single<'a>(
    metadata: &'a MetadataMap,
    key: &'static str,
    expected: &'static str,
) -> Result<&'a AsciiMetadataValue, FenceError> {
    let mut values = metadata.get_all(key).iter();
    let first = values.next().ok_or(FenceError::Missing { key, expected })?;
    if values.next().is_some() {
        return Err(FenceError::Malformed {
            key,
            problem: "sent more than once".into(),
            expected,
        });
    }
    Ok(first)
}

fn parse_token(value: &[u8]) -> Result<u64, FenceError> {
    let shown = String::from_utf8_lossy(value);
    if value.is_empty() {
        return Err(FenceError::token("empty"));
    }
    if !value.iter().all(u8::is_ascii_digit) {
        return Err(FenceError::token(format!(
            "{shown:?} is not a decimal number"
        )));
    }
    shown
        .parse::<u64>()
        .map_err(|_| FenceError::token(format!("{shown:?} does not fit in a u64")))
}

fn check_resource(resource: &str) -> Result<(), FenceError> {
    if resource.is_empty() {
        return Err(FenceError::resource("empty"));
    }
    if resource.len() > MAX_RESOURCE_LEN {
        return Err(FenceError::resource(format!(
            "{} bytes long; the limit is {MAX_RESOURCE_LEN}",
            resource.len()
        )));
    }
    if resource.chars().any(char::is_control) {
        return Err(FenceError::resource("contains control characters"));
    }
    Ok(())
}

/// Percent-encodes every byte outside `!`..=`~`, and `%`.
fn encode_resource(resource: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(resource.len());
    for &b in resource.as_bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    out
}

fn decode_resource(value: &[u8]) -> Result<String, FenceError> {
    let mut bytes = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    FenceError::resource(format!(
                        "`%` at byte {i} is not followed by two hex digits"
                    ))
                })?;
            bytes.push(hex);
            i += 3;
        } else {
            bytes.push(value[i]);
            i += 1;
        }
    }
    let resource = String::from_utf8(bytes)
        .map_err(|_| FenceError::resource("not UTF-8 after percent-decoding"))?;
    check_resource(&resource)?;
    Ok(resource)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn with_metadata(pairs: &[(&'static str, &str)]) -> Request<()> {
        let mut req = Request::new(());
        for &(key, value) in pairs {
            req.metadata_mut()
                .append(key, AsciiMetadataValue::try_from(value).unwrap());
        }
        req
    }

    #[test]
    fn attach_then_intercept_round_trips() {
        for resource in ["orders", "a b", "100%", "café/1", "ü", &"x".repeat(512)] {
            let mut req = Request::new(());
            attach(&mut req, resource, 34).unwrap();
            let req = require_fence(req).unwrap();
            let fence = Fence::from_request(&req).unwrap();
            assert_eq!(fence, &Fence::new(resource, 34).unwrap());
        }
        let mut req = Request::new(());
        Fence::new("r", u64::MAX)
            .unwrap()
            .attach_to(&mut req)
            .unwrap();
        let req = optional_fence(req).unwrap();
        assert_eq!(Fence::from_request(&req).unwrap().token, u64::MAX);
    }

    #[test]
    fn wire_form_is_printable_ascii() {
        let mut req = Request::new(());
        attach(&mut req, "café 100%", 7).unwrap();
        let sent = req.metadata().get(RESOURCE_METADATA_KEY).unwrap();
        assert_eq!(sent.to_str().unwrap(), "caf%C3%A9%20100%25");
        assert_eq!(req.metadata().get(TOKEN_METADATA_KEY).unwrap(), "7");
        let fence = Fence::new("café 100%", 7).unwrap();
        assert_eq!(
            fence.header_values().unwrap(),
            ("caf%C3%A9%20100%25".to_string(), "7".to_string())
        );
    }

    #[test]
    fn attach_rejects_invalid_resources() {
        let too_long = "x".repeat(513);
        for resource in ["", "a\nb", "tab\there", too_long.as_str()] {
            let mut req = Request::new(());
            let err = attach(&mut req, resource, 1).unwrap_err();
            assert_eq!(err.key(), RESOURCE_METADATA_KEY, "{resource:?}");
            assert!(req.metadata().is_empty());
        }
    }

    /// (metadata, key named in the error, text the message contains)
    type Case = (
        &'static [(&'static str, &'static str)],
        &'static str,
        &'static str,
    );

    #[test]
    fn bad_metadata_is_invalid_argument_naming_the_key() {
        let cases: &[Case] = &[
            (&[], "leasehold-resource", "missing"),
            (
                &[(TOKEN_METADATA_KEY, "5")],
                "leasehold-resource",
                "missing",
            ),
            (
                &[(RESOURCE_METADATA_KEY, "r")],
                "leasehold-token",
                "missing",
            ),
            (
                &[(RESOURCE_METADATA_KEY, "r"), (TOKEN_METADATA_KEY, "five")],
                "leasehold-token",
                "decimal u64",
            ),
            (
                &[(RESOURCE_METADATA_KEY, "r"), (TOKEN_METADATA_KEY, "-5")],
                "leasehold-token",
                "not a decimal number",
            ),
            (
                &[(RESOURCE_METADATA_KEY, "r"), (TOKEN_METADATA_KEY, "+5")],
                "leasehold-token",
                "not a decimal number",
            ),
            (
                &[(RESOURCE_METADATA_KEY, "r"), (TOKEN_METADATA_KEY, "")],
                "leasehold-token",
                "empty",
            ),
            (
                &[
                    (RESOURCE_METADATA_KEY, "r"),
                    (TOKEN_METADATA_KEY, "18446744073709551616"),
                ],
                "leasehold-token",
                "does not fit",
            ),
            (
                &[
                    (RESOURCE_METADATA_KEY, "r"),
                    (TOKEN_METADATA_KEY, "5"),
                    (TOKEN_METADATA_KEY, "6"),
                ],
                "leasehold-token",
                "more than once",
            ),
            (
                &[(RESOURCE_METADATA_KEY, ""), (TOKEN_METADATA_KEY, "5")],
                "leasehold-resource",
                "1..=512 bytes",
            ),
            (
                &[(RESOURCE_METADATA_KEY, "a%0Ab"), (TOKEN_METADATA_KEY, "5")],
                "leasehold-resource",
                "control characters",
            ),
            (
                &[(RESOURCE_METADATA_KEY, "a%zz"), (TOKEN_METADATA_KEY, "5")],
                "leasehold-resource",
                "two hex digits",
            ),
            (
                &[(RESOURCE_METADATA_KEY, "a%C3"), (TOKEN_METADATA_KEY, "5")],
                "leasehold-resource",
                "not UTF-8",
            ),
        ];
        for &(pairs, key, text) in cases {
            let status = require_fence(with_metadata(pairs)).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{pairs:?}");
            assert!(
                status.message().contains(&format!("`{key}`")),
                "{pairs:?}: {status:?}"
            );
            assert!(status.message().contains(text), "{pairs:?}: {status:?}");
        }
    }

    #[test]
    fn optional_fence_lets_requests_without_a_fence_through() {
        let req = optional_fence(Request::new(())).unwrap();
        assert!(req.extensions().get::<Fence>().is_none());
        // The handler that needs a fence then answers INVALID_ARGUMENT.
        let status = Fence::from_request(&req).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("`leasehold-resource`"));
        // Half a fence, or a malformed one, is still rejected up front.
        let half = with_metadata(&[(TOKEN_METADATA_KEY, "5")]);
        assert_eq!(
            optional_fence(half).unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn unparsed_fence_is_an_internal_error() {
        let mut req = Request::new(());
        attach(&mut req, "r", 5).unwrap();
        let status = Fence::from_request(&req).unwrap_err();
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().contains("require_fence"));
    }

    #[test]
    fn raw_utf8_and_spaces_are_accepted() {
        let fence = Fence::parse("café 1".as_bytes(), b"9").unwrap();
        assert_eq!(fence, Fence::new("café 1", 9).unwrap());
    }
}
