//! The worker's library: acquire, keep alive and release leases, safely.
//!
//! Lock users get hurt in three places: retried grants (a lost reply, a
//! retry, two leases), lost keepalives (the lease quietly ends while the
//! worker keeps writing), and pauses (a GC or a stalled VM outlives the
//! lease). This crate handles all three by default:
//!
//! - **Safe retries.** Each logical acquire draws one random `request_id`
//!   and sends it on every retry, so the coordinator returns the same lease
//!   instead of granting a second one. Transport errors and `UNAVAILABLE`
//!   are retried with exponential backoff and full jitter until a deadline;
//!   refusals such as `INVALID_ARGUMENT` are not.
//! - **Keepalive.** A [`Lease`] renews itself in the background (every
//!   TTL/3 by default) over the one `KeepAlive` stream its [`Client`] keeps
//!   for all of its leases, re-opening the stream after a transport error
//!   and renewing the same leases.
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
//! `leasehold-guard` and [`leasehold_fence`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use leasehold_client::Client;
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
//!
//! The example is `no_run` because it needs a coordinator; the
//! coordinator's crate docs and `examples/worker.rs` run the same calls
//! against a real one.

mod client;
mod error;
mod keepalive;
mod lease;
mod retry;
mod session;

pub use client::{AcquireBuilder, Client, ClientConfig};
pub use error::{AcquireError, ClientError, LostReason, WithLeaseError};
pub use lease::{Lease, LeaseHandle};
pub use leasehold_fence::{Fence, FenceError};
pub use session::{Calls, Grant, Session};

/// Generated gRPC client types for `leasehold.v1` (client stubs only).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("leasehold.v1");
}
