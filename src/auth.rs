//! The admin credential: who may call `AdminService`.
//!
//! With `serve --admin-token-file PATH`, every admin call must carry
//! `authorization: Bearer <token>`; [`AdminGate`] (a tonic interceptor in
//! front of the admin service only) compares it in constant time and answers
//! UNAUTHENTICATED otherwise. Without a token the admin API is open on a
//! loopback address, and closed (PERMISSION_DENIED, with a message saying
//! how to open it) on any other address unless `--insecure-admin` is given.
//!
//! The worker API is never behind this gate: a worker's proof is its
//! lease id. Clients attach the header with [`BearerAuth`].

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Longest admin token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;

/// A shared secret for the admin API. Its `Debug` form never shows it.
///
/// Deliberately not `PartialEq`: the only comparison is the constant-time
/// one in the admin gate, so no `==` can leak the token through timing.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

/// Why an admin token could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("cannot read the admin token file {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The token is empty, too long, or not printable ASCII.
    #[error("the admin token {origin} is unusable: {reason}")]
    Invalid {
        /// Where it came from (a file or a variable).
        origin: String,
        /// What is wrong.
        reason: &'static str,
    },
}

impl AdminToken {
    /// Validates a token: 1..=4096 bytes of printable ASCII without spaces
    /// (it travels in an HTTP header). Surrounding whitespace is ignored.
    pub fn new(text: &str, origin: impl Into<String>) -> Result<Self, TokenError> {
        let text = text.trim();
        let invalid = |reason| TokenError::Invalid {
            origin: origin.into(),
            reason,
        };
        if text.is_empty() {
            return Err(invalid("it is empty"));
        }
        if text.len() > MAX_TOKEN_LEN {
            return Err(invalid("it is longer than 4096 bytes"));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "it must be printable ASCII without spaces (try 32 random hex digits)",
            ));
        }
        Ok(AdminToken(text.into()))
    }

    /// Reads a token from a file (a trailing newline is fine).
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::new(&text, format!("in {}", path.display()))
    }

    /// Whether `offered` is this token, in time that does not depend on
    /// where the two first differ.
    pub fn matches(&self, offered: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(offered).into()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Who may use the admin API on this server.
#[derive(Debug, Clone)]
pub enum AdminGate {
    /// Callers must present this token.
    Token(AdminToken),
    /// Anyone who can connect (loopback, or `--insecure-admin`).
    Open,
    /// Nobody: no token was configured and the address is not loopback.
    Closed {
        /// The address the server listens on, for the message.
        addr: String,
    },
}

impl Interceptor for AdminGate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match self {
            AdminGate::Open => Ok(request),
            AdminGate::Closed { addr } => Err(Status::permission_denied(format!(
                "the admin API is disabled: the server listens on {addr}, which is not loopback, \
                 and has no admin token; restart it with --admin-token-file PATH \
                 (or --insecure-admin to allow anyone who can connect)"
            ))),
            AdminGate::Token(token) => {
                let offered = request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
                match offered {
                    None => Err(Status::unauthenticated(
                        "this server needs an admin token: send `authorization: Bearer <token>` \
                         (leasehold CLI: --admin-token-file or LEASEHOLD_ADMIN_TOKEN)",
                    )),
                    Some(offered) if token.matches(offered) => Ok(request),
                    Some(_) => Err(Status::unauthenticated(
                        "the admin token is wrong; use the one in the server's --admin-token-file",
                    )),
                }
            }
        }
    }
}

/// Client side: adds `authorization: Bearer <token>` to every call (or
/// nothing when there is no token).
#[derive(Debug, Clone, Default)]
pub struct BearerAuth {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl BearerAuth {
    /// An interceptor that sends `token`, if any.
    pub fn new(token: Option<&AdminToken>) -> Self {
        // A validated token is printable ASCII, so the header always parses.
        let header = token.and_then(|t| format!("Bearer {}", t.0).parse().ok());
        BearerAuth { header }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn call(gate: &mut AdminGate, header: Option<&str>) -> Result<(), Code> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        gate.call(req).map(drop).map_err(|s| s.code())
    }

    #[test]
    fn gate_table() {
        let token = AdminToken::new("s3cret\n", "test").unwrap();
        let mut gate = AdminGate::Token(token.clone());
        let cases = [
            (None, Err(Code::Unauthenticated)),
            (Some("Bearer s3cret"), Ok(())),
            (Some("Bearer s3cre"), Err(Code::Unauthenticated)),
            (Some("Bearer s3cret2"), Err(Code::Unauthenticated)),
            (Some("bearer s3cret"), Err(Code::Unauthenticated)),
            (Some("s3cret"), Err(Code::Unauthenticated)),
        ];
        for (header, want) in cases {
            assert_eq!(call(&mut gate, header), want, "{header:?}");
        }
        assert_eq!(call(&mut AdminGate::Open, None), Ok(()));
        let mut closed = AdminGate::Closed {
            addr: "0.0.0.0:1".into(),
        };
        assert_eq!(
            call(&mut closed, Some("Bearer s3cret")),
            Err(Code::PermissionDenied)
        );
        let mut client = BearerAuth::new(Some(&token));
        let sent = client.call(Request::new(())).unwrap();
        assert_eq!(
            sent.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
    }

    #[test]
    fn token_validation_and_redaction() {
        for bad in ["", "  \n", "has space", "tab\there"] {
            assert!(AdminToken::new(bad, "test").is_err(), "{bad:?}");
        }
        let t = AdminToken::new("abc", "test").unwrap();
        assert!(!format!("{t:?}").contains("abc"));
    }
}
