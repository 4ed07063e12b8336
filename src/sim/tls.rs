//! HTTPS for the simulator (`sim --tls-cert --tls-key`), so that users' tests and ours can check
//! a client against a private CA. Handshakes run in their own tasks, off the accept loop, so a
//! client that stalls mid-handshake holds up no one; a failed handshake never reaches the API
//! (and is never recorded as a call).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::tls::{provider, read_certificates, read_private_key, TlsSetupError};

/// The certificate chain and key the simulator serves with (PEM files).
#[derive(Clone, Debug)]
pub struct SimTls {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// Longest a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more wait in the kernel's accept backlog.
const MAX_HANDSHAKES: usize = 256;
/// Finished handshakes waiting for the server to take them.
const READY_QUEUE: usize = 64;

impl SimTls {
    /// The acceptor; an error names the `--tls-cert` / `--tls-key` file at fault.
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsSetupError> {
        let cert = self.cert.to_string_lossy();
        let key = self.key.to_string_lossy();
        let chain = read_certificates("--tls-cert", &cert)?;
        let key = read_private_key("--tls-key", &key)?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
            .map_err(|e| TlsSetupError::Invalid {
                key: "--tls-key",
                message: format!("does not fit --tls-cert: {e}"),
            })?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// A listener whose connections have finished their TLS handshake.
pub(crate) struct TlsListener {
    /// Connections ready for HTTP.
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    /// The bound address.
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `tcp`; the accept task ends when this listener is dropped.
    pub(crate) fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (ready_tx, ready) = mpsc::channel(READY_QUEUE);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = tokio::select! {
                    accepted = tcp.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            tracing::debug!("simulator: accept failed: {e}");
                            continue;
                        }
                    },
                    () = ready_tx.closed() => return,
                };
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let ready_tx = ready_tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = ready_tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "simulator: TLS handshake failed: {e}")
                        }
                        Err(_) => tracing::debug!(%peer, "simulator: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept task ended (it cannot while this listener lives): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
