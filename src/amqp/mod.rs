//! The broker side: topology declaration (`topology`), confirmed publishing (`publisher`), the
//! policy for `reply_to` names (`reply_to`), a job's deliveries and outcomes (`delivery`: the
//! adapter between lapin and the job's envelope and sink), the current session's publisher
//! (`session`), and the connection helper shared by the worker and the command-line tools.

pub mod delivery;
pub mod publisher;
pub mod reply_to;
pub mod session;
pub mod topology;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::config::{redact_url, AmqpTlsConfig, Secret};
use crate::tls;

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The broker refused or dropped the connection; `reason` is its text with any URL in it
    /// redacted (a refusal can quote the vhost, and a mistyped URL can put a password there).
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Broker { url: String, reason: String },
    /// Several brokers were tried and none answered: each one's reason.
    #[error("no broker answered: {}", join_errors(.0))]
    NoneAnswered(Vec<ConnectError>),
    #[error("cannot connect to RabbitMQ at {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// The TLS handshake failed: the reason and the key that fixes it.
    #[error("cannot connect to RabbitMQ at {url}: TLS: {failure}; {hint}")]
    Tls {
        url: String,
        failure: tls::Failure,
        hint: String,
    },
    /// The TLS settings themselves are unusable (a file went missing since start).
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    TlsSetup {
        url: String,
        source: tls::TlsSetupError,
    },
    #[error("amqp.url {url} is not a valid AMQP URL: {message}")]
    Url { url: String, message: String },
}

impl ConnectError {
    /// The TLS failure behind this error, if the handshake is what failed (with several
    /// brokers, the first one's that failed so).
    pub fn tls_failure(&self) -> Option<&tls::Failure> {
        match self {
            ConnectError::Tls { failure, .. } => Some(failure),
            ConnectError::NoneAnswered(all) => all.iter().find_map(ConnectError::tls_failure),
            _ => None,
        }
    }
}

fn join_errors(errors: &[ConnectError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// `text` with the password of every `scheme://user:password@` in it replaced by `***`.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        // The user info ends at the first '@' before any '/', whitespace or quote.
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '\'' || c == '"')
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at_sign) => {
                let userinfo = &tail[..at_sign];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                rest = &tail[at_sign..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// The broker addresses in `amqp.url`: one URL, or several separated by commas (the nodes of a
/// cluster, `AMQP_URL='amqp://h1/%2f,amqp://h2/%2f'`, or a TOML array). Never handed to the broker
/// whole: a list read as one URL would become a vhost, password and all.
pub fn broker_urls(url: &Secret) -> Vec<Secret> {
    url.expose()
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(Secret::new)
        .collect()
}

/// A list of broker URLs with every password hidden, for log lines and messages.
pub fn redact_urls(url: &Secret) -> String {
    broker_urls(url)
        .iter()
        .map(|u| redact_url(u.expose()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Opens a named connection to the first broker of `amqp.url` that answers, trying them in the
/// order written (the worker's own sessions rotate with [`connect_from`]).
pub async fn connect(
    url: &Secret,
    tls_config: &AmqpTlsConfig,
    name: &str,
    timeout: Duration,
) -> Result<Connection, ConnectError> {
    connect_from(&broker_urls(url), 0, tls_config, name, timeout)
        .await
        .map(|(connection, _)| connection)
}

/// Tries `urls` from `start` on, round the list once, each within `timeout`; returns the
/// connection and the index of the broker that answered. When none does, the error names each
/// broker's reason (one broker: its error as it is).
pub async fn connect_from(
    urls: &[Secret],
    start: usize,
    tls_config: &AmqpTlsConfig,
    name: &str,
    timeout: Duration,
) -> Result<(Connection, usize), ConnectError> {
    let mut failures = Vec::new();
    for step in 0..urls.len() {
        let index = (start + step) % urls.len();
        match connect_one(&urls[index], tls_config, name, timeout).await {
            Ok(connection) => return Ok((connection, index)),
            Err(e) => failures.push(e),
        }
    }
    match failures.len() {
        0 => Err(ConnectError::Url {
            url: String::new(),
            message: "no broker URL given".into(),
        }),
        1 => Err(failures.remove(0)),
        _ => Err(ConnectError::NoneAnswered(failures)),
    }
}

/// Opens a named connection (the name shows in `rabbitmqctl list_connections name`, so an
/// operator or a test can find and close exactly this one).
///
/// An `amqps://` URL always goes through TLS with the broker's certificate and name verified
/// (roots: the system's store plus `tls.ca_file`); nothing, not even the AMQP protocol header,
/// is sent before the handshake succeeded. The connector is ours rather than lapin's so that
/// the roots, the client certificate and the verified name (`tls.server_name`) are the
/// configuration's, and a failed handshake can be told apart from a refused connection.
async fn connect_one(
    url: &Secret,
    tls_config: &AmqpTlsConfig,
    name: &str,
    timeout: Duration,
) -> Result<Connection, ConnectError> {
    let shown = || redact_url(url.expose());
    let invalid = |message: &str| ConnectError::Url {
        url: shown(),
        message: message.to_owned(),
    };
    // The parser's own message can quote the URL, password included: it is not passed on.
    let uri: AMQPUri = url
        .expose()
        .parse()
        .map_err(|_| invalid("expected amqp[s]://user:password@host:port/vhost"))?;
    // The host as written: lapin's parser reads an IPv6 literal (`[::1]`) as "localhost".
    let host = reqwest::Url::parse(url.expose())
        .ok()
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned()))
        .ok_or_else(|| invalid("expected a host name or address"))?;
    let port = uri.authority.port;
    let tls = match uri.scheme {
        AMQPScheme::AMQP => None,
        AMQPScheme::AMQPS => {
            let config = tls_config
                .client_config()
                .map_err(|source| ConnectError::TlsSetup {
                    url: shown(),
                    source,
                })?;
            let name = if tls_config.server_name.is_empty() {
                host.clone()
            } else {
                tls_config.server_name.clone()
            };
            Some((RustlsConnector::from(Arc::new(config)), name))
        }
    };
    let runtime = lapin::runtime::default_runtime().map_err(|source| ConnectError::Broker {
        url: shown(),
        reason: source.to_string(),
    })?;
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connecting = Connection::connector(
        uri,
        runtime,
        async move |_uri: AMQPUri, runtime| {
            // Bounded here too: this runs on lapin's I/O thread, which the caller's timeout
            // does not stop, so a peer that never answers would hold a thread and a socket.
            let open = async {
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                    .await?
                    .collect();
                let stream = AsyncTcpStream::connect(&runtime, addrs).await?;
                match &tls {
                    None => Ok(stream),
                    Some((connector, name)) => stream.into_rustls(connector, name).await,
                }
            };
            match tokio::time::timeout(timeout, open).await {
                Ok(result) => Ok(result?),
                Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
            }
        },
        properties,
    );
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(refused(&source, shown())),
        Err(_) => Err(ConnectError::Timeout {
            url: shown(),
            timeout,
        }),
    }
}

/// Why the broker at `url` (redacted) did not take the connection: a failed TLS handshake with
/// the key that fixes it, or the broker's reason with any URL in it redacted.
fn refused(source: &lapin::Error, url: String) -> ConnectError {
    match tls::Failure::find(source) {
        Some(failure) => ConnectError::Tls {
            url,
            hint: failure.hint(
                "amqp.tls.ca_file",
                Some("amqp.tls.server_name"),
                Some("amqp.tls.client_cert_file and amqp.tls.client_key_file"),
            ),
            failure,
        },
        None => ConnectError::Broker {
            url,
            reason: redact_text(&source.to_string()),
        },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_brokers_is_split_never_taken_as_one_url() {
        let urls = broker_urls(&Secret::new(
            "amqp://guest:pw@h:5681/%2f, amqp://guest:pw@h:5682/%2f,",
        ));
        let urls: Vec<&str> = urls.iter().map(Secret::expose).collect();
        assert_eq!(
            urls,
            ["amqp://guest:pw@h:5681/%2f", "amqp://guest:pw@h:5682/%2f"]
        );
        assert_eq!(
            redact_urls(&Secret::new("amqp://u:pw@a/%2f,amqps://u:pw@b/%2f")),
            "amqp://u:***@a/%2f,amqps://u:***@b/%2f"
        );
    }

    #[test]
    fn urls_inside_a_brokers_reply_lose_their_password() {
        let reply = "NOT_ALLOWED - vhost /,amqp://guest:hunter2@h:5682// not found";
        let shown = redact_text(reply);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("amqp://guest:***@h:5682//"), "{shown}");
        assert_eq!(redact_text("no url here"), "no url here");
        assert_eq!(redact_text("amqp://h/%2f"), "amqp://h/%2f");
    }
}
