//! Idempotency keys: run a side effect at most once per key, and replay its
//! outcome to every retry.
//!
//! The pattern is Stripe's. A client picks a key for one logical request
//! (`charge order 17`) and sends it with every attempt. The server records
//! `key → outcome` around the side effect:
//!
//! 1. If the key has a recorded outcome, return it: the side effect does not
//!    run again ([`Executed::replayed`] says so).
//! 2. Otherwise durably mark the key *started*, run the side effect, and
//!    durably record its outcome before answering.
//!
//! # Rules
//!
//! | situation                                              | [`IdempotencyStore::execute`]               |
//! |--------------------------------------------------------|---------------------------------------------|
//! | new key                                                | runs the side effect, records the outcome   |
//! | key with an outcome, same fingerprint                  | returns the outcome, does not run            |
//! | key with an outcome or a start, other fingerprint      | [`IdempotencyError::Mismatch`]              |
//! | key still running in this process                      | [`IdempotencyError::InProgress`]            |
//! | key started but never finished (crash, cancellation, [`Effect::Unknown`]) | [`IdempotencyError::Interrupted`] |
//! | side effect says [`Effect::Retryable`]                 | nothing recorded; the next attempt runs it  |
//! | key older than the retention period                    | as if new                                   |
//!
//! The *fingerprint* identifies the request the key was first used with
//! (for example a hash of its canonical body); reusing a key for a different
//! request is a client bug and is refused rather than answered with another
//! request's outcome.
//!
//! # Interrupted runs
//!
//! If the process dies (or the `execute` future is dropped) while a side
//! effect runs, the key stays marked *started* and nobody knows whether the
//! side effect happened: it may have charged the card just before the crash.
//! Running it again could do it twice, so the store refuses:
//! [`IdempotencyError::Interrupted`] tells the caller to reconcile with the
//! downstream system (look the charge up) and then settle the key with
//! [`IdempotencyStore::resolve`]: record the outcome it found, or release
//! the key so the next attempt runs the side effect. This is what Stripe
//! does with requests interrupted mid-flight. A side effect that itself
//! cannot tell whether it took effect (a timeout after sending) returns
//! [`Effect::Unknown`] to get the same treatment.
//!
//! # Outcomes
//!
//! Outcomes are bytes ([`IdempotencyStore::execute`]) or any serde type
//! stored as JSON ([`IdempotencyStore::execute_json`]). A *final failure*
//! (the card was declined) is an outcome like any other: return
//! [`Effect::Final`] with the failure encoded in it (for example a JSON
//! `Result`), so that retries see the same decline. Only
//! [`Effect::Retryable`] failures are forgotten.
//!
//! # Durability and concurrency
//!
//! The *started* marker is flushed before the side effect runs, and the
//! outcome is flushed before `execute` returns, through a shared
//! [`GroupFlusher`] (concurrent executes share flushes). Both survive
//! `kill -9`; like everything on sled 0.34, they can be lost in a machine
//! crash within sled's `flush_every_ms` (~500 ms), because sled's `flush()`
//! does not `fsync` (see [the crate docs](crate#durability-sledguard)). A lost *started* marker is the
//! dangerous case: a retry after such a crash runs the side effect again.
//!
//! An in-memory in-flight set makes a concurrent duplicate fail fast with
//! [`IdempotencyError::InProgress`] instead of running twice; sled allows one
//! process per data directory, so the set sees every attempt.
//!
//! # Expiry
//!
//! Each record stores the wall-clock time it was written. After the
//! retention period ([`DEFAULT_RETENTION`], 24 h, see
//! [`IdempotencyStore::with_retention`]) a key counts as new again, and
//! [`IdempotencyStore::collect_expired`] deletes it. Records survive
//! restarts, so a server should call `collect_expired` periodically (say
//! every few minutes) from a background task. Time comes from a [`Clock`],
//! so tests move it instead of sleeping.
//!
//! The same rules hold for keys kept in PostgreSQL
//! ([`crate::pg::PgIdempotencyStore`], feature `postgres`), which shares
//! this module's types.
//!
//! # Example
//!
#![cfg_attr(feature = "sled", doc = "```")]
#![cfg_attr(not(feature = "sled"), doc = "```ignore")]
//! use leasehold_guard::idempotency::{Effect, IdempotencyStore};
//! use std::convert::Infallible;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let db = sled::Config::new().temporary(true).open()?;
//! let store = IdempotencyStore::open(&db)?;
//!
//! let charge = || async { Effect::<Infallible>::Final(b"charge ch_1: 5 EUR".to_vec()) };
//! let first = store.execute("order-17", b"sha256 of the request", charge).await?;
//! let retry = store.execute("order-17", b"sha256 of the request", charge).await?;
//! assert!(!first.replayed && retry.replayed);
//! assert_eq!(first.outcome, retry.outcome);
//! # Ok(()) }
//! ```

#[cfg(feature = "sled")]
use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[cfg(feature = "sled")]
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[cfg(feature = "sled")]
use crate::{FlushError, GroupFlusher};

/// The default name of the tree holding the records.
pub const DEFAULT_TREE: &str = "leasehold.idempotency";
/// How long a key is remembered by default: 24 hours, as Stripe does.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// Where the store reads the wall-clock time.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// What a side effect reports to [`IdempotencyStore::execute`].
///
/// `E` is the side effect's error type, `O` its outcome (bytes, or a serde
/// type for [`IdempotencyStore::execute_json`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect<E, O = Vec<u8>> {
    /// The side effect reached its final outcome: a success, or a failure
    /// that will not change on retry (a declined card). Recorded, and
    /// returned to every retry of the key.
    Final(O),
    /// The side effect failed **without taking effect** (it never reached
    /// the downstream system, or that system rejected it atomically), so
    /// running it again is safe. Nothing is recorded, the key is released,
    /// and `execute` returns [`IdempotencyError::Failed`].
    Retryable(E),
    /// The side effect cannot tell whether it took effect (a timeout after
    /// sending). The key stays *started*, `execute` returns
    /// [`IdempotencyError::OutcomeUnknown`], and retries get
    /// [`IdempotencyError::Interrupted`] until [`IdempotencyStore::resolve`].
    Unknown(E),
}

/// The result of [`IdempotencyStore::execute`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Executed<O = Vec<u8>> {
    /// The recorded outcome.
    pub outcome: O,
    /// `true` if the outcome was recorded by an earlier attempt and the side
    /// effect did not run now (Stripe's `Idempotent-Replayed: true`).
    pub replayed: bool,
    /// When the outcome was recorded (millisecond precision).
    pub recorded_at: SystemTime,
}

/// How [`IdempotencyStore::resolve`] settles an interrupted key, after the
/// caller has checked what really happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The side effect did happen, with this outcome: record it, and replay
    /// it to every retry.
    Record(Vec<u8>),
    /// The side effect did not happen: forget the key, so the next attempt
    /// runs it.
    Release,
}

/// What can go wrong with an idempotent execution. `E` is the side effect's
/// error type.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError<E = Infallible> {
    /// The key is empty or too long.
    #[error("invalid idempotency key: {reason}")]
    InvalidKey {
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The key was first used for a different request (another fingerprint).
    #[error(
        "idempotency key {key:?} was already used for a different request; use a new key for a \
         new request"
    )]
    Mismatch {
        /// The key.
        key: String,
    },
    /// Another attempt with this key is running right now.
    #[error(
        "a request with idempotency key {key:?} is still in progress; retry after it finishes"
    )]
    InProgress {
        /// The key.
        key: String,
    },
    /// An earlier attempt started the side effect and never recorded an
    /// outcome (the process crashed, the attempt was cancelled, or the side
    /// effect reported [`Effect::Unknown`]). It may or may not have happened.
    #[error(
        "an earlier request with idempotency key {key:?} started at {} and never recorded an \
         outcome, so its side effect may or may not have happened; check the downstream system, \
         then settle the key with `resolve` (record the outcome, or release the key)",
        humantime::format_rfc3339_millis(*.started_at)
    )]
    Interrupted {
        /// The key.
        key: String,
        /// When the interrupted attempt started.
        started_at: SystemTime,
    },
    /// The side effect failed without taking effect ([`Effect::Retryable`]);
    /// nothing was recorded and the key is free for a retry.
    #[error("the side effect failed and may be retried with the same key: {0}")]
    Failed(E),
    /// The side effect reported [`Effect::Unknown`]; the key stays started.
    #[error(
        "the side effect for idempotency key {key:?} may or may not have happened ({error}); \
         check the downstream system, then settle the key with `resolve`"
    )]
    OutcomeUnknown {
        /// The key.
        key: String,
        /// What the side effect reported.
        error: E,
    },
    /// [`IdempotencyStore::resolve`] was called on a key that is not waiting
    /// to be settled.
    #[error(
        "idempotency key {key:?} has no interrupted attempt to resolve (it is unknown, expired \
         or already has an outcome)"
    )]
    NotInterrupted {
        /// The key.
        key: String,
    },
    /// A stored record cannot be decoded.
    #[error(
        "corrupt idempotency record for key {key:?}: {reason}; the tree must only be written \
         by this store"
    )]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A typed outcome could not be converted to or from JSON
    /// ([`IdempotencyStore::execute_json`]).
    #[error("the outcome cannot be converted to or from JSON: {0}")]
    Encoding(#[source] serde_json::Error),
    /// sled failed.
    #[cfg(feature = "sled")]
    #[error("storage error in the idempotency store: {0}; check the disk and the data directory")]
    Storage(#[from] sled::Error),
    /// A record could not be flushed.
    #[cfg(feature = "sled")]
    #[error(transparent)]
    Flush(#[from] FlushError),
    /// PostgreSQL failed ([`crate::pg::PgIdempotencyStore`]).
    #[cfg(feature = "postgres")]
    #[error(transparent)]
    Postgres(#[from] crate::pg::PgError),
}

impl<E> IdempotencyError<E> {
    /// Changes the side effect's error type.
    fn map<F>(self, f: impl FnOnce(E) -> F) -> IdempotencyError<F> {
        use IdempotencyError::*;
        match self {
            InvalidKey { reason } => InvalidKey { reason },
            Mismatch { key } => Mismatch { key },
            InProgress { key } => InProgress { key },
            Interrupted { key, started_at } => Interrupted { key, started_at },
            Failed(e) => Failed(f(e)),
            OutcomeUnknown { key, error } => OutcomeUnknown {
                key,
                error: f(error),
            },
            NotInterrupted { key } => NotInterrupted { key },
            Corrupt { key, reason } => Corrupt { key, reason },
            Encoding(e) => Encoding(e),
            #[cfg(feature = "sled")]
            Storage(e) => Storage(e),
            #[cfg(feature = "sled")]
            Flush(e) => Flush(e),
            #[cfg(feature = "postgres")]
            Postgres(e) => Postgres(e),
        }
    }
}

/// The error of a typed side effect while it runs as a bytes one
/// (`execute_json`): its own, or the JSON encoding's.
pub(crate) enum JsonFailure<E> {
    User(E),
    Json(serde_json::Error),
}

/// A typed side effect as a bytes one: a final outcome is encoded as JSON.
/// An outcome that cannot be encoded has still happened, so it counts as
/// [`Effect::Unknown`] (the key stays started).
pub(crate) async fn as_json_effect<T: Serialize, E>(
    effect: impl Future<Output = Effect<E, T>>,
) -> Effect<JsonFailure<E>> {
    match effect.await {
        Effect::Final(value) => match serde_json::to_vec(&value) {
            Ok(bytes) => Effect::Final(bytes),
            Err(e) => Effect::Unknown(JsonFailure::Json(e)),
        },
        Effect::Retryable(e) => Effect::Retryable(JsonFailure::User(e)),
        Effect::Unknown(e) => Effect::Unknown(JsonFailure::User(e)),
    }
}

/// The typed result of an execution whose side effect was [`as_json_effect`].
pub(crate) fn from_json_result<T: DeserializeOwned, E>(
    result: Result<Executed, IdempotencyError<JsonFailure<E>>>,
) -> Result<Executed<T>, IdempotencyError<E>> {
    let executed = match result {
        Ok(executed) => executed,
        Err(IdempotencyError::OutcomeUnknown {
            error: JsonFailure::Json(e),
            ..
        }) => return Err(IdempotencyError::Encoding(e)),
        Err(e) => {
            return Err(e.map(|e| match e {
                JsonFailure::User(e) => e,
                // Only `OutcomeUnknown` carries a JSON error, handled above.
                JsonFailure::Json(_) => unreachable!("JSON errors are only reported as unknown"),
            }));
        }
    };
    let outcome = serde_json::from_slice(&executed.outcome).map_err(IdempotencyError::Encoding)?;
    Ok(Executed {
        outcome,
        replayed: executed.replayed,
        recorded_at: executed.recorded_at,
    })
}

// Record layout: version (1), state (1), time in unix ms (8, BE),
// fingerprint length (4, BE), fingerprint, outcome (the rest).
#[cfg(feature = "sled")]
const VERSION: u8 = 1;
#[cfg(feature = "sled")]
const STARTED: u8 = 0;
#[cfg(feature = "sled")]
const COMPLETED: u8 = 1;
#[cfg(feature = "sled")]
const HEADER: usize = 14;

#[cfg(feature = "sled")]
struct Record<'a> {
    completed: bool,
    at_ms: u64,
    fingerprint: &'a [u8],
    outcome: &'a [u8],
}

#[cfg(feature = "sled")]
fn encode(state: u8, at_ms: u64, fingerprint: &[u8], outcome: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + fingerprint.len() + outcome.len());
    out.push(VERSION);
    out.push(state);
    out.extend_from_slice(&at_ms.to_be_bytes());
    // Fingerprints are hashes or request bodies, far below 4 GiB.
    out.extend_from_slice(&(fingerprint.len() as u32).to_be_bytes());
    out.extend_from_slice(fingerprint);
    out.extend_from_slice(outcome);
    out
}

#[cfg(feature = "sled")]
fn decode(bytes: &[u8]) -> Result<Record<'_>, &'static str> {
    let header = bytes.get(..HEADER).ok_or("shorter than its header")?;
    if header[0] != VERSION {
        return Err("unknown record version");
    }
    let completed = match header[1] {
        STARTED => false,
        COMPLETED => true,
        _ => return Err("unknown record state"),
    };
    let at_ms = u64::from_be_bytes(header[2..10].try_into().map_err(|_| "bad time")?);
    let fp_len = u32::from_be_bytes(header[10..14].try_into().map_err(|_| "bad length")?);
    let rest = &bytes[HEADER..];
    let fp_len = usize::try_from(fp_len).map_err(|_| "fingerprint too long")?;
    if rest.len() < fp_len {
        return Err("fingerprint longer than the record");
    }
    let (fingerprint, outcome) = rest.split_at(fp_len);
    Ok(Record {
        completed,
        at_ms,
        fingerprint,
        outcome,
    })
}

pub(crate) fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

pub(crate) fn check_key<E>(key: &str) -> Result<(), IdempotencyError<E>> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(IdempotencyError::InvalidKey {
            reason: format!(
                "is {} bytes long; keys must be 1..={MAX_KEY_LEN} bytes",
                key.len()
            ),
        });
    }
    Ok(())
}

/// Removes its key from the in-flight set when dropped, also when the
/// `execute` future is cancelled.
#[cfg(feature = "sled")]
struct Claim<'a> {
    in_flight: &'a Mutex<HashSet<Box<str>>>,
    key: &'a str,
}

#[cfg(feature = "sled")]
impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.in_flight.lock().remove(self.key);
    }
}

/// Records `key → outcome` in a sled tree; see the [module docs](self).
///
/// Cheap to clone; clones share the in-flight set, so concurrent tasks may
/// each hold one.
#[cfg(feature = "sled")]
#[derive(Clone)]
pub struct IdempotencyStore {
    tree: sled::Tree,
    flusher: GroupFlusher,
    in_flight: Arc<Mutex<HashSet<Box<str>>>>,
    retention: Duration,
    clock: Clock,
}

#[cfg(feature = "sled")]
impl std::fmt::Debug for IdempotencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyStore")
            .field("retention", &self.retention)
            .field("in_flight", &self.in_flight.lock().len())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "sled")]
impl IdempotencyStore {
    /// Opens the store in `db`'s [`DEFAULT_TREE`], with its own flusher
    /// thread, [`DEFAULT_RETENTION`] and the system clock.
    pub fn open(db: &sled::Db) -> Result<Self, IdempotencyError> {
        let flusher = GroupFlusher::start(db.clone()).map_err(sled::Error::Io)?;
        Self::open_with(db, DEFAULT_TREE, flusher)
    }

    /// Opens the store in the tree `tree_name`, sharing `flusher` (which must
    /// flush the same database).
    pub fn open_with(
        db: &sled::Db,
        tree_name: &str,
        flusher: GroupFlusher,
    ) -> Result<Self, IdempotencyError> {
        Ok(IdempotencyStore {
            tree: db.open_tree(tree_name)?,
            flusher,
            in_flight: Arc::default(),
            retention: DEFAULT_RETENTION,
            clock: Arc::new(SystemTime::now),
        })
    }

    /// Sets how long keys are remembered.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Sets where the store reads the time (tests use a fake clock).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn expired(&self, at_ms: u64, now: SystemTime) -> bool {
        let retention = u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX);
        to_ms(now) >= at_ms.saturating_add(retention)
    }

    fn claim<'a, E>(&'a self, key: &'a str) -> Result<Claim<'a>, IdempotencyError<E>> {
        if !self.in_flight.lock().insert(key.into()) {
            return Err(IdempotencyError::InProgress { key: key.into() });
        }
        Ok(Claim {
            in_flight: &self.in_flight,
            key,
        })
    }

    /// Runs `side_effect` at most once for `key`; see the table in the
    /// [module docs](self).
    ///
    /// `fingerprint` identifies the request (e.g. a hash of its body); a
    /// retry must send the same one. The *started* marker is flushed before
    /// `side_effect` runs and the outcome before this returns.
    ///
    /// If a storage or flush error happens after the side effect ran, the
    /// key stays started and retries get [`IdempotencyError::Interrupted`].
    pub async fn execute<E, F, Fut>(
        &self,
        key: &str,
        fingerprint: &[u8],
        side_effect: F,
    ) -> Result<Executed, IdempotencyError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Effect<E>>,
    {
        check_key(key)?;
        let _claim = self.claim(key)?;
        let now = (self.clock)();
        if let Some(stored) = self.tree.get(key)? {
            let record = decode(&stored).map_err(|reason| IdempotencyError::Corrupt {
                key: key.into(),
                reason,
            })?;
            if !self.expired(record.at_ms, now) {
                if record.fingerprint != fingerprint {
                    return Err(IdempotencyError::Mismatch { key: key.into() });
                }
                if record.completed {
                    return Ok(Executed {
                        outcome: record.outcome.to_vec(),
                        replayed: true,
                        recorded_at: from_ms(record.at_ms),
                    });
                }
                return Err(IdempotencyError::Interrupted {
                    key: key.into(),
                    started_at: from_ms(record.at_ms),
                });
            }
        }

        let started = encode(STARTED, to_ms(now), fingerprint, &[]);
        self.tree.insert(key, started)?;
        if let Err(e) = self.flusher.wait_flushed().await {
            // The side effect has not run: the key is free again.
            if let Err(e) = self.tree.remove(key) {
                tracing::warn!(key, error = %e, "could not remove an idempotency marker");
            }
            return Err(e.into());
        }

        match side_effect().await {
            Effect::Final(outcome) => {
                let at_ms = to_ms((self.clock)());
                self.tree
                    .insert(key, encode(COMPLETED, at_ms, fingerprint, &outcome))?;
                self.flusher.wait_flushed().await?;
                Ok(Executed {
                    outcome,
                    replayed: false,
                    recorded_at: from_ms(at_ms),
                })
            }
            Effect::Retryable(e) => {
                // Not flushed: if the removal is lost in a crash, the key
                // reads as interrupted, which errs on the safe side.
                self.tree.remove(key)?;
                Err(IdempotencyError::Failed(e))
            }
            Effect::Unknown(error) => Err(IdempotencyError::OutcomeUnknown {
                key: key.into(),
                error,
            }),
        }
    }

    /// [`IdempotencyStore::execute`] with a typed outcome, stored as JSON.
    ///
    /// A final failure is an outcome: use `T = Result<Success, Failure>` and
    /// return `Effect::Final(Err(failure))`. If the outcome cannot be encoded
    /// (rare with serde_json: maps with non-string keys), the side effect has
    /// run but nothing is recorded: the key stays started and this returns
    /// [`IdempotencyError::Encoding`].
    pub async fn execute_json<T, E, F, Fut>(
        &self,
        key: &str,
        fingerprint: &[u8],
        side_effect: F,
    ) -> Result<Executed<T>, IdempotencyError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Effect<E, T>>,
    {
        let result = self
            .execute(key, fingerprint, || as_json_effect(side_effect()))
            .await;
        from_json_result(result)
    }

    /// Settles a key left [`IdempotencyError::Interrupted`], once the caller
    /// has found out whether its side effect happened: record the outcome it
    /// found, or release the key so the next attempt runs the side effect.
    pub async fn resolve(&self, key: &str, resolution: Resolution) -> Result<(), IdempotencyError> {
        check_key(key)?;
        let _claim = self.claim(key)?;
        let now = (self.clock)();
        let Some(stored) = self.tree.get(key)? else {
            return Err(IdempotencyError::NotInterrupted { key: key.into() });
        };
        let record = decode(&stored).map_err(|reason| IdempotencyError::Corrupt {
            key: key.into(),
            reason,
        })?;
        if record.completed || self.expired(record.at_ms, now) {
            return Err(IdempotencyError::NotInterrupted { key: key.into() });
        }
        match resolution {
            Resolution::Record(outcome) => {
                let completed = encode(COMPLETED, to_ms(now), record.fingerprint, &outcome);
                self.tree.insert(key, completed)?;
            }
            Resolution::Release => {
                self.tree.remove(key)?;
            }
        }
        self.flusher.wait_flushed().await?;
        Ok(())
    }

    /// Deletes every record older than the retention period at `now`, and
    /// returns how many it deleted. Keys in flight are left alone.
    ///
    /// Expired keys already count as new in `execute`; this only reclaims
    /// their space. A server calls it periodically from a background task
    /// (it scans the whole tree, so every few minutes, not every request).
    pub fn collect_expired(&self, now: SystemTime) -> Result<usize, IdempotencyError> {
        let mut removed = 0;
        for item in self.tree.iter() {
            let (key, value) = item?;
            let record = match decode(&value) {
                Ok(record) => record,
                Err(reason) => {
                    tracing::warn!(key = %String::from_utf8_lossy(&key), reason, "skipping a corrupt idempotency record");
                    continue;
                }
            };
            if !self.expired(record.at_ms, now) {
                continue;
            }
            if let Ok(key) = std::str::from_utf8(&key) {
                if self.in_flight.lock().contains(key) {
                    continue;
                }
            }
            // Only if unchanged since we read it: an execute may have
            // reused the expired key meanwhile.
            if self
                .tree
                .compare_and_swap(&key, Some(&value), None::<&[u8]>)?
                .is_ok()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Waits until everything written so far is flushed (survives `kill -9`).
    pub async fn flush(&self) -> Result<(), FlushError> {
        self.flusher.wait_flushed().await
    }
}

#[cfg(all(test, feature = "sled"))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    const FP: &[u8] = b"fingerprint";

    struct Fixture {
        _dir: tempfile::TempDir,
        db: sled::Db,
        store: IdempotencyStore,
        now_ms: Arc<AtomicU64>,
    }

    const T0: u64 = 1_700_000_000_000;

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let now_ms = Arc::new(AtomicU64::new(T0));
        let clock_ms = now_ms.clone();
        let store = IdempotencyStore::open(&db)
            .unwrap()
            .with_clock(Arc::new(move || from_ms(clock_ms.load(Ordering::SeqCst))));
        Fixture {
            _dir: dir,
            db,
            store,
            now_ms,
        }
    }

    /// A side effect that counts its runs and returns `outcome`.
    fn counted<'a>(
        runs: &'a AtomicUsize,
        outcome: &'static [u8],
    ) -> impl FnOnce() -> std::future::Ready<Effect<Infallible>> + 'a {
        move || {
            runs.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Effect::Final(outcome.to_vec()))
        }
    }

    #[tokio::test]
    async fn first_call_runs_and_retries_replay() {
        let f = fixture();
        let runs = AtomicUsize::new(0);
        let first = f
            .store
            .execute("k", FP, counted(&runs, b"ok"))
            .await
            .unwrap();
        assert_eq!(
            first,
            Executed {
                outcome: b"ok".to_vec(),
                replayed: false,
                recorded_at: from_ms(T0)
            }
        );
        f.now_ms.fetch_add(1000, Ordering::SeqCst);
        let retry = f
            .store
            .execute("k", FP, counted(&runs, b"other"))
            .await
            .unwrap();
        assert_eq!(
            retry,
            Executed {
                outcome: b"ok".to_vec(),
                replayed: true,
                recorded_at: from_ms(T0)
            }
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn same_key_other_fingerprint_is_a_mismatch() {
        let f = fixture();
        let runs = AtomicUsize::new(0);
        f.store
            .execute("k", FP, counted(&runs, b"ok"))
            .await
            .unwrap();
        let err = f
            .store
            .execute("k", b"another request", counted(&runs, b"x"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, IdempotencyError::Mismatch { key } if key == "k"),
            "{err:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_duplicate_is_in_progress_and_runs_once() {
        let f = fixture();
        let runs = AtomicUsize::new(0);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let first = f.store.execute("k", FP, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            released.await.unwrap();
            Effect::<Infallible>::Final(b"one".to_vec())
        });
        let second = async {
            // Let the first attempt claim the key and start its side effect.
            while runs.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            let result = f.store.execute("k", FP, counted(&runs, b"two")).await;
            release.send(()).unwrap();
            result
        };
        let (first, second) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(first, second)
        })
        .await
        .unwrap();
        assert_eq!(first.unwrap().outcome, b"one");
        assert!(
            matches!(second, Err(IdempotencyError::InProgress { .. })),
            "{second:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_attempts_run_the_side_effect_once() {
        let f = fixture();
        let runs = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (store, runs) = (f.store.clone(), runs.clone());
                tokio::spawn(async move {
                    store
                        .execute("k", FP, || async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                            Effect::<Infallible>::Final(b"once".to_vec())
                        })
                        .await
                })
            })
            .collect();
        let mut fresh = 0;
        for task in tasks {
            match tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .unwrap()
                .unwrap()
            {
                Ok(executed) => {
                    assert_eq!(executed.outcome, b"once");
                    fresh += usize::from(!executed.replayed);
                }
                Err(IdempotencyError::InProgress { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(fresh, 1);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retryable_failure_is_not_recorded() {
        let f = fixture();
        let err = f
            .store
            .execute("k", FP, || async {
                Effect::Retryable("connection refused")
            })
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            IdempotencyError::Failed("connection refused")
        ));
        let runs = AtomicUsize::new(0);
        let executed = f
            .store
            .execute("k", FP, counted(&runs, b"ok"))
            .await
            .unwrap();
        assert!(!executed.replayed);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn final_failure_is_recorded_and_replayed() {
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct Declined {
            reason: String,
        }
        type Outcome = Result<u32, Declined>;
        let f = fixture();
        let runs = AtomicUsize::new(0);
        let decline = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Effect::<Infallible, Outcome>::Final(Err(Declined {
                reason: "insufficient funds".into(),
            }))
        };
        let first = f.store.execute_json("k", FP, decline).await.unwrap();
        let retry = f
            .store
            .execute_json("k", FP, || async {
                Effect::<Infallible, Outcome>::Final(Ok(5))
            })
            .await
            .unwrap();
        assert_eq!(first.outcome, retry.outcome);
        assert!(
            matches!(retry.outcome, Err(Declined { ref reason }) if reason == "insufficient funds")
        );
        assert!(!first.replayed && retry.replayed);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unknown_outcome_is_interrupted_until_resolved() {
        let f = fixture();
        let err = f
            .store
            .execute("k", FP, || async {
                Effect::Unknown("timed out after sending")
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err, IdempotencyError::OutcomeUnknown { .. }),
            "{err:?}"
        );

        let runs = AtomicUsize::new(0);
        let err = f
            .store
            .execute("k", FP, counted(&runs, b"x"))
            .await
            .unwrap_err();
        match &err {
            IdempotencyError::Interrupted { key, started_at } => {
                assert_eq!((key.as_str(), *started_at), ("k", from_ms(T0)));
            }
            other => panic!("expected Interrupted, got {other:?}"),
        }
        assert!(err.to_string().contains("resolve"), "{err}");
        assert_eq!(runs.load(Ordering::SeqCst), 0);

        // The caller found the charge downstream and records it.
        f.store
            .resolve("k", Resolution::Record(b"found".to_vec()))
            .await
            .unwrap();
        let executed = f
            .store
            .execute("k", FP, counted(&runs, b"x"))
            .await
            .unwrap();
        assert_eq!(
            (executed.outcome.as_slice(), executed.replayed),
            (&b"found"[..], true)
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        // Nothing left to resolve.
        let err = f.store.resolve("k", Resolution::Release).await.unwrap_err();
        assert!(matches!(err, IdempotencyError::NotInterrupted { .. }));
    }

    #[tokio::test]
    async fn cancelled_attempt_is_interrupted_and_can_be_released() {
        let f = fixture();
        let pending = f.store.execute("k", FP, || async {
            std::future::pending::<Effect<Infallible>>().await
        });
        // The attempt starts its side effect, then is dropped mid-way.
        assert!(tokio::time::timeout(Duration::from_millis(50), pending)
            .await
            .is_err());
        let runs = AtomicUsize::new(0);
        let err = f
            .store
            .execute("k", FP, counted(&runs, b"x"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, IdempotencyError::Interrupted { .. }),
            "{err:?}"
        );

        // The caller found that nothing happened downstream.
        f.store.resolve("k", Resolution::Release).await.unwrap();
        let executed = f
            .store
            .execute("k", FP, counted(&runs, b"ran"))
            .await
            .unwrap();
        assert!(!executed.replayed);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn records_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let runs = AtomicUsize::new(0);
        {
            let db = sled::open(dir.path()).unwrap();
            let store = IdempotencyStore::open(&db).unwrap();
            store
                .execute("done", FP, counted(&runs, b"ok"))
                .await
                .unwrap();
            // A crash in the middle of the side effect: the future never finishes.
            let crashed = store.execute("crashed", FP, || async {
                std::future::pending::<Effect<Infallible>>().await
            });
            assert!(tokio::time::timeout(Duration::from_millis(50), crashed)
                .await
                .is_err());
        }
        let db = crate::tests::reopen(dir.path());
        let store = IdempotencyStore::open(&db).unwrap();
        let replay = store
            .execute("done", FP, counted(&runs, b"x"))
            .await
            .unwrap();
        assert_eq!(
            (replay.outcome.as_slice(), replay.replayed),
            (&b"ok"[..], true)
        );
        let err = store
            .execute("crashed", FP, counted(&runs, b"x"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, IdempotencyError::Interrupted { .. }),
            "{err:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn keys_expire_after_the_retention_period() {
        let f = fixture();
        let store = f.store.clone().with_retention(Duration::from_secs(60));
        let runs = AtomicUsize::new(0);
        store
            .execute("old", FP, counted(&runs, b"1"))
            .await
            .unwrap();
        f.now_ms.fetch_add(30_000, Ordering::SeqCst);
        store
            .execute("young", FP, counted(&runs, b"2"))
            .await
            .unwrap();

        let at = |ms: u64| from_ms(T0 + ms);
        assert_eq!(store.collect_expired(at(59_999)).unwrap(), 0);
        assert_eq!(store.collect_expired(at(60_000)).unwrap(), 1);
        assert_eq!(store.collect_expired(at(60_000)).unwrap(), 0);

        // "young" expired but is not collected yet: it already counts as new.
        f.now_ms.store(T0 + 90_000, Ordering::SeqCst);
        let again = store
            .execute("young", b"new request", counted(&runs, b"3"))
            .await
            .unwrap();
        assert!(!again.replayed);
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        // The default is 24 hours.
        assert_eq!(f.store.retention, DEFAULT_RETENTION);
    }

    #[tokio::test]
    async fn collection_skips_keys_in_flight() {
        let f = fixture();
        let store = f.store.clone().with_retention(Duration::from_secs(1));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let running = store.execute("k", FP, || async {
            released.await.unwrap();
            Effect::<Infallible>::Final(b"done".to_vec())
        });
        let collect = async {
            // Let the attempt write its marker, then collect far in the future.
            while store.in_flight.lock().is_empty() {
                tokio::task::yield_now().await;
            }
            tokio::task::yield_now().await;
            let removed = store.collect_expired(from_ms(T0 + 3_600_000)).unwrap();
            release.send(()).unwrap();
            removed
        };
        let (executed, removed) = tokio::join!(running, collect);
        assert_eq!(removed, 0);
        assert!(!executed.unwrap().replayed);
    }

    #[tokio::test]
    async fn invalid_keys_are_refused() {
        let f = fixture();
        let runs = AtomicUsize::new(0);
        for key in [String::new(), "k".repeat(MAX_KEY_LEN + 1)] {
            let err = f
                .store
                .execute(&key, FP, counted(&runs, b"x"))
                .await
                .unwrap_err();
            assert!(
                matches!(err, IdempotencyError::InvalidKey { .. }),
                "{err:?}"
            );
        }
        let longest = "k".repeat(MAX_KEY_LEN);
        f.store
            .execute(&longest, FP, counted(&runs, b"x"))
            .await
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn corrupt_records_are_reported() {
        let f = fixture();
        f.db.open_tree(DEFAULT_TREE)
            .unwrap()
            .insert("k", &b"\x09junk"[..])
            .unwrap();
        let runs = AtomicUsize::new(0);
        let err = f
            .store
            .execute("k", FP, counted(&runs, b"x"))
            .await
            .unwrap_err();
        assert!(matches!(err, IdempotencyError::Corrupt { .. }), "{err:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        // Collection leaves it for an operator.
        assert_eq!(f.store.collect_expired(from_ms(u64::MAX / 2)).unwrap(), 0);
    }

    #[test]
    fn record_layout_round_trips() {
        let bytes = encode(COMPLETED, 42, b"fp", b"outcome");
        let record = decode(&bytes).unwrap();
        assert!(record.completed);
        assert_eq!(
            (record.at_ms, record.fingerprint, record.outcome),
            (42, &b"fp"[..], &b"outcome"[..])
        );
        assert!(decode(&bytes[..HEADER - 1]).is_err());
        assert!(decode(&encode(7, 0, b"", b"")).is_err());
        let mut truncated = encode(STARTED, 1, b"fingerprint", b"");
        truncated.truncate(HEADER + 3);
        assert!(decode(&truncated).is_err());
    }
}
