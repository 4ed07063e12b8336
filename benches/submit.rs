//! Submit throughput: a 100,000-line campaign published with publisher confirms to a queue of
//! its own on the local RabbitMQ (AMQP_URL, default guest@127.0.0.1), through the same library
//! call as `swr-stage-worker submit`. Prints messages per second, then deletes what it declared.
//!
//! Run with `cargo bench --bench submit` (release build). No worker consumes the queue, so the
//! figure is the producer's: validation, keying, publishing and confirms.

use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};

use swr_stage_worker::amqp::connect;
use swr_stage_worker::campaign::input::InputSource;
use swr_stage_worker::campaign::progress::ProgressMode;
use swr_stage_worker::campaign::submit::{self, SubmitPlan};
use swr_stage_worker::config::Config;

/// Lines in the campaign file: the size the issue names.
const LINES: usize = 100_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let prefix = format!("bench.submit.{suffix}");
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let mut config =
        Config::load(None, [("AMQP_URL".to_owned(), url)]).expect("bench configuration");
    config.amqp.name_after(&prefix);

    let dir = std::env::temp_dir().join(&prefix);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("campaign.jsonl");
    let mut text = String::with_capacity(LINES * 80);
    for i in 0..LINES {
        let mode = if i % 10 == 0 {
            r#","mode":"rollback""#
        } else {
            ""
        };
        text.push_str(&format!(
            "{{\"pipeline_id\":{},\"stage_index\":{}{mode},\"metadata\":{{\"ticket\":\"OPS-{i}\"}}}}\n",
            100_000 + i,
            if mode.is_empty() { i % 4 } else { 4 },
        ));
    }
    std::fs::write(&file, text).expect("campaign file");

    let plan = SubmitPlan {
        campaign: Some(prefix.clone()),
        ..SubmitPlan::new(InputSource::File(file))
    };
    let started = Instant::now();
    let result = submit::submit(&config, &plan, ProgressMode::Hidden, std::future::pending())
        .await
        .expect("submit succeeds");
    let total = started.elapsed();
    let report = result.published.expect("published");

    cleanup(&config).await;
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(report.confirmed, LINES);
    println!(
        "submit: {LINES} messages confirmed in {:.2} s = {:.0} messages/s (publish + confirms, window {})",
        report.elapsed.as_secs_f64(),
        report.per_second(),
        plan.window
    );
    println!(
        "submit: whole command (read, validate, key, connect, declare, publish) {:.2} s = {:.0} lines/s",
        total.as_secs_f64(),
        LINES as f64 / total.as_secs_f64()
    );
}

/// Deletes every broker object the submit declared (topology::declare makes all four).
async fn cleanup(config: &Config) {
    let amqp = &config.amqp;
    let connection = connect(
        &amqp.url,
        &amqp.tls,
        &format!("{}.cleanup", amqp.connection_name),
        Duration::from_secs(10),
    )
    .await
    .expect("connect for cleanup");
    let channel = connection.create_channel().await.expect("channel");
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
    let _ = connection.close(200, "bench done".into()).await;
}
