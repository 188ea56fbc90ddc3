//! The rule every guard applies, as a pure function, and the errors of a
//! guarded write.

use std::convert::Infallible;

/// A token older than the resource's high-water mark: the pure form of
/// [`GuardError::StaleToken`], returned by [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "stale fencing token: offered {offered}, highest accepted {highest}; the lease that \
     issued this token was superseded: stop writing and re-acquire"
)]
pub struct Stale {
    /// The token the writer offered.
    pub offered: u64,
    /// The highest token accepted so far.
    pub highest: u64,
}

/// Why [`check`] accepted a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// No token was accepted for the resource before; the mark becomes this one.
    First,
    /// The token equals the mark: the same lease writing again.
    Same,
    /// The token is newer than the mark, which becomes this token.
    Newer {
        /// The mark before this write.
        previous: u64,
    },
}

impl Admitted {
    /// Whether the mark must be updated to the offered token.
    pub fn raises_mark(self) -> bool {
        !matches!(self, Admitted::Same)
    }
}

/// The guard's rule as a pure function: may a write offering `offered` go
/// ahead when the highest token accepted so far is `highest`?
///
/// Equal tokens are accepted (one lease may write many times); older ones
/// are [`Stale`]. The caller must update the mark to `offered` when the
/// result [raises the mark](Admitted::raises_mark), atomically with the
/// write.
///
/// ```
/// use leasehold_guard::{check, Admitted, Stale};
///
/// assert_eq!(check(None, 7), Ok(Admitted::First));
/// assert_eq!(check(Some(7), 7), Ok(Admitted::Same));
/// assert_eq!(check(Some(7), 9), Ok(Admitted::Newer { previous: 7 }));
/// assert_eq!(check(Some(9), 7), Err(Stale { offered: 7, highest: 9 }));
/// ```
#[inline]
pub fn check(highest: Option<u64>, offered: u64) -> Result<Admitted, Stale> {
    match highest {
        None => Ok(Admitted::First),
        Some(h) if offered == h => Ok(Admitted::Same),
        Some(h) if offered > h => Ok(Admitted::Newer { previous: h }),
        Some(h) => Err(Stale {
            offered,
            highest: h,
        }),
    }
}

/// What can go wrong with a guarded write. `E` is the error type with which
/// the caller's own closure may abort the write ([`Infallible`] if it cannot).
#[derive(Debug, thiserror::Error)]
pub enum GuardError<E = Infallible> {
    /// The offered token is older than one already accepted for the resource;
    /// nothing was written.
    #[error(
        "stale fencing token for resource {resource:?}: offered {offered}, highest accepted \
         {highest}; the lease that issued this token was superseded: stop writing and re-acquire"
    )]
    StaleToken {
        /// The resource the write was fenced by.
        resource: String,
        /// The token the writer offered.
        offered: u64,
        /// The highest token accepted for the resource so far.
        highest: u64,
    },
    /// The caller's closure aborted the write; nothing was written and the
    /// mark did not move.
    #[error("the guarded write was aborted by its closure: {0}")]
    Aborted(E),
    /// The stored mark of a resource is not 8 bytes: the guard's tree was
    /// written by something else.
    #[error(
        "corrupt high-water mark for resource {resource:?}: expected 8 bytes, found {len}; \
         the guard's tree must only be written by the guard: restore it from a backup"
    )]
    Corrupt {
        /// The resource whose mark is unreadable.
        resource: String,
        /// The length of the stored value.
        len: usize,
    },
    /// sled failed (I/O error, corruption, trees from two databases in one
    /// transaction).
    #[cfg(feature = "sled")]
    #[error("storage error in the fencing guard: {0}; check the disk and the data directory")]
    Storage(#[from] sled::Error),
    /// The write committed but could not be made durable.
    #[cfg(feature = "sled")]
    #[error(transparent)]
    Flush(#[from] FlushError),
    /// PostgreSQL refused the input or failed ([`crate::pg::PgGuard`]);
    /// nothing was written.
    #[cfg(feature = "postgres")]
    #[error(transparent)]
    Postgres(#[from] crate::pg::PgError),
}

#[cfg(feature = "sled")]
use crate::FlushError;
