//! The worker's library: acquire, keep alive and release leases, safely.
//!
//! Lock users get hurt in three places: retried grants (a lost reply, a
//! retry, two leases), lost keepalives (the lease quietly ends while the
//! worker keeps writing), and pauses (a GC or a stalled VM outlives the
//! lease). This module handles all three by default:
//!
//! - **Safe retries.** Each logical acquire draws one random `request_id`
//!   and sends it on every retry, so the coordinator returns the same lease
//!   instead of granting a second one. Transport errors and `UNAVAILABLE`
//!   are retried with exponential backoff and full jitter until a deadline;
//!   refusals such as `INVALID_ARGUMENT` are not.
//! - **Keepalive.** A [`Lease`] renews itself in the background over a
//!   `KeepAlive` stream (every TTL/3 by default), re-opening the stream after
//!   a transport error and renewing the same lease.
//! - **Conservative validity.** Validity is measured from the moment the
//!   confirmed request was *sent*, not when its reply arrived, using the time
//!   left the server reported, minus a safety margin for clock-rate drift
//!   (10 % of the TTL by default). The server's clock starts later than
//!   ours, so the worker always learns of the loss — [`Lease::lost`]
//!   resolves — before the server could consider the lease expired. A grant
//!   that waited in line for most of its TTL would thus arrive already
//!   invalid; it is confirmed with one Renew before the acquire returns, and
//!   its validity counts from that Renew.
//!
//! Even so, a process can be paused between checking [`Lease::is_valid`] and
//! writing; that is what fencing tokens are for. Send [`Lease::token`] with
//! every write and let the storage reject stale ones (see
//! [`crate::guard`] and [`crate::fencing`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use leasehold::client::Client;
//!
//! let client = Client::connect("http://127.0.0.1:7420")?;
//! let lease = client
//!     .acquire("reports/daily")
//!     .ttl(Duration::from_secs(10))
//!     .wait(Duration::from_secs(30))
//!     .await?;
//! println!("holding {} with token {}", lease.resource(), lease.token());
//! // ... write to storage, sending lease.token() with every write ...
//! lease.release().await?;
//!
//! // Or let the library hold the lease around a future, and cancel the
//! // future if the lease is lost:
//! let rows = client
//!     .with_lease("reports/daily", |lease| async move {
//!         // fenced work with lease.token()
//!         42
//!     })
//!     .await?;
//! # let _ = rows; Ok(()) }
//! ```

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::fencing::{Fence, FenceError};
use crate::proto::{self, acquire_response::Outcome, lease_service_client::LeaseServiceClient};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a valid URL.
    #[error("{0:?} is not a valid coordinator URL (expected e.g. http://127.0.0.1:7420)")]
    BadEndpoint(String),
    /// The coordinator could not be reached (or stayed unavailable) until
    /// the retry deadline.
    #[error("the coordinator did not answer before the retry deadline: {} ({:?}); check that it is running at that URL, and its log", .0.message(), .0.code())]
    Unreachable(Status),
    /// The coordinator refused the call.
    #[error("the coordinator refused the call: {} ({:?})", .0.message(), .0.code())]
    Refused(Status),
}

/// Why an acquire did not give a lease.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// Someone else holds the resource (after the wait, if any).
    #[error("{resource} is held by {holder} (token {token}) for another {}; wait longer or try later", humantime::format_duration(*.expires_in))]
    Held {
        /// The resource.
        resource: String,
        /// Who holds it.
        holder: String,
        /// Their fencing token.
        token: u64,
        /// Time left on their lease.
        expires_in: Duration,
    },
    /// The call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Why [`Client::with_lease`] did not return the work's result.
#[derive(Debug, thiserror::Error)]
pub enum WithLeaseError {
    /// The lease could not be acquired.
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    /// The lease was lost while the work ran; the work was cancelled.
    #[error("the lease on {resource} (token {token}) was lost ({reason}); the work was cancelled and may be partly done — fenced writes after the loss were rejected by storage that checks tokens")]
    Lost {
        /// The resource.
        resource: String,
        /// The lost lease's token.
        token: u64,
        /// Why it was lost.
        reason: LostReason,
    },
}

/// Why a lease was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LostReason {
    /// The coordinator says the lease is gone (expired there, or revoked).
    #[error("the coordinator no longer knows the lease: it expired or was revoked")]
    Gone,
    /// No renewal was confirmed in time; the lease may be expiring on the
    /// coordinator now, so the holder must stop.
    #[error("no renewal was confirmed before the lease's conservative validity ran out")]
    TimedOut,
    /// The holder released it.
    #[error("it was released")]
    Released,
}

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
    rpc: LeaseServiceClient<Channel>,
    config: ClientConfig,
}

impl Client {
    /// A client for `endpoint` (e.g. `http://127.0.0.1:7420`). Connects on
    /// first use and reconnects by itself after the connection drops.
    pub fn connect(endpoint: impl Into<String>) -> Result<Self, ClientError> {
        let url = endpoint.into();
        let endpoint =
            Endpoint::from_shared(url.clone()).map_err(|_| ClientError::BadEndpoint(url))?;
        Ok(Self::from_channel(endpoint.connect_lazy()))
    }

    /// A client over an existing channel (for TLS or custom settings).
    pub fn from_channel(channel: Channel) -> Self {
        Client {
            rpc: LeaseServiceClient::new(channel),
            config: ClientConfig::default(),
        }
    }

    /// Replaces the settings.
    pub fn with_config(mut self, config: ClientConfig) -> Self {
        self.config = config;
        self
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
        self.retrying(|mut rpc| {
            let req = req.clone();
            async move { rpc.describe(req).await }
        })
        .await
    }

    /// Calls `f` until it succeeds, fails for good, or the retry deadline passes.
    async fn retrying<T, Fut>(
        &self,
        f: impl Fn(LeaseServiceClient<Channel>) -> Fut,
    ) -> Result<T, ClientError>
    where
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.config.retry_for;
        let mut backoff = Backoff::new(&self.config);
        loop {
            let attempt =
                tokio::time::timeout(self.config.attempt_timeout, f(self.rpc.clone())).await;
            let status = match attempt {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) if !retryable(&status) => return Err(ClientError::Refused(status)),
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded("the attempt timed out"),
            };
            if !backoff.sleep_before(deadline).await {
                return Err(ClientError::Unreachable(status));
            }
        }
    }
}

/// Whether a failed call may be retried: the coordinator did not refuse it,
/// the transport failed (and idempotency keys make retrying safe).
pub(crate) fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    )
}

/// Exponential backoff with full jitter.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(config: &ClientConfig) -> Self {
        Backoff {
            next: config.min_backoff,
            max: config.max_backoff,
        }
    }

    /// Sleeps a jittered backoff; false (without sleeping) if that would pass `deadline`.
    pub(crate) async fn sleep_before(&mut self, deadline: Instant) -> bool {
        let jittered = self.next.mul_f64(rand::rng().random_range(0.0..=1.0));
        self.next = (self.next * 2).min(self.max);
        if Instant::now() + jittered >= deadline {
            return false;
        }
        tokio::time::sleep(jittered).await;
        true
    }
}

/// `holder` default: `hostname:pid`.
pub(crate) fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}:{}", std::process::id())
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
}

impl AcquireBuilder {
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
        let client = self.client;
        let config = &client.config;
        let mut id = [0u8; 16];
        rand::rng().fill(&mut id);
        let holder = self.holder.unwrap_or_else(default_holder);
        let ttl_ms = self.ttl.as_millis() as u64;
        let wait_until = Instant::now() + self.wait;
        let deadline = wait_until + config.retry_for;
        let mut backoff = Backoff::new(config);
        loop {
            let wait = wait_until.saturating_duration_since(Instant::now());
            let req = proto::AcquireRequest {
                resource: self.resource.clone(),
                holder: holder.clone(),
                ttl_ms,
                // The same key on every retry: the coordinator returns the
                // lease it granted, never a second one.
                request_id: hex::encode(id),
                wait_ms: wait.as_millis() as u64,
            };
            let sent_at = Instant::now();
            let mut rpc = client.rpc.clone();
            let attempt =
                tokio::time::timeout(wait + config.attempt_timeout, rpc.acquire(req)).await;
            let status = match attempt {
                Ok(Ok(resp)) => match resp.into_inner().outcome {
                    Some(Outcome::Lease(l)) => {
                        let (l, sent_at) =
                            confirm_late_grant(&client, l, sent_at, self.margin).await;
                        return Ok(Lease::start(
                            client,
                            l,
                            sent_at,
                            self.margin,
                            self.renew_every,
                        ));
                    }
                    Some(Outcome::Held(h)) => {
                        return Err(AcquireError::Held {
                            resource: self.resource,
                            holder: h.holder,
                            token: h.token,
                            expires_in: Duration::from_millis(h.expires_in_ms),
                        })
                    }
                    None => Status::internal("the coordinator sent an empty acquire response"),
                },
                Ok(Err(status)) if !retryable(&status) => {
                    return Err(ClientError::Refused(status).into())
                }
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded("the acquire attempt timed out"),
            };
            tracing::debug!(resource = %self.resource, code = ?status.code(), "acquire attempt failed; retrying with the same request_id");
            if !backoff.sleep_before(deadline).await {
                return Err(ClientError::Unreachable(status).into());
            }
        }
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

/// What the keepalive task and the handles share.
struct Shared {
    resource: String,
    lease_id: String,
    token: u64,
    holder: String,
    ttl: Duration,
    /// Until when the holder may act: send time of the last confirmed
    /// request + time left the server reported − the safety margin.
    valid_until: Mutex<Instant>,
    lost: watch::Sender<Option<LostReason>>,
    stop: CancellationToken,
}

impl Shared {
    fn confirm(&self, sent_at: Instant, expires_in: Duration, margin: Duration) {
        let until = sent_at + expires_in.saturating_sub(margin);
        let mut valid = self.valid_until.lock();
        if until > *valid {
            *valid = until;
        }
    }

    fn lose(&self, reason: LostReason) {
        self.lost.send_if_modified(|state| {
            if state.is_none() {
                *state = Some(reason);
                true
            } else {
                false
            }
        });
        self.stop.cancel();
    }

    fn valid_for(&self) -> Duration {
        if self.lost.borrow().is_some() {
            return Duration::ZERO;
        }
        self.valid_until
            .lock()
            .saturating_duration_since(Instant::now())
    }
}

/// A held lease. Renews itself in the background until released, lost or
/// dropped; dropping it releases it in the background.
pub struct Lease {
    shared: Arc<Shared>,
    client: Client,
    released: bool,
}

/// A cheap, cloneable view of a [`Lease`] (for the work inside
/// [`Client::with_lease`]): token, validity and loss, but no release.
#[derive(Clone)]
pub struct LeaseHandle {
    shared: Arc<Shared>,
}

impl LeaseHandle {
    /// The fencing token: send it with every write.
    pub fn token(&self) -> u64 {
        self.shared.token
    }

    /// The leased resource.
    pub fn resource(&self) -> &str {
        &self.shared.resource
    }

    /// Whether the lease is still conservatively valid.
    pub fn is_valid(&self) -> bool {
        !self.shared.valid_for().is_zero()
    }

    /// How much longer the lease is conservatively valid (zero once lost).
    pub fn valid_for(&self) -> Duration {
        self.shared.valid_for()
    }

    /// The (resource, token) pair storage checks; see [`crate::fencing`].
    pub fn fence(&self) -> Result<Fence, FenceError> {
        Fence::new(self.shared.resource.clone(), self.shared.token)
    }

    /// Attaches this lease's fence to an outgoing gRPC request.
    pub fn attach<T>(&self, req: &mut tonic::Request<T>) -> Result<(), FenceError> {
        crate::fencing::attach(req, &self.shared.resource, self.shared.token)
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&self) -> LostReason {
        let mut rx = self.shared.lost.subscribe();
        // The sender lives in `Shared`, which we hold, so this cannot fail.
        let reason = rx.wait_for(Option::is_some).await.ok().and_then(|r| *r);
        reason.unwrap_or(LostReason::Gone)
    }
}

impl Lease {
    fn start(
        client: Client,
        l: proto::Lease,
        sent_at: Instant,
        margin: f64,
        renew_every: Option<Duration>,
    ) -> Lease {
        let ttl = Duration::from_millis(l.ttl_ms);
        let margin = ttl.mul_f64(margin);
        let shared = Arc::new(Shared {
            resource: l.resource,
            lease_id: l.lease_id,
            token: l.token,
            holder: l.holder,
            ttl,
            valid_until: Mutex::new(sent_at),
            lost: watch::channel(None).0,
            stop: CancellationToken::new(),
        });
        shared.confirm(sent_at, Duration::from_millis(l.expires_in_ms), margin);
        let every = renew_every
            .unwrap_or(ttl / 3)
            .max(Duration::from_millis(10));
        tokio::spawn(keep_alive(client.clone(), shared.clone(), every, margin));
        Lease {
            shared,
            client,
            released: false,
        }
    }

    /// The fencing token: send it with every write.
    pub fn token(&self) -> u64 {
        self.shared.token
    }

    /// The leased resource.
    pub fn resource(&self) -> &str {
        &self.shared.resource
    }

    /// The lease's secret id (the proof of holding it; keep it private).
    pub fn lease_id(&self) -> &str {
        &self.shared.lease_id
    }

    /// The holder name the lease was granted to.
    pub fn holder(&self) -> &str {
        &self.shared.holder
    }

    /// The lease's TTL.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl
    }

    /// Whether the lease is still conservatively valid.
    pub fn is_valid(&self) -> bool {
        self.handle().is_valid()
    }

    /// How much longer the lease is conservatively valid (zero once lost).
    pub fn valid_for(&self) -> Duration {
        self.shared.valid_for()
    }

    /// Resolves when the lease is lost: the coordinator said it is gone, or
    /// no renewal was confirmed before its conservative validity ran out.
    pub async fn lost(&self) -> LostReason {
        self.handle().lost().await
    }

    /// The (resource, token) pair storage checks; see [`crate::fencing`].
    pub fn fence(&self) -> Result<Fence, FenceError> {
        self.handle().fence()
    }

    /// Attaches this lease's fence to an outgoing gRPC request, so a
    /// fenced service can reject it if a newer lease has written since.
    pub fn attach<T>(&self, req: &mut tonic::Request<T>) -> Result<(), FenceError> {
        self.handle().attach(req)
    }

    /// A cloneable view for tasks that need the token or the loss signal.
    pub fn handle(&self) -> LeaseHandle {
        LeaseHandle {
            shared: self.shared.clone(),
        }
    }

    /// Stops renewing and releases the lease. `Ok(false)`: it had already ended.
    pub async fn release(mut self) -> Result<bool, ClientError> {
        self.released = true;
        self.shared.lose(LostReason::Released);
        release_rpc(&self.client, &self.shared).await
    }

    /// Stops renewing without releasing: the lease lives until its TTL runs
    /// out (for handing the lease id to another process).
    pub fn detach(mut self) {
        self.released = true;
        self.shared.stop.cancel();
    }
}

async fn release_rpc(client: &Client, shared: &Shared) -> Result<bool, ClientError> {
    let req = proto::ReleaseRequest {
        lease_id: shared.lease_id.clone(),
        token: shared.token,
    };
    let resp = client
        .retrying(|mut rpc| {
            let req = req.clone();
            async move { rpc.release(req).await }
        })
        .await?;
    Ok(resp.released)
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.shared.lose(LostReason::Released);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (client, shared) = (self.client.clone(), self.shared.clone());
            rt.spawn(async move {
                if let Err(e) = release_rpc(&client, &shared).await {
                    tracing::warn!(resource = %shared.resource, error = %e, "background release failed; the lease will expire");
                }
            });
        }
    }
}

/// Renews `shared` every `every` over a KeepAlive stream, re-opening the
/// stream after errors, until stopped or lost.
#[tracing::instrument(name = "keepalive", skip_all, fields(resource = %shared.resource, token = shared.token))]
async fn keep_alive(client: Client, shared: Arc<Shared>, every: Duration, margin: Duration) {
    let mut backoff = Backoff::new(&client.config);
    loop {
        // The watchdog: whatever happens to the stream, the lease is lost
        // once its validity runs out without a confirmed renewal.
        let (tx, rx) = mpsc::channel(1);
        let mut rpc = client.rpc.clone();
        let opened = tokio::select! {
            r = rpc.keep_alive(ReceiverStream::new(rx)) => Some(r),
            _ = sleep_until_invalid(&shared) => None,
            _ = shared.stop.cancelled() => return,
        };
        let mut inbound = match opened {
            None => return shared.lose(LostReason::TimedOut),
            Some(Ok(resp)) => resp.into_inner(),
            Some(Err(status)) => {
                tracing::debug!(code = ?status.code(), "could not open the keepalive stream");
                let until = *shared.valid_until.lock();
                if !backoff.sleep_before(until).await {
                    wait_for_end(&shared).await;
                    return shared.lose(LostReason::TimedOut);
                }
                continue;
            }
        };
        let mut next = Instant::now();
        let mut pending: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next), if pending.is_none() => {
                    let req = proto::KeepAliveRequest { lease_id: shared.lease_id.clone(), token: shared.token };
                    pending = Some(Instant::now());
                    if tx.send(req).await.is_err() {
                        break;
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(resp)) => {
                        let Some(sent_at) = pending.take() else { continue };
                        if !resp.alive {
                            return shared.lose(LostReason::Gone);
                        }
                        shared.confirm(sent_at, Duration::from_millis(resp.expires_in_ms), margin);
                        backoff = Backoff::new(&client.config);
                        next = sent_at + every;
                    }
                    Ok(None) | Err(_) => break, // re-open the stream
                },
                _ = sleep_until_invalid(&shared) => return shared.lose(LostReason::TimedOut),
                _ = shared.stop.cancelled() => return,
            }
        }
        let until = *shared.valid_until.lock();
        if !backoff.sleep_before(until).await {
            wait_for_end(&shared).await;
            return shared.lose(LostReason::TimedOut);
        }
    }
}

async fn sleep_until_invalid(shared: &Shared) {
    loop {
        let until = *shared.valid_until.lock();
        tokio::time::sleep_until(until).await;
        if *shared.valid_until.lock() <= Instant::now() {
            return;
        }
    }
}

async fn wait_for_end(shared: &Shared) {
    tokio::select! {
        _ = sleep_until_invalid(shared) => {}
        _ = shared.stop.cancelled() => {}
    }
}
