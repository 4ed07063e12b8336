//! The embedded store: one SQLite file in WAL mode, owned by one worker process.
//!
//! Statements run inline on the caller's task under an async mutex (a few microseconds each, no
//! thread hop), inside a transaction that stays open for [`COMMIT_WINDOW`]; a committer thread
//! then commits it, so one commit serves every job of that window (group commit). Claims and
//! loop-guard counts are answered as soon as their statement ran: the mutex makes them atomic,
//! and losing one in a crash only means the redelivery claims again. Completions and releases
//! are answered after the commit, because the ack that follows must find them on disk.
//!
//! Durability: `synchronous = NORMAL` in WAL mode survives a killed process (committed pages are
//! in the OS); only a power loss can drop the last commits.
//!
//! Ownership: the file is opened in SQLite's exclusive locking mode, so a second process cannot
//! use it while this one runs (several workers share the PostgreSQL backend instead). It also
//! means claims need not be written at all: they live in this process's memory and die with it,
//! so a key a dead process left mid-call runs again at once rather than after its lease.
//!
//! Layout: `outcomes` holds finished outcomes in a rowid table (appended in time order, with a
//! unique index on the key), `guard` the loop-guard counts. Per job that is one small index entry
//! and one guard row at random places plus an append, instead of a whole outcome row placed by
//! its random key (which split pages and cost about twice as much with random keys).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{mpsc as std_mpsc, Arc, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{watch, Mutex, MutexGuard};

use super::{now_ms, Claim, Store, StoreError};
use crate::config::IdempotencyConfig;
use crate::outcome::Outcome;

/// How long a transaction stays open for more jobs to join before it commits: one commit per
/// millisecond at most, instead of one per job, is what lets the store keep up with the worker.
const COMMIT_WINDOW: Duration = Duration::from_millis(1);
/// Limit for any one operation, waiting for the lock or the commit included.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening waits for another process to let go of the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows deleted per pruning statement, so pruning never holds the store for long.
const PRUNE_BATCH: usize = 1000;
/// WAL pages between checkpoints (32 MiB): fewer, larger checkpoints, each page written once.
const CHECKPOINT_PAGES: i64 = 8192;
/// Schema version kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 3;

/// Milliseconds since the epoch; injectable for tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// What a commit answered, sent to everyone waiting on that transaction.
type Committed = Option<Result<(), StoreError>>;

/// Handle to the store; dropping the last one commits what is open and closes the file.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

struct Shared {
    /// The connection and its open transaction.
    db: Mutex<Db>,
    /// Milliseconds since the epoch.
    clock: Clock,
    lease_ms: i64,
    ttl_ms: i64,
    /// Wakes the committer when a transaction opens.
    opened: std_mpsc::SyncSender<()>,
}

struct Db {
    conn: Connection,
    /// The open transaction, if any; its commit's result goes to whoever waits on it.
    open: Option<watch::Sender<Committed>>,
    /// Claims of keys running now. They live in memory only: the file belongs to this process,
    /// so a claim can never outlive it, and after a crash the redelivery simply claims again
    /// (calling SWR with the same Idempotency-Key, as a take-over does). Bounded by the jobs in
    /// flight; entries whose lease ran out are dropped when pruning.
    running: HashMap<String, Running>,
}

/// One in-memory claim.
struct Running {
    fingerprint: String,
    owner: String,
    lease_until: i64,
}

impl Db {
    /// Opens a transaction unless one is open.
    fn begin(&mut self, opened: &std_mpsc::SyncSender<()>) -> Result<(), StoreError> {
        if self.open.is_none() {
            self.conn
                .prepare_cached("BEGIN IMMEDIATE")
                .and_then(|mut st| st.execute([]))
                .map_err(|e| StoreError(format!("cannot start a transaction: {e}")))?;
            self.open = Some(watch::channel(None).0);
            // A full slot means the committer has been told already.
            let _ = opened.try_send(());
        }
        Ok(())
    }

    /// Commits the open transaction, if any, and tells its waiters.
    fn commit(&mut self) {
        let Some(done) = self.open.take() else { return };
        let result = self
            .conn
            .prepare_cached("COMMIT")
            .and_then(|mut st| st.execute([]))
            .map(drop)
            .map_err(|e| {
                let _ = self.conn.execute_batch("ROLLBACK");
                let error = StoreError(format!("commit failed: {e}"));
                tracing::error!(%error, "idempotency store commit failed");
                error
            });
        done.send_replace(Some(result));
    }

    /// After a failed statement: if SQLite rolled the transaction back itself, its waiters hear.
    fn after_error(&mut self) {
        if self.open.is_some() && self.conn.is_autocommit() {
            if let Some(done) = self.open.take() {
                done.send_replace(Some(Err(StoreError(
                    "the transaction was rolled back".into(),
                ))));
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.db.get_mut().commit();
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database at `idempotency.path` and starts the committer.
    pub fn open(config: &IdempotencyConfig) -> Result<EmbeddedStore, StoreError> {
        EmbeddedStore::open_with_clock(config, Arc::new(now_ms))
    }

    /// Like [`open`](Self::open) with another clock (milliseconds since the epoch), so tests can
    /// move time past leases and TTLs without waiting.
    pub fn open_with_clock(
        config: &IdempotencyConfig,
        clock: Clock,
    ) -> Result<EmbeddedStore, StoreError> {
        let path = Path::new(&config.path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)
            .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        let orphans = migrate(&conn).map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DatabaseBusy => {
                StoreError(format!(
                    "{} is in use by another process (idempotency.path): each worker needs its own file; several workers share idempotency.backend = \"postgres\"",
                    path.display()
                ))
            }
            e => StoreError(format!("{}: {e}", path.display())),
        })?;
        if orphans > 0 {
            tracing::info!(
                claims = orphans,
                "claims left running by a previous process were dropped; their keys run again"
            );
        }
        let (opened, wakeups) = std_mpsc::sync_channel(1);
        let shared = Arc::new(Shared {
            db: Mutex::new(Db {
                conn,
                open: None,
                running: HashMap::new(),
            }),
            clock,
            lease_ms: millis(config.lease),
            ttl_ms: millis(config.ttl),
            opened,
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("idempotency-commit".into())
            .spawn(move || committer(weak, wakeups))
            .map_err(|e| StoreError(format!("cannot start the commit thread: {e}")))?;
        Ok(EmbeddedStore { shared })
    }

    /// The connection, locked.
    async fn locked(&self) -> Result<MutexGuard<'_, Db>, StoreError> {
        match self.shared.db.try_lock() {
            Ok(db) => Ok(db),
            Err(_) => tokio::time::timeout(OP_TIMEOUT, self.shared.db.lock())
                .await
                .map_err(|_| StoreError(format!("the store stayed busy for {OP_TIMEOUT:?}"))),
        }
    }

    /// The connection, locked, with a transaction open.
    async fn lock(&self) -> Result<MutexGuard<'_, Db>, StoreError> {
        let mut db = self.locked().await?;
        db.begin(&self.shared.opened)?;
        Ok(db)
    }

    /// Runs `f` in the open transaction and answers at once.
    async fn run<T>(
        &self,
        f: impl FnOnce(&mut Db, i64, &Shared) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut db = self.lock().await?;
        let now = (self.shared.clock)();
        let result = f(&mut db, now, &self.shared);
        if result.is_err() {
            db.after_error();
        }
        result.map_err(|e| StoreError(e.to_string()))
    }

    /// Runs `f` in the open transaction and answers once that transaction is committed.
    async fn run_durable(
        &self,
        f: impl FnOnce(&mut Db, i64, &Shared) -> rusqlite::Result<()>,
    ) -> Result<(), StoreError> {
        let mut committed = {
            let mut db = self.lock().await?;
            let now = (self.shared.clock)();
            if let Err(e) = f(&mut db, now, &self.shared) {
                db.after_error();
                return Err(StoreError(e.to_string()));
            }
            match &db.open {
                Some(open) => open.subscribe(),
                None => return Err(StoreError("the transaction was rolled back".into())),
            }
        };
        let answer = tokio::time::timeout(OP_TIMEOUT, committed.wait_for(Option::is_some))
            .await
            .map_err(|_| StoreError(format!("no commit within {OP_TIMEOUT:?}")))?
            .map_err(|_| StoreError("the store closed before the commit".into()))?
            .clone();
        answer.unwrap_or_else(|| Err(StoreError("internal: no commit result".into())))
    }
}

/// The committer: after a transaction opens, waits out the window, then commits it.
fn committer(shared: Weak<Shared>, wakeups: std_mpsc::Receiver<()>) {
    while wakeups.recv().is_ok() {
        std::thread::sleep(COMMIT_WINDOW);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.db.blocking_lock().commit();
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Sets the connection up, takes the file for this process, migrates the schema, and drops the
/// claims a dead process left (so their keys run again at once); returns how many there were.
fn migrate(db: &Connection) -> rusqlite::Result<usize> {
    db.busy_timeout(BUSY_TIMEOUT)?;
    db.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "NORMAL")?;
    db.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES)?;
    db.pragma_update(None, "journal_size_limit", CHECKPOINT_PAGES * 4096 * 2)?;
    // The first write takes the exclusive lock and keeps it for the connection's life.
    db.execute_batch("BEGIN IMMEDIATE")?;
    let migrated = (|| {
        let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version < 2 {
            db.execute_batch(
                "CREATE TABLE IF NOT EXISTS guard (
                     fingerprint  TEXT PRIMARY KEY,
                     window_start INTEGER NOT NULL,
                     executions   INTEGER NOT NULL
                 ) WITHOUT ROWID;",
            )?;
        }
        let mut orphans = 0;
        if version < 3 {
            // Finished outcomes only (claims live in memory), in a rowid table: rows are appended
            // in time order and only the small key index takes a write at a random place.
            db.execute_batch(
                "CREATE TABLE IF NOT EXISTS outcomes (
                     id          INTEGER PRIMARY KEY,
                     key         TEXT NOT NULL UNIQUE,
                     fingerprint TEXT NOT NULL,
                     owner       TEXT NOT NULL,
                     outcome     TEXT NOT NULL,
                     expires_at  INTEGER NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS outcomes_expires ON outcomes (expires_at);",
            )?;
            // From the first schema (one WITHOUT ROWID table of claims and outcomes), found by
            // name: an early release could stop between creating it and recording the version.
            let old_table: bool = db.query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'idempotency'",
                [],
                |r| r.get(0),
            )?;
            if old_table {
                // Rows a dead process left running are void: their keys run again.
                orphans = db.execute("DELETE FROM idempotency WHERE state = 'running'", [])?;
                db.execute_batch(
                    "INSERT OR IGNORE INTO outcomes (key, fingerprint, owner, outcome, expires_at)
                         SELECT key, fingerprint, owner, outcome, expires_at FROM idempotency
                         WHERE outcome IS NOT NULL ORDER BY expires_at;
                     DROP TABLE idempotency;",
                )?;
            }
        }
        if version < SCHEMA_VERSION {
            db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        Ok(orphans)
    })();
    match migrated {
        Ok(orphans) => {
            db.execute_batch("COMMIT")?;
            Ok(orphans)
        }
        Err(e) => {
            let _ = db.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn claim(
    db: &mut Db,
    key: &str,
    fingerprint: &str,
    owner: &str,
    now: i64,
    lease_ms: i64,
) -> rusqlite::Result<Claim> {
    let mut takeover = false;
    if let Some(running) = db.running.get(key) {
        if running.fingerprint != fingerprint {
            return Ok(Claim::Mismatch {
                fingerprint: running.fingerprint.clone(),
            });
        }
        if running.lease_until >= now {
            return Ok(Claim::InFlight {
                owner: running.owner.clone(),
            });
        }
        takeover = true;
    }
    let finished = db
        .conn
        .prepare_cached(
            "SELECT fingerprint, outcome FROM outcomes WHERE key = ?1 AND expires_at >= ?2",
        )?
        .query_row(params![key, now], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })
        .optional()?;
    match finished {
        Some((stored, _)) if stored != fingerprint && !stored.is_empty() => {
            return Ok(Claim::Mismatch {
                fingerprint: stored,
            })
        }
        Some((_, outcome)) => {
            return match serde_json::from_str::<Outcome>(&outcome) {
                Ok(o) => Ok(Claim::Finished(Box::new(o))),
                Err(e) => Err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))),
            }
        }
        _ => {}
    }
    db.running.insert(
        key.to_owned(),
        Running {
            fingerprint: fingerprint.to_owned(),
            owner: owner.to_owned(),
            lease_until: now.saturating_add(lease_ms),
        },
    );
    Ok(Claim::Acquired { takeover })
}

impl Store for EmbeddedStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(self.run(move |db, now, s| claim(db, key, fingerprint, owner, now, s.lease_ms)))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        outcome: &'a Outcome,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let outcome = serde_json::to_string(outcome).expect("an outcome always serialises");
        Box::pin(self.run_durable(move |db, now, s| {
            // The fingerprint comes from the claim (a DLQ marker has none).
            let (fingerprint, owner) = db
                .running
                .remove(key)
                .map(|r| (r.fingerprint, r.owner))
                .unwrap_or_default();
            db.conn
                .prepare_cached(
                    "INSERT INTO outcomes (key, fingerprint, owner, outcome, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (key) DO UPDATE SET
                         fingerprint = ?2, owner = ?3, outcome = ?4, expires_at = ?5
                     WHERE expires_at < ?6",
                )?
                .execute(params![
                    key,
                    fingerprint,
                    owner,
                    outcome,
                    now.saturating_add(s.ttl_ms),
                    now
                ])
                .map(drop)
        }))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        // Claims are in memory: nothing to commit.
        Box::pin(self.run(move |db, _, _| {
            if db.running.get(key).is_some_and(|r| r.owner == owner) {
                db.running.remove(key);
            }
            Ok(())
        }))
    }

    fn prune(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            // In batches, letting jobs in between, so a large backlog never stalls the store.
            let mut pruned = 0u64;
            loop {
                let n = self
                    .run(|db, now, _| {
                        db.running.retain(|_, r| r.lease_until >= now);
                        db.conn
                            .prepare_cached(
                                "DELETE FROM outcomes WHERE id IN
                                 (SELECT id FROM outcomes WHERE expires_at < ?1 LIMIT ?2)",
                            )?
                            .execute(params![now, PRUNE_BATCH as i64])
                    })
                    .await?;
                pruned += n as u64;
                if n < PRUNE_BATCH {
                    break;
                }
                tokio::task::yield_now().await;
            }
            // Guard windows older than a day are of no use to any window setting here.
            self.run_durable(|db, now, _| {
                db.conn
                    .prepare_cached("DELETE FROM guard WHERE window_start < ?1")?
                    .execute(params![now - 86_400_000])
                    .map(drop)
            })
            .await?;
            Ok(pruned)
        })
    }

    fn finished<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Outcome>, StoreError>> {
        Box::pin(async move {
            let found = self
                .run(move |db, now, _| {
                    db.conn
                        .prepare_cached(
                            "SELECT outcome FROM outcomes WHERE key = ?1 AND expires_at >= ?2",
                        )?
                        .query_row(params![key, now], |r| r.get::<_, String>(0))
                        .optional()
                })
                .await?;
            Ok(found.and_then(|json| serde_json::from_str(&json).ok()))
        })
    }

    fn count_execution<'a>(
        &'a self,
        fingerprint: &'a str,
        window: Duration,
        max: u32,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.run(move |db, now, _| {
            db.conn
                .prepare_cached(
                    "INSERT INTO guard (fingerprint, window_start, executions) VALUES (?1, ?2, 1)
                 ON CONFLICT (fingerprint) DO UPDATE SET
                     executions = CASE WHEN window_start <= ?2 - ?3 THEN 1 ELSE executions + 1 END,
                     window_start = CASE WHEN window_start <= ?2 - ?3 THEN ?2 ELSE window_start END
                 WHERE window_start <= ?2 - ?3 OR executions < ?4",
                )?
                .execute(params![fingerprint, now, millis(window), max])
                .map(|changed| changed > 0)
        }))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        // A read outside any transaction: readiness probes open nothing for the committer.
        Box::pin(async move {
            let db = self.locked().await?;
            db.conn
                .query_row("SELECT 1", [], |_| Ok(()))
                .map_err(|e| StoreError(e.to_string()))
        })
    }
}
