//! What an SWR answer means (contract §1): one pure function over the status and error code,
//! and the parser for Huawei's three error body shapes.

use serde_json::Value;

use crate::outcome::{capped, ErrorKind, MAX_ERROR_MESSAGE_CHARS, MAX_SWR_ERROR_CODE_CHARS};

/// The decision for one attempt's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// 2xx: the job succeeded.
    Success,
    /// The token was refused: refresh it once (if the source can) and try again.
    Reauth,
    /// Worth another attempt after a back-off; the kind is reported if attempts run out.
    Transient(ErrorKind),
    /// Final: another attempt would get the same answer.
    Permanent(ErrorKind),
}

/// Gateway and SWR codes that mean "the token is not valid", whatever the status.
const AUTH_CODES: [&str; 2] = ["APIG.0301", "SVCSTG.SWR.4010000"];
/// The gateway's throttling code.
const THROTTLE_CODE: &str = "APIG.0308";

/// Contract §1's table, row by row.
pub fn classify(status: u16, error_code: Option<&str>) -> Class {
    if (200..300).contains(&status) {
        return Class::Success;
    }
    if status == 401 || error_code.is_some_and(|c| AUTH_CODES.contains(&c)) {
        return Class::Reauth;
    }
    if status == 429 || error_code == Some(THROTTLE_CODE) {
        return Class::Transient(ErrorKind::RateLimited);
    }
    match status {
        500 | 502 | 503 | 504 => Class::Transient(ErrorKind::ServerError),
        400 => Class::Permanent(ErrorKind::BadRequest),
        403 => Class::Permanent(ErrorKind::Forbidden),
        404 => Class::Permanent(ErrorKind::NotFound),
        409 => Class::Permanent(ErrorKind::Conflict),
        _ => Class::Permanent(ErrorKind::UnexpectedStatus),
    }
}

/// `error_code` and `error_msg` from an error body, whichever Huawei shape it has:
/// `{"error_code","error_msg"}`, the same plus `"errors":[{"errorCode","errorMessage"}]`,
/// or the gateway's `{"error_code","error_msg","request_id"}`. Anything else gives `None`s.
/// Both are capped ([`MAX_SWR_ERROR_CODE_CHARS`], [`MAX_ERROR_MESSAGE_CHARS`]): they go into
/// outcomes and log lines, and the server writes them.
pub fn parse_error_body(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return (None, None);
    };
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let first_detail = map
        .get("errors")
        .and_then(Value::as_array)
        .and_then(|list| list.first());
    let code =
        text(map.get("error_code")).or_else(|| text(first_detail.and_then(|d| d.get("errorCode"))));
    let message = text(map.get("error_msg"))
        .or_else(|| text(first_detail.and_then(|d| d.get("errorMessage"))));
    (
        code.map(|c| capped(c, MAX_SWR_ERROR_CODE_CHARS)),
        message.map(|m| capped(m, MAX_ERROR_MESSAGE_CHARS)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorKind::*;

    #[test]
    fn two_hundreds_are_success_whatever_the_body() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(classify(s, None), Class::Success);
        }
        assert_eq!(classify(201, Some("APIG.0301")), Class::Success);
    }

    #[test]
    fn unauthorized_row() {
        assert_eq!(classify(401, None), Class::Reauth);
        assert_eq!(classify(401, Some("APIG.0301")), Class::Reauth);
        assert_eq!(classify(403, Some("APIG.0301")), Class::Reauth);
        assert_eq!(classify(400, Some("SVCSTG.SWR.4010000")), Class::Reauth);
    }

    #[test]
    fn throttled_row() {
        assert_eq!(classify(429, None), Class::Transient(RateLimited));
        assert_eq!(
            classify(403, Some("APIG.0308")),
            Class::Transient(RateLimited)
        );
    }

    #[test]
    fn server_error_row() {
        for s in [500, 502, 503, 504] {
            assert_eq!(classify(s, None), Class::Transient(ServerError), "{s}");
        }
    }

    #[test]
    fn permanent_rows() {
        assert_eq!(
            classify(400, Some("SVCSTG.SWR.4000001")),
            Class::Permanent(BadRequest)
        );
        assert_eq!(classify(403, None), Class::Permanent(Forbidden));
        assert_eq!(classify(404, None), Class::Permanent(NotFound));
        assert_eq!(classify(409, None), Class::Permanent(Conflict));
    }

    #[test]
    fn any_other_status_is_unexpected() {
        for s in [100, 301, 302, 405, 418, 422, 501, 505, 599] {
            assert_eq!(classify(s, None), Class::Permanent(UnexpectedStatus), "{s}");
        }
    }

    #[test]
    fn error_body_shapes() {
        let plain = br#"{"error_code":"SVCSTG.SWR.4000001","error_msg":"bad index"}"#;
        assert_eq!(
            parse_error_body(plain),
            (Some("SVCSTG.SWR.4000001".into()), Some("bad index".into()))
        );
        let with_list = br#"{"error_code":"SVCSTG.SWR.4090001","error_msg":"exists","errors":[{"errorCode":"X.1","errorMessage":"detail"}]}"#;
        assert_eq!(
            parse_error_body(with_list).0.as_deref(),
            Some("SVCSTG.SWR.4090001")
        );
        let only_list = br#"{"errors":[{"errorCode":"X.1","errorMessage":"detail"}]}"#;
        assert_eq!(
            parse_error_body(only_list),
            (Some("X.1".into()), Some("detail".into()))
        );
        let gateway = br#"{"error_code":"APIG.0301","error_msg":"Incorrect IAM authentication information","request_id":"abc"}"#;
        assert_eq!(parse_error_body(gateway).0.as_deref(), Some("APIG.0301"));
        assert_eq!(parse_error_body(b"<html>502</html>"), (None, None));
        assert_eq!(parse_error_body(b""), (None, None));
        assert_eq!(parse_error_body(br#"{"error_code": 5}"#), (None, None));
    }

    #[test]
    fn an_error_body_cannot_make_the_code_or_message_long() {
        let body = serde_json::json!({
            "error_code": "C".repeat(100_000),
            "error_msg": "é".repeat(100_000),
        })
        .to_string();
        let (code, message) = parse_error_body(body.as_bytes());
        let (code, message) = (code.unwrap(), message.unwrap());
        assert_eq!(code.chars().count(), MAX_SWR_ERROR_CODE_CHARS);
        assert_eq!(message.chars().count(), MAX_ERROR_MESSAGE_CHARS);
        assert!(code.ends_with('…') && message.ends_with('…'));
        let exact = serde_json::json!({"error_code": "C".repeat(MAX_SWR_ERROR_CODE_CHARS)});
        assert_eq!(
            parse_error_body(exact.to_string().as_bytes()).0.unwrap(),
            "C".repeat(MAX_SWR_ERROR_CODE_CHARS),
            "a code of exactly the cap is kept whole"
        );
    }
}
