//! Fault rules: what a rule may say ([`FaultRule::validate`], [`FaultRule::from_json`], whose
//! errors name the field), which calls it matches, and the answer it injects.

use std::borrow::Cow;

use super::wire::{default_code, default_message, gateway_error, swr_error, Mode};
use super::Answer;
use crate::sim::FaultRule;

/// Upper bound on a rule's delay, so a typo can't wedge a test for hours.
pub(crate) const MAX_DELAY_MS: u64 = 600_000;

/// Why a fault rule (or its JSON) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct RuleError {
    /// The offending field, so the caller knows what to fix.
    pub field: String,
    /// What was expected instead.
    pub message: String,
}

impl RuleError {
    fn new(field: &str, message: impl Into<String>) -> RuleError {
        RuleError {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// Fields a rule object may contain, listed in errors about unknown fields.
const RULE_FIELDS: &str = "pipeline_id, pipeline_range, stage_index, mode, status, error_code, \
                           retry_after, delay_ms, drop_connection, times";

impl FaultRule {
    /// Checks that the rule can be applied as written.
    pub fn validate(&self) -> Result<(), RuleError> {
        if let Some(status) = self.status {
            if !(200..=599).contains(&status) {
                return Err(RuleError::new(
                    "status",
                    format!("expected an HTTP status in 200..=599, got {status}"),
                ));
            }
        }
        if let Some([lo, hi]) = self.pipeline_range {
            if lo > hi {
                return Err(RuleError::new(
                    "pipeline_range",
                    format!("expected [lo, hi] with lo <= hi, got [{lo}, {hi}]"),
                ));
            }
        }
        if let Some(mode) = &self.mode {
            if Mode::parse(mode).is_none() {
                return Err(RuleError::new(
                    "mode",
                    format!("expected \"retry\" or \"rollback\", got {mode:?}"),
                ));
            }
        }
        if let Some(code) = &self.error_code {
            if self.status.is_none() {
                return Err(RuleError::new("error_code", "needs `status` to be set"));
            }
            if code.is_empty() {
                return Err(RuleError::new("error_code", "expected a non-empty string"));
            }
        }
        if let Some(value) = &self.retry_after {
            if self.status.is_none() {
                return Err(RuleError::new("retry_after", "needs `status` to be set"));
            }
            // It must survive being put in a header verbatim.
            if value
                .bytes()
                .any(|b| !(b == b' ' || b == b'\t' || b.is_ascii_graphic()))
            {
                return Err(RuleError::new(
                    "retry_after",
                    format!("expected printable ASCII (a header value), got {value:?}"),
                ));
            }
        }
        if let Some(ms) = self.delay_ms {
            if ms > MAX_DELAY_MS {
                return Err(RuleError::new(
                    "delay_ms",
                    format!("expected at most {MAX_DELAY_MS}, got {ms}"),
                ));
            }
        }
        if self.drop_connection && self.status.is_some() {
            return Err(RuleError::new(
                "drop_connection",
                "cannot be combined with `status` (a dropped connection has no status)",
            ));
        }
        if self.status.is_none() && !self.drop_connection && self.delay_ms.is_none() {
            return Err(RuleError::new(
                "status",
                "the rule does nothing: set `status`, `drop_connection` or `delay_ms`",
            ));
        }
        Ok(())
    }

    /// Parses and validates a rule from JSON, naming the offending field in
    /// errors (serde's own messages don't always say which field).
    pub fn from_json(body: &[u8]) -> Result<FaultRule, RuleError> {
        fn field<T: serde::de::DeserializeOwned>(
            name: &str,
            value: serde_json::Value,
            expected: &str,
        ) -> Result<T, RuleError> {
            serde_json::from_value(value)
                .map_err(|e| RuleError::new(name, format!("expected {expected}: {e}")))
        }

        let value: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| RuleError::new("body", format!("expected a JSON object: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(RuleError::new("body", "expected a JSON object"));
        };
        let mut rule = FaultRule::default();
        for (name, value) in map {
            match name.as_str() {
                "pipeline_id" => rule.pipeline_id = field(&name, value, "an integer or null")?,
                "pipeline_range" => {
                    rule.pipeline_range = field(&name, value, "[lo, hi] (two integers) or null")?
                }
                "stage_index" => rule.stage_index = field(&name, value, "an integer or null")?,
                "mode" => rule.mode = field(&name, value, "\"retry\", \"rollback\" or null")?,
                "status" => rule.status = field(&name, value, "an HTTP status or null")?,
                "error_code" => rule.error_code = field(&name, value, "a string or null")?,
                "retry_after" => rule.retry_after = field(&name, value, "a string or null")?,
                "delay_ms" => {
                    rule.delay_ms = field(&name, value, "milliseconds (an integer) or null")?
                }
                "drop_connection" => rule.drop_connection = field(&name, value, "true or false")?,
                "times" => rule.times = field(&name, value, "a non-negative integer or null")?,
                _ => {
                    return Err(RuleError::new(
                        &name,
                        format!("unknown field; expected one of {RULE_FIELDS}"),
                    ))
                }
            }
        }
        rule.validate()?;
        Ok(rule)
    }

    /// Whether the rule's matchers accept these (possibly unparseable)
    /// request fields; a matcher on a field the request lacks never matches.
    pub(crate) fn matches(
        &self,
        pipeline_id: Option<i64>,
        stage_index: Option<i64>,
        mode: Option<&str>,
    ) -> bool {
        self.pipeline_id
            .is_none_or(|want| pipeline_id == Some(want))
            && self
                .pipeline_range
                .is_none_or(|[lo, hi]| pipeline_id.is_some_and(|p| lo <= p && p <= hi))
            && self
                .stage_index
                .is_none_or(|want| stage_index == Some(want))
            && self.mode.as_deref().is_none_or(|want| mode == Some(want))
    }
}

/// An injected answer: `{}` for non-errors, otherwise the Huawei shape that
/// goes with the status (or with a custom `APIG.` code).
pub(super) fn fault_answer(
    rule_id: u64,
    status: u16,
    rule: &FaultRule,
    request_id: &str,
) -> Answer {
    let mut answer = if status < 400 {
        Answer::new(status, "{}")
    } else {
        let code = rule
            .error_code
            .as_deref()
            .map_or_else(|| default_code(status), Cow::Borrowed);
        let msg = format!(
            "{} (simulated by fault rule {rule_id})",
            default_message(status)
        );
        if status == 401 || status == 429 || code.starts_with("APIG.") {
            gateway_error(status, &code, &msg, request_id)
        } else {
            swr_error(status, &code, &msg, false)
        }
    };
    answer.retry_after = rule.retry_after.clone();
    answer
}
