//! The gRPC edge of the worker API: the only module (with `admin`) that
//! knows gRPC status codes.
//!
//! Each handler converts the protobuf request into validated domain values
//! (the constructors in [`crate::lease`] do the checking, so a bad field is
//! refused before anything changes), calls the [`Coordinator`], and converts
//! the answer back. Every error becomes a [`Status`] in one place,
//! [`status`]. Each RPC runs in a tracing span carrying the resource, the
//! holder and the token. The per-call spans are at DEBUG level: at the
//! default INFO filter they are disabled and cost nothing, whereas an
//! enabled span (allocated, its fields formatted) costs microseconds on
//! every call, a noticeable share of the few the coordinator may spend.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{field, Span};

use std::sync::Arc;

use crate::coordinator::{AcquireOutcome, AcquireRequest, Coordinator, CoordinatorError};
use crate::keys::{KeyInfo, KeyState, Keys};
use crate::lease::{FencingToken, Holder, InvalidField, LeaseId, RequestId, Resource};
use crate::metrics::rpc::{Method, RpcMetrics, Transport};
use crate::proto::{self, lease_service_server::LeaseService};
use crate::state::{LeaseView, StateError};

/// Maps every coordinator error to its gRPC status. The messages say what
/// happened and what to do.
pub fn status(err: CoordinatorError) -> Status {
    match &err {
        CoordinatorError::Invalid(_) => Status::invalid_argument(err.to_string()),
        CoordinatorError::State(s) => match s {
            StateError::NotFound(_) => Status::not_found(err.to_string()),
            StateError::WrongToken { .. } => Status::permission_denied(err.to_string()),
            StateError::RequestMismatch(_) => Status::invalid_argument(err.to_string()),
            StateError::RequestEnded(_) => Status::failed_precondition(err.to_string()),
            StateError::Superseded => Status::aborted(err.to_string()),
            StateError::Exhausted { .. } => Status::resource_exhausted(err.to_string()),
        },
        CoordinatorError::Storage(_)
        | CoordinatorError::ShuttingDown
        | CoordinatorError::NotLeader { .. } => Status::unavailable(err.to_string()),
    }
}

/// A validation failure as INVALID_ARGUMENT naming the field.
pub(crate) fn invalid(e: InvalidField) -> Status {
    status(CoordinatorError::Invalid(e))
}

/// A duration as the wire's milliseconds (saturating).
pub(crate) fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// The wire form of a lease, for its holder (it carries the lease id).
pub fn lease_to_proto(v: &LeaseView) -> proto::Lease {
    proto::Lease {
        resource: v.record.resource.to_string(),
        lease_id: v.record.lease_id.to_string(),
        token: v.record.token.0,
        holder: v.record.holder.to_string(),
        ttl_ms: ms(v.record.ttl),
        expires_in_ms: ms(v.expires_in),
        signed_fence: Vec::new(),
    }
}

/// The wire form of a signing key.
pub fn key_to_proto(k: &KeyInfo) -> proto::PublicKey {
    let status = match k.state {
        KeyState::Signing => proto::KeyStatus::Signing,
        KeyState::Active => proto::KeyStatus::Active,
        KeyState::Retired => proto::KeyStatus::Retired,
    };
    proto::PublicKey {
        key_id: k.public.id().to_string(),
        public_key: k.public.to_bytes().to_vec(),
        status: status as i32,
        created_at_unix_ms: k.created_unix_ms,
        retired_at_unix_ms: k.retired_unix_ms.unwrap_or(0),
    }
}

/// The `LeaseService` implementation.
#[derive(Clone)]
pub struct LeaseApi {
    coordinator: Coordinator,
    keys: Option<Keys>,
    /// Whether leases carry a signed fence (`serve --no-signed-fences`: no).
    sign: bool,
    /// Per-call figures for Session calls and `held` answers (see `crate::metrics::rpc`).
    metrics: Option<Arc<RpcMetrics>>,
}

impl LeaseApi {
    /// A service over `coordinator`.
    pub fn new(coordinator: Coordinator) -> Self {
        LeaseApi {
            coordinator,
            keys: None,
            sign: false,
            metrics: None,
        }
    }

    /// Records Session calls and `held` answers into `metrics`.
    pub fn with_metrics(mut self, metrics: Option<Arc<RpcMetrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Signs every lease it sends with `keys` and serves their public halves.
    pub fn with_keys(mut self, keys: Keys) -> Self {
        self.keys = Some(keys);
        self.sign = true;
        self
    }

    /// Serves the public keys but signs no lease (`serve --no-signed-fences`).
    pub fn without_signing(mut self) -> Self {
        self.sign = false;
        self
    }

    /// The wire form of a lease for its holder, with its signed fence
    /// (signed here, outside the coordinator's lock, from the lease record).
    fn signed_lease(&self, v: &LeaseView) -> proto::Lease {
        let mut lease = lease_to_proto(v);
        if let Some(keys) = self.keys.as_ref().filter(|_| self.sign) {
            let r = &v.record;
            lease.signed_fence = keys
                .sign(r.resource.as_str(), r.token.0, r.acquired_unix_ms)
                .as_bytes()
                .to_vec();
        }
        lease
    }
}

fn record_lease(span: &Span, v: &LeaseView) {
    span.record("token", v.record.token.0);
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<proto::KeepAliveResponse, Status>> + Send + 'static>>;

type SessionStream =
    Pin<Box<dyn Stream<Item = Result<proto::SessionResponse, Status>> + Send + 'static>>;

impl LeaseApi {
    /// One call of a session, answered as its unary RPC would answer it:
    /// its answer, or the status the unary RPC would have failed with.
    async fn session_call(
        &self,
        call: Option<proto::session_request::Call>,
    ) -> Result<proto::session_response::Result, Status> {
        use proto::session_request::Call;
        use proto::session_response::Result as Answer;
        let started = std::time::Instant::now();
        let method = match &call {
            Some(Call::Acquire(_)) => Some(Method::Acquire),
            Some(Call::Renew(_)) => Some(Method::Renew),
            Some(Call::Release(_)) => Some(Method::Release),
            None => None,
        };
        let result = match call {
            Some(Call::Acquire(r)) => self
                .acquire(Request::new(r))
                .await
                .map(|r| Answer::Acquire(r.into_inner())),
            Some(Call::Renew(r)) => self
                .renew(Request::new(r))
                .await
                .map(|r| Answer::Renew(r.into_inner())),
            Some(Call::Release(r)) => self
                .release(Request::new(r))
                .await
                .map(|r| Answer::Release(r.into_inner())),
            None => Err(Status::invalid_argument(
                "call: a session request must carry acquire, renew or release",
            )),
        };
        if let (Some(metrics), Some(method)) = (&self.metrics, method) {
            let code = result
                .as_ref()
                .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
            metrics.record(method, Transport::Session, code, started.elapsed());
        }
        result
    }
}

#[tonic::async_trait]
impl LeaseService for LeaseApi {
    #[tracing::instrument(name = "Acquire", level = "debug", skip_all, fields(resource = %request.get_ref().resource, holder = %request.get_ref().holder, token = field::Empty))]
    async fn acquire(
        &self,
        request: Request<proto::AcquireRequest>,
    ) -> Result<Response<proto::AcquireResponse>, Status> {
        let r = request.into_inner();
        let bounds = self.coordinator.bounds();
        let req = AcquireRequest {
            resource: Resource::new(r.resource).map_err(invalid)?,
            holder: Holder::new(r.holder).map_err(invalid)?,
            ttl: bounds.ttl("ttl_ms", r.ttl_ms).map_err(invalid)?,
            request_id: RequestId::new_optional(r.request_id).map_err(invalid)?,
            wait: bounds.wait(r.wait_ms).map_err(invalid)?,
        };
        let outcome = match self.coordinator.acquire(req).await.map_err(status)? {
            AcquireOutcome::Lease(v) => {
                record_lease(&Span::current(), &v);
                proto::acquire_response::Outcome::Lease(self.signed_lease(&v))
            }
            AcquireOutcome::Held {
                holder,
                token,
                expires_in,
            } => {
                if let Some(m) = &self.metrics {
                    m.held();
                }
                proto::acquire_response::Outcome::Held(proto::Held {
                    holder: holder.to_string(),
                    expires_in_ms: ms(expires_in),
                    token: token.0,
                })
            }
        };
        Ok(Response::new(proto::AcquireResponse {
            outcome: Some(outcome),
        }))
    }

    #[tracing::instrument(name = "Renew", level = "debug", skip_all, fields(resource = field::Empty, holder = field::Empty, token = request.get_ref().token))]
    async fn renew(
        &self,
        request: Request<proto::RenewRequest>,
    ) -> Result<Response<proto::RenewResponse>, Status> {
        let r = request.into_inner();
        let id = LeaseId::parse(&r.lease_id).map_err(invalid)?;
        let ttl = match r.ttl_ms {
            0 => None,
            ms => Some(
                self.coordinator
                    .bounds()
                    .ttl("ttl_ms", ms)
                    .map_err(invalid)?,
            ),
        };
        let v = self
            .coordinator
            .renew(id, FencingToken(r.token), ttl)
            .await
            .map_err(status)?;
        let span = Span::current();
        span.record("resource", v.record.resource.as_str());
        span.record("holder", v.record.holder.as_str());
        Ok(Response::new(proto::RenewResponse {
            lease: Some(self.signed_lease(&v)),
        }))
    }

    type KeepAliveStream = KeepAliveStream;

    #[tracing::instrument(name = "KeepAlive", skip_all)]
    async fn keep_alive(
        &self,
        request: Request<Streaming<proto::KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let coordinator = self.coordinator.clone();
        let shutdown = coordinator.shutdown_token().cancelled_owned();
        // One response per request, produced only when the client reads:
        // the stream applies its own backpressure.
        let out = request
            .into_inner()
            .take_until(shutdown)
            .then(move |msg| {
                let coordinator = coordinator.clone();
                async move {
                let msg = msg?;
                let id = LeaseId::parse(&msg.lease_id).map_err(invalid)?;
                let token = FencingToken(msg.token);
                let (alive, expires_in_ms) = match coordinator.keepalive(id, token).await {
                    Ok(v) => (true, ms(v.expires_in)),
                    // In a cluster, a node that cannot confirm it leads ends
                    // the stream: the client moves to the leader.
                    Err(e @ (CoordinatorError::NotLeader { .. } | CoordinatorError::Storage(_))) => {
                        return Err(status(e));
                    }
                    Err(e) => {
                        tracing::debug!(lease_id = ?id, token = token.0, error = %e, "keepalive for a lease that is gone");
                        (false, 0)
                    }
                };
                Ok(proto::KeepAliveResponse {
                    lease_id: msg.lease_id,
                    token: msg.token,
                    expires_in_ms,
                    alive,
                })
                }
            });
        Ok(Response::new(Box::pin(out)))
    }

    type SessionStream = SessionStream;

    #[tracing::instrument(name = "Session", skip_all)]
    async fn session(
        &self,
        request: Request<Streaming<proto::SessionRequest>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let api = self.clone();
        let shutdown = self.coordinator.shutdown_token().cancelled_owned();
        // `then` runs one call at a time, and reads the next request only
        // once the client has taken the previous response.
        let out = request.into_inner().take_until(shutdown).then(move |msg| {
            let api = api.clone();
            async move {
                let msg = msg?;
                let result = match api.session_call(msg.call).await {
                    // A node that cannot serve (no longer the leader,
                    // stopping, storage failed) ends the stream, as
                    // KeepAlive does: the client opens a new one, which
                    // reaches the leader.
                    Err(s) if s.code() == tonic::Code::Unavailable => return Err(s),
                    // Any other failure answers this call; the stream goes on.
                    Err(s) => proto::session_response::Result::Error(proto::CallError {
                        code: s.code() as i32,
                        message: s.message().to_owned(),
                    }),
                    Ok(answer) => answer,
                };
                Ok(proto::SessionResponse {
                    result: Some(result),
                })
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    #[tracing::instrument(name = "Release", level = "debug", skip_all, fields(token = request.get_ref().token))]
    async fn release(
        &self,
        request: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        let r = request.into_inner();
        let id = LeaseId::parse(&r.lease_id).map_err(invalid)?;
        let released = self
            .coordinator
            .release(id, FencingToken(r.token))
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ReleaseResponse { released }))
    }

    #[tracing::instrument(name = "PublicKeys", level = "debug", skip_all)]
    async fn public_keys(
        &self,
        _request: Request<proto::PublicKeysRequest>,
    ) -> Result<Response<proto::PublicKeysResponse>, Status> {
        let keys = self.keys.as_ref().map_or_else(Vec::new, Keys::list);
        Ok(Response::new(proto::PublicKeysResponse {
            keys: keys.iter().map(key_to_proto).collect(),
        }))
    }

    #[tracing::instrument(name = "Describe", level = "debug", skip_all, fields(resource = %request.get_ref().resource, holder = field::Empty, token = field::Empty))]
    async fn describe(
        &self,
        request: Request<proto::DescribeRequest>,
    ) -> Result<Response<proto::DescribeResponse>, Status> {
        let resource = Resource::new(request.into_inner().resource).map_err(invalid)?;
        let view = self.coordinator.describe(&resource).await.map_err(status)?;
        let reply = match view {
            None => proto::DescribeResponse::default(),
            Some(v) => {
                let span = Span::current();
                span.record("holder", v.record.holder.as_str());
                record_lease(&span, &v);
                proto::DescribeResponse {
                    held: true,
                    holder: v.record.holder.to_string(),
                    token: v.record.token.0,
                    ttl_ms: ms(v.record.ttl),
                    expires_in_ms: ms(v.expires_in),
                    waiters: v.waiters,
                }
            }
        };
        Ok(Response::new(reply))
    }
}
