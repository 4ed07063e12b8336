//! The `swr-stage-worker` command: parses arguments, sets up logging, loads configuration, and
//! calls into the library. Nothing here is needed by tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use swr_stage_worker::config::Config;
use swr_stage_worker::{bench, demo, service, shutdown, sim, telemetry};

#[derive(Parser)]
#[command(
    name = "swr-stage-worker",
    version,
    about = "Retry or roll back Huawei Cloud SWR pipeline steps from a RabbitMQ queue"
)]
struct Cli {
    /// Configuration file (TOML) laid over the built-in defaults; SWR_STAGE_WORKER_CONFIG also sets it.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume requests, call SWR, publish outcomes (stops cleanly on SIGTERM/SIGINT).
    Run,
    /// Serve the SWR simulator (for tests, demos and your own integration tests).
    Sim {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:18080")]
        listen: SocketAddr,
        /// Accepted X-Auth-Token (repeatable); with none, any non-empty token is accepted.
        #[arg(long = "token", value_name = "TOKEN")]
        tokens: Vec<String>,
        /// Steps per pipeline; the last one is a deploy step.
        #[arg(long, default_value_t = 5)]
        stages: u32,
        /// Fast mode for benchmarks: record no calls (counters only).
        #[arg(long)]
        no_record: bool,
        /// An IAM user that POST /v3/auth/tokens signs in, as NAME:PASSWORD (repeatable).
        #[arg(long = "iam-user", value_name = "NAME:PASSWORD", value_parser = parse_iam_user)]
        iam_users: Vec<(String, String)>,
        /// Lifetime of the tokens the IAM endpoint issues.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        token_ttl: std::time::Duration,
    },
    /// Measure the worker against the bare consume-POST-publish-ack loop (needs RabbitMQ;
    /// build with --release for meaningful figures).
    Bench {
        /// Jobs per phase.
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        /// Prefetch and worker concurrency.
        #[arg(long, default_value_t = 64)]
        concurrency: u32,
        /// Idempotency backends to measure the worker with (comma-separated: off, embedded, postgres).
        #[arg(long, default_value = "off,embedded,postgres", value_delimiter = ',')]
        stores: Vec<String>,
        /// PostgreSQL for the postgres backend.
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
        postgres_url: String,
        /// Also measure publish-to-outcome latency at half of each worker phase's peak rate.
        #[arg(long)]
        latency: bool,
        /// Run every phase this many times, interleaved, and report medians.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The benchmark's baseline: a bare consume-POST-publish-ack loop (run by `bench`).
    #[command(hide = true)]
    BenchBareLoop {
        /// Deliveries to process before exiting.
        #[arg(long)]
        jobs: usize,
    },
    /// A first look: runs the simulator and a worker in-process against the local RabbitMQ,
    /// publishes sample requests and prints a summary of their outcomes.
    Demo {
        /// How many sample requests to publish.
        #[arg(long, default_value_t = 200)]
        count: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_process(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("swr-stage-worker: {e}");
            return ExitCode::from(2);
        }
    };
    if matches!(cli.command, Command::Demo { .. } | Command::Bench { .. })
        && std::env::var_os("RUST_LOG").is_none()
    {
        // The demo prints its own summary; per-job log lines would bury it.
        let mut quiet = config.log.clone();
        quiet.level = "warn".into();
        telemetry::init(&quiet);
    } else {
        telemetry::init(&config.log);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("swr-stage-worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run => {
                if let Err(e) = config.validate_for_worker() {
                    eprintln!("swr-stage-worker: {e}");
                    return ExitCode::from(2);
                }
                match service::run(config, shutdown::termination_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "worker stopped");
                        eprintln!("swr-stage-worker: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Sim {
                listen,
                tokens,
                stages,
                no_record,
                iam_users,
                token_ttl,
            } => {
                let sim_config = sim::SimConfig {
                    tokens,
                    stages,
                    record: !no_record,
                    iam_users,
                    token_ttl,
                    ..sim::SimConfig::default()
                };
                match sim::serve_forever(listen, sim_config, shutdown::termination_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("swr-stage-worker sim: cannot serve on {listen}: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Bench {
                jobs,
                concurrency,
                stores,
                postgres_url,
                latency,
                rounds,
            } => {
                let options = bench::BenchOptions {
                    jobs,
                    concurrency,
                    stores,
                    postgres_url,
                    latency,
                    rounds,
                };
                match bench::run(config, options).await {
                    Ok(_) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("swr-stage-worker {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::BenchBareLoop { jobs } => match bench::bare_loop(config, jobs).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("swr-stage-worker {e}");
                    ExitCode::FAILURE
                }
            },
            Command::Demo { count } => match demo::run(config, count).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("swr-stage-worker demo: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

/// `--iam-user NAME:PASSWORD`: split at the first colon (a password may contain colons).
fn parse_iam_user(raw: &str) -> Result<(String, String), String> {
    match raw.split_once(':') {
        Some((name, password)) if !name.is_empty() && !password.is_empty() => {
            Ok((name.to_owned(), password.to_owned()))
        }
        _ => Err("expected NAME:PASSWORD, both non-empty".to_owned()),
    }
}
