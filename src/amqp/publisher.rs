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

/// A confirm-mode channel shared by all jobs (lapin channels are safe to share).
#[derive(Clone)]
pub struct Publisher {
    /// Channel in confirm mode.
    channel: Channel,
    /// Limit for one confirm.
    confirm_timeout: Duration,
}

impl Publisher {
    /// Opens a channel on `connection` and puts it in confirm mode.
    pub async fn open(
        connection: &Connection,
        confirm_timeout: Duration,
    ) -> Result<Publisher, PublishError> {
        let channel = within(confirm_timeout, connection.create_channel()).await??;
        within(
            confirm_timeout,
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await??;
        Ok(Publisher {
            channel,
            confirm_timeout,
        })
    }

    /// Publishes `body` as a mandatory message and waits for its confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Routed, PublishError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = async {
            let pending = self
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    options,
                    body,
                    properties,
                )
                .await?;
            pending.await
        };
        let confirmation = within(self.confirm_timeout, confirm).await??;
        if confirmation.is_nack() {
            return Err(PublishError::Nacked);
        }
        Ok(match confirmation.take_message() {
            Some(_) => Routed::NoQueue,
            None => Routed::Yes,
        })
    }

    /// Like [`publish`](Self::publish), but a message that reached no queue is an error.
    pub async fn publish_routed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        match self
            .publish(exchange, routing_key, body, properties)
            .await?
        {
            Routed::Yes => Ok(()),
            Routed::NoQueue => Err(PublishError::Unroutable(format!(
                "exchange '{exchange}', routing key '{routing_key}'"
            ))),
        }
    }

    /// False once the channel is closed or errored; jobs then ask for a new session.
    pub fn is_usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Closes the channel (after in-flight publishes are confirmed or given up).
    pub async fn close(&self) {
        let _ = within(
            self.confirm_timeout,
            self.channel.close(200, "shutdown".into()),
        )
        .await;
    }
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
