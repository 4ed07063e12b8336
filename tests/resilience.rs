//! Staying up: the worker rides out its connection being closed by the broker, and a broker
//! stop/start, without losing a request or running a key twice.
//!
//! The broker restart disturbs every connection on the broker, so that test is `#[ignore]`d and
//! runs in the serial second step of the test command (`--run-ignored only --test-threads 1`).

mod common;

use std::collections::{HashMap, HashSet};

use common::{close_connections_named, connections_named, rabbitmqctl, TestEnv};
use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::json;
use swr_stage_worker::outcome::{Outcome, Status};
use swr_stage_worker::sim::FaultRule;

async fn publish_jobs(env: &TestEnv, n: usize) -> Vec<String> {
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("{}-{i}", env.prefix);
        let body = json!({"pipeline_id": 300_000 + i, "stage_index": 0, "idempotency_key": key})
            .to_string();
        env.channel
            .basic_publish(
                "".into(),
                env.config.amqp.request_queue.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        keys.push(key);
    }
    assert!(env.channel.wait_for_confirms().await.unwrap().is_empty());
    keys
}

/// Collects outcomes until every key has a fresh (not replayed) one: a redelivery's replay can
/// arrive before the fresh copy a job publishes on the new connection. A key that never gets
/// one fails the test when `next_outcome` runs out of time.
async fn until_every_key_answered(
    env: &mut TestEnv,
    keys: &[String],
    mut seen: Vec<Outcome>,
) -> Vec<Outcome> {
    let mut fresh: HashSet<String> = seen
        .iter()
        .filter(|o| !o.replayed)
        .map(|o| o.idempotency_key.clone())
        .collect();
    while fresh.len() < keys.len() {
        let (o, _) = env.next_outcome().await;
        if !o.replayed {
            fresh.insert(o.idempotency_key.clone());
        }
        seen.push(o);
    }
    seen
}

fn assert_once_each(env: &TestEnv, keys: &[String], outcomes: &[Outcome]) {
    assert!(outcomes.iter().all(|o| o.status == Status::Succeeded));
    let mut fresh: HashMap<&str, usize> = HashMap::new();
    for o in outcomes.iter().filter(|o| !o.replayed) {
        *fresh.entry(o.idempotency_key.as_str()).or_default() += 1;
    }
    let none = keys
        .iter()
        .filter(|k| !fresh.contains_key(k.as_str()))
        .count();
    let twice = fresh.values().filter(|&&n| n > 1).count();
    assert_eq!(none, 0, "every key has a fresh outcome, not only replays");
    // Window 4 of docs/contract.md: an outcome the broker took just before the connection died
    // (its confirm lost with it) is published again. Only jobs in flight then (16) can be hit.
    assert!(
        twice <= 16,
        "{twice} keys published fresh twice; only the 16 in flight at the break may be"
    );
    let executions = env.sim.executions();
    assert_eq!(executions.len(), keys.len(), "every key reached SWR");
    assert!(
        executions.values().all(|&n| n == 1),
        "and was executed once"
    );
}

#[tokio::test]
async fn a_connection_closed_by_the_broker_is_reopened_and_every_job_finishes() {
    let mut env = TestEnv::without_worker("conn-closed", &[]).await;
    env.sim.add_rule(FaultRule {
        delay_ms: Some(5),
        ..FaultRule::default()
    });
    let keys = publish_jobs(&env, 2000).await;
    env.start_worker();
    let first = env.outcomes(300).await;
    let name = env.config.amqp.connection_name.clone();
    assert_eq!(
        close_connections_named(&name).await,
        1,
        "the worker's one connection was found by its name"
    );
    let outcomes = until_every_key_answered(&mut env, &keys, first).await;
    assert_once_each(&env, &keys, &outcomes);
    // The same worker reconnected (it is still consuming: a new job gets an answer).
    env.publish_json(&json!({"pipeline_id": 1, "stage_index": 0, "idempotency_key": format!("{}-after", env.prefix)})).await;
    let (o, _) = env.next_outcome().await;
    assert_eq!(o.idempotency_key, format!("{}-after", env.prefix));
    env.teardown().await;
}

/// A job whose session ended while it waited (here, for a duplicate of its key to finish) and
/// that then requeues its request finds its own publisher dead. That must not end the healthy
/// session which replaced its own: the worker keeps the one new connection.
#[tokio::test]
async fn a_job_of_an_ended_session_that_requeues_leaves_the_new_session_alone() {
    let mut env = TestEnv::start_with(
        "old-session-requeue",
        &[
            ("SWR_STAGE_WORKER__IDEMPOTENCY__HOLD", "5s"),
            ("SWR_STAGE_WORKER__HTTP__TIMEOUT", "15s"),
        ],
    )
    .await;
    // The first copy's call takes 10 s: long enough for the second copy, held behind it for
    // `idempotency.hold` (5 s), to give up and requeue after its session has been replaced.
    env.sim.add_rule(FaultRule {
        delay_ms: Some(10_000),
        ..FaultRule::default()
    });
    let body =
        json!({"pipeline_id": 1, "stage_index": 0, "idempotency_key": format!("{}-k", env.prefix)});
    let queue = env.config.amqp.request_queue.clone();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    // One copy runs (slowly), the other waits for it.
    for _ in 0..2 {
        env.publish_json(&body).await;
        while env.depth(&queue).await > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a copy was never taken"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    let name = env.config.amqp.connection_name.clone();
    let first = connections_named(&name).await;
    assert_eq!(first.len(), 1, "the worker's one connection: {first:?}");
    assert_eq!(close_connections_named(&name).await, 1);
    // The closed connection may still be listed for a moment while it closes.
    let second = loop {
        let pids = connections_named(&name).await;
        if let [pid] = pids.as_slice() {
            if *pid != first[0] {
                break pid.clone();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new session: {pids:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // The first copy's fresh outcome, then the redelivered copies' replays, all on the new
    // session; the old second copy's requeue happened in between.
    let outcomes = env.outcomes(3).await;
    assert_eq!(
        outcomes.iter().filter(|o| !o.replayed).count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(env.sim.calls().len(), 1, "the key ran once");
    assert_eq!(
        connections_named(&name).await,
        vec![second],
        "the session that replaced the closed one was left alone"
    );
    env.teardown().await;
}

#[tokio::test]
#[ignore = "stops and starts the broker: runs in the serial step (--run-ignored only --test-threads 1)"]
async fn broker_restart_is_ridden_out_by_the_same_process() {
    let mut env = TestEnv::without_worker("broker-restart", &[]).await;
    env.sim.add_rule(FaultRule {
        delay_ms: Some(5),
        ..FaultRule::default()
    });
    let keys = publish_jobs(&env, 2000).await;
    let worker = common::WorkerProcess::spawn(
        &common::test_env(&env.prefix, &env.sim.url(), &[]),
        &env.prefix,
    );
    let first = env.outcomes(300).await;
    rabbitmqctl(&["stop_app"]).await;
    rabbitmqctl(&["start_app"]).await;
    rabbitmqctl(&["await_startup"]).await;
    // The test's own connection died with the broker: open a new one for the rest.
    env.reconnect().await;
    let outcomes = until_every_key_answered(&mut env, &keys, first).await;
    assert_once_each(&env, &keys, &outcomes);
    let (status, log) = worker.terminate().await;
    assert!(
        status.success(),
        "the same worker process survived: {status:?}"
    );
    assert!(log.contains("reconnecting"), "it said it was reconnecting");
    env.teardown().await;
}

#[tokio::test]
async fn swr_calls_are_paced_smoothly_by_max_requests_per_second() {
    let mut env = TestEnv::start_with(
        "paced",
        &[
            ("SWR_STAGE_WORKER__SWR__MAX_REQUESTS_PER_SECOND", "20"),
            ("SWR_STAGE_WORKER__WORKER__CONCURRENCY", "32"),
        ],
    )
    .await;
    publish_jobs(&env, 30).await;
    env.outcomes(30).await;
    let mut at: Vec<u64> = env.sim.calls().iter().map(|c| c.at_unix_ms).collect();
    at.sort_unstable();
    let span = at[at.len() - 1] - at[0];
    assert!(
        span >= 1300,
        "30 calls at 20/s take about 1.45 s, took {span} ms"
    );
    let burst = at.windows(4).map(|w| w[3] - w[0]).min().unwrap();
    assert!(
        burst >= 100,
        "never 4 calls within 100 ms (a smooth pace, not bursts): {burst} ms"
    );
    env.teardown().await;
}

#[tokio::test]
async fn an_swr_outage_opens_the_breaker_and_waiting_requests_are_not_failed() {
    let mut env = TestEnv::without_worker(
        "breaker",
        &[
            ("SWR_STAGE_WORKER__WORKER__CONCURRENCY", "2"),
            ("SWR_STAGE_WORKER__RETRY__MAX_ATTEMPTS", "1"),
            ("SWR_STAGE_WORKER__BREAKER__WINDOW", "10"),
            ("SWR_STAGE_WORKER__BREAKER__MIN_CALLS", "5"),
            ("SWR_STAGE_WORKER__BREAKER__COOLDOWN", "1s"),
        ],
    )
    .await;
    let outage = env.sim.add_rule(FaultRule {
        status: Some(503),
        ..FaultRule::default()
    });
    let keys = publish_jobs(&env, 20).await;
    env.start_worker();
    // The outage fails the first jobs; then the breaker opens and the rest stay queued.
    let mut seen = env.outcomes(5).await;
    assert!(seen.iter().all(|o| o.status == Status::Failed));
    env.sim.remove_rule(outage);
    let outcomes = until_every_key_answered(&mut env, &keys, std::mem::take(&mut seen)).await;
    let failed = outcomes
        .iter()
        .filter(|o| o.status == Status::Failed)
        .count();
    let succeeded = outcomes
        .iter()
        .filter(|o| o.status == Status::Succeeded)
        .count();
    assert_eq!(failed + succeeded, 20);
    assert!(
        failed <= 7,
        "only the first min_calls jobs (and the two in flight) met the outage: {failed}"
    );
    assert!(succeeded >= 13);
    env.teardown().await;
}

#[tokio::test]
async fn the_loop_guard_stops_a_fourth_execution_of_the_same_step() {
    let mut env = TestEnv::start("loop-guard").await;
    for i in 0..4 {
        env.publish_json(&json!({"pipeline_id": 4242, "stage_index": 3, "idempotency_key": format!("{}-{i}", env.prefix)})).await;
        let (o, delivery) = env.next_outcome().await;
        if i < 3 {
            assert_eq!(o.status, Status::Succeeded);
        } else {
            assert_eq!((o.status, o.attempts), (Status::Rejected, 0));
            let e = o.error.unwrap();
            assert_eq!(e.kind, swr_stage_worker::outcome::ErrorKind::LoopGuard);
            assert!(e.message.contains("pipeline 4242 stage 3"), "{}", e.message);
            assert_eq!(delivery.routing_key.as_str(), "stage.retry.rejected");
        }
    }
    // Another step, or the same step rolled back, is not held back.
    env.publish_json(&json!({"pipeline_id": 4242, "stage_index": 4, "mode": "rollback"}))
        .await;
    assert_eq!(env.next_outcome().await.0.status, Status::Succeeded);
    assert_eq!(
        env.sim.calls().len(),
        4,
        "SWR was not called for the guarded request"
    );
    env.stop_worker().await.unwrap();
    assert!(
        env.dead_letters().await.is_empty(),
        "a policy rejection is acked, not dead-lettered"
    );
    env.teardown().await;
}

#[tokio::test]
async fn a_second_signal_exits_at_once_and_the_broker_keeps_the_request() {
    let env = TestEnv::without_worker("second-signal", &[]).await;
    env.sim.add_rule(FaultRule {
        delay_ms: Some(20_000),
        ..FaultRule::default()
    });
    let worker = common::WorkerProcess::spawn(
        &common::test_env(&env.prefix, &env.sim.url(), &[]),
        &env.prefix,
    );
    env.publish_json(&json!({"pipeline_id": 9, "stage_index": 0}))
        .await;
    // The job is in flight once its call reached the simulator (counted as it arrives; the
    // call log only records it when it answers). An empty queue is not enough: the delivery
    // may still sit in the worker's consumer, and a first signal then ends the worker at once.
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while env.sim.stats().requests == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never called SWR"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let queue = env.config.amqp.request_queue.clone();
    let started = std::time::Instant::now();
    let (status, _) = worker.terminate_twice().await;
    assert_eq!(status.code(), Some(130));
    assert!(
        started.elapsed().as_secs() < 10,
        "it did not wait for the 20 s call"
    );
    // The unacked request went back to the queue when the connection died.
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while env.depth(&queue).await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request was not requeued"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    env.teardown().await;
}

#[tokio::test]
async fn an_outcome_whose_channel_broke_is_published_fresh_on_a_new_session() {
    let mut env = TestEnv::start("channel-broke").await;
    // A first job shows the worker's session is up (with the exchange it declared).
    env.publish_json(&json!({"pipeline_id": 30, "stage_index": 0}))
        .await;
    assert_eq!(env.next_outcome().await.0.status, Status::Succeeded);
    let replies = env.reply_queue().await;
    let mut reply_stream = env
        .channel
        .basic_consume(
            replies.as_str().into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    // Publishing to an exchange that does not exist closes the channel (404) while the
    // connection lives on: the worker's next outcome breaks its publisher channel.
    let results = env.config.amqp.results_exchange.clone();
    env.channel
        .exchange_delete(results.as_str().into(), Default::default())
        .await
        .unwrap();
    let key = format!("{}-broken-channel", env.prefix);
    env.publish(
        json!({"pipeline_id": 31, "stage_index": 0, "idempotency_key": key})
            .to_string()
            .as_bytes(),
        BasicProperties::default().with_reply_to(replies.as_str().into()),
    )
    .await;
    // The session is replaced (the new one declares the exchange again) and the job publishes
    // its outcome there, fresh; the redelivery of the request adds a replay. A job that gave up
    // instead would leave the key with the replay alone.
    let mut seen = Vec::new();
    let fresh = loop {
        let delivery = tokio::time::timeout(common::WAIT, reply_stream.next())
            .await
            .unwrap_or_else(|_| panic!("no fresh outcome within 30 s; replies seen: {seen:?}"))
            .expect("reply stream open")
            .expect("reply delivery");
        let outcome: Outcome = serde_json::from_slice(&delivery.data).unwrap();
        if !outcome.replayed {
            break outcome;
        }
        seen.push(outcome);
    };
    assert_eq!(fresh.idempotency_key, key);
    assert_eq!(fresh.status, Status::Succeeded);
    assert_eq!(env.sim.executions().get(&key).copied(), Some(1));
    env.teardown().await;
}
