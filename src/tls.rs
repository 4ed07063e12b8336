//! TLS for every connection the worker makes (contract §7): RabbitMQ, SWR, IAM and PostgreSQL
//! (and the simulator's HTTPS listener). It owns three things and nothing else:
//! - the root rule: the operating system's store (honouring `SSL_CERT_FILE` / `SSL_CERT_DIR`)
//!   plus the connection's own CA file;
//! - client configurations built from PEM files (mutual TLS), all on rustls with ring;
//! - [`Failure`]: what a failed handshake means, in words an operator can act on.
//!
//! It offers no way to skip verification for AMQP or HTTP. The only weaker checks are libpq's
//! `sslmode` levels (`prefer`, `require`, `verify-ca`), which PostgreSQL users ask for by name.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// Why a TLS configuration could not be built; each names the configuration key to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{key}: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{key}: {path} holds no PEM certificate ({detail})")]
    NoCertificate {
        key: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{key}: {path} holds no usable PEM private key ({detail})")]
    NoKey {
        key: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error(
        "no trusted root certificates: the operating system's store is empty or unreadable \
         (SSL_CERT_FILE / SSL_CERT_DIR) and {key} is not set"
    )]
    NoRoots { key: &'static str },
}

/// A CA file and the key that named it (for error messages).
#[derive(Debug, Clone, Copy)]
pub struct CaFile<'a> {
    /// The configuration key, e.g. `amqp.tls.ca_file`.
    pub key: &'static str,
    /// The file; empty means "not set".
    pub path: &'a str,
}

/// A client certificate chain and its private key, both PEM, with the keys that named them.
#[derive(Debug, Clone, Copy)]
pub struct ClientIdentity<'a> {
    /// Key naming the certificate file, e.g. `amqp.tls.client_cert_file`.
    pub cert_key: &'static str,
    /// The certificate chain (leaf first).
    pub cert_path: &'a str,
    /// Key naming the private key file.
    pub key_key: &'static str,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: &'a str,
}

/// The crypto provider of every TLS connection: ring, explicitly, so that nothing depends on a
/// process-wide default being installed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The trusted roots: the operating system's store plus `ca` (when set). A CA file that cannot be
/// read or holds no certificate is an error naming its key; an empty result is an error too.
pub fn roots(ca: CaFile<'_>) -> Result<RootCertStore, TlsSetupError> {
    let mut store = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        // A broken file in /etc/ssl/certs is the system's business; say so once per build.
        tracing::debug!(%error, "skipping an unreadable certificate of the operating system's store");
    }
    store.add_parsable_certificates(native.certs);
    if !ca.path.is_empty() {
        for cert in read_certificates(ca.key, ca.path)? {
            store.add(cert).map_err(|e| TlsSetupError::NoCertificate {
                key: ca.key,
                path: ca.path.into(),
                detail: format!("not a CA certificate rustls accepts: {e}"),
            })?;
        }
    }
    if store.is_empty() {
        return Err(TlsSetupError::NoRoots { key: ca.key });
    }
    Ok(store)
}

/// Every certificate in a PEM file; at least one.
pub fn read_certificates(
    key: &'static str,
    path: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let bytes = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError::NoCertificate {
            key,
            path: path.into(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            key,
            path: path.into(),
            detail: "no -----BEGIN CERTIFICATE----- block".into(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn read_private_key(
    key: &'static str,
    path: &str,
) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let bytes = read(key, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsSetupError::NoKey {
        key,
        path: path.into(),
        detail: e.to_string(),
    })
}

fn read(key: &'static str, path: &str) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        key,
        path: path.into(),
        source,
    })
}

/// How much of the server's certificate is checked. AMQP and HTTP always use [`Check::Full`];
/// the weaker ones exist for libpq's `sslmode` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Chain to a trusted root, validity dates, and the host name (`verify-full`).
    Full,
    /// Chain and dates, not the host name (`verify-ca`).
    ChainOnly,
    /// Encryption only: any certificate (`prefer`, `require` without a root file).
    EncryptOnly,
}

/// A client configuration: `roots` (see [`roots`]), an optional client identity, and the check.
pub fn client_config(
    roots: RootCertStore,
    identity: Option<ClientIdentity<'_>>,
    check: Check,
) -> Result<ClientConfig, TlsSetupError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Invalid {
            key: "tls",
            message: e.to_string(),
        })?;
    let roots = Arc::new(roots);
    let builder = match check {
        Check::Full => builder.with_root_certificates(roots),
        Check::ChainOnly | Check::EncryptOnly => {
            let webpki = match check {
                Check::EncryptOnly => None,
                _ => Some(
                    WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                        .build()
                        .map_err(|e| TlsSetupError::Invalid {
                            key: "tls",
                            message: e.to_string(),
                        })?,
                ),
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(LibpqVerifier { webpki, provider }))
        }
    };
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => {
            let certs = read_certificates(id.cert_key, id.cert_path)?;
            let key = read_private_key(id.key_key, id.key_path)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsSetupError::Invalid {
                    key: id.key_key,
                    message: format!("the key does not fit {}: {e}", id.cert_path),
                })
        }
    }
}

/// The verifier behind libpq's weaker modes: `verify-ca` accepts a certificate for another name,
/// `prefer`/`require` accept any certificate. Handshake signatures are always checked.
#[derive(Debug)]
struct LibpqVerifier {
    /// The full check, whose answer this one relaxes; `None` for [`Check::EncryptOnly`].
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// For the handshake signatures.
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for LibpqVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A host name or IP address as TLS verifies it and sends it as SNI.
pub fn server_name(key: &'static str, name: &str) -> Result<ServerName<'static>, TlsSetupError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsSetupError::Invalid {
        key,
        message: format!("{name:?} is not a host name or IP address"),
    })
}

/// What a failed handshake means. One variant per thing an operator does differently.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Failure {
    /// The chain does not lead to a trusted root (a private CA not given to the worker).
    UnknownIssuer,
    /// The certificate is valid, but not for the name the worker connected to.
    NameMismatch,
    /// The certificate's validity ended.
    Expired,
    /// The certificate's validity has not begun (or this host's clock is behind).
    NotYetValid,
    /// The certificate was revoked.
    Revoked,
    /// The server sent a TLS alert: it refused us (often: it requires a client certificate).
    RefusedByServer(String),
    /// The answer was not TLS at all (a plain listener on a TLS URL).
    NotTls,
    /// Anything else rustls reported.
    Other(String),
}

impl Failure {
    /// The TLS failure somewhere in `error`'s chain, if there is one.
    pub fn find(error: &(dyn std::error::Error + 'static)) -> Option<Failure> {
        let mut current = Some(error);
        while let Some(e) = current {
            if let Some(tls) = e.downcast_ref::<rustls::Error>() {
                return Some(Failure::from_rustls(tls));
            }
            // io::Error's source() skips the error it wraps: look inside it explicitly.
            if let Some(inner) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
                if let Some(found) = Failure::find(inner) {
                    return Some(found);
                }
            }
            current = e.source();
        }
        None
    }

    fn from_rustls(error: &rustls::Error) -> Failure {
        use CertificateError as C;
        match error {
            rustls::Error::InvalidCertificate(cert) => match cert {
                C::UnknownIssuer => Failure::UnknownIssuer,
                C::NotValidForName | C::NotValidForNameContext { .. } => Failure::NameMismatch,
                C::Expired | C::ExpiredContext { .. } => Failure::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => Failure::NotYetValid,
                C::Revoked => Failure::Revoked,
                other => Failure::Other(format!("invalid certificate: {other:?}")),
            },
            rustls::Error::AlertReceived(alert) => Failure::RefusedByServer(format!("{alert:?}")),
            rustls::Error::InvalidMessage(_) => Failure::NotTls,
            other => Failure::Other(other.to_string()),
        }
    }

    /// What to change, naming the configuration keys: `ca_key` adds a root, `name_key`
    /// overrides the verified name (when the connection has one), `identity_keys` present a
    /// client certificate.
    pub fn hint(
        &self,
        ca_key: &str,
        name_key: Option<&str>,
        identity_keys: Option<&str>,
    ) -> String {
        match self {
            Failure::UnknownIssuer => format!(
                "set {ca_key} to the PEM file of the CA that signed the server's certificate \
                 (or add it to the system store)"
            ),
            Failure::NameMismatch => match name_key {
                Some(key) => format!(
                    "connect by a name the certificate holds, or set {key} to the name it was issued for"
                ),
                None => "connect by a name the certificate holds".to_owned(),
            },
            Failure::Expired | Failure::NotYetValid => {
                "renew the server's certificate, or correct this host's clock".to_owned()
            }
            Failure::Revoked => "the server needs a new certificate".to_owned(),
            Failure::RefusedByServer(_) => match identity_keys {
                Some(keys) => format!(
                    "the server refused the handshake; if it requires a client certificate, set {keys}"
                ),
                None => "the server refused the handshake".to_owned(),
            },
            Failure::NotTls => {
                "the server did not answer with TLS: check the port (a plain listener?)".to_owned()
            }
            Failure::Other(_) => format!("check the server's certificate and {ca_key}"),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::UnknownIssuer => f.write_str("certificate of an unknown issuer"),
            Failure::NameMismatch => {
                f.write_str("certificate not valid for this name (name mismatch)")
            }
            Failure::Expired => f.write_str("certificate expired"),
            Failure::NotYetValid => f.write_str("certificate not valid yet"),
            Failure::Revoked => f.write_str("certificate revoked"),
            Failure::RefusedByServer(alert) => {
                write!(f, "the server refused the handshake ({alert})")
            }
            Failure::NotTls => f.write_str("the answer was not TLS"),
            Failure::Other(what) => write!(f, "TLS error: {what}"),
        }
    }
}

/// True for a host that never leaves this machine: `localhost` or a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_errors_read_as_the_operator_needs_them() {
        let cases = [
            (CertificateError::UnknownIssuer, Failure::UnknownIssuer),
            (CertificateError::NotValidForName, Failure::NameMismatch),
            (CertificateError::Expired, Failure::Expired),
            (CertificateError::NotValidYet, Failure::NotYetValid),
            (CertificateError::Revoked, Failure::Revoked),
        ];
        for (cert, expected) in cases {
            let error = rustls::Error::InvalidCertificate(cert);
            assert_eq!(Failure::from_rustls(&error), expected);
        }
    }

    #[test]
    fn a_failure_is_found_inside_io_errors_and_chains() {
        let tls = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = io::Error::new(io::ErrorKind::InvalidData, tls);
        let outer = io::Error::other(io);
        assert_eq!(Failure::find(&outer), Some(Failure::UnknownIssuer));
        let plain = io::Error::new(io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(Failure::find(&plain), None);
    }

    #[test]
    fn hints_name_the_key_that_fixes_the_failure() {
        let hint = Failure::UnknownIssuer.hint("amqp.tls.ca_file", None, None);
        assert!(hint.contains("amqp.tls.ca_file"), "{hint}");
        let hint =
            Failure::NameMismatch.hint("amqp.tls.ca_file", Some("amqp.tls.server_name"), None);
        assert!(hint.contains("amqp.tls.server_name"), "{hint}");
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "127.0.0.1",
            "127.8.9.1",
            "[::1]",
            "::1",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "rabbit",
            "10.0.0.1",
            "example.com",
            "localhost.example.com",
            "[::2]",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_an_error_naming_its_key() {
        let missing = roots(CaFile {
            key: "http.ca_file",
            path: "/nonexistent/ca.pem",
        })
        .unwrap_err();
        assert!(
            missing.to_string().starts_with("http.ca_file: cannot read"),
            "{missing}"
        );
        let dir = std::env::temp_dir().join(format!("swr-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = roots(CaFile {
            key: "http.ca_file",
            path: empty.to_str().unwrap(),
        })
        .unwrap_err();
        assert!(
            error.to_string().contains("holds no PEM certificate"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
