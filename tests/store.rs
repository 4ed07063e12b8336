//! The idempotency store's semantics (contract §5), the same suite against the embedded SQLite
//! store and the PostgreSQL store (127.0.0.1:5432, database `test`, or IDEMPOTENCY_TEST_URL).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use swr_stage_worker::config::{IdempotencyBackend, IdempotencyConfig, Secret};
use swr_stage_worker::idempotency::embedded::EmbeddedStore;
use swr_stage_worker::idempotency::postgres::PostgresStore;
use swr_stage_worker::idempotency::{Claim, Store};
use swr_stage_worker::outcome::{Outcome, Status};

fn pg_url() -> String {
    std::env::var("IDEMPOTENCY_TEST_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn config(lease: Duration, ttl: Duration) -> IdempotencyConfig {
    let dir = std::env::temp_dir().join("swr-stage-worker-tests");
    IdempotencyConfig {
        backend: IdempotencyBackend::Embedded,
        path: dir
            .join(format!("store-{}.db", uuid::Uuid::new_v4()))
            .display()
            .to_string(),
        url: Secret::new(pg_url()),
        ttl,
        lease,
        hold: Duration::from_secs(1),
        prune_interval: Duration::from_secs(60),
    }
}

/// An embedded store whose clock the test moves.
fn embedded(lease: Duration, ttl: Duration) -> (EmbeddedStore, Arc<AtomicI64>) {
    let now = Arc::new(AtomicI64::new(1_800_000_000_000));
    let clock = now.clone();
    let store = EmbeddedStore::open_with_clock(
        &config(lease, ttl),
        Arc::new(move || clock.load(Ordering::SeqCst)),
    )
    .unwrap();
    (store, now)
}

async fn postgres(lease: Duration, ttl: Duration) -> PostgresStore {
    match PostgresStore::connect(&config(lease, ttl)).await {
        Ok(store) => store,
        Err(e) => panic!(
            "these tests need PostgreSQL at {}: {e}. Start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, or set IDEMPOTENCY_TEST_URL",
            pg_url()
        ),
    }
}

/// The single text column of `sql`'s rows, read straight from a closed store's file.
fn texts(path: &str, sql: &str) -> Vec<String> {
    let db = rusqlite::Connection::open(path).unwrap();
    let mut statement = db.prepare(sql).unwrap();
    let rows = statement.query_map([], |r| r.get(0)).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

fn key(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::new_v4())
}

fn outcome(key: &str, status: Status) -> Outcome {
    serde_json::from_value(serde_json::json!({
        "idempotency_key": key, "pipeline_id": 1, "stage_index": 0, "mode": "retry",
        "status": status, "http_status": 201, "attempts": 1, "replayed": false, "error": null,
        "campaign_id": null, "metadata": null, "swr_request_id": "r", "started_at": "2026-11-29T00:00:00.000Z",
        "finished_at": "2026-11-29T00:00:00.001Z", "duration_ms": 1, "worker": "w"
    }))
    .unwrap()
}

/// Claim, duplicate, reuse, complete, replay: identical for every backend. The key alone
/// decides (contract §5): a request that reuses it for another step waits, then is replayed.
async fn claim_lifecycle(store: &dyn Store) {
    let k = key("life");
    assert_eq!(
        store.claim(&k, "1:0:retry", "a").await.unwrap(),
        Claim::Acquired { takeover: false }
    );
    assert_eq!(
        store.claim(&k, "1:0:retry", "b").await.unwrap(),
        Claim::InFlight { owner: "a".into() }
    );
    assert_eq!(
        store.claim(&k, "2:0:retry", "b").await.unwrap(),
        Claim::InFlight { owner: "a".into() }
    );
    let done = outcome(&k, Status::Succeeded);
    store.complete(&k, &done).await.unwrap();
    assert_eq!(
        store.claim(&k, "1:0:retry", "b").await.unwrap(),
        Claim::Finished(Box::new(done))
    );
    assert_eq!(
        store.claim(&k, "1:0:rollback", "b").await.unwrap(),
        Claim::Finished(Box::new(outcome(&k, Status::Succeeded)))
    );
}

/// A released key (retryable failure) runs again; only the owner's release counts.
async fn release_frees_the_key(store: &dyn Store) {
    let k = key("release");
    assert_eq!(
        store.claim(&k, "1:0:retry", "a").await.unwrap(),
        Claim::Acquired { takeover: false }
    );
    store.release(&k, "someone-else").await.unwrap();
    assert!(matches!(
        store.claim(&k, "1:0:retry", "b").await.unwrap(),
        Claim::InFlight { .. }
    ));
    store.release(&k, "a").await.unwrap();
    assert_eq!(
        store.claim(&k, "1:0:retry", "b").await.unwrap(),
        Claim::Acquired { takeover: false }
    );
}

/// Many claimers at once: exactly one wins.
async fn concurrent_claims_have_one_winner(store: Arc<dyn Store>) {
    let k = key("race");
    let mut tasks = Vec::new();
    for i in 0..32 {
        let (store, k) = (store.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            store
                .claim(&k, "1:0:retry", &format!("w{i}"))
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Claim::Acquired { .. }) {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

#[tokio::test]
async fn embedded_claim_lifecycle() {
    let (store, _) = embedded(Duration::from_secs(60), Duration::from_secs(3600));
    claim_lifecycle(&store).await;
    release_frees_the_key(&store).await;
    concurrent_claims_have_one_winner(Arc::new(store)).await;
}

#[tokio::test]
async fn postgres_claim_lifecycle() {
    let store = postgres(Duration::from_secs(60), Duration::from_secs(3600)).await;
    claim_lifecycle(&store).await;
    release_frees_the_key(&store).await;
    concurrent_claims_have_one_winner(Arc::new(store)).await;
}

#[tokio::test]
async fn embedded_expired_lease_is_taken_over() {
    let (store, now) = embedded(Duration::from_secs(60), Duration::from_secs(3600));
    let k = key("lease");
    assert_eq!(
        store.claim(&k, "1:0:retry", "dead").await.unwrap(),
        Claim::Acquired { takeover: false }
    );
    now.fetch_add(59_000, Ordering::SeqCst);
    assert!(matches!(
        store.claim(&k, "1:0:retry", "b").await.unwrap(),
        Claim::InFlight { .. }
    ));
    now.fetch_add(2_000, Ordering::SeqCst);
    // Another step reusing the key does not take over: the take-over redoes the dead job's call.
    assert!(matches!(
        store.claim(&k, "2:0:retry", "b").await.unwrap(),
        Claim::InFlight { .. }
    ));
    assert_eq!(
        store.claim(&k, "1:0:retry", "b").await.unwrap(),
        Claim::Acquired { takeover: true }
    );
    // The take-over's owner is the one whose release counts now.
    store.release(&k, "dead").await.unwrap();
    assert!(
        matches!(store.claim(&k, "1:0:retry", "c").await.unwrap(), Claim::InFlight { owner } if owner == "b")
    );
}

#[tokio::test]
async fn postgres_expired_lease_is_taken_over() {
    let store = postgres(Duration::from_millis(200), Duration::from_secs(3600)).await;
    let (other, k) = (key("lease-other"), key("lease"));
    // `other` is claimed first, so its lease has run out whenever `k`'s has.
    for key in [&other, &k] {
        assert_eq!(
            store.claim(key, "1:0:retry", "dead").await.unwrap(),
            Claim::Acquired { takeover: false }
        );
    }
    // The lease is on the database's clock: wait for it to run out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.claim(&k, "1:0:retry", "b").await.unwrap() {
            Claim::Acquired { takeover } => {
                assert!(takeover);
                break;
            }
            Claim::InFlight { .. } => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "lease never ran out"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Another step reusing a key does not take over its expired claim: the take-over redoes
    // the dead job's call. The same step does.
    assert!(matches!(
        store.claim(&other, "2:0:retry", "b").await.unwrap(),
        Claim::InFlight { .. }
    ));
    assert_eq!(
        store.claim(&other, "1:0:retry", "b").await.unwrap(),
        Claim::Acquired { takeover: true }
    );
}

#[tokio::test]
async fn embedded_records_expire_after_ttl_and_are_pruned() {
    let (store, now) = embedded(Duration::from_secs(60), Duration::from_secs(3600));
    let k = key("ttl");
    store.claim(&k, "1:0:retry", "a").await.unwrap();
    store
        .complete(&k, &outcome(&k, Status::Succeeded))
        .await
        .unwrap();
    assert_eq!(store.prune().await.unwrap(), 0, "nothing is old yet");
    now.fetch_add(3_600_001, Ordering::SeqCst);
    assert_eq!(store.prune().await.unwrap(), 1);
    assert_eq!(
        store.claim(&k, "2:0:retry", "a").await.unwrap(),
        Claim::Acquired { takeover: false },
        "a pruned key is new again"
    );
}

#[tokio::test]
async fn embedded_pruning_goes_oldest_first_past_one_batch_and_keeps_live_records() {
    let (store, now) = embedded(Duration::from_secs(60), Duration::from_secs(3600));
    let start = now.load(Ordering::SeqCst);
    let complete = |keys: Vec<String>| {
        let store = &store;
        async move {
            for chunk in keys.chunks(100) {
                futures_util::future::join_all(chunk.iter().map(|k| async move {
                    store.claim(k, "1:0:retry", "a").await.unwrap();
                    store
                        .complete(k, &outcome(k, Status::Succeeded))
                        .await
                        .unwrap();
                }))
                .await;
            }
        }
    };
    // More than one pruning batch (1,000 rows) of old records, then younger ones.
    let old: Vec<String> = (0..2500).map(|_| key("old")).collect();
    complete(old.clone()).await;
    now.store(start + 1_800_000, Ordering::SeqCst);
    let young: Vec<String> = (0..10).map(|_| key("young")).collect();
    complete(young.clone()).await;
    // Past the old records' TTL, a whole batch of them runs again: their new records must
    // survive, and must not stop the pruning of the old ones behind them.
    now.store(start + 3_600_001, Ordering::SeqCst);
    complete(old[..1000].to_vec()).await;
    assert_eq!(store.prune().await.unwrap(), 1500);
    for k in young.iter().chain(&old[..1000]) {
        assert!(
            matches!(
                store.claim(k, "1:0:retry", "b").await.unwrap(),
                Claim::Finished(_)
            ),
            "a live record was pruned"
        );
    }
    assert_eq!(
        store.claim(&old[1000], "1:0:retry", "b").await.unwrap(),
        Claim::Acquired { takeover: false },
        "a pruned key is new again"
    );
}

#[tokio::test]
async fn embedded_expired_record_is_not_replayed_even_before_pruning() {
    let (store, now) = embedded(Duration::from_secs(60), Duration::from_secs(3600));
    let k = key("stale");
    store.claim(&k, "1:0:retry", "a").await.unwrap();
    store
        .complete(&k, &outcome(&k, Status::Succeeded))
        .await
        .unwrap();
    now.fetch_add(3_600_001, Ordering::SeqCst);
    assert_eq!(
        store.claim(&k, "1:0:retry", "a").await.unwrap(),
        Claim::Acquired { takeover: false }
    );
}

/// A TTL shorter than the lease: a running claim still holds its key until the lease ends, and
/// the finished outcome is kept for the TTL.
async fn a_short_ttl_frees_finished_keys_but_not_running_ones(
    store: &dyn Store,
    wait_past_ttl: impl AsyncFn(),
) {
    let k = key("short-ttl");
    assert_eq!(
        store.claim(&k, "1:0:retry", "a").await.unwrap(),
        Claim::Acquired { takeover: false }
    );
    wait_past_ttl().await;
    store.prune().await.unwrap();
    assert!(
        matches!(store.claim(&k, "1:0:retry", "b").await.unwrap(), Claim::InFlight { owner } if owner == "a"),
        "a running claim outlives the TTL"
    );
    store
        .complete(&k, &outcome(&k, Status::Succeeded))
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&k, "1:0:retry", "b").await.unwrap(),
        Claim::Finished(_)
    ));
    wait_past_ttl().await;
    assert!(
        matches!(
            store.claim(&k, "1:0:retry", "b").await.unwrap(),
            Claim::Acquired { .. }
        ),
        "the finished outcome expired after the TTL, well before a lease would have"
    );
}

#[tokio::test]
async fn embedded_short_ttl_frees_finished_keys_but_not_running_ones() {
    let (store, now) = embedded(Duration::from_secs(600), Duration::from_secs(1));
    a_short_ttl_frees_finished_keys_but_not_running_ones(&store, async || {
        now.fetch_add(2_000, Ordering::SeqCst);
    })
    .await;
}

#[tokio::test]
async fn postgres_short_ttl_frees_finished_keys_but_not_running_ones() {
    // The TTL is on the database's clock, which is this host's: waiting three of them out is the
    // condition. The lease is far beyond anything this test waits.
    let ttl = Duration::from_millis(100);
    let store = postgres(Duration::from_secs(600), ttl).await;
    a_short_ttl_frees_finished_keys_but_not_running_ones(&store, async || {
        tokio::time::sleep(3 * ttl).await;
    })
    .await;
}

#[tokio::test]
async fn postgres_records_expire_after_ttl_and_are_pruned() {
    // Long enough to read the record back on a busy machine, short enough to wait out.
    let store = postgres(Duration::from_millis(500), Duration::from_millis(1500)).await;
    let k = key("ttl");
    store.claim(&k, "1:0:retry", "a").await.unwrap();
    store
        .complete(&k, &outcome(&k, Status::Succeeded))
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&k, "1:0:retry", "b").await.unwrap(),
        Claim::Finished(_)
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // Other tests share the table, so the count is not ours to check: prune until our key is gone.
    loop {
        store.prune().await.unwrap();
        // Expired, pruned yet or not: the key is free for any request again.
        if matches!(
            store.claim(&k, "2:0:retry", "b").await.unwrap(),
            Claim::Acquired { .. }
        ) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "record never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn embedded_completed_records_survive_a_reopen() {
    let cfg = config(Duration::from_secs(60), Duration::from_secs(3600));
    let k = key("durable");
    {
        let store = EmbeddedStore::open(&cfg).unwrap();
        store.claim(&k, "1:0:retry", "a").await.unwrap();
        store
            .complete(&k, &outcome(&k, Status::Succeeded))
            .await
            .unwrap();
    }
    let store = EmbeddedStore::open(&cfg).unwrap();
    assert!(matches!(
        store.claim(&k, "1:0:retry", "b").await.unwrap(),
        Claim::Finished(_)
    ));
}

#[tokio::test]
async fn an_unreachable_postgres_fails_each_call_with_a_clear_error_and_no_password() {
    let mut cfg = config(Duration::from_secs(60), Duration::from_secs(3600));
    cfg.url = Secret::new("postgres://nobody:hunter2@127.0.0.1:1/none");
    let store = PostgresStore::connect(&cfg)
        .await
        .expect("a database that is down is not fatal at start");
    let err = store
        .claim("k", "1:0:retry", "a")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot connect to PostgreSQL at postgres://nobody:***@127.0.0.1:1/none"),
        "{err}"
    );
    assert!(!err.contains("hunter2"));
    cfg.url = Secret::new("mysql://x");
    assert!(
        PostgresStore::connect(&cfg).await.is_err(),
        "a malformed URL is refused at start"
    );
}

#[tokio::test]
async fn embedded_loop_guard_counts_per_window() {
    let (store, now) = embedded(Duration::from_secs(60), Duration::from_secs(3600));
    let fp = key("guard");
    let hour = Duration::from_secs(3600);
    for _ in 0..3 {
        assert!(store.count_execution(&fp, hour, 3).await.unwrap());
    }
    assert!(
        !store.count_execution(&fp, hour, 3).await.unwrap(),
        "the fourth in the window is refused"
    );
    assert!(
        store.count_execution(&key("other"), hour, 3).await.unwrap(),
        "other steps are counted apart"
    );
    now.fetch_add(3_600_000, Ordering::SeqCst);
    assert!(
        store.count_execution(&fp, hour, 3).await.unwrap(),
        "a new window starts afresh"
    );
}

#[tokio::test]
async fn embedded_loop_guard_counts_survive_a_restart_and_ended_windows_are_pruned() {
    let cfg = config(Duration::from_secs(60), Duration::from_secs(3600));
    let now = Arc::new(AtomicI64::new(1_800_000_000_000));
    let open = || {
        let clock = now.clone();
        EmbeddedStore::open_with_clock(&cfg, Arc::new(move || clock.load(Ordering::SeqCst)))
            .unwrap()
    };
    let (hour, step) = (Duration::from_secs(3600), "5:1:rollback");
    let store = open();
    for _ in 0..2 {
        assert!(store.count_execution(step, hour, 3).await.unwrap());
    }
    drop(store);
    now.fetch_add(60_000, Ordering::SeqCst);
    let store = open();
    assert!(
        store.count_execution(step, hour, 3).await.unwrap(),
        "the third execution in the window"
    );
    assert!(
        !store.count_execution(step, hour, 3).await.unwrap(),
        "a restart does not reset the window: the fourth is refused"
    );
    assert!(
        store.count_execution("5:1:retry", hour, 3).await.unwrap(),
        "the other mode is another step"
    );
    // The first window ends an hour after its first execution (the second started a minute in).
    now.fetch_add(3_540_000, Ordering::SeqCst);
    store.prune().await.unwrap();
    drop(store);
    let left = texts(&cfg.path, "SELECT fingerprint FROM guard_log");
    assert_eq!(
        left,
        ["5:1:retry"],
        "only the window that has not ended is kept"
    );
    let store = open();
    for _ in 0..3 {
        assert!(
            store.count_execution(step, hour, 3).await.unwrap(),
            "a new window starts afresh"
        );
    }
    assert!(!store.count_execution(step, hour, 3).await.unwrap());
}

#[tokio::test]
async fn postgres_loop_guard_is_shared_and_atomic() {
    let store = Arc::new(postgres(Duration::from_secs(60), Duration::from_secs(3600)).await);
    let fp = key("guard");
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (store, fp) = (store.clone(), fp.clone());
        tasks.push(tokio::spawn(async move {
            store
                .count_execution(&fp, Duration::from_secs(3600), 3)
                .await
                .unwrap()
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        if t.await.unwrap() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 3, "ten racing executions, three allowed");
}

#[tokio::test]
async fn postgres_calls_queued_together_mean_what_they_mean_one_at_a_time() {
    // Calls that queue together go out as one statement per kind; repeated keys and steps in
    // one batch must still get the answers they would get one after another.
    let store = Arc::new(postgres(Duration::from_secs(60), Duration::from_secs(3600)).await);
    let keys: Vec<String> = (0..20).map(|i| key(&format!("batch{i}"))).collect();
    let mut claims = Vec::new();
    for copy in 0..5 {
        for k in &keys {
            let (store, k) = (store.clone(), k.clone());
            claims.push(tokio::spawn(async move {
                let owner = format!("w{copy}");
                let claim = store.claim(&k, "1:0:retry", &owner).await.unwrap();
                (k, owner, claim)
            }));
        }
    }
    let mut winners: std::collections::HashMap<String, String> = Default::default();
    let mut losers = Vec::new();
    for task in claims {
        match task.await.unwrap() {
            (k, owner, Claim::Acquired { takeover: false }) => {
                assert!(
                    winners.insert(k, owner).is_none(),
                    "two winners for one key"
                );
            }
            (k, _, Claim::InFlight { owner }) => losers.push((k, owner)),
            (_, _, other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(winners.len(), keys.len(), "every key has one winner");
    assert_eq!(losers.len(), keys.len() * 4);
    for (k, owner) in losers {
        assert_eq!(winners[&k], owner, "a duplicate is told who holds the key");
    }

    // Completions queued together: each is stored; a second one for a key changes nothing.
    let complete_all = |status: Status| {
        let tasks: Vec<_> = keys
            .iter()
            .map(|k| {
                let (store, k) = (store.clone(), k.clone());
                tokio::spawn(async move { store.complete(&k, &outcome(&k, status)).await })
            })
            .collect();
        async move {
            for task in tasks {
                task.await.unwrap().unwrap();
            }
        }
    };
    complete_all(Status::Succeeded).await;
    complete_all(Status::Failed).await;
    for k in &keys {
        match store.claim(k, "1:0:retry", "late").await.unwrap() {
            Claim::Finished(o) => {
                assert_eq!(o.status, Status::Succeeded, "the first outcome stays")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    // Loop-guard counts of three steps, ten racing calls each, four allowed per step.
    let steps: Vec<String> = (0..3).map(|i| key(&format!("guard-batch{i}"))).collect();
    let mut counts = Vec::new();
    for _ in 0..10 {
        for step in &steps {
            let (store, step) = (store.clone(), step.clone());
            counts.push(tokio::spawn(async move {
                let allowed = store
                    .count_execution(&step, Duration::from_secs(3600), 4)
                    .await
                    .unwrap();
                (step, allowed)
            }));
        }
    }
    let mut allowed: std::collections::HashMap<String, usize> = Default::default();
    for task in counts {
        let (step, ran) = task.await.unwrap();
        *allowed.entry(step).or_default() += usize::from(ran);
    }
    for step in &steps {
        assert_eq!(allowed.get(step), Some(&4), "step {step}");
    }
}

#[tokio::test]
async fn postgres_a_claim_whose_caller_gave_up_does_not_hold_the_key() {
    let store = postgres(Duration::from_secs(600), Duration::from_secs(3600)).await;
    let k = key("abandoned");
    // Polled once: the call is queued, then its caller stops waiting before any answer.
    let gave_up = tokio::time::timeout(Duration::ZERO, store.claim(&k, "1:0:retry", "gone")).await;
    assert!(gave_up.is_err(), "the call was still waiting");
    assert_eq!(
        store.claim(&k, "1:0:retry", "live").await.unwrap(),
        Claim::Acquired { takeover: false },
        "the abandoned claim must not hold the key for its lease"
    );
}

#[tokio::test]
async fn embedded_file_belongs_to_one_process_and_its_claims_die_with_it() {
    let cfg = config(Duration::from_secs(600), Duration::from_secs(3600));
    let k = key("orphan");
    let store = EmbeddedStore::open(&cfg).unwrap();
    assert_eq!(
        store.claim(&k, "1:0:retry", "a").await.unwrap(),
        Claim::Acquired { takeover: false }
    );
    // A second worker on the same file is refused with a message that says what to do.
    let err = EmbeddedStore::open(&cfg)
        .err()
        .expect("a second opener is refused")
        .to_string();
    assert!(
        err.contains("in use by another process") && err.contains("postgres"),
        "{err}"
    );
    // The owner dies mid-job (no complete, no release): the next process may run the key at
    // once, without waiting for the 10-minute lease.
    drop(store);
    let store = EmbeddedStore::open(&cfg).unwrap();
    assert_eq!(
        store.claim(&k, "1:0:retry", "b").await.unwrap(),
        Claim::Acquired { takeover: false }
    );
}

#[tokio::test]
async fn embedded_files_of_earlier_layouts_are_migrated_with_their_outcomes() {
    for version in [1, 2] {
        migrates_from(version).await;
    }
}

/// Version 3: finished outcomes in a rowid table with an index on their expiry, and one
/// loop-guard row per step. Version 4 keeps the outcomes, drops that index, and turns the counts
/// into log rows.
#[tokio::test]
async fn embedded_files_of_version_3_keep_outcomes_and_loop_guard_counts() {
    let cfg = config(Duration::from_secs(600), Duration::from_secs(3600));
    let (done, now) = (key("done"), 1_800_000_000_000i64);
    {
        std::fs::create_dir_all(std::path::Path::new(&cfg.path).parent().unwrap()).unwrap();
        let db = rusqlite::Connection::open(&cfg.path).unwrap();
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE guard (fingerprint TEXT PRIMARY KEY, window_start INTEGER NOT NULL,
                 executions INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO guard VALUES ('7:0:retry', 1800000000000, 3), ('8:0:retry', 1800000000000, 2),
                 ('9:0:retry', 1800000000000, 1500);
             CREATE TABLE outcomes (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE,
                 fingerprint TEXT NOT NULL, owner TEXT NOT NULL, outcome TEXT NOT NULL,
                 expires_at INTEGER NOT NULL);
             CREATE INDEX outcomes_expires ON outcomes (expires_at);
             PRAGMA user_version = 3;",
        )
        .unwrap();
        db.execute(
            "INSERT INTO outcomes (key, fingerprint, owner, outcome, expires_at)
             VALUES (?1, '1:0:retry', 'old#1', ?2, ?3)",
            rusqlite::params![
                done,
                serde_json::to_string(&outcome(&done, Status::Succeeded)).unwrap(),
                now + 3_600_000
            ],
        )
        .unwrap();
    }
    let store = EmbeddedStore::open_with_clock(&cfg, Arc::new(move || now)).unwrap();
    assert!(matches!(
        store.claim(&done, "1:0:retry", "new#1").await.unwrap(),
        Claim::Finished(_)
    ));
    let hour = Duration::from_secs(3600);
    assert!(!store.count_execution("7:0:retry", hour, 3).await.unwrap());
    assert!(store.count_execution("8:0:retry", hour, 3).await.unwrap());
    assert!(!store.count_execution("8:0:retry", hour, 3).await.unwrap());
    assert!(
        store
            .count_execution("9:0:retry", hour, 1501)
            .await
            .unwrap()
            && !store
                .count_execution("9:0:retry", hour, 1501)
                .await
                .unwrap(),
        "large counts are kept whole"
    );
    drop(store);
    let objects = texts(
        &cfg.path,
        "SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name",
    );
    assert_eq!(objects, ["guard_log", "outcomes"]);
    assert_eq!(indexes(&cfg.path), Vec::<String>::new());
}

/// Every index in the file, SQLite's own included (a UNIQUE column has one).
fn indexes(path: &str) -> Vec<String> {
    texts(path, "SELECT name FROM sqlite_master WHERE type = 'index'")
}

/// Version 4: a unique index on the outcomes' key. Version 5 keeps every outcome (found by key
/// through the in-memory index) and drops the index with a rebuilt table.
#[tokio::test]
async fn embedded_files_of_version_4_keep_outcomes_and_lose_the_key_index() {
    let cfg = config(Duration::from_secs(600), Duration::from_secs(3600));
    let now = 1_800_000_000_000i64;
    let keys: Vec<String> = (0..3).map(|_| key("v4")).collect();
    {
        std::fs::create_dir_all(std::path::Path::new(&cfg.path).parent().unwrap()).unwrap();
        let db = rusqlite::Connection::open(&cfg.path).unwrap();
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE outcomes (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE,
                 fingerprint TEXT NOT NULL, owner TEXT NOT NULL, outcome TEXT NOT NULL,
                 expires_at INTEGER NOT NULL);
             CREATE TABLE guard_log (id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL,
                 window_start INTEGER NOT NULL);
             INSERT INTO guard_log (fingerprint, window_start) VALUES ('7:0:retry', 1800000000000);
             PRAGMA user_version = 4;",
        )
        .unwrap();
        for (n, k) in keys.iter().enumerate() {
            db.execute(
                "INSERT INTO outcomes (key, fingerprint, owner, outcome, expires_at)
                 VALUES (?1, ?2, 'old#1', ?3, ?4)",
                rusqlite::params![
                    k,
                    format!("{}:0:retry", n + 1),
                    serde_json::to_string(&outcome(k, Status::Succeeded)).unwrap(),
                    now + 3_600_000
                ],
            )
            .unwrap();
        }
    }
    assert_eq!(indexes(&cfg.path).len(), 1, "the v4 file has its key index");
    let store = EmbeddedStore::open_with_clock(&cfg, Arc::new(move || now)).unwrap();
    for (n, k) in keys.iter().enumerate() {
        match store
            .claim(k, &format!("{}:0:retry", n + 1), "new#1")
            .await
            .unwrap()
        {
            Claim::Finished(o) => assert_eq!(&o.idempotency_key, k),
            other => panic!("{k} must be replayed after the migration, got {other:?}"),
        }
    }
    assert_eq!(
        store
            .claim(&key("new"), "9:0:retry", "new#1")
            .await
            .unwrap(),
        Claim::Acquired { takeover: false }
    );
    assert!(!store
        .count_execution("7:0:retry", Duration::from_secs(3600), 1)
        .await
        .unwrap());
    drop(store);
    assert_eq!(indexes(&cfg.path), Vec::<String>::new());
    let version: i64 = rusqlite::Connection::open(&cfg.path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 5);
}

/// A file as an earlier release left it: one WITHOUT ROWID table of claims and outcomes (schema
/// version 1; version 2 added the loop-guard table), holding a finished key, a finished key past
/// its TTL and a claim that was running when that process died.
async fn migrates_from(version: u32) {
    let cfg = config(Duration::from_secs(600), Duration::from_secs(3600));
    let (done, old, orphan) = (key("done"), key("old"), key("orphan"));
    let now = 1_800_000_000_000i64;
    {
        std::fs::create_dir_all(std::path::Path::new(&cfg.path).parent().unwrap()).unwrap();
        let db = rusqlite::Connection::open(&cfg.path).unwrap();
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE idempotency (
                 key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,
                 state TEXT NOT NULL CHECK (state IN ('running', 'finished')),
                 owner TEXT NOT NULL, lease_until INTEGER NOT NULL, outcome TEXT,
                 expires_at INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE INDEX idempotency_expires ON idempotency (expires_at);",
        )
        .unwrap();
        if version >= 2 {
            db.execute_batch(
                "CREATE TABLE guard (fingerprint TEXT PRIMARY KEY, window_start INTEGER NOT NULL,
                     executions INTEGER NOT NULL) WITHOUT ROWID;
                 INSERT INTO guard VALUES ('7:0:retry', 1800000000000, 3);",
            )
            .unwrap();
        }
        db.pragma_update(None, "user_version", version).unwrap();
        let mut insert = db
            .prepare("INSERT INTO idempotency VALUES (?1, ?2, ?3, 'old#1', ?4, ?5, ?6)")
            .unwrap();
        let stored = |k: &str| serde_json::to_string(&outcome(k, Status::Succeeded)).unwrap();
        insert
            .execute(rusqlite::params![
                done,
                "1:0:retry",
                "finished",
                0,
                stored(&done),
                now + 3_600_000
            ])
            .unwrap();
        insert
            .execute(rusqlite::params![
                old,
                "2:0:retry",
                "finished",
                0,
                stored(&old),
                now - 1
            ])
            .unwrap();
        insert
            .execute(rusqlite::params![
                orphan,
                "3:0:retry",
                "running",
                now + 600_000,
                None::<String>,
                now + 3_600_000
            ])
            .unwrap();
    }
    let store = EmbeddedStore::open_with_clock(&cfg, Arc::new(move || now)).unwrap();
    match store.claim(&done, "1:0:retry", "new#1").await.unwrap() {
        Claim::Finished(o) => assert_eq!(o.idempotency_key, done),
        other => panic!("the finished key must be replayed after the migration, got {other:?}"),
    }
    assert!(
        matches!(
            store.claim(&done, "9:0:retry", "new#1").await.unwrap(),
            Claim::Finished(_)
        ),
        "the key alone decides"
    );
    assert_eq!(
        store.claim(&old, "2:0:retry", "new#1").await.unwrap(),
        Claim::Acquired { takeover: false },
        "an expired record is not replayed"
    );
    assert_eq!(
        store.claim(&orphan, "3:0:retry", "new#1").await.unwrap(),
        Claim::Acquired { takeover: false },
        "a dead process's claim does not hold the key"
    );
    assert_eq!(
        store.prune().await.unwrap(),
        1,
        "the expired record is pruned"
    );
    // Version 2's loop-guard counts survive (3 of 3 used); version 1 starts with none.
    let allowed = store
        .count_execution("7:0:retry", Duration::from_secs(3600), 3)
        .await
        .unwrap();
    assert_eq!(
        allowed,
        version < 2,
        "guard count from schema version {version}"
    );
}

/// A file written by a newer release is refused, naming both versions, and left as it was.
#[tokio::test]
async fn embedded_files_of_a_newer_layout_are_refused() {
    let cfg = config(Duration::from_secs(600), Duration::from_secs(3600));
    std::fs::create_dir_all(std::path::Path::new(&cfg.path).parent().unwrap()).unwrap();
    rusqlite::Connection::open(&cfg.path)
        .unwrap()
        .execute_batch("CREATE TABLE future (x); PRAGMA user_version = 99;")
        .unwrap();
    let error = EmbeddedStore::open(&cfg)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("version 99") && error.contains("newer release"),
        "{error}"
    );
    assert_eq!(
        texts(&cfg.path, "SELECT name FROM sqlite_master"),
        ["future"]
    );
}
