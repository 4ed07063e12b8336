//! The axum routes: the SWR step route, translated to and from the model,
//! and the JSON control API under `/_sim/`.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{ALLOW, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::model::{self, Answer, ApiRequest, Outcome, Sim};
use super::tls::TlsListener;
use super::FaultRule;

/// The one upstream route being simulated.
const API_ROUTE: &str = "/v3/manage/pipelines/{pipeline_id}/stages/{stage_index}";
/// IAM's token route, served by the same server so one base URL covers both in tests.
const IAM_ROUTE: &str = "/v3/auth/tokens";
/// Largest IAM request body read; a password sign-in is a few hundred bytes.
const MAX_IAM_BODY: usize = 64 * 1024;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_AUTH_TOKEN: HeaderName = HeaderName::from_static("x-auth-token");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const TRACEPARENT: HeaderName = HeaderName::from_static(crate::trace::TRACEPARENT);
const X_SUBJECT_TOKEN: HeaderName = HeaderName::from_static("x-subject-token");
const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Serves until `shutdown` resolves, then lets in-flight requests finish.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    sim: Arc<Sim>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Some(acceptor) = tls {
        return axum::serve(TlsListener::new(listener, acceptor)?, router(sim))
            .with_graceful_shutdown(shutdown)
            .await;
    }
    // Small request/response exchanges on keep-alive connections must not
    // wait on Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("simulator: could not set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router(sim))
        .with_graceful_shutdown(shutdown)
        .await
}

pub(crate) fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route(API_ROUTE, any(api))
        .route(IAM_ROUTE, any(iam_tokens))
        .route("/_sim/tokens/expire", post(expire_tokens))
        .route(
            "/_sim/rules",
            get(list_rules).post(add_rule).delete(clear_rules),
        )
        .route("/_sim/rules/{id}", delete(remove_rule))
        .route("/_sim/calls", get(calls))
        .route("/_sim/executions", get(executions))
        .route("/_sim/stats", get(stats))
        .route("/_sim/reset", post(reset))
        .method_not_allowed_fallback(control_method_not_allowed)
        .fallback(not_found)
        .with_state(sim)
}

/// The SWR route. Takes the whole request rather than extractors so that
/// nothing can be rejected with axum's plain-text errors (every answer must
/// be Huawei-shaped and carry `X-Request-Id`) and the headers aren't cloned.
async fn api(State(sim): State<Arc<Sim>>, req: Request) -> Response {
    let (parts, _body) = req.into_parts();
    // A header that isn't text can't be a valid token or key; "" is refused
    // by the model either way.
    let header = |name: &HeaderName| parts.headers.get(name).map(|v| v.to_str().unwrap_or(""));
    let call = sim.begin(ApiRequest {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        token: header(&X_AUTH_TOKEN),
        idempotency_key: header(&IDEMPOTENCY_KEY),
        traceparent: header(&TRACEPARENT),
    });
    let plan = sim.admit(&call);
    if let Some(delay) = plan.delay {
        tokio::time::sleep(delay).await;
    }
    match sim.complete(&call, plan) {
        Outcome::Answer(answer) => respond(&call.request_id, answer),
        Outcome::Drop => dropped_connection(),
    }
}

/// IAM's token route. Reads the body itself (bounded) so that every answer, even to an
/// oversized body, is in IAM's JSON shape.
async fn iam_tokens(State(sim): State<Arc<Sim>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_IAM_BODY)
        .await
        .unwrap_or_default();
    let answer = sim.iam().issue(parts.method.as_str(), &body);
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, APPLICATION_JSON);
    if let Ok(value) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
        headers.insert(X_REQUEST_ID, value);
    }
    if let Some(value) = answer
        .subject_token
        .and_then(|t| HeaderValue::from_str(&t).ok())
    {
        headers.insert(X_SUBJECT_TOKEN, value);
    }
    response
}

fn respond(request_id: &str, answer: Answer) -> Response {
    let body = match answer.body {
        Cow::Borrowed(s) => Body::from(s),
        Cow::Owned(s) => Body::from(s),
    };
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, APPLICATION_JSON);
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID, value);
    }
    if let Some(value) = answer
        .retry_after
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        headers.insert(RETRY_AFTER, value);
    }
    if answer.allow_post {
        headers.insert(ALLOW, HeaderValue::from_static("POST"));
    }
    response
}

/// A response whose body fails before its first byte: hyper then closes the
/// connection without flushing the status line, so the client sees the
/// connection close with no response at all (the head is only buffered
/// until the body yields something).
fn dropped_connection() -> Response {
    let failing = futures_util::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other(
            "connection dropped by simulator fault rule",
        ))
    });
    Response::new(Body::from_stream(failing))
}

/// Unknown paths answer like SWR would, `X-Request-Id` included.
async fn not_found(method: Method, uri: Uri) -> Response {
    let request_id = uuid::Uuid::new_v4().to_string();
    respond(&request_id, model::not_found(method.as_str(), uri.path()))
}

/// Error body of the control API: which field was wrong and what was expected.
#[derive(Serialize)]
struct ControlError<'a> {
    /// The offending field or parameter, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    /// What was wrong and what was expected.
    error: &'a str,
}

fn control_error(status: StatusCode, field: Option<&str>, error: &str) -> Response {
    (status, Json(ControlError { field, error })).into_response()
}

async fn control_method_not_allowed(method: Method, uri: Uri) -> Response {
    control_error(
        StatusCode::METHOD_NOT_ALLOWED,
        None,
        &format!("method {method} is not allowed on {}", uri.path()),
    )
}

async fn list_rules(State(sim): State<Arc<Sim>>) -> Response {
    Json(sim.rules()).into_response()
}

/// Takes raw bytes so malformed JSON gets our field-naming error rather
/// than axum's plain-text rejection, whatever the Content-Type.
async fn add_rule(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    match FaultRule::from_json(&body) {
        Ok(rule) => {
            let id = sim.add_rule(rule);
            (StatusCode::CREATED, Json(json!({ "id": id }))).into_response()
        }
        Err(e) => control_error(StatusCode::BAD_REQUEST, Some(&e.field), &e.to_string()),
    }
}

async fn clear_rules(State(sim): State<Arc<Sim>>) -> Response {
    Json(json!({ "removed": sim.clear_rules() })).into_response()
}

/// Parses the id itself so a bad id gets a JSON error naming it.
async fn remove_rule(State(sim): State<Arc<Sim>>, uri: Uri) -> Response {
    let raw = uri.path().rsplit('/').next().unwrap_or("");
    let Ok(id) = raw.parse::<u64>() else {
        return control_error(
            StatusCode::BAD_REQUEST,
            Some("id"),
            &format!("expected a rule id (a non-negative integer), got {raw:?}"),
        );
    };
    if sim.remove_rule(id) {
        Json(json!({ "removed": 1 })).into_response()
    } else {
        control_error(
            StatusCode::NOT_FOUND,
            Some("id"),
            &format!("no rule with id {id}"),
        )
    }
}

async fn calls(State(sim): State<Arc<Sim>>) -> Response {
    Json(sim.calls()).into_response()
}

async fn executions(State(sim): State<Arc<Sim>>) -> Response {
    Json(sim.executions()).into_response()
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    Json(sim.stats()).into_response()
}

async fn expire_tokens(State(sim): State<Arc<Sim>>) -> Response {
    Json(json!({ "expired": sim.iam().expire_all() })).into_response()
}

async fn reset(State(sim): State<Arc<Sim>>) -> Response {
    sim.reset();
    Json(json!({ "reset": true })).into_response()
}
