//! The upstream: one attempt (`client`), what an answer means (`classify`), where tokens come
//! from (`auth`: the trait and the static token; `iam`: IAM password tokens), and [`execute`],
//! which drives attempts with the retry schedule until a final answer.

pub mod auth;
pub mod classify;
pub mod client;
pub mod iam;

use tracing::Instrument;

use crate::breaker::Breaker;
use crate::config::{RetryConfig, Secret};
use crate::outcome::{capped, ErrorKind, OutcomeError, Status, MAX_ERROR_MESSAGE_CHARS};
use crate::ratelimit::RateLimiter;
use crate::request::StageRequest;
use crate::retry::{GiveUp, RetrySchedule};
use crate::telemetry::metrics::Metrics;
use crate::trace::TraceContext;
use auth::{AuthError, TokenSource};
use classify::{classify, Class};
use client::{AttemptError, Reply, SwrClient};

/// What every attempt passes through besides the schedule.
#[derive(Clone, Copy)]
pub struct Guards<'a> {
    /// The per-process pace of SWR calls.
    pub pace: &'a RateLimiter,
    /// Told about every attempt's class.
    pub breaker: &'a Breaker,
    /// Counts attempts by answer, their duration, and retries.
    pub metrics: &'a Metrics,
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
    trace: &TraceContext,
) -> Execution {
    let mut job = Attempts {
        client,
        tokens,
        guards,
        url: client.url(request),
        key,
        trace,
        probe: guards.probe,
        reauthed: false,
        sent: 0,
        http_status: None,
        swr_request_id: None,
    };
    let mut schedule = RetrySchedule::new(retry);
    loop {
        schedule.begin_attempt();
        let next = match tokens.token().await {
            Ok(token) => job.send(&token).await,
            // SWR was not called, and the fix is in the worker's credentials: retryable, so
            // the key is released and a re-submission runs once they are fixed.
            Err(why @ AuthError::Refused(_)) => {
                Next::Finish(Some((no_token(ErrorKind::Unauthorized, &why, ""), true)))
            }
            // Like a transport error: back off and try again.
            Err(why @ AuthError::Unavailable(_)) => {
                Next::Backoff(no_token(ErrorKind::Transport, &why, ""), None)
            }
        };
        match next {
            Next::Finish(error) => return job.finish(error),
            Next::Again => continue,
            Next::Backoff(last, retry_after) => {
                if let Err(last) = backoff(&mut schedule, last, retry_after).await {
                    return job.finish(Some((last, true)));
                }
            }
        }
    }
}

/// What to do after an attempt.
enum Next {
    /// The final answer: success (None), or the failure and whether it is retryable.
    Finish(Option<(LastError, bool)>),
    /// A transient failure: wait as the schedule says (and SWR's Retry-After), then try again.
    Backoff(LastError, Option<std::time::Duration>),
    /// Try again at once (with a renewed token).
    Again,
}

/// One job's attempts: what each needs, and what they learnt so far.
struct Attempts<'a> {
    client: &'a SwrClient,
    tokens: &'a dyn TokenSource,
    guards: Guards<'a>,
    url: String,
    key: &'a str,
    trace: &'a TraceContext,
    /// This attempt is the breaker's probe (only the job's first can be).
    probe: bool,
    /// The token was renewed once already after SWR refused it.
    reauthed: bool,
    /// HTTP attempts sent to SWR; lower than the schedule's count when getting a token failed.
    sent: u32,
    /// Status of the last answer SWR gave.
    http_status: Option<u16>,
    /// `X-Request-Id` of the last answer.
    swr_request_id: Option<String>,
}

impl Attempts<'_> {
    /// Sends one attempt with `token`, counts it, tells the breaker, and decides what follows.
    async fn send(&mut self, token: &Secret) -> Next {
        self.sent += 1;
        self.guards.pace.until_ready().await;
        let sent_at = std::time::Instant::now();
        // Each attempt is a child span of the job; SWR gets its `traceparent`.
        // With span export on, the exported attempt span takes these ids.
        let attempt_trace = self.trace.child();
        let span = tracing::debug_span!("attempt", attempt = self.sent, span_id = %crate::trace::Hex(&attempt_trace.span_id), http.response.status_code = tracing::field::Empty);
        crate::telemetry::otlp::adopt_child(&span, &attempt_trace);
        let attempt = self
            .client
            .attempt(&self.url, self.key, token, &attempt_trace)
            .instrument(span.clone())
            .await;
        let code = match &attempt {
            Ok(reply) => reply.status.to_string(),
            Err(AttemptError::Timeout(_)) => "timeout".to_owned(),
            Err(AttemptError::Transport(_)) => "transport".to_owned(),
        };
        span.record("http.response.status_code", code.as_str());
        self.guards
            .metrics
            .swr_attempt(&code, sent_at.elapsed(), self.sent);
        let transient = match &attempt {
            Ok(reply) => matches!(
                classify(reply.status, reply.error_code.as_deref()),
                Class::Transient(_)
            ),
            Err(_) => true,
        };
        self.guards.breaker.record(transient, self.probe);
        self.probe = false;
        match attempt {
            Ok(reply) => self.answered(reply, token).await,
            Err(AttemptError::Timeout(limit)) => Next::Backoff(
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
            Err(AttemptError::Transport(message)) => Next::Backoff(
                LastError {
                    kind: ErrorKind::Transport,
                    message: format!("could not reach SWR: {message}"),
                    swr_error_code: None,
                },
                None,
            ),
        }
    }

    /// What SWR's answer to an attempt with `token` means (contract §1).
    async fn answered(&mut self, reply: Reply, token: &Secret) -> Next {
        self.http_status = Some(reply.status);
        self.swr_request_id = reply.request_id.clone();
        let describe = |kind: ErrorKind| LastError {
            kind,
            message: describe_answer(reply.status, &reply.error_code, &reply.error_msg),
            swr_error_code: reply.error_code.clone(),
        };
        match classify(reply.status, reply.error_code.as_deref()) {
            Class::Success => Next::Finish(None),
            Class::Permanent(kind) => Next::Finish(Some((describe(kind), false))),
            Class::Reauth => self.reauth(describe(ErrorKind::Unauthorized), token).await,
            Class::Transient(kind) => Next::Backoff(describe(kind), reply.retry_after),
        }
    }

    /// SWR refused `token`: renew it and try once more, or fail `unauthorized`.
    async fn reauth(&mut self, unauthorized: LastError, token: &Secret) -> Next {
        // A refused token means nothing ran and the fix is in the credentials, like a refused
        // sign-in: `retryable: true` releases the key, so a re-submission runs once the token
        // is fixed (only permanent failures are stored, contract §5).
        // Once per job, outside the transient budget (contract §1): a 401 on the last allowed
        // attempt still gets its renewed token and one more try.
        if self.reauthed {
            return Next::Finish(Some((unauthorized, true)));
        }
        match self.tokens.refresh(token).await {
            Ok(true) => {
                self.reauthed = true;
                tracing::info!("SWR refused the token; retrying once with a renewed one");
                Next::Again
            }
            Ok(false) => Next::Finish(Some((unauthorized, true))),
            Err(why @ AuthError::Refused(_)) => {
                let before = format!("{}; then ", unauthorized.message);
                let mut last = no_token(ErrorKind::Unauthorized, &why, &before);
                last.swr_error_code = unauthorized.swr_error_code;
                // As above: nothing ran, and the fix is in the credentials.
                Next::Finish(Some((last, true)))
            }
            Err(why @ AuthError::Unavailable(_)) => {
                let before = format!("{}; then ", unauthorized.message);
                let mut last = no_token(ErrorKind::Transport, &why, &before);
                last.swr_error_code = unauthorized.swr_error_code;
                Next::Backoff(last, None)
            }
        }
    }

    /// The job's result: a success (`error` None) or a failure and whether it is retryable.
    fn finish(self, error: Option<(LastError, bool)>) -> Execution {
        Execution {
            status: if error.is_some() {
                Status::Failed
            } else {
                Status::Succeeded
            },
            http_status: self.http_status,
            attempts: self.sent,
            swr_request_id: self.swr_request_id,
            error: error.map(|(e, retryable)| OutcomeError {
                kind: e.kind,
                // Built from SWR's and IAM's words, each capped; the whole is capped too.
                message: capped(e.message, MAX_ERROR_MESSAGE_CHARS),
                retryable,
                swr_error_code: e.swr_error_code,
            }),
        }
    }
}

/// Getting a token failed (`before`: what happened first, if anything).
fn no_token(kind: ErrorKind, why: &AuthError, before: &str) -> LastError {
    LastError {
        kind,
        message: format!("{before}could not get an SWR token: {why}"),
        swr_error_code: None,
    }
}

/// After a transient failure: waits for the next attempt, or returns the failure, marked with why
/// the schedule gave up.
async fn backoff(
    schedule: &mut RetrySchedule,
    last: LastError,
    retry_after: Option<std::time::Duration>,
) -> Result<(), LastError> {
    match schedule.next_delay(retry_after) {
        Ok(delay) => {
            tracing::debug!(
                attempt = schedule.attempts(),
                kind = last.kind.as_str(),
                delay_ms = delay.as_millis() as u64,
                "transient SWR failure; backing off"
            );
            tokio::time::sleep(delay).await;
            Ok(())
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
            Err(last)
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
    capped(
        format!("SWR answered {status}{detail}").replace(['\n', '\r'], " "),
        300,
    )
}

#[cfg(test)]
mod tests {
    //! How `execute` treats each kind of token failure, against the in-process simulator.

    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use futures_util::future::BoxFuture;

    use super::*;
    use crate::config::{Config, Secret};
    use crate::request::parse_request;
    use crate::sim::{SimConfig, SimHandle};

    /// A token source that answers from two scripts; an empty script repeats its last answer.
    struct Scripted {
        /// Answers of `token()`, in order.
        tokens: Mutex<VecDeque<Result<&'static str, AuthError>>>,
        /// Answers of `refresh()`, in order.
        refreshes: Mutex<VecDeque<Result<bool, AuthError>>>,
    }

    fn next<T: Clone>(script: &Mutex<VecDeque<T>>) -> T {
        let mut script = script.lock().unwrap();
        if script.len() > 1 {
            script.pop_front().unwrap()
        } else {
            script.front().cloned().expect("a scripted answer")
        }
    }

    impl TokenSource for Scripted {
        fn token(&self) -> BoxFuture<'_, Result<Secret, AuthError>> {
            let answer = next(&self.tokens).map(Secret::new);
            Box::pin(async move { answer })
        }

        fn refresh<'a>(&'a self, _refused: &'a Secret) -> BoxFuture<'a, Result<bool, AuthError>> {
            let answer = next(&self.refreshes);
            Box::pin(async move { answer })
        }
    }

    fn scripted(
        tokens: Vec<Result<&'static str, AuthError>>,
        refreshes: Vec<Result<bool, AuthError>>,
    ) -> Scripted {
        Scripted {
            tokens: Mutex::new(tokens.into()),
            refreshes: Mutex::new(refreshes.into()),
        }
    }

    fn outage() -> AuthError {
        AuthError::Unavailable("IAM answered 503".into())
    }

    async fn run(tokens: &Scripted) -> Execution {
        let sim = SimHandle::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SimConfig {
                tokens: vec!["good".into()],
                ..SimConfig::default()
            },
        )
        .await
        .unwrap();
        let env = [
            ("SWR_STAGE_WORKER__RETRY__INITIAL_INTERVAL", "1ms"),
            ("SWR_STAGE_WORKER__RETRY__MAX_INTERVAL", "2ms"),
            ("SWR_STAGE_WORKER__RETRY__MAX_ATTEMPTS", "3"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config = Config::load(None, env).unwrap();
        let client = SwrClient::new(
            &sim.url(),
            &config.http,
            config.http.client_config().unwrap(),
        )
        .unwrap();
        let request = parse_request(br#"{"pipeline_id": 7, "stage_index": 1}"#, 1024).unwrap();
        let (pace, breaker) = (
            crate::ratelimit::RateLimiter::new(0.0),
            crate::breaker::Breaker::new(&config.breaker),
        );
        let metrics = Metrics::default();
        let guards = Guards {
            pace: &pace,
            breaker: &breaker,
            metrics: &metrics,
            probe: false,
        };
        let execution = execute(
            &client,
            tokens,
            &config.retry,
            guards,
            &request,
            "k",
            &TraceContext::root(),
        )
        .await;
        sim.shutdown().await;
        execution
    }

    #[tokio::test]
    async fn an_unavailable_token_source_is_retried_like_a_transport_error() {
        let tokens = scripted(vec![Err(outage()), Err(outage()), Ok("good")], vec![]);
        let e = run(&tokens).await;
        assert_eq!(
            (e.status, e.attempts, e.http_status),
            (Status::Succeeded, 1, Some(201))
        );
    }

    #[tokio::test]
    async fn a_token_source_down_to_the_end_fails_retryable_without_calling_swr() {
        let e = run(&scripted(vec![Err(outage())], vec![])).await;
        assert_eq!(
            (e.status, e.attempts, e.http_status),
            (Status::Failed, 0, None)
        );
        let error = e.error.unwrap();
        assert_eq!((error.kind, error.retryable), (ErrorKind::Transport, true));
        assert!(
            error.message.starts_with("could not get an SWR token: ")
                && error
                    .message
                    .ends_with("(gave up after 3 attempts: retry.max_attempts reached)"),
            "{}",
            error.message
        );
    }

    #[tokio::test]
    async fn a_refused_sign_in_fails_unauthorized_at_once() {
        let refused = AuthError::Refused("IAM refused the sign-in".into());
        let e = run(&scripted(vec![Err(refused)], vec![])).await;
        assert_eq!((e.status, e.attempts), (Status::Failed, 0));
        let error = e.error.unwrap();
        assert_eq!(
            (error.kind, error.retryable),
            (ErrorKind::Unauthorized, true)
        );
        assert!(
            error.message.contains("IAM refused the sign-in"),
            "{}",
            error.message
        );
    }

    #[tokio::test]
    async fn a_renewal_that_meets_an_outage_is_retried_after_back_off() {
        let tokens = scripted(vec![Ok("stale"), Ok("good")], vec![Err(outage())]);
        let e = run(&tokens).await;
        assert_eq!(
            (e.status, e.attempts, e.http_status),
            (Status::Succeeded, 2, Some(201))
        );
    }

    #[tokio::test]
    async fn a_renewal_refused_by_iam_fails_unauthorized_with_both_reasons() {
        let refused = AuthError::Refused("IAM refused the sign-in".into());
        let e = run(&scripted(vec![Ok("stale")], vec![Err(refused)])).await;
        assert_eq!(
            (e.status, e.attempts, e.http_status),
            (Status::Failed, 1, Some(401))
        );
        let error = e.error.unwrap();
        assert_eq!(error.kind, ErrorKind::Unauthorized);
        assert_eq!(error.swr_error_code.as_deref(), Some("APIG.0301"));
        assert!(
            error.message.starts_with("SWR answered 401")
                && error.message.contains("then could not get an SWR token")
                && error.message.contains("IAM refused the sign-in"),
            "{}",
            error.message
        );
    }

    #[tokio::test]
    async fn an_outcome_message_is_capped_whatever_the_token_source_says() {
        let refused = AuthError::Refused(format!("IAM refused: {}", "ü".repeat(50_000)));
        let e = run(&scripted(vec![Err(refused)], vec![])).await;
        let message = e.error.unwrap().message;
        assert_eq!(message.chars().count(), MAX_ERROR_MESSAGE_CHARS);
        assert!(
            message.starts_with("could not get an SWR token: token source: IAM refused: ü")
                && message.ends_with('…'),
            "{message}"
        );
    }

    #[test]
    fn the_answer_line_is_one_line_of_at_most_300_characters() {
        let long = Some("m\n".repeat(1000));
        let line = describe_answer(503, &Some("SVCSTG.SWR.5000001".into()), &long);
        assert_eq!(line.chars().count(), 300);
        assert!(
            line.starts_with("SWR answered 503 (SVCSTG.SWR.5000001: m m ") && line.ends_with('…'),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[tokio::test]
    async fn a_second_refusal_after_a_renewal_is_final() {
        let e = run(&scripted(vec![Ok("stale")], vec![Ok(true)])).await;
        assert_eq!((e.status, e.attempts), (Status::Failed, 2));
        let error = e.error.unwrap();
        assert_eq!(
            (error.kind, error.retryable),
            (ErrorKind::Unauthorized, true)
        );
    }
}
