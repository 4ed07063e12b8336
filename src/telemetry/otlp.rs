//! Span export over OTLP/HTTP (protobuf), on when `telemetry.otlp_endpoint` is set.
//!
//! The job span and each SWR attempt's span go to the collector with the ids the worker already
//! propagates (`traceparent` to SWR and in the outcome's header), so the exported trace and the
//! headers agree: [`adopt_job`] and [`adopt_child`] hand those ids to the SDK through
//! [`AdoptedIds`] when the span starts.
//!
//! Export never slows a job: a finished span is put on a bounded queue without waiting
//! (`telemetry.otlp_queue` spans); one task sends batches from it. A full queue drops the span,
//! a batch the collector refuses or does not answer is lost; both are counted in `/metrics`
//! (`swr_stage_otlp_spans_total{result}`), never retried at the cost of the jobs. At shutdown
//! the queue is flushed until the shutdown deadline and no longer.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    IdGenerator, Sampler, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::trace::{JobTrace, TraceContext};

/// Spans in one export request, at most.
const BATCH: usize = 512;
/// How long a batch waits to fill before it is sent.
const LINGER: Duration = Duration::from_secs(1);
/// How often a filling batch looks at the queue.
const POLL: Duration = Duration::from_millis(20);
/// The largest collector answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Counts of exported, dropped and failed spans, for `/metrics`.
#[derive(Debug, Default)]
pub struct ExportCounts {
    exported: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl ExportCounts {
    /// (exported, dropped, failed) so far.
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.exported.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// The process's counts: export is one per process, like the tracing subscriber it hangs on.
pub static COUNTS: ExportCounts = ExportCounts {
    exported: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    failed: AtomicU64::new(0),
};

/// True once export is installed: only then do spans get the propagated ids.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// What export needs from the configuration.
pub struct Settings {
    /// The collector's OTLP/HTTP traces URL (`…/v1/traces`).
    pub url: String,
    /// Extra request headers (an API key, for example): secret values.
    pub headers: Vec<(String, String)>,
    /// One export request, at most.
    pub timeout: Duration,
    /// Finished spans waiting for export, at most.
    pub queue: usize,
    /// `service.instance.id`.
    pub worker_id: String,
    /// Trust for an `https` collector (the system's roots plus `http.ca_file`).
    pub tls: rustls::ClientConfig,
}

/// Why export could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint: {0}")]
pub struct SetupError(String);

/// Export, installed: its tracer feeds the tracing layer; [`Export::shutdown`] flushes.
pub struct Export {
    provider: SdkTracerProvider,
    done: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Export {
    /// Builds the exporter and starts its sending task (on the current tokio runtime).
    pub fn start(settings: Settings) -> Result<Export, SetupError> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(settings.tls)
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("swr-stage-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SetupError(format!("cannot build the HTTP client: {e}")))?;
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(settings.url)
            .with_timeout(settings.timeout)
            .with_headers(settings.headers.into_iter().collect())
            .with_http_client(Client {
                http: client,
                timeout: settings.timeout,
            })
            .build()
            .map_err(|e| SetupError(e.to_string()))?;
        let resource = Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", env!("CARGO_PKG_NAME")),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("service.instance.id", settings.worker_id),
            ])
            .build();
        exporter.set_resource(&resource);
        let (sender, receiver) = mpsc::channel(settings.queue.max(1));
        let done = tokio::spawn(send_batches(receiver, exporter));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Queue {
                sender: Mutex::new(Some(sender)),
            })
            .with_id_generator(AdoptedIds)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_resource(resource)
            .build();
        ENABLED.store(true, Ordering::Relaxed);
        Ok(Export {
            provider,
            done: Mutex::new(Some(done)),
        })
    }

    /// The tracing layer that turns the job's and the attempts' spans into exported spans (no
    /// log lines: they stay in the logs, found by `trace_id`).
    pub fn layer<S>(&self) -> impl Layer<S>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer(env!("CARGO_PKG_NAME")))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(filter_fn(|meta| {
                meta.is_span()
                    && matches!(meta.name(), "job" | "attempt")
                    && meta.target().starts_with(env!("CARGO_CRATE_NAME"))
            }))
    }

    /// Stops taking spans and sends what is queued, until `deadline`; what is left then is
    /// counted as dropped.
    pub async fn shutdown(&self, deadline: Instant) {
        ENABLED.store(false, Ordering::Relaxed);
        // Closes the queue: the sending task drains it and ends.
        let _ = self.provider.shutdown();
        let done = self.done.lock().expect("export lock").take();
        if let Some(mut done) = done {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, &mut done).await.is_err() {
                done.abort();
                tracing::warn!("span export did not finish before the shutdown deadline; the spans left are dropped");
            }
        }
    }
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export").finish_non_exhaustive()
    }
}

/// The span processor: finished spans go on the bounded queue, or are counted as dropped.
#[derive(Debug)]
struct Queue {
    sender: Mutex<Option<mpsc::Sender<SpanData>>>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let sent = match self.sender.lock().expect("export lock").as_ref() {
            Some(sender) => sender.try_send(span).is_ok(),
            None => false,
        };
        if !sent {
            COUNTS.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.sender.lock().expect("export lock").take();
        Ok(())
    }
}

/// Sends batches until the queue is closed and empty; one request at a time, so a slow
/// collector fills the queue (and drops spans) instead of piling up requests. A batch waits at
/// most [`LINGER`] to fill, looking every [`POLL`]: the queue's sender never wakes this task
/// per span.
async fn send_batches(
    mut queue: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        if queue.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        let linger = tokio::time::Instant::now() + LINGER;
        while batch.len() + queue.len() < BATCH
            && !queue.is_closed()
            && tokio::time::Instant::now() < linger
        {
            tokio::time::sleep(POLL).await;
        }
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(span) => batch.push(span),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        match exporter
            .export(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))
            .await
        {
            Ok(()) => COUNTS.exported.fetch_add(n, Ordering::Relaxed),
            Err(e) => {
                tracing::debug!(error = %e, spans = n, "span export failed");
                COUNTS.failed.fetch_add(n, Ordering::Relaxed)
            }
        };
    }
}

/// The exporter's HTTP client: reqwest on the worker's runtime, with the worker's TLS trust.
#[derive(Debug)]
struct Client {
    http: reqwest::Client,
    timeout: Duration,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let call = async {
            let mut response = self
                .http
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let status = response.status();
            let mut answer = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if answer.len() + chunk.len() > MAX_ANSWER_BYTES {
                    break;
                }
                answer.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>((status, answer))
        };
        let (status, answer) = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))??;
        let mut response = http::Response::new(bytes::Bytes::from(answer));
        *response.status_mut() = status;
        Ok(response)
    }
}

thread_local! {
    /// The ids the next span started on this thread takes: set by [`adopt_job`] and
    /// [`adopt_child`] around the start they cause, empty otherwise.
    static ADOPTED: Cell<Option<([u8; 16], [u8; 8])>> = const { Cell::new(None) };
}

/// The SDK's id source: the ids being adopted, else new random ones.
#[derive(Debug)]
struct AdoptedIds;

impl IdGenerator for AdoptedIds {
    fn new_trace_id(&self) -> TraceId {
        let adopted = ADOPTED.with(Cell::get);
        TraceId::from_bytes(adopted.map_or_else(crate::trace::random_id, |(trace, _)| trace))
    }

    fn new_span_id(&self) -> SpanId {
        let adopted = ADOPTED.with(Cell::get);
        SpanId::from_bytes(adopted.map_or_else(crate::trace::random_id, |(_, span)| span))
    }
}

/// Starts `span`'s exported span now, with `ids` (and the parent already set), so the exported
/// ids are the propagated ones.
fn start_with(span: &tracing::Span, ids: &TraceContext) {
    ADOPTED.with(|a| a.set(Some((ids.trace_id, ids.span_id))));
    let _ = span.context();
    ADOPTED.with(|a| a.set(None));
}

/// The job's span is exported with the job's ids, as a child of the sender's span (or as a new
/// trace's root). Does nothing when export is off.
pub fn adopt_job(span: &tracing::Span, trace: &JobTrace) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let parent = match trace.parent_span_id {
        Some(parent) => Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(trace.job.trace_id),
            SpanId::from_bytes(parent),
            TraceFlags::new(trace.job.flags),
            true,
            trace
                .job
                .state
                .as_deref()
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default(),
        )),
        // Not the child of whatever span is current where the job starts.
        None => Context::new(),
    };
    let _ = span.set_parent(parent);
    start_with(span, &trace.job);
}

/// A span inside the job's (an SWR attempt) is exported with `ids`, as a child of the span it is
/// created in. Does nothing when export is off.
pub fn adopt_child(span: &tracing::Span, ids: &TraceContext) {
    if ENABLED.load(Ordering::Relaxed) {
        start_with(span, ids);
    }
}
