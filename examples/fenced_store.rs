//! `fenced_store`: the fenced key-value store ([`leasehold_guard::fenced_kv`]) as a
//! process, for demos and for the crash tests.
//!
//! ```text
//! fenced_store --listen 127.0.0.1:0 --data-dir DIR
//! fenced_store --listen 127.0.0.1:0 --postgres postgres://user@host:port/db
//! ```
//!
//! With `--postgres URL` (built with `--features postgres`) the data and the
//! fences live in that PostgreSQL database instead of sled
//! ([`leasehold_guard::pg::fenced_kv`]); the tables are created if missing.
//!
//! Once bound it prints exactly one line to stdout, `listening on ADDR`
//! (with the real port when asked for port 0), and serves until SIGINT or
//! SIGTERM, then flushes and exits. Logs go to stderr, filtered by
//! `RUST_LOG` (default `info`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// A key-value store that refuses writes carrying stale fencing tokens.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Directory of the sled database (created if missing).
    #[arg(
        long,
        required_unless_present = "postgres",
        conflicts_with = "postgres"
    )]
    data_dir: Option<PathBuf>,
    /// Keep the data and the fences in this PostgreSQL database instead
    /// (`postgres://user@host:port/db`; needs the `postgres` feature).
    #[arg(long, value_name = "URL")]
    postgres: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    // The one line of stdout: scripts and tests wait for it to learn the port.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {addr}").context("cannot write to stdout")?;
    stdout.flush().context("cannot flush stdout")?;
    drop(stdout);

    match (args.postgres, args.data_dir) {
        (Some(url), _) => serve_postgres(listener, &url).await,
        (None, Some(data_dir)) => {
            leasehold_guard::fenced_kv::serve(listener, &data_dir, shutdown_signal())
                .await
                .context("the fenced store failed")
        }
        (None, None) => unreachable!("clap requires --data-dir or --postgres"),
    }
}

async fn serve_postgres(listener: tokio::net::TcpListener, url: &str) -> anyhow::Result<()> {
    leasehold_guard::pg::fenced_kv::serve(listener, url, shutdown_signal())
        .await
        .context("the fenced store (PostgreSQL) failed")
}

/// Completes on SIGINT (ctrl-c) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
