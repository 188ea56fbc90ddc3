//! `bench guard`: the storage-side guard library in-process, no server.
//!
//! Three runs, one report each:
//! - `guard-memory`: [`MemoryGuard::check_and_record`] on one thread (one
//!   core), cycling over `resources` names with rising tokens: checks/s.
//! - `guard-sled`: the fast path, [`SledGuard::insert`] (under the
//!   resource's lock: read the mark, insert the new mark, insert the data;
//!   no transaction) without flushing, on `threads` threads: guarded
//!   writes/s.
//! - `guard-sled-durable`: [`SledGuard::insert_durable`] from `writers`
//!   threads at once, so their flushes are group-committed by the guard's
//!   one flusher thread: durable guarded writes/s.
//!
//! Every write offers a new, higher token, so every write raises the mark
//! (two sled inserts): the costliest case. The transactional path
//! ([`SledGuard::write`]) is not measured here; it ran at ≈ 52,000 writes/s
//! without flush and ≈ 7,400/s group-flushed on 2 cores (issue #6), against
//! ≈ 190,000–250,000 and ≈ 80,000–100,000/s for the fast path.
//!
//! With `--signed`, two runs of signed-fence checks instead, each on one
//! thread (one core), through [`MemoryGuard::check_signed`]: verify the
//! coordinator's signed fence for the resource, then the rule with the
//! token inside it:
//! - `guard-signed`: a verifier without its cache, so every check pays the
//!   full Ed25519 verification (the cost of a lease's first write).
//! - `guard-signed-cached`: the default verifier, one fence per resource
//!   written again and again (a lease's later writes): verified fences are
//!   remembered, so a check is a look-up.
//!
//! Latency: the memory run times batches of [`BATCH`] checks and records
//! each batch's mean per check (timing every 100-ns check would double its
//! cost); the sled runs time every write. Checks: a stale token is refused
//! with `StaleToken` and nothing is written, and the mark equals the last
//! token offered, on every backend.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{BenchError, Check, Report, Tally, Window};
use leasehold_fence::signed::{FenceSigner, FenceVerifier, KeyStatus, SignedFenceError};
use leasehold_guard::{GuardError, MemoryGuard, SignedWriteError, SledGuard};

/// Checks per timed batch in the memory run.
pub const BATCH: u64 = 256;

/// Options of the guard workload (also its command-line flags).
#[derive(Debug, Clone, clap::Args)]
pub struct GuardOptions {
    /// How long each of the three runs measures.
    #[arg(long, short = 'd', default_value = "5s", value_parser = crate::cli::parse_duration)]
    pub duration: Duration,
    /// Warm-up before each run.
    #[arg(long, default_value = "1s", value_parser = crate::cli::parse_duration)]
    pub warmup: Duration,
    /// Distinct resource names.
    #[arg(long, default_value_t = 1024)]
    pub resources: usize,
    /// Threads for the sled run without flush.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Concurrent writers for the durable (group-committed) sled run.
    #[arg(long, default_value_t = 64)]
    pub writers: usize,
    /// Stop each run after this many ops.
    #[arg(long, default_value_t = 100_000_000)]
    pub max_ops: u64,
    /// Measure signed-fence checks (verify, then the rule) instead.
    #[arg(long)]
    pub signed: bool,
}

/// Runs the three guard runs; returns their reports in order.
pub async fn run(g: &GuardOptions) -> Result<Vec<Report>, BenchError> {
    let g = g.clone();
    tokio::task::spawn_blocking(move || {
        if g.signed {
            return Ok(vec![signed(&g, false), signed(&g, true)]);
        }
        let memory = memory(&g);
        let plain = with_sled(|guard, data| sled_run(&g, guard, data, false))?;
        let durable = with_sled(|guard, data| sled_run(&g, guard, data, true))?;
        Ok(vec![memory, plain, durable])
    })
    .await
    .map_err(|e| BenchError::Setup(format!("the guard benchmark panicked: {e}")))?
}

/// Runs `f` over a guard and a data tree in a fresh sled database in the
/// temporary directory, removed afterwards. Each run gets its own database,
/// so one run's unflushed backlog does not land in the next one's window.
fn with_sled(f: impl FnOnce(&SledGuard, &sled::Tree) -> Report) -> Result<Report, BenchError> {
    let dir = std::env::temp_dir().join(format!("leasehold-bench-guard-{}", super::run_tag()));
    let result = (|| {
        let db = sled::Config::new()
            .path(&dir)
            .open()
            .map_err(|e| BenchError::Setup(format!("opening sled in {}: {e}", dir.display())))?;
        let guard = SledGuard::open(&db)
            .map_err(|e| BenchError::Setup(format!("opening the guard: {e}")))?;
        let data = db
            .open_tree("data")
            .map_err(|e| BenchError::Setup(format!("opening the data tree: {e}")))?;
        Ok(f(&guard, &data))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn names(n: usize) -> Vec<String> {
    (0..n.max(1)).map(|i| format!("bench/guard/{i}")).collect()
}

fn memory(g: &GuardOptions) -> Report {
    let guard = MemoryGuard::new();
    let names = names(g.resources);
    let window = Window::new(g.warmup, g.duration, g.max_ops);
    let mut tally = Tally::default();
    let mut token = 0u64;
    let mut i = 0usize;
    let mut refused = 0u64;
    while window.running() {
        let t0 = Instant::now();
        for _ in 0..BATCH {
            token += 1;
            // Rising tokens: every check is admitted and raises the mark.
            if guard.check_and_record(&names[i], token).is_err() {
                refused += 1;
            }
            i += 1;
            if i == names.len() {
                i = 0;
            }
        }
        let t1 = Instant::now();
        if window.measuring(t0) && t1 <= window.to {
            let per = (t1 - t0) / BATCH as u32;
            for _ in 0..BATCH {
                tally.hist.record(per);
            }
            tally.ops += BATCH;
        }
    }
    let mut report = Report::new(
        "leasehold",
        "guard-memory",
        "check",
        1,
        0,
        window.to - window.from,
        &tally,
    );
    let last = names.len() - 1;
    let stale = guard.check_and_record(&names[last], 0);
    let mark = guard.highest(&names[(i + names.len() - 1) % names.len()]);
    report.checks = vec![
        Check::new(
            "admitted-rising",
            refused == 0 && tally.ops > 0,
            format!("{refused} rising tokens refused"),
        ),
        Check::new(
            "stale-refused",
            matches!(stale, Err(GuardError::StaleToken { .. })),
            "token 0 after higher tokens is refused with StaleToken",
        ),
        Check::new(
            "mark-is-last",
            mark == Some(token),
            format!("mark {mark:?}, last token {token}"),
        ),
    ];
    report
}

/// One thread of [`MemoryGuard::check_signed`] over one fence per
/// resource (signed before the window opens), timed in batches.
fn signed(g: &GuardOptions, cached: bool) -> Report {
    let signer = FenceSigner::from_secret(&[0x5e; 32]);
    let mut verifier = FenceVerifier::new().with_key(signer.public_key(), KeyStatus::Active);
    if !cached {
        verifier = verifier.uncached();
    }
    let guard = MemoryGuard::new();
    let names = names(g.resources);
    let fences: Vec<Vec<u8>> = names
        .iter()
        .enumerate()
        .map(|(i, name)| signer.sign(name, 1000 + i as u64, 0).as_bytes().to_vec())
        .collect();
    let window = Window::new(g.warmup, g.duration, g.max_ops);
    let mut tally = Tally::default();
    let (mut i, mut refused) = (0usize, 0u64);
    // Batches small enough that the uncached run still ends near its window.
    let batch = if cached { BATCH } else { 16 };
    while window.running() {
        let t0 = Instant::now();
        for _ in 0..batch {
            // Each resource's own fence: admitted (first, then the same token).
            if guard
                .check_signed(&verifier, &names[i], &fences[i])
                .is_err()
            {
                refused += 1;
            }
            i = (i + 1) % names.len();
        }
        let t1 = Instant::now();
        if window.measuring(t0) && t1 <= window.to {
            let per = (t1 - t0) / batch as u32;
            for _ in 0..batch {
                tally.hist.record(per);
            }
            tally.ops += batch;
        }
    }
    let workload = if cached {
        "guard-signed-cached"
    } else {
        "guard-signed"
    };
    let mut report = Report::new(
        "leasehold",
        workload,
        "check",
        1,
        0,
        window.to - window.from,
        &tally,
    );
    // A forged fence claiming u64::MAX, and a fence shown on another
    // resource, are refused, and the marks stay.
    let mut forged = fences[0].clone();
    forged[5..13].copy_from_slice(&u64::MAX.to_be_bytes());
    let forged_result = guard.check_signed(&verifier, &names[0], &forged);
    let other = names.len().min(2) - 1;
    let moved = guard.check_signed(&verifier, &names[other], &fences[0]);
    report.checks = vec![
        Check::new(
            "admitted-genuine",
            refused == 0 && tally.ops > 0,
            format!("{refused} genuine fences refused"),
        ),
        Check::new(
            "forged-refused",
            matches!(
                forged_result,
                Err(SignedWriteError::Fence(
                    SignedFenceError::BadSignature { .. }
                ))
            ) && guard.highest(&names[0]) == Some(1000),
            "a forged fence with token u64::MAX is refused and the mark stays",
        ),
        Check::new(
            "other-resource-refused",
            other == 0 || moved.is_err(),
            "a resource's fence is refused on another resource",
        ),
    ];
    report
}

fn sled_run(g: &GuardOptions, guard: &SledGuard, data: &sled::Tree, durable: bool) -> Report {
    let names = Arc::new(names(g.resources));
    let threads = if durable { g.writers } else { g.threads }.max(1);
    let window = Arc::new(Window::new(g.warmup, g.duration, g.max_ops));
    let token = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let mut handles = Vec::new();
    for t in 0..threads {
        let (guard, data, names, window, token) = (
            guard.clone(),
            data.clone(),
            names.clone(),
            window.clone(),
            token.clone(),
        );
        handles.push(std::thread::spawn(move || {
            let mut tally = Tally::default();
            let mut i = t;
            while window.running() {
                // Each thread owns the names i ≡ t (mod threads): no conflicts,
                // and its tokens rise, so every write is admitted.
                let name = &names[i % names.len()];
                i += threads;
                let tok = token.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let value = tok.to_be_bytes();
                let t0 = Instant::now();
                let result = if durable {
                    guard.insert_durable(name, tok, &data, name.as_bytes(), &value[..])
                } else {
                    guard.insert(name, tok, &data, name.as_bytes(), &value[..])
                };
                match result {
                    Ok(_) => {
                        window.record(&mut tally, t0, Instant::now());
                    }
                    Err(e) => tally.error(e),
                }
            }
            tally
        }));
    }
    let mut tally = Tally::default();
    for h in handles {
        match h.join() {
            Ok(t) => tally.merge(&t),
            Err(_) => tally.error("a writer thread panicked"),
        }
    }
    let workload = if durable {
        "guard-sled-durable"
    } else {
        "guard-sled"
    };
    let mut report = Report::new(
        "leasehold",
        workload,
        "write",
        threads,
        0,
        window.measured(),
        &tally,
    );
    // A stale write is refused and writes nothing.
    let name = &names[0];
    let before = data.get(name.as_bytes()).ok().flatten();
    let stale = guard.insert(name, 0, data, name.as_bytes(), &b"stale"[..]);
    let after = data.get(name.as_bytes()).ok().flatten();
    // The mark of every name is the token of its data: the last write won.
    let marks_match = names.iter().all(|name| {
        let stored = data.get(name.as_bytes()).ok().flatten();
        let token = stored.and_then(|v| <[u8; 8]>::try_from(&v[..]).ok().map(u64::from_be_bytes));
        token.is_none() || guard.highest(name).ok().flatten() == token
    });
    report.checks = vec![
        Check::new(
            "stale-refused",
            matches!(stale, Err(GuardError::StaleToken { .. })) && before == after && tally.ops > 0,
            "token 0 is refused with StaleToken and the data is unchanged",
        ),
        Check::new(
            "mark-is-data-token",
            marks_match,
            "every name's mark equals the token stored in its data",
        ),
    ];
    report
}
