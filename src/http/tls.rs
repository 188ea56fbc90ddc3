//! The gRPC server's TLS files as a rustls configuration for `--http`: the
//! same certificate and key, and with `--client-ca` the same demand for a
//! client certificate (mutual TLS).

use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

use super::HttpError;
use crate::tls::{read_pem, ServerTlsFiles};

/// Builds the rustls configuration for HTTP/1.1 over TLS.
pub fn server_config(files: &ServerTlsFiles) -> Result<Arc<ServerConfig>, HttpError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| HttpError::Rustls(format!("{what}: {e}"));
    let cert = read_pem("--tls-cert", &files.cert, "CERTIFICATE")?;
    let key = read_pem("--tls-key", &files.key, "PRIVATE KEY")?;
    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("--tls-cert", &e))?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| bad("--tls-key", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS versions", &e))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let pem = read_pem("--client-ca", ca, "CERTIFICATE")?;
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem) {
                roots
                    .add(c.map_err(|e| bad("--client-ca", &e))?)
                    .map_err(|e| bad("--client-ca", &e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad("--client-ca", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| bad("--tls-cert/--tls-key", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
