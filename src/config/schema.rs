//! The shape of the configuration: one struct per section of `config/default.toml`, the enums
//! of its closed sets of words, and the readers of values TOML has no type for (durations,
//! `amqp.url` lists, `amqp.reply_to`). Checks that a type cannot express are in `validate`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::ConfigError;
use crate::secret::Secret;
use crate::tls;

/// The whole configuration, one struct per section of `config/default.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Broker connection and topology names.
    pub amqp: AmqpConfig,
    /// Where SWR is and how to authenticate.
    pub swr: SwrConfig,
    /// Where IAM is, for `swr.auth.kind = "iam_password"`.
    pub iam: IamConfig,
    /// Per-attempt HTTP limits.
    pub http: HttpConfig,
    /// The retry schedule for transient failures.
    pub retry: RetryConfig,
    /// Parallelism and identity of this worker.
    pub worker: WorkerConfig,
    /// Input size limits.
    pub limits: LimitsConfig,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
    /// The loop guard.
    pub guard: GuardConfig,
    /// The idempotency store.
    pub idempotency: IdempotencyConfig,
    /// Drain behaviour on SIGTERM/SIGINT.
    pub shutdown: ShutdownConfig,
    /// The health, readiness and metrics endpoint.
    pub telemetry: TelemetryConfig,
    /// Log level and format.
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// Broker URL, or several separated by commas (a TOML array in a file): the nodes of a
    /// cluster. Holds passwords, so it is a secret (see [`crate::amqp::redact_urls`]).
    #[serde(deserialize_with = "url_list")]
    pub url: Secret,
    /// The order the worker tries the brokers in: shuffled once per process (a fleet spreads
    /// over the nodes) or as written.
    pub failover_order: FailoverOrder,
    /// Queue consumed for requests.
    pub request_queue: String,
    /// Extra exchanges bound to the request queue (routing key = queue name).
    pub request_exchanges: Vec<String>,
    /// Fanout exchange for unreadable or invalid requests.
    pub dead_letter_exchange: String,
    /// Queue bound to the DLX.
    pub dead_letter_queue: String,
    /// Topic exchange for outcomes.
    pub results_exchange: String,
    /// Connection name shown by the broker, so operators (and tests) can find this connection.
    pub connection_name: String,
    /// Handshake limit per connection attempt.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Limit for a publisher confirm; past it the delivery is requeued.
    #[serde(deserialize_with = "duration")]
    pub confirm_timeout: Duration,
    /// Cap on the pause between reconnection attempts.
    #[serde(deserialize_with = "duration")]
    pub reconnect_max_interval: Duration,
    /// The broker's consumer_timeout, which a job's whole budget must fit in.
    #[serde(deserialize_with = "duration")]
    pub consumer_timeout: Duration,
    /// TLS settings for an `amqps://` URL.
    pub tls: AmqpTlsConfig,
    /// Which `reply_to` names get a copy of the outcome: a producer must not be able to make
    /// the worker fill any queue of the vhost (see [`crate::amqp::reply_to`]).
    pub reply_to: ReplyToPolicy,
}

/// `amqp.reply_to`, parsed: which `reply_to` queue names the worker publishes outcomes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyToPolicy {
    /// `"safe"` (the default): every name but the worker's own topology names and the broker's
    /// `amq.*` names other than direct reply-to.
    Safe,
    /// `"any"`: every name, as before the key existed.
    Any,
    /// `"deny"`: no name; outcomes go to the results exchange only.
    Deny,
    /// A list of prefixes: names starting with one of them, never the worker's own topology names.
    Prefixes(Vec<String>),
}

/// The words `amqp.reply_to` takes besides a list.
pub(super) const REPLY_TO_WORDS: [&str; 3] = ["safe", "any", "deny"];

/// What `amqp.reply_to` accepts, for its errors.
const REPLY_TO_EXPECTED: &str = "\"safe\", \"any\", \"deny\", or an array of queue-name prefixes such as [\"replies.\", \"amq.rabbitmq.reply-to\"]";

impl<'de> Deserialize<'de> for ReplyToPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Policy;
        impl<'de> serde::de::Visitor<'de> for Policy {
            type Value = ReplyToPolicy;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(REPLY_TO_EXPECTED)
            }
            fn visit_str<E: serde::de::Error>(self, word: &str) -> Result<ReplyToPolicy, E> {
                match word {
                    "safe" => Ok(ReplyToPolicy::Safe),
                    "any" => Ok(ReplyToPolicy::Any),
                    "deny" => Ok(ReplyToPolicy::Deny),
                    _ => Err(E::custom(format!(
                        "expected {REPLY_TO_EXPECTED}, got {word:?}"
                    ))),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ReplyToPolicy, A::Error> {
                let mut prefixes = Vec::new();
                while let Some(ReplyToPrefix(prefix)) = seq.next_element()? {
                    prefixes.push(prefix);
                }
                if prefixes.is_empty() {
                    // One way to refuse every reply_to, and it says so in its name.
                    return Err(serde::de::Error::custom(
                        "an empty list would honour no reply_to; write \"deny\" for that",
                    ));
                }
                Ok(ReplyToPolicy::Prefixes(prefixes))
            }
        }
        d.deserialize_any(Policy)
    }
}

/// One prefix of an `amqp.reply_to` list.
struct ReplyToPrefix(
    /// The prefix: not empty, and not one of the policy words.
    String,
);

impl<'de> Deserialize<'de> for ReplyToPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Prefix;
        impl serde::de::Visitor<'_> for Prefix {
            type Value = ReplyToPrefix;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a queue-name prefix (a non-empty string) such as \"replies.\"")
            }
            fn visit_str<E: serde::de::Error>(self, prefix: &str) -> Result<ReplyToPrefix, E> {
                if prefix.is_empty() {
                    // An empty prefix matches every name: "any" written by accident.
                    return Err(E::custom(
                        "a prefix cannot be empty (it would match every queue); write \"any\" to honour every reply_to",
                    ));
                }
                if REPLY_TO_WORDS
                    .iter()
                    .any(|w| prefix.eq_ignore_ascii_case(w))
                {
                    // A policy word in a list is almost surely a policy meant on its own (a
                    // misspelt environment value is read as a list).
                    return Err(E::custom(format!(
                        "{prefix:?} is a policy word, not a prefix: write it alone, lower-case (\"{}\")",
                        prefix.to_ascii_lowercase()
                    )));
                }
                Ok(ReplyToPrefix(prefix.to_owned()))
            }
        }
        d.deserialize_str(Prefix)
    }
}

/// `[amqp.tls]` (contract §7): used only with an `amqps://` URL, where verification is always on.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpTlsConfig {
    /// PEM CA file added to the system's roots, for a broker with a private CA.
    pub ca_file: String,
    /// PEM certificate chain presented to the broker (mutual TLS, `auth_mechanism=external`).
    pub client_cert_file: String,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: String,
    /// Name verified and sent as SNI instead of the URL's host (a broker reached by IP address).
    pub server_name: String,
}

impl AmqpTlsConfig {
    /// True when any key is set: such a config with a plain `amqp://` URL is a mistake.
    pub fn is_set(&self) -> bool {
        !(self.ca_file.is_empty()
            && self.client_cert_file.is_empty()
            && self.client_key_file.is_empty()
            && self.server_name.is_empty())
    }

    /// The rustls client configuration for the broker: system roots plus `ca_file`, the client
    /// certificate when set, full verification.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, tls::TlsSetupError> {
        let roots = tls::roots(tls::CaFile {
            key: "amqp.tls.ca_file",
            path: &self.ca_file,
        })?;
        let identity = (!self.client_cert_file.is_empty()).then_some(tls::ClientIdentity {
            cert_key: "amqp.tls.client_cert_file",
            cert_path: &self.client_cert_file,
            key_key: "amqp.tls.client_key_file",
            key_path: &self.client_key_file,
        });
        tls::client_config(roots, identity, tls::Check::Full)
    }
}

impl AmqpConfig {
    /// Names every broker object and the connection after `prefix` (`<prefix>.requests`,
    /// `.dlx`, `.dead`, `.results`, `.worker`) and binds no extra exchanges: how the demo, the
    /// benchmark and the tests keep their objects apart from a real worker's.
    pub fn name_after(&mut self, prefix: &str) {
        self.request_queue = format!("{prefix}.requests");
        self.request_exchanges = Vec::new();
        self.dead_letter_exchange = format!("{prefix}.dlx");
        self.dead_letter_queue = format!("{prefix}.dead");
        self.results_exchange = format!("{prefix}.results");
        self.connection_name = format!("{prefix}.worker");
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwrConfig {
    /// Base URL of the SWR API.
    pub endpoint: String,
    /// Pace of SWR calls per process; 0 = unlimited.
    pub max_requests_per_second: f64,
    /// Token source settings.
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Which token source to use.
    pub kind: AuthKind,
    /// The static token.
    pub token: Secret,
    /// IAM user the worker signs in as (iam_password).
    pub user: String,
    /// Account (domain) name that owns `user`; IAM needs it to find the user.
    pub domain: String,
    /// Project name the token is scoped to; SWR only accepts project-scoped tokens.
    pub project: String,
    /// Name of the environment variable that holds the password, so the password stays out of
    /// files that get copied, committed and printed.
    pub password_env: String,
    /// File that holds the password (mounted secrets); takes precedence over `password_env`.
    pub password_file: String,
    /// How long before `expires_at` a token is renewed, so no job sends a token about to lapse.
    #[serde(deserialize_with = "duration")]
    pub refresh_ahead: Duration,
    /// The value of the `password_env` variable, captured by [`Config::load`] from the environment
    /// it was given (not a key: no file or override can set it). Empty unless kind is iam_password.
    #[serde(skip)]
    pub password_from_env: Secret,
}

impl AuthConfig {
    /// The IAM password: the first line of `password_file` when it is set, else the variable
    /// named by `password_env`. Errors name the key and never contain the password.
    pub fn iam_password(&self) -> Result<Secret, ConfigError> {
        if !self.password_file.is_empty() {
            let text =
                std::fs::read_to_string(&self.password_file).map_err(|e| ConfigError::Invalid {
                    key: "swr.auth.password_file",
                    message: format!("cannot read {:?}: {e}", self.password_file),
                })?;
            // Secret files usually end with a newline that is not part of the password.
            let password = text.lines().next().unwrap_or("");
            if password.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "swr.auth.password_file",
                    message: format!(
                        "{:?} holds no password on its first line",
                        self.password_file
                    ),
                });
            }
            return Ok(Secret::new(password));
        }
        if self.password_from_env.is_empty() {
            return Err(ConfigError::Invalid {
                key: "swr.auth.password_env",
                message: format!(
                    "expected the IAM password in the environment variable {} (or set swr.auth.password_file)",
                    self.password_env
                ),
            });
        }
        Ok(self.password_from_env.clone())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IamConfig {
    /// Base URL of IAM; only configuration sets it, like `swr.endpoint`.
    pub endpoint: String,
    /// Limit for one token request, so a hung IAM cannot hold every job waiting for a token.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Whole-attempt limit.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// TCP connect limit.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Cap on the answer body read, so a misbehaving server cannot make us buffer without bound.
    pub max_response_bytes: usize,
    /// PEM CA file added to the system's roots for SWR and IAM (a private CA on premises).
    pub ca_file: String,
    /// Allows an `http://` SWR or IAM endpoint on a host that is not loopback (the token would
    /// cross the network in clear, so it takes a deliberate switch).
    pub allow_plain_http: bool,
}

impl HttpConfig {
    /// The rustls client configuration for SWR and IAM: system roots plus `ca_file`.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, tls::TlsSetupError> {
        let roots = tls::roots(tls::CaFile {
            key: "http.ca_file",
            path: &self.ca_file,
        })?;
        tls::client_config(roots, None, tls::Check::Full)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First back-off interval.
    #[serde(deserialize_with = "duration")]
    pub initial_interval: Duration,
    /// Growth factor per attempt.
    pub multiplier: f64,
    /// Cap on one interval.
    #[serde(deserialize_with = "duration")]
    pub max_interval: Duration,
    /// Budget for all attempts of one job.
    #[serde(deserialize_with = "duration")]
    pub max_elapsed: Duration,
    /// Most attempts for one job.
    pub max_attempts: u32,
    /// Jitter fraction.
    pub randomization_factor: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Jobs at once, and the prefetch.
    pub concurrency: u32,
    /// Worker name in outcomes; empty means hostname/pid.
    pub id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted request body.
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Whether the breaker gates deliveries at all.
    pub enabled: bool,
    /// Recent attempts judged.
    pub window: usize,
    /// Fewest attempts before it may open.
    pub min_calls: usize,
    /// Failure share that opens it.
    pub failure_ratio: f64,
    /// Open time before a probe.
    #[serde(deserialize_with = "duration")]
    pub cooldown: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    /// Executions allowed per window and (pipeline, stage, mode); 0 = off.
    pub max_executions: u32,
    /// The window.
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// Which store keeps the claims and outcomes, if any.
    pub backend: IdempotencyBackend,
    /// SQLite file for the embedded backend.
    pub path: String,
    /// PostgreSQL URL (may hold a password).
    pub url: Secret,
    /// Lifetime of records.
    #[serde(deserialize_with = "duration")]
    pub ttl: Duration,
    /// Claim lease; `"auto"` in the file ([`Config::auto_lease`]) is resolved by [`Config::load`].
    #[serde(deserialize_with = "duration_or_auto")]
    pub lease: Duration,
    /// Longest wait of a duplicate for the running copy.
    #[serde(deserialize_with = "duration")]
    pub hold: Duration,
    /// Pruning period.
    #[serde(deserialize_with = "duration")]
    pub prune_interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Drain budget for in-flight jobs.
    #[serde(deserialize_with = "duration")]
    pub grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Listen address; empty disables the server.
    pub listen: String,
    /// True when `listen` is the built-in default, set by neither the file nor the environment:
    /// that address may be taken by another worker on the host, and the server then picks a free
    /// port instead of stopping the worker.
    #[serde(skip)]
    pub listen_is_default: bool,
    /// OTLP/HTTP collector base URL; empty disables span export.
    pub otlp_endpoint: String,
    /// Collector request headers, `name=value,...`: may hold an API key.
    pub otlp_headers: Secret,
    /// One export request, at most.
    #[serde(deserialize_with = "duration")]
    pub otlp_timeout: Duration,
    /// Finished spans waiting for export, at most.
    pub otlp_queue: usize,
}

impl TelemetryConfig {
    /// Whether span export is on.
    pub fn otlp_enabled(&self) -> bool {
        !self.otlp_endpoint.trim().is_empty()
    }

    /// The URL spans are posted to: the collector's base URL plus `/v1/traces`, as
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` does; a URL that already ends with it is used as written.
    pub fn otlp_traces_url(&self) -> String {
        let endpoint = self.otlp_endpoint.trim();
        if endpoint.trim_end_matches('/').ends_with("/v1/traces") {
            endpoint.to_owned()
        } else {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        }
    }

    /// `otlp_headers` (`name=value,name=value`, as `OTEL_EXPORTER_OTLP_HEADERS`), each a valid
    /// header. An error names the entry by its position, never its value (a secret).
    pub fn otlp_headers(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let bad = |message: String| ConfigError::Invalid {
            key: "telemetry.otlp_headers",
            message,
        };
        let mut headers = Vec::new();
        for (i, entry) in self.otlp_headers.expose().split(',').enumerate() {
            if entry.trim().is_empty() {
                continue;
            }
            let n = i + 1;
            let Some((name, value)) = entry.split_once('=') else {
                return Err(bad(format!(
                    "entry {n} is not name=value (expected name=value pairs separated by commas)"
                )));
            };
            let (name, value) = (name.trim(), value.trim());
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(bad(format!(
                    "entry {n}: {name:?} is not a valid header name"
                )));
            }
            if http::HeaderValue::from_str(value).is_err() {
                return Err(bad(format!(
                    "entry {n} ({name}): the value is not a valid header value (printable ASCII)"
                )));
            }
            headers.push((name.to_owned(), value.to_owned()));
        }
        Ok(headers)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Default filter when RUST_LOG is unset; its syntax is the log subscriber's, checked at
    /// start-up by [`crate::telemetry::check_level`], not here.
    pub level: String,
    /// How log lines are written.
    pub format: LogFormat,
}

/// `swr.auth.kind`: where the worker's SWR tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    /// `"static"`: `swr.auth.token`, used as it is.
    Static,
    /// `"iam_password"`: signed in to IAM with a password, renewed before expiry.
    IamPassword,
}

/// `idempotency.backend`: where claims and stored outcomes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdempotencyBackend {
    /// `"embedded"`: a SQLite file of this worker's own (`idempotency.path`).
    Embedded,
    /// `"postgres"`: a database shared by a fleet (`idempotency.url`).
    Postgres,
    /// `"off"`: no store; every delivery runs.
    Off,
}

/// `log.format`: log lines for people or for log stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `"text"`: one human-readable line per event.
    Text,
    /// `"json"`: one JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = serde::de::value::Error;

    /// The same words as in a file or the environment (`--log-format` takes them too).
    fn from_str(word: &str) -> Result<Self, Self::Err> {
        LogFormat::deserialize(serde::de::IntoDeserializer::into_deserializer(word))
    }
}

/// The value of `idempotency.lease` that asks for [`Config::auto_lease`].
pub(super) const AUTO: &str = "auto";

/// `amqp.failover_order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverOrder {
    /// A random order, drawn once per process.
    Shuffle,
    /// The order written in `amqp.url`.
    InOrder,
}

/// `amqp.url` as a string (one URL, or several separated by commas) or an array of URLs; kept
/// as one comma-separated secret either way.
fn url_list<'de, D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Secret::new(match OneOrMany::deserialize(d)? {
        OneOrMany::One(url) => url,
        OneOrMany::Many(urls) => urls.join(","),
    }))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    parse_duration(&String::deserialize(d)?, "")
}

/// A duration, or `"auto"`, read as zero here and resolved by [`Config::load`].
fn duration_or_auto<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match String::deserialize(d)? {
        text if text == AUTO => Ok(Duration::ZERO),
        text => parse_duration(&text, "\"auto\" or "),
    }
}

/// The longest duration any key takes: 100 years (humantime's, of 365.25 days). Longer ones are
/// refused, naming the key: added to a clock or a database's timestamp (a TTL in PostgreSQL,
/// which ends in the year 294276), they overflow; shorter, they mean "never" for any worker.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// `text` as a humantime duration up to [`MAX_DURATION`]; the error says what is expected,
/// after `also`.
fn parse_duration<E: serde::de::Error>(text: &str, also: &str) -> Result<Duration, E> {
    let expected = |why: String| {
        E::custom(format!(
            "expected {also}a duration such as \"200ms\", \"30s\", \"5m\", \"7d\", up to \"100y\", got {text:?} ({why})"
        ))
    };
    match humantime::parse_duration(text) {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        Ok(_) => Err(expected("longer than 100 years".into())),
        Err(e) => Err(expected(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_env::{env, iam_env};
    use super::*;

    #[test]
    fn the_collector_url_gets_the_traces_path_and_a_full_one_is_kept() {
        let url = |endpoint: &str| {
            TelemetryConfig {
                otlp_endpoint: endpoint.to_owned(),
                ..telemetry()
            }
            .otlp_traces_url()
        };
        assert_eq!(url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(url("https://c/otlp"), "https://c/otlp/v1/traces");
        assert_eq!(url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
    }

    #[test]
    fn collector_headers_are_name_value_pairs_and_errors_never_show_a_value() {
        let headers = |text: &str| {
            TelemetryConfig {
                otlp_headers: Secret::new(text),
                ..telemetry()
            }
            .otlp_headers()
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            headers("api-key=s3cret, x-team = ops ,").unwrap(),
            vec![
                ("api-key".to_owned(), "s3cret".to_owned()),
                ("x-team".to_owned(), "ops".to_owned())
            ]
        );
        assert_eq!(headers("").unwrap(), vec![]);
        let e = headers("api-key").unwrap_err();
        assert!(
            e.contains("telemetry.otlp_headers")
                && e.contains("entry 1")
                && e.contains("name=value"),
            "{e}"
        );
        let e = headers("a=1,bad name=s3cret").unwrap_err();
        assert!(e.contains("entry 2") && !e.contains("s3cret"), "{e}");
        let e = headers("k=s3cret\u{1}").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
    }

    fn telemetry() -> TelemetryConfig {
        TelemetryConfig {
            listen: String::new(),
            listen_is_default: false,
            otlp_endpoint: String::new(),
            otlp_headers: Secret::new(""),
            otlp_timeout: Duration::from_secs(10),
            otlp_queue: 4096,
        }
    }

    #[test]
    fn reply_to_is_safe_by_default_and_takes_a_word_or_prefixes() {
        let policy = |pairs: &[(&str, &str)]| Config::load(None, env(pairs)).unwrap().amqp.reply_to;
        let var = "SWR_STAGE_WORKER__AMQP__REPLY_TO";
        assert_eq!(policy(&[]), ReplyToPolicy::Safe);
        assert_eq!(policy(&[(var, "safe")]), ReplyToPolicy::Safe);
        assert_eq!(policy(&[(var, "any")]), ReplyToPolicy::Any);
        assert_eq!(policy(&[(var, "deny")]), ReplyToPolicy::Deny);
        let listed =
            ReplyToPolicy::Prefixes(vec!["replies.".into(), "amq.rabbitmq.reply-to".into()]);
        assert_eq!(policy(&[(var, "replies., amq.rabbitmq.reply-to")]), listed);
        assert_eq!(
            policy(&[(var, "replies.")]),
            ReplyToPolicy::Prefixes(vec!["replies.".into()])
        );

        let dir = std::env::temp_dir().join(format!("swr-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("reply-to.toml");
        let load = |text: &str| {
            std::fs::write(&file, format!("[amqp]\nreply_to = {text}\n")).unwrap();
            Config::load(Some(&file), env(&[])).map(|c| c.amqp.reply_to)
        };
        assert_eq!(
            load(r#"["replies.", "amq.rabbitmq.reply-to"]"#).unwrap(),
            listed
        );
        assert_eq!(load(r#""deny""#).unwrap(), ReplyToPolicy::Deny);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bad_reply_to_names_the_key_and_what_is_allowed() {
        let dir = std::env::temp_dir().join(format!("swr-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("reply-to.toml");
        for (text, says) in [
            (
                "5",
                r#""safe", "any", "deny", or an array of queue-name prefixes"#,
            ),
            (r#""everything""#, r#""safe", "any", "deny", or an array"#),
            (r#""""#, r#""safe", "any", "deny", or an array"#),
            (r#"[""]"#, "a prefix cannot be empty"),
            (
                r#"["replies.", 7]"#,
                "a queue-name prefix (a non-empty string)",
            ),
            ("[]", "write \"deny\""),
            (r#"["Deny"]"#, "a policy word, not a prefix"),
        ] {
            std::fs::write(&file, format!("[amqp]\nreply_to = {text}\n")).unwrap();
            let err = Config::load(Some(&file), env(&[])).unwrap_err().to_string();
            assert!(
                err.contains("amqp.reply_to") && err.contains(says),
                "reply_to = {text}: {err}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
        for (value, says) in [
            ("", "write \"deny\""),
            ("Any", "a policy word, not a prefix"),
            ("replies.,,safe", "a policy word, not a prefix"),
        ] {
            let err = Config::load(None, env(&[("SWR_STAGE_WORKER__AMQP__REPLY_TO", value)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("amqp.reply_to") && err.contains(says),
                "SWR_STAGE_WORKER__AMQP__REPLY_TO={value:?}: {err}"
            );
        }
    }

    #[test]
    fn bad_duration_names_key() {
        let err = Config::load(None, env(&[("SWR_STAGE_WORKER__HTTP__TIMEOUT", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("timeout") && err.contains("duration"), "{err}");
    }

    #[test]
    fn durations_longer_than_a_century_are_refused_naming_the_key() {
        let keys = [
            "amqp.connect_timeout",
            "amqp.confirm_timeout",
            "amqp.reconnect_max_interval",
            "amqp.consumer_timeout",
            "swr.auth.refresh_ahead",
            "iam.timeout",
            "http.timeout",
            "http.connect_timeout",
            "retry.initial_interval",
            "retry.max_interval",
            "retry.max_elapsed",
            "breaker.cooldown",
            "guard.window",
            "idempotency.ttl",
            "idempotency.lease",
            "idempotency.hold",
            "idempotency.prune_interval",
            "shutdown.grace",
        ];
        for key in keys {
            let var = format!(
                "SWR_STAGE_WORKER__{}",
                key.to_ascii_uppercase().replace('.', "__")
            );
            // A year past the cap, and as long as humantime reads at all.
            for value in ["101y", "100000000y", "500000000000y"] {
                let err = Config::load(None, env(&[(var.as_str(), value)]))
                    .unwrap_err()
                    .to_string();
                assert!(
                    err.contains(&format!("`{key}`")) && err.contains("up to \"100y\""),
                    "{key} = {value}: {err}"
                );
            }
        }
        // The cap itself is a valid value (the TTL's database timestamp has room for it).
        let c = Config::load(None, env(&[("SWR_STAGE_WORKER__IDEMPOTENCY__TTL", "100y")])).unwrap();
        assert_eq!(c.idempotency.ttl, MAX_DURATION);
    }

    #[test]
    fn iam_password_is_opt_in_with_documented_defaults() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.swr.auth.kind, AuthKind::Static);
        assert_eq!(c.swr.auth.password_env, "SWR_IAM_PASSWORD");
        assert_eq!(c.swr.auth.refresh_ahead, Duration::from_secs(3600));
        assert_eq!(c.iam.timeout, Duration::from_secs(10));
        assert!(c.swr.auth.password_from_env.is_empty());
        let c = Config::load(None, iam_env(&[])).unwrap();
        assert_eq!(c.swr.auth.kind, AuthKind::IamPassword);
        c.validate_for_worker().unwrap();
        assert_eq!(c.swr.auth.iam_password().unwrap().expose(), "hunter2-iam");
    }

    #[test]
    fn the_iam_password_never_prints() {
        let c = Config::load(None, iam_env(&[])).unwrap();
        let printed = format!("{c:?}");
        assert!(printed.contains("svc-swr"), "{printed}");
        assert!(!printed.contains("hunter2-iam"), "{printed}");
        let printed = format!("{:?}", c.swr.auth.iam_password().unwrap());
        assert!(!printed.contains("hunter2-iam"), "{printed}");
    }

    #[test]
    fn closed_sets_take_exactly_their_words_and_a_bad_one_names_the_key_and_the_words() {
        let c = |pairs: &[(&str, &str)]| Config::load(None, env(pairs));
        let loaded = c(&[
            ("SWR_STAGE_WORKER__IDEMPOTENCY__BACKEND", "postgres"),
            ("SWR_STAGE_WORKER__IDEMPOTENCY__URL", "postgres://db/idem"),
            ("SWR_STAGE_WORKER__LOG__FORMAT", "json"),
        ])
        .unwrap();
        assert_eq!(loaded.idempotency.backend, IdempotencyBackend::Postgres);
        assert_eq!(loaded.log.format, LogFormat::Json);
        let defaults = c(&[]).unwrap();
        assert_eq!(defaults.idempotency.backend, IdempotencyBackend::Embedded);
        assert_eq!(defaults.log.format, LogFormat::Text);
        let off = c(&[("SWR_STAGE_WORKER__IDEMPOTENCY__BACKEND", "off")]).unwrap();
        assert_eq!(off.idempotency.backend, IdempotencyBackend::Off);
        for (var, word, key, words) in [
            (
                "SWR_STAGE_WORKER__SWR__AUTH__KIND",
                "Static",
                "swr.auth.kind",
                "`static` or `iam_password`",
            ),
            (
                "SWR_STAGE_WORKER__IDEMPOTENCY__BACKEND",
                "sqlite",
                "idempotency.backend",
                "`embedded`, `postgres`, `off`",
            ),
            (
                "SWR_STAGE_WORKER__LOG__FORMAT",
                "JSON",
                "log.format",
                "`text` or `json`",
            ),
        ] {
            let err = c(&[(var, word)]).unwrap_err().to_string();
            assert!(
                err.contains(&format!("key `{key}`"))
                    && err.contains(&format!("`{word}`"))
                    && err.contains(words),
                "{var}={word}: {err}"
            );
        }
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert!("Json".parse::<LogFormat>().is_err());
    }
}
