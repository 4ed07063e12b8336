//! The `swr-stage-worker` command: parses arguments, sets up logging, loads configuration, and
//! calls into the library. Nothing here is needed by tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};

use swr_stage_worker::campaign::input::{InputFormat, InputSource};
use swr_stage_worker::campaign::progress::ProgressMode;
use swr_stage_worker::campaign::{replay, submit, watch};
use swr_stage_worker::config::{Config, LogFormat};
use swr_stage_worker::request::Mode;
use swr_stage_worker::{bench, demo, service, shutdown, sim, status, telemetry};

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
    /// Log format: "text" for people, "json" (one object a line) for log stores; overrides log.format.
    #[arg(long, global = true, value_name = "FORMAT",
          value_parser = PossibleValuesParser::new(["text", "json"]).try_map(|word| word.parse::<LogFormat>()))]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume requests, call SWR, publish outcomes (stops cleanly on SIGTERM/SIGINT).
    Run,
    /// Show the topology's state (queue depths, consumers, DLQ) and, given a worker's telemetry
    /// address, its readiness and key counters.
    Status {
        /// A worker's telemetry.listen address, e.g. 127.0.0.1:9464.
        #[arg(long, value_name = "ADDR")]
        telemetry: Option<String>,
    },
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
        /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
        #[arg(long, value_name = "PEM", requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, value_name = "PEM", requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
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
        /// With --latency: publish at this many jobs/s in every phase instead, to compare
        /// latencies at one load.
        #[arg(long, value_name = "JOBS_PER_SEC", requires = "latency", value_parser = positive_rate)]
        latency_rate: Option<f64>,
        /// Run every phase this many times, interleaved, and report medians.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Also run the store-off worker over TLS (amqps) on the same broker, to compare with
        /// plain AMQP.
        #[arg(long)]
        amqps: bool,
        /// The broker's TLS address for --amqps.
        #[arg(long, default_value = "amqps://guest:guest@localhost:5671/%2f")]
        amqps_url: String,
        /// PEM file of the CA that signed the broker's certificate, for --amqps.
        #[arg(long, value_name = "PEM", default_value = "")]
        amqps_ca: String,
    },
    /// Measure how a fleet scales out: 1, 2, 3 … worker processes against an SWR that answers
    /// slowly, per idempotency backend; with --single-url, also one worker at full speed on
    /// amqp.url (a cluster) against one node alone. Needs RabbitMQ; build with --release.
    BenchFleet {
        /// Jobs per scale-out phase.
        #[arg(long, default_value_t = 3_000)]
        jobs: usize,
        /// Jobs in flight per worker (prefetch and worker.concurrency).
        #[arg(long, default_value_t = 64)]
        concurrency: u32,
        /// Fleet sizes (comma-separated); the first is the baseline of the ratios.
        #[arg(long, default_value = "1,2,3", value_delimiter = ',')]
        workers: Vec<usize>,
        /// Idempotency backends (comma-separated: off, embedded, postgres); postgres is shared
        /// by the fleet, embedded is a file per worker.
        #[arg(long, default_value = "embedded,postgres", value_delimiter = ',')]
        stores: Vec<String>,
        /// How long the simulator takes to answer in the scale-out phases.
        #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
        swr_delay: std::time::Duration,
        /// PostgreSQL for the postgres backend.
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
        postgres_url: String,
        /// Run every phase this many times and report medians.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// One broker node to compare amqp.url with: one worker at full speed on each.
        #[arg(long, value_name = "AMQP_URL")]
        single_url: Option<String>,
        /// Jobs per full-speed phase (with --single-url).
        #[arg(long, default_value_t = 20_000)]
        full_speed_jobs: usize,
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
    /// Publish a campaign of requests (JSON Lines or CSV, from a file or stdin, or one from
    /// flags), validated first, with publisher confirms. Exit 0 ok, 2 some failed (--wait), 1 error.
    Submit {
        /// JSON Lines or CSV (header pipeline_id,stage_index[,mode]) file; `-` reads stdin.
        #[arg(value_name = "FILE", conflicts_with_all = ["pipeline", "stage"])]
        file: Option<PathBuf>,
        /// Input format; by default `.csv` files are CSV and anything else is sniffed.
        #[arg(long, value_parser = ["jsonl", "csv"])]
        format: Option<String>,
        /// One request from flags: the pipeline id.
        #[arg(long, requires = "stage")]
        pipeline: Option<i64>,
        /// One request from flags: the step index.
        #[arg(long, requires = "pipeline")]
        stage: Option<i64>,
        /// One request from flags: retry (default) or rollback.
        #[arg(long, requires = "pipeline", value_parser = ["retry", "rollback"])]
        mode: Option<String>,
        /// Campaign id (default: generated and printed); part of every derived idempotency key.
        #[arg(long, value_name = "ID")]
        campaign: Option<String>,
        /// Publish the valid lines even if some are invalid.
        #[arg(long)]
        skip_invalid: bool,
        /// Validate and print the bodies that would be sent; publish nothing.
        #[arg(long)]
        dry_run: bool,
        /// Pace publishing to N messages per second.
        #[arg(long, value_name = "N", value_parser = positive_rate)]
        rate: Option<f64>,
        /// Publishes awaiting their confirm at once.
        #[arg(long, default_value_t = submit::DEFAULT_WINDOW)]
        window: usize,
        /// Then count the campaign's outcomes, print the summary, write the failures file.
        #[arg(long)]
        wait: bool,
        /// With --wait: stop waiting after this long (e.g. 30m).
        #[arg(long, requires = "wait", value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// With --wait: where failed and rejected requests go, as their input lines.
        #[arg(long, default_value = "failures.jsonl", value_name = "PATH")]
        failures: PathBuf,
    },
    /// Count a campaign's outcomes from now on; summary and failures file at the end.
    /// Exit 0 all succeeded, 2 some failed/rejected/missing, 1 error.
    Watch {
        /// The campaign to count.
        #[arg(long, value_name = "ID")]
        campaign: String,
        /// Stop once this many outcomes have arrived.
        #[arg(long, value_name = "N")]
        expect: Option<usize>,
        /// Stop after this long (e.g. 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Where failed and rejected requests go, rebuilt from their outcomes.
        #[arg(long, default_value = "failures.jsonl", value_name = "PATH")]
        failures: PathBuf,
    },
    /// Move dead-lettered requests back to the request queue (confirmed copy, then ack).
    Replay {
        /// Source queue (default: amqp.dead_letter_queue).
        #[arg(long, value_name = "QUEUE")]
        from: Option<String>,
        /// Move at most N messages.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Only messages whose body has FIELD=VALUE (repeatable; all must match).
        #[arg(long = "filter", value_name = "FIELD=VALUE")]
        filters: Vec<String>,
        /// List what would move; move nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

impl Command {
    /// The campaign commands promise exit 1 for their own failures (2 means "some requests failed").
    fn is_campaign(&self) -> bool {
        matches!(
            self,
            Command::Submit { .. } | Command::Watch { .. } | Command::Replay { .. }
        )
    }
}

/// `--rate`: a finite number of messages per second, at least one per 1,000 s.
fn positive_rate(text: &str) -> Result<f64, String> {
    use swr_stage_worker::config::MIN_RATE;
    match text.parse::<f64>() {
        Ok(rate) if rate >= MIN_RATE && rate.is_finite() => Ok(rate),
        _ => Err(format!(
            "expected a number of messages per second from {MIN_RATE} up, got {text:?}"
        )),
    }
}

/// Exit code of a usage error: 1 for the campaign commands (2 is their "some failed"), clap's 2 otherwise.
/// The command is found by clap itself (leniently), so a global flag's value before it
/// (`--config x.toml submit ...`) is not taken for the command.
fn usage_error_code() -> u8 {
    use clap::CommandFactory;
    let partial = Cli::command().ignore_errors(true).try_get_matches();
    match partial.as_ref().ok().and_then(|m| m.subcommand_name()) {
        Some("submit" | "watch" | "replay") => 1,
        _ => 2,
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(usage_error_code());
        }
    };
    // The log filter's syntax is the subscriber's: checked here, reported as the config error it is.
    let loaded = Config::from_process(cli.config.as_deref())
        .and_then(|config| telemetry::check_level(&config.log).map(|()| config));
    let config = match loaded {
        Ok(mut config) => {
            if let Some(format) = cli.log_format {
                config.log.format = format;
            }
            config
        }
        Err(e) => {
            eprintln!("swr-stage-worker: {e}");
            return ExitCode::from(if cli.command.is_campaign() { 1 } else { 2 });
        }
    };
    let quiet = matches!(
        cli.command,
        Command::Demo { .. } | Command::Bench { .. } | Command::BenchFleet { .. }
    ) || cli.command.is_campaign();
    if quiet && std::env::var_os("RUST_LOG").is_none() {
        // These commands print their own progress and summary; log lines would bury them.
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
                tls_cert,
                tls_key,
            } => {
                let sim_config = sim::SimConfig {
                    tokens,
                    stages,
                    record: !no_record,
                    iam_users,
                    token_ttl,
                    tls: tls_cert
                        .zip(tls_key)
                        .map(|(cert, key)| sim::SimTls { cert, key }),
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
                latency_rate,
                rounds,
                amqps,
                amqps_url,
                amqps_ca,
            } => {
                let options = bench::BenchOptions {
                    jobs,
                    concurrency,
                    stores,
                    postgres_url,
                    latency,
                    latency_rate,
                    rounds,
                    amqps: amqps.then_some(amqps_url),
                    amqps_ca,
                };
                match bench::run(config, options).await {
                    Ok(_) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("swr-stage-worker {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::BenchFleet {
                jobs,
                concurrency,
                workers,
                stores,
                swr_delay,
                postgres_url,
                rounds,
                single_url,
                full_speed_jobs,
            } => {
                let options = bench::fleet::FleetOptions {
                    jobs,
                    concurrency,
                    workers,
                    stores,
                    swr_delay,
                    postgres_url,
                    rounds,
                    single_url,
                    full_speed_jobs,
                };
                match bench::fleet::run(config, options).await {
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
            Command::Status { telemetry } => {
                match status::report(&config, telemetry.as_deref()).await {
                    Ok(report) => {
                        print!("{report}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("swr-stage-worker {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Demo { count } => match demo::run(config, count).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("swr-stage-worker demo: {e}");
                    ExitCode::FAILURE
                }
            },
            Command::Submit {
                file,
                format,
                pipeline,
                stage,
                mode,
                campaign,
                skip_invalid,
                dry_run,
                rate,
                window,
                wait,
                timeout,
                failures,
            } => {
                let input = match (file, pipeline, stage) {
                    (Some(path), _, _) if path.as_os_str() == "-" => InputSource::Stdin,
                    (Some(path), _, _) => InputSource::File(path),
                    (None, Some(pipeline_id), Some(stage_index)) => InputSource::Flags {
                        pipeline_id,
                        stage_index,
                        mode: mode.map(|m| if m == "rollback" { Mode::Rollback } else { Mode::Retry }),
                    },
                    _ => {
                        eprintln!("swr-stage-worker submit: give a FILE (`-` for stdin), or --pipeline and --stage");
                        return ExitCode::FAILURE;
                    }
                };
                let plan = submit::SubmitPlan {
                    format: format.map(|f| if f == "csv" { InputFormat::Csv } else { InputFormat::JsonLines }),
                    campaign,
                    skip_invalid,
                    dry_run,
                    rate,
                    window,
                    wait,
                    timeout,
                    failures,
                    ..submit::SubmitPlan::new(input)
                };
                let mode = ProgressMode::for_stderr();
                match submit::submit(&config, &plan, mode, shutdown::termination_signal()).await {
                    Ok(result) if result.all_succeeded() => ExitCode::SUCCESS,
                    Ok(_) => ExitCode::from(2),
                    Err(e) => {
                        eprintln!("swr-stage-worker submit: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Watch {
                campaign,
                expect,
                timeout,
                failures,
            } => {
                let plan = watch::WatchPlan {
                    campaign,
                    expect,
                    timeout,
                    failures,
                };
                let mode = ProgressMode::for_stderr();
                match watch::watch(&config, &plan, mode, shutdown::termination_signal()).await {
                    Ok(result) if result.summary.all_succeeded() => ExitCode::SUCCESS,
                    Ok(_) => ExitCode::from(2),
                    Err(e) => {
                        eprintln!("swr-stage-worker watch: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Replay {
                from,
                limit,
                filters,
                dry_run,
            } => {
                let plan = match replay::parse_filters(&filters) {
                    Ok(filters) => replay::ReplayPlan {
                        from,
                        limit,
                        filters,
                        dry_run,
                    },
                    Err(e) => {
                        eprintln!("swr-stage-worker replay: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                match replay::replay(&config, &plan).await {
                    Ok(report) => {
                        println!("{}", report.render());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("swr-stage-worker replay: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
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
