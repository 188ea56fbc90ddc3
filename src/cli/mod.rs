//! The command line: one file per command group; `main.rs` only dispatches.

use std::time::Duration;

use clap::{Parser, Subcommand};

pub mod acquire;
pub mod bench;
pub mod cluster;
pub mod common;
pub mod exit;
pub mod keys;
pub mod leases;
pub mod output;
pub mod serve;
pub mod serve_http;
pub mod status;

/// Leasehold: leases with fencing tokens that never go backwards.
#[derive(Debug, Parser)]
#[command(name = "leasehold", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator.
    Serve(serve::ServeArgs),
    /// Take a lease; run COMMAND under it, or print it.
    Acquire(acquire::AcquireArgs),
    /// Operators: list, inspect, revoke and watch leases (admin API).
    Leases(leases::LeasesArgs),
    /// Operators: the coordinator's figures (admin API).
    Status(status::StatusArgs),
    /// Operators: the keys that sign fences (list, export, rotate, retire).
    Keys(keys::KeysArgs),
    /// Measure a server: `cycle`, `contended`, `keepalive`, `fill`, `ready`.
    Bench(bench::BenchArgs),
    /// Operators: a cluster's members and leader; add and remove members.
    Cluster(cluster::ClusterArgs),
}

/// Parses a human duration (`30s`, `1m`, `250ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 250ms, 30s, 1m)"))
}

/// Runs the parsed command. Operator commands report their failures here,
/// with the exit codes listed in [`output`].
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let result = match cli.command {
        Command::Serve(args) => return serve::run(args).await,
        Command::Leases(args) => leases::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Keys(args) => keys::run(args).await,
        Command::Cluster(args) => cluster::run(args).await,
        Command::Acquire(args) => return acquire::run(args).await,
        Command::Bench(args) => return bench::run(args).await,
    };
    match result {
        Ok(code) => Ok(code),
        Err(e) => {
            let code = e
                .downcast_ref::<output::Failure>()
                .map_or(exit::FAILED, |f| f.code);
            eprintln!("error: {}", output::error_chain(e.as_ref()));
            Ok(code)
        }
    }
}
