//! `bench`: the worker against the bare broker path, in one run.
//!
//! Every phase uses the same broker, the same simulator (fast mode: counters only), the same
//! number of jobs and the same prefetch, and its own freshly declared queues:
//! 1. the endpoint alone (is SWR's stand-in fast enough not to be the bottleneck?);
//! 2. the bare loop: consume, POST, publish a result with a confirm, ack, no job logic;
//! 3. the real worker binary (a child process) with each idempotency backend asked for;
//! 4. with `--amqps`, the store-off worker over TLS;
//! 5. with `--otlp`, the store-off worker exporting its spans (OTLP/HTTP) to a receiver here that
//!    discards them.
//!
//! Throughput is measured on the outcome side (first to last result seen by a consumer), with
//! the queue filled before the consumer starts. Latency is measured separately, publishing at half
//! the worker's peak rate and timing each request from publish to outcome.

use lapin::Connection;

use swr_stage_worker::config::{Config, Secret};

use super::child::{child_phase, Child};
use super::collector::DiscardingCollector;
use super::endpoint::{endpoint_rate, fast_sim};
use super::latency::latency_jobs;
use super::{close_broker, connect_broker, report, BenchError};

/// What to measure.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchOptions {
    /// Jobs per phase.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Prefetch and worker concurrency.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// Idempotency backends to measure the worker with (comma-separated: off, embedded, postgres).
    #[arg(long, default_value = "off,embedded,postgres", value_delimiter = ',')]
    pub stores: Vec<String>,
    /// PostgreSQL for the postgres backend.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub postgres_url: String,
    /// Also measure publish-to-outcome latency at half of each worker phase's peak rate.
    #[arg(long)]
    pub latency: bool,
    /// With --latency: publish at this many jobs/s in every phase instead, to compare
    /// latencies at one load.
    #[arg(long, value_name = "JOBS_PER_SEC", requires = "latency", value_parser = crate::positive_rate)]
    pub latency_rate: Option<f64>,
    /// Run every phase this many times, interleaved, and report medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Also run the store-off worker over TLS (amqps) on the same broker, to compare with
    /// plain AMQP.
    #[arg(long)]
    pub amqps: bool,
    /// The broker's TLS address for --amqps.
    #[arg(long, default_value = "amqps://guest:guest@localhost:5671/%2f")]
    pub amqps_url: String,
    /// PEM file of the CA that signed the broker's certificate, for --amqps.
    #[arg(long, value_name = "PEM", default_value = "")]
    pub amqps_ca: String,
    /// Also run the store-off worker with span export on (OTLP/HTTP to a receiver in this
    /// process that accepts and discards), to compare with export off.
    #[arg(long)]
    pub otlp: bool,
}

/// One phase's figures.
#[derive(Clone, Debug, Default)]
pub struct PhaseResult {
    /// Phase name.
    pub name: String,
    /// Jobs per second, first to last outcome.
    pub jobs_per_sec: f64,
    /// Child process peak resident memory (the worker's or the bare loop's).
    pub peak_rss_kib: Option<u64>,
    /// CPU time (user + system) the phase's process used per job, in microseconds.
    pub cpu_us_per_job: Option<f64>,
    /// CPU time a RabbitMQ on this machine used per job during the phase, when one was found.
    pub broker_cpu_us_per_job: Option<f64>,
    /// p50/p99 publish-to-outcome latency at half the peak rate, in milliseconds.
    pub latency_ms: Option<(f64, f64)>,
}

/// One phase of a round. A new phase is a variant here, its place in [`Phase::list`], its name
/// and how it runs in [`Phase::run`].
#[derive(Clone, Debug)]
enum Phase {
    /// The bare consume-POST-publish-ack loop, the ceiling.
    Bare,
    /// The worker binary with this idempotency backend.
    Worker(String),
    /// The worker binary without a store, connected over amqps.
    WorkerAmqps,
    /// The worker binary without a store, exporting its spans over OTLP.
    WorkerOtlp,
}

impl Phase {
    /// The phases `options` ask for, in the first round's order; the bare loop comes first
    /// (the table's ratios are to it).
    fn list(options: &BenchOptions) -> Vec<Phase> {
        std::iter::once(Phase::Bare)
            .chain(options.stores.iter().cloned().map(Phase::Worker))
            .chain(options.amqps.then_some(Phase::WorkerAmqps))
            .chain(options.otlp.then_some(Phase::WorkerOtlp))
            .collect()
    }

    /// The name in the round lines and the table.
    fn name(&self) -> String {
        match self {
            Phase::Bare => "bare loop".into(),
            Phase::Worker(store) => format!("worker, store {store}"),
            Phase::WorkerAmqps => "worker, store off, amqps".into(),
            Phase::WorkerOtlp => "worker, store off, otlp export".into(),
        }
    }

    async fn run(&self, bench: &Bench<'_>) -> Result<PhaseResult, BenchError> {
        let options = bench.options;
        let child = match self {
            Phase::Bare => {
                // With latency on, the loop also answers the latency phase's jobs.
                let jobs = options.jobs
                    + if options.latency {
                        latency_jobs(options)
                    } else {
                        0
                    };
                Child::new(
                    bench.base,
                    "bare",
                    &["bench-bare-loop", "--jobs", &jobs.to_string()],
                )
            }
            Phase::Worker(store) => Child::new(bench.base, store, &["run"]),
            Phase::WorkerAmqps => Child::new(&bench.amqps_base, "off", &["run"]),
            Phase::WorkerOtlp => Child::new(&bench.otlp_base, "off", &["run"]),
        };
        let mut result = child_phase(bench.broker, &bench.sim_url, options, child).await?;
        result.name = self.name();
        Ok(result)
    }
}

/// What every phase of a run shares.
struct Bench<'a> {
    broker: &'a Connection,
    /// The configuration each phase names its queues after.
    base: &'a Config,
    /// `base` on the `--amqps` URL with its CA (used only by [`Phase::WorkerAmqps`]).
    amqps_base: Config,
    /// `base` exporting spans to the bench's receiver (used only by [`Phase::WorkerOtlp`]).
    otlp_base: Config,
    sim_url: String,
    options: &'a BenchOptions,
}

/// Runs every phase and prints the table; returns the phases for callers that check figures.
pub async fn run(base: Config, options: BenchOptions) -> Result<Vec<PhaseResult>, BenchError> {
    let sim = fast_sim(None).await?;
    let broker = connect_broker(&base.amqp, "swr-stage-worker.bench").await?;
    println!(
        "bench: {} jobs per phase, prefetch/concurrency {}, endpoint {}",
        options.jobs,
        options.concurrency,
        sim.url()
    );
    let endpoint = endpoint_rate(&sim.url(), options.jobs, options.concurrency as usize).await?;
    println!("endpoint alone: {endpoint:.0} requests/s");

    let mut amqps_base = base.clone();
    amqps_base.amqp.url = Secret::new(options.amqps_url.as_str());
    amqps_base.amqp.tls.ca_file = options.amqps_ca.clone();
    let collector = match options.otlp {
        true => Some(DiscardingCollector::start().await?),
        false => None,
    };
    let mut otlp_base = base.clone();
    if let Some(collector) = &collector {
        otlp_base.telemetry.otlp_endpoint = collector.url.clone();
    }
    let bench = Bench {
        broker: &broker,
        base: &base,
        amqps_base,
        otlp_base,
        sim_url: sim.url(),
        options: &options,
    };
    let phases = Phase::list(&options);
    let mut rounds: Vec<Vec<PhaseResult>> = Vec::new();
    for round in 1..=options.rounds.max(1) {
        let results = run_round(&bench, &phases, round).await?;
        report::round_line(round, &results);
        rounds.push(results);
    }
    let results = medians(&rounds);
    report::table(&rounds, &results, endpoint);
    if let Some(collector) = &collector {
        println!("otlp receiver: {}", collector.summary());
    }
    close_broker(&broker, "bench done").await;
    sim.shutdown().await;
    Ok(results)
}

/// Runs every phase once, in table order. Phases are interleaved round by round and each figure
/// is the median over the rounds, so a burst of other load on the machine does not decide a
/// ratio. Each round starts one phase later than the one before (bare, off, embedded; then off,
/// embedded, bare; ...): a phase that follows another inherits some of the broker's cleanup of
/// it, and a fixed order would hand that cost to the same phase every round.
async fn run_round(
    bench: &Bench<'_>,
    phases: &[Phase],
    round: usize,
) -> Result<Vec<PhaseResult>, BenchError> {
    let mut slots: Vec<Option<PhaseResult>> = vec![None; phases.len()];
    for step in 0..phases.len() {
        let i = (step + round - 1) % phases.len();
        slots[i] = Some(phases[i].run(bench).await?);
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Each phase's median round by jobs/s, with the highest peak memory of all rounds and the
/// latest latency measured.
fn medians(rounds: &[Vec<PhaseResult>]) -> Vec<PhaseResult> {
    (0..rounds[0].len())
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
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(stores: &[&str], amqps: bool) -> BenchOptions {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            options: BenchOptions,
        }
        let mut args = vec!["bench".to_owned(), format!("--stores={}", stores.join(","))];
        if amqps {
            args.push("--amqps".into());
        }
        Cli::parse_from(args).options
    }

    #[test]
    fn the_bare_loop_comes_first_then_each_store_then_amqps() {
        let names: Vec<String> = Phase::list(&options(&["off", "embedded"], true))
            .iter()
            .map(Phase::name)
            .collect();
        assert_eq!(
            names,
            [
                "bare loop",
                "worker, store off",
                "worker, store embedded",
                "worker, store off, amqps"
            ]
        );
        assert_eq!(Phase::list(&options(&["postgres"], false)).len(), 2);
    }

    fn phase(jobs_per_sec: f64, peak_rss_kib: Option<u64>) -> PhaseResult {
        PhaseResult {
            jobs_per_sec,
            peak_rss_kib,
            ..PhaseResult::default()
        }
    }

    #[test]
    fn a_median_is_the_middle_round_with_the_highest_peak_memory() {
        let rounds = vec![
            vec![phase(100.0, Some(10))],
            vec![phase(300.0, Some(30))],
            vec![phase(200.0, Some(20))],
        ];
        let results = medians(&rounds);
        assert_eq!(results[0].jobs_per_sec, 200.0);
        assert_eq!(results[0].peak_rss_kib, Some(30));
    }
}
