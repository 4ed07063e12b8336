//! `swr-stage-worker demo`: the newcomer's first command. Runs the simulator and a worker in this
//! process against the local RabbitMQ, publishes sample requests (retries, rollbacks, transient
//! faults, invalid bodies), waits for every outcome and prints what an operator would look at.
//!
//! It uses its own uniquely named queues and exchanges and deletes them at the end, so it never
//! touches a real deployment's topology on the same broker.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use serde_json::json;

use crate::amqp::{connect, topology};
use crate::config::{redact_url, Config, Secret};
use crate::outcome::{Outcome, Status};
use crate::service;
use crate::sim::{FaultRule, SimConfig, SimHandle};

/// The token the in-process simulator accepts.
const DEMO_TOKEN: &str = "demo-token";
/// How long the demo waits for all outcomes.
const DEMO_DEADLINE: Duration = Duration::from_secs(120);

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("RabbitMQ is not reachable at {url} ({reason}). Start it (`rabbitmq-server -detached`, or `docker compose up -d rabbitmq`) or point AMQP_URL at one.")]
    NoBroker { url: String, reason: String },
    #[error("{0}")]
    Other(String),
}

fn other(e: impl std::fmt::Display) -> DemoError {
    DemoError::Other(e.to_string())
}

/// The sample workload: `(body, what it shows)`.
fn sample_requests(count: usize) -> Vec<Vec<u8>> {
    let mut bodies = Vec::with_capacity(count);
    for i in 0..count {
        let body = match i % 40 {
            // Invalid bodies: dead-lettered with their reason.
            7 => b"{\"pipeline_id\": 1001, \"stage_index\": 1,".to_vec(),
            17 => json!({"pipeline_id": 1002, "stage_index": 1, "mdoe": "rollback"}).to_string().into_bytes(),
            27 => json!({"pipeline_id": 0, "stage_index": 1}).to_string().into_bytes(),
            // Rollback of a non-deploy step: SWR answers 400.
            11 => json!({"pipeline_id": 2000 + i, "stage_index": 1, "mode": "rollback", "campaign_id": "demo"}).to_string().into_bytes(),
            // Rollbacks of the deploy step (the last of 5).
            n if n % 5 == 0 => json!({"pipeline_id": 3000 + i, "stage_index": 4, "mode": "rollback", "campaign_id": "demo"}).to_string().into_bytes(),
            // Pipelines hit by an outage (503 twice, then fine) and by throttling (429 + Retry-After).
            9 => json!({"pipeline_id": 9000 + (i / 40) % 5, "stage_index": 2, "campaign_id": "demo", "idempotency_key": format!("demo-outage-{i}")}).to_string().into_bytes(),
            18 => json!({"pipeline_id": 9005 + (i / 40) % 5, "stage_index": 2, "campaign_id": "demo", "idempotency_key": format!("demo-throttled-{i}")}).to_string().into_bytes(),
            _ => json!({"pipeline_id": 4000 + i, "stage_index": i % 5, "campaign_id": "demo", "metadata": {"ticket": format!("OPS-{i}")}}).to_string().into_bytes(),
        };
        bodies.push(body);
    }
    bodies
}

/// Runs the demo end to end and prints its summary to stdout.
pub async fn run(base: Config, count: usize) -> Result<(), DemoError> {
    let url = base.amqp.url.clone();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let prefix = format!("swr.stage.demo.{suffix}");
    let probe = connect(&url, &format!("{prefix}.demo"), Duration::from_secs(5))
        .await
        .map_err(|e| DemoError::NoBroker {
            url: redact_url(url.expose()),
            reason: e
                .to_string()
                .rsplit(": ")
                .next()
                .unwrap_or_default()
                .to_owned(),
        })?;
    let sim = SimHandle::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            tokens: vec![DEMO_TOKEN.to_owned()],
            ..SimConfig::default()
        },
    )
    .await
    .map_err(|e| other(format!("cannot start the simulator: {e}")))?;
    sim.add_rule(FaultRule {
        pipeline_range: Some([9000, 9004]),
        status: Some(503),
        times: Some(10),
        ..FaultRule::default()
    });
    sim.add_rule(FaultRule {
        pipeline_range: Some([9005, 9009]),
        status: Some(429),
        retry_after: Some("1".into()),
        times: Some(2),
        ..FaultRule::default()
    });

    let mut config = base;
    config.swr.endpoint = sim.url();
    config.swr.auth.token = Secret::new(DEMO_TOKEN);
    // The in-process simulator takes this fixed token, whatever the configured token source.
    config.swr.auth.kind = "static".into();
    config.amqp.request_queue = format!("{prefix}.requests");
    config.amqp.request_exchanges = Vec::new();
    config.amqp.dead_letter_exchange = format!("{prefix}.dlx");
    config.amqp.dead_letter_queue = format!("{prefix}.dead");
    config.amqp.results_exchange = format!("{prefix}.results");
    config.amqp.connection_name = format!("{prefix}.worker");
    config.retry.initial_interval = Duration::from_millis(100);
    config.worker.id = "demo-worker".to_owned();
    // A throw-away store, so repeated demos start fresh and leave nothing behind.
    let store_dir = std::env::temp_dir().join(format!("{prefix}.store"));
    config.idempotency.path = store_dir.join("idempotency.db").display().to_string();
    config.validate().map_err(other)?;

    let channel = probe.create_channel().await.map_err(other)?;
    topology::declare(&channel, &config.amqp)
        .await
        .map_err(other)?;
    let watch = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(other)?;
    channel
        .queue_bind(
            watch.name().clone(),
            config.amqp.results_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(other)?;
    let mut outcomes = channel
        .basic_consume(
            watch.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(other)?;

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(service::run(config.clone(), async {
        let _ = stopped.await;
    }));

    println!(
        "demo: simulator at {}, worker consuming {prefix}.requests",
        sim.url()
    );
    println!("demo: publishing {count} sample requests (retries, rollbacks, an outage, throttling, invalid bodies)");
    channel
        .confirm_select(Default::default())
        .await
        .map_err(other)?;
    for body in sample_requests(count) {
        channel
            .basic_publish(
                "".into(),
                config.amqp.request_queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .map_err(other)?;
    }
    channel.wait_for_confirms().await.map_err(other)?;

    let mut received: Vec<Outcome> = Vec::with_capacity(count);
    let deadline = tokio::time::Instant::now() + DEMO_DEADLINE;
    while received.len() < count {
        match tokio::time::timeout_at(deadline, outcomes.next()).await {
            Ok(Some(Ok(delivery))) => match serde_json::from_slice::<Outcome>(&delivery.data) {
                Ok(outcome) => received.push(outcome),
                Err(e) => eprintln!("demo: unreadable outcome: {e}"),
            },
            Ok(_) => break,
            Err(_) => {
                eprintln!("demo: gave up waiting after {DEMO_DEADLINE:?}");
                break;
            }
        }
    }
    let _ = stop.send(());
    let _ = worker.await;
    let dead = channel
        .queue_declare(
            config.amqp.dead_letter_queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .unwrap_or_default();
    print_summary(&received, count, dead, sim.stats().executions);
    cleanup(&channel, &config).await;
    let _ = probe.close(200, "demo done".into()).await;
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&store_dir);
    if received.len() < count {
        return Err(other(format!(
            "only {} of {count} outcomes arrived",
            received.len()
        )));
    }
    Ok(())
}

fn print_summary(outcomes: &[Outcome], expected: usize, dead: u32, executions: u64) {
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    let mut retried = 0;
    for o in outcomes {
        *by_status.entry(o.status.as_str()).or_default() += 1;
        if let Some(e) = &o.error {
            *by_kind.entry(e.kind.as_str()).or_default() += 1;
        }
        if o.attempts > 1 {
            retried += 1;
        }
    }
    println!();
    println!("outcomes: {} of {expected}", outcomes.len());
    for (status, n) in &by_status {
        println!("  {status:<10} {n:>5}");
    }
    if !by_kind.is_empty() {
        println!("errors by kind:");
        for (kind, n) in &by_kind {
            println!("  {kind:<18} {n:>5}");
        }
    }
    println!("jobs that needed more than one attempt: {retried}");
    println!("SWR executions (simulator): {executions}");
    println!("dead-lettered requests: {dead}");
    for status in [Status::Succeeded, Status::Failed, Status::Rejected] {
        let sample = outcomes
            .iter()
            .filter(|o| o.status == status)
            .max_by_key(|o| o.attempts);
        if let Some(o) = sample {
            println!(
                "\nsample {} outcome (routing key {}):",
                status.as_str(),
                o.routing_key()
            );
            println!("{}", serde_json::to_string_pretty(o).unwrap_or_default());
        }
    }
}

async fn cleanup(channel: &Channel, config: &Config) {
    let amqp = &config.amqp;
    for queue in [&amqp.request_queue, &amqp.dead_letter_queue] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [&amqp.dead_letter_exchange, &amqp.results_exchange] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}
