//! One execution per idempotency key (contract §5), through the real broker and the simulator:
//! sequential and concurrent duplicates, retryable release, key reuse (replayed), a fleet on PostgreSQL,
//! and a worker killed with SIGKILL.

mod common;

use std::collections::HashMap;

use common::{TestEnv, WorkerProcess};
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::json;
use swr_stage_worker::outcome::{ErrorKind, Outcome, Status};
use swr_stage_worker::sim::FaultRule;

#[tokio::test]
async fn same_key_twice_in_sequence_calls_swr_once_and_replays() {
    let mut env = TestEnv::start("seq-dup").await;
    let body = json!({"pipeline_id": 31, "stage_index": 1, "idempotency_key": "dup-1", "metadata": {"n": 1}});
    env.publish_json(&body).await;
    let (first, _) = env.next_outcome().await;
    env.publish_json(&body).await;
    let (second, delivery) = env.next_outcome().await;
    assert!(!first.replayed);
    assert!(second.replayed);
    assert_eq!(second.status, Status::Succeeded);
    assert_eq!(
        Outcome {
            replayed: false,
            ..second.clone()
        },
        first,
        "the stored outcome, flagged as a replay"
    );
    assert_eq!(delivery.routing_key.as_str(), "stage.retry.succeeded");
    assert_eq!(env.sim.calls().len(), 1, "SWR was called once");
    env.teardown().await;
}

#[tokio::test]
async fn fifty_copies_at_once_call_swr_once() {
    let mut env =
        TestEnv::without_worker("burst", &[("SWR_STAGE_WORKER__WORKER__CONCURRENCY", "64")]).await;
    // A slow answer keeps the first copy in flight while the other 49 arrive.
    env.sim.add_rule(FaultRule {
        pipeline_id: Some(50),
        delay_ms: Some(300),
        ..FaultRule::default()
    });
    for _ in 0..50 {
        env.publish_json(
            &json!({"pipeline_id": 50, "stage_index": 0, "idempotency_key": "burst-1"}),
        )
        .await;
    }
    env.start_worker();
    let outcomes = env.outcomes(50).await;
    assert_eq!(outcomes.iter().filter(|o| !o.replayed).count(), 1);
    assert!(outcomes.iter().all(|o| o.status == Status::Succeeded));
    assert_eq!(env.sim.calls().len(), 1);
    env.teardown().await;
}

#[tokio::test]
async fn a_retryable_failure_releases_the_key_so_a_resubmission_runs_again() {
    let mut env =
        TestEnv::start_with("release", &[("SWR_STAGE_WORKER__RETRY__MAX_ATTEMPTS", "2")]).await;
    let rule = env.sim.add_rule(FaultRule {
        pipeline_id: Some(61),
        status: Some(503),
        ..FaultRule::default()
    });
    let body = json!({"pipeline_id": 61, "stage_index": 0, "idempotency_key": "rel-1"});
    env.publish_json(&body).await;
    let (failed, _) = env.next_outcome().await;
    assert_eq!(failed.status, Status::Failed);
    assert!(failed.error.as_ref().unwrap().retryable);
    env.sim.remove_rule(rule);
    env.publish_json(&body).await;
    let (again, _) = env.next_outcome().await;
    assert_eq!((again.status, again.replayed), (Status::Succeeded, false));
    // And now it is final: a third submission is a replay.
    env.publish_json(&body).await;
    assert!(env.next_outcome().await.0.replayed);
    assert_eq!(
        env.sim.calls().len(),
        3,
        "two failed attempts, one success, no call for the replay"
    );
    env.teardown().await;
}

#[tokio::test]
async fn a_permanent_failure_is_final_and_replayed() {
    let mut env = TestEnv::start("perm-final").await;
    env.sim.add_rule(FaultRule {
        pipeline_id: Some(62),
        status: Some(404),
        ..FaultRule::default()
    });
    let body = json!({"pipeline_id": 62, "stage_index": 0, "idempotency_key": "perm-1"});
    env.publish_json(&body).await;
    env.publish_json(&body).await;
    let outcomes = env.outcomes(2).await;
    assert!(outcomes
        .iter()
        .all(|o| o.error.as_ref().unwrap().kind == ErrorKind::NotFound));
    assert_eq!(outcomes.iter().filter(|o| o.replayed).count(), 1);
    assert_eq!(env.sim.calls().len(), 1);
    env.teardown().await;
}

#[tokio::test]
async fn a_key_reused_for_another_request_replays_the_outcome_of_the_step_that_ran() {
    // Contract §5: a finished key is replayed "for any later delivery of the same key".
    let mut env = TestEnv::start("reuse").await;
    env.publish_json(&json!({"pipeline_id": 71, "stage_index": 0, "idempotency_key": "reuse-1"}))
        .await;
    let (first, _) = env.next_outcome().await;
    assert_eq!(first.status, Status::Succeeded);
    env.publish_json(&json!({"pipeline_id": 72, "stage_index": 0, "idempotency_key": "reuse-1"}))
        .await;
    let (o, delivery) = env.next_outcome().await;
    assert_eq!(
        (o.status, o.pipeline_id, o.attempts, o.replayed, o.error),
        (Status::Succeeded, Some(71), 1, true, None),
        "the stored outcome names the step that ran"
    );
    assert_eq!(o.started_at, first.started_at);
    assert_eq!(delivery.routing_key.as_str(), "stage.retry.succeeded");
    assert_eq!(env.sim.calls().len(), 1, "SWR is not called again");
    env.stop_worker().await.unwrap();
    assert!(
        env.dead_letters().await.is_empty(),
        "nothing is dead-lettered"
    );
    env.teardown().await;
}

/// Per key: (outcomes, non-replayed outcomes).
fn tally(outcomes: &[Outcome]) -> HashMap<String, (usize, usize)> {
    let mut per_key: HashMap<String, (usize, usize)> = HashMap::new();
    for o in outcomes {
        let entry = per_key.entry(o.idempotency_key.clone()).or_default();
        entry.0 += 1;
        if !o.replayed {
            entry.1 += 1;
        }
    }
    per_key
}

/// Publishes `bodies` to the request queue with one batch of confirms.
async fn publish_all(env: &TestEnv, bodies: &[Vec<u8>]) {
    for body in bodies {
        env.channel
            .basic_publish(
                "".into(),
                env.config.amqp.request_queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
    }
    let returned = env.channel.wait_for_confirms().await.unwrap();
    assert!(returned.is_empty());
}

#[tokio::test]
async fn two_worker_processes_sharing_postgres_run_each_key_once() {
    let mut env = TestEnv::without_worker("fleet", &[]).await;
    let unique = 4000;
    let mut bodies = Vec::with_capacity(5000);
    for i in 0..5000usize {
        // 20% of the messages reuse an earlier key (same request, published again).
        let n = if i < unique { i } else { (i * 7919) % unique };
        bodies.push(json!({"pipeline_id": 100_000 + n, "stage_index": n % 5, "idempotency_key": format!("{}-{n}", env.prefix)}).to_string().into_bytes());
    }
    // The loop guard's counts live in the shared PostgreSQL table and outlast a test run; these
    // pipeline ids repeat from run to run, so the guard (tested on its own) is off here.
    let pg_url = common::pg_url();
    let pg = [
        ("SWR_STAGE_WORKER__IDEMPOTENCY__BACKEND", "postgres"),
        ("SWR_STAGE_WORKER__IDEMPOTENCY__URL", pg_url.as_str()),
        ("SWR_STAGE_WORKER__GUARD__MAX_EXECUTIONS", "0"),
    ];
    let mut workers = Vec::new();
    for w in 0..2 {
        let name = format!("{}.w{w}", env.prefix);
        let connection = format!("SWR_STAGE_WORKER__AMQP__CONNECTION_NAME={name}");
        let (k, v) = connection.split_once('=').unwrap();
        let mut extra = pg.to_vec();
        extra.push((k, v));
        workers.push(WorkerProcess::spawn(
            &common::test_env(&env.prefix, &env.sim.url(), &extra),
            &name,
        ));
    }
    publish_all(&env, &bodies).await;
    let outcomes = env.outcomes(bodies.len()).await;
    for w in workers {
        let (status, _) = w.terminate().await;
        assert!(status.success());
    }
    let per_key = tally(&outcomes);
    assert_eq!(per_key.len(), unique);
    let odd: Vec<_> = per_key
        .iter()
        .filter(|(_, &(_, fresh))| fresh != 1)
        .take(5)
        .collect();
    let fresh_total = per_key.values().map(|&(_, fresh)| fresh).sum::<usize>();
    assert!(
        odd.is_empty(),
        "exactly one non-replayed outcome per key; {fresh_total} fresh in all; (outcomes, fresh) of some that differ: {odd:?}"
    );
    let executions = env.sim.executions();
    assert_eq!(executions.len(), unique);
    assert!(
        executions.values().all(|&n| n == 1),
        "SWR executed each key exactly once"
    );
    let calls = env.sim.calls().len();
    assert_eq!(calls, unique, "no key reached SWR twice");
    println!(
        "fleet: {} messages, {unique} keys, {} replayed outcomes, {calls} SWR calls",
        bodies.len(),
        outcomes.iter().filter(|o| o.replayed).count()
    );
    env.teardown().await;
}

#[tokio::test]
async fn a_worker_killed_mid_run_loses_nothing_and_repeats_only_what_was_mid_call() {
    // Short lease and hold so the restarted worker takes over the dead one's claims quickly.
    let extra = [
        ("SWR_STAGE_WORKER__RETRY__MAX_ELAPSED", "2s"),
        ("SWR_STAGE_WORKER__HTTP__TIMEOUT", "1s"),
        ("SWR_STAGE_WORKER__IDEMPOTENCY__LEASE", "4s"),
        ("SWR_STAGE_WORKER__IDEMPOTENCY__HOLD", "1s"),
    ];
    let mut env = TestEnv::without_worker("sigkill", &extra).await;
    env.sim.add_rule(FaultRule {
        delay_ms: Some(20),
        ..FaultRule::default()
    });
    let total = 1500usize;
    let bodies: Vec<Vec<u8>> = (0..total)
        .map(|n| json!({"pipeline_id": 200_000 + n, "stage_index": 0, "idempotency_key": format!("{}-{n}", env.prefix)}).to_string().into_bytes())
        .collect();
    let vars = common::test_env(&env.prefix, &env.sim.url(), &extra);
    let first = WorkerProcess::spawn(&vars, &format!("{}.first", env.prefix));
    publish_all(&env, &bodies).await;
    let mut outcomes = env.outcomes(total / 3).await;
    first.kill9().await;
    let second = WorkerProcess::spawn(&vars, &format!("{}.second", env.prefix));
    let mut per_key = tally(&outcomes);
    while per_key.len() < total {
        outcomes.push(env.next_outcome().await.0);
        per_key = tally(&outcomes);
    }
    let (status, _) = second.terminate().await;
    assert!(status.success());
    assert!(outcomes.iter().all(|o| o.status == Status::Succeeded));
    assert!(
        per_key.values().all(|&(_, fresh)| fresh <= 1),
        "never two fresh outcomes for one key"
    );
    let executions = env.sim.executions();
    assert_eq!(executions.len(), total, "every key reached SWR");
    assert!(executions.values().all(|&n| n == 1));
    let mut calls_per_key: HashMap<String, usize> = HashMap::new();
    for call in env.sim.calls() {
        *calls_per_key
            .entry(call.idempotency_key.unwrap_or_default())
            .or_default() += 1;
    }
    let repeated = calls_per_key.values().filter(|&&n| n > 1).count();
    assert!(
        repeated <= 16,
        "only jobs in flight at the kill (concurrency 16) may reach SWR again; {repeated} did"
    );
    println!(
        "sigkill: {total} keys, {} outcomes ({} replayed), {repeated} keys reached SWR twice (both times with the same Idempotency-Key)",
        outcomes.len(),
        outcomes.iter().filter(|o| o.replayed).count()
    );
    env.teardown().await;
}
