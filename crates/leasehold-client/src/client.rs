//! The connection to a coordinator and the acquire call.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use leasehold_fence::trace::TraceParent;
use rand::Rng;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;
use tracing::Instrument;

use crate::keepalive::KeepAlives;
use crate::lease::Lease;
use crate::proto::{self, acquire_response::Outcome, lease_service_client::LeaseServiceClient};
use crate::retry::{default_holder, retry};
use crate::{AcquireError, ClientError, LeaseHandle, WithLeaseError};

/// Client settings; the defaults suit most workers.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long an operation keeps retrying transport errors.
    pub retry_for: Duration,
    /// The first backoff; it doubles up to `max_backoff`, with full jitter.
    pub min_backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
    /// The longest one attempt may take beyond its wait.
    pub attempt_timeout: Duration,
    /// The fraction of the TTL kept as a margin against clock-rate drift.
    pub safety_margin: f64,
    /// The default TTL.
    pub ttl: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            retry_for: Duration::from_secs(10),
            min_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(3),
            safety_margin: 0.1,
            ttl: Duration::from_secs(30),
        }
    }
}

/// A connection to a coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    pub(crate) rpc: LeaseServiceClient<Channel>,
    pub(crate) config: ClientConfig,
    /// The one KeepAlive stream's task, started with the first lease and
    /// shared by every clone.
    keepalives: Arc<OnceLock<KeepAlives>>,
}

impl Client {
    /// A client for `endpoint` (e.g. `http://127.0.0.1:7420`). Connects on
    /// first use and reconnects by itself after the connection drops.
    ///
    /// For a cluster, give its nodes comma-separated
    /// (`http://a:7420,http://b:7420,http://c:7420`): calls are spread over
    /// the nodes that answer (each forwards to the leader), and a call that
    /// fails because its node is down is retried like any UNAVAILABLE.
    pub fn connect(endpoint: impl Into<String>) -> Result<Self, ClientError> {
        let list = endpoint.into();
        let mut endpoints = Vec::new();
        for url in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            endpoints.push(
                Endpoint::from_shared(url.to_owned())
                    .map_err(|_| ClientError::BadEndpoint(url.to_owned()))?,
            );
        }
        let channel = match endpoints.len() {
            0 => return Err(ClientError::BadEndpoint(list)),
            1 => endpoints.remove(0).connect_lazy(),
            _ => Channel::balance_list(endpoints.into_iter()),
        };
        Ok(Self::from_channel(channel))
    }

    /// A client over an existing channel (for TLS or custom settings).
    pub fn from_channel(channel: Channel) -> Self {
        Client {
            rpc: LeaseServiceClient::new(channel),
            config: ClientConfig::default(),
            keepalives: Arc::default(),
        }
    }

    /// Replaces the settings.
    pub fn with_config(mut self, config: ClientConfig) -> Self {
        self.config = config;
        // The keepalive task runs with the settings it started with.
        self.keepalives = Arc::default();
        self
    }

    /// KeepAlive streams this client (and its clones) opened so far: one
    /// for all of its leases, plus one per reconnect. For diagnostics.
    pub fn keepalive_streams_opened(&self) -> u64 {
        self.keepalives.get().map_or(0, KeepAlives::streams_opened)
    }

    pub(crate) fn keepalives(&self) -> &KeepAlives {
        self.keepalives
            .get_or_init(|| KeepAlives::start(self.rpc.clone(), self.config.clone()))
    }

    /// The settings.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// The generated gRPC client, for calls this library does not wrap.
    pub fn rpc(&self) -> LeaseServiceClient<Channel> {
        self.rpc.clone()
    }

    /// Starts an acquire of `resource`; set options on the builder, then `.await` it.
    pub fn acquire(&self, resource: impl Into<String>) -> AcquireBuilder {
        AcquireBuilder {
            client: self.clone(),
            resource: resource.into(),
            ttl: self.config.ttl,
            wait: Duration::ZERO,
            holder: None,
            margin: self.config.safety_margin,
            renew_every: None,
            trace: None,
        }
    }

    /// Runs `work` under a lease on `resource` (default options), cancelling
    /// it if the lease is lost. Releases the lease afterwards.
    pub async fn with_lease<F, Fut, T>(
        &self,
        resource: impl Into<String>,
        work: F,
    ) -> Result<T, WithLeaseError>
    where
        F: FnOnce(LeaseHandle) -> Fut,
        Fut: Future<Output = T>,
    {
        self.acquire(resource).run(work).await
    }

    /// Whether `resource` is held, by whom and with which token.
    pub async fn describe(
        &self,
        resource: impl Into<String>,
    ) -> Result<proto::DescribeResponse, ClientError> {
        let req = proto::DescribeRequest {
            resource: resource.into(),
        };
        retry(&self.config, Duration::ZERO, &mut (), |_, _| {
            let (mut rpc, req) = (self.rpc.clone(), req.clone());
            Box::pin(async move { rpc.describe(req).await.map(|r| r.into_inner()) })
        })
        .await
    }
}

/// Options of one acquire. `.await` it to get a [`Lease`].
#[must_use = "an acquire does nothing until awaited"]
pub struct AcquireBuilder {
    client: Client,
    resource: String,
    ttl: Duration,
    wait: Duration,
    holder: Option<String>,
    margin: f64,
    renew_every: Option<Duration>,
    trace: Option<TraceParent>,
}

impl AcquireBuilder {
    /// Joins the caller's trace: the Acquire is sent with this W3C trace
    /// context (its trace id, and a span id of this acquire's own). By
    /// default each acquire starts a trace of its own. Either way the
    /// `leasehold.acquire` span records the `trace_id`, and the coordinator
    /// records the same one in its span for the call.
    pub fn trace_parent(mut self, parent: TraceParent) -> Self {
        self.trace = Some(parent);
        self
    }

    /// The lease's TTL (default 30 s; the server enforces its bounds).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long to wait in line if the resource is held (default: don't).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Who is asking (default `hostname:pid`).
    pub fn holder(mut self, holder: impl Into<String>) -> Self {
        self.holder = Some(holder.into());
        self
    }

    /// The safety margin as a fraction of the TTL (default 0.1).
    pub fn safety_margin(mut self, fraction: f64) -> Self {
        self.margin = fraction.clamp(0.0, 0.9);
        self
    }

    /// How often to renew (default TTL/3).
    pub fn renew_every(mut self, every: Duration) -> Self {
        self.renew_every = Some(every);
        self
    }

    /// Acquires, runs `work` with the lease, and releases; cancels `work`
    /// and returns [`WithLeaseError::Lost`] if the lease is lost meanwhile.
    pub async fn run<F, Fut, T>(self, work: F) -> Result<T, WithLeaseError>
    where
        F: FnOnce(LeaseHandle) -> Fut,
        Fut: Future<Output = T>,
    {
        let lease = self.send().await?;
        let handle = lease.handle();
        let lost = handle.clone();
        tokio::select! {
            out = work(handle) => {
                // A release failure is not the work's failure: the lease
                // then simply expires on the coordinator.
                let _ = lease.release().await;
                Ok(out)
            }
            reason = lost.lost() => Err(WithLeaseError::Lost {
                resource: lease.resource().to_owned(),
                token: lease.token(),
                reason,
            }),
        }
    }

    async fn send(self) -> Result<Lease, AcquireError> {
        let mut span_id = [0u8; 8];
        rand::rng().fill(&mut span_id[..]);
        span_id[0] |= 1; // never all zeros
        let trace = match self.trace {
            Some(parent) => parent.child(span_id),
            None => new_trace(span_id),
        };
        let span = tracing::info_span!(
            "leasehold.acquire",
            resource = %self.resource,
            trace_id = %trace.trace_id_hex(),
            span_id = %trace.parent_id_hex(),
        );
        self.send_traced(trace).instrument(span).await
    }

    async fn send_traced(self, trace: TraceParent) -> Result<Lease, AcquireError> {
        let client = self.client;
        let mut id = [0u8; 16];
        rand::rng().fill(&mut id);
        // The same key on every retry: the coordinator returns the lease it
        // granted, never a second one.
        let request_id = hex::encode(id);
        let holder = self.holder.unwrap_or_else(default_holder);
        let ttl_ms = self.ttl.as_millis() as u64;
        let (outcome, sent_at) = retry(&client.config, self.wait, &mut (), |_, wait| {
            let req = proto::AcquireRequest {
                resource: self.resource.clone(),
                holder: holder.clone(),
                ttl_ms,
                request_id: request_id.clone(),
                wait_ms: wait.as_millis() as u64,
            };
            let mut rpc = client.rpc.clone();
            let mut req = tonic::Request::new(req);
            trace.attach(req.metadata_mut());
            Box::pin(async move {
                let sent_at = Instant::now();
                let outcome = rpc.acquire(req).await?.into_inner().outcome;
                let outcome = outcome.ok_or_else(|| {
                    Status::internal("the coordinator sent an empty acquire response")
                })?;
                Ok((outcome, sent_at))
            })
        })
        .await?;
        match outcome {
            Outcome::Lease(l) => {
                let (l, sent_at) = confirm_late_grant(&client, l, sent_at, self.margin).await;
                Ok(Lease::start(
                    client,
                    l,
                    sent_at,
                    self.margin,
                    self.renew_every,
                ))
            }
            Outcome::Held(h) => Err(AcquireError::Held {
                resource: self.resource,
                holder: h.holder,
                token: h.token,
                expires_in: Duration::from_millis(h.expires_in_ms),
            }),
        }
    }
}

/// A new trace, with random ids, sampled; `span_id` is the acquire's span.
fn new_trace(span_id: [u8; 8]) -> TraceParent {
    let mut trace_id = [0u8; 16];
    rand::rng().fill(&mut trace_id);
    trace_id[0] |= 1; // never all zeros
    TraceParent {
        trace_id,
        parent_id: span_id,
        flags: 1,
    }
}

/// Validity counts from when the Acquire was *sent*, so a grant that waited
/// in line for most of its TTL (or longer) arrives with little or no
/// validity left, and would be reported lost at once. Such a grant is
/// confirmed with one Renew: a success proves the lease is still the live
/// one (an expired lease id answers NOT_FOUND), and validity then counts from
/// the Renew's own send time. On any failure the grant is kept as it came;
/// the keepalive then reports it lost, as before.
async fn confirm_late_grant(
    client: &Client,
    granted: proto::Lease,
    sent_at: Instant,
    margin: f64,
) -> (proto::Lease, Instant) {
    let ttl = Duration::from_millis(granted.ttl_ms);
    let left = Duration::from_millis(granted.expires_in_ms).saturating_sub(ttl.mul_f64(margin));
    if (sent_at + left).saturating_duration_since(Instant::now()) >= ttl / 2 {
        return (granted, sent_at);
    }
    let req = proto::RenewRequest {
        lease_id: granted.lease_id.clone(),
        token: granted.token,
        ttl_ms: 0,
    };
    let renewed_at = Instant::now();
    let mut rpc = client.rpc.clone();
    // An answer later than the TTL could only be NOT_FOUND: do not wait longer.
    let limit = client.config.attempt_timeout.min(ttl);
    match tokio::time::timeout(limit, rpc.renew(req)).await {
        Ok(Ok(resp)) => match resp.into_inner().lease {
            Some(l) if l.token == granted.token => {
                tracing::debug!(resource = %granted.resource, token = granted.token, "late grant confirmed by a renewal");
                (
                    proto::Lease {
                        lease_id: granted.lease_id,
                        ..l
                    },
                    renewed_at,
                )
            }
            _ => (granted, sent_at),
        },
        Ok(Err(status)) => {
            tracing::debug!(resource = %granted.resource, code = ?status.code(), "could not confirm a late grant");
            (granted, sent_at)
        }
        Err(_) => (granted, sent_at),
    }
}

impl IntoFuture for AcquireBuilder {
    type Output = Result<Lease, AcquireError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}
