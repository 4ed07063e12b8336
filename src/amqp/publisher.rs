//! Publishing with publisher confirms: every publish waits for the broker's ack within
//! `amqp.confirm_timeout`; a nack, a timeout or a broken channel is an error, so the caller never
//! acks a request whose outcome the broker did not take.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};

/// Why a publish was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("no publisher confirm within {0:?}")]
    Timeout(Duration),
    #[error("the broker refused the message (basic.nack)")]
    Nacked,
    #[error("the broker could not route the message to any queue (basic.return {0})")]
    Unroutable(String),
    #[error("broker error while publishing: {0}")]
    Broker(#[from] lapin::Error),
}

/// Whether a confirmed message reached a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routed {
    /// At least one queue took it.
    Yes,
    /// Confirmed, but no queue was bound to take it (mandatory publish came back).
    NoQueue,
}

/// Confirm-mode channels shared by all jobs (lapin channels are safe to share): one for
/// outcomes, one for dead-letter copies.
///
/// Two channels because a returned message (basic.return) is matched to a confirm by order, not
/// by delivery tag: lapin hands it to the next confirm it completes, and a multiple ack completes
/// several in no set order. On one shared channel an outcome that found no queue could be taken
/// for a DLQ copy that did (the request would be requeued and copied to the DLQ again), or the
/// reverse (a DLQ copy lost, the request acked). On its own channel a DLQ copy's confirm can only
/// carry a DLQ copy's return, and every DLQ copy goes to the same fanout exchange.
#[derive(Clone)]
pub struct Publisher {
    /// Channel in confirm mode for outcomes.
    channel: Channel,
    /// Channel in confirm mode for dead-letter copies.
    dead_letters: Channel,
    /// Limit for one confirm.
    confirm_timeout: Duration,
}

impl Publisher {
    /// Opens the channels on `connection` and puts them in confirm mode.
    pub async fn open(
        connection: &Connection,
        confirm_timeout: Duration,
    ) -> Result<Publisher, PublishError> {
        Ok(Publisher {
            channel: confirming(connection, confirm_timeout).await?,
            dead_letters: confirming(connection, confirm_timeout).await?,
            confirm_timeout,
        })
    }

    /// Publishes `body` (an outcome) as a mandatory message and waits for its confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Routed, PublishError> {
        self.publish_on(&self.channel, exchange, routing_key, body, properties)
            .await
    }

    /// Publishes on `channel` as a mandatory message and waits for its confirm.
    async fn publish_on(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Routed, PublishError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        // Boxed: lapin's publish future is about 2 KiB, and every job's state machine (moved
        // at each spawn and each nested call) would otherwise carry it, twice with `reply_to`.
        let confirm = Box::pin(within(self.confirm_timeout, async move {
            let pending = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    options,
                    body,
                    properties,
                )
                .await?;
            pending.await
        }));
        let confirmation = confirm.await??;
        if confirmation.is_nack() {
            return Err(PublishError::Nacked);
        }
        Ok(match confirmation.take_message() {
            Some(_) => Routed::NoQueue,
            None => Routed::Yes,
        })
    }

    /// Publishes a dead-letter copy on its own channel; a copy that reached no queue is an error.
    pub async fn publish_routed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        match self
            .publish_on(&self.dead_letters, exchange, routing_key, body, properties)
            .await?
        {
            Routed::Yes => Ok(()),
            Routed::NoQueue => Err(PublishError::Unroutable(format!(
                "exchange '{exchange}', routing key '{routing_key}'"
            ))),
        }
    }

    /// False once a channel is closed or errored; jobs then ask for a new session.
    pub fn is_usable(&self) -> bool {
        self.channel.status().connected() && self.dead_letters.status().connected()
    }

    /// Closes the channels (after in-flight publishes are confirmed or given up).
    pub async fn close(&self) {
        for channel in [&self.channel, &self.dead_letters] {
            let _ = within(self.confirm_timeout, channel.close(200, "shutdown".into())).await;
        }
    }
}

/// A new channel on `connection`, in confirm mode.
async fn confirming(connection: &Connection, limit: Duration) -> Result<Channel, PublishError> {
    let channel = within(limit, connection.create_channel()).await??;
    within(
        limit,
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await??;
    Ok(channel)
}

/// Every await on the broker is bounded (a publish can hang when the server goes away).
async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, PublishError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| PublishError::Timeout(limit))
}
