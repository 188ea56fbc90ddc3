//! Fencing where the data really lives: PostgreSQL (feature `postgres`).
//!
//! A storage service whose data is in PostgreSQL does not need a guard
//! beside the database: the database can check the token itself, in the
//! same transaction as the write. This module is that pattern, tested
//! against a real server:
//!
//! | item | what |
//! |---|---|
//! | [`migrate`], `schema.sql` | the fence table `leasehold_fences (resource text primary key, token bigint not null)` and the idempotency table |
//! | [`PgGuard`] | raise the resource's fence inside the caller's transaction, then run the caller's writes ([`PgGuard::write`]) |
//! | [`FencedRow`] | the one-statement form for a row that carries its own fence column |
//! | [`PgIdempotencyStore`] | idempotency keys with the sled store's semantics ([`crate::idempotency`]) |
//! | [`pool`], [`pool_with_tls`] | a `deadpool-postgres` pool; TLS is a connector you pass in |
//! | [`TempPostgres`] | a throwaway server (`initdb` + `pg_ctl` on a free loopback port) for tests and benchmarks |
//!
//! # The statement that cannot race
//!
//! [`PgGuard::fence`] runs, as the first statement of the caller's
//! transaction:
//!
//! ```sql
//! INSERT INTO leasehold_fences AS f (resource, token) VALUES ($1, $2)
//! ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token
//!  WHERE f.token <= EXCLUDED.token
//! RETURNING f.token;
//! -- one row: accepted, and the fence row stays locked until the transaction ends;
//! -- no row: a newer token has written; stop, and roll back.
//! ```
//!
//! `INSERT … ON CONFLICT DO UPDATE` is atomic in PostgreSQL at every
//! isolation level: it either inserts or locks the existing row, and its
//! `WHERE` is evaluated against the row's latest committed version after
//! the lock is taken. An equal token also updates (and so locks) the row.
//! That lock is what makes the rest of the transaction safe: a writer with
//! a newer token waits on it until this transaction commits or rolls back,
//! so no older token's writes can land after a newer token's, and a writer
//! that arrives after a newer token committed finds the newer token and is
//! refused ([`GuardError::StaleToken`], the same error as the sled guard's).
//!
//! **Isolation: READ COMMITTED (PostgreSQL's default) is enough**, because
//! nothing is decided from a snapshot: the check happens on the locked,
//! latest row. Under REPEATABLE READ or SERIALIZABLE the same statement is
//! still correct, but PostgreSQL reports a concurrent update of the fence
//! row as a serialization failure (SQLSTATE 40001) instead of waiting;
//! that comes back as [`PgError::Conflict`] ([`GuardError::is_conflict`]
//! tells), and the whole transaction must be retried.
//!
//! Every writer of the data a resource protects must go through the same
//! fence (the same resource name, in the same transaction as its writes).
//!
//! # Tokens above `i64::MAX`
//!
//! Tokens are `u64`; PostgreSQL's `bigint` is signed. Tokens above
//! `i64::MAX` are **refused** before anything is sent
//! ([`PgError::TokenOutOfRange`]) rather than stored as `numeric`: a
//! Leasehold coordinator issues one token per grant, plus 65,536 per
//! restart, so reaching 2⁶³ would take a billion grants a second for 292
//! years; `bigint` keeps the comparison a plain integer compare and the SQL
//! the same in every language. The table's `CHECK (token >= 0)` keeps
//! negative values out too.
//!
//! # TLS
//!
//! [`pool`] connects without TLS (loopback, a Unix socket, or a network
//! you trust). [`pool_with_tls`] takes any `tokio-postgres` TLS connector
//! (`postgres-native-tls`, `tokio-postgres-rustls`, …), so this crate pulls
//! in no TLS stack of its own.

mod guard;
mod idempotency;
mod temp_server;

#[cfg(feature = "grpc")]
pub mod fenced_kv;

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use leasehold_fence::NameError;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

pub use guard::{FencedRow, PgGuard};
pub use idempotency::PgIdempotencyStore;
pub use temp_server::{TempPostgres, TempPostgresError};

use crate::GuardError;

/// The schema [`migrate`] applies: the fence table and the idempotency table.
pub const SCHEMA: &str = include_str!("schema.sql");

/// The table holding one fence (high-water mark) per resource.
pub const FENCE_TABLE: &str = "leasehold_fences";
/// The table holding idempotency keys.
pub const IDEMPOTENCY_TABLE: &str = "leasehold_idempotency";

/// What can go wrong with the PostgreSQL side of the guard. Reaches callers
/// of [`PgGuard`] as [`GuardError::Postgres`], and callers of
/// [`PgIdempotencyStore`] as `IdempotencyError::Postgres`.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The resource name breaks the resource-name rule; nothing was sent.
    #[error("invalid resource {resource:?}: it {reason}")]
    InvalidResource {
        /// The name as given.
        resource: String,
        /// What is wrong with it.
        reason: NameError,
    },
    /// The token does not fit PostgreSQL's `bigint`; nothing was sent.
    #[error(
        "fencing token {token} is above {max}, the largest a PostgreSQL bigint holds; a \
         Leasehold coordinator never issues such a token: check where this one came from",
        max = i64::MAX
    )]
    TokenOutOfRange {
        /// The token offered.
        token: u64,
    },
    /// A table or column name given to [`FencedRow`] is not a plain SQL
    /// identifier.
    #[error(
        "{what} {name:?} is not a plain SQL identifier: use 1..=63 ASCII letters, digits and \
         underscores, not starting with a digit (a table may be `schema.table`)"
    )]
    InvalidIdentifier {
        /// Which name (table, key column, …).
        what: &'static str,
        /// The name as given.
        name: String,
    },
    /// A stored fence is negative: the table was written by something other
    /// than the guard, against its `CHECK` constraint.
    #[error(
        "corrupt fence for resource {resource:?}: token {token} is negative; only the guard \
         may write the fence table"
    )]
    CorruptFence {
        /// The resource.
        resource: String,
        /// The stored value.
        token: i64,
    },
    /// A write was refused, but the fence that refused it is gone by the
    /// time it was read back: something deleted or rewrote the fence (or,
    /// for [`FencedRow`], the row) outside the guard. Nothing was written.
    #[error(
        "the fence of {resource:?} was deleted or rewritten outside the guard while a write was \
         checked against it; nothing was written: retry, and check what else writes that table"
    )]
    FenceChanged {
        /// The resource (for [`FencedRow`]: `"table"[key]`).
        resource: String,
    },
    /// PostgreSQL reported a serialization failure (40001) or a deadlock
    /// (40P01): the transaction was rolled back by the server and must be
    /// retried as a whole, from `BEGIN`.
    #[error(
        "PostgreSQL aborted the transaction to keep it serializable ({0}); nothing was \
         written: retry the whole transaction (at READ COMMITTED the fence statement never \
         causes this)"
    )]
    Conflict(#[source] tokio_postgres::Error),
    /// Any other database error.
    #[error("PostgreSQL error: {0}; check the server, the connection and the schema (`migrate`)")]
    Database(#[source] tokio_postgres::Error),
    /// No connection could be had from the pool.
    #[error("cannot get a PostgreSQL connection from the pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The connection URL or pool settings are wrong.
    #[error("bad PostgreSQL connection settings: {0}")]
    Config(String),
}

impl PgError {
    /// Whether the error is a serialization failure or deadlock: retry the
    /// whole transaction.
    pub fn is_conflict(&self) -> bool {
        matches!(self, PgError::Conflict(_))
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code() {
            Some(code)
                if *code == SqlState::T_R_SERIALIZATION_FAILURE
                    || *code == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                PgError::Conflict(e)
            }
            _ => PgError::Database(e),
        }
    }
}

impl<E> From<tokio_postgres::Error> for GuardError<E> {
    fn from(e: tokio_postgres::Error) -> Self {
        GuardError::Postgres(e.into())
    }
}

impl<E> GuardError<E> {
    /// Whether PostgreSQL aborted the transaction as a serialization failure
    /// or deadlock ([`PgError::Conflict`]): retry the whole transaction.
    pub fn is_conflict(&self) -> bool {
        matches!(self, GuardError::Postgres(e) if e.is_conflict())
    }
}

/// The token as a `bigint`, or [`PgError::TokenOutOfRange`].
pub(crate) fn token_to_sql(token: u64) -> Result<i64, PgError> {
    i64::try_from(token).map_err(|_| PgError::TokenOutOfRange { token })
}

/// Checks a resource name against the rule every part of Leasehold uses.
pub(crate) fn check_resource(resource: &str) -> Result<(), PgError> {
    leasehold_fence::check_name(resource, leasehold_fence::MAX_RESOURCE_LEN).map_err(|reason| {
        PgError::InvalidResource {
            resource: resource.to_owned(),
            reason,
        }
    })
}

/// A connection pool of at most `max_size` connections to `url`
/// (`postgres://user@host:port/db` or `host=… port=…`), without TLS.
///
/// Connections are opened lazily, on first use.
pub fn pool(url: &str, max_size: usize) -> Result<Pool, PgError> {
    pool_with_tls(url, max_size, tokio_postgres::NoTls)
}

/// [`pool`] over TLS: `tls` is any `tokio-postgres` connector, e.g.
/// `postgres_native_tls::MakeTlsConnector` or
/// `tokio_postgres_rustls::MakeRustlsConnect`; set `sslmode=require` in the
/// URL to refuse plain connections.
pub fn pool_with_tls<T>(url: &str, max_size: usize, tls: T) -> Result<Pool, PgError>
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let config = tokio_postgres::Config::from_str(url)
        .map_err(|e| PgError::Config(format!("cannot parse the URL: {e}")))?;
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| PgError::Config(e.to_string()))
}

/// Creates the tables ([`SCHEMA`]) if they are missing. Idempotent, and safe
/// to run from several processes at once (one transaction, under an
/// advisory lock). Run it at start-up, or apply `schema.sql` with your own
/// migration tool.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), PgError> {
    let tx = client.transaction().await?;
    tx.batch_execute("SELECT pg_advisory_xact_lock(hashtextextended('leasehold.migrate', 0))")
        .await?;
    tx.batch_execute(SCHEMA).await?;
    tx.commit().await?;
    Ok(())
}
