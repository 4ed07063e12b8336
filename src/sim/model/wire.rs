//! The simulator's wire details: the SWR step path and its query (`mode`, `source`), the
//! `Idempotency-Key` header's form, and Huawei's two error bodies (SWR's own and the API
//! gateway's) with the codes and messages that go with each status.

use std::borrow::Cow;

use serde::Serialize;

use super::Answer;

/// Largest accepted path parameter: SWR ids are signed 32-bit.
pub(crate) const MAX_PARAM: i64 = 2_147_483_647;
/// The only value of `source` SWR accepts, and only for rollbacks.
pub(crate) const ROLLBACK_SOURCE: &str = "rollback::true";
/// Keys longer than this are refused rather than stored without limit.
pub(crate) const MAX_KEY_LEN: usize = 256;

const PATH_PREFIX: &str = "/v3/manage/pipelines/";
const PATH_MIDDLE: &str = "/stages/";

/// What the step call asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Run a failed step again.
    Retry,
    /// Undo a deploy step.
    Rollback,
}

impl Mode {
    pub(super) fn parse(s: &str) -> Option<Mode> {
        match s {
            "retry" => Some(Mode::Retry),
            "rollback" => Some(Mode::Rollback),
            _ => None,
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Mode::Retry => "retry",
            Mode::Rollback => "rollback",
        }
    }
}

/// `mode` and `source` after percent-decoding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct QueryParams<'a> {
    /// Raw (decoded) `mode`, kept even if invalid so it can be recorded.
    pub(super) mode: Option<Cow<'a, str>>,
    /// Raw (decoded) `source`.
    pub(super) source: Option<Cow<'a, str>>,
}

/// `(pipeline_id, stage_index)` segments of an SWR step path.
pub(super) fn split_path(path: &str) -> Option<(&str, &str)> {
    path.strip_prefix(PATH_PREFIX)?.split_once(PATH_MIDDLE)
}

pub(super) fn valid_key(key: &str) -> bool {
    (1..=MAX_KEY_LEN).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

/// Decodes `mode` and `source`; other parameters are ignored like SWR does.
pub(super) fn parse_query(query: &str) -> Result<QueryParams<'_>, String> {
    let mut params = QueryParams::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name)?;
        let slot = match &*name {
            "mode" => &mut params.mode,
            "source" => &mut params.source,
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!(
                "Invalid query parameter {name}: expected it once, got it more than once"
            ));
        }
        *slot = Some(percent_decode(value)?);
    }
    Ok(params)
}

/// Form-style decoding (`+` is a space); borrows when nothing is encoded,
/// which is the common case.
fn percent_decode(s: &str) -> Result<Cow<'_, str>, String> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Ok(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let digit = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
                let (Some(hi), Some(lo)) = (digit(i + 1), digit(i + 2)) else {
                    return Err(format!("Invalid query string: bad percent-escape in {s:?}"));
                };
                // Two hex digits always fit in a byte.
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| format!("Invalid query string: {s:?} is not UTF-8 once decoded"))
}

#[derive(Serialize)]
struct SwrErrorBody<'a> {
    /// `SVCSTG.SWR.*`, what clients branch on.
    error_code: &'a str,
    /// Human-readable reason.
    error_msg: &'a str,
    /// SWR's per-error details, sent for validation failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<[ErrorDetail<'a>; 1]>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorDetail<'a> {
    /// Same code as the top level (SWR repeats it).
    error_code: &'a str,
    /// Same message as the top level.
    error_message: &'a str,
}

#[derive(Serialize)]
struct GatewayErrorBody<'a> {
    /// `APIG.*`, what clients branch on.
    error_code: &'a str,
    /// Human-readable reason.
    error_msg: &'a str,
    /// The gateway echoes the request id in the body.
    request_id: &'a str,
}

fn to_json(body: &impl Serialize) -> String {
    // Serializing plain string fields can't fail.
    serde_json::to_string(body).unwrap_or_else(|_| "{}".to_owned())
}

/// SWR's own error shape; `detail` adds the `errors` array SWR sends for
/// validation failures so the worker's parser sees both variants.
pub(crate) fn swr_error(status: u16, code: &str, msg: &str, detail: bool) -> Answer {
    let body = SwrErrorBody {
        error_code: code,
        error_msg: msg,
        errors: detail.then_some([ErrorDetail {
            error_code: code,
            error_message: msg,
        }]),
    };
    Answer::new(status, to_json(&body))
}

/// The API gateway's error shape (auth and throttling).
pub(crate) fn gateway_error(status: u16, code: &str, msg: &str, request_id: &str) -> Answer {
    Answer::new(
        status,
        to_json(&GatewayErrorBody {
            error_code: code,
            error_msg: msg,
            request_id,
        }),
    )
}

/// The error code SWR (or its gateway) uses for a status.
pub(crate) fn default_code(status: u16) -> Cow<'static, str> {
    match status {
        400 => "SVCSTG.SWR.4000001".into(),
        401 => "APIG.0301".into(),
        403 => "SVCSTG.SWR.4030001".into(),
        404 => "SVCSTG.SWR.4040001".into(),
        409 => "SVCSTG.SWR.4090001".into(),
        429 => "APIG.0308".into(),
        500 => "SVCSTG.SWR.5000001".into(),
        503 => "SVCSTG.SWR.5030001".into(),
        other => format!("SVCSTG.SWR.{other}0001").into(),
    }
}

pub(super) fn default_message(status: u16) -> &'static str {
    match status {
        400 => "Bad request",
        401 => "Incorrect IAM authentication information: token expired",
        403 => "Forbidden: the token has no permission for this pipeline",
        404 => "The pipeline or step does not exist",
        409 => "The pipeline is busy: another operation on it is in progress",
        429 => "The throttling threshold has been reached: policy user over ratelimit",
        500 => "Internal server error",
        502 => "Bad gateway",
        503 => "Service unavailable, please try again later",
        504 => "Gateway timeout",
        _ => "Request failed",
    }
}

/// A 404 in SWR's shape for paths that aren't part of the API.
pub(crate) fn not_found(method: &str, path: &str) -> Answer {
    swr_error(
        404,
        "SVCSTG.SWR.4040001",
        &format!("No such API: {method} {path}"),
        false,
    )
}
