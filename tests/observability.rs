//! The dashboard (deploy/grafana) and alert rules (deploy/prometheus) name only metrics that
//! exist: the worker's, as its /metrics renders them, and RabbitMQ's Prometheus plugin's. The
//! rules pass `promtool check rules` and their unit tests (`promtool test rules`).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use swr_stage_worker::telemetry::metrics::Metrics;

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/swr-stage-worker.json"
);
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
const ALERT_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/prometheus/alerts.test.yml"
);

/// The RabbitMQ metrics the files use, from the rabbitmq_prometheus plugin's per-object queue
/// metrics (`prometheus.return_per_object_metrics = true`, or the /metrics/per-object path),
/// the same in RabbitMQ 3.10 to 4.x.
const RABBITMQ_METRICS: &[&str] = &[
    "rabbitmq_queue_messages",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_consumers",
];

/// Every metric name the worker's /metrics serves: sample names, and each declared family with
/// a histogram's `_bucket`, `_sum` and `_count` series (a labelled counter without samples yet
/// is still declared).
fn worker_metrics() -> BTreeSet<String> {
    let text = Metrics::default().render();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut fields = declared.split_whitespace();
            let (name, kind) = (fields.next().unwrap(), fields.next().unwrap());
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The metric names an expression (or a whole file) mentions.
fn mentioned(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("swr_stage_") || word.starts_with("rabbitmq_"))
        .map(str::to_owned)
        .collect()
}

fn assert_known(what: &str, names: &BTreeSet<String>) {
    let worker = worker_metrics();
    let unknown: Vec<&String> = names
        .iter()
        .filter(|n| !worker.contains(*n) && !RABBITMQ_METRICS.contains(&n.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "{what} names metrics nobody exports: {unknown:?}; the worker's are {worker:?}"
    );
}

#[test]
fn the_dashboard_is_valid_json_whose_queries_name_only_exported_metrics() {
    let text = std::fs::read_to_string(DASHBOARD).expect("the dashboard is readable");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut names = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("an id")),
            "{title}: id repeated"
        );
        assert!(panel["gridPos"]["w"].as_u64().is_some(), "{title}: gridPos");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expr");
            let found = mentioned(expr);
            assert!(!found.is_empty(), "{title}: {expr} names no metric");
            names.extend(found);
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "{title}: the datasource is the dashboard's variable, not a fixed one"
            );
        }
    }
    assert_known("the dashboard", &names);
    // It shows what the issue of operating it asks for: throughput, attempts, latency,
    // in-flight, breaker, broker, token refreshes, queue and DLQ depth.
    for wanted in [
        "swr_stage_jobs_total",
        "swr_stage_swr_requests_total",
        "swr_stage_retries_total",
        "swr_stage_swr_request_seconds_bucket",
        "swr_stage_in_flight",
        "swr_stage_circuit_open",
        "swr_stage_broker_connected",
        "swr_stage_token_refresh_total",
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages",
    ] {
        assert!(names.contains(wanted), "the dashboard shows {wanted}");
    }
}

#[test]
fn the_alert_rules_name_only_exported_metrics() {
    let text = std::fs::read_to_string(ALERTS).expect("the rules are readable");
    let names = mentioned(&text);
    assert!(names.len() >= 5, "{names:?}");
    assert_known("alerts.yml", &names);
}

/// `promtool` on PATH, or None. CI sets SWR_TEST_REQUIRE_PROMTOOL=1 (and installs Debian's
/// prometheus package), so there a missing promtool fails instead of skipping.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("SWR_TEST_REQUIRE_PROMTOOL").is_none(),
            "promtool is not on PATH (Debian: apt-get install prometheus)"
        );
        eprintln!("skipped: promtool is not on PATH (Debian: apt-get install prometheus)");
        return None;
    }
    Some("promtool")
}

fn run(promtool: &str, args: &[&str]) -> String {
    let dir = Path::new(ALERTS).parent().unwrap();
    let output = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_pass_promtools_check_and_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let checked = run(promtool, &["check", "rules", ALERTS]);
    assert!(checked.contains("SUCCESS: 6 rules found"), "{checked}");
    let tested = run(promtool, &["test", "rules", ALERT_TESTS]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test.
    let rules = std::fs::read_to_string(ALERTS).unwrap();
    let tests = std::fs::read_to_string(ALERT_TESTS).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no unit test in alerts.test.yml"
        );
    }
}
