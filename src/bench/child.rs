//! One phase as a child process of this binary: the worker (`run`) or the bare loop
//! (`bench-bare-loop`) on fresh queues filled with the jobs, measured from outside.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use lapin::Connection;
use tokio::process::Child as Process;

use swr_stage_worker::amqp::broker_urls;
use swr_stage_worker::config::Config;
use swr_stage_worker::procstat::{cpu_seconds, peak_rss_kib};

use super::host::{local_broker_pid, settle};
use super::latency::{latency, latency_jobs};
use super::phases::{BenchOptions, PhaseResult};
use super::queues::{cleanup, count_outcomes, phase_config, prepare};
use super::{fail, terminate, BenchError, TOKEN};

/// What a phase runs as its child process.
pub(super) struct Child<'a> {
    /// The configuration the phase names its queues after and connects with.
    base: &'a Config,
    /// The idempotency backend ("off", "embedded", "postgres"; "bare" for the bare loop).
    store: &'a str,
    /// This binary's arguments.
    args: Vec<String>,
}

impl<'a> Child<'a> {
    pub(super) fn new(base: &'a Config, store: &'a str, args: &[&str]) -> Child<'a> {
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        Child { base, store, args }
    }
}

/// Runs `child` on fresh queues filled with the jobs, counts the outcomes, reads its CPU time
/// and peak memory, then stops it and cleans up. The result is unnamed: the phase names it.
pub(super) async fn child_phase(
    broker: &Connection,
    sim_url: &str,
    options: &BenchOptions,
    child: Child<'_>,
) -> Result<PhaseResult, BenchError> {
    let tag = format!("p{}", child.store);
    let config = phase_config(child.base, sim_url, &tag);
    let (channel, results) = prepare(broker, &config, options.jobs).await?;
    let store_dir = std::env::temp_dir().join(format!("{}.store", config.amqp.request_queue));
    let env = worker_env(
        &config,
        sim_url,
        options.concurrency,
        child.store,
        &store_dir,
        &options.postgres_url,
    );
    // The broker is still writing the jobs just published (and may be cleaning up the phase
    // before): the phase starts once it is quiet, so it pays for its own work only.
    let broker_pid = broker_urls(&config.amqp.url)
        .first()
        .and_then(|url| local_broker_pid(url.expose()));
    if let Some(pid) = broker_pid {
        settle(pid).await;
    }
    let mut process = spawn(&child.args, env)?;
    let pid = process
        .id()
        .ok_or_else(|| fail("the child exited at once"))?;
    let mut measured = measure(broker, &config, &results, options, pid, broker_pid, &tag).await;
    stop(&mut process, pid, &mut measured).await;
    cleanup(&channel, &config, &results).await;
    let _ = std::fs::remove_dir_all(&store_dir);
    measured
}

/// The running child's figures: its rate (and latency, if asked for), its CPU time and peak
/// memory, and the broker's CPU time over the phase.
async fn measure(
    broker: &Connection,
    config: &Config,
    results: &str,
    options: &BenchOptions,
    pid: u32,
    broker_pid: Option<u32>,
    tag: &str,
) -> Result<PhaseResult, BenchError> {
    let per_job = |seconds: f64| seconds * 1e6 / options.jobs as f64;
    // The broker shares the cores: its CPU per job says how much of a phase's cost is its.
    // It covers the whole phase (the child's start, the bench's own outcome consumer, and
    // whatever the broker spends per second rather than per message).
    let broker_before = broker_pid.and_then(cpu_seconds);
    let counted = count_outcomes(broker, results, options.jobs).await;
    let broker_cpu_us_per_job = broker_before
        .zip(broker_pid.and_then(cpu_seconds))
        .filter(|(before, after)| after >= before)
        .map(|(before, after)| per_job(after - before));
    let peak_rss_kib = peak_rss_kib(pid);
    let cpu_us_per_job = cpu_seconds(pid).map(per_job);
    let jobs_per_sec = counted?;
    let latency_ms = if options.latency {
        let rate = options.latency_rate.unwrap_or(jobs_per_sec / 2.0);
        Some(latency(broker, config, results, rate, latency_jobs(options), tag).await?)
    } else {
        None
    };
    Ok(PhaseResult {
        name: String::new(),
        jobs_per_sec,
        peak_rss_kib,
        cpu_us_per_job,
        broker_cpu_us_per_job,
        latency_ms,
    })
}

/// Starts this binary with `args` and `env`, its output discarded; killed if dropped (a bench
/// that fails leaves no worker behind).
pub(super) fn spawn(
    args: &[impl AsRef<std::ffi::OsStr>],
    env: HashMap<String, String>,
) -> Result<Process, BenchError> {
    let exe = std::env::current_exe().map_err(fail)?;
    tokio::process::Command::new(exe)
        .args(args)
        .envs(env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(fail)
}

/// Stops the child. A phase whose process died says so, instead of only that its outcomes
/// stopped.
async fn stop(process: &mut Process, pid: u32, measured: &mut Result<PhaseResult, BenchError>) {
    let exited = match measured {
        Err(_) => process.try_wait().ok().flatten(),
        Ok(_) => None,
    };
    if let (Err(e), Some(status)) = (&*measured, exited) {
        *measured = Err(fail(format!("{e} (the phase's process exited: {status})")));
    }
    // Only a child still running is signalled: an exited one was reaped, and its pid may be
    // another process's by now.
    if exited.is_none() {
        terminate(pid);
        let _ = tokio::time::timeout(Duration::from_secs(30), process.wait()).await;
    }
}

/// The environment of a worker child: the phase's names, broker and TLS settings, the
/// simulator, `concurrency`, and the idempotency backend `store` ("bare" runs without one) with
/// its file under `store_dir` or its PostgreSQL at `postgres_url`.
pub(super) fn worker_env(
    config: &Config,
    sim_url: &str,
    concurrency: u32,
    store: &str,
    store_dir: &Path,
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
    if config.telemetry.otlp_enabled() {
        env.insert(
            "SWR_STAGE_WORKER__TELEMETRY__OTLP_ENDPOINT".into(),
            config.telemetry.otlp_endpoint.clone(),
        );
    }
    // A port of its own: a worker already running here (on the default 9464) must not make
    // the phase's worker fail to start.
    env.insert(
        "SWR_STAGE_WORKER__TELEMETRY__LISTEN".into(),
        "127.0.0.1:0".into(),
    );
    env
}
