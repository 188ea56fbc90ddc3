//! The guard's counters, through the `metrics` facade (feature `metrics`).
//!
//! A storage service that embeds a guard and exports metrics (for example
//! with `metrics-exporter-prometheus`) gets, in its own `/metrics`:
//!
//! | name | counts |
//! |---|---|
//! | [`WRITES_ACCEPTED`] | writes whose token passed the check |
//! | [`REFUSED_STALE`] | writes refused for a token older than the mark |
//! | [`REFUSED_MALFORMED`] | requests refused for a missing or malformed fence (counted by `fenced_kv`; call [`refused_malformed`] in your own edge) |
//!
//! The handles are taken from the process's recorder when a guard is
//! created, so install the recorder first; counting is then one atomic add.
//! Without the feature (or without a recorder) every call is a no-op, and
//! the crate does not depend on `metrics` at all.

/// Writes whose token passed the check (counter).
pub const WRITES_ACCEPTED: &str = "leasehold_guard_writes_accepted_total";
/// Writes refused for a stale token (counter).
pub const REFUSED_STALE: &str = "leasehold_guard_writes_refused_stale_total";
/// Requests refused for a missing or malformed fence (counter).
pub const REFUSED_MALFORMED: &str = "leasehold_guard_writes_refused_malformed_total";

use crate::GuardError;

/// One guard's counter handles.
#[derive(Clone)]
pub(crate) struct GuardCounters {
    #[cfg(feature = "metrics")]
    accepted: metrics::Counter,
    #[cfg(feature = "metrics")]
    stale: metrics::Counter,
}

impl std::fmt::Debug for GuardCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GuardCounters")
    }
}

impl GuardCounters {
    /// Handles from the installed recorder (no-ops without one).
    pub(crate) fn new() -> Self {
        #[cfg(feature = "metrics")]
        {
            describe();
            GuardCounters {
                accepted: metrics::counter!(WRITES_ACCEPTED),
                stale: metrics::counter!(REFUSED_STALE),
            }
        }
        #[cfg(not(feature = "metrics"))]
        GuardCounters {}
    }

    /// Counts a write's outcome: accepted, stale, or neither (another error).
    #[inline]
    pub(crate) fn observe<T, E>(&self, result: &Result<T, GuardError<E>>) {
        #[cfg(feature = "metrics")]
        match result {
            Ok(_) => self.accepted.increment(1),
            Err(GuardError::StaleToken { .. }) => self.stale.increment(1),
            Err(_) => {}
        }
        #[cfg(not(feature = "metrics"))]
        let _ = result;
    }
}

/// Counts one request refused for a missing or malformed fence.
pub fn refused_malformed() {
    #[cfg(feature = "metrics")]
    metrics::counter!(REFUSED_MALFORMED).increment(1);
}

#[cfg(feature = "metrics")]
fn describe() {
    metrics::describe_counter!(
        WRITES_ACCEPTED,
        "Writes whose fencing token passed the guard's check."
    );
    metrics::describe_counter!(
        REFUSED_STALE,
        "Writes refused for a fencing token older than the highest accepted."
    );
    metrics::describe_counter!(
        REFUSED_MALFORMED,
        "Requests refused for a missing or malformed fence."
    );
}
