//! An in-process HTTP simulator of the one Huawei Cloud SWR API the worker
//! calls: "retry or roll back a pipeline execution step"
//! (`POST /v3/manage/pipelines/{pipeline_id}/stages/{stage_index}?mode=...`).
//!
//! It owns everything the worker's tests and the `sim`/`demo` commands need
//! to exercise the worker against something that behaves like SWR without
//! touching the cloud:
//!
//! * the upstream contract (auth, path/query validation, Huawei error
//!   shapes, `X-Request-Id` on every answer) — pure logic in `model/`: one
//!   call's flow in `model/mod.rs`, paths, queries and error bodies in
//!   `model/wire.rs`;
//! * an idempotency store keyed by `Idempotency-Key`, so a test can prove a
//!   step was executed exactly once (`model/state.rs`);
//! * fault injection ([`FaultRule`], `model/rules.rs`): error statuses,
//!   `Retry-After`, slow answers and dropped connections;
//! * a bounded call log and counters (`model/state.rs`), readable in-process through
//!   [`SimHandle`] or over the JSON control API under `/_sim/` (routes in
//!   `http.rs`).
//!
//! It also serves IAM's `POST /v3/auth/tokens` (password method, project
//! scope) for the users in [`SimConfig::iam_users`]; the tokens it issues are
//! accepted by the SWR route until they expire (`token_ttl`, or
//! [`SimHandle::expire_tokens`]) — pure logic in `iam.rs`.
//!
//! Order in which a call to the SWR route is handled (first answer wins):
//! method (405) → token (401) → fault rules → validation (400) →
//! idempotent replay / key conflict (409) → execution (201).
//! Rules are consulted after the token check so a test's rule never has its
//! `times` consumed by a request the gateway would have refused anyway, and
//! before validation so faults behave like the gateway/infrastructure they
//! model (they don't care whether the request would have been valid).
//!
//! Docs for operators: `docs/simulator.md`.

mod http;
mod iam;
mod model;
mod tls;

pub use iam::ISSUED_TOKEN_PREFIX;
pub use model::RuleError;
pub use tls::SimTls;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use model::Sim;

/// How the simulator behaves; fixed for the lifetime of a server.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// `X-Auth-Token` values accepted forever; empty = any non-empty token (except an expired one
    /// the IAM endpoint issued), so demos need no setup.
    pub tokens: Vec<String>,
    /// Steps per pipeline (`0..stages`, at least 1); the last, deploy, is the only rollbackable one.
    pub stages: u32,
    /// `false` = fast benchmark mode: counters only, no call log and no idempotent replay.
    pub record: bool,
    /// Call-log bound so long runs can't exhaust memory; evictions count as overflow.
    pub max_recorded: usize,
    /// IAM users `(name, password)` that `POST /v3/auth/tokens` signs in; empty = it refuses all.
    pub iam_users: Vec<(String, String)>,
    /// Lifetime of the tokens the IAM endpoint issues (IAM's is 24 h), so expiry can be tested.
    pub token_ttl: Duration,
    /// Serve HTTPS with this certificate instead of plain HTTP (clients with a private CA).
    pub tls: Option<SimTls>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            tokens: Vec::new(),
            stages: 5,
            record: true,
            max_recorded: 100_000,
            iam_users: Vec::new(),
            token_ttl: Duration::from_secs(24 * 3600),
            tls: None,
        }
    }
}

/// One fault-injection rule. Matchers left `None` match anything; a rule
/// applies to the first `times` matching requests (or all when `None`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultRule {
    /// Only requests for exactly this pipeline, to target one job in a test.
    pub pipeline_id: Option<i64>,
    /// Only pipelines in `[lo, hi]` (inclusive), to fault a share of traffic.
    pub pipeline_range: Option<[i64; 2]>,
    /// Only requests for this step index.
    pub stage_index: Option<i64>,
    /// Only this mode (`retry` or `rollback`).
    pub mode: Option<String>,
    /// Answer this status (Huawei error shape) instead of executing; unset = delay only.
    pub status: Option<u16>,
    /// Replaces the default `error_code`, to test how the worker classifies codes.
    pub error_code: Option<String>,
    /// Sent verbatim as `Retry-After`, to test back-off parsing (seconds, HTTP-date, junk).
    pub retry_after: Option<String>,
    /// Wait this long before answering (or dropping), to test timeouts.
    pub delay_ms: Option<u64>,
    /// Abort the connection without a response, to test transport errors.
    #[serde(default)]
    pub drop_connection: bool,
    /// How many matching requests the rule applies to; `None` = forever.
    pub times: Option<u32>,
}

/// A rule as installed, with its id and how much of it is left.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct RuleEntry {
    /// Handle for deleting this one rule.
    pub id: u64,
    /// The rule as it was added.
    #[serde(flatten)]
    pub rule: FaultRule,
    /// Applications left (`None` = unlimited), so a test can see a rule is spent.
    pub remaining: Option<u32>,
    /// How many requests this rule has answered or delayed so far.
    pub applied: u64,
}

/// One call to the SWR route, as the simulator saw and answered it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RecordedCall {
    /// Arrival sequence number (1-based), stable across log eviction.
    pub seq: u64,
    /// Arrival time (ms since the Unix epoch), to check back-off between attempts.
    pub at_unix_ms: u64,
    /// The `X-Request-Id` sent back, to correlate with the worker's logs.
    pub request_id: String,
    /// HTTP method, so wrong-method calls are visible too.
    pub method: String,
    /// Request path without the query.
    pub path: String,
    /// Raw query string, if any, to debug encoding problems.
    pub query: Option<String>,
    /// `pipeline_id` if the path segment was an integer.
    pub pipeline_id: Option<i64>,
    /// `stage_index` if the path segment was an integer.
    pub stage_index: Option<i64>,
    /// The `mode` query parameter as sent (even if invalid).
    pub mode: Option<String>,
    /// The `source` query parameter as sent (percent-decoded).
    pub source: Option<String>,
    /// The `Idempotency-Key` header as sent.
    pub idempotency_key: Option<String>,
    /// The `traceparent` header as sent (W3C Trace Context), so a test can check that the
    /// caller propagated its trace.
    #[serde(default)]
    pub traceparent: Option<String>,
    /// Whether `X-Auth-Token` was accepted.
    pub token_valid: bool,
    /// Status answered; `None` when the connection was dropped on purpose.
    pub status: Option<u16>,
    /// Whether the step was actually executed by this call.
    pub executed: bool,
    /// Whether the answer was replayed from the idempotency store.
    pub replayed: bool,
    /// Id of the fault rule that answered, delayed or dropped this call.
    pub fault_rule: Option<u64>,
}

/// Global counters, kept in every mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Calls to the SWR route (any outcome).
    pub requests: u64,
    /// Calls that executed a step (not replays, faults or errors).
    pub executions: u64,
    /// Call-log entries evicted because of `max_recorded`.
    pub recorded_overflow: u64,
    /// Calls to the IAM token endpoint (any outcome), to count sign-in attempts.
    #[serde(default)]
    pub iam_requests: u64,
    /// Tokens the IAM endpoint issued, to show that many waiting jobs caused one renewal.
    #[serde(default)]
    pub tokens_issued: u64,
}

/// A running simulator. Dropping it stops the server too (without waiting);
/// call [`SimHandle::shutdown`] to wait for the stop.
pub struct SimHandle {
    /// Where the server actually listens (port 0 resolved).
    addr: SocketAddr,
    /// Serving HTTPS: the URL says `https://`.
    https: bool,
    /// State shared with the server, so tests can inspect it without HTTP.
    sim: Arc<Sim>,
    /// Firing (or dropping) it starts the graceful stop.
    stop: Option<oneshot::Sender<()>>,
    /// The server task, awaited by `shutdown`.
    task: Option<JoinHandle<std::io::Result<()>>>,
}

/// How long `shutdown` waits for in-flight (e.g. deliberately delayed)
/// requests before abandoning the server task.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl SimHandle {
    /// Binds `listen` (port 0 allowed) and serves in a spawned task.
    pub async fn start(listen: SocketAddr, config: SimConfig) -> std::io::Result<SimHandle> {
        let acceptor = acceptor(&config)?;
        let https = acceptor.is_some();
        let sim = Arc::new(Sim::new(config)?);
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(http::serve(listener, acceptor, sim.clone(), async move {
            // A dropped sender means the handle is gone: stop as well.
            let _ = stopped.await;
        }));
        Ok(SimHandle {
            addr,
            https,
            sim,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL for clients, e.g. `http://127.0.0.1:PORT` (`https://` when serving TLS); a
    /// wildcard bind is reported as loopback because a client can't connect to `0.0.0.0`.
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// Installs a fault rule and returns its id.
    ///
    /// # Panics
    /// If the rule is invalid (see [`FaultRule::validate`]): a broken rule in
    /// a test is a bug in the test. The control API answers 400 instead.
    pub fn add_rule(&self, rule: FaultRule) -> u64 {
        if let Err(e) = rule.validate() {
            panic!("invalid fault rule {rule:?}: {e}");
        }
        self.sim.add_rule(rule)
    }

    /// Removes one rule; `false` if there was no such rule.
    pub fn remove_rule(&self, id: u64) -> bool {
        self.sim.remove_rule(id)
    }

    /// Removes every rule.
    pub fn clear_rules(&self) {
        self.sim.clear_rules();
    }

    /// The installed rules with their remaining counts.
    pub fn rules(&self) -> Vec<RuleEntry> {
        self.sim.rules()
    }

    /// The call log, oldest first (empty in fast mode).
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.sim.calls()
    }

    /// Executions per `Idempotency-Key` (empty in fast mode).
    pub fn executions(&self) -> HashMap<String, u32> {
        self.sim.executions()
    }

    /// Global counters.
    pub fn stats(&self) -> SimStats {
        self.sim.stats()
    }

    /// Clears rules, calls, executions, stored answers and counters. Issued IAM tokens stay valid.
    pub fn reset(&self) {
        self.sim.reset();
    }

    /// Makes every token the IAM endpoint issued expire now (the SWR route then answers 401
    /// "token expired" for them); returns how many were still valid. Static `tokens` are not
    /// affected.
    pub fn expire_tokens(&self) -> usize {
        self.sim.iam().expire_all()
    }

    /// Stops accepting, lets in-flight requests finish (up to a few seconds)
    /// and waits for the server task.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                tracing::warn!("simulator did not stop within {SHUTDOWN_GRACE:?}; aborting it");
                task.abort();
            }
        }
    }
}

/// Runs the simulator until `shutdown` resolves (the `sim` CLI subcommand).
pub async fn serve_forever(
    listen: SocketAddr,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = acceptor(&config)?;
    let https = acceptor.is_some();
    let sim = Arc::new(Sim::new(config)?);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, https, stages = sim.stages(), record = sim.recording(), "SWR simulator listening");
    http::serve(listener, acceptor, sim, shutdown).await?;
    tracing::info!(%addr, "SWR simulator stopped");
    Ok(())
}

/// The TLS acceptor when `config.tls` is set; an unusable file is an error naming its flag.
fn acceptor(config: &SimConfig) -> std::io::Result<Option<tokio_rustls::TlsAcceptor>> {
    config
        .tls
        .as_ref()
        .map(|tls| tls.acceptor().map_err(std::io::Error::other))
        .transpose()
}

#[cfg(test)]
mod tests;
