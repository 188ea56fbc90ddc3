//! Leasehold: a lease coordinator whose fencing tokens never go backwards.
//!
//! Modules, in reading order:
//!
//! - [`lease`]: validated domain types (resource, holder, lease id, token).
//! - [`state`]: the pure lease state machine; time is an argument, no I/O.
//! - [`store`]: the only module that knows sled and the disk.
//! - [`commit`]: group commit; one thread, one flush per batch.
//! - [`coordinator`]: state machine + store + clock; waiters and expiry timer.
//! - [`service`]: the gRPC edge; errors become statuses here.
//! - [`admin`]: the operator API (list, revoke, watch, history, stats).
//! - [`auth`]: the admin bearer token, checked in constant time.
//! - [`tls`]: PEM files into rustls configurations, for server and clients.
//! - [`server`]: wires the services, health and reflection; graceful shutdown.
//! - [`client`]: the worker's library: acquire, keepalive, safe retries.
//! - [`guard`], [`idempotency`], [`fencing`]: libraries for storage services;
//!   [`fenced_kv`]: a small fenced key-value service built from them.
//! - [`cli`]: the `leasehold` command line.
//!
//! See ARCHITECTURE.md for how a request flows and which invariants hold where.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod client;
pub mod commit;
pub mod coordinator;
pub mod fenced_kv;
pub mod fencing;
pub mod guard;
pub mod idempotency;
pub mod lease;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod tls;

/// Generated gRPC types for `leasehold.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("leasehold.v1");

    /// The encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("leasehold_descriptor");
}
