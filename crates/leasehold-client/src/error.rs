//! What can go wrong: one enum per kind of call, each message saying what to do.

use std::time::Duration;

use tonic::Status;

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

/// Why [`Client::with_lease`](crate::Client::with_lease) did not return the work's result.
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
