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
//! Layout: `outcomes` holds finished outcomes in a rowid table, appended in time order;
//! `guard_log` records each execution the loop guard allowed, also appended. Neither has an
//! index: per job the file takes two appends and nothing at a random place. A whole outcome row
//! placed by its random key split pages and cost about twice as much, a guard row per step at
//! another random place a third of what was left, and a unique index on the key half of the
//! rest. Both tables are pruned oldest-first by rowid, which follows time.
//!
//! Keys are found through [`KeyIndex`], in memory: a 64-bit hash of each stored key and its
//! row (about 40 bytes a key with the map's spare room, up to about 58 while it grows, so
//! 1,000,000 outcomes within the TTL take about 34 MiB, a tenth of the file; pruning gives
//! memory back), rebuilt from the table when the file is opened. A lookup reads the row and
//! compares the key itself, so a hash shared by two keys never mixes them up.
//!
//! Loop-guard counts are answered from memory (one small entry per step that ran within the
//! window, at most [`GUARD_CAP`]) and rebuilt from `guard_log` when the file is opened, so a
//! restart keeps them.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
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
/// WAL pages between checkpoints (4 MiB). The file only appends, so a page reaches the WAL about
/// once whatever the interval; a shorter one keeps each checkpoint, which holds the store, short
/// (32 MiB ones put the worker's p99 publish-to-outcome latency near 55 ms, 4 MiB near 11).
const CHECKPOINT_PAGES: i64 = 1024;
/// Schema version kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 5;
/// Steps whose loop-guard window is tracked in memory at most (about 52 bytes each, so 26 MiB at
/// the cap). Past it the oldest windows are forgotten first, with a warning: the guard then lets
/// those steps run again.
pub const GUARD_CAP: usize = 500_000;
/// Keys held in the in-memory key index past which each pruning pass (and opening) logs a
/// warning: about 40 MiB.
const KEYS_WARN: usize = 1_000_000;

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
    /// Claims that completions in the open transaction ended: if it rolls back, their outcomes
    /// are not stored, so the claims come back and the keys stay held (else a duplicate could
    /// claim and run a key whose first run has finished and is being retried).
    completed: Vec<(String, Running)>,
    /// Where each stored outcome's row is, by key.
    keys: KeyIndex,
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

/// The rowid of each stored key's outcome, by a 64-bit hash of the key: the file needs no index
/// on the key, so recording an outcome writes nothing at a random place. The hash only points;
/// the row's own key is compared on every lookup. A key whose hash another stored key already
/// has is kept whole in `collided` (nearly always empty).
///
/// Changes follow the open transaction: each is logged in `undo` and taken back if the
/// transaction rolls back, and the log is cleared when it commits.
struct KeyIndex {
    /// Seeded per process: the map is rebuilt on open, so the hash never reaches the file.
    seed: RandomState,
    /// `u64::MAX`, or 0 in tests to make every key collide.
    mask: u64,
    rows: HashMap<u64, i64>,
    collided: HashMap<String, i64>,
    /// What the open transaction changed, oldest first, with the value before.
    undo: Vec<Undo>,
}

/// One change to the index, with what it replaced.
enum Undo {
    Row { hash: u64, before: Option<i64> },
    Collided { key: String, before: Option<i64> },
}

/// Sets `key` to `id`, or removes it for `None`; returns what it was.
fn put<K: Hash + Eq>(map: &mut HashMap<K, i64>, key: K, id: Option<i64>) -> Option<i64> {
    match id {
        Some(id) => map.insert(key, id),
        None => map.remove(&key),
    }
}

/// A stored outcome, found by key.
struct StoredRow {
    id: i64,
    outcome: String,
    expires_at: i64,
}

/// Where a key stands in the index.
struct Found {
    /// The key's row, live or expired.
    row: Option<StoredRow>,
    /// The key's hash points at another key's row: a new row of this key goes to `collided`.
    slot_taken: bool,
}

impl KeyIndex {
    /// Every row of `outcomes`, in order (were a key to have two rows, the later one wins).
    fn load(conn: &Connection) -> rusqlite::Result<KeyIndex> {
        let mut index = KeyIndex {
            seed: RandomState::new(),
            mask: u64::MAX,
            rows: HashMap::new(),
            collided: HashMap::new(),
            undo: Vec::new(),
        };
        let mut rows = conn.prepare("SELECT id, key FROM outcomes ORDER BY id")?;
        let mut rows = rows.query([])?;
        while let Some(row) = rows.next()? {
            let (id, key): (i64, String) = (row.get(0)?, row.get(1)?);
            let found = index.find(conn, &key)?;
            if let Some(earlier) = found.row {
                index.remove(&key, earlier.id);
            }
            index.insert(&key, id, found.slot_taken);
        }
        index.undo.clear();
        Ok(index)
    }

    fn hash(&self, key: &str) -> u64 {
        self.seed.hash_one(key) & self.mask
    }

    /// The key and the outcome of row `id`, if it exists.
    fn read(conn: &Connection, id: i64) -> rusqlite::Result<Option<(String, StoredRow)>> {
        conn.prepare_cached("SELECT key, outcome, expires_at FROM outcomes WHERE id = ?1")?
            .query_row([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    StoredRow {
                        id,
                        outcome: r.get(1)?,
                        expires_at: r.get(2)?,
                    },
                ))
            })
            .optional()
    }

    /// The row `key` has, if any, and whether its hash's slot belongs to another key. A pointer
    /// to a row that is gone, or that holds another key, finds nothing.
    fn find(&self, conn: &Connection, key: &str) -> rusqlite::Result<Found> {
        let mut slot_taken = false;
        if let Some(&id) = self.rows.get(&self.hash(key)) {
            match KeyIndex::read(conn, id)? {
                Some((stored, row)) if stored == key => {
                    return Ok(Found {
                        row: Some(row),
                        slot_taken: false,
                    })
                }
                Some(_) => slot_taken = true,
                None => {}
            }
        }
        if let Some(&id) = self.collided.get(key) {
            if let Some((stored, row)) = KeyIndex::read(conn, id)? {
                if stored == key {
                    return Ok(Found {
                        row: Some(row),
                        slot_taken,
                    });
                }
            }
        }
        Ok(Found {
            row: None,
            slot_taken,
        })
    }

    /// Records that `key`'s outcome is row `id` (the key has no other row); `slot_taken` as
    /// [`find`](Self::find) answered it.
    fn insert(&mut self, key: &str, id: i64, slot_taken: bool) {
        if slot_taken {
            self.set_collided(key, Some(id));
            return;
        }
        self.set_row(self.hash(key), Some(id));
        if self.collided.contains_key(key) {
            self.set_collided(key, None);
        }
    }

    /// Forgets row `id` of `key` (deleted).
    fn remove(&mut self, key: &str, id: i64) {
        if self.collided.get(key) == Some(&id) {
            self.set_collided(key, None);
            return;
        }
        let hash = self.hash(key);
        if self.rows.get(&hash) == Some(&id) {
            self.set_row(hash, None);
        }
    }

    fn set_row(&mut self, hash: u64, id: Option<i64>) {
        let before = put(&mut self.rows, hash, id);
        self.undo.push(Undo::Row { hash, before });
    }

    fn set_collided(&mut self, key: &str, id: Option<i64>) {
        let before = put(&mut self.collided, key.to_owned(), id);
        self.undo.push(Undo::Collided {
            key: key.to_owned(),
            before,
        });
    }

    /// The open transaction committed: its changes stay.
    fn committed(&mut self) {
        self.undo.clear();
    }

    /// The open transaction rolled back: its changes are taken back, newest first.
    fn rolled_back(&mut self) {
        while let Some(change) = self.undo.pop() {
            match change {
                Undo::Row { hash, before } => put(&mut self.rows, hash, before),
                Undo::Collided { key, before } => put(&mut self.collided, key, before),
            };
        }
    }

    /// Says so when the index has grown past [`KEYS_WARN`]: its memory follows the outcomes kept
    /// within the TTL, which the operator controls.
    fn warn_if_large(&self) {
        if self.len() > KEYS_WARN {
            tracing::warn!(
                keys = self.len(),
                approx_mib = self.len() * 40 / (1 << 20),
                "the embedded idempotency store indexes many outcomes in memory (about 40 bytes each); a shorter idempotency.ttl or idempotency.backend = \"postgres\" keeps it smaller"
            );
        }
    }

    /// Gives memory back after pruning emptied most of the map.
    fn shrink(&mut self) {
        if self.rows.capacity() > 1024 && self.rows.capacity() > 4 * self.rows.len() {
            self.rows.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.rows.len() + self.collided.len()
    }
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
        match result {
            Ok(()) => {
                self.keys.committed();
                self.completed.clear();
            }
            Err(_) => self.rolled_back(),
        }
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
            self.rolled_back();
        }
    }

    /// The open transaction is gone: the index forgets its rows and its completions' claims
    /// come back (unless the key was claimed again meanwhile).
    fn rolled_back(&mut self) {
        self.keys.rolled_back();
        for (key, claim) in self.completed.drain(..) {
            self.running.entry(key).or_insert(claim);
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
        let migrated = migrate(&conn).and_then(|orphans| {
            let mut guard = load_guard(&conn)?;
            // Windows forgotten for the cap are still in the log until they end.
            forget_oldest_guard_windows(&mut guard, GUARD_CAP - GUARD_CAP / 10, GUARD_CAP);
            Ok((orphans, guard, KeyIndex::load(&conn)?))
        });
        let (orphans, guard, keys) = migrated.map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DatabaseBusy => {
                StoreError(format!(
                    "{} is in use by another process (idempotency.path): each worker needs its own file; several workers share idempotency.backend = \"postgres\"",
                    path.display()
                ))
            }
            e => StoreError(format!("{}: {e}", path.display())),
        })?;
        tracing::info!(
            outcomes = keys.len(),
            path = %path.display(),
            "idempotency store opened"
        );
        keys.warn_if_large();
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
                completed: Vec::new(),
                keys,
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
        if version > SCHEMA_VERSION {
            return Err(rusqlite::Error::ToSqlConversionFailure(
                format!(
                    "the file's layout is version {version}, written by a newer release; this one reads up to version {SCHEMA_VERSION} (use that release, or another idempotency.path)"
                )
                .into(),
            ));
        }
        let mut orphans = 0;
        if version < 3 {
            // Finished outcomes only (claims live in memory), in a rowid table: rows are appended
            // in time order, nothing is written at a random place.
            db.execute_batch(&outcomes_table("outcomes"))?;
            // From the first schema (one WITHOUT ROWID table of claims and outcomes), found by
            // name: an early release could stop between creating it and recording the version.
            let old_table = schema_has(db, "table", "name", "idempotency")?;
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
            let old_table = schema_has(db, "table", "name", "guard")?;
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
        if version < 5 {
            // No index on the key (the key index is in memory): versions 3 and 4 had a unique
            // one, which goes only with its table.
            let indexed = schema_has(db, "index", "tbl_name", "outcomes")?;
            if indexed {
                db.execute_batch(&outcomes_table("outcomes_v5"))?;
                db.execute_batch(
                    "INSERT INTO outcomes_v5 (id, key, fingerprint, owner, outcome, expires_at)
                         SELECT id, key, fingerprint, owner, outcome, expires_at FROM outcomes
                         ORDER BY id;
                     DROP TABLE outcomes;
                     ALTER TABLE outcomes_v5 RENAME TO outcomes;",
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

/// Whether the schema has an object of `kind` whose `column` (`name`, or `tbl_name` for what
/// belongs to a table) is `value`.
fn schema_has(db: &Connection, kind: &str, column: &str, value: &str) -> rusqlite::Result<bool> {
    db.query_row(
        &format!("SELECT count(*) > 0 FROM sqlite_master WHERE type = ?1 AND {column} = ?2"),
        [kind, value],
        |r| r.get(0),
    )
}

/// The outcomes table as version 5 has it, under `name`.
fn outcomes_table(name: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {name} (
             id          INTEGER PRIMARY KEY,
             key         TEXT NOT NULL,
             fingerprint TEXT NOT NULL,
             owner       TEXT NOT NULL,
             outcome     TEXT NOT NULL,
             expires_at  INTEGER NOT NULL
         );"
    )
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
        db.guard
            .retain(|_, w| w.start > now.saturating_sub(window_ms));
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

/// Deletes up to [`PRUNE_BATCH`] rows of `table` (`outcomes` by `expires_at`, `guard_log` by
/// `window_start`) after rowid `after` whose time is below `cutoff`, and takes the deleted
/// outcomes out of `keys`. Returns how many went and where the next batch starts, or `None` when
/// pruning should stop: rows are appended in time order, so a batch with nothing to delete means
/// the rest is newer still. (A lowered `idempotency.ttl` breaks that order for a while: the
/// newer, shorter lived rows then wait until the older ones expire, at most the old TTL.)
fn prune_batch(
    conn: &Connection,
    table: &str,
    after: i64,
    cutoff: i64,
    keys: Option<&mut KeyIndex>,
) -> rusqlite::Result<(usize, Option<i64>)> {
    let column = if table == "outcomes" {
        "expires_at"
    } else {
        "window_start"
    };
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
    let deleted = match keys {
        Some(keys) => {
            let mut delete = conn.prepare_cached(&format!(
                "DELETE FROM {table} WHERE id > ?1 AND id <= ?2 AND {column} < ?3 RETURNING id, key"
            ))?;
            let mut rows = delete.query(params![after, last, cutoff])?;
            let mut deleted = 0;
            while let Some(row) = rows.next()? {
                let (id, key): (i64, String) = (row.get(0)?, row.get(1)?);
                keys.remove(&key, id);
                deleted += 1;
            }
            deleted
        }
        None => conn
            .prepare_cached(&format!(
                "DELETE FROM {table} WHERE id > ?1 AND id <= ?2 AND {column} < ?3"
            ))?
            .execute(params![after, last, cutoff])?,
    };
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
    // The key alone decides whether a delivery runs (contract §5): one that reuses it for
    // another step waits like any other, and gets the stored outcome once there is one. Only
    // the same step takes over a claim whose lease ran out: the take-over redoes the dead job's
    // call, and another step's call under its key would stand in for it.
    if let Some(running) = db.running.get(key) {
        if running.lease_until >= now || running.fingerprint != fingerprint {
            return Ok(Claim::InFlight {
                owner: running.owner.clone(),
            });
        }
        takeover = true;
    }
    let finished = db
        .keys
        .find(&db.conn, key)?
        .row
        .filter(|row| row.expires_at >= now);
    if let Some(row) = finished {
        return match serde_json::from_str::<Outcome>(&row.outcome) {
            Ok(o) => Ok(Claim::Finished(Box::new(o))),
            Err(e) => Err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))),
        };
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

/// Ends `owner`'s claim of `key`, if it still holds it.
fn release_claim(db: &mut Db, key: &str, owner: &str) {
    if db.running.get(key).is_some_and(|r| r.owner == owner) {
        db.running.remove(key);
    }
    // Nor may a rollback of the open transaction bring this claim back.
    db.completed
        .retain(|(k, claim)| !(k == key && claim.owner == owner));
}

/// Stores `key`'s final outcome (JSON) in the open transaction and ends its claim there.
fn store_outcome(
    db: &mut Db,
    key: &str,
    outcome: &str,
    now: i64,
    ttl_ms: i64,
) -> rusqlite::Result<()> {
    // The fingerprint comes from the claim (a DLQ marker has none).
    let (fingerprint, owner) = db
        .running
        .get(key)
        .map(|r| (r.fingerprint.clone(), r.owner.clone()))
        .unwrap_or_default();
    // The claim ends with the transaction that stores the outcome, not before: a
    // failed statement leaves it held, and a rollback gives it back.
    let end_claim = |db: &mut Db| {
        if let Some(claim) = db.running.remove(key) {
            db.completed.push((key.to_owned(), claim));
        }
    };
    let found = db.keys.find(&db.conn, key)?;
    match found.row {
        // A live record stays: the first outcome wins.
        Some(row) if row.expires_at >= now => {
            end_claim(db);
            return Ok(());
        }
        // An expired one is replaced by a new row at the end, not rewritten in place,
        // so rows stay in expiry order for pruning.
        Some(row) => {
            db.conn
                .prepare_cached("DELETE FROM outcomes WHERE id = ?1")?
                .execute([row.id])?;
            db.keys.remove(key, row.id);
        }
        None => {}
    }
    db.conn
        .prepare_cached(
            "INSERT INTO outcomes (key, fingerprint, owner, outcome, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            key,
            fingerprint,
            owner,
            outcome,
            now.saturating_add(ttl_ms)
        ])?;
    let id = db.conn.last_insert_rowid();
    db.keys.insert(key, id, found.slot_taken);
    end_claim(db);
    Ok(())
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

    fn complete_json<'a>(
        &'a self,
        key: &'a str,
        json: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.run_durable(move |db, now, s| store_outcome(db, key, json, now, s.ttl_ms)))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        // Claims are in memory: nothing to commit.
        Box::pin(self.run(move |db, _, _| {
            release_claim(db, key, owner);
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
                        prune_batch(&db.conn, "outcomes", from, now, Some(&mut db.keys))
                    })
                    .await?;
                pruned += n as u64;
                after = next;
                tokio::task::yield_now().await;
            }
            self.run(|db, _, _| {
                db.keys.shrink();
                db.keys.warn_if_large();
                Ok(())
            })
            .await?;
            // Loop-guard windows that ended: from memory once, then from the log in batches. Log
            // rows hold their window's start, not their own time, so a few ended ones may sit
            // behind live ones until a later pass; every row is gone one window after it was
            // written.
            let cutoff = self
                .run(|db, now, _| {
                    let Some(window_ms) = db.guard_window_ms else {
                        return Ok(None);
                    };
                    let cutoff = now.saturating_sub(window_ms) + 1;
                    db.guard.retain(|_, w| w.start >= cutoff);
                    Ok(Some(cutoff))
                })
                .await?;
            let mut after = cutoff.map(|_| 0);
            while let (Some(from), Some(cutoff)) = (after, cutoff) {
                (_, after) = self
                    .run(|db, _, _| prune_batch(&db.conn, "guard_log", from, cutoff, None))
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
                    Ok(db
                        .keys
                        .find(&db.conn, key)?
                        .row
                        .filter(|row| row.expires_at >= now)
                        .map(|row| row.outcome))
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
                .filter(|w| w.start > now.saturating_sub(window_ms));
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

    /// `idempotency.hold` is the configuration's: a duplicate holding for as long as a Duration
    /// holds waits for the running copy without overflowing its deadline.
    #[tokio::test]
    async fn a_duplicate_holding_as_long_as_a_duration_holds_waits_for_the_running_copy() {
        use super::super::{Admission, Gate};
        let (store, _now) = store("longest-hold");
        let mut config = crate::config::Config::load(None, [])
            .expect("default configuration")
            .idempotency;
        config.hold = Duration::MAX;
        let gate = Arc::new(Gate::new(Arc::new(store), "w", &config));
        let Admission::Run(first) = gate.admit("key-1", &step(1)).await else {
            panic!("expected to run the key");
        };
        let duplicate = tokio::spawn({
            let gate = gate.clone();
            async move { matches!(gate.admit("key-1", &step(1)).await, Admission::Run(_)) }
        });
        tokio::task::yield_now().await;
        assert!(!duplicate.is_finished(), "the duplicate waits");
        gate.release(first).await;
        let ran = tokio::time::timeout(Duration::from_secs(10), duplicate)
            .await
            .expect("the duplicate runs once the first copy let go")
            .expect("no panic");
        assert!(ran);
    }

    /// A ticket whose claim was taken over (its lease ran out) is stale: settling it must not
    /// free the claim of the ticket that took the key over, in this process either.
    #[tokio::test]
    async fn a_stale_ticket_never_releases_a_newer_claim() {
        use super::super::{Admission, Gate};
        let (store, now) = store("stale-ticket");
        let mut config = crate::config::Config::load(None, [])
            .expect("default configuration")
            .idempotency;
        config.hold = Duration::from_millis(50);
        let lease = millis(config.lease);
        let gate = Gate::new(Arc::new(store), "w", &config);
        let run = |admission| match admission {
            Admission::Run(ticket) => ticket,
            _ => panic!("expected to run the key"),
        };
        let stale = run(gate.admit("key-1", &step(1)).await);
        now.fetch_add(lease + 1, Ordering::SeqCst);
        let newer = run(gate.admit("key-1", &step(1)).await);
        assert!(newer.takeover);
        gate.release(stale).await;
        assert!(
            gate.local.lock().unwrap().contains_key("key-1"),
            "the newer ticket's local waiters' entry stays"
        );
        assert!(
            matches!(gate.admit("key-1", &step(1)).await, Admission::Requeue(_)),
            "the newer claim still holds the key"
        );
        gate.release(newer).await;
        assert!(matches!(
            gate.admit("key-1", &step(1)).await,
            Admission::Run(_)
        ));
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

    fn done(key: &str, pipeline: i64) -> Outcome {
        serde_json::from_value(serde_json::json!({
            "idempotency_key": key, "pipeline_id": pipeline, "stage_index": 0, "mode": "retry",
            "status": "succeeded", "http_status": 201, "attempts": 1, "replayed": false,
            "error": null, "campaign_id": null, "metadata": null, "swr_request_id": null,
            "started_at": "2026-11-29T05:20:28.123Z", "finished_at": "2026-11-29T05:20:28.141Z",
            "duration_ms": 18, "worker": "unit/1"
        }))
        .expect("an outcome")
    }

    /// With every key hashing alike, each still finds its own outcome and only its own, through
    /// completion, pruning and a re-run after expiry.
    #[tokio::test]
    async fn keys_that_share_a_hash_are_kept_apart() {
        let (store, now) = store("collide");
        store.shared.db.try_lock().unwrap().keys.mask = 0;
        let keys = ["key-a", "key-b", "key-c"];
        let finish = |k: &'static str, p: i64| {
            let store = &store;
            async move {
                let claim = store.claim(k, &step(p), "w#1").await.unwrap();
                assert_eq!(claim, Claim::Acquired { takeover: false }, "{k}");
                store.complete(k, &done(k, p)).await.unwrap();
            }
        };
        finish(keys[0], 1).await;
        now.fetch_add(60 * MINUTE, Ordering::SeqCst);
        finish(keys[1], 2).await;
        finish(keys[2], 3).await;
        let replayed = |k: &'static str, p: i64| {
            let store = &store;
            async move {
                match store.claim(k, &step(p), "w#2").await.unwrap() {
                    Claim::Finished(o) => assert_eq!(o.idempotency_key, k),
                    other => panic!("{k}: expected its stored outcome, got {other:?}"),
                }
                assert_eq!(store.finished(k).await.unwrap().unwrap().idempotency_key, k);
            }
        };
        for (p, k) in (1..).zip(keys) {
            replayed(k, p).await;
        }
        assert_eq!(
            store.claim("key-d", &step(4), "w#2").await.unwrap(),
            Claim::Acquired { takeover: false },
            "a new key with the same hash is new"
        );
        store.release("key-d", "w#2").await.unwrap();
        // The first key expires and is pruned; the others stay found.
        let ttl = store.shared.ttl_ms;
        now.fetch_add(ttl - 60 * MINUTE + 1, Ordering::SeqCst);
        assert_eq!(store.prune().await.unwrap(), 1);
        assert_eq!(
            store.claim(keys[0], &step(1), "w#3").await.unwrap(),
            Claim::Acquired { takeover: false }
        );
        store.complete(keys[0], &done(keys[0], 1)).await.unwrap();
        for (p, k) in (1..).zip(keys) {
            replayed(k, p).await;
        }
        assert_eq!(store.shared.db.try_lock().unwrap().keys.len(), 3);
    }

    /// An in-memory database with the outcomes table and an index over it where every key
    /// collides.
    fn colliding_index() -> (Connection, KeyIndex) {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&outcomes_table("outcomes")).unwrap();
        let mut index = KeyIndex::load(&conn).unwrap();
        index.mask = 0;
        (conn, index)
    }

    /// Adds a row for `key` the way `complete` does; returns its id.
    fn add(conn: &Connection, index: &mut KeyIndex, key: &str) -> i64 {
        let found = index.find(conn, key).unwrap();
        assert!(found.row.is_none(), "{key} has no row yet");
        conn.execute(
            "INSERT INTO outcomes (key, fingerprint, owner, outcome, expires_at)
             VALUES (?1, '1:0:retry', 'w', '{}', 0)",
            [key],
        )
        .unwrap();
        let id = conn.last_insert_rowid();
        index.insert(key, id, found.slot_taken);
        id
    }

    fn row_of(conn: &Connection, index: &KeyIndex, key: &str) -> Option<i64> {
        index.find(conn, key).unwrap().row.map(|r| r.id)
    }

    #[test]
    fn a_rolled_back_transaction_takes_its_index_changes_back() {
        let (conn, mut index) = colliding_index();
        conn.execute_batch("BEGIN").unwrap();
        let a = add(&conn, &mut index, "key-a");
        let b = add(&conn, &mut index, "key-b");
        conn.execute_batch("COMMIT").unwrap();
        index.committed();
        conn.execute_batch("BEGIN").unwrap();
        conn.execute("DELETE FROM outcomes WHERE id = ?1", [a])
            .unwrap();
        index.remove("key-a", a);
        add(&conn, &mut index, "key-c");
        conn.execute_batch("ROLLBACK").unwrap();
        index.rolled_back();
        assert_eq!(row_of(&conn, &index, "key-a"), Some(a));
        assert_eq!(row_of(&conn, &index, "key-b"), Some(b));
        assert_eq!(row_of(&conn, &index, "key-c"), None);
        assert_eq!(index.len(), 2);
    }

    /// A collided key whose row went without the index hearing of it (a prune that failed half
    /// way) is found again once it has a new row, even when that row takes the free slot.
    #[test]
    fn a_stale_collided_entry_does_not_hide_a_new_row() {
        let (conn, mut index) = colliding_index();
        let a = add(&conn, &mut index, "key-a");
        let b = add(&conn, &mut index, "key-b");
        assert!(index.collided.contains_key("key-b"));
        conn.execute("DELETE FROM outcomes WHERE id = ?1", [b])
            .unwrap();
        conn.execute("DELETE FROM outcomes WHERE id = ?1", [a])
            .unwrap();
        index.remove("key-a", a);
        let new_b = add(&conn, &mut index, "key-b");
        assert_eq!(row_of(&conn, &index, "key-b"), Some(new_b));
        assert!(index.collided.is_empty());
        let new_a = add(&conn, &mut index, "key-a");
        assert_eq!(row_of(&conn, &index, "key-a"), Some(new_a));
        assert_eq!(row_of(&conn, &index, "key-b"), Some(new_b));
    }

    /// A completion whose transaction rolls back stored nothing: its claim comes back, so the
    /// key is still held (a duplicate waits) rather than free to run again.
    #[tokio::test]
    async fn a_failed_commit_gives_a_completed_claim_back() {
        let (store, now) = store("failed-commit-claim");
        let key = "key-running";
        assert!(matches!(
            store.claim(key, &step(1), "w#1").await.unwrap(),
            Claim::Acquired { .. }
        ));
        let mut db = store.shared.db.lock().await;
        db.begin(&store.shared.opened).unwrap();
        let outcome = serde_json::to_string(&done(key, 1)).unwrap();
        let at = now.load(Ordering::SeqCst);
        store_outcome(&mut db, key, &outcome, at, 60_000).unwrap();
        assert!(
            !db.running.contains_key(key),
            "the claim ends with the stored outcome"
        );
        // The transaction ends under the store's feet, so its COMMIT fails.
        db.conn.execute_batch("ROLLBACK").unwrap();
        db.commit();
        drop(db);
        match store.claim(key, &step(1), "w#2").await.unwrap() {
            Claim::InFlight { owner } => assert_eq!(owner, "w#1"),
            other => panic!("the key is free again after the rollback: {other:?}"),
        }
    }

    /// A claim released after its completion ran, in the same open transaction, stays released
    /// when that transaction rolls back.
    #[tokio::test]
    async fn a_rollback_does_not_bring_back_a_released_claim() {
        let (store, now) = store("failed-commit-released");
        let key = "key-released";
        store.claim(key, &step(1), "w#1").await.unwrap();
        let outcome = serde_json::to_string(&done(key, 1)).unwrap();
        // All under one lock, so the committer cannot commit in between.
        let mut db = store.shared.db.lock().await;
        db.begin(&store.shared.opened).unwrap();
        store_outcome(&mut db, key, &outcome, now.load(Ordering::SeqCst), 60_000).unwrap();
        release_claim(&mut db, key, "w#1");
        db.conn.execute_batch("ROLLBACK").unwrap();
        db.commit();
        drop(db);
        assert!(matches!(
            store.claim(key, &step(1), "w#2").await.unwrap(),
            Claim::Acquired { .. }
        ));
    }

    /// A commit that fails takes the index changes of its transaction back (the wiring of
    /// `Db::commit`, not only the undo log).
    #[tokio::test]
    async fn a_failed_commit_takes_the_index_changes_back() {
        let (store, _) = store("failed-commit");
        let finished = "key-kept";
        store.claim(finished, &step(1), "w#1").await.unwrap();
        store.complete(finished, &done(finished, 1)).await.unwrap();
        let mut db = store.shared.db.lock().await;
        db.begin(&store.shared.opened).unwrap();
        db.conn
            .execute(
                "INSERT INTO outcomes (key, fingerprint, owner, outcome, expires_at)
                 VALUES ('key-lost', '2:0:retry', 'w#1', '{}', 0)",
                [],
            )
            .unwrap();
        let id = db.conn.last_insert_rowid();
        db.keys.insert("key-lost", id, false);
        assert_eq!(db.keys.len(), 2);
        // The transaction ends under the store's feet, so its COMMIT fails.
        db.conn.execute_batch("ROLLBACK").unwrap();
        db.commit();
        assert_eq!(db.keys.len(), 1, "the lost row's index entry is gone");
        assert!(db.keys.find(&db.conn, "key-lost").unwrap().row.is_none());
        drop(db);
        assert!(matches!(
            store.claim(finished, &step(1), "w#2").await.unwrap(),
            Claim::Finished(_)
        ));
    }
}
