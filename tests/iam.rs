//! IAM password tokens end to end, against the real RabbitMQ and the simulator's IAM endpoint:
//! the worker signs in, renews an expired token once on a 401, renews once for many waiting
//! jobs, and fails clearly (and without the password) when IAM refuses the sign-in.

mod common;

use common::{TestEnv, WorkerProcess};
use serde_json::json;
use swr_stage_worker::outcome::{ErrorKind, Outcome, Status};
use swr_stage_worker::sim::{FaultRule, SimConfig, ISSUED_TOKEN_PREFIX};

const USER: &str = "svc-swr";
const PASSWORD: &str = "iam-pa55word-in-tests";

/// A simulator where only tokens from its IAM endpoint work: a job that sent the harness's
/// static token would be refused.
fn sim_config() -> SimConfig {
    SimConfig {
        tokens: vec!["static-token-no-test-here-sends".into()],
        iam_users: vec![(USER.into(), PASSWORD.into())],
        ..SimConfig::default()
    }
}

/// The worker settings for iam_password (the harness points iam.endpoint at the simulator).
fn iam_settings<'a>(password: &'a str, more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut settings = vec![
        ("SWR_STAGE_WORKER__SWR__AUTH__KIND", "iam_password"),
        ("SWR_STAGE_WORKER__SWR__AUTH__USER", USER),
        ("SWR_STAGE_WORKER__SWR__AUTH__DOMAIN", "acct"),
        ("SWR_STAGE_WORKER__SWR__AUTH__PROJECT", "cn-north-4"),
        ("SWR_IAM_PASSWORD", password),
    ];
    settings.extend_from_slice(more);
    settings
}

async fn start(test: &str, password: &str, more: &[(&str, &str)]) -> TestEnv {
    let mut env = TestEnv::with_sim(test, sim_config(), &iam_settings(password, more)).await;
    env.start_worker();
    env
}

fn assert_no_secret(o: &Outcome) {
    let text = serde_json::to_string(o).unwrap();
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(!text.contains(ISSUED_TOKEN_PREFIX), "{text}");
}

#[tokio::test]
async fn a_worker_with_iam_password_signs_in_and_succeeds() {
    let mut env = start("iam-ok", PASSWORD, &[]).await;
    env.publish_json(&json!({"pipeline_id": 1, "stage_index": 0}))
        .await;
    let (o, _) = env.next_outcome().await;
    assert_eq!(o.status, Status::Succeeded, "{:?}", o.error);
    assert_eq!((o.attempts, o.http_status), (1, Some(201)));
    assert_no_secret(&o);
    let stats = env.sim.stats();
    assert_eq!((stats.iam_requests, stats.tokens_issued), (1, 1));
    assert!(env.sim.calls()[0].token_valid);
    env.teardown().await;
}

#[tokio::test]
async fn an_expired_token_is_renewed_once_and_the_job_retried() {
    let mut env = start("iam-expiry", PASSWORD, &[]).await;
    env.publish_json(&json!({"pipeline_id": 1, "stage_index": 0}))
        .await;
    assert_eq!(env.next_outcome().await.0.attempts, 1);
    assert_eq!(env.sim.expire_tokens(), 1);

    env.publish_json(&json!({"pipeline_id": 2, "stage_index": 0, "idempotency_key": "k-renew"}))
        .await;
    let (o, _) = env.next_outcome().await;
    assert_eq!(o.status, Status::Succeeded, "{:?}", o.error);
    assert_eq!((o.attempts, o.http_status), (2, Some(201)));
    let statuses: Vec<_> = env
        .sim
        .calls()
        .iter()
        .filter(|c| c.idempotency_key.as_deref() == Some("k-renew"))
        .map(|c| c.status)
        .collect();
    assert_eq!(statuses, [Some(401), Some(201)]);
    assert_eq!(env.sim.stats().tokens_issued, 2);

    // The renewed token serves the next job as is.
    env.publish_json(&json!({"pipeline_id": 3, "stage_index": 0}))
        .await;
    assert_eq!(env.next_outcome().await.0.attempts, 1);
    assert_eq!(env.sim.stats().tokens_issued, 2);
    env.teardown().await;
}

#[tokio::test]
async fn a_401_on_the_last_allowed_attempt_still_gets_its_renewal() {
    // One attempt allowed: the renewal's retry is outside the transient budget (contract §1).
    let mut env = start(
        "iam-last",
        PASSWORD,
        &[("SWR_STAGE_WORKER__RETRY__MAX_ATTEMPTS", "1")],
    )
    .await;
    env.publish_json(&json!({"pipeline_id": 1, "stage_index": 0}))
        .await;
    assert_eq!(env.next_outcome().await.0.status, Status::Succeeded);
    assert_eq!(env.sim.expire_tokens(), 1);
    env.publish_json(&json!({"pipeline_id": 2, "stage_index": 0}))
        .await;
    let (o, _) = env.next_outcome().await;
    assert_eq!(o.status, Status::Succeeded, "{:?}", o.error);
    assert_eq!((o.attempts, o.http_status), (2, Some(201)));
    assert_eq!(env.sim.stats().tokens_issued, 2);
    env.teardown().await;
}

#[tokio::test]
async fn twenty_jobs_in_flight_when_tokens_expire_share_one_renewal() {
    let mut env = start(
        "iam-flight",
        PASSWORD,
        &[
            ("SWR_STAGE_WORKER__WORKER__CONCURRENCY", "32"),
            ("SWR_STAGE_WORKER__HTTP__TIMEOUT", "10s"),
        ],
    )
    .await;
    env.publish_json(&json!({"pipeline_id": 1, "stage_index": 0}))
        .await;
    assert_eq!(env.next_outcome().await.0.status, Status::Succeeded);
    assert_eq!(env.sim.stats().tokens_issued, 1);

    // Each of the 20 jobs presents the current token, is held, and is then refused as if the
    // token had expired on the way: all 20 ask for a renewal at about the same moment.
    env.sim.add_rule(FaultRule {
        pipeline_range: Some([100, 119]),
        status: Some(401),
        delay_ms: Some(3000),
        times: Some(20),
        ..FaultRule::default()
    });
    for pipeline in 100..120 {
        env.publish_json(&json!({"pipeline_id": pipeline, "stage_index": 0}))
            .await;
    }
    env.wait_until("all 20 jobs are held by the rule", |sim| {
        sim.rules()[0].applied == 20
    })
    .await;
    assert_eq!(env.sim.expire_tokens(), 1);

    let outcomes = env.outcomes(20).await;
    for o in &outcomes {
        assert_eq!(o.status, Status::Succeeded, "{:?}", o.error);
        assert_eq!((o.attempts, o.http_status), (2, Some(201)));
    }
    let stats = env.sim.stats();
    assert_eq!(
        (stats.iam_requests, stats.tokens_issued),
        (2, 2),
        "one renewal for all 20 jobs"
    );
    env.teardown().await;
}

#[tokio::test]
async fn a_wrong_password_fails_jobs_unauthorized_without_revealing_it() {
    let wrong = "wr0ng-iam-pa55word";
    let mut env = start("iam-wrong", wrong, &[]).await;
    for pipeline in [1, 2] {
        env.publish_json(&json!({"pipeline_id": pipeline, "stage_index": 0}))
            .await;
    }
    for o in env.outcomes(2).await {
        assert_eq!(o.status, Status::Failed);
        let error = o.error.as_ref().expect("an error");
        assert_eq!(error.kind, ErrorKind::Unauthorized);
        assert!(
            error.retryable,
            "SWR was not called: a re-run after fixing the password must run"
        );
        assert_eq!((o.attempts, o.http_status), (0, None));
        for part in [
            "IAM refused the sign-in",
            USER,
            "The username or password is wrong.",
        ] {
            assert!(error.message.contains(part), "{}", error.message);
        }
        assert!(!error.message.contains(wrong), "{}", error.message);
        assert_no_secret(&o);
    }
    assert!(env.sim.calls().is_empty(), "SWR was never called");
    assert_eq!(
        env.sim.stats().iam_requests,
        1,
        "a refusal is not retried at once"
    );
    env.teardown().await;
}

#[tokio::test]
async fn the_password_and_tokens_never_appear_in_trace_logs() {
    let mut env = TestEnv::with_sim("iam-secrets", sim_config(), &[]).await;
    let mut vars = common::test_env(&env.prefix, &env.sim.url(), &iam_settings(PASSWORD, &[]));
    vars.push(("RUST_LOG".into(), "trace".into()));
    let worker = WorkerProcess::spawn(&vars, &env.prefix);
    env.publish_json(&json!({"pipeline_id": 1, "stage_index": 0}))
        .await;
    let (first, _) = env.next_outcome().await;
    assert_eq!(first.status, Status::Succeeded, "{:?}", first.error);
    env.sim.expire_tokens();
    env.publish_json(&json!({"pipeline_id": 2, "stage_index": 0}))
        .await;
    let (second, _) = env.next_outcome().await;
    assert_eq!((second.status, second.attempts), (Status::Succeeded, 2));
    assert_no_secret(&first);
    assert_no_secret(&second);

    let (status, log) = worker.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        log.contains("obtained an IAM token"),
        "trace log was captured"
    );
    assert!(log.contains("job finished") && log.lines().count() > 20);
    assert!(
        !log.contains(PASSWORD),
        "the IAM password leaked into the log"
    );
    assert!(
        !log.contains(ISSUED_TOKEN_PREFIX),
        "an IAM token leaked into the log"
    );
    assert_eq!(env.sim.stats().tokens_issued, 2);
    env.teardown().await;
}
