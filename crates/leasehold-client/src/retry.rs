//! The one retry loop every call of the library goes through.
//!
//! A call is retried only when the coordinator did not refuse it (a
//! transport error, UNAVAILABLE, a timed-out attempt), and retrying is safe
//! because every call the library retries is idempotent: an Acquire carries
//! the same `request_id` on every attempt, Renew and Release name the lease.
//! Attempts are spaced by exponential backoff with full jitter until the
//! client's retry deadline.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::{ClientConfig, ClientError};

/// One attempt of a call: a future that may borrow the caller's state.
pub(crate) type Attempt<'a, T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send + 'a>>;

/// Runs `attempt` until it succeeds, is refused, or `config.retry_for` after
/// `wait` has passed. Each attempt is given `state` (what it may change
/// between attempts, such as a session's stream) and the part of `wait`
/// that is left (how long the server may keep it in line), and is cut off
/// after that plus `config.attempt_timeout`.
pub(crate) async fn retry<S, T>(
    config: &ClientConfig,
    wait: Duration,
    state: &mut S,
    mut attempt: impl FnMut(&mut S, Duration) -> Attempt<'_, T>,
) -> Result<T, ClientError> {
    let wait_until = Instant::now() + wait;
    let deadline = wait_until + config.retry_for;
    let mut backoff = Backoff::new(config);
    loop {
        let left = wait_until.saturating_duration_since(Instant::now());
        let status =
            match tokio::time::timeout(left + config.attempt_timeout, attempt(state, left)).await {
                Ok(Ok(done)) => return Ok(done),
                Ok(Err(status)) if !retryable(&status) => return Err(ClientError::Refused(status)),
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded("the attempt timed out"),
            };
        tracing::debug!(code = ?status.code(), "call failed; retrying");
        if !backoff.sleep_before(deadline).await {
            return Err(ClientError::Unreachable(status));
        }
    }
}

/// Whether a failed call may be retried: the coordinator did not refuse it,
/// the transport failed (and idempotency keys make retrying safe).
pub(crate) fn retryable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled => true,
        // tonic reports a connection that broke mid-call ("h2 protocol
        // error: …") as INTERNAL, with the transport's error as its source;
        // a status the server sent never has one.
        Code::Internal => std::error::Error::source(status).is_some(),
        _ => false,
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_broken_connection_is_retried_and_a_refusal_is_not() {
        assert!(retryable(&Status::unavailable("not the leader")));
        assert!(!retryable(&Status::internal("the server refused")));
        assert!(!retryable(&Status::invalid_argument("resource")));
        let mut broken =
            Status::internal("h2 protocol error: error reading a body from connection");
        broken.set_source(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(retryable(&broken));
    }
}
