//! Counting a campaign's outcomes: a private queue bound to the results exchange, a tally by
//! status and error kind, the summary table, and `failures.jsonl`.
//!
//! Only outcomes whose `campaign_id` is the campaign's count (and, when the keys are known,
//! only those keys); each key counts once. Outcomes with `replayed: true` count like any other:
//! a re-submitted finished campaign is answered by replays. This module never acks requests
//! and never changes the broker's state beyond its own auto-deleted queue.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};

use super::progress::{Meter, ProgressMode};
use super::{bounded, open_channel, CampaignError};
use crate::config::{AmqpConfig, Config};
use crate::outcome::{Outcome, Status};
use crate::request::Metadata;

/// The statuses in the order the bars and the table show them.
const STATUSES: [Status; 3] = [Status::Succeeded, Status::Failed, Status::Rejected];

/// How many outcomes the broker hands the watcher before it acks them: the watcher's memory is
/// bounded by this, not by how many outcomes the exchange carries; the rest wait in its queue.
pub const WATCH_PREFETCH: u16 = 256;

/// A queue of our own on the results exchange, consuming from the moment it is bound.
pub struct Watcher {
    /// Kept so the queue lives as long as the watcher (it is exclusive to this channel).
    _channel: Channel,
    /// Every outcome published after the bind.
    consumer: Consumer,
    /// Longest wait for one ack (`amqp.confirm_timeout`).
    limit: Duration,
    /// The server-named queue, for operators' tools and tests.
    queue: String,
}

impl Watcher {
    /// Declares a server-named, exclusive, auto-deleted queue bound with `#` to the results
    /// exchange, and starts consuming it with [`WATCH_PREFETCH`] unacked deliveries at most.
    /// Bind it before publishing, or outcomes can be missed.
    pub async fn bind(
        connection: &Connection,
        amqp: &AmqpConfig,
        limit: Duration,
    ) -> Result<Watcher, CampaignError> {
        let channel = bounded(limit, "channel.open", connection.create_channel()).await?;
        let queue = bounded(
            limit,
            "queue.declare (outcome watcher)",
            channel.queue_declare(
                "".into(),
                QueueDeclareOptions {
                    // Ours alone, and gone with the connection: a watcher leaves nothing behind.
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        bounded(
            limit,
            "queue.bind (outcome watcher)",
            channel.queue_bind(
                queue.name().clone(),
                amqp.results_exchange.as_str().into(),
                // Every mode and status: the campaign filter is applied to the body.
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        bounded(
            limit,
            "basic.qos (outcome watcher)",
            channel.basic_qos(WATCH_PREFETCH, BasicQosOptions::default()),
        )
        .await?;
        let consumer = bounded(
            limit,
            "basic.consume (outcome watcher)",
            channel.basic_consume(
                queue.name().clone(),
                "".into(),
                // Manual acks, so the prefetch bounds what is buffered here. Each outcome is
                // acked as soon as it is counted: none is held long enough to meet the broker's
                // consumer timeout, however long the campaign runs.
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(Watcher {
            _channel: channel,
            consumer,
            limit,
            queue: queue.name().to_string(),
        })
    }

    /// The watcher's own queue (server-named, exclusive to its connection).
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Counts matching outcomes until `expect` keys have one, `timeout` passes, or `stop`
    /// resolves (Ctrl-C), whichever comes first. Without `expect` and `timeout` it counts
    /// until `stop`.
    pub async fn collect(
        self,
        filter: &OutcomeFilter,
        expect: Option<usize>,
        timeout: Option<Duration>,
        mode: ProgressMode,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<CampaignSummary, CampaignError> {
        self.collect_after(filter, expect, timeout, mode, stop, async { true })
            .await
    }

    /// [`Watcher::collect`], counting from now while something else (publishing) runs: the
    /// progress meter and `timeout` start when `started` resolves to `true`. When it resolves
    /// to `false` (publishing failed or was interrupted) counting stops at once; the caller
    /// reports why. Reading while publishing keeps outcomes flowing through the watcher's
    /// prefetch instead of piling up unacked.
    pub async fn collect_after(
        mut self,
        filter: &OutcomeFilter,
        expect: Option<usize>,
        timeout: Option<Duration>,
        mode: ProgressMode,
        stop: impl std::future::Future<Output = ()>,
        started: impl std::future::Future<Output = bool>,
    ) -> Result<CampaignSummary, CampaignError> {
        let mut summary = CampaignSummary::new(&filter.campaign, expect);
        let names = STATUSES.map(Status::as_str);
        let show = |summary: &CampaignSummary| {
            let meter = Meter::new(mode, "outcomes", &names, expect.map(|n| n as u64));
            for (index, status) in STATUSES.iter().enumerate() {
                meter.inc(index, summary.count(*status) as u64);
            }
            meter
        };
        let mut meter = None;
        let mut waiting = true;
        let expired = tokio::time::sleep(Duration::ZERO);
        let mut armed = false;
        tokio::pin!(stop, expired, started);
        while expect.is_none_or(|n| summary.received < n) {
            let delivery = tokio::select! {
                ok = &mut started, if waiting => {
                    waiting = false;
                    if !ok {
                        break;
                    }
                    meter = Some(show(&summary));
                    if let Some(limit) = timeout {
                        expired.as_mut().reset(crate::deadline::after(tokio::time::Instant::now(), limit));
                        armed = true;
                    }
                    continue;
                }
                _ = &mut stop => {
                    summary.interrupted = true;
                    break;
                }
                _ = &mut expired, if armed => {
                    summary.timed_out = timeout;
                    break;
                }
                delivery = self.consumer.next() => delivery,
            };
            let delivery = match delivery {
                Some(Ok(delivery)) => delivery,
                Some(Err(source)) => {
                    return Err(CampaignError::Broker {
                        step: "receiving outcomes",
                        source,
                    })
                }
                None => return Err(CampaignError::WatcherClosed),
            };
            bounded(
                self.limit,
                "basic.ack (outcome watcher)",
                delivery.acker.ack(BasicAckOptions::default()),
            )
            .await?;
            count(&mut summary, &delivery.data, filter, meter.as_ref());
        }
        // Every outcome came before publishing ended: show the count once it has.
        if waiting && !summary.interrupted && started.await {
            meter = Some(show(&summary));
        }
        if let Some(meter) = meter {
            meter.finish();
        }
        Ok(summary)
    }
}

/// Which outcomes belong to the campaign being watched.
#[derive(Clone, Debug)]
pub struct OutcomeFilter {
    /// The outcome's `campaign_id` must be this.
    pub campaign: String,
    /// When known (`submit --wait`), the outcome's key must be one of these.
    pub keys: Option<HashSet<String>>,
}

/// Counts one outcome's `data` in `summary` (and on `meter`) when it is an outcome of the
/// campaign `filter` names, and not a second answer of the same job.
fn count(
    summary: &mut CampaignSummary,
    data: &[u8],
    filter: &OutcomeFilter,
    meter: Option<&Meter>,
) {
    let Ok(outcome) = serde_json::from_slice::<Outcome>(data) else {
        // Not a contract outcome (another publisher on the exchange): not ours to count.
        return;
    };
    if !filter.matches(&outcome) {
        return;
    }
    if summary.received_keys.contains(&outcome.idempotency_key) {
        // The same job answered twice (a redelivered request): one job, one count.
        summary.duplicates += 1;
        return;
    }
    let index = STATUSES
        .iter()
        .position(|s| *s == outcome.status)
        .expect("every status is listed");
    if let Some(meter) = meter {
        meter.inc(index, 1);
    }
    summary.add(outcome);
}

impl OutcomeFilter {
    fn matches(&self, outcome: &Outcome) -> bool {
        outcome.campaign_id.as_deref() == Some(self.campaign.as_str())
            && self
                .keys
                .as_ref()
                .is_none_or(|keys| keys.contains(&outcome.idempotency_key))
    }
}

/// The tally of a campaign's outcomes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CampaignSummary {
    /// The campaign counted.
    pub campaign: String,
    /// How many outcomes were expected, when known.
    pub expected: Option<usize>,
    /// Distinct keys with an outcome.
    pub received: usize,
    /// Count per status (`succeeded`, `failed`, `rejected`).
    pub by_status: BTreeMap<&'static str, usize>,
    /// Count per error kind, for failed and rejected outcomes.
    pub by_kind: BTreeMap<&'static str, usize>,
    /// Outcomes replayed from the idempotency store (SWR not called again).
    pub replayed: usize,
    /// Second and later outcomes for a key already counted (not in the other counts).
    pub duplicates: usize,
    /// `duration_ms` of every counted outcome, for the percentiles.
    pub durations_ms: Vec<u64>,
    /// Every failed or rejected outcome, in arrival order, for `failures.jsonl`.
    pub failures: Vec<Outcome>,
    /// The keys counted, so the lines whose outcome never came can be told (submit --wait).
    pub received_keys: HashSet<String>,
    /// Set when the wait ended at `--timeout` (the limit), with outcomes possibly missing.
    pub timed_out: Option<Duration>,
    /// Set when the wait was interrupted (Ctrl-C).
    pub interrupted: bool,
}

impl CampaignSummary {
    /// An empty tally.
    pub fn new(campaign: &str, expected: Option<usize>) -> CampaignSummary {
        CampaignSummary {
            campaign: campaign.to_owned(),
            expected,
            ..CampaignSummary::default()
        }
    }

    /// Counts one outcome (the caller has already checked campaign and key).
    pub fn add(&mut self, outcome: Outcome) {
        self.received += 1;
        self.received_keys.insert(outcome.idempotency_key.clone());
        *self.by_status.entry(outcome.status.as_str()).or_default() += 1;
        if let Some(error) = &outcome.error {
            *self.by_kind.entry(error.kind.as_str()).or_default() += 1;
        }
        if outcome.replayed {
            self.replayed += 1;
        }
        self.durations_ms.push(outcome.duration_ms);
        if outcome.status != Status::Succeeded {
            self.failures.push(outcome);
        }
    }

    /// Outcomes with this status.
    pub fn count(&self, status: Status) -> usize {
        self.by_status.get(status.as_str()).copied().unwrap_or(0)
    }

    /// Expected outcomes that did not arrive (0 when nothing was expected).
    pub fn missing(&self) -> usize {
        self.expected.map_or(0, |n| n.saturating_sub(self.received))
    }

    /// True when there is something for `failures.jsonl`.
    pub fn has_failures(&self) -> bool {
        !self.failures.is_empty()
    }

    /// Exit code 0 material: nothing failed, nothing rejected, nothing missing.
    pub fn all_succeeded(&self) -> bool {
        self.failures.is_empty() && self.missing() == 0
    }

    /// The nearest-rank percentile of the durations (`q` in 0..=1), `None` with no outcomes.
    pub fn duration_percentile(&self, q: f64) -> Option<u64> {
        let mut sorted = self.durations_ms.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return None;
        }
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        Some(sorted[rank - 1])
    }

    /// The summary table people act on.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let expected = self.expected.map_or(String::new(), |n| format!(" of {n}"));
        let _ = writeln!(
            out,
            "campaign {}: {}{expected} outcome(s)",
            self.campaign, self.received
        );
        let _ = writeln!(out, "  {:<28}{:>8}", "status", "count");
        for status in STATUSES {
            let _ = writeln!(out, "  {:<28}{:>8}", status.as_str(), self.count(status));
        }
        if !self.by_kind.is_empty() {
            let _ = writeln!(out, "  {:<28}{:>8}", "error kind", "count");
            for (kind, n) in &self.by_kind {
                let _ = writeln!(out, "  {kind:<28}{n:>8}");
            }
        }
        let _ = writeln!(
            out,
            "  {:<28}{:>8}",
            "replayed (SWR not called)", self.replayed
        );
        match (
            self.duration_percentile(0.5),
            self.duration_percentile(0.95),
            self.durations_ms.iter().max(),
        ) {
            (Some(p50), Some(p95), Some(max)) => {
                let _ = writeln!(
                    out,
                    "  {:<28}p50 {p50}, p95 {p95}, max {max}",
                    "duration ms"
                );
            }
            _ => {
                let _ = writeln!(out, "  {:<28}(no outcomes)", "duration ms");
            }
        }
        if self.duplicates > 0 {
            let _ = writeln!(
                out,
                "  {:<28}{:>8}",
                "repeated outcomes (ignored)", self.duplicates
            );
        }
        if self.missing() > 0 {
            let why = match (self.timed_out, self.interrupted) {
                (Some(limit), _) => {
                    format!("timed out after {}", humantime::format_duration(limit))
                }
                (None, true) => "interrupted".to_owned(),
                (None, false) => "stopped".to_owned(),
            };
            let _ = writeln!(
                out,
                "  no outcome yet: {} ({why}; still queued or running? `watch --campaign {} --expect {}` counts again from now)",
                self.missing(),
                self.campaign,
                self.missing()
            );
        }
        out.pop();
        out
    }
}

/// What was written to the failures file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failures {
    /// Lines written (failed and rejected requests, and those with no outcome).
    pub written: usize,
    /// Of these, lines whose outcome had not arrived when the count ended.
    pub unanswered: usize,
    /// Of these, lines rebuilt from the outcome because the input line was not known.
    pub reconstructed: usize,
    /// Failed or rejected outcomes with no pipeline_id/stage_index to rebuild a request from.
    pub skipped: usize,
}

impl Failures {
    /// One line for the operator.
    pub fn describe(&self, path: &Path) -> String {
        let mut text = format!(
            "{}: {} failed or rejected request(s), one per line, ready to fix and submit again",
            path.display(),
            self.written
        );
        if self.unanswered > 0 {
            let _ = write!(
                text,
                " ({} of them had no outcome yet: submitting them again runs each at most once)",
                self.unanswered
            );
        }
        if self.reconstructed > 0 {
            let _ = write!(
                text,
                " ({} rebuilt from outcomes: pipeline_id, stage_index, mode, campaign_id, metadata)",
                self.reconstructed
            );
        }
        if self.skipped > 0 {
            let _ = write!(
                text,
                "; {} rejected outcome(s) had no valid pipeline_id/stage_index and are not in it (see the dead-letter queue)",
                self.skipped
            );
        }
        text
    }
}

/// Writes every failed or rejected request to `path`, one per line. With `originals`
/// (idempotency key → input line number and text, known to `submit --wait`) each line is the
/// input line exactly, in input order; without it (`watch`) the request is rebuilt from the
/// outcome: `pipeline_id`, `stage_index`, `mode`, `campaign_id`, `metadata`.
pub fn write_failures(
    path: &Path,
    summary: &CampaignSummary,
    originals: Option<&HashMap<String, (usize, String)>>,
) -> std::io::Result<Failures> {
    let mut lines: Vec<(usize, String)> = Vec::with_capacity(summary.failures.len());
    let mut result = Failures {
        written: 0,
        unanswered: 0,
        reconstructed: 0,
        skipped: 0,
    };
    for outcome in &summary.failures {
        match originals.and_then(|o| o.get(&outcome.idempotency_key)) {
            Some((line, text)) => lines.push((*line, text.clone())),
            None => match reconstruct(outcome) {
                Some(text) => {
                    result.reconstructed += 1;
                    lines.push((usize::MAX, text));
                }
                None => result.skipped += 1,
            },
        }
    }
    // With the input known, the lines that got no outcome did not succeed either.
    for (key, (line, text)) in originals.into_iter().flatten() {
        if !summary.received_keys.contains(key) {
            result.unanswered += 1;
            lines.push((*line, text.clone()));
        }
    }
    // Input order, so the file reads like the input it came from (stable for rebuilt lines).
    lines.sort_by_key(|(line, _)| *line);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (_, text) in &lines {
        file.write_all(text.as_bytes())?;
        file.write_all(b"\n")?;
    }
    file.flush()?;
    result.written = lines.len();
    Ok(result)
}

/// The fields a rebuilt request has, in the order a person would write them.
#[derive(serde::Serialize)]
struct Rebuilt<'a> {
    /// The outcome's pipeline.
    pipeline_id: i64,
    /// The outcome's step.
    stage_index: i64,
    /// The outcome's mode (given or defaulted in the original request).
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'static str>,
    /// The campaign, so the line is accepted by `submit --campaign` of the same campaign.
    #[serde(skip_serializing_if = "Option::is_none")]
    campaign_id: Option<&'a str>,
    /// The request's metadata, echoed verbatim by the worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a Metadata>,
}

/// A request rebuilt from its outcome; `None` when the outcome has no valid step to name.
pub fn reconstruct(outcome: &Outcome) -> Option<String> {
    let rebuilt = Rebuilt {
        pipeline_id: outcome.pipeline_id?,
        stage_index: outcome.stage_index?,
        mode: outcome.mode.map(|m| m.as_str()),
        campaign_id: outcome.campaign_id.as_deref(),
        metadata: outcome.metadata.as_ref(),
    };
    Some(serde_json::to_string(&rebuilt).expect("a rebuilt request always serialises"))
}

/// What `watch` was asked to do.
#[derive(Clone, Debug)]
pub struct WatchPlan {
    /// The campaign whose outcomes count.
    pub campaign: String,
    /// Stop after this many distinct outcomes.
    pub expect: Option<usize>,
    /// Stop after this long.
    pub timeout: Option<Duration>,
    /// Where rebuilt failed and rejected requests are written.
    pub failures: PathBuf,
}

/// What `watch` saw.
#[derive(Debug)]
pub struct WatchResult {
    /// The tally.
    pub summary: CampaignSummary,
    /// What was written to the failures file, when anything failed.
    pub failures: Option<Failures>,
}

/// `swr-stage-worker watch`: counts the campaign's outcomes from now on, then prints the summary
/// and writes the failures file.
pub async fn watch(
    config: &Config,
    plan: &WatchPlan,
    mode: ProgressMode,
    stop: impl std::future::Future<Output = ()>,
) -> Result<WatchResult, CampaignError> {
    super::check_campaign_id(&plan.campaign)?;
    let connection = super::connect(config, "watch").await?;
    let channel = open_channel(&connection, config).await?;
    // The results exchange must exist to bind to; declaring is idempotent and is what the
    // worker does at start anyway.
    super::declare_topology(&channel, &config.amqp, config.amqp.confirm_timeout).await?;
    let watcher = Watcher::bind(&connection, &config.amqp, config.amqp.confirm_timeout).await?;
    eprintln!(
        "watching outcomes of campaign {} on exchange '{}'{}",
        plan.campaign,
        config.amqp.results_exchange,
        match (plan.expect, plan.timeout) {
            (Some(n), _) => format!(" until {n} have arrived"),
            (None, Some(t)) => format!(" for {}", humantime::format_duration(t)),
            (None, None) => " until interrupted (Ctrl-C)".to_owned(),
        }
    );
    let filter = OutcomeFilter {
        campaign: plan.campaign.clone(),
        keys: None,
    };
    let summary = watcher
        .collect(&filter, plan.expect, plan.timeout, mode, stop)
        .await?;
    println!("{}", summary.render());
    let failures = if summary.has_failures() {
        let written = write_failures(&plan.failures, &summary, None).map_err(|source| {
            CampaignError::Failures {
                path: plan.failures.clone(),
                source,
            }
        })?;
        println!("{}", written.describe(&plan.failures));
        Some(written)
    } else {
        None
    };
    let _ = tokio::time::timeout(
        config.amqp.confirm_timeout,
        connection.close(200, "watch done".into()),
    )
    .await;
    Ok(WatchResult { summary, failures })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{ErrorKind, OutcomeError};
    use crate::request::Mode;

    fn outcome(key: &str, status: Status, kind: Option<ErrorKind>, ms: u64) -> Outcome {
        Outcome {
            idempotency_key: key.into(),
            pipeline_id: Some(7),
            stage_index: Some(1),
            mode: Some(Mode::Rollback),
            status,
            http_status: None,
            attempts: 1,
            replayed: false,
            error: kind.map(|kind| OutcomeError {
                kind,
                message: "m".into(),
                retryable: false,
                swr_error_code: None,
            }),
            campaign_id: Some("c".into()),
            metadata: None,
            swr_request_id: None,
            started_at: String::new(),
            finished_at: String::new(),
            duration_ms: ms,
            worker: "w".into(),
        }
    }

    #[test]
    fn summary_counts_statuses_kinds_and_percentiles() {
        let mut s = CampaignSummary::new("c", Some(5));
        for ms in 1..=3 {
            s.add(outcome(&format!("k{ms}"), Status::Succeeded, None, ms * 10));
        }
        s.add(outcome(
            "k4",
            Status::Failed,
            Some(ErrorKind::BadRequest),
            100,
        ));
        assert_eq!(s.count(Status::Succeeded), 3);
        assert_eq!(s.by_kind["bad_request"], 1);
        assert_eq!(s.missing(), 1);
        assert!(!s.all_succeeded());
        assert_eq!(s.duration_percentile(0.5), Some(20));
        assert_eq!(s.duration_percentile(0.95), Some(100));
        let table = s.render();
        assert!(
            table.starts_with("campaign c: 4 of 5 outcome(s)"),
            "{table}"
        );
        assert!(
            table.contains(&format!("\n  {:<28}{:>8}\n", "failed", 1)),
            "{table}"
        );
        assert!(table.contains("p50 20, p95 100, max 100"), "{table}");
        assert!(table.contains("no outcome yet: 1"), "{table}");
    }

    #[test]
    fn failures_use_the_input_line_when_known_and_rebuild_otherwise() {
        let mut s = CampaignSummary::new("c", None);
        s.add(outcome("b", Status::Failed, Some(ErrorKind::Forbidden), 1));
        s.add(outcome("a", Status::Rejected, Some(ErrorKind::Expired), 1));
        let mut unknown = outcome("x", Status::Rejected, Some(ErrorKind::InvalidRequest), 1);
        unknown.pipeline_id = None;
        s.add(unknown);
        let dir = std::env::temp_dir().join(format!("swr-failures-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("failures.jsonl");
        let originals: HashMap<String, (usize, String)> = [
            (
                "a".to_owned(),
                (3, "{\"pipeline_id\": 1, \"stage_index\": 0}".to_owned()),
            ),
            (
                "b".to_owned(),
                (9, "{\"pipeline_id\":2,\"stage_index\":0}".to_owned()),
            ),
        ]
        .into();
        let written = write_failures(&path, &s, Some(&originals)).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"pipeline_id\": 1, \"stage_index\": 0}\n{\"pipeline_id\":2,\"stage_index\":0}\n"
        );
        assert_eq!((written.written, written.skipped), (2, 1));
        let written = write_failures(&path, &s, None).unwrap();
        assert_eq!(written.reconstructed, 2);
        let first = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            first.lines().next().unwrap(),
            r#"{"pipeline_id":7,"stage_index":1,"mode":"rollback","campaign_id":"c"}"#
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
