//! The page's JSON: who the caller is, the leases, a resource's history,
//! and revoke. Tokens are sent as strings: they are `u64`s, and a
//! JavaScript number loses precision above 2^53.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{authorize, refused, HttpServer, Need};
use crate::auth::AdminGate;
use crate::coordinator::Stats;
use crate::lease::{EndKind, FencingToken, Resource};
use crate::service::ms;
use crate::state::{LeaseMatch, LeaseView};

/// Most leases one answer (or one feed snapshot) lists.
pub const MAX_LIST: usize = 1000;
/// Leases listed when the request does not say.
pub const DEFAULT_LIST: usize = 200;

/// A live lease as the page shows it (never its lease id).
#[derive(Debug, Serialize)]
pub struct LeaseJson {
    resource: String,
    holder: String,
    token: String,
    ttl_ms: u64,
    expires_in_ms: u64,
    waiters: u32,
    renew_count: u64,
    acquired_at_unix_ms: u64,
}

impl From<&LeaseView> for LeaseJson {
    fn from(v: &LeaseView) -> Self {
        LeaseJson {
            resource: v.record.resource.to_string(),
            holder: v.record.holder.to_string(),
            token: v.record.token.0.to_string(),
            ttl_ms: ms(v.record.ttl),
            expires_in_ms: ms(v.expires_in),
            waiters: v.waiters,
            renew_count: v.renewals,
            acquired_at_unix_ms: v.record.acquired_unix_ms,
        }
    }
}

/// The coordinator's figures, for the page's header and chart.
#[derive(Debug, Serialize)]
pub struct StatsJson {
    grants: u64,
    renewals: u64,
    releases: u64,
    expiries: u64,
    revocations: u64,
    replays: u64,
    live_leases: u64,
    waiters: u64,
    token_high_water: String,
    uptime_ms: u64,
    commit_batches: u64,
}

impl From<&Stats> for StatsJson {
    fn from(s: &Stats) -> Self {
        StatsJson {
            grants: s.counters.grants,
            renewals: s.counters.renewals,
            releases: s.counters.releases,
            expiries: s.counters.expiries,
            revocations: s.counters.revocations,
            replays: s.counters.replays,
            live_leases: s.live_leases as u64,
            waiters: s.waiters as u64,
            token_high_water: s.last_token.0.to_string(),
            uptime_ms: ms(s.uptime),
            commit_batches: s.commit_batches,
        }
    }
}

/// `GET /api/session`: what this caller may do, so the page knows whether
/// to ask for the token and whether to show Revoke.
pub async fn session(State(s): State<HttpServer>, headers: HeaderMap) -> Response {
    let auth = match &s.gate {
        AdminGate::Token(_) => "token",
        AdminGate::Open => "open",
        AdminGate::Closed { .. } => "closed",
    };
    let read = authorize(&s.gate, &headers, Need::Read);
    let revoke = authorize(&s.gate, &headers, Need::Revoke).is_ok();
    Json(serde_json::json!({
        "auth": auth,
        "can_read": read.is_ok(),
        "can_revoke": revoke,
        "message": read.err().map(|r| r.message),
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}

/// Query of `/api/leases` and `/api/feed`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// Only resources starting with this.
    #[serde(default)]
    pub prefix: String,
    /// At most this many (capped at [`MAX_LIST`]).
    pub limit: Option<usize>,
}

impl ListQuery {
    /// The limit to use.
    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_LIST).clamp(1, MAX_LIST)
    }
}

/// Leases (at most `limit`, from the start of `prefix`), whether more
/// exist, and the figures.
pub fn snapshot(s: &HttpServer, prefix: &str, limit: usize) -> serde_json::Value {
    let mut views = s.coordinator.list(prefix, None, limit + 1);
    let truncated = views.len() > limit;
    views.truncate(limit);
    let leases: Vec<LeaseJson> = views.iter().map(LeaseJson::from).collect();
    let stats = s.coordinator.stats();
    serde_json::json!({
        "leases": leases,
        "truncated": truncated,
        "stats": StatsJson::from(&stats),
        "cluster": s.cluster.status(),
        "server_unix_ms": unix_ms(),
    })
}

/// `GET /api/leases?prefix=&limit=`.
pub async fn leases(
    State(s): State<HttpServer>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(r) = authorize(&s.gate, &headers, Need::Read) {
        return r.into_response();
    }
    Json(snapshot(&s, &q.prefix, q.limit())).into_response()
}

/// Query of `/api/history`.
#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    resource: String,
    limit: Option<usize>,
}

/// `GET /api/history?resource=&limit=`: the resource's grants, newest first.
pub async fn history(
    State(s): State<HttpServer>,
    headers: HeaderMap,
    Query(q): Query<HistoryQuery>,
) -> Response {
    if let Err(r) = authorize(&s.gate, &headers, Need::Read) {
        return r.into_response();
    }
    let resource = match Resource::new(q.resource) {
        Ok(r) => r,
        Err(e) => return refused(StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    match s.coordinator.history(&resource, limit) {
        Ok(grants) => {
            let grants: Vec<_> = grants
                .iter()
                .map(|g| {
                    let (ended, at) = match g.ended {
                        None => ("live", None),
                        Some((how, at)) => (end_name(how), Some(at)),
                    };
                    serde_json::json!({
                        "token": g.token.0.to_string(),
                        "holder": g.holder,
                        "ttl_ms": ms(g.ttl),
                        "acquired_at_unix_ms": g.acquired_unix_ms,
                        "ended": ended,
                        "ended_at_unix_ms": at,
                    })
                })
                .collect();
            Json(serde_json::json!({ "resource": resource.as_str(), "grants": grants }))
                .into_response()
        }
        Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// The page's name for how a lease ended.
pub fn end_name(how: EndKind) -> &'static str {
    match how {
        EndKind::Released => "released",
        EndKind::Expired => "expired",
        EndKind::Revoked => "revoked",
    }
}

/// Body of `POST /api/revoke`.
#[derive(Debug, Deserialize)]
pub struct RevokeBody {
    resource: String,
    /// The token the operator saw: only that lease is revoked, never a
    /// newer holder's.
    token: String,
}

/// `POST /api/revoke`: ends the lease on `resource` if it still has `token`.
pub async fn revoke(
    State(s): State<HttpServer>,
    headers: HeaderMap,
    body: Result<Json<RevokeBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorize(&s.gate, &headers, Need::Revoke) {
        return r.into_response();
    }
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => {
            let msg = format!("send JSON {{\"resource\": \"…\", \"token\": \"…\"}}: {e}");
            return refused(StatusCode::BAD_REQUEST, msg).into_response();
        }
    };
    let resource = match Resource::new(body.resource) {
        Ok(r) => r,
        Err(e) => return refused(StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let Ok(token) = body.token.parse::<u64>() else {
        let msg = "token: send the lease's fencing token as a decimal string";
        return refused(StatusCode::BAD_REQUEST, msg).into_response();
    };
    let only = Some(LeaseMatch::Token(FencingToken(token)));
    match s.coordinator.revoke(&resource, only).await {
        Ok(Some(v)) => {
            tracing::info!(resource = %resource, holder = %v.record.holder, token, "lease revoked from the lease page");
            Json(serde_json::json!({ "revoked": true, "lease": LeaseJson::from(&v) }))
                .into_response()
        }
        Ok(None) => refused(
            StatusCode::CONFLICT,
            format!("{resource} is not held with token {token} any more; nothing was revoked"),
        )
        .into_response(),
        Err(e) => {
            let status = crate::service::status(e);
            refused(StatusCode::SERVICE_UNAVAILABLE, status.message()).into_response()
        }
    }
}

/// The wall clock, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, ms)
}
