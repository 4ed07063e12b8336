//! The fleet store: a PostgreSQL table shared by every worker. Each claim is one
//! `INSERT … ON CONFLICT DO UPDATE … WHERE` statement, which PostgreSQL runs atomically under
//! the row lock, so two workers can never both take a live key. Times come from the database's
//! clock, so workers with skewed clocks still agree on leases.
//!
//! One connection, pipelined (tokio-postgres sends concurrent queries without waiting for each
//! other); it is re-opened on the next call after it breaks.

use std::time::Duration;

use futures_util::future::BoxFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls, Statement};

use super::{Claim, Store, StoreError};
use crate::config::{redact_url, IdempotencyConfig, Secret};
use crate::outcome::Outcome;

/// Connections per worker process and kind. PostgreSQL flushes the WAL once for all
/// transactions committing together, so throughput grows with commits in flight.
const POOL_SIZE: usize = 8;

/// The statements every call uses, prepared once per connection.
const CLAIM_SQL: &str = "INSERT INTO swr_stage_idempotency AS t (key, fingerprint, state, owner, lease_until, outcome, expires_at)
     VALUES ($1, $2, 'running', $3, now() + $4::float8 * interval '1 millisecond', NULL, now() + $5::float8 * interval '1 millisecond')
     ON CONFLICT (key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, state = 'running', owner = EXCLUDED.owner,
         lease_until = EXCLUDED.lease_until, outcome = NULL, expires_at = EXCLUDED.expires_at
     WHERE t.expires_at < now()
        OR (t.state = 'running' AND t.lease_until < now() AND t.fingerprint = EXCLUDED.fingerprint)
     RETURNING (xmax <> 0) AS takeover";
const LOOKUP_SQL: &str =
    "SELECT fingerprint, state, owner, outcome FROM swr_stage_idempotency WHERE key = $1";
const COMPLETE_SQL: &str = "INSERT INTO swr_stage_idempotency AS t (key, fingerprint, state, owner, lease_until, outcome, expires_at)
     VALUES ($1, '', 'finished', '', now(), $2, now() + $3::float8 * interval '1 millisecond')
     ON CONFLICT (key) DO UPDATE SET state = 'finished', outcome = EXCLUDED.outcome, expires_at = EXCLUDED.expires_at
     WHERE t.state = 'running'";
const GUARD_SQL: &str = "INSERT INTO swr_stage_guard AS g (fingerprint, window_start, executions) VALUES ($1, now(), 1)
     ON CONFLICT (fingerprint) DO UPDATE SET
         executions = CASE WHEN g.window_start <= now() - $2::float8 * interval '1 millisecond' THEN 1 ELSE g.executions + 1 END,
         window_start = CASE WHEN g.window_start <= now() - $2::float8 * interval '1 millisecond' THEN now() ELSE g.window_start END
     WHERE g.window_start <= now() - $2::float8 * interval '1 millisecond' OR g.executions < $3
     RETURNING executions";
const RELEASE_SQL: &str =
    "DELETE FROM swr_stage_idempotency WHERE key = $1 AND owner = $2 AND state = 'running'";

/// One connection and its prepared statements.
struct Conn {
    /// The client (pipelines concurrent queries).
    client: Client,
    /// Prepared CLAIM_SQL.
    claim: Statement,
    /// Prepared LOOKUP_SQL.
    lookup: Statement,
    /// Prepared COMPLETE_SQL.
    complete: Statement,
    /// Prepared RELEASE_SQL.
    release: Statement,
    /// Prepared GUARD_SQL.
    guard: Statement,
}

/// Limit for connecting and for any one statement.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

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

/// The PostgreSQL-backed store.
pub struct PostgresStore {
    /// Connection URL (may hold a password).
    url: Secret,
    /// Connections for claims, with `synchronous_commit = off`: a claim needs atomicity, not
    /// durability (a claim lost in a database crash only means the redelivery claims again).
    claims: Vec<Mutex<Option<Arc<Conn>>>>,
    /// Connections for completions and releases, fully durable: the ack that follows a
    /// completion must be able to count on it.
    durable: Vec<Mutex<Option<Arc<Conn>>>>,
    /// Round-robin position in the pools.
    next: AtomicUsize,
    /// Claim lease in milliseconds.
    lease_ms: i64,
    /// Record lifetime in milliseconds.
    ttl_ms: i64,
}

impl PostgresStore {
    /// Checks the URL, then connects and applies the migrations. A database that is down at
    /// start is not fatal: the worker starts, every claim fails (so deliveries are requeued and
    /// SWR is not called unguarded), and the next claim after it returns connects.
    pub async fn connect(config: &IdempotencyConfig) -> Result<PostgresStore, StoreError> {
        config
            .url
            .expose()
            .parse::<tokio_postgres::Config>()
            .map_err(|e| {
                StoreError(format!(
                    "idempotency.url {} is not a PostgreSQL URL: {e}",
                    redact_url(config.url.expose())
                ))
            })?;
        let store = PostgresStore {
            url: config.url.clone(),
            claims: (0..POOL_SIZE).map(|_| Mutex::new(None)).collect(),
            durable: (0..POOL_SIZE).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            lease_ms: i64::try_from(config.lease.as_millis()).unwrap_or(i64::MAX),
            ttl_ms: i64::try_from(config.ttl.as_millis()).unwrap_or(i64::MAX),
        };
        if let Err(e) = store.conn(true).await {
            tracing::warn!(error = %e, "idempotency store unavailable at start; deliveries are requeued until it answers");
        }
        Ok(store)
    }

    async fn open(&self) -> Result<Conn, StoreError> {
        let shown = redact_url(self.url.expose());
        let (mut client, connection) = tokio::time::timeout(
            OP_TIMEOUT,
            tokio_postgres::connect(self.url.expose(), NoTls),
        )
        .await
        .map_err(|_| {
            StoreError(format!(
                "cannot connect to PostgreSQL at {shown}: no answer within {OP_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| StoreError(format!("cannot connect to PostgreSQL at {shown}: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "PostgreSQL connection closed");
            }
        });
        let migrate = async {
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS swr_stage_schema (version INTEGER NOT NULL)",
                )
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
        };
        tokio::time::timeout(OP_TIMEOUT, migrate)
            .await
            .map_err(|_| {
                StoreError(format!(
                    "migrating {shown}: no answer within {OP_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| StoreError(format!("migrating {shown}: {e}")))?;
        let prepare = async {
            Ok::<_, tokio_postgres::Error>(Conn {
                claim: client.prepare(CLAIM_SQL).await?,
                lookup: client.prepare(LOOKUP_SQL).await?,
                complete: client.prepare(COMPLETE_SQL).await?,
                release: client.prepare(RELEASE_SQL).await?,
                guard: client.prepare(GUARD_SQL).await?,
                client,
            })
        };
        tokio::time::timeout(OP_TIMEOUT, prepare)
            .await
            .map_err(|_| {
                StoreError(format!(
                    "preparing statements on {shown}: no answer within {OP_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| StoreError(format!("preparing statements on {shown}: {e}")))
    }

    /// A live connection from the pool, re-opened first if it broke (one reconnect at a time
    /// per slot).
    async fn conn(&self, durable: bool) -> Result<Arc<Conn>, StoreError> {
        let pool = if durable { &self.durable } else { &self.claims };
        let slot = &pool[self.next.fetch_add(1, Ordering::Relaxed) % pool.len()];
        let mut guard = slot.lock().await;
        if let Some(conn) = guard.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(conn.clone());
        }
        let conn = self.open().await?;
        if !durable {
            bounded(conn.client.batch_execute("SET synchronous_commit = off")).await?;
        }
        let conn = Arc::new(conn);
        *guard = Some(conn.clone());
        Ok(conn)
    }
}

/// Every statement is bounded in time; errors name PostgreSQL.
async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(OP_TIMEOUT, fut)
        .await
        .map_err(|_| StoreError(format!("PostgreSQL gave no answer within {OP_TIMEOUT:?}")))?
        .map_err(|e| StoreError(format!("PostgreSQL: {e}")))
}

impl Store for PostgresStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            // A running claim's row lives until its lease ends at least, so a TTL shorter than
            // the lease never frees a key whose job still runs (its outcome gets the TTL).
            let (lease, ttl) = (self.lease_ms as f64, self.ttl_ms.max(self.lease_ms) as f64);
            // A row removed between the two statements (released) just means: try again.
            for _ in 0..5 {
                let conn = self.conn(false).await?;
                let taken = bounded(
                    conn.client
                        .query_opt(&conn.claim, &[&key, &fingerprint, &owner, &lease, &ttl]),
                )
                .await?;
                if let Some(row) = taken {
                    return Ok(Claim::Acquired {
                        takeover: row.get(0),
                    });
                }
                let existing = bounded(conn.client.query_opt(&conn.lookup, &[&key])).await?;
                let Some(row) = existing else { continue };
                let (stored, state, holder, outcome): (String, String, String, Option<String>) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                if stored != fingerprint && !stored.is_empty() {
                    return Ok(Claim::Mismatch {
                        fingerprint: stored,
                    });
                }
                return match (state.as_str(), outcome) {
                    ("finished", Some(json)) => serde_json::from_str::<Outcome>(&json)
                        .map(|o| Claim::Finished(Box::new(o)))
                        .map_err(|e| {
                            StoreError(format!("stored outcome for this key is unreadable: {e}"))
                        }),
                    _ => Ok(Claim::InFlight { owner: holder }),
                };
            }
            Err(StoreError(
                "the key changed state five times during one claim".into(),
            ))
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        outcome: &'a Outcome,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let json = serde_json::to_string(outcome).expect("an outcome always serialises");
        let ttl = self.ttl_ms as f64;
        Box::pin(async move {
            let conn = self.conn(true).await?;
            bounded(conn.client.execute(&conn.complete, &[&key, &json, &ttl]))
                .await
                .map(drop)
        })
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let conn = self.conn(true).await?;
            bounded(conn.client.execute(&conn.release, &[&key, &owner]))
                .await
                .map(drop)
        })
    }

    fn count_execution<'a>(
        &'a self,
        fingerprint: &'a str,
        window: Duration,
        max: u32,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (window_ms, max) = (
            window.as_millis() as f64,
            i32::try_from(max).unwrap_or(i32::MAX),
        );
        Box::pin(async move {
            // On the claim connections (asynchronous commit): like a claim, a count lost in a
            // database crash only lets one more execution through; the row lock keeps it atomic.
            let conn = self.conn(false).await?;
            let row = bounded(
                conn.client
                    .query_opt(&conn.guard, &[&fingerprint, &window_ms, &max]),
            )
            .await?;
            Ok(row.is_some())
        })
    }

    fn finished<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Outcome>, StoreError>> {
        Box::pin(async move {
            let conn = self.conn(true).await?;
            let row = bounded(conn.client.query_opt(
                "SELECT outcome FROM swr_stage_idempotency WHERE key = $1 AND state = 'finished' AND expires_at >= now()",
                &[&key],
            ))
            .await?;
            Ok(row
                .and_then(|r| r.get::<_, Option<String>>(0))
                .and_then(|json| serde_json::from_str(&json).ok()))
        })
    }

    fn prune(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let conn = self.conn(true).await?;
            bounded(conn.client.execute(
                "DELETE FROM swr_stage_idempotency WHERE expires_at < now()",
                &[],
            ))
            .await
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let conn = self.conn(true).await?;
            bounded(conn.client.batch_execute("SELECT 1")).await
        })
    }
}
