//! Campaign input: JSON Lines, CSV with a header, or one request from flags, turned into
//! validated, keyed, ready-to-publish requests with their line numbers.
//!
//! Validation is [`parse_request`]'s: this module only adapts each line to a request body, adds
//! the campaign and the derived idempotency key, and says where a bad line is. It does no I/O
//! beyond reading the input it is given, and never talks to the broker.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::request::{parse_request, Mode, StageRequest};

/// How the input is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// One request object per line (contract §3).
    JsonLines,
    /// A header `pipeline_id,stage_index[,mode]` (any order), then one row per request.
    Csv,
}

/// Where the requests come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputSource {
    /// A file; `-` is not special here (the CLI maps it to [`InputSource::Stdin`]).
    File(PathBuf),
    /// Standard input, read to the end.
    Stdin,
    /// A single request given as `--pipeline`, `--stage`, `--mode`.
    Flags {
        /// `--pipeline`.
        pipeline_id: i64,
        /// `--stage`.
        stage_index: i64,
        /// `--mode`; `None` means the contract's default, retry.
        mode: Option<Mode>,
    },
}

impl InputSource {
    /// The name used in `name:line:` error prefixes.
    pub fn display_name(&self) -> String {
        match self {
            InputSource::File(path) => path.display().to_string(),
            InputSource::Stdin => "<stdin>".to_owned(),
            InputSource::Flags { .. } => "<flags>".to_owned(),
        }
    }
}

/// Why the input could not be read at all (as opposed to a bad line in it).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read {name}: {source}")]
    Read {
        name: String,
        source: std::io::Error,
    },
    #[error("{name}: no requests in the input")]
    Empty { name: String },
}

/// One line that cannot be sent, with where it is and what was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    /// File name, `<stdin>` or `<flags>`, so the message can be pasted into an editor's jump list.
    pub source: String,
    /// 1-based line number in the input.
    pub line: usize,
    /// `field \`name\`: expected ...` (one or more, `; `-separated), as the validator words it.
    pub reason: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.source, self.line, self.reason)
    }
}

/// A validated request, ready to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct CampaignRequest {
    /// 1-based line in the input, for messages and for `failures.jsonl` order.
    pub line: usize,
    /// The line as written (a CSV row as its JSON Lines equivalent), for `failures.jsonl`.
    pub original: String,
    /// What the worker will parse from `body`, for dry runs and summaries.
    pub request: StageRequest,
    /// The job's idempotency key (the line's own, or derived from campaign + request).
    pub idempotency_key: String,
    /// The AMQP body: the request with `campaign_id` and `idempotency_key` filled in.
    pub body: Vec<u8>,
}

/// Everything read from one input: the good requests, the bad lines, and duplicates dropped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedInput {
    /// Display name of the input, for messages.
    pub source: String,
    /// Valid requests in input order, each key once.
    pub requests: Vec<CampaignRequest>,
    /// Lines that cannot be sent, in input order.
    pub errors: Vec<LineError>,
    /// `(line, first line)` of requests identical to an earlier one: sent once, not twice.
    pub duplicates: Vec<(usize, usize)>,
}

/// The request fields that make up a campaign key, in a fixed order (see [`normalized`]).
#[derive(Serialize)]
struct Normalized<'a> {
    /// The step's pipeline.
    pipeline_id: i64,
    /// The step.
    stage_index: i64,
    /// Always present, so a line without `mode` keys like one with `"mode": "retry"`.
    mode: &'static str,
    /// As given (only `"rollback::true"` is valid), absent when the line has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a Value>,
    /// As given (the original text, not a reformatted time), absent when the line has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    not_after: Option<&'a Value>,
    /// As given, absent when the line has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a Value>,
}

/// The normalized request: a compact JSON object with `pipeline_id`, `stage_index`, `mode`
/// (defaulted to `"retry"`), then `source`, `not_after`, `metadata` as given. `campaign_id` and
/// `idempotency_key` are left out, so the same step asked the same way is the same job whatever
/// else the line carries.
pub fn normalized(request: &StageRequest, fields: &Map<String, Value>) -> String {
    let value = Normalized {
        pipeline_id: request.pipeline_id,
        stage_index: request.stage_index,
        mode: request.mode.as_str(),
        source: fields.get("source"),
        not_after: fields.get("not_after"),
        metadata: fields.get("metadata"),
    };
    serde_json::to_string(&value).expect("a normalized request always serialises")
}

/// The idempotency key of a request in a campaign: UUIDv5 (RFC 4122 URL namespace) of
/// `"{campaign}\n{normalized}"`, lowercase with hyphens. Re-submitting the same campaign gives
/// the same keys, so finished steps are replayed, not re-run.
pub fn campaign_key(campaign: &str, normalized: &str) -> String {
    let name = format!("{campaign}\n{normalized}");
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, name.as_bytes()).to_string()
}

/// A campaign id for a submission that was not given one: sortable by time, unique.
pub fn generated_campaign_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    format!(
        "campaign-{stamp}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Reads and checks one input. `format` `None` means: `.csv` files are CSV, anything else is
/// sniffed (a first non-blank line starting with `{` is JSON Lines, otherwise CSV).
pub fn read_input(
    source: &InputSource,
    format: Option<InputFormat>,
    campaign: &str,
    max_bytes: usize,
) -> Result<ParsedInput, InputError> {
    let name = source.display_name();
    let read_error = |source| InputError::Read {
        name: name.clone(),
        source,
    };
    let (text, format) = match source {
        InputSource::Flags {
            pipeline_id,
            stage_index,
            mode,
        } => {
            // Written as a person would write the line (fixed field order), because it is
            // also what failures.jsonl shows for this request.
            let mode = mode.map_or(String::new(), |m| format!(",\"mode\":\"{m}\""));
            (
                format!("{{\"pipeline_id\":{pipeline_id},\"stage_index\":{stage_index}{mode}}}")
                    .into_bytes(),
                InputFormat::JsonLines,
            )
        }
        InputSource::File(path) => {
            let bytes = std::fs::read(path).map_err(read_error)?;
            let format = format.unwrap_or_else(|| guess_format(Some(path), &bytes));
            (bytes, format)
        }
        InputSource::Stdin => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut bytes)
                .map_err(read_error)?;
            let format = format.unwrap_or_else(|| guess_format(None, &bytes));
            (bytes, format)
        }
    };
    let parsed = parse_input(&name, &text, format, campaign, max_bytes);
    if parsed.requests.is_empty() && parsed.errors.is_empty() {
        return Err(InputError::Empty { name });
    }
    Ok(parsed)
}

/// The format of an input whose format was not given.
pub fn guess_format(path: Option<&Path>, bytes: &[u8]) -> InputFormat {
    let is_csv = path
        .and_then(Path::extension)
        .is_some_and(|ext| ext.eq_ignore_ascii_case("csv"));
    if is_csv {
        return InputFormat::Csv;
    }
    let first = bytes
        .split(|b| *b == b'\n')
        .map(|line| line.trim_ascii())
        .find(|line| !line.is_empty());
    match first {
        Some(line) if !line.starts_with(b"{") => InputFormat::Csv,
        _ => InputFormat::JsonLines,
    }
}

/// Checks every line of an input already in memory. `name` prefixes the error messages.
pub fn parse_input(
    name: &str,
    text: &[u8],
    format: InputFormat,
    campaign: &str,
    max_bytes: usize,
) -> ParsedInput {
    let mut out = ParsedInput {
        source: name.to_owned(),
        ..ParsedInput::default()
    };
    // key -> (first line, normalized), to drop exact repeats and refuse a key reused for another step.
    let mut seen: HashMap<String, (usize, String)> = HashMap::new();
    let mut csv: Option<CsvHeader> = None;
    for (index, raw) in text.split(|b| *b == b'\n').enumerate() {
        let line = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.trim_ascii().is_empty() {
            continue;
        }
        let bad = |reason: String| LineError {
            source: name.to_owned(),
            line,
            reason,
        };
        let original: std::borrow::Cow<'_, [u8]> = match format {
            InputFormat::JsonLines => raw.into(),
            InputFormat::Csv => match &csv {
                None => {
                    match CsvHeader::parse(raw) {
                        Ok(header) => csv = Some(header),
                        Err(reason) => {
                            out.errors.push(bad(reason));
                            // Without a header no row can be read; one error says it all.
                            return out;
                        }
                    }
                    continue;
                }
                Some(header) => match header.row_to_json(raw) {
                    Ok(json) => json.into_bytes().into(),
                    Err(reason) => {
                        out.errors.push(bad(reason));
                        continue;
                    }
                },
            },
        };
        match prepare(&original, campaign, max_bytes) {
            Err(reason) => out.errors.push(bad(reason)),
            Ok((request, normal)) => {
                let key = request.idempotency_key.clone();
                match seen.get(&key) {
                    Some((first, earlier)) if *earlier == normal => {
                        out.duplicates.push((line, *first));
                    }
                    Some((first, _)) => out.errors.push(bad(format!(
                        "field `idempotency_key`: expected a key used for one request only, got {key:?} (line {first} uses it for another request)"
                    ))),
                    None => {
                        seen.insert(key, (line, normal));
                        out.requests.push(CampaignRequest { line, ..request });
                    }
                }
            }
        }
    }
    out
}

/// Validates one JSON line and builds its keyed body; the error is the validator's reason.
fn prepare(
    original: &[u8],
    campaign: &str,
    max_bytes: usize,
) -> Result<(CampaignRequest, String), String> {
    let request = parse_request(original, max_bytes).map_err(|invalid| invalid.reason)?;
    // Valid, so it is a UTF-8 JSON object; read again as a map for the fields kept as given.
    let text = std::str::from_utf8(original).map_err(|e| e.to_string())?;
    let fields: Map<String, Value> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    match &request.campaign_id {
        Some(own) if own != campaign => {
            return Err(format!(
                "field `campaign_id`: expected {campaign:?} (this submission's --campaign) or no campaign_id, got {own:?}"
            ))
        }
        _ => {}
    }
    let normal = normalized(&request, &fields);
    let key = match &request.idempotency_key {
        Some(own) => own.clone(),
        None => campaign_key(campaign, &normal),
    };
    let body = keyed_body(text, &request, campaign, &key);
    if body.len() > max_bytes {
        return Err(format!(
            "body: expected at most {max_bytes} bytes (limits.max_message_bytes) once campaign_id and idempotency_key are added, got {} bytes",
            body.len()
        ));
    }
    let mut request = request;
    request.campaign_id = Some(campaign.to_owned());
    request.idempotency_key = Some(key.clone());
    Ok((
        CampaignRequest {
            line: 0,
            original: text.to_owned(),
            request,
            idempotency_key: key,
            body,
        },
        normal,
    ))
}

/// The line with `campaign_id` and `idempotency_key` appended when missing. The line's own text
/// is kept byte for byte (field order, metadata formatting), so the worker echoes exactly what
/// the operator wrote.
fn keyed_body(text: &str, request: &StageRequest, campaign: &str, key: &str) -> Vec<u8> {
    let trimmed = text.trim_end();
    // A valid request is an object with at least pipeline_id, so it ends with `}` and has a
    // member before it: a `,` always fits.
    let close = trimmed.len() - 1;
    let mut body = String::with_capacity(trimmed.len() + campaign.len() + 80);
    body.push_str(&trimmed[..close]);
    if request.campaign_id.is_none() {
        body.push_str(",\"campaign_id\":");
        body.push_str(&Value::from(campaign).to_string());
    }
    if request.idempotency_key.is_none() {
        body.push_str(",\"idempotency_key\":\"");
        body.push_str(key);
        body.push('"');
    }
    body.push('}');
    body.into_bytes()
}

/// A CSV header: which column holds which field.
struct CsvHeader {
    /// Column index of each named field, in the header's order.
    columns: Vec<&'static str>,
}

/// Fields a CSV row can carry; anything richer (metadata, not_after) needs JSON Lines.
const CSV_FIELDS: [&str; 3] = ["pipeline_id", "stage_index", "mode"];

impl CsvHeader {
    fn parse(raw: &[u8]) -> Result<CsvHeader, String> {
        let text = String::from_utf8_lossy(raw);
        let mut columns = Vec::new();
        for cell in split_csv(&text) {
            let name = cell.trim();
            match CSV_FIELDS.iter().find(|f| **f == name) {
                Some(field) if !columns.contains(field) => columns.push(*field),
                _ => {
                    return Err(format!(
                        "header: expected the columns pipeline_id,stage_index[,mode], got {:?}",
                        text.trim()
                    ))
                }
            }
        }
        if !(columns.contains(&"pipeline_id") && columns.contains(&"stage_index")) {
            return Err(format!(
                "header: expected the columns pipeline_id,stage_index[,mode], got {:?}",
                text.trim()
            ));
        }
        Ok(CsvHeader { columns })
    }

    /// The row as a JSON object in the header's field names; numbers stay numbers, anything
    /// else becomes a string, so the validator words the complaint as for JSON input.
    fn row_to_json(&self, raw: &[u8]) -> Result<String, String> {
        let text = std::str::from_utf8(raw).map_err(|e| {
            format!(
                "row: expected UTF-8 text, got invalid UTF-8 at byte {}",
                e.valid_up_to()
            )
        })?;
        let cells = split_csv(text);
        if cells.len() != self.columns.len() {
            return Err(format!(
                "row: expected {} columns ({}), got {}",
                self.columns.len(),
                self.columns.join(","),
                cells.len()
            ));
        }
        let mut members = Vec::with_capacity(CSV_FIELDS.len());
        // Fixed order (pipeline_id, stage_index, mode), whatever the header's order, so the
        // JSON Lines equivalent in failures.jsonl reads the same for every row.
        for field in CSV_FIELDS {
            let Some(at) = self.columns.iter().position(|c| *c == field) else {
                continue;
            };
            let cell = cells[at].trim();
            if field == "mode" && cell.is_empty() {
                continue;
            }
            let value = match cell.parse::<i64>() {
                Ok(n) if field != "mode" => Value::from(n),
                _ => Value::from(cell),
            };
            members.push(format!("\"{field}\":{value}"));
        }
        Ok(format!("{{{}}}", members.join(",")))
    }
}

/// Splits one CSV line on commas; a cell wrapped in double quotes loses them (`""` inside is a
/// quote). Enough for integers and a mode word; multi-line cells are not supported.
fn split_csv(line: &str) -> Vec<String> {
    let mut cells = Vec::new();
    let mut cell = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cell.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => cells.push(std::mem::take(&mut cell)),
            c => cell.push(c),
        }
    }
    cells.push(cell);
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 65536;

    fn parse(text: &str, format: InputFormat) -> ParsedInput {
        parse_input("in.jsonl", text.as_bytes(), format, "c1", MAX)
    }

    #[test]
    fn key_is_uuidv5_of_campaign_and_normalized_request() {
        let p = parse(
            r#"{"metadata": {"b": 1, "a": 2}, "stage_index": 2, "pipeline_id": 12345}"#,
            InputFormat::JsonLines,
        );
        let r = &p.requests[0];
        let normal =
            r#"{"pipeline_id":12345,"stage_index":2,"mode":"retry","metadata":{"a":2,"b":1}}"#;
        let expected = uuid::Uuid::new_v5(
            &uuid::Uuid::parse_str("6ba7b811-9dad-11d1-80b4-00c04fd430c8").unwrap(),
            format!("c1\n{normal}").as_bytes(),
        )
        .to_string();
        assert_eq!(r.idempotency_key, expected);
        assert_eq!(r.idempotency_key, r.idempotency_key.to_lowercase());
    }

    #[test]
    fn key_ignores_campaign_and_key_fields_and_defaults_mode() {
        let a = parse(
            r#"{"pipeline_id":1,"stage_index":0}"#,
            InputFormat::JsonLines,
        );
        let b = parse(
            r#"{"pipeline_id":1,"stage_index":0,"mode":"retry","campaign_id":"c1"}"#,
            InputFormat::JsonLines,
        );
        let c = parse("pipeline_id,stage_index\n1,0\n", InputFormat::Csv);
        assert_eq!(a.requests[0].idempotency_key, b.requests[0].idempotency_key);
        assert_eq!(a.requests[0].idempotency_key, c.requests[0].idempotency_key);
        let other = parse_input(
            "x",
            br#"{"pipeline_id":1,"stage_index":0}"#,
            InputFormat::JsonLines,
            "c2",
            MAX,
        );
        assert_ne!(
            a.requests[0].idempotency_key,
            other.requests[0].idempotency_key
        );
    }

    #[test]
    fn body_keeps_the_line_and_adds_campaign_and_key() {
        let p = parse(
            r#"{"pipeline_id": 7, "stage_index": 4, "mode": "rollback", "metadata": {"t": "OPS-1"}}  "#,
            InputFormat::JsonLines,
        );
        let r = &p.requests[0];
        let body = String::from_utf8(r.body.clone()).unwrap();
        assert_eq!(
            body,
            format!(
                r#"{{"pipeline_id": 7, "stage_index": 4, "mode": "rollback", "metadata": {{"t": "OPS-1"}},"campaign_id":"c1","idempotency_key":"{}"}}"#,
                r.idempotency_key
            )
        );
        let again = parse_request(&r.body, MAX).unwrap();
        assert_eq!(again.campaign_id.as_deref(), Some("c1"));
        assert_eq!(
            again.idempotency_key.as_deref(),
            Some(r.idempotency_key.as_str())
        );
    }

    #[test]
    fn own_key_and_matching_campaign_are_kept() {
        let p = parse(
            r#"{"pipeline_id":1,"stage_index":0,"idempotency_key":"mine-1","campaign_id":"c1"}"#,
            InputFormat::JsonLines,
        );
        let r = &p.requests[0];
        assert_eq!(r.idempotency_key, "mine-1");
        assert_eq!(r.body, r.original.as_bytes());
    }

    #[test]
    fn another_campaign_id_is_an_error_on_that_line() {
        let p = parse(
            "{\"pipeline_id\":1,\"stage_index\":0}\n{\"pipeline_id\":1,\"stage_index\":1,\"campaign_id\":\"old\"}\n",
            InputFormat::JsonLines,
        );
        assert_eq!(p.requests.len(), 1);
        assert_eq!(
            p.errors[0].to_string(),
            "in.jsonl:2: field `campaign_id`: expected \"c1\" (this submission's --campaign) or no campaign_id, got \"old\""
        );
    }

    #[test]
    fn bad_lines_carry_file_line_field_and_expectation() {
        let p = parse(
            "{\"pipeline_id\":1,\"stage_index\":0}\n\n{\"pipeline_id\":0,\"stage_index\":0}\n{\"pipeline_id\":1,\"stage_index\":0,\"mdoe\":\"rollback\"}\nnot json\n",
            InputFormat::JsonLines,
        );
        let lines: Vec<String> = p.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines[0],
            "in.jsonl:3: field `pipeline_id`: expected an integer 1..=2147483647, got 0"
        );
        assert!(
            lines[1].starts_with("in.jsonl:4: field \"mdoe\": unknown field"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("in.jsonl:5: body: expected a JSON object"),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn repeated_requests_are_sent_once_and_a_reused_key_is_an_error() {
        let p = parse(
            "{\"pipeline_id\":1,\"stage_index\":0}\n{\"stage_index\":0,\"pipeline_id\":1}\n{\"pipeline_id\":2,\"stage_index\":0,\"idempotency_key\":\"k\"}\n{\"pipeline_id\":3,\"stage_index\":0,\"idempotency_key\":\"k\"}\n",
            InputFormat::JsonLines,
        );
        assert_eq!(p.requests.len(), 2);
        assert_eq!(p.duplicates, vec![(2, 1)]);
        assert!(
            p.errors[0].to_string().starts_with(
                "in.jsonl:4: field `idempotency_key`: expected a key used for one request only"
            ),
            "{}",
            p.errors[0]
        );
    }

    #[test]
    fn csv_rows_become_requests_and_bad_cells_are_named() {
        let p = parse(
            "stage_index,pipeline_id,mode\r\n2,12345,rollback\r\n0,\"77\",\n1,abc,retry\n1,2\n3,4,restart\n",
            InputFormat::Csv,
        );
        assert_eq!(p.requests.len(), 2);
        assert_eq!(
            p.requests[0].original,
            r#"{"pipeline_id":12345,"stage_index":2,"mode":"rollback"}"#
        );
        assert_eq!(p.requests[1].request.mode, Mode::Retry);
        let lines: Vec<String> = p.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "in.jsonl:4: field `pipeline_id`: expected an integer 1..=2147483647, got \"abc\"",
                "in.jsonl:5: row: expected 3 columns (stage_index,pipeline_id,mode), got 2",
                "in.jsonl:6: field `mode`: expected \"retry\" or \"rollback\", got \"restart\"",
            ]
        );
    }

    #[test]
    fn csv_needs_a_header() {
        let p = parse("1,2\n3,4\n", InputFormat::Csv);
        assert_eq!(
            p.errors[0].to_string(),
            "in.jsonl:1: header: expected the columns pipeline_id,stage_index[,mode], got \"1,2\""
        );
        assert!(p.requests.is_empty());
    }

    #[test]
    fn format_is_guessed_from_extension_then_content() {
        assert_eq!(
            guess_format(Some(Path::new("a.CSV")), b"{"),
            InputFormat::Csv
        );
        assert_eq!(guess_format(None, b"\n  {\"a\":1}"), InputFormat::JsonLines);
        assert_eq!(
            guess_format(None, b"pipeline_id,stage_index"),
            InputFormat::Csv
        );
    }

    #[test]
    fn flags_make_one_request() {
        let p = read_input(
            &InputSource::Flags {
                pipeline_id: 12345,
                stage_index: 2,
                mode: Some(Mode::Rollback),
            },
            None,
            "c1",
            MAX,
        )
        .unwrap();
        assert_eq!(p.requests.len(), 1);
        assert_eq!(p.requests[0].request.mode, Mode::Rollback);
        assert_eq!(
            p.requests[0].original,
            r#"{"pipeline_id":12345,"stage_index":2,"mode":"rollback"}"#
        );
        assert_eq!(p.source, "<flags>");
    }
}
