//! W3C Trace Context through the queue, SWR and the outcome (docs/observability.md): a request's
//! `traceparent` is continued by the job, each SWR attempt sends a child span's, the outcome
//! carries the job's, the DLQ copy keeps the request's, and a campaign is one trace.

mod common;

use std::collections::HashSet;

use common::TestEnv;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use serde_json::json;
use swr_stage_worker::campaign::input::InputSource;
use swr_stage_worker::campaign::progress::ProgressMode;
use swr_stage_worker::campaign::submit::{self, SubmitPlan};
use swr_stage_worker::outcome::Status;
use swr_stage_worker::sim::FaultRule;
use swr_stage_worker::trace::TraceContext;

const SENDER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const SENDER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SENDER_SPAN: &str = "00f067aa0ba902b7";

fn with_trace(traceparent: &str, tracestate: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(LongString::from(traceparent)),
    );
    if let Some(state) = tracestate {
        headers.insert(
            "tracestate".into(),
            AMQPValue::LongString(LongString::from(state)),
        );
    }
    BasicProperties::default().with_headers(headers)
}

/// A header of a delivery as text.
fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => panic!("{name} is not a string: {other:?}"),
    }
}

/// The outcome's `traceparent`, parsed.
fn outcome_trace(delivery: &lapin::message::Delivery) -> TraceContext {
    let value = header(&delivery.properties, "traceparent").expect("the outcome has traceparent");
    TraceContext::parse(&value, None).expect("a valid traceparent")
}

/// The `traceparent` of each simulator call for `key`, parsed, in call order.
fn call_traces(env: &TestEnv, key: &str) -> Vec<TraceContext> {
    env.sim
        .calls()
        .iter()
        .filter(|c| c.idempotency_key.as_deref() == Some(key))
        .map(|c| {
            let value = c.traceparent.as_deref().expect("SWR got traceparent");
            TraceContext::parse(value, None).expect("a valid traceparent")
        })
        .collect()
}

#[tokio::test]
async fn a_request_continues_its_senders_trace_through_every_attempt_and_the_outcome() {
    let mut env = TestEnv::start("trace_continued").await;
    env.sim.add_rule(FaultRule {
        pipeline_id: Some(8101),
        status: Some(503),
        times: Some(1),
        ..FaultRule::default()
    });
    env.publish(
        json!({"pipeline_id": 8101, "stage_index": 1, "idempotency_key": "trace-1"})
            .to_string()
            .as_bytes(),
        with_trace(SENDER, Some("congo=t61rcWkgMzE")),
    )
    .await;
    let (outcome, delivery) = env.next_outcome().await;
    assert_eq!(outcome.status, Status::Succeeded);
    assert_eq!(outcome.attempts, 2);
    let job = outcome_trace(&delivery);
    assert_eq!(
        job.trace_id_hex(),
        SENDER_TRACE,
        "the job continues the trace"
    );
    assert_ne!(
        job.span_id_hex(),
        SENDER_SPAN,
        "the job is a span of its own"
    );
    assert_eq!(
        header(&delivery.properties, "tracestate").as_deref(),
        Some("congo=t61rcWkgMzE")
    );
    let attempts = call_traces(&env, "trace-1");
    assert_eq!(attempts.len(), 2, "two attempts reached SWR");
    let spans: HashSet<String> = attempts.iter().map(|a| a.span_id_hex()).collect();
    assert_eq!(spans.len(), 2, "each attempt is its own span");
    for attempt in &attempts {
        assert_eq!(attempt.trace_id_hex(), SENDER_TRACE);
        assert_ne!(attempt.span_id_hex(), job.span_id_hex());
        assert_ne!(attempt.span_id_hex(), SENDER_SPAN);
    }
    // The outcome's JSON is contract v1 as it was: nothing about traces in it.
    assert!(!String::from_utf8_lossy(&delivery.data).contains(SENDER_TRACE));
    env.teardown().await;
}

#[tokio::test]
async fn without_a_usable_traceparent_a_job_starts_its_own_trace() {
    let mut env = TestEnv::start("trace_new").await;
    let malformed = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
    env.publish(
        json!({"pipeline_id": 8102, "stage_index": 1, "idempotency_key": "trace-bad"})
            .to_string()
            .as_bytes(),
        with_trace(malformed, None),
    )
    .await;
    env.publish_json(
        &json!({"pipeline_id": 8103, "stage_index": 1, "idempotency_key": "trace-none"}),
    )
    .await;
    let mut traces = Vec::new();
    for _ in 0..2 {
        let (outcome, delivery) = env.next_outcome().await;
        assert_eq!(
            outcome.status,
            Status::Succeeded,
            "a bad header fails no job"
        );
        let job = outcome_trace(&delivery);
        assert_ne!(
            job.trace_id_hex(),
            SENDER_TRACE,
            "the malformed header's ids are not taken"
        );
        let attempts = call_traces(&env, &outcome.idempotency_key);
        assert_eq!(attempts.len(), 1);
        assert_eq!(
            attempts[0].trace_id, job.trace_id,
            "SWR's call is in the job's new trace"
        );
        traces.push(job.trace_id);
    }
    assert_ne!(traces[0], traces[1], "each job starts its own trace");
    env.teardown().await;
}

#[tokio::test]
async fn a_rejected_request_keeps_its_header_in_the_dlq_and_its_outcome_continues_the_trace() {
    let mut env = TestEnv::start("trace_rejected").await;
    env.publish(
        br#"{"pipeline_id": 0, "stage_index": 1}"#,
        with_trace(SENDER, None),
    )
    .await;
    let (outcome, delivery) = env.next_outcome().await;
    assert_eq!(outcome.status, Status::Rejected);
    let job = outcome_trace(&delivery);
    assert_eq!(job.trace_id_hex(), SENDER_TRACE);
    assert_ne!(job.span_id_hex(), SENDER_SPAN);
    env.stop_worker().await.unwrap();
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0].delivery.properties, "traceparent").as_deref(),
        Some(SENDER),
        "the DLQ copy keeps the request's own header"
    );
    env.teardown().await;
}

#[tokio::test]
async fn a_replay_answers_in_the_trace_of_the_request_that_asked() {
    let mut env = TestEnv::start("trace_replay").await;
    let body = json!({"pipeline_id": 8104, "stage_index": 1, "idempotency_key": "trace-replay"})
        .to_string();
    env.publish(body.as_bytes(), BasicProperties::default())
        .await;
    let (first, first_delivery) = env.next_outcome().await;
    assert!(!first.replayed);
    env.publish(body.as_bytes(), with_trace(SENDER, None)).await;
    let (again, delivery) = env.next_outcome().await;
    assert!(again.replayed);
    assert_eq!(outcome_trace(&delivery).trace_id_hex(), SENDER_TRACE);
    assert_ne!(outcome_trace(&first_delivery).trace_id_hex(), SENDER_TRACE);
    assert_eq!(call_traces(&env, "trace-replay").len(), 1, "SWR ran once");
    env.teardown().await;
}

#[tokio::test]
async fn a_campaign_is_one_trace_with_a_span_per_request() {
    let env = TestEnv::start("trace_campaign").await;
    let dir = std::env::temp_dir().join(format!("{}.campaign", env.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("steps.jsonl");
    let lines: Vec<String> = (0..20)
        .map(|i| json!({"pipeline_id": 8200 + i, "stage_index": 1}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let plan = SubmitPlan {
        campaign: Some(format!("{}-c", env.prefix)),
        wait: true,
        timeout: Some(common::WAIT * 2),
        failures: dir.join("failures.jsonl"),
        ..SubmitPlan::new(InputSource::File(file))
    };
    let result = submit::submit(
        &env.config,
        &plan,
        ProgressMode::Hidden,
        std::future::pending(),
    )
    .await
    .expect("the campaign runs");
    assert_eq!(result.summary.expect("waited").count(Status::Succeeded), 20);
    let calls = env.sim.calls();
    assert_eq!(calls.len(), 20);
    let traces: Vec<TraceContext> = calls
        .iter()
        .map(|c| TraceContext::parse(c.traceparent.as_deref().unwrap(), None).unwrap())
        .collect();
    let trace_ids: HashSet<[u8; 16]> = traces.iter().map(|t| t.trace_id).collect();
    let span_ids: HashSet<[u8; 8]> = traces.iter().map(|t| t.span_id).collect();
    assert_eq!(trace_ids.len(), 1, "one trace for the campaign");
    assert_eq!(span_ids.len(), 20, "a span per request's attempt");
    let _ = std::fs::remove_dir_all(&dir);
    env.teardown().await;
}
