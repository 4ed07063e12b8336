//! The broker side: topology declaration (`topology`), confirmed publishing (`publisher`), and
//! the connection helper shared by the worker and the command-line tools.

pub mod publisher;
pub mod topology;

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

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
