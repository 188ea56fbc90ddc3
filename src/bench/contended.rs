//! `bench contended`: every worker queues for the same resource (Acquire
//! with a wait), holds it for an instant and releases it. The server hands
//! the resource to the next waiter inside the Release, in the same durable
//! write, so one op is one handoff: its latency is the time an Acquire
//! spent in line.
//!
//! Checks, as the workers see the grants:
//! - `no-overlap`: a shared "current holder" slot is set on each grant and
//!   cleared before the Release is sent; a grant that finds it set means two
//!   holders overlapped.
//! - `tokens-increase`: every grant's token is above every token granted
//!   before it (grants are causally ordered through that slot).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{join_bounded, run_tag, BenchError, Contention, Options, Report, Tally, Window};

/// Options of the contended workload beyond the common ones.
#[derive(Debug, Clone)]
pub struct ContendedOptions {
    /// How long one Acquire may wait in line.
    pub wait: Duration,
    /// How long each holder keeps the lease before releasing it.
    pub hold: Duration,
}

impl Default for ContendedOptions {
    fn default() -> Self {
        ContendedOptions {
            wait: Duration::from_secs(10),
            hold: Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct Tallies {
    contention: Contention,
    timeouts: AtomicU64,
}

/// Runs the contended workload.
pub async fn run(opts: &Options, c: &ContendedOptions) -> Result<Report, BenchError> {
    opts.check()?;
    let clients = opts.connect().await?;
    let resource = format!("bench/contended/{}", run_tag());
    let window = Arc::new(Window::new(opts.warmup, opts.duration, opts.max_ops));
    let usage = tokio::spawn(super::usage_at_window_start_arc(
        window.clone(),
        opts.server_pid,
    ));
    let shared = Arc::new(Tallies::default());
    let mut handles = Vec::with_capacity(opts.concurrency);
    for (w, mut caller) in opts.callers(&clients).await?.into_iter().enumerate() {
        let (window, shared, opts, c) = (window.clone(), shared.clone(), opts.clone(), c.clone());
        let resource = resource.clone();
        handles.push(tokio::spawn(async move {
            let holder = format!("bench-{w}");
            let mut tally = Tally::default();
            while window.running() {
                let t0 = Instant::now();
                let lease = match caller
                    .acquire(resource.clone(), &holder, opts.ttl, c.wait, opts.op_timeout)
                    .await
                {
                    Ok(Some(l)) => l,
                    Ok(None) => {
                        shared.timeouts.fetch_add(1, Ordering::Relaxed);
                        tally.error(format!("waited {:?} in line without a grant", c.wait));
                        continue;
                    }
                    Err(e) => {
                        tally.error(e);
                        continue;
                    }
                };
                let t1 = Instant::now();
                let token = lease.token;
                shared.contention.granted(token);
                window.record(&mut tally, t0, t1);
                if !c.hold.is_zero() {
                    tokio::time::sleep(c.hold).await;
                }
                // Cleared before the Release leaves: the next grant can only
                // be sent after the server has seen this Release.
                shared.contention.releasing(token);
                match caller.release(lease, opts.op_timeout).await {
                    Ok(true) => {}
                    Ok(false) => tally.error("the lease had ended before its release"),
                    Err(e) => tally.error(e),
                }
            }
            tally
        }));
    }
    let hard_stop = opts.hard_stop(&window) + c.wait;
    let (tallies, lost) = join_bounded(handles, hard_stop).await;
    let usage = usage.await.unwrap_or_default();
    let mut tally = lost;
    for t in &tallies {
        tally.merge(t);
    }
    let measured = window.measured();
    let mut report = Report::new(
        "leasehold",
        if opts.session {
            "contended-session"
        } else {
            "contended"
        },
        "handoff",
        opts.concurrency,
        clients.len(),
        measured,
        &tally,
    );
    report.checks = shared.contention.checks();
    report.extra.insert(
        "wait_timeouts".into(),
        shared.timeouts.load(Ordering::Relaxed) as f64,
    );
    usage.finish(measured, &mut report);
    Ok(report)
}
