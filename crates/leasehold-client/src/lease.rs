//! A held lease: its background keepalive and its conservative validity.

use std::sync::Arc;
use std::time::Duration;

use leasehold_fence::{Fence, FenceError};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::retry::Backoff;
use crate::{proto, Client, ClientError, LostReason};

/// What the keepalive task and the handles share.
struct Shared {
    resource: String,
    lease_id: String,
    token: u64,
    /// The coordinator's signed fence (empty if it does not sign).
    signed_fence: Vec<u8>,
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

    /// The (resource, token) pair storage checks; see [`leasehold_fence`].
    pub fn fence(&self) -> Result<Fence, FenceError> {
        Fence::new(self.shared.resource.clone(), self.shared.token)
    }

    /// The coordinator's signed fence for this lease (`Lease.signed_fence`,
    /// 117 bytes), or `None` if the coordinator does not sign fences.
    pub fn signed_fence(&self) -> Option<&[u8]> {
        Some(self.shared.signed_fence.as_slice()).filter(|f| !f.is_empty())
    }

    /// Attaches this lease's fence to an outgoing gRPC request: the
    /// resource and token, and the signed fence (`leasehold-fence-bin`)
    /// when the coordinator signed one.
    pub fn attach<T>(&self, req: &mut tonic::Request<T>) -> Result<(), FenceError> {
        leasehold_fence::attach(req, &self.shared.resource, self.shared.token)?;
        leasehold_fence::attach_signed(req, &self.shared.signed_fence);
        Ok(())
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
    pub(crate) fn start(
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
            signed_fence: l.signed_fence,
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

    /// The (resource, token) pair storage checks; see [`leasehold_fence`].
    pub fn fence(&self) -> Result<Fence, FenceError> {
        self.handle().fence()
    }

    /// The coordinator's signed fence for this lease, or `None` if the
    /// coordinator does not sign fences; see [`LeaseHandle::signed_fence`].
    pub fn signed_fence(&self) -> Option<&[u8]> {
        Some(self.shared.signed_fence.as_slice()).filter(|f| !f.is_empty())
    }

    /// Attaches this lease's fence to an outgoing gRPC request (resource,
    /// token and, when the coordinator signs, the signed fence), so a
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
