//! Campaigns end to end against the real RabbitMQ, the simulator and an in-process worker:
//! submit (validation, keys, confirms, --wait), watch, replay, and the binary's plain output.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::TestEnv;
use lapin::options::BasicGetOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use swr_stage_worker::campaign::input::{self, InputSource};
use swr_stage_worker::campaign::progress::ProgressMode;
use swr_stage_worker::campaign::replay::{self, ReplayPlan};
use swr_stage_worker::campaign::submit::{self, SubmitPlan, SubmitResult};
use swr_stage_worker::campaign::watch::{OutcomeFilter, Watcher, WATCH_PREFETCH};
use swr_stage_worker::campaign::CampaignError;
use swr_stage_worker::outcome::{ErrorKind, Status};
use swr_stage_worker::request::ERROR_HEADER;
use swr_stage_worker::sim::FaultRule;

/// A directory of its own for one test's input and failures files.
fn scratch(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join("swr-stage-worker-tests")
        .join(prefix);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The count in the summary table's row for `label`.
fn table_row<'a>(table: &'a str, label: &str) -> Option<&'a str> {
    table
        .lines()
        .find_map(|line| line.trim_start().strip_prefix(label))
        .map(str::trim)
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

/// A plan that waits for the outcomes, bounded so a broken worker fails the test, not hangs it.
fn waiting_plan(file: &Path, campaign: &str, failures: &Path) -> SubmitPlan {
    SubmitPlan {
        campaign: Some(campaign.to_owned()),
        wait: true,
        timeout: Some(common::WAIT * 4),
        failures: failures.to_owned(),
        ..SubmitPlan::new(InputSource::File(file.to_owned()))
    }
}

async fn run(env: &TestEnv, plan: &SubmitPlan) -> Result<SubmitResult, CampaignError> {
    submit::submit(
        &env.config,
        plan,
        ProgressMode::Hidden,
        std::future::pending(),
    )
    .await
}

/// Line `n` of the 10,000-line campaign: every 100th line is bad in one of four ways.
fn big_campaign_line(n: usize) -> String {
    if !n.is_multiple_of(100) {
        return json!({"pipeline_id": n, "stage_index": n % 4, "metadata": {"row": n}}).to_string();
    }
    match (n / 100) % 4 {
        0 => json!({"pipeline_id": 0, "stage_index": 1}).to_string(),
        1 => json!({"pipeline_id": n, "stage_index": 1, "mode": "restart"}).to_string(),
        2 => json!({"pipeline_id": n, "stage_index": -1}).to_string(),
        _ => json!({"pipeline_id": n, "stage_index": 1, "campaign_id": "another"}).to_string(),
    }
}

fn big_campaign_error(file: &Path, campaign: &str, n: usize) -> String {
    let reason = match (n / 100) % 4 {
        0 => "field `pipeline_id`: expected an integer 1..=2147483647, got 0".to_owned(),
        1 => "field `mode`: expected \"retry\" or \"rollback\", got \"restart\"".to_owned(),
        2 => "field `stage_index`: expected an integer 0..=2147483647, got -1".to_owned(),
        _ => format!("field `campaign_id`: expected \"{campaign}\" (this submission's --campaign) or no campaign_id, got \"another\""),
    };
    format!("{}:{n}: {reason}", file.display())
}

#[tokio::test]
async fn ten_thousand_lines_with_bad_ones_publish_nothing_then_skip_invalid_runs_the_rest() {
    let mut env = TestEnv::start("campaign_10k").await;
    let dir = scratch(&env.prefix);
    let file = dir.join("outage.jsonl");
    let failures = dir.join("failures.jsonl");
    let lines: Vec<String> = (1..=10_000).map(big_campaign_line).collect();
    write_lines(&file, &lines);
    let campaign = format!("{}-outage", env.prefix);

    let parsed = input::read_input(&InputSource::File(file.clone()), None, &campaign, 65536)
        .expect("the file is readable");
    let got: Vec<String> = parsed.errors.iter().map(ToString::to_string).collect();
    let expected: Vec<String> = (1..=100)
        .map(|k| big_campaign_error(&file, &campaign, k * 100))
        .collect();
    assert_eq!(got, expected, "one exact message per bad line, in order");
    assert_eq!(parsed.requests.len(), 9_900);

    let mut plan = waiting_plan(&file, &campaign, &failures);
    match run(&env, &plan).await {
        Err(CampaignError::InvalidLines { invalid, valid }) => {
            assert_eq!((invalid, valid), (100, 9_900))
        }
        other => panic!("expected InvalidLines, got {other:?}"),
    }
    // Nothing reached the queue or SWR: the check happens before the first publish.
    assert_eq!(env.depth(&env.config.amqp.request_queue).await, 0);
    assert_eq!(env.sim.stats().requests, 0);

    plan.skip_invalid = true;
    let result = run(&env, &plan).await.expect("the valid lines run");
    assert_eq!(result.published.unwrap().confirmed, 9_900);
    let summary = result.summary.as_ref().unwrap();
    assert_eq!(summary.received, 9_900, "--wait sees every outcome");
    assert_eq!(summary.count(Status::Succeeded), 9_900);
    assert_eq!(summary.missing(), 0);
    assert!(result.all_succeeded());
    assert!(!failures.exists(), "no failures, no failures file");
    assert_eq!(env.sim.stats().executions, 9_900);
    let table = summary.render();
    assert_eq!(table_row(&table, "succeeded"), Some("9900"), "{table}");
    assert!(table.contains("p50 "), "{table}");
    let _ = std::fs::remove_dir_all(&dir);
    env.stop_worker().await.unwrap();
    env.teardown().await;
}

#[tokio::test]
async fn resubmitting_a_campaign_replays_finished_steps_and_reruns_retryable_failures() {
    let env = TestEnv::start_with(
        "campaign_resubmit",
        &[("SWR_STAGE_WORKER__RETRY__MAX_ATTEMPTS", "2")],
    )
    .await;
    let dir = scratch(&env.prefix);
    let file = dir.join("steps.jsonl");
    let failures = dir.join("failures.jsonl");
    let mut lines: Vec<String> = (0..48)
        .map(|i| json!({"pipeline_id": 5000 + i, "stage_index": i % 4}).to_string())
        .collect();
    // Line 49: SWR is down for this pipeline (retryable); line 50: rollback of a non-deploy
    // step (permanent 400). Spacing kept as an operator might type it.
    lines.push(r#"{"pipeline_id": 6001, "stage_index": 2}"#.to_owned());
    lines.push(r#"{"pipeline_id": 6002,  "stage_index": 1, "mode": "rollback"}"#.to_owned());
    write_lines(&file, &lines);
    env.sim.add_rule(FaultRule {
        pipeline_id: Some(6001),
        status: Some(503),
        ..FaultRule::default()
    });
    let campaign = format!("{}-c", env.prefix);
    let plan = waiting_plan(&file, &campaign, &failures);

    let first = run(&env, &plan).await.unwrap();
    let summary = first.summary.as_ref().unwrap();
    assert_eq!(summary.received, 50);
    assert_eq!(summary.count(Status::Succeeded), 48);
    assert_eq!(summary.count(Status::Failed), 2);
    assert_eq!(summary.by_kind.get("server_error"), Some(&1));
    assert_eq!(summary.by_kind.get("bad_request"), Some(&1));
    assert_eq!(summary.replayed, 0);
    assert!(!first.all_succeeded());
    assert_eq!(
        std::fs::read_to_string(&failures).unwrap(),
        format!("{}\n{}\n", lines[48], lines[49]),
        "failures.jsonl holds the exact input lines"
    );
    let executions = env.sim.stats().executions;
    assert_eq!(executions, 48);

    env.sim.clear_rules();
    std::fs::remove_file(&failures).unwrap();
    let second = run(&env, &plan).await.unwrap();
    let summary = second.summary.as_ref().unwrap();
    assert_eq!(summary.received, 50);
    assert_eq!(
        summary.replayed, 49,
        "finished steps (48 successes, 1 permanent failure) are replayed"
    );
    assert_eq!(
        summary.count(Status::Succeeded),
        49,
        "the retryable one ran again"
    );
    assert_eq!(
        env.sim.stats().executions,
        executions + 1,
        "only the retryable failure reached SWR again"
    );
    assert_eq!(
        std::fs::read_to_string(&failures).unwrap(),
        format!("{}\n", lines[49])
    );

    // Once more, nothing left to run: every outcome is a replay.
    let before = env.sim.stats().requests;
    let third = run(&env, &plan).await.unwrap();
    assert_eq!(third.summary.as_ref().unwrap().replayed, 50);
    assert_eq!(env.sim.stats().requests, before, "no new SWR calls");
    let _ = std::fs::remove_dir_all(&dir);
    env.teardown().await;
}

#[tokio::test]
async fn csv_campaign_with_wait_counts_every_outcome() {
    let env = TestEnv::start("campaign_csv").await;
    let dir = scratch(&env.prefix);
    let file = dir.join("steps.csv");
    let mut lines = vec!["pipeline_id,stage_index,mode".to_owned()];
    lines.extend((0..30).map(|i| {
        let mode = if i % 3 == 0 { "rollback" } else { "" };
        // Rollbacks of the deploy step (index 4 of 5) succeed; the rest are retries.
        let stage = if mode.is_empty() { i % 4 } else { 4 };
        format!("{},{stage},{mode}", 7000 + i)
    }));
    write_lines(&file, &lines);
    let campaign = format!("{}-csv", env.prefix);
    let result = run(&env, &waiting_plan(&file, &campaign, &dir.join("f.jsonl")))
        .await
        .unwrap();
    let summary = result.summary.unwrap();
    assert_eq!(summary.received, 30);
    assert_eq!(summary.count(Status::Succeeded), 30);
    let rollbacks = env
        .sim
        .calls()
        .iter()
        .filter(|c| c.source.as_deref() == Some("rollback::true"))
        .count();
    assert_eq!(rollbacks, 10);
    let _ = std::fs::remove_dir_all(&dir);
    env.teardown().await;
}

#[tokio::test]
async fn paced_submission_keeps_to_the_rate_and_dry_run_sends_nothing() {
    let env = TestEnv::without_worker("campaign_rate", &[]).await;
    let dir = scratch(&env.prefix);
    let file = dir.join("steps.jsonl");
    let lines: Vec<String> = (1..=40)
        .map(|i| json!({"pipeline_id": i, "stage_index": 0}).to_string())
        .collect();
    write_lines(&file, &lines);
    let mut plan = SubmitPlan {
        campaign: Some("paced".to_owned()),
        dry_run: true,
        ..SubmitPlan::new(InputSource::File(file.clone()))
    };
    let dry = run(&env, &plan).await.unwrap();
    assert!(dry.published.is_none());
    assert_eq!(dry.input.requests.len(), 40);
    assert_eq!(env.depth(&env.config.amqp.request_queue).await, 0);

    plan.dry_run = false;
    plan.rate = Some(200.0);
    plan.window = 4;
    let result = run(&env, &plan).await.unwrap();
    let report = result.published.unwrap();
    assert_eq!(report.confirmed, 40);
    // 40 messages at 200/s: the last is due 195 ms after the first.
    assert!(
        report.elapsed.as_millis() >= 195,
        "published too fast: {:?}",
        report.elapsed
    );
    assert_eq!(env.depth(&env.config.amqp.request_queue).await, 40);
    // Each message is persistent JSON with its key as message_id and in the body.
    let message = env
        .channel
        .basic_get(
            env.config.amqp.request_queue.as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("a message");
    let props = &message.delivery.properties;
    assert_eq!(props.delivery_mode(), &Some(2));
    assert_eq!(
        props.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    let body: serde_json::Value = serde_json::from_slice(&message.delivery.data).unwrap();
    assert_eq!(body["campaign_id"], "paced");
    assert_eq!(
        props.message_id().as_ref().unwrap().as_str(),
        body["idempotency_key"].as_str().unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
    env.teardown().await;
}

#[tokio::test]
async fn replay_moves_exactly_the_dead_lettered_messages() {
    let mut env = TestEnv::start("campaign_replay").await;
    // Three requests the worker dead-letters itself (invalid), two the broker would have
    // (valid bodies with x-death, published straight to the DLX here).
    for (pipeline, body) in [
        (
            601,
            json!({"pipeline_id": 601, "stage_index": 0, "mdoe": "rollback"}),
        ),
        (602, json!({"pipeline_id": 602, "stage_index": "x"})),
        (
            603,
            json!({"pipeline_id": 603, "stage_index": 0, "extra": true}),
        ),
    ] {
        env.publish_json(&body).await;
        let (outcome, _) = env.next_outcome().await;
        assert_eq!(outcome.pipeline_id, Some(pipeline));
        assert_eq!(outcome.error.unwrap().kind, ErrorKind::InvalidRequest);
    }
    env.stop_worker().await.unwrap();
    for pipeline in [701, 702] {
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), AMQPValue::Boolean(true));
        let confirm = env
            .channel
            .basic_publish(
                env.config.amqp.dead_letter_exchange.as_str().into(),
                "".into(),
                Default::default(),
                json!({"pipeline_id": pipeline, "stage_index": 1})
                    .to_string()
                    .as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    let dead = env.config.amqp.dead_letter_queue.clone();
    let requests = env.config.amqp.request_queue.clone();
    assert_eq!(env.depth(&dead).await, 5);

    let dry = replay::replay(
        &env.config,
        &ReplayPlan {
            dry_run: true,
            ..ReplayPlan::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(dry.moved.len(), 5);
    assert!(
        dry.moved[0].reason.contains("unknown field"),
        "{:?}",
        dry.moved[0]
    );
    assert_eq!(dry.moved[4].reason, "dead-lettered by the broker (x-death)");
    assert_eq!((env.depth(&dead).await, env.depth(&requests).await), (5, 0));

    let one = replay::replay(
        &env.config,
        &ReplayPlan {
            filters: replay::parse_filters(&["pipeline_id=701".to_owned()]).unwrap(),
            ..ReplayPlan::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(one.moved.len(), 1);
    assert_eq!(one.moved[0].pipeline_id, Some(json!(701)));
    assert_eq!((env.depth(&dead).await, env.depth(&requests).await), (4, 1));

    let two = replay::replay(
        &env.config,
        &ReplayPlan {
            limit: Some(2),
            ..ReplayPlan::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(two.moved.len(), 2);
    assert_eq!((env.depth(&dead).await, env.depth(&requests).await), (2, 3));

    let rest = replay::replay(&env.config, &ReplayPlan::default())
        .await
        .unwrap();
    assert_eq!(rest.moved.len(), 2);
    assert_eq!((env.depth(&dead).await, env.depth(&requests).await), (0, 5));
    let moved: Vec<_> = [one.moved, two.moved, rest.moved].concat();
    let mut pipelines: Vec<i64> = moved
        .iter()
        .map(|m| m.pipeline_id.as_ref().unwrap().as_i64().unwrap())
        .collect();
    pipelines.sort_unstable();
    assert_eq!(pipelines, vec![601, 602, 603, 701, 702]);

    // The copies carry no stale dead-letter reason; the worker then runs the two valid ones
    // and dead-letters the three invalid ones again.
    env.start_worker();
    let outcomes = env.outcomes(5).await;
    let succeeded: Vec<_> = outcomes
        .iter()
        .filter(|o| o.status == Status::Succeeded)
        .filter_map(|o| o.pipeline_id)
        .collect();
    assert_eq!(succeeded.len(), 2, "{outcomes:?}");
    env.stop_worker().await.unwrap();
    let again = env.dead_letters().await;
    assert_eq!(again.len(), 3);
    for message in &again {
        let headers = message.delivery.properties.headers().as_ref().unwrap();
        assert!(headers.inner().contains_key(ERROR_HEADER));
    }
    env.teardown().await;
}

/// Runs the binary with this test's configuration; stdin and stderr piped (not a terminal).
fn binary(env: &TestEnv, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_swr-stage-worker"));
    command
        .args(args)
        .envs(env.binary_env())
        .env_remove("RUST_LOG")
        .env_remove("SWR_STAGE_WORKER_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Feeds `input` to the binary's stdin and returns (exit code, stdout, stderr).
async fn run_binary(env: &TestEnv, args: &[&str], input: &str) -> (i32, String, String) {
    let mut child = binary(env, args).spawn().expect("the binary starts");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let output = tokio::time::timeout(common::WAIT * 2, child.wait_with_output())
        .await
        .expect("the command ends in time")
        .unwrap();
    (
        output.status.code().expect("exited, not killed"),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test]
async fn binary_submit_from_stdin_prints_plain_progress_and_exits_by_result() {
    let env = TestEnv::start("campaign_cli").await;
    let dir = scratch(&env.prefix);
    let failures = dir.join("failures.jsonl");
    let failures_arg = failures.display().to_string();
    let campaign = format!("{}-cli", env.prefix);
    let good: String = (1..=5)
        .map(|i| format!("{}\n", json!({"pipeline_id": 900 + i, "stage_index": 1})))
        .collect();

    let args = [
        "submit",
        "-",
        "--campaign",
        &campaign,
        "--wait",
        "--timeout",
        "60s",
        "--failures",
        &failures_arg,
    ];
    let (code, stdout, stderr) = run_binary(&env, &args, &good).await;
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    // Not a terminal: plain lines, no bar control codes.
    assert!(stderr.contains("submitted 5/5 ("), "{stderr}");
    assert!(
        stderr.contains("outcomes 5/5 (") && stderr.contains(": succeeded 5, failed 0, rejected 0"),
        "{stderr}"
    );
    assert!(!stderr.contains('\u{1b}'), "no escape codes: {stderr:?}");
    // What was published is said before the outcome count's last line.
    let said = stderr
        .find("submitted 5 request(s) to queue")
        .expect("publish summary");
    assert!(said < stderr.find("outcomes ").unwrap(), "{stderr}");
    assert!(
        stdout.contains(&format!("campaign {campaign}: 5 of 5 outcome(s)")),
        "{stdout}"
    );

    // A permanent failure: exit 2 and the exact line in the failures file.
    let bad_step = r#"{"pipeline_id": 950, "stage_index": 1, "mode": "rollback"}"#;
    let (code, stdout, _) = run_binary(&env, &args, &format!("{good}{bad_step}\n")).await;
    assert_eq!(code, 2, "{stdout}");
    assert_eq!(
        table_row(&stdout, "replayed (SWR not called)"),
        Some("5"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&failures).unwrap(),
        format!("{bad_step}\n")
    );

    // An invalid line: exit 1, the line named, nothing sent.
    let before = env.sim.stats().requests;
    let (code, _, stderr) = run_binary(
        &env,
        &args,
        "{\"pipeline_id\": 960, \"stage_index\": 0}\n{\"pipeline_id\": 961}\n",
    )
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "<stdin>:2: field `stage_index`: required, expected an integer 0..=2147483647"
        ),
        "{stderr}"
    );
    assert_eq!(env.sim.stats().requests, before);

    // CSV on stdin, one request from flags.
    let (code, _, stderr) = run_binary(
        &env,
        &["submit", "-", "--campaign", &campaign],
        "pipeline_id,stage_index\n970,0\n971,2\n",
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("submitted 2/2 ("), "{stderr}");
    let (code, stdout, _) = run_binary(
        &env,
        &[
            "submit",
            "--pipeline",
            "980",
            "--stage",
            "4",
            "--mode",
            "rollback",
            "--dry-run",
        ],
        "",
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with(
            r#"{"pipeline_id":980,"stage_index":4,"mode":"rollback","campaign_id":"campaign-"#
        ),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    env.teardown().await;
}

#[tokio::test]
async fn binary_watch_counts_its_campaign_only_and_rebuilds_failures() {
    let env = TestEnv::start("campaign_watch").await;
    let dir = scratch(&env.prefix);
    let failures = dir.join("failures.jsonl");
    let campaign = format!("{}-w", env.prefix);
    let mut child = binary(
        &env,
        &[
            "watch",
            "--campaign",
            &campaign,
            "--expect",
            "3",
            "--timeout",
            "60s",
            "--failures",
            &failures.display().to_string(),
        ],
    )
    .spawn()
    .unwrap();
    // Wait until the watcher's queue is bound: it says so on stderr.
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(common::WAIT, stderr.next_line())
        .await
        .expect("watch starts in time")
        .unwrap()
        .unwrap();
    assert!(
        first.starts_with("watching outcomes of campaign"),
        "{first}"
    );

    // Another campaign's outcome must not count.
    env.publish_json(&json!({"pipeline_id": 1, "stage_index": 0, "campaign_id": "someone-else"}))
        .await;
    let file = dir.join("steps.jsonl");
    write_lines(
        &file,
        &[
            json!({"pipeline_id": 1100, "stage_index": 0}).to_string(),
            json!({"pipeline_id": 1101, "stage_index": 0}).to_string(),
            json!({"pipeline_id": 1102, "stage_index": 2, "mode": "rollback", "metadata": {"ticket": "OPS-9"}}).to_string(),
        ],
    );
    let plan = SubmitPlan {
        campaign: Some(campaign.clone()),
        ..SubmitPlan::new(InputSource::File(file))
    };
    run(&env, &plan).await.unwrap();

    let status = tokio::time::timeout(common::WAIT, child.wait())
        .await
        .expect("watch ends once 3 outcomes are in")
        .unwrap();
    let mut rest = Vec::new();
    while let Some(line) = stderr.next_line().await.unwrap() {
        rest.push(line);
    }
    assert_eq!(status.code(), Some(2), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.starts_with("outcomes 3/3 (")
            && l.ends_with("/s): succeeded 2, failed 1, rejected 0")),
        "{rest:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&failures).unwrap(),
        format!(
            "{{\"pipeline_id\":1102,\"stage_index\":2,\"mode\":\"rollback\",\"campaign_id\":\"{campaign}\",\"metadata\":{{\"ticket\":\"OPS-9\"}}}}\n"
        ),
        "rebuilt from the outcome"
    );
    let _ = std::fs::remove_dir_all(&dir);
    env.teardown().await;
}

/// Ctrl-C while a paced campaign is publishing stops it between publishes and says how far it
/// got; an empty --campaign (an unset shell variable) is refused before anything is sent.
#[tokio::test]
async fn an_interrupted_submit_says_how_far_it_got_and_an_empty_campaign_is_refused() {
    let env = TestEnv::start_with("submit-stop", &[]).await;
    let dir = scratch(&env.prefix);
    let file = dir.join("paced.jsonl");
    let lines: Vec<String> = (1..=100)
        .map(|n| json!({"pipeline_id": n, "stage_index": 0}).to_string())
        .collect();
    write_lines(&file, &lines);
    let plan = SubmitPlan {
        campaign: Some("stop-test".into()),
        // 100 lines at 5 a second take 20 s; the stop comes long before.
        rate: Some(5.0),
        failures: dir.join("failures.jsonl"),
        ..SubmitPlan::new(InputSource::File(file.clone()))
    };
    let stopped = submit::submit(
        &env.config,
        &plan,
        ProgressMode::Hidden,
        tokio::time::sleep(std::time::Duration::from_millis(700)),
    )
    .await;
    match stopped {
        Err(CampaignError::Interrupted { confirmed, total }) => {
            assert_eq!(total, 100);
            assert!(confirmed < total, "{confirmed} confirmed");
        }
        other => panic!("expected an interruption, got {other:?}"),
    }
    let empty = SubmitPlan {
        campaign: Some(String::new()),
        ..plan
    };
    let refused = run(&env, &empty).await;
    assert!(
        matches!(&refused, Err(CampaignError::BadCampaign(_))),
        "{refused:?}"
    );
    let message = refused.unwrap_err().to_string();
    assert!(
        message.contains("--campaign") && message.contains("1..=128"),
        "{message}"
    );
    env.teardown().await;
}

/// `failures.jsonl` holds every line that did not succeed, including those whose outcome had not
/// arrived when the wait ended (here no worker runs at all).
#[tokio::test]
async fn lines_without_an_outcome_are_in_the_failures_file() {
    let mut env = TestEnv::start_with("no-outcome", &[]).await;
    env.stop_worker().await.unwrap();
    let dir = scratch(&env.prefix);
    let file = dir.join("in.jsonl");
    let lines: Vec<String> = (1..=3)
        .map(|n| json!({"pipeline_id": n, "stage_index": 0}).to_string())
        .collect();
    write_lines(&file, &lines);
    let failures = dir.join("failures.jsonl");
    let plan = SubmitPlan {
        campaign: Some("nobody-answers".into()),
        wait: true,
        timeout: Some(Duration::from_secs(1)),
        failures: failures.clone(),
        ..SubmitPlan::new(InputSource::File(file))
    };
    let result = run(&env, &plan).await.unwrap();
    assert!(!result.all_succeeded());
    let written = std::fs::read_to_string(&failures).unwrap();
    assert_eq!(written.lines().collect::<Vec<_>>(), lines);
    env.teardown().await;
}

/// The outcome watcher holds at most `WATCH_PREFETCH` outcomes unacked, so its memory does not
/// grow with the exchange's traffic: the rest wait in its queue on the broker. Counting runs
/// while publishing is still going on (`started` not yet resolved), draining that queue.
#[tokio::test]
async fn the_outcome_watcher_is_bounded_by_its_prefetch_and_counts_while_publishing() {
    const N: usize = 1000;
    let env = TestEnv::without_worker("watch-prefetch", &[]).await;
    let limit = Duration::from_secs(10);
    let watcher = Watcher::bind(&env.conn, &env.config.amqp, limit)
        .await
        .unwrap();
    let queue = watcher.queue().to_owned();
    for n in 0..N {
        let outcome = json!({
            "idempotency_key": format!("key-{n}"), "pipeline_id": n + 1, "stage_index": 0,
            "mode": "retry", "status": "succeeded", "http_status": 201, "attempts": 1,
            "replayed": false, "error": null, "campaign_id": "bounded", "metadata": null,
            "swr_request_id": null, "started_at": "2026-11-29T05:20:28.123Z",
            "finished_at": "2026-11-29T05:20:28.141Z", "duration_ms": 18, "worker": "test/1"
        });
        let confirm = env
            .channel
            .basic_publish(
                env.config.amqp.results_exchange.as_str().into(),
                "stage.retry.succeeded".into(),
                Default::default(),
                outcome.to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    // Nothing reads yet: the broker has handed over the prefetch and holds the rest.
    let held = N - usize::from(WATCH_PREFETCH);
    wait_for_depth(&env, &queue, held as u32).await;

    let (published, published_rx) = tokio::sync::oneshot::channel();
    let filter = OutcomeFilter {
        campaign: "bounded".into(),
        keys: None,
    };
    let counting = watcher.collect_after(
        &filter,
        Some(N),
        Some(Duration::from_secs(30)),
        ProgressMode::Hidden,
        std::future::pending(),
        async { published_rx.await.unwrap_or(false) },
    );
    let publishing = async {
        // "Publishing" ends only once the watcher has emptied its queue on the broker.
        wait_for_depth(&env, &queue, 0).await;
        published.send(true).unwrap();
    };
    let (summary, ()) = tokio::join!(counting, publishing);
    let summary = summary.unwrap();
    assert_eq!(summary.received, N);
    assert_eq!(summary.count(Status::Succeeded), N);
    assert_eq!(summary.timed_out, None);
    env.teardown().await;
}

/// Waits (up to 20 s) until `queue` holds exactly `depth` ready messages.
async fn wait_for_depth(env: &TestEnv, queue: &str, depth: u32) {
    let waiting = async {
        while env.depth(queue).await != depth {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .is_err()
    {
        panic!(
            "queue {queue} holds {} messages, expected {depth}",
            env.depth(queue).await
        );
    }
}

/// A usage error of a campaign command exits 1 (its 2 means "some requests failed"), also when
/// a global flag with a value comes first; the worker's own commands keep clap's 2.
#[test]
fn usage_errors_of_campaign_commands_exit_1_whatever_comes_first() {
    let exit = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_swr-stage-worker"))
            .args(args)
            .env_remove("SWR_STAGE_WORKER_CONFIG")
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.code().expect("exited"), stderr)
    };
    for args in [
        &["submit", "--bogus"][..],
        &["--config", "any.toml", "submit", "--bogus"],
        &["--log-format", "json", "watch", "--expect", "many"],
        &["--config", "any.toml", "replay", "--bogus"],
        &["submit", "-", "--rate", "1e-300"],
    ] {
        let (code, stderr) = exit(args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stderr.contains("error:"), "{args:?}: {stderr}");
    }
    for args in [&["--config", "any.toml", "run", "--bogus"][..], &["bogus"]] {
        let (code, stderr) = exit(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
    }
}
