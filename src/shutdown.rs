//! The stop signal: the first SIGTERM/SIGINT starts a graceful drain; a second one exits at once
//! (the broker then requeues every unacked delivery by itself, so nothing is lost).

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Resolves on the first SIGTERM or SIGINT, and arms the "second signal exits now" watcher.
///
/// Both signals are registered when this is called, not when the future is first polled: a
/// signal that comes while the worker is still starting (opening its store can wait for a
/// previous process to let go of the file) is then held for the drain instead of killing the
/// process. The same registrations wait for the second signal: a listener registered after the
/// first would miss a second one sent in between (an impatient Ctrl-C, Ctrl-C), and the worker
/// would drain for the whole grace period instead of exiting. Call it from within the runtime.
pub fn termination_signal() -> impl std::future::Future<Output = ()> + Send {
    let mut signals = Signals::register();
    async move {
        signals.next().await;
        tracing::info!(
            "shutdown requested: draining in-flight jobs (signal again to exit at once)"
        );
        tokio::spawn(async move {
            signals.next().await;
            tracing::warn!(
                "second signal: exiting without draining; the broker requeues unacked requests"
            );
            std::process::exit(130);
        });
    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// A SIGTERM sent after the call but before the future is first polled (the worker still
    /// starting) is not lost, and does not kill the process.
    #[tokio::test]
    async fn a_signal_before_the_first_poll_is_held() {
        let stop = super::termination_signal();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(10), stop)
            .await
            .expect("the signal sent before the first poll resolves the future");
    }
}
