//! TLS: loads PEM files into tonic's rustls configurations.
//!
//! The server takes a certificate chain and its key, and optionally a CA
//! whose certificates clients must present (mutual TLS). Clients take the CA
//! that signed the server's certificate (without one, an `https://` URL is
//! checked against the system's roots) and, for mutual TLS, their own
//! certificate and key. Every error names the file and the flag it came from,
//! so a typo in a path is found without reading a TLS library's message.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A PEM file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {flag} {path}: {source}")]
    Read {
        /// The flag that named the file (`--tls-cert`, ...).
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not the PEM it should be.
    #[error("{flag} {path} holds no PEM {what} (expected a `-----BEGIN {what}-----` block)")]
    NotPem {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What the file should hold (`CERTIFICATE`, `PRIVATE KEY`).
        what: &'static str,
    },
    /// Only one of a certificate and its key was given.
    #[error("{given} was given without {missing}; a TLS identity needs both")]
    HalfIdentity {
        /// The flag that was given.
        given: &'static str,
        /// The flag that is missing.
        missing: &'static str,
    },
}

/// Where the server's TLS material lives (`serve --tls-cert --tls-key [--client-ca]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The server's certificate chain, PEM.
    pub cert: PathBuf,
    /// The server's private key, PEM.
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// Reads the files into a tonic server configuration.
    pub fn load(&self) -> Result<ServerTlsConfig, TlsError> {
        let cert = read_pem("--tls-cert", &self.cert, "CERTIFICATE")?;
        let key = read_pem("--tls-key", &self.key, "PRIVATE KEY")?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &self.client_ca {
            let ca = read_pem("--client-ca", ca, "CERTIFICATE")?;
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        Ok(config)
    }
}

/// A client's TLS material (`--ca-cert`, `--client-cert`, `--client-key`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The CA that signed the server's certificate; `None`: the system's roots.
    pub ca_cert: Option<PathBuf>,
    /// The client's certificate, for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// The client's private key, for mutual TLS.
    pub client_key: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// Whether any TLS material was given.
    pub fn is_set(&self) -> bool {
        self.ca_cert.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }

    /// Reads the files into a tonic client configuration.
    pub fn load(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_cert {
            Some(path) => config.ca_certificate(Certificate::from_pem(read_pem(
                "--ca-cert",
                path,
                "CERTIFICATE",
            )?)),
            None => config.with_native_roots(),
        };
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let cert = read_pem("--client-cert", cert, "CERTIFICATE")?;
                let key = read_pem("--client-key", key, "PRIVATE KEY")?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            (Some(_), None) => {
                return Err(TlsError::HalfIdentity {
                    given: "--client-cert",
                    missing: "--client-key",
                })
            }
            (None, Some(_)) => {
                return Err(TlsError::HalfIdentity {
                    given: "--client-key",
                    missing: "--client-cert",
                })
            }
            (None, None) => {}
        }
        Ok(config)
    }
}

/// Reads a PEM file and checks that it holds a block of the expected kind
/// (`PRIVATE KEY` also matches `RSA PRIVATE KEY` and `EC PRIVATE KEY`).
pub(crate) fn read_pem(
    flag: &'static str,
    path: &Path,
    what: &'static str,
) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text.lines().any(|line| {
        line.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|label| label.ends_with(what))
    });
    if !found {
        return Err(TlsError::NotPem {
            flag,
            path: path.to_owned(),
            what,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_flag_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a pem").unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN EC PRIVATE KEY-----\nAA==\n-----END EC PRIVATE KEY-----\n",
        )
        .unwrap();
        let missing = dir.path().join("missing.pem");
        let cases: Vec<(ServerTlsFiles, &str)> = vec![
            (
                ServerTlsFiles {
                    cert: missing.clone(),
                    key: key.clone(),
                    client_ca: None,
                },
                "cannot read --tls-cert",
            ),
            (
                ServerTlsFiles {
                    cert: junk.clone(),
                    key: key.clone(),
                    client_ca: None,
                },
                "--tls-cert",
            ),
        ];
        for (files, want) in cases {
            let err = files.load().unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert!(err.contains(dir.path().to_str().unwrap()), "{err}");
        }
        let half = ClientTlsFiles {
            client_cert: Some(junk),
            ..ClientTlsFiles::default()
        };
        assert!(matches!(half.load(), Err(TlsError::HalfIdentity { .. })));
        assert!(!ClientTlsFiles::default().is_set());
    }
}
