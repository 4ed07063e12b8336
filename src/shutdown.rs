//! The stop signal: the first SIGTERM/SIGINT starts a graceful drain; a second one exits at once
//! (the broker then requeues every unacked delivery by itself, so nothing is lost).

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Resolves on the first SIGTERM or SIGINT, and arms the "second signal exits now" watcher.
///
/// Both signals are registered once, before the first is awaited, and the same registrations
/// wait for the second: a listener registered after the first signal would miss a second one
/// sent in between (an impatient Ctrl-C, Ctrl-C), and the worker would drain for the whole
/// grace period instead of exiting.
pub async fn termination_signal() {
    let mut signals = Signals::register();
    signals.next().await;
    tracing::info!("shutdown requested: draining in-flight jobs (signal again to exit at once)");
    tokio::spawn(async move {
        signals.next().await;
        tracing::warn!(
            "second signal: exiting without draining; the broker requeues unacked requests"
        );
        std::process::exit(130);
    });
}

/// SIGTERM and SIGINT, listened to from the moment of registration.
struct Signals {
    term: Option<Signal>,
    interrupt: Option<Signal>,
}

impl Signals {
    fn register() -> Signals {
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(stream) => Some(stream),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for {name}; it will not stop the worker");
                None
            }
        };
        Signals {
            term: listen(SignalKind::terminate(), "SIGTERM"),
            interrupt: listen(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// The next SIGTERM or SIGINT (never, if neither could be listened to).
    async fn next(&mut self) {
        match (&mut self.term, &mut self.interrupt) {
            (Some(term), Some(interrupt)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = interrupt.recv() => {}
                }
            }
            (Some(only), None) | (None, Some(only)) => {
                only.recv().await;
            }
            (None, None) => std::future::pending().await,
        }
    }
}
