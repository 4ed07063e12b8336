//! Latency: requests published at a fixed rate, each timed from its publish to its outcome
//! (matched on correlation_id, which the worker (contract §4) and the bare loop both copy from
//! the request).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};
use tokio::task::JoinHandle;

use swr_stage_worker::config::Config;

use super::phases::BenchOptions;
use super::queues::{check_succeeded, consume_outcomes, job_key, run_pipelines};
use super::{fail, BenchError, Bounded};

/// When each request in flight was published, by its key.
type Sent = Arc<Mutex<HashMap<String, Instant>>>;

/// Jobs published in a latency phase.
pub(super) fn latency_jobs(options: &BenchOptions) -> usize {
    options.jobs.min(10_000)
}

/// Publishes `n` jobs at `rate`/s and measures each one's publish-to-outcome time; returns the
/// p50 and p99 in milliseconds.
pub(super) async fn latency(
    broker: &Connection,
    config: &Config,
    results: &str,
    rate: f64,
    n: usize,
    tag: &str,
) -> Result<(f64, f64), BenchError> {
    let channel = broker.create_channel().bounded().await?;
    let mut consumer = consume_outcomes(&channel, results).await?;
    let sent: Sent = Arc::default();
    let publisher = {
        let channel = broker.create_channel().bounded().await?;
        // Confirmed, and kept open until every publish is: a channel closes when its last
        // handle drops, and that close can overtake the last publishes still queued in lapin
        // (the phase then waited for outcomes of requests that never reached the queue).
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .bounded()
            .await?;
        publish_at_rate(channel, &config.amqp.request_queue, rate, n, sent.clone())
    };
    let mut samples = Vec::with_capacity(n);
    while samples.len() < n {
        let delivery = match tokio::time::timeout(Duration::from_secs(60), consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            _ => {
                return Err(fail(format!(
                    "latency phase of {tag}: outcomes stopped after {} of {n}",
                    samples.len()
                )))
            }
        };
        let arrived = Instant::now();
        check_succeeded(&delivery)?;
        if let Some(at) = delivery
            .properties
            .correlation_id()
            .as_ref()
            .and_then(|k| sent.lock().expect("lock").remove(k.as_str()))
        {
            samples.push(arrived.duration_since(at).as_secs_f64() * 1000.0);
        }
    }
    publisher.bounded().await??;
    let _ = tokio::time::timeout(Duration::from_secs(5), channel.close(200, "done".into())).await;
    samples.sort_by(f64::total_cmp);
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Ok((pick(0.50), pick(0.99)))
}

/// A task that publishes `n` jobs to `queue` at `rate`/s on a confirmed `channel`, noting when
/// each went in `sent`, then waits for the confirms.
fn publish_at_rate(
    channel: Channel,
    queue: &str,
    rate: f64,
    n: usize,
    sent: Sent,
) -> JoinHandle<Result<(), BenchError>> {
    let (queue, tag) = (queue.to_owned(), format!("{queue}-lat"));
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let base = run_pipelines(&tag);
        for i in 0..n {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
            let key = job_key(&tag, i);
            let body = format!(
                r#"{{"pipeline_id":{},"stage_index":0,"idempotency_key":"{key}"}}"#,
                base + 1 + i as u64
            );
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_correlation_id(key.as_str().into());
            sent.lock().expect("lock").insert(key, Instant::now());
            let _ = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties,
                )
                .await;
        }
        channel.wait_for_confirms().bounded().await.map(drop)
    })
}
