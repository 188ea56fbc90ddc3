//! `chaos`: a chaos run with a history checker, on loopback, bounded in time.
//!
//! ```text
//! cargo build --bins --examples
//! target/debug/examples/chaos --duration 60s --workers 4 --resources 2 [--cluster] [--seed N] [--out DIR]
//! ```
//!
//! It runs real processes: the coordinator (`leasehold serve`, found next to
//! this example in `target/*/`), the fenced store (`examples/fenced_store`)
//! and `--workers` copies of itself in worker mode, each looping acquire →
//! one or two fenced writes → release on `--resources` resources, with random
//! TTLs (300 ms–1.5 s), waits and think times. Even workers hold
//! keepalive-backed `Lease`s, odd ones take `Grant`s over a `Session`
//! stream. Workers reach the coordinator through a loopback proxy that can
//! cut every link.
//!
//! Every 1–3 s the harness injects a fault, drawn at random (each kind once
//! per round, worker pauses twice, in a shuffled order) and logged to
//! `DIR/faults.jsonl`:
//! `kill -9` of the coordinator and a restart on the same port and data;
//! SIGSTOP/SIGCONT of the coordinator; SIGSTOP of a worker for longer than
//! any TTL (a GC pause); a restart of the store (SIGTERM or `kill -9`); the
//! proxy cutting every connection, sometimes after swallowing replies.
//!
//! With `--cluster` the coordinator is three nodes of a Raft cluster, every
//! node-to-node link through a proxy of the harness, and workers get all
//! three (each through its own proxy) as a server list. Kills (down up to
//! 1.5 s) and pauses strike any node, and a seventh fault cuts one node off
//! from the others for 1–3 s (links refused, or every packet dropped). The
//! first kill, pause and partition strike the leader, later ones the leader
//! half the time; revokes go to a random node.
//!
//! Workers append every operation, with its start and end time (the shared
//! CLOCK_REALTIME) and result, to `DIR/history/worker-N.jsonl`. At the end
//! the checker (`check.rs`) verifies the five properties, prints a summary
//! and, for any violation, the offending slice of history; the exit code is
//! 0 only if there were none. `--check-only --out DIR` re-checks a finished
//! run. The seed fixes the random choices, not the timing, so two runs with
//! one seed differ.

mod check;
mod nodes;
mod proxy;
mod worker;

use std::collections::HashSet;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rustix::process::{kill_process as kill, Pid, Signal};
use tokio::process::Command;
use tokio::task::JoinHandle;
use tracing_subscriber::EnvFilter;

use check::{Fault, FaultKind, History, RunInfo};
use nodes::{respawn_at, spawn_server, Coordinators, Proc};
use proxy::{Mode, Proxy};
use worker::now_ns;

/// A chaos run: real processes, random faults, and a history checker.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// How long workers run and faults are injected (then they wind down).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    workers: u32,
    /// Resources the workers contend for.
    #[arg(long, default_value_t = 2)]
    resources: u32,
    /// Run a three-node cluster instead of one coordinator: kills, pauses
    /// and partitions (every node-to-node link goes through a proxy) strike
    /// any node, the leader half the time.
    #[arg(long)]
    cluster: bool,
    /// Seed of the random choices (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Directory for data, logs and history (default: a new one under /tmp).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only check the history already in --out, without running anything.
    #[arg(long, requires = "out")]
    check_only: bool,
    /// Worker mode: this process is worker N (used by the harness).
    #[arg(long, hide = true)]
    worker: Option<u32>,
    /// Worker mode: the coordinator's URL.
    #[arg(long, hide = true)]
    coordinator: Option<String>,
    /// Worker mode: the store's URL.
    #[arg(long, hide = true)]
    store: Option<String>,
    /// Worker mode: start no cycle after this unix time (ms).
    #[arg(long, hide = true)]
    until_unix_ms: Option<u64>,
    /// Worker mode: the history file.
    #[arg(long, hide = true)]
    history: Option<PathBuf>,
    /// Worker mode: take leases over a Session stream (odd workers do).
    #[arg(long, hide = true)]
    session: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("chaos=info,warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let seed = args.seed.unwrap_or_else(now_ns);
    if let Some(id) = args.worker {
        return worker::run(worker::WorkerArgs {
            id,
            coordinator: args.coordinator.context("--worker needs --coordinator")?,
            store: args.store.context("--worker needs --store")?,
            resources: args.resources,
            seed,
            until_unix_ms: args
                .until_unix_ms
                .context("--worker needs --until-unix-ms")?,
            history: args.history.context("--worker needs --history")?,
            session: args.session,
        })
        .await;
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("leasehold-chaos-{seed}")));
    let run = RunInfo {
        seconds: args.duration.as_secs_f64(),
        workers: args.workers,
        resources: args.resources,
        seed,
        cluster: args.cluster,
    };
    let code = if args.check_only {
        // The parameters the run was started with, if it recorded them.
        let run = std::fs::read_to_string(out.join("run.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(run);
        verdict(&out, &run, &[])?
    } else {
        tokio::select! {
            code = harness(&args, &out, &run) => code?,
            () = interrupted() => {
                // Dropping the harness future drops every child (kill_on_drop).
                tracing::warn!("interrupted: stopping every process");
                130
            }
        }
    };
    std::process::exit(code);
}

/// Completes on SIGINT or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Checks the history in `out`, prints the summary (and any violations),
/// writes `out/summary.json`, and returns the exit code.
fn verdict(out: &Path, run: &RunInfo, problems: &[String]) -> anyhow::Result<i32> {
    let history = History::load(out).map_err(anyhow::Error::msg)?;
    let report = check::check(&history, FaultKind::kinds(run.cluster));
    if !report.violations.is_empty() {
        println!("{}", report.explain(&history));
    }
    for p in problems {
        println!("problem: {p}");
    }
    println!("{}", report.summary(run));
    println!("history, logs and data: {}", out.display());
    let summary = serde_json::json!({
        "run": run,
        "figures": report.figures,
        "violations": report.violations.len(),
        "problems": problems,
    });
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )
    .context("cannot write summary.json")?;
    Ok(if report.violations.is_empty() && problems.is_empty() {
        0
    } else {
        1
    })
}

/// The built binaries this run needs: `leasehold` and the fenced store.
fn binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().context("cannot locate this executable")?;
    let examples = exe.parent().context("no parent directory")?;
    let leasehold = examples
        .parent()
        .context("no target directory")?
        .join("leasehold");
    let store = examples.join("fenced_store");
    for path in [&leasehold, &store] {
        if !path.exists() {
            bail!(
                "{} is missing: build it first with `cargo build --bins --examples` (add --release for a release run)",
                path.display()
            );
        }
    }
    Ok((leasehold, store))
}

/// An operator's revoke, straight to the coordinator (the admin API is open
/// on loopback): the token of the lease it ended, if any.
async fn revoke(coordinator: SocketAddr, resource: &str) -> anyhow::Result<Option<u64>> {
    use leasehold::proto::{admin_service_client::AdminServiceClient, RevokeRequest};
    let call = async {
        let mut admin = AdminServiceClient::connect(format!("http://{coordinator}")).await?;
        let resp = admin
            .revoke(RevokeRequest {
                resource: resource.to_owned(),
                ..RevokeRequest::default()
            })
            .await?
            .into_inner();
        anyhow::Ok(resp.revoked.then(|| resp.lease.map_or(0, |l| l.token)))
    };
    tokio::time::timeout(Duration::from_secs(3), call)
        .await
        .context("no answer within 3 s")?
}

/// Appends faults to `faults.jsonl` and logs them.
#[derive(Clone)]
struct FaultLog(Arc<Mutex<std::fs::File>>);

impl FaultLog {
    fn record(&self, kind: FaultKind, start_ns: u64, detail: String) {
        self.record_revoke(kind, start_ns, detail, None);
    }

    fn record_revoke(
        &self,
        kind: FaultKind,
        start_ns: u64,
        detail: String,
        revoked: Option<(String, u64)>,
    ) {
        let fault = Fault {
            kind,
            start_ns,
            end_ns: now_ns(),
            detail,
            revoked,
        };
        tracing::info!(kind = kind.label(), detail = %fault.detail, "fault");
        let mut line = serde_json::to_string(&fault).expect("a fault serializes");
        line.push('\n');
        if let Err(e) = self.0.lock().write_all(line.as_bytes()) {
            tracing::error!(error = %e, "cannot record a fault");
        }
    }
}

/// Whether the worker's last recorded operation left it holding a lease
/// (a granted acquire or an accepted write, not yet released).
fn holds_lease(history: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(history) else {
        return false;
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let mut tail = String::new();
    if file
        .seek(SeekFrom::Start(len.saturating_sub(4096)))
        .is_err()
        || file.read_to_string(&mut tail).is_err()
    {
        return false;
    }
    let Some(last) = tail.lines().next_back() else {
        return false;
    };
    serde_json::from_str::<check::Op>(last).is_ok_and(|op| {
        matches!(
            (op.op, op.result),
            (check::OpKind::Acquire, check::Outcome::Granted)
                | (check::OpKind::Write, check::Outcome::Accepted)
        )
    })
}

/// SIGCONTs every worker still paused when dropped (also on panic), so no
/// stopped process is left behind.
struct Paused(Arc<Mutex<HashSet<i32>>>);

impl Drop for Paused {
    fn drop(&mut self) {
        for pid in self.0.lock().drain() {
            if let Some(pid) = Pid::from_raw(pid) {
                let _ = kill(pid, Signal::CONT);
            }
        }
    }
}

/// The harness: starts everything, injects faults until the deadline, winds
/// down, and checks the history.
async fn harness(args: &Args, out: &Path, run: &RunInfo) -> anyhow::Result<i32> {
    let (leasehold, store_bin) = binaries()?;
    if out.join("history").exists() {
        bail!(
            "{} already holds a run; pick another --out (or --check-only to check it)",
            out.display()
        );
    }
    for sub in ["coordinator", "store", "history", "logs"] {
        std::fs::create_dir_all(out.join(sub))
            .with_context(|| format!("cannot create {}", out.join(sub).display()))?;
    }
    std::fs::write(out.join("run.json"), serde_json::to_string(run)?)
        .context("cannot write run.json")?;
    let mut rng = StdRng::seed_from_u64(run.seed);
    let path = |p: &str| out.join(p).to_string_lossy().into_owned();
    let faults = FaultLog(Arc::new(Mutex::new(
        std::fs::File::create(out.join("faults.jsonl")).context("cannot create faults.jsonl")?,
    )));
    let mut problems = Vec::new();

    let store_args = |listen: &str| {
        vec![
            "--listen".to_owned(),
            listen.to_owned(),
            "--data-dir".to_owned(),
            path("store"),
        ]
    };
    let store_log = out.join("logs/store.log");
    let (mut store, store_addr) =
        spawn_server("store", &store_bin, &store_args("127.0.0.1:0"), &store_log).await?;
    let mut coordinators = Coordinators::start(&leasehold, out, args.cluster).await?;
    // Workers reach every node through a proxy of their own, which can cut
    // their links; the client library finds the leader among them.
    let mut proxies = Vec::new();
    for addr in &coordinators.addrs {
        proxies.push(Proxy::start(*addr).await?);
    }
    let servers: Vec<String> = proxies
        .iter()
        .map(|p| format!("http://{}", p.addr))
        .collect();
    tracing::info!(nodes = ?coordinators.addrs, proxies = ?servers, %store_addr, out = %out.display(), seed = run.seed, "started");

    let until_ns = now_ns() + args.duration.as_nanos() as u64;
    let exe = std::env::current_exe()?;
    let mut workers = Vec::new();
    for id in 0..args.workers {
        let log = std::fs::File::create(out.join(format!("logs/worker-{id}.log")))?;
        let child = Command::new(&exe)
            .args(["--worker", &id.to_string()])
            .args(["--coordinator", &servers.join(",")])
            .args(["--store", &format!("http://{store_addr}")])
            .args(["--resources", &args.resources.to_string()])
            .args(["--seed", &run.seed.to_string()])
            .args(["--until-unix-ms", &(until_ns / 1_000_000).to_string()])
            .args(["--history", &path(&format!("history/worker-{id}.jsonl"))])
            // Odd workers take their leases over a Session stream.
            .args((id % 2 == 1).then_some("--session"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a worker")?;
        workers.push(Proc::new(format!("worker {id}"), child));
    }

    // The fault loop: one fault every 1–3 s, from shuffled rounds of every kind.
    let paused = Paused(Arc::new(Mutex::new(HashSet::new())));
    let mut resumes: Vec<JoinHandle<()>> = Vec::new();
    let mut bag: Vec<FaultKind> = Vec::new();
    // In a cluster, the first kill, pause and partition strike the leader
    // (the case that matters most); later ones the leader half the time.
    let mut struck: HashSet<FaultKind> = HashSet::new();
    // Bounded: at most one fault per second of the run, plus one.
    for _ in 0..=args.duration.as_secs() {
        let gap = Duration::from_millis(rng.random_range(1000..=3000));
        if now_ns() + gap.as_nanos() as u64 >= until_ns {
            break;
        }
        tokio::time::sleep(gap).await;
        if bag.is_empty() {
            // Every kind once per round, and worker pauses twice: they are
            // what produces stale writes for the store to reject.
            bag = FaultKind::kinds(args.cluster).to_vec();
            bag.push(FaultKind::WorkerPause);
            bag.shuffle(&mut rng);
        }
        let kind = bag.pop().expect("refilled above");
        let at_leader = struck.insert(kind) || rng.random_bool(0.5);
        let start = now_ns();
        match kind {
            FaultKind::CoordinatorKill => {
                let (i, who) = coordinators.pick(&mut rng, at_leader).await;
                // A cluster node may stay down longer: the others serve.
                let most = if args.cluster { 1500 } else { 500 };
                let down = Duration::from_millis(rng.random_range(0..=most));
                coordinators.kill_and_restart(i, down).await?;
                let addr = coordinators.addrs[i];
                faults.record(
                    kind,
                    start,
                    format!("{who} down {} ms, restarted on {addr}", down.as_millis()),
                );
            }
            FaultKind::CoordinatorPause => {
                let (i, who) = coordinators.pick(&mut rng, at_leader).await;
                let pause = Duration::from_millis(rng.random_range(500..=2000));
                coordinators.signal(i, Signal::STOP)?;
                tokio::time::sleep(pause).await;
                coordinators.signal(i, Signal::CONT)?;
                faults.record(
                    kind,
                    start,
                    format!("{who} SIGSTOP for {} ms", pause.as_millis()),
                );
            }
            FaultKind::Partition => {
                let (i, who) = coordinators.pick(&mut rng, at_leader).await;
                // Longer than an election, so a cut-off leader is replaced.
                let cut = Duration::from_millis(rng.random_range(1000..=3000));
                let mode = if rng.random_bool(0.5) {
                    Mode::Refuse
                } else {
                    Mode::Blackhole
                };
                coordinators.partition(i, mode);
                tokio::time::sleep(cut).await;
                coordinators.partition(i, Mode::Up);
                let how = match mode {
                    Mode::Refuse => "links refused",
                    _ => "every packet dropped",
                };
                faults.record(
                    kind,
                    start,
                    format!(
                        "{who} cut off from the other nodes ({how}) for {} ms",
                        cut.as_millis()
                    ),
                );
            }
            FaultKind::WorkerPause => {
                let free: Vec<usize> = (0..workers.len())
                    .filter(|&i| {
                        workers[i]
                            .pid()
                            .is_ok_and(|p| !paused.0.lock().contains(&p.as_raw_pid()))
                    })
                    .collect();
                // Prefer a worker that holds a lease: a pause that strikes
                // between its check and its write is the case fencing is for.
                let holding: Vec<usize> = free
                    .iter()
                    .copied()
                    .filter(|&i| holds_lease(&out.join(format!("history/worker-{i}.jsonl"))))
                    .collect();
                let pick = if holding.is_empty() { &free } else { &holding };
                let Some(&i) = pick.get(rng.random_range(0..pick.len().max(1))) else {
                    continue;
                };
                let pid = workers[i].pid()?;
                // Longer than any TTL (1.5 s): the lease expires meanwhile,
                // and a waiting worker takes over and writes.
                let pause = Duration::from_millis(rng.random_range(2000..=3500));
                paused.0.lock().insert(pid.as_raw_pid());
                workers[i].signal(Signal::STOP)?;
                let (set, log) = (paused.0.clone(), faults.clone());
                resumes.push(tokio::spawn(async move {
                    tokio::time::sleep(pause).await;
                    if set.lock().remove(&pid.as_raw_pid()) {
                        let _ = kill(pid, Signal::CONT);
                    }
                    log.record(
                        kind,
                        start,
                        format!("worker {i} SIGSTOP for {} ms", pause.as_millis()),
                    );
                }));
            }
            FaultKind::StoreRestart => {
                let how = if rng.random_bool(0.5) {
                    store.kill9().await;
                    "kill -9"
                } else if store.terminate(Duration::from_secs(5)).await {
                    "SIGTERM"
                } else {
                    problems.push("the store did not exit 0 on SIGTERM within 5 s".to_owned());
                    "SIGTERM (then kill -9)"
                };
                store = respawn_at(
                    "store",
                    &store_bin,
                    &store_args(&store_addr.to_string()),
                    &store_log,
                )
                .await?;
                faults.record(kind, start, format!("{how}, restarted on {store_addr}"));
            }
            FaultKind::ConnectionsCut => {
                let swallow = rng
                    .random_bool(0.5)
                    .then(|| Duration::from_millis(rng.random_range(100..=800)));
                proxy::cut_all(&proxies, swallow).await;
                let detail = match swallow {
                    Some(d) => format!("replies swallowed for {} ms, then cut", d.as_millis()),
                    None => "cut".to_owned(),
                };
                faults.record(kind, start, detail);
            }
            FaultKind::Revoke => {
                let resource = format!("r{}", rng.random_range(0..args.resources.max(1)));
                // Any node: a follower forwards it to the leader.
                let node = coordinators.addrs[rng.random_range(0..coordinators.len())];
                let (detail, revoked) = match revoke(node, &resource).await {
                    Ok(Some(token)) => (
                        format!("revoked {resource} (token {token}) through {node}"),
                        Some((resource, token)),
                    ),
                    Ok(None) => (format!("nothing held on {resource}"), None),
                    Err(e) => (
                        format!("revoke of {resource} through {node} failed: {e}"),
                        None,
                    ),
                };
                faults.record_revoke(kind, start, detail, revoked);
            }
        }
    }

    // Wind down: resume paused workers, let workers finish their cycle.
    for r in resumes {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    drop(paused);
    let wait_until = tokio::time::Instant::now()
        + Duration::from_nanos(until_ns.saturating_sub(now_ns()))
        + Duration::from_secs(25);
    for w in &mut workers {
        match tokio::time::timeout_at(wait_until, w.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => problems.push(format!("{} exited with {status}", w.name)),
            Ok(Err(e)) => problems.push(format!("cannot wait for {}: {e}", w.name)),
            Err(_) => {
                w.kill9().await;
                problems.push(format!("{} did not finish in time; killed", w.name));
            }
        }
    }
    problems.extend(coordinators.terminate(Duration::from_secs(10)).await);
    if !store.terminate(Duration::from_secs(10)).await {
        problems.push("the store did not exit 0 on SIGTERM within 10 s".into());
    }
    drop(proxies);
    verdict(out, run, &problems)
}
