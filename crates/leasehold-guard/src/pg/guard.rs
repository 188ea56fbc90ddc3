//! [`PgGuard`]: the fence raised inside the caller's PostgreSQL transaction;
//! [`FencedRow`]: the one-statement form for a row with its own fence column.

use std::future::Future;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Transaction};

use super::{check_resource, token_to_sql, PgError};
use crate::GuardError;

/// Raises the fence, or finds it newer. One statement that cannot race; see
/// the [module docs](super#the-statement-that-cannot-race).
const FENCE_SQL: &str = "INSERT INTO leasehold_fences AS f (resource, token) VALUES ($1, $2) \
                         ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token \
                         WHERE f.token <= EXCLUDED.token \
                         RETURNING f.token";
const HIGHEST_SQL: &str = "SELECT token FROM leasehold_fences WHERE resource = $1";

/// The guard whose fences live in PostgreSQL, in the table
/// `leasehold_fences` ([`migrate`](super::migrate) creates it), and whose
/// check runs inside the caller's transaction.
///
/// It holds no state: the fences are rows, and the row lock taken by
/// [`fence`](PgGuard::fence) orders the writers of a resource. Use it from
/// any number of tasks and processes at once.
///
/// ```no_run
/// use leasehold_guard::{pg::PgGuard, GuardError};
///
/// # async fn demo(pool: deadpool_postgres::Pool, token: u64) -> Result<(), Box<dyn std::error::Error>> {
/// let mut client = pool.get().await?;
/// let tx = client.transaction().await?;
/// let rows = PgGuard
///     .write(&tx, "orders", token, |tx| async move {
///         tx.execute("UPDATE invoices SET state = 'paid' WHERE id = 7", &[]).await
///     })
///     .await;
/// match rows {
///     Ok(_) => tx.commit().await?,
///     // Nothing was written; dropping `tx` rolls back.
///     Err(GuardError::StaleToken { highest, .. }) => eprintln!("superseded by token {highest}"),
///     Err(e) => return Err(e.into()),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct PgGuard;

impl PgGuard {
    /// Checks `token` against the resource's fence and raises the fence to
    /// it, in `tx`, with one statement. Accepted (first token, same token or
    /// newer): the fence row stays locked until `tx` ends, so run the
    /// resource's writes in `tx` after this and commit. Refused:
    /// [`GuardError::StaleToken`], and nothing was written (commit or roll
    /// back: the same).
    ///
    /// Bad input ([`PgError::InvalidResource`],
    /// [`PgError::TokenOutOfRange`]) is refused before anything is sent.
    pub async fn fence(
        &self,
        tx: &Transaction<'_>,
        resource: &str,
        token: u64,
    ) -> Result<(), GuardError> {
        fence(tx, resource, token).await
    }

    /// Raises the fence ([`PgGuard::fence`]) and then runs `f`, the
    /// resource's writes, in the same transaction. Returns what `f` returns.
    ///
    /// - A stale token: [`GuardError::StaleToken`]; `f` does not run and
    ///   nothing was written.
    /// - `f` fails: [`GuardError::Aborted`] with its error. The fence was
    ///   raised in `tx` and `f` may have written part of its work, so **roll
    ///   `tx` back** (dropping it does; `?` does that for you): then neither
    ///   the data nor the fence changed.
    /// - Success: commit `tx` when you are done with it; until then the
    ///   resource's other writers wait on the fence row.
    ///
    /// `f` gets the same transaction back, so it can borrow it:
    /// `|tx| async move { tx.execute(…).await }`.
    pub async fn write<'t, 'c, T, E, F, Fut>(
        &self,
        tx: &'t Transaction<'c>,
        resource: &str,
        token: u64,
        f: F,
    ) -> Result<T, GuardError<E>>
    where
        F: FnOnce(&'t Transaction<'c>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        fence(tx, resource, token).await?;
        f(tx).await.map_err(GuardError::Aborted)
    }

    /// The highest token accepted for `resource`, if any (a plain read: in a
    /// transaction, as of its snapshot). `client` is a `tokio_postgres`
    /// client or transaction; from `deadpool-postgres`, pass `&**client` or
    /// `&*tx`.
    pub async fn highest(
        &self,
        client: &impl GenericClient,
        resource: &str,
    ) -> Result<Option<u64>, GuardError> {
        check_resource(resource)?;
        let row = client
            .query_typed_opt(HIGHEST_SQL, &[(&resource, Type::TEXT)])
            .await?;
        row.map(|row| stored_token(resource, row.get(0)))
            .transpose()
            .map_err(Into::into)
    }
}

/// A stored fence as a `u64`.
fn stored_token(resource: &str, token: i64) -> Result<u64, PgError> {
    u64::try_from(token).map_err(|_| PgError::CorruptFence {
        resource: resource.to_owned(),
        token,
    })
}

async fn fence<E>(tx: &Transaction<'_>, resource: &str, token: u64) -> Result<(), GuardError<E>> {
    check_resource(resource)?;
    let sql_token = token_to_sql(token)?;
    let raised = tx
        .query_typed_opt(
            FENCE_SQL,
            &[(&resource, Type::TEXT), (&sql_token, Type::INT8)],
        )
        .await?;
    if raised.is_some() {
        return Ok(());
    }
    // Refused. The row existed with a newer token when the statement locked
    // it; this read (a new snapshot at READ COMMITTED, the same one above)
    // sees that token or a newer one, so `highest > offered`.
    let row = tx
        .query_typed_opt(HIGHEST_SQL, &[(&resource, Type::TEXT)])
        .await?;
    let highest = match row {
        Some(row) => stored_token(resource, row.get(0))?,
        None => {
            return Err(PgError::FenceChanged {
                resource: resource.to_owned(),
            }
            .into())
        }
    };
    tracing::debug!(resource, offered = token, highest, "stale fencing token");
    Err(GuardError::StaleToken {
        resource: resource.to_owned(),
        offered: token,
        highest,
    })
}

/// Whether `name` is a plain SQL identifier (what [`FencedRow`] accepts).
fn plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `name` quoted, after checking it is a plain identifier.
fn quoted(what: &'static str, name: &str) -> Result<String, PgError> {
    if plain_identifier(name) {
        Ok(format!("\"{name}\""))
    } else {
        Err(PgError::InvalidIdentifier {
            what,
            name: name.to_owned(),
        })
    }
}

/// The one-statement form: a table whose rows carry their own fence column,
/// written with a conditional `UPDATE` or upsert, so the check and the write
/// are one statement and need no transaction:
///
/// ```sql
/// UPDATE t SET value = $3, fence = $2 WHERE key = $1 AND fence <= $2;
/// INSERT INTO t AS r (key, fence, value) VALUES ($1, $2, $3)
/// ON CONFLICT (key) DO UPDATE SET fence = EXCLUDED.fence, value = EXCLUDED.value
///  WHERE r.fence <= EXCLUDED.fence;
/// ```
///
/// Here each row is its own resource (the fence is per row): use it when
/// a lease covers exactly one row. The names are checked to be plain SQL
/// identifiers and are quoted as given, so spell them as they are stored
/// (usually lowercase). The fence column must be a `bigint`; the key column
/// must have a unique index (the upsert's `ON CONFLICT`).
///
/// ```no_run
/// use leasehold_guard::pg::FencedRow;
/// use tokio_postgres::types::Type;
///
/// # async fn demo(client: &tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
/// let invoices = FencedRow::new("invoices", "id", Type::INT8, "fence")?
///     .column("state", Type::TEXT)?;
/// invoices.upsert(client, &7_i64, 34, &[&"paid"]).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct FencedRow {
    table: String,
    key: String,
    key_type: Type,
    fence: String,
    columns: Vec<(String, Type)>,
    update_sql: String,
    upsert_sql: String,
    fence_sql: String,
}

impl FencedRow {
    /// A fenced table `table` (optionally `schema.table`) keyed by
    /// `key_column` of type `key_type`, with its fence in `fence_column`
    /// (`bigint`). Add the written columns with [`FencedRow::column`].
    pub fn new(
        table: &str,
        key_column: &str,
        key_type: Type,
        fence_column: &str,
    ) -> Result<Self, PgError> {
        let table = match table.split_once('.') {
            Some((schema, name)) => {
                format!("{}.{}", quoted("schema", schema)?, quoted("table", name)?)
            }
            None => quoted("table", table)?,
        };
        let mut row = FencedRow {
            table,
            key: quoted("key column", key_column)?,
            key_type,
            fence: quoted("fence column", fence_column)?,
            columns: Vec::new(),
            update_sql: String::new(),
            upsert_sql: String::new(),
            fence_sql: String::new(),
        };
        row.build();
        Ok(row)
    }

    /// Adds a column that every write sets; values are passed in the order
    /// the columns were added.
    pub fn column(mut self, name: &str, ty: Type) -> Result<Self, PgError> {
        self.columns.push((quoted("column", name)?, ty));
        self.build();
        Ok(self)
    }

    fn build(&mut self) {
        let (t, k, f) = (&self.table, &self.key, &self.fence);
        let params = |first: usize| (first..first + self.columns.len()).map(|i| format!("${i}"));
        let sets: Vec<String> = self
            .columns
            .iter()
            .zip(params(3))
            .map(|((c, _), p)| format!("{c} = {p}"))
            .chain([format!("{f} = $2")])
            .collect();
        self.update_sql = format!(
            "UPDATE {t} SET {} WHERE {k} = $1 AND {f} <= $2",
            sets.join(", ")
        );
        let names: Vec<&str> = self.columns.iter().map(|(c, _)| c.as_str()).collect();
        let excluded: Vec<String> = [f.as_str()]
            .into_iter()
            .chain(names.iter().copied())
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        self.upsert_sql = format!(
            "INSERT INTO {t} AS r ({k}, {f}{}) VALUES ($1, $2{}) ON CONFLICT ({k}) DO UPDATE SET \
             {} WHERE r.{f} <= EXCLUDED.{f}",
            names.iter().map(|c| format!(", {c}")).collect::<String>(),
            params(3).map(|p| format!(", {p}")).collect::<String>(),
            excluded.join(", ")
        );
        self.fence_sql = format!("SELECT {f} FROM {t} WHERE {k} = $1");
    }

    /// The conditional `UPDATE` this sends: `$1` the key, `$2` the token,
    /// `$3…` the columns.
    pub fn update_sql(&self) -> &str {
        &self.update_sql
    }

    /// The conditional upsert this sends, with the same parameters.
    pub fn upsert_sql(&self) -> &str {
        &self.upsert_sql
    }

    fn params<'a>(
        &'a self,
        key: &'a (dyn ToSql + Sync),
        token: &'a i64,
        values: &[&'a (dyn ToSql + Sync)],
    ) -> Result<Vec<(&'a (dyn ToSql + Sync), Type)>, PgError> {
        if values.len() != self.columns.len() {
            return Err(PgError::Config(format!(
                "{} values given for the {} columns of {}",
                values.len(),
                self.columns.len(),
                self.table
            )));
        }
        Ok([(key, self.key_type.clone()), (token as _, Type::INT8)]
            .into_iter()
            .chain(
                values
                    .iter()
                    .zip(&self.columns)
                    .map(|(v, (_, ty))| (*v, ty.clone())),
            )
            .collect())
    }

    /// After a conditional write matched no row: the row's fence, if the
    /// row exists.
    async fn current(
        &self,
        client: &impl GenericClient,
        key: &(dyn ToSql + Sync),
    ) -> Result<Option<u64>, GuardError> {
        let row = client
            .query_typed_opt(&self.fence_sql, &[(key, self.key_type.clone())])
            .await?;
        let resource = || self.resource(key);
        row.map(|row| stored_token(&resource(), row.get(0)))
            .transpose()
            .map_err(Into::into)
    }

    /// The name a stale-token error gives the row: `"table"[key]`.
    fn resource(&self, key: &(dyn ToSql + Sync)) -> String {
        format!("{}[{key:?}]", self.table)
    }

    fn stale(&self, key: &(dyn ToSql + Sync), offered: u64, highest: u64) -> GuardError {
        GuardError::StaleToken {
            resource: self.resource(key),
            offered,
            highest,
        }
    }

    /// Writes the row's columns and fence if its fence is not newer than
    /// `token`. `Ok(true)`: written; `Ok(false)`: there is no row with this
    /// key (nothing written; use [`FencedRow::upsert`] to create rows);
    /// [`GuardError::StaleToken`]: the row's fence is newer, nothing written.
    pub async fn update(
        &self,
        client: &impl GenericClient,
        key: &(dyn ToSql + Sync),
        token: u64,
        values: &[&(dyn ToSql + Sync)],
    ) -> Result<bool, GuardError> {
        let sql_token = token_to_sql(token)?;
        let params = self.params(key, &sql_token, values)?;
        if client.execute_typed(&self.update_sql, &params).await? == 1 {
            return Ok(true);
        }
        match self.current(client, key).await? {
            Some(highest) if highest > token => Err(self.stale(key, token, highest)),
            // No row when the update ran (one may have been created since).
            _ => Ok(false),
        }
    }

    /// Inserts the row, or updates it if its fence is not newer than
    /// `token`; [`GuardError::StaleToken`] if it is (nothing written).
    pub async fn upsert(
        &self,
        client: &impl GenericClient,
        key: &(dyn ToSql + Sync),
        token: u64,
        values: &[&(dyn ToSql + Sync)],
    ) -> Result<(), GuardError> {
        let sql_token = token_to_sql(token)?;
        let params = self.params(key, &sql_token, values)?;
        if client.execute_typed(&self.upsert_sql, &params).await? == 1 {
            return Ok(());
        }
        match self.current(client, key).await? {
            Some(highest) if highest > token => Err(self.stale(key, token, highest)),
            _ => Err(PgError::FenceChanged {
                resource: self.resource(key),
            }
            .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_checked_and_quoted() {
        let cases: &[(&str, bool)] = &[
            ("orders", true),
            ("_x9", true),
            ("Orders_2", true),
            ("", false),
            ("9lives", false),
            ("a-b", false),
            ("a\"; DROP TABLE x; --", false),
            ("é", false),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
        ];
        for &(name, ok) in cases {
            assert_eq!(plain_identifier(name), ok, "{name:?}");
            assert_eq!(quoted("table", name).is_ok(), ok, "{name:?}");
        }
    }

    #[test]
    fn statements_have_the_documented_shape() {
        let row = FencedRow::new("app.kv", "key", Type::TEXT, "fence")
            .unwrap()
            .column("value", Type::BYTEA)
            .unwrap()
            .column("note", Type::TEXT)
            .unwrap();
        assert_eq!(
            row.update_sql(),
            r#"UPDATE "app"."kv" SET "value" = $3, "note" = $4, "fence" = $2 WHERE "key" = $1 AND "fence" <= $2"#
        );
        assert_eq!(
            row.upsert_sql(),
            r#"INSERT INTO "app"."kv" AS r ("key", "fence", "value", "note") VALUES ($1, $2, $3, $4) ON CONFLICT ("key") DO UPDATE SET "fence" = EXCLUDED."fence", "value" = EXCLUDED."value", "note" = EXCLUDED."note" WHERE r."fence" <= EXCLUDED."fence""#
        );
        let err = FencedRow::new("kv", "key", Type::TEXT, "fence; --").unwrap_err();
        assert!(
            matches!(
                err,
                PgError::InvalidIdentifier {
                    what: "fence column",
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
