//! `leasehold acquire RESOURCE -- COMMAND`: run a program under a fenced lease.
//!
//! Like `flock(1)` or `etcdctl lock`, but the program learns its fencing
//! token (`LEASEHOLD_TOKEN`) and is stopped when the lease is lost:
//!
//! - holds the lease while COMMAND runs, renewing it in the background;
//! - exports `LEASEHOLD_TOKEN`, `LEASEHOLD_RESOURCE`, `LEASEHOLD_LEASE_ID`;
//! - if the lease is lost: SIGTERM to COMMAND, SIGKILL after `--kill-after`,
//!   exit [`LOST`](super::exit::LOST);
//! - SIGINT/SIGTERM to leasehold are forwarded to COMMAND;
//! - when COMMAND ends, releases the lease and exits with COMMAND's status
//!   (128 + N if it was killed by signal N).
//!
//! Without COMMAND, prints the granted lease and exits, leaving it to run
//! out its TTL (`--json` for scripts).

use std::time::Duration;

use clap::Args;
use rustix::process::{kill_process, Pid, Signal};
use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};

use super::common::ConnectArgs;
use leasehold_client::{AcquireError, Client, ClientConfig, ClientError};

use super::exit::{
    BUSY as EXIT_BUSY, CANNOT_RUN as EXIT_CANNOT_RUN, LOST as EXIT_LOST,
    UNREACHABLE as EXIT_UNREACHABLE,
};

/// Options of `leasehold acquire`.
#[derive(Debug, Args)]
pub struct AcquireArgs {
    /// The resource to lease.
    pub resource: String,
    /// How to reach the coordinator.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The lease's TTL; it is renewed every TTL/3 while COMMAND runs.
    #[arg(long, default_value = "30s", value_parser = super::parse_duration)]
    pub ttl: Duration,
    /// How long to wait in line if the resource is held.
    #[arg(long, default_value = "0s", value_parser = super::parse_duration)]
    pub wait: Duration,
    /// Who holds the lease (default hostname:pid).
    #[arg(long)]
    pub holder: Option<String>,
    /// After the lease is lost, how long COMMAND has between SIGTERM and SIGKILL.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    pub kill_after: Duration,
    /// How long to keep retrying when the coordinator cannot be reached.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    pub retry_for: Duration,
    /// Without COMMAND: print the lease as JSON.
    #[arg(long)]
    pub json: bool,
    /// The program to run under the lease, and its arguments.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Runs `leasehold acquire`; returns the exit code.
pub async fn run(args: AcquireArgs) -> anyhow::Result<i32> {
    let config = ClientConfig {
        retry_for: args.retry_for,
        ..ClientConfig::default()
    };
    let client = Client::from_channel(args.connect.channel()?).with_config(config);
    let mut builder = client
        .acquire(args.resource.clone())
        .ttl(args.ttl)
        .wait(args.wait);
    if let Some(holder) = &args.holder {
        builder = builder.holder(holder.clone());
    }
    let lease = match builder.await {
        Ok(lease) => lease,
        Err(e @ AcquireError::Held { .. }) => {
            eprintln!("leasehold: {e}");
            return Ok(EXIT_BUSY);
        }
        Err(AcquireError::Client(e @ ClientError::Refused(_))) => {
            eprintln!("leasehold: {e}");
            return Ok(EXIT_UNREACHABLE);
        }
        Err(AcquireError::Client(e)) => {
            eprintln!("leasehold: {e} (server {})", args.connect.server);
            return Ok(EXIT_UNREACHABLE);
        }
    };
    let Some((program, rest)) = args.command.split_first() else {
        print_lease(&lease, args.json);
        lease.detach();
        return Ok(0);
    };
    let mut child = match Command::new(program)
        .args(rest)
        .env("LEASEHOLD_TOKEN", lease.token().to_string())
        .env("LEASEHOLD_RESOURCE", lease.resource())
        .env("LEASEHOLD_LEASE_ID", lease.lease_id())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("leasehold: cannot run {program:?}: {e}");
            let _ = lease.release().await;
            return Ok(EXIT_CANNOT_RUN);
        }
    };
    let pid = child.id().and_then(|id| Pid::from_raw(id as i32));
    let send = |sig: Signal| {
        if let Some(pid) = pid {
            let _ = kill_process(pid, sig);
        }
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let handle = lease.handle();
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status?;
                let _ = lease.release().await;
                return Ok(exit_code(status));
            }
            reason = handle.lost() => {
                eprintln!("leasehold: the lease on {} (token {}) was lost: {reason}; stopping the command", lease.resource(), lease.token());
                send(Signal::TERM);
                if tokio::time::timeout(args.kill_after, child.wait()).await.is_err() {
                    send(Signal::KILL);
                    let _ = child.wait().await;
                }
                return Ok(EXIT_LOST);
            }
            _ = sigint.recv() => send(Signal::INT),
            _ = sigterm.recv() => send(Signal::TERM),
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

fn print_lease(lease: &leasehold_client::Lease, json: bool) {
    let valid_ms = lease.valid_for().as_millis() as u64;
    if json {
        let value = serde_json::json!({
            "resource": lease.resource(),
            "holder": lease.holder(),
            "token": lease.token(),
            "lease_id": lease.lease_id(),
            "ttl_ms": lease.ttl().as_millis() as u64,
            "valid_for_ms": valid_ms,
        });
        println!("{value}");
    } else {
        println!("resource  {}", lease.resource());
        println!("holder    {}", lease.holder());
        println!("token     {}", lease.token());
        println!("lease_id  {}", lease.lease_id());
        println!("ttl       {}", humantime::format_duration(lease.ttl()));
        println!(
            "valid for {}",
            humantime::format_duration(Duration::from_millis(valid_ms))
        );
    }
}
