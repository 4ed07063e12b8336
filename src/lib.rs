//! swr-stage-worker: a RabbitMQ job worker that retries or rolls back Huawei Cloud SWR pipeline
//! steps. It consumes requests, calls SWR with an idempotency key and retries, publishes every
//! outcome with publisher confirms, and acks a request only after its outcome is confirmed.
//!
//! The map (one job each):
//! - [`config`]: typed configuration, built-in defaults, env overrides, validation.
//! - [`secret`]: values never printed (`Secret`) and URLs shown without their password.
//! - [`host`]: the machine's host name, for the worker's default id.
//! - [`request`]: the request message (contract §3): parse, validate, derive the idempotency key.
//! - [`outcome`]: the outcome message (contract §4): fields, error kinds, routing key.
//! - [`swr`]: the upstream: one attempt, the classification table (contract §1), token sources
//!   (static, and IAM password tokens renewed before expiry and on a 401), and `execute`, which
//!   drives attempts to a final answer.
//! - [`retry`]: the retry schedule (backoff, Retry-After, limits); the only user of `backoff`.
//! - [`deadline`]: deadlines from outside durations (config, messages, answers) that never
//!   overflow the clock.
//! - [`idempotency`]: one execution per key: the store trait, embedded SQLite and PostgreSQL
//!   stores, and the gate the worker asks before calling SWR.
//! - [`ratelimit`]: the smooth per-process pace of SWR calls.
//! - [`breaker`]: the circuit breaker that holds back new deliveries during an SWR outage.
//! - [`amqp`]: connecting, declaring the topology (contract §2), confirmed publishing, the
//!   `reply_to` policy.
//! - [`worker`]: one delivery: parse → key → execute → outcome → publish → ack/requeue decision.
//! - [`service`]: the running worker: sessions, bounded consumption, reconnects, the drain.
//! - [`shutdown`]: SIGTERM/SIGINT handling.
//! - [`sim`]: the SWR simulator (faithful to the API, with fault injection, and IAM's token
//!   endpoint with expiring tokens) for tests and demos.
//! - [`campaign`]: bulk campaigns for operators: `submit` (validated, confirmed, paced),
//!   `watch` (outcome counts, summary, failures file), `replay` (dead letters back to work).
//! - [`demo`]: the newcomer's first command.
//! - [`procstat`]: a process's CPU time and peak memory from /proc, for the cost figures.
//! - [`status`]: the operator's look at the topology and a worker's readiness.
//! - [`tls`]: one TLS rule for every connection (system roots plus a CA file, client
//!   certificates, libpq's `sslmode` levels) and what a failed handshake means.
//! - [`telemetry`]: logs (text or JSON), Prometheus metrics, and the /healthz, /readyz,
//!   /metrics server.
//!
//! The binary (`src/main.rs`) parses arguments and calls into these modules. The benchmark
//! commands (`bench`, `bench-fleet`) are the binary's own (`src/bench/`), not the library's.

pub mod amqp;
pub mod breaker;
pub mod campaign;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod host;
pub mod idempotency;
pub mod outcome;
pub mod procstat;
pub mod ratelimit;
pub mod request;
pub mod retry;
pub mod secret;
pub mod service;
pub mod shutdown;
pub mod sim;
pub mod status;
pub mod swr;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod worker;
