//! Sessions: many short leases, one call at a time, over one gRPC stream.
//!
//! A unary RPC costs the client and the server a new HTTP/2 stream, its
//! headers and trailers, and a task on each side; for a worker that takes
//! and gives back thousands of short leases a second that is most of the
//! work (measured on 2 cores: 22k Acquire + Release cycles/s unary, 44k/s
//! over sessions, `leasehold bench cycle [--session]`). A [`Session`] sends
//! the same Acquire, Renew and Release calls as messages on one
//! bidirectional `Session` stream; the server runs them one after another
//! and answers each in order, with the very handlers of the unary RPCs, so
//! the guarantees are the same: a grant is durable before its answer is
//! sent, a refused call changes nothing.
//!
//! What a session does not do is keep leases alive in the background: a
//! [`Grant`] is plain data with a conservative validity (counted, like a
//! [`crate::client::Lease`]'s, from when the Acquire was *sent*, minus the
//! client's safety margin). Use it for work shorter than the TTL, renew it
//! with [`Session::renew`], or take a [`crate::client::Lease`] for long work.
//!
//! Retries are safe: every [`Session::acquire`] draws one random
//! `request_id` and resends it, on a new stream, after a transport error or
//! UNAVAILABLE, so a lost answer never turns into a second lease. One
//! session serves one task (`&mut self`); open one per concurrent worker
//! (they share the client's connection).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use leasehold_client::Client;
//!
//! let client = Client::connect("http://127.0.0.1:7420")?;
//! let mut session = client.session().await?;
//! for job in 0..1000 {
//!     let grant = session
//!         .acquire(format!("jobs/{job}"), Duration::from_secs(5), Duration::ZERO)
//!         .await?;
//!     // ... fenced work with grant.token(), while grant.is_valid() ...
//!     session.release(grant).await?;
//! }
//! # Ok(()) }
//! ```

use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use leasehold_fence::{Fence, FenceError};

use crate::proto::lease_service_client::LeaseServiceClient;
use crate::proto::session_request::Call;
use crate::proto::session_response::Result as Answer;
use crate::proto::{self, acquire_response::Outcome};
use crate::retry::{default_holder, retry};
use crate::{AcquireError, Client, ClientError};
use tonic::codegen::{Body, Bytes, StdError};

/// A lease granted over a session: its identity, its token, and until when
/// the holder may act on it.
#[derive(Clone)]
pub struct Grant {
    resource: String,
    lease_id: String,
    token: u64,
    signed_fence: Vec<u8>,
    ttl: Duration,
    valid_until: Instant,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The lease id is the proof of holding: logs get a prefix only.
        let id: String = self.lease_id.chars().take(8).collect();
        f.debug_struct("Grant")
            .field("resource", &self.resource)
            .field("lease_id", &format_args!("{id}…"))
            .field("token", &self.token)
            .field("ttl", &self.ttl)
            .field("valid_for", &self.valid_for())
            .finish()
    }
}

impl Grant {
    /// The fencing token: send it with every write.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The leased resource.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The lease's secret id (the proof of holding it; keep it private).
    pub fn lease_id(&self) -> &str {
        &self.lease_id
    }

    /// The lease's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether the lease is still conservatively valid.
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }

    /// How much longer the lease is conservatively valid (zero once past).
    pub fn valid_for(&self) -> Duration {
        self.valid_until.saturating_duration_since(Instant::now())
    }

    /// The (resource, token) pair storage checks; see [`leasehold_fence`].
    pub fn fence(&self) -> Result<Fence, FenceError> {
        Fence::new(self.resource.clone(), self.token)
    }

    /// The coordinator's signed fence for this grant (`Lease.signed_fence`),
    /// or `None` if the coordinator does not sign fences.
    pub fn signed_fence(&self) -> Option<&[u8]> {
        Some(self.signed_fence.as_slice()).filter(|f| !f.is_empty())
    }

    /// Attaches this grant's fence to an outgoing gRPC request: resource,
    /// token and, when the coordinator signed one, the signed fence.
    pub fn attach<T>(&self, req: &mut tonic::Request<T>) -> Result<(), FenceError> {
        leasehold_fence::attach(req, &self.resource, self.token)?;
        leasehold_fence::attach_signed(req, &self.signed_fence);
        Ok(())
    }
}

/// One stream of calls; see the module docs.
pub struct Session {
    client: Client,
    holder: String,
    stream: Option<Calls>,
}

/// One `Session` stream as a client sees it: send a call, read its answer.
/// [`Session`] adds retries on new streams; `leasehold bench` drives it bare.
pub struct Calls {
    tx: mpsc::Sender<proto::SessionRequest>,
    rx: Streaming<proto::SessionResponse>,
}

impl Calls {
    /// Opens a Session stream on `rpc`'s connection.
    pub async fn open<T>(rpc: &mut LeaseServiceClient<T>) -> Result<Calls, Status>
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<StdError>,
        T::ResponseBody: Body<Data = Bytes> + Send + 'static,
        <T::ResponseBody as Body>::Error: Into<StdError> + Send,
    {
        // One request in flight at a time: no buffer beyond it.
        let (tx, rx) = mpsc::channel(1);
        let rx = rpc.session(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Calls { tx, rx })
    }

    /// Sends `call` and reads its answer. A call the server refused is an
    /// answer too ([`Answer::Error`]): the stream is fine. `Err` means the
    /// stream is not (closed, broken, or ended with a status).
    pub async fn call(&mut self, call: Call) -> Result<Answer, Status> {
        self.tx
            .send(proto::SessionRequest { call: Some(call) })
            .await
            .map_err(|_| Status::unavailable("the session stream closed"))?;
        match self.rx.message().await? {
            Some(proto::SessionResponse { result: Some(r) }) => Ok(r),
            Some(_) => Err(Status::internal(
                "the coordinator sent an empty session answer",
            )),
            None => Err(Status::unavailable("the session stream ended")),
        }
    }
}

impl Client {
    /// Opens a [`Session`] on this client's connection.
    pub async fn session(&self) -> Result<Session, ClientError> {
        let mut session = Session {
            client: self.clone(),
            holder: default_holder(),
            stream: None,
        };
        let stream = session.open().await.map_err(ClientError::Unreachable)?;
        session.stream = Some(stream);
        Ok(session)
    }
}

impl Session {
    /// Names the holder in this session's acquires (default: host:pid).
    pub fn holder(mut self, holder: impl Into<String>) -> Self {
        self.holder = holder.into();
        self
    }

    /// Acquires `resource` for `ttl`, waiting up to `wait` in line if it is
    /// held.
    pub async fn acquire(
        &mut self,
        resource: impl Into<String>,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Grant, AcquireError> {
        let resource = resource.into();
        let mut id = [0u8; 16];
        rand::rng().fill(&mut id);
        let margin = ttl.mul_f64(self.client.config().safety_margin);
        let holder = self.holder.clone();
        // Each attempt waits only for what is left of `wait`.
        let (answer, sent_at) = self
            .call(wait, |left| {
                Call::Acquire(proto::AcquireRequest {
                    resource: resource.clone(),
                    holder: holder.clone(),
                    ttl_ms: ttl.as_millis() as u64,
                    // The same key on every retry: never a second lease.
                    request_id: hex::encode(id),
                    wait_ms: left.as_millis() as u64,
                })
            })
            .await?;
        match answer {
            Answer::Acquire(proto::AcquireResponse {
                outcome: Some(Outcome::Lease(l)),
            }) => Ok(grant(l, sent_at, margin)),
            Answer::Acquire(proto::AcquireResponse {
                outcome: Some(Outcome::Held(h)),
            }) => Err(AcquireError::Held {
                resource,
                holder: h.holder,
                token: h.token,
                expires_in: Duration::from_millis(h.expires_in_ms),
            }),
            other => Err(ClientError::Refused(mismatch("Acquire", other)).into()),
        }
    }

    /// Renews `grant` for its TTL; the token never changes. NOT_FOUND once
    /// it has ended.
    pub async fn renew(&mut self, grant: &Grant) -> Result<Grant, ClientError> {
        let req = proto::RenewRequest {
            lease_id: grant.lease_id.clone(),
            token: grant.token,
            ttl_ms: 0,
        };
        let (answer, sent_at) = self
            .call(Duration::ZERO, |_| Call::Renew(req.clone()))
            .await?;
        match answer {
            Answer::Renew(proto::RenewResponse { lease: Some(l) }) => {
                let margin = grant.ttl.mul_f64(self.client.config().safety_margin);
                Ok(grant_with_id(l, grant.lease_id.clone(), sent_at, margin))
            }
            other => Err(ClientError::Refused(mismatch("Renew", other))),
        }
    }

    /// Ends `grant` and hands the resource to the next waiter.
    /// `Ok(false)`: it had already ended (releasing twice is harmless, so
    /// a retried release may answer false).
    pub async fn release(&mut self, grant: Grant) -> Result<bool, ClientError> {
        let req = proto::ReleaseRequest {
            lease_id: grant.lease_id,
            token: grant.token,
        };
        match self
            .call(Duration::ZERO, |_| Call::Release(req.clone()))
            .await?
            .0
        {
            Answer::Release(r) => Ok(r.released),
            other => Err(ClientError::Refused(mismatch("Release", other))),
        }
    }

    /// Sends one call (rebuilt by `make` for each attempt, given the wait
    /// left) and returns its answer and when the answered attempt was sent.
    /// Transport errors and UNAVAILABLE are retried on a new stream with
    /// backoff until the client's retry deadline; an error the server
    /// answered for the call itself comes back as `Refused`.
    async fn call(
        &mut self,
        wait: Duration,
        make: impl Fn(Duration) -> Call,
    ) -> Result<(Answer, Instant), ClientError> {
        let config = self.client.config().clone();
        retry(&config, wait, self, |session, left| {
            let call = make(left);
            Box::pin(async move {
                let sent_at = Instant::now();
                match session.exchange(call).await? {
                    // The call failed; the stream is fine.
                    Answer::Error(e) => Err(Status::new(Code::from(e.code), e.message)),
                    answer => Ok((answer, sent_at)),
                }
            })
        })
        .await
    }

    /// One request and its answer on the current stream (opened if
    /// needed). The stream is put back only once answered: one that broke,
    /// or whose attempt timed out with the call unanswered, is dropped, and
    /// the next attempt starts a new one.
    async fn exchange(&mut self, call: Call) -> Result<Answer, Status> {
        let mut stream = match self.stream.take() {
            Some(stream) => stream,
            None => self.open().await?,
        };
        let answer = stream.call(call).await?;
        self.stream = Some(stream);
        Ok(answer)
    }
    async fn open(&self) -> Result<Calls, Status> {
        let mut rpc = self.client.rpc();
        tokio::time::timeout(self.client.config().attempt_timeout, Calls::open(&mut rpc))
            .await
            .map_err(|_| Status::deadline_exceeded("opening the session timed out"))?
    }
}

fn grant(l: proto::Lease, sent_at: Instant, margin: Duration) -> Grant {
    let id = l.lease_id.clone();
    grant_with_id(l, id, sent_at, margin)
}

/// Validity counts from when the answered request was sent (the server's
/// clock started later), minus the margin for clock-rate drift.
fn grant_with_id(l: proto::Lease, lease_id: String, sent_at: Instant, margin: Duration) -> Grant {
    let left = Duration::from_millis(l.expires_in_ms).saturating_sub(margin);
    Grant {
        resource: l.resource,
        lease_id,
        token: l.token,
        signed_fence: l.signed_fence,
        ttl: Duration::from_millis(l.ttl_ms),
        valid_until: sent_at + left,
    }
}

/// An answer that is not the call's own result.
fn mismatch(call: &str, answer: Answer) -> Status {
    Status::internal(format!(
        "the coordinator answered {call} with {answer:?}; is it a compatible version?"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_grant_is_valid_from_its_send_time_less_the_margin_and_debug_hides_its_id() {
        let sent_at = Instant::now();
        let lease = proto::Lease {
            resource: "r".into(),
            lease_id: "0123456789abcdef0123456789abcdef".into(),
            token: 7,
            holder: "h".into(),
            ttl_ms: 1000,
            expires_in_ms: 1000,
            signed_fence: vec![1; 117],
        };
        let g = grant(lease, sent_at, Duration::from_millis(100));
        assert_eq!(g.signed_fence(), Some(&[1u8; 117][..]));
        let mut req = tonic::Request::new(());
        g.attach(&mut req).unwrap();
        let sent = req.metadata().get_bin("leasehold-fence-bin").unwrap();
        assert_eq!(sent.to_bytes().unwrap().as_ref(), &[1u8; 117][..]);
        assert!(g.valid_for() <= Duration::from_millis(900));
        assert!(g.valid_for() > Duration::from_millis(800));
        let shown = format!("{g:?}");
        assert!(shown.contains("01234567…"), "{shown}");
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        let expired = grant_with_id(
            proto::Lease {
                expires_in_ms: 50,
                ..proto::Lease::default()
            },
            "x".into(),
            sent_at,
            Duration::from_millis(100),
        );
        assert!(!expired.is_valid() && expired.valid_for().is_zero());
    }
}
