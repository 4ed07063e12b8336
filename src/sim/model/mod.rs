//! The simulator's logic without HTTP: one call's flow (auth, fault rules, request validation,
//! execution or replay). The HTTP layer only translates to and from [`ApiRequest`] and
//! [`Outcome`], so everything here is unit-testable with plain values. Its parts: `wire` (the
//! path, the query and Huawei's error bodies), `rules` (fault rules) and `state` (what the
//! simulator remembers: rules, answers, the call log, counters).

mod rules;
mod state;
mod wire;

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::iam::{Iam, Issued};
use rules::fault_answer;
pub use rules::RuleError;
pub(super) use state::lock;
use state::{now_unix_ms, Book, KeyEntry, Rules};
pub(crate) use wire::not_found;
use wire::{
    gateway_error, parse_query, split_path, swr_error, valid_key, Mode, QueryParams, MAX_KEY_LEN,
    MAX_PARAM, ROLLBACK_SOURCE,
};

/// Borrowed view of one HTTP request to the SWR route.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ApiRequest<'a> {
    /// Only POST is part of the API.
    pub method: &'a str,
    /// Carries the two path parameters.
    pub path: &'a str,
    /// Carries `mode` and `source`, still percent-encoded.
    pub query: Option<&'a str>,
    /// `X-Auth-Token`; a non-text header is passed as `""` (never accepted).
    pub token: Option<&'a str>,
    /// `Idempotency-Key`; a non-text header is passed as `""` (refused).
    pub idempotency_key: Option<&'a str>,
    /// `traceparent` (W3C Trace Context), recorded as sent; a non-text header is passed as `""`.
    pub traceparent: Option<&'a str>,
}

/// A request after the cheap parsing every later stage needs.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    /// The request as received.
    req: ApiRequest<'a>,
    /// Arrival order, for the call log.
    seq: u64,
    /// Arrival time; 0 in fast mode where nothing is recorded.
    at_unix_ms: u64,
    /// Sent as `X-Request-Id` and inside gateway-shaped errors.
    pub request_id: String,
    /// Path segment for `pipeline_id` (empty if the path didn't fit).
    pipeline_raw: &'a str,
    /// Path segment for `stage_index`.
    stage_raw: &'a str,
    /// `pipeline_id` if it is an integer, for rule matching and recording.
    pipeline_id: Option<i64>,
    /// `stage_index` if it is an integer.
    stage_index: Option<i64>,
    /// Decoded query, or the 400 message if it couldn't be decoded.
    query: Result<QueryParams<'a>, String>,
    /// Decided once so every later stage and the log agree.
    token_valid: bool,
    /// The token was issued by the IAM endpoint but has expired: the 401 says so.
    token_expired: bool,
}

impl Call<'_> {
    fn mode_raw(&self) -> Option<&str> {
        self.query.as_ref().ok().and_then(|q| q.mode.as_deref())
    }

    fn source_raw(&self) -> Option<&str> {
        self.query.as_ref().ok().and_then(|q| q.source.as_deref())
    }
}

/// One HTTP answer, minus the `X-Request-Id` the HTTP layer adds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    /// HTTP status.
    pub status: u16,
    /// JSON body; borrowed for the common `{}` so success doesn't allocate.
    pub body: Cow<'static, str>,
    /// `Retry-After` value, only from fault rules.
    pub retry_after: Option<String>,
    /// Whether to send `Allow: POST` (405 answers need it).
    pub allow_post: bool,
}

impl Answer {
    fn new(status: u16, body: impl Into<Cow<'static, str>>) -> Answer {
        Answer {
            status,
            body: body.into(),
            retry_after: None,
            allow_post: false,
        }
    }

    fn created() -> Answer {
        Answer::new(201, "{}")
    }
}

/// What the HTTP layer must do with a call.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Send this answer.
    Answer(Answer),
    /// Abort the connection without a response.
    Drop,
}

/// Decision taken before any delay: what to do once the delay is over.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Sleep this long first (from a fault rule).
    pub delay: Option<Duration>,
    /// The rule responsible, for the call log.
    rule_id: Option<u64>,
    /// What happens after the delay.
    action: Action,
}

/// What happens to a call once any delay is over.
#[derive(Debug)]
enum Action {
    /// An answer that doesn't involve the model (405, 401, injected fault).
    Answer(Answer),
    /// Injected transport failure.
    Drop,
    /// Validate and execute (or replay).
    Execute,
}

/// A request that passed validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Valid<'a> {
    /// In `1..=MAX_PARAM`.
    pipeline_id: i64,
    /// An existing step of the pipeline.
    stage_index: i64,
    /// With a `source` that fits it.
    mode: Mode,
    /// Well-formed `Idempotency-Key`, if one was sent.
    key: Option<&'a str>,
}

/// The simulator's whole state, shared by the HTTP layer and [`super::SimHandle`].
#[derive(Debug)]
pub(crate) struct Sim {
    /// Accepted tokens; empty = any non-empty token.
    tokens: HashSet<String>,
    /// Steps per pipeline; the last is the deploy step.
    stages: u32,
    /// Record mode (log, per-key counts, idempotency) vs fast mode.
    record: bool,
    /// Bound on the call log.
    max_recorded: usize,
    /// All calls to the SWR route.
    requests: AtomicU64,
    /// All executions.
    executions: AtomicU64,
    /// Log entries evicted; atomic so `stats` needn't take the log lock.
    overflow: AtomicU64,
    /// Fault rules; a lock of their own so rule checks don't contend with the log.
    rules: Mutex<Rules>,
    /// Idempotency store and call log.
    book: Mutex<Book>,
    /// The IAM token endpoint and the tokens it issued.
    iam: Iam,
}

impl Sim {
    /// Counts the request and does the parsing every later stage shares.
    pub(crate) fn begin<'a>(&self, req: ApiRequest<'a>) -> Call<'a> {
        let seq = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let at_unix_ms = if self.record { now_unix_ms() } else { 0 };
        let (pipeline_raw, stage_raw) = split_path(req.path).unwrap_or(("", ""));
        let issued = self.issued(req.token);
        Call {
            req,
            seq,
            at_unix_ms,
            request_id: uuid::Uuid::new_v4().to_string(),
            pipeline_raw,
            stage_raw,
            pipeline_id: pipeline_raw.parse().ok(),
            stage_index: stage_raw.parse().ok(),
            query: parse_query(req.query.unwrap_or("")),
            token_valid: issued == Issued::Valid
                || (issued == Issued::Unknown && self.token_ok(req.token)),
            token_expired: issued == Issued::Expired,
        }
    }

    /// What the IAM endpoint knows of the token; skipped (no lock) when it can have issued none.
    fn issued(&self, token: Option<&str>) -> Issued {
        match token {
            Some(t) if !t.is_empty() && self.iam.enabled() => self.iam.check(t),
            _ => Issued::Unknown,
        }
    }

    fn token_ok(&self, token: Option<&str>) -> bool {
        match token {
            None | Some("") => false,
            Some(t) => self.tokens.is_empty() || self.tokens.contains(t),
        }
    }

    /// Everything decided before a possible delay: method, auth, fault rules.
    pub(crate) fn admit(&self, call: &Call<'_>) -> Plan {
        let immediate = |answer| Plan {
            delay: None,
            rule_id: None,
            action: Action::Answer(answer),
        };
        if call.req.method != "POST" {
            let mut answer = swr_error(
                405,
                "SVCSTG.SWR.4050001",
                &format!("Method {} is not allowed; use POST", call.req.method),
                false,
            );
            answer.allow_post = true;
            return immediate(answer);
        }
        if !call.token_valid {
            let msg = if call.req.token.is_none() {
                "Incorrect IAM authentication information: x-auth-token not found"
            } else if call.token_expired {
                "Incorrect IAM authentication information: token expired"
            } else {
                "Incorrect IAM authentication information: decrypt token fail"
            };
            return immediate(gateway_error(401, "APIG.0301", msg, &call.request_id));
        }
        let Some((rule_id, rule)) =
            self.pick_rule(call.pipeline_id, call.stage_index, call.mode_raw())
        else {
            return Plan {
                delay: None,
                rule_id: None,
                action: Action::Execute,
            };
        };
        let action = if rule.drop_connection {
            Action::Drop
        } else if let Some(status) = rule.status {
            Action::Answer(fault_answer(rule_id, status, &rule, &call.request_id))
        } else {
            Action::Execute
        };
        Plan {
            delay: rule.delay_ms.map(Duration::from_millis),
            rule_id: Some(rule_id),
            action,
        }
    }

    /// Carries out the plan (after its delay) and records the call.
    pub(crate) fn complete(&self, call: &Call<'_>, plan: Plan) -> Outcome {
        let answer = match plan.action {
            Action::Answer(answer) => Some(answer),
            Action::Drop => None,
            Action::Execute => match self.validate(call) {
                Err(answer) => Some(answer),
                Ok(valid) => return self.execute(call, valid, plan.rule_id),
            },
        };
        if self.record {
            let record = self.record_of(call, answer.as_ref().map(|a| a.status), plan.rule_id);
            self.push_record(&mut lock(&self.book), record);
        }
        match answer {
            Some(answer) => Outcome::Answer(answer),
            None => Outcome::Drop,
        }
    }

    /// Replays or executes a valid request; the store check and the
    /// execution share one critical section so two concurrent requests with
    /// one key can't both execute.
    fn execute(&self, call: &Call<'_>, valid: Valid<'_>, rule_id: Option<u64>) -> Outcome {
        if !self.record {
            self.executions.fetch_add(1, Ordering::Relaxed);
            return Outcome::Answer(Answer::created());
        }
        // Built before locking to keep the critical section short.
        let mut record = self.record_of(call, None, rule_id);
        let mut book = lock(&self.book);
        let answer = match valid.key {
            None => {
                record.executed = true;
                Answer::created()
            }
            Some(key) => match book.keys.get(key) {
                Some(entry)
                    if entry.target == (valid.pipeline_id, valid.stage_index, valid.mode) =>
                {
                    record.replayed = true;
                    entry.answer.clone()
                }
                Some(entry) => {
                    let (p, s, m) = entry.target;
                    swr_error(
                        409,
                        "SVCSTG.SWR.4090001",
                        &format!(
                            "Idempotency-Key {key:?} was already used for pipeline {p} stage {s} \
                             mode {}",
                            m.as_str()
                        ),
                        false,
                    )
                }
                None => {
                    let answer = Answer::created();
                    book.keys.insert(
                        key.to_owned(),
                        KeyEntry {
                            executions: 1,
                            target: (valid.pipeline_id, valid.stage_index, valid.mode),
                            answer: answer.clone(),
                        },
                    );
                    record.executed = true;
                    answer
                }
            },
        };
        if record.executed {
            self.executions.fetch_add(1, Ordering::Relaxed);
        }
        record.status = Some(answer.status);
        self.push_record(&mut book, record);
        Outcome::Answer(answer)
    }

    /// Applies the API's rules in the order SWR reports them.
    fn validate<'a>(&self, call: &Call<'a>) -> Result<Valid<'a>, Answer> {
        let bad = |msg: &str| swr_error(400, "SVCSTG.SWR.4000001", msg, true);
        let pipeline_id = call
            .pipeline_id
            .filter(|p| (1..=MAX_PARAM).contains(p))
            .ok_or_else(|| {
                bad(&format!(
                    "Invalid path parameter pipeline_id: expected an integer in 1..={MAX_PARAM}, \
                     got {:?}",
                    call.pipeline_raw
                ))
            })?;
        let stage_index = call
            .stage_index
            .filter(|s| (0..=MAX_PARAM).contains(s))
            .ok_or_else(|| {
                bad(&format!(
                    "Invalid path parameter stage_index: expected an integer in 0..={MAX_PARAM}, \
                     got {:?}",
                    call.stage_raw
                ))
            })?;
        let query = call.query.as_ref().map_err(|msg| bad(msg))?;
        let mode = match query.mode.as_deref() {
            None => {
                return Err(bad(
                    "Missing query parameter mode: expected \"retry\" or \"rollback\"",
                ))
            }
            Some(raw) => Mode::parse(raw).ok_or_else(|| {
                bad(&format!(
                    "Invalid query parameter mode: expected \"retry\" or \"rollback\", got {raw:?}"
                ))
            })?,
        };
        match (mode, query.source.as_deref()) {
            (Mode::Retry, Some(source)) => {
                return Err(bad(&format!(
                    "Invalid query parameter source: must not be set when mode is retry, \
                     got {source:?}"
                )))
            }
            (Mode::Rollback, source) if source != Some(ROLLBACK_SOURCE) => {
                return Err(bad(&format!(
                    "Invalid query parameter source: expected {ROLLBACK_SOURCE:?} when mode is \
                     rollback, got {}",
                    source.map_or("nothing".to_owned(), |s| format!("{s:?}"))
                )))
            }
            _ => {}
        }
        let key = match call.req.idempotency_key {
            Some(key) if !valid_key(key) => {
                return Err(bad(&format!(
                    "Invalid header Idempotency-Key: expected 1 to {MAX_KEY_LEN} visible ASCII \
                     characters"
                )))
            }
            key => key,
        };
        let stages = i64::from(self.stages);
        if stage_index >= stages {
            return Err(bad(&format!(
                "Invalid path parameter stage_index: pipeline {pipeline_id} has {stages} steps \
                 (0..={}), got {stage_index}",
                stages - 1
            )));
        }
        if mode == Mode::Rollback && stage_index != stages - 1 {
            return Err(bad(&format!(
                "Step {stage_index} of pipeline {pipeline_id} is not a deploy step and cannot be \
                 rolled back (the deploy step is {})",
                stages - 1
            )));
        }
        Ok(Valid {
            pipeline_id,
            stage_index,
            mode,
            key,
        })
    }
}

#[cfg(test)]
mod tests {
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
}
