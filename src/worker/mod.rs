//! One job, start to finish, as named steps, each in its own file:
//!
//! 1. `admit` ([`admit`]): claim the key, or replay the outcome stored under it;
//! 2. check the deadline, then the loop guard ([`guards`]);
//! 3. execute against SWR, then record the answer in the store ([`execute`]);
//! 4. publish the outcome and settle: what the publish result means ([`publish`]).
//!
//! An invalid request takes its own path ([`reject`]): a DLQ copy, then its outcome. Outcomes
//! are made once, finished ([`stamp`]).
//!
//! The job knows no broker: it reads a plain [`Envelope`] and writes through an
//! [`OutcomeSink`]; the lapin adapters are in `crate::amqp::delivery`. It never acks by itself:
//! it returns a [`Disposition`], and the adapter acts on it. Ack only ever follows a confirmed
//! outcome (contract §5).

mod admit;
mod context;
mod envelope;
mod execute;
mod guards;
mod publish;
mod reject;
mod sink;
mod stamp;
#[cfg(test)]
mod tests;

use std::time::Duration;

use tracing::Instrument;

pub use context::{ContextError, JobContext};
pub use envelope::Envelope;
pub use sink::{OnBrokenSession, OutcomeSink};

use crate::amqp::reply_to::{self, Decision, Sighting};
use crate::request::{derive_key, parse_request, valid_key, InvalidRequest, StageRequest};
use crate::trace::{Hex, JobTrace};
use admit::Admitted;
use stamp::{Echo, Started};

/// What the consumer must do with the delivery.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    /// The outcome (and DLQ copy, if any) is confirmed: ack.
    Ack,
    /// Something was not confirmed: nack with requeue, so the request is tried again.
    Requeue(String),
}

/// How long to wait before requeueing after a failed publish, so a broken broker path is not
/// hammered by a hot requeue loop.
pub const REQUEUE_DELAY: Duration = Duration::from_millis(500);

/// What every step of one job reads.
struct Job<'a, S> {
    /// The process's shared pieces.
    ctx: &'a JobContext,
    /// Where the job's outcome (and DLQ copy) go.
    sink: &'a S,
    /// The delivery's body and honoured properties.
    envelope: &'a Envelope<'a>,
    /// When it was taken.
    started: Started,
    /// Whether it is the circuit breaker's probe.
    probe: bool,
}

/// Processes one delivery and says what to do with it.
pub async fn process<S: OutcomeSink>(
    ctx: &JobContext,
    sink: &S,
    mut envelope: Envelope<'_>,
    probe: bool,
) -> Disposition {
    let started = Started::now();
    let parsed = parse_request(envelope.body, ctx.config.limits.max_message_bytes);
    let field = match &parsed {
        Ok(request) => request.idempotency_key.as_deref(),
        Err(invalid) => invalid.idempotency_key.as_deref(),
    };
    let key = derive_key(field, envelope.message_id, envelope.body);
    let span = job_span(&key, &parsed, &envelope.trace);
    crate::telemetry::otlp::adopt_job(&span, &envelope.trace);
    warn_unusable_message_id(&span, &envelope, field);
    apply_reply_to_policy(ctx, &span, &mut envelope);
    let job = Job {
        ctx,
        sink,
        envelope: &envelope,
        started,
        probe,
    };
    match parsed {
        // The rare paths are boxed (here and in the steps): a job's state machine is as large
        // as its largest await, and it is moved whole at each spawn and nested call.
        Err(invalid) => {
            Box::pin(reject::reject_invalid(&job, key, *invalid).instrument(span)).await
        }
        Ok(request) => run(&job, key, request).instrument(span).await,
    }
}

/// The job's span, made here and only here: a valid request's fields, or those an invalid one
/// had valid. With span export on, the caller hands it the job's ids ([`adopt_job`]).
///
/// [`adopt_job`]: crate::telemetry::otlp::adopt_job
fn job_span(
    key: &str,
    parsed: &Result<StageRequest, Box<InvalidRequest>>,
    trace: &JobTrace,
) -> tracing::Span {
    match parsed {
        Ok(request) => {
            tracing::info_span!("job", key = %key, pipeline_id = request.pipeline_id, stage_index = request.stage_index, mode = request.mode.as_str(), trace_id = %Hex(&trace.job.trace_id), span_id = %Hex(&trace.job.span_id), parent_span_id = %trace.parent())
        }
        Err(invalid) => {
            tracing::info_span!("job", key = %key, pipeline_id = ?invalid.pipeline_id, stage_index = ?invalid.stage_index, mode = ?invalid.mode.map(|m| m.as_str()), trace_id = %Hex(&trace.job.trace_id), span_id = %Hex(&trace.job.span_id), parent_span_id = %trace.parent())
        }
    }
}

/// A valid request, step by step. The store is asked before `not_after`: a key that already
/// finished is replayed even when this delivery came too late (SWR is not called either way,
/// and only the replay says what happened to the job).
async fn run<S: OutcomeSink>(job: &Job<'_, S>, key: String, request: StageRequest) -> Disposition {
    let claim = match admit::admit(job, &key, &request).await {
        Admitted::Run(claim) => claim,
        Admitted::Settled(disposition) => return disposition,
    };
    if let Some(verdict) = guards::check_deadline(&request, job.started) {
        admit::release(claim).await;
        let echo = Echo::of_request(request);
        return publish::conclude(job, key, echo, verdict, OnBrokenSession::FollowNextSession)
            .await;
    }
    if let Some(held) = &claim {
        match guards::loop_guard(job.ctx, held, &request).await {
            Ok(None) => {}
            Ok(Some(verdict)) => {
                admit::release(claim).await;
                let echo = Echo::of_request(request);
                return publish::conclude(job, key, echo, verdict, OnBrokenSession::Fail).await;
            }
            // The claim is dropped unsettled: it releases the key in the background.
            Err(e) => return Disposition::Requeue(format!("loop guard: {e}")),
        }
    }
    let verdict = execute::execute(job, &request, &key).await;
    let outcome = stamp::finish(
        job.ctx,
        key,
        Echo::of_request(request),
        verdict,
        job.started,
    );
    // Written once, for the store and the broker.
    let body = outcome.to_json();
    execute::record(claim, &outcome, &body).await;
    publish::publish(
        job,
        &outcome,
        &body,
        OnBrokenSession::FollowNextSession,
        "outcome",
    )
    .await
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
