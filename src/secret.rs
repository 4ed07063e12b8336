//! Values that must never reach a log line or a panic message: [`Secret`] (tokens, passwords,
//! URLs that hold them) and [`redact_url`], which shows a URL without its password.
//!
//! Owns nothing else; every module that carries a secret (config, amqp, swr, idempotency) uses
//! these two, so the rule "a secret is never printed" has one place to audit.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A value that must never be printed: tokens, passwords. `Debug` redacts it, and it has no
/// `Display`.
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

/// A URL with its password replaced (in the user-info part and in a `password` query
/// parameter), for log lines and errors.
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
    fn a_secret_prints_as_stars_unless_it_is_empty() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "***");
        assert_eq!(format!("{:?}", Secret::default()), "\"\"");
        assert_eq!(Secret::new("hunter2").expose(), "hunter2");
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
