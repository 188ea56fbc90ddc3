//! The server: binds the services together and runs them until shutdown.
//!
//! [`run`] takes a bound listener and a shutdown future (mini-redis style),
//! so `main` binds the configured address while tests bind `127.0.0.1:0` and
//! stop the server whenever they like. Besides the lease services it serves
//! `grpc.health.v1` (SERVING while up, NOT_SERVING while shutting down) and
//! gRPC reflection, so `grpcurl` works without the proto files.
//!
//! The admin service sits behind [`AdminGate`] (see [`crate::auth`]); with
//! [`ServerConfig::tls`] every connection is TLS (mutual with a client CA).
//! [`TransportLimits`] bound what one client can make the server hold: the size of a
//! message (a larger one is refused with RESOURCE_EXHAUSTED) and the streams
//! open at once on one connection (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`:
//! a well-behaved client waits for a free stream; one that does not is
//! refused the stream).
//!
//! Shutdown: when `shutdown` resolves, the coordinator stops taking new
//! Acquires, waiters and keepalive streams end, tonic stops accepting and
//! finishes the calls in flight, and finally the committer writes what is
//! queued and flushes sled.

use std::future::Future;
use std::path::PathBuf;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use tonic::codegen::http;
use tonic::service::interceptor::InterceptedService;
use tonic::Status;

use crate::admin::AdminApi;
use crate::auth::{AdminGate, AdminToken};
use crate::coordinator::{Config, Coordinator};
use crate::keys::{self, KeyOptions, Keys, KeysError};
use crate::metrics::Metrics;
use crate::proto::admin_service_server::AdminServiceServer;
use crate::proto::cluster_service_server::ClusterServiceServer;
use crate::proto::lease_service_server::LeaseServiceServer;
use crate::proto::raft_service_server::RaftServiceServer;
use crate::raft::forward::Forward;
use crate::service::LeaseApi;
use crate::store::StoreError;
use crate::tls::{ServerTlsFiles, TlsError};

/// Everything `leasehold serve` needs.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// The coordinator's configuration.
    pub coordinator: Config,
    /// TLS (and mutual TLS) material; `None` serves plain HTTP/2.
    pub tls: Option<ServerTlsFiles>,
    /// The token admin calls must present; `None`: see `insecure_admin`.
    pub admin_token: Option<AdminToken>,
    /// Serve the admin API without a token even on a non-loopback address.
    pub insecure_admin: bool,
    /// Transport limits.
    pub limits: TransportLimits,
    /// Where the signing keys live (default `DATA_DIR/signing-keys`).
    pub keys: KeyOptions,
    /// What is counted and measured for `/metrics` ([`Metrics::disabled`]
    /// unless `serve --http` is given).
    pub metrics: Metrics,
    /// With `--peers`: this node's place in a cluster. `None`: a single
    /// node, on the local write-ahead log.
    pub cluster: Option<crate::raft::ClusterConfig>,
}

/// TransportLimits on what one client can make the transport hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportLimits {
    /// Largest request message, in bytes.
    pub max_message_bytes: usize,
    /// Most streams (calls) open at once on one HTTP/2 connection.
    pub max_streams_per_connection: u32,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            max_message_bytes: 4 * 1024 * 1024,
            max_streams_per_connection: 1024,
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The signing keys could not be loaded or created.
    #[error(transparent)]
    Keys(#[from] KeysError),
    /// gRPC reflection could not be set up (a build problem).
    #[error("gRPC reflection could not be set up: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS files could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The transport failed.
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The cluster node could not start.
    #[error(transparent)]
    Node(#[from] crate::raft::NodeError),
    /// A cluster node's data directory was started without `--peers`.
    #[error("{0} belongs to a cluster node; start it with --node-id and --peers (or --join), or use another data directory")]
    ClusterDataDir(PathBuf),
}

/// Serves on `listener` until `shutdown` resolves, then shuts down gracefully.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let opened = open(&config).await?;
    serve(listener, config, opened, shutdown).await
}

/// What [`open`] opened: the coordinator, its signing keys and, in a
/// cluster, the Raft node that drives the coordinator.
#[derive(Clone)]
pub struct Opened {
    /// The lease table over its store (a single node) or over the
    /// replicated log (a cluster node).
    pub coordinator: Coordinator,
    /// The keys that sign every lease's fence (in a cluster, the node's
    /// copy of the replicated key set).
    pub keys: Keys,
    /// With [`ServerConfig::cluster`]: this node's place in the cluster.
    pub node: Option<crate::raft::Node>,
}

/// Opens the store (or, in a cluster, starts the Raft node), restores the
/// lease table and loads the signing keys: everything that can fail because
/// of the data directory, before the server announces itself.
pub async fn open(config: &ServerConfig) -> Result<Opened, ServerError> {
    // Asked before the store creates its files: only a new data directory
    // gets a new key without being told to.
    let data_dir_was_new = keys::data_dir_is_new(&config.data_dir);
    let mut options = config.coordinator.clone();
    options.store.metrics = config.metrics.store();
    if config.cluster.is_none() && config.data_dir.join("raft").exists() {
        // Its single-node store (if any) is older than the cluster's
        // state: serving it would reuse tokens.
        return Err(ServerError::ClusterDataDir(config.data_dir.clone()));
    }
    // First, as a cluster node's state machine takes on the cluster's key
    // set as soon as it applies the log.
    let key_file = config.keys.file(&config.data_dir);
    let raft_dir = config.data_dir.join("raft");
    // A cluster node whose Raft data holds the cluster's key set rewrites a
    // lost key file from it as it replays (the snapshot's set, then the
    // log's). The new key made meanwhile never signs: a leader takes on
    // the applied set before it decides.
    let rebuilds_keys = config.cluster.is_some()
        && !key_file.exists()
        && raft_dir.exists()
        && crate::raft::holds_key_set(&raft_dir).unwrap_or(false);
    if rebuilds_keys {
        tracing::warn!(path = %key_file.display(), "no signing key file; taking the cluster's key set from this node's Raft data");
    }
    let keys = Keys::open(
        &config.data_dir,
        &config.keys,
        data_dir_was_new || rebuilds_keys,
    )?;
    let (coordinator, node) = match &config.cluster {
        None => (Coordinator::open(&config.data_dir, options)?, None),
        Some(cluster) => {
            let (node, coordinator) =
                crate::raft::Node::start(&config.data_dir, cluster.clone(), options, keys.clone())
                    .await?;
            (coordinator, Some(node))
        }
    };
    Ok(Opened {
        coordinator,
        keys,
        node,
    })
}

/// Serves an opened coordinator on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    opened: Opened,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let Opened {
        coordinator,
        keys,
        node,
    } = opened;
    let (health, health_service) = tonic_health::server::health_reporter();
    match &node {
        None => health.set_serving::<LeaseServiceServer<LeaseApi>>().await,
        Some(node) => {
            tokio::spawn(crate::raft::node::report_health(
                node.clone(),
                health.clone(),
                coordinator.shutdown_token(),
            ));
        }
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let addr = listener.local_addr().ok();
    let gate = admin_gate(&config, addr);
    tracing::info!(?addr, tls = config.tls.is_some(), "serving");

    let mut builder =
        Server::builder().max_concurrent_streams(config.limits.max_streams_per_connection);
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls.load()?)?;
    }
    let max_bytes = config.limits.max_message_bytes;
    let mut lease_api = LeaseApi::new(coordinator.clone())
        .with_keys(keys.clone())
        .with_metrics(config.metrics.rpc());
    if config.keys.no_signed_fences {
        tracing::warn!("--no-signed-fences: leases carry no signed fence; storage that verifies will refuse their writes");
        lease_api = lease_api.without_signing();
    }
    let lease_service = LeaseServiceServer::new(lease_api).max_decoding_message_size(max_bytes);
    let mut admin_api = AdminApi::new(coordinator.clone()).with_keys(keys);
    if let Some(node) = &node {
        // Key changes go through the log.
        admin_api = admin_api.with_node(node.clone());
    }
    let admin_service = InterceptedService::new(
        AdminServiceServer::new(admin_api).max_decoding_message_size(max_bytes),
        gate,
    );
    // A single node serves the services as they are; a cluster node
    // forwards them to the leader and adds the cluster's own services.
    let cluster = node
        .clone()
        .map(|node| ClusterServices::new(node, coordinator.shutdown_token()));
    let (lease_service, admin_service, cluster) = match cluster {
        None => (Some(lease_service), Some(admin_service), None),
        Some(mut c) => {
            // PublicKeys answers from this node's copy of the cluster's
            // key set once it has one (before that, from the leader's).
            c.lease = Some(
                Forward::new(lease_service, c.node.clone())
                    .local_when(&[PUBLIC_KEYS], crate::raft::Node::has_key_set),
            );
            c.admin = Some(Forward::new(admin_service, c.node.clone()));
            (None, None, Some(c))
        }
    };
    let (forwarded_lease, forwarded_admin, raft_service, cluster_service) = match cluster {
        None => (None, None, None, None),
        Some(c) => (c.lease, c.admin, Some(c.raft), Some(c.cluster)),
    };

    let stopping = coordinator.shutdown_token();
    let on_shutdown = {
        let health = health.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: finishing calls in flight");
            health
                .set_not_serving::<LeaseServiceServer<LeaseApi>>()
                .await;
            // Ends waits and keepalive streams so in-flight calls can finish.
            stopping.cancel();
        }
    };
    // `serve_with_incoming*` ignores the builder's `tcp_nodelay`, so it is set
    // on the incoming stream: without it, small replies wait for Nagle's
    // algorithm and the peer's delayed ACK (up to 40 ms on Linux).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let result = builder
        .layer(config.metrics.rpc_layer())
        .layer(crate::trace::TraceLayer)
        .layer(tower::util::MapResponseLayer::new(
            move |res: http::Response<tonic::body::Body>| too_large_is_exhausted(res, max_bytes),
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_optional_service(lease_service)
        .add_optional_service(admin_service)
        .add_optional_service(forwarded_lease)
        .add_optional_service(forwarded_admin)
        .add_optional_service(raft_service)
        .add_optional_service(cluster_service)
        .serve_with_incoming_shutdown(incoming, on_shutdown)
        .await;
    coordinator.shutdown();
    if let Some(node) = &node {
        node.shutdown().await;
    }
    tracing::info!("stopped");
    result.map_err(ServerError::from)
}

/// LeaseService's PublicKeys method.
const PUBLIC_KEYS: &str = "/leasehold.v1.LeaseService/PublicKeys";

type AdminServer = InterceptedService<AdminServiceServer<AdminApi>, AdminGate>;

/// A cluster node's services (see [`serve_node`]).
struct ClusterServices {
    node: crate::raft::Node,
    lease: Option<Forward<LeaseServiceServer<LeaseApi>>>,
    admin: Option<Forward<AdminServer>>,
    raft: RaftServiceServer<crate::raft::network::RaftApi>,
    cluster: Forward<ClusterServiceServer<crate::raft::cluster_api::ClusterApi>>,
}

impl ClusterServices {
    fn new(node: crate::raft::Node, stopping: tokio_util::sync::CancellationToken) -> Self {
        // Raft messages carry batches and snapshots: no size limit between
        // members (only members reach them when mTLS is on).
        let raft = RaftServiceServer::new(crate::raft::network::RaftApi::new(
            node.raft().clone(),
            stopping,
        ))
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
        let cluster = Forward::new(
            ClusterServiceServer::new(crate::raft::cluster_api::ClusterApi::new(node.clone())),
            node.clone(),
        )
        .local(&["/leasehold.v1.ClusterService/Status"]);
        ClusterServices {
            node,
            lease: None,
            admin: None,
            raft,
            cluster,
        }
    }
}

/// Decides who may use the admin API, and says so in the log.
fn admin_gate(config: &ServerConfig, addr: Option<std::net::SocketAddr>) -> AdminGate {
    let loopback = addr.is_some_and(|a| a.ip().is_loopback());
    match &config.admin_token {
        Some(token) => AdminGate::Token(token.clone()),
        None if loopback => AdminGate::Open,
        None if config.insecure_admin => {
            tracing::warn!(
                ?addr,
                "the admin API is open to anyone who can connect (--insecure-admin without --admin-token-file)"
            );
            AdminGate::Open
        }
        None => {
            let addr = addr.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string());
            tracing::warn!(
                %addr,
                "the admin API is disabled: no --admin-token-file on a non-loopback address; \
                 pass --admin-token-file PATH (or --insecure-admin) to enable it"
            );
            AdminGate::Closed { addr }
        }
    }
}

/// tonic refuses an oversized message with OUT_OF_RANGE; gRPC's convention
/// (and our contract) is RESOURCE_EXHAUSTED, with a message naming the limit.
/// The status travels in the headers (trailers-only answers) or in the
/// trailers, so both are rewritten. No handler of ours answers OUT_OF_RANGE,
/// so only tonic's own refusal matches.
fn too_large_is_exhausted(
    mut res: http::Response<tonic::body::Body>,
    limit: usize,
) -> http::Response<tonic::body::Body> {
    rewrite_too_large(res.headers_mut(), limit);
    res.map(|inner| tonic::body::Body::new(TooLargeTrailers { inner, limit }))
}

fn rewrite_too_large(headers: &mut http::HeaderMap, limit: usize) {
    let too_large = Status::from_header_map(headers)
        .is_some_and(|s| s.code() == tonic::Code::OutOfRange && s.message().contains("too large"));
    if too_large {
        let status = Status::resource_exhausted(format!(
            "the request message is larger than this server's limit of {limit} bytes \
             (serve --max-message-bytes); send smaller requests"
        ));
        headers.remove("grpc-message");
        let _ = status.add_header(headers);
    }
}

/// A response body whose trailers go through [`rewrite_too_large`].
struct TooLargeTrailers {
    inner: tonic::body::Body,
    limit: usize,
}

impl http_body::Body for TooLargeTrailers {
    type Data = tonic::codegen::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let limit = self.limit;
        std::pin::Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_ok(|mut frame| {
                if let Some(trailers) = frame.trailers_mut() {
                    rewrite_too_large(trailers, limit);
                }
                frame
            })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_gate_table() {
        let token = AdminToken::new("t", "test").unwrap();
        let public: std::net::SocketAddr = "192.0.2.1:7420".parse().unwrap();
        let local: std::net::SocketAddr = "127.0.0.1:7420".parse().unwrap();
        let config = |admin_token: Option<AdminToken>, insecure_admin| ServerConfig {
            admin_token,
            insecure_admin,
            ..ServerConfig::default()
        };
        let cases = [
            (config(None, false), local, "Open"),
            (config(None, false), public, "Closed"),
            (config(None, true), public, "Open"),
            (config(Some(token.clone()), false), public, "Token"),
            (config(Some(token), true), local, "Token"),
        ];
        for (config, addr, want) in cases {
            let gate = format!("{:?}", admin_gate(&config, Some(addr)));
            assert!(gate.starts_with(want), "{addr} {config:?}: {gate}");
        }
    }
}
