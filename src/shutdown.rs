//! The stop signal: the first SIGTERM/SIGINT starts a graceful drain; a second one exits at once
//! (the broker then requeues every unacked delivery by itself, so nothing is lost).

use tokio::signal::unix::{signal, SignalKind};

/// Resolves on the first SIGTERM or SIGINT, and arms the "second signal exits now" watcher.
pub async fn termination_signal() {
    wait_for_signal().await;
    tracing::info!("shutdown requested: draining in-flight jobs (signal again to exit at once)");
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!(
            "second signal: exiting without draining; the broker requeues unacked requests"
        );
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the worker");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
