//! The server: binds the services together and runs them until shutdown.
//!
//! [`run`] takes a bound listener and a shutdown future (mini-redis style),
//! so `main` binds the configured address while tests bind `127.0.0.1:0` and
//! stop the server whenever they like. Besides the lease services it serves
//! `grpc.health.v1` (SERVING while up, NOT_SERVING while shutting down) and
//! gRPC reflection, so `grpcurl` works without the proto files.
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

use crate::coordinator::{Config, Coordinator};
use crate::proto::lease_service_server::LeaseServiceServer;
use crate::service::LeaseApi;
use crate::store::StoreError;

/// Everything `leasehold serve` needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// The coordinator's configuration.
    pub coordinator: Config,
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// gRPC reflection could not be set up (a build problem).
    #[error("gRPC reflection could not be set up: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves on `listener` until `shutdown` resolves, then shuts down gracefully.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let coordinator = Coordinator::open(&config.data_dir, config.coordinator.clone())?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<LeaseServiceServer<LeaseApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "serving");

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
    let result = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(LeaseServiceServer::new(LeaseApi::new(coordinator.clone())))
        .serve_with_incoming_shutdown(incoming, on_shutdown)
        .await;
    coordinator.shutdown();
    tracing::info!("stopped");
    result.map_err(ServerError::from)
}
