//! The coordinator's clock: handed to it, never read behind its back.
//!
//! The state machine takes the time as an argument ([`Now`]); this is where
//! the coordinator gets it. It runs on Tokio's clock, so a test can freeze
//! time with `tokio::time::pause()` and move it with `advance()`: expiry,
//! waits and the timer then follow the test, not the wall.
//!
//! Wall-clock time (`Now::unix_ms`, used for idempotency-key retention and
//! the times shown to operators) is read once, when the clock starts, and
//! then advances with the monotonic clock. A step of the system clock while
//! the coordinator runs therefore moves nothing; a restart reads it again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::state::Now;

/// A monotonic clock with a wall-clock anchor. Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
    /// Kept below the millisecond: truncating it and the monotonic time
    /// separately could read 1 ms earlier than the wall clock.
    unix_at_epoch: Duration,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::start()
    }
}

impl Clock {
    /// A clock whose monotonic time starts at zero now, on Tokio's clock
    /// (paused and advanced by tests that ask for it).
    pub fn start() -> Clock {
        Clock {
            epoch: Instant::now(),
            unix_at_epoch: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        }
    }

    /// Time since the clock started.
    pub fn elapsed(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The time, as the state machine takes it.
    pub fn now(&self) -> Now {
        let mono = self.elapsed();
        Now {
            mono,
            unix_ms: (self.unix_at_epoch + mono).as_millis() as u64,
        }
    }

    /// The instant at which the clock reads `mono`, for sleeping until it.
    pub fn instant_at(&self, mono: Duration) -> Instant {
        self.epoch + mono
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_tokios_paused_clock() {
        let clock = Clock::start();
        let start = clock.now();
        assert_eq!(start.mono, Duration::ZERO);
        tokio::time::advance(Duration::from_secs(90)).await;
        let later = clock.now();
        assert_eq!(later.mono, Duration::from_secs(90));
        assert_eq!(later.unix_ms - start.unix_ms, 90_000);
        assert_eq!(clock.instant_at(later.mono), Instant::now());
    }
}
