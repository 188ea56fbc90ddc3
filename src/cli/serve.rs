//! `leasehold serve`: run the coordinator until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::coordinator::Config;
use crate::lease::Bounds;
use crate::server::{self, ServerConfig};
use crate::state::Limits;
use crate::store::StoreOptions;

/// Options of `leasehold serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7420", env = "LEASEHOLD_LISTEN")]
    pub listen: String,
    /// Directory for the store (created if missing).
    #[arg(long, default_value = "./leasehold-data", env = "LEASEHOLD_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Shortest TTL a lease may ask for.
    #[arg(long, default_value = "100ms", value_parser = super::parse_duration)]
    pub min_ttl: Duration,
    /// Longest TTL a lease may ask for.
    #[arg(long, default_value = "1h", value_parser = super::parse_duration)]
    pub max_ttl: Duration,
    /// Longest an Acquire may wait in line.
    #[arg(long, default_value = "5m", value_parser = super::parse_duration)]
    pub max_wait: Duration,
    /// How long idempotency keys are kept at least.
    #[arg(long, default_value = "24h", value_parser = super::parse_duration)]
    pub request_retention: Duration,
    /// Most live leases at once.
    #[arg(long, default_value_t = Limits::default().max_leases)]
    pub max_leases: usize,
    /// Most waiters queued on one resource.
    #[arg(long, default_value_t = Limits::default().max_waiters_per_resource)]
    pub max_waiters_per_resource: usize,
    /// Most waiters queued in all.
    #[arg(long, default_value_t = Limits::default().max_waiters)]
    pub max_waiters: usize,
    /// Past grants kept per resource for `leases history`.
    #[arg(long, default_value_t = StoreOptions::default().history_per_resource)]
    pub history: usize,
}

impl ServeArgs {
    /// The server configuration these options describe.
    pub fn config(&self) -> anyhow::Result<ServerConfig> {
        anyhow::ensure!(
            self.min_ttl <= self.max_ttl && !self.min_ttl.is_zero(),
            "--min-ttl must be above zero and at most --max-ttl"
        );
        Ok(ServerConfig {
            data_dir: self.data_dir.clone(),
            coordinator: Config {
                bounds: Bounds {
                    min_ttl: self.min_ttl,
                    max_ttl: self.max_ttl,
                    max_wait: self.max_wait,
                },
                limits: Limits {
                    request_retention: self.request_retention,
                    max_leases: self.max_leases,
                    max_waiters_per_resource: self.max_waiters_per_resource,
                    max_waiters: self.max_waiters,
                },
                store: StoreOptions {
                    history_per_resource: self.history.max(1),
                    ..StoreOptions::default()
                },
            },
        })
    }
}

/// Binds, serves, and returns the exit code once shut down.
pub async fn run(args: ServeArgs) -> anyhow::Result<i32> {
    let config = args.config()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    // Tests and scripts read this line to learn the port of `--listen 127.0.0.1:0`.
    println!("listening on {}", listener.local_addr()?);
    server::run(listener, config, shutdown_signal()).await?;
    Ok(0)
}

/// Resolves on SIGINT (ctrl-c) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
