//! The worker end to end against the real RabbitMQ and the SWR simulator (contract v1).

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestEnv, TOKEN};
use futures_util::future::BoxFuture;
use lapin::options::{BasicGetOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, ShortString};
use lapin::BasicProperties;
use serde_json::json;
use swr_stage_worker::config::Secret;
use swr_stage_worker::outcome::{ErrorKind, Status};
use swr_stage_worker::request::{body_key, message_id_key, Mode};
use swr_stage_worker::sim::FaultRule;
use swr_stage_worker::swr::auth::{AuthError, TokenSource};
use swr_stage_worker::worker::JobContext;

/// A token source whose first call panics, as a bug in a job would; later calls give the
/// simulator's token.
#[derive(Default)]
struct PanicsOnce {
    /// Calls so far: the first panicked, every later one ran a job.
    calls: AtomicU32,
}

impl TokenSource for PanicsOnce {
    fn token(&self) -> BoxFuture<'_, Result<Secret, AuthError>> {
        let first = self.calls.fetch_add(1, Ordering::SeqCst) == 0;
        Box::pin(async move {
            if first {
                panic!("a bug in the job");
            }
            Ok(Secret::new(TOKEN))
        })
    }

    fn refresh<'a>(&'a self, _refused: &'a Secret) -> BoxFuture<'a, Result<bool, AuthError>> {
        Box::pin(async { Ok(false) })
    }
}

fn header_text(value: Option<&AMQPValue>) -> Option<String> {
    match value? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn retry_succeeds_and_outcome_follows_the_contract() {
    let mut env = TestEnv::start("success").await;
    env.publish_json(
        &json!({"pipeline_id": 12345, "stage_index": 2, "idempotency_key": "k-success",
        "campaign_id": "c1", "metadata": {"ticket": "OPS-1"}}),
    )
    .await;
    let (o, delivery) = env.next_outcome().await;
    assert_eq!(o.idempotency_key, "k-success");
    assert_eq!(
        (o.pipeline_id, o.stage_index, o.mode),
        (Some(12345), Some(2), Some(Mode::Retry))
    );
    assert_eq!(o.status, Status::Succeeded);
    assert_eq!(
        (o.http_status, o.attempts, o.replayed),
        (Some(201), 1, false)
    );
    assert_eq!(o.error, None);
    assert_eq!(o.campaign_id.as_deref(), Some("c1"));
    assert_eq!(o.metadata.as_ref().unwrap().get(), r#"{"ticket":"OPS-1"}"#);
    assert!(o.swr_request_id.as_deref().is_some_and(|id| !id.is_empty()));
    assert!(o.started_at.ends_with('Z') && o.finished_at.ends_with('Z'));
    let ms = |t: &str| humantime::parse_rfc3339(t).unwrap();
    assert_eq!(
        u128::from(o.duration_ms),
        ms(&o.finished_at)
            .duration_since(ms(&o.started_at))
            .unwrap()
            .as_millis(),
        "duration_ms is finished_at - started_at"
    );
    assert_eq!(delivery.routing_key.as_str(), "stage.retry.succeeded");
    let p = &delivery.properties;
    assert_eq!(
        p.content_type().as_ref().map(ShortString::as_str),
        Some("application/json")
    );
    assert_eq!(
        p.kind().as_ref().map(ShortString::as_str),
        Some("swr.stage.outcome")
    );
    assert_eq!(
        p.correlation_id().as_ref().map(ShortString::as_str),
        Some("k-success")
    );
    assert_eq!(*p.delivery_mode(), Some(2));

    let calls = env.sim.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].idempotency_key.as_deref(), Some("k-success"));
    assert_eq!(calls[0].mode.as_deref(), Some("retry"));
    assert_eq!(calls[0].source, None, "retry sends no source");
    assert_eq!(env.sim.executions().get("k-success"), Some(&1));
    env.teardown().await;
}

#[tokio::test]
async fn metadata_is_echoed_as_the_producer_wrote_it() {
    let mut env = TestEnv::start("metadata-verbatim").await;
    // Key order, a number past 64 bits, a trailing zero and inner spacing all survive.
    let metadata =
        r#"{"zeta": 1.50, "alpha": 123456789012345678901234567890, "list": [ "b", "a" ]}"#;
    let body = format!(
        r#"{{"pipeline_id": 12345, "stage_index": 1, "idempotency_key": "k-meta", "metadata": {metadata}}}"#
    );
    env.publish(body.as_bytes(), BasicProperties::default())
        .await;
    let (o, delivery) = env.next_outcome().await;
    assert_eq!(o.status, Status::Succeeded);
    let text = std::str::from_utf8(&delivery.data).unwrap();
    assert!(
        text.contains(&format!(r#""metadata":{metadata},"#)),
        "metadata not verbatim in {text}"
    );
    env.teardown().await;
}

#[tokio::test]
async fn rollback_sends_source() {
    let mut env = TestEnv::start("rollback").await;
    env.publish_json(&json!({"pipeline_id": 7, "stage_index": 4, "mode": "rollback"}))
        .await;
    let (o, delivery) = env.next_outcome().await;
    assert_eq!(o.status, Status::Succeeded);
    assert_eq!(delivery.routing_key.as_str(), "stage.rollback.succeeded");
    let calls = env.sim.calls();
    assert_eq!(calls[0].mode.as_deref(), Some("rollback"));
    assert_eq!(calls[0].source.as_deref(), Some("rollback::true"));
    env.teardown().await;
}

#[tokio::test]
async fn transient_503_twice_then_success_uses_one_key() {
    let mut env = TestEnv::start("transient").await;
    env.sim.add_rule(FaultRule {
        pipeline_id: Some(55),
        status: Some(503),
        times: Some(2),
        ..FaultRule::default()
    });
    env.publish_json(&json!({"pipeline_id": 55, "stage_index": 1}))
        .await;
    let (o, _) = env.next_outcome().await;
    assert_eq!(o.status, Status::Succeeded);
    assert_eq!((o.attempts, o.http_status), (3, Some(201)));
    let calls = env.sim.calls();
    assert_eq!(calls.len(), 3);
    assert!(calls
        .iter()
        .all(|c| c.idempotency_key.as_deref() == Some(o.idempotency_key.as_str())));
    assert_eq!(env.sim.executions().get(&o.idempotency_key), Some(&1));
    env.teardown().await;
}

#[tokio::test]
async fn permanent_answers_fail_without_retry() {
    let mut env = TestEnv::start("permanent").await;
    for (pipeline, status, kind) in [
        (400, 400, ErrorKind::BadRequest),
        (403, 403, ErrorKind::Forbidden),
        (404, 404, ErrorKind::NotFound),
        (409, 409, ErrorKind::Conflict),
        (418, 418, ErrorKind::UnexpectedStatus),
    ] {
        env.sim.add_rule(FaultRule {
            pipeline_id: Some(pipeline),
            status: Some(status),
            ..FaultRule::default()
        });
        env.publish_json(&json!({"pipeline_id": pipeline, "stage_index": 0}))
            .await;
        let (o, delivery) = env.next_outcome().await;
        assert_eq!(o.status, Status::Failed, "{status}");
        assert_eq!((o.attempts, o.http_status), (1, Some(status)));
        let e = o.error.unwrap();
        assert_eq!((e.kind, e.retryable), (kind, false), "{status}");
        assert_eq!(delivery.routing_key.as_str(), "stage.retry.failed");
    }
    // The simulator's own model: rollback of a non-deploy step is a 400 with an SWR error code.
    env.publish_json(&json!({"pipeline_id": 9, "stage_index": 1, "mode": "rollback"}))
        .await;
    let (o, _) = env.next_outcome().await;
    let e = o.error.unwrap();
    assert_eq!(e.kind, ErrorKind::BadRequest);
    assert!(e
        .swr_error_code
        .is_some_and(|c| c.starts_with("SVCSTG.SWR.")));
    env.teardown().await;
}

#[tokio::test]
async fn refused_static_token_fails_unauthorized() {
    let mut env = TestEnv::start_with("unauthorized", &[("SWR_AUTH_TOKEN", "not-the-token")]).await;
    env.publish_json(&json!({"pipeline_id": 1, "stage_index": 0}))
        .await;
    let (o, _) = env.next_outcome().await;
    assert_eq!(
        (o.status, o.attempts, o.http_status),
        (Status::Failed, 1, Some(401))
    );
    let e = o.error.unwrap();
    assert_eq!((e.kind, e.retryable), (ErrorKind::Unauthorized, true));
    assert_eq!(e.swr_error_code.as_deref(), Some("APIG.0301"));
    // Nothing ran, so the key is released: the same request sent again is tried again, not
    // replayed (once the token is fixed, a re-submission succeeds).
    env.publish_json(&json!({"pipeline_id": 1, "stage_index": 0}))
        .await;
    let (again, _) = env.next_outcome().await;
    assert_eq!(
        (again.idempotency_key, again.replayed, again.attempts),
        (o.idempotency_key, false, 1)
    );
    assert_eq!(env.sim.calls().len(), 2);
    env.teardown().await;
}

#[tokio::test]
async fn throttled_429_waits_for_retry_after() {
    let mut env = TestEnv::start("throttled").await;
    env.sim.add_rule(FaultRule {
        pipeline_id: Some(429),
        status: Some(429),
        retry_after: Some("1".into()),
        times: Some(1),
        ..FaultRule::default()
    });
    env.publish_json(&json!({"pipeline_id": 429, "stage_index": 0}))
        .await;
    let (o, _) = env.next_outcome().await;
    assert_eq!((o.status, o.attempts), (Status::Succeeded, 2));
    // Back-off is 10 ms in tests; only Retry-After explains a second between the attempts.
    let calls = env.sim.calls();
    let gap = calls[1].at_unix_ms - calls[0].at_unix_ms;
    assert!(gap >= 1000, "second attempt came {gap} ms after the first");
    env.teardown().await;
}

#[tokio::test]
async fn a_retry_after_beyond_any_budget_fails_retryable_at_once_and_the_worker_goes_on() {
    let mut env = TestEnv::start("retry-after-max").await;
    // The longest delay-seconds a u64 holds, after an answer that took over a second: the job's
    // elapsed time plus that delay once overflowed the schedule's arithmetic and panicked the
    // job, leaving its delivery unacked.
    env.sim.add_rule(FaultRule {
        pipeline_id: Some(5031),
        status: Some(503),
        retry_after: Some(u64::MAX.to_string()),
        delay_ms: Some(1_100),
        ..FaultRule::default()
    });
    env.publish_json(&json!({"pipeline_id": 5031, "stage_index": 0}))
        .await;
    let (long, _) = env.next_outcome().await;
    assert_eq!(
        (long.status, long.attempts, long.http_status),
        (Status::Failed, 1, Some(503))
    );
    let e = long.error.unwrap();
    assert_eq!((e.kind, e.retryable), (ErrorKind::ServerError, true));
    assert!(e.message.contains("retry.max_elapsed"), "{}", e.message);
    // The next request on the queue is taken and runs as usual.
    env.publish_json(&json!({"pipeline_id": 5032, "stage_index": 0}))
        .await;
    let (next, _) = env.next_outcome().await;
    assert_eq!(
        (next.pipeline_id, next.status, next.attempts),
        (Some(5032), Status::Succeeded, 1)
    );
    assert_eq!(env.sim.calls().len(), 2);
    env.teardown().await;
}

#[tokio::test]
async fn a_panicking_job_is_requeued_with_its_key_released_and_counted() {
    let mut env = TestEnv::without_worker("job-panic", &[]).await;
    let mut ctx = JobContext::new(Arc::new(env.config.clone()))
        .await
        .expect("job context");
    let tokens = Arc::new(PanicsOnce::default());
    ctx.tokens = tokens.clone();
    let ctx = Arc::new(ctx);
    env.start_worker_with(ctx.clone());
    let published = Instant::now();
    env.publish_json(
        &json!({"pipeline_id": 6601, "stage_index": 0, "idempotency_key": "panics-once"}),
    )
    .await;
    let (o, _) = env.next_outcome().await;
    // The first delivery panicked before SWR was called; it was requeued, and its redelivery
    // claimed the key at once and ran: a claim left held would keep the redelivery waiting for
    // idempotency.hold (30 s), then for the claim's lease.
    assert_eq!(
        (o.status, o.attempts, o.replayed),
        (Status::Succeeded, 1, false)
    );
    assert!(
        published.elapsed() < Duration::from_secs(10),
        "the outcome took {:?}",
        published.elapsed()
    );
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 2);
    assert_eq!(env.sim.calls().len(), 1);
    // Once stopped, every job is settled: the panicked one counted, none left in flight.
    env.stop_worker().await.expect("the worker stops cleanly");
    let metrics = ctx.metrics.render();
    for line in [
        "swr_stage_job_panics_total 1",
        "swr_stage_in_flight 0",
        "swr_stage_jobs_total{mode=\"retry\",status=\"succeeded\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert_eq!(env.depth(&env.config.amqp.request_queue).await, 0);
    env.teardown().await;
}

#[tokio::test]
async fn exhausted_attempts_fail_retryable_with_last_kind() {
    let mut env = TestEnv::start_with(
        "exhausted",
        &[("SWR_STAGE_WORKER__RETRY__MAX_ATTEMPTS", "3")],
    )
    .await;
    env.sim.add_rule(FaultRule {
        pipeline_id: Some(503),
        status: Some(503),
        ..FaultRule::default()
    });
    env.publish_json(&json!({"pipeline_id": 503, "stage_index": 0}))
        .await;
    let (o, _) = env.next_outcome().await;
    assert_eq!(
        (o.status, o.attempts, o.http_status),
        (Status::Failed, 3, Some(503))
    );
    let e = o.error.unwrap();
    assert_eq!((e.kind, e.retryable), (ErrorKind::ServerError, true));
    assert!(e.message.contains("3 attempts"), "{}", e.message);
    assert_eq!(env.sim.calls().len(), 3);
    env.teardown().await;
}

#[tokio::test]
async fn slow_answers_time_out_and_dropped_connections_are_transport_errors() {
    let mut env = TestEnv::start_with(
        "timeouts",
        &[
            ("SWR_STAGE_WORKER__RETRY__MAX_ATTEMPTS", "2"),
            ("SWR_STAGE_WORKER__HTTP__TIMEOUT", "300ms"),
        ],
    )
    .await;
    env.sim.add_rule(FaultRule {
        pipeline_id: Some(1),
        delay_ms: Some(3000),
        ..FaultRule::default()
    });
    env.sim.add_rule(FaultRule {
        pipeline_id: Some(2),
        drop_connection: true,
        ..FaultRule::default()
    });
    env.publish_json(&json!({"pipeline_id": 1, "stage_index": 0}))
        .await;
    let (o, _) = env.next_outcome().await;
    assert_eq!(
        (o.status, o.attempts, o.http_status),
        (Status::Failed, 2, None)
    );
    let e = o.error.unwrap();
    assert_eq!((e.kind, e.retryable), (ErrorKind::Timeout, true));
    env.publish_json(&json!({"pipeline_id": 2, "stage_index": 0}))
        .await;
    let (o, _) = env.next_outcome().await;
    assert_eq!(
        (o.status, o.attempts, o.http_status),
        (Status::Failed, 2, None)
    );
    assert_eq!(o.error.unwrap().kind, ErrorKind::Transport);
    env.teardown().await;
}

#[tokio::test]
async fn invalid_requests_are_rejected_dead_lettered_and_the_worker_keeps_serving() {
    let mut env = TestEnv::start("invalid").await;
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"pipeline_id\": 1,".to_vec(), "truncated JSON"),
        (vec![0xff, 0x00, 0x13], "UTF-8"),
        (b"[1, 2]".to_vec(), "not an object"),
        (
            json!({"pipeline_id": 1, "stage_index": 0, "mdoe": "rollback"})
                .to_string()
                .into_bytes(),
            "unknown field",
        ),
        (
            json!({"pipeline_id": "1", "stage_index": 0})
                .to_string()
                .into_bytes(),
            "field `pipeline_id`",
        ),
        (
            json!({"pipeline_id": 1, "stage_index": -1})
                .to_string()
                .into_bytes(),
            "field `stage_index`",
        ),
        (
            json!({"pipeline_id": 1, "stage_index": 0, "mode": "redo"})
                .to_string()
                .into_bytes(),
            "field `mode`",
        ),
        (
            json!({"pipeline_id": 1, "stage_index": 0, "source": "rollback::true"})
                .to_string()
                .into_bytes(),
            "field `source`",
        ),
        (
            json!({"pipeline_id": 1, "stage_index": 0, "idempotency_key": "a b"})
                .to_string()
                .into_bytes(),
            "field `idempotency_key`",
        ),
        (
            json!({"pipeline_id": 1, "stage_index": 0, "campaign_id": ""})
                .to_string()
                .into_bytes(),
            "field `campaign_id`",
        ),
        (
            json!({"pipeline_id": 1, "stage_index": 0, "not_after": "soon"})
                .to_string()
                .into_bytes(),
            "field `not_after`",
        ),
        (
            json!({"pipeline_id": 1, "stage_index": 0, "metadata": [1]})
                .to_string()
                .into_bytes(),
            "field `metadata`",
        ),
        (
            format!(
                r#"{{"pipeline_id":1,"stage_index":0,"metadata":{{"x":"{}"}}}}"#,
                "a".repeat(70_000)
            )
            .into_bytes(),
            "at most 65536 bytes",
        ),
    ];
    for (body, _) in &bad {
        env.publish(
            body,
            BasicProperties::default().with_message_id("mid-invalid".into()),
        )
        .await;
    }
    let mut reasons = Vec::new();
    for _ in 0..bad.len() {
        let (o, delivery) = env.next_outcome().await;
        assert_eq!(o.status, Status::Rejected);
        assert_eq!((o.attempts, o.http_status), (0, None));
        assert_eq!(
            o.idempotency_key, "mid-invalid",
            "message_id is the key when the body has none"
        );
        let e = o.error.unwrap();
        assert_eq!((e.kind, e.retryable), (ErrorKind::InvalidRequest, false));
        let expected_mode = if o.mode.is_some() { "retry" } else { "unknown" };
        assert_eq!(
            delivery.routing_key.as_str(),
            format!("stage.{expected_mode}.rejected")
        );
        reasons.push(e.message);
    }
    for (_, needle) in &bad {
        assert!(
            reasons.iter().any(|r| r.contains(needle)),
            "no reason mentions {needle}: {reasons:?}"
        );
    }
    // Still serving.
    env.publish_json(&json!({"pipeline_id": 1, "stage_index": 0}))
        .await;
    assert_eq!(env.next_outcome().await.0.status, Status::Succeeded);
    assert!(
        env.sim.calls().len() == 1,
        "SWR is never called for an invalid request"
    );

    env.stop_worker().await.unwrap();
    let dead = env.dead_letters().await;
    assert_eq!(
        dead.len(),
        bad.len(),
        "exactly one DLQ copy per invalid request"
    );
    for message in &dead {
        let headers = message
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        let reason = header_text(headers.inner().get("x-swr-error")).expect("x-swr-error header");
        assert!(!reason.contains('\n'));
        assert!(bad
            .iter()
            .any(|(body, needle)| *body == message.delivery.data && reason.contains(needle)));
        assert_eq!(
            message
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(ShortString::as_str),
            Some("mid-invalid")
        );
    }
    assert_eq!(
        env.depth(&env.config.amqp.request_queue.clone()).await,
        0,
        "the originals were acked"
    );
    env.teardown().await;
}

#[tokio::test]
async fn expired_requests_are_rejected_and_acked_not_dead_lettered() {
    let mut env = TestEnv::start("expired").await;
    env.publish_json(
        &json!({"pipeline_id": 3, "stage_index": 0, "not_after": "2020-01-01T00:00:00Z"}),
    )
    .await;
    let (o, delivery) = env.next_outcome().await;
    assert_eq!((o.status, o.attempts), (Status::Rejected, 0));
    assert_eq!(o.error.unwrap().kind, ErrorKind::Expired);
    assert_eq!(delivery.routing_key.as_str(), "stage.retry.rejected");
    env.publish_json(
        &json!({"pipeline_id": 3, "stage_index": 0, "not_after": "2999-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(env.next_outcome().await.0.status, Status::Succeeded);
    // A key that already finished is replayed even when a later delivery of it comes past its
    // not_after: the replay, not `expired`, says what happened to the job.
    let done = json!({"pipeline_id": 4, "stage_index": 0, "idempotency_key": "late-1"});
    env.publish_json(&done).await;
    assert_eq!(env.next_outcome().await.0.status, Status::Succeeded);
    let mut late = done.clone();
    late["not_after"] = json!("2020-01-01T00:00:00Z");
    env.publish_json(&late).await;
    let (o, _) = env.next_outcome().await;
    assert_eq!(
        (o.status, o.replayed, o.error.is_none()),
        (Status::Succeeded, true, true),
        "a late duplicate of a finished key is replayed"
    );
    // An expired request whose key never ran leaves the key free for a timely one.
    let fresh = json!({"pipeline_id": 5, "stage_index": 0, "idempotency_key": "late-2"});
    let mut expired = fresh.clone();
    expired["not_after"] = json!("2020-01-01T00:00:00Z");
    env.publish_json(&expired).await;
    assert_eq!(
        env.next_outcome().await.0.error.unwrap().kind,
        ErrorKind::Expired
    );
    env.publish_json(&fresh).await;
    let (o, _) = env.next_outcome().await;
    assert_eq!((o.status, o.replayed), (Status::Succeeded, false));
    env.stop_worker().await.unwrap();
    assert!(env.dead_letters().await.is_empty());
    assert_eq!(env.sim.calls().len(), 3);
    env.teardown().await;
}

/// Two invalid requests with the same body but their own message ids are two requests: the
/// second, even when redelivered, gets its own outcome and its own DLQ copy, not the first's.
#[tokio::test]
async fn a_redelivered_invalid_request_is_not_taken_for_another_with_the_same_body() {
    let mut env = TestEnv::start("dlq-same-body").await;
    let props = |id: &str| BasicProperties::default().with_message_id(id.into());
    env.publish(b"{}", props("m1")).await;
    let (first, _) = env.next_outcome().await;
    assert_eq!(
        (first.idempotency_key.as_str(), first.replayed),
        ("m1", false)
    );
    env.stop_worker().await.unwrap();
    // m2 is delivered once and handed back, so the worker sees it redelivered.
    env.publish(b"{}", props("m2")).await;
    let queue = env.config.amqp.request_queue.clone();
    let taken = env
        .channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("m2 is in the queue");
    taken
        .delivery
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    env.start_worker();
    let (second, _) = env.next_outcome().await;
    assert_eq!(
        (
            second.idempotency_key.as_str(),
            second.replayed,
            second.status
        ),
        ("m2", false, Status::Rejected)
    );
    env.stop_worker().await.unwrap();
    let mut copies: Vec<String> = env
        .dead_letters()
        .await
        .iter()
        .map(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default()
        })
        .collect();
    copies.sort();
    assert_eq!(copies, ["m1", "m2"], "one DLQ copy each");
    env.teardown().await;
}

/// Outcomes whose reply_to names no queue come back from the broker (basic.return) while
/// dead-letter copies are being confirmed: no return may be taken for a DLQ copy's, or that
/// request is requeued and copied to the DLQ a second time.
#[tokio::test]
async fn returned_replies_are_never_taken_for_dead_letter_copies() {
    const EACH: usize = 300;
    let mut env = TestEnv::start("returns").await;
    let nowhere = format!("{}.no-such-queue", env.prefix);
    for i in 0..EACH {
        env.publish(
            json!({"pipeline_id": 1 + i, "stage_index": 0})
                .to_string()
                .as_bytes(),
            BasicProperties::default().with_reply_to(nowhere.as_str().into()),
        )
        .await;
        env.publish(
            json!({"pipeline_id": 0, "stage_index": 0, "idempotency_key": format!("bad-{i}")})
                .to_string()
                .as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let mut rejected = 0;
    for _ in 0..2 * EACH {
        if env.next_outcome().await.0.status == Status::Rejected {
            rejected += 1;
        }
    }
    assert_eq!(rejected, EACH);
    env.stop_worker().await.unwrap();
    assert_eq!(
        env.dead_letters().await.len(),
        EACH,
        "one DLQ copy per invalid request"
    );
    env.teardown().await;
}

#[tokio::test]
async fn a_message_id_that_cannot_be_a_header_is_hashed_into_the_key() {
    let mut env = TestEnv::start("bad-message-id").await;
    let body = json!({"pipeline_id": 12, "stage_index": 0}).to_string();
    let with_id = |id: &str| BasicProperties::default().with_message_id(id.into());
    env.publish(body.as_bytes(), with_id("job-\u{e9}")).await;
    let (o, delivery) = env.next_outcome().await;
    // A valid request runs, under the hash of its message_id.
    assert_eq!(
        (o.status, o.attempts, o.replayed, o.idempotency_key.clone()),
        (Status::Succeeded, 1, false, message_id_key("job-\u{e9}"))
    );
    assert_eq!(delivery.routing_key.as_str(), "stage.retry.succeeded");
    // The same message again is the same job.
    env.publish(body.as_bytes(), with_id("job-\u{e9}")).await;
    let (again, _) = env.next_outcome().await;
    assert_eq!(
        (again.replayed, again.idempotency_key),
        (true, o.idempotency_key.clone())
    );
    // Another message with the same body and another unusable id is another job.
    env.publish(body.as_bytes(), with_id("job 2")).await;
    let (other, _) = env.next_outcome().await;
    assert_eq!(
        (other.replayed, other.idempotency_key),
        (false, message_id_key("job 2"))
    );
    env.stop_worker().await.unwrap();
    assert!(
        env.dead_letters().await.is_empty(),
        "nothing is dead-lettered"
    );
    let keys = sim_keys(&env);
    assert_eq!(
        keys,
        [
            Some(message_id_key("job-\u{e9}")),
            Some(message_id_key("job 2"))
        ],
        "SWR was called once per job, with the hashed key"
    );
    env.teardown().await;
}

#[tokio::test]
async fn key_comes_from_field_then_message_id_then_body_hash() {
    let mut env = TestEnv::start("keys").await;
    let body = json!({"pipeline_id": 11, "stage_index": 0}).to_string();
    env.publish(body.as_bytes(), BasicProperties::default())
        .await;
    assert_eq!(
        env.next_outcome().await.0.idempotency_key,
        body_key(body.as_bytes())
    );
    env.publish(
        body.as_bytes(),
        BasicProperties::default().with_message_id("m-1".into()),
    )
    .await;
    assert_eq!(env.next_outcome().await.0.idempotency_key, "m-1");
    let with_field =
        json!({"pipeline_id": 11, "stage_index": 0, "idempotency_key": "f-1"}).to_string();
    env.publish(
        with_field.as_bytes(),
        BasicProperties::default().with_message_id("m-2".into()),
    )
    .await;
    assert_eq!(env.next_outcome().await.0.idempotency_key, "f-1");
    let keys = sim_keys(&env);
    assert_eq!(
        keys,
        [
            Some(body_key(body.as_bytes())),
            Some("m-1".into()),
            Some("f-1".into())
        ]
    );
    env.teardown().await;
}

#[tokio::test]
async fn correlation_id_and_reply_to_are_honoured() {
    let mut env = TestEnv::start("reply").await;
    let reply_queue = env.reply_queue().await;
    let props = BasicProperties::default()
        .with_correlation_id("corr-9".into())
        .with_reply_to(reply_queue.as_str().into());
    env.publish(
        json!({"pipeline_id": 21, "stage_index": 0, "idempotency_key": "k-reply"})
            .to_string()
            .as_bytes(),
        props,
    )
    .await;
    let (o, delivery) = env.next_outcome().await;
    assert_eq!(
        delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(ShortString::as_str),
        Some("corr-9")
    );
    let reply = env
        .channel
        .basic_get(
            reply_queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the reply copy was confirmed before the request was acked, so it is there");
    let copy: swr_stage_worker::outcome::Outcome =
        serde_json::from_slice(&reply.delivery.data).unwrap();
    assert_eq!(copy, o);
    assert_eq!(
        reply
            .delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(ShortString::as_str),
        Some("corr-9")
    );
    env.teardown().await;
}

#[tokio::test]
async fn existing_queue_with_other_arguments_stops_the_worker_with_the_fix() {
    let mut env = TestEnv::without_worker("mismatch", &[]).await;
    // Re-point the worker at a classic queue that already exists under another name.
    let classic = format!("{}.classic", env.prefix);
    env.channel
        .queue_declare(
            classic.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let original = std::mem::replace(&mut env.config.amqp.request_queue, classic.clone());
    env.start_worker();
    let err = env.stop_worker_when_done().await.unwrap_err().to_string();
    assert!(err.contains(&format!("queue '{classic}'")), "{err}");
    assert!(
        err.contains("x-queue-type") || err.contains("inequivalent"),
        "{err}"
    );
    assert!(err.contains("amqp.request_queue"), "{err}");
    env.channel
        .queue_delete(classic.as_str().into(), Default::default())
        .await
        .unwrap();
    // The teardown deletes the queues the configuration names: the test's own request queue too.
    env.config.amqp.request_queue = original;
    env.teardown().await;
}

#[tokio::test]
async fn in_flight_jobs_finish_during_a_graceful_stop() {
    let mut env = TestEnv::start("drain").await;
    env.sim.add_rule(FaultRule {
        pipeline_id: Some(77),
        delay_ms: Some(800),
        ..FaultRule::default()
    });
    env.publish_json(&json!({"pipeline_id": 77, "stage_index": 0}))
        .await;
    env.wait_for_calls(1).await;
    env.stop_worker().await.expect("clean stop");
    let (o, _) = env.next_outcome().await;
    assert_eq!(
        o.status,
        Status::Succeeded,
        "the in-flight job finished within the grace period"
    );
    assert_eq!(env.depth(&env.config.amqp.request_queue.clone()).await, 0);
    env.teardown().await;
}

#[tokio::test]
async fn the_token_never_appears_in_trace_logs_or_outcomes() {
    let mut env = TestEnv::without_worker("secrets", &[]).await;
    env.sim.add_rule(FaultRule {
        pipeline_id: Some(500),
        status: Some(500),
        times: Some(1),
        ..FaultRule::default()
    });
    let mut vars = common::test_env(&env.prefix, &env.sim.url(), &[]);
    vars.push(("RUST_LOG".into(), "trace".into()));
    let worker = common::WorkerProcess::spawn(&vars, &env.prefix);
    env.publish_json(&json!({"pipeline_id": 500, "stage_index": 0}))
        .await;
    env.publish_json(&json!({"pipeline_id": 501, "stage_index": 9}))
        .await;
    env.publish(b"{not json", BasicProperties::default()).await;
    let outcomes = env.outcomes(3).await;
    for o in &outcomes {
        assert!(!serde_json::to_string(o).unwrap().contains(TOKEN));
    }
    let (status, log) = worker.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    assert!(log.contains("job finished"), "trace log was captured");
    assert!(log.lines().count() > 20, "trace level is verbose");
    assert!(!log.contains(TOKEN), "the token leaked into the log");
    assert!(
        !log.contains("guest:guest"),
        "the broker password leaked into the log"
    );
    env.teardown().await;
}

/// The `Idempotency-Key` of every call the simulator received, in order.
fn sim_keys(env: &TestEnv) -> Vec<Option<String>> {
    env.sim
        .calls()
        .into_iter()
        .map(|c| c.idempotency_key)
        .collect()
}
