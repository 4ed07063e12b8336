//! `replay`: moves dead-lettered requests back to the request queue.
//!
//! Each message is re-published (persistent, confirmed) *before* it is acked on the source, so
//! stopping half-way loses nothing: at worst one message is in both queues, and the worker's
//! idempotency key makes the second copy a replay. Messages that do not match the filter, and
//! every message in a dry run, are handed back to the source queue untouched (nack + requeue).
//!
//! The run looks at no more messages than the source held when it started, so a request that
//! is dead-lettered again while the replay runs is not moved around in a loop.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Acker;
use lapin::BasicProperties;
use lapin::{Channel, Confirmation};
use serde_json::Value;

use super::{bounded, open_channel, CampaignError};
use crate::amqp::copied_properties;
use crate::config::Config;
use crate::request::ERROR_HEADER;

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("--filter {0:?}: expected FIELD=VALUE, e.g. pipeline_id=12345 or mode=rollback")]
    Filter(String),
    #[error("queue '{queue}' cannot be read: {source}")]
    NoSource { queue: String, source: lapin::Error },
    #[error("the broker refused the copy of message {at} (basic.nack); it stays in '{from}'. {moved} moved before it")]
    Nacked {
        at: usize,
        from: String,
        moved: usize,
    },
    #[error("queue '{to}' does not exist, so message {at} was returned unrouted; it stays in '{from}'. {moved} moved before it")]
    Unroutable {
        at: usize,
        from: String,
        to: String,
        moved: usize,
    },
}

/// One `FIELD=VALUE` condition on the request body's top-level fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    /// Top-level field of the request body.
    pub field: String,
    /// Value it must have: a JSON value (`12345`, `true`, `"x"`) or, failing that, the text.
    pub value: Value,
}

impl FromStr for Filter {
    type Err = ReplayError;
    fn from_str(text: &str) -> Result<Filter, ReplayError> {
        match text.split_once('=') {
            Some((field, value)) if !field.trim().is_empty() => Ok(Filter {
                field: field.trim().to_owned(),
                value: serde_json::from_str(value.trim())
                    .unwrap_or_else(|_| Value::from(value.trim())),
            }),
            _ => Err(ReplayError::Filter(text.to_owned())),
        }
    }
}

impl Filter {
    fn matches(&self, body: Option<&serde_json::Map<String, Value>>) -> bool {
        body.and_then(|b| b.get(&self.field)) == Some(&self.value)
    }
}

/// What `replay` was asked to do.
#[derive(Clone, Debug, Default)]
pub struct ReplayPlan {
    /// Source queue; `None` = `amqp.dead_letter_queue`.
    pub from: Option<String>,
    /// Move at most this many.
    pub limit: Option<usize>,
    /// All must match for a message to move; bodies that are not JSON objects match none.
    pub filters: Vec<Filter>,
    /// List what would move; move nothing.
    pub dry_run: bool,
}

/// One message moved (or, in a dry run, that would be).
#[derive(Clone, Debug, PartialEq)]
pub struct MovedMessage {
    /// The body's `pipeline_id`, when it has one.
    pub pipeline_id: Option<Value>,
    /// The body's `stage_index`, when it has one.
    pub stage_index: Option<Value>,
    /// The body's `mode`, when it has one.
    pub mode: Option<Value>,
    /// The body's `idempotency_key`, else the `message_id` property.
    pub key: Option<String>,
    /// Why it was dead-lettered: `x-swr-error`, or `x-death` for the broker's own.
    pub reason: String,
}

impl fmt::Display for MovedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<Value>| v.as_ref().map_or("-".to_owned(), Value::to_string);
        write!(
            f,
            "pipeline_id={} stage_index={} mode={} key={} reason: {}",
            show(&self.pipeline_id),
            show(&self.stage_index),
            show(&self.mode),
            self.key.as_deref().unwrap_or("-"),
            self.reason
        )
    }
}

/// What a replay did.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayReport {
    /// Source queue.
    pub from: String,
    /// Destination queue.
    pub to: String,
    /// Messages taken from the source and looked at.
    pub examined: usize,
    /// Messages moved (or, in a dry run, that would move), in queue order.
    pub moved: Vec<MovedMessage>,
    /// True for a dry run: nothing moved.
    pub dry_run: bool,
}

impl ReplayReport {
    /// One line per moved message, then the total.
    pub fn render(&self) -> String {
        let verb = if self.dry_run { "would move" } else { "moved" };
        let mut out = String::new();
        for message in &self.moved {
            out.push_str(&format!("{verb} {message}\n"));
        }
        out.push_str(&format!(
            "{verb} {} of {} examined message(s) from '{}' to '{}'",
            self.moved.len(),
            self.examined,
            self.from,
            self.to
        ));
        out
    }
}

/// `swr-stage-worker replay`: moves matching messages from the source queue to
/// `amqp.request_queue` (via the default exchange), one confirmed copy before each ack.
pub async fn replay(config: &Config, plan: &ReplayPlan) -> Result<ReplayReport, CampaignError> {
    let limit = config.amqp.confirm_timeout;
    let from = plan
        .from
        .clone()
        .unwrap_or_else(|| config.amqp.dead_letter_queue.clone());
    let to = config.amqp.request_queue.clone();
    let connection = super::connect(config, "replay").await?;
    let login = connection.status().username();
    let channel = open_channel(&connection, config).await?;
    let depth = source_depth(&channel, &from, limit).await?;
    bounded(
        limit,
        "confirm_select",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    let mut report = ReplayReport {
        from,
        to,
        examined: 0,
        moved: Vec::new(),
        dry_run: plan.dry_run,
    };
    // Messages handed back at the end; held unacked until then so basic.get does not return
    // them again.
    let mut held: Vec<Acker> = Vec::new();
    let mover = Mover {
        channel: &channel,
        plan,
        limit,
        login: &login,
    };
    let result = mover.move_all(depth, &mut report, &mut held).await;
    for acker in held {
        // Closing the channel would requeue them too; nack says so explicitly and at once.
        let _ = tokio::time::timeout(
            limit,
            acker.nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            }),
        )
        .await;
    }
    let _ = tokio::time::timeout(limit, connection.close(200, "replay done".into())).await;
    result.map(|()| report)
}

/// How many messages the source queue holds; an error if it does not exist.
async fn source_depth(
    channel: &Channel,
    from: &str,
    limit: Duration,
) -> Result<usize, CampaignError> {
    match tokio::time::timeout(
        limit,
        channel.queue_declare(
            from.into(),
            QueueDeclareOptions {
                // Only look: replay never creates or changes the source.
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    {
        Ok(Ok(queue)) => Ok(queue.message_count() as usize),
        Ok(Err(source)) => Err(ReplayError::NoSource {
            queue: from.to_owned(),
            source,
        }
        .into()),
        Err(_) => Err(CampaignError::Timeout {
            step: "queue.declare (passive)",
            timeout: limit,
        }),
    }
}

/// What moving one message needs.
struct Mover<'a> {
    channel: &'a Channel,
    plan: &'a ReplayPlan,
    /// Limit of every call to the broker (`amqp.confirm_timeout`).
    limit: Duration,
    /// The user replay connected as, recorded in each copy.
    login: &'a str,
}

impl Mover<'_> {
    /// Examines at most `depth` messages (the source's depth when replay began) and moves the
    /// matching ones, up to the plan's limit. Messages not moved go to `held`.
    async fn move_all(
        &self,
        depth: usize,
        report: &mut ReplayReport,
        held: &mut Vec<Acker>,
    ) -> Result<(), CampaignError> {
        let plan = self.plan;
        while report.examined < depth && plan.limit.is_none_or(|n| report.moved.len() < n) {
            let got = bounded(
                self.limit,
                "basic.get",
                self.channel.basic_get(
                    report.from.as_str().into(),
                    BasicGetOptions { no_ack: false },
                ),
            )
            .await?;
            let Some(message) = got else { break };
            report.examined += 1;
            let delivery = message.delivery;
            let body =
                serde_json::from_slice::<serde_json::Map<String, Value>>(&delivery.data).ok();
            if !plan.filters.iter().all(|f| f.matches(body.as_ref())) {
                held.push(delivery.acker);
                continue;
            }
            let moved = describe(body.as_ref(), &delivery.properties);
            if plan.dry_run {
                held.push(delivery.acker);
                report.moved.push(moved);
                continue;
            }
            let confirmation = self.copy(&delivery, &report.to).await?;
            if let Some(refused) = refused(&confirmation, report) {
                held.push(delivery.acker);
                return Err(refused);
            }
            // Only now, with the copy confirmed, may the original go.
            bounded(
                self.limit,
                "basic.ack",
                delivery.acker.ack(BasicAckOptions::default()),
            )
            .await?;
            report.moved.push(moved);
        }
        Ok(())
    }

    /// Publishes a copy of `delivery` to `to` and waits for the broker's confirmation.
    async fn copy(&self, delivery: &Delivery, to: &str) -> Result<Confirmation, CampaignError> {
        let confirm = bounded(
            self.limit,
            "basic.publish",
            self.channel.basic_publish(
                "".into(),
                to.into(),
                BasicPublishOptions {
                    // A missing request queue must not swallow the message.
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                requeued_properties(&delivery.properties, self.login),
            ),
        )
        .await?;
        bounded(self.limit, "publisher confirm", confirm).await
    }
}

/// Why a copy did not arrive: the broker returned it (no request queue) or refused it. None
/// when it is safely in the request queue.
fn refused(confirmation: &Confirmation, report: &ReplayReport) -> Option<CampaignError> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => None,
        Confirmation::Ack(Some(_)) => Some(
            ReplayError::Unroutable {
                at: report.examined,
                from: report.from.clone(),
                to: report.to.clone(),
                moved: report.moved.len(),
            }
            .into(),
        ),
        Confirmation::Nack(_) => Some(
            ReplayError::Nacked {
                at: report.examined,
                from: report.from.clone(),
                moved: report.moved.len(),
            }
            .into(),
        ),
    }
}

/// The original properties as [`copied_properties`] gives them for `login`, without the
/// dead-letter reason (the next attempt gets its own) and without `x-death` (the broker's history
/// of the old copy).
fn requeued_properties(original: &BasicProperties, login: &str) -> BasicProperties {
    let mut kept = FieldTable::default();
    if let Some(headers) = original.headers() {
        for (name, value) in headers.inner() {
            if name.as_str() != ERROR_HEADER && name.as_str() != "x-death" {
                kept.insert(name.clone(), value.clone());
            }
        }
    }
    copied_properties(original, kept, login)
}

fn describe(
    body: Option<&serde_json::Map<String, Value>>,
    properties: &BasicProperties,
) -> MovedMessage {
    let field = |name: &str| body.and_then(|b| b.get(name)).cloned();
    let key = body
        .and_then(|b| b.get("idempotency_key"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| properties.message_id().as_ref().map(|m| m.to_string()));
    let headers = properties.headers().as_ref();
    let reason = match headers.and_then(|h| h.inner().get(ERROR_HEADER)) {
        Some(AMQPValue::LongString(text)) => text.to_string(),
        _ if headers.is_some_and(|h| h.inner().contains_key("x-death")) => {
            "dead-lettered by the broker (x-death)".to_owned()
        }
        _ => "no reason recorded".to_owned(),
    };
    MovedMessage {
        pipeline_id: field("pipeline_id"),
        stage_index: field("stage_index"),
        mode: field("mode"),
        key,
        reason,
    }
}

/// Parses `--filter` values.
pub fn parse_filters(texts: &[String]) -> Result<Vec<Filter>, ReplayError> {
    texts.iter().map(|t| t.parse()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compare_json_values_or_text() {
        let f: Filter = "pipeline_id=12345".parse().unwrap();
        assert_eq!(f.value, Value::from(12345));
        let body: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"pipeline_id": 12345, "mode": "rollback"}"#).unwrap();
        assert!(f.matches(Some(&body)));
        let f: Filter = "mode=rollback".parse().unwrap();
        assert!(f.matches(Some(&body)));
        let f: Filter = "pipeline_id=\"12345\"".parse().unwrap();
        assert!(!f.matches(Some(&body)), "a string is not the number");
        assert!(!f.matches(None));
        assert!("pipeline_id".parse::<Filter>().is_err());
        assert!("=1".parse::<Filter>().is_err());
    }

    #[test]
    fn requeued_copy_loses_the_dead_letter_headers_only() {
        let mut headers = FieldTable::default();
        headers.insert(ERROR_HEADER.into(), AMQPValue::LongString("bad".into()));
        headers.insert("x-death".into(), AMQPValue::Boolean(true));
        headers.insert("ticket".into(), AMQPValue::LongString("OPS-1".into()));
        let original = BasicProperties::default()
            .with_message_id("k".into())
            .with_headers(headers);
        let copy = requeued_properties(&original, "svc");
        let kept = copy.headers().as_ref().unwrap().inner();
        assert!(kept.contains_key("ticket"));
        assert!(!kept.contains_key(ERROR_HEADER) && !kept.contains_key("x-death"));
        assert_eq!(copy.delivery_mode(), &Some(2));
        assert_eq!(copy.message_id().as_ref().unwrap().as_str(), "k");
        // A producer's user_id that the replaying user cannot publish goes to a header.
        let foreign = requeued_properties(&original.with_user_id("alice".into()), "svc");
        assert_eq!(foreign.user_id(), &None);
        let kept = foreign.headers().as_ref().unwrap().inner();
        assert_eq!(
            kept.get(crate::amqp::ORIGINAL_USER_HEADER),
            Some(&AMQPValue::LongString("alice".into()))
        );
    }
}
