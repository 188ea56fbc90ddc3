//! `serve --http ADDR`: `/metrics`, `/healthz`, `/readyz` and the lease page.
//!
//! A small HTTP/1.1 server (hyper + an axum router, both already in the
//! tree through tonic) next to the gRPC one, sharing its coordinator, its
//! TLS files and its admin credential:
//!
//! | path | what | access |
//! |---|---|---|
//! | `/healthz` | 200 while the process serves | anyone |
//! | `/readyz` | 200 when it can take Acquires (503 while stopping, or in a cluster without a leader) | anyone |
//! | `/metrics` | the Prometheus exposition ([`crate::metrics`]) | read |
//! | `/`, `/page.js`, `/page.css` | the lease page (static, embedded; no data of its own) | anyone |
//! | `/api/session` | which access the caller has (the page asks first) | anyone |
//! | `/api/leases`, `/api/history`, `/api/feed` | leases, a resource's grants, the live feed (server-sent events) | read |
//! | `POST /api/revoke` | revoke a lease, guarded by its token | revoke |
//!
//! **Read** follows the admin API's rule ([`access`]): with
//! `--admin-token-file`, the request must carry `Authorization: Bearer
//! <token>`; without one, reads are open on a loopback address only (and
//! then only to requests whose `Host` is a loopback name, so a web page
//! elsewhere cannot read them through DNS rebinding), and closed elsewhere
//! unless `--insecure-admin`. **Revoke** always needs the admin token in
//! that header: a server without one is read-only from the browser. A
//! bearer header (never a cookie) also means no other site can make a
//! browser revoke (no CSRF), and `X-Frame-Options: DENY` keeps the page out
//! of frames.

mod api;
mod feed;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::AdminGate;
use crate::cluster_view::{single_node, ClusterView};
use crate::coordinator::Coordinator;
use crate::metrics::{Metrics, UPKEEP_EVERY};
use crate::server::ServerConfig;
use crate::tls::TlsError;

/// Why the HTTP server could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The TLS files could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// rustls refused the certificate, key or client CA.
    #[error("the TLS settings cannot be used for --http: {0}")]
    Rustls(String),
}

/// Everything the HTTP server serves from.
#[derive(Clone)]
pub struct HttpServer {
    coordinator: Coordinator,
    metrics: Metrics,
    cluster: Arc<dyn ClusterView>,
    gate: AdminGate,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl HttpServer {
    /// The server for `coordinator`, with the TLS files, admin token and
    /// metrics of `config`, listening on `addr` (which decides, like for the
    /// admin API, whether an unauthenticated read is allowed).
    pub fn new(
        coordinator: Coordinator,
        config: &ServerConfig,
        addr: SocketAddr,
    ) -> Result<Self, HttpError> {
        let tls = config.tls.as_ref().map(tls::server_config).transpose()?;
        Ok(HttpServer {
            coordinator,
            metrics: config.metrics.clone(),
            cluster: single_node(),
            gate: access(config, addr),
            tls,
        })
    }

    /// Reads the cluster's status from `view` (a single node by default).
    pub fn with_cluster(mut self, view: Arc<dyn ClusterView>) -> Self {
        self.cluster = view;
        self
    }

    fn shutdown_token(&self) -> CancellationToken {
        self.coordinator.shutdown_token()
    }
}

/// Who may read through HTTP without a token; the admin API's rule, logged
/// for this listener.
pub fn access(config: &ServerConfig, addr: SocketAddr) -> AdminGate {
    match &config.admin_token {
        Some(token) => AdminGate::Token(token.clone()),
        None if addr.ip().is_loopback() => AdminGate::Open,
        None if config.insecure_admin => {
            tracing::warn!(%addr, "the lease page and /metrics are open to anyone who can connect (--insecure-admin without --admin-token-file)");
            AdminGate::Open
        }
        None => {
            tracing::warn!(
                %addr,
                "the lease page's data and /metrics are disabled: no --admin-token-file on a \
                 non-loopback address; pass --admin-token-file PATH (or --insecure-admin)"
            );
            AdminGate::Closed {
                addr: addr.to_string(),
            }
        }
    }
}

/// Serves on `listener` until `shutdown` resolves or the coordinator shuts
/// down; then stops accepting, ends the live feeds and gives the open
/// connections two seconds to finish.
pub async fn serve(
    listener: TcpListener,
    server: HttpServer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stopping = server.shutdown_token();
    let addr = listener.local_addr()?;
    tracing::info!(%addr, tls = server.tls.is_some(), "serving /metrics and the lease page");
    let upkeep = {
        let (metrics, stopping) = (server.metrics.clone(), stopping.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(UPKEEP_EVERY);
            loop {
                tokio::select! {
                    _ = stopping.cancelled() => return,
                    _ = every.tick() => metrics.upkeep(),
                }
            }
        })
    };
    let acceptor = server.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let app = router(server);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            _ = stopping.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            let http = hyper::server::conn::http1::Builder::new();
            let result = match acceptor {
                None => http.serve_connection(TokioIo::new(stream), service).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(tls)) => http.serve_connection(TokioIo::new(tls), service).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    // Feeds end once the coordinator's shutdown token is cancelled; give
    // the other requests a moment.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.abort_all();
    upkeep.abort();
    Ok(())
}

/// The routes; see the module docs.
fn router(server: HttpServer) -> Router {
    Router::new()
        .route("/", get(page_html))
        .route("/page.js", get(page_js))
        .route("/page.css", get(page_css))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/session", get(api::session))
        .route("/api/leases", get(api::leases))
        .route("/api/history", get(api::history))
        .route("/api/revoke", post(api::revoke))
        .route("/api/feed", get(feed::feed))
        .layer(middleware::from_fn(security_headers))
        .with_state(server)
}

const PAGE_HTML: &str = include_str!("page/index.html");
const PAGE_JS: &str = include_str!("page/page.js");
const PAGE_CSS: &str = include_str!("page/page.css");

async fn page_html() -> Response {
    static_file("text/html; charset=utf-8", PAGE_HTML)
}

async fn page_js() -> Response {
    static_file("text/javascript; charset=utf-8", PAGE_JS)
}

async fn page_css() -> Response {
    static_file("text/css; charset=utf-8", PAGE_CSS)
}

fn static_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Headers on every answer: no framing, no sniffing, scripts and styles
/// only from this server.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpServer>) -> Response {
    if s.coordinator.shutdown_token().is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if let Some(c) = s.cluster.status() {
        if c.leader.is_none() {
            return (StatusCode::SERVICE_UNAVAILABLE, "no leader\n").into_response();
        }
    }
    "ready\n".into_response()
}

async fn metrics(State(s): State<HttpServer>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorize(&s.gate, &headers, Need::Read) {
        return refused.into_response();
    }
    // Fold the latest histogram samples in, so a scrape sees every call
    // answered before it (the periodic upkeep only bounds memory).
    s.metrics.upkeep();
    let stats = s.coordinator.stats();
    let cluster = s.cluster.status();
    let body = s.metrics.render(&stats, cluster.as_ref());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        Body::from(body),
    )
        .into_response()
}

/// What a request asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// See leases, history, metrics.
    Read,
    /// Revoke a lease.
    Revoke,
}

/// A refused request: its status and a message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refused {
    status: StatusCode,
    message: String,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let mut res = (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"leasehold\""),
            );
        }
        res
    }
}

fn refused(status: StatusCode, message: impl Into<String>) -> Refused {
    Refused {
        status,
        message: message.into(),
    }
}

/// Whether a request may do what it asks; see the module docs.
fn authorize(gate: &AdminGate, headers: &HeaderMap, need: Need) -> Result<(), Refused> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match gate {
        AdminGate::Token(token) => match bearer {
            Some(offered) if token.matches(offered) => Ok(()),
            Some(_) => Err(refused(
                StatusCode::UNAUTHORIZED,
                "the admin token is wrong; use the one in the server's --admin-token-file",
            )),
            None => Err(refused(
                StatusCode::UNAUTHORIZED,
                "this server needs its admin token: send `Authorization: Bearer <token>` \
                 (on the page: enter it in the token field)",
            )),
        },
        AdminGate::Open if need == Need::Revoke => Err(refused(
            StatusCode::FORBIDDEN,
            "revoking through HTTP needs an admin token: restart the server with \
             --admin-token-file PATH and send `Authorization: Bearer <token>` \
             (or use `leasehold leases revoke`)",
        )),
        AdminGate::Open if !loopback_host(headers) => Err(refused(
            StatusCode::FORBIDDEN,
            "without an admin token this server answers only requests addressed to a loopback \
             name (Host: 127.0.0.1, localhost or [::1]); use that address, or set \
             --admin-token-file",
        )),
        AdminGate::Open => Ok(()),
        AdminGate::Closed { addr } => Err(refused(
            StatusCode::FORBIDDEN,
            format!(
                "this server listens on {addr}, which is not loopback, and has no admin token; \
                 restart it with --admin-token-file PATH (or --insecure-admin)"
            ),
        )),
    }
}

/// Whether the `Host` header names this machine (DNS-rebinding guard).
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        // HTTP/1.0 without Host: not a browser's request.
        return true;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AdminToken;

    fn headers(host: Option<&str>, bearer: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(host) = host {
            h.insert(header::HOST, host.parse().unwrap());
        }
        if let Some(b) = bearer {
            h.insert(
                header::AUTHORIZATION,
                format!("Bearer {b}").parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn authorize_table() {
        let token = AdminGate::Token(AdminToken::new("s3cret", "test").unwrap());
        let open = AdminGate::Open;
        let closed = AdminGate::Closed {
            addr: "192.0.2.1:7480".into(),
        };
        let ok = StatusCode::OK;
        let cases = [
            (
                &token,
                Some("h"),
                None,
                Need::Read,
                StatusCode::UNAUTHORIZED,
            ),
            (
                &token,
                Some("h"),
                Some("nope"),
                Need::Read,
                StatusCode::UNAUTHORIZED,
            ),
            (&token, Some("evil.example"), Some("s3cret"), Need::Read, ok),
            (&token, Some("h"), Some("s3cret"), Need::Revoke, ok),
            (&open, Some("127.0.0.1:7480"), None, Need::Read, ok),
            (&open, Some("localhost:7480"), None, Need::Read, ok),
            (&open, Some("[::1]:7480"), None, Need::Read, ok),
            (&open, Some("127.0.0.1"), None, Need::Read, ok),
            (
                &open,
                Some("evil.example:7480"),
                None,
                Need::Read,
                StatusCode::FORBIDDEN,
            ),
            (
                &open,
                Some("127.0.0.1.evil.example"),
                None,
                Need::Read,
                StatusCode::FORBIDDEN,
            ),
            (
                &open,
                Some("127.0.0.1:7480"),
                None,
                Need::Revoke,
                StatusCode::FORBIDDEN,
            ),
            (
                &open,
                Some("127.0.0.1:7480"),
                Some("x"),
                Need::Revoke,
                StatusCode::FORBIDDEN,
            ),
            (&closed, Some("h"), None, Need::Read, StatusCode::FORBIDDEN),
            (
                &closed,
                Some("h"),
                Some("s3cret"),
                Need::Revoke,
                StatusCode::FORBIDDEN,
            ),
        ];
        for (gate, host, bearer, need, want) in cases {
            let got =
                authorize(gate, &headers(host, bearer), need).map_or_else(|r| r.status, |()| ok);
            assert_eq!(
                got, want,
                "{gate:?} host={host:?} bearer={bearer:?} {need:?}"
            );
        }
    }
}
