//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) through the queue, SWR and the
//! outcome, so one request can be followed across the automation around the worker.
//!
//! A request whose AMQP headers carry `traceparent` (and `tracestate`) continues that trace: the
//! job is a child span of the sender's, each SWR attempt a child of the job (its `traceparent`
//! goes to SWR), and the outcome carries the job's `traceparent` header. Without a usable header
//! the job starts a new trace. A malformed header is ignored, never an error: a request is not
//! refused for its tracing. The ids appear in the job's log lines (`trace_id`, `span_id`,
//! `parent_span_id`), so logs and traces meet.

/// The `traceparent` header (AMQP headers, HTTP headers).
pub const TRACEPARENT: &str = "traceparent";
/// The `tracestate` header, passed on unchanged.
pub const TRACESTATE: &str = "tracestate";
/// The longest `tracestate` passed on (the W3C limit: 32 members of at most 256 characters
/// would be longer, but vendors are asked to keep it within 512).
pub const MAX_TRACESTATE_CHARS: usize = 512;

/// One span's place in a trace, as `traceparent` and `tracestate` carry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// This span's id: 8 bytes, never all zero.
    pub span_id: [u8; 8],
    /// `trace-flags` (bit 0: sampled).
    pub flags: u8,
    /// `tracestate`, as received.
    pub state: Option<String>,
}

/// Why a `traceparent` was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Not `version-traceid-parentid-flags` with 2, 32, 16 and 2 lowercase hex digits.
    Shape,
    /// Version `ff`, which the specification forbids.
    Version,
    /// A trace id or parent id of all zeros.
    ZeroId,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Malformed::Shape => {
                "expected 00-<32 hex digits>-<16 hex digits>-<2 hex digits>, lowercase"
            }
            Malformed::Version => "version ff is invalid",
            Malformed::ZeroId => "an all-zero trace id or parent id is invalid",
        })
    }
}

impl TraceContext {
    /// Reads `traceparent` (and `tracestate`, kept only when it is printable ASCII of at most
    /// [`MAX_TRACESTATE_CHARS`]). A later version's header is read by its first four fields, as
    /// the specification asks.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<TraceContext, Malformed> {
        let bytes = traceparent.as_bytes();
        if bytes.len() < 55 || bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(Malformed::Shape);
        }
        let version = hex::<1>(&traceparent[..2]).ok_or(Malformed::Shape)?[0];
        if version == 0xff {
            return Err(Malformed::Version);
        }
        // Version 00 is exactly 55 characters; a later one may add fields after a dash.
        if (version == 0 && bytes.len() != 55) || (bytes.len() > 55 && bytes[55] != b'-') {
            return Err(Malformed::Shape);
        }
        let trace_id = hex::<16>(&traceparent[3..35]).ok_or(Malformed::Shape)?;
        let span_id = hex::<8>(&traceparent[36..52]).ok_or(Malformed::Shape)?;
        let flags = hex::<1>(&traceparent[53..55]).ok_or(Malformed::Shape)?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return Err(Malformed::ZeroId);
        }
        let state = tracestate
            .filter(|s| {
                !s.is_empty()
                    && s.len() <= MAX_TRACESTATE_CHARS
                    && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
            })
            .map(str::to_owned);
        Ok(TraceContext {
            trace_id,
            span_id,
            flags,
            state,
        })
    }

    /// A new trace, sampled.
    pub fn root() -> TraceContext {
        TraceContext {
            trace_id: random_id(),
            span_id: random_id(),
            flags: 0x01,
            state: None,
        }
    }

    /// A child span in the same trace: a new span id, the same flags and state.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: random_id(),
            ..self.clone()
        }
    }

    /// The `traceparent` value for this span.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            Hex(&self.trace_id),
            Hex(&self.span_id),
            self.flags
        )
    }

    pub fn trace_id_hex(&self) -> String {
        Hex(&self.trace_id).to_string()
    }

    pub fn span_id_hex(&self) -> String {
        Hex(&self.span_id).to_string()
    }
}

/// A job's trace: its own span, and the sender's span it continues, if the request carried a
/// usable `traceparent`.
#[derive(Clone, Debug)]
pub struct JobTrace {
    /// The job's span (the parent of its SWR attempts; in the outcome's header).
    pub job: TraceContext,
    /// The sender's span id, when the job continues a trace.
    pub parent_span_id: Option<[u8; 8]>,
}

impl JobTrace {
    /// The job's trace from the request's headers: a child of the sender's span, or a new trace
    /// when there is no header or it is malformed (logged at debug, never an error).
    pub fn from_headers(traceparent: Option<&str>, tracestate: Option<&str>) -> JobTrace {
        match traceparent.map(|header| (header, TraceContext::parse(header, tracestate))) {
            Some((_, Ok(sender))) => JobTrace {
                job: sender.child(),
                parent_span_id: Some(sender.span_id),
            },
            Some((header, Err(why))) => {
                tracing::debug!(traceparent = ?crate::outcome::capped(header.to_owned(), 80), reason = %why, "malformed traceparent ignored; the job starts a new trace");
                JobTrace::new()
            }
            None => JobTrace::new(),
        }
    }

    /// A new trace.
    pub fn new() -> JobTrace {
        JobTrace {
            job: TraceContext::root(),
            parent_span_id: None,
        }
    }

    /// The sender's span id in hex, or "" for a new trace.
    pub fn parent_span_id_hex(&self) -> String {
        self.parent().to_string()
    }

    /// The sender's span id for a log field: hex, or nothing for a new trace.
    pub fn parent(&self) -> Hex<'_> {
        Hex(self.parent_span_id.as_ref().map_or(&[], |id| id.as_slice()))
    }
}

impl Default for JobTrace {
    fn default() -> Self {
        JobTrace::new()
    }
}

thread_local! {
    /// Each thread's id generator: SplitMix64, seeded once from the operating system's random
    /// source (a UUIDv4). Ids must be unique, not secret, and a system call per id was a
    /// measurable part of a job's cost.
    static IDS: std::cell::Cell<u64> = std::cell::Cell::new({
        let seed = uuid::Uuid::new_v4().as_u128();
        (seed as u64) ^ ((seed >> 64) as u64)
    });
}

fn next_u64() -> u64 {
    IDS.with(|state| {
        let mut z = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// A random id, never all zero.
pub(crate) fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0u8; N];
        for chunk in id.chunks_mut(8) {
            let bytes = next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        if id != [0u8; N] {
            return id;
        }
    }
}

/// Bytes written as lowercase hex by `Display`, without an allocation (for log fields, which
/// are formatted only when a line is written).
pub struct Hex<'a>(pub &'a [u8]);

impl std::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        let mut len = 0;
        for &b in self.0.iter().take(32) {
            out[len] = DIGITS[usize::from(b >> 4)];
            out[len + 1] = DIGITS[usize::from(b & 0x0f)];
            len += 2;
        }
        f.write_str(std::str::from_utf8(&out[..len]).map_err(|_| std::fmt::Error)?)
    }
}

/// `N` bytes from exactly `2N` lowercase hex digits.
fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let value = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks(2).enumerate() {
        out[i] = value(pair[0])? << 4 | value(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_round_trips() {
        let ctx = TraceContext::parse(EXAMPLE, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(ctx.flags, 1);
        assert_eq!(ctx.state.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(ctx.traceparent(), EXAMPLE);
    }

    #[test]
    fn malformed_headers_are_refused_with_the_reason() {
        let cases = [
            ("", Malformed::Shape),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
                Malformed::Shape,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                Malformed::Shape,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                Malformed::Shape,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Malformed::Shape,
            ),
            (
                "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Malformed::Shape,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Malformed::Version,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                Malformed::ZeroId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                Malformed::ZeroId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
                Malformed::Shape,
            ),
        ];
        for (header, why) in cases {
            assert_eq!(TraceContext::parse(header, None), Err(why), "{header:?}");
        }
        // Multi-byte text of the right length must not panic on a slice boundary.
        let wide = format!("00-{}-00f067aa0ba902b7-01", "é".repeat(16));
        assert_eq!(TraceContext::parse(&wide, None), Err(Malformed::Shape));
    }

    #[test]
    fn a_later_version_is_read_by_its_first_four_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        let ctx = TraceContext::parse(later, None).unwrap();
        assert_eq!(ctx.span_id_hex(), "00f067aa0ba902b7");
        // Written back as the version this worker speaks.
        assert_eq!(ctx.traceparent(), EXAMPLE);
    }

    #[test]
    fn a_tracestate_is_kept_only_when_it_is_printable_and_short() {
        let keep = |state: &str| {
            TraceContext::parse(EXAMPLE, Some(state))
                .unwrap()
                .state
                .is_some()
        };
        assert!(keep("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
        assert!(!keep(""));
        assert!(!keep("a=\u{7}"));
        assert!(!keep(&"a".repeat(MAX_TRACESTATE_CHARS + 1)));
    }

    #[test]
    fn a_job_continues_the_senders_trace_as_its_child() {
        let trace = JobTrace::from_headers(Some(EXAMPLE), None);
        assert_eq!(trace.job.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace.parent_span_id_hex(), "00f067aa0ba902b7");
        assert_ne!(trace.job.span_id_hex(), "00f067aa0ba902b7");
        let attempt = trace.job.child();
        assert_eq!(attempt.trace_id, trace.job.trace_id);
        assert_ne!(attempt.span_id, trace.job.span_id);
    }

    #[test]
    fn without_a_usable_header_a_job_starts_a_new_trace() {
        for header in [
            None,
            Some("garbage"),
            Some("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ] {
            let trace = JobTrace::from_headers(header, Some("congo=t61rcWkgMzE"));
            assert!(trace.parent_span_id.is_none(), "{header:?}");
            assert_ne!(trace.job.trace_id, [0; 16]);
            assert_eq!(trace.job.flags, 1);
            assert!(
                trace.job.state.is_none(),
                "a state without its parent is dropped"
            );
            assert!(TraceContext::parse(&trace.job.traceparent(), None).is_ok());
        }
        assert_ne!(JobTrace::new().job.trace_id, JobTrace::new().job.trace_id);
    }

    #[test]
    fn ids_do_not_repeat_within_a_thread_or_across_threads() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(random_id::<8>()));
        }
        let other =
            std::thread::spawn(|| (0..10_000).map(|_| random_id::<8>()).collect::<Vec<_>>())
                .join()
                .unwrap();
        for id in other {
            assert!(
                seen.insert(id),
                "a span id of another thread repeated one of this thread's"
            );
        }
        assert_eq!(Hex(&[0x00, 0x0f, 0xa5, 0xff]).to_string(), "000fa5ff");
    }
}
