//! A held lease and its conservative validity; [`crate::keepalive`] renews it.

use std::sync::Arc;
use std::time::Duration;

use leasehold_fence::{Fence, FenceError};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{proto, Client, ClientError, LostReason};

/// What the keepalive task and the handles share.
pub(crate) struct LeaseState {
    pub(crate) resource: String,
    pub(crate) lease_id: String,
    pub(crate) token: u64,
    pub(crate) holder: String,
    pub(crate) ttl: Duration,
    /// Until when the holder may act: send time of the last confirmed
    /// request + time left the server reported − the safety margin.
    pub(crate) valid_until: Mutex<Instant>,
    pub(crate) lost: watch::Sender<Option<LostReason>>,
    pub(crate) stop: CancellationToken,
}

impl LeaseState {
    pub(crate) fn confirm(&self, sent_at: Instant, expires_in: Duration, margin: Duration) {
        let until = sent_at + expires_in.saturating_sub(margin);
        let mut valid = self.valid_until.lock();
        if until > *valid {
            *valid = until;
        }
    }

    pub(crate) fn lose(&self, reason: LostReason) {
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
    shared: Arc<LeaseState>,
    client: Client,
    released: bool,
}

/// A cheap, cloneable view of a [`Lease`] (for the work inside
/// [`Client::with_lease`]): token, validity and loss, but no release.
#[derive(Clone)]
pub struct LeaseHandle {
    shared: Arc<LeaseState>,
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

    /// The (resource, token) pair storage checks; see [`leasehold_fence`].
    pub fn fence(&self) -> Result<Fence, FenceError> {
        Fence::new(self.shared.resource.clone(), self.shared.token)
    }

    /// Attaches this lease's fence to an outgoing gRPC request.
    pub fn attach<T>(&self, req: &mut tonic::Request<T>) -> Result<(), FenceError> {
        leasehold_fence::attach(req, &self.shared.resource, self.shared.token)
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&self) -> LostReason {
        let mut rx = self.shared.lost.subscribe();
        // The sender lives in `LeaseState`, which we hold, so this cannot fail.
        let reason = rx.wait_for(Option::is_some).await.ok().and_then(|r| *r);
        reason.unwrap_or(LostReason::Gone)
    }
}

impl Lease {
    pub(crate) fn start(
        client: Client,
        l: proto::Lease,
        sent_at: Instant,
        margin: f64,
        renew_every: Option<Duration>,
    ) -> Lease {
        let ttl = Duration::from_millis(l.ttl_ms);
        let margin = ttl.mul_f64(margin);
        let shared = Arc::new(LeaseState {
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
        client.keepalives().add(shared.clone(), every, margin);
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

    /// The (resource, token) pair storage checks; see [`leasehold_fence`].
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

async fn release_rpc(client: &Client, shared: &LeaseState) -> Result<bool, ClientError> {
    let req = proto::ReleaseRequest {
        lease_id: shared.lease_id.clone(),
        token: shared.token,
    };
    let resp = crate::retry::retry(&client.config, Duration::ZERO, &mut (), |_, _| {
        let (mut rpc, req) = (client.rpc.clone(), req.clone());
        Box::pin(async move { rpc.release(req).await.map(|r| r.into_inner()) })
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

impl LeaseState {
    /// Resolves once the validity has run out without a later confirmation.
    pub(crate) async fn sleep_until_invalid(&self) {
        loop {
            let until = *self.valid_until.lock();
            tokio::time::sleep_until(until).await;
            if *self.valid_until.lock() <= Instant::now() {
                return;
            }
        }
    }
}
