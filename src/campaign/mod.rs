//! Bulk campaigns: the operator's commands for retrying or rolling back thousands of steps after
//! an outage, and for getting back what did not work.
//!
//! The map (one job each):
//! - [`input`]: JSON Lines, CSV or flags → validated requests with line numbers, the campaign
//!   id and derived idempotency keys (validation is [`crate::request::parse_request`]'s).
//! - [`submit`]: windowed, confirmed, optionally paced publishing; `--wait`.
//! - [`watch`]: counting a campaign's outcomes, the summary table, `failures.jsonl`.
//! - [`replay`]: moving dead-lettered requests back to the request queue, confirm before ack.
//! - [`progress`]: bars on a terminal, plain periodic lines otherwise.
//!
//! These commands are producers and observers: they never call SWR and never consume the
//! request queue. They use the same [`Config`] as the worker, so names and broker agree.
//! See `docs/campaigns.md` for the command reference and a walkthrough.

pub mod input;
pub mod progress;
pub mod replay;
pub mod submit;
pub mod watch;

use std::path::PathBuf;
use std::time::Duration;

use lapin::{Channel, Connection};

use crate::amqp::topology::TopologyError;
use crate::amqp::{connect as amqp_connect, ConnectError};
use crate::config::Config;

pub use watch::Failures;

/// Why a campaign command failed (exit code 1). Failed *requests* are not errors: they are in
/// the summary and make the exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    #[error(transparent)]
    Input(#[from] input::InputError),
    #[error("{invalid} invalid line(s) and {valid} valid; nothing was published (fix the lines above, or pass --skip-invalid to send the valid ones)")]
    InvalidLines { invalid: usize, valid: usize },
    #[error("no valid request to send ({invalid} invalid line(s))")]
    NothingToSend { invalid: usize },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("RabbitMQ: {step} failed: {source}")]
    Broker {
        step: &'static str,
        source: lapin::Error,
    },
    #[error("RabbitMQ: no answer to {step} within {timeout:?} (amqp.confirm_timeout)")]
    Timeout {
        step: &'static str,
        timeout: Duration,
    },
    #[error("RabbitMQ closed the outcome watcher's queue before the count was complete")]
    WatcherClosed,
    #[error("--campaign: expected 1..=128 characters (the contract's campaign_id), got {0}")]
    BadCampaign(String),
    #[error("interrupted while publishing: {confirmed} of {total} requests were confirmed (a few more may have been in flight); submitting the same input again sends the rest, and the idempotency keys keep the sent ones from running twice")]
    Interrupted { confirmed: usize, total: usize },
    #[error(transparent)]
    Publish(#[from] submit::PublishError),
    #[error(transparent)]
    Replay(#[from] replay::ReplayError),
    #[error("cannot write the failures file {path}: {source}")]
    Failures {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A campaign id as the contract allows it in `campaign_id` (1..=128 Unicode scalar values):
/// an empty one (an unset shell variable) would make every request invalid, and a watch of it
/// would match nothing.
pub fn check_campaign_id(id: &str) -> Result<(), CampaignError> {
    match id.chars().count() {
        1..=128 => Ok(()),
        0 => Err(CampaignError::BadCampaign("an empty string".into())),
        n => Err(CampaignError::BadCampaign(format!("{n} characters"))),
    }
}

/// Opens a connection named `<amqp.connection_name>.<command>`, so an operator can tell the
/// campaign tool's connection from the workers' in `rabbitmqctl list_connections`.
pub(crate) async fn connect(config: &Config, command: &str) -> Result<Connection, ConnectError> {
    let name = format!("{}.{command}", config.amqp.connection_name);
    amqp_connect(
        &config.amqp.url,
        &config.amqp.tls,
        &name,
        config.amqp.connect_timeout,
    )
    .await
}

/// A new channel, bounded like every other broker call.
pub(crate) async fn open_channel(
    connection: &Connection,
    config: &Config,
) -> Result<Channel, CampaignError> {
    bounded(
        config.amqp.confirm_timeout,
        "channel.open",
        connection.create_channel(),
    )
    .await
}

/// Every await on the broker is bounded: a broker that went away must not hang a command.
/// Declares the topology within `limit` (a queue declare on a cluster without a quorum can go
/// unanswered while the connection stays up).
pub(crate) async fn declare_topology(
    channel: &lapin::Channel,
    amqp: &crate::config::AmqpConfig,
    limit: Duration,
) -> Result<(), CampaignError> {
    match tokio::time::timeout(limit, crate::amqp::topology::declare(channel, amqp)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(CampaignError::Timeout {
            step: "declaring the topology",
            timeout: limit,
        }),
    }
}

pub(crate) async fn bounded<T>(
    limit: Duration,
    step: &'static str,
    call: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, CampaignError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(CampaignError::Broker { step, source }),
        Err(_) => Err(CampaignError::Timeout {
            step,
            timeout: limit,
        }),
    }
}
