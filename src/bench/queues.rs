//! A phase's own queues on the broker: named fresh every run, filled with jobs whose keys and
//! pipelines are the run's own, their outcomes counted, and deleted afterwards.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};

use swr_stage_worker::amqp::topology;
use swr_stage_worker::config::{AuthKind, Config, Secret};

use super::{fail, BenchError, Bounded, TOKEN};

/// Names for one phase's queues and exchanges.
pub(super) fn phase_config(base: &Config, sim_url: &str, tag: &str) -> Config {
    let prefix = format!(
        "swr.stage.bench.{tag}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let mut config = base.clone();
    config.swr.endpoint = sim_url.to_owned();
    config.swr.auth.token = Secret::new(TOKEN);
    // The in-process simulator takes this fixed token, whatever the configured token source.
    config.swr.auth.kind = AuthKind::Static;
    config.amqp.name_after(&prefix);
    config
}

/// Declares the phase's topology plus a results queue; fills the request queue with `n` jobs.
pub(super) async fn prepare(
    broker: &Connection,
    config: &Config,
    n: usize,
) -> Result<(Channel, String), BenchError> {
    let channel = broker.create_channel().bounded().await?;
    topology::declare(&channel, &config.amqp).bounded().await?;
    let results = format!("{}.seen", config.amqp.results_exchange);
    channel
        .queue_declare(
            results.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .bounded()
        .await?;
    channel
        .queue_bind(
            results.as_str().into(),
            config.amqp.results_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .bounded()
        .await?;
    // Keys are the phase's own (its queue name is new every run): a store that outlives the run,
    // as PostgreSQL does, must not find a finished key and replay it instead of running the job.
    fill(
        &channel,
        &config.amqp.request_queue,
        0..n,
        &config.amqp.request_queue,
    )
    .await?;
    Ok((channel, results))
}

/// The first pipeline id of a run's jobs, from its key prefix: a step that ran in an earlier run
/// (within `guard.window`, in a PostgreSQL store that outlives the run) must not meet the loop
/// guard. Below 2,000,000,000, so a run's ids stay valid (at most 2147483647) for 147 million jobs.
/// The stage stays 0: the simulator knows five stages.
pub(super) fn run_pipelines(tag: &str) -> u64 {
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, tag.as_bytes());
    let b = id.as_bytes();
    u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])) % 2_000_000_000
}

/// Every outcome of a phase must be a success: a phase whose jobs failed measured the wrong path.
pub(super) fn check_succeeded(delivery: &lapin::message::Delivery) -> Result<(), BenchError> {
    match delivery.routing_key.as_str() {
        "stage.retry.succeeded" => Ok(()),
        other => Err(fail(format!(
            "an outcome was {other}, not stage.retry.succeeded: {}",
            String::from_utf8_lossy(&delivery.data)
        ))),
    }
}

/// Job `i`'s idempotency key: spread over the key space as producers' message ids and derived
/// UUIDs are, so the store's index takes its writes at random places as it does in production.
pub(super) fn job_key(tag: &str, i: usize) -> String {
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, format!("{tag}-{i}").as_bytes());
    format!("{tag}-{id}")
}

/// Publishes jobs `range` with confirms in a window.
pub(super) async fn fill(
    channel: &Channel,
    queue: &str,
    range: std::ops::Range<usize>,
    tag: &str,
) -> Result<(), BenchError> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .bounded()
        .await?;
    let mut pending = std::collections::VecDeque::new();
    let base = run_pipelines(tag);
    for i in range {
        let body = format!(
            r#"{{"pipeline_id":{},"stage_index":0,"idempotency_key":"{}"}}"#,
            base + 1 + i as u64,
            job_key(tag, i)
        );
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .bounded()
            .await?;
        pending.push_back(confirm);
        if pending.len() >= 2048 {
            let confirm = pending.pop_front().expect("not empty");
            if !confirm.bounded().await?.is_ack() {
                return Err(fail("the broker refused a request"));
            }
        }
    }
    for confirm in pending {
        if !confirm.bounded().await?.is_ack() {
            return Err(fail("the broker refused a request"));
        }
    }
    Ok(())
}

/// Counts `n` outcomes on `queue`; returns jobs/s from the first to the last.
pub(super) async fn count_outcomes(
    broker: &Connection,
    queue: &str,
    n: usize,
) -> Result<f64, BenchError> {
    let channel = broker.create_channel().bounded().await?;
    channel
        .basic_qos(1000, BasicQosOptions::default())
        .bounded()
        .await?;
    let mut consumer = consume_outcomes(&channel, queue).await?;
    let mut first = None;
    for seen in 0..n {
        match tokio::time::timeout(Duration::from_secs(60), consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                check_succeeded(&delivery)?;
                first.get_or_insert_with(Instant::now);
            }
            _ => return Err(fail(format!("outcomes stopped after {seen} of {n}"))),
        }
    }
    let elapsed = first
        .map_or(Duration::ZERO, |f| f.elapsed())
        .as_secs_f64()
        .max(1e-9);
    let _ =
        tokio::time::timeout(Duration::from_secs(5), channel.close(200, "counted".into())).await;
    Ok((n.saturating_sub(1)) as f64 / elapsed)
}

/// A consumer of the outcomes on `queue`, acknowledged on delivery: the bench only reads them.
pub(super) async fn consume_outcomes(
    channel: &Channel,
    queue: &str,
) -> Result<Consumer, BenchError> {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .bounded()
        .await
}

/// Deletes a phase's queues and exchanges and closes its channel (bounded: a broker that stopped
/// answering leaves them behind rather than hanging the bench).
pub(super) async fn cleanup(channel: &Channel, config: &Config, results: &str) {
    let amqp = &config.amqp;
    let delete_all = async {
        for q in [
            amqp.request_queue.as_str(),
            amqp.dead_letter_queue.as_str(),
            results,
        ] {
            let _ = channel
                .queue_delete(q.into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [&amqp.dead_letter_exchange, &amqp.results_exchange] {
            let _ = channel
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        // Closed here, not left for the connection's close, which would log it as an error.
        let _ = channel.close(200, "phase done".into()).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), delete_all).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_has_keys_and_steps_of_its_own() {
        let (a, b) = (
            "swr.stage.bench.ppostgres.aaaaaa",
            "swr.stage.bench.ppostgres.bbbbbb",
        );
        assert_ne!(job_key(a, 7), job_key(b, 7));
        assert_eq!(
            job_key(a, 7),
            job_key(a, 7),
            "a redelivered job keeps its key"
        );
        assert_ne!(run_pipelines(a), run_pipelines(b));
        assert!(run_pipelines(a) + 1_000_000 <= i32::MAX as u64);
    }
}
