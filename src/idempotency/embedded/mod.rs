//! The embedded store: one SQLite file in WAL mode, owned by one worker process.
//!
//! Statements run inline on the caller's task under an async mutex (a few microseconds each, no
//! thread hop), inside a transaction that stays open for [`commit::COMMIT_WINDOW`]; a committer
//! thread then commits it, so one commit serves every job of that window (group commit). Claims and
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
//!
//! This file holds the store's handle, its opening, and the claims (in memory); each mechanism
//! has its own module: `commit` (group commit and the committer thread), `key_index` (where a
//! key's outcome row is), `schema` (settings, tables, migrations, pruning by rowid) and `guard`
//! (the loop-guard windows).

mod commit;
mod guard;
mod key_index;
mod schema;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rusqlite::{params, Connection};
use tokio::sync::{watch, Mutex};

use super::{now_ms, Claim, Store, StoreError};
use crate::config::IdempotencyConfig;
use crate::outcome::Outcome;
use commit::{committer, Committed};
use guard::GuardWindow;
pub use guard::GUARD_CAP;
use key_index::KeyIndex;

/// Milliseconds since the epoch; injectable for tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

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
    /// Loop-guard windows by step (see [`guard::guard_key`]); every allowed execution is also
    /// appended to `guard_log`, from which this map is rebuilt on open.
    guard: HashMap<u64, GuardWindow>,
    /// The loop-guard window last asked for, in milliseconds: what pruning keeps. Until one is
    /// asked for, the guard is not pruned.
    guard_window_ms: Option<i64>,
    /// [`GUARD_CAP`], smaller in tests.
    guard_cap: usize,
}

/// One in-memory claim.
struct Running {
    fingerprint: String,
    owner: String,
    lease_until: i64,
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
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::caused_by(format!("cannot create {}", dir.display()), e)
            })?;
        }
        let conn = Connection::open(path)
            .map_err(|e| StoreError::caused_by(format!("cannot open {}", path.display()), e))?;
        let migrated = schema::migrate(&conn).and_then(|orphans| {
            let mut guard = guard::load_guard(&conn)?;
            // Windows forgotten for the cap are still in the log until they end.
            guard::forget_oldest_guard_windows(&mut guard, GUARD_CAP - GUARD_CAP / 10, GUARD_CAP);
            Ok((orphans, guard, KeyIndex::load(&conn)?))
        });
        let (orphans, guard, keys) = migrated.map_err(|e| match e {
            e if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => {
                StoreError::caused_by(
                    format!(
                        "{} is in use by another process (idempotency.path; each worker needs its own file, several workers share idempotency.backend = \"postgres\")",
                        path.display()
                    ),
                    e,
                )
            }
            e => StoreError::caused_by(path.display().to_string(), e),
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
            .map_err(|e| StoreError::caused_by("cannot start the commit thread", e))?;
        Ok(EmbeddedStore { shared })
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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
                        schema::prune_batch(&db.conn, "outcomes", from, now, Some(&mut db.keys))
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
                .run(|db, now, _| Ok(guard::forget_ended_windows(db, now)))
                .await?;
            let mut after = cutoff.map(|_| 0);
            while let (Some(from), Some(cutoff)) = (after, cutoff) {
                (_, after) = self
                    .run(|db, _, _| schema::prune_batch(&db.conn, "guard_log", from, cutoff, None))
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
        Box::pin(
            self.run(move |db, now, _| guard::count_execution(db, fingerprint, window, max, now)),
        )
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        // A read outside any transaction: readiness probes open nothing for the committer.
        Box::pin(async move {
            let db = self.locked().await?;
            db.conn
                .query_row("SELECT 1", [], |_| Ok(()))
                .map_err(|e| StoreError::caused_by("SQLite", e))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    const MINUTE: i64 = 60_000;
    const HOUR: Duration = Duration::from_secs(3600);

    /// A test's own directory for its store file, removed when the test ends (passed or
    /// failed). Declared before the store, so the store closes first.
    struct TestDir(std::path::PathBuf);

    impl TestDir {
        fn new(name: &str) -> TestDir {
            TestDir(std::env::temp_dir().join(format!(
                "swr-stage-worker-unit-{name}-{}",
                uuid::Uuid::new_v4()
            )))
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn store(dir: &TestDir) -> (EmbeddedStore, Arc<AtomicI64>) {
        let mut config = crate::config::Config::load(None, [])
            .expect("default configuration")
            .idempotency;
        config.path = dir.0.join("idempotency.db").display().to_string();
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
        let dir = TestDir::new("longest-hold");
        let (store, _now) = store(&dir);
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
        let dir = TestDir::new("stale-ticket");
        let (store, now) = store(&dir);
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
        let dir = TestDir::new("guard-ended");
        let (store, now) = store(&dir);
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
        let dir = TestDir::new("guard-full");
        let (store, now) = store(&dir);
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
        let dir = TestDir::new("collide");
        let (store, now) = store(&dir);
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

    /// A completion whose transaction rolls back stored nothing: its claim comes back, so the
    /// key is still held (a duplicate waits) rather than free to run again.
    #[tokio::test]
    async fn a_failed_commit_gives_a_completed_claim_back() {
        let dir = TestDir::new("failed-commit-claim");
        let (store, now) = store(&dir);
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
        let dir = TestDir::new("failed-commit-released");
        let (store, now) = store(&dir);
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
        let dir = TestDir::new("failed-commit");
        let (store, _) = store(&dir);
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
