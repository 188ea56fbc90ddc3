//! `leasehold bench`: bounded load generators that measure a server and
//! check its guarantees while they do.
//!
//! Every workload runs for a warm-up plus a measured duration, stops by
//! itself (also after `max_ops` ops, and in any case a few seconds past its
//! end, abandoning calls that hang), and returns a [`Report`]: the rate as
//! `N ops/s`, p50/p90/p99/max latency, errors, and the correctness checks of
//! the workload. The report is the `leasehold-bench-report` crate, shared with
//! the etcd and ZooKeeper load generators in `bench/peers`, so all three
//! print the same thing.
//!
//! - [`cycle`]: acquire → release on a free resource, per worker.
//! - [`contended`]: every worker queues on one resource; handoffs per second,
//!   with no two holders overlapping and tokens increasing in grant order.
//! - [`keepalive`]: many live leases renewed over a few KeepAlive streams;
//!   renewals per second, server CPU, spurious expiries (must be 0).
//! - [`fill`](scale::fill) and [`ready`](scale::ready): hold a million
//!   leases, then time a restart.
//! - [`guard`]: the storage-side guard library in-process (memory and sled).
//!
//! The workloads speak plain gRPC through the generated client, so what is
//! measured is the server, not a client library's retries. The client drives
//! its HTTP/2 connections directly ([`Conn`]) rather than through a tonic
//! `Channel`, whose buffer task costs one more task wake-up per request: the
//! load generator shares the machine's cores with the server, and every
//! microsecond it spends is taken from the server.

pub mod contended;
pub mod cycle;
pub mod guard;
pub mod keepalive;
pub mod scale;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::RngCore;
use tonic::transport::Endpoint;

pub use leasehold_bench_report::{
    join_bounded, tokens_unique, usage_at_window_start_arc, Check, Contention, Histogram, Report,
    ServerUsage, Tally, Window,
};
use leasehold_client::proto::lease_service_client::LeaseServiceClient;
use leasehold_client::proto::session_request::Call;
use leasehold_client::proto::session_response::Result as Answer;
use leasehold_client::proto::{self, acquire_response::Outcome};
use leasehold_client::Calls;

/// The generated client the workloads drive.
pub type Client = LeaseServiceClient<Conn>;

/// One HTTP/2 connection, driven directly: a call goes from the worker's
/// task to the connection without a buffer task in between.
#[derive(Debug, Clone)]
pub struct Conn(SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for Conn {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

/// Opens one HTTP/2 connection to `endpoint`'s host and port.
async fn open_conn(
    endpoint: &Endpoint,
) -> Result<Client, Box<dyn std::error::Error + Send + Sync>> {
    let uri = endpoint.uri().clone();
    let host = uri.host().ok_or("the URL has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .map_err(|_| "connecting took longer than 5 s")??;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await?;
    // The connection is driven by its own task and ends with the last handle.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(LeaseServiceClient::with_origin(Conn(send), uri))
}

/// Why a benchmark could not run (failed ops are counted in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The server URL does not parse.
    #[error("--server {url:?} is not a URL: {source}")]
    Url {
        /// The URL given.
        url: String,
        /// Why it does not parse.
        #[source]
        source: tonic::transport::Error,
    },
    /// No connection could be made.
    #[error("cannot connect to {url}: {source}; is `leasehold serve` running there?")]
    Connect {
        /// The URL given.
        url: String,
        /// The transport error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The setup phase (taking the leases a workload needs) failed.
    #[error("setting up the workload failed: {0}")]
    Setup(String),
    /// The options make no sense together.
    #[error("{0}")]
    Options(String),
}

/// What every workload is configured with.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server's URL (`http://127.0.0.1:7420`).
    pub server: String,
    /// Concurrent workers (or KeepAlive streams).
    pub concurrency: usize,
    /// HTTP/2 connections the workers share.
    pub connections: usize,
    /// TTL of every lease taken.
    pub ttl: Duration,
    /// How long to measure.
    pub duration: Duration,
    /// How long to run before measuring.
    pub warmup: Duration,
    /// Stop after this many measured ops.
    pub max_ops: u64,
    /// A call that takes longer fails (counted as an error).
    pub op_timeout: Duration,
    /// The server's process id, for its CPU time and memory (`/proc`).
    pub server_pid: Option<u32>,
    /// `cycle` and `contended`: each worker sends its calls over its own
    /// Session stream instead of unary RPCs.
    pub session: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            server: "http://127.0.0.1:7420".into(),
            concurrency: 64,
            connections: 4,
            ttl: Duration::from_secs(10),
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            max_ops: 10_000_000,
            op_timeout: Duration::from_secs(5),
            server_pid: None,
            session: false,
        }
    }
}

impl Options {
    /// Opens `connections` channels to the server (eagerly, so a wrong URL
    /// fails here rather than as a million errors).
    /// With several servers (a cluster, comma-separated), every connection
    /// goes to the leader they report.
    pub async fn connect(&self) -> Result<Vec<Client>, BenchError> {
        let mut server = self.server.clone();
        if server.contains(',') {
            let list: Vec<&str> = self.server.split(',').map(str::trim).collect();
            server = crate::raft::cluster_api::find_leader(list.iter().copied())
                .await
                .unwrap_or_else(|| list[0].to_owned());
        }
        let endpoint = Endpoint::from_shared(server.clone()).map_err(|source| BenchError::Url {
            url: server.clone(),
            source,
        })?;
        let mut clients = Vec::new();
        for _ in 0..self.connections.max(1) {
            let client = open_conn(&endpoint)
                .await
                .map_err(|source| BenchError::Connect {
                    url: self.server.clone(),
                    source,
                })?;
            clients.push(client);
        }
        Ok(clients)
    }

    /// One [`Caller`] per worker, dealt over `clients` (the connections).
    pub async fn callers(&self, clients: &[Client]) -> Result<Vec<Caller>, BenchError> {
        let mut callers = Vec::with_capacity(self.concurrency);
        for w in 0..self.concurrency {
            let caller = Caller::new(&clients[w % clients.len()], self.session)
                .await
                .map_err(BenchError::Setup)?;
            callers.push(caller);
        }
        Ok(callers)
    }

    fn check(&self) -> Result<(), BenchError> {
        if self.concurrency == 0 {
            return Err(BenchError::Options(
                "--concurrency must be at least 1".into(),
            ));
        }
        if self.duration.is_zero() {
            return Err(BenchError::Options("--duration must be above zero".into()));
        }
        Ok(())
    }

    /// The last moment any worker may still run: the window's end plus one
    /// op timeout plus a margin. Workers still running then are abandoned.
    fn hard_stop(&self, window: &Window) -> Instant {
        window.to + self.op_timeout + Duration::from_secs(2)
    }
}

/// A short random tag, so resources of different runs never meet.
pub fn run_tag() -> String {
    let mut b = [0u8; 4];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// A lease as a worker keeps it.
#[derive(Debug, Clone)]
pub struct BenchLease {
    /// The secret id.
    pub lease_id: String,
    /// The fencing token.
    pub token: u64,
}

/// How a worker calls the server: unary RPCs, or its own Session stream.
pub enum Caller {
    /// One unary RPC per call.
    Unary(Client),
    /// Calls as messages on one Session stream, one at a time.
    Session(Calls),
}

impl Caller {
    /// A caller on `client`'s connection: with `session`, it opens its
    /// own Session stream.
    pub async fn new(client: &Client, session: bool) -> Result<Caller, String> {
        let mut client = client.clone();
        if !session {
            return Ok(Caller::Unary(client));
        }
        let calls = Calls::open(&mut client)
            .await
            .map_err(|s| format!("Session: {}: {}", s.code(), s.message()))?;
        Ok(Caller::Session(calls))
    }

    /// One Acquire with a timeout: `Ok(Some)` granted, `Ok(None)` held by
    /// someone else, `Err` failed.
    pub async fn acquire(
        &mut self,
        resource: String,
        holder: &str,
        ttl: Duration,
        wait: Duration,
        timeout: Duration,
    ) -> Result<Option<BenchLease>, String> {
        let req = proto::AcquireRequest {
            resource,
            holder: holder.to_owned(),
            ttl_ms: ttl.as_millis() as u64,
            request_id: String::new(),
            wait_ms: wait.as_millis() as u64,
        };
        let reply = match self {
            Caller::Unary(client) => timed("Acquire", timeout + wait, client.acquire(req)).await,
            Caller::Session(calls) => {
                match session_call(calls, Call::Acquire(req), timeout + wait).await? {
                    Answer::Acquire(r) => Ok(r),
                    other => Err(unexpected("Acquire", other)),
                }
            }
        }?;
        match reply.outcome {
            Some(Outcome::Lease(l)) => Ok(Some(BenchLease {
                lease_id: l.lease_id,
                token: l.token,
            })),
            Some(Outcome::Held(_)) => Ok(None),
            None => Err("Acquire answered with neither a lease nor a holder".into()),
        }
    }

    /// One Release with a timeout; `Ok(released)`.
    pub async fn release(&mut self, lease: BenchLease, timeout: Duration) -> Result<bool, String> {
        let req = proto::ReleaseRequest {
            lease_id: lease.lease_id,
            token: lease.token,
        };
        let reply = match self {
            Caller::Unary(client) => timed("Release", timeout, client.release(req)).await,
            Caller::Session(calls) => {
                match session_call(calls, Call::Release(req), timeout).await? {
                    Answer::Release(r) => Ok(r),
                    other => Err(unexpected("Release", other)),
                }
            }
        }?;
        Ok(reply.released)
    }
}

/// A unary call with a timeout, its status turned into the report's text.
async fn timed<T>(
    name: &str,
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(format!("{name} took longer than {timeout:?}")),
        Ok(Err(status)) => Err(format!("{name}: {}: {}", status.code(), status.message())),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

/// One call on a session with a timeout, its failure turned into the
/// report's text.
async fn session_call(calls: &mut Calls, call: Call, timeout: Duration) -> Result<Answer, String> {
    match tokio::time::timeout(timeout, calls.call(call)).await {
        Err(_) => Err(format!("a session call took longer than {timeout:?}")),
        Ok(Err(s)) => Err(format!("Session: {}: {}", s.code(), s.message())),
        Ok(Ok(answer)) => Ok(answer),
    }
}

/// The text for a session answer that is not the call's own result.
fn unexpected(name: &str, answer: Answer) -> String {
    match answer {
        Answer::Error(e) => format!("{name}: {}: {}", tonic::Code::from(e.code), e.message),
        _ => format!("{name} was answered with another call's result"),
    }
}
