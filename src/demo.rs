//! `swr-stage-worker demo`: the newcomer's first command. Runs the simulator and a worker in this
//! process against the local RabbitMQ and submits a small campaign of sample lines (retries,
//! rollbacks, transient faults, invalid lines) through the same code as `submit --wait`, so the
//! newcomer sees exactly the progress, summary and failures file an operator sees.
//!
//! It uses its own uniquely named queues and exchanges and deletes them at the end, so it never
//! touches a real deployment's topology on the same broker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Channel, Connection};
use serde_json::json;

use crate::amqp::connect;
use crate::campaign;
use crate::campaign::input::{self, InputFormat, InputSource};
use crate::campaign::progress::ProgressMode;
use crate::campaign::submit::{self, SubmitPlan, SubmitResult};
use crate::campaign::CampaignError;
use crate::config::{AuthKind, Config, Secret};
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

/// The sample workload as JSON Lines: what an operator would paste into a campaign file.
fn sample_lines(count: usize) -> String {
    let mut lines = String::with_capacity(count * 80);
    for i in 0..count {
        let line = match i % 40 {
            // Invalid lines: reported with their line number and left out (--skip-invalid).
            7 => r#"{"pipeline_id": 1001, "stage_index": 1,"#.to_owned(),
            17 => json!({"pipeline_id": 1002, "stage_index": 1, "mdoe": "rollback"}).to_string(),
            27 => json!({"pipeline_id": 0, "stage_index": 1}).to_string(),
            // Rollback of a non-deploy step: SWR answers 400.
            11 => json!({"pipeline_id": 2000 + i, "stage_index": 1, "mode": "rollback"}).to_string(),
            // Rollbacks of the deploy step (the last of 5).
            n if n % 5 == 0 => json!({"pipeline_id": 3000 + i, "stage_index": 4, "mode": "rollback"}).to_string(),
            // Pipelines hit by an outage (503 twice, then fine) and by throttling (429 + Retry-After).
            9 => json!({"pipeline_id": 9000 + (i / 40) % 5, "stage_index": 2, "idempotency_key": format!("demo-outage-{i}")}).to_string(),
            18 => json!({"pipeline_id": 9005 + (i / 40) % 5, "stage_index": 2, "idempotency_key": format!("demo-throttled-{i}")}).to_string(),
            _ => json!({"pipeline_id": 4000 + i, "stage_index": i % 5, "metadata": {"ticket": format!("OPS-{i}")}}).to_string(),
        };
        lines.push_str(&line);
        lines.push('\n');
    }
    lines
}

/// Runs the demo end to end: a small campaign submitted with `--wait --skip-invalid`, shown with
/// the same progress and summary an operator sees.
pub async fn run(base: Config, count: usize) -> Result<(), DemoError> {
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let prefix = format!("swr.stage.demo.{suffix}");
    let probe = connect_probe(&base, &prefix).await?;
    let sim = start_sim().await?;
    // A throw-away store, so repeated demos start fresh and leave nothing behind.
    let store_dir = std::env::temp_dir().join(format!("{prefix}.store"));
    let config = demo_config(base, &sim.url(), &prefix, &store_dir)?;

    // The campaign tools' bounded channel and declare (limit: amqp.confirm_timeout).
    let limit = config.amqp.confirm_timeout;
    let channel = campaign::open_channel(&probe, &config)
        .await
        .map_err(other)?;
    campaign::declare_topology(&channel, &config.amqp, limit)
        .await
        .map_err(other)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(service::run(config.clone(), async {
        let _ = stopped.await;
    }));

    let campaign = format!("demo-{suffix}");
    println!(
        "demo: simulator at {}, worker consuming {prefix}.requests",
        sim.url()
    );
    println!("demo: campaign {campaign}: {count} sample lines (retries, rollbacks, an outage, throttling, invalid lines)");
    println!("demo: the same as `swr-stage-worker submit sample.jsonl --campaign {campaign} --skip-invalid --wait`\n");
    let failures = store_dir.join("failures.jsonl");
    std::fs::create_dir_all(&store_dir).map_err(other)?;
    let result = submit_sample(&config, campaign, count, failures.clone()).await;
    let _ = stop.send(());
    let _ = worker.await;
    if let Ok(text) = std::fs::read_to_string(&failures) {
        println!("\nfirst lines of failures.jsonl (fix them and submit the file again):");
        for line in text.lines().take(3) {
            println!("  {line}");
        }
    }
    println!("SWR executions (simulator): {}", sim.stats().executions);
    // Bounded: a broker that stopped answering leaves the demo's objects behind, nothing worse.
    let _ = tokio::time::timeout(limit, cleanup(&channel, &config)).await;
    let _ = tokio::time::timeout(limit, probe.close(200, "demo done".into())).await;
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&store_dir);
    let summary = result.map_err(other)?.summary.unwrap_or_default();
    if summary.missing() > 0 {
        return Err(other(format!(
            "only {} of {} outcomes arrived",
            summary.received,
            summary.expected.unwrap_or_default()
        )));
    }
    Ok(())
}

/// The demo's own connection, which also tells a newcomer without a broker how to start one.
async fn connect_probe(base: &Config, prefix: &str) -> Result<Connection, DemoError> {
    let url = &base.amqp.url;
    connect(
        url,
        &base.amqp.tls,
        &format!("{prefix}.demo"),
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| DemoError::NoBroker {
        url: crate::amqp::redact_urls(url),
        reason: e
            .to_string()
            .rsplit(": ")
            .next()
            .unwrap_or_default()
            .to_owned(),
    })
}

/// The simulator, with an outage (503 ten times) on pipelines 9000-9004 and throttling (429 with
/// Retry-After, twice) on 9005-9009.
async fn start_sim() -> Result<SimHandle, DemoError> {
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
    Ok(sim)
}

/// `base` pointed at the simulator, on the demo's own names, with its store under `store_dir`.
fn demo_config(
    base: Config,
    sim_url: &str,
    prefix: &str,
    store_dir: &Path,
) -> Result<Config, DemoError> {
    let mut config = base;
    config.swr.endpoint = sim_url.to_owned();
    config.swr.auth.token = Secret::new(DEMO_TOKEN);
    // The in-process simulator takes this fixed token, whatever the configured token source.
    config.swr.auth.kind = AuthKind::Static;
    config.amqp.name_after(prefix);
    config.retry.initial_interval = Duration::from_millis(100);
    config.worker.id = "demo-worker".to_owned();
    // A demo must not collide with a real worker's telemetry port on the same host.
    config.telemetry.listen = String::new();
    config.idempotency.path = store_dir.join("idempotency.db").display().to_string();
    config.validate().map_err(other)?;
    Ok(config)
}

/// Submits `count` sample lines as `campaign` with `--skip-invalid --wait`, failures to
/// `failures`.
async fn submit_sample(
    config: &Config,
    campaign: String,
    count: usize,
    failures: PathBuf,
) -> Result<SubmitResult, CampaignError> {
    let parsed = input::parse_input(
        "sample.jsonl",
        sample_lines(count).as_bytes(),
        InputFormat::JsonLines,
        &campaign,
        config.limits.max_message_bytes,
    );
    let plan = SubmitPlan {
        skip_invalid: true,
        wait: true,
        timeout: Some(DEMO_DEADLINE),
        failures,
        ..SubmitPlan::new(InputSource::File("sample.jsonl".into()))
    };
    submit::submit_parsed(
        config,
        &plan,
        campaign,
        parsed,
        ProgressMode::for_stderr(),
        std::future::pending(),
    )
    .await
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
