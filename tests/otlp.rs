//! Span export over OTLP/HTTP (docs/observability.md): the worker binary sends its job and
//! attempt spans, with the ids it propagates, to a collector that this test runs and decodes
//! with `opentelemetry-proto`; a collector that hangs or is down slows no job, and its losses
//! are counted in /metrics.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{TestEnv, WorkerProcess, WAIT};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;
use serde_json::json;
use swr_stage_worker::outcome::Status;
use swr_stage_worker::sim::FaultRule;
use swr_stage_worker::trace::{Hex, TraceContext};

const SENDER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const SENDER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SENDER_SPAN: &str = "00f067aa0ba902b7";
const API_KEY: &str = "otlp-k3y-value";

/// One exported span, flattened.
#[derive(Clone, Debug)]
struct Exported {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
    resource: HashMap<String, String>,
}

/// What the collector saw.
#[derive(Default)]
struct Seen {
    spans: Vec<Exported>,
    /// Export requests received (answered or not).
    requests: usize,
    /// The `api-key` header of each request.
    api_keys: Vec<Option<String>>,
}

/// An OTLP/HTTP collector on a port of its own: decodes every request, and answers it, or
/// never does (`hang`).
struct Collector {
    url: String,
    seen: Arc<Mutex<Seen>>,
}

fn text(kv: &[KeyValue]) -> HashMap<String, String> {
    kv.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

async fn receive(
    State((seen, hang)): State<(Arc<Mutex<Seen>>, bool)>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, Vec<u8>) {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
    {
        let mut seen = seen.lock().unwrap();
        seen.requests += 1;
        seen.api_keys.push(
            headers
                .get("api-key")
                .map(|v| v.to_str().unwrap().to_owned()),
        );
        for resource_spans in request.resource_spans {
            let resource = text(
                &resource_spans
                    .resource
                    .map(|r| r.attributes)
                    .unwrap_or_default(),
            );
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    seen.spans.push(Exported {
                        name: span.name,
                        trace_id: Hex(&span.trace_id).to_string(),
                        span_id: Hex(&span.span_id).to_string(),
                        parent_span_id: Hex(&span.parent_span_id).to_string(),
                        attributes: text(&span.attributes),
                        resource: resource.clone(),
                    });
                }
            }
        }
    }
    if hang {
        std::future::pending::<()>().await;
    }
    (StatusCode::OK, Vec::new())
}

impl Collector {
    async fn start(hang: bool) -> Collector {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let app = axum::Router::new()
            .route("/v1/traces", post(receive))
            .with_state((seen.clone(), hang));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Collector { url, seen }
    }

    /// Waits until `condition` holds for what was received.
    async fn wait_until(&self, what: &str, condition: impl Fn(&Seen) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !condition(&self.seen.lock().unwrap()) {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The worker binary for `env`, exporting to `endpoint`, with /metrics on a port of its own.
fn spawn_worker(env: &TestEnv, endpoint: &str, extra: &[(&str, &str)]) -> WorkerProcess {
    let mut vars = env.binary_env();
    for (k, v) in [
        ("SWR_STAGE_WORKER__TELEMETRY__OTLP_ENDPOINT", endpoint),
        (
            "SWR_STAGE_WORKER__TELEMETRY__OTLP_HEADERS",
            &format!("api-key={API_KEY}"),
        ),
        ("SWR_STAGE_WORKER__TELEMETRY__LISTEN", "127.0.0.1:0"),
        ("SWR_STAGE_WORKER__WORKER__ID", "otlp-test-worker"),
        ("SWR_STAGE_WORKER__RETRY__INITIAL_INTERVAL", "10ms"),
        ("SWR_STAGE_WORKER__RETRY__MAX_INTERVAL", "50ms"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        vars.push((k.to_owned(), v.to_owned()));
    }
    WorkerProcess::spawn(&vars, &env.prefix)
}

/// The worker's /metrics base URL, from its "telemetry listening" log line.
async fn metrics_url(worker: &WorkerProcess) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains("telemetry listening")) {
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .expect("the line names its address");
            return format!("http://{addr}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the telemetry server did not start:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `swr_stage_otlp_spans_total{result}`.
async fn export_count(base: &str, result: &str) -> f64 {
    let series = format!("swr_stage_otlp_spans_total{{result=\"{result}\"}}");
    common::scrape(base).await[&series]
}

fn with_trace(traceparent: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(traceparent)),
    );
    BasicProperties::default().with_headers(headers)
}

/// The outcome's `traceparent`, parsed.
fn outcome_trace(delivery: &lapin::message::Delivery) -> TraceContext {
    let headers = delivery.properties.headers().as_ref().expect("headers");
    match headers.inner().get("traceparent") {
        Some(AMQPValue::LongString(s)) => {
            TraceContext::parse(&String::from_utf8_lossy(s.as_bytes()), None).unwrap()
        }
        other => panic!("the outcome's traceparent: {other:?}"),
    }
}

async fn publish(env: &TestEnv, pipeline: u64, key: &str, traceparent: Option<&str>) {
    let body = json!({"pipeline_id": pipeline, "stage_index": 1, "idempotency_key": key});
    let properties = traceparent.map(with_trace).unwrap_or_default();
    env.publish(body.to_string().as_bytes(), properties).await;
}

#[tokio::test]
async fn exported_spans_carry_the_ids_the_headers_propagate() {
    let collector = Collector::start(false).await;
    let mut env = TestEnv::without_worker("otlp_ids", &[]).await;
    env.sim.add_rule(FaultRule {
        pipeline_id: Some(8201),
        status: Some(503),
        times: Some(1),
        ..FaultRule::default()
    });
    let worker = spawn_worker(&env, &collector.url, &[]);
    publish(&env, 8201, "otlp-1", Some(SENDER)).await;
    let malformed = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
    publish(&env, 8202, "otlp-bad", Some(malformed)).await;
    let mut jobs = HashMap::new();
    for _ in 0..2 {
        let (outcome, delivery) = env.next_outcome().await;
        assert_eq!(outcome.status, Status::Succeeded);
        jobs.insert(outcome.idempotency_key.clone(), outcome_trace(&delivery));
    }
    // Two job spans and three attempt spans (503 then 201; then 201).
    collector
        .wait_until("5 spans exported", |seen| seen.spans.len() >= 5)
        .await;
    let spans = collector.seen.lock().unwrap().spans.clone();
    let by_id: HashMap<&str, &Exported> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();

    // The continued trace: the job span is the outcome header's span, the sender's child.
    let job = jobs["otlp-1"].clone();
    let job_span = by_id[job.span_id_hex().as_str()];
    assert_eq!(job_span.name, "job");
    assert_eq!(job_span.trace_id, SENDER_TRACE);
    assert_eq!(job_span.parent_span_id, SENDER_SPAN);
    assert_eq!(job_span.attributes["key"], "otlp-1");
    // Each attempt is the job's child, with the span id SWR received in `traceparent`.
    let sent: HashSet<String> = env
        .sim
        .calls()
        .iter()
        .filter(|c| c.idempotency_key.as_deref() == Some("otlp-1"))
        .map(|c| {
            TraceContext::parse(c.traceparent.as_deref().unwrap(), None)
                .unwrap()
                .span_id_hex()
        })
        .collect();
    assert_eq!(sent.len(), 2, "two attempts, each its own span");
    let attempts: Vec<&Exported> = spans
        .iter()
        .filter(|s| s.name == "attempt" && s.parent_span_id == job.span_id_hex())
        .collect();
    let exported: HashSet<String> = attempts.iter().map(|s| s.span_id.clone()).collect();
    assert_eq!(exported, sent, "exported attempts are the ones SWR saw");
    let mut codes: Vec<&str> = attempts
        .iter()
        .map(|s| s.attributes["http.response.status_code"].as_str())
        .collect();
    codes.sort_unstable();
    assert_eq!(codes, ["201", "503"]);
    assert!(attempts.iter().all(|s| s.trace_id == SENDER_TRACE));

    // A malformed header: a new trace, its root span the outcome header's.
    let fresh = &jobs["otlp-bad"];
    let fresh_span = by_id[fresh.span_id_hex().as_str()];
    assert_eq!(fresh_span.trace_id, fresh.trace_id_hex());
    assert_ne!(fresh_span.trace_id, SENDER_TRACE);
    assert_eq!(fresh_span.parent_span_id, "", "a new trace's root");

    // Resource attributes, and the configured header on every request.
    for span in &spans {
        assert_eq!(span.resource["service.name"], "swr-stage-worker");
        assert_eq!(span.resource["service.version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(span.resource["service.instance.id"], "otlp-test-worker");
    }
    let keys = collector.seen.lock().unwrap().api_keys.clone();
    assert!(
        keys.iter().all(|k| k.as_deref() == Some(API_KEY)),
        "{keys:?}"
    );

    let (status, log) = worker.terminate().await;
    assert!(status.success(), "{log}");
    assert!(
        !log.contains(API_KEY),
        "the collector's header is never logged"
    );
    env.teardown().await;
}

#[tokio::test]
async fn a_collector_that_never_answers_slows_no_job_and_its_losses_are_counted() {
    let collector = Collector::start(true).await;
    let mut env = TestEnv::without_worker("otlp_hang", &[]).await;
    // A queue of 8 spans, a 60 s export timeout, a 2 s grace: export waiting on the collector
    // would hold the jobs, or the exit, far longer than the test waits.
    let worker = spawn_worker(
        &env,
        &collector.url,
        &[
            ("SWR_STAGE_WORKER__TELEMETRY__OTLP_QUEUE", "8"),
            ("SWR_STAGE_WORKER__TELEMETRY__OTLP_TIMEOUT", "60s"),
            ("SWR_STAGE_WORKER__SHUTDOWN__GRACE", "2s"),
        ],
    );
    let metrics = metrics_url(&worker).await;
    let jobs = 200;
    for i in 0..jobs {
        publish(&env, 8300 + i, &format!("otlp-hang-{i}"), None).await;
    }
    let outcomes = env.outcomes(jobs as usize).await;
    assert!(outcomes.iter().all(|o| o.status == Status::Succeeded));
    // The collector holds its first request for good: with a queue of 8 spans, 200 jobs (400
    // spans) finished only because no job waits for export.
    collector
        .wait_until("an export request reached the collector", |seen| {
            seen.requests >= 1
        })
        .await;
    assert!(export_count(&metrics, "dropped").await > 0.0);
    assert_eq!(export_count(&metrics, "exported").await, 0.0);

    let stopping = Instant::now();
    let (status, log) = worker.terminate().await;
    assert!(status.success(), "{log}");
    assert!(
        stopping.elapsed() < Duration::from_secs(12),
        "the exit waited {:?} on export, beyond shutdown.grace (2 s)",
        stopping.elapsed()
    );
    env.teardown().await;
}

#[tokio::test]
async fn a_collector_that_is_down_fails_exports_and_the_jobs_go_on() {
    // Nothing listens on port 1.
    let mut env = TestEnv::without_worker("otlp_down", &[]).await;
    let worker = spawn_worker(
        &env,
        "http://127.0.0.1:1",
        &[("SWR_STAGE_WORKER__TELEMETRY__OTLP_TIMEOUT", "2s")],
    );
    let metrics = metrics_url(&worker).await;
    for i in 0..20 {
        publish(&env, 8400 + i, &format!("otlp-down-{i}"), None).await;
    }
    let outcomes = env.outcomes(20).await;
    assert!(outcomes.iter().all(|o| o.status == Status::Succeeded));
    let deadline = tokio::time::Instant::now() + WAIT;
    while export_count(&metrics, "failed").await < 40.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "20 jobs' 40 spans are counted as failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, log) = worker.terminate().await;
    assert!(status.success(), "{log}");
    env.teardown().await;
}
