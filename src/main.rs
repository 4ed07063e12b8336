//! The `swr-stage-worker` command: parses arguments, sets up logging, loads configuration, and
//! calls into the library, or into its own `bench` module for the benchmark commands. Nothing
//! here is needed by tests.

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
use swr_stage_worker::{demo, service, shutdown, sim, status, telemetry};

mod bench;

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
    Sim(SimArgs),
    #[command(flatten)]
    Bench(bench::BenchCommand),
    /// A first look: runs the simulator and a worker in-process against the local RabbitMQ,
    /// publishes sample requests and prints a summary of their outcomes.
    Demo {
        /// How many sample requests to publish.
        #[arg(long, default_value_t = 200)]
        count: usize,
    },
    /// Publish a campaign of requests (JSON Lines or CSV, from a file or stdin, or one from
    /// flags), validated first, with publisher confirms. Exit 0 ok, 2 some failed (--wait), 1 error.
    Submit(SubmitArgs),
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

/// `sim`: where the simulator listens and what it accepts.
#[derive(clap::Args)]
struct SimArgs {
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
}

/// `submit`: the campaign's input and how it is published.
#[derive(clap::Args)]
struct SubmitArgs {
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
    // Span export is the worker's alone; it starts on the runtime, before the first span.
    let export = match (&cli.command, config.telemetry.otlp_enabled()) {
        (Command::Run, true) => {
            let _runtime = runtime.enter();
            match start_export(&config) {
                Ok(export) => Some(export),
                Err(e) => {
                    eprintln!("swr-stage-worker: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        _ => None,
    };
    init_logging(&cli.command, &config, export.as_ref());
    runtime.block_on(dispatch(cli.command, config, export))
}

/// Span export from `[telemetry]`: the collector's URL and headers, trusted like SWR.
fn start_export(config: &Config) -> Result<telemetry::otlp::Export, String> {
    let telemetry = &config.telemetry;
    telemetry::otlp::Export::start(telemetry::otlp::Settings {
        url: telemetry.otlp_traces_url(),
        headers: telemetry.otlp_headers().map_err(|e| e.to_string())?,
        timeout: telemetry.otlp_timeout,
        queue: telemetry.otlp_queue,
        worker_id: config.worker_id(),
        tls: config.http.client_config().map_err(|e| e.to_string())?,
    })
    .map_err(|e| e.to_string())
}

/// Logs as configured, or only warnings for the commands that print their own progress and
/// summary (log lines would bury them) unless RUST_LOG asks for more.
fn init_logging(command: &Command, config: &Config, export: Option<&telemetry::otlp::Export>) {
    let quiet = match command {
        Command::Demo { .. } => true,
        Command::Bench(bench) => bench.prints_own_summary(),
        _ => command.is_campaign(),
    };
    if quiet && std::env::var_os("RUST_LOG").is_none() {
        let mut quiet = config.log.clone();
        quiet.level = "warn".into();
        telemetry::init(&quiet, None);
    } else {
        telemetry::init(&config.log, export);
    }
}

/// Runs the command; its exit code.
async fn dispatch(
    command: Command,
    config: Config,
    export: Option<telemetry::otlp::Export>,
) -> ExitCode {
    match command {
        Command::Run => run_worker(config, export).await,
        Command::Sim(args) => serve_sim(args).await,
        Command::Bench(bench) => match bench.run(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => failed(e),
        },
        Command::Status { telemetry } => {
            match status::report(&config, telemetry.as_deref()).await {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => failed(e),
            }
        }
        Command::Demo { count } => match demo::run(config, count).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => failed(format_args!("demo: {e}")),
        },
        Command::Submit(args) => submit_campaign(&config, args).await,
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
                Err(e) => failed(format_args!("watch: {e}")),
            }
        }
        Command::Replay {
            from,
            limit,
            filters,
            dry_run,
        } => replay_dead_letters(&config, from, limit, &filters, dry_run).await,
    }
}

/// Prints `message` after the command's name; exit 1.
fn failed(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("swr-stage-worker {message}");
    ExitCode::FAILURE
}

/// `run`: the worker until SIGTERM/SIGINT; exit 2 for a configuration it cannot run with. Span
/// export, when on, flushes within the same `shutdown.grace` as the jobs, counted from the signal.
async fn run_worker(config: Config, export: Option<telemetry::otlp::Export>) -> ExitCode {
    if let Err(e) = config.validate_for_worker() {
        eprintln!("swr-stage-worker: {e}");
        return ExitCode::from(2);
    }
    let grace = config.shutdown.grace;
    let signalled = std::sync::Arc::new(std::sync::OnceLock::new());
    let signal = {
        let signalled = signalled.clone();
        async move {
            shutdown::termination_signal().await;
            let _ = signalled.set(std::time::Instant::now());
        }
    };
    let result = service::run(config, signal).await;
    if let Some(export) = export {
        let since = signalled.get().copied();
        export
            .shutdown(since.unwrap_or_else(std::time::Instant::now) + grace)
            .await;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "worker stopped");
            eprintln!("swr-stage-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `sim`: serves the simulator until SIGTERM/SIGINT.
async fn serve_sim(args: SimArgs) -> ExitCode {
    let SimArgs {
        listen,
        tokens,
        stages,
        no_record,
        iam_users,
        token_ttl,
        tls_cert,
        tls_key,
    } = args;
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
        Err(e) => failed(format_args!("sim: cannot serve on {listen}: {e}")),
    }
}

/// `submit`: exit 0 all published (and, with --wait, succeeded), 2 some failed, 1 an error.
async fn submit_campaign(config: &Config, args: SubmitArgs) -> ExitCode {
    let input = match (args.file, args.pipeline, args.stage) {
        (Some(path), _, _) if path.as_os_str() == "-" => InputSource::Stdin,
        (Some(path), _, _) => InputSource::File(path),
        (None, Some(pipeline_id), Some(stage_index)) => InputSource::Flags {
            pipeline_id,
            stage_index,
            mode: args.mode.map(|m| {
                if m == "rollback" {
                    Mode::Rollback
                } else {
                    Mode::Retry
                }
            }),
        },
        _ => return failed("submit: give a FILE (`-` for stdin), or --pipeline and --stage"),
    };
    let plan = submit::SubmitPlan {
        format: args.format.map(|f| {
            if f == "csv" {
                InputFormat::Csv
            } else {
                InputFormat::JsonLines
            }
        }),
        campaign: args.campaign,
        skip_invalid: args.skip_invalid,
        dry_run: args.dry_run,
        rate: args.rate,
        window: args.window,
        wait: args.wait,
        timeout: args.timeout,
        failures: args.failures,
        ..submit::SubmitPlan::new(input)
    };
    let mode = ProgressMode::for_stderr();
    match submit::submit(config, &plan, mode, shutdown::termination_signal()).await {
        Ok(result) if result.all_succeeded() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(2),
        Err(e) => failed(format_args!("submit: {e}")),
    }
}

/// `replay`: moves the matching dead letters and prints what moved.
async fn replay_dead_letters(
    config: &Config,
    from: Option<String>,
    limit: Option<usize>,
    filters: &[String],
    dry_run: bool,
) -> ExitCode {
    let plan = match replay::parse_filters(filters) {
        Ok(filters) => replay::ReplayPlan {
            from,
            limit,
            filters,
            dry_run,
        },
        Err(e) => return failed(format_args!("replay: {e}")),
    };
    match replay::replay(config, &plan).await {
        Ok(report) => {
            println!("{}", report.render());
            ExitCode::SUCCESS
        }
        Err(e) => failed(format_args!("replay: {e}")),
    }
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
