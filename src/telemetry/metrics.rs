//! The worker's Prometheus metrics, kept in atomics and rendered in the text exposition format.
//!
//! Every label has a bounded set of values (modes, statuses, error kinds, HTTP status codes,
//! token-refresh results): never a pipeline id, a key or a token. Names are part of the contract
//! (docs/contract.md, "Metrics").

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::amqp::reply_to::Refusal;
use crate::outcome::{ErrorKind, Status};
use crate::request::Mode;

/// Histogram bucket bounds in seconds (SWR calls and whole jobs).
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A Prometheus histogram with fixed buckets.
pub struct Histogram {
    /// Count per bucket (not cumulative; summed when rendered).
    buckets: [AtomicU64; BUCKETS.len()],
    /// Observations above the last bound.
    overflow: AtomicU64,
    /// Sum of observations in microseconds.
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            overflow: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        match BUCKETS.iter().position(|b| seconds <= *b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.overflow.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_micros.fetch_add(
            u64::try_from(value.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.overflow.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// Every metric of one worker.
#[derive(Default)]
pub struct Metrics {
    /// Finished jobs by (mode, status).
    jobs: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Job errors by kind.
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// SWR attempts by answer code ("201", "503", "timeout", "transport").
    swr_requests: Mutex<BTreeMap<String, u64>>,
    /// Duration of one SWR attempt.
    pub swr_request_seconds: Histogram,
    /// Delivery to ack.
    pub job_seconds: Histogram,
    /// Attempts beyond the first.
    retries: AtomicU64,
    /// Jobs running now.
    in_flight: AtomicI64,
    /// Outcomes replayed from the idempotency store.
    replayed: AtomicU64,
    /// 1 while a broker session is consuming.
    broker_connected: AtomicI64,
    /// Attempts to open a broker session (each tries the nodes of `amqp.url` in turn), by
    /// result ("ok", "failed").
    broker_connects: Mutex<BTreeMap<&'static str, u64>>,
    /// 1 while the circuit breaker holds deliveries back.
    circuit_open: AtomicI64,
    /// Token refreshes by result ("ok", "error").
    token_refresh: Mutex<BTreeMap<&'static str, u64>>,
    /// Jobs that panicked (a bug): their deliveries were requeued, their keys released.
    job_panics: AtomicU64,
    /// Requests whose `reply_to` was not honoured, by reason (the `amqp.reply_to` policy).
    reply_to_refused: Mutex<BTreeMap<&'static str, u64>>,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    *map.lock().expect("metrics lock").entry(key).or_default() += 1;
}

impl Metrics {
    /// A job whose outcome was confirmed (any outcome, replays included).
    pub fn job_finished(&self, mode: Option<Mode>, status: Status, kind: Option<ErrorKind>) {
        bump(
            &self.jobs,
            (mode.map_or("unknown", Mode::as_str), status.as_str()),
        );
        if let Some(kind) = kind {
            bump(&self.errors, kind.as_str());
        }
    }

    /// A delivery settled (acked or requeued): the time since it was taken.
    pub fn job_settled(&self, took: Duration) {
        self.job_seconds.observe(took);
    }

    /// One SWR attempt: its answer code (or "timeout"/"transport") and duration.
    pub fn swr_attempt(&self, code: &str, took: Duration, attempt: u32) {
        bump(&self.swr_requests, code.to_owned());
        self.swr_request_seconds.observe(took);
        if attempt > 1 {
            self.retries.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn replayed(&self) {
        self.replayed.fetch_add(1, Ordering::Relaxed);
    }

    /// +1 when a job starts, -1 when it is settled.
    pub fn in_flight(&self, delta: i64) {
        self.in_flight.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected
            .store(i64::from(connected), Ordering::Relaxed);
    }

    pub fn broker_connected(&self) -> bool {
        self.broker_connected.load(Ordering::Relaxed) == 1
    }

    /// One attempt to open a broker session ended: consuming (`ok`) or not.
    pub fn broker_connect(&self, ok: bool) {
        bump(&self.broker_connects, if ok { "ok" } else { "failed" });
    }

    /// Attempts to open a broker session so far, whatever their result.
    pub fn broker_connects(&self) -> u64 {
        self.broker_connects
            .lock()
            .expect("metrics lock")
            .values()
            .sum()
    }

    pub fn set_circuit_open(&self, open: bool) {
        self.circuit_open.store(i64::from(open), Ordering::Relaxed);
    }

    /// A job panicked; its delivery is requeued.
    pub fn job_panicked(&self) {
        self.job_panics.fetch_add(1, Ordering::Relaxed);
    }

    pub fn token_refresh(&self, ok: bool) {
        bump(&self.token_refresh, if ok { "ok" } else { "error" });
    }

    /// A delivery whose `reply_to` the policy refused.
    pub fn reply_to_refused(&self, reason: Refusal) {
        bump(&self.reply_to_refused, reason.as_str());
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(out, "# HELP swr_stage_jobs_total Finished jobs by mode and status.\n# TYPE swr_stage_jobs_total counter");
        for ((mode, status), n) in self.jobs.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "swr_stage_jobs_total{{mode=\"{mode}\",status=\"{status}\"}} {n}"
            );
        }
        let by = |map: &Mutex<BTreeMap<&'static str, u64>>| -> Vec<(&'static str, u64)> {
            let map = map.lock().expect("metrics lock");
            map.iter().map(|(k, n)| (*k, *n)).collect()
        };
        counters(
            &mut out,
            ("swr_stage_errors_total", "kind"),
            "Jobs that did not succeed, by error kind.",
            by(&self.errors),
        );
        let swr_requests = self.swr_requests.lock().expect("metrics lock").clone();
        counters(
            &mut out,
            ("swr_stage_swr_requests_total", "code"),
            "SWR attempts by HTTP status (or timeout/transport).",
            swr_requests,
        );
        self.swr_request_seconds.render(
            &mut out,
            "swr_stage_swr_request_seconds",
            "Duration of one SWR attempt.",
        );
        self.job_seconds.render(
            &mut out,
            "swr_stage_job_seconds",
            "Time from delivery to ack (or requeue).",
        );
        for (name, kind, help, value) in self.scalars() {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        counters(
            &mut out,
            ("swr_stage_broker_connects_total", "result"),
            "Attempts to open a broker session (each tries the nodes of amqp.url in turn), by result.",
            by(&self.broker_connects),
        );
        let (exported, dropped, failed) = super::otlp::COUNTS.get();
        counters(
            &mut out,
            ("swr_stage_otlp_spans_total", "result"),
            "Spans for OTLP export (telemetry.otlp_endpoint), by result: exported; dropped (the export queue was full, or shutdown came first); failed (the collector refused them or did not answer).",
            [("exported", exported), ("dropped", dropped), ("failed", failed)],
        );
        counters(
            &mut out,
            ("swr_stage_token_refresh_total", "result"),
            "Token refreshes by result.",
            by(&self.token_refresh),
        );
        counters(
            &mut out,
            ("swr_stage_reply_to_refused_total", "reason"),
            "Requests whose reply_to got no copy of the outcome (amqp.reply_to), by reason.",
            by(&self.reply_to_refused),
        );
        out
    }

    /// The unlabelled metrics: name, type, help, value.
    fn scalars(&self) -> [(&'static str, &'static str, &'static str, i64); 6] {
        [
            (
                "swr_stage_retries_total",
                "counter",
                "SWR attempts beyond a job's first.",
                self.retries.load(Ordering::Relaxed) as i64,
            ),
            (
                "swr_stage_in_flight",
                "gauge",
                "Jobs running now.",
                self.in_flight.load(Ordering::Relaxed),
            ),
            (
                "swr_stage_replayed_total",
                "counter",
                "Outcomes replayed from the idempotency store.",
                self.replayed.load(Ordering::Relaxed) as i64,
            ),
            (
                "swr_stage_broker_connected",
                "gauge",
                "1 while connected to the broker and consuming.",
                self.broker_connected.load(Ordering::Relaxed),
            ),
            (
                "swr_stage_circuit_open",
                "gauge",
                "1 while the circuit breaker holds new requests back.",
                self.circuit_open.load(Ordering::Relaxed),
            ),
            (
                "swr_stage_job_panics_total",
                "counter",
                "Jobs that panicked; their requests were requeued.",
                self.job_panics.load(Ordering::Relaxed) as i64,
            ),
        ]
    }
}

/// A counter family with one label: its HELP and TYPE lines, then a line per label value.
fn counters<K: std::fmt::Display>(
    out: &mut String,
    (name, label): (&str, &str),
    help: &str,
    series: impl IntoIterator<Item = (K, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, n) in series {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_bounded_labels() {
        let m = Metrics::default();
        m.job_finished(Some(Mode::Retry), Status::Succeeded, None);
        m.job_finished(None, Status::Rejected, Some(ErrorKind::InvalidRequest));
        m.job_settled(Duration::from_millis(12));
        m.job_settled(Duration::from_millis(1));
        m.swr_attempt("503", Duration::from_millis(3), 1);
        m.swr_attempt("201", Duration::from_millis(4), 2);
        m.replayed();
        m.in_flight(1);
        m.set_broker_connected(true);
        m.broker_connect(false);
        m.broker_connect(false);
        m.broker_connect(true);
        m.token_refresh(true);
        m.job_panicked();
        m.reply_to_refused(Refusal::OwnTopology);
        m.reply_to_refused(Refusal::OwnTopology);
        assert_eq!(m.broker_connects(), 3);
        let text = m.render();
        for line in [
            "swr_stage_jobs_total{mode=\"retry\",status=\"succeeded\"} 1",
            "swr_stage_jobs_total{mode=\"unknown\",status=\"rejected\"} 1",
            "swr_stage_errors_total{kind=\"invalid_request\"} 1",
            "swr_stage_swr_requests_total{code=\"503\"} 1",
            "swr_stage_swr_request_seconds_bucket{le=\"0.005\"} 2",
            "swr_stage_swr_request_seconds_count 2",
            "swr_stage_job_seconds_bucket{le=\"0.025\"} 2",
            "swr_stage_retries_total 1",
            "swr_stage_in_flight 1",
            "swr_stage_replayed_total 1",
            "swr_stage_broker_connected 1",
            "swr_stage_broker_connects_total{result=\"failed\"} 2",
            "swr_stage_broker_connects_total{result=\"ok\"} 1",
            "swr_stage_circuit_open 0",
            "swr_stage_token_refresh_total{result=\"ok\"} 1",
            "swr_stage_job_panics_total 1",
            "swr_stage_reply_to_refused_total{reason=\"own_topology\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_overflow() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_secs(1));
        h.observe(Duration::from_secs(1000));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.005\"} 1\n"));
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"));
        assert!(out.contains("x_bucket{le=\"300\"} 2\n"));
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count 3\n"));
    }
}
