//! The job's one way out: where its outcome and a dead-letter copy go. The broker adapter
//! (`crate::amqp::delivery::AmqpSink`) publishes with confirms; the unit tests keep them in
//! memory. Acking and nacking stay with the adapter, driven by the job's [`Disposition`].
//!
//! [`Disposition`]: super::Disposition

use std::future::Future;

use super::Envelope;
use crate::outcome::Outcome;

/// What a publish does when it finds that its broker session broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnBrokenSession {
    /// Fail: the request is requeued, and its redelivery publishes (a replay, a loop-guard
    /// refusal: either is cheap to produce again).
    Fail,
    /// Wait for the next session and publish there: the delivery itself is void then (its ack
    /// cannot reach the broker), and its redelivery is answered from the idempotency store.
    FollowNextSession,
}

/// Where a job's messages go; every publish is confirmed or an error.
pub trait OutcomeSink: Sync {
    /// Why a message was not confirmed; its text goes into the requeue reason.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Publishes `outcome` (`body`: its [`Outcome::to_json`]) to the results exchange and, when
    /// the envelope names one, to `reply_to`, with the envelope's correlation id and the job's
    /// trace context.
    fn publish_outcome(
        &self,
        envelope: &Envelope<'_>,
        outcome: &Outcome,
        body: &str,
        on_broken: OnBrokenSession,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Publishes a copy of the delivered request, with `reason` in `x-swr-error`, to the
    /// dead-letter exchange; a copy that reached no queue is an error.
    fn publish_dead_letter(
        &self,
        envelope: &Envelope<'_>,
        reason: &str,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
