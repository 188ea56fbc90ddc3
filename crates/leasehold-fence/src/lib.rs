//! A fence: the lease's resource and fencing token, as they travel from a
//! worker to a storage service.
//!
//! A worker that holds a lease sends two values with every write: the
//! lease's resource and its fencing token. The storage service checks the
//! token with a guard (`leasehold-guard`) before writing. This crate is the
//! wire format of that pair, shared by both sides (the worker library
//! `leasehold-client` attaches fences, the guard reads them), and the one
//! home of the rule for resource names, which the coordinator applies too:
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
//!   control characters ([`check_name`], the coordinator's own rule), sent
//!   with every byte outside printable ASCII (`!`..=`~`) and `%` itself
//!   percent-encoded as `%XX`. A plain ASCII name without spaces or `%` is
//!   therefore sent as is (`orders`), and `café 1` is sent as
//!   `caf%C3%A9%201`. The encoding keeps header values within the gRPC
//!   spec's printable ASCII, and is the one gRPC itself uses for
//!   `grpc-message`. Receivers also accept raw UTF-8 bytes and spaces.
//!
//! A value sent twice (two `leasehold-token` entries) is rejected rather
//! than guessed at.
//!
//! # Features
//!
//! - `grpc` (off by default): reading and attaching fences as tonic
//!   metadata, and the interceptors below. Without it the crate needs no
//!   gRPC at all: [`Fence::parse`] and [`Fence::header_values`] are the
//!   HTTP side.
//!
//! # Server side (`grpc`)
//!
//! Install `require_fence` (every method needs a fence) or
//! `optional_fence` (methods decide) as the service's interceptor; it
//! parses the metadata into a [`Fence`] stored in the request's extensions,
//! and answers `INVALID_ARGUMENT`, naming the key and its expected form,
//! when a value is malformed. Handlers read it with `Fence::from_request`.
//!
#![cfg_attr(
    feature = "grpc",
    doc = r##"
```
use leasehold_fence::{self as fencing, Fence};
use tonic::Request;

# fn handler(req: Request<()>) -> Result<(), tonic::Status> {
// In a handler of a service built with `XServer::with_interceptor(svc, fencing::require_fence)`:
let fence: &Fence = Fence::from_request(&req)?;
// ... guard.write(&fence.resource, fence.token, ...) ...
# Ok(()) }
let mut req = Request::new(());
fencing::attach(&mut req, "orders", 34)?;
let req = fencing::require_fence(req)?;
handler(req)?;
# Ok::<(), Box<dyn std::error::Error>>(())
```
"##
)]
//!
//! # Client side
//!
//! `attach` or `Fence::attach_to` (`grpc`) add the metadata to a request;
//! [`Fence::header_values`] gives the HTTP header values.

use percent_encoding::{percent_decode, utf8_percent_encode, AsciiSet, CONTROLS};
#[cfg(feature = "grpc")]
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
#[cfg(feature = "grpc")]
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

/// Why a name (a resource, or the coordinator's holder names) was refused.
/// The messages complete a sentence that starts with the field's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("must not be empty (1..={max} bytes)")]
    Empty {
        /// The longest name allowed, in bytes.
        max: usize,
    },
    /// The name is longer than `max` bytes.
    #[error("is {len} bytes long; the limit is {max} bytes")]
    TooLong {
        /// The name's length in bytes.
        len: usize,
        /// The longest name allowed, in bytes.
        max: usize,
    },
    /// The name contains a control character.
    #[error("must not contain control characters")]
    Control,
}

/// The rule for names: 1..=`max` bytes of UTF-8 without control characters.
/// Resources use it with [`MAX_RESOURCE_LEN`], on the coordinator, in the
/// client and in the guard alike.
///
/// ```
/// use leasehold_fence::{check_name, NameError, MAX_RESOURCE_LEN};
///
/// assert_eq!(check_name("orders", MAX_RESOURCE_LEN), Ok(()));
/// assert_eq!(check_name("", 512), Err(NameError::Empty { max: 512 }));
/// assert_eq!(check_name("a\nb", 512), Err(NameError::Control));
/// ```
pub fn check_name(value: &str, max: usize) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { max });
    }
    if value.len() > max {
        return Err(NameError::TooLong {
            len: value.len(),
            max,
        });
    }
    if value.chars().any(char::is_control) {
        return Err(NameError::Control);
    }
    Ok(())
}

/// Every byte outside printable ASCII (`!`..=`~`), and `%` itself, is
/// percent-encoded; `CONTROLS` plus non-ASCII covers all but space and `%`.
const ENCODED: &AsciiSet = &CONTROLS.add(b' ').add(b'%');

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

#[cfg(feature = "grpc")]
impl From<FenceError> for Status {
    fn from(e: FenceError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

/// The resource and fencing token a write is fenced by.
///
/// The fields are public for reading and destructuring; values built by hand
/// are validated when they are attached (`Fence::attach_to`) or received.
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

    #[cfg(feature = "grpc")]
    /// Parses the fence from gRPC metadata.
    pub fn from_metadata(metadata: &MetadataMap) -> Result<Self, FenceError> {
        let resource = single(metadata, RESOURCE_METADATA_KEY, RESOURCE_FORM)?;
        let token = single(metadata, TOKEN_METADATA_KEY, TOKEN_FORM)?;
        Fence::parse(resource.as_bytes(), token.as_bytes())
    }

    #[cfg(feature = "grpc")]
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
                 `leasehold_fence::require_fence` or `optional_fence` as the service's \
                 interceptor",
            )),
        }
    }

    #[cfg(feature = "grpc")]
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

#[cfg(feature = "grpc")]
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

#[cfg(feature = "grpc")]
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

#[cfg(feature = "grpc")]
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

#[cfg(feature = "grpc")]
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
    check_name(resource, MAX_RESOURCE_LEN).map_err(|e| FenceError::resource(e.to_string()))
}

fn encode_resource(resource: &str) -> String {
    utf8_percent_encode(resource, ENCODED).to_string()
}

fn decode_resource(value: &[u8]) -> Result<String, FenceError> {
    // `percent_decode` passes a malformed escape through as text; refuse it.
    for (i, _) in value.iter().enumerate().filter(|(_, &b)| b == b'%') {
        let escape = value.get(i + 1..i + 3);
        if !escape.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
            return Err(FenceError::resource(format!(
                "`%` at byte {i} is not followed by two hex digits"
            )));
        }
    }
    let resource = percent_decode(value)
        .decode_utf8()
        .map_err(|_| FenceError::resource("not UTF-8 after percent-decoding"))?
        .into_owned();
    check_resource(&resource)?;
    Ok(resource)
}

#[cfg(all(test, feature = "grpc"))]
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
