//! The checks a type cannot express, one function per section; each error names the key and what
//! is allowed. The order of the sections is the order a person reads `config/default.toml` in, so
//! a file with several mistakes is corrected top to bottom.
//!
//! `log.level` is not checked here: its syntax is the log subscriber's, and
//! [`crate::telemetry::check_level`] checks it at start-up, so configuration does not depend on
//! the subscriber.

use super::schema::{AuthKind, Config, IdempotencyBackend};
use super::ConfigError;
use crate::secret::redact_url;
use crate::tls;

/// The lowest pace a rate setting takes (one per 1,000 s): below it the interval overflows.
pub const MIN_RATE: f64 = 0.001;

/// The error for `key`, with what it expects.
fn invalid(key: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key,
        message: message.into(),
    })
}

impl Config {
    /// Checks every value a type cannot express; the error names the key and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_amqp()?;
        self.validate_upstream()?;
        self.validate_durations()?;
        self.validate_retry()?;
        self.validate_sizes()?;
        self.validate_idempotency()?;
        self.validate_rate()?;
        self.validate_breaker_and_guard()?;
        self.validate_telemetry()
    }

    /// `[amqp]`: broker URLs, their TLS settings, and the topology names.
    fn validate_amqp(&self) -> Result<(), ConfigError> {
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
            return invalid(
                "amqp.url",
                "mixes amqp:// and amqps:// brokers: a failover must not fall back to \
                 plain AMQP; use amqps:// for every node",
            );
        }
        if plain != 0 {
            if tls_keys.is_set() {
                return invalid(
                    "amqp.url",
                    "amqp.tls.* is set but the URL is plain amqp://: use amqps:// for TLS \
                     (nothing is ever sent in clear on an amqps:// URL)",
                );
            }
            return Ok(());
        }
        if tls_keys.client_cert_file.is_empty() != tls_keys.client_key_file.is_empty() {
            let key = if tls_keys.client_cert_file.is_empty() {
                "amqp.tls.client_cert_file"
            } else {
                "amqp.tls.client_key_file"
            };
            return invalid(
                key,
                "amqp.tls.client_cert_file and amqp.tls.client_key_file go together",
            );
        }
        if !tls_keys.server_name.is_empty() {
            tls::server_name("amqp.tls.server_name", &tls_keys.server_name)?;
        }
        tls_keys.client_config()?;
        Ok(())
    }

    /// SWR and IAM: the endpoints, the CA file for them, and what each token source needs.
    fn validate_upstream(&self) -> Result<(), ConfigError> {
        self.check_endpoint("swr.endpoint", &self.swr.endpoint)?;
        if !self.http.ca_file.is_empty() {
            self.http.client_config()?;
        }
        let auth = &self.swr.auth;
        match auth.kind {
            AuthKind::Static => Ok(()),
            AuthKind::IamPassword => {
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
                self.check_endpoint("iam.endpoint", &self.iam.endpoint)
            }
        }
    }

    /// An SWR or IAM base URL: http(s), and `http://` only to a loopback host unless
    /// `http.allow_plain_http` (the token would cross the network in clear).
    fn check_endpoint(&self, key: &'static str, endpoint: &str) -> Result<(), ConfigError> {
        let parsed = match reqwest::Url::parse(endpoint) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => url,
            _ => {
                return invalid(
                    key,
                    format!(
                        "expected an http:// or https:// base URL, got {:?}",
                        redact_url(endpoint)
                    ),
                )
            }
        };
        let host = parsed.host_str().unwrap_or_default();
        if parsed.scheme() == "http" && !tls::is_loopback_host(host) && !self.http.allow_plain_http
        {
            return invalid(
                key,
                format!(
                    "{} is plain http:// to {host}, which is not this machine: the token would \
                     cross the network in clear. Use https://, or set http.allow_plain_http = true \
                     if the network is trusted (e.g. a test stack)",
                    redact_url(endpoint)
                ),
            );
        }
        Ok(())
    }

    /// Every duration that means "wait this long" must be above zero.
    fn validate_durations(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// `[retry]`: a schedule that grows, and at least one attempt.
    fn validate_retry(&self) -> Result<(), ConfigError> {
        let retry = &self.retry;
        if retry.max_interval < retry.initial_interval {
            return invalid(
                "retry.max_interval",
                "expected a value at least retry.initial_interval",
            );
        }
        if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
            return invalid("retry.multiplier", "expected a number >= 1.0");
        }
        if !(0.0..=1.0).contains(&retry.randomization_factor) {
            return invalid(
                "retry.randomization_factor",
                "expected a number in 0.0..=1.0",
            );
        }
        if retry.max_attempts == 0 {
            return invalid("retry.max_attempts", "expected at least 1");
        }
        Ok(())
    }

    /// Counts and byte limits: the parallelism and the size caps.
    fn validate_sizes(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// `[idempotency]`: where the store is, and a lease and hold that fit the longest job and
    /// the broker's consumer timeout.
    fn validate_idempotency(&self) -> Result<(), ConfigError> {
        let idem = &self.idempotency;
        match idem.backend {
            IdempotencyBackend::Off => {}
            IdempotencyBackend::Embedded if idem.path.is_empty() => {
                return invalid(
                    "idempotency.path",
                    "expected a file path for the embedded store",
                )
            }
            IdempotencyBackend::Embedded => {}
            IdempotencyBackend::Postgres
                if !idem.url.expose().starts_with("postgres://")
                    && !idem.url.expose().starts_with("postgresql://") =>
            {
                return invalid(
                    "idempotency.url",
                    "expected a postgres:// URL when idempotency.backend = \"postgres\"",
                )
            }
            IdempotencyBackend::Postgres => {}
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
        Ok(())
    }

    /// `swr.max_requests_per_second`: off, or a pace whose interval fits a duration.
    fn validate_rate(&self) -> Result<(), ConfigError> {
        let rate = self.swr.max_requests_per_second;
        if !(rate == 0.0 || (rate >= MIN_RATE && rate.is_finite())) {
            return invalid(
                "swr.max_requests_per_second",
                format!("expected 0 (no limit) or a number from {MIN_RATE} (one call per 1,000 s) up, got {rate}"),
            );
        }
        Ok(())
    }

    /// `[breaker]` and `[guard]`: windows that can count something.
    fn validate_breaker_and_guard(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// `[telemetry]`: an address to listen on, or none.
    fn validate_telemetry(&self) -> Result<(), ConfigError> {
        let listen = &self.telemetry.listen;
        if !listen.is_empty() && listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "telemetry.listen",
                format!(
                    "expected an address such as \"127.0.0.1:9464\", or \"\" to disable, got {listen:?}"
                ),
            );
        }
        self.validate_otlp()
    }

    /// `telemetry.otlp_*`: a collector URL checked like SWR's (its headers may carry an API
    /// key), headers that parse, a timeout and a queue above zero.
    fn validate_otlp(&self) -> Result<(), ConfigError> {
        let telemetry = &self.telemetry;
        if telemetry.otlp_enabled() {
            self.check_endpoint("telemetry.otlp_endpoint", telemetry.otlp_endpoint.trim())?;
        }
        telemetry.otlp_headers()?;
        if telemetry.otlp_timeout.is_zero() {
            return invalid("telemetry.otlp_timeout", "expected a duration above 0");
        }
        if telemetry.otlp_queue == 0 {
            return invalid("telemetry.otlp_queue", "expected a number of spans above 0");
        }
        Ok(())
    }

    /// The checks that only matter when the worker will call SWR (not for `sim` or `submit`):
    /// the token, or the IAM password, is there.
    pub fn validate_for_worker(&self) -> Result<(), ConfigError> {
        match self.swr.auth.kind {
            AuthKind::Static if self.swr.auth.token.is_empty() => invalid(
                "swr.auth.token",
                "expected a token: set SWR_AUTH_TOKEN (or swr.auth.token)",
            ),
            AuthKind::Static => Ok(()),
            AuthKind::IamPassword => self.swr.auth.iam_password().map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_env::{env, iam_env};
    use super::*;

    #[test]
    fn otlp_settings_are_checked_and_the_headers_never_echoed() {
        let load = |vars: &[(&str, &str)]| {
            Config::load(None, env(vars)).and_then(|c| c.validate().map(|()| c))
        };
        let c = load(&[
            (
                "SWR_STAGE_WORKER__TELEMETRY__OTLP_ENDPOINT",
                "http://127.0.0.1:4318",
            ),
            (
                "SWR_STAGE_WORKER__TELEMETRY__OTLP_HEADERS",
                "api-key=s3cret",
            ),
        ])
        .unwrap();
        assert_eq!(c.telemetry.otlp_queue, 4096);
        assert!(!format!("{c:?}").contains("s3cret"));
        let remote = load(&[(
            "SWR_STAGE_WORKER__TELEMETRY__OTLP_ENDPOINT",
            "http://collector:4318",
        )])
        .unwrap_err()
        .to_string();
        assert!(
            remote.contains("telemetry.otlp_endpoint") && remote.contains("allow_plain_http"),
            "{remote}"
        );
        let headers = load(&[(
            "SWR_STAGE_WORKER__TELEMETRY__OTLP_HEADERS",
            "api-key:s3cret",
        )])
        .unwrap_err()
        .to_string();
        assert!(
            headers.contains("telemetry.otlp_headers") && !headers.contains("s3cret"),
            "{headers}"
        );
        let queue = load(&[("SWR_STAGE_WORKER__TELEMETRY__OTLP_QUEUE", "0")])
            .unwrap_err()
            .to_string();
        assert!(queue.contains("telemetry.otlp_queue"), "{queue}");
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
    fn a_ttl_shorter_than_the_lease_is_accepted_on_its_own() {
        let c = Config::load(None, env(&[("SWR_STAGE_WORKER__IDEMPOTENCY__TTL", "2s")])).unwrap();
        assert_eq!(c.idempotency.ttl, Duration::from_secs(2));
        assert_eq!(c.idempotency.lease, Duration::from_secs(600));
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
            (
                "SWR_STAGE_WORKER__SWR__MAX_REQUESTS_PER_SECOND",
                "1e-300",
                "swr.max_requests_per_second",
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
}
