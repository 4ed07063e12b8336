//! The request message (contract §3): parse the AMQP body, check every rule, derive the job's
//! idempotency key.
//!
//! This module is pure: no I/O, no clock except the `now` passed in. A body that breaks any rule
//! becomes an [`InvalidRequest`] that still carries every field that *was* valid, because the
//! rejected outcome echoes them (contract §4).

use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// RFC 4122 URL namespace (`6ba7b811-9dad-11d1-80b4-00c04fd430c8`): contract §3 names it.
const KEY_NAMESPACE: uuid::Uuid = uuid::Uuid::NAMESPACE_URL;

/// The only `source` value SWR accepts, and only with rollback.
pub const ROLLBACK_SOURCE: &str = "rollback::true";

/// Header added to the DLQ copy of an invalid request (contract §5): the one-line reason.
/// The worker writes it on the DLQ copy; `campaign replay` reads it and strips it.
pub const ERROR_HEADER: &str = "x-swr-error";

/// The fields contract §3 defines; anything else is an error.
const KNOWN_FIELDS: [&str; 8] = [
    "pipeline_id",
    "stage_index",
    "mode",
    "source",
    "idempotency_key",
    "campaign_id",
    "not_after",
    "metadata",
];

/// Largest pipeline id and stage index (the API's `int`).
const MAX_INT: i64 = 2_147_483_647;

/// How deeply `metadata` may nest: inside the request or the outcome object that makes 127
/// levels, the most serde_json reads, so every consumer that parses the outcome can read it.
const MAX_METADATA_DEPTH: usize = 126;

/// What to do with the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Retry,
    Rollback,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Retry => "retry",
            Mode::Rollback => "rollback",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A valid request: everything the worker needs to call SWR and build the outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct StageRequest {
    /// SWR pipeline id, 1..=2147483647.
    pub pipeline_id: i64,
    /// Step index in the pipeline, 0..=2147483647.
    pub stage_index: i64,
    /// Retry or rollback; rollback implies `source=rollback::true` on the wire.
    pub mode: Mode,
    /// The producer's own key, if it gave one (otherwise message_id or a body hash is used).
    pub idempotency_key: Option<String>,
    /// Echoed in the outcome so campaign tools can count their own results.
    pub campaign_id: Option<String>,
    /// Deadline after which the request is not executed.
    pub not_after: Option<OffsetDateTime>,
    /// Echoed verbatim in the outcome.
    pub metadata: Option<Metadata>,
}

/// A body that broke at least one rule, with the fields that were valid kept for the outcome.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InvalidRequest {
    /// One line naming each bad field and what was expected.
    pub reason: String,
    /// `pipeline_id` if it was valid.
    pub pipeline_id: Option<i64>,
    /// `stage_index` if it was valid.
    pub stage_index: Option<i64>,
    /// `mode` if it was valid (or defaulted).
    pub mode: Option<Mode>,
    /// `idempotency_key` if it was valid, so the rejected outcome carries the producer's key.
    pub idempotency_key: Option<String>,
    /// `campaign_id` if it was valid.
    pub campaign_id: Option<String>,
    /// `metadata` if it was valid.
    pub metadata: Option<Metadata>,
}

/// A request's `metadata` object, kept as the producer wrote it: the worker never reads it, and
/// the outcome echoes it verbatim (key order, number spelling, spacing), not re-encoded. The one
/// change is that line breaks become spaces (outside strings they can only be white space), so
/// an outcome is always one line of JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Metadata(Box<RawValue>);

impl Metadata {
    /// The object's JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// `raw` as metadata, or what was expected of it.
    fn from_raw(raw: &RawValue) -> Result<Metadata, String> {
        let text = raw.get();
        if !text.starts_with('{') {
            let got = serde_json::from_str::<Value>(text).map_or_else(
                |_| match text.as_bytes().first() {
                    Some(b'[') => "an array".into(),
                    Some(b'"') => "a string".into(),
                    _ => "a number".into(),
                },
                |v| describe(&v),
            );
            return Err(format!(
                "field `metadata`: expected a JSON object, got {got}"
            ));
        }
        if nesting_depth(text) > MAX_METADATA_DEPTH {
            return Err(format!(
                "field `metadata`: expected a JSON object nested at most {MAX_METADATA_DEPTH} levels deep"
            ));
        }
        // Echoed text must be readable by whoever reads outcomes (and by the campaign tools,
        // which read failed lines back): no number beyond a 64-bit float, no lone surrogate.
        if let Err(e) = serde_json::from_str::<Value>(text) {
            return Err(format!(
                "field `metadata`: expected a JSON object any JSON parser reads, got one that is not ({e})"
            ));
        }
        if !text.contains(['\n', '\r']) {
            return Ok(Metadata(raw.to_owned()));
        }
        RawValue::from_string(text.replace(['\n', '\r'], " "))
            .map(Metadata)
            .map_err(|e| format!("field `metadata`: expected a JSON object ({e})"))
    }
}

impl PartialEq for Metadata {
    fn eq(&self, other: &Metadata) -> bool {
        self.get() == other.get()
    }
}

/// The deepest nesting of objects and arrays in valid JSON `text` (brackets inside strings do
/// not count).
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for byte in text.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

impl fmt::Display for InvalidRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// The top-level object as an ordered list, so a repeated field is seen (a `Value` keeps only
/// the last copy, and `{"mode":"retry","mode":"rollback"}` must not silently pick one).
/// `metadata` is not parsed: its text is kept (the first copy) and its entry holds `null`.
struct Fields<'a> {
    entries: Vec<(String, Value)>,
    metadata: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Fields {
                    entries: Vec::with_capacity(map.size_hint().unwrap_or(4).min(16)),
                    metadata: None,
                };
                while let Some(name) = map.next_key::<String>()? {
                    let value = if name == "metadata" {
                        let raw = map.next_value::<&'de RawValue>()?;
                        fields.metadata.get_or_insert(raw);
                        Value::Null
                    } else {
                        map.next_value::<Value>()?
                    };
                    fields.entries.push((name, value));
                }
                Ok(fields)
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

/// Collects per-field complaints into one line.
#[derive(Default)]
struct Complaints(Vec<String>);

impl Complaints {
    fn add(&mut self, field: &str, expected: &str, got: &Value) {
        self.0.push(format!(
            "field `{field}`: expected {expected}, got {}",
            describe(got)
        ));
    }
}

/// A short, single-line description of a JSON value for error messages.
fn describe(value: &Value) -> String {
    let text = match value {
        Value::Null => return "null".into(),
        Value::Bool(_) | Value::Number(_) => value.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => return "an array".into(),
        Value::Object(_) => return "an object".into(),
    };
    if text.chars().count() > 64 {
        let cut: String = text.chars().take(61).collect();
        format!("{cut}...")
    } else {
        text
    }
}

/// Parses and validates one request body against contract §3. `now` decides `not_after` only
/// as far as its *syntax*; whether the deadline has passed is the worker's decision.
pub fn parse_request(body: &[u8], max_bytes: usize) -> Result<StageRequest, Box<InvalidRequest>> {
    let reject = |reason: String| {
        Err(Box::new(InvalidRequest {
            reason,
            ..InvalidRequest::default()
        }))
    };
    if body.len() > max_bytes {
        return Err(Box::new(InvalidRequest {
            reason: format!(
                "body: expected at most {max_bytes} bytes (limits.max_message_bytes), got {} bytes",
                body.len()
            ),
            // Still the producer's key when it gave one (contract §3's order), read without
            // building the oversized request.
            idempotency_key: key_field_only(body),
            ..InvalidRequest::default()
        }));
    }
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(e) => {
            return reject(format!(
                "body: expected UTF-8 JSON, got invalid UTF-8 at byte {}",
                e.valid_up_to()
            ))
        }
    };
    let fields = match serde_json::from_str::<Fields>(text) {
        Ok(fields) => fields,
        Err(e) => {
            let what = if e.is_eof() {
                "truncated JSON"
            } else if e.is_data() {
                "JSON that is not an object"
            } else {
                "malformed JSON"
            };
            return reject(format!(
                "body: expected a JSON object, got {what} ({})",
                e.to_string().replace('\n', " ")
            ));
        }
    };
    validate_fields(fields)
}

fn validate_fields(fields: Fields) -> Result<StageRequest, Box<InvalidRequest>> {
    let Fields {
        entries: fields,
        metadata,
    } = fields;
    let mut bad = Complaints::default();
    check_names(&fields, &mut bad);
    let get = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let pipeline_id = required_int(get("pipeline_id"), "pipeline_id", 1, &mut bad);
    let stage_index = required_int(get("stage_index"), "stage_index", 0, &mut bad);
    let mode = mode_and_source(get("mode"), get("source"), &mut bad);
    let idempotency_key = match get("idempotency_key") {
        None => None,
        Some(Value::String(s)) if valid_key(s) => Some(s.clone()),
        Some(v) => {
            bad.add(
                "idempotency_key",
                "a string of 1..=255 printable ASCII characters without spaces (0x21..=0x7E)",
                v,
            );
            None
        }
    };
    let campaign_id = match get("campaign_id") {
        None => None,
        Some(Value::String(s)) if (1..=128).contains(&s.chars().count()) => Some(s.clone()),
        Some(v) => {
            bad.add("campaign_id", "a string of 1..=128 characters", v);
            None
        }
    };
    let not_after = get("not_after").and_then(|v| {
        let parsed = v.as_str().and_then(parse_rfc3339);
        if parsed.is_none() {
            bad.add(
                "not_after",
                "an RFC 3339 time such as \"2026-11-29T06:00:00Z\"",
                v,
            );
        }
        parsed
    });
    let metadata = metadata.and_then(|raw| {
        Metadata::from_raw(raw)
            .map_err(|complaint| bad.0.push(complaint))
            .ok()
    });

    match (pipeline_id, stage_index, mode) {
        (Some(pipeline_id), Some(stage_index), Some(mode)) if bad.0.is_empty() => {
            Ok(StageRequest {
                pipeline_id,
                stage_index,
                mode,
                idempotency_key,
                campaign_id,
                not_after,
                metadata,
            })
        }
        _ => Err(Box::new(InvalidRequest {
            reason: bad.0.join("; "),
            pipeline_id,
            stage_index,
            mode,
            idempotency_key,
            campaign_id,
            metadata,
        })),
    }
}

/// Complains of every unknown field and every field given twice.
fn check_names(fields: &[(String, Value)], bad: &mut Complaints) {
    let mut seen: Vec<&str> = Vec::with_capacity(fields.len());
    for (name, _) in fields {
        if !KNOWN_FIELDS.contains(&name.as_str()) {
            let shown: String = name.chars().take(64).collect();
            bad.0.push(format!(
                "field {shown:?}: unknown field (expected one of {})",
                KNOWN_FIELDS.join(", ")
            ));
        } else if seen.contains(&name.as_str()) {
            bad.0
                .push(format!("field `{name}`: appears more than once"));
        } else {
            seen.push(name);
        }
    }
}

/// A required integer field, `min..=2147483647`.
fn required_int(value: Option<&Value>, field: &str, min: i64, bad: &mut Complaints) -> Option<i64> {
    let Some(v) = value else {
        bad.0.push(format!(
            "field `{field}`: required, expected an integer {min}..=2147483647"
        ));
        return None;
    };
    let int = int_in_range(v, min);
    if int.is_none() {
        bad.add(field, &format!("an integer {min}..=2147483647"), v);
    }
    int
}

/// `mode` (retry when absent), and `source`, which only a rollback may carry, as
/// `rollback::true`.
fn mode_and_source(
    mode: Option<&Value>,
    source: Option<&Value>,
    bad: &mut Complaints,
) -> Option<Mode> {
    let mode = match mode {
        None => Some(Mode::Retry),
        Some(Value::String(s)) if s == "retry" => Some(Mode::Retry),
        Some(Value::String(s)) if s == "rollback" => Some(Mode::Rollback),
        Some(v) => {
            bad.add("mode", "\"retry\" or \"rollback\"", v);
            None
        }
    };
    match (source, mode) {
        (None, _) => {}
        (Some(Value::String(s)), Some(Mode::Rollback)) if s == ROLLBACK_SOURCE => {}
        (Some(v), Some(Mode::Retry)) => bad.add(
            "source",
            "no source with mode \"retry\" (source is only for rollback)",
            v,
        ),
        (Some(v), _) => bad.add("source", "\"rollback::true\"", v),
    }
    mode
}

/// The top-level `idempotency_key` of a JSON object, if it is there and valid, found in one pass
/// that skips everything else without keeping it (memory does not grow with the body).
fn key_field_only(body: &[u8]) -> Option<String> {
    /// Objects only (a derived struct would also take an array), every other field skipped.
    struct KeyOnly(Option<String>);
    impl<'de> Deserialize<'de> for KeyOnly {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Scan;
            impl<'de> Visitor<'de> for Scan {
                type Value = KeyOnly;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyOnly, A::Error> {
                    let mut key = None;
                    while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                        if name == "idempotency_key" {
                            key = map.next_value::<Option<String>>().ok().flatten();
                        } else {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                    Ok(KeyOnly(key))
                }
            }
            deserializer.deserialize_map(Scan)
        }
    }
    serde_json::from_slice::<KeyOnly>(body)
        .ok()?
        .0
        .filter(|key| valid_key(key))
}

/// An RFC 3339 date-time. The `time` crate takes any character between the date and the time;
/// RFC 3339 has `T` (or `t`, and a space by its note on readability), nothing else.
fn parse_rfc3339(text: &str) -> Option<OffsetDateTime> {
    matches!(text.as_bytes().get(10), Some(b'T' | b't' | b' '))
        .then(|| OffsetDateTime::parse(text, &Rfc3339).ok())
        .flatten()
}

/// An integer JSON number in `min..=2147483647`; floats (even `2.0`) and strings are not integers.
fn int_in_range(value: &Value, min: i64) -> Option<i64> {
    value
        .as_i64()
        .filter(|n| (min..=MAX_INT).contains(n) && !value.is_f64())
}

/// Contract §3: 1..=255 characters, each 0x21..=0x7E.
pub fn valid_key(key: &str) -> bool {
    (1..=255).contains(&key.len()) && key.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// The job's idempotency key: the request's field, else the AMQP `message_id`, else a UUIDv5 of
/// the exact body bytes in the URL namespace (lowercase, hyphenated).
///
/// The key travels in the `Idempotency-Key` header, so a `message_id` that breaks the key's
/// rule ([`valid_key`]: "job-é", "job 1") cannot be it as written: the key is then
/// [`message_id_key`] of it, so that different ids stay different jobs and a redelivery stays
/// the same one (callers log it).
pub fn derive_key(field: Option<&str>, message_id: Option<&str>, body: &[u8]) -> String {
    if let Some(key) = field {
        return key.to_owned();
    }
    match message_id.filter(|id| !id.is_empty()) {
        Some(id) if valid_key(id) => id.to_owned(),
        Some(id) => message_id_key(id),
        None => body_key(body),
    }
}

/// The key of a `message_id` that cannot be a key as written: a UUIDv5, in the URL namespace,
/// of `amqp:message_id:` followed by the id's bytes (the prefix keeps it apart from any body's
/// key).
pub fn message_id_key(message_id: &str) -> String {
    let name = [b"amqp:message_id:".as_slice(), message_id.as_bytes()].concat();
    uuid::Uuid::new_v5(&KEY_NAMESPACE, &name)
        .hyphenated()
        .to_string()
}

/// UUIDv5 of the body in the RFC 4122 URL namespace.
pub fn body_key(body: &[u8]) -> String {
    uuid::Uuid::new_v5(&KEY_NAMESPACE, body)
        .hyphenated()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<StageRequest, Box<InvalidRequest>> {
        parse_request(v.to_string().as_bytes(), 65536)
    }

    fn reason(v: Value) -> String {
        parse(v).unwrap_err().reason
    }

    #[test]
    fn minimal_request_defaults_to_retry() {
        let r = parse(json!({"pipeline_id": 12345, "stage_index": 2})).unwrap();
        assert_eq!(
            (r.pipeline_id, r.stage_index, r.mode),
            (12345, 2, Mode::Retry)
        );
    }

    #[test]
    fn full_request_is_accepted() {
        let r = parse(json!({
            "pipeline_id": 2147483647, "stage_index": 0, "mode": "rollback",
            "source": "rollback::true", "idempotency_key": "k-1", "campaign_id": "outage",
            "not_after": "2026-11-29T06:00:00+08:00", "metadata": {"ticket": "OPS-1"}
        }))
        .unwrap();
        assert_eq!(r.mode, Mode::Rollback);
        assert_eq!(r.idempotency_key.as_deref(), Some("k-1"));
        assert_eq!(r.campaign_id.as_deref(), Some("outage"));
        assert_eq!(r.metadata.unwrap().get(), r#"{"ticket":"OPS-1"}"#);
        assert_eq!(r.not_after.unwrap().unix_timestamp(), 1_795_903_200);
    }

    #[test]
    fn rollback_without_source_gets_it_filled() {
        // The wire request always carries source for rollback; the message may omit it.
        let r = parse(json!({"pipeline_id": 1, "stage_index": 4, "mode": "rollback"})).unwrap();
        assert_eq!(r.mode, Mode::Rollback);
    }

    #[test]
    fn pipeline_id_rules() {
        assert!(reason(json!({"stage_index": 0})).contains("field `pipeline_id`: required"));
        for bad in [
            json!(0),
            json!(-1),
            json!(2147483648i64),
            json!("12"),
            json!(1.5),
            json!(2.0),
            json!(null),
        ] {
            let r = reason(json!({"pipeline_id": bad, "stage_index": 0}));
            assert!(
                r.contains("field `pipeline_id`: expected an integer 1..=2147483647"),
                "{bad}: {r}"
            );
        }
    }

    #[test]
    fn huge_numbers_are_not_integers() {
        let body = br#"{"pipeline_id": 123456789012345678901234567890, "stage_index": 0}"#;
        let e = parse_request(body, 65536).unwrap_err();
        assert!(e.reason.contains("field `pipeline_id`"), "{}", e.reason);
        let body = br#"{"pipeline_id": 1e400, "stage_index": 0}"#;
        assert!(parse_request(body, 65536).is_err());
    }

    #[test]
    fn stage_index_rules() {
        assert!(reason(json!({"pipeline_id": 1})).contains("field `stage_index`: required"));
        for bad in [json!(-1), json!(2147483648i64), json!("0"), json!(true)] {
            let r = reason(json!({"pipeline_id": 1, "stage_index": bad}));
            assert!(
                r.contains("field `stage_index`: expected an integer 0..=2147483647"),
                "{r}"
            );
        }
    }

    #[test]
    fn mode_rules() {
        for bad in [json!("Retry"), json!("restart"), json!(1), json!(null)] {
            let e = parse(json!({"pipeline_id": 1, "stage_index": 0, "mode": bad})).unwrap_err();
            assert!(e.reason.contains("field `mode`"), "{}", e.reason);
            assert_eq!(e.mode, None, "an invalid mode is not echoed");
            assert_eq!(e.pipeline_id, Some(1), "valid fields are kept");
        }
    }

    #[test]
    fn source_rules() {
        let r = reason(json!({"pipeline_id": 1, "stage_index": 0, "source": "rollback::true"}));
        assert!(
            r.contains("field `source`: expected no source with mode \"retry\""),
            "{r}"
        );
        let r = reason(
            json!({"pipeline_id": 1, "stage_index": 0, "mode": "rollback", "source": "rollback::false"}),
        );
        assert!(
            r.contains("field `source`: expected \"rollback::true\""),
            "{r}"
        );
    }

    #[test]
    fn idempotency_key_rules() {
        let long = "k".repeat(256);
        for bad in [
            json!(""),
            json!("has space"),
            json!("tab\t"),
            json!("é"),
            json!(long),
            json!(7),
        ] {
            let r = reason(json!({"pipeline_id": 1, "stage_index": 0, "idempotency_key": bad}));
            assert!(r.contains("field `idempotency_key`"), "{r}");
        }
        let max = "~".repeat(255);
        assert!(parse(json!({"pipeline_id": 1, "stage_index": 0, "idempotency_key": max})).is_ok());
    }

    #[test]
    fn campaign_id_counts_characters_not_bytes() {
        let ok = "é".repeat(128);
        assert!(parse(json!({"pipeline_id": 1, "stage_index": 0, "campaign_id": ok})).is_ok());
        for bad in [json!(""), json!("é".repeat(129)), json!(5)] {
            let r = reason(json!({"pipeline_id": 1, "stage_index": 0, "campaign_id": bad}));
            assert!(r.contains("field `campaign_id`"), "{r}");
        }
    }

    #[test]
    fn not_after_must_be_rfc3339() {
        for bad in [
            json!("tomorrow"),
            json!("2026-11-29 06:00:00"),
            json!("2026-11-29x06:00:00Z"),
            json!("2026-11-29_06:00:00Z"),
            json!(1764367200),
        ] {
            let r = reason(json!({"pipeline_id": 1, "stage_index": 0, "not_after": bad}));
            assert!(
                r.contains("field `not_after`: expected an RFC 3339 time"),
                "{r}"
            );
        }
    }

    #[test]
    fn not_after_takes_t_either_case_or_a_space() {
        for good in [
            "2026-11-29T06:00:00Z",
            "2026-11-29t06:00:00z",
            "2026-11-29 06:00:00+08:00",
        ] {
            let r = parse(json!({"pipeline_id": 1, "stage_index": 0, "not_after": good}));
            assert!(r.is_ok(), "{good}: {:?}", r.err());
        }
    }

    #[test]
    fn not_after_at_the_ends_of_rfc3339_compares_with_now_and_prints() {
        // What the worker does with it: compare with the time it took the request, and write
        // the deadline in the `expired` message. Offsets push these past year 9999 and before 0.
        let now = OffsetDateTime::now_utc();
        for (text, passed) in [
            ("9999-12-31T23:59:59.999999999-23:59", false),
            ("9999-12-31T23:59:59Z", false),
            ("0000-01-01T00:00:00+23:59", true),
            ("0000-01-01T00:00:00Z", true),
        ] {
            let r = parse(json!({"pipeline_id": 1, "stage_index": 0, "not_after": text}));
            let deadline = r.unwrap().not_after.unwrap();
            assert_eq!(deadline < now, passed, "{text}");
            let written = deadline.format(&Rfc3339).unwrap_or_default();
            assert!(written.len() <= 40, "{text}: {written}");
        }
    }

    #[test]
    fn metadata_is_kept_as_written() {
        let body = r#"{"pipeline_id": 1, "stage_index": 0, "metadata": {"z": 1.50, "a": [2E3, 18446744073709551616], "t": "x\ny"}}"#;
        let r = parse_request(body.as_bytes(), 65536).unwrap();
        assert_eq!(
            r.metadata.unwrap().get(),
            r#"{"z": 1.50, "a": [2E3, 18446744073709551616], "t": "x\ny"}"#
        );
    }

    #[test]
    fn metadata_that_json_parsers_cannot_read_is_refused() {
        for bad in [r#"{"n": 1e400}"#, r#"{"s": "\ud800"}"#] {
            let body = format!(r#"{{"pipeline_id": 1, "stage_index": 0, "metadata": {bad}}}"#);
            let e = parse_request(body.as_bytes(), 65536).unwrap_err();
            assert!(
                e.reason
                    .starts_with("field `metadata`: expected a JSON object any JSON parser reads"),
                "{bad}: {}",
                e.reason
            );
            assert_eq!(e.pipeline_id, Some(1));
        }
        for (bad, got) in [("[1e400]", "an array"), ("1e400", "a number")] {
            let body = format!(r#"{{"pipeline_id": 1, "stage_index": 0, "metadata": {bad}}}"#);
            let e = parse_request(body.as_bytes(), 65536).unwrap_err();
            assert!(
                e.reason.contains(&format!(
                    "field `metadata`: expected a JSON object, got {got}"
                )),
                "{bad}: {}",
                e.reason
            );
        }
    }

    #[test]
    fn metadata_line_breaks_become_spaces() {
        let body = "{\"pipeline_id\": 1, \"stage_index\": 0, \"metadata\": {\r\n  \"b\": 1,\n  \"a\": \"x\"\n}}";
        let r = parse_request(body.as_bytes(), 65536).unwrap();
        assert_eq!(r.metadata.unwrap().get(), r#"{    "b": 1,   "a": "x" }"#);
    }

    #[test]
    fn metadata_nested_too_deep_names_the_limit() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let body =
            format!(r#"{{"pipeline_id":1,"stage_index":0,"metadata":{{"d":{deep},"s":"[[[["}}}}"#);
        let e = parse_request(body.as_bytes(), 1 << 20).unwrap_err();
        assert!(
            e.reason.contains(
                "field `metadata`: expected a JSON object nested at most 126 levels deep"
            ),
            "{}",
            e.reason
        );
        assert_eq!(e.pipeline_id, Some(1), "the valid fields are kept");
        let fine = format!(
            r#"{{"pipeline_id":1,"stage_index":0,"metadata":{{"d":{}{},"s":"{}"}}}}"#,
            "[".repeat(125),
            "]".repeat(125),
            "[".repeat(300)
        );
        let metadata = parse_request(fine.as_bytes(), 1 << 20)
            .expect("brackets in strings do not count")
            .metadata
            .unwrap();
        let echoed = format!(r#"{{"metadata":{}}}"#, metadata.get());
        assert!(
            serde_json::from_str::<Value>(&echoed).is_ok(),
            "the deepest accepted metadata still parses inside an outcome"
        );
        let one_deeper = fine.replacen("[", "[[", 1).replacen("]", "]]", 1);
        assert!(parse_request(one_deeper.as_bytes(), 1 << 20).is_err());
    }

    #[test]
    fn metadata_must_be_an_object() {
        for bad in [json!([1]), json!("x"), json!(null)] {
            let r = reason(json!({"pipeline_id": 1, "stage_index": 0, "metadata": bad}));
            assert!(
                r.contains("field `metadata`: expected a JSON object"),
                "{r}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_an_error() {
        let e = parse(json!({"pipeline_id": 1, "stage_index": 0, "mdoe": "rollback"})).unwrap_err();
        assert!(
            e.reason.contains("field \"mdoe\": unknown field"),
            "{}",
            e.reason
        );
        assert_eq!(e.mode, Some(Mode::Retry));
    }

    #[test]
    fn repeated_fields_are_an_error() {
        let body = br#"{"pipeline_id": 1, "stage_index": 0, "mode": "retry", "mode": "rollback"}"#;
        let e = parse_request(body, 65536).unwrap_err();
        assert!(
            e.reason.contains("field `mode`: appears more than once"),
            "{}",
            e.reason
        );
    }

    #[test]
    fn an_oversized_body_keeps_its_own_valid_key() {
        let padding = "a".repeat(200);
        let body = |key: Value| {
            json!({"pipeline_id": 1, "metadata": {"x": padding, "k": "not this"}, "idempotency_key": key, "stage_index": 0})
                .to_string()
        };
        let key_of = |body: String| {
            parse_request(body.as_bytes(), 64)
                .unwrap_err()
                .idempotency_key
        };
        assert_eq!(key_of(body(json!("big-1"))), Some("big-1".to_owned()));
        assert_eq!(
            key_of(body(json!("has space"))),
            None,
            "an invalid key is not used"
        );
        assert_eq!(key_of(body(json!(7))), None);
        assert_eq!(key_of(format!("[{padding:?}]")), None, "not an object");
    }

    #[test]
    fn body_level_errors() {
        let big = format!(
            r#"{{"pipeline_id": 1, "stage_index": 0, "metadata": {{"x": "{}"}}}}"#,
            "a".repeat(100)
        );
        let e = parse_request(big.as_bytes(), 64).unwrap_err();
        assert!(
            e.reason.starts_with("body: expected at most 64 bytes"),
            "{}",
            e.reason
        );
        assert!(parse_request(&[0xff, 0xfe], 64)
            .unwrap_err()
            .reason
            .contains("UTF-8"));
        assert!(parse_request(b"{\"pipeline_id\": 1,", 64)
            .unwrap_err()
            .reason
            .contains("truncated JSON"));
        assert!(parse_request(b"[1,2]", 64)
            .unwrap_err()
            .reason
            .contains("not an object"));
        assert!(parse_request(b"", 64)
            .unwrap_err()
            .reason
            .starts_with("body:"));
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        let deep = format!(r#"{{"pipeline_id":1,"stage_index":0,"campaign_id":{deep}}}"#);
        assert!(parse_request(deep.as_bytes(), 1 << 20)
            .unwrap_err()
            .reason
            .starts_with("body:"));
    }

    #[test]
    fn reasons_are_one_line_and_list_every_bad_field() {
        let e = parse(json!({"pipeline_id": "x\ny", "stage_index": -1, "extra": 1})).unwrap_err();
        assert!(!e.reason.contains('\n'), "{}", e.reason);
        assert!(
            e.reason.contains("pipeline_id")
                && e.reason.contains("stage_index")
                && e.reason.contains("extra")
        );
    }

    #[test]
    fn key_derivation_order() {
        let body = br#"{"pipeline_id":1,"stage_index":0}"#;
        assert_eq!(derive_key(Some("field"), Some("mid"), body), "field");
        assert_eq!(derive_key(None, Some("mid"), body), "mid");
        assert_eq!(derive_key(None, Some(""), body), body_key(body));
        // A message_id that cannot travel as the Idempotency-Key header is hashed: one key per
        // id, never the body's, and always a valid key.
        let unusable = ["job-\u{e9}", "job 1", "job 2", &"m".repeat(256)];
        let keys: Vec<String> = unusable
            .iter()
            .map(|id| derive_key(None, Some(id), body))
            .collect();
        for (id, key) in unusable.iter().zip(&keys) {
            assert_eq!(key, &message_id_key(id));
            assert!(valid_key(key) && key != &body_key(body), "{key}");
        }
        let distinct: std::collections::HashSet<&String> = keys.iter().collect();
        assert_eq!(
            distinct.len(),
            unusable.len(),
            "different ids, different keys"
        );
        assert_eq!(derive_key(Some("field"), Some("job 1"), body), "field");
        assert_eq!(
            derive_key(None, Some(&"m".repeat(255)), body),
            "m".repeat(255)
        );
        // UUIDv5(URL namespace, b"hello"), computed with Python's uuid.uuid5(NAMESPACE_URL, "hello").
        assert_eq!(
            body_key(b"hello"),
            uuid::Uuid::new_v5(
                &uuid::Uuid::parse_str("6ba7b811-9dad-11d1-80b4-00c04fd430c8").unwrap(),
                b"hello"
            )
            .to_string()
        );
        assert_eq!(body_key(b"hello"), "074171de-bc84-5ea4-b636-1135477620e1");
        assert_ne!(
            body_key(b"hello"),
            body_key(b"hello "),
            "the exact bytes count"
        );
    }
}
