//! The upstream: one attempt (`client`), what an answer means (`classify`), where tokens come
//! from (`auth`), and [`execute`], which drives attempts with the retry schedule until a final
//! answer.

pub mod auth;
pub mod classify;
pub mod client;

use crate::breaker::Breaker;
use crate::config::RetryConfig;
use crate::outcome::{ErrorKind, OutcomeError, Status};
use crate::ratelimit::RateLimiter;
use crate::request::StageRequest;
use crate::retry::{GiveUp, RetrySchedule};
use auth::TokenSource;
use classify::{classify, Class};
use client::{AttemptError, SwrClient};

/// What every attempt passes through besides the schedule.
#[derive(Clone, Copy)]
pub struct Guards<'a> {
    /// The per-process pace of SWR calls.
    pub pace: &'a RateLimiter,
    /// Told about every attempt's class.
    pub breaker: &'a Breaker,
    /// This job is the breaker's probe (its first attempt decides).
    pub probe: bool,
}

/// The result of driving one job against SWR to a final answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Execution {
    /// `Succeeded` or `Failed`.
    pub status: Status,
    /// Status of the last answer SWR gave in any attempt (None if no attempt got an answer).
    pub http_status: Option<u16>,
    /// HTTP attempts made.
    pub attempts: u32,
    /// `X-Request-Id` of the last answer.
    pub swr_request_id: Option<String>,
    /// Why it failed.
    pub error: Option<OutcomeError>,
}

/// What one attempt told us, kept until the next one replaces it.
struct LastError {
    kind: ErrorKind,
    message: String,
    swr_error_code: Option<String>,
}

/// Runs attempts until success, a permanent answer, or the schedule gives up. Every attempt
/// sends the same `key` as `Idempotency-Key`.
pub async fn execute(
    client: &SwrClient,
    tokens: &dyn TokenSource,
    retry: &RetryConfig,
    guards: Guards<'_>,
    request: &StageRequest,
    key: &str,
) -> Execution {
    let mut probe = guards.probe;
    let url = client.url(request);
    let mut schedule = RetrySchedule::new(retry);
    let mut reauthed = false;
    let mut http_status = None;
    let mut swr_request_id = None;
    let finish = |schedule: &RetrySchedule,
                  http_status,
                  swr_request_id,
                  error: Option<(LastError, bool)>| Execution {
        status: if error.is_some() {
            Status::Failed
        } else {
            Status::Succeeded
        },
        http_status,
        attempts: schedule.attempts(),
        swr_request_id,
        error: error.map(|(e, retryable)| OutcomeError {
            kind: e.kind,
            message: e.message,
            retryable,
            swr_error_code: e.swr_error_code,
        }),
    };
    loop {
        schedule.begin_attempt();
        guards.pace.until_ready().await;
        let attempt = match tokens.token().await {
            Ok(token) => client.attempt(&url, key, &token).await.map(|r| (r, token)),
            Err(e) => Err(AttemptError::Transport(e.to_string())),
        };
        let transient = match &attempt {
            Ok((reply, _)) => matches!(
                classify(reply.status, reply.error_code.as_deref()),
                Class::Transient(_)
            ),
            Err(_) => true,
        };
        guards.breaker.record(transient, probe);
        probe = false;
        let (last, retry_after) = match attempt {
            Ok((reply, token)) => {
                http_status = Some(reply.status);
                swr_request_id = reply.request_id.clone();
                let describe = |kind: ErrorKind| LastError {
                    kind,
                    message: describe_answer(reply.status, &reply.error_code, &reply.error_msg),
                    swr_error_code: reply.error_code.clone(),
                };
                match classify(reply.status, reply.error_code.as_deref()) {
                    Class::Success => return finish(&schedule, http_status, swr_request_id, None),
                    Class::Permanent(kind) => {
                        return finish(
                            &schedule,
                            http_status,
                            swr_request_id,
                            Some((describe(kind), false)),
                        )
                    }
                    Class::Reauth => {
                        let renewed = !reauthed
                            && schedule.attempts() < retry.max_attempts
                            && matches!(tokens.refresh(&token).await, Ok(true));
                        if renewed {
                            reauthed = true;
                            tracing::info!(
                                "SWR refused the token; retrying once with a renewed one"
                            );
                            continue;
                        }
                        return finish(
                            &schedule,
                            http_status,
                            swr_request_id,
                            Some((describe(ErrorKind::Unauthorized), false)),
                        );
                    }
                    Class::Transient(kind) => (describe(kind), reply.retry_after),
                }
            }
            Err(AttemptError::Timeout(limit)) => (
                LastError {
                    kind: ErrorKind::Timeout,
                    message: format!(
                        "SWR gave no answer within {}",
                        humantime::format_duration(limit)
                    ),
                    swr_error_code: None,
                },
                None,
            ),
            Err(AttemptError::Transport(message)) => (
                LastError {
                    kind: ErrorKind::Transport,
                    message: format!("could not reach SWR: {message}"),
                    swr_error_code: None,
                },
                None,
            ),
        };
        match schedule.next_delay(retry_after) {
            Ok(delay) => {
                tracing::debug!(
                    attempt = schedule.attempts(),
                    kind = last.kind.as_str(),
                    delay_ms = delay.as_millis() as u64,
                    "transient SWR failure; backing off"
                );
                tokio::time::sleep(delay).await;
            }
            Err(why) => {
                let mut last = last;
                last.message = format!(
                    "{} (gave up after {} attempt{}: {})",
                    last.message,
                    schedule.attempts(),
                    if schedule.attempts() == 1 { "" } else { "s" },
                    match why {
                        GiveUp::Attempts => "retry.max_attempts reached",
                        GiveUp::Elapsed => "retry.max_elapsed reached",
                    }
                );
                return finish(&schedule, http_status, swr_request_id, Some((last, true)));
            }
        }
    }
}

/// "SWR answered 400 (SVCSTG.SWR.4000001: stage index out of range)".
fn describe_answer(status: u16, code: &Option<String>, message: &Option<String>) -> String {
    let detail: String = match (code, message) {
        (Some(c), Some(m)) => format!(" ({c}: {m})"),
        (Some(c), None) => format!(" ({c})"),
        (None, Some(m)) => format!(" ({m})"),
        (None, None) => String::new(),
    };
    let line = format!("SWR answered {status}{detail}").replace(['\n', '\r'], " ");
    if line.chars().count() > 300 {
        line.chars().take(300).collect()
    } else {
        line
    }
}
