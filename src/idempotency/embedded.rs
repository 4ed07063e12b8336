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
//! unique index on the key); `guard_log` records each execution the loop guard allowed, also
//! appended. Per job that is one small index entry at a random place plus two appends, instead of
//! a whole outcome row placed by its random key (which split pages and cost about twice as much)
//! and a guard row per step at another random place (a third of what was left). Both tables are
//! pruned oldest-first by rowid, which follows time, so neither needs an index on its time.
//!
//! Loop-guard counts are answered from memory (one small entry per step that ran within the
//! window, at most [`GUARD_CAP`]) and rebuilt from `guard_log` when the file is opened, so a
//! restart keeps them.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
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
const SCHEMA_VERSION: i64 = 4;
/// Steps whose loop-guard window is tracked in memory at most (about 52 bytes each, so 26 MiB at
/// the cap). Past it the oldest windows are forgotten first, with a warning: the guard then lets
/// those steps run again.
pub const GUARD_CAP: usize = 500_000;

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
    /// Loop-guard windows by step (see [`guard_key`]); every allowed execution is also appended
    /// to `guard_log`, from which this map is rebuilt on open.
    guard: HashMap<u64, GuardWindow>,
    /// The loop-guard window last asked for, in milliseconds: what pruning keeps. Until one is
    /// asked for, the guard is not pruned.
    guard_window_ms: Option<i64>,
    /// [`GUARD_CAP`], smaller in tests.
    guard_cap: usize,
}

/// One step's current loop-guard window.
#[derive(Clone, Copy)]
struct GuardWindow {
    start: i64,
    executions: u32,
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
        let migrated =
            migrate(&conn).and_then(|orphans| load_guard(&conn).map(|guard| (orphans, guard)));
        let migrated = migrated.map(|(orphans, mut guard)| {
            // Windows forgotten for the cap are still in the log until they end.
            forget_oldest_guard_windows(&mut guard, GUARD_CAP - GUARD_CAP / 10, GUARD_CAP);
            (orphans, guard)
        });
        let (orphans, guard) = migrated.map_err(|e| match e {
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
                guard,
                guard_window_ms: None,
                guard_cap: GUARD_CAP,
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
                 );",
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
        if version < 4 {
            // Loop-guard executions as an appended log instead of one row per step at a random
            // place; version 2 and 3 counts become that many log rows of their window.
            db.execute_batch(
                "CREATE TABLE IF NOT EXISTS guard_log (
                     id           INTEGER PRIMARY KEY,
                     fingerprint  TEXT NOT NULL,
                     window_start INTEGER NOT NULL
                 );
                 DROP INDEX IF EXISTS outcomes_expires;",
            )?;
            let old_table: bool = db.query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'guard'",
                [],
                |r| r.get(0),
            )?;
            if old_table {
                db.execute_batch(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n
                         WHERE i < (SELECT max(executions) FROM guard))
                     INSERT INTO guard_log (fingerprint, window_start)
                         SELECT fingerprint, window_start FROM guard JOIN n ON n.i <= guard.executions
                         ORDER BY window_start;
                     DROP TABLE guard;",
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

/// The loop-guard windows, replayed from `guard_log` in order (pruning keeps it to the windows
/// that had not ended).
fn load_guard(db: &Connection) -> rusqlite::Result<HashMap<u64, GuardWindow>> {
    let mut guard: HashMap<u64, GuardWindow> = HashMap::new();
    let mut rows = db.prepare("SELECT fingerprint, window_start FROM guard_log ORDER BY id")?;
    let mut rows = rows.query([])?;
    while let Some(row) = rows.next()? {
        let (fingerprint, start): (String, i64) = (row.get(0)?, row.get(1)?);
        let window = guard.entry(guard_key(&fingerprint)).or_insert(GuardWindow {
            start,
            executions: 0,
        });
        if window.start != start {
            *window = GuardWindow {
                start,
                executions: 0,
            };
        }
        window.executions += 1;
    }
    Ok(guard)
}

/// A step's fingerprint (`pipeline:stage:mode`, see [`super::fingerprint`]) packed exactly into
/// 63 bits; anything else is hashed, with the top bit set so the two never meet.
fn guard_key(fingerprint: &str) -> u64 {
    let mut parts = fingerprint.split(':');
    let packed = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(pipeline), Some(stage), Some(mode), None) => {
            match (pipeline.parse::<u32>(), stage.parse::<u32>(), mode) {
                (Ok(p), Ok(s), "retry" | "rollback") if p < 1 << 31 && s < 1 << 31 => {
                    Some(u64::from(p) << 32 | u64::from(s) << 1 | u64::from(mode == "rollback"))
                }
                _ => None,
            }
        }
        _ => None,
    };
    packed.unwrap_or_else(|| {
        let mut hasher = std::hash::DefaultHasher::new();
        fingerprint.hash(&mut hasher);
        hasher.finish() | 1 << 63
    })
}

/// Makes room for one more step in a full loop-guard map: windows that ended go first, then the
/// oldest tenth.
fn make_guard_room(db: &mut Db, now: i64) {
    // Down to nine tenths of the cap, so the next sweep is a tenth of the cap's steps away.
    let target = db.guard_cap - db.guard_cap / 10;
    if let Some(window_ms) = db.guard_window_ms {
        db.guard.retain(|_, w| w.start > now - window_ms);
    }
    forget_oldest_guard_windows(&mut db.guard, target, db.guard_cap);
}

/// Drops the oldest windows until at most `target` are left (ties may take a few more).
fn forget_oldest_guard_windows(guard: &mut HashMap<u64, GuardWindow>, target: usize, cap: usize) {
    let Some(excess) = guard.len().checked_sub(target).filter(|&n| n > 0) else {
        return;
    };
    let mut starts: Vec<i64> = guard.values().map(|w| w.start).collect();
    let (_, &mut newest_dropped, _) = starts.select_nth_unstable(excess - 1);
    guard.retain(|_, w| w.start > newest_dropped);
    tracing::warn!(
        cap,
        forgotten = excess,
        "more steps ran within guard.window than the loop guard tracks; the oldest windows were forgotten and those steps may run again"
    );
}

/// Deletes up to [`PRUNE_BATCH`] rows of `table` after rowid `after` whose `column` is below
/// `cutoff`. Returns how many went and where the next batch starts, or `None` when pruning should
/// stop: rows are appended in time order, so a batch with nothing to delete means the rest is
/// newer still. (A lowered `idempotency.ttl` breaks that order for a while: the newer, shorter
/// lived rows then wait until the older ones expire, at most the old TTL.)
fn prune_batch(
    conn: &Connection,
    table: &str,
    column: &str,
    after: i64,
    cutoff: i64,
) -> rusqlite::Result<(usize, Option<i64>)> {
    let (last, rows): (Option<i64>, i64) = conn
        .prepare_cached(&format!(
            "SELECT max(id), count(*) FROM (SELECT id FROM {table} WHERE id > ?1 ORDER BY id LIMIT ?2)"
        ))?
        .query_row(params![after, PRUNE_BATCH as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let Some(last) = last else {
        return Ok((0, None));
    };
    let deleted = conn
        .prepare_cached(&format!(
            "DELETE FROM {table} WHERE id > ?1 AND id <= ?2 AND {column} < ?3"
        ))?
        .execute(params![after, last, cutoff])?;
    let more = deleted > 0 && rows == PRUNE_BATCH as i64;
    Ok((deleted, more.then_some(last)))
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
            let expires = now.saturating_add(s.ttl_ms);
            let mut insert = db.conn.prepare_cached(
                "INSERT INTO outcomes (key, fingerprint, owner, outcome, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (key) DO NOTHING",
            )?;
            if insert.execute(params![key, fingerprint, owner, outcome, expires])? == 0 {
                // The key has a record. A live one stays (the first outcome wins); an expired
                // one is replaced by a new row at the end, not rewritten in place, so rows stay
                // in expiry order for pruning.
                let expired = db
                    .conn
                    .prepare_cached("DELETE FROM outcomes WHERE key = ?1 AND expires_at < ?2")?
                    .execute(params![key, now])?;
                if expired > 0 {
                    insert.execute(params![key, fingerprint, owner, outcome, expires])?;
                }
            }
            Ok(())
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
            // Oldest first, in batches, letting jobs in between, so a large backlog never stalls
            // the store.
            let mut pruned = 0u64;
            let mut after = Some(0);
            while let Some(from) = after {
                let (n, next) = self
                    .run(|db, now, _| {
                        db.running.retain(|_, r| r.lease_until >= now);
                        prune_batch(&db.conn, "outcomes", "expires_at", from, now)
                    })
                    .await?;
                pruned += n as u64;
                after = next;
                tokio::task::yield_now().await;
            }
            // Loop-guard windows that ended: from memory once, then from the log in batches. Log
            // rows hold their window's start, not their own time, so a few ended ones may sit
            // behind live ones until a later pass; every row is gone one window after it was
            // written.
            let cutoff = self
                .run(|db, now, _| {
                    let Some(window_ms) = db.guard_window_ms else {
                        return Ok(None);
                    };
                    let cutoff = now - window_ms + 1;
                    db.guard.retain(|_, w| w.start >= cutoff);
                    Ok(Some(cutoff))
                })
                .await?;
            let mut after = cutoff.map(|_| 0);
            while let (Some(from), Some(cutoff)) = (after, cutoff) {
                (_, after) = self
                    .run(|db, _, _| {
                        prune_batch(&db.conn, "guard_log", "window_start", from, cutoff)
                    })
                    .await?;
                tokio::task::yield_now().await;
            }
            // The deletions become durable with the jobs' next commit; pruning again after a
            // crash finds the same rows.
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
            // A fixed window per step, from its first execution: one that started
            // `window` ago or earlier has ended, and the next execution starts a new one.
            let window_ms = millis(window);
            db.guard_window_ms = Some(window_ms);
            let key = guard_key(fingerprint);
            let current = db
                .guard
                .get(&key)
                .copied()
                .filter(|w| w.start > now - window_ms);
            let next = match current {
                Some(w) if w.executions >= max => return Ok(false),
                Some(w) => GuardWindow {
                    start: w.start,
                    executions: w.executions + 1,
                },
                None => GuardWindow {
                    start: now,
                    executions: 1,
                },
            };
            db.conn
                .prepare_cached(
                    "INSERT INTO guard_log (fingerprint, window_start) VALUES (?1, ?2)",
                )?
                .execute(params![fingerprint, next.start])?;
            if db.guard.len() >= db.guard_cap && !db.guard.contains_key(&key) {
                make_guard_room(db, now);
            }
            db.guard.insert(key, next);
            Ok(true)
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    const MINUTE: i64 = 60_000;
    const HOUR: Duration = Duration::from_secs(3600);

    fn store(dir: &str) -> (EmbeddedStore, Arc<AtomicI64>) {
        let mut config = crate::config::Config::load(None, [])
            .expect("default configuration")
            .idempotency;
        config.path = std::env::temp_dir()
            .join(format!(
                "swr-stage-worker-unit-{dir}-{}",
                uuid::Uuid::new_v4()
            ))
            .join("idempotency.db")
            .display()
            .to_string();
        let now = Arc::new(AtomicI64::new(1_800_000_000_000));
        let clock = now.clone();
        let store =
            EmbeddedStore::open_with_clock(&config, Arc::new(move || clock.load(Ordering::SeqCst)))
                .expect("open");
        store.shared.db.try_lock().expect("unlocked").guard_cap = 10;
        (store, now)
    }

    fn step(i: i64) -> String {
        super::super::fingerprint(i, 0, "retry")
    }

    #[tokio::test]
    async fn a_full_loop_guard_forgets_ended_windows_first() {
        let (store, now) = store("guard-ended");
        for i in 1..=10 {
            assert!(store.count_execution(&step(i), HOUR, 1).await.unwrap());
        }
        now.fetch_add(60 * MINUTE, Ordering::SeqCst);
        assert!(store.count_execution(&step(11), HOUR, 1).await.unwrap());
        let db = store.shared.db.try_lock().unwrap();
        assert_eq!(db.guard.len(), 1, "only the live window is left");
    }

    #[tokio::test]
    async fn a_full_loop_guard_forgets_the_oldest_windows_and_keeps_the_rest() {
        let (store, now) = store("guard-full");
        for i in 1..=10 {
            assert!(store.count_execution(&step(i), HOUR, 1).await.unwrap());
            now.fetch_add(MINUTE, Ordering::SeqCst);
        }
        // All ten windows are live; an eleventh step makes room by going down to nine tenths
        // of the cap: the oldest window is dropped.
        assert!(store.count_execution(&step(11), HOUR, 1).await.unwrap());
        assert_eq!(store.shared.db.try_lock().unwrap().guard.len(), 10);
        for i in 2..=11 {
            assert!(
                !store.count_execution(&step(i), HOUR, 1).await.unwrap(),
                "step {i} is still counted"
            );
        }
        assert!(
            store.count_execution(&step(1), HOUR, 1).await.unwrap(),
            "the oldest window was forgotten"
        );
    }
}
