//! The command line: one file per command group; `main.rs` only dispatches.

use std::time::Duration;

use clap::{Parser, Subcommand};

pub mod acquire;
pub mod common;
pub mod serve;

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
}

/// Parses a human duration (`30s`, `1m`, `250ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 250ms, 30s, 1m)"))
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Acquire(args) => acquire::run(args).await,
    }
}
