//! One delivery, start to finish: parse → key → claim (a finished key is replayed) → (expired?)
//! → execute against SWR → store the outcome → publish with confirms → tell the caller whether
//! to ack or requeue.
//!
//! This module never acks by itself: it returns a [`Disposition`], and the consumer acts on it.
//! Ack only ever follows a confirmed outcome (contract §5).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use crate::amqp::copied_properties;
use crate::amqp::publisher::{PublishError, Publisher, Routed};
use crate::amqp::reply_to::{self, Decision, RefusalLog, Sighting};
use crate::breaker::Breaker;
use crate::config::{redact_url, AmqpConfig, Config, ConfigError};
use crate::idempotency::{self, fingerprint, Admission, Gate, StoreError};
use crate::outcome::{timestamp, ErrorKind, Outcome, OutcomeError, Status, OUTCOME_TYPE};
use crate::ratelimit::RateLimiter;
use crate::request::{
    body_key, derive_key, parse_request, valid_key, InvalidRequest, Mode, StageRequest,
    ERROR_HEADER,
};
use crate::swr::auth::{StaticToken, TokenSource};
use crate::swr::client::SwrClient;
use crate::swr::iam::{IamClient, IamCredentials, IamToken};
use crate::swr::{execute, Guards};
use crate::telemetry::metrics::Metrics;
use crate::trace::{Hex, JobTrace, TRACEPARENT, TRACESTATE};

/// Prefix of the store key that remembers a DLQ copy. The marker's parts are joined by spaces,
/// which no job key can hold (0x21..=0x7E only), so a marker never meets a job's key.
const DLQ_MARKER: &str = "dead-lettered";

/// Longest `x-swr-error` value; a reason listing many bad fields is cut here.
const MAX_REASON_CHARS: usize = 1000;

/// What the consumer must do with the delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    /// The outcome (and DLQ copy, if any) is confirmed: ack.
    Ack,
    /// Something was not confirmed: nack with requeue, so the request is tried again.
    Requeue(String),
}

/// Everything a job needs, shared by all jobs of the process.
pub struct JobContext {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Shared HTTP client (one pool).
    pub swr: SwrClient,
    /// Where tokens come from.
    pub tokens: Arc<dyn TokenSource>,
    /// `worker` field of outcomes.
    pub worker_id: String,
    /// One execution per key; `None` when `idempotency.backend = "off"`.
    pub gate: Option<Gate>,
    /// Counters and histograms for /metrics.
    pub metrics: Arc<Metrics>,
    /// The pace of SWR calls (`swr.max_requests_per_second`).
    pub pace: RateLimiter,
    /// Holds back new deliveries while SWR is failing.
    pub breaker: Breaker,
    /// The current session's publisher, replaced on every reconnect, so a job whose SWR call
    /// outlived its connection can still publish its outcome on the next one.
    pub publishers: watch::Sender<Option<Arc<Publisher>>>,
    /// A job whose publish found the session's publisher broken says so here; the session loop
    /// then opens a new session (a channel can break while its connection lives on).
    pub session_broken: Arc<Notify>,
    /// The user the worker logs in to the broker as (the broker refuses a publish whose
    /// `user_id` property names anyone else).
    pub amqp_user: String,
    /// Why the last attempt to open a broker session failed (cleared once consuming), so
    /// /readyz can say why the worker is not ready.
    pub broker_error: std::sync::Mutex<Option<String>>,
    /// The broker (of `amqp.url`'s list) of the current or last session, password hidden, for
    /// /readyz.
    pub broker_node: std::sync::Mutex<Option<String>>,
    /// Where the telemetry server listens, once it does (`telemetry.listen` may name port 0,
    /// or fall back to a free port).
    pub telemetry_addr: std::sync::OnceLock<std::net::SocketAddr>,
    /// The `reply_to` names refused so far, so each is logged once, not once per request.
    pub reply_to_refusals: RefusalLog,
}

/// Why the job context could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("cannot build the SWR HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("cannot build the IAM HTTP client: {0}")]
    IamClient(reqwest::Error),
    /// The IAM password could not be read (its file or variable).
    #[error(transparent)]
    Credentials(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `http.ca_file` could not be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
}

impl JobContext {
    /// Ends the current broker session when `broken` says its publisher is broken. The check and
    /// the signal happen under the publishers' lock, so a session that replaces the current one
    /// meanwhile is never ended by a signal meant for its predecessor.
    pub fn report_broken(&self, broken: impl Fn(&Arc<Publisher>) -> bool) {
        self.publishers.send_if_modified(|current| {
            if current.as_ref().is_some_and(&broken) {
                self.session_broken.notify_one();
            }
            false
        });
    }

    /// Builds the shared pieces; opens the idempotency store and starts its pruning.
    pub async fn new(config: Arc<Config>) -> Result<JobContext, ContextError> {
        let metrics = Arc::new(Metrics::default());
        let tls = config.http.client_config()?;
        let swr = SwrClient::new(&config.swr.endpoint, &config.http, tls.clone())?;
        let auth = &config.swr.auth;
        let tokens: Arc<dyn TokenSource> = match auth.kind.as_str() {
            "iam_password" => {
                let credentials = IamCredentials::from_config(auth)?;
                tracing::info!(
                    endpoint = %redact_url(&config.iam.endpoint),
                    user = %credentials.user,
                    domain = %credentials.domain,
                    project = %credentials.project,
                    "SWR tokens come from IAM (password sign-in, renewed before expiry)"
                );
                let client =
                    IamClient::new(&config.iam.endpoint, config.iam.timeout, credentials, tls)
                        .map_err(ContextError::IamClient)?;
                Arc::new(IamToken::new(client, auth.refresh_ahead).with_metrics(metrics.clone()))
            }
            // Config::validate admits only the two kinds.
            _ => Arc::new(StaticToken::new(auth.token.clone())),
        };
        let worker_id = config.worker_id();
        let gate = idempotency::open(&config).await?.map(|store| {
            idempotency::spawn_pruner(&store, config.idempotency.prune_interval);
            Gate::new(store, &worker_id, &config.idempotency)
        });
        // The user of the first broker: a cluster's nodes share their users.
        let amqp_user = crate::amqp::broker_urls(&config.amqp.url)
            .first()
            .map(|url| url.expose().to_owned())
            .unwrap_or_default()
            .parse::<lapin::uri::AMQPUri>()
            .map(|uri| uri.authority.userinfo.username)
            .unwrap_or_default();
        Ok(JobContext {
            metrics,
            pace: RateLimiter::new(config.swr.max_requests_per_second),
            breaker: Breaker::new(&config.breaker),
            config,
            swr,
            tokens,
            worker_id,
            gate,
            publishers: watch::channel(None).0,
            session_broken: Arc::new(Notify::new()),
            broker_error: std::sync::Mutex::new(None),
            broker_node: std::sync::Mutex::new(None),
            telemetry_addr: std::sync::OnceLock::new(),
            amqp_user,
            reply_to_refusals: RefusalLog::default(),
        })
    }
}

/// The request's AMQP properties that the worker honours (contract §3).
struct Envelope<'a> {
    /// The key when the body has none.
    message_id: Option<&'a str>,
    /// Copied into the outcome.
    correlation_id: Option<&'a str>,
    /// Where a copy of the outcome goes; `None` once [`apply_reply_to_policy`] refused it.
    reply_to: Option<&'a str>,
    /// The job's place in a trace: continued from the `traceparent` header, or new.
    trace: JobTrace,
}

impl<'a> Envelope<'a> {
    fn of(properties: &'a BasicProperties) -> Self {
        let text = |v: &'a Option<ShortString>| {
            v.as_ref()
                .map(ShortString::as_str)
                .filter(|s| !s.is_empty())
        };
        let header = |name: &str| {
            properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(name))
                .and_then(|value| match value {
                    AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
                    AMQPValue::ShortString(s) => Some(s.as_str()),
                    _ => None,
                })
        };
        Envelope {
            message_id: text(properties.message_id()),
            correlation_id: text(properties.correlation_id()),
            reply_to: text(properties.reply_to()),
            trace: JobTrace::from_headers(header(TRACEPARENT), header(TRACESTATE)),
        }
    }
}

/// Processes one delivery and says what to do with it.
pub async fn process(
    ctx: &JobContext,
    publisher: &Publisher,
    delivery: &Delivery,
    probe: bool,
) -> Disposition {
    let started = (SystemTime::now(), Instant::now());
    let mut envelope = Envelope::of(&delivery.properties);
    match parse_request(&delivery.data, ctx.config.limits.max_message_bytes) {
        Err(invalid) => {
            let key = derive_key(
                invalid.idempotency_key.as_deref(),
                envelope.message_id,
                &delivery.data,
            );
            let trace = &envelope.trace;
            let span = tracing::info_span!("job", key = %key, pipeline_id = ?invalid.pipeline_id, stage_index = ?invalid.stage_index, mode = ?invalid.mode.map(|m| m.as_str()), trace_id = %Hex(&trace.job.trace_id), span_id = %Hex(&trace.job.span_id), parent_span_id = %trace.parent());
            warn_unusable_message_id(&span, &envelope, invalid.idempotency_key.as_deref());
            apply_reply_to_policy(ctx, &span, &mut envelope);
            // The rare paths are boxed (here and below): a job's state machine is as large as
            // its largest await, and it is moved whole at each spawn and nested call.
            Box::pin(
                reject_invalid(ctx, publisher, delivery, &envelope, key, *invalid, started)
                    .instrument(span),
            )
            .await
        }
        Ok(request) => {
            let key = derive_key(
                request.idempotency_key.as_deref(),
                envelope.message_id,
                &delivery.data,
            );
            let trace = &envelope.trace;
            let span = tracing::info_span!("job", key = %key, pipeline_id = request.pipeline_id, stage_index = request.stage_index, mode = request.mode.as_str(), trace_id = %Hex(&trace.job.trace_id), span_id = %Hex(&trace.job.span_id), parent_span_id = %trace.parent());
            warn_unusable_message_id(&span, &envelope, request.idempotency_key.as_deref());
            apply_reply_to_policy(ctx, &span, &mut envelope);
            let job = Job {
                publisher,
                envelope: &envelope,
                started,
                probe,
            };
            run_request(ctx, job, key, request).instrument(span).await
        }
    }
}

/// Logs, in the job's span, a `message_id` that became the key only through
/// [`message_id_key`](crate::request::message_id_key). The span is entered only then: this runs
/// for every job.
fn warn_unusable_message_id(span: &tracing::Span, envelope: &Envelope<'_>, field: Option<&str>) {
    if let Some(id) = envelope
        .message_id
        .filter(|id| field.is_none() && !valid_key(id))
    {
        span.in_scope(|| tracing::warn!(message_id = ?id, "AMQP property `message_id` cannot be the idempotency key as written (expected 1..=255 printable ASCII characters without spaces, 0x21..=0x7E); the key is a UUIDv5 of it"));
    }
}

/// Drops a `reply_to` that `amqp.reply_to` refuses, before any path can publish to it (a fresh
/// outcome, a replay, a rejection); counts it, and logs it in the job's span the first time the
/// name is seen. The span is entered only then: this runs for every job.
fn apply_reply_to_policy(ctx: &JobContext, span: &tracing::Span, envelope: &mut Envelope<'_>) {
    let Some(name) = envelope.reply_to else {
        return;
    };
    let Decision::Refuse(refusal) = reply_to::decide(&ctx.config.amqp, name) else {
        return;
    };
    envelope.reply_to = None;
    ctx.metrics.reply_to_refused(refusal);
    match ctx.reply_to_refusals.sight(name) {
        Sighting::Known | Sighting::Unremembered { first: false } => {}
        Sighting::New => span.in_scope(|| {
            tracing::warn!(reply_to = ?name, reason = refusal.as_str(), "reply_to refused: {}; the outcome goes to the results exchange only (logged once per name)", refusal.explain());
        }),
        Sighting::Unremembered { first: true } => span.in_scope(|| {
            tracing::warn!(reply_to = ?name, reason = refusal.as_str(), "reply_to refused: {}; {} refused names were logged already, so further refusals of new names are only counted in swr_stage_reply_to_refused_total", refusal.explain(), reply_to::REMEMBERED_REFUSALS);
        }),
    }
}

/// What one delivery brings along besides its parsed request.
struct Job<'a> {
    /// Where outcomes go.
    publisher: &'a Publisher,
    /// Its honoured properties.
    envelope: &'a Envelope<'a>,
    /// When it was taken (wall clock, monotonic).
    started: (SystemTime, Instant),
    /// Whether it is the circuit breaker's probe.
    probe: bool,
}

async fn run_request(
    ctx: &JobContext,
    job: Job<'_>,
    key: String,
    request: StageRequest,
) -> Disposition {
    let Job {
        publisher,
        envelope,
        started,
        probe,
    } = job;
    let mut outcome = base_outcome(ctx, key, started.0);
    outcome.pipeline_id = Some(request.pipeline_id);
    outcome.stage_index = Some(request.stage_index);
    outcome.mode = Some(request.mode);
    outcome.campaign_id = request.campaign_id.clone();
    outcome.metadata = request.metadata.clone();

    let now = OffsetDateTime::from(started.0);
    let expired = request.not_after.filter(|deadline| *deadline < now);
    // The store is asked before `not_after`: a key that already finished is replayed even when
    // this delivery came too late (SWR is not called either way, and only the replay says what
    // happened to the job).
    let mut ticket = match &ctx.gate {
        None => None,
        Some(gate) => {
            let print = fingerprint(
                request.pipeline_id,
                request.stage_index,
                request.mode.as_str(),
            );
            match gate.admit(&outcome.idempotency_key, &print).await {
                Admission::Run(ticket) => Some(ticket),
                Admission::Replay(stored) => {
                    // The key alone names the job (contract §5): a request that reuses it for
                    // another step gets the stored outcome, which names the step that ran.
                    let ran = (stored.pipeline_id, stored.stage_index, stored.mode);
                    if ran != (outcome.pipeline_id, outcome.stage_index, outcome.mode) {
                        tracing::warn!(
                            ran_pipeline_id = ?ran.0,
                            ran_stage_index = ?ran.1,
                            ran_mode = ?ran.2.map(Mode::as_str),
                            "idempotency key reused for another step; replaying the outcome of the step that ran under it, SWR is not called"
                        );
                    }
                    return Box::pin(replay(ctx, publisher, envelope, *stored)).await;
                }
                Admission::Requeue(reason) => return Disposition::Requeue(reason),
            }
        }
    };
    match expired {
        Some(deadline) => {
            if let (Some(gate), Some(claimed)) = (&ctx.gate, ticket.take()) {
                gate.release(claimed).await;
            }
            outcome.status = Status::Rejected;
            outcome.error = Some(OutcomeError {
                kind: ErrorKind::Expired,
                message: format!(
                    "not executed: not_after {} had passed when the request was taken",
                    deadline
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default()
                ),
                retryable: false,
                swr_error_code: None,
            });
        }
        None => {
            if let (Some(gate), Some(claimed)) = (&ctx.gate, ticket.take()) {
                // The loop guard counts executions, so it is asked only by a job about to run.
                let guard = &ctx.config.guard;
                if guard.max_executions > 0 {
                    let print = fingerprint(
                        request.pipeline_id,
                        request.stage_index,
                        request.mode.as_str(),
                    );
                    match gate
                        .store()
                        .count_execution(&print, guard.window, guard.max_executions)
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => {
                            gate.release(claimed).await;
                            outcome.status = Status::Rejected;
                            outcome.error = Some(OutcomeError {
                                kind: ErrorKind::LoopGuard,
                                message: format!(
                                    "not executed: pipeline {} stage {} ({}) already ran {} times within guard.window ({}); a retry loop is likely",
                                    request.pipeline_id,
                                    request.stage_index,
                                    request.mode,
                                    guard.max_executions,
                                    humantime::format_duration(guard.window)
                                ),
                                retryable: false,
                                swr_error_code: None,
                            });
                            finish(&mut outcome, started);
                            let body = outcome.to_json();
                            return match publish_outcome(ctx, publisher, envelope, &outcome, &body)
                                .await
                            {
                                Ok(()) => Disposition::Ack,
                                Err(e) => {
                                    Disposition::Requeue(format!("outcome not confirmed: {e}"))
                                }
                            };
                        }
                        Err(e) => return Disposition::Requeue(format!("loop guard: {e}")),
                    }
                }
                ticket = Some(claimed);
            }
            // Boxed: the HTTP future is large, and every job's state machine would carry it.
            let guards = Guards {
                pace: &ctx.pace,
                breaker: &ctx.breaker,
                metrics: &ctx.metrics,
                probe,
            };
            let execution = Box::pin(execute(
                &ctx.swr,
                ctx.tokens.as_ref(),
                &ctx.config.retry,
                guards,
                &request,
                &outcome.idempotency_key,
                &envelope.trace.job,
            ))
            .await;
            outcome.status = execution.status;
            outcome.http_status = execution.http_status;
            outcome.attempts = execution.attempts;
            outcome.swr_request_id = execution.swr_request_id;
            outcome.error = execution.error;
            finish(&mut outcome, started);
            // Written once, for the store and the broker.
            let body = outcome.to_json();
            // The record is on disk before the outcome goes out: a worker killed in between
            // leaves a stored outcome that its redelivery replays, never a published one that
            // a redelivery would run and publish fresh a second time.
            if let (Some(gate), Some(ticket)) = (&ctx.gate, ticket) {
                // A final answer is kept and replayed; a retryable failure frees the key so a
                // later re-submission runs again (contract §5).
                if outcome.error.as_ref().is_some_and(|e| e.retryable) {
                    gate.release(ticket).await;
                } else {
                    gate.complete(ticket, &body).await;
                }
            }
            let published =
                publish_surviving_reconnect(ctx, publisher, envelope, &outcome, &body).await;
            return match published {
                Ok(()) => Disposition::Ack,
                Err(e) => Disposition::Requeue(format!("outcome not confirmed: {e}")),
            };
        }
    }
    if outcome.finished_at.is_empty() {
        finish(&mut outcome, started);
    }
    let body = outcome.to_json();
    match publish_surviving_reconnect(ctx, publisher, envelope, &outcome, &body).await {
        Ok(()) => Disposition::Ack,
        Err(e) => Disposition::Requeue(format!("outcome not confirmed: {e}")),
    }
}

/// Publishes an outcome; if the connection broke meanwhile (the SWR call outlived it), waits
/// for the next session's publisher and publishes there. The delivery itself is void then (its
/// ack cannot reach the broker); its redelivery is answered from the idempotency store.
///
/// A broker error (as opposed to a nack, a message with no route, or a confirm that did not come
/// on a live channel) means the channel or its connection broke, even if its state has not
/// flipped yet: the outcome then goes to the first session that is not this one. Giving up here
/// would leave the key with a stored outcome that only its redelivery publishes, as a replay.
async fn publish_surviving_reconnect(
    ctx: &JobContext,
    publisher: &Publisher,
    envelope: &Envelope<'_>,
    outcome: &Outcome,
    body: &str,
) -> Result<(), PublishError> {
    let mut error = match publish_outcome(ctx, publisher, envelope, outcome, body).await {
        Ok(()) => return Ok(()),
        Err(e) if !session_broke(publisher, &e) => return Err(e),
        Err(e) => e,
    };
    let deadline = crate::deadline::after(
        tokio::time::Instant::now(),
        republish_wait(&ctx.config.amqp),
    );
    let mut sessions = ctx.publishers.subscribe();
    // The sessions found broken, by identity; the first one is the job's own.
    let mut broken: Vec<Arc<Publisher>> = Vec::new();
    let is_broken = |p: &Arc<Publisher>, broken: &[Arc<Publisher>]| {
        std::ptr::eq(p.as_ref(), publisher) || broken.iter().any(|b| Arc::ptr_eq(b, p))
    };
    // A few sessions at most: each try either publishes, or finds that session broken too.
    for _ in 0..3 {
        // If the broken session is still the current one, the session loop may not know yet
        // (a dead connection it sees itself; a broken channel it does not).
        ctx.report_broken(|current| is_broken(current, &broken));
        let next = tokio::time::timeout_at(
            deadline,
            sessions.wait_for(|p| {
                p.as_ref()
                    .is_some_and(|p| p.is_usable() && !is_broken(p, &broken))
            }),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|current| current.clone());
        let Some(next) = next else {
            return Err(error);
        };
        tracing::info!("connection was lost during the job; publishing its outcome on the new one");
        match publish_outcome(ctx, &next, envelope, outcome, body).await {
            Ok(()) => return Ok(()),
            Err(e) if !session_broke(&next, &e) => return Err(e),
            Err(e) => {
                error = e;
                broken.push(next);
            }
        }
    }
    Err(error)
}

/// How long an outcome whose session broke waits for the next session: two reconnect pauses
/// and a connect. Saturating, as both are the configuration's to set.
fn republish_wait(amqp: &AmqpConfig) -> Duration {
    amqp.reconnect_max_interval
        .saturating_mul(2)
        .saturating_add(amqp.connect_timeout)
}

/// Whether a failed publish means its session broke: its channel is closed, or the broker
/// failed the publish itself (rather than a nack, no route, or a confirm late on a live channel).
fn session_broke(publisher: &Publisher, error: &PublishError) -> bool {
    !publisher.is_usable() || matches!(error, PublishError::Broker(_))
}

async fn reject_invalid(
    ctx: &JobContext,
    publisher: &Publisher,
    delivery: &Delivery,
    envelope: &Envelope<'_>,
    key: String,
    invalid: InvalidRequest,
    started: (SystemTime, Instant),
) -> Disposition {
    let reason: String = invalid.reason.chars().take(MAX_REASON_CHARS).collect();
    let mut outcome = base_outcome(ctx, key, started.0);
    outcome.pipeline_id = invalid.pipeline_id;
    outcome.stage_index = invalid.stage_index;
    outcome.mode = invalid.mode;
    outcome.campaign_id = invalid.campaign_id;
    outcome.metadata = invalid.metadata;
    outcome.status = Status::Rejected;
    outcome.error = Some(OutcomeError {
        kind: ErrorKind::InvalidRequest,
        message: reason.clone(),
        retryable: false,
        swr_error_code: None,
    });
    finish(&mut outcome, started);

    let dead_properties = dead_letter_properties(&delivery.properties, &reason, &ctx.amqp_user);
    let dlx = ctx.config.amqp.dead_letter_exchange.as_str();
    // A redelivery of a request whose DLQ copy was already confirmed (the ack was lost with a
    // connection) must not put a second copy there: the copy is remembered in the store.
    // Keyed by the job's key and the body's hash together: the same message, and never another
    // message that happens to share one of the two (two `{}` bodies with their own message ids
    // are two requests, each with its own outcome and DLQ copy).
    let marker = format!(
        "{DLQ_MARKER} {} {}",
        outcome.idempotency_key,
        body_key(&delivery.data)
    );
    if is_redelivery(delivery) {
        if let Some(gate) = &ctx.gate {
            match gate.store().finished(&marker).await {
                Ok(Some(stored)) => return replay(ctx, publisher, envelope, stored).await,
                Ok(None) => {}
                // Not knowing whether a copy went out already: wait for the store rather than
                // risk a second one.
                Err(e) => {
                    return Disposition::Requeue(format!("idempotency store unavailable: {e}"))
                }
            }
        }
    }
    if let Err(e) = publisher
        .publish_routed(
            dlx,
            delivery.routing_key.as_str(),
            &delivery.data,
            dead_properties,
        )
        .await
    {
        return Disposition::Requeue(format!("dead-letter copy not confirmed: {e}"));
    }
    let body = outcome.to_json();
    if let Some(gate) = &ctx.gate {
        if let Err(e) = gate.store().complete_json(&marker, &body).await {
            tracing::warn!(error = %e, "could not remember the dead-letter copy; a redelivery would add another");
        }
    }
    match publish_surviving_reconnect(ctx, publisher, envelope, &outcome, &body).await {
        Ok(()) => Disposition::Ack,
        Err(e) => Disposition::Requeue(format!("outcome not confirmed: {e}")),
    }
}

/// The DLQ copy's properties: the original's (see [`copied_properties`]) plus the reason in
/// `x-swr-error`.
fn dead_letter_properties(
    original: &BasicProperties,
    reason: &str,
    login: &str,
) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    headers.insert(
        ERROR_HEADER.into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    copied_properties(original, headers, login)
}

/// Re-publishes a stored final outcome for a key that already ran; SWR is not called.
async fn replay(
    ctx: &JobContext,
    publisher: &Publisher,
    envelope: &Envelope<'_>,
    mut stored: Outcome,
) -> Disposition {
    stored.replayed = true;
    ctx.metrics.replayed();
    tracing::info!(
        status = stored.status.as_str(),
        "job already finished; replaying its stored outcome"
    );
    match publish_outcome(ctx, publisher, envelope, &stored, &stored.to_json()).await {
        Ok(()) => Disposition::Ack,
        Err(e) => Disposition::Requeue(format!("replayed outcome not confirmed: {e}")),
    }
}

/// An outcome with the fields every path fills the same way.
fn base_outcome(ctx: &JobContext, key: String, started: SystemTime) -> Outcome {
    Outcome {
        idempotency_key: key,
        pipeline_id: None,
        stage_index: None,
        mode: None,
        status: Status::Rejected,
        http_status: None,
        attempts: 0,
        replayed: false,
        error: None,
        campaign_id: None,
        metadata: None,
        swr_request_id: None,
        started_at: timestamp(started),
        finished_at: String::new(),
        duration_ms: 0,
        worker: ctx.worker_id.clone(),
    }
}

/// Stamps the end: `finished_at` is `started_at` plus the job's monotonic time (a wall clock
/// stepped mid-job cannot put it before the start), and `duration_ms` is exactly the difference
/// of the two timestamps as written.
fn finish(outcome: &mut Outcome, (started_at, started): (SystemTime, Instant)) {
    let finished_at = started_at + started.elapsed();
    outcome.finished_at = timestamp(finished_at);
    outcome.duration_ms = epoch_ms(finished_at).saturating_sub(epoch_ms(started_at));
    match &outcome.error {
        None => tracing::info!(
            status = outcome.status.as_str(),
            attempts = outcome.attempts,
            duration_ms = outcome.duration_ms,
            "job finished"
        ),
        Some(e) => {
            tracing::info!(status = outcome.status.as_str(), kind = e.kind.as_str(), attempts = outcome.attempts, http_status = ?outcome.http_status, duration_ms = outcome.duration_ms, message = %e.message, "job finished")
        }
    }
}

/// Whole milliseconds since the Unix epoch, as [`timestamp`] writes them (0 before it).
fn epoch_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Publishes the outcome (`body`: its [`Outcome::to_json`]) to the results exchange and, when
/// asked, to `reply_to`; both confirmed.
async fn publish_outcome(
    ctx: &JobContext,
    publisher: &Publisher,
    envelope: &Envelope<'_>,
    outcome: &Outcome,
    body: &str,
) -> Result<(), PublishError> {
    let body = body.as_bytes();
    let correlation = envelope.correlation_id.unwrap_or(&outcome.idempotency_key);
    // The job's span, so the outcome's consumer continues the trace (the body is unchanged).
    let mut headers = FieldTable::default();
    let job = &envelope.trace.job;
    headers.insert(
        TRACEPARENT.into(),
        AMQPValue::LongString(LongString::from(job.traceparent())),
    );
    if let Some(state) = &job.state {
        headers.insert(
            TRACESTATE.into(),
            AMQPValue::LongString(LongString::from(state.as_str())),
        );
    }
    let properties = BasicProperties::default()
        .with_headers(headers)
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_type(OUTCOME_TYPE.into())
        .with_correlation_id(correlation.into())
        .with_timestamp(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
    let results = ctx.config.amqp.results_exchange.as_str();
    let routing_key = outcome.routing_key();
    let to_results = publisher.publish(results, &routing_key, body, properties.clone());
    let routed = match envelope.reply_to {
        Some(reply_to) => {
            let (results_routed, reply_routed) = tokio::join!(
                to_results,
                publisher.publish("", reply_to, body, properties)
            );
            if reply_routed? == Routed::NoQueue {
                tracing::warn!(reply_to, "reply_to queue does not exist; the reply copy of the outcome was dropped by the broker");
            }
            results_routed?
        }
        None => to_results.await?,
    };
    if routed == Routed::NoQueue {
        tracing::debug!(
            exchange = results,
            routing_key,
            "no queue is bound for this outcome"
        );
    }
    ctx.metrics.job_finished(
        outcome.mode,
        outcome.status,
        outcome.error.as_ref().map(|e| e.kind),
    );
    Ok(())
}

/// How many times the broker returned this message before this delivery: a quorum queue's
/// `x-delivery-count` header (absent on the first delivery on 3.x, and on classic queues: 0).
/// On RabbitMQ 4.x the queue's delivery limit is checked against this count, so it says how
/// close a request is to being dead-lettered by the broker (docs/contract.md, "RabbitMQ
/// 3.10–3.13 and 4.x").
pub fn delivery_count(properties: &BasicProperties) -> u64 {
    let value = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count"));
    match value {
        Some(AMQPValue::ShortShortUInt(n)) => u64::from(*n),
        Some(AMQPValue::ShortUInt(n)) => u64::from(*n),
        Some(AMQPValue::LongUInt(n)) => u64::from(*n),
        Some(AMQPValue::ShortShortInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

/// Whether this delivery may have been handed out before: the `redelivered` flag, or a
/// delivery count above 0 (which a quorum queue keeps even where the flag is not set).
pub fn is_redelivery(delivery: &Delivery) -> bool {
    delivery.redelivered || delivery_count(&delivery.properties) > 0
}

/// How long to wait before requeueing after a failed publish, so a broken broker path is not
/// hammered by a hot requeue loop.
pub const REQUEUE_DELAY: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delivery_count_is_read_in_any_integer_type_and_is_0_when_absent() {
        let with = |value: AMQPValue| {
            let mut headers = lapin::types::FieldTable::default();
            headers.insert("x-delivery-count".into(), value);
            BasicProperties::default().with_headers(headers)
        };
        assert_eq!(delivery_count(&BasicProperties::default()), 0);
        assert_eq!(delivery_count(&with(AMQPValue::LongLongInt(20))), 20);
        assert_eq!(delivery_count(&with(AMQPValue::LongInt(3))), 3);
        assert_eq!(delivery_count(&with(AMQPValue::ShortShortUInt(1))), 1);
        assert_eq!(delivery_count(&with(AMQPValue::LongLongInt(-1))), 0);
        assert_eq!(
            delivery_count(&with(AMQPValue::LongString("7".into()))),
            0,
            "not a number"
        );
    }

    #[test]
    fn the_dlq_copy_keeps_the_original_properties_but_expiration_and_a_foreign_user_id() {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert("x-trace".into(), AMQPValue::LongString("t-1".into()));
        let original = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("identity".into())
            .with_headers(headers)
            .with_delivery_mode(1)
            .with_priority(3)
            .with_correlation_id("c-1".into())
            .with_reply_to("replies".into())
            .with_expiration("60000".into())
            .with_message_id("m-1".into())
            .with_timestamp(1_700_000_000)
            .with_type("request".into())
            .with_app_id("producer".into())
            .with_cluster_id("cl".into());
        let header = |p: &BasicProperties, name: &str| {
            p.headers()
                .as_ref()
                .and_then(|h| h.inner().get(name).cloned())
        };

        let mine =
            dead_letter_properties(&original.clone().with_user_id("svc".into()), "why", "svc");
        let expected = original
            .clone()
            .with_delivery_mode(2)
            .with_user_id("svc".into());
        assert_eq!(mine.user_id(), expected.user_id());
        assert_eq!(
            mine.expiration(),
            &None,
            "the copy must not expire out of the DLQ"
        );
        assert_eq!(mine.delivery_mode(), &Some(2));
        for (got, want) in [
            (mine.content_type(), expected.content_type()),
            (mine.content_encoding(), expected.content_encoding()),
            (mine.correlation_id(), expected.correlation_id()),
            (mine.reply_to(), expected.reply_to()),
            (mine.message_id(), expected.message_id()),
            (mine.kind(), expected.kind()),
            (mine.app_id(), expected.app_id()),
            (mine.cluster_id(), expected.cluster_id()),
        ] {
            assert_eq!(got, want);
        }
        assert_eq!(mine.priority(), &Some(3));
        assert_eq!(mine.timestamp(), &Some(1_700_000_000));
        assert_eq!(
            header(&mine, "x-trace"),
            Some(AMQPValue::LongString("t-1".into()))
        );
        assert_eq!(
            header(&mine, ERROR_HEADER),
            Some(AMQPValue::LongString("why".into()))
        );
        assert_eq!(header(&mine, crate::amqp::ORIGINAL_USER_HEADER), None);

        let foreign = dead_letter_properties(&original.with_user_id("alice".into()), "why", "svc");
        assert_eq!(
            foreign.user_id(),
            &None,
            "the broker refuses another user's user_id"
        );
        assert_eq!(
            header(&foreign, crate::amqp::ORIGINAL_USER_HEADER),
            Some(AMQPValue::LongString("alice".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_for_a_new_session_saturates_at_any_configured_length() {
        let mut amqp = Config::load(None, Vec::new()).unwrap().amqp;
        let default = republish_wait(&amqp);
        assert_eq!(
            default,
            amqp.reconnect_max_interval * 2 + amqp.connect_timeout
        );
        amqp.reconnect_max_interval = Duration::MAX;
        amqp.connect_timeout = Duration::MAX;
        assert_eq!(republish_wait(&amqp), Duration::MAX);
        let now = tokio::time::Instant::now();
        assert!(crate::deadline::after(now, republish_wait(&amqp)) > now);
    }

    #[test]
    fn envelope_ignores_empty_properties() {
        let props = BasicProperties::default()
            .with_message_id("".into())
            .with_correlation_id("c-1".into())
            .with_reply_to("q".into());
        let env = Envelope::of(&props);
        assert_eq!(env.message_id, None);
        assert_eq!(env.correlation_id, Some("c-1"));
        assert_eq!(env.reply_to, Some("q"));
    }
}
