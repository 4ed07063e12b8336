//! Declares the broker objects of contract §2, idempotently, and turns a mismatch with an existing
//! object into an error that says which object and how to fix it.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::config::AmqpConfig;

/// Why the topology could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// An object exists with other arguments or another type: retrying will not help.
    #[error("{object} already exists with other settings ({server}). {fix}")]
    Mismatch {
        object: String,
        server: String,
        fix: String,
    },
    /// The broker went away or refused for another reason: worth retrying.
    #[error("declaring {object}: {source}")]
    Broker {
        object: String,
        source: lapin::Error,
    },
}

/// The request queue's arguments: a quorum queue (replicated, keeps a delivery count) that
/// dead-letters to the DLX (what the broker rejects lands in the DLQ).
pub fn request_queue_arguments(config: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(config.dead_letter_exchange.as_str())),
    );
    args
}

/// Declares DLX, DLQ, request queue (and its extra exchange bindings), results exchange.
pub async fn declare(channel: &Channel, config: &AmqpConfig) -> Result<(), TopologyError> {
    let dlx = &config.dead_letter_exchange;
    let dlq = &config.dead_letter_queue;
    let dead_letters = Setting::queue("amqp.dead_letter_queue", dlq);
    declare_exchange(
        channel,
        ExchangeKind::Fanout,
        "amqp.dead_letter_exchange",
        dlx,
    )
    .await?;
    declare_queue(channel, FieldTable::default(), dead_letters).await?;
    bind(channel, dlq, dlx, "", dead_letters).await?;

    let requests = &config.request_queue;
    let arguments = request_queue_arguments(config);
    declare_queue(
        channel,
        arguments,
        Setting::queue("amqp.request_queue", requests),
    )
    .await?;
    for exchange in &config.request_exchanges {
        let key = "amqp.request_exchanges";
        declare_exchange(channel, ExchangeKind::Direct, key, exchange).await?;
        let setting = Setting::exchange(key, exchange);
        bind(channel, requests, exchange, requests, setting).await?;
    }

    let results = &config.results_exchange;
    declare_exchange(
        channel,
        ExchangeKind::Topic,
        "amqp.results_exchange",
        results,
    )
    .await
}

/// The setting that names a broker object, for the fix a mismatch message gives.
#[derive(Clone, Copy)]
struct Setting<'a> {
    /// The configuration key, e.g. `amqp.request_queue`.
    key: &'a str,
    /// "queue" or "exchange".
    kind: &'a str,
    /// The object's name.
    name: &'a str,
}

impl<'a> Setting<'a> {
    fn queue(key: &'a str, name: &'a str) -> Self {
        Setting {
            key,
            kind: "queue",
            name,
        }
    }

    fn exchange(key: &'a str, name: &'a str) -> Self {
        Setting {
            key,
            kind: "exchange",
            name,
        }
    }

    fn explain(self, error: lapin::Error, object: String) -> TopologyError {
        explain(error, object, self.key, self.kind, self.name)
    }
}

/// Declares a durable exchange named by the setting `key`.
async fn declare_exchange(
    channel: &Channel,
    kind: ExchangeKind,
    key: &str,
    name: &str,
) -> Result<(), TopologyError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(name.into(), kind, durable, FieldTable::default())
        .await
        .map_err(|e| Setting::exchange(key, name).explain(e, format!("exchange '{name}'")))
}

/// Declares a durable queue with `arguments`.
async fn declare_queue(
    channel: &Channel,
    arguments: FieldTable,
    setting: Setting<'_>,
) -> Result<(), TopologyError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let name = setting.name;
    channel
        .queue_declare(name.into(), durable, arguments)
        .await
        .map(|_| ())
        .map_err(|e| setting.explain(e, format!("queue '{name}'")))
}

/// Binds `queue` to `exchange` with `routing_key`; `setting` is the one a failure points to.
async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
    setting: Setting<'_>,
) -> Result<(), TopologyError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| setting.explain(e, format!("binding of '{queue}' to '{exchange}'")))
}

/// Turns PRECONDITION_FAILED into a `Mismatch` with the fix; anything else stays a broker error.
fn explain(
    error: lapin::Error,
    object: String,
    key: &str,
    kind: &str,
    name: &str,
) -> TopologyError {
    if let lapin::ErrorKind::ProtocolError(amqp) = error.kind() {
        if matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
        ) {
            let delete = if kind == "queue" {
                format!("rabbitmqctl delete_queue '{name}'")
            } else {
                format!("rabbitmqadmin delete exchange name='{name}'")
            };
            return TopologyError::Mismatch {
                object,
                server: amqp.get_message().to_string(),
                fix: format!(
                    "Either move its messages away and delete it ({delete}) so the worker can declare it as contract v1 requires, or configure another name with {key}."
                ),
            };
        }
    }
    TopologyError::Broker {
        object,
        source: error,
    }
}
