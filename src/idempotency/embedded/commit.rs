//! Group commit for the embedded store: statements run in a transaction that stays open for
//! [`COMMIT_WINDOW`], then the committer thread commits it, so one commit serves every job of
//! that window. Claims and counts are answered at once ([`EmbeddedStore::run`]), completions
//! once their transaction is on disk ([`EmbeddedStore::run_durable`]).

use std::sync::{mpsc as std_mpsc, Weak};
use std::time::Duration;

use tokio::sync::{watch, MutexGuard};

use super::{Db, EmbeddedStore, Shared};
use crate::idempotency::StoreError;

/// How long a transaction stays open for more jobs to join before it commits: one commit per
/// millisecond at most, instead of one per job, is what lets the store keep up with the worker.
const COMMIT_WINDOW: Duration = Duration::from_millis(1);
/// Limit for any one operation, waiting for the lock or the commit included.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a commit answered, sent to everyone waiting on that transaction.
pub(super) type Committed = Option<Result<(), StoreError>>;

impl Db {
    /// Opens a transaction unless one is open.
    pub(super) fn begin(&mut self, opened: &std_mpsc::SyncSender<()>) -> Result<(), StoreError> {
        if self.open.is_none() {
            self.conn
                .prepare_cached("BEGIN IMMEDIATE")
                .and_then(|mut st| st.execute([]))
                .map_err(|e| StoreError::caused_by("cannot start a transaction", e))?;
            self.open = Some(watch::channel(None).0);
            // A full slot means the committer has been told already.
            let _ = opened.try_send(());
        }
        Ok(())
    }

    /// Commits the open transaction, if any, and tells its waiters.
    pub(super) fn commit(&mut self) {
        let Some(done) = self.open.take() else { return };
        let result = self
            .conn
            .prepare_cached("COMMIT")
            .and_then(|mut st| st.execute([]))
            .map(drop)
            .map_err(|e| {
                let _ = self.conn.execute_batch("ROLLBACK");
                let error = StoreError::caused_by("commit failed", e);
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
    pub(super) fn after_error(&mut self) {
        if self.open.is_some() && self.conn.is_autocommit() {
            if let Some(done) = self.open.take() {
                done.send_replace(Some(Err(StoreError::new(
                    "the transaction was rolled back",
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
    /// The connection, locked.
    pub(super) async fn locked(&self) -> Result<MutexGuard<'_, Db>, StoreError> {
        match self.shared.db.try_lock() {
            Ok(db) => Ok(db),
            Err(_) => tokio::time::timeout(OP_TIMEOUT, self.shared.db.lock())
                .await
                .map_err(|_| StoreError::new(format!("the store stayed busy for {OP_TIMEOUT:?}"))),
        }
    }

    /// The connection, locked, with a transaction open.
    pub(super) async fn lock(&self) -> Result<MutexGuard<'_, Db>, StoreError> {
        let mut db = self.locked().await?;
        db.begin(&self.shared.opened)?;
        Ok(db)
    }

    /// Runs `f` in the open transaction and answers at once.
    pub(super) async fn run<T>(
        &self,
        f: impl FnOnce(&mut Db, i64, &Shared) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut db = self.lock().await?;
        let now = (self.shared.clock)();
        let result = f(&mut db, now, &self.shared);
        if result.is_err() {
            db.after_error();
        }
        result.map_err(|e| StoreError::caused_by("SQLite", e))
    }

    /// Runs `f` in the open transaction and answers once that transaction is committed.
    pub(super) async fn run_durable(
        &self,
        f: impl FnOnce(&mut Db, i64, &Shared) -> rusqlite::Result<()>,
    ) -> Result<(), StoreError> {
        let mut committed = {
            let mut db = self.lock().await?;
            let now = (self.shared.clock)();
            if let Err(e) = f(&mut db, now, &self.shared) {
                db.after_error();
                return Err(StoreError::caused_by("SQLite", e));
            }
            match &db.open {
                Some(open) => open.subscribe(),
                None => return Err(StoreError::new("the transaction was rolled back")),
            }
        };
        let answer = tokio::time::timeout(OP_TIMEOUT, committed.wait_for(Option::is_some))
            .await
            .map_err(|_| StoreError::new(format!("no commit within {OP_TIMEOUT:?}")))?
            .map_err(|_| StoreError::new("the store closed before the commit"))?
            .clone();
        answer.unwrap_or_else(|| Err(StoreError::new("internal: no commit result")))
    }
}

/// The committer: after a transaction opens, waits out the window, then commits it.
pub(super) fn committer(shared: Weak<Shared>, wakeups: std_mpsc::Receiver<()>) {
    while wakeups.recv().is_ok() {
        std::thread::sleep(COMMIT_WINDOW);
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.db.blocking_lock().commit();
    }
}
