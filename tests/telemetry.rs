//! Operability: /healthz, /readyz, /metrics, JSON logs, and the status command, against the real
//! broker and the simulator.

mod common;

use std::time::Duration;

use common::TestEnv;
use lapin::BasicProperties;
use serde_json::{json, Value};
use swr_stage_worker::sim::FaultRule;

/// A worker whose telemetry server listens on a port the system picks, and its base URL.
async fn start_with_telemetry(test: &str) -> (TestEnv, String) {
    let mut env = TestEnv::without_worker(test, &[]).await;
    let base = env.start_worker_with_telemetry().await;
    (env, base)
}

async fn wait_ready(base: &str, ready: bool) -> Value {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        if let Ok(answer) = reqwest::get(format!("{base}/readyz")).await {
            let ok = answer.status().is_success();
            let body: Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
            if ok == ready {
                assert_eq!(body["ready"], ready);
                return body;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never became ready={ready}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_move_as_jobs_run_and_the_health_endpoints_answer() {
    let (mut env, base) = start_with_telemetry("metrics").await;
    let ready = wait_ready(&base, true).await;
    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        (
            ready["broker"].as_str(),
            ready["store"].as_str(),
            ready["breaker"].as_str()
        ),
        (Some("consuming"), Some("ok"), Some("closed"))
    );
    let before = common::scrape(&base).await;
    assert_eq!(before["swr_stage_broker_connected"], 1.0);

    env.sim.add_rule(FaultRule {
        pipeline_id: Some(88),
        status: Some(503),
        times: Some(2),
        ..FaultRule::default()
    });
    env.publish_json(&json!({"pipeline_id": 87, "stage_index": 0, "idempotency_key": "m-1"}))
        .await;
    env.publish_json(&json!({"pipeline_id": 88, "stage_index": 0}))
        .await;
    env.publish(b"{oops", BasicProperties::default()).await;
    env.publish_json(&json!({"pipeline_id": 87, "stage_index": 0, "idempotency_key": "m-1"}))
        .await;
    env.outcomes(4).await;
    // The last outcome is confirmed before its delivery is settled: wait for the settling.
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let after = loop {
        let after = common::scrape(&base).await;
        if after
            .get("swr_stage_job_seconds_count")
            .copied()
            .unwrap_or(0.0)
            >= 4.0
        {
            break after;
        }
        assert!(tokio::time::Instant::now() < deadline, "jobs never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let delta = |name: &str| {
        after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)
    };
    assert_eq!(
        delta(r#"swr_stage_jobs_total{mode="retry",status="succeeded"}"#),
        3.0
    );
    assert_eq!(
        delta(r#"swr_stage_jobs_total{mode="unknown",status="rejected"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"swr_stage_errors_total{kind="invalid_request"}"#),
        1.0
    );
    assert_eq!(delta(r#"swr_stage_swr_requests_total{code="503"}"#), 2.0);
    assert_eq!(delta(r#"swr_stage_swr_requests_total{code="201"}"#), 2.0);
    assert_eq!(delta("swr_stage_retries_total"), 2.0);
    assert_eq!(delta("swr_stage_replayed_total"), 1.0);
    assert_eq!(delta("swr_stage_swr_request_seconds_count"), 4.0);
    assert_eq!(delta("swr_stage_job_seconds_count"), 4.0);
    assert_eq!(after["swr_stage_in_flight"], 0.0);
    assert_eq!(after["swr_stage_circuit_open"], 0.0);
    for key in after.keys() {
        assert!(
            !key.contains("m-1") && !key.contains(common::TOKEN),
            "labels carry no key or token: {key}"
        );
    }

    // The status command shows the topology and this worker.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_swr-stage-worker"))
        .args(["status", "--telemetry", base.trim_start_matches("http://")])
        .env_clear()
        .envs(common::test_env(&env.prefix, &env.sim.url(), &[]))
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{report} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains(&env.config.amqp.request_queue), "{report}");
    assert!(
        report.contains(&env.config.amqp.dead_letter_queue),
        "{report}"
    );
    assert!(report.contains(": ready"), "{report}");
    assert!(
        report.contains("swr_stage_jobs_total{mode=\"retry\",status=\"succeeded\"} 3"),
        "{report}"
    );
    assert!(!report.contains("guest:guest"), "{report}");
    env.teardown().await;
}

#[tokio::test]
async fn json_logs_parse_line_by_line_and_carry_the_job_span() {
    let env = TestEnv::without_worker("json-logs", &[]).await;
    let mut vars = common::test_env(&env.prefix, &env.sim.url(), &[]);
    vars.push(("SWR_STAGE_WORKER__LOG__FORMAT".into(), "json".into()));
    vars.push(("RUST_LOG".into(), "info".into()));
    let worker = common::WorkerProcess::spawn(&vars, &env.prefix);
    let mut env = env;
    env.publish_json(&json!({"pipeline_id": 5150, "stage_index": 1, "idempotency_key": "json-1"}))
        .await;
    env.outcomes(1).await;
    let (status, log) = worker.terminate().await;
    assert!(status.success());
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let finished = lines
        .iter()
        .find(|l| l["message"] == "job finished")
        .expect("a job finished line");
    assert_eq!(finished["level"], "INFO");
    assert_eq!(finished["status"], "succeeded");
    assert_eq!(finished["span"]["key"], "json-1");
    assert_eq!(finished["span"]["pipeline_id"], 5150);
    assert_eq!(finished["span"]["stage_index"], 1);
    assert_eq!(finished["span"]["mode"], "retry");
    // The job's trace (a new one: the request carried no traceparent).
    let trace_id = finished["span"]["trace_id"].as_str().expect("trace_id");
    assert!(
        trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{trace_id}"
    );
    assert_eq!(finished["span"]["parent_span_id"], "");
    env.teardown().await;
}

#[tokio::test]
#[ignore = "stops and starts the broker: runs in the serial step (--run-ignored only --test-threads 1)"]
async fn readiness_follows_the_broker_connection() {
    let (mut env, base) = start_with_telemetry("readyz").await;
    wait_ready(&base, true).await;
    common::rabbitmqctl(&["stop_app"]).await;
    let down = wait_ready(&base, false).await;
    assert_eq!(down["broker"], "disconnected");
    assert_eq!(
        common::scrape(&base).await["swr_stage_broker_connected"],
        0.0
    );
    common::rabbitmqctl(&["start_app"]).await;
    common::rabbitmqctl(&["await_startup"]).await;
    wait_ready(&base, true).await;
    assert_eq!(
        common::scrape(&base).await["swr_stage_broker_connected"],
        1.0
    );
    env.reconnect().await;
    env.teardown().await;
}
