//! `bench fill` and `bench ready`: the scale procedure.
//!
//! `fill` takes many leases (a million, say) with a long TTL and keeps them,
//! reporting the grant rate and the server's memory. Then the operator
//! restarts the server and `ready` polls Describe on one of the filled
//! resources until the restarted server answers that it is held: the time it
//! prints is how long the restart took to serve again (measured from when
//! `ready` started, so start it right after the server process).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    join_bounded, run_tag, BenchError, BenchLease, Caller, Check, Client, Options, Report, Tally,
    Window,
};
use leasehold_client::proto;

/// Takes the leases `{prefix}/0` .. `{prefix}/{count - 1}` with `workers`
/// concurrent unary callers, starting none after `stop`. Each grant, as it
/// comes, goes to `granted(tally, i, lease, asked)` with the worker's own
/// tally and the time its Acquire was sent. Returns every worker's tally
/// (refusals and failures counted as errors). Used by `fill` and by the
/// keepalive workload's setup.
pub async fn take_leases<F>(
    clients: &[Client],
    prefix: &str,
    count: usize,
    workers: usize,
    opts: &Options,
    stop: Instant,
    granted: F,
) -> Tally
where
    F: Fn(&mut Tally, usize, BenchLease, Instant) + Clone + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for w in 0..workers.max(1) {
        let mut caller = Caller::Unary(clients[w % clients.len()].clone());
        let (next, opts, granted) = (next.clone(), opts.clone(), granted.clone());
        let prefix = prefix.to_owned();
        handles.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= count || Instant::now() > stop {
                    return tally;
                }
                let asked = Instant::now();
                match caller
                    .acquire(
                        format!("{prefix}/{i}"),
                        "bench",
                        opts.ttl,
                        Duration::ZERO,
                        opts.op_timeout,
                    )
                    .await
                {
                    Ok(Some(l)) => granted(&mut tally, i, l, asked),
                    Ok(None) => tally.error(format!("{prefix}/{i} was already held")),
                    Err(e) => tally.error(e),
                }
            }
        }));
    }
    let deadline = stop + opts.op_timeout + Duration::from_secs(2);
    let (parts, mut tally) = join_bounded(handles, deadline).await;
    for t in &parts {
        tally.merge(t);
    }
    tally
}

/// What `fill` did: its report, and where the leases are.
#[derive(Debug)]
pub struct Filled {
    /// Rate, latency, and the `all-granted` check.
    pub report: Report,
    /// The leases are `{prefix}/0` .. `{prefix}/{count - 1}`.
    pub prefix: String,
}

/// Takes `count` leases and keeps them; `opts.duration` bounds the run.
pub async fn fill(opts: &Options, count: usize) -> Result<Filled, BenchError> {
    opts.check()?;
    let clients = opts.connect().await?;
    let prefix = format!("bench/fill/{}", run_tag());
    let window = Arc::new(Window::new(Duration::ZERO, opts.duration, u64::MAX));
    let usage = super::ServerUsage::start(opts.server_pid);
    let started = Instant::now();
    let held = Arc::new(AtomicU64::new(0));
    let counted = held.clone();
    let tally = take_leases(
        &clients,
        &prefix,
        count,
        opts.concurrency,
        opts,
        window.to,
        move |tally, _, _, asked| {
            window.record(tally, asked, Instant::now());
            counted.fetch_add(1, Ordering::Relaxed);
        },
    )
    .await;
    let took = started.elapsed();
    let held = held.load(Ordering::Relaxed) as usize;
    let mut report = Report::new(
        "leasehold",
        "fill",
        "grant",
        opts.concurrency,
        clients.len(),
        took,
        &tally,
    );
    report.checks = vec![Check::new(
        "all-granted",
        held == count,
        format!("{held} of {count} leases held under {prefix}/0..{count}"),
    )];
    report.extra.insert("leases_held".into(), held as f64);
    usage.finish(took, &mut report);
    Ok(Filled { report, prefix })
}

/// Polls Describe on `resource` until the server answers (and says it is
/// held, when `expect_held`), at most `timeout`. Reports the time it took.
pub async fn ready(
    opts: &Options,
    resource: &str,
    expect_held: bool,
    timeout: Duration,
) -> Result<Report, BenchError> {
    let endpoint =
        tonic::transport::Endpoint::from_shared(opts.server.clone()).map_err(|source| {
            BenchError::Url {
                url: opts.server.clone(),
                source,
            }
        })?;
    let started = Instant::now();
    let mut tally = Tally::default();
    let mut attempts = 0u64;
    let mut answer = None;
    while started.elapsed() < timeout {
        attempts += 1;
        if let Ok(mut client) = super::open_conn(&endpoint).await {
            let req = proto::DescribeRequest {
                resource: resource.to_owned(),
            };
            if let Ok(r) = client.describe(req).await {
                answer = Some(r.into_inner());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    if answer.is_some() {
        tally.hist.record(took);
        tally.ops = 1;
    } else {
        tally.error(format!("no answer within {timeout:?}"));
    }
    let mut report = Report::new("leasehold", "ready", "restart", 1, 1, took, &tally);
    let held = answer.as_ref().is_some_and(|a| a.held);
    report.checks = vec![Check::new(
        "restored",
        answer.is_some() && (held || !expect_held),
        format!("{resource} held after restart: {held}"),
    )];
    report
        .extra
        .insert("ready_after_ms".into(), took.as_millis() as f64);
    report.extra.insert("attempts".into(), attempts as f64);
    if let Some(pid) = opts.server_pid {
        if let Some(rss) = leasehold_bench_report::process_rss(pid) {
            report
                .extra
                .insert("server_rss_mib".into(), (rss as f64 / 1048576.0).round());
        }
    }
    Ok(report)
}
