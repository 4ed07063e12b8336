//! Layering: the built-in defaults, then an optional file, then the environment (contract §6),
//! then `validate()`. Every key exists in `config/default.toml`; a file key or environment
//! variable that is not there is an error naming it, never ignored. Command-line flags that
//! override a key (`--log-format`) are applied by the binary after loading.

use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::schema::{AmqpConfig, AuthKind, Config, AUTO, REPLY_TO_WORDS};
use super::{ConfigError, DEFAULT_TOML};
use crate::secret::Secret;

/// Prefix of the per-key environment overrides: `SWR_STAGE_WORKER__<SECTION>__<KEY>`.
const ENV_PREFIX: &str = "SWR_STAGE_WORKER__";

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
            listen_set |= overlay_file(&mut table, path)?;
        }
        for (name, key, raw) in env_overrides(&env) {
            set_from_env(&mut table, name, &key, raw)?;
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
        if config.swr.auth.kind == AuthKind::IamPassword {
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

    /// Loads from the process: `--config` path (or SWR_STAGE_WORKER_CONFIG) and the environment.
    pub fn from_process(file: Option<&Path>) -> Result<Config, ConfigError> {
        let env_file = std::env::var_os("SWR_STAGE_WORKER_CONFIG").map(PathBuf::from);
        Config::load(file.or(env_file.as_deref()), std::env::vars())
    }
}

/// Lays the file at `path` over `table`; true when it sets `telemetry.listen`.
fn overlay_file(table: &mut Table, path: &Path) -> Result<bool, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let overlay: Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
    let listen_set = overlay
        .get("telemetry")
        .and_then(|t| t.get("listen"))
        .is_some();
    merge(table, overlay, &path.display().to_string(), "")?;
    Ok(listen_set)
}

/// The environment's overrides as (variable, key, value), in the order they apply: the three
/// named variables first, then the prefixed ones, so that a prefixed variable wins whatever
/// order the environment lists them in (README, "Configuration").
fn env_overrides(env: &[(String, String)]) -> Vec<(&str, String, &str)> {
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
    overrides
        .into_iter()
        .map(|(_, name, key, raw)| (name, key, raw))
        .collect()
}

impl AmqpConfig {
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
        got: if key.ends_with("token")
            || key.ends_with("url")
            || key.ends_with("password")
            || key.ends_with("headers")
        {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_env::{env, iam_env};
    use super::*;
    use crate::config::FailoverOrder;

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
}
