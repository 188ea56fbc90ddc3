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
    node: Option<&crate::raft::Node>,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--http)"))?;
    let local = listener.local_addr()?;
    let mut server = HttpServer::new(coordinator.clone(), config, local)?;
    if let Some(node) = node {
        server = server.with_cluster(std::sync::Arc::new(node.clone()));
    }
    println!("http on {local}");
    Ok(tokio::spawn(async move {
        if let Err(e) = http::serve(listener, server, std::future::pending()).await {
            tracing::error!(error = %e, "the HTTP server failed");
        }
    }))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    #[test]
    fn http_flag_table() {
        let cases: [(&[&str], Option<&str>); 3] = [
            (&[], None),
            (&["--http"], Some("127.0.0.1:7480")),
            (&["--http", "0.0.0.0:9000"], Some("0.0.0.0:9000")),
        ];
        for (args, want) in cases {
            let argv = ["leasehold", "serve"].iter().chain(args);
            let cli = Cli::try_parse_from(argv).unwrap();
            let Command::Serve(serve) = cli.command else {
                panic!("{args:?} is not serve");
            };
            assert_eq!(serve.http.as_deref(), want, "{args:?}");
        }
    }
}
