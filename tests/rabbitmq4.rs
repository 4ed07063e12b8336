//! What RabbitMQ 4.x changes for the worker (docs/contract.md, "RabbitMQ 3.10–3.13 and 4.x"):
//! the quorum queue's default delivery limit and the `x-delivery-count` the worker reads. These
//! tests run against the broker at AMQP_URL and skip, saying so, when it is a 3.x broker (CI runs
//! the suite a second time against a 4.x node from `scripts/rabbitmq4.sh`).

mod common;

use std::time::Duration;

use common::{amqp_url, TestEnv, WorkerProcess, WAIT};
use lapin::protocol::{connection::AMQPMethod, AMQPClass};
use lapin::types::AMQPValue;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The 4.0 default delivery limit of every quorum queue (the worker sets none).
const DEFAULT_DELIVERY_LIMIT: u64 = 20;

/// The `version` the broker at AMQP_URL announces in its `connection.start` server properties
/// (lapin does not keep them, so the start frame is read here; no login is attempted).
async fn broker_version() -> String {
    let uri: lapin::uri::AMQPUri = amqp_url().parse().expect("AMQP_URL parses");
    let address = (uri.authority.host.as_str(), uri.authority.port);
    let mut stream = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(address))
        .await
        .expect("connect within 30 s")
        .expect("the broker at AMQP_URL accepts a connection");
    stream.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    // A method frame: type (1), channel (2), payload size (4), payload, frame end.
    let mut header = [0u8; 7];
    tokio::time::timeout(WAIT, stream.read_exact(&mut header))
        .await
        .expect("connection.start within 30 s")
        .unwrap();
    assert_eq!(header[0], 1, "the broker answers with a method frame");
    let size = u32::from_be_bytes(header[3..7].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; size];
    stream.read_exact(&mut payload).await.unwrap();
    let Ok((_, AMQPClass::Connection(AMQPMethod::Start(start)))) =
        lapin::protocol::parse_class(payload.as_slice())
    else {
        panic!("the broker's first frame is connection.start");
    };
    match start.server_properties.inner().get("version") {
        Some(AMQPValue::LongString(v)) => v.to_string(),
        other => panic!("the broker announces no version: {other:?}"),
    }
}

/// Whether the broker is 3.x, in which case the calling test prints why and returns.
async fn skip_on_3x(test: &str) -> bool {
    let version = broker_version().await;
    if version.starts_with("3.") {
        println!(
            "SKIPPED {test}: the broker at AMQP_URL is RabbitMQ {version}; this test needs 4.x \
             (`sudo bash scripts/rabbitmq4.sh up`, then AMQP_URL=amqp://guest:guest@127.0.0.1:5673/%2f)"
        );
        return true;
    }
    false
}

/// A PostgreSQL URL on a loopback port where nothing listens (port 1, which no service here
/// uses and no test binds): every claim fails at once, so the worker requeues each delivery
/// after its pause (docs/contract.md: the store unreachable).
fn unreachable_store() -> String {
    "postgres://postgres@127.0.0.1:1/test".to_owned()
}

/// The worker binary with this test's names and an unreachable idempotency store.
fn spawn_worker_without_store(env: &TestEnv) -> WorkerProcess {
    let mut vars = env.binary_env();
    vars.extend([
        (
            "SWR_STAGE_WORKER__IDEMPOTENCY__BACKEND".to_owned(),
            "postgres".to_owned(),
        ),
        (
            "SWR_STAGE_WORKER__IDEMPOTENCY__URL".to_owned(),
            unreachable_store(),
        ),
        (
            "SWR_STAGE_WORKER__TELEMETRY__LISTEN".to_owned(),
            String::new(),
        ),
        ("RUST_LOG".to_owned(), "warn".to_owned()),
    ]);
    WorkerProcess::spawn(&vars, &env.prefix)
}

/// The `delivery_count` of every "requeueing the request" line in the worker's log, in order.
fn requeued_counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("requeueing the request"))
        .map(|l| {
            let field = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("delivery_count="))
                .unwrap_or_else(|| panic!("a requeue line without delivery_count: {l}"));
            field.parse().expect("delivery_count is a number")
        })
        .collect()
}

/// Waits until `condition` holds for the worker's log (checked every 50 ms, at most `limit`).
async fn wait_for_log(
    worker: &WorkerProcess,
    limit: Duration,
    what: &str,
    condition: impl Fn(&str) -> bool,
) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
        if condition(&log) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {limit:?}: {what}; log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn each_requeue_is_logged_with_the_brokers_delivery_count() {
    if skip_on_3x("each_requeue_is_logged_with_the_brokers_delivery_count").await {
        return;
    }
    let env = TestEnv::without_worker("rmq4_delivery_count", &[]).await;
    let worker = spawn_worker_without_store(&env);
    env.publish_json(&json!({"pipeline_id": 4101, "stage_index": 1}))
        .await;
    // The first delivery has no x-delivery-count; every requeue (basic.nack) adds one on 4.0.
    wait_for_log(&worker, WAIT, "three requeues", |log| {
        requeued_counts(log).len() >= 3
    })
    .await;
    let (status, log) = worker.terminate().await;
    assert!(status.success(), "the worker exits 0: {status:?}");
    let counts = requeued_counts(&log);
    assert_eq!(
        counts[..3],
        [0, 1, 2],
        "the worker reads the broker's count of earlier returns: {counts:?}"
    );
    assert!(
        log.contains("idempotency store unavailable"),
        "requeued because the store did not answer:\n{log}"
    );
    assert!(env.sim.calls().is_empty(), "SWR is never called unguarded");
    env.teardown().await;
}

#[tokio::test]
async fn a_request_requeued_past_the_default_delivery_limit_is_dead_lettered_by_the_broker() {
    if skip_on_3x(
        "a_request_requeued_past_the_default_delivery_limit_is_dead_lettered_by_the_broker",
    )
    .await
    {
        return;
    }
    let env = TestEnv::without_worker("rmq4_delivery_limit", &[]).await;
    // A queue nobody consumes, bound to every outcome: its depth counts what the worker published.
    let counted = format!("{}.counted", env.prefix);
    env.channel
        .queue_declare(
            counted.as_str().into(),
            // Durable: a transient non-exclusive queue is a deprecated feature on 4.x.
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    env.channel
        .queue_bind(
            counted.as_str().into(),
            env.config.amqp.results_exchange.as_str().into(),
            "#".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let worker = spawn_worker_without_store(&env);
    let properties = lapin::BasicProperties::default().with_message_id("rmq4-limit-1".into());
    env.publish(
        json!({"pipeline_id": 4102, "stage_index": 2})
            .to_string()
            .as_bytes(),
        properties,
    )
    .await;
    // 21 deliveries, each requeued after the worker's 500 ms pause: about 11 s.
    let dlq = env.config.amqp.dead_letter_queue.clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.depth(&dlq).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request was not dead-lettered within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, log) = worker.terminate().await;
    assert!(status.success(), "the worker exits 0: {status:?}");

    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1, "exactly one copy in the DLQ");
    let headers = dead[0]
        .delivery
        .properties
        .headers()
        .clone()
        .expect("the broker's headers");
    let headers = headers.inner();
    assert!(
        !headers.contains_key("x-swr-error"),
        "dead-lettered by the broker, not by the worker: {headers:?}"
    );
    assert_eq!(
        headers.get("x-first-death-reason"),
        Some(&AMQPValue::LongString("delivery_limit".into())),
        "{headers:?}"
    );
    let Some(AMQPValue::FieldArray(deaths)) = headers.get("x-death") else {
        panic!("an x-death header: {headers:?}");
    };
    let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
        panic!("x-death holds a table: {deaths:?}");
    };
    assert_eq!(
        death.inner().get("reason"),
        Some(&AMQPValue::LongString("delivery_limit".into()))
    );
    assert_eq!(
        death.inner().get("queue"),
        Some(&AMQPValue::LongString(
            env.config.amqp.request_queue.as_str().into()
        ))
    );
    assert_eq!(
        dead[0]
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str()),
        Some("rmq4-limit-1"),
        "the original message"
    );

    // Every delivery up to the limit was requeued by the worker, one by one, and none after it.
    let counts = requeued_counts(&log);
    let expected: Vec<u64> = (0..=DEFAULT_DELIVERY_LIMIT).collect();
    assert_eq!(counts, expected, "requeues by delivery count");
    // No outcome at all: the store never answered, so the worker never ran or published the job.
    assert_eq!(env.depth(&counted).await, 0, "no outcome was published");
    env.channel
        .queue_delete(counted.as_str().into(), Default::default())
        .await
        .unwrap();
    assert_eq!(env.depth(&env.config.amqp.request_queue).await, 0);
    assert!(env.sim.calls().is_empty(), "SWR is never called unguarded");
    env.teardown().await;
}
