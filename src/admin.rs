//! The gRPC edge of the operator API (`AdminService`).
//!
//! Like [`crate::service`], each handler validates the request into domain
//! values, calls the [`Coordinator`] and converts the answer; coordinator
//! errors become statuses through [`crate::service::status`]. Access control
//! is not here: [`crate::auth::AdminGate`] sits in front of this service.
//!
//! Nothing here ever sends a lease id: operators see holders and tokens, and
//! revoke by resource (optionally guarded by the token they saw).
//!
//! Watch streams read the coordinator's broadcast channel directly, with no
//! buffer of their own: a watcher that does not read is left behind by the
//! channel (it never holds the coordinator up) and, on its next read, its
//! stream ends with RESOURCE_EXHAUSTED saying how far behind it fell.

use std::pin::Pin;

use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use crate::coordinator::{Coordinator, Event, WATCH_BUFFER};
use crate::keys::{self, KeySetError, Keys, KeysError};
use crate::lease::{EndKind, FencingToken, InvalidField, LeaseId, Resource};
use crate::proto::{self, admin_service_server::AdminService};
use crate::service::{invalid, key_to_proto, ms, status};
use crate::state::{Change, LeaseMatch, LeaseRecord, LeaseView};
use crate::store::GrantRecord;

/// ListLeases page size when the request says 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest ListLeases page.
pub const MAX_PAGE_SIZE: usize = 1000;

/// The operator's view of a live lease (no lease id).
pub fn lease_info(v: &LeaseView) -> proto::LeaseInfo {
    proto::LeaseInfo {
        renew_count: v.renewals,
        waiters: v.waiters,
        expires_in_ms: ms(v.expires_in),
        ..record_info(&v.record)
    }
}

fn record_info(r: &LeaseRecord) -> proto::LeaseInfo {
    proto::LeaseInfo {
        resource: r.resource.to_string(),
        holder: r.holder.to_string(),
        token: r.token.0,
        ttl_ms: ms(r.ttl),
        expires_in_ms: 0,
        acquired_at_unix_ms: r.acquired_unix_ms,
        renew_count: 0,
        waiters: 0,
    }
}

fn end_kind(how: EndKind) -> proto::EndKind {
    match how {
        EndKind::Released => proto::EndKind::Released,
        EndKind::Expired => proto::EndKind::Expired,
        EndKind::Revoked => proto::EndKind::Revoked,
    }
}

fn grant_to_proto(g: &GrantRecord) -> proto::Grant {
    let (ended, ended_at) = match g.ended {
        None => (proto::EndKind::Live, 0),
        Some((how, at)) => (end_kind(how), at),
    };
    proto::Grant {
        token: g.token.0,
        holder: g.holder.clone(),
        acquired_at_unix_ms: g.acquired_unix_ms,
        ended_at_unix_ms: ended_at,
        ended: ended as i32,
        ttl_ms: ms(g.ttl),
    }
}

/// The wire form of an event, or `None` when the watcher does not want it.
fn event_to_proto(e: &Event, prefix: &str, renewals: bool) -> Option<proto::LeaseEvent> {
    let (kind, record) = match &e.change {
        Change::Granted(r) => (proto::EventKind::Acquired, r),
        Change::Renewed { record, .. } if renewals => (proto::EventKind::Renewed, record),
        Change::Ended { record, how, .. } => (
            match how {
                EndKind::Released => proto::EventKind::Released,
                EndKind::Expired => proto::EventKind::Expired,
                EndKind::Revoked => proto::EventKind::Revoked,
            },
            record,
        ),
        Change::Renewed { .. } | Change::RequestsCollected(_) => return None,
    };
    if !record.resource.as_str().starts_with(prefix) {
        return None;
    }
    Some(proto::LeaseEvent {
        kind: kind as i32,
        lease: Some(proto::LeaseInfo {
            expires_in_ms: ms(e.expires_in),
            ..record_info(record)
        }),
        sequence: e.sequence,
    })
}

/// Which lease a RevokeRequest means: its `lease_id` (hex id, or a token as
/// digits), else its `token`, else whichever lease is live.
fn revoke_match(r: &proto::RevokeRequest) -> Result<Option<LeaseMatch>, InvalidField> {
    if !r.lease_id.is_empty() {
        if r.lease_id.len() < 32 && r.lease_id.bytes().all(|b| b.is_ascii_digit()) {
            let token = r.lease_id.parse().map_err(|_| {
                InvalidField::new("lease_id", "a token given as digits must fit in 64 bits")
            })?;
            return Ok(Some(LeaseMatch::Token(FencingToken(token))));
        }
        return Ok(Some(LeaseMatch::Id(LeaseId::parse(&r.lease_id)?)));
    }
    Ok((r.token != 0).then_some(LeaseMatch::Token(FencingToken(r.token))))
}

/// A key error as the status an operator can act on.
fn key_status(e: KeysError) -> Status {
    match &e {
        KeysError::Set(KeySetError::UnknownKey(_)) => Status::not_found(e.to_string()),
        KeysError::Set(KeySetError::RetireSigning(_)) => Status::failed_precondition(e.to_string()),
        KeysError::Set(KeySetError::DuplicateId(_)) => Status::aborted(e.to_string()),
        KeysError::Io { .. } | KeysError::Random(_) => {
            Status::unavailable(format!("{e}; nothing changed: the key file is as it was"))
        }
        KeysError::NotReplicated(_) => Status::unavailable(e.to_string()),
        KeysError::Raced => Status::aborted(e.to_string()),
        KeysError::Set(KeySetError::Damaged(_))
        | KeysError::Damaged { .. }
        | KeysError::Missing { .. } => Status::internal(e.to_string()),
    }
}

/// The `AdminService` implementation.
#[derive(Clone)]
pub struct AdminApi {
    coordinator: Coordinator,
    keys: Option<Keys>,
    /// In a cluster: key changes go through the log.
    node: Option<crate::raft::Node>,
}

impl AdminApi {
    /// A service over `coordinator`.
    pub fn new(coordinator: Coordinator) -> Self {
        AdminApi {
            coordinator,
            keys: None,
            node: None,
        }
    }

    /// A cluster node's admin API: RotateKey and RetireKey change the
    /// cluster's key set through the log (on the leader: followers forward).
    pub fn with_node(mut self, node: crate::raft::Node) -> Self {
        self.node = Some(node);
        self
    }

    /// Rotates and retires `keys` (RotateKey, RetireKey).
    pub fn with_keys(mut self, keys: Keys) -> Self {
        self.keys = Some(keys);
        self
    }

    fn keys(&self) -> Result<Keys, Status> {
        self.keys
            .clone()
            .ok_or_else(|| Status::unimplemented("this server has no signing keys"))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::LeaseEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AdminService for AdminApi {
    #[tracing::instrument(name = "ListLeases", skip_all, fields(prefix = %request.get_ref().prefix))]
    async fn list_leases(
        &self,
        request: Request<proto::ListLeasesRequest>,
    ) -> Result<Response<proto::ListLeasesResponse>, Status> {
        let r = request.into_inner();
        let size = match r.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        // One more than a page tells whether another page follows.
        let mut views = self.coordinator.list(&r.prefix, after, size + 1);
        let more = views.len() > size;
        views.truncate(size);
        let next_page_token = match views.last() {
            Some(last) if more => last.record.resource.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(proto::ListLeasesResponse {
            leases: views.iter().map(lease_info).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(name = "Revoke", skip_all, fields(resource = %request.get_ref().resource, token = request.get_ref().token))]
    async fn revoke(
        &self,
        request: Request<proto::RevokeRequest>,
    ) -> Result<Response<proto::RevokeResponse>, Status> {
        let r = request.into_inner();
        let only = revoke_match(&r).map_err(invalid)?;
        let resource = Resource::new(r.resource).map_err(invalid)?;
        let view = self
            .coordinator
            .revoke(&resource, only)
            .await
            .map_err(status)?;
        if let Some(v) = &view {
            tracing::info!(holder = %v.record.holder, token = v.record.token.0, "lease revoked");
        }
        Ok(Response::new(proto::RevokeResponse {
            revoked: view.is_some(),
            lease: view.as_ref().map(lease_info),
        }))
    }

    type WatchStream = WatchStream;

    #[tracing::instrument(name = "Watch", skip_all, fields(prefix = %request.get_ref().prefix))]
    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = request.into_inner();
        // Subscribe before answering, so every change after the call returns is seen.
        let rx = self.coordinator.subscribe();
        let shutdown = self.coordinator.shutdown_token();
        let state = (rx, shutdown, r.prefix, r.include_renewals, false);
        let stream = futures_util::stream::unfold(
            state,
            |(mut rx, shutdown, prefix, renewals, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let received = tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => {
                            let s = Status::unavailable(
                                "the server is shutting down; list the leases and watch again once it is back",
                            );
                            return Some((Err(s), (rx, shutdown, prefix, renewals, true)));
                        }
                        r = rx.recv() => r,
                    };
                    match received {
                        Ok(event) => {
                            if let Some(e) = event_to_proto(&event, &prefix, renewals) {
                                return Some((Ok(e), (rx, shutdown, prefix, renewals, false)));
                            }
                        }
                        Err(RecvError::Lagged(n)) => {
                            tracing::warn!(missed = n, "dropping a watcher that fell behind");
                            let s = Status::resource_exhausted(format!(
                                "this watcher fell behind by {n} events (the server keeps the last \
                                 {WATCH_BUFFER}) and was dropped; list the leases again, then watch again"
                            ));
                            return Some((Err(s), (rx, shutdown, prefix, renewals, true)));
                        }
                        Err(RecvError::Closed) => return None,
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(name = "History", skip_all, fields(resource = %request.get_ref().resource))]
    async fn history(
        &self,
        request: Request<proto::HistoryRequest>,
    ) -> Result<Response<proto::HistoryResponse>, Status> {
        let r = request.into_inner();
        let resource = Resource::new(r.resource).map_err(invalid)?;
        let limit = match r.limit {
            0 => usize::MAX,
            n => n as usize,
        };
        let grants = self.coordinator.history(&resource, limit).map_err(status)?;
        Ok(Response::new(proto::HistoryResponse {
            grants: grants.iter().map(grant_to_proto).collect(),
        }))
    }

    #[tracing::instrument(name = "RotateKey", skip_all)]
    async fn rotate_key(
        &self,
        _request: Request<proto::RotateKeyRequest>,
    ) -> Result<Response<proto::RotateKeyResponse>, Status> {
        let keys = self.keys()?;
        let key = match &self.node {
            Some(node) => {
                let id = node.change_keys(keys::rotated).await.map_err(key_status)?;
                keys.find(id).ok_or_else(|| {
                    Status::internal("the new key is not in the key set after its change")
                })?
            }
            // Writes and syncs the key file: off the async workers.
            None => tokio::task::spawn_blocking(move || keys.rotate())
                .await
                .map_err(|e| Status::internal(format!("the rotation task failed: {e}")))?
                .map_err(key_status)?,
        };
        Ok(Response::new(proto::RotateKeyResponse {
            key: Some(key_to_proto(&key)),
        }))
    }

    #[tracing::instrument(name = "RetireKey", skip_all, fields(key_id = %request.get_ref().key_id))]
    async fn retire_key(
        &self,
        request: Request<proto::RetireKeyRequest>,
    ) -> Result<Response<proto::RetireKeyResponse>, Status> {
        let keys = self.keys()?;
        let id = request.into_inner().key_id.parse().map_err(
            |e: leasehold_fence::signed::KeyError| {
                invalid(InvalidField::new("key_id", e.to_string()))
            },
        )?;
        let (key, retired) = match &self.node {
            Some(node) => {
                let retired = node
                    .change_keys(|set| keys::retired(set, id))
                    .await
                    .map_err(key_status)?;
                let key = keys.find(id).ok_or_else(|| {
                    Status::internal("the retired key is not in the key set after its change")
                })?;
                (key, retired)
            }
            None => tokio::task::spawn_blocking(move || keys.retire(id))
                .await
                .map_err(|e| Status::internal(format!("the retirement task failed: {e}")))?
                .map_err(key_status)?,
        };
        Ok(Response::new(proto::RetireKeyResponse {
            key: Some(key_to_proto(&key)),
            retired,
        }))
    }

    #[tracing::instrument(name = "Stats", skip_all)]
    async fn stats(
        &self,
        _request: Request<proto::StatsRequest>,
    ) -> Result<Response<proto::StatsResponse>, Status> {
        let s = self.coordinator.stats();
        Ok(Response::new(proto::StatsResponse {
            live_leases: s.live_leases as u64,
            waiters: s.waiters as u64,
            token_high_water: s.last_token.0,
            grants: s.counters.grants,
            renewals: s.counters.renewals,
            releases: s.counters.releases,
            expiries: s.counters.expiries,
            revocations: s.counters.revocations,
            uptime_ms: ms(s.uptime),
            data_size_bytes: s.data_size,
            commit_batches: s.commit_batches,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_match_table() {
        let id = LeaseId::random();
        let req = |lease_id: &str, token| proto::RevokeRequest {
            resource: "r".into(),
            lease_id: lease_id.into(),
            token,
        };
        let cases: Vec<(proto::RevokeRequest, Result<Option<LeaseMatch>, &str>)> = vec![
            (req("", 0), Ok(None)),
            (req("", 7), Ok(Some(LeaseMatch::Token(FencingToken(7))))),
            (req("42", 0), Ok(Some(LeaseMatch::Token(FencingToken(42))))),
            (req(&id.to_string(), 0), Ok(Some(LeaseMatch::Id(id)))),
            (req("xyz", 0), Err("lease_id")),
            (req("99999999999999999999999", 0), Err("lease_id")),
        ];
        for (r, want) in cases {
            let got = revoke_match(&r).map_err(|e| e.field);
            assert_eq!(got, want, "{r:?}");
        }
    }
}
