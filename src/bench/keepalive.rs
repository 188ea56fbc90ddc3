//! `bench keepalive`: many live leases kept alive over a few KeepAlive
//! streams; one op is one renewal (a request on a stream and its answer).
//!
//! The `concurrency` streams open first. Then 64 workers take the leases,
//! dealing them out to the streams as they are granted, and each stream
//! renews every lease it has been dealt once per `renew_every` (TTL/3 by
//! default), spread evenly: every 10 ms it sends the next slice, so the
//! server sees a steady `leases / renew_every` renewals per second and no
//! lease waits longer than one period for its first renewal, however long
//! taking 100,000 leases takes. Measuring starts once every lease is held,
//! after a warm-up of at least one period.
//!
//! Check `no-spurious-expiry`: a renewal answered `alive = false` although
//! the lease's previous renewal (or its grant) was sent less than one TTL
//! before: the server dropped a lease that was being kept alive. Renewals the
//! load generator itself sent too late are counted apart (`late_renewals`),
//! as they say nothing about the server.
//!
//! Server CPU comes from `/proc/<pid>/stat` of `--server-pid` (utime +
//! stime over the measured window, in cores); without a pid it is not shown.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    join_bounded, run_tag, usage_at_window_start_arc, BenchError, Check, Options, Report, Tally,
    Window,
};
use leasehold_client::proto;

/// Options of the keepalive workload beyond the common ones.
#[derive(Debug, Clone)]
pub struct KeepaliveOptions {
    /// Live leases to keep.
    pub leases: usize,
    /// How often each lease is renewed; `None`: TTL / 3.
    pub renew_every: Option<Duration>,
}

const TICK: Duration = Duration::from_millis(10);
const SETUP_WORKERS: usize = 64;
/// The longest taking the leases may take.
const SETUP_LIMIT: Duration = Duration::from_secs(600);

/// A lease dealt to a stream.
#[derive(Debug, Clone)]
struct Kept {
    lease_id: String,
    token: u64,
    /// When its Acquire was sent: it was alive for one TTL from then.
    asked: Instant,
}

type Share = Arc<Mutex<Vec<Kept>>>;

#[derive(Default)]
struct StreamResult {
    tally: Tally,
    spurious: u64,
    late: u64,
    alive: u64,
}

/// Runs the keepalive workload.
pub async fn run(opts: &Options, k: &KeepaliveOptions) -> Result<Report, BenchError> {
    opts.check()?;
    let clients = opts.connect().await?;
    let prefix = format!("bench/keepalive/{}", run_tag());
    let period = k.renew_every.unwrap_or(opts.ttl / 3).max(TICK);
    let streams = opts.concurrency.min(k.leases.max(1));
    let shares: Vec<Share> = (0..streams).map(|_| Share::default()).collect();
    let window_cell: Arc<OnceLock<Arc<Window>>> = Arc::default();
    let abandon = Arc::new(AtomicBool::new(false));

    let mut handles = Vec::new();
    for (s, share) in shares.iter().enumerate() {
        let client = clients[s % clients.len()].clone();
        let (share, cell, abandon) = (share.clone(), window_cell.clone(), abandon.clone());
        handles.push(tokio::spawn(stream(
            client, share, cell, abandon, period, opts.ttl,
        )));
    }

    // Setup: take the leases, dealing them to the streams as they come.
    let setup_started = Instant::now();
    let deal = shares.clone();
    let setup_tally = super::scale::take_leases(
        &clients,
        &prefix,
        k.leases,
        SETUP_WORKERS,
        opts,
        setup_started + SETUP_LIMIT,
        move |_, i, l, asked| {
            deal[i % deal.len()].lock().push(Kept {
                lease_id: l.lease_id,
                token: l.token,
                asked,
            })
        },
    )
    .await;
    let setup_took = setup_started.elapsed();
    let held: usize = shares.iter().map(|s| s.lock().len()).sum();
    if setup_tally.errors > 0 || held < k.leases {
        abandon.store(true, Ordering::Relaxed);
        let _ = join_bounded(handles, Instant::now() + opts.op_timeout).await;
        return Err(BenchError::Setup(format!(
            "took {held} of {} leases ({} errors, first: {})",
            k.leases,
            setup_tally.errors,
            setup_tally.first_error.unwrap_or_default()
        )));
    }

    let warmup = opts.warmup.max(period);
    let window = Arc::new(Window::new(warmup, opts.duration, opts.max_ops));
    let _ = window_cell.set(window.clone());
    let usage = tokio::spawn(usage_at_window_start_arc(window.clone(), opts.server_pid));
    let (results, lost) = join_bounded(handles, opts.hard_stop(&window)).await;
    let usage = usage.await.unwrap_or_default();
    let mut tally = lost;
    let (mut spurious, mut late, mut alive) = (0, 0, 0);
    for r in &results {
        tally.merge(&r.tally);
        spurious += r.spurious;
        late += r.late;
        alive += r.alive;
    }
    let measured = window.measured();
    let mut report = Report::new(
        "leasehold",
        "keepalive",
        "renewal",
        streams,
        clients.len(),
        measured,
        &tally,
    );
    report.checks = vec![Check::new(
        "no-spurious-expiry",
        spurious == 0 && alive > 0,
        format!(
            "{held} leases on {streams} streams, {alive} renewals answered alive, {spurious} answered expired while being renewed"
        ),
    )];
    report.extra.insert("leases".into(), held as f64);
    report.extra.insert("late_renewals".into(), late as f64);
    report
        .extra
        .insert("renew_every_ms".into(), period.as_millis() as f64);
    report.extra.insert(
        "setup_seconds".into(),
        (setup_took.as_secs_f64() * 100.0).round() / 100.0,
    );
    usage.finish(measured, &mut report);
    Ok(report)
}

/// One KeepAlive stream: renews every lease in `share`, once per `period`.
async fn stream(
    mut client: super::Client,
    share: Share,
    window: Arc<OnceLock<Arc<Window>>>,
    abandon: Arc<AtomicBool>,
    period: Duration,
    ttl: Duration,
) -> StreamResult {
    let mut result = StreamResult::default();
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::KeepAliveRequest>(4096);
    let in_flight: Arc<Mutex<VecDeque<(usize, Instant)>>> = Arc::default();
    let mut responses = match client.keep_alive(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            result.tally.error(format!("KeepAlive: {status}"));
            return result;
        }
    };
    let sender = {
        let (share, window, in_flight) = (share.clone(), window.clone(), in_flight.clone());
        tokio::spawn(async move {
            let ticks = (period.as_nanos() / TICK.as_nanos()).max(1) as f64;
            let mut next = 0usize;
            let mut budget = 0.0f64;
            let mut interval = tokio::time::interval(TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                if abandon.load(Ordering::Relaxed) {
                    return;
                }
                if window.get().is_some_and(|w| !w.running()) {
                    return;
                }
                let batch: Vec<(usize, proto::KeepAliveRequest)> = {
                    let leases = share.lock();
                    let n = leases.len();
                    if n == 0 {
                        continue;
                    }
                    budget += n as f64 / ticks;
                    let due = budget.floor() as usize;
                    budget -= due as f64;
                    (0..due)
                        .map(|_| {
                            let i = next % n;
                            next += 1;
                            let lease = &leases[i];
                            let req = proto::KeepAliveRequest {
                                lease_id: lease.lease_id.clone(),
                                token: lease.token,
                            };
                            (i, req)
                        })
                        .collect()
                };
                for (i, req) in batch {
                    in_flight.lock().push_back((i, Instant::now()));
                    if tx.send(req).await.is_err() {
                        return;
                    }
                }
            }
        })
    };
    // When each lease was last known alive (its last renewal answered alive).
    let mut confirmed: Vec<Option<Instant>> = Vec::new();
    loop {
        let msg = match responses.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(status) => {
                result.tally.error(format!("KeepAlive stream: {status}"));
                break;
            }
        };
        let now = Instant::now();
        let Some((i, sent)) = in_flight.lock().pop_front() else {
            result.tally.error("an answer to a renewal never sent");
            break;
        };
        if confirmed.len() <= i {
            confirmed.resize(i + 1, None);
        }
        if msg.alive {
            result.alive += 1;
            confirmed[i] = Some(sent);
            if let Some(w) = window.get() {
                w.record(&mut result.tally, sent, now);
            }
            continue;
        }
        let since = confirmed[i].unwrap_or_else(|| share.lock()[i].asked);
        if sent.duration_since(since) < ttl {
            result.spurious += 1;
            let token = share.lock()[i].token;
            result.tally.error(format!(
                "the lease with token {token} expired while being renewed"
            ));
        } else {
            result.late += 1;
        }
    }
    let _ = sender.await;
    result
}
