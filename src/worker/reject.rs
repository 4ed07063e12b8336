//! An invalid request: its copy goes to the dead-letter queue with the reason in `x-swr-error`,
//! then its rejected outcome to the results exchange like any other, exactly once each even when
//! the delivery comes back (contract §5).

use super::admit::replay;
use super::publish::{publish, settle};
use super::stamp::{finish, Echo, Verdict};
use super::{Disposition, Job, OnBrokenSession, OutcomeSink};
use crate::outcome::ErrorKind;
use crate::request::{body_key, InvalidRequest};

/// Prefix of the store key that remembers a DLQ copy. The marker's parts are joined by spaces,
/// which no job key can hold (0x21..=0x7E only), so a marker never meets a job's key.
const DLQ_MARKER: &str = "dead-lettered";

/// Longest `x-swr-error` value; a reason listing many bad fields is cut here.
const MAX_REASON_CHARS: usize = 1000;

pub(super) async fn reject_invalid<S: OutcomeSink>(
    job: &Job<'_, S>,
    key: String,
    mut invalid: InvalidRequest,
) -> Disposition {
    let reason: String = std::mem::take(&mut invalid.reason)
        .chars()
        .take(MAX_REASON_CHARS)
        .collect();
    let verdict = Verdict::rejected(ErrorKind::InvalidRequest, reason.clone());
    let outcome = finish(
        job.ctx,
        key,
        Echo::of_invalid(invalid),
        verdict,
        job.started,
    );
    // A redelivery of a request whose DLQ copy was already confirmed (the ack was lost with a
    // connection) must not put a second copy there: the copy is remembered in the store.
    // Keyed by the job's key and the body's hash together: the same message, and never another
    // message that happens to share one of the two (two `{}` bodies with their own message ids
    // are two requests, each with its own outcome and DLQ copy).
    let marker = format!(
        "{DLQ_MARKER} {} {}",
        outcome.idempotency_key,
        body_key(job.envelope.body)
    );
    let store = job.ctx.gate.as_ref().map(|gate| gate.store());
    if let (Some(store), true) = (store, job.envelope.is_redelivery()) {
        match store.finished(&marker).await {
            Ok(Some(stored)) => return replay(job, stored).await,
            Ok(None) => {}
            // Not knowing whether a copy went out already: wait for the store rather than
            // risk a second one.
            Err(e) => return Disposition::Requeue(format!("idempotency store unavailable: {e}")),
        }
    }
    let copied = job.sink.publish_dead_letter(job.envelope, &reason).await;
    if let requeue @ Disposition::Requeue(_) = settle(copied, "dead-letter copy") {
        return requeue;
    }
    let body = outcome.to_json();
    if let Some(store) = store {
        if let Err(e) = store.complete_json(&marker, &body).await {
            tracing::warn!(error = %e, "could not remember the dead-letter copy; a redelivery would add another");
        }
    }
    publish(
        job,
        &outcome,
        &body,
        OnBrokenSession::FollowNextSession,
        "outcome",
    )
    .await
}
