//! The last steps: publish the outcome through the job's sink, and settle the delivery: what a
//! publish result means for the request is decided here and nowhere else.

use super::stamp::{finish, Echo, Verdict};
use super::{Disposition, Job, OnBrokenSession, OutcomeSink};
use crate::outcome::Outcome;

/// Ends a job that did not call SWR (and whose claim, if any, is settled): finishes its outcome
/// and publishes it.
pub(super) async fn conclude<S: OutcomeSink>(
    job: &Job<'_, S>,
    key: String,
    echo: Echo,
    verdict: Verdict,
    on_broken: OnBrokenSession,
) -> Disposition {
    let outcome = finish(job.ctx, key, echo, verdict, job.started);
    let body = outcome.to_json();
    publish(job, &outcome, &body, on_broken, "outcome").await
}

/// Publishes the finished outcome (`body`: its JSON), counts the job once it is confirmed, and
/// says what becomes of the delivery. `what` names the message in a requeue reason.
pub(super) async fn publish<S: OutcomeSink>(
    job: &Job<'_, S>,
    outcome: &Outcome,
    body: &str,
    on_broken: OnBrokenSession,
    what: &str,
) -> Disposition {
    let published = job
        .sink
        .publish_outcome(job.envelope, outcome, body, on_broken)
        .await;
    if published.is_ok() {
        job.ctx.metrics.job_finished(
            outcome.mode,
            outcome.status,
            outcome.error.as_ref().map(|e| e.kind),
        );
    }
    settle(published, what)
}

/// A confirmed publish lets the delivery be acked; anything else requeues it (contract §5: the
/// ack never precedes a confirmed outcome).
pub(super) fn settle<E: std::fmt::Display>(published: Result<(), E>, what: &str) -> Disposition {
    match published {
        Ok(()) => Disposition::Ack,
        Err(e) => Disposition::Requeue(format!("{what} not confirmed: {e}")),
    }
}
