//! `swr-stage-worker bench`: measures the worker against the bare broker path in one run.
//!
//! Every phase uses the same broker, the same simulator (fast mode: counters only), the same
//! number of jobs and the same prefetch, and its own freshly declared queues:
//! 1. the endpoint alone (is SWR's stand-in fast enough not to be the bottleneck?);
//! 2. the bare loop: consume, POST, publish a result with a confirm, ack, no job logic;
//! 3. the real worker binary (a child process) with each idempotency backend asked for.
//!
//! Throughput is measured on the outcome side (first to last result seen by a consumer), with
//! the queue filled before the consumer starts. Latency is measured separately, publishing at half
//! the worker's peak rate and timing each request from publish to outcome.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Semaphore;

pub mod fleet;

use crate::amqp::{connect, topology};
use crate::config::{AuthKind, Config, Secret};
use crate::sim::{SimConfig, SimHandle};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Jobs per phase.
    pub jobs: usize,
    /// Prefetch and worker concurrency.
    pub concurrency: u32,
    /// Idempotency backends to run the worker with ("off", "embedded", "postgres").
    pub stores: Vec<String>,
    /// PostgreSQL URL for the "postgres" backend.
    pub postgres_url: String,
    /// Also measure publish-to-outcome latency at half the peak rate.
    pub latency: bool,
    /// Publish the latency phase at this rate (jobs/s) instead of half the phase's peak.
    pub latency_rate: Option<f64>,
    /// How many times to run every phase (the median is reported).
    pub rounds: usize,
    /// Also run the store-off worker over TLS: this `amqps://` URL (the same broker).
    pub amqps: Option<String>,
    /// With `amqps`: the broker's CA (`amqp.tls.ca_file` of that phase's worker), or "".
    pub amqps_ca: String,
}

/// What one phase runs.
#[derive(Clone, Copy)]
enum PhaseKind<'a> {
    /// The bare consume-POST-publish-ack loop, the ceiling.
    Bare,
    /// The worker binary with this idempotency backend.
    Worker(&'a str),
    /// The worker binary without a store, connected over amqps.
    WorkerAmqps,
}

/// One phase's figures.
#[derive(Clone, Debug, Default)]
pub struct PhaseResult {
    /// Phase name.
    pub name: String,
    /// Jobs per second, first to last outcome.
    pub jobs_per_sec: f64,
    /// Worker peak resident memory, when the phase ran the worker binary.
    pub peak_rss_kib: Option<u64>,
    /// CPU time (user + system) the phase's process used per job, in microseconds.
    pub cpu_us_per_job: Option<f64>,
    /// CPU time a RabbitMQ on this machine used per job during the phase, when one was found.
    pub broker_cpu_us_per_job: Option<f64>,
    /// p50/p99 publish-to-outcome latency at half the peak rate, in milliseconds.
    pub latency_ms: Option<(f64, f64)>,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[error("bench: {0}")]
pub struct BenchError(String);

fn fail(e: impl std::fmt::Display) -> BenchError {
    BenchError(e.to_string())
}

/// Limit for any one call to the broker, the endpoint or a child task.
const NET_TIMEOUT: Duration = Duration::from_secs(120);

/// A bounded await: a broker or endpoint that stops answering fails the bench with a message
/// instead of hanging it.
trait Bounded<T>: std::future::Future + Sized {
    async fn bounded(self) -> Result<T, BenchError>;
}

impl<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>> Bounded<T> for F {
    async fn bounded(self) -> Result<T, BenchError> {
        match tokio::time::timeout(NET_TIMEOUT, self).await {
            Ok(result) => result.map_err(fail),
            Err(_) => Err(fail(format!("no answer within {NET_TIMEOUT:?}"))),
        }
    }
}

/// The token the benchmark's simulator accepts.
const TOKEN: &str = "bench-token";

/// Runs every phase and prints the table; returns the phases for callers that check figures.
pub async fn run(base: Config, options: BenchOptions) -> Result<Vec<PhaseResult>, BenchError> {
    let sim = fast_sim(None).await?;
    let broker = connect(
        &base.amqp.url,
        &base.amqp.tls,
        "swr-stage-worker.bench",
        Duration::from_secs(10),
    )
    .bounded()
    .await?;
    println!(
        "bench: {} jobs per phase, prefetch/concurrency {}, endpoint {}",
        options.jobs,
        options.concurrency,
        sim.url()
    );

    let endpoint = endpoint_rate(&sim.url(), options.jobs, options.concurrency as usize).await?;
    println!("endpoint alone: {endpoint:.0} requests/s");

    // Phases are interleaved round by round and each figure is the median over the rounds, so
    // a burst of other load on the machine does not decide a ratio. Each round starts one phase
    // later than the one before (bare, off, embedded; then off, embedded, bare; ...): a phase
    // that follows another inherits some of the broker's cleanup of it, and a fixed order would
    // hand that cost to the same phase every round.
    let kinds: Vec<PhaseKind> = std::iter::once(PhaseKind::Bare)
        .chain(options.stores.iter().map(|s| PhaseKind::Worker(s)))
        .chain(options.amqps.iter().map(|_| PhaseKind::WorkerAmqps))
        .collect();
    let amqps_base = options.amqps.as_ref().map(|url| {
        let mut config = base.clone();
        config.amqp.url = Secret::new(url.as_str());
        config.amqp.tls.ca_file = options.amqps_ca.clone();
        config
    });
    let mut rounds: Vec<Vec<PhaseResult>> = Vec::new();
    for round in 1..=options.rounds.max(1) {
        let mut slots: Vec<Option<PhaseResult>> = vec![None; kinds.len()];
        for step in 0..kinds.len() {
            let i = (step + round - 1) % kinds.len();
            slots[i] = Some(match (kinds[i], &amqps_base) {
                (PhaseKind::Bare, _) => bare_phase(&broker, &base, &sim.url(), &options).await?,
                (PhaseKind::Worker(store), _) => {
                    worker_phase(&broker, &base, &sim.url(), &options, store).await?
                }
                (PhaseKind::WorkerAmqps, Some(tls_base)) => {
                    let mut phase =
                        child_phase(&broker, tls_base, &sim.url(), &options, "off", &["run"])
                            .await?;
                    phase.name = "worker, store off, amqps".into();
                    phase
                }
                (PhaseKind::WorkerAmqps, None) => unreachable!("an amqps phase has its URL"),
            });
        }
        let phases: Vec<PhaseResult> = slots.into_iter().flatten().collect();
        let line: Vec<String> = phases
            .iter()
            .map(|p| {
                format!(
                    "{} {:.0}/s ({} µs CPU/job, broker {})",
                    p.name,
                    p.jobs_per_sec,
                    micros(p.cpu_us_per_job),
                    micros(p.broker_cpu_us_per_job)
                )
            })
            .collect();
        println!("round {round}: {}", line.join(", "));
        rounds.push(phases);
    }
    let results: Vec<PhaseResult> = (0..rounds[0].len())
        .map(|i| {
            let mut runs: Vec<&PhaseResult> = rounds.iter().map(|r| &r[i]).collect();
            runs.sort_by(|a, b| a.jobs_per_sec.total_cmp(&b.jobs_per_sec));
            let median = runs[runs.len() / 2].clone();
            PhaseResult {
                peak_rss_kib: runs.iter().filter_map(|r| r.peak_rss_kib).max(),
                latency_ms: runs.iter().rev().find_map(|r| r.latency_ms),
                ..median
            }
        })
        .collect();
    let bare = results[0].clone();

    println!();
    println!("medians over {} round(s):", rounds.len());
    println!(
        "| phase | jobs/s | vs bare | CPU µs/job | broker µs/job | peak RSS | p50 ms | p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        let (p50, p99) = r.latency_ms.map_or(("-".into(), "-".into()), |(a, b)| {
            (format!("{a:.1}"), format!("{b:.1}"))
        });
        println!(
            "| {} | {:.0} | {:.2} | {} | {} | {} | {p50} | {p99} |",
            r.name,
            r.jobs_per_sec,
            r.jobs_per_sec / bare.jobs_per_sec,
            micros(r.cpu_us_per_job),
            micros(r.broker_cpu_us_per_job),
            r.peak_rss_kib
                .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
        );
    }
    if let Some(off) = results.iter().position(|r| r.name == "worker, store off") {
        for (i, r) in results.iter().enumerate() {
            if !r.name.starts_with("worker, store") || i == off {
                continue;
            }
            let (low, high) = ratio_range(&rounds, i, off);
            println!(
                "{} / store off: {:.2} (rounds {low:.2}-{high:.2})",
                r.name,
                r.jobs_per_sec / results[off].jobs_per_sec
            );
        }
    }
    let fastest = results.iter().map(|r| r.jobs_per_sec).fold(0.0, f64::max);
    println!(
        "endpoint headroom: {:.1}x the fastest phase{}",
        endpoint / fastest,
        if endpoint < 2.0 * fastest {
            " (WARNING: the endpoint may be the bottleneck)"
        } else {
            ""
        }
    );
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        broker.close(200, "bench done".into()),
    )
    .await;
    sim.shutdown().await;
    Ok(results)
}

/// A fast-mode simulator (counters only) that answers after `delay`, if given.
async fn fast_sim(delay: Option<Duration>) -> Result<SimHandle, BenchError> {
    let sim = SimHandle::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            tokens: vec![TOKEN.into()],
            record: false,
            ..SimConfig::default()
        },
    )
    .bounded()
    .await?;
    if let Some(delay) = delay.filter(|d| !d.is_zero()) {
        sim.add_rule(crate::sim::FaultRule {
            delay_ms: Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
            ..crate::sim::FaultRule::default()
        });
    }
    Ok(sim)
}

/// POSTs `n` requests straight at the endpoint with `concurrency` in flight.
async fn endpoint_rate(url: &str, n: usize, concurrency: usize) -> Result<f64, BenchError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(fail)?;
    let slots = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = slots.clone().acquire_owned().bounded().await?;
        let (client, url) = (
            client.clone(),
            format!("{url}/v3/manage/pipelines/{}/stages/0?mode=retry", 1 + i),
        );
        tasks.spawn(async move {
            let ok = post(&client, &url, &format!("endpoint-{i}")).await;
            drop(permit);
            ok
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(fail)??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn post(client: &reqwest::Client, url: &str, key: &str) -> Result<(), BenchError> {
    let response = client
        .post(url)
        .header("X-Auth-Token", TOKEN)
        .header("Idempotency-Key", key)
        .header(reqwest::header::CONTENT_LENGTH, "0")
        .send()
        .bounded()
        .await?;
    if response.status().as_u16() != 201 {
        return Err(fail(format!("endpoint answered {}", response.status())));
    }
    response.bytes().bounded().await?;
    Ok(())
}

/// Names for one phase's queues and exchanges.
fn phase_config(base: &Config, sim_url: &str, tag: &str) -> Config {
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
async fn prepare(
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

/// Job `i`'s idempotency key: spread over the key space as producers' message ids and derived
/// UUIDs are, so the store's index takes its writes at random places as it does in production.
/// The first pipeline id of a run's jobs, from its key prefix: a step that ran in an earlier run
/// (within `guard.window`, in a PostgreSQL store that outlives the run) must not meet the loop
/// guard. Below 2,000,000,000, so a run's ids stay valid (at most 2147483647) for 147 million jobs.
/// The stage stays 0: the simulator knows five stages.
fn run_pipelines(tag: &str) -> u64 {
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, tag.as_bytes());
    let b = id.as_bytes();
    u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])) % 2_000_000_000
}

/// Every outcome of a phase must be a success: a phase whose jobs failed measured the wrong path.
fn check_succeeded(delivery: &lapin::message::Delivery) -> Result<(), BenchError> {
    match delivery.routing_key.as_str() {
        "stage.retry.succeeded" => Ok(()),
        other => Err(fail(format!(
            "an outcome was {other}, not stage.retry.succeeded: {}",
            String::from_utf8_lossy(&delivery.data)
        ))),
    }
}

fn job_key(tag: &str, i: usize) -> String {
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, format!("{tag}-{i}").as_bytes());
    format!("{tag}-{id}")
}

/// Publishes jobs `range` with confirms in a window.
async fn fill(
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
async fn count_outcomes(broker: &Connection, queue: &str, n: usize) -> Result<f64, BenchError> {
    let channel = broker.create_channel().bounded().await?;
    channel
        .basic_qos(1000, BasicQosOptions::default())
        .bounded()
        .await?;
    let mut consumer = channel
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
        .await?;
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

/// Deletes a phase's queues and exchanges and closes its channel (bounded: a broker that stopped
/// answering leaves them behind rather than hanging the bench).
async fn cleanup(channel: &Channel, config: &Config, results: &str) {
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

/// The bare loop phase: the same queues and endpoint, driven by [`bare_loop`] in a child
/// process, exactly as the worker phases run the worker binary.
async fn bare_phase(
    broker: &Connection,
    base: &Config,
    sim_url: &str,
    options: &BenchOptions,
) -> Result<PhaseResult, BenchError> {
    // With latency on, the loop also answers the latency phase's jobs.
    let jobs = options.jobs
        + if options.latency {
            latency_jobs(options)
        } else {
            0
        };
    child_phase(
        broker,
        base,
        sim_url,
        options,
        "bare",
        &["bench-bare-loop", "--jobs", &jobs.to_string()],
    )
    .await
}

/// The bare loop (run by the hidden `bench-bare-loop` command): consume with prefetch =
/// `worker.concurrency`, POST with the same HTTP client settings, publish a result with a confirm,
/// ack. No validation, no store, no outcome building, no logging.
pub async fn bare_loop(config: Config, jobs: usize) -> Result<(), BenchError> {
    let broker = connect(
        &config.amqp.url,
        &config.amqp.tls,
        &config.amqp.connection_name,
        Duration::from_secs(10),
    )
    .bounded()
    .await?;
    let consume = broker.create_channel().bounded().await?;
    consume
        .basic_qos(config.worker.concurrency as u16, BasicQosOptions::default())
        .bounded()
        .await?;
    let publish = broker.create_channel().bounded().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .bounded()
        .await?;
    let client = crate::swr::client::SwrClient::new(
        &config.swr.endpoint,
        &config.http,
        config.http.client_config().map_err(fail)?,
    )
    .map_err(fail)?;
    let token = config.swr.auth.token.clone();
    let mut deliveries = consume
        .basic_consume(
            config.amqp.request_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .bounded()
        .await?;
    let exchange: Arc<str> = config.amqp.results_exchange.as_str().into();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..jobs {
        let delivery = tokio::time::timeout(NET_TIMEOUT, deliveries.next())
            .await
            .map_err(|_| fail(format!("no request delivered within {NET_TIMEOUT:?}")))?
            .ok_or_else(|| fail("consumer ended"))?
            .map_err(fail)?;
        let (client, publish, exchange, token) = (
            client.clone(),
            publish.clone(),
            exchange.clone(),
            token.clone(),
        );
        tasks.spawn(async move {
            let url = format!(
                "{}/v3/manage/pipelines/{}/stages/0?mode=retry",
                client.endpoint(),
                i + 1
            );
            // A connection the endpoint closed as a request left (keep-alive race) is tried
            // again, as the worker's retry would; the loop must not die of a rare reset.
            let key = format!("bare-{i}");
            // The same headers as the worker's attempts send.
            let trace = crate::trace::TraceContext::root();
            let mut reply = client.attempt(&url, &key, &token, &trace).await;
            for _ in 0..2 {
                if reply.is_ok() {
                    break;
                }
                reply = client.attempt(&url, &key, &token, &trace).await;
            }
            let reply = reply.map_err(fail)?;
            if reply.status != 201 {
                return Err(fail(format!("endpoint answered {}", reply.status)));
            }
            let result = format!(r#"{{"pipeline_id":{},"status":"succeeded"}}"#, i + 1);
            let mut properties = BasicProperties::default().with_delivery_mode(2);
            if let Some(id) = delivery.properties.correlation_id() {
                properties = properties.with_correlation_id(id.clone());
            }
            let confirm = publish
                .basic_publish(
                    exchange.as_ref().into(),
                    "stage.retry.succeeded".into(),
                    BasicPublishOptions::default(),
                    result.as_bytes(),
                    properties,
                )
                .bounded()
                .await?
                .bounded()
                .await?;
            if !confirm.is_ack() {
                return Err(fail("result nacked"));
            }
            delivery.ack(BasicAckOptions::default()).bounded().await?;
            Ok::<(), BenchError>(())
        });
        while let Some(done) = tasks.try_join_next() {
            done.map_err(fail)??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(fail)??;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), broker.close(200, "done".into())).await;
    Ok(())
}

/// The worker binary with one idempotency backend.
async fn worker_phase(
    broker: &Connection,
    base: &Config,
    sim_url: &str,
    options: &BenchOptions,
    store: &str,
) -> Result<PhaseResult, BenchError> {
    let mut phase = child_phase(broker, base, sim_url, options, store, &["run"]).await?;
    phase.name = format!("worker, store {store}");
    Ok(phase)
}

/// Runs this binary with `args` as a child on fresh queues filled with the jobs, counts the
/// outcomes, reads its peak memory, then stops it and cleans up.
async fn child_phase(
    broker: &Connection,
    base: &Config,
    sim_url: &str,
    options: &BenchOptions,
    store: &str,
    args: &[&str],
) -> Result<PhaseResult, BenchError> {
    let tag = format!("p{store}");
    let config = phase_config(base, sim_url, &tag);
    let (channel, results) = prepare(broker, &config, options.jobs).await?;
    let store_dir = std::env::temp_dir().join(format!("{}.store", config.amqp.request_queue));
    let env = worker_env(
        &config,
        sim_url,
        options.concurrency,
        store,
        &store_dir,
        &options.postgres_url,
    );
    // The broker is still writing the jobs just published (and may be cleaning up the phase
    // before): the phase starts once it is quiet, so it pays for its own work only.
    let broker_pid = crate::amqp::broker_urls(&config.amqp.url)
        .first()
        .and_then(|url| local_broker_pid(url.expose()));
    if let Some(pid) = broker_pid {
        settle(pid).await;
    }
    let exe = std::env::current_exe().map_err(fail)?;
    let mut child = tokio::process::Command::new(exe)
        .args(args)
        .envs(env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(fail)?;
    let pid = child.id().ok_or_else(|| fail("the child exited at once"))?;
    // The broker shares the cores: its CPU per job says how much of a phase's cost is its.
    // It covers the whole phase (the child's start, the bench's own outcome consumer, and
    // whatever the broker spends per second rather than per message).
    let broker_before = broker_pid.and_then(cpu_seconds);
    let mut counted = count_outcomes(broker, &results, options.jobs).await;
    let broker_cpu_us_per_job = broker_before
        .zip(broker_pid.and_then(cpu_seconds))
        .filter(|(before, after)| after >= before)
        .map(|(before, after)| (after - before) * 1e6 / options.jobs as f64);
    let peak_rss_kib = peak_rss(pid);
    let cpu_us_per_job = cpu_seconds(pid).map(|s| s * 1e6 / options.jobs as f64);
    let mut latency_ms = None;
    if options.latency {
        if let Ok(rate) = &counted {
            match latency(
                broker,
                &config,
                &results,
                options.latency_rate.unwrap_or(*rate / 2.0),
                latency_jobs(options),
                &tag,
            )
            .await
            {
                Ok(figures) => latency_ms = Some(figures),
                Err(e) => counted = Err(e),
            }
        }
    }
    // A phase whose process died says so, instead of only that its outcomes stopped.
    let exited = match &counted {
        Err(_) => child.try_wait().ok().flatten(),
        Ok(_) => None,
    };
    if let (Err(e), Some(status)) = (&counted, exited) {
        counted = Err(fail(format!("{e} (the phase's process exited: {status})")));
    }
    // Only a child still running is signalled: an exited one was reaped, and its pid may be
    // another process's by now.
    if exited.is_none() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }
    cleanup(&channel, &config, &results).await;
    let _ = std::fs::remove_dir_all(&store_dir);
    Ok(PhaseResult {
        name: "bare loop".into(),
        jobs_per_sec: counted?,
        peak_rss_kib,
        cpu_us_per_job,
        broker_cpu_us_per_job,
        latency_ms,
    })
}

/// The environment of a worker child: the phase's names, broker and TLS settings, the
/// simulator, `concurrency`, and the idempotency backend `store` ("bare" runs without one) with
/// its file under `store_dir` or its PostgreSQL at `postgres_url`.
fn worker_env(
    config: &Config,
    sim_url: &str,
    concurrency: u32,
    store: &str,
    store_dir: &std::path::Path,
    postgres_url: &str,
) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = config.amqp.names_env().into_iter().collect();
    env.insert("AMQP_URL".into(), config.amqp.url.expose().to_owned());
    let tls = &config.amqp.tls;
    for (key, value) in [
        ("CA_FILE", &tls.ca_file),
        ("CLIENT_CERT_FILE", &tls.client_cert_file),
        ("CLIENT_KEY_FILE", &tls.client_key_file),
        ("SERVER_NAME", &tls.server_name),
    ] {
        if !value.is_empty() && config.amqp.url.expose().starts_with("amqps://") {
            env.insert(format!("SWR_STAGE_WORKER__AMQP__TLS__{key}"), value.clone());
        }
    }
    env.insert("SWR_ENDPOINT".into(), sim_url.to_owned());
    env.insert("SWR_AUTH_TOKEN".into(), TOKEN.to_owned());
    env.insert(
        "SWR_STAGE_WORKER__WORKER__CONCURRENCY".into(),
        concurrency.to_string(),
    );
    env.insert(
        "SWR_STAGE_WORKER__IDEMPOTENCY__BACKEND".into(),
        if store == "bare" {
            "off".into()
        } else {
            store.to_owned()
        },
    );
    env.insert(
        "SWR_STAGE_WORKER__IDEMPOTENCY__PATH".into(),
        store_dir.join("idempotency.db").display().to_string(),
    );
    env.insert(
        "SWR_STAGE_WORKER__IDEMPOTENCY__URL".into(),
        postgres_url.to_owned(),
    );
    // Every run's keys are new, so a shared PostgreSQL would keep each run's rows for the default
    // 7 days; an hour lets later workers' pruning take them.
    env.insert("SWR_STAGE_WORKER__IDEMPOTENCY__TTL".into(), "1h".into());
    // A port of its own: a worker already running here (on the default 9464) must not make
    // the phase's worker fail to start.
    env.insert(
        "SWR_STAGE_WORKER__TELEMETRY__LISTEN".into(),
        "127.0.0.1:0".into(),
    );
    env
}

/// CPU time (user + system) a process has used so far, in seconds (10 ms steps), from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Clock ticks of USER_HZ, which Linux fixes at 100 for user space.
    Some(ticks as f64 / 100.0)
}

/// Waits until process `pid` uses under a tenth of a core over half a second (it is done with
/// earlier work), for at most 15 s.
async fn settle(pid: u32) {
    const WINDOW: Duration = Duration::from_millis(500);
    let deadline = Instant::now() + Duration::from_secs(15);
    let Some(mut before) = cpu_seconds(pid) else {
        return;
    };
    while Instant::now() < deadline {
        tokio::time::sleep(WINDOW).await;
        let Some(now) = cpu_seconds(pid) else { return };
        if now - before < WINDOW.as_secs_f64() / 10.0 {
            return;
        }
        before = now;
    }
    println!("(the broker stayed busy for 15 s before a phase; its figures may be low)");
}

/// A figure in whole microseconds, or "-" when it was not measured.
fn micros(us: Option<f64>) -> String {
    us.map_or("-".into(), |us| format!("{us:.0}"))
}

/// The RabbitMQ server of `amqp_url` when it runs on this machine: the one Erlang VM started
/// with `-s rabbit boot` (CLI tools such as `rabbitmq-diagnostics` run a `beam.smp` of their own).
/// None for a remote broker, or when there is no such process or more than one.
fn local_broker_pid(amqp_url: &str) -> Option<u32> {
    let uri = amqp_url.parse::<lapin::uri::AMQPUri>().ok()?;
    if !matches!(
        uri.authority.host.as_str(),
        "localhost" | "127.0.0.1" | "::1" | "[::1]"
    ) {
        return None;
    }
    let servers = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let server = args
                .windows(3)
                .any(|w| w == [&b"-s"[..], &b"rabbit"[..], &b"boot"[..]]);
            (comm.trim_end() == "beam.smp" && server).then_some(pid)
        });
    let servers: Vec<u32> = servers.collect();
    match servers[..] {
        [pid] => Some(pid),
        // Several nodes on this machine (a second one for RabbitMQ 4.x, say): the one that
        // listens on the URL's port.
        _ => {
            let sockets = listening_sockets(uri.authority.port);
            servers
                .into_iter()
                .find(|pid| owns_any_socket(*pid, &sockets))
        }
    }
}

/// The inodes of the TCP sockets listening on `port` (IPv4 and IPv6), from /proc/net.
fn listening_sockets(port: u16) -> Vec<String> {
    const LISTEN: &str = "0A";
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields.get(1)?.rsplit(':').next()?;
                    let listening = *fields.get(3)? == LISTEN;
                    (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                        .then(|| fields.get(9).map(|inode| (*inode).to_owned()))
                        .flatten()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether process `pid` holds one of the socket `inodes`.
fn owns_any_socket(pid: u32, inodes: &[String]) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            inodes
                .iter()
                .any(|inode| target == format!("socket:[{inode}]"))
        })
    })
}

/// The lowest and highest ratio of phase `i` to phase `base` within one round: how far a
/// single round can stray from the medians.
fn ratio_range(rounds: &[Vec<PhaseResult>], i: usize, base: usize) -> (f64, f64) {
    rounds
        .iter()
        .map(|round| round[i].jobs_per_sec / round[base].jobs_per_sec)
        .fold((f64::INFINITY, 0.0), |(low, high), r| {
            (low.min(r), high.max(r))
        })
}

/// Jobs published in a latency phase.
fn latency_jobs(options: &BenchOptions) -> usize {
    options.jobs.min(10_000)
}

/// Peak resident set (VmHWM) of a process, from /proc.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Publishes `n` jobs at `rate`/s and measures each one's publish-to-outcome time.
async fn latency(
    broker: &Connection,
    config: &Config,
    results: &str,
    rate: f64,
    n: usize,
    tag: &str,
) -> Result<(f64, f64), BenchError> {
    let channel = broker.create_channel().bounded().await?;
    let mut consumer = channel
        .basic_consume(
            results.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .bounded()
        .await?;
    let sent: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let publisher = {
        let (sent, queue, tag) = (
            sent.clone(),
            config.amqp.request_queue.clone(),
            format!("{}-lat", config.amqp.request_queue),
        );
        let channel = broker.create_channel().bounded().await?;
        // Confirmed, and kept open until every publish is: a channel closes when its last
        // handle drops, and that close can overtake the last publishes still queued in lapin
        // (the phase then waited for outcomes of requests that never reached the queue).
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .bounded()
            .await?;
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
        // Matched on correlation_id, which the worker (contract §4) and the bare loop both copy
        // from the request.
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

    fn phase(jobs_per_sec: f64) -> PhaseResult {
        PhaseResult {
            jobs_per_sec,
            ..PhaseResult::default()
        }
    }

    #[test]
    fn the_local_broker_is_the_node_that_listens_on_the_urls_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sockets = listening_sockets(port);
        assert_eq!(sockets.len(), 1, "this process listens on {port}");
        assert!(owns_any_socket(std::process::id(), &sockets));
        assert!(!owns_any_socket(std::process::id(), &["0".to_owned()]));
        drop(listener);
    }

    #[test]
    fn a_remote_broker_has_no_local_process_to_measure() {
        assert_eq!(
            local_broker_pid("amqp://guest:guest@broker.example:5672/%2f"),
            None
        );
        assert_eq!(local_broker_pid("not a url"), None);
    }

    #[test]
    fn the_ratio_range_is_taken_within_each_round() {
        // Phase 2 against phase 1, round by round: 0.5, 0.9 and 0.8.
        let rounds = vec![
            vec![phase(100.0), phase(200.0), phase(100.0)],
            vec![phase(100.0), phase(100.0), phase(90.0)],
            vec![phase(100.0), phase(150.0), phase(120.0)],
        ];
        let (low, high) = ratio_range(&rounds, 2, 1);
        assert!(
            (low - 0.5).abs() < 1e-9 && (high - 0.9).abs() < 1e-9,
            "{low} {high}"
        );
    }
}
