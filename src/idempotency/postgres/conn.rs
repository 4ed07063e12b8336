//! One connection of the PostgreSQL store: opening it (TLS through
//! [`Target`](crate::idempotency::pg_target::Target)), bringing the schema up to date, preparing
//! the statements every call uses, and bounding each statement in time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, Statement};

use super::{Shared, CLAIM_SQL, COMPLETE_SQL, GUARD_SQL, LOOKUP_SQL, RELEASE_SQL};
use crate::idempotency::pg_target::ConnectFailure;
use crate::idempotency::StoreError;

/// Limit for connecting and for any one statement.
pub(super) const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection and its prepared statements.
pub(super) struct Conn {
    /// The client (pipelines concurrent queries).
    pub(super) client: Client,
    /// A statement on it timed out: the connection may be half-open (a failover, a partition),
    /// so the next call opens a new one instead of waiting on it again.
    pub(super) stalled: AtomicBool,
    /// Prepared CLAIM_SQL.
    pub(super) claim: Statement,
    /// Prepared LOOKUP_SQL.
    pub(super) lookup: Statement,
    /// Prepared COMPLETE_SQL.
    pub(super) complete: Statement,
    /// Prepared RELEASE_SQL.
    pub(super) release: Statement,
    /// Prepared GUARD_SQL.
    pub(super) guard: Statement,
}

/// Versioned migrations, applied in order inside one transaction each.
const MIGRATIONS: [&str; 2] = ["CREATE TABLE IF NOT EXISTS swr_stage_idempotency (
         key         TEXT PRIMARY KEY,
         fingerprint TEXT NOT NULL,
         state       TEXT NOT NULL CHECK (state IN ('running', 'finished')),
         owner       TEXT NOT NULL,
         lease_until TIMESTAMPTZ NOT NULL,
         outcome     TEXT,
         expires_at  TIMESTAMPTZ NOT NULL
     );
     CREATE INDEX IF NOT EXISTS swr_stage_idempotency_expires ON swr_stage_idempotency (expires_at);",
    "CREATE TABLE IF NOT EXISTS swr_stage_guard (
         fingerprint  TEXT PRIMARY KEY,
         window_start TIMESTAMPTZ NOT NULL,
         executions   INTEGER NOT NULL
     );"];

/// Why a connection could not be opened: a failed TLS handshake is told apart, since at start
/// it stops the worker.
pub(super) enum OpenError {
    Tls(StoreError),
    Other(StoreError),
}

impl From<OpenError> for StoreError {
    fn from(error: OpenError) -> StoreError {
        match error {
            OpenError::Tls(e) | OpenError::Other(e) => e,
        }
    }
}

impl From<StoreError> for OpenError {
    fn from(error: StoreError) -> OpenError {
        OpenError::Other(error)
    }
}

impl Shared {
    async fn open(&self) -> Result<Conn, StoreError> {
        Ok(self.open_checked().await?)
    }

    pub(super) async fn open_checked(&self) -> Result<Conn, OpenError> {
        let shown = self.target.shown();
        let mut client = match tokio::time::timeout(OP_TIMEOUT, self.target.connect()).await {
            Err(_) => {
                return Err(OpenError::Other(StoreError::new(format!(
                    "cannot connect to PostgreSQL at {shown}: no answer within {OP_TIMEOUT:?}"
                ))))
            }
            Ok(Err(e @ ConnectFailure::Tls { .. })) => {
                return Err(OpenError::Tls(StoreError::from_cause(e)))
            }
            Ok(Err(e)) => return Err(OpenError::Other(StoreError::from_cause(e))),
            Ok(Ok(client)) => client,
        };
        tokio::time::timeout(OP_TIMEOUT, migrate(&mut client))
            .await
            .map_err(|_| {
                StoreError::new(format!(
                    "migrating {shown}: no answer within {OP_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| StoreError::caused_by(format!("migrating {shown}"), e))?;
        let prepare = async {
            Ok::<_, tokio_postgres::Error>(Conn {
                claim: client.prepare(CLAIM_SQL).await?,
                lookup: client.prepare(LOOKUP_SQL).await?,
                complete: client.prepare(COMPLETE_SQL).await?,
                release: client.prepare(RELEASE_SQL).await?,
                guard: client.prepare(GUARD_SQL).await?,
                client,
                stalled: AtomicBool::new(false),
            })
        };
        tokio::time::timeout(OP_TIMEOUT, prepare)
            .await
            .map_err(|_| {
                StoreError::new(format!(
                    "preparing statements on {shown}: no answer within {OP_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| {
                StoreError::caused_by(format!("preparing statements on {shown}"), e).into()
            })
    }

    /// The live connection of a lane's `slot`, re-opened first if it broke (one reconnect at
    /// a time per slot).
    pub(super) async fn conn(&self, durable: bool, slot: usize) -> Result<Arc<Conn>, StoreError> {
        let pool = if durable { &self.durable } else { &self.claims };
        let slot = &pool[slot % pool.len()];
        let mut guard = slot.lock().await;
        if let Some(conn) = guard
            .as_ref()
            .filter(|c| !c.client.is_closed() && !c.stalled.load(Ordering::Relaxed))
        {
            return Ok(conn.clone());
        }
        let conn = self.open().await?;
        if !durable {
            conn.bounded(conn.client.batch_execute("SET synchronous_commit = off"))
                .await?;
        }
        let conn = Arc::new(conn);
        *guard = Some(conn.clone());
        Ok(conn)
    }
}

impl Conn {
    /// Bounds a statement in time (errors name PostgreSQL), marking the connection stalled
    /// when it timed out.
    pub(super) async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(OP_TIMEOUT, fut).await {
            Ok(result) => result.map_err(|e| StoreError::caused_by("PostgreSQL", e)),
            Err(_) => {
                self.stalled.store(true, Ordering::Relaxed);
                Err(StoreError::new(format!(
                    "PostgreSQL gave no answer within {OP_TIMEOUT:?}"
                )))
            }
        }
    }
}

/// Applies the [`MIGRATIONS`] the database has not had yet, in one transaction.
async fn migrate(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS swr_stage_schema (version INTEGER NOT NULL)")
        .await?;
    let tx = client.transaction().await?;
    // One migrator at a time across the fleet.
    tx.batch_execute("LOCK TABLE swr_stage_schema IN EXCLUSIVE MODE")
        .await?;
    let current: i32 = tx
        .query_opt("SELECT version FROM swr_stage_schema", &[])
        .await?
        .map_or(0, |row| row.get(0));
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(sql).await?;
        let version = index as i32 + 1;
        tx.execute("DELETE FROM swr_stage_schema", &[]).await?;
        tx.execute(
            "INSERT INTO swr_stage_schema (version) VALUES ($1)",
            &[&version],
        )
        .await?;
    }
    tx.commit().await
}
