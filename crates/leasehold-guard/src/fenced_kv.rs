//! A small fenced key-value store: the storage side of Kleppmann's scenario,
//! served over gRPC (`leasehold.v1.FencedKv`).
//!
//! Workers write with the fencing token of their lease in the request
//! metadata ([`crate::fencing`]: `leasehold-resource`, `leasehold-token`).
//! The store keeps, per resource, the highest token it has accepted
//! ([`SledGuard`]), and refuses a write with an older token with
//! `FAILED_PRECONDITION`, naming the resource, the offered token and the
//! highest one: a paused worker whose lease expired cannot overwrite the
//! work of the worker that took over.
//!
//! With the `postgres` feature, [`crate::pg::fenced_kv`] serves the same
//! contract with the data and the fences in PostgreSQL.
//!
//! It serves as a demonstration, a test fixture (`examples/fenced_store.rs`
//! wraps it in a binary), and a template for real storage services.
//!
//! # Contract
//!
//! - **Put** needs a fence; without one it answers `INVALID_ARGUMENT`
//!   naming the missing key. The token check, the data write and the mark
//!   update are one sled transaction ([`SledGuard::write`]); the reply is
//!   sent only after a shared flush that also `fdatasync`s sled's log
//!   ([`GroupFlusher::start_synced`]), so an acknowledged write survives
//!   `kill -9` of the server and a power cut (see the durability notes in
//!   [the crate docs](crate#durability-sledguard)).
//! - **Signed fences** (feature `signed`, [`FencedKvService::with_verifier`]):
//!   given the coordinator's public keys, Put also needs the lease's signed
//!   fence (`leasehold-fence-bin`), verified offline for the request's
//!   `leasehold-resource`, and writes with the token inside it; the plain
//!   `leasehold-token` must agree. A malformed fence (missing, truncated,
//!   unknown version) is `INVALID_ARGUMENT`; one that is not to be trusted
//!   (forged, altered, another resource's, an unknown or retired key) is
//!   `PERMISSION_DENIED`. Either way nothing is written and the mark does
//!   not move. Without keys the store trusts the plain token (see the
//!   crate docs, "What the guard trusts").
//! - **Get** needs no fence (reads are not fenced here); a fence sent
//!   anyway must be well-formed.
//! - **One resource protects every key written under it.** The key written
//!   and the fence's resource are independent: a worker holding the lease
//!   on `orders` may write `orders/17` and `orders/18`, and a write with a
//!   stale token for `orders` is refused whatever its key. Keys written
//!   under two different resources are not ordered against each other, so
//!   use one resource per key space.
//!
//! # Storage
//!
//! One sled database in the data directory. The tree [`DATA_TREE`] maps
//! each key to its value prefixed with the 8-byte big-endian token that
//! wrote it; the guard's marks live in [`crate::DEFAULT_TREE`].
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let shutdown = async { tokio::signal::ctrl_c().await.unwrap_or(()) };
//! leasehold_guard::fenced_kv::serve(listener, std::path::Path::new("data"), shutdown).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::fencing::{self, Fence};
use crate::proto::fenced_kv_server::{FencedKv, FencedKvServer};
use crate::proto::{GetRequest, GetResponse, PutRequest, PutResponse};
use crate::{FlushError, GroupFlusher, GuardError, SledGuard};

/// The tree holding the data: key → token (8 bytes, big-endian) + value.
pub const DATA_TREE: &str = "fenced_kv.data";
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// What can go wrong when opening or serving the store.
#[derive(Debug, thiserror::Error)]
pub enum FencedKvError {
    /// The sled database in the data directory cannot be opened.
    #[error(
        "cannot open the data directory {}: {source}; check that it is writable and that no \
         other process uses it",
        .path.display()
    )]
    Open {
        /// The data directory.
        path: PathBuf,
        /// What sled reported.
        source: sled::Error,
    },
    /// The guard's tree cannot be opened.
    #[error(transparent)]
    Guard(#[from] GuardError),
    /// The flusher thread cannot be started.
    #[error("cannot start the flusher (its thread, or opening sled's log to sync it): {0}")]
    Thread(#[source] std::io::Error),
    /// The final flush at shutdown failed.
    #[error(transparent)]
    Flush(#[from] FlushError),
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The type of interceptor function the server is wrapped in.
pub type FenceInterceptor = fn(Request<()>) -> Result<Request<()>, Status>;

/// [`FencedKvService`] as a tonic service, ready for `Server::add_service`.
pub type FencedKvGrpc = InterceptedService<FencedKvServer<FencedKvService>, FenceInterceptor>;

/// The `FencedKv` gRPC service over a sled database.
#[derive(Debug, Clone)]
pub struct FencedKvService {
    guard: SledGuard,
    data: sled::Tree,
    /// The coordinator's public keys: with them, Put takes its token from
    /// the verified signed fence.
    #[cfg(feature = "signed")]
    verifier: Option<std::sync::Arc<leasehold_fence::signed::FenceVerifier>>,
}

impl FencedKvService {
    /// Opens (or creates) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, FencedKvError> {
        let db = sled::Config::new()
            .path(data_dir)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|source| FencedKvError::Open {
                path: data_dir.to_owned(),
                source,
            })?;
        let flusher =
            GroupFlusher::start_synced(db.clone(), data_dir).map_err(FencedKvError::Thread)?;
        Self::with_flusher(&db, flusher)
    }

    /// The store over an open database, made durable by `flusher`.
    pub fn with_flusher(db: &sled::Db, flusher: GroupFlusher) -> Result<Self, FencedKvError> {
        let guard = SledGuard::with_flusher(db, crate::DEFAULT_TREE, flusher)?;
        let data = db.open_tree(DATA_TREE).map_err(GuardError::from)?;
        Ok(FencedKvService {
            guard,
            data,
            #[cfg(feature = "signed")]
            verifier: None,
        })
    }

    /// Requires signed fences on Put, verified with `verifier` (the
    /// coordinator's public keys); see the module docs.
    #[cfg(feature = "signed")]
    pub fn with_verifier(mut self, verifier: leasehold_fence::signed::FenceVerifier) -> Self {
        self.verifier = Some(std::sync::Arc::new(verifier));
        self
    }

    /// The token a Put writes with: the plain one without keys, the
    /// verified signed one with keys.
    fn token_of<T>(&self, req: &Request<T>, fence: &Fence) -> Result<u64, Status> {
        #[cfg(feature = "signed")]
        if let Some(verifier) = &self.verifier {
            let verified = leasehold_fence::signed::verify_metadata(
                req.metadata(),
                &fence.resource,
                Some(fence.token),
                verifier,
            )
            .map_err(|e| {
                tracing::info!(error = %e, "signed fence refused");
                Status::from(e)
            })?;
            return Ok(verified.token);
        }
        let _ = req;
        Ok(fence.token)
    }

    /// The guard, e.g. to flush at shutdown.
    pub fn guard(&self) -> &SledGuard {
        &self.guard
    }

    /// The service wrapped in [`fencing::optional_fence`]: Put requires the
    /// fence it parses, Get does not.
    pub fn into_server(self) -> FencedKvGrpc {
        FencedKvServer::with_interceptor(self, counted_optional_fence as FenceInterceptor)
    }
}

/// [`fencing::optional_fence`], counting what it refuses as malformed.
fn counted_optional_fence(req: Request<()>) -> Result<Request<()>, Status> {
    fencing::optional_fence(req).inspect_err(|_| crate::metrics::refused_malformed())
}

/// Every storage error becomes a status here, and only here.
fn status(e: GuardError) -> Status {
    match e {
        GuardError::StaleToken { .. } => Status::failed_precondition(e.to_string()),
        GuardError::Aborted(never) => match never {},
        GuardError::Flush(_) => Status::unavailable(format!(
            "{e}; the write was not acknowledged: retry it with the same token"
        )),
        GuardError::Corrupt { .. } | GuardError::Storage(_) => Status::internal(e.to_string()),
        #[cfg(feature = "postgres")]
        GuardError::Postgres(pg) => crate::pg::fenced_kv::status(pg),
    }
}

fn encode(token: u64, value: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(8 + value.len());
    stored.extend_from_slice(&token.to_be_bytes());
    stored.extend_from_slice(value);
    stored
}

pub(crate) fn check_key(key: &str) -> Result<(), Status> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(Status::invalid_argument(format!(
            "key is {} bytes long; keys must be 1..={MAX_KEY_LEN} bytes",
            key.len()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl FencedKv for FencedKvService {
    #[tracing::instrument(skip_all, fields(key = %req.get_ref().key, resource, token))]
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let mut fence = Fence::from_request(&req)
            .inspect_err(|_| crate::metrics::refused_malformed())?
            .clone();
        fence.token = self
            .token_of(&req, &fence)
            .inspect_err(|_| crate::metrics::refused_malformed())?;
        let span = tracing::Span::current();
        span.record("resource", fence.resource.as_str());
        span.record("token", fence.token);
        let PutRequest { key, value } = req.into_inner();
        check_key(&key)?;

        let stored = encode(fence.token, &value);
        let (guard, data) = (self.guard.clone(), self.data.clone());
        let Fence { resource, token } = fence;
        // A sled transaction may block on I/O; keep it off the async workers.
        let written = tokio::task::spawn_blocking(move || {
            guard.write(&resource, token, &data, |tx| {
                tx.insert(key.as_bytes(), stored.as_slice())?;
                Ok(())
            })
        })
        .await
        .map_err(|e| Status::internal(format!("the write task failed: {e}")))?;
        if let Err(e) = written {
            tracing::info!(error = %e, "write refused");
            return Err(status(e));
        }
        // Acknowledge only what survives a crash of this process.
        self.guard
            .wait_flushed()
            .await
            .map_err(|e| status(e.into()))?;
        tracing::debug!("write accepted");
        // Accepted means the token is at least the old mark, so it is the mark now.
        Ok(Response::new(PutResponse {
            highest_token: token,
        }))
    }

    #[tracing::instrument(skip_all, fields(key = %req.get_ref().key))]
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let GetRequest { key } = req.into_inner();
        check_key(&key)?;
        let stored = self
            .data
            .get(key.as_bytes())
            .map_err(|e| status(e.into()))?;
        let reply = match stored {
            None => GetResponse {
                found: false,
                value: Vec::new(),
                token: 0,
            },
            Some(stored) => {
                let (token, value) = stored.split_at_checked(8).ok_or_else(|| {
                    Status::internal(format!(
                        "corrupt record for key {key:?}: shorter than its 8-byte token"
                    ))
                })?;
                let token = u64::from_be_bytes(token.try_into().map_err(|_| {
                    Status::internal(format!("corrupt token in the record for key {key:?}"))
                })?);
                GetResponse {
                    found: true,
                    value: value.to_vec(),
                    token,
                }
            }
        };
        Ok(Response::new(reply))
    }
}

/// Serves the store in `data_dir` on `listener` until `shutdown` completes,
/// then flushes and returns.
///
/// The caller binds the listener, so tests can use `127.0.0.1:0` and read
/// the port from [`TcpListener::local_addr`] before calling this.
pub async fn serve(
    listener: TcpListener,
    data_dir: &Path,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FencedKvError> {
    serve_service(listener, FencedKvService::open(data_dir)?, shutdown).await
}

/// Serves an opened `service` (e.g. with [`FencedKvService::with_verifier`])
/// on `listener` until `shutdown` completes, then flushes and returns.
pub async fn serve_service(
    listener: TcpListener,
    service: FencedKvService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FencedKvError> {
    let guard = service.guard().clone();
    // Small request/response frames: do not let Nagle hold them back.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!("fenced store serving");
    let served = tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    guard.wait_flushed().await?;
    served?;
    tracing::info!("fenced store stopped");
    Ok(())
}
