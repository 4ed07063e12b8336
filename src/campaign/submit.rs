//! `submit`: validate the whole input, then publish every request with publisher confirms kept
//! in a window (not one round trip per message), optionally paced, and with `--wait` count the
//! campaign's outcomes through a queue bound *before* the first publish.
//!
//! Nothing is published while any line is invalid, unless the caller chose to skip bad lines.
//! A nack, an unroutable message or a missing confirm stops the command, saying how many were
//! confirmed: what was confirmed is safe to submit again (same keys), so a re-run completes it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection};

use super::input::{self, CampaignRequest, InputFormat, InputSource, ParsedInput};
use super::progress::{Meter, ProgressMode};
use super::watch::{self, CampaignSummary, OutcomeFilter, Watcher};
use super::{open_channel, CampaignError, Failures};
use crate::config::Config;
use crate::ratelimit::RateLimiter;
use crate::trace::{TraceContext, TRACEPARENT};

/// Default number of publishes awaiting their confirm at once: large enough to keep the
/// connection and the quorum queue busy (on the 2-core reference machine 1024 gave about 21,000
/// messages/s and 4096 about 25,000), small enough to stay a few hundred KiB of bodies in flight.
/// A failure leaves at most this many in doubt, and re-submitting them is safe (same keys).
pub const DEFAULT_WINDOW: usize = 4096;

/// How to publish.
#[derive(Clone, Debug)]
pub struct PublishOptions {
    /// Most publishes awaiting a confirm at once; the oldest is awaited when it is full.
    pub window: usize,
    /// Messages per second, on a smooth schedule that does not burst after a stall; `None` = no pacing.
    pub rate: Option<f64>,
    /// Longest wait for one publish or confirm (`amqp.confirm_timeout`).
    pub confirm_timeout: Duration,
    /// The campaign's trace: each request gets a child span's `traceparent` header, so the
    /// worker's jobs (and their SWR calls and outcomes) join one trace per campaign.
    pub trace: Option<TraceContext>,
}

/// What a finished publish run did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PublishReport {
    /// Messages the broker confirmed (all of them, when this report is returned).
    pub confirmed: usize,
    /// Wall time from the first publish to the last confirm.
    pub elapsed: Duration,
}

impl PublishReport {
    /// Confirmed messages per second.
    pub fn per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.confirmed as f64 / secs
        } else {
            0.0
        }
    }
}

/// Why publishing stopped before every request was confirmed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker refused the request from line {line} (basic.nack); {confirmed} of {total} requests were confirmed before it")]
    Nacked {
        line: usize,
        confirmed: usize,
        total: usize,
    },
    #[error("queue '{queue}' does not exist, so the request from line {line} was returned unrouted; {confirmed} of {total} requests were confirmed before it")]
    Unroutable {
        queue: String,
        line: usize,
        confirmed: usize,
        total: usize,
    },
    #[error("no publisher confirm for the request from line {line} within {timeout:?} (amqp.confirm_timeout); {confirmed} of {total} requests were confirmed before it")]
    Timeout {
        line: usize,
        timeout: Duration,
        confirmed: usize,
        total: usize,
    },
    #[error("broker error at the request from line {line}: {source}; {confirmed} of {total} requests were confirmed before it")]
    Broker {
        line: usize,
        source: lapin::Error,
        confirmed: usize,
        total: usize,
    },
}

/// Why one publish did not end in a confirmed, routed message.
enum Refused {
    Nacked,
    Unroutable,
    Timeout,
    Broker(lapin::Error),
}

/// Publishes `requests` to the default exchange with routing key `queue`, persistent, JSON,
/// `message_id` = the idempotency key, mandatory (a missing queue is an error, not a silent
/// drop). `channel` must be in confirm mode. `meter` counter 0 counts confirmed messages.
///
/// Up to `window` publishes are in flight: each is started (its frames handed to the
/// connection) as soon as it is due, and when the window is full the oldest is awaited. Results
/// are taken in publish order, so "N confirmed" always means the first N requests.
pub async fn publish_requests(
    channel: &Channel,
    queue: &str,
    requests: &[CampaignRequest],
    options: &PublishOptions,
    meter: &Meter,
) -> Result<PublishReport, PublishError> {
    let total = requests.len();
    let window = options.window.max(1);
    let limit = options.confirm_timeout;
    let started = Instant::now();
    let mut in_flight = FuturesOrdered::new();
    let mut confirmed = 0usize;
    // Counts one result, or turns it into the error that stops the run.
    let mut settle = |(line, result): (usize, Result<(), Refused>)| {
        let error = match result {
            Ok(()) => {
                confirmed += 1;
                meter.inc(0, 1);
                return Ok(());
            }
            Err(Refused::Nacked) => PublishError::Nacked {
                line,
                confirmed,
                total,
            },
            Err(Refused::Unroutable) => PublishError::Unroutable {
                queue: queue.to_owned(),
                line,
                confirmed,
                total,
            },
            Err(Refused::Timeout) => PublishError::Timeout {
                line,
                timeout: limit,
                confirmed,
                total,
            },
            Err(Refused::Broker(source)) => PublishError::Broker {
                line,
                source,
                confirmed,
                total,
            },
        };
        Err(error)
    };
    let pace = options
        .rate
        .map(|rate| RateLimiter::with_catch_up(rate, PACING_SLACK));
    for request in requests {
        if let Some(pace) = &pace {
            pace.until_ready().await;
        }
        while in_flight.len() >= window {
            let oldest = in_flight.next().await.expect("the window is full");
            settle(oldest)?;
        }
        in_flight.push_back(publish_one(
            channel,
            queue,
            request,
            options.trace.as_ref(),
            limit,
        ));
        // Poll once now: that hands this message's frames to the connection at its scheduled
        // time (and in input order), instead of when the window next fills.
        if let Some(Some(done)) = in_flight.next().now_or_never() {
            settle(done)?;
        }
    }
    while let Some(done) = in_flight.next().await {
        settle(done)?;
    }
    Ok(PublishReport {
        confirmed,
        elapsed: started.elapsed(),
    })
}

/// How far behind its schedule a paced run may fall and still catch up; past it (a stalled
/// broker) the schedule starts again from now, so no burst follows the stall.
pub const PACING_SLACK: Duration = Duration::from_millis(100);

/// One publish, to its confirm; both waits bounded by `limit`.
async fn publish_one(
    channel: &Channel,
    queue: &str,
    request: &CampaignRequest,
    trace: Option<&TraceContext>,
    limit: Duration,
) -> (usize, Result<(), Refused>) {
    let mut properties = BasicProperties::default();
    if let Some(campaign) = trace {
        let mut headers = FieldTable::default();
        headers.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString(LongString::from(campaign.child().traceparent())),
        );
        properties = properties.with_headers(headers);
    }
    let properties = properties
        .with_content_type("application/json".into())
        // Persistent: a broker restart must not lose a campaign.
        .with_delivery_mode(2)
        // The key as message_id too, so tools that look at properties see the job.
        .with_message_id(request.idempotency_key.as_str().into());
    let publish = channel.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        },
        &request.body,
        properties,
    );
    let result = async {
        let confirm = match tokio::time::timeout(limit, publish).await {
            Ok(Ok(confirm)) => confirm,
            Ok(Err(source)) => return Err(Refused::Broker(source)),
            Err(_) => return Err(Refused::Timeout),
        };
        match tokio::time::timeout(limit, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) | Ok(Ok(Confirmation::NotRequested)) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(Refused::Unroutable),
            Ok(Ok(Confirmation::Nack(_))) => Err(Refused::Nacked),
            Ok(Err(source)) => Err(Refused::Broker(source)),
            Err(_) => Err(Refused::Timeout),
        }
    }
    .await;
    (request.line, result)
}

/// What `submit` was asked to do (the command line, as data).
#[derive(Clone, Debug)]
pub struct SubmitPlan {
    /// File, stdin, or one request from flags.
    pub input: InputSource,
    /// Forced input format; `None` = by extension, then by content.
    pub format: Option<InputFormat>,
    /// Campaign id; `None` = generate one (and print it).
    pub campaign: Option<String>,
    /// Publish the valid lines even when some are invalid.
    pub skip_invalid: bool,
    /// Validate and print what would be sent; publish nothing.
    pub dry_run: bool,
    /// Pacing in messages per second.
    pub rate: Option<f64>,
    /// Confirm window.
    pub window: usize,
    /// Count the campaign's outcomes after publishing, print the summary, write failures.
    pub wait: bool,
    /// With `wait`: stop waiting after this long.
    pub timeout: Option<Duration>,
    /// With `wait`: where failed and rejected requests are written, in their input form.
    pub failures: PathBuf,
}

impl SubmitPlan {
    /// A plan with the command line's defaults for `input`.
    pub fn new(input: InputSource) -> SubmitPlan {
        SubmitPlan {
            input,
            format: None,
            campaign: None,
            skip_invalid: false,
            dry_run: false,
            rate: None,
            window: DEFAULT_WINDOW,
            wait: false,
            timeout: None,
            failures: PathBuf::from("failures.jsonl"),
        }
    }
}

/// What `submit` did.
#[derive(Debug)]
pub struct SubmitResult {
    /// The campaign id used (given or generated).
    pub campaign: String,
    /// The checked input: requests, bad lines, duplicates.
    pub input: ParsedInput,
    /// The publish run; `None` for a dry run.
    pub published: Option<PublishReport>,
    /// With `wait`: the counted outcomes.
    pub summary: Option<CampaignSummary>,
    /// With `wait` and failures: what was written to the failures file.
    pub failures: Option<Failures>,
}

impl SubmitResult {
    /// True when nothing failed, nothing was rejected and nothing is missing (or not waited for).
    pub fn all_succeeded(&self) -> bool {
        self.summary
            .as_ref()
            .is_none_or(CampaignSummary::all_succeeded)
    }
}

/// `swr-stage-worker submit`: reads the input, then [`submit_parsed`].
pub async fn submit(
    config: &Config,
    plan: &SubmitPlan,
    mode: ProgressMode,
    stop: impl std::future::Future<Output = ()>,
) -> Result<SubmitResult, CampaignError> {
    let campaign = match &plan.campaign {
        Some(id) => {
            super::check_campaign_id(id)?;
            id.clone()
        }
        None => {
            let id = input::generated_campaign_id();
            eprintln!("campaign {id} (generated; pass --campaign {id} to submit to it again)");
            id
        }
    };
    let parsed = input::read_input(
        &plan.input,
        plan.format,
        &campaign,
        config.limits.max_message_bytes,
    )?;
    submit_parsed(config, plan, campaign, parsed, mode, stop).await
}

/// Reports the input's problems, then publishes (unless a dry run) and, with `wait`, counts
/// the outcomes. Lines go to stderr; the dry run's bodies go to stdout.
pub async fn submit_parsed(
    config: &Config,
    plan: &SubmitPlan,
    campaign: String,
    parsed: ParsedInput,
    mode: ProgressMode,
    stop: impl std::future::Future<Output = ()>,
) -> Result<SubmitResult, CampaignError> {
    report_input(&parsed, plan)?;
    let mut result = SubmitResult {
        campaign,
        input: parsed,
        published: None,
        summary: None,
        failures: None,
    };
    if plan.dry_run {
        print_dry_run(config, &result);
        return Ok(result);
    }
    if result.input.requests.is_empty() {
        return Err(CampaignError::NothingToSend {
            invalid: result.input.errors.len(),
        });
    }

    let (connection, channel, watcher) = open(config, plan.wait).await?;
    let total = result.input.requests.len();
    let meter = Meter::new(mode, "submitted", &["submitted"], Some(total as u64));
    let originals: HashMap<String, (usize, String)> = result
        .input
        .requests
        .iter()
        .map(|r| (r.idempotency_key.clone(), (r.line, r.original.clone())))
        .collect();
    let filter = OutcomeFilter {
        campaign: result.campaign.clone(),
        keys: Some(originals.keys().cloned().collect()),
    };
    // Ctrl-C (or SIGTERM) stops a paced campaign between publishes; what was confirmed stays
    // sent, and submitting the same input again sends the rest (the keys de-duplicate).
    let stop = stop.shared();
    let (published_tx, published_rx) = tokio::sync::oneshot::channel();
    let publishing = publish_campaign(
        config,
        plan,
        &channel,
        &result,
        meter,
        stop.clone(),
        published_tx,
    );
    // The outcomes are read while publishing, so they pass through the watcher's bounded
    // prefetch as they come instead of waiting, unacked, for the last publish.
    let counting = async {
        let watcher = watcher?;
        let counting = Counting {
            filter: &filter,
            total,
            timeout: plan.timeout,
            mode,
        };
        Some(count_while_publishing(watcher, counting, stop.clone(), published_rx).await)
    };
    let ((published, confirmed), summary) = tokio::join!(publishing, counting);
    let Some(report) = published else {
        let _ = tokio::time::timeout(
            config.amqp.confirm_timeout,
            connection.close(200, "submit interrupted".into()),
        )
        .await;
        return Err(CampaignError::Interrupted { confirmed, total });
    };
    result.published = Some(report?);
    if let Some(summary) = summary {
        report_outcomes(plan, summary?, &originals, &mut result)?;
    }
    let _ = tokio::time::timeout(
        config.amqp.confirm_timeout,
        connection.close(200, "submit done".into()),
    )
    .await;
    Ok(result)
}

/// The connection, a channel in confirm mode with the topology declared, and with `wait` the
/// outcome watcher, bound before the first publish so that an outcome published a millisecond
/// later is not missed.
async fn open(
    config: &Config,
    wait: bool,
) -> Result<(Connection, Channel, Option<Watcher>), CampaignError> {
    let connection = super::connect(config, "submit").await?;
    let channel = open_channel(&connection, config).await?;
    super::declare_topology(&channel, &config.amqp, config.amqp.confirm_timeout).await?;
    let watcher = if wait {
        Some(Watcher::bind(&connection, &config.amqp, config.amqp.confirm_timeout).await?)
    } else {
        None
    };
    super::bounded(
        config.amqp.confirm_timeout,
        "confirm_select",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok((connection, channel, watcher))
}

/// Says which lines are invalid and which repeat another; refuses invalid lines unless
/// `skip_invalid`.
fn report_input(parsed: &ParsedInput, plan: &SubmitPlan) -> Result<(), CampaignError> {
    for error in &parsed.errors {
        eprintln!("{error}");
    }
    for (line, first) in &parsed.duplicates {
        eprintln!(
            "{}:{line}: same request as line {first}; sent once",
            parsed.source
        );
    }
    if !parsed.errors.is_empty() && !plan.skip_invalid {
        return Err(CampaignError::InvalidLines {
            invalid: parsed.errors.len(),
            valid: parsed.requests.len(),
        });
    }
    Ok(())
}

/// The bodies that would be sent (stdout) and what would happen (stderr).
fn print_dry_run(config: &Config, result: &SubmitResult) {
    for request in &result.input.requests {
        println!("{}", String::from_utf8_lossy(&request.body));
    }
    eprintln!(
        "dry run: {} request(s) would be sent to queue '{}' for campaign {}; {} invalid line(s)",
        result.input.requests.len(),
        config.amqp.request_queue,
        result.campaign,
        result.input.errors.len()
    );
}

/// Publishes the campaign's requests, in one new trace, until done or `stop`, then tells the
/// outcome count through `published` whether every request went out. Returns the report (None:
/// stopped) and how many requests were confirmed.
async fn publish_campaign(
    config: &Config,
    plan: &SubmitPlan,
    channel: &Channel,
    result: &SubmitResult,
    meter: Meter,
    stop: impl std::future::Future<Output = ()>,
    published: tokio::sync::oneshot::Sender<bool>,
) -> (Option<Result<PublishReport, PublishError>>, usize) {
    let trace = TraceContext::root();
    let options = PublishOptions {
        window: plan.window,
        rate: plan.rate,
        confirm_timeout: config.amqp.confirm_timeout,
        trace: Some(trace.clone()),
    };
    let report = tokio::select! {
        report = publish_requests(
            channel,
            &config.amqp.request_queue,
            &result.input.requests,
            &options,
            &meter,
        ) => Some(report),
        () = stop => None,
    };
    let confirmed = meter.done() as usize;
    meter.finish();
    if let Some(Ok(report)) = &report {
        // Said here, before the outcome count shows itself.
        eprintln!(
            "submitted {} request(s) to queue '{}' for campaign {} ({:.0}/s, all confirmed; trace {})",
            report.confirmed,
            config.amqp.request_queue,
            result.campaign,
            report.per_second(),
            trace.trace_id_hex()
        );
    }
    // Tells the outcome count to show itself and start --timeout, or to stop.
    let _ = published.send(matches!(report, Some(Ok(_))));
    (report, confirmed)
}

/// What the outcome count of a submission looks for.
struct Counting<'a> {
    filter: &'a OutcomeFilter,
    /// Outcomes expected: one per request.
    total: usize,
    timeout: Option<Duration>,
    mode: ProgressMode,
}

/// Counts the campaign's outcomes while it is published; the count shows itself once
/// `published` says every request went out.
async fn count_while_publishing(
    watcher: Watcher,
    counting: Counting<'_>,
    stop: impl std::future::Future<Output = ()>,
    published: tokio::sync::oneshot::Receiver<bool>,
) -> Result<CampaignSummary, CampaignError> {
    let publishing_done = std::sync::atomic::AtomicBool::new(false);
    let counted = watcher
        .collect_after(
            counting.filter,
            Some(counting.total),
            counting.timeout,
            counting.mode,
            stop,
            async {
                let published = published.await.unwrap_or(false);
                publishing_done.store(true, std::sync::atomic::Ordering::Relaxed);
                published
            },
        )
        .await;
    if let Err(e) = &counted {
        if !publishing_done.load(std::sync::atomic::Ordering::Relaxed) {
            // Publishing matters more and goes on; say now why no count will follow.
            eprintln!(
                "warning: counting outcomes stopped: {e}; publishing goes on (count them afterwards with `watch --campaign {}`)",
                counting.filter.campaign
            );
        }
    }
    counted
}

/// Prints the summary and writes the failures file when a request failed or has no outcome.
fn report_outcomes(
    plan: &SubmitPlan,
    summary: CampaignSummary,
    originals: &HashMap<String, (usize, String)>,
    result: &mut SubmitResult,
) -> Result<(), CampaignError> {
    println!("{}", summary.render());
    if summary.has_failures() || summary.missing() > 0 {
        let written =
            watch::write_failures(&plan.failures, &summary, Some(originals)).map_err(|source| {
                CampaignError::Failures {
                    path: plan.failures.clone(),
                    source,
                }
            })?;
        println!("{}", written.describe(&plan.failures));
        result.failures = Some(written);
    }
    result.summary = Some(summary);
    Ok(())
}
