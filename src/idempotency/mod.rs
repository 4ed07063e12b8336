//! One execution per idempotency key (contract §5): the [`Store`] trait (a key is a claim with a
//! lease, then a finished record holding the outcome), its two implementations (`embedded`
//! SQLite for one host, `postgres` for a fleet), and the [`Gate`] the worker talks to, which adds
//! in-process waiting for duplicates of a key that is running here.
//!
//! The store decides; the gate never guesses. When the store cannot be reached the gate says so
//! and the worker requeues the delivery: SWR is never called unguarded.

pub mod embedded;
pub mod pg_target;
pub mod postgres;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

use crate::config::{Config, IdempotencyBackend, IdempotencyConfig};
use crate::outcome::Outcome;

/// What a claim found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The caller owns the key now and may call SWR. `takeover`: a previous owner's lease ran out.
    Acquired { takeover: bool },
    /// The key already has a final outcome: replay it.
    Finished(Box<Outcome>),
    /// Another delivery holds a live lease on the key.
    InFlight { owner: String },
}

/// The store could not be used (unreachable, corrupt, timed out).
#[derive(Debug, Clone, thiserror::Error)]
#[error("idempotency store: {0}")]
pub struct StoreError(pub String);

/// A key-value store of claims and finished outcomes. Implementations must make `claim`
/// atomic: two callers can never both get `Acquired` for a key with a live lease.
pub trait Store: Send + Sync {
    /// Claims `key` for `owner` with the store's lease, unless it is finished or leased to
    /// someone else. The key alone decides; `fingerprint` is recorded with the claim.
    fn claim<'a>(
        &'a self,
        key: &'a str,
        fingerprint: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;
    /// Records the final outcome (kept for the TTL and replayed for later deliveries).
    fn complete<'a>(
        &'a self,
        key: &'a str,
        outcome: &'a Outcome,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.complete_json(key, &outcome.to_json()).await })
    }
    /// [`complete`](Self::complete) with the outcome already written as JSON
    /// ([`Outcome::to_json`]), so the job encodes it once for the store and the broker.
    fn complete_json<'a>(
        &'a self,
        key: &'a str,
        json: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// The stored final outcome of `key`, if it has one that has not expired.
    fn finished<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Outcome>, StoreError>>;
    /// Drops `owner`'s claim so a later delivery runs again (retryable failure, abandoned job).
    fn release<'a>(&'a self, key: &'a str, owner: &'a str)
        -> BoxFuture<'a, Result<(), StoreError>>;
    /// The loop guard: records one execution of `fingerprint` if fewer than `max` were recorded
    /// in the current `window`, and says whether it was allowed. Atomic across workers.
    fn count_execution<'a>(
        &'a self,
        fingerprint: &'a str,
        window: Duration,
        max: u32,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Deletes records past their TTL; returns how many went.
    fn prune(&self) -> BoxFuture<'_, Result<u64, StoreError>>;
    /// Cheap liveness check (readiness).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// The fingerprint of a request (`pipeline:stage:mode`): recorded with its claim, and the step
/// the loop guard counts.
pub fn fingerprint(pipeline_id: i64, stage_index: i64, mode: &str) -> String {
    format!("{pipeline_id}:{stage_index}:{mode}")
}

/// Opens the configured store, or `None` when `idempotency.backend = "off"`.
pub async fn open(config: &Config) -> Result<Option<Arc<dyn Store>>, StoreError> {
    let idem = &config.idempotency;
    Ok(match idem.backend {
        IdempotencyBackend::Off => None,
        IdempotencyBackend::Embedded => {
            // Opening may wait (up to a few seconds) for a previous process to let go of the
            // file: off the async threads.
            let idem = idem.clone();
            let store = tokio::task::spawn_blocking(move || embedded::EmbeddedStore::open(&idem))
                .await
                .map_err(|e| StoreError(format!("opening the embedded store failed: {e}")))??;
            Some(Arc::new(store))
        }
        IdempotencyBackend::Postgres => {
            Some(Arc::new(postgres::PostgresStore::connect(idem).await?))
        }
    })
}

/// What the worker should do with a delivery after asking the gate.
pub enum Admission {
    /// Run it; settle the ticket afterwards.
    Run(Ticket),
    /// Publish this stored outcome as a replay.
    Replay(Box<Outcome>),
    /// Requeue after a pause (store down, or the key stayed busy past `idempotency.hold`).
    Requeue(String),
}

/// Keys this process is running now, so local duplicates wait for a signal instead of polling.
type LocalKeys = Arc<Mutex<HashMap<String, watch::Receiver<()>>>>;

/// The worker's view of idempotency: claims through the store, local wake-ups, bounded holds.
pub struct Gate {
    /// The shared store.
    store: Arc<dyn Store>,
    /// This process's owner id (worker id plus a per-start nonce); each claim's owner adds a
    /// number of its own, so a stale ticket can never release a newer ticket's claim.
    owner: String,
    /// The number of the next claim.
    claims: AtomicU64,
    /// How long a duplicate waits for the running copy before it is requeued.
    hold: Duration,
    /// Keys running in this process.
    local: LocalKeys,
}

/// Proof that this process owns a key; settle it with [`Gate::complete`] or [`Gate::release`].
/// Dropped unsettled (an aborted job), it releases the key in the background.
pub struct Ticket {
    /// The key.
    key: String,
    /// Set once completed or released.
    settled: bool,
    /// Dropping it wakes local waiters.
    _done: watch::Sender<()>,
    /// For the release-on-drop path.
    store: Arc<dyn Store>,
    /// Owner id for the release-on-drop path.
    owner: String,
    /// Removes the key from the local map on drop.
    local: LocalKeys,
    /// True when a previous owner's lease was taken over.
    pub takeover: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            // Only this ticket's entry: a newer ticket for the key (a take-over) keeps its own.
            let mut local = self.local.lock().expect("local keys lock");
            let mine = self._done.subscribe();
            if local
                .get(&self.key)
                .is_some_and(|rx| rx.same_channel(&mine))
            {
                local.remove(&self.key);
            }
        }
        if !self.settled {
            let (store, key, owner) = (
                self.store.clone(),
                std::mem::take(&mut self.key),
                self.owner.clone(),
            );
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(e) = store.release(&key, &owner).await {
                        tracing::warn!(error = %e, "could not release an abandoned claim; it frees itself when its lease ends");
                    }
                });
            }
        }
    }
}

impl Gate {
    pub fn new(store: Arc<dyn Store>, worker_id: &str, config: &IdempotencyConfig) -> Gate {
        let nonce = &uuid::Uuid::new_v4().simple().to_string()[..8];
        Gate {
            store,
            owner: format!("{worker_id}#{nonce}"),
            claims: AtomicU64::new(0),
            hold: config.hold,
            local: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Claims `key`, waiting (up to `idempotency.hold`) while another delivery runs it.
    pub async fn admit(&self, key: &str, fingerprint: &str) -> Admission {
        let deadline = crate::deadline::after(tokio::time::Instant::now(), self.hold);
        let mut poll = Duration::from_millis(20);
        let owner = format!(
            "{}.{}",
            self.owner,
            self.claims.fetch_add(1, Ordering::Relaxed)
        );
        loop {
            // Subscribe before claiming, so a finish between the two is not missed.
            let local = self
                .local
                .lock()
                .expect("local keys lock")
                .get(key)
                .cloned();
            match self.store.claim(key, fingerprint, &owner).await {
                Err(e) => return Admission::Requeue(e.to_string()),
                Ok(Claim::Finished(outcome)) => return Admission::Replay(outcome),
                Ok(Claim::Acquired { takeover }) => {
                    let (done, waiters) = watch::channel(());
                    self.local
                        .lock()
                        .expect("local keys lock")
                        .insert(key.to_owned(), waiters);
                    if takeover {
                        tracing::info!("taking over a claim whose lease ran out; SWR gets the same Idempotency-Key");
                    }
                    return Admission::Run(Ticket {
                        key: key.to_owned(),
                        settled: false,
                        _done: done,
                        store: self.store.clone(),
                        owner,
                        local: self.local.clone(),
                        takeover,
                    });
                }
                Ok(Claim::InFlight { owner }) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Admission::Requeue(format!(
                            "key is still running at {owner} after idempotency.hold ({})",
                            humantime::format_duration(self.hold)
                        ));
                    }
                    match local {
                        // Running here: wake when its sender is dropped.
                        Some(mut rx) => {
                            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
                        }
                        // Running elsewhere (or just starting here): re-check with a growing pause.
                        None => {
                            tokio::time::sleep(poll.min(deadline - now)).await;
                            poll = (poll * 2).min(Duration::from_secs(1));
                        }
                    }
                }
            }
        }
    }

    /// Stores the final outcome; retried briefly, because losing it means a later duplicate runs
    /// SWR again (with the same Idempotency-Key).
    pub async fn complete(&self, mut ticket: Ticket, json: &str) {
        for attempt in 1..=3u32 {
            match self.store.complete_json(&ticket.key, json).await {
                Ok(()) => {
                    ticket.settled = true;
                    return;
                }
                Err(e) if attempt == 3 => {
                    tracing::error!(error = %e, "could not store the final outcome; a duplicate of this key would call SWR again");
                    // Leave it unsettled: the drop releases the claim, so nothing waits for a lease.
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "storing the outcome failed; trying again");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                }
            }
        }
    }

    /// Drops the claim so a later delivery runs again.
    pub async fn release(&self, mut ticket: Ticket) {
        match self.store.release(&ticket.key, &ticket.owner).await {
            Ok(()) => ticket.settled = true,
            Err(e) => {
                tracing::warn!(error = %e, "could not release the claim; retrying in the background")
            }
        }
    }
}

/// Starts the background pruning of expired records; it ends when the store is dropped by
/// everyone else.
pub fn spawn_pruner(store: &Arc<dyn Store>, every: Duration) {
    let weak = Arc::downgrade(store);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(store) = weak.upgrade() else { return };
            match store.prune().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(pruned = n, "expired idempotency records removed"),
                Err(e) => tracing::warn!(error = %e, "pruning the idempotency store failed"),
            }
        }
    });
}

/// Milliseconds since the Unix epoch (the embedded store's clock).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
