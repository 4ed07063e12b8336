//! The worker's small HTTP server on `telemetry.listen`: `/healthz` (the process answers),
//! `/readyz` (it can do its job: broker session consuming, idempotency store reachable, breaker
//! closed; 503 with a JSON body naming what is not), `/metrics` (Prometheus text format).
//!
//! It reports on what [`Observed`] exposes and knows nothing of the worker that implements it.

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;

use crate::breaker::{Breaker, BreakerState};
use crate::telemetry::metrics::Metrics;

/// Longest a readiness probe waits for the idempotency store.
const STORE_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// What the server reports on; the worker's job context implements it.
pub trait Observed: Send + Sync + 'static {
    /// The counters and gauges `/metrics` renders; also whether a broker session is consuming.
    fn metrics(&self) -> &Metrics;
    /// The circuit breaker `/readyz` reports and `/metrics` counts as open or not.
    fn breaker(&self) -> &Breaker;
    /// Asks the idempotency store whether it answers: `None` when there is none
    /// (`idempotency.backend = "off"`), else the reason it does not. The caller bounds the wait.
    fn ping_store(&self) -> impl Future<Output = Option<Result<(), String>>> + Send;
    /// Why the last attempt to open a broker session failed, if it did.
    fn broker_error(&self) -> Option<String>;
    /// The broker of the current or last session, password hidden.
    fn broker_node(&self) -> Option<String>;
}

/// Binds `listen` and serves until the process ends; returns the bound address.
/// With `fallback` (the address is the built-in default, which a second worker on the same host
/// finds taken), an address in use is replaced by a free port on the same interface, with a
/// warning naming it; an address the operator chose must be free.
pub async fn serve<T: Observed>(
    listen: &str,
    fallback: bool,
    ctx: Arc<T>,
) -> std::io::Result<SocketAddr> {
    let listener = bind(listen, fallback).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<T>))
        .route("/metrics", get(metrics::<T>))
        .with_state(ctx);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "telemetry server stopped");
        }
    });
    tracing::info!(%addr, "telemetry listening (/healthz, /readyz, /metrics)");
    Ok(addr)
}

async fn bind(listen: &str, fallback: bool) -> std::io::Result<TcpListener> {
    match TcpListener::bind(listen).await {
        Err(taken) if fallback && taken.kind() == ErrorKind::AddrInUse => {
            let Ok(mut free) = listen.parse::<SocketAddr>() else {
                return Err(taken);
            };
            free.set_port(0);
            let listener = TcpListener::bind(free).await?;
            tracing::warn!(
                taken = listen,
                addr = %listener.local_addr()?,
                "the default telemetry.listen address is in use (another worker on this host?); \
                 serving on a free port instead: set telemetry.listen to choose one"
            );
            Ok(listener)
        }
        bound => bound,
    }
}

async fn readyz<T: Observed>(State(ctx): State<Arc<T>>) -> impl IntoResponse {
    let broker = ctx.metrics().broker_connected();
    let store = match tokio::time::timeout(STORE_PING_TIMEOUT, ctx.ping_store()).await {
        Ok(None) => Ok("off"),
        Ok(Some(Ok(()))) => Ok("ok"),
        Ok(Some(Err(e))) => Err(e),
        Err(_) => Err(format!("no answer within {STORE_PING_TIMEOUT:?}")),
    };
    let breaker = match ctx.breaker().state() {
        BreakerState::Closed => "closed",
        BreakerState::Open { .. } => "open",
        BreakerState::HalfOpen { .. } => "half_open",
    };
    let ready = broker && store.is_ok() && breaker == "closed";
    let broker_error = if broker { None } else { ctx.broker_error() };
    let body = json!({
        "ready": ready,
        "broker": if broker { "consuming" } else { "disconnected" },
        "broker_error": broker_error,
        "broker_node": ctx.broker_node(),
        "store": match &store { Ok(state) => (*state).to_owned(), Err(e) => format!("unreachable: {e}") },
        "breaker": breaker,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

async fn metrics<T: Observed>(State(ctx): State<Arc<T>>) -> impl IntoResponse {
    let metrics = ctx.metrics();
    metrics.set_circuit_open(ctx.breaker().is_open());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_default_address_falls_back_to_a_free_port_a_chosen_one_does_not() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = taken.local_addr().unwrap().to_string();

        let err = bind(&listen, false).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AddrInUse);

        let other = bind(&listen, true).await.unwrap().local_addr().unwrap();
        assert_eq!(other.ip(), taken.local_addr().unwrap().ip());
        assert_ne!(other.port(), taken.local_addr().unwrap().port());

        // Only "in use" falls back: an address that cannot be bound for another reason (here,
        // one this host does not have) is still an error.
        let err = bind("192.0.2.1:9464", true).await.unwrap_err();
        assert_ne!(err.kind(), ErrorKind::AddrInUse);
    }
}
