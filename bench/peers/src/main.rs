//! `leasehold-peers`: the same `cycle` and `contended` workloads as
//! `leasehold bench`, against etcd (v3 Lock/Unlock with a lease) and
//! ZooKeeper (the ephemeral-sequential lock recipe), printing the same
//! report so `bench/compare.sh` can put all three in one table.
//!
//! A separate crate, so etcd's and ZooKeeper's client crates never enter
//! the `leasehold` binary's dependencies. The report, window and histogram
//! code is `src/bench/report.rs` of the main crate, included by path.
//!
//! Equivalent operations:
//! - etcd `cycle`: one lease per worker (granted once, with a TTL longer than
//!   the run, since nothing renews it), then Lock(name, lease)
//!   → Unlock(key) on the worker's own name; `cycle-lease` also grants and
//!   revokes a lease every cycle (what a Leasehold cycle does: every Acquire
//!   makes a new lease). Token: the Lock response's header revision.
//! - ZooKeeper `cycle`: one session per worker; the lock recipe on the
//!   worker's own parent (Curator's `InterProcessMutex`): create an ephemeral
//!   sequential znode, list the children to learn that it is the lowest (on
//!   a free name it always is), then delete it. Three round trips: without
//!   the listing a client does not know it holds the lock, so a Leasehold
//!   Acquire (which answers "you hold it") is the create *and* the listing.
//!   `cycle-bare` drops the listing (create + delete, not a lock) and is
//!   shown as a lower bound. Token: czxid.
//! - `contended` on both: every worker queues on one name; etcd's Lock waits
//!   server-side, ZooKeeper's recipe lists the children and watches its
//!   predecessor. Same checks as Leasehold's: no overlap, tokens increase.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use rand::RngCore;
use leasehold_bench_report as report;
use report::{join_bounded, usage_at_window_start_arc, Check, Contention, Report, Tally, Window};

/// Load generators for etcd and ZooKeeper, reporting like `leasehold bench`.
#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    system: System,
}

#[derive(Debug, Subcommand)]
enum System {
    /// etcd v3: Lock/Unlock with leases.
    Etcd {
        /// The workload.
        workload: EtcdWorkload,
        #[command(flatten)]
        common: Common,
    },
    /// ZooKeeper: ephemeral sequential znodes.
    Zookeeper {
        /// The workload.
        workload: ZkWorkload,
        #[command(flatten)]
        common: Common,
    },
    /// Prints one table (Markdown) from reports, one JSON line each.
    Table {
        /// A file of reports from `--json` runs, in any order.
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EtcdWorkload {
    Cycle,
    CycleLease,
    Contended,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ZkWorkload {
    /// The lock recipe on a free name: create, list children, delete.
    Cycle,
    /// Create + delete only: no ownership check, so not a lock; a lower bound.
    CycleBare,
    Contended,
}

#[derive(Debug, Clone, Args)]
struct Common {
    /// etcd: http://127.0.0.1:2379, or several comma-separated (a cluster:
    /// workers dealt over them round-robin); ZooKeeper: 127.0.0.1:2181.
    #[arg(long)]
    endpoint: String,
    /// Concurrent workers.
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// Lease TTL (etcd) or session timeout (ZooKeeper).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// How long to measure.
    #[arg(long, short = 'd', default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How long to run before measuring.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Stop after this many measured ops.
    #[arg(long, default_value_t = 10_000_000)]
    max_ops: u64,
    /// A call slower than this counts as an error.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    op_timeout: Duration,
    /// The server's process id, for its CPU use and memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print one line of JSON.
    #[arg(long)]
    json: bool,
}

impl Common {
    fn hard_stop(&self, window: &Window) -> Instant {
        window.to + self.op_timeout + Duration::from_secs(2)
    }
}

/// The checks of a cycle run: every grant's token, and how many went
/// backwards within a worker.
fn cycle_checks(tokens: Vec<u64>, backwards: u64) -> Vec<Check> {
    let granted = tokens.len();
    vec![
        Check::new(
            "granted-when-free",
            granted > 0,
            format!("{granted} grants"),
        ),
        report::tokens_unique(tokens, backwards),
    ]
}

fn tag() -> String {
    let mut b = [0u8; 4];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Err(_) => Err(format!("{what} took longer than {limit:?}")),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Ok(Ok(v)) => Ok(v),
    }
}

struct CycleWorker {
    tally: Tally,
    tokens: Vec<u64>,
    backwards: u64,
}

impl CycleWorker {
    fn new() -> Self {
        CycleWorker {
            tally: Tally::default(),
            tokens: Vec::new(),
            backwards: 0,
        }
    }

    fn granted(&mut self, token: u64) {
        if self.tokens.last().is_some_and(|&t| t >= token) {
            self.backwards += 1;
        }
        self.tokens.push(token);
    }
}

// ---------------------------------------------------------------- etcd ----

async fn etcd(workload: EtcdWorkload, c: &Common) -> anyhow::Result<Report> {
    use etcd_client::{Client, LockOptions};
    // Several endpoints (a cluster, comma-separated): one client per member,
    // the workers dealt over them round-robin, so every member serves a
    // share of the calls (followers forward their writes to the leader).
    let mut clients = Vec::new();
    for endpoint in endpoints(&c.endpoint) {
        let client = Client::connect([endpoint], None)
            .await
            .with_context(|| format!("cannot connect to etcd at {endpoint}"))?;
        clients.push(client);
    }
    anyhow::ensure!(!clients.is_empty(), "--endpoint names no etcd endpoint");
    let tag = tag();
    let ttl_s = c.ttl.as_secs().max(1) as i64;
    // A worker's own lease must outlive the run: nothing keeps it alive, and
    // an expired lease makes every later Lock fail with "lease not found".
    let run = c.warmup + c.duration + 2 * c.op_timeout;
    let worker_ttl_s = ttl_s.max(run.as_secs() as i64 + 10);
    let window = Arc::new(Window::new(c.warmup, c.duration, c.max_ops));
    let usage = tokio::spawn(usage_at_window_start_arc(window.clone(), c.server_pid));
    let contention = Arc::new(Contention::default());
    let mut handles = Vec::new();
    for w in 0..c.concurrency {
        let mut client = clients[w % clients.len()].clone();
        let (window, c, contention) = (window.clone(), c.clone(), contention.clone());
        let name = match workload {
            EtcdWorkload::Contended => format!("bench/contended/{tag}"),
            _ => format!("bench/cycle/{tag}/{w}"),
        };
        handles.push(tokio::spawn(async move {
            let mut me = CycleWorker::new();
            let per_cycle = matches!(workload, EtcdWorkload::CycleLease);
            let mut lease = 0;
            if !per_cycle {
                match timed(
                    "LeaseGrant",
                    c.op_timeout,
                    client.lease_grant(worker_ttl_s, None),
                )
                .await
                {
                    Ok(r) => lease = r.id(),
                    Err(e) => {
                        me.tally.error(e);
                        return me;
                    }
                }
            }
            while window.running() {
                let t0 = Instant::now();
                if per_cycle {
                    match timed("LeaseGrant", c.op_timeout, client.lease_grant(ttl_s, None)).await {
                        Ok(r) => lease = r.id(),
                        Err(e) => {
                            me.tally.error(e);
                            continue;
                        }
                    }
                }
                let opts = LockOptions::new().with_lease(lease);
                let locked = match timed(
                    "Lock",
                    c.op_timeout,
                    client.lock(name.as_bytes().to_vec(), Some(opts)),
                )
                .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        me.tally.error(e);
                        continue;
                    }
                };
                let token = locked.header().map_or(0, |h| h.revision()) as u64;
                let t_granted = Instant::now();
                let key = locked.key().to_vec();
                if matches!(workload, EtcdWorkload::Contended) {
                    contention.granted(token);
                    window.record(&mut me.tally, t0, t_granted);
                    contention.releasing(token);
                } else {
                    me.granted(token);
                }
                if let Err(e) = timed("Unlock", c.op_timeout, client.unlock(key)).await {
                    me.tally.error(e);
                    continue;
                }
                if per_cycle {
                    if let Err(e) =
                        timed("LeaseRevoke", c.op_timeout, client.lease_revoke(lease)).await
                    {
                        me.tally.error(e);
                        continue;
                    }
                }
                if !matches!(workload, EtcdWorkload::Contended) {
                    window.record(&mut me.tally, t0, Instant::now());
                }
            }
            if !per_cycle {
                let _ = timed("LeaseRevoke", c.op_timeout, client.lease_revoke(lease)).await;
            }
            me
        }));
    }
    let (workers, lost) = join_bounded(handles, c.hard_stop(&window)).await;
    let name = match workload {
        EtcdWorkload::Cycle => "cycle",
        EtcdWorkload::CycleLease => "cycle-lease",
        EtcdWorkload::Contended => "contended",
    };
    finish(
        "etcd",
        name,
        workload_is_contended(name),
        c,
        clients.len(),
        &window,
        workers,
        lost,
        &contention,
        usage.await.ok(),
    )
}

/// The endpoints of `--endpoint a,b,c`, blanks dropped.
fn endpoints(list: &str) -> Vec<&str> {
    list.split(',').map(str::trim).filter(|e| !e.is_empty()).collect()
}

fn workload_is_contended(name: &str) -> bool {
    name == "contended"
}

#[allow(clippy::too_many_arguments)]
fn finish(
    system: &str,
    workload: &str,
    contended: bool,
    c: &Common,
    connections: usize,
    window: &Window,
    workers: Vec<CycleWorker>,
    lost: Tally,
    contention: &Contention,
    usage: Option<report::ServerUsage>,
) -> anyhow::Result<Report> {
    let mut tally = lost;
    let mut tokens = Vec::new();
    let mut backwards = 0;
    for w in &workers {
        tally.merge(&w.tally);
        tokens.extend_from_slice(&w.tokens);
        backwards += w.backwards;
    }
    let measured = window.measured();
    let op = if contended { "handoff" } else { "cycle" };
    let mut report = Report::new(
        system,
        workload,
        op,
        c.concurrency,
        connections,
        measured,
        &tally,
    );
    report.checks = if contended {
        contention.checks()
    } else {
        cycle_checks(tokens, backwards)
    };
    if let Some(u) = usage {
        u.finish(measured, &mut report);
    }
    Ok(report)
}

// ----------------------------------------------------------- ZooKeeper ----

async fn zk_connect(c: &Common) -> Result<zookeeper_client::Client, String> {
    timed(
        "connect",
        c.op_timeout,
        zookeeper_client::Client::connector()
            .with_session_timeout(c.ttl)
            .connect(&c.endpoint),
    )
    .await
}

/// Creates `path` and its ancestors (persistent), tolerating races.
async fn zk_mkdir(client: &zookeeper_client::Client, path: &str) -> Result<(), String> {
    use zookeeper_client::{Acls, CreateMode, Error};
    let opts = CreateMode::Persistent.with_acls(Acls::anyone_all());
    match client.mkdir(path, &opts).await {
        Ok(()) | Err(Error::NodeExists) => Ok(()),
        Err(e) => Err(format!("mkdir {path}: {e}")),
    }
}

fn zk_sequence(name: &str) -> Option<i64> {
    name.rsplit('-').next()?.parse().ok()
}

async fn zookeeper(workload: ZkWorkload, c: &Common) -> anyhow::Result<Report> {
    use zookeeper_client::{Acls, CreateMode, Error};
    let tag = tag();
    let root = format!("/bench-{tag}");
    // Sessions first (one per worker), so setup is not in the window.
    let mut sessions = Vec::new();
    for _ in 0..c.concurrency {
        sessions.push(zk_connect(c).await.map_err(anyhow::Error::msg)?);
    }
    let contended_dir = format!("{root}/contended");
    zk_mkdir(&sessions[0], &contended_dir)
        .await
        .map_err(anyhow::Error::msg)?;
    for (w, s) in sessions.iter().enumerate() {
        zk_mkdir(s, &format!("{root}/w{w}"))
            .await
            .map_err(anyhow::Error::msg)?;
    }
    let window = Arc::new(Window::new(c.warmup, c.duration, c.max_ops));
    let usage = tokio::spawn(usage_at_window_start_arc(window.clone(), c.server_pid));
    let contention = Arc::new(Contention::default());
    let mut handles = Vec::new();
    for (w, client) in sessions.into_iter().enumerate() {
        let (window, c, contention) = (window.clone(), c.clone(), contention.clone());
        let dir = match workload {
            ZkWorkload::Contended => contended_dir.clone(),
            ZkWorkload::Cycle | ZkWorkload::CycleBare => format!("{root}/w{w}"),
        };
        handles.push(tokio::spawn(async move {
            let mut me = CycleWorker::new();
            let ephemeral = CreateMode::EphemeralSequential.with_acls(Acls::anyone_all());
            let prefix = format!("{dir}/lock-");
            while window.running() {
                let t0 = Instant::now();
                let (stat, seq) = match timed(
                    "create",
                    c.op_timeout,
                    client.create(&prefix, b"", &ephemeral),
                )
                .await
                {
                    Ok(v) => v,
                    Err(e) => {
                        me.tally.error(e);
                        continue;
                    }
                };
                let mine = format!("{prefix}{seq}");
                let token = stat.czxid as u64;
                if !matches!(workload, ZkWorkload::CycleBare) {
                    // The recipe: lowest sequence holds; others watch their predecessor.
                    let my_seq = seq.into_i64();
                    let deadline = Instant::now() + c.op_timeout;
                    let granted = loop {
                        if Instant::now() > deadline {
                            break Err(format!("waited {:?} without the lock", c.op_timeout));
                        }
                        let children =
                            match timed("list_children", c.op_timeout, client.list_children(&dir))
                                .await
                            {
                                Ok(v) => v,
                                Err(e) => break Err(e),
                            };
                        let before = children
                            .iter()
                            .filter_map(|n| zk_sequence(n).map(|s| (s, n)))
                            .filter(|(s, _)| *s < my_seq)
                            .max_by_key(|(s, _)| *s);
                        let Some((_, pred)) = before else {
                            break Ok(());
                        };
                        let pred = format!("{dir}/{pred}");
                        match client.get_and_watch_data(&pred).await {
                            Err(Error::NoNode) => continue,
                            Err(e) => break Err(format!("get_and_watch_data: {e}")),
                            Ok((_, _, watcher)) => {
                                let left = deadline.saturating_duration_since(Instant::now());
                                let _ = tokio::time::timeout(left, watcher.changed()).await;
                            }
                        }
                    };
                    if let Err(e) = granted {
                        me.tally.error(e);
                        let _ = timed("delete", c.op_timeout, client.delete(&mine, None)).await;
                        continue;
                    }
                }
                if let ZkWorkload::Contended = workload {
                    contention.granted(token);
                    window.record(&mut me.tally, t0, Instant::now());
                    contention.releasing(token);
                } else {
                    me.granted(token);
                }
                if let Err(e) = timed("delete", c.op_timeout, client.delete(&mine, None)).await {
                    me.tally.error(e);
                    continue;
                }
                if !matches!(workload, ZkWorkload::Contended) {
                    window.record(&mut me.tally, t0, Instant::now());
                }
            }
            me
        }));
    }
    let (workers, lost) = join_bounded(handles, c.hard_stop(&window)).await;
    let name = match workload {
        ZkWorkload::Cycle => "cycle",
        ZkWorkload::CycleBare => "cycle-bare",
        ZkWorkload::Contended => "contended",
    };
    finish(
        "zookeeper",
        name,
        workload_is_contended(name),
        c,
        c.concurrency,
        &window,
        workers,
        lost,
        &contention,
        usage.await.ok(),
    )
}

/// The side-by-side table: one row per workload, one column per system,
/// then Leasehold's ratio to each peer.
fn table(file: &std::path::Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let reports: Vec<Report> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("a line is not a report")?;
    let find = |system: &str, workload: &str| {
        reports
            .iter()
            .find(|r| r.system == system && r.workload == workload)
    };
    let cell = |r: Option<&Report>| match r {
        None => "—".to_owned(),
        Some(r) => format!(
            "{}/s, p50 {}, p99 {}{}",
            report::thousands(r.rate),
            report::human_us(r.latency.p50_us),
            report::human_us(r.latency.p99_us),
            if r.passed() { "" } else { " (FAILED)" }
        ),
    };
    let ratio = |a: Option<&Report>, b: Option<&Report>| match (a, b) {
        (Some(a), Some(b)) if b.rate > 0.0 => format!("{:.1}×", a.rate / b.rate),
        _ => "—".to_owned(),
    };
    // An empty workload name leaves that column blank.
    let rows: [(&str, &str, &str, &str); 6] = [
        (
            "lock cycle on a free name (Leasehold: unary calls)",
            "cycle",
            "cycle",
            "cycle",
        ),
        (
            "lock cycle on a free name (Leasehold: Session stream)",
            "cycle-session",
            "cycle",
            "cycle",
        ),
        (
            "lock cycle, new lease every cycle (Leasehold: unary)",
            "cycle",
            "cycle-lease",
            "cycle",
        ),
        (
            "cycle, ZooKeeper create + delete only (not a lock: no ownership check; Leasehold: Session)",
            "cycle-session",
            "",
            "cycle-bare",
        ),
        (
            "contended: handoffs on one name (Leasehold: unary)",
            "contended",
            "contended",
            "contended",
        ),
        (
            "contended: handoffs on one name (Leasehold: Session)",
            "contended-session",
            "contended",
            "contended",
        ),
    ];
    let c = reports.first().map_or(0, |r| r.concurrency);
    // A system with no report at all loses its columns, and a row with no
    // report in any column is left out (bench/cluster.sh runs Leasehold and
    // etcd only, and no Session workloads).
    let has_zk = reports.iter().any(|r| r.system == "zookeeper");
    if has_zk {
        println!("| workload (C = {c}) | Leasehold | etcd | ZooKeeper | Leasehold ÷ etcd | Leasehold ÷ ZooKeeper |");
        println!("|---|---|---|---|---|---|");
    } else {
        println!("| workload (C = {c}) | Leasehold | etcd | Leasehold ÷ etcd |");
        println!("|---|---|---|---|");
    }
    for (label, lh, etcd, zk) in rows {
        let (l, e, z) = (
            find("leasehold", lh),
            find("etcd", etcd),
            find("zookeeper", zk),
        );
        let z = if etcd == "cycle-lease" { None } else { z };
        if !has_zk {
            // Leasehold's Session rows (or etcd's rows) only when it ran them.
            let has = |system: &str| reports.iter().any(|r| r.system == system);
            if (l.is_none() && has("leasehold")) || (e.is_none() && has("etcd")) {
                continue;
            }
            if l.is_none() && e.is_none() {
                continue;
            }
            println!("| {label} | {} | {} | {} |", cell(l), cell(e), ratio(l, e));
            continue;
        }
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            cell(l),
            cell(e),
            cell(z),
            ratio(l, e),
            ratio(l, z)
        );
    }
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| format!("{} {}", r.system, r.workload))
        .collect();
    if failed.is_empty() {
        println!("\nEvery run passed its checks with no errors.");
    } else {
        println!("\nFAILED checks or errors in: {}", failed.join(", "));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (report, json) = match cli.system {
        System::Table { file } => {
            table(&file)?;
            return Ok(());
        }
        System::Etcd { workload, common } => (etcd(workload, &common).await?, common.json),
        System::Zookeeper { workload, common } => {
            (zookeeper(workload, &common).await?, common.json)
        }
    };
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    std::process::exit(if report.passed() { 0 } else { 1 });
}
