//! `leasehold bench`: run a bounded workload against a server and print its
//! rate, latency, errors and correctness checks (or one JSON line with
//! `--json`). Exits 0 when every check held and no op failed, 1 otherwise.

use std::time::Duration;

use std::io::Write;

use clap::{Args, Subcommand};

use crate::bench::contended::ContendedOptions;
use crate::bench::keepalive::KeepaliveOptions;
use crate::bench::{self, Options, Report};

/// Options of `leasehold bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The workload.
    #[command(subcommand)]
    pub workload: Workload,
}

/// Options every workload shares.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// The server's URL.
    #[arg(
        long,
        default_value = "http://127.0.0.1:7420",
        env = "LEASEHOLD_SERVER"
    )]
    pub server: String,
    /// Concurrent workers (KeepAlive streams for `keepalive`).
    #[arg(long, short = 'c', default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the workers share. With one, a single connection
    /// task on each side carries every stream's frames; four spread them over
    /// both cores (measured: +20-40 % cycles/s on 2 cores).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// TTL of every lease taken.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    pub ttl: Duration,
    /// How long to measure.
    #[arg(long, short = 'd', default_value = "10s", value_parser = super::parse_duration)]
    pub duration: Duration,
    /// How long to run before measuring.
    #[arg(long, default_value = "1s", value_parser = super::parse_duration)]
    pub warmup: Duration,
    /// Stop after this many measured ops, even before the duration ends.
    #[arg(long, default_value_t = 10_000_000)]
    pub max_ops: u64,
    /// A call slower than this counts as an error.
    #[arg(long, default_value = "5s", value_parser = super::parse_duration)]
    pub op_timeout: Duration,
    /// The server's process id: adds its CPU use and memory (from /proc).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print one line of JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl CommonArgs {
    fn options_with(&self, session: bool) -> Options {
        Options {
            session,
            ..self.options()
        }
    }

    fn options(&self) -> Options {
        Options {
            server: self.server.clone(),
            concurrency: self.concurrency,
            connections: self.connections,
            ttl: self.ttl,
            duration: self.duration,
            warmup: self.warmup,
            max_ops: self.max_ops,
            op_timeout: self.op_timeout,
            server_pid: self.server_pid,
            session: false,
        }
    }
}

/// The workloads.
#[derive(Debug, Subcommand)]
pub enum Workload {
    /// Each worker: acquire a free resource, release it; ops are cycles.
    Cycle {
        /// A new resource every cycle instead of one per worker.
        #[arg(long)]
        fresh: bool,
        /// Each worker calls over its own Session stream, not unary RPCs.
        #[arg(long)]
        session: bool,
        /// Options every workload shares.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Every worker queues on one resource; ops are handoffs.
    Contended {
        /// How long one Acquire may wait in line.
        #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
        wait: Duration,
        /// How long each holder keeps the lease.
        #[arg(long, default_value = "0s", value_parser = super::parse_duration)]
        hold: Duration,
        /// Each worker calls over its own Session stream, not unary RPCs.
        #[arg(long)]
        session: bool,
        /// Options every workload shares.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Keep many leases alive over KeepAlive streams; ops are renewals.
    Keepalive {
        /// Live leases to keep.
        #[arg(long, default_value_t = 100_000)]
        leases: usize,
        /// How often each lease is renewed (default: TTL / 3).
        #[arg(long, value_parser = super::parse_duration)]
        renew_every: Option<Duration>,
        /// Options every workload shares.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Take many leases and keep them (scale test; then restart and `ready`).
    Fill {
        /// Leases to take.
        #[arg(long, default_value_t = 1_000_000)]
        leases: usize,
        /// Options every workload shares.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// The guard library in-process (no server): memory checks/s, sled guarded writes/s;
    /// with --signed, signed-fence checks/s on one core.
    Guard {
        /// The runs' options.
        #[command(flatten)]
        options: bench::guard::GuardOptions,
        /// Print one line of JSON per run instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Poll until the server answers Describe on `resource`; prints the time.
    Ready {
        /// A resource that should be held (for example `PREFIX/0` of a fill).
        #[arg(long)]
        resource: String,
        /// Give up after this long.
        #[arg(long, default_value = "60s", value_parser = super::parse_duration)]
        timeout: Duration,
        /// Options every workload shares.
        #[command(flatten)]
        common: CommonArgs,
    },
}

/// Runs the workload and prints its report; the exit code says whether it passed.
pub async fn run(args: BenchArgs) -> anyhow::Result<i32> {
    let (reports, json): (Vec<Report>, bool) = match args.workload {
        Workload::Guard { options, json } => (bench::guard::run(&options).await?, json),
        other => {
            let (report, json) = run_one(other).await?;
            (vec![report], json)
        }
    };
    // A closed stdout (`| head`) is not worth a panic: the exit code still tells.
    let mut out = std::io::stdout().lock();
    for report in &reports {
        let _ = if json {
            writeln!(out, "{}", report.to_json())
        } else {
            write!(out, "{report}")
        };
    }
    Ok(if reports.iter().all(Report::passed) {
        0
    } else {
        1
    })
}

async fn run_one(workload: Workload) -> anyhow::Result<(Report, bool)> {
    Ok(match workload {
        Workload::Guard { .. } => unreachable!("handled by run"),
        Workload::Cycle {
            fresh,
            session,
            common,
        } => (
            bench::cycle::run(&common.options_with(session), fresh).await?,
            common.json,
        ),
        Workload::Contended {
            wait,
            hold,
            session,
            common,
        } => {
            let c = ContendedOptions { wait, hold };
            (
                bench::contended::run(&common.options_with(session), &c).await?,
                common.json,
            )
        }
        Workload::Keepalive {
            leases,
            renew_every,
            common,
        } => {
            let k = KeepaliveOptions {
                leases,
                renew_every,
            };
            (
                bench::keepalive::run(&common.options(), &k).await?,
                common.json,
            )
        }
        Workload::Fill { leases, common } => {
            let mut opts = common.options();
            // A fill is bounded by its count; the duration only caps it.
            opts.duration = opts.duration.max(Duration::from_secs(600));
            let filled = bench::scale::fill(&opts, leases).await?;
            if !common.json {
                println!(
                    "leases held: {}/0 .. {}/{}",
                    filled.prefix,
                    filled.prefix,
                    leases.saturating_sub(1)
                );
            }
            (filled.report, common.json)
        }
        Workload::Ready {
            resource,
            timeout,
            common,
        } => (
            bench::scale::ready(&common.options(), &resource, true, timeout).await?,
            common.json,
        ),
    })
}
