//! Where the PostgreSQL store connects, read from `idempotency.url` as libpq reads it
//! (contract §7): `sslmode` (`disable`, `prefer` (default), `require`, `verify-ca`,
//! `verify-full`), `sslrootcert`, `sslcert`, `sslkey` as query parameters of a `postgres://` URL.
//! tokio-postgres knows only three of the modes and none of the file parameters, so they are
//! taken out of the URL here and turned into a rustls configuration (see [`crate::tls`]).

use tokio_postgres::config::SslMode as WireMode;
use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{redact_url, Secret};
use crate::tls::{self, Check, TlsSetupError};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, without checking its certificate; else plain.
    Prefer,
    /// TLS or nothing; the certificate is checked only when `sslrootcert` is given (as libpq).
    Require,
    /// TLS with a certificate from a trusted root; any host name.
    VerifyCa,
    /// TLS with a certificate from a trusted root, for the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// What is checked of the certificate; `rootcert` says whether `sslrootcert` was given.
    fn check(self, rootcert: bool) -> Check {
        match self {
            SslMode::VerifyFull => Check::Full,
            SslMode::VerifyCa => Check::ChainOnly,
            // libpq: "if a root CA file exists, require behaves like verify-ca".
            SslMode::Require if rootcert => Check::ChainOnly,
            SslMode::Disable | SslMode::Prefer | SslMode::Require => Check::EncryptOnly,
        }
    }
}

/// A parsed `idempotency.url`: tokio-postgres's config and the TLS connector, when TLS may be used.
pub struct Target {
    /// Host, port, user, database... with `ssl_mode` set from [`SslMode`].
    config: tokio_postgres::Config,
    /// `None` for `sslmode=disable`.
    tls: Option<MakeRustlsConnect>,
    /// The mode asked for (for messages and tests).
    pub mode: SslMode,
    /// The URL with its password hidden, for every message.
    shown: String,
}

/// Why the PostgreSQL store could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    /// The TLS handshake failed: a wrong root, an expired or misnamed certificate.
    #[error("cannot connect to PostgreSQL at {shown} (idempotency.url): TLS: {failure}; {hint}")]
    Tls {
        shown: String,
        failure: tls::Failure,
        hint: String,
    },
    /// Anything else: refused, down, authentication.
    #[error("cannot connect to PostgreSQL at {shown}: {source}")]
    Other {
        shown: String,
        source: tokio_postgres::Error,
    },
}

impl Target {
    /// Reads the URL; an error names `idempotency.url` and what is wrong, never the password.
    pub fn parse(url: &Secret) -> Result<Target, String> {
        let shown = redact_url(url.expose());
        let bad = |what: String| format!("idempotency.url {shown}: {what}");
        let mut mode = SslMode::Prefer;
        let (mut rootcert, mut cert, mut key) = (String::new(), String::new(), String::new());
        // Takes libpq's TLS parameters; says whether `name` was one of them.
        let mut take = |name: &str, value: &str| -> Result<bool, String> {
            match name {
                "sslmode" => {
                    mode = SslMode::parse(value).ok_or_else(|| {
                        bad(format!(
                            "sslmode={value:?} is not one of disable, prefer, require, verify-ca, verify-full"
                        ))
                    })?
                }
                "sslrootcert" => rootcert = value.to_owned(),
                "sslcert" => cert = value.to_owned(),
                "sslkey" => key = value.to_owned(),
                _ => return Ok(false),
            }
            Ok(true)
        };
        let text = url.expose();
        let rest = match text.split_once("://") {
            // The query is taken apart by hand, not by a URL parser: libpq's URLs can name
            // several hosts (`h1:5432,h2:5432`) or none (`postgres://u@/db?host=/run/...`),
            // which URL parsers refuse, and every parameter that is not ours must reach the
            // driver exactly as written (a form encoder would turn `%20` into `+`).
            Some(("postgres" | "postgresql", _)) => {
                let (base, query) = text.split_once('?').unwrap_or((text, ""));
                let mut kept = Vec::new();
                for segment in query.split('&').filter(|s| !s.is_empty()) {
                    let (name, value) = segment.split_once('=').unwrap_or((segment, ""));
                    if !take(&percent_decode(name), &percent_decode(value))? {
                        kept.push(segment);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            // libpq's `key=value key=value` form, without quoting.
            _ if !url.expose().contains(['\'', '\\']) => {
                let mut kept = Vec::new();
                for pair in url.expose().split_whitespace() {
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(name, value)? {
                        kept.push(pair);
                    }
                }
                kept.join(" ")
            }
            _ => {
                return Err(bad(
                    "expected a postgres:// URL (e.g. postgres://user@host:5432/db?sslmode=verify-full) \
                     or unquoted key=value pairs"
                        .into(),
                ))
            }
        };
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| bad(format!("not a PostgreSQL URL: {e}")))?;
        config.ssl_mode(match mode {
            SslMode::Disable => WireMode::Disable,
            SslMode::Prefer => WireMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => WireMode::Require,
        });
        if cert.is_empty() != key.is_empty() {
            return Err(bad("sslcert and sslkey go together".into()));
        }
        let tls = match mode {
            SslMode::Disable => None,
            _ => {
                let client =
                    build_tls(mode, &rootcert, &cert, &key).map_err(|e| bad(e.to_string()))?;
                Some(MakeRustlsConnect::new(client))
            }
        };
        Ok(Target {
            config,
            tls,
            mode,
            shown,
        })
    }

    /// The URL with its password hidden.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Opens one connection and spawns its driver.
    pub async fn connect(&self) -> Result<Client, ConnectFailure> {
        let failed = |source: tokio_postgres::Error| match tls::Failure::find(&source) {
            Some(failure) => ConnectFailure::Tls {
                shown: self.shown.clone(),
                hint: failure.hint(
                    "sslrootcert in idempotency.url",
                    None,
                    Some("sslcert and sslkey"),
                ),
                failure,
            },
            None => ConnectFailure::Other {
                shown: self.shown.clone(),
                source,
            },
        };
        let client = match &self.tls {
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(failed)?;
                tokio::spawn(drive(connection));
                client
            }
            Some(tls) => {
                let (client, connection) =
                    self.config.connect(tls.clone()).await.map_err(failed)?;
                tokio::spawn(drive(connection));
                client
            }
        };
        Ok(client)
    }
}

/// `%XX` sequences decoded (a path in `sslrootcert` may be written encoded); anything else as is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::warn!(error = %e, "PostgreSQL connection closed");
    }
}

/// The rustls configuration for a mode. `sslrootcert=system` means the system's store alone, as
/// in libpq 16; any other value is a PEM file added to it.
fn build_tls(
    mode: SslMode,
    rootcert: &str,
    cert: &str,
    key: &str,
) -> Result<rustls::ClientConfig, TlsSetupError> {
    let check = mode.check(!rootcert.is_empty());
    const ROOTCERT: &str = "idempotency.url sslrootcert";
    let roots = match check {
        // No certificate is checked, so no roots are needed (a container may have none).
        Check::EncryptOnly => rustls::RootCertStore::empty(),
        Check::Full => tls::roots(tls::CaFile {
            key: ROOTCERT,
            path: if rootcert == "system" { "" } else { rootcert },
        })?,
        // Any name is accepted, so the chain must lead to the CA the operator named, never to a
        // public one: anyone can get a public certificate for a name of their own (libpq refuses
        // `sslrootcert=system` below verify-full for the same reason).
        Check::ChainOnly => {
            if rootcert.is_empty() || rootcert == "system" {
                return Err(TlsSetupError::Invalid {
                    key: ROOTCERT,
                    message: format!(
                        "sslmode={} checks the chain but not the host name, so it needs \
                         sslrootcert naming the database's own CA file; with the system's CAs \
                         use sslmode=verify-full",
                        if mode == SslMode::Require {
                            "require"
                        } else {
                            "verify-ca"
                        }
                    ),
                });
            }
            let mut store = rustls::RootCertStore::empty();
            for cert in tls::read_certificates(ROOTCERT, rootcert)? {
                store.add(cert).map_err(|e| TlsSetupError::NoCertificate {
                    key: ROOTCERT,
                    path: rootcert.into(),
                    detail: format!("not a CA certificate rustls accepts: {e}"),
                })?;
            }
            store
        }
    };
    let identity = (!cert.is_empty()).then_some(tls::ClientIdentity {
        cert_key: "idempotency.url sslcert",
        cert_path: cert,
        key_key: "idempotency.url sslkey",
        key_path: key,
    });
    tls::client_config(roots, identity, check)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Result<Target, String> {
        Target::parse(&Secret::new(url))
    }

    /// A CA certificate whose key was thrown away: it verifies nothing, but loads.
    const CA: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/unit-test-ca.pem"
    );

    #[test]
    fn sslmode_defaults_to_prefer_and_reads_every_libpq_level() {
        assert_eq!(target("postgres://u@h/db").unwrap().mode, SslMode::Prefer);
        for (text, mode) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let url = format!("postgres://u@127.0.0.1/db?sslmode={text}&sslrootcert={CA}");
            let parsed = target(&url).unwrap();
            assert_eq!(parsed.mode, mode, "{text}");
            assert_eq!(parsed.tls.is_none(), mode == SslMode::Disable, "{text}");
        }
    }

    #[test]
    fn what_each_mode_checks() {
        assert_eq!(SslMode::Prefer.check(true), Check::EncryptOnly);
        assert_eq!(SslMode::Require.check(false), Check::EncryptOnly);
        assert_eq!(SslMode::Require.check(true), Check::ChainOnly);
        assert_eq!(SslMode::VerifyCa.check(false), Check::ChainOnly);
        assert_eq!(SslMode::VerifyFull.check(false), Check::Full);
    }

    #[test]
    fn a_chain_only_check_needs_a_ca_file_of_its_own() {
        for url in [
            "postgres://u@h/db?sslmode=verify-ca",
            "postgres://u@h/db?sslmode=verify-ca&sslrootcert=system",
            "postgres://u@h/db?sslmode=require&sslrootcert=system",
        ] {
            let error = target(url).err().unwrap();
            assert!(error.contains("sslrootcert"), "{url}: {error}");
            assert!(error.contains("verify-full"), "{url}: {error}");
        }
    }

    #[test]
    fn urls_a_url_parser_refuses_keep_their_sslmode() {
        // Several hosts, and a socket directory given as a parameter.
        let multi = target("postgres://u:pw@h1:5432,h2:5432/db?sslmode=disable").unwrap();
        assert_eq!(multi.mode, SslMode::Disable);
        assert_eq!(multi.config.get_hosts().len(), 2);
        let socket = target("postgres://u@/db?host=/run/postgresql&sslmode=disable").unwrap();
        assert_eq!(socket.mode, SslMode::Disable);
        assert_eq!(socket.config.get_ssl_mode(), WireMode::Disable);
    }

    #[test]
    fn other_parameters_reach_the_driver_as_written() {
        let parsed = target(
            "postgres://u@127.0.0.1/db?options=-c%20statement_timeout%3D5000&sslmode=disable",
        )
        .unwrap();
        assert_eq!(
            parsed.config.get_options(),
            Some("-c statement_timeout=5000")
        );
    }

    #[test]
    fn libpq_parameters_are_taken_out_and_others_kept() {
        let parsed =
            target("postgres://u:pw@127.0.0.1:5432/db?sslmode=require&application_name=w").unwrap();
        assert_eq!(parsed.config.get_application_name(), Some("w"));
        assert_eq!(parsed.config.get_ssl_mode(), WireMode::Require);
    }

    #[test]
    fn the_key_value_form_takes_the_same_parameters() {
        let parsed = target("host=127.0.0.1 user=u dbname=db sslmode=disable").unwrap();
        assert_eq!(parsed.mode, SslMode::Disable);
        assert_eq!(parsed.config.get_user(), Some("u"));
        assert_eq!(parsed.config.get_ssl_mode(), WireMode::Disable);
    }

    #[test]
    fn bad_values_name_the_key_and_never_the_password() {
        for (url, expected) in [
            (
                "postgres://u:hunter2@h/db?sslmode=verify",
                "sslmode=\"verify\"",
            ),
            (
                "postgres://u:hunter2@h/db?sslcert=/c.pem",
                "sslcert and sslkey go together",
            ),
            (
                "postgres://u:hunter2@h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem",
                "cannot read /nonexistent.pem",
            ),
            (
                "host=h user=u password='hunter2'",
                "expected a postgres:// URL",
            ),
            (
                "host=h user=u password=hunter2 sslmode=full",
                "sslmode=\"full\"",
            ),
        ] {
            let error = target(url).err().unwrap();
            assert!(error.starts_with("idempotency.url"), "{error}");
            assert!(error.contains(expected), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
        }
    }
}
