//! `guard_writer`: guarded writes through [`SledGuard`]'s fast path as fast
//! as it goes, for the crash test (`tests/it/guard_crash.rs`), which kills it
//! with SIGKILL mid-stream and inspects what survived.
//!
//! ```text
//! guard_writer --data-dir DIR [--threads 2] [--resources 3] [--max-seconds 30s]
//! ```
//!
//! Writer threads take tokens from one shared counter, and each group of
//! four consecutive tokens writes the same resource, so threads race on a
//! resource with interleaved tokens and some writes are refused as stale.
//! Each accepted write inserts the key `RESOURCE/TOKEN` (token zero-padded to
//! 20 digits) with the token as its value (8 bytes, big-endian). Every 64th
//! write also offers token 0, which must be refused.
//!
//! The writers never wait for a flush: one more thread flushes in a loop and
//! acknowledges what was written before each flush began. So a flush (and
//! the kill) can land anywhere in a writer's stream, including between a
//! mark's insert and its data's.
//!
//! stdout, one line each, so that the test knows what was promised:
//! - `ready` once the database is open;
//! - `ack RESOURCE TOKEN` for an accepted write, printed only after a flush
//!   that started after the write returned (it survives `kill -9`);
//! - `stale RESOURCE TOKEN` for a refused write (its key must never exist).
//!
//! It stops by itself after `--max-seconds`, so a test that forgets to kill
//! it does not leave it running.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use leasehold_guard::{GuardError, SledGuard};
use parking_lot::Mutex;

/// Writes through the fenced guard's fast path until killed.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Directory of the sled database (created if missing).
    #[arg(long)]
    data_dir: PathBuf,
    /// Writer threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Resources the writes are fenced by (named `r0`, `r1`, …).
    #[arg(long, default_value_t = 3)]
    resources: u64,
    /// Stop after this long even if no one kills the process.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    max_seconds: Duration,
}

/// The data key of a write: `RESOURCE/TOKEN`, the token zero-padded so that
/// keys sort by token.
fn key(resource: &str, token: u64) -> String {
    format!("{resource}/{token:020}")
}

/// What the writers did since the last flush began: the lines to print
/// once the next flush has finished.
#[derive(Default)]
struct Pending {
    acks: Vec<(String, u64)>,
    stale: Vec<(String, u64)>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.threads == 0 || args.resources == 0 {
        bail!("--threads and --resources must be at least 1");
    }
    let db = sled::open(&args.data_dir)
        .with_context(|| format!("cannot open sled in {}", args.data_dir.display()))?;
    let data = db.open_tree("data").context("cannot open the data tree")?;
    let guard = SledGuard::open(&db).context("cannot open the guard")?;
    println!("ready");
    std::io::stdout().flush().context("cannot flush stdout")?;

    let counter = Arc::new(AtomicU64::new(1));
    let pending = Arc::new(Mutex::new(Pending::default()));
    let deadline = Instant::now() + args.max_seconds;
    let writers: Vec<_> = (0..args.threads)
        .map(|_| {
            let (guard, data) = (guard.clone(), data.clone());
            let (counter, pending, resources) = (counter.clone(), pending.clone(), args.resources);
            std::thread::spawn(move || {
                write_until(&guard, &data, &counter, &pending, resources, deadline)
            })
        })
        .collect();
    acknowledge_until(&guard, &pending, deadline)?;
    for w in writers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a writer thread panicked"))??;
    }
    acknowledge(&guard, &pending)
}

/// Flushes in a loop and prints what each flush covered.
fn acknowledge_until(
    guard: &SledGuard,
    pending: &Mutex<Pending>,
    deadline: Instant,
) -> anyhow::Result<()> {
    while Instant::now() < deadline {
        acknowledge(guard, pending)?;
    }
    Ok(())
}

/// Takes what was written so far, flushes, and prints it.
fn acknowledge(guard: &SledGuard, pending: &Mutex<Pending>) -> anyhow::Result<()> {
    let taken = std::mem::take(&mut *pending.lock());
    // The flush starts after every write in `taken` returned, so it covers them.
    guard.flush().context("flush failed")?;
    let mut out = String::new();
    for (resource, token) in taken.stale {
        out.push_str(&format!("stale {resource} {token}\n"));
    }
    for (resource, token) in taken.acks {
        out.push_str(&format!("ack {resource} {token}\n"));
    }
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

fn write_until(
    guard: &SledGuard,
    data: &sled::Tree,
    counter: &AtomicU64,
    pending: &Mutex<Pending>,
    resources: u64,
    deadline: Instant,
) -> anyhow::Result<()> {
    let mut n = 0u64;
    while Instant::now() < deadline {
        let token = counter.fetch_add(1, Ordering::Relaxed);
        let resource = format!("r{}", (token / 4) % resources);
        let k = key(&resource, token);
        match guard.insert(&resource, token, data, &k, &token.to_be_bytes()[..]) {
            Ok(_) => pending.lock().acks.push((resource.clone(), token)),
            Err(GuardError::StaleToken { .. }) => {
                pending.lock().stale.push((resource.clone(), token))
            }
            Err(e) => return Err(e).context("a guarded write failed"),
        }
        n += 1;
        if n % 64 == 0 {
            match guard.insert(&resource, 0, data, key(&resource, 0), &[0u8; 8][..]) {
                Err(GuardError::StaleToken { .. }) => pending.lock().stale.push((resource, 0)),
                Ok(_) => bail!("token 0 was accepted for {resource} after higher tokens"),
                Err(e) => return Err(e).context("a guarded write failed"),
            }
        }
    }
    Ok(())
}
