//! `fenced_store`: the fenced key-value store ([`leasehold_guard::fenced_kv`]) as a
//! process, for demos and for the crash tests.
//!
//! ```text
//! fenced_store --listen 127.0.0.1:0 --data-dir DIR [--verify-key FILE|URL] [--http 127.0.0.1:0]
//! fenced_store --listen 127.0.0.1:0 --postgres postgres://user@host:port/db
//! ```
//!
//! With `--postgres URL` the data and the fences live in that PostgreSQL
//! database instead of sled ([`leasehold_guard::pg::fenced_kv`]); the tables
//! are created if missing. (That back end takes plain fences only.)
//!
//! With `--verify-key`, Put accepts only writes carrying the lease's signed
//! fence (`leasehold-fence-bin`), verified offline with the coordinator's
//! public keys, and writes with the token inside it. The value is either a
//! key file (`leasehold keys export > keys.pub`; read at start) or the
//! coordinator's URL (`http://…` / `https://…`), whose `PublicKeys` are
//! fetched **once at start**: after a `leasehold keys rotate`, restart the
//! store (or re-export the file) before the new key's fences arrive, or
//! they are refused as signed by an unknown key.
//!
//! Once bound it prints one line to stdout, `listening on ADDR` (with the
//! real port when asked for port 0), and with `--http ADDR` a second one,
//! `http on ADDR`, where it serves the guard's counters at `/metrics` (the
//! `leasehold-guard` crate's `metrics` feature, exported by
//! `metrics-exporter-prometheus` as any storage service embedding the guard
//! would). It serves until SIGINT or SIGTERM, then flushes and exits. Logs
//! go to stderr, filtered by `RUST_LOG` (default `info`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use leasehold::cli::common::ConnectArgs;
use leasehold_fence::signed::FenceVerifier;
use leasehold_guard::fenced_kv::FencedKvService;
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
    /// (`postgres://user@host:port/db`).
    #[arg(long, value_name = "URL", conflicts_with = "verify_key")]
    postgres: Option<String>,
    /// Require signed fences, verified with these public keys: a key file
    /// (`leasehold keys export`) or the coordinator's URL (fetched once).
    #[arg(long)]
    verify_key: Option<String>,
    /// Serve the guard's counters at /metrics on this address.
    #[arg(long)]
    http: Option<SocketAddr>,
}

/// The verifier `--verify-key` names: a coordinator URL or a key file.
async fn verifier(source: &str) -> anyhow::Result<FenceVerifier> {
    if source.starts_with("http://") || source.starts_with("https://") {
        let connect = ConnectArgs {
            server: source.to_owned(),
            ca_cert: None,
            client_cert: None,
            client_key: None,
        };
        let keys = leasehold::cli::keys::fetch(&connect)
            .await
            .with_context(|| format!("cannot fetch the public keys from {source}"))?;
        return leasehold::cli::keys::verifier(&keys);
    }
    let text = std::fs::read_to_string(source)
        .with_context(|| format!("cannot read the key file {source}"))?;
    FenceVerifier::from_key_file(&text).with_context(|| format!("the key file {source}"))
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

    // The recorder is installed before the guard is opened: the guard takes
    // its counters from it.
    let http = match args.http {
        Some(addr) => Some(serve_metrics(addr).await?),
        None => None,
    };
    // The store is opened (and the keys fetched) before the port is
    // announced, so a caller that saw `listening on` talks to a ready store.
    let sled = match &args.data_dir {
        Some(dir) => Some(sled_service(dir, args.verify_key.as_deref()).await?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    // The one line of stdout: scripts and tests wait for it to learn the port.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {addr}").context("cannot write to stdout")?;
    if let Some(http) = http {
        writeln!(stdout, "http on {http}").context("cannot write to stdout")?;
    }
    stdout.flush().context("cannot flush stdout")?;
    drop(stdout);

    match (sled, args.postgres) {
        (Some(service), _) => {
            leasehold_guard::fenced_kv::serve_service(listener, service, shutdown_signal())
                .await
                .context("the fenced store failed")
        }
        (None, Some(url)) => {
            leasehold_guard::pg::fenced_kv::serve(listener, &url, shutdown_signal())
                .await
                .context("the fenced store (PostgreSQL) failed")
        }
        (None, None) => anyhow::bail!("give --data-dir DIR or --postgres URL"),
    }
}

/// The sled-backed service, verifying signed fences when `verify_key` names
/// the coordinator's keys.
async fn sled_service(
    data_dir: &std::path::Path,
    verify_key: Option<&str>,
) -> anyhow::Result<FencedKvService> {
    let mut service = FencedKvService::open(data_dir)
        .with_context(|| format!("cannot open the store in {}", data_dir.display()))?;
    if let Some(source) = verify_key {
        let verifier = verifier(source).await?;
        anyhow::ensure!(
            !verifier.is_empty(),
            "--verify-key {source} holds no key: every write would be refused"
        );
        let ids: Vec<String> = verifier
            .keys()
            .map(|(k, s)| format!("{} ({})", k.id(), s.as_str()))
            .collect();
        tracing::info!(keys = %ids.join(", "), "writes need signed fences");
        service = service.with_verifier(verifier);
    }
    Ok(service)
}

/// Installs the process's Prometheus recorder and serves it at `/metrics`.
async fn serve_metrics(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    use axum::routing::get;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--http)"))?;
    let local = listener.local_addr()?;
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
    Ok(local)
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
