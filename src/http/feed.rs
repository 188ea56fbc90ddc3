//! `GET /api/feed`: the page's live view, as server-sent events.
//!
//! The feed reads the coordinator's change broadcast, the one the admin
//! `Watch` RPC streams, and sends:
//!
//! - `snapshot`: the leases (as `/api/leases`), at the start, every
//!   [`RESYNC_EVERY`] (waiter counts are not in the events), and whenever
//!   the events came too fast to send one by one;
//! - `events`: the changes of the last [`FLUSH_EVERY`], at most
//!   [`MAX_BATCH`], each stamped with the server time it happened, so the
//!   page can run its time-left bars down without trusting its own clock;
//! - `stats`: the coordinator's counters every second (the grants/s chart).
//!
//! A server doing 45,000 lock cycles a second makes 90,000 changes a
//! second; one feed must not cost it much. So when a window overflows, the
//! feed stops reading (its receiver just falls behind, which costs the
//! coordinator nothing) and sends a fresh snapshot at the window's end
//! instead, re-subscribing before it lists so nothing is missed.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::api::{end_name, snapshot, unix_ms, ListQuery, StatsJson};
use super::{authorize, HttpServer, Need};
use crate::coordinator::Event;
use crate::service::ms;
use crate::state::Change;

/// How often events are sent (batched).
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Most events in one batch; more in one window send a snapshot instead.
pub const MAX_BATCH: usize = 500;
/// How often a full snapshot is sent anyway.
pub const RESYNC_EVERY: Duration = Duration::from_secs(5);
/// How often the figures are sent.
pub const STATS_EVERY: Duration = Duration::from_secs(1);

/// One change as the page sees it.
#[derive(Debug, Serialize)]
struct EventJson {
    sequence: u64,
    kind: &'static str,
    resource: String,
    holder: String,
    token: String,
    ttl_ms: u64,
    expires_in_ms: u64,
    at_unix_ms: u64,
}

fn event_json(e: &Event, prefix: &str, at_unix_ms: u64) -> Option<EventJson> {
    let (kind, record) = match &e.change {
        Change::Granted(r) => ("acquired", r),
        Change::Renewed { record, .. } => ("renewed", record),
        Change::Ended { record, how, .. } => (end_name(*how), record),
        Change::RequestsCollected(_) => return None,
    };
    if !record.resource.as_str().starts_with(prefix) {
        return None;
    }
    Some(EventJson {
        sequence: e.sequence,
        kind,
        resource: record.resource.to_string(),
        holder: record.holder.to_string(),
        token: record.token.0.to_string(),
        ttl_ms: ms(record.ttl),
        expires_in_ms: ms(e.expires_in),
        at_unix_ms,
    })
}

/// `GET /api/feed?prefix=&limit=`.
pub async fn feed(
    State(s): State<HttpServer>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = authorize(&s.gate, &headers, Need::Read) {
        return r.into_response();
    }
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(8);
    tokio::spawn(run(s, q.prefix.clone(), q.limit(), tx));
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn sse(name: &'static str, data: &impl Serialize) -> Result<SseEvent, Infallible> {
    let data = serde_json::to_string(data).unwrap_or_else(|_| "null".into());
    Ok(SseEvent::default().event(name).data(data))
}

/// One feed, until the page goes away or the server stops.
async fn run(
    s: HttpServer,
    prefix: String,
    limit: usize,
    tx: mpsc::Sender<Result<SseEvent, Infallible>>,
) {
    let stopping = s.coordinator.shutdown_token();
    // Subscribe before listing: every change after the snapshot is seen.
    let mut rx = s.coordinator.subscribe();
    if tx
        .send(sse("snapshot", &snapshot(&s, &prefix, limit)))
        .await
        .is_err()
    {
        return;
    }
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    let mut stats = tokio::time::interval(STATS_EVERY);
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.tick().await;
    let mut batch: Vec<EventJson> = Vec::new();
    let mut overflow = false;
    let mut skipped = 0u64;
    loop {
        let mut out = Vec::new();
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = tx.closed() => return,
            received = rx.recv(), if !overflow => match received {
                Ok(e) => {
                    if let Some(j) = event_json(&e, &prefix, unix_ms()) {
                        batch.push(j);
                        overflow = batch.len() > MAX_BATCH;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    skipped += n;
                    overflow = true;
                }
                Err(RecvError::Closed) => return,
            },
            _ = flush.tick() => {
                if overflow {
                    // Too many to show one by one: skip to now, then list.
                    skipped += batch.len() as u64 + rx.len() as u64;
                    rx = rx.resubscribe();
                    overflow = false;
                    batch.clear();
                    out.push(sse("skipped", &serde_json::json!({ "events": skipped })));
                    skipped = 0;
                    out.push(sse("snapshot", &snapshot(&s, &prefix, limit)));
                } else if !batch.is_empty() {
                    out.push(events(std::mem::take(&mut batch)));
                }
            }
            _ = stats.tick() => {
                let figures = StatsJson::from(&s.coordinator.stats());
                out.push(sse("stats", &serde_json::json!({
                    "stats": figures,
                    "cluster": s.cluster.status(),
                    "server_unix_ms": unix_ms(),
                })));
            }
            _ = resync.tick(), if !overflow => {
                // Send what is queued first: the page applies events in
                // order, and replaying a few the snapshot already holds is
                // harmless (it keeps the highest token per resource).
                while batch.len() <= MAX_BATCH {
                    let Ok(e) = rx.try_recv() else { break };
                    batch.extend(event_json(&e, &prefix, unix_ms()));
                }
                if !batch.is_empty() {
                    out.push(events(std::mem::take(&mut batch)));
                }
                out.push(sse("snapshot", &snapshot(&s, &prefix, limit)));
            }
        }
        for message in out {
            if tx.send(message).await.is_err() {
                return;
            }
        }
    }
}

fn events(batch: Vec<EventJson>) -> Result<SseEvent, Infallible> {
    sse(
        "events",
        &serde_json::json!({ "events": batch, "server_unix_ms": unix_ms() }),
    )
}
