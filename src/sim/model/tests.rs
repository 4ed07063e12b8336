//! The call flow's unit tests: validation, auth, replay, fault rules and the call log, with
//! plain values and no HTTP.

use std::collections::HashMap;

use super::rules::MAX_DELAY_MS;
use super::*;
use crate::sim::{FaultRule, SimConfig, SimStats};

fn sim_with(config: SimConfig) -> Sim {
    Sim::new(config).unwrap()
}

fn sim() -> Sim {
    sim_with(SimConfig {
        tokens: vec!["T".into()],
        ..SimConfig::default()
    })
}

fn post(path_and_query: &str) -> ApiRequest<'_> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    ApiRequest {
        method: "POST",
        path,
        query,
        token: Some("T"),
        idempotency_key: None,
        traceparent: None,
    }
}

/// Runs one request through every stage, ignoring delays.
fn run(sim: &Sim, req: ApiRequest<'_>) -> Outcome {
    let call = sim.begin(req);
    let plan = sim.admit(&call);
    sim.complete(&call, plan)
}

fn answer(sim: &Sim, req: ApiRequest<'_>) -> Answer {
    match run(sim, req) {
        Outcome::Answer(a) => a,
        Outcome::Drop => panic!("unexpected drop"),
    }
}

fn body(a: &Answer) -> serde_json::Value {
    serde_json::from_str(&a.body).unwrap()
}

fn assert_400(a: &Answer, mentions: &str) {
    assert_eq!(a.status, 400, "{a:?}");
    let b = body(a);
    assert_eq!(b["error_code"], "SVCSTG.SWR.4000001");
    let msg = b["error_msg"].as_str().unwrap();
    assert!(
        msg.contains(mentions),
        "{msg:?} should mention {mentions:?}"
    );
    assert_eq!(b["errors"][0]["errorCode"], "SVCSTG.SWR.4000001");
    assert_eq!(b["errors"][0]["errorMessage"], msg);
}

const RETRY: &str = "/v3/manage/pipelines/7/stages/2?mode=retry";
const ROLLBACK: &str = "/v3/manage/pipelines/7/stages/4?mode=rollback&source=rollback::true";

#[test]
fn retry_and_rollback_succeed() {
    let sim = sim();
    let a = answer(&sim, post(RETRY));
    assert_eq!((a.status, &*a.body), (201, "{}"));
    let a = answer(&sim, post(ROLLBACK));
    assert_eq!(a.status, 201);
    // The colons may arrive percent-encoded.
    let a = answer(
        &sim,
        post("/v3/manage/pipelines/7/stages/4?source=rollback%3A%3Atrue&mode=rollback"),
    );
    assert_eq!(a.status, 201);
    assert_eq!(sim.stats().executions, 3);
    assert_eq!(sim.stats().requests, 3);
}

#[test]
fn auth_errors_use_gateway_shape() {
    let sim = sim();
    for token in [None, Some(""), Some("wrong")] {
        let call = sim.begin(ApiRequest {
            token,
            ..post(RETRY)
        });
        let Outcome::Answer(a) = sim.complete(&call, sim.admit(&call)) else {
            panic!("drop")
        };
        assert_eq!(a.status, 401);
        let b = body(&a);
        assert_eq!(b["error_code"], "APIG.0301");
        assert!(b["error_msg"]
            .as_str()
            .unwrap()
            .starts_with("Incorrect IAM authentication information"));
        assert_eq!(b["request_id"], call.request_id.as_str());
    }
    assert_eq!(sim.stats().executions, 0);
    assert!(sim.calls().iter().all(|c| !c.token_valid && !c.executed));
}

#[test]
fn empty_token_list_accepts_any_non_empty_token() {
    let sim = sim_with(SimConfig::default());
    let ok = answer(
        &sim,
        ApiRequest {
            token: Some("anything"),
            ..post(RETRY)
        },
    );
    assert_eq!(ok.status, 201);
    let empty = answer(
        &sim,
        ApiRequest {
            token: Some(""),
            ..post(RETRY)
        },
    );
    assert_eq!(empty.status, 401);
}

#[test]
fn wrong_method_is_405() {
    let sim = sim();
    let a = answer(
        &sim,
        ApiRequest {
            method: "GET",
            ..post(RETRY)
        },
    );
    assert_eq!(a.status, 405);
    assert!(a.allow_post);
}

#[test]
fn path_parameters_must_be_in_range_integers() {
    let sim = sim();
    for (path, param) in [
        (
            "/v3/manage/pipelines/abc/stages/1?mode=retry",
            "pipeline_id",
        ),
        ("/v3/manage/pipelines/0/stages/1?mode=retry", "pipeline_id"),
        ("/v3/manage/pipelines/-3/stages/1?mode=retry", "pipeline_id"),
        (
            "/v3/manage/pipelines/2147483648/stages/1?mode=retry",
            "pipeline_id",
        ),
        (
            "/v3/manage/pipelines/99999999999999999999/stages/1?mode=retry",
            "pipeline_id",
        ),
        ("/v3/manage/pipelines/1/stages/x?mode=retry", "stage_index"),
        ("/v3/manage/pipelines/1/stages/-1?mode=retry", "stage_index"),
        (
            "/v3/manage/pipelines/1/stages/1.5?mode=retry",
            "stage_index",
        ),
    ] {
        assert_400(&answer(&sim, post(path)), param);
    }
    let a = answer(
        &sim,
        post("/v3/manage/pipelines/2147483647/stages/0?mode=retry"),
    );
    assert_eq!(a.status, 201);
}

#[test]
fn mode_and_source_rules() {
    let sim = sim();
    let base = "/v3/manage/pipelines/7/stages/4";
    for (query, mentions) in [
        ("", "mode"),
        ("?mode=", "mode"),
        ("?mode=Retry", "mode"),
        ("?mode=retry&mode=retry", "mode"),
        ("?mode=retry&source=rollback::true", "source"),
        ("?mode=rollback", "source"),
        ("?mode=rollback&source=rollback", "source"),
        ("?mode=rollback&source=%ZZ", "percent"),
    ] {
        assert_400(&answer(&sim, post(&format!("{base}{query}"))), mentions);
    }
    assert_eq!(sim.stats().executions, 0);
}

#[test]
fn stage_bounds_and_deploy_only_rollback() {
    let sim = sim_with(SimConfig {
        stages: 3,
        ..SimConfig::default()
    });
    let call = |p: &str| {
        answer(
            &sim,
            ApiRequest {
                token: Some("x"),
                ..post(p)
            },
        )
    };
    assert_eq!(
        call("/v3/manage/pipelines/1/stages/2?mode=retry").status,
        201
    );
    assert_400(
        &call("/v3/manage/pipelines/1/stages/3?mode=retry"),
        "has 3 steps",
    );
    assert_400(
        &call("/v3/manage/pipelines/1/stages/1?mode=rollback&source=rollback::true"),
        "not a deploy step",
    );
    assert_eq!(
        call("/v3/manage/pipelines/1/stages/2?mode=rollback&source=rollback::true").status,
        201
    );
}

#[test]
fn idempotency_key_must_be_visible_ascii() {
    let sim = sim();
    for key in ["", "has space", &"k".repeat(MAX_KEY_LEN + 1)] {
        let a = answer(
            &sim,
            ApiRequest {
                idempotency_key: Some(key),
                traceparent: None,
                ..post(RETRY)
            },
        );
        assert_400(&a, "Idempotency-Key");
    }
}

#[test]
fn idempotent_replay_executes_once() {
    let sim = sim();
    let with_key = |key| ApiRequest {
        idempotency_key: Some(key),
        traceparent: None,
        ..post(RETRY)
    };
    let first = answer(&sim, with_key("k1"));
    let second = answer(&sim, with_key("k1"));
    assert_eq!(first, second);
    assert_eq!(first.status, 201);
    assert_eq!(answer(&sim, with_key("k2")).status, 201);
    assert_eq!(
        sim.executions(),
        HashMap::from([("k1".into(), 1), ("k2".into(), 1)])
    );
    assert_eq!(sim.stats().executions, 2);
    let calls = sim.calls();
    assert_eq!(
        calls
            .iter()
            .map(|c| (c.executed, c.replayed))
            .collect::<Vec<_>>(),
        [(true, false), (false, true), (true, false)]
    );
    // Without a key every request executes.
    answer(&sim, post(RETRY));
    answer(&sim, post(RETRY));
    assert_eq!(sim.stats().executions, 4);
}

#[test]
fn concurrent_requests_with_one_key_execute_once() {
    let sim = sim();
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                for _ in 0..50 {
                    let a = answer(
                        &sim,
                        ApiRequest {
                            idempotency_key: Some("shared"),
                            traceparent: None,
                            ..post(RETRY)
                        },
                    );
                    assert_eq!(a.status, 201);
                }
            });
        }
    });
    assert_eq!(sim.executions()["shared"], 1);
    assert_eq!(sim.stats().executions, 1);
    assert_eq!(sim.stats().requests, 400);
}

#[test]
fn key_reused_for_another_step_is_409() {
    let sim = sim();
    let a = answer(
        &sim,
        ApiRequest {
            idempotency_key: Some("k"),
            traceparent: None,
            ..post(RETRY)
        },
    );
    assert_eq!(a.status, 201);
    let b = answer(
        &sim,
        ApiRequest {
            idempotency_key: Some("k"),
            traceparent: None,
            ..post(ROLLBACK)
        },
    );
    assert_eq!(b.status, 409);
    assert_eq!(body(&b)["error_code"], "SVCSTG.SWR.4090001");
    assert_eq!(sim.executions()["k"], 1);
}

#[test]
fn faults_are_not_stored_and_do_not_execute() {
    let sim = sim();
    let id = sim.add_rule(FaultRule {
        status: Some(503),
        times: Some(2),
        retry_after: Some("1".into()),
        ..FaultRule::default()
    });
    let req = ApiRequest {
        idempotency_key: Some("k"),
        traceparent: None,
        ..post(RETRY)
    };
    for _ in 0..2 {
        let a = answer(&sim, req);
        assert_eq!(a.status, 503);
        assert_eq!(a.retry_after.as_deref(), Some("1"));
        let b = body(&a);
        assert_eq!(b["error_code"], "SVCSTG.SWR.5030001");
        assert!(b.get("request_id").is_none());
    }
    assert!(sim.executions().is_empty());
    assert_eq!(answer(&sim, req).status, 201);
    assert_eq!(sim.executions()["k"], 1);
    let rules = sim.rules();
    assert_eq!(
        (rules[0].id, rules[0].remaining, rules[0].applied),
        (id, Some(0), 2)
    );
    let faulted: Vec<_> = sim.calls().iter().map(|c| c.fault_rule).collect();
    assert_eq!(faulted, [Some(id), Some(id), None]);
}

#[test]
fn rule_matching_by_pipeline_range_stage_and_mode() {
    let rule = FaultRule {
        pipeline_range: Some([10, 20]),
        stage_index: Some(4),
        mode: Some("rollback".into()),
        status: Some(500),
        ..FaultRule::default()
    };
    assert!(rule.matches(Some(10), Some(4), Some("rollback")));
    assert!(rule.matches(Some(20), Some(4), Some("rollback")));
    assert!(!rule.matches(Some(9), Some(4), Some("rollback")));
    assert!(!rule.matches(Some(21), Some(4), Some("rollback")));
    assert!(!rule.matches(None, Some(4), Some("rollback")));
    assert!(!rule.matches(Some(15), Some(3), Some("rollback")));
    assert!(!rule.matches(Some(15), Some(4), Some("retry")));
    assert!(!rule.matches(Some(15), Some(4), None));
    let exact = FaultRule {
        pipeline_id: Some(7),
        status: Some(500),
        ..FaultRule::default()
    };
    assert!(exact.matches(Some(7), None, None));
    assert!(!exact.matches(Some(8), None, None));
    assert!(FaultRule::default().matches(None, None, None));
}

#[test]
fn first_rule_with_times_left_wins_in_insertion_order() {
    let sim = sim();
    let once = sim.add_rule(FaultRule {
        pipeline_id: Some(7),
        status: Some(429),
        times: Some(1),
        ..FaultRule::default()
    });
    let always = sim.add_rule(FaultRule {
        status: Some(500),
        error_code: Some("SVCSTG.SWR.5000099".into()),
        ..FaultRule::default()
    });
    let a = answer(&sim, post(RETRY));
    assert_eq!(a.status, 429);
    let b = body(&a);
    assert_eq!(b["error_code"], "APIG.0308");
    assert!(b["request_id"].is_string());
    for _ in 0..3 {
        let a = answer(&sim, post(RETRY));
        assert_eq!(a.status, 500);
        assert_eq!(body(&a)["error_code"], "SVCSTG.SWR.5000099");
    }
    assert!(sim.remove_rule(always));
    assert!(!sim.remove_rule(always));
    assert_eq!(answer(&sim, post(RETRY)).status, 201);
    assert_eq!(sim.rules().len(), 1);
    assert_eq!(sim.rules()[0].id, once);
    assert_eq!(sim.clear_rules(), 1);
}

#[test]
fn rules_apply_after_auth_and_before_validation() {
    let sim = sim();
    sim.add_rule(FaultRule {
        status: Some(503),
        times: Some(1),
        ..FaultRule::default()
    });
    let unauth = answer(
        &sim,
        ApiRequest {
            token: None,
            ..post(RETRY)
        },
    );
    assert_eq!(unauth.status, 401);
    // Still unspent: the invalid request below consumes it.
    let a = answer(&sim, post("/v3/manage/pipelines/x/stages/1?mode=retry"));
    assert_eq!(a.status, 503);
    assert_eq!(sim.rules()[0].remaining, Some(0));
}

#[test]
fn delay_only_rule_falls_through_to_the_model() {
    let sim = sim();
    let id = sim.add_rule(FaultRule {
        delay_ms: Some(1500),
        ..FaultRule::default()
    });
    let call = sim.begin(post(RETRY));
    let plan = sim.admit(&call);
    assert_eq!(plan.delay, Some(Duration::from_millis(1500)));
    assert_eq!(
        sim.complete(&call, plan),
        Outcome::Answer(Answer::created())
    );
    let rec = &sim.calls()[0];
    assert!(rec.executed);
    assert_eq!(rec.fault_rule, Some(id));
}

#[test]
fn drop_rule_drops_and_records_no_status() {
    let sim = sim();
    sim.add_rule(FaultRule {
        drop_connection: true,
        times: Some(1),
        ..FaultRule::default()
    });
    assert_eq!(run(&sim, post(RETRY)), Outcome::Drop);
    assert_eq!(answer(&sim, post(RETRY)).status, 201);
    let calls = sim.calls();
    assert_eq!(calls[0].status, None);
    assert!(!calls[0].executed);
    assert_eq!(calls[1].status, Some(201));
}

#[test]
fn recording_is_bounded_and_keeps_the_latest() {
    let sim = sim_with(SimConfig {
        max_recorded: 3,
        ..SimConfig::default()
    });
    for stage in 0..5 {
        let path = format!("/v3/manage/pipelines/1/stages/{stage}?mode=retry");
        let a = answer(
            &sim,
            ApiRequest {
                token: Some("t"),
                ..post(&path)
            },
        );
        assert_eq!(a.status, 201);
    }
    let calls = sim.calls();
    assert_eq!(
        calls
            .iter()
            .map(|c| (c.seq, c.stage_index))
            .collect::<Vec<_>>(),
        [(3, Some(2)), (4, Some(3)), (5, Some(4))]
    );
    assert_eq!(
        sim.stats(),
        SimStats {
            requests: 5,
            executions: 5,
            recorded_overflow: 2,
            ..SimStats::default()
        }
    );
    let first = &calls[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/v3/manage/pipelines/1/stages/2");
    assert_eq!(first.query.as_deref(), Some("mode=retry"));
    assert_eq!(first.mode.as_deref(), Some("retry"));
    assert!(first.token_valid && first.at_unix_ms > 0);
}

#[test]
fn fast_mode_keeps_only_counters() {
    let sim = sim_with(SimConfig {
        record: false,
        ..SimConfig::default()
    });
    for _ in 0..3 {
        let a = answer(
            &sim,
            ApiRequest {
                token: Some("t"),
                idempotency_key: Some("k"),
                traceparent: None,
                ..post(RETRY)
            },
        );
        assert_eq!(a.status, 201);
    }
    assert!(sim.calls().is_empty());
    assert!(sim.executions().is_empty());
    // Idempotency is not honoured in fast mode.
    assert_eq!(sim.stats().executions, 3);
    assert_eq!(sim.stats().recorded_overflow, 0);
}

#[test]
fn reset_clears_everything_but_keeps_rule_ids_unique() {
    let sim = sim();
    let old = sim.add_rule(FaultRule {
        status: Some(500),
        times: Some(1),
        ..FaultRule::default()
    });
    answer(&sim, post(RETRY));
    answer(
        &sim,
        ApiRequest {
            idempotency_key: Some("k"),
            traceparent: None,
            ..post(RETRY)
        },
    );
    sim.reset();
    assert!(sim.rules().is_empty() && sim.calls().is_empty() && sim.executions().is_empty());
    assert_eq!(sim.stats(), SimStats::default());
    let new = sim.add_rule(FaultRule {
        delay_ms: Some(1),
        ..FaultRule::default()
    });
    assert!(new > old);
    // The stored answer is gone, so the key executes again.
    answer(
        &sim,
        ApiRequest {
            idempotency_key: Some("k"),
            traceparent: None,
            ..post(RETRY)
        },
    );
    assert_eq!(sim.executions()["k"], 1);
    assert_eq!(sim.stats().executions, 1);
}

#[test]
fn zero_stages_is_refused() {
    let err = Sim::new(SimConfig {
        stages: 0,
        ..SimConfig::default()
    })
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
fn rule_validation_names_the_field() {
    let cases: [(FaultRule, &str); 8] = [
        (FaultRule::default(), "status"),
        (
            FaultRule {
                status: Some(700),
                ..FaultRule::default()
            },
            "status",
        ),
        (
            FaultRule {
                status: Some(500),
                pipeline_range: Some([5, 1]),
                ..FaultRule::default()
            },
            "pipeline_range",
        ),
        (
            FaultRule {
                status: Some(500),
                mode: Some("retyr".into()),
                ..FaultRule::default()
            },
            "mode",
        ),
        (
            FaultRule {
                drop_connection: true,
                status: Some(500),
                ..FaultRule::default()
            },
            "drop_connection",
        ),
        (
            FaultRule {
                delay_ms: Some(1),
                retry_after: Some("1".into()),
                ..FaultRule::default()
            },
            "retry_after",
        ),
        (
            FaultRule {
                status: Some(503),
                retry_after: Some("1\n".into()),
                ..FaultRule::default()
            },
            "retry_after",
        ),
        (
            FaultRule {
                delay_ms: Some(MAX_DELAY_MS + 1),
                ..FaultRule::default()
            },
            "delay_ms",
        ),
    ];
    for (rule, field) in cases {
        assert_eq!(rule.validate().unwrap_err().field, field, "{rule:?}");
    }
}

#[test]
fn rule_json_errors_name_the_field() {
    let rule = FaultRule::from_json(
        br#"{"pipeline_range":[1,9],"mode":"retry","status":503,"retry_after":"2","times":2}"#,
    )
    .unwrap();
    assert_eq!(rule.pipeline_range, Some([1, 9]));
    assert_eq!(rule.times, Some(2));
    assert!(!rule.drop_connection);
    for (json, field) in [
        (&br#"{"status":"503"}"#[..], "status"),
        (br#"{"times":-1}"#, "times"),
        (br#"{"pipeline_range":[1]}"#, "pipeline_range"),
        (br#"{"drop_connection":"yes"}"#, "drop_connection"),
        (br#"{"statsu":503}"#, "statsu"),
        (br#"[1]"#, "body"),
        (br#"{"status":"#, "body"),
    ] {
        let err = FaultRule::from_json(json).unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.message.contains("expected"), "{err}");
    }
}
