//! The job's work and its record: drive the request against SWR to a final answer, then keep
//! that answer in the idempotency store before anyone hears of it.

use super::admit::Claim;
use super::stamp::Verdict;
use super::{Job, OutcomeSink};
use crate::outcome::Outcome;
use crate::request::StageRequest;
use crate::swr::Guards;

/// Calls SWR (paced, through the breaker, retried on the schedule) until a final answer.
pub(super) async fn execute<S: OutcomeSink>(
    job: &Job<'_, S>,
    request: &StageRequest,
    key: &str,
) -> Verdict {
    let ctx = job.ctx;
    let guards = Guards {
        pace: &ctx.pace,
        breaker: &ctx.breaker,
        metrics: &ctx.metrics,
        probe: job.probe,
    };
    // Boxed: the HTTP future is large, and every job's state machine would carry it.
    Box::pin(crate::swr::execute(
        &ctx.swr,
        ctx.tokens.as_ref(),
        &ctx.config.retry,
        guards,
        request,
        key,
        &job.envelope.trace.job,
    ))
    .await
    .into()
}

/// Settles the claim with the outcome (`body`: its JSON), before the outcome is published: a
/// worker killed in between leaves a stored outcome that its redelivery replays, never a
/// published one that a redelivery would run and publish fresh a second time. A final answer is
/// kept and replayed; a retryable failure frees the key so a later re-submission runs again
/// (contract §5).
pub(super) async fn record(claim: Option<Claim<'_>>, outcome: &Outcome, body: &str) {
    let Some(Claim { gate, ticket, .. }) = claim else {
        return;
    };
    if outcome.error.as_ref().is_some_and(|e| e.retryable) {
        gate.release(ticket).await;
    } else {
        gate.complete(ticket, body).await;
    }
}
