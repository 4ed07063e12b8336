//! Typed configuration: the built-in defaults (`config/default.toml`), an optional file, then
//! environment overrides (contract §6), then `validate()`.
//!
//! Every key exists in `config/default.toml`; that file is the single list of keys and defaults, so
//! an environment variable or file key that is not there is an error naming it, never ignored.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::{Table, Value};

use crate::tls;

/// The defaults, compiled in so that the binary runs without any file beside it.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the per-key environment overrides: `SWR_STAGE_WORKER__<SECTION>__<KEY>`.
const ENV_PREFIX: &str = "SWR_STAGE_WORKER__";

/// Everything that can go wrong while loading configuration; each names the key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{origin}: unknown key `{key}` (every key is listed in config/default.toml)")]
    UnknownKey { origin: String, key: String },
    #[error("{origin}: key `{key}` expects {expected}, got {got:?}")]
    BadOverride {
        origin: String,
        key: String,
        expected: &'static str,
        got: String,
    },
    #[error("configuration: {0}")]
    Shape(String),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    /// A TLS file named by a key cannot be used; the message starts with that key.
    #[error("configuration: {0}")]
    Tls(#[from] tls::TlsSetupError),
}

/// A value that must never be printed: tokens, passwords. `Debug` and `Display` redact it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The only way to read the value; grep for it to audit where a secret goes.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "***" })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

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
const REPLY_TO_WORDS: [&str; 3] = ["safe", "any", "deny"];

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

    /// These names as environment overrides (contract §6), for running the binary as a child
    /// process against the same broker objects.
    pub fn names_env(&self) -> Vec<(String, String)> {
        [
            ("REQUEST_QUEUE", &self.request_queue),
            ("DEAD_LETTER_EXCHANGE", &self.dead_letter_exchange),
            ("DEAD_LETTER_QUEUE", &self.dead_letter_queue),
            ("RESULTS_EXCHANGE", &self.results_exchange),
            ("CONNECTION_NAME", &self.connection_name),
        ]
        .into_iter()
        .map(|(key, value)| (format!("{ENV_PREFIX}AMQP__{key}"), value.clone()))
        .collect()
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
    /// Which token source to use: "static" or "iam_password".
    pub kind: String,
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
    /// "embedded", "postgres" or "off".
    pub backend: String,
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Default filter when RUST_LOG is unset.
    pub level: String,
    /// "text" or "json".
    pub format: String,
}

/// The value of `idempotency.lease` that asks for [`Config::auto_lease`].
const AUTO: &str = "auto";

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

impl Config {
    /// Loads the defaults, then `file` (if any), then the given environment, and validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: Table = DEFAULT_TOML
            .parse()
            .expect("config/default.toml is valid TOML");
        // Kept whole because the password variable's name is only known once the keys are read.
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut listen_set = false;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let overlay: Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Syntax {
                        path: path.to_owned(),
                        message: e.message().to_owned(),
                    })?;
            listen_set |= overlay
                .get("telemetry")
                .and_then(|t| t.get("listen"))
                .is_some();
            merge(&mut table, overlay, &path.display().to_string(), "")?;
        }
        // The three named variables first, then the prefixed ones, so that a prefixed variable
        // wins whatever order the environment lists them in (README, "Configuration").
        let mut overrides: Vec<(bool, &str, String, &str)> = env
            .iter()
            .filter_map(|(name, raw)| {
                let named = match name.as_str() {
                    "AMQP_URL" => "amqp.url",
                    "SWR_ENDPOINT" => "swr.endpoint",
                    "SWR_AUTH_TOKEN" => "swr.auth.token",
                    _ => {
                        let rest = name.strip_prefix(ENV_PREFIX)?;
                        let key = rest.to_ascii_lowercase().replace("__", ".");
                        return Some((true, name.as_str(), key, raw.as_str()));
                    }
                };
                Some((false, name.as_str(), named.to_owned(), raw.as_str()))
            })
            .collect();
        overrides.sort_by_key(|(prefixed, ..)| *prefixed);
        for (_, name, key, raw) in &overrides {
            set_from_env(&mut table, name, key, raw)?;
            listen_set |= key == "telemetry.listen";
        }
        let auto_lease = matches!(
            table.get("idempotency").and_then(|t| t.get("lease")),
            Some(Value::String(s)) if s == AUTO
        );
        let mut config: Config =
            serde_path_to_error::deserialize(Value::Table(table)).map_err(|e| {
                ConfigError::Shape(format!("key `{}`: {}", e.path(), e.inner().message()))
            })?;
        if config.swr.auth.kind == "iam_password" {
            let wanted = &config.swr.auth.password_env;
            if let Some((_, value)) = env.iter().find(|(name, _)| name == wanted) {
                config.swr.auth.password_from_env = Secret::new(value.as_str());
            }
        }
        if auto_lease {
            config.idempotency.lease = config.auto_lease();
        }
        config.telemetry.listen_is_default = !listen_set;
        config.validate()?;
        Ok(config)
    }

    /// The lease `idempotency.lease = "auto"` stands for: twice `retry.max_elapsed`, and at
    /// least `retry.max_elapsed` + 2 × (`http.timeout` + `iam.timeout`), room for the last
    /// attempt, a token fetch, and the one re-authenticated attempt after a 401.
    pub fn auto_lease(&self) -> Duration {
        let per_attempt = self.http.timeout.saturating_add(self.iam.timeout);
        self.retry.max_elapsed.saturating_mul(2).max(
            self.retry
                .max_elapsed
                .saturating_add(per_attempt.saturating_mul(2)),
        )
    }

    /// Loads from the process: `--config` path (or SWR_STAGE_WORKER_CONFIG) and the environment.
    pub fn from_process(file: Option<&Path>) -> Result<Config, ConfigError> {
        let env_file = std::env::var_os("SWR_STAGE_WORKER_CONFIG").map(PathBuf::from);
        Config::load(file.or(env_file.as_deref()), std::env::vars())
    }

    /// Checks every value a type cannot express; the error names the key and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        }
        let urls = crate::amqp::broker_urls(&self.amqp.url);
        if urls.is_empty() {
            return invalid("amqp.url", "expected an amqp:// or amqps:// URL");
        }
        for url in &urls {
            if !(url.expose().starts_with("amqp://") || url.expose().starts_with("amqps://")) {
                return invalid(
                    "amqp.url",
                    format!(
                        "expected amqp:// or amqps:// URLs (several separated by commas), got {}",
                        redact_url(url.expose())
                    ),
                );
            }
        }
        self.validate_amqp_tls()?;
        for (key, name) in [
            ("amqp.request_queue", &self.amqp.request_queue),
            ("amqp.dead_letter_exchange", &self.amqp.dead_letter_exchange),
            ("amqp.dead_letter_queue", &self.amqp.dead_letter_queue),
            ("amqp.results_exchange", &self.amqp.results_exchange),
        ] {
            if name.is_empty() || name.len() > 255 {
                return invalid(key, "expected a name of 1..=255 bytes");
            }
        }
        if self.amqp.request_exchanges.iter().any(|e| e.is_empty()) {
            return invalid(
                "amqp.request_exchanges",
                "expected exchange names, not empty strings (the default exchange is always bound)",
            );
        }
        self.check_endpoint("swr.endpoint", &self.swr.endpoint)?;
        if !self.http.ca_file.is_empty() {
            self.http.client_config()?;
        }
        let auth = &self.swr.auth;
        match auth.kind.as_str() {
            "static" => {}
            "iam_password" => {
                for (key, value) in [
                    ("swr.auth.user", &auth.user),
                    ("swr.auth.domain", &auth.domain),
                    ("swr.auth.project", &auth.project),
                ] {
                    if value.trim().is_empty() {
                        return invalid(
                            key,
                            "expected a name when swr.auth.kind = \"iam_password\"",
                        );
                    }
                }
                if auth.password_env.is_empty() && auth.password_file.is_empty() {
                    return invalid(
                        "swr.auth.password_env",
                        "expected the name of the environment variable that holds the IAM password (or set swr.auth.password_file)",
                    );
                }
                self.check_endpoint("iam.endpoint", &self.iam.endpoint)?;
            }
            other => {
                return invalid(
                    "swr.auth.kind",
                    format!("expected \"static\" or \"iam_password\", got {other:?}"),
                )
            }
        }
        for (key, value) in [
            ("amqp.connect_timeout", self.amqp.connect_timeout),
            ("amqp.confirm_timeout", self.amqp.confirm_timeout),
            (
                "amqp.reconnect_max_interval",
                self.amqp.reconnect_max_interval,
            ),
            ("http.timeout", self.http.timeout),
            ("http.connect_timeout", self.http.connect_timeout),
            ("iam.timeout", self.iam.timeout),
            ("retry.initial_interval", self.retry.initial_interval),
            ("retry.max_interval", self.retry.max_interval),
            ("retry.max_elapsed", self.retry.max_elapsed),
            ("idempotency.ttl", self.idempotency.ttl),
            ("idempotency.lease", self.idempotency.lease),
            ("idempotency.hold", self.idempotency.hold),
            (
                "idempotency.prune_interval",
                self.idempotency.prune_interval,
            ),
        ] {
            if value.is_zero() {
                return invalid(key, "expected a duration greater than zero");
            }
        }
        if self.retry.max_interval < self.retry.initial_interval {
            return invalid(
                "retry.max_interval",
                "expected a value at least retry.initial_interval",
            );
        }
        if !(self.retry.multiplier >= 1.0 && self.retry.multiplier.is_finite()) {
            return invalid("retry.multiplier", "expected a number >= 1.0");
        }
        if !(0.0..=1.0).contains(&self.retry.randomization_factor) {
            return invalid(
                "retry.randomization_factor",
                "expected a number in 0.0..=1.0",
            );
        }
        if self.retry.max_attempts == 0 {
            return invalid("retry.max_attempts", "expected at least 1");
        }
        if !(1..=65535).contains(&self.worker.concurrency) {
            return invalid(
                "worker.concurrency",
                "expected 1..=65535 (it is also the AMQP prefetch count)",
            );
        }
        if self.limits.max_message_bytes == 0 {
            return invalid("limits.max_message_bytes", "expected at least 1");
        }
        if self.http.max_response_bytes == 0 {
            return invalid("http.max_response_bytes", "expected at least 1");
        }
        let idem = &self.idempotency;
        match idem.backend.as_str() {
            "off" => {}
            "embedded" if idem.path.is_empty() => {
                return invalid(
                    "idempotency.path",
                    "expected a file path for the embedded store",
                )
            }
            "embedded" => {}
            "postgres"
                if !idem.url.expose().starts_with("postgres://")
                    && !idem.url.expose().starts_with("postgresql://") =>
            {
                return invalid(
                    "idempotency.url",
                    "expected a postgres:// URL when idempotency.backend = \"postgres\"",
                )
            }
            "postgres" => {}
            other => {
                return invalid(
                    "idempotency.backend",
                    format!("expected \"embedded\", \"postgres\" or \"off\", got {other:?}"),
                )
            }
        }
        let longest_job = self.retry.max_elapsed.saturating_add(self.http.timeout);
        if idem.lease <= longest_job {
            return invalid(
                "idempotency.lease",
                format!(
                    "expected \"auto\" or more than retry.max_elapsed + http.timeout ({}): a shorter lease lets a second worker take over a job that is still running",
                    humantime::format_duration(longest_job)
                ),
            );
        }
        let longest_hold = longest_job.saturating_add(idem.hold);
        if longest_hold >= self.amqp.consumer_timeout {
            return invalid(
                "retry.max_elapsed",
                format!(
                    "retry.max_elapsed + http.timeout + idempotency.hold ({}) must stay under amqp.consumer_timeout ({}): RabbitMQ closes the channel of a delivery unacked that long",
                    humantime::format_duration(longest_hold),
                    humantime::format_duration(self.amqp.consumer_timeout)
                ),
            );
        }
        let rate = self.swr.max_requests_per_second;
        if !(rate == 0.0 || (rate >= MIN_RATE && rate.is_finite())) {
            return invalid(
                "swr.max_requests_per_second",
                format!("expected 0 (no limit) or a number from {MIN_RATE} (one call per 1,000 s) up, got {rate}"),
            );
        }
        let breaker = &self.breaker;
        if breaker.window == 0 {
            return invalid("breaker.window", "expected at least 1");
        }
        if breaker.min_calls == 0 || breaker.min_calls > breaker.window {
            return invalid("breaker.min_calls", "expected 1..=breaker.window");
        }
        if self.guard.max_executions > 0 && self.guard.window.is_zero() {
            return invalid(
                "guard.window",
                "expected a duration above 0 (a zero window counts nothing; set guard.max_executions = 0 to turn the loop guard off)",
            );
        }
        if !(breaker.failure_ratio > 0.0 && breaker.failure_ratio <= 1.0) {
            return invalid("breaker.failure_ratio", "expected a number in (0.0, 1.0]");
        }
        if !self.telemetry.listen.is_empty()
            && self
                .telemetry
                .listen
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return invalid(
                "telemetry.listen",
                format!(
                    "expected an address such as \"127.0.0.1:9464\", or \"\" to disable, got {:?}",
                    self.telemetry.listen
                ),
            );
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return invalid(
                "log.format",
                format!("expected \"text\" or \"json\", got {:?}", self.log.format),
            );
        }
        if !valid_log_filter(&self.log.level) {
            return invalid(
                "log.level",
                format!(
                    "expected a level (trace, debug, info, warn, error, off) or filter directives such as \"info,swr_stage_worker=debug\", got {:?}",
                    self.log.level
                ),
            );
        }
        Ok(())
    }

    /// The checks that only matter when the worker will call SWR (not for `sim` or `submit`).
    /// An SWR or IAM base URL: http(s), and `http://` only to a loopback host unless
    /// `http.allow_plain_http` (the token would cross the network in clear).
    fn check_endpoint(&self, key: &'static str, endpoint: &str) -> Result<(), ConfigError> {
        let parsed = match reqwest::Url::parse(endpoint) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => url,
            _ => {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!(
                        "expected an http:// or https:// base URL, got {:?}",
                        redact_url(endpoint)
                    ),
                })
            }
        };
        let host = parsed.host_str().unwrap_or_default();
        if parsed.scheme() == "http" && !tls::is_loopback_host(host) && !self.http.allow_plain_http
        {
            return Err(ConfigError::Invalid {
                key,
                message: format!(
                    "{} is plain http:// to {host}, which is not this machine: the token would \
                     cross the network in clear. Use https://, or set http.allow_plain_http = true \
                     if the network is trusted (e.g. a test stack)",
                    redact_url(endpoint)
                ),
            });
        }
        Ok(())
    }

    /// `[amqp.tls]`: its keys need an `amqps://` URL, the certificate and key come in pairs,
    /// and the files must load (so a typo stops start-up, not the first connect).
    fn validate_amqp_tls(&self) -> Result<(), ConfigError> {
        let tls_keys = &self.amqp.tls;
        let urls = crate::amqp::broker_urls(&self.amqp.url);
        let plain = urls
            .iter()
            .filter(|u| u.expose().starts_with("amqp://"))
            .count();
        if plain != 0 && plain != urls.len() {
            return Err(ConfigError::Invalid {
                key: "amqp.url",
                message: "mixes amqp:// and amqps:// brokers: a failover must not fall back to \
                          plain AMQP; use amqps:// for every node"
                    .into(),
            });
        }
        if plain != 0 {
            if tls_keys.is_set() {
                return Err(ConfigError::Invalid {
                    key: "amqp.url",
                    message:
                        "amqp.tls.* is set but the URL is plain amqp://: use amqps:// for TLS \
                              (nothing is ever sent in clear on an amqps:// URL)"
                            .into(),
                });
            }
            return Ok(());
        }
        if tls_keys.client_cert_file.is_empty() != tls_keys.client_key_file.is_empty() {
            let key = if tls_keys.client_cert_file.is_empty() {
                "amqp.tls.client_cert_file"
            } else {
                "amqp.tls.client_key_file"
            };
            return Err(ConfigError::Invalid {
                key,
                message: "amqp.tls.client_cert_file and amqp.tls.client_key_file go together"
                    .into(),
            });
        }
        if !tls_keys.server_name.is_empty() {
            tls::server_name("amqp.tls.server_name", &tls_keys.server_name)?;
        }
        tls_keys.client_config()?;
        Ok(())
    }

    pub fn validate_for_worker(&self) -> Result<(), ConfigError> {
        match self.swr.auth.kind.as_str() {
            "static" if self.swr.auth.token.is_empty() => Err(ConfigError::Invalid {
                key: "swr.auth.token",
                message: "expected a token: set SWR_AUTH_TOKEN (or swr.auth.token)".into(),
            }),
            "iam_password" => self.swr.auth.iam_password().map(drop),
            _ => Ok(()),
        }
    }

    /// The name this worker gives itself in outcomes and logs.
    pub fn worker_id(&self) -> String {
        if !self.worker.id.is_empty() {
            return self.worker.id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".to_owned());
        format!("{host}/{}", std::process::id())
    }
}

/// The lowest pace a rate setting takes (one per 1,000 s): below it the interval overflows.
pub const MIN_RATE: f64 = 0.001;

/// A `log.level` that means what it says: every comma-separated directive is a level (a name or
/// 0..=5), or names a target with a level or a path (`target=level`, `a::b`, `[span]`). A bare
/// word such as "verbose", a typo such as "lapin:debug" or a stray space ("info ") would
/// otherwise be read as a target name and silently hide every other log line.
fn valid_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let mut directives = filter.split(',').filter(|d| !d.is_empty()).peekable();
    let directives_ok = directives.peek().is_some()
        && directives.all(|directive| {
            let level = LEVELS.iter().any(|l| directive.eq_ignore_ascii_case(l))
                || matches!(directive, "0" | "1" | "2" | "3" | "4" | "5");
            let target = (directive.contains(['=', '[']) || directive.contains("::"))
                && !directive.starts_with('=')
                && !directive.replace("::", "").contains(':');
            directive.trim() == directive && (level || target)
        });
    directives_ok && tracing_subscriber::EnvFilter::try_new(filter).is_ok()
}

/// Deep-merges `overlay` into `base`, refusing keys that `base` (the defaults) does not have.
fn merge(base: &mut Table, overlay: Table, origin: &str, prefix: &str) -> Result<(), ConfigError> {
    for (key, value) in overlay {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (base.get_mut(&key), value) {
            (None, _) => {
                return Err(ConfigError::UnknownKey {
                    origin: origin.to_owned(),
                    key: path,
                })
            }
            (Some(Value::Table(inner)), Value::Table(over)) => merge(inner, over, origin, &path)?,
            (Some(slot), value) => *slot = value,
        }
    }
    Ok(())
}

/// Sets one key from an environment variable, converting the text to the default's type.
fn set_from_env(table: &mut Table, var: &str, key: &str, raw: &str) -> Result<(), ConfigError> {
    let unknown = || ConfigError::UnknownKey {
        origin: format!("environment variable {var}"),
        key: key.to_owned(),
    };
    let mut parts = key.split('.').peekable();
    let mut current = table;
    let slot = loop {
        let part = parts.next().ok_or_else(unknown)?;
        let entry = current.get_mut(part).ok_or_else(unknown)?;
        if parts.peek().is_none() {
            break entry;
        }
        current = match entry {
            Value::Table(inner) => inner,
            _ => return Err(unknown()),
        };
    };
    let bad = |expected: &'static str| ConfigError::BadOverride {
        origin: format!("environment variable {var}"),
        key: key.to_owned(),
        expected,
        // Never echo a secret back, even in an error.
        got: if key.ends_with("token") || key.ends_with("url") || key.ends_with("password") {
            "<redacted>".into()
        } else {
            raw.to_owned()
        },
    };
    let list = || {
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::String(s.to_owned()))
            .collect()
    };
    // `amqp.reply_to` is a word or a list of prefixes: from the environment, anything but one
    // of the words is read as a comma-separated list, as the list keys are.
    if key == "amqp.reply_to" && !REPLY_TO_WORDS.contains(&raw) {
        *slot = Value::Array(list());
        return Ok(());
    }
    *slot = match slot {
        Value::String(_) => Value::String(raw.to_owned()),
        Value::Integer(_) => Value::Integer(raw.trim().parse().map_err(|_| bad("an integer"))?),
        Value::Float(_) => Value::Float(raw.trim().parse().map_err(|_| bad("a number"))?),
        Value::Boolean(_) => Value::Boolean(raw.trim().parse().map_err(|_| bad("true or false"))?),
        Value::Array(_) => Value::Array(list()),
        Value::Table(_) | Value::Datetime(_) => return Err(unknown()),
    };
    Ok(())
}

/// An AMQP URL with its password replaced, for log lines.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            // PostgreSQL also takes the password as a query parameter (`?password=`, and
            // `sslpassword` for the client key).
            let secret = |name: &str| name.to_ascii_lowercase().contains("password");
            if parsed.query_pairs().any(|(name, _)| secret(&name)) {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(name, value)| {
                        let value = if secret(&name) { "***".into() } else { value };
                        (name.into_owned(), value.into_owned())
                    })
                    .collect();
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable url>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_and_directives_are_accepted_bare_words_are_not() {
        for good in [
            "info",
            "WARN",
            "info,swr_stage_worker=debug",
            "swr_stage_worker::worker=trace",
            "warn,lapin=off",
            "info,",
            "3",
            "swr_stage_worker::worker",
            "[job]=debug",
        ] {
            assert!(valid_log_filter(good), "{good:?} should be accepted");
        }
        for bad in [
            "verbose",
            "",
            " ",
            ",",
            "info,loud",
            "lapin=loud",
            "=debug",
            "info ",
            "warn, info",
            "lapin:debug",
            "swr_stage_worker",
        ] {
            assert!(!valid_log_filter(bad), "{bad:?} should be refused");
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn amqp_url_takes_a_list_of_brokers_from_a_file_or_the_environment() {
        let dir = std::env::temp_dir().join(format!("swr-cfg-list-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("brokers.toml");
        std::fs::write(
            &file,
            "[amqp]\nurl = [\"amqp://u:p@a:5681/%2f\", \"amqp://u:p@b:5682/%2f\"]\nfailover_order = \"in_order\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), env(&[])).unwrap();
        assert_eq!(
            c.amqp.url.expose(),
            "amqp://u:p@a:5681/%2f,amqp://u:p@b:5682/%2f"
        );
        assert_eq!(c.amqp.failover_order, FailoverOrder::InOrder);
        let c = Config::load(
            Some(&file),
            env(&[("AMQP_URL", "amqp://u:p@c:5683/%2f,amqp://u:p@d:5684/%2f")]),
        )
        .unwrap();
        assert_eq!(crate::amqp::broker_urls(&c.amqp.url).len(), 2);
        assert_eq!(
            Config::load(None, env(&[])).unwrap().amqp.failover_order,
            FailoverOrder::Shuffle
        );
        std::fs::remove_dir_all(&dir).unwrap();
        for (url, expected) in [
            (
                "amqp://u:p@a/%2f,amqps://u:p@b/%2f",
                "mixes amqp:// and amqps://",
            ),
            (
                "amqp://u:p@a/%2f,http://u:secret@b/",
                "expected amqp:// or amqps:// URLs",
            ),
            (",", "expected an amqp:// or amqps:// URL"),
        ] {
            let error = Config::load(None, env(&[("AMQP_URL", url)]))
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{url}: {error}");
            assert!(!error.contains("secret"), "{error}");
        }
    }

    #[test]
    fn plain_http_to_another_host_is_refused_unless_allowed() {
        let swr = Config::load(None, env(&[("SWR_ENDPOINT", "http://swr.internal:8080")]))
            .unwrap_err()
            .to_string();
        assert!(swr.contains("`swr.endpoint`"), "{swr}");
        assert!(swr.contains("http.allow_plain_http"), "{swr}");
        let iam = Config::load(
            None,
            env(&[
                ("SWR_STAGE_WORKER__SWR__AUTH__KIND", "iam_password"),
                ("SWR_STAGE_WORKER__SWR__AUTH__USER", "u"),
                ("SWR_STAGE_WORKER__SWR__AUTH__DOMAIN", "d"),
                ("SWR_STAGE_WORKER__SWR__AUTH__PROJECT", "p"),
                (
                    "SWR_STAGE_WORKER__IAM__ENDPOINT",
                    "http://user:pw@iam.internal",
                ),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(iam.contains("`iam.endpoint`"), "{iam}");
        assert!(!iam.contains(":pw@"), "the password is redacted: {iam}");
        for allowed in [
            vec![("SWR_ENDPOINT", "http://127.0.0.1:18080")],
            vec![("SWR_ENDPOINT", "http://localhost:18080")],
            vec![("SWR_ENDPOINT", "http://[::1]:18080")],
            vec![("SWR_ENDPOINT", "https://swr.internal")],
            vec![
                ("SWR_ENDPOINT", "http://swr.internal:8080"),
                ("SWR_STAGE_WORKER__HTTP__ALLOW_PLAIN_HTTP", "true"),
            ],
        ] {
            Config::load(None, env(&allowed)).unwrap_or_else(|e| panic!("{allowed:?}: {e}"));
        }
    }

    #[test]
    fn names_after_a_prefix_round_trip_through_the_environment() {
        let mut amqp = Config::load(None, Vec::new()).unwrap().amqp;
        amqp.name_after("t.x");
        let loaded = Config::load(None, amqp.names_env()).unwrap().amqp;
        assert_eq!(loaded.request_queue, "t.x.requests");
        assert_eq!(loaded.dead_letter_exchange, "t.x.dlx");
        assert_eq!(loaded.dead_letter_queue, "t.x.dead");
        assert_eq!(loaded.results_exchange, "t.x.results");
        assert_eq!(loaded.connection_name, "t.x.worker");
    }

    #[test]
    fn defaults_load_and_match_the_contract() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.amqp.request_queue, "swr.stage.requests");
        assert_eq!(c.amqp.dead_letter_exchange, "swr.stage.dlx");
        assert_eq!(c.amqp.dead_letter_queue, "swr.stage.dead");
        assert_eq!(c.amqp.results_exchange, "swr.stage.results");
        assert_eq!(c.worker.concurrency, 64);
        assert_eq!(c.retry.max_attempts, 8);
        assert_eq!(c.retry.initial_interval, Duration::from_millis(200));
        assert_eq!(c.retry.max_elapsed, Duration::from_secs(300));
        assert_eq!(c.http.timeout, Duration::from_secs(10));
        assert_eq!(c.limits.max_message_bytes, 65536);
        assert_eq!(c.shutdown.grace, Duration::from_secs(30));
        assert_eq!(c.idempotency.ttl, Duration::from_secs(7 * 86400));
        assert_eq!(
            c.idempotency.lease,
            Duration::from_secs(600),
            "2 x retry.max_elapsed"
        );
    }

    #[test]
    fn the_lease_follows_retry_max_elapsed_unless_it_is_set() {
        let lease =
            |pairs: &[(&str, &str)]| Config::load(None, env(pairs)).unwrap().idempotency.lease;
        // Twice the longest retry span: a longer one alone needs no lease of its own.
        assert_eq!(
            lease(&[("SWR_STAGE_WORKER__RETRY__MAX_ELAPSED", "20m")]),
            Duration::from_secs(2400)
        );
        // Never shorter than the retry span plus two attempts and two token fetches.
        assert_eq!(
            lease(&[
                ("SWR_STAGE_WORKER__RETRY__MAX_ELAPSED", "2s"),
                ("SWR_STAGE_WORKER__HTTP__TIMEOUT", "5s"),
                ("SWR_STAGE_WORKER__IAM__TIMEOUT", "3s"),
            ]),
            Duration::from_secs(18)
        );
        // A lease that is set is kept, and "auto" can be asked for by name.
        assert_eq!(
            lease(&[("SWR_STAGE_WORKER__IDEMPOTENCY__LEASE", "45m")]),
            Duration::from_secs(2700)
        );
        assert_eq!(
            lease(&[
                ("SWR_STAGE_WORKER__IDEMPOTENCY__LEASE", "auto"),
                ("SWR_STAGE_WORKER__RETRY__MAX_ELAPSED", "1m"),
            ]),
            Duration::from_secs(120)
        );
        // A set lease still has to outlast the longest job, and says what it accepts.
        let err = Config::load(
            None,
            env(&[
                ("SWR_STAGE_WORKER__RETRY__MAX_ELAPSED", "20m"),
                ("SWR_STAGE_WORKER__IDEMPOTENCY__LEASE", "15m"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("idempotency.lease")
                && err.contains("\"auto\"")
                && err.contains("20m 10s"),
            "{err}"
        );
        let err = Config::load(
            None,
            env(&[("SWR_STAGE_WORKER__IDEMPOTENCY__LEASE", "soon")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("idempotency.lease")
                && err.contains("\"auto\"")
                && err.contains("\"soon\""),
            "{err}"
        );
    }

    #[test]
    fn a_ttl_shorter_than_the_lease_is_accepted_on_its_own() {
        let c = Config::load(None, env(&[("SWR_STAGE_WORKER__IDEMPOTENCY__TTL", "2s")])).unwrap();
        assert_eq!(c.idempotency.ttl, Duration::from_secs(2));
        assert_eq!(c.idempotency.lease, Duration::from_secs(600));
    }

    #[test]
    fn environment_overrides_use_double_underscores_and_named_variables() {
        let c = Config::load(
            None,
            env(&[
                ("SWR_STAGE_WORKER__RETRY__MAX_ATTEMPTS", "3"),
                ("SWR_STAGE_WORKER__RETRY__MAX_ELAPSED", "90s"),
                ("SWR_STAGE_WORKER__IDEMPOTENCY__TTL", "14d"),
                ("SWR_STAGE_WORKER__AMQP__REQUEST_QUEUE", "q1"),
                ("SWR_STAGE_WORKER__SWR__AUTH__KIND", "static"),
                ("AMQP_URL", "amqp://u:p@h:1/%2f"),
                ("SWR_ENDPOINT", "http://127.0.0.1:1"),
                ("SWR_AUTH_TOKEN", "tok"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.retry.max_elapsed, Duration::from_secs(90));
        assert_eq!(c.idempotency.ttl, Duration::from_secs(14 * 86400));
        assert_eq!(c.amqp.request_queue, "q1");
        assert_eq!(c.amqp.url.expose(), "amqp://u:p@h:1/%2f");
        assert_eq!(c.swr.endpoint, "http://127.0.0.1:1");
        assert_eq!(c.swr.auth.token.expose(), "tok");
    }

    #[test]
    fn a_prefixed_variable_beats_a_named_one_in_any_order() {
        let named = ("AMQP_URL", "amqp://named:p@h:1/%2f");
        let prefixed = ("SWR_STAGE_WORKER__AMQP__URL", "amqp://prefixed:p@h:1/%2f");
        for (first, second) in [(named, prefixed), (prefixed, named)] {
            let c = Config::load(None, env(&[first, second])).unwrap();
            let winner = c.amqp.url.expose();
            assert!(
                winner == prefixed.1,
                "{} listed first: the named variable won",
                first.0
            );
        }
    }

    #[test]
    fn the_telemetry_address_is_default_until_the_file_or_the_environment_sets_it() {
        let file = std::env::temp_dir().join(format!("swr-cfg-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&file, "[telemetry]\nlisten = \"127.0.0.1:9464\"\n").unwrap();
        let var = [("SWR_STAGE_WORKER__TELEMETRY__LISTEN", "127.0.0.1:9464")];
        assert!(
            Config::load(None, env(&[]))
                .unwrap()
                .telemetry
                .listen_is_default
        );
        assert!(
            !Config::load(Some(&file), env(&[]))
                .unwrap()
                .telemetry
                .listen_is_default
        );
        assert!(
            !Config::load(None, env(&var))
                .unwrap()
                .telemetry
                .listen_is_default
        );
        std::fs::remove_file(file).unwrap();
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
    fn unknown_environment_key_is_named() {
        let err = Config::load(None, env(&[("SWR_STAGE_WORKER__RETRY__MAX_ATEMPTS", "3")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("retry.max_atempts"), "{err}");
        assert!(
            err.contains("SWR_STAGE_WORKER__RETRY__MAX_ATEMPTS"),
            "{err}"
        );
    }

    #[test]
    fn bad_typed_override_names_key_and_expectation() {
        let err = Config::load(
            None,
            env(&[("SWR_STAGE_WORKER__WORKER__CONCURRENCY", "many")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("worker.concurrency") && err.contains("an integer"),
            "{err}"
        );
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
    fn validation_names_key_and_range() {
        for (var, value, key) in [
            (
                "SWR_STAGE_WORKER__WORKER__CONCURRENCY",
                "0",
                "worker.concurrency",
            ),
            (
                "SWR_STAGE_WORKER__WORKER__CONCURRENCY",
                "70000",
                "worker.concurrency",
            ),
            (
                "SWR_STAGE_WORKER__RETRY__MAX_ATTEMPTS",
                "0",
                "retry.max_attempts",
            ),
            (
                "SWR_STAGE_WORKER__RETRY__MULTIPLIER",
                "0.5",
                "retry.multiplier",
            ),
            ("SWR_STAGE_WORKER__HTTP__TIMEOUT", "0s", "http.timeout"),
            ("SWR_ENDPOINT", "ftp://x", "swr.endpoint"),
            ("AMQP_URL", "http://x", "amqp.url"),
            ("SWR_STAGE_WORKER__LOG__FORMAT", "xml", "log.format"),
            ("SWR_STAGE_WORKER__LOG__LEVEL", "verbose", "log.level"),
            (
                "SWR_STAGE_WORKER__SWR__MAX_REQUESTS_PER_SECOND",
                "1e-300",
                "swr.max_requests_per_second",
            ),
            ("SWR_STAGE_WORKER__LOG__LEVEL", "", "log.level"),
            ("SWR_STAGE_WORKER__LOG__LEVEL", "info,=debug", "log.level"),
            (
                "SWR_STAGE_WORKER__LOG__LEVEL",
                "swr_stage_worker=loud",
                "log.level",
            ),
            (
                "SWR_STAGE_WORKER__TELEMETRY__LISTEN",
                "localhost",
                "telemetry.listen",
            ),
            (
                "SWR_STAGE_WORKER__SWR__AUTH__KIND",
                "magic",
                "swr.auth.kind",
            ),
            (
                "SWR_STAGE_WORKER__IDEMPOTENCY__BACKEND",
                "redis",
                "idempotency.backend",
            ),
            (
                "SWR_STAGE_WORKER__IDEMPOTENCY__LEASE",
                "1m",
                "idempotency.lease",
            ),
            ("SWR_STAGE_WORKER__BREAKER__WINDOW", "0", "breaker.window"),
            ("SWR_STAGE_WORKER__GUARD__WINDOW", "0s", "guard.window"),
        ] {
            let err = Config::load(None, env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("key `{key}`")),
                "{var}={value}: {err}"
            );
        }
    }

    #[test]
    fn file_overlay_merges_and_refuses_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("swr-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "[retry]\nmax_attempts = 4\n[swr.auth]\ntoken = \"t\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&good), env(&[])).unwrap();
        assert_eq!(c.retry.max_attempts, 4);
        assert_eq!(c.retry.multiplier, 2.0, "untouched keys keep defaults");
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[retry]\nmax_attempt = 4\n").unwrap();
        let err = Config::load(Some(&bad), env(&[])).unwrap_err().to_string();
        assert!(err.contains("retry.max_attempt"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn worker_needs_a_token_and_secrets_do_not_print() {
        let c = Config::load(None, env(&[("SWR_AUTH_TOKEN", "very-secret")])).unwrap();
        c.validate_for_worker().unwrap();
        let printed = format!("{c:?}");
        assert!(!printed.contains("very-secret"), "{printed}");
        assert!(!printed.contains("guest:guest"), "{printed}");
        let c = Config::load(None, env(&[])).unwrap();
        assert!(c
            .validate_for_worker()
            .unwrap_err()
            .to_string()
            .contains("SWR_AUTH_TOKEN"));
        let err = Config::load(None, env(&[("AMQP_URL", "nope://user:pw@x")]))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("pw"), "{err}");
    }

    /// The keys every iam_password configuration needs, with the password in its variable.
    fn iam_env<'a>(more: &[(&'a str, &'a str)]) -> Vec<(String, String)> {
        let mut pairs = vec![
            ("SWR_STAGE_WORKER__SWR__AUTH__KIND", "iam_password"),
            ("SWR_STAGE_WORKER__SWR__AUTH__USER", "svc-swr"),
            ("SWR_STAGE_WORKER__SWR__AUTH__DOMAIN", "acct"),
            ("SWR_STAGE_WORKER__SWR__AUTH__PROJECT", "cn-north-4"),
            ("SWR_IAM_PASSWORD", "hunter2-iam"),
        ];
        pairs.extend_from_slice(more);
        env(&pairs)
    }

    #[test]
    fn iam_password_is_opt_in_with_documented_defaults() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.swr.auth.kind, "static");
        assert_eq!(c.swr.auth.password_env, "SWR_IAM_PASSWORD");
        assert_eq!(c.swr.auth.refresh_ahead, Duration::from_secs(3600));
        assert_eq!(c.iam.timeout, Duration::from_secs(10));
        assert!(c.swr.auth.password_from_env.is_empty());
        let c = Config::load(None, iam_env(&[])).unwrap();
        c.validate_for_worker().unwrap();
        assert_eq!(c.swr.auth.iam_password().unwrap().expose(), "hunter2-iam");
    }

    #[test]
    fn iam_password_names_each_missing_key() {
        for (var, key) in [
            ("SWR_STAGE_WORKER__SWR__AUTH__USER", "swr.auth.user"),
            ("SWR_STAGE_WORKER__SWR__AUTH__DOMAIN", "swr.auth.domain"),
            ("SWR_STAGE_WORKER__SWR__AUTH__PROJECT", "swr.auth.project"),
            ("SWR_STAGE_WORKER__IAM__ENDPOINT", "iam.endpoint"),
        ] {
            let err = Config::load(None, iam_env(&[(var, "")]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{var}: {err}");
        }
        let err = Config::load(None, iam_env(&[("SWR_STAGE_WORKER__IAM__TIMEOUT", "0s")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("iam.timeout"), "{err}");
        let err = Config::load(
            None,
            iam_env(&[("SWR_STAGE_WORKER__SWR__AUTH__PASSWORD_ENV", "")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("swr.auth.password_env"), "{err}");
        // Loads (sim and demo need no password), but the worker refuses to start without one.
        let c = Config::load(
            None,
            iam_env(&[("SWR_STAGE_WORKER__SWR__AUTH__PASSWORD_ENV", "OTHER_VAR")]),
        )
        .unwrap();
        let err = c.validate_for_worker().unwrap_err().to_string();
        assert!(
            err.contains("swr.auth.password_env") && err.contains("OTHER_VAR"),
            "{err}"
        );
    }

    #[test]
    fn the_password_comes_from_its_variable_or_file_never_from_a_key() {
        let c = Config::load(
            None,
            iam_env(&[
                ("SWR_STAGE_WORKER__SWR__AUTH__PASSWORD_ENV", "MY_PW"),
                ("MY_PW", "from-my-var"),
            ]),
        )
        .unwrap();
        assert_eq!(c.swr.auth.iam_password().unwrap().expose(), "from-my-var");

        let dir = std::env::temp_dir().join(format!("swr-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "from-the-file\n").unwrap();
        let path = file.display().to_string();
        let c = Config::load(
            None,
            iam_env(&[("SWR_STAGE_WORKER__SWR__AUTH__PASSWORD_FILE", &path)]),
        )
        .unwrap();
        assert_eq!(
            c.swr.auth.iam_password().unwrap().expose(),
            "from-the-file",
            "the file wins, without its newline"
        );
        std::fs::write(&file, "\n").unwrap();
        let err = c.validate_for_worker().unwrap_err().to_string();
        assert!(err.contains("swr.auth.password_file"), "{err}");
        std::fs::remove_file(&file).unwrap();
        let err = c.validate_for_worker().unwrap_err().to_string();
        assert!(err.contains("swr.auth.password_file"), "{err}");

        let overlay = dir.join("with-password.toml");
        std::fs::write(&overlay, "[swr.auth]\npassword = \"plain\"\n").unwrap();
        let err = Config::load(Some(&overlay), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key `swr.auth.password`"), "{err}");
        assert!(!err.contains("plain"), "{err}");
        let err = Config::load(
            None,
            env(&[("SWR_STAGE_WORKER__SWR__AUTH__PASSWORD", "plain")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown key `swr.auth.password`"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
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
    fn redact_url_hides_a_password_given_as_a_query_parameter() {
        let shown = redact_url(
            "postgres://svc@db:5432/idem?sslmode=disable&password=hunter2&SSLPassword=k3y",
        );
        assert!(
            !shown.contains("hunter2") && !shown.contains("k3y"),
            "{shown}"
        );
        assert!(
            shown.contains("sslmode=disable") && shown.contains("password=***"),
            "{shown}"
        );
        assert_eq!(
            redact_url("postgres://svc@db/idem?sslmode=disable"),
            "postgres://svc@db/idem?sslmode=disable",
            "a URL without a password is shown as it is"
        );
    }

    #[test]
    fn redact_url_hides_password() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
    }
}
