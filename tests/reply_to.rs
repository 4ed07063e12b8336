//! The `amqp.reply_to` policy end to end, against the real broker and the simulator: which
//! `reply_to` queues get a copy of the outcome, fresh or replayed.
//!
//! "Nothing landed" is proved after the worker's drain: a request is acked only once every copy
//! of its outcome is confirmed, so once the worker stopped, every copy it sent is in its queue.
//! A copy sent to the request queue would be there, or consumed as a request and dead-lettered.

mod common;

use common::TestEnv;
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::BasicProperties;
use serde_json::json;
use swr_stage_worker::config::ReplyToPolicy;
use swr_stage_worker::outcome::{Outcome, Status};

/// Publishes a request for `key` whose `reply_to` is `reply_to`.
async fn request(env: &TestEnv, key: &str, reply_to: &str) {
    env.publish(
        json!({"pipeline_id": 21, "stage_index": 0, "idempotency_key": key})
            .to_string()
            .as_bytes(),
        BasicProperties::default().with_reply_to(reply_to.into()),
    )
    .await;
}

/// Every outcome copy in `queue` (taken off it), in order.
async fn copies(env: &TestEnv, queue: &str) -> Vec<Outcome> {
    let mut all = Vec::new();
    while let Some(message) = env
        .channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        all.push(serde_json::from_slice(&message.delivery.data).expect("an outcome"));
    }
    all
}

/// Declares a queue of the test's own besides `<prefix>.replies` (delete it with [`drop_queue`]).
async fn own_queue(env: &TestEnv, name: &str) {
    env.channel
        .queue_declare(
            name.into(),
            // Durable: a transient non-exclusive queue is a deprecated feature on 4.x.
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
}

async fn drop_queue(env: &TestEnv, name: &str) {
    env.channel
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

/// Stops the worker (its drain confirms every copy) and asserts that no copy reached the
/// request queue or the dead-letter queue.
async fn stop_and_check_own_queues_untouched(env: &mut TestEnv) {
    env.stop_worker().await.unwrap();
    let requests = env.config.amqp.request_queue.clone();
    assert_eq!(
        env.depth(&requests).await,
        0,
        "nothing left in the request queue"
    );
    assert!(
        env.dead_letters().await.is_empty(),
        "nothing in the dead-letter queue"
    );
}

/// Collects `n` outcomes from the results exchange, in the order of their keys.
async fn outcomes_by_key(env: &mut TestEnv, n: usize) -> Vec<(String, Status, bool)> {
    let mut all: Vec<_> = env
        .outcomes(n)
        .await
        .into_iter()
        .map(|o| (o.idempotency_key, o.status, o.replayed))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

#[tokio::test]
async fn by_default_the_workers_own_queues_are_refused_and_an_ordinary_queue_is_honoured() {
    let mut env = TestEnv::without_worker("reply-safe", &[]).await;
    assert_eq!(env.config.amqp.reply_to, ReplyToPolicy::Safe);
    let base = env.start_worker_with_telemetry().await;
    let replies = env.reply_queue().await;
    let (requests, dead) = (
        env.config.amqp.request_queue.clone(),
        env.config.amqp.dead_letter_queue.clone(),
    );
    request(&env, "k-to-requests", &requests).await;
    request(&env, "k-to-dead", &dead).await;
    request(&env, "k-to-replies", &replies).await;
    // Each outcome goes to the results exchange as always, and each request runs.
    assert_eq!(
        outcomes_by_key(&mut env, 3).await,
        [
            ("k-to-dead".into(), Status::Succeeded, false),
            ("k-to-replies".into(), Status::Succeeded, false),
            ("k-to-requests".into(), Status::Succeeded, false),
        ]
    );
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "swr_stage_reply_to_refused_total{reason=\"own_topology\"} 2"),
        "{metrics}"
    );
    stop_and_check_own_queues_untouched(&mut env).await;
    let honoured: Vec<String> = copies(&env, &replies)
        .await
        .into_iter()
        .map(|o| o.idempotency_key)
        .collect();
    assert_eq!(honoured, ["k-to-replies"]);
    assert_eq!(env.sim.calls().len(), 3);
    env.teardown().await;
}

#[tokio::test]
async fn deny_sends_nothing_to_reply_to() {
    let mut env = TestEnv::start_with(
        "reply-deny",
        &[("SWR_STAGE_WORKER__AMQP__REPLY_TO", "deny")],
    )
    .await;
    let replies = env.reply_queue().await;
    request(&env, "k-denied", &replies).await;
    let (outcome, _) = env.next_outcome().await;
    assert_eq!(
        (outcome.idempotency_key.as_str(), outcome.status),
        ("k-denied", Status::Succeeded)
    );
    stop_and_check_own_queues_untouched(&mut env).await;
    assert_eq!(env.depth(&replies).await, 0, "no copy went to reply_to");
    env.teardown().await;
}

#[tokio::test]
async fn a_prefix_list_honours_matching_names_only_and_never_the_workers_own() {
    let mut env = TestEnv::without_worker("reply-prefixes", &[]).await;
    // `<prefix>.` matches the reply queue, and the worker's own `<prefix>.dead` as well.
    env.config.amqp.reply_to = ReplyToPolicy::Prefixes(vec![format!("{}.", env.prefix)]);
    env.start_worker();
    let replies = env.reply_queue().await;
    let unlisted = format!("{}-unlisted", env.prefix);
    own_queue(&env, &unlisted).await;
    let dead = env.config.amqp.dead_letter_queue.clone();
    request(&env, "k-listed", &replies).await;
    request(&env, "k-unlisted", &unlisted).await;
    request(&env, "k-own", &dead).await;
    assert_eq!(
        outcomes_by_key(&mut env, 3).await,
        [
            ("k-listed".into(), Status::Succeeded, false),
            ("k-own".into(), Status::Succeeded, false),
            ("k-unlisted".into(), Status::Succeeded, false),
        ]
    );
    stop_and_check_own_queues_untouched(&mut env).await;
    let honoured: Vec<String> = copies(&env, &replies)
        .await
        .into_iter()
        .map(|o| o.idempotency_key)
        .collect();
    assert_eq!(honoured, ["k-listed"]);
    assert_eq!(
        env.depth(&unlisted).await,
        0,
        "the unlisted queue got no copy"
    );
    drop_queue(&env, &unlisted).await;
    env.teardown().await;
}

#[tokio::test]
async fn a_replayed_outcome_goes_to_reply_to_only_when_the_policy_allows_it() {
    let mut env = TestEnv::start("reply-replay").await;
    let replies = env.reply_queue().await;
    let dead = env.config.amqp.dead_letter_queue.clone();
    request(&env, "k-replay", &replies).await;
    let (fresh, _) = env.next_outcome().await;
    assert_eq!((fresh.status, fresh.replayed), (Status::Succeeded, false));
    // Whoever knows the key asks for its outcome into the worker's DLQ: refused.
    request(&env, "k-replay", &dead).await;
    let (replayed, _) = env.next_outcome().await;
    assert_eq!(
        (replayed.status, replayed.replayed),
        (Status::Succeeded, true)
    );
    // Into an ordinary queue: honoured, as a replay.
    request(&env, "k-replay", &replies).await;
    let (again, _) = env.next_outcome().await;
    assert!(again.replayed);
    stop_and_check_own_queues_untouched(&mut env).await;
    let honoured: Vec<(String, bool)> = copies(&env, &replies)
        .await
        .into_iter()
        .map(|o| (o.idempotency_key, o.replayed))
        .collect();
    assert_eq!(
        honoured,
        [("k-replay".into(), false), ("k-replay".into(), true)]
    );
    assert_eq!(env.sim.calls().len(), 1, "SWR was called once");
    env.teardown().await;
}
