//! The embedded store: one SQLite file in WAL mode, written by one thread that commits in
//! groups (every operation waiting at that moment shares one transaction), so the store keeps up
//! with the worker without a commit per job.
//!
//! Durability: `synchronous = NORMAL` in WAL mode survives a killed process (committed pages are
//! in the OS); only a power loss can drop the last commits. Another process may open the same
//! file: every group runs in `BEGIN IMMEDIATE`, so claims stay atomic across processes too.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::{now_ms, Claim, Store, StoreError};
use crate::config::IdempotencyConfig;
use crate::outcome::Outcome;

/// How long a transaction stays open for more ops to join before it commits: one commit per
/// millisecond at most, instead of one per op, is what lets the store keep up with the worker.
const COMMIT_WINDOW: Duration = Duration::from_millis(1);
/// Largest group committed in one transaction.
const MAX_GROUP: usize = 512;
/// Bound on operations waiting for the writer (back-pressure instead of an unbounded queue).
const QUEUE_DEPTH: usize = 4096;
/// Limit for any one operation, queueing included.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Schema version kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 2;

/// Milliseconds since the epoch; injectable for tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// One request to the writer thread.
enum Op {
    Claim {
        key: String,
        fingerprint: String,
        owner: String,
        /// Taken when the claim is answered before the commit.
        reply: Option<oneshot::Sender<Result<Claim, StoreError>>>,
    },
    Complete {
        key: String,
        outcome: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Release {
        key: String,
        owner: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Prune {
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Finished {
        key: String,
        reply: oneshot::Sender<Result<Option<Outcome>, StoreError>>,
    },
    Guard {
        fingerprint: String,
        window_ms: i64,
        max: u32,
        /// Taken when the count is answered before the commit.
        reply: Option<oneshot::Sender<Result<bool, StoreError>>>,
    },
}

/// Handle to the writer thread; dropping the last one stops it.
pub struct EmbeddedStore {
    /// Operations for the writer thread.
    ops: mpsc::Sender<Op>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database at `idempotency.path` and starts the writer.
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
        let db = Connection::open(path)
            .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        migrate(&db).map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        let (ops, rx) = mpsc::channel(QUEUE_DEPTH);
        // The writer waits for more ops with tokio's clock, so it needs the runtime's handle.
        let runtime = tokio::runtime::Handle::try_current().ok();
        let lease_ms = millis(config.lease);
        let ttl_ms = millis(config.ttl);
        std::thread::Builder::new()
            .name("idempotency-writer".into())
            .spawn(move || writer(db, rx, clock, lease_ms, ttl_ms, runtime))
            .map_err(|e| StoreError(format!("cannot start the writer thread: {e}")))?;
        Ok(EmbeddedStore { ops })
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let work = async {
            self.ops
                .send(make(reply))
                .await
                .map_err(|_| StoreError("the writer thread stopped".into()))?;
            answer
                .await
                .map_err(|_| StoreError("the writer thread stopped".into()))?
        };
        tokio::time::timeout(OP_TIMEOUT, work)
            .await
            .map_err(|_| StoreError(format!("no answer within {OP_TIMEOUT:?}")))?
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn migrate(db: &Connection) -> rusqlite::Result<()> {
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "NORMAL")?;
    db.busy_timeout(Duration::from_secs(5))?;
    let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version < 1 {
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS idempotency (
                 key         TEXT PRIMARY KEY,
                 fingerprint TEXT NOT NULL,
                 state       TEXT NOT NULL CHECK (state IN ('running', 'finished')),
                 owner       TEXT NOT NULL,
                 lease_until INTEGER NOT NULL,
                 outcome     TEXT,
                 expires_at  INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS idempotency_expires ON idempotency (expires_at);",
        )?;
        db.pragma_update(None, "user_version", 1)?;
    }
    if version < 2 {
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS guard (
                 fingerprint  TEXT PRIMARY KEY,
                 window_start INTEGER NOT NULL,
                 executions   INTEGER NOT NULL
             ) WITHOUT ROWID;",
        )?;
        db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    Ok(())
}

/// The writer loop: take every waiting op (up to MAX_GROUP), run them in one transaction,
/// answer each after the commit.
fn writer(
    db: Connection,
    mut rx: mpsc::Receiver<Op>,
    clock: Clock,
    lease_ms: i64,
    ttl_ms: i64,
    runtime: Option<tokio::runtime::Handle>,
) {
    let mut group: Vec<(Op, Option<Answer>)> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.blocking_recv() {
        if let Err(e) = db
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut st| st.execute([]))
        {
            let error = StoreError(format!("cannot start a transaction: {e}"));
            reply(first, Answer::Failed(error.clone()));
            while let Ok(op) = rx.try_recv() {
                reply(op, Answer::Failed(error.clone()));
            }
            continue;
        }
        // Group commit: ops keep joining this transaction until COMMIT_WINDOW has passed (or
        // MAX_GROUP ops joined), so one commit serves many jobs. Claims and guard counts are
        // answered as soon as their statement ran: the single writer (and BEGIN IMMEDIATE across
        // processes) already makes them atomic, and losing one in a crash only means the
        // redelivery claims again. Completions and releases are answered after the commit,
        // because the ack that follows must find them on disk.
        let deadline = std::time::Instant::now() + COMMIT_WINDOW;
        let mut next = Some(first);
        while let Some(mut op) = next.take() {
            let answer = apply(&db, &op, clock(), lease_ms, ttl_ms);
            let pending = match (&mut op, answer) {
                (Op::Claim { reply, .. }, Answer::Claimed(claim)) => {
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Ok(claim));
                    }
                    None
                }
                (Op::Guard { reply, .. }, Answer::Allowed(allowed)) => {
                    if let Some(reply) = reply.take() {
                        let _ = reply.send(Ok(allowed));
                    }
                    None
                }
                (_, answer) => Some(answer),
            };
            group.push((op, pending));
            if group.len() >= MAX_GROUP {
                break;
            }
            next = rx.try_recv().ok();
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if next.is_none() && !left.is_zero() {
                // Nothing queued yet: wait briefly for the next op to share this commit.
                next = match &runtime {
                    Some(rt) => rt.block_on(async {
                        tokio::time::timeout(left, rx.recv()).await.ok().flatten()
                    }),
                    None => None,
                };
            }
        }
        let committed = db
            .prepare_cached("COMMIT")
            .and_then(|mut st| st.execute([]));
        match committed {
            Ok(_) => {
                for (op, answer) in group.drain(..) {
                    if let Some(answer) = answer {
                        reply(op, answer);
                    }
                }
            }
            Err(e) => {
                let _ = db.execute_batch("ROLLBACK");
                let error = StoreError(format!("commit failed: {e}"));
                tracing::error!(%error, "idempotency store commit failed");
                for (op, _) in group.drain(..) {
                    reply(op, Answer::Failed(error.clone()));
                }
            }
        }
    }
}

/// The result of one op inside a group, sent after the commit.
enum Answer {
    Claimed(Claim),
    Found(Option<Box<Outcome>>),
    Allowed(bool),
    Done,
    Pruned(u64),
    Failed(StoreError),
}

fn reply(op: Op, answer: Answer) {
    match (op, answer) {
        (
            Op::Claim {
                reply: Some(reply), ..
            },
            Answer::Claimed(c),
        ) => drop(reply.send(Ok(c))),
        (
            Op::Claim {
                reply: Some(reply), ..
            },
            Answer::Failed(e),
        ) => drop(reply.send(Err(e))),
        (Op::Claim { reply: None, .. }, _) => {}
        (Op::Complete { reply, .. } | Op::Release { reply, .. }, Answer::Failed(e)) => {
            drop(reply.send(Err(e)))
        }
        (Op::Complete { reply, .. } | Op::Release { reply, .. }, _) => drop(reply.send(Ok(()))),
        (Op::Prune { reply }, Answer::Pruned(n)) => drop(reply.send(Ok(n))),
        (Op::Finished { reply, .. }, Answer::Found(found)) => {
            drop(reply.send(Ok(found.map(|o| *o))))
        }
        (Op::Finished { reply, .. }, Answer::Failed(e)) => drop(reply.send(Err(e))),
        (Op::Finished { reply, .. }, _) => {
            drop(reply.send(Err(StoreError("internal: wrong answer".into()))))
        }
        (Op::Guard { reply: None, .. }, _) => {}
        (
            Op::Guard {
                reply: Some(reply), ..
            },
            Answer::Allowed(allowed),
        ) => drop(reply.send(Ok(allowed))),
        (
            Op::Guard {
                reply: Some(reply), ..
            },
            Answer::Failed(e),
        ) => drop(reply.send(Err(e))),
        (
            Op::Guard {
                reply: Some(reply), ..
            },
            _,
        ) => drop(reply.send(Err(StoreError("internal: wrong answer".into())))),
        (Op::Prune { reply }, Answer::Failed(e)) => drop(reply.send(Err(e))),
        (
            Op::Claim {
                reply: Some(reply), ..
            },
            _,
        ) => drop(reply.send(Err(StoreError("internal: wrong answer".into())))),
        (Op::Prune { reply }, _) => {
            drop(reply.send(Err(StoreError("internal: wrong answer".into()))))
        }
    }
}

fn apply(db: &Connection, op: &Op, now: i64, lease_ms: i64, ttl_ms: i64) -> Answer {
    let result = match op {
        Op::Claim { key, fingerprint, owner, .. } => claim(db, key, fingerprint, owner, now, lease_ms, ttl_ms).map(Answer::Claimed),
        Op::Complete { key, outcome, .. } => db
            .prepare_cached(
                "INSERT INTO idempotency (key, fingerprint, state, owner, lease_until, outcome, expires_at)
                 VALUES (?1, '', 'finished', '', 0, ?2, ?3)
                 ON CONFLICT (key) DO UPDATE SET state = 'finished', outcome = ?2, expires_at = ?3
                 WHERE state = 'running'",
            )
            .and_then(|mut st| st.execute(params![key, outcome, now.saturating_add(ttl_ms)]))
            .map(|_| Answer::Done),
        Op::Release { key, owner, .. } => db
            .prepare_cached("DELETE FROM idempotency WHERE key = ?1 AND owner = ?2 AND state = 'running'")
            .and_then(|mut st| st.execute(params![key, owner]))
            .map(|_| Answer::Done),
        Op::Finished { key, .. } => db
            .prepare_cached("SELECT outcome FROM idempotency WHERE key = ?1 AND state = 'finished' AND expires_at >= ?2")
            .and_then(|mut st| st.query_row(params![key, now], |r| r.get::<_, Option<String>>(0)).optional())
            .map(|found| Answer::Found(found.flatten().and_then(|json| serde_json::from_str(&json).ok()).map(Box::new))),
        Op::Guard { fingerprint, window_ms, max, .. } => db
            .prepare_cached(
                "INSERT INTO guard (fingerprint, window_start, executions) VALUES (?1, ?2, 1)
                 ON CONFLICT (fingerprint) DO UPDATE SET
                     executions = CASE WHEN window_start <= ?2 - ?3 THEN 1 ELSE executions + 1 END,
                     window_start = CASE WHEN window_start <= ?2 - ?3 THEN ?2 ELSE window_start END
                 WHERE window_start <= ?2 - ?3 OR executions < ?4",
            )
            .and_then(|mut st| st.execute(params![fingerprint, now, window_ms, max]))
            .map(|changed| Answer::Allowed(changed > 0)),
        Op::Prune { .. } => db
            .execute("DELETE FROM idempotency WHERE expires_at < ?1", params![now])
            .and_then(|n| {
                // Guard windows older than a day are of no use to any window setting here.
                db.execute("DELETE FROM guard WHERE window_start < ?1", params![now - 86_400_000])?;
                Ok(Answer::Pruned(n as u64))
            }),
    };
    result.unwrap_or_else(|e| Answer::Failed(StoreError(e.to_string())))
}

fn claim(
    db: &Connection,
    key: &str,
    fingerprint: &str,
    owner: &str,
    now: i64,
    lease_ms: i64,
    ttl_ms: i64,
) -> rusqlite::Result<Claim> {
    // The common case, a key never seen: one statement.
    let inserted = db
        .prepare_cached(
            "INSERT INTO idempotency (key, fingerprint, state, owner, lease_until, outcome, expires_at)
             VALUES (?1, ?2, 'running', ?3, ?4, NULL, ?5) ON CONFLICT (key) DO NOTHING",
        )?
        .execute(params![key, fingerprint, owner, now.saturating_add(lease_ms), now.saturating_add(ttl_ms)])?;
    if inserted == 1 {
        return Ok(Claim::Acquired { takeover: false });
    }
    let existing = db
        .prepare_cached("SELECT fingerprint, state, owner, lease_until, outcome, expires_at FROM idempotency WHERE key = ?1")?
        .query_row(
            params![key],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?, r.get::<_, Option<String>>(4)?, r.get::<_, i64>(5)?)),
        )
        .optional()?;
    let takeover = match existing {
        None => false,
        Some((.., expires_at)) if expires_at < now => false,
        Some((stored, ..)) if stored != fingerprint && !stored.is_empty() => {
            return Ok(Claim::Mismatch {
                fingerprint: stored,
            })
        }
        Some((_, state, _, _, Some(outcome), _)) if state == "finished" => {
            return match serde_json::from_str::<Outcome>(&outcome) {
                Ok(o) => Ok(Claim::Finished(Box::new(o))),
                Err(e) => Err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))),
            }
        }
        Some((_, _, holder, lease_until, ..)) if lease_until >= now => {
            return Ok(Claim::InFlight { owner: holder })
        }
        Some(_) => true,
    };
    db.prepare_cached(
        "INSERT INTO idempotency (key, fingerprint, state, owner, lease_until, outcome, expires_at)
         VALUES (?1, ?2, 'running', ?3, ?4, NULL, ?5)
         ON CONFLICT (key) DO UPDATE SET fingerprint = ?2, state = 'running', owner = ?3, lease_until = ?4, outcome = NULL, expires_at = ?5",
    )?
    .execute(params![key, fingerprint, owner, now.saturating_add(lease_ms), now.saturating_add(ttl_ms)],
    )?;
    Ok(Claim::Acquired { takeover })
}

impl Store for EmbeddedStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(self.call(move |reply| Op::Claim {
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
            owner: owner.to_owned(),
            reply: Some(reply),
        }))
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        outcome: &'a Outcome,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let outcome = serde_json::to_string(outcome).expect("an outcome always serialises");
        Box::pin(self.call(move |reply| Op::Complete {
            key: key.to_owned(),
            outcome,
            reply,
        }))
    }

    fn release<'a>(
        &'a self,
        key: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.call(move |reply| Op::Release {
            key: key.to_owned(),
            owner: owner.to_owned(),
            reply,
        }))
    }

    fn prune(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.call(|reply| Op::Prune { reply }))
    }

    fn finished<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Outcome>, StoreError>> {
        Box::pin(self.call(move |reply| Op::Finished {
            key: key.to_owned(),
            reply,
        }))
    }

    fn count_execution<'a>(
        &'a self,
        fingerprint: &'a str,
        window: Duration,
        max: u32,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.call(move |reply| Op::Guard {
            fingerprint: fingerprint.to_owned(),
            window_ms: millis(window),
            max,
            reply: Some(reply),
        }))
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            if self.ops.is_closed() {
                Err(StoreError("the writer thread stopped".into()))
            } else {
                Ok(())
            }
        })
    }
}
