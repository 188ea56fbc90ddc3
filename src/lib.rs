//! Leasehold: a lease coordinator whose fencing tokens never go backwards.
//!
//! This is the coordinator (the server and the `leasehold` binary). The
//! libraries for the other parties are crates of their own, in `crates/`:
//! `leasehold-client` (workers), `leasehold-guard` (storage services) and
//! `leasehold-fence` (the fence on the wire, shared by both).
//!
//! Modules, in reading order:
//!
//! - [`lease`]: validated domain types (resource, holder, lease id, token).
//! - [`state`]: the pure lease state machine; time is an argument, no I/O.
//! - [`store`]: the only module on the server's path that knows sled and the disk.
//! - `wal` (internal): the store's write-ahead log; one synchronous write per batch.
//! - `commit` (internal): group commit; one writer at a time, one write per batch.
//! - [`clock`]: the time the coordinator is handed (Tokio's, so tests can pause it).
//! - [`coordinator`]: state machine + store + clock; waiters and expiry timer.
//! - [`keys`]: the signing keys (a pure key set, its file); fences are signed with them.
//! - `service` (internal): the gRPC edge; errors become statuses here.
//! - `admin` (internal): the operator API (list, revoke, watch, history, stats).
//! - [`auth`]: the admin bearer token, checked in constant time.
//! - [`tls`]: PEM files into rustls configurations, for server and clients.
//! - [`server`]: wires the services, health and reflection; graceful shutdown.
//! - [`metrics`], [`trace`], [`http`], [`cluster_view`], [`otlp`]: seeing it
//!   work: Prometheus metrics, trace context in, `serve --http` (`/metrics`,
//!   health, the lease page), the cluster's status for both, log/OTLP set-up.
//! - [`bench`](mod@bench): `leasehold bench`, bounded load generators with checks.
//! - [`cli`]: the `leasehold` command line.
//!
//! See ARCHITECTURE.md for how a request flows and which invariants hold where.
//!
//! # Example: the whole scheme in one process
//!
//! A coordinator on an ephemeral port, a worker that takes a lease and
//! writes through a fencing guard, and a zombie whose stale write the guard
//! rejects:
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use leasehold::server;
//! use leasehold_client::Client;
//! use leasehold_guard::{GuardError, MemoryGuard};
//!
//! // The coordinator (normally `leasehold serve`).
//! let dir = tempfile::tempdir()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let url = format!("http://{}", listener.local_addr()?);
//! let config = server::ServerConfig { data_dir: dir.path().into(), ..Default::default() };
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let served = tokio::spawn(server::run(listener, config, async { let _ = stopped.await; }));
//!
//! // Storage keeps the highest token it has accepted per resource.
//! let storage = MemoryGuard::new();
//!
//! let client = Client::connect(url)?;
//! let old = client.acquire("invoices").ttl(Duration::from_millis(200)).await?;
//! let old_token = old.token();
//! old.detach(); // the old holder "pauses": it stops renewing
//! tokio::time::sleep(Duration::from_millis(250)).await;
//!
//! // Its lease expired; the next holder gets a larger token and writes.
//! let new = client.acquire("invoices").ttl(Duration::from_secs(5)).await?;
//! assert!(new.token() > old_token);
//! storage.check_and_record("invoices", new.token())?;
//!
//! // The paused holder wakes up and writes with its old token: rejected.
//! let stale = storage.check_and_record("invoices", old_token);
//! assert!(matches!(stale, Err(GuardError::StaleToken { .. })));
//!
//! new.release().await?;
//! let _ = stop.send(());
//! served.await??;
//! # Ok(()) }
//! ```

pub(crate) mod admin;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod cluster_view;
pub(crate) mod commit;
pub mod coordinator;
pub mod http;
pub mod keys;
pub mod lease;
pub mod metrics;
pub mod otlp;
pub mod raft;
pub mod server;
pub(crate) mod service;
pub mod state;
pub mod store;
pub mod tls;
pub mod trace;
pub(crate) mod wal;

/// Generated gRPC types for `leasehold.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("leasehold.v1");

    /// The encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("leasehold_descriptor");
}
