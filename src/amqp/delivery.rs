//! The lapin side of a job: a [`Delivery`] read into the job's plain [`Envelope`], and
//! [`AmqpSink`], which publishes the job's outcome and DLQ copy with confirms. When a session
//! breaks under a job, its outcome follows to the next session (see [`OnBrokenSession`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use super::copied_properties;
use super::publisher::{PublishError, Publisher, Routed};
use super::session::Sessions;
use crate::config::AmqpConfig;
use crate::outcome::{Outcome, OUTCOME_TYPE};
use crate::request::ERROR_HEADER;
use crate::trace::{JobTrace, TRACEPARENT, TRACESTATE};
use crate::worker::{Envelope, OnBrokenSession, OutcomeSink};

/// The job's view of `delivery`: its body and the properties the worker honours (contract §3);
/// an empty property counts as absent.
pub fn envelope(delivery: &Delivery) -> Envelope<'_> {
    let properties = &delivery.properties;
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
        body: &delivery.data,
        message_id: text(properties.message_id()),
        correlation_id: text(properties.correlation_id()),
        reply_to: text(properties.reply_to()),
        redelivered: delivery.redelivered,
        delivery_count: delivery_count(properties),
        trace: JobTrace::from_headers(header(TRACEPARENT), header(TRACESTATE)),
    }
}

/// A string property, absent when empty.
fn text(value: &Option<ShortString>) -> Option<&str> {
    value
        .as_ref()
        .map(ShortString::as_str)
        .filter(|s| !s.is_empty())
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

/// Whether this delivery may have been handed out before (see [`Envelope::is_redelivery`]).
pub fn is_redelivery(delivery: &Delivery) -> bool {
    delivery.redelivered || delivery_count(&delivery.properties) > 0
}

/// Publishes one job's messages: on the session's publisher, or on the next session's when this
/// one broke under the job.
pub struct AmqpSink<'a> {
    /// Exchanges, and how long a new session may take.
    amqp: &'a AmqpConfig,
    /// The current session's publisher and the broken-session signal.
    sessions: &'a Sessions,
    /// The publisher of the session the delivery came on.
    publisher: &'a Publisher,
    /// The delivery, copied to the DLQ when its request is invalid.
    delivery: &'a Delivery,
}

impl<'a> AmqpSink<'a> {
    pub fn new(
        amqp: &'a AmqpConfig,
        sessions: &'a Sessions,
        publisher: &'a Publisher,
        delivery: &'a Delivery,
    ) -> Self {
        AmqpSink {
            amqp,
            sessions,
            publisher,
            delivery,
        }
    }

    /// Publishes the outcome (`body`: its JSON) to the results exchange and, when asked, to
    /// `reply_to`; both confirmed.
    async fn publish_once(
        &self,
        publisher: &Publisher,
        envelope: &Envelope<'_>,
        outcome: &Outcome,
        body: &str,
    ) -> Result<(), PublishError> {
        let body = body.as_bytes();
        let properties = outcome_properties(envelope, outcome);
        let results = self.amqp.results_exchange.as_str();
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
        Ok(())
    }

    /// Publishes an outcome; if the connection broke meanwhile (the SWR call outlived it), waits
    /// for the next session's publisher and publishes there. The delivery itself is void then
    /// (its ack cannot reach the broker); its redelivery is answered from the idempotency store.
    ///
    /// A broker error (as opposed to a nack, a message with no route, or a confirm that did not
    /// come on a live channel) means the channel or its connection broke, even if its state has
    /// not flipped yet: the outcome then goes to the first session that is not this one. Giving
    /// up here would leave the key with a stored outcome that only its redelivery publishes, as
    /// a replay.
    async fn publish_surviving_reconnect(
        &self,
        envelope: &Envelope<'_>,
        outcome: &Outcome,
        body: &str,
    ) -> Result<(), PublishError> {
        let publisher = self.publisher;
        match self.publish_once(publisher, envelope, outcome, body).await {
            Ok(()) => Ok(()),
            Err(e) if !session_broke(publisher, &e) => Err(e),
            // Boxed: a rare path, kept out of every job's state machine.
            Err(e) => Box::pin(self.publish_on_next_session(e, envelope, outcome, body)).await,
        }
    }

    /// The rest of [`publish_surviving_reconnect`](Self::publish_surviving_reconnect), once the
    /// job's own session failed the publish with `error`.
    async fn publish_on_next_session(
        &self,
        mut error: PublishError,
        envelope: &Envelope<'_>,
        outcome: &Outcome,
        body: &str,
    ) -> Result<(), PublishError> {
        let publisher = self.publisher;
        let deadline =
            crate::deadline::after(tokio::time::Instant::now(), republish_wait(self.amqp));
        let mut sessions = self.sessions.subscribe();
        // The sessions found broken, by identity; the first one is the job's own.
        let mut broken: Vec<Arc<Publisher>> = Vec::new();
        let is_broken = |p: &Arc<Publisher>, broken: &[Arc<Publisher>]| {
            std::ptr::eq(p.as_ref(), publisher) || broken.iter().any(|b| Arc::ptr_eq(b, p))
        };
        // A few sessions at most: each try either publishes, or finds that session broken too.
        for _ in 0..3 {
            // If the broken session is still the current one, the session loop may not know yet
            // (a dead connection it sees itself; a broken channel it does not).
            self.sessions
                .report_broken(|current| is_broken(current, &broken));
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
            tracing::info!(
                "connection was lost during the job; publishing its outcome on the new one"
            );
            match self.publish_once(&next, envelope, outcome, body).await {
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
}

impl OutcomeSink for AmqpSink<'_> {
    type Error = PublishError;

    async fn publish_outcome(
        &self,
        envelope: &Envelope<'_>,
        outcome: &Outcome,
        body: &str,
        on_broken: OnBrokenSession,
    ) -> Result<(), PublishError> {
        match on_broken {
            OnBrokenSession::Fail => {
                self.publish_once(self.publisher, envelope, outcome, body)
                    .await
            }
            OnBrokenSession::FollowNextSession => {
                self.publish_surviving_reconnect(envelope, outcome, body)
                    .await
            }
        }
    }

    async fn publish_dead_letter(
        &self,
        _envelope: &Envelope<'_>,
        reason: &str,
    ) -> Result<(), PublishError> {
        let delivery = self.delivery;
        let properties =
            dead_letter_properties(&delivery.properties, reason, self.sessions.login());
        self.publisher
            .publish_routed(
                self.amqp.dead_letter_exchange.as_str(),
                delivery.routing_key.as_str(),
                &delivery.data,
                properties,
            )
            .await
    }
}

/// An outcome's properties: persistent JSON of type [`OUTCOME_TYPE`], the request's correlation
/// id (or the key), and the job's span in `traceparent`, so the outcome's consumer continues the
/// trace (the body is unchanged).
fn outcome_properties(envelope: &Envelope<'_>, outcome: &Outcome) -> BasicProperties {
    let correlation = envelope.correlation_id.unwrap_or(&outcome.idempotency_key);
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
    BasicProperties::default()
        .with_headers(headers)
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_type(OUTCOME_TYPE.into())
        .with_correlation_id(correlation.into())
        .with_timestamp(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        )
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
        let mut amqp = crate::config::Config::load(None, Vec::new()).unwrap().amqp;
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
        let mut delivery = Delivery::mock(1, "".into(), "rk".into(), false, b"{}".to_vec());
        delivery.properties = BasicProperties::default()
            .with_message_id("".into())
            .with_correlation_id("c-1".into())
            .with_reply_to("q".into());
        let env = envelope(&delivery);
        assert_eq!(env.message_id, None);
        assert_eq!(env.correlation_id, Some("c-1"));
        assert_eq!(env.reply_to, Some("q"));
        assert_eq!(env.body, b"{}");
        assert!(!env.is_redelivery());
    }
}
