//! The fenced key-value service ([`crate::fenced_kv`]'s contract,
//! `leasehold.v1.FencedKv`) with its data in PostgreSQL: Kleppmann's
//! scenario with the data where it really lives (`fenced_store --postgres
//! URL`).
//!
//! A Put is one READ COMMITTED transaction: [`PgGuard::write`] raises the
//! resource's fence in `leasehold_fences`, then upserts the key into
//! [`DATA_TABLE`] with the token that wrote it, then commits. The reply is
//! sent after the commit, so it is as durable as PostgreSQL's commits. A
//! stale token answers `FAILED_PRECONDITION` with the same message as the
//! sled store; every other status is mapped in [`status`].

use std::future::Future;

use deadpool_postgres::Pool;
use tokio::net::TcpListener;
use tokio_postgres::types::Type;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use super::{migrate, PgError, PgGuard};
use crate::fenced_kv::{check_key, FenceInterceptor, FencedKvError};
use crate::fencing::{self, Fence};
use crate::proto::fenced_kv_server::{FencedKv, FencedKvServer};
use crate::proto::{GetRequest, GetResponse, PutRequest, PutResponse};
use crate::GuardError;

/// The table holding the data: key → the token that wrote it, and the value.
pub const DATA_TABLE: &str = "fenced_kv_data";

const CREATE_SQL: &str = "CREATE TABLE IF NOT EXISTS fenced_kv_data (\
                          key text PRIMARY KEY, token bigint NOT NULL, value bytea NOT NULL)";
const PUT_SQL: &str = "INSERT INTO fenced_kv_data (key, token, value) VALUES ($1, $2, $3) \
                       ON CONFLICT (key) DO UPDATE SET token = EXCLUDED.token, value = EXCLUDED.value";
const GET_SQL: &str = "SELECT token, value FROM fenced_kv_data WHERE key = $1";

/// Connections the service keeps open at most.
const POOL_SIZE: usize = 16;

/// [`PgFencedKvService`] as a tonic service, ready for `Server::add_service`.
pub type PgFencedKvGrpc = InterceptedService<FencedKvServer<PgFencedKvService>, FenceInterceptor>;

/// The `FencedKv` gRPC service over PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgFencedKvService {
    pool: Pool,
}

impl PgFencedKvService {
    /// Connects to `url`, creates the guard's tables ([`migrate`]) and
    /// [`DATA_TABLE`] if missing.
    pub async fn open(url: &str) -> Result<Self, FencedKvError> {
        let pool = super::pool(url, POOL_SIZE).map_err(GuardError::from)?;
        let mut client = pool.get().await.map_err(guard_error)?;
        migrate(&mut client).await.map_err(GuardError::from)?;
        client
            .batch_execute(CREATE_SQL)
            .await
            .map_err(guard_error)?;
        drop(client);
        Ok(PgFencedKvService { pool })
    }

    /// The service wrapped in [`fencing::optional_fence`], as the sled one.
    pub fn into_server(self) -> PgFencedKvGrpc {
        FencedKvServer::with_interceptor(self, fencing::optional_fence as FenceInterceptor)
    }
}

fn guard_error(e: impl Into<PgError>) -> GuardError {
    GuardError::Postgres(e.into())
}

/// Every PostgreSQL error becomes a status here, and only here.
pub fn status(e: PgError) -> Status {
    match &e {
        PgError::InvalidResource { .. } | PgError::TokenOutOfRange { .. } => {
            Status::invalid_argument(e.to_string())
        }
        PgError::Conflict(_) => Status::aborted(e.to_string()),
        // No SQLSTATE: the connection, not the statement, failed.
        PgError::Pool(_) => Status::unavailable(format!(
            "{e}; the write was not acknowledged: retry it with the same token"
        )),
        PgError::Database(db) if db.code().is_none() => Status::unavailable(format!(
            "{e}; the write was not acknowledged: retry it with the same token"
        )),
        _ => Status::internal(e.to_string()),
    }
}

fn put_status(e: GuardError<tokio_postgres::Error>) -> Status {
    match e {
        GuardError::StaleToken { .. } => Status::failed_precondition(e.to_string()),
        GuardError::Aborted(db) => status(db.into()),
        GuardError::Postgres(pg) => status(pg),
        other => Status::internal(other.to_string()),
    }
}

#[tonic::async_trait]
impl FencedKv for PgFencedKvService {
    #[tracing::instrument(skip_all, fields(key = %req.get_ref().key, resource, token))]
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let Fence { resource, token } = Fence::from_request(&req)?.clone();
        let span = tracing::Span::current();
        span.record("resource", resource.as_str());
        span.record("token", token);
        let PutRequest { key, value } = req.into_inner();
        check_key(&key)?;

        let mut client = self.pool.get().await.map_err(|e| status(e.into()))?;
        let tx = client.transaction().await.map_err(|e| status(e.into()))?;
        // The fence refuses tokens above i64::MAX before this runs.
        let sql_token = i64::try_from(token).unwrap_or(i64::MAX);
        let written = PgGuard
            .write(&tx, &resource, token, |tx| async move {
                tx.execute_typed(
                    PUT_SQL,
                    &[
                        (&key, Type::TEXT),
                        (&sql_token, Type::INT8),
                        (&value, Type::BYTEA),
                    ],
                )
                .await
            })
            .await;
        if let Err(e) = written {
            tracing::info!(error = %e, "write refused");
            // Dropping `tx` rolls back: nothing of this write stays.
            return Err(put_status(e));
        }
        tx.commit().await.map_err(|e| status(e.into()))?;
        tracing::debug!("write accepted");
        Ok(Response::new(PutResponse {
            highest_token: token,
        }))
    }

    #[tracing::instrument(skip_all, fields(key = %req.get_ref().key))]
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let GetRequest { key } = req.into_inner();
        check_key(&key)?;
        let client = self.pool.get().await.map_err(|e| status(e.into()))?;
        let row = client
            .query_typed_opt(GET_SQL, &[(&key, Type::TEXT)])
            .await
            .map_err(|e| status(e.into()))?;
        let reply = match row {
            None => GetResponse {
                found: false,
                value: Vec::new(),
                token: 0,
            },
            Some(row) => GetResponse {
                found: true,
                value: row.get(1),
                token: u64::try_from(row.get::<_, i64>(0)).map_err(|_| {
                    Status::internal(format!("corrupt token in the row of key {key:?}"))
                })?,
            },
        };
        Ok(Response::new(reply))
    }
}

/// Serves the store with its data in the PostgreSQL database at `url`, on
/// `listener`, until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    url: &str,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FencedKvError> {
    let service = PgFencedKvService::open(url).await?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!("fenced store serving, data in PostgreSQL");
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    tracing::info!("fenced store stopped");
    Ok(())
}
