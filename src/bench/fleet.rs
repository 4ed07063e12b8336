//! `swr-stage-worker bench-fleet`: how a fleet of workers scales out, and what a broker cluster
//! costs one worker, measured in one run.
//!
//! 1. **Scale-out.** The simulator answers every call after `swr_delay` (200 ms by default), so
//!    the work is latency-bound, as it is against the real SWR: each worker process keeps
//!    `concurrency` jobs in flight, and n workers should drain a queue n times as fast. For each
//!    idempotency backend asked for: 1, 2, 3 … worker processes on one queue, each with its own
//!    embedded store file, or all sharing one PostgreSQL.
//! 2. **Replication** (with `single_url`): one worker at full speed (no delay, no store) against
//!    `amqp.url` (a cluster: its quorum queue is replicated to every node) and against one node
//!    alone. Their ratio is what the replication costs.
//!
//! Throughput runs from the first outcome to the last, as in `bench`, but the workers start
//! first and the queue is filled once all of them consume, so a fleet's staggered start-up is
//! not measured. Rounds are interleaved and the medians kept.

use std::path::PathBuf;
use std::time::Duration;

use lapin::Connection;

use swr_stage_worker::amqp::broker_urls;
use swr_stage_worker::config::{redact_url, Config, Secret};

use super::child::{spawn, worker_env};
use super::endpoint::fast_sim;
use super::queues::{cleanup, count_outcomes, fill, phase_config, prepare};
use super::{close_broker, connect_broker, fail, terminate, BenchError, Bounded};

/// What to measure.
#[derive(Clone, Debug, clap::Args)]
pub struct FleetOptions {
    /// Jobs per scale-out phase.
    #[arg(long, default_value_t = 3_000)]
    pub jobs: usize,
    /// Jobs in flight per worker (prefetch and worker.concurrency).
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// Fleet sizes (comma-separated); the first is the baseline of the ratios.
    #[arg(long, default_value = "1,2,3", value_delimiter = ',')]
    pub workers: Vec<usize>,
    /// Idempotency backends (comma-separated: off, embedded, postgres); postgres is shared
    /// by the fleet, embedded is a file per worker.
    #[arg(long, default_value = "embedded,postgres", value_delimiter = ',')]
    pub stores: Vec<String>,
    /// How long the simulator takes to answer in the scale-out phases.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub swr_delay: Duration,
    /// PostgreSQL for the postgres backend.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub postgres_url: String,
    /// Run every phase this many times and report medians.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// One broker node to compare amqp.url with: one worker at full speed on each.
    #[arg(long, value_name = "AMQP_URL")]
    pub single_url: Option<String>,
    /// Jobs per full-speed phase (with --single-url).
    #[arg(long, default_value_t = 20_000)]
    pub full_speed_jobs: usize,
}

/// One measured phase.
#[derive(Clone, Debug)]
pub struct FleetResult {
    /// "embedded", "postgres", "off".
    pub store: String,
    /// Worker processes.
    pub workers: usize,
    /// Which broker: "amqp.url" or "single node".
    pub broker: String,
    /// Median jobs per second over the rounds.
    pub jobs_per_sec: f64,
    /// Every round's figure, in round order.
    pub rounds: Vec<f64>,
}

/// Runs every phase, prints both tables, and returns the figures.
pub async fn run(base: Config, options: FleetOptions) -> Result<Vec<FleetResult>, BenchError> {
    check(&options)?;
    let slow = fast_sim(Some(options.swr_delay)).await?;
    let fast = fast_sim(None).await?;
    let cluster = connect_broker(&base.amqp, "swr-stage-worker.bench-fleet").await?;
    let brokers = broker_urls(&base.amqp.url);
    println!(
        "bench-fleet: amqp.url has {} node(s) ({}); SWR answers after {:?}; {} jobs in flight per worker",
        brokers.len(),
        brokers
            .iter()
            .map(|u| redact_url(u.expose()))
            .collect::<Vec<_>>()
            .join(", "),
        options.swr_delay,
        options.concurrency
    );
    let mut scale = scale_out(&cluster, &base, &slow.url(), &options).await?;
    let replication = match &options.single_url {
        Some(single) => replication(&cluster, &base, single, &fast.url(), &options).await?,
        None => Vec::new(),
    };
    print_tables(&scale, &replication, &options);
    close_broker(&cluster, "bench done").await;
    slow.shutdown().await;
    fast.shutdown().await;
    scale.extend(replication);
    Ok(scale)
}

/// Fleet sizes of at least one worker, and backends that exist.
fn check(options: &FleetOptions) -> Result<(), BenchError> {
    if options.workers.is_empty() || options.workers.contains(&0) {
        return Err(fail("--workers: fleet sizes of at least 1, e.g. 1,2,3"));
    }
    if let Some(bad) = options
        .stores
        .iter()
        .find(|s| !["off", "embedded", "postgres"].contains(&s.as_str()))
    {
        return Err(fail(format!(
            "--stores: {bad:?} is not a backend (off, embedded, postgres)"
        )));
    }
    Ok(())
}

/// Every store with every fleet size on `amqp.url`, against the slow simulator at `sim_url`.
async fn scale_out(
    cluster: &Connection,
    base: &Config,
    sim_url: &str,
    options: &FleetOptions,
) -> Result<Vec<FleetResult>, BenchError> {
    let mut scale: Vec<FleetResult> = Vec::new();
    for store in &options.stores {
        for &n in &options.workers {
            scale.push(FleetResult {
                store: store.clone(),
                workers: n,
                broker: "amqp.url".into(),
                jobs_per_sec: 0.0,
                rounds: Vec::new(),
            });
        }
    }
    for round in 1..=options.rounds.max(1) {
        for phase in scale.iter_mut() {
            let rate = fleet_phase(
                cluster,
                base,
                sim_url,
                Phase {
                    workers: phase.workers,
                    store: &phase.store,
                    jobs: options.jobs,
                    fill_first: false,
                },
                options,
            )
            .await?;
            println!(
                "round {round}: store {}, {} worker(s): {rate:.0} jobs/s",
                phase.store, phase.workers
            );
            phase.rounds.push(rate);
        }
    }
    for phase in scale.iter_mut() {
        phase.jobs_per_sec = median(&phase.rounds);
    }
    Ok(scale)
}

/// One worker at full speed (the fast simulator at `sim_url`, no store) on `amqp.url` and on
/// the node at `single`.
async fn replication(
    cluster: &Connection,
    base: &Config,
    single: &str,
    sim_url: &str,
    options: &FleetOptions,
) -> Result<Vec<FleetResult>, BenchError> {
    let mut single_base = base.clone();
    single_base.amqp.url = Secret::new(single);
    let single_broker = connect_broker(&single_base.amqp, "swr-stage-worker.bench-fleet").await?;
    let mut on_cluster = Vec::new();
    let mut on_single = Vec::new();
    for round in 1..=options.rounds.max(1) {
        // Alternating which goes first, so neither always inherits the other's cleanup.
        let order = if round % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for cluster_first in order {
            let (broker, config, figures) = if cluster_first {
                (cluster, base, &mut on_cluster)
            } else {
                (&single_broker, &single_base, &mut on_single)
            };
            let rate = fleet_phase(
                broker,
                config,
                sim_url,
                Phase {
                    workers: 1,
                    store: "off",
                    jobs: options.full_speed_jobs,
                    fill_first: true,
                },
                options,
            )
            .await?;
            figures.push(rate);
        }
        println!(
            "round {round}: one worker at full speed: amqp.url {:.0} jobs/s, single node {:.0} jobs/s",
            on_cluster[round - 1],
            on_single[round - 1]
        );
    }
    let replication = [("amqp.url", on_cluster), ("single node", on_single)]
        .into_iter()
        .map(|(broker, rounds)| FleetResult {
            store: "off".into(),
            workers: 1,
            broker: broker.into(),
            jobs_per_sec: median(&rounds),
            rounds,
        })
        .collect();
    close_broker(&single_broker, "bench done").await;
    Ok(replication)
}

/// The scale-out table and, when measured, the replication table.
fn print_tables(scale: &[FleetResult], replication: &[FleetResult], options: &FleetOptions) {
    println!();
    println!(
        "scale-out, medians over {} round(s) of {} jobs:",
        options.rounds.max(1),
        options.jobs
    );
    println!(
        "| store | workers | jobs/s | vs {} worker(s) |",
        options.workers[0]
    );
    println!("|---|---:|---:|---:|");
    for phase in scale {
        let baseline = scale
            .iter()
            .find(|p| p.store == phase.store && p.workers == options.workers[0])
            .map_or(f64::NAN, |p| p.jobs_per_sec);
        println!(
            "| {} | {} | {:.0} | {:.2} |",
            phase.store,
            phase.workers,
            phase.jobs_per_sec,
            phase.jobs_per_sec / baseline
        );
    }
    if let [clustered, single] = replication {
        println!();
        println!(
            "one worker at full speed (store off), medians of {} jobs:",
            options.full_speed_jobs
        );
        println!("| broker | jobs/s | vs single node |");
        println!("|---|---:|---:|");
        for phase in [clustered, single] {
            println!(
                "| {} | {:.0} | {:.2} |",
                phase.broker,
                phase.jobs_per_sec,
                phase.jobs_per_sec / single.jobs_per_sec
            );
        }
    }
}

/// What one phase runs.
struct Phase<'a> {
    /// Worker processes.
    workers: usize,
    /// Their idempotency backend.
    store: &'a str,
    /// Jobs to drain.
    jobs: usize,
    /// Fill the queue before the workers start (full speed) or once they all consume.
    fill_first: bool,
}

/// `phase.workers` worker processes drain `phase.jobs` jobs from one fresh queue; returns jobs/s.
async fn fleet_phase(
    broker: &Connection,
    base: &Config,
    sim_url: &str,
    phase: Phase<'_>,
    options: &FleetOptions,
) -> Result<f64, BenchError> {
    let Phase {
        workers,
        store,
        jobs,
        fill_first,
    } = phase;
    let config = phase_config(base, sim_url, &format!("f{store}{workers}"));
    // Latency-bound phases (`fill_first` false): the queue stays empty until every worker
    // consumes, or workers that start a few hundred milliseconds apart would make a short phase
    // measure their start-up; the filling (thousands a second) outruns the fleet. A full-speed
    // phase is filled first, so that the filling does not set its pace.
    let (channel, results) = prepare(broker, &config, if fill_first { jobs } else { 0 }).await?;
    let mut children = Vec::with_capacity(workers);
    let mut dirs: Vec<PathBuf> = Vec::with_capacity(workers);
    for i in 0..workers {
        // An embedded store file belongs to one process: each worker has its own.
        let dir = std::env::temp_dir().join(format!("{}.store{i}", config.amqp.request_queue));
        let mut env = worker_env(
            &config,
            sim_url,
            options.concurrency,
            store,
            &dir,
            &options.postgres_url,
        );
        env.insert(
            "SWR_STAGE_WORKER__AMQP__CONNECTION_NAME".into(),
            format!("{}.w{i}", config.amqp.connection_name),
        );
        dirs.push(dir);
        children.push(spawn(&["run"], env)?);
    }
    let counted = match consumers(&channel, &config.amqp.request_queue, workers).await {
        Ok(()) if fill_first => count_outcomes(broker, &results, jobs).await,
        Ok(()) => match fill(
            &channel,
            &config.amqp.request_queue,
            0..jobs,
            &config.amqp.request_queue,
        )
        .await
        {
            Ok(()) => count_outcomes(broker, &results, jobs).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    for child in &mut children {
        if let (Ok(None), Some(pid)) = (child.try_wait(), child.id()) {
            terminate(pid);
        }
    }
    for child in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }
    cleanup(&channel, &config, &results).await;
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    counted
}

/// Waits until `queue` has `n` consumers (every worker of the phase is up), for at most 60 s.
async fn consumers(channel: &lapin::Channel, queue: &str, n: usize) -> Result<(), BenchError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let declared = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .bounded()
            .await?;
        if declared.consumer_count() as usize >= n {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(fail(format!(
                "{} of {n} workers consuming after 60 s",
                declared.consumer_count()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn median(figures: &[f64]) -> f64 {
    let mut sorted = figures.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn the_median_is_the_middle_round() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[5.0]), 5.0);
        assert_eq!(median(&[]), 0.0);
    }
}
