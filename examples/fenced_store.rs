//! `fenced_store`: the fenced key-value store ([`leasehold_guard::fenced_kv`]) as a
//! process, for demos and for the crash tests.
//!
//! ```text
//! fenced_store --listen 127.0.0.1:0 --data-dir DIR [--http 127.0.0.1:0]
//! ```
//!
//! Once bound it prints one line to stdout, `listening on ADDR` (with the
//! real port when asked for port 0), and with `--http` a second one, `http
//! on ADDR`, where it serves the guard's counters at `/metrics` (the
//! `leasehold-guard` crate's `metrics` feature, exported by
//! `metrics-exporter-prometheus` as any storage service embedding the guard
//! would). It serves until SIGINT or SIGTERM, then flushes and exits. Logs
//! go to stderr, filtered by `RUST_LOG` (default `info`).

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
    #[arg(long)]
    data_dir: PathBuf,
    /// Serve the guard's counters at /metrics on this address.
    #[arg(long)]
    http: Option<SocketAddr>,
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
    if let Some(http) = args.http {
        // Before the guard is opened: it takes its counters from the recorder.
        serve_metrics(http).await?;
    }

    leasehold_guard::fenced_kv::serve(listener, &args.data_dir, shutdown_signal())
        .await
        .context("the fenced store failed")?;
    Ok(())
}

/// Installs the process's Prometheus recorder and serves it at `/metrics`.
async fn serve_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    use axum::routing::get;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--http)"))?;
    let local = listener.local_addr()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "http on {local}").context("cannot write to stdout")?;
    stdout.flush().context("cannot flush stdout")?;
    drop(stdout);
    let render = handle.clone();
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let handle = render.clone();
            async move { handle.render() }
        }),
    );
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            handle.run_upkeep();
        }
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics server failed");
        }
    });
    Ok(())
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
