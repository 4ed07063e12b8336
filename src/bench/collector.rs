//! `bench --otlp`: an OTLP/HTTP receiver in the bench process that accepts every export request
//! and discards it, counting requests and bytes, so the phase with export on is known to have
//! exported (and pays for sending, not for a collector's work).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{fail, BenchError};

/// The receiver, serving until the bench ends.
pub struct DiscardingCollector {
    /// Its base URL, for `telemetry.otlp_endpoint`.
    pub url: String,
    /// Requests and bytes received.
    received: Arc<(AtomicU64, AtomicU64)>,
}

impl DiscardingCollector {
    pub async fn start() -> Result<DiscardingCollector, BenchError> {
        let received: Arc<(AtomicU64, AtomicU64)> = Arc::default();
        let counts = Arc::clone(&received);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let counts = Arc::clone(&counts);
                async move {
                    let (requests, bytes) = &*counts;
                    requests.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(fail)?;
        let url = format!("http://{}", listener.local_addr().map_err(fail)?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(DiscardingCollector { url, received })
    }

    /// "N export requests, M MB".
    pub fn summary(&self) -> String {
        let (requests, bytes) = &*self.received;
        format!(
            "{} export requests, {:.1} MB",
            requests.load(Ordering::Relaxed),
            bytes.load(Ordering::Relaxed) as f64 / 1e6
        )
    }
}
