//! The outcome message (contract §4): its fields, error kinds, and routing key.
//!
//! Pure data: building an outcome never fails and never contains a credential, because nothing
//! secret is ever passed in.

use serde::{Deserialize, Serialize};

use crate::request::{Metadata, Mode};

/// AMQP `type` property of every outcome.
pub const OUTCOME_TYPE: &str = "swr.stage.outcome";

/// The three final states of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// SWR answered 2xx.
    Succeeded,
    /// SWR was called and the job did not succeed.
    Failed,
    /// SWR was not called: invalid, expired, or refused by a guard.
    Rejected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Rejected => "rejected",
        }
    }
}

/// Why a job did not succeed (contract §4 lists exactly these).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidRequest,
    Expired,
    LoopGuard,
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    UnexpectedStatus,
    RateLimited,
    ServerError,
    Timeout,
    Transport,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::Expired => "expired",
            ErrorKind::LoopGuard => "loop_guard",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::UnexpectedStatus => "unexpected_status",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::ServerError => "server_error",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Transport => "transport",
        }
    }
}

/// The `error` object of an outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutcomeError {
    /// Machine-readable class.
    pub kind: ErrorKind,
    /// One line for people.
    pub message: String,
    /// True when the same request may succeed later (transient failures exhausted).
    pub retryable: bool,
    /// SWR's `error_code` from the last answer, when it sent one.
    pub swr_error_code: Option<String>,
}

/// One published outcome; field order is the contract's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The job's key (field, message_id, or body UUIDv5).
    pub idempotency_key: String,
    /// The request's value when valid.
    pub pipeline_id: Option<i64>,
    /// The request's value when valid.
    pub stage_index: Option<i64>,
    /// The request's mode when valid (given or defaulted).
    pub mode: Option<Mode>,
    /// Final state.
    pub status: Status,
    /// Last HTTP status SWR answered.
    pub http_status: Option<u16>,
    /// HTTP attempts made (0 when SWR was not called).
    pub attempts: u32,
    /// True when re-published from the idempotency store.
    pub replayed: bool,
    /// Why it did not succeed.
    pub error: Option<OutcomeError>,
    /// Echo of the request's campaign.
    pub campaign_id: Option<String>,
    /// Echo of the request's metadata.
    pub metadata: Option<Metadata>,
    /// `X-Request-Id` of the last SWR answer.
    pub swr_request_id: Option<String>,
    /// When the worker took the delivery (RFC 3339, UTC, milliseconds).
    pub started_at: String,
    /// When the outcome was built.
    pub finished_at: String,
    /// finished_at - started_at.
    pub duration_ms: u64,
    /// Which worker produced it.
    pub worker: String,
}

impl Outcome {
    /// `stage.<mode>.<status>`, with `unknown` when the mode was not valid.
    pub fn routing_key(&self) -> String {
        format!(
            "stage.{}.{}",
            self.mode.map_or("unknown", Mode::as_str),
            self.status.as_str()
        )
    }

    /// The outcome as one line of JSON, as it is published and stored.
    pub fn to_json(&self) -> String {
        // Room for a typical outcome up front, so the text is not regrown field by field.
        let mut out = Vec::with_capacity(640 + self.metadata.as_ref().map_or(0, |m| m.get().len()));
        serde_json::to_writer(&mut out, self).expect("an outcome always serialises");
        String::from_utf8(out).expect("serde_json writes UTF-8")
    }
}

/// Longest `error.message` of an outcome, in characters: SWR's and IAM's answers go into it.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 1024;
/// Longest `error.swr_error_code`, in characters (Huawei's codes are some 20).
pub const MAX_SWR_ERROR_CODE_CHARS: usize = 128;
/// Longest `swr_request_id` (SWR's `X-Request-Id`), in characters (SWR's are 32).
pub const MAX_REQUEST_ID_CHARS: usize = 128;

/// `text` cut to at most `max` characters (`max` >= 1) on a character boundary; a text that was
/// cut ends in "…", so a reader knows there was more. What an upstream answer puts into an
/// outcome or a log line passes through here: a server must not decide its size.
pub fn capped(mut text: String, max: usize) -> String {
    if text.char_indices().nth(max).is_some() {
        let end = text
            .char_indices()
            .nth(max.saturating_sub(1))
            .map_or(text.len(), |(at, _)| at);
        text.truncate(end);
        text.push('…');
    }
    text
}

/// A wall-clock instant formatted as the contract shows (`2026-11-29T05:20:28.123Z`).
pub fn timestamp(at: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Outcome {
        Outcome {
            idempotency_key: "k".into(),
            pipeline_id: Some(12345),
            stage_index: Some(2),
            mode: Some(Mode::Retry),
            status: Status::Succeeded,
            http_status: Some(201),
            attempts: 1,
            replayed: false,
            error: None,
            campaign_id: None,
            metadata: None,
            swr_request_id: None,
            started_at: "2026-11-29T05:20:28.123Z".into(),
            finished_at: "2026-11-29T05:20:28.141Z".into(),
            duration_ms: 18,
            worker: "host-a/4242".into(),
        }
    }

    #[test]
    fn routing_key_names_mode_and_status() {
        let mut o = sample();
        assert_eq!(o.routing_key(), "stage.retry.succeeded");
        o.mode = Some(Mode::Rollback);
        o.status = Status::Failed;
        assert_eq!(o.routing_key(), "stage.rollback.failed");
        o.mode = None;
        o.status = Status::Rejected;
        assert_eq!(o.routing_key(), "stage.unknown.rejected");
    }

    #[test]
    fn serialises_every_field_with_contract_names() {
        let mut o = sample();
        o.error = Some(OutcomeError {
            kind: ErrorKind::RateLimited,
            message: "m".into(),
            retryable: true,
            swr_error_code: Some("APIG.0308".into()),
        });
        let v = serde_json::to_value(&o).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in [
            "idempotency_key",
            "pipeline_id",
            "stage_index",
            "mode",
            "status",
            "http_status",
            "attempts",
            "replayed",
            "error",
            "campaign_id",
            "metadata",
            "swr_request_id",
            "started_at",
            "finished_at",
            "duration_ms",
            "worker",
        ] {
            assert!(keys.contains(&k), "missing {k}");
        }
        assert_eq!(keys.len(), 16);
        assert_eq!(v["mode"], "retry");
        assert_eq!(v["status"], "succeeded");
        assert_eq!(v["error"]["kind"], "rate_limited");
        assert_eq!(v["error"]["retryable"], true);
        assert_eq!(v["campaign_id"], serde_json::Value::Null);
    }

    #[test]
    fn error_kind_names_match_serde() {
        for kind in [
            ErrorKind::InvalidRequest,
            ErrorKind::Expired,
            ErrorKind::LoopGuard,
            ErrorKind::BadRequest,
            ErrorKind::Unauthorized,
            ErrorKind::Forbidden,
            ErrorKind::NotFound,
            ErrorKind::Conflict,
            ErrorKind::UnexpectedStatus,
            ErrorKind::RateLimited,
            ErrorKind::ServerError,
            ErrorKind::Timeout,
            ErrorKind::Transport,
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }

    #[test]
    fn capped_cuts_on_a_character_boundary_and_marks_the_cut() {
        assert_eq!(capped("abc".into(), 3), "abc");
        assert_eq!(capped("abcd".into(), 3), "ab…");
        assert_eq!(capped(String::new(), 3), "");
        // Multi-byte characters: counted as characters, never split.
        assert_eq!(capped("ééé".into(), 3), "ééé");
        assert_eq!(capped("éééé".into(), 3), "éé…");
        assert_eq!(capped("日本語のテキスト".into(), 4), "日本語…");
        let long = capped("x".repeat(1_000_000), MAX_ERROR_MESSAGE_CHARS);
        assert_eq!(long.chars().count(), MAX_ERROR_MESSAGE_CHARS);
        assert!(long.ends_with('…'));
        assert_eq!(capped("ab".into(), 1), "…");
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_764_393_628_123);
        assert_eq!(timestamp(t), "2025-11-29T05:20:28.123Z");
    }
}
