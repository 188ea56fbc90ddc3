//! `bench keepalive`: many live leases kept alive over a few KeepAlive
//! streams; one op is one renewal (a request on a stream and its answer).
//!
//! Setup takes the leases (64 workers). Then each of `concurrency` streams
//! renews its share of them, spread evenly over `renew_every` (TTL/3 by
//! default): every 10 ms it sends the next slice, so the server sees a steady
//! rate of `leases / renew_every` renewals per second. The first round is
//! sent at once, since setup took time. The warm-up is at least one round.
//!
//! Check `no-spurious-expiry`: a renewal answered `alive = false` although
//! the lease's previous renewal (or grant) was sent less than one TTL before
//! this one: the server dropped a lease that was being kept alive. Renewals
//! that the load generator itself sent too late are counted apart
//! (`late_renewals`), as they say nothing about the server.
//!
//! Server CPU comes from `/proc/<pid>/stat` of `--server-pid` (utime +
//! stime over the measured window, in cores); without a pid it is not shown.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_stream::wrappers::ReceiverStream;

use super::{join_bounded, run_tag, BenchError, Check, Held, Options, Report, Tally, Window};
use crate::proto;

/// Options of the keepalive workload beyond the common ones.
#[derive(Debug, Clone)]
pub struct KeepaliveOptions {
    /// Live leases to keep.
    pub leases: usize,
    /// How often each lease is renewed; `None`: TTL / 3.
    pub renew_every: Option<Duration>,
}

const TICK: Duration = Duration::from_millis(10);

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
    let setup_started = Instant::now();
    let setup = Arc::new(Window::new(
        Duration::ZERO,
        Duration::from_secs(600),
        u64::MAX,
    ));
    let (leases, setup_tally) =
        super::scale::take_leases(&clients, &prefix, k.leases, 64, opts, setup.clone()).await;
    let setup_took = setup_started.elapsed();
    if setup_tally.errors > 0 || leases.iter().any(Option::is_none) {
        return Err(BenchError::Setup(format!(
            "took {} of {} leases ({} errors, first: {})",
            leases.iter().filter(|l| l.is_some()).count(),
            k.leases,
            setup_tally.errors,
            setup_tally.first_error.unwrap_or_default()
        )));
    }
    let leases: Vec<Held> = leases.into_iter().flatten().collect();
    // Every lease was granted after setup began: a safe "last confirmed" time.
    let confirmed_at = setup_started;

    let warmup = opts.warmup.max(period);
    let window = Arc::new(Window::new(warmup, opts.duration, opts.max_ops));
    let usage = tokio::spawn(super::usage_at_window_start_arc(
        window.clone(),
        opts.server_pid,
    ));
    let streams = opts.concurrency.min(leases.len()).max(1);
    let per = leases.len().div_ceil(streams);
    let mut handles = Vec::new();
    for (s, share) in leases.chunks(per).enumerate() {
        let mut client = clients[s % clients.len()].clone();
        let share: Vec<Held> = share.to_vec();
        let window = window.clone();
        let ttl = opts.ttl;
        handles.push(tokio::spawn(async move {
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
                    let n = share.len();
                    let ticks = (period.as_nanos() / TICK.as_nanos()).max(1) as usize;
                    let mut next = 0usize;
                    // The first round at once: setup took a while.
                    let mut due = n;
                    let mut interval = tokio::time::interval(TICK);
                    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut tick = 0usize;
                    while window.running() {
                        for _ in 0..due {
                            let i = next % n;
                            next += 1;
                            let lease = &share[i];
                            in_flight.lock().push_back((i, Instant::now()));
                            let req = proto::KeepAliveRequest {
                                lease_id: lease.lease_id.clone(),
                                token: lease.token,
                            };
                            if tx.send(req).await.is_err() {
                                return;
                            }
                        }
                        interval.tick().await;
                        tick += 1;
                        // Slice boundaries of an even spread over one period.
                        due = n * (tick % ticks + 1) / ticks - n * (tick % ticks) / ticks;
                    }
                })
            };
            let mut confirmed = vec![confirmed_at; share.len()];
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
                if msg.alive {
                    result.alive += 1;
                    confirmed[i] = sent;
                    window.record(&mut result.tally, sent, now);
                } else if sent.duration_since(confirmed[i]) < ttl {
                    result.spurious += 1;
                    result.tally.error(format!(
                        "lease {} expired while being renewed",
                        share[i].token
                    ));
                } else {
                    result.late += 1;
                }
            }
            let _ = sender.await;
            result
        }));
    }
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
            "{} leases on {streams} streams, {alive} renewals answered alive, {spurious} answered expired while being renewed",
            leases.len()
        ),
    )];
    report.extra.insert("leases".into(), leases.len() as f64);
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
