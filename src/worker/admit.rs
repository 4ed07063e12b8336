//! Step one of a valid request: admit it. The idempotency gate either hands the job a claim on
//! its key, or the key already finished and its stored outcome is replayed (SWR is not called),
//! or the gate cannot say now and the request is requeued. With `idempotency.backend = "off"`
//! every request runs.

use super::publish::publish;
use super::{Disposition, Job, OnBrokenSession, OutcomeSink};
use crate::idempotency::{fingerprint, Admission, Gate, Ticket};
use crate::outcome::Outcome;
use crate::request::{Mode, StageRequest};

/// The job's hold on its key: settle it with [`release`] or [`record`](super::execute::record).
pub(super) struct Claim<'a> {
    /// The gate that granted it.
    pub gate: &'a Gate,
    /// Dropped unsettled (a job aborted, or a store error), it releases the key in the background.
    pub ticket: Ticket,
    /// The request's `pipeline:stage:mode`, recorded with the claim; the loop guard counts it.
    pub fingerprint: String,
}

/// What admission decided.
pub(super) enum Admitted<'a> {
    /// Run the job; `None` without an idempotency store.
    Run(Option<Claim<'a>>),
    /// The delivery is dealt with (replayed, or to be requeued).
    Settled(Disposition),
}

/// Claims the job's key, or replays the outcome stored under it.
pub(super) async fn admit<'a, S: OutcomeSink>(
    job: &Job<'a, S>,
    key: &str,
    request: &StageRequest,
) -> Admitted<'a> {
    let Some(gate) = &job.ctx.gate else {
        return Admitted::Run(None);
    };
    let print = fingerprint(
        request.pipeline_id,
        request.stage_index,
        request.mode.as_str(),
    );
    match gate.admit(key, &print).await {
        Admission::Run(ticket) => Admitted::Run(Some(Claim {
            gate,
            ticket,
            fingerprint: print,
        })),
        Admission::Replay(stored) => {
            // The key alone names the job (contract §5): a request that reuses it for another
            // step gets the stored outcome, which names the step that ran.
            let ran = (stored.pipeline_id, stored.stage_index, stored.mode);
            if ran
                != (
                    Some(request.pipeline_id),
                    Some(request.stage_index),
                    Some(request.mode),
                )
            {
                tracing::warn!(
                    ran_pipeline_id = ?ran.0,
                    ran_stage_index = ?ran.1,
                    ran_mode = ?ran.2.map(Mode::as_str),
                    "idempotency key reused for another step; replaying the outcome of the step that ran under it, SWR is not called"
                );
            }
            // Boxed: a rare path, kept out of every job's state machine.
            Admitted::Settled(Box::pin(replay(job, *stored)).await)
        }
        Admission::Requeue(reason) => Admitted::Settled(Disposition::Requeue(reason)),
    }
}

/// Frees the key so a later delivery runs again.
pub(super) async fn release(claim: Option<Claim<'_>>) {
    if let Some(claim) = claim {
        claim.gate.release(claim.ticket).await;
    }
}

/// Re-publishes a stored final outcome for a key that already ran; SWR is not called.
pub(super) async fn replay<S: OutcomeSink>(job: &Job<'_, S>, mut stored: Outcome) -> Disposition {
    stored.replayed = true;
    job.ctx.metrics.replayed();
    tracing::info!(
        status = stored.status.as_str(),
        "job already finished; replaying its stored outcome"
    );
    let body = stored.to_json();
    publish(
        job,
        &stored,
        &body,
        OnBrokenSession::Fail,
        "replayed outcome",
    )
    .await
}
