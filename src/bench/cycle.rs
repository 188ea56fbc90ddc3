//! `bench cycle`: each worker takes a lease on a free resource and gives it
//! back, as fast as the server answers. One op is one cycle (Acquire +
//! Release, two round trips and one durable grant).
//!
//! By default each worker reuses its own resource; `fresh` names a new
//! resource every cycle (the server then also creates and drops the name).
//! Checks: every Acquire on a free name is granted, every Release releases,
//! and no token is handed out twice (each worker's tokens also strictly
//! increase).

use std::sync::Arc;
use std::time::Instant;

use super::{
    join_bounded, run_tag, tokens_unique, BenchError, Check, Options, Report, Tally, Window,
};

struct Worker {
    tally: Tally,
    tokens: Vec<u64>,
    not_granted: u64,
    not_released: u64,
    decreasing: u64,
}

/// Runs the cycle workload; `fresh` uses a new resource per cycle.
pub async fn run(opts: &Options, fresh: bool) -> Result<Report, BenchError> {
    opts.check()?;
    let clients = opts.connect().await?;
    let tag = run_tag();
    let window = Arc::new(Window::new(opts.warmup, opts.duration, opts.max_ops));
    let usage = tokio::spawn(super::usage_at_window_start_arc(
        window.clone(),
        opts.server_pid,
    ));
    let mut handles = Vec::with_capacity(opts.concurrency);
    for (w, mut caller) in opts.callers(&clients).await?.into_iter().enumerate() {
        let window = window.clone();
        let opts = opts.clone();
        let base = format!("bench/cycle/{tag}/{w}");
        handles.push(tokio::spawn(async move {
            let holder = format!("bench-{w}");
            let mut me = Worker {
                tally: Tally::default(),
                tokens: Vec::new(),
                not_granted: 0,
                not_released: 0,
                decreasing: 0,
            };
            let mut i = 0u64;
            while window.running() {
                let resource = if fresh {
                    i += 1;
                    format!("{base}/{i}")
                } else {
                    base.clone()
                };
                let t0 = Instant::now();
                let lease = match caller
                    .acquire(
                        resource,
                        &holder,
                        opts.ttl,
                        std::time::Duration::ZERO,
                        opts.op_timeout,
                    )
                    .await
                {
                    Ok(Some(l)) => l,
                    Ok(None) => {
                        me.not_granted += 1;
                        me.tally.error("a free resource was reported held");
                        continue;
                    }
                    Err(e) => {
                        me.tally.error(e);
                        continue;
                    }
                };
                let token = lease.token;
                match caller.release(lease, opts.op_timeout).await {
                    Ok(true) => {}
                    Ok(false) => {
                        me.not_released += 1;
                        me.tally.error("a live lease was not released");
                    }
                    Err(e) => {
                        me.tally.error(e);
                        continue;
                    }
                }
                let t1 = Instant::now();
                if me.tokens.last().is_some_and(|&last| last >= token) {
                    me.decreasing += 1;
                }
                me.tokens.push(token);
                window.record(&mut me.tally, t0, t1);
            }
            me
        }));
    }
    let (workers, lost) = join_bounded(handles, opts.hard_stop(&window)).await;
    let usage = usage.await.unwrap_or_default();
    let mut tally = lost;
    let mut tokens = Vec::new();
    let (mut not_granted, mut not_released, mut decreasing) = (0, 0, 0);
    for w in &workers {
        tally.merge(&w.tally);
        tokens.extend_from_slice(&w.tokens);
        not_granted += w.not_granted;
        not_released += w.not_released;
        decreasing += w.decreasing;
    }
    let granted = tokens.len();
    let measured = window.measured();
    let workload = match (fresh, opts.session) {
        (false, false) => "cycle",
        (true, false) => "cycle-fresh",
        (false, true) => "cycle-session",
        (true, true) => "cycle-fresh-session",
    };
    let mut report = Report::new(
        "leasehold",
        workload,
        "cycle",
        opts.concurrency,
        clients.len(),
        measured,
        &tally,
    );
    report.checks = vec![
        Check::new(
            "granted-when-free",
            not_granted == 0 && granted > 0,
            format!("{granted} grants; {not_granted} free resources reported held"),
        ),
        Check::new(
            "released",
            not_released == 0,
            format!("{not_released} live leases not released"),
        ),
        tokens_unique(tokens, decreasing),
    ];
    usage.finish(measured, &mut report);
    Ok(report)
}
