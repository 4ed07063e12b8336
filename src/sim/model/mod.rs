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
mod tests;
