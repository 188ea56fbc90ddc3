//! TLS and mutual TLS with certificates made in the test (rcgen): the happy
//! paths through the client library and the CLI, and clients that are refused.

use std::path::PathBuf;
use std::time::Duration;

use leasehold::cli::common::ConnectArgs;
use leasehold::coordinator::Config;
use leasehold::proto::{self, lease_service_client::LeaseServiceClient};
use leasehold::server::ServerConfig;
use leasehold::tls::ServerTlsFiles;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tempfile::TempDir;

use crate::support::*;

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client
/// certificate, all as PEM files in a temp dir.
pub(crate) struct Pki {
    dir: TempDir,
}

impl Pki {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "leasehold test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca.pem());
        for (name, sans) in [
            (
                "server",
                vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            ),
            ("client", vec!["worker-1".to_owned()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        // A second CA that signed nothing of ours.
        let other = rcgen::generate_simple_self_signed(vec!["elsewhere".to_owned()]).unwrap();
        write("other-ca.pem", other.cert.pem());
        Pki { dir }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server_files(&self, mutual: bool) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.path("server.pem"),
            key: self.path("server-key.pem"),
            client_ca: mutual.then(|| self.path("ca.pem")),
        }
    }

    async fn server(&self, mutual: bool) -> TestServer {
        let options = ServerConfig {
            tls: Some(self.server_files(mutual)),
            ..ServerConfig::default()
        };
        TestServer::start_with_options(Config::default(), options).await
    }

    fn connect_args(&self, server: &TestServer, ca: Option<&str>, client: bool) -> ConnectArgs {
        ConnectArgs {
            server: format!("https://{}", server.addr),
            ca_cert: ca.map(|c| self.path(c)),
            client_cert: client.then(|| self.path("client.pem")),
            client_key: client.then(|| self.path("client-key.pem")),
        }
    }
}

/// One Describe over `args`: the first call is where a refused client
/// certificate shows up in TLS 1.3.
async fn describe_over(args: &ConnectArgs) -> Result<proto::DescribeResponse, String> {
    let channel = tokio::time::timeout(Duration::from_secs(2), args.connect())
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("{e:#}"))?;
    LeaseServiceClient::new(channel)
        .describe(proto::DescribeRequest {
            resource: "r".into(),
        })
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("{s:?}"))
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_ca_and_refuses_others() {
    let pki = Pki::new();
    let server = pki.server(false).await;
    let ok = pki.connect_args(&server, Some("ca.pem"), false);
    let d = describe_over(&ok).await.expect("a client with the CA");
    assert!(!d.held);
    // The worker and admin APIs both work over the same TLS channel.
    let channel = ok.connect().await.unwrap();
    let mut c = LeaseServiceClient::new(channel.clone());
    grant(&mut c, acquire_req("r", "h", 1000)).await;
    let mut admin = admin_over(channel, None);
    let s = admin
        .stats(proto::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.live_leases, 1);
    // Without our CA (system roots, or another CA) the handshake fails.
    for ca in [None, Some("other-ca.pem")] {
        let err = describe_over(&pki.connect_args(&server, ca, false))
            .await
            .expect_err("a client without the CA must be refused");
        assert!(err.contains("cannot reach"), "{err}");
    }
    // Plain HTTP/2 to a TLS server gets nowhere either.
    let plain = ConnectArgs {
        server: server.url(),
        ca_cert: None,
        client_cert: None,
        client_key: None,
    };
    assert!(describe_over(&plain).await.is_err());
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let pki = Pki::new();
    let server = pki.server(true).await;
    let with_cert = pki.connect_args(&server, Some("ca.pem"), true);
    describe_over(&with_cert)
        .await
        .expect("a client with a certificate");
    let without = pki.connect_args(&server, Some("ca.pem"), false);
    let err = describe_over(&without)
        .await
        .expect_err("a client without a certificate must be refused");
    assert!(!err.is_empty());
}

#[tokio::test]
async fn bad_tls_files_are_named_in_the_error() {
    let pki = Pki::new();
    std::fs::write(pki.path("junk.pem"), "junk").unwrap();
    let server = TestServer::start().await;
    let mut args = pki.connect_args(&server, Some("junk.pem"), false);
    let err = format!("{:#}", args.endpoint().unwrap_err());
    assert!(
        err.contains("--ca-cert") && err.contains("junk.pem"),
        "{err}"
    );
    args.ca_cert = Some(pki.path("missing.pem"));
    let err = format!("{:#}", args.endpoint().unwrap_err());
    assert!(err.contains("cannot read --ca-cert"), "{err}");
    // TLS files with an http:// URL would go unused: refused.
    args.server = server.url();
    args.ca_cert = Some(pki.path("ca.pem"));
    let err = format!("{:#}", args.endpoint().unwrap_err());
    assert!(err.contains("https://"), "{err}");
}

#[tokio::test]
async fn cli_speaks_mutual_tls() {
    let pki = Pki::new();
    let server = pki.server(true).await;
    let url = format!("https://{}", server.addr);
    let ca = pki.path("ca.pem");
    let cert = pki.path("client.pem");
    let key = pki.path("client-key.pem");
    let out = run_cli(
        &[
            "status",
            "--json",
            "--server",
            &url,
            "--ca-cert",
            ca.to_str().unwrap(),
            "--client-cert",
            cert.to_str().unwrap(),
            "--client-key",
            key.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["live_leases"], 0);
    // Without the CA: a clear "cannot reach" and exit code 69.
    let out = run_cli(&["status", "--server", &url], &[]).await;
    assert_eq!(out.code, 69, "{out:?}");
    assert!(
        out.stderr
            .contains("cannot reach the coordinator at https://"),
        "{out:?}"
    );
}

/// `GET /healthz` over HTTPS to the `--http` listener, trusting the test CA,
/// with or without the client certificate. `Err` if the exchange failed.
async fn https_healthz(
    pki: &Pki,
    addr: std::net::SocketAddr,
    client: bool,
) -> Result<String, String> {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{self, RootCertStore};

    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = if client {
        let chain = CertificateDer::pem_file_iter(pki.path("client.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(pki.path("client-key.pem")).unwrap();
        builder.with_client_auth_cert(chain, key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// `serve --http` takes the gRPC server's TLS files: HTTPS with the same
/// certificate, and with `--client-ca` only clients with a certificate.
#[tokio::test]
async fn the_http_listener_uses_the_servers_tls_and_mutual_tls() {
    let pki = Pki::new();
    let server = crate::observe_support::Observed::start(ServerConfig {
        tls: Some(pki.server_files(true)),
        ..ServerConfig::default()
    })
    .await;
    let ok = https_healthz(&pki, server.http, true)
        .await
        .expect("HTTPS with a client certificate");
    assert!(
        ok.starts_with("HTTP/1.1 200 OK") && ok.ends_with("ok\n"),
        "{ok}"
    );
    let refused = https_healthz(&pki, server.http, false).await;
    assert!(
        refused.is_err(),
        "answered without a client certificate: {refused:?}"
    );
    // Plain HTTP is not answered as HTTP.
    let plain = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(server.http).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        out
    };
    let plain = tokio::time::timeout(Duration::from_secs(5), plain)
        .await
        .unwrap_or_default();
    assert!(
        !plain.starts_with(b"HTTP/1.1 200"),
        "plain HTTP was answered"
    );
}
