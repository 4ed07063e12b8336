//! The embedded idempotency store on its own: what one job costs it (a claim, a loop-guard count
//! and a completion, as the worker does for every job that runs), with no broker and no HTTP, so
//! changes to the store can be compared without the broker's noise.
//!
//! Run with `cargo bench --bench store` (release build). Keys are random UUIDs and pipelines
//! random, as in production traffic; 64 jobs are in flight at once on a two-thread runtime, as
//! in the worker. Prints jobs per second and CPU microseconds per job, for a fresh file and again
//! for the same number of jobs on top of it (a store that already holds records), then how long
//! reopening the file takes (it rebuilds the in-memory key index).
//! `STORE_BENCH_JOBS` sets the jobs per pass (default 50,000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use swr_stage_worker::config::{Config, IdempotencyConfig};
use swr_stage_worker::idempotency::embedded::EmbeddedStore;
use swr_stage_worker::idempotency::{fingerprint, Claim, Store};
use swr_stage_worker::outcome::Outcome;
use swr_stage_worker::procstat::cpu_seconds;

const IN_FLIGHT: usize = 64;

fn main() {
    let jobs: usize = std::env::var("STORE_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = std::env::temp_dir().join(format!(
        "store-bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    // The shipped defaults (TTL, lease), with a file of the bench's own.
    let mut config: IdempotencyConfig = Config::load(None, [])
        .expect("default configuration")
        .idempotency;
    config.path = dir.join("idempotency.db").display().to_string();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&config).expect("open the store"));
    println!("embedded store, {jobs} jobs per pass, {IN_FLIGHT} in flight");
    for pass in ["fresh file", "on top of the first pass"] {
        let (elapsed, cpu) = runtime.block_on(run(store.clone(), jobs));
        println!(
            "{pass}: {:.0} jobs/s, {:.1} µs CPU/job",
            jobs as f64 / elapsed.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / jobs as f64
        );
    }
    drop(store);
    // Opening rebuilds the in-memory key index from the file.
    let opened = Instant::now();
    let store = EmbeddedStore::open(&config).expect("reopen the store");
    println!(
        "reopening with {} outcomes: {:.0} ms",
        2 * jobs,
        opened.elapsed().as_secs_f64() * 1e3
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `jobs` jobs through the store; returns the wall time and the process's CPU time.
async fn run(store: Arc<dyn Store>, jobs: usize) -> (Duration, Duration) {
    let (start, cpu_start) = (Instant::now(), cpu_time());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (store, next) = (store.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < jobs {
                    job(&*store).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a job task failed");
    }
    (start.elapsed(), cpu_time() - cpu_start)
}

/// One job's store work, as the worker does it.
async fn job(store: &dyn Store) {
    let key = uuid::Uuid::new_v4().to_string();
    let pipeline = 1 + (uuid::Uuid::new_v4().as_u128() % 2_000_000_000) as i64;
    let print = fingerprint(pipeline, 0, "retry");
    let claim = store.claim(&key, &print, "bench#1").await.expect("claim");
    assert_eq!(claim, Claim::Acquired { takeover: false });
    let allowed = store
        .count_execution(&print, Duration::from_secs(3600), 3)
        .await
        .expect("loop guard");
    assert!(allowed);
    store
        .complete(&key, &outcome(&key, pipeline))
        .await
        .expect("complete");
}

/// An outcome of the size the worker stores.
fn outcome(key: &str, pipeline: i64) -> Outcome {
    serde_json::from_value(serde_json::json!({
        "idempotency_key": key, "pipeline_id": pipeline, "stage_index": 0, "mode": "retry",
        "status": "succeeded", "http_status": 201, "attempts": 1, "replayed": false, "error": null,
        "campaign_id": "outage-2026-11-29", "metadata": null,
        "swr_request_id": uuid::Uuid::new_v4().to_string(),
        "started_at": "2026-11-29T05:20:28.123Z", "finished_at": "2026-11-29T05:20:28.141Z",
        "duration_ms": 18, "worker": "host-a/4242"
    }))
    .expect("outcome")
}

/// CPU time (user + system) of this process so far.
fn cpu_time() -> Duration {
    Duration::from_secs_f64(cpu_seconds(std::process::id()).unwrap_or(0.0))
}
