//! Typed configuration: the built-in defaults (`config/default.toml`), an optional file, then
//! environment overrides (contract §6), then `validate()`.
//!
//! - `schema`: the sections, their types and the enums of their words; readers for durations,
//!   broker lists and the `reply_to` policy.
//! - `load`: the layering (defaults, file, environment) and the environment's names.
//! - `validate`: the checks a type cannot express, one function per section.
//!
//! Every key exists in `config/default.toml`; that file is the single list of keys and defaults, so
//! an environment variable or file key that is not there is an error naming it, never ignored.
//! Configuration knows no log subscriber (telemetry checks `log.level`) and opens no connection:
//! the modules that use a section depend on it. Validation only splits the broker list
//! (`amqp::broker_urls`) and loads the TLS files keys name, so that a typo stops start-up.

mod load;
mod schema;
mod validate;

use std::path::PathBuf;
use std::time::Duration;

pub use schema::{
    AmqpConfig, AmqpTlsConfig, AuthConfig, AuthKind, BreakerConfig, Config, FailoverOrder,
    GuardConfig, HttpConfig, IamConfig, IdempotencyBackend, IdempotencyConfig, LimitsConfig,
    LogConfig, LogFormat, ReplyToPolicy, RetryConfig, ShutdownConfig, SwrConfig, TelemetryConfig,
    WorkerConfig, MAX_DURATION,
};
pub use validate::MIN_RATE;
// Where they lived before they had a module of their own; both paths name the same items.
pub use crate::secret::{redact_url, Secret};

use crate::tls;

/// The defaults, compiled in so that the binary runs without any file beside it.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

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

impl Config {
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

    /// The name this worker gives itself in outcomes and logs: `worker.id`, else
    /// `<host name>/<pid>`.
    pub fn worker_id(&self) -> String {
        if !self.worker.id.is_empty() {
            return self.worker.id.clone();
        }
        format!("{}/{}", crate::host::name(), std::process::id())
    }
}

/// Environments for the tests of loading and checking.
#[cfg(test)]
mod test_env {
    pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The keys every iam_password configuration needs, with the password in its variable.
    pub fn iam_env<'a>(more: &[(&'a str, &'a str)]) -> Vec<(String, String)> {
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
}
