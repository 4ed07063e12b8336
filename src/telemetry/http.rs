//! The worker's small HTTP server on `telemetry.listen`: `/healthz` (the process answers),
//! `/readyz` (it can do its job: broker session consuming, idempotency store reachable, breaker
//! closed; 503 with a JSON body naming what is not), `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::breaker::BreakerState;
use crate::worker::JobContext;

/// Longest a readiness probe waits for the idempotency store.
const STORE_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds `listen` and serves until the process ends; returns the bound address.
pub async fn serve(listen: &str, ctx: Arc<JobContext>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ctx);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "telemetry server stopped");
        }
    });
    tracing::info!(%addr, "telemetry listening (/healthz, /readyz, /metrics)");
    Ok(addr)
}

async fn readyz(State(ctx): State<Arc<JobContext>>) -> impl IntoResponse {
    let broker = ctx.metrics.broker_connected();
    let store = match &ctx.gate {
        None => Ok("off"),
        Some(gate) => match tokio::time::timeout(STORE_PING_TIMEOUT, gate.store().ping()).await {
            Ok(Ok(())) => Ok("ok"),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {STORE_PING_TIMEOUT:?}")),
        },
    };
    let breaker = match ctx.breaker.state() {
        BreakerState::Closed => "closed",
        BreakerState::Open { .. } => "open",
        BreakerState::HalfOpen { .. } => "half_open",
    };
    let ready = broker && store.is_ok() && breaker == "closed";
    let body = json!({
        "ready": ready,
        "broker": if broker { "consuming" } else { "disconnected" },
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

async fn metrics(State(ctx): State<Arc<JobContext>>) -> impl IntoResponse {
    ctx.metrics.set_circuit_open(ctx.breaker.is_open());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ctx.metrics.render(),
    )
}
