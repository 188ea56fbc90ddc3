//! `serve --http ADDR`: binds the HTTP listener and starts [`crate::http`]
//! next to the gRPC server.

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::coordinator::Coordinator;
use crate::http::{self, HttpServer};
use crate::server::ServerConfig;

/// Binds `addr`, prints `http on ADDR` (scripts read the port of
/// `--http 127.0.0.1:0` from it), and serves until the coordinator stops.
pub async fn start(
    addr: &str,
    config: &ServerConfig,
    coordinator: &Coordinator,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--http)"))?;
    let local = listener.local_addr()?;
    let server = HttpServer::new(coordinator.clone(), config, local)?;
    println!("http on {local}");
    Ok(tokio::spawn(async move {
        if let Err(e) = http::serve(listener, server, std::future::pending()).await {
            tracing::error!(error = %e, "the HTTP server failed");
        }
    }))
}
