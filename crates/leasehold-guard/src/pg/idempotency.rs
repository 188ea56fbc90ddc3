//! Idempotency keys in PostgreSQL, with the sled store's semantics and
//! types ([`crate::idempotency`]).
//!
//! # How
//!
//! A key is a row of `leasehold_idempotency` (`key`, `completed`, `at_ms`,
//! `fingerprint`, `outcome`). The sled store knows a key is *in progress*
//! from an in-memory set, which works because sled has one process per
//! database; PostgreSQL has many clients, so the store uses what the server
//! offers instead: a **session advisory lock** per key,
//! `pg_try_advisory_lock(hashtextextended('leasehold.idempotency:' || key, 0))`,
//! held by the connection that runs the side effect.
//!
//! - Held by someone else: [`IdempotencyError::InProgress`], whatever the
//!   process.
//! - Not held, and the row says *started*: the attempt that wrote it is
//!   gone (a crash, a cancelled future, a lost connection: the server drops
//!   a session's advisory locks when the session ends), so
//!   [`IdempotencyError::Interrupted`].
//!
//! The *started* row is committed (autocommit, so durable as PostgreSQL's
//! commits are: with `synchronous_commit = on`, on disk) before the side
//! effect runs, and the outcome is committed before `execute` returns.
//!
//! An `execute` holds one pooled connection while its side effect runs, so
//! the pool's size bounds how many run at once. If the `execute` future is
//! dropped mid-way, its connection is closed rather than returned to the
//! pool, which releases the lock: the key then reads as interrupted.
//!
//! [`PgIdempotencyStore::collect_expired`] deletes expired rows in one
//! statement, skipping keys whose lock is held (an attempt reusing the
//! expired key right now).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Object, Pool};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_postgres::types::Type;

use super::PgError;
use crate::idempotency::{
    as_json_effect, check_key, from_json_result, from_ms, to_ms, Clock, Effect, Executed,
    IdempotencyError, Resolution, DEFAULT_RETENTION,
};

const TRY_LOCK_SQL: &str =
    "SELECT pg_try_advisory_lock(hashtextextended('leasehold.idempotency:' || $1, 0))";
const UNLOCK_SQL: &str =
    "SELECT pg_advisory_unlock(hashtextextended('leasehold.idempotency:' || $1, 0))";
const READ_SQL: &str = "SELECT completed, at_ms, fingerprint, outcome \
                        FROM leasehold_idempotency WHERE key = $1";
const START_SQL: &str = "INSERT INTO leasehold_idempotency (key, completed, at_ms, fingerprint) \
                         VALUES ($1, false, $2, $3) \
                         ON CONFLICT (key) DO UPDATE SET completed = false, \
                         at_ms = EXCLUDED.at_ms, fingerprint = EXCLUDED.fingerprint, outcome = ''";
const COMPLETE_SQL: &str = "UPDATE leasehold_idempotency \
                            SET completed = true, at_ms = $2, outcome = $3 WHERE key = $1";
const DELETE_SQL: &str = "DELETE FROM leasehold_idempotency WHERE key = $1";
/// The `CASE` makes the lock be tried only on expired rows (`AND` does not
/// fix the order in which PostgreSQL evaluates its operands).
const COLLECT_SQL: &str = "DELETE FROM leasehold_idempotency WHERE at_ms <= $1 AND CASE \
     WHEN at_ms <= $1 THEN \
     pg_try_advisory_xact_lock(hashtextextended('leasehold.idempotency:' || key, 0)) \
     ELSE false END";

impl<E> From<tokio_postgres::Error> for IdempotencyError<E> {
    fn from(e: tokio_postgres::Error) -> Self {
        IdempotencyError::Postgres(e.into())
    }
}

fn sql_ms(t: SystemTime) -> i64 {
    i64::try_from(to_ms(t)).unwrap_or(i64::MAX)
}

/// A key's advisory lock, held by one pooled connection.
struct KeyLock<'k> {
    /// `None` once released.
    client: Option<Object>,
    key: &'k str,
}

impl<'k> KeyLock<'k> {
    /// Takes the key's lock, or [`IdempotencyError::InProgress`] if another
    /// session holds it.
    async fn acquire<E>(pool: &Pool, key: &'k str) -> Result<KeyLock<'k>, IdempotencyError<E>> {
        let client = pool.get().await.map_err(PgError::from)?;
        let row = client
            .query_typed_one(TRY_LOCK_SQL, &[(&key, Type::TEXT)])
            .await?;
        if !row.get::<_, bool>(0) {
            return Err(IdempotencyError::InProgress { key: key.into() });
        }
        Ok(KeyLock {
            client: Some(client),
            key,
        })
    }

    fn client(&self) -> &tokio_postgres::Client {
        // Only `release` and `drop` take it, and both consume the lock.
        self.client
            .as_ref()
            .expect("a held lock has its connection")
    }

    /// Releases the lock and returns the connection to the pool; if the
    /// unlock fails, the connection is closed instead (which releases it).
    async fn release(mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        match client
            .query_typed_one(UNLOCK_SQL, &[(&self.key, Type::TEXT)])
            .await
        {
            Ok(row) if row.get::<_, bool>(0) => drop(client),
            outcome => {
                tracing::warn!(
                    key = self.key,
                    ?outcome,
                    "could not release an idempotency key's lock; closing its connection"
                );
                drop(Object::take(client));
            }
        }
    }
}

impl Drop for KeyLock<'_> {
    /// An attempt dropped mid-way (cancelled, or a panic): close the
    /// connection rather than pool it with the lock still held. The server
    /// then releases the lock, and the key reads as interrupted.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

/// Records `key → outcome` in PostgreSQL (`leasehold_idempotency`), with the
/// rules of [`crate::idempotency`]: a new key runs the side effect, a retry
/// with the same fingerprint gets the recorded outcome, another fingerprint
/// is a [`IdempotencyError::Mismatch`], a concurrent attempt (from any
/// process) is [`IdempotencyError::InProgress`], an attempt that died is
/// [`IdempotencyError::Interrupted`] until [`resolve`](Self::resolve)d, and
/// keys expire after the retention period. See the
/// [module docs](self#how) for how.
///
/// Run [`migrate`](super::migrate) first. Cheap to clone (the pool is
/// shared).
#[derive(Clone)]
pub struct PgIdempotencyStore {
    pool: Pool,
    retention: Duration,
    clock: Clock,
}

impl std::fmt::Debug for PgIdempotencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgIdempotencyStore")
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl PgIdempotencyStore {
    /// The store over `pool`, with [`DEFAULT_RETENTION`] and the system
    /// clock.
    pub fn new(pool: Pool) -> Self {
        PgIdempotencyStore {
            pool,
            retention: DEFAULT_RETENTION,
            clock: Arc::new(SystemTime::now),
        }
    }

    /// Sets how long keys are remembered.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Sets where the store reads the time (tests use a fake clock). Record
    /// times come from this clock, not the server's, as in the sled store.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn expired(&self, at_ms: u64, now: SystemTime) -> bool {
        let retention = u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX);
        to_ms(now) >= at_ms.saturating_add(retention)
    }

    /// Runs `side_effect` at most once for `key`; the rules are those of
    /// [`crate::idempotency::IdempotencyStore::execute`]. The *started* row
    /// is committed before `side_effect` runs and the outcome before this
    /// returns. If recording the outcome fails, the key stays started and
    /// retries get [`IdempotencyError::Interrupted`].
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
        let lock = KeyLock::acquire(&self.pool, key).await?;
        let result = self.execute_locked(&lock, fingerprint, side_effect).await;
        lock.release().await;
        result
    }

    async fn execute_locked<E, F, Fut>(
        &self,
        lock: &KeyLock<'_>,
        fingerprint: &[u8],
        side_effect: F,
    ) -> Result<Executed, IdempotencyError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Effect<E>>,
    {
        let (client, key) = (lock.client(), lock.key);
        let now = (self.clock)();
        let row = client
            .query_typed_opt(READ_SQL, &[(&key, Type::TEXT)])
            .await?;
        if let Some(row) = row {
            let at_ms =
                u64::try_from(row.get::<_, i64>(1)).map_err(|_| IdempotencyError::Corrupt {
                    key: key.into(),
                    reason: "negative time",
                })?;
            if !self.expired(at_ms, now) {
                if row.get::<_, &[u8]>(2) != fingerprint {
                    return Err(IdempotencyError::Mismatch { key: key.into() });
                }
                if row.get::<_, bool>(0) {
                    return Ok(Executed {
                        outcome: row.get(3),
                        replayed: true,
                        recorded_at: from_ms(at_ms),
                    });
                }
                return Err(IdempotencyError::Interrupted {
                    key: key.into(),
                    started_at: from_ms(at_ms),
                });
            }
        }

        client
            .execute_typed(
                START_SQL,
                &[
                    (&key, Type::TEXT),
                    (&sql_ms(now), Type::INT8),
                    (&fingerprint, Type::BYTEA),
                ],
            )
            .await?;

        match side_effect().await {
            Effect::Final(outcome) => {
                let at = (self.clock)();
                client
                    .execute_typed(
                        COMPLETE_SQL,
                        &[
                            (&key, Type::TEXT),
                            (&sql_ms(at), Type::INT8),
                            (&outcome, Type::BYTEA),
                        ],
                    )
                    .await?;
                Ok(Executed {
                    outcome,
                    replayed: false,
                    recorded_at: from_ms(to_ms(at)),
                })
            }
            Effect::Retryable(e) => {
                client
                    .execute_typed(DELETE_SQL, &[(&key, Type::TEXT)])
                    .await?;
                Err(IdempotencyError::Failed(e))
            }
            Effect::Unknown(error) => Err(IdempotencyError::OutcomeUnknown {
                key: key.into(),
                error,
            }),
        }
    }

    /// [`PgIdempotencyStore::execute`] with a typed outcome, stored as JSON
    /// (as [`crate::idempotency::IdempotencyStore::execute_json`]).
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

    /// Settles a key left [`IdempotencyError::Interrupted`]: record the
    /// outcome found downstream, or release the key so the next attempt
    /// runs the side effect. [`IdempotencyError::NotInterrupted`] if the key
    /// is unknown, expired or completed; [`IdempotencyError::InProgress`] if
    /// an attempt holds it.
    pub async fn resolve(&self, key: &str, resolution: Resolution) -> Result<(), IdempotencyError> {
        check_key(key)?;
        let lock = KeyLock::acquire(&self.pool, key).await?;
        let result = self.resolve_locked(&lock, resolution).await;
        lock.release().await;
        result
    }

    async fn resolve_locked(
        &self,
        lock: &KeyLock<'_>,
        resolution: Resolution,
    ) -> Result<(), IdempotencyError> {
        let (client, key) = (lock.client(), lock.key);
        let now = (self.clock)();
        let row = client
            .query_typed_opt(READ_SQL, &[(&key, Type::TEXT)])
            .await?;
        let not_interrupted = || IdempotencyError::NotInterrupted { key: key.into() };
        let Some(row) = row else {
            return Err(not_interrupted());
        };
        let at_ms = u64::try_from(row.get::<_, i64>(1)).unwrap_or(0);
        if row.get::<_, bool>(0) || self.expired(at_ms, now) {
            return Err(not_interrupted());
        }
        match resolution {
            Resolution::Record(outcome) => {
                client
                    .execute_typed(
                        COMPLETE_SQL,
                        &[
                            (&key, Type::TEXT),
                            (&sql_ms(now), Type::INT8),
                            (&outcome, Type::BYTEA),
                        ],
                    )
                    .await?;
            }
            Resolution::Release => {
                client
                    .execute_typed(DELETE_SQL, &[(&key, Type::TEXT)])
                    .await?;
            }
        }
        Ok(())
    }

    /// Deletes every record older than the retention period at `now`, in one
    /// statement, and returns how many it deleted. Keys whose lock is held
    /// (an attempt is reusing the expired key) are left alone. Expired keys
    /// already count as new in `execute`; this reclaims their space. Call it
    /// every few minutes from a background task.
    pub async fn collect_expired(&self, now: SystemTime) -> Result<usize, IdempotencyError> {
        let retention = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = sql_ms(now).saturating_sub(retention);
        let client = self.pool.get().await.map_err(PgError::from)?;
        let deleted = client
            .execute_typed(COLLECT_SQL, &[(&cutoff, Type::INT8)])
            .await?;
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }
}
