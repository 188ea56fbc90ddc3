//! One KeepAlive stream per [`Client`](crate::Client), carrying every lease
//! the client holds.
//!
//! The server multiplexes KeepAlive: one stream renews any number of
//! leases, and each answer names its lease. So a client needs one stream,
//! not one per lease: a worker holding a thousand leases costs the server
//! one HTTP/2 stream and one task, not a thousand.
//!
//! One task (started with the client's first lease) owns the stream. It
//! sends each lease's renewal when it is due (every TTL/3 by default),
//! matches answers to leases by `lease_id`, and confirms or loses each
//! lease. A broken stream, or a renewal left unanswered past the attempt
//! timeout, makes it open a new stream with backoff and resend what was
//! pending. What it never does is decide that a lease is lost for lack of
//! an answer: each lease has its own watchdog ([`watch_validity`]) that
//! declares it lost once its conservative validity runs out without a
//! confirmed renewal, whatever the stream is doing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

use crate::lease::LeaseState;
use crate::proto::lease_service_client::LeaseServiceClient;
use crate::retry::Backoff;
use crate::{proto, ClientConfig, LostReason};

/// The handle to a client's keepalive task.
#[derive(Debug)]
pub(crate) struct KeepAlives {
    add: mpsc::UnboundedSender<Renewed>,
    streams_opened: Arc<AtomicU64>,
}

/// A lease to keep alive, and how.
struct Renewed {
    state: Arc<LeaseState>,
    every: Duration,
    margin: Duration,
}

struct Entry {
    lease: Renewed,
    /// When the next renewal is due.
    next: Instant,
    /// When the renewal in flight was sent.
    pending: Option<Instant>,
}

impl KeepAlives {
    /// Starts the task. It ends once every handle is dropped and no lease
    /// is left to renew.
    pub(crate) fn start(rpc: LeaseServiceClient<Channel>, config: ClientConfig) -> Self {
        let (add, rx) = mpsc::unbounded_channel();
        let streams_opened = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(rpc, config, rx, streams_opened.clone()));
        KeepAlives {
            add,
            streams_opened,
        }
    }

    /// Renews `state` every `every` until it is stopped or lost, and starts
    /// its watchdog.
    pub(crate) fn add(&self, state: Arc<LeaseState>, every: Duration, margin: Duration) {
        tokio::spawn(watch_validity(state.clone()));
        let renewed = Renewed {
            state,
            every,
            margin,
        };
        if let Err(mpsc::error::SendError(renewed)) = self.add.send(renewed) {
            // The task is gone (its runtime is shutting down): nothing will
            // renew this lease, so say so now rather than at its timeout.
            renewed.state.lose(LostReason::TimedOut);
        }
    }

    /// KeepAlive streams opened so far: one, plus one per reconnect.
    pub(crate) fn streams_opened(&self) -> u64 {
        self.streams_opened.load(Ordering::Relaxed)
    }
}

/// Declares the lease lost once its validity runs out without a confirmed
/// renewal; ends early when the lease is stopped (released, detached, lost).
async fn watch_validity(state: Arc<LeaseState>) {
    tokio::select! {
        _ = state.sleep_until_invalid() => state.lose(LostReason::TimedOut),
        _ = state.stop.cancelled() => {}
    }
}

type Stream = (
    mpsc::UnboundedSender<proto::KeepAliveRequest>,
    Streaming<proto::KeepAliveResponse>,
);

#[tracing::instrument(name = "keepalive", skip_all)]
async fn run(
    rpc: LeaseServiceClient<Channel>,
    config: ClientConfig,
    mut add: mpsc::UnboundedReceiver<Renewed>,
    streams_opened: Arc<AtomicU64>,
) {
    let mut leases: HashMap<String, Entry> = HashMap::new();
    let mut stream: Option<Stream> = None;
    let mut backoff = Backoff::new(&config);
    let mut open = true;
    loop {
        if !open && leases.is_empty() {
            return;
        }
        if stream.is_none() && !leases.is_empty() {
            match open_stream(&rpc, &config).await {
                Ok(s) => {
                    streams_opened.fetch_add(1, Ordering::Relaxed);
                    stream = Some(s);
                    // What was in flight on the old stream goes again now.
                    let now = Instant::now();
                    for e in leases.values_mut() {
                        if e.pending.take().is_some() {
                            e.next = now;
                        }
                    }
                }
                Err(status) => {
                    tracing::debug!(code = ?status.code(), "could not open the keepalive stream");
                    let retry_at = Instant::now() + config.max_backoff;
                    if !backoff.sleep_before(retry_at).await {
                        tokio::time::sleep(config.max_backoff).await;
                    }
                    continue;
                }
            }
        }
        let mut wake = scan(&mut leases, &mut stream, &config);
        // Answers and new leases cost O(1) each; the O(leases) scan runs
        // only when something is due, and sends everything due within a
        // quarter period at once, so it runs about four times per period
        // however many leases there are.
        loop {
            tokio::select! {
                renewed = add.recv(), if open => match renewed {
                    Some(r) => {
                        let next = Instant::now() + r.every;
                        wake = wake.min(next);
                        leases.insert(r.state.lease_id.clone(), Entry { lease: r, next, pending: None });
                    }
                    None => {
                        open = false;
                        break;
                    }
                },
                msg = next_answer(&mut stream) => match msg {
                    Ok(Some(resp)) => {
                        backoff = Backoff::new(&config);
                        if let Some(next) = answer(&mut leases, resp) {
                            wake = wake.min(next);
                        }
                    }
                    Ok(None) | Err(_) => {
                        stream = None; // open a new one
                        break;
                    }
                },
                _ = tokio::time::sleep_until(wake) => break,
            }
        }
    }
}

/// Drops stopped leases, sends the renewals that are due (or due within a
/// quarter of their period), drops a stream on which a renewal went
/// unanswered past the attempt timeout, and says when to look again.
fn scan(
    leases: &mut HashMap<String, Entry>,
    stream: &mut Option<Stream>,
    config: &ClientConfig,
) -> Instant {
    let now = Instant::now();
    leases.retain(|_, e| !e.lease.state.stop.is_cancelled());
    if leases.values().any(|e| {
        e.pending
            .is_some_and(|sent| sent + config.attempt_timeout <= now)
    }) {
        tracing::debug!("a renewal went unanswered; opening a new keepalive stream");
        *stream = None;
    }
    let mut wake = now + config.attempt_timeout;
    if leases.is_empty() {
        // Nothing to renew: close the stream until there is.
        *stream = None;
        return wake;
    }
    let Some((tx, _)) = stream.as_ref() else {
        return now; // open one first
    };
    for (id, e) in leases.iter_mut() {
        if let Some(sent) = e.pending {
            wake = wake.min(sent + config.attempt_timeout);
        } else if e.next <= now + e.lease.every / 4 {
            let req = proto::KeepAliveRequest {
                lease_id: id.clone(),
                token: e.lease.state.token,
            };
            if tx.send(req).is_err() {
                *stream = None;
                return now;
            }
            e.pending = Some(now);
        } else {
            wake = wake.min(e.next - e.lease.every / 4);
        }
    }
    wake
}

/// Applies one answer to the lease it names; returns when that lease's
/// next renewal is due.
fn answer(leases: &mut HashMap<String, Entry>, resp: proto::KeepAliveResponse) -> Option<Instant> {
    let e = leases.get_mut(&resp.lease_id)?; // None: released meanwhile
    let sent_at = e.pending.take()?;
    let state = &e.lease.state;
    if !resp.alive {
        state.lose(LostReason::Gone);
        leases.remove(&resp.lease_id);
        return None;
    }
    state.confirm(
        sent_at,
        Duration::from_millis(resp.expires_in_ms),
        e.lease.margin,
    );
    e.next = sent_at + e.lease.every;
    Some(e.next - e.lease.every / 4)
}

async fn open_stream(
    rpc: &LeaseServiceClient<Channel>,
    config: &ClientConfig,
) -> Result<Stream, tonic::Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut rpc = rpc.clone();
    let opened = tokio::time::timeout(
        config.attempt_timeout,
        rpc.keep_alive(UnboundedReceiverStream::new(rx)),
    )
    .await
    .map_err(|_| tonic::Status::deadline_exceeded("opening the keepalive stream timed out"))??;
    Ok((tx, opened.into_inner()))
}

async fn next_answer(
    stream: &mut Option<Stream>,
) -> Result<Option<proto::KeepAliveResponse>, tonic::Status> {
    match stream {
        Some((_, inbound)) => inbound.message().await,
        None => std::future::pending().await,
    }
}
