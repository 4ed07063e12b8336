//! The broker side: topology declaration (`topology`), confirmed publishing (`publisher`), the
//! policy for `reply_to` names (`reply_to`), and the connection helper shared by the worker and
//! the command-line tools.

pub mod publisher;
pub mod reply_to;
pub mod topology;

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::config::{redact_url, Secret};

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Broker { url: String, source: lapin::Error },
    #[error("cannot connect to RabbitMQ at {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// Opens a named connection (the name shows in `rabbitmqctl list_connections name`, so an
/// operator or a test can find and close exactly this one).
pub async fn connect(
    url: &Secret,
    name: &str,
    timeout: Duration,
) -> Result<Connection, ConnectError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(timeout, Connection::connect(url.expose(), properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(ConnectError::Broker {
            url: redact_url(url.expose()),
            source,
        }),
        Err(_) => Err(ConnectError::Timeout {
            url: redact_url(url.expose()),
            timeout,
        }),
    }
}

/// The header that keeps a `user_id` the copy could not carry.
pub const ORIGINAL_USER_HEADER: &str = "x-swr-original-user-id";

/// The properties for a copy of a consumed message that the worker or a tool publishes again
/// (a DLQ copy, a replayed request): the original's, with `headers`, made persistent so the copy
/// survives a broker restart. Two are not copied, as RabbitMQ's own dead-lettering does not keep
/// the first either: `expiration` (a copy must not expire out of the queue it goes to), and a
/// `user_id` naming another user than `login`, the publishing connection's user (the broker
/// refuses such a publish, every time the message came back); that one goes to the header
/// [`ORIGINAL_USER_HEADER`].
pub fn copied_properties(
    original: &BasicProperties,
    mut headers: FieldTable,
    login: &str,
) -> BasicProperties {
    let mut copy = BasicProperties::default().with_delivery_mode(2);
    match original.user_id() {
        Some(user) if user.as_str() == login => copy = copy.with_user_id(user.clone()),
        Some(user) => {
            headers.insert(
                ORIGINAL_USER_HEADER.into(),
                AMQPValue::LongString(LongString::from(user.as_str())),
            );
        }
        None => {}
    }
    copy = copy.with_headers(headers);
    let o = original;
    type Set = fn(BasicProperties, ShortString) -> BasicProperties;
    let strings: [(&Option<ShortString>, Set); 8] = [
        (o.content_type(), BasicProperties::with_content_type),
        (o.content_encoding(), BasicProperties::with_content_encoding),
        (o.correlation_id(), BasicProperties::with_correlation_id),
        (o.reply_to(), BasicProperties::with_reply_to),
        (o.message_id(), BasicProperties::with_message_id),
        (o.kind(), BasicProperties::with_type),
        (o.app_id(), BasicProperties::with_app_id),
        (o.cluster_id(), BasicProperties::with_cluster_id),
    ];
    for (value, set) in strings {
        if let Some(value) = value {
            copy = set(copy, value.clone());
        }
    }
    if let Some(priority) = original.priority() {
        copy = copy.with_priority(*priority);
    }
    if let Some(timestamp) = original.timestamp() {
        copy = copy.with_timestamp(*timestamp);
    }
    copy
}
