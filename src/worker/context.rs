//! What every job of the process shares: configuration, the SWR client and its tokens, the
//! idempotency gate, the pace, the breaker, the metrics, and the state /readyz reports.

use std::sync::Arc;

use crate::amqp::reply_to::RefusalLog;
use crate::breaker::Breaker;
use crate::config::{redact_url, AuthKind, Config, ConfigError};
use crate::idempotency::{self, Gate, StoreError};
use crate::ratelimit::RateLimiter;
use crate::swr::auth::{StaticToken, TokenSource};
use crate::swr::client::SwrClient;
use crate::swr::iam::{IamClient, IamCredentials, IamToken};
use crate::telemetry::http::Observed;
use crate::telemetry::metrics::Metrics;

/// Everything a job needs, shared by all jobs of the process.
pub struct JobContext {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Shared HTTP client (one pool).
    pub swr: SwrClient,
    /// Where tokens come from.
    pub tokens: Arc<dyn TokenSource>,
    /// `worker` field of outcomes.
    pub worker_id: String,
    /// One execution per key; `None` when `idempotency.backend = "off"`.
    pub gate: Option<Gate>,
    /// Counters and histograms for /metrics.
    pub metrics: Arc<Metrics>,
    /// The pace of SWR calls (`swr.max_requests_per_second`).
    pub pace: RateLimiter,
    /// Holds back new deliveries while SWR is failing.
    pub breaker: Breaker,
    /// Why the last attempt to open a broker session failed (cleared once consuming), so
    /// /readyz can say why the worker is not ready.
    pub broker_error: std::sync::Mutex<Option<String>>,
    /// The broker (of `amqp.url`'s list) of the current or last session, password hidden, for
    /// /readyz.
    pub broker_node: std::sync::Mutex<Option<String>>,
    /// Where the telemetry server listens, once it does (`telemetry.listen` may name port 0,
    /// or fall back to a free port).
    pub telemetry_addr: std::sync::OnceLock<std::net::SocketAddr>,
    /// The `reply_to` names refused so far, so each is logged once, not once per request.
    pub reply_to_refusals: RefusalLog,
}

/// Why the job context could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("cannot build the SWR HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("cannot build the IAM HTTP client: {0}")]
    IamClient(reqwest::Error),
    /// The IAM password could not be read (its file or variable).
    #[error(transparent)]
    Credentials(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `http.ca_file` could not be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
}

impl JobContext {
    /// Builds the shared pieces; opens the idempotency store and starts its pruning.
    pub async fn new(config: Arc<Config>) -> Result<JobContext, ContextError> {
        let metrics = Arc::new(Metrics::default());
        let tls = config.http.client_config()?;
        let swr = SwrClient::new(&config.swr.endpoint, &config.http, tls.clone())?;
        let auth = &config.swr.auth;
        let tokens: Arc<dyn TokenSource> = match auth.kind {
            AuthKind::IamPassword => {
                let credentials = IamCredentials::from_config(auth)?;
                tracing::info!(
                    endpoint = %redact_url(&config.iam.endpoint),
                    user = %credentials.user,
                    domain = %credentials.domain,
                    project = %credentials.project,
                    "SWR tokens come from IAM (password sign-in, renewed before expiry)"
                );
                let client =
                    IamClient::new(&config.iam.endpoint, config.iam.timeout, credentials, tls)
                        .map_err(ContextError::IamClient)?;
                Arc::new(IamToken::new(client, auth.refresh_ahead).with_metrics(metrics.clone()))
            }
            AuthKind::Static => Arc::new(StaticToken::new(auth.token.clone())),
        };
        let worker_id = config.worker_id();
        let gate = idempotency::open(&config).await?.map(|store| {
            idempotency::spawn_pruner(&store, config.idempotency.prune_interval);
            Gate::new(store, &worker_id, &config.idempotency)
        });
        Ok(JobContext {
            metrics,
            pace: RateLimiter::new(config.swr.max_requests_per_second),
            breaker: Breaker::new(&config.breaker),
            config,
            swr,
            tokens,
            worker_id,
            gate,
            broker_error: std::sync::Mutex::new(None),
            broker_node: std::sync::Mutex::new(None),
            telemetry_addr: std::sync::OnceLock::new(),
            reply_to_refusals: RefusalLog::default(),
        })
    }
}

/// What the telemetry server reports: the worker keeps it, telemetry only reads it.
impl Observed for JobContext {
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    async fn ping_store(&self) -> Option<Result<(), String>> {
        let gate = self.gate.as_ref()?;
        Some(gate.store().ping().await.map_err(|e| e.to_string()))
    }

    fn broker_error(&self) -> Option<String> {
        self.broker_error
            .lock()
            .ok()
            .and_then(|error| error.clone())
    }

    fn broker_node(&self) -> Option<String> {
        self.broker_node.lock().ok().and_then(|node| node.clone())
    }
}
