//! The request parser and validator (contract §3) against arbitrary bodies.
//!
//! Whatever arrives on the queue, `parse_request` must answer without panicking, and its answer
//! must keep the contract's promises: an accepted request has values in range and survives being
//! written out and read again unchanged; a rejection carries a non-empty one-line reason (it goes
//! into the `x-swr-error` header and the outcome) and echoes only values that are valid on their
//! own; the derived idempotency key is never empty and is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};
use swr_stage_worker::request::{
    body_key, derive_key, message_id_key, parse_request, valid_key, Mode, StageRequest, ROLLBACK_SOURCE,
};
use time::format_description::well_known::Rfc3339;

/// The worker's default `limits.max_message_bytes`.
const MAX_BYTES: usize = 65536;
/// The API's `int`.
const MAX_INT: i64 = 2_147_483_647;

fuzz_target!(|body: &[u8]| {
    let key = match parse_request(body, MAX_BYTES) {
        Ok(request) => {
            check_accepted(body, &request);
            request.idempotency_key
        }
        Err(rejected) => {
            let reason = &rejected.reason;
            assert!(!reason.is_empty(), "empty reason for {body:?}");
            assert!(
                !reason.contains(['\n', '\r']),
                "reason is not one line: {reason:?}"
            );
            if let Some(id) = rejected.pipeline_id {
                assert!((1..=MAX_INT).contains(&id), "echoed pipeline_id {id}");
            }
            if let Some(index) = rejected.stage_index {
                assert!((0..=MAX_INT).contains(&index), "echoed stage_index {index}");
            }
            if let Some(key) = &rejected.idempotency_key {
                assert!(valid_key(key), "echoed idempotency_key {key:?}");
            }
            if let Some(campaign) = &rejected.campaign_id {
                assert!((1..=128).contains(&campaign.chars().count()));
            }
            rejected.idempotency_key
        }
    };

    // The size limit is checked on the bytes, before anything else.
    if !body.is_empty() {
        let too_small = parse_request(body, body.len() - 1).expect_err("over the limit");
        assert!(too_small.reason.starts_with("body: expected at most"));
    }

    // Contract §3: the field, else message_id (hashed when it cannot be a key as written), else
    // UUIDv5 of the body.
    let derived = derive_key(key.as_deref(), None, body);
    assert!(!derived.is_empty());
    assert_eq!(derived, derive_key(key.as_deref(), Some(""), body));
    let by_id = derive_key(key.as_deref(), Some("job \u{e9}"), body);
    match &key {
        Some(key) => assert_eq!(&by_id, key),
        None => assert_eq!(by_id, message_id_key("job \u{e9}")),
    }
    match &key {
        Some(key) => assert_eq!(&derived, key),
        None => assert_eq!(derived, body_key(body)),
    }
    let hashed = body_key(body);
    assert_eq!(hashed.len(), 36, "{hashed}");
    assert!(hashed
        .bytes()
        .enumerate()
        .all(|(i, b)| if [8, 13, 18, 23].contains(&i) {
            b == b'-'
        } else {
            b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
        }));
    assert_eq!(&hashed[14..15], "5", "UUID version 5: {hashed}");
});

/// An accepted body: every value in range, and writing the request out as JSON and parsing it
/// again gives the same request.
fn check_accepted(body: &[u8], request: &StageRequest) {
    assert!(body.len() <= MAX_BYTES);
    assert!((1..=MAX_INT).contains(&request.pipeline_id));
    assert!((0..=MAX_INT).contains(&request.stage_index));
    if let Some(key) = &request.idempotency_key {
        assert!(valid_key(key), "accepted idempotency_key {key:?}");
    }
    if let Some(campaign) = &request.campaign_id {
        assert!((1..=128).contains(&campaign.chars().count()));
    }

    let mut written = Map::new();
    written.insert("pipeline_id".into(), json!(request.pipeline_id));
    written.insert("stage_index".into(), json!(request.stage_index));
    written.insert("mode".into(), json!(request.mode.as_str()));
    if request.mode == Mode::Rollback {
        written.insert("source".into(), json!(ROLLBACK_SOURCE));
    }
    if let Some(key) = &request.idempotency_key {
        written.insert("idempotency_key".into(), json!(key));
    }
    if let Some(campaign) = &request.campaign_id {
        written.insert("campaign_id".into(), json!(campaign));
    }
    if let Some(not_after) = request.not_after {
        let text = not_after
            .format(&Rfc3339)
            .expect("an accepted not_after can be written as RFC 3339");
        written.insert("not_after".into(), json!(text));
    }
    let mut again = serde_json::to_vec(&Value::Object(written)).expect("serialises");
    if let Some(metadata) = &request.metadata {
        // Kept as written (one line, an object): spliced back in as it is, it must read the same.
        let text = metadata.get();
        assert!(text.starts_with('{') && !text.contains(['\n', '\r']), "{text:?}");
        again.pop();
        again.extend_from_slice(b",\"metadata\":");
        again.extend_from_slice(text.as_bytes());
        again.push(b'}');
    }
    match parse_request(&again, usize::MAX) {
        Ok(reparsed) => {
            assert_eq!(&reparsed, request, "round trip changed the request");
            if let (Some(a), Some(b)) = (reparsed.not_after, request.not_after) {
                assert_eq!(a.offset(), b.offset(), "round trip changed the offset");
            }
        }
        Err(e) => panic!(
            "an accepted request, written out again, was rejected: {}\n  original: {:?}\n  written: {:?}",
            e.reason,
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(&again)
        ),
    }
}
