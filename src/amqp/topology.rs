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
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let dlx = &config.dead_letter_exchange;
    channel
        .exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            explain(
                e,
                format!("exchange '{dlx}'"),
                "amqp.dead_letter_exchange",
                "exchange",
                dlx,
            )
        })?;
    let dlq = &config.dead_letter_queue;
    channel
        .queue_declare(dlq.as_str().into(), durable_queue, FieldTable::default())
        .await
        .map_err(|e| {
            explain(
                e,
                format!("queue '{dlq}'"),
                "amqp.dead_letter_queue",
                "queue",
                dlq,
            )
        })?;
    channel
        .queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            explain(
                e,
                format!("binding of '{dlq}' to '{dlx}'"),
                "amqp.dead_letter_queue",
                "queue",
                dlq,
            )
        })?;

    let requests = &config.request_queue;
    channel
        .queue_declare(
            requests.as_str().into(),
            durable_queue,
            request_queue_arguments(config),
        )
        .await
        .map_err(|e| {
            explain(
                e,
                format!("queue '{requests}'"),
                "amqp.request_queue",
                "queue",
                requests,
            )
        })?;
    for exchange in &config.request_exchanges {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Direct,
                durable_exchange,
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                explain(
                    e,
                    format!("exchange '{exchange}'"),
                    "amqp.request_exchanges",
                    "exchange",
                    exchange,
                )
            })?;
        channel
            .queue_bind(
                requests.as_str().into(),
                exchange.as_str().into(),
                requests.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                explain(
                    e,
                    format!("binding of '{requests}' to '{exchange}'"),
                    "amqp.request_exchanges",
                    "exchange",
                    exchange,
                )
            })?;
    }

    let results = &config.results_exchange;
    channel
        .exchange_declare(
            results.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            explain(
                e,
                format!("exchange '{results}'"),
                "amqp.results_exchange",
                "exchange",
                results,
            )
        })?;
    Ok(())
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
