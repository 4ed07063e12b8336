//! `swr-stage-worker bench` and `bench-fleet`: what the worker costs next to the bare broker
//! path, and how a fleet scales out. Part of the binary, not of the library: nothing here is
//! on a job's path, and the library's users never need it.
//!
//! The map:
//! - [`phases`]: `bench`'s options, its list of phases and the interleaved rounds.
//! - [`child`]: one phase as a child process of this binary (the worker or the bare loop).
//! - [`bare_loop`]: the baseline: consume, POST, publish with a confirm, ack, nothing else.
//! - [`queues`]: a phase's fresh queues, the jobs that fill them, the outcomes counted.
//! - [`endpoint`]: the fast simulator every phase calls, and its own rate.
//! - [`latency`]: publish-to-outcome times at a fixed rate.
//! - [`host`]: the broker's process on this machine and when it has settled (/proc).
//! - [`report`]: the round lines and the table of medians.
//! - [`fleet`]: `bench-fleet`: worker processes scaling out, and a cluster against one node.

use std::time::Duration;

use lapin::Connection;

use swr_stage_worker::amqp::connect;
use swr_stage_worker::config::{AmqpConfig, Config};

mod bare_loop;
mod child;
mod collector;
mod endpoint;
pub mod fleet;
mod host;
mod latency;
pub mod phases;
mod queues;
mod report;

/// The benchmark's commands.
#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Measure the worker against the bare consume-POST-publish-ack loop (needs RabbitMQ;
    /// build with --release for meaningful figures).
    Bench(phases::BenchOptions),
    /// Measure how a fleet scales out: 1, 2, 3 … worker processes against an SWR that answers
    /// slowly, per idempotency backend; with --single-url, also one worker at full speed on
    /// amqp.url (a cluster) against one node alone. Needs RabbitMQ; build with --release.
    BenchFleet(fleet::FleetOptions),
    /// The benchmark's baseline: a bare consume-POST-publish-ack loop (run by `bench`).
    #[command(hide = true)]
    BenchBareLoop {
        /// Deliveries to process before exiting.
        #[arg(long)]
        jobs: usize,
    },
}

impl BenchCommand {
    /// `bench` and `bench-fleet` print their own progress and tables; the bare loop, a child
    /// whose output goes nowhere, logs as configured.
    pub fn prints_own_summary(&self) -> bool {
        !matches!(self, BenchCommand::BenchBareLoop { .. })
    }

    /// Runs the command; its tables go to stdout.
    pub async fn run(self, config: Config) -> Result<(), BenchError> {
        match self {
            BenchCommand::Bench(options) => phases::run(config, options).await.map(drop),
            BenchCommand::BenchFleet(options) => fleet::run(config, options).await.map(drop),
            BenchCommand::BenchBareLoop { jobs } => bare_loop::bare_loop(config, jobs).await,
        }
    }
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

/// A named connection to the first broker of `amqp.url` that answers.
async fn connect_broker(amqp: &AmqpConfig, name: &str) -> Result<Connection, BenchError> {
    connect(&amqp.url, &amqp.tls, name, Duration::from_secs(10))
        .bounded()
        .await
}

/// Closes a connection, giving up after 5 s: the figures are taken by then.
async fn close_broker(broker: &Connection, reason: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(5), broker.close(200, reason.into())).await;
}

/// Asks a child process that is still running to stop (SIGTERM: the worker drains and exits).
fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}
