//! The running worker: connect, declare the topology, consume with bounded parallelism, hand
//! each delivery to [`worker::process`] (through the lapin adapter, `amqp::delivery`), ack or
//! requeue; reconnect when the broker goes away;
//! drain on shutdown.
//!
//! Bounds: at most `worker.concurrency` deliveries are unacked (prefetch) and at most that many
//! jobs run (a semaphore permit is taken *before* the next delivery is read), so memory is bounded
//! by the prefetch, never by the queue depth.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer, Event};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::amqp::delivery::{self, AmqpSink};
use crate::amqp::publisher::{PublishError, Publisher};
use crate::amqp::session::Sessions;
use crate::amqp::topology::{self, TopologyError};
use crate::amqp::{connect_from, ConnectError};
use crate::config::{redact_url, Config};
use crate::outcome::capped;
use crate::worker::{self, ContextError, Disposition, JobContext, REQUEUE_DELAY};

/// First pause before reconnecting; doubles up to `amqp.reconnect_max_interval`.
const RECONNECT_INITIAL: Duration = Duration::from_millis(500);

/// Why the worker stopped with an error (a clean shutdown is `Ok`).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("topology: {0}")]
    Topology(TopologyError),
    #[error("telemetry.listen {0}: {1} (choose another address, or \"\" to disable the server)")]
    Telemetry(String, std::io::Error),
}

/// Why one broker session ended.
enum SessionEnd {
    /// Shutdown was requested and the drain is done.
    Stopped,
    /// The broker went away or a channel broke: reconnect.
    Lost(String),
}

/// Everything that lives as long as one connection.
struct Session {
    /// The connection; closed at the end of the session.
    connection: Connection,
    /// The channel deliveries arrive on (closing it requeues what is unacked).
    consume_channel: Channel,
    /// The delivery stream.
    consumer: Consumer,
    /// Confirm-mode channel for outcomes and DLQ copies (an Arc: cloning a lapin channel per
    /// job is not free).
    publisher: Arc<Publisher>,
}

/// Runs the worker until `shutdown` resolves, then drains and returns `Ok(())`.
/// Broker outages are ridden out by reconnecting; only a topology mismatch (which needs an
/// operator) ends it with an error.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let ctx = JobContext::new(Arc::new(config)).await?;
    run_with_context(Arc::new(ctx), shutdown).await
}

/// [`run`] with a job context the caller built (and may have changed, e.g. its token source).
pub async fn run_with_context(
    ctx: Arc<JobContext>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let config = ctx.config.clone();
    start_telemetry(&ctx).await?;
    let sessions = Arc::new(Sessions::new(&config.amqp));
    let slots = Arc::new(Semaphore::new(config.worker.concurrency as usize));
    let mut jobs: JoinSet<()> = JoinSet::new();
    let mut delay = RECONNECT_INITIAL;
    tokio::pin!(shutdown);
    tracing::info!(
        worker = %ctx.worker_id,
        queue = %config.amqp.request_queue,
        concurrency = config.worker.concurrency,
        swr = %redact_url(&config.swr.endpoint),
        "worker starting"
    );
    let brokers = broker_order(&config);
    for url in &brokers {
        warn_if_plain(url);
    }
    // Where the next connect starts in `brokers`: after a lost session, the next node, so the
    // others are tried before the one that was lost.
    let mut next_broker = 0;
    // The TLS failure last logged at error: the same one again is logged at warn only.
    let mut last_tls: Option<crate::tls::Failure> = None;
    loop {
        let opened = tokio::select! {
            opened = open_session(&config, &brokers, next_broker) => opened,
            () = &mut shutdown => {
                drain(&mut jobs, config.shutdown.grace).await;
                return Ok(());
            }
        };
        ctx.metrics.broker_connect(opened.is_ok());
        let end = match opened {
            Ok((session, index)) => {
                delay = RECONNECT_INITIAL;
                next_broker = (index + 1) % brokers.len();
                let node = redact_url(brokers[index].expose());
                sessions.begin(session.publisher.clone());
                ctx.metrics.set_broker_connected(true);
                set_broker_error(&ctx, None);
                if let Ok(mut slot) = ctx.broker_node.lock() {
                    *slot = Some(node.clone());
                }
                last_tls = None;
                tracing::info!(queue = %config.amqp.request_queue, broker = %node, "consuming");
                let shared = (&ctx, &sessions);
                consume(shared, session, &mut shutdown, &slots, &mut jobs).await
            }
            Err(SessionError::Topology(e @ TopologyError::Mismatch { .. })) => {
                return Err(RunError::Topology(e))
            }
            Err(e) => {
                let reason = e.to_string();
                report_tls_failure(&e, &reason, &mut last_tls);
                set_broker_error(&ctx, Some(reason.clone()));
                SessionEnd::Lost(reason)
            }
        };
        ctx.metrics.set_broker_connected(false);
        match end {
            SessionEnd::Stopped => return Ok(()),
            SessionEnd::Lost(reason) => {
                tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64, "broker session lost; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut shutdown => {
                        drain(&mut jobs, config.shutdown.grace).await;
                        return Ok(());
                    }
                }
                delay = next_reconnect_delay(delay, config.amqp.reconnect_max_interval);
            }
        }
    }
}

/// Starts the telemetry server unless `telemetry.listen` is empty; records where it listens.
async fn start_telemetry(ctx: &Arc<JobContext>) -> Result<(), RunError> {
    let telemetry = &ctx.config.telemetry;
    if telemetry.listen.is_empty() {
        return Ok(());
    }
    let addr =
        crate::telemetry::http::serve(&telemetry.listen, telemetry.listen_is_default, ctx.clone())
            .await
            .map_err(|e| RunError::Telemetry(telemetry.listen.clone(), e))?;
    let _ = ctx.telemetry_addr.set(addr);
    Ok(())
}

/// Logs a failed TLS handshake with the broker at error once per distinct reason (`last`): it
/// needs an operator, not more retries. The same failure again is left to the warning that
/// every lost session gets.
fn report_tls_failure(error: &SessionError, reason: &str, last: &mut Option<crate::tls::Failure>) {
    let SessionError::Connect(connect) = error else {
        return;
    };
    if let Some(failure) = connect.tls_failure() {
        if last.as_ref() != Some(failure) {
            tracing::error!(error = %reason, "TLS handshake with the broker failed; retrying with back-off");
            *last = Some(failure.clone());
        }
    }
}

/// Records why the broker session is not up, for /readyz.
fn set_broker_error(ctx: &JobContext, error: Option<String>) {
    if let Ok(mut slot) = ctx.broker_error.lock() {
        *slot = error;
    }
}

/// The brokers of `amqp.url` in the order this process tries them (`amqp.failover_order`).
fn broker_order(config: &Config) -> Vec<crate::config::Secret> {
    let mut urls = crate::amqp::broker_urls(&config.amqp.url);
    if config.amqp.failover_order == crate::config::FailoverOrder::Shuffle {
        // Fisher-Yates with the 122 random bits of a UUIDv4: plenty for a list of nodes, and no
        // random-number crate for one shuffle at start.
        let mut bits = uuid::Uuid::new_v4().as_u128();
        for i in (1..urls.len()).rev() {
            let choices = i as u128 + 1;
            urls.swap(i, (bits % choices) as usize);
            bits /= choices;
        }
    }
    urls
}

/// One warning at start for a plain `amqp://` URL to another host: the password and every
/// message cross the network in clear.
fn warn_if_plain(url: &crate::config::Secret) {
    // reqwest's URL keeps an IPv6 literal as written (lapin's parser reads it as "localhost").
    if let Ok(parsed) = reqwest::Url::parse(url.expose()) {
        if parsed.scheme() == "amqp"
            && !crate::tls::is_loopback_host(parsed.host_str().unwrap_or_default())
        {
            tracing::warn!(
                broker = %redact_url(url.expose()),
                "amqp.url is plain amqp:// to another host: the broker password and every message cross the network unencrypted; use amqps://"
            );
        }
    }
}

/// The pause after `delay`: twice as long, at most `max` (`amqp.reconnect_max_interval`, which
/// may be as long as a Duration holds, so the doubling saturates).
fn next_reconnect_delay(delay: Duration, max: Duration) -> Duration {
    delay.saturating_mul(2).min(max)
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Topology(TopologyError),
    /// The broker failed a step of opening the session's channels.
    #[error("opening channels: {step}: {source}")]
    Channel {
        /// The step: "create channel", "basic.qos", "basic.consume".
        step: &'static str,
        source: lapin::Error,
    },
    /// The broker did not answer a step within `amqp.connect_timeout`.
    #[error("opening channels: {step}: no answer within {limit:?}")]
    ChannelTimeout { step: &'static str, limit: Duration },
    /// The publisher's confirm-mode channels could not be opened.
    #[error("opening channels: publisher channel: {0}")]
    Publisher(#[source] PublishError),
}

/// Awaits one step of opening a session within `limit`, keeping the broker's error as the cause.
async fn session_step<T>(
    step: &'static str,
    limit: Duration,
    fut: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, SessionError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(SessionError::Channel { step, source }),
        Err(_) => Err(SessionError::ChannelTimeout { step, limit }),
    }
}

/// Connects to the first broker of `brokers` that answers, from `start` on, and opens the
/// session on it; returns the broker's index with it.
async fn open_session(
    config: &Config,
    brokers: &[crate::config::Secret],
    start: usize,
) -> Result<(Session, usize), SessionError> {
    let amqp = &config.amqp;
    let limit = amqp.connect_timeout;
    let (connection, index) =
        connect_from(brokers, start, &amqp.tls, &amqp.connection_name, limit).await?;
    let setup = session_step("create channel", limit, connection.create_channel()).await?;
    match tokio::time::timeout(limit, topology::declare(&setup, amqp)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ =
                tokio::time::timeout(limit, connection.close(200, "topology error".into())).await;
            return Err(SessionError::Topology(e));
        }
        Err(_) => {
            return Err(SessionError::ChannelTimeout {
                step: "declare topology",
                limit,
            })
        }
    }
    let _ = tokio::time::timeout(limit, setup.close(200, "topology declared".into())).await;
    let publisher = Publisher::open(&connection, amqp.confirm_timeout)
        .await
        .map_err(SessionError::Publisher)?;
    let consume_channel =
        session_step("create channel", limit, connection.create_channel()).await?;
    // Prefetch = concurrency: the broker never hands us more than we can run at once.
    session_step(
        "basic.qos",
        limit,
        consume_channel.basic_qos(config.worker.concurrency as u16, BasicQosOptions::default()),
    )
    .await?;
    let consumer = session_step(
        "basic.consume",
        limit,
        consume_channel.basic_consume(
            amqp.request_queue.as_str().into(),
            "".into(),
            // Manual acks: a request is acked only after its outcome is confirmed.
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    let session = Session {
        connection,
        consume_channel,
        consumer,
        publisher: Arc::new(publisher),
    };
    Ok((session, index))
}

async fn consume(
    (ctx, sessions): (&Arc<JobContext>, &Arc<Sessions>),
    mut session: Session,
    shutdown: &mut std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
    slots: &Arc<Semaphore>,
    jobs: &mut JoinSet<()>,
) -> SessionEnd {
    // Connection events are watched while waiting for a slot too: with every slot held by jobs
    // whose publish waits for a new connection, only this notices that one is needed.
    let mut events = session.connection.events_listener();
    let end = loop {
        while jobs.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            () = &mut *shutdown => break None,
            () = sessions.broken() => break Some("the publisher channel broke".to_owned()),
            event = events.next() => match lost(event) {
                Some(reason) => break Some(reason),
                None => continue,
            },
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        // While the breaker is open, requests wait in the queue rather than fail here.
        // A probe's pass goes back if this loop leaves before a delivery takes it.
        let pass = tokio::select! {
            biased;
            () = &mut *shutdown => break None,
            () = sessions.broken() => break Some("the publisher channel broke".to_owned()),
            event = events.next() => match lost(event) {
                Some(reason) => break Some(reason),
                None => continue,
            },
            pass = ctx.breaker.admit() => pass,
        };
        let next = tokio::select! {
            biased;
            () = &mut *shutdown => break None,
            () = sessions.broken() => break Some("the publisher channel broke".to_owned()),
            event = events.next() => match lost(event) {
                Some(reason) => break Some(reason),
                None => continue,
            },
            next = session.consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                let shared = (ctx.clone(), sessions.clone());
                let publisher = session.publisher.clone();
                jobs.spawn(handle(shared, publisher, delivery, permit, pass.take()));
            }
            Some(Err(e)) => break Some(format!("consumer error: {e}")),
            None => break Some("the broker cancelled the consumer".to_owned()),
        }
    };
    match end {
        Some(reason) => {
            // In-flight jobs keep running; their acks go to a dead channel and the broker
            // redelivers those requests. Close what is left of this session.
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                session.connection.close(200, "reconnecting".into()),
            )
            .await;
            SessionEnd::Lost(reason)
        }
        None => {
            let limit = ctx.config.amqp.confirm_timeout;
            let tag = session.consumer.tag();
            let _ = tokio::time::timeout(
                limit,
                session
                    .consume_channel
                    .basic_cancel(tag, BasicCancelOptions::default()),
            )
            .await;
            drain(jobs, ctx.config.shutdown.grace).await;
            // Closing the consume channel requeues every delivery still unacked (aborted jobs,
            // and deliveries prefetched but never started).
            let _ =
                tokio::time::timeout(limit, session.consume_channel.close(200, "shutdown".into()))
                    .await;
            session.publisher.close().await;
            let _ =
                tokio::time::timeout(limit, session.connection.close(200, "shutdown".into())).await;
            tracing::info!("worker stopped");
            SessionEnd::Stopped
        }
    }
}

/// Whether a connection event ends the session (and why); other events are logged.
fn lost(event: Option<Event>) -> Option<String> {
    match event {
        None => Some("the connection's event stream ended".to_owned()),
        Some(Event::Error(e)) => Some(format!("connection error: {e}")),
        Some(Event::ConnectionBlocked(reason)) => {
            tracing::warn!(%reason, "the broker blocked this connection (resource alarm); publishing waits");
            None
        }
        Some(Event::ConnectionUnblocked) => {
            tracing::info!("the broker unblocked this connection");
            None
        }
        Some(_) => None,
    }
}

/// Waits up to `grace` for in-flight jobs, then aborts the rest (their deliveries are requeued
/// when the channel closes).
async fn drain(jobs: &mut JoinSet<()>, grace: Duration) {
    while jobs.try_join_next().is_some() {}
    let in_flight = jobs.len();
    if in_flight > 0 {
        tracing::info!(
            in_flight,
            grace_ms = grace.as_millis() as u64,
            "waiting for in-flight jobs"
        );
    }
    let finished =
        tokio::time::timeout(grace, async { while jobs.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::warn!(
            left = jobs.len(),
            "shutdown.grace ran out; requeueing unfinished jobs"
        );
        jobs.abort_all();
        while jobs.join_next().await.is_some() {}
    }
}

/// One job: process, then ack or requeue. The permit is held until the delivery is settled.
async fn handle(
    (ctx, sessions): (Arc<JobContext>, Arc<Sessions>),
    publisher: Arc<Publisher>,
    delivery: Delivery,
    permit: OwnedSemaphorePermit,
    probe: bool,
) {
    let limit = ctx.config.amqp.confirm_timeout;
    let taken = std::time::Instant::now();
    ctx.metrics.in_flight(1);
    // A panic in a job is a bug, but it must not strand the delivery (unacked until the channel
    // closes) nor end the task before the probe and the gauge are settled: it is requeued like
    // a job that could not finish. The job's idempotency ticket was dropped with the panicking
    // future, and an unsettled ticket releases its claim when dropped.
    let sink = AmqpSink::new(&ctx.config.amqp, &sessions, &publisher, &delivery);
    let job = worker::process(&ctx, &sink, delivery::envelope(&delivery), probe);
    let disposition = AssertUnwindSafe(job)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            ctx.metrics.job_panicked();
            // The payload is our own code's panic message (no credential is ever formatted
            // into one: `Secret` prints redacted); capped, as it goes into a log line.
            let message = panic
                .downcast_ref::<&str>()
                .map(|m| (*m).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(
                panic = %capped(message, 200),
                redelivered = delivery::is_redelivery(&delivery),
                delivery_count = delivery::delivery_count(&delivery.properties),
                "the job panicked; requeueing its request and releasing its key"
            );
            Disposition::Requeue("the job panicked".to_owned())
        });
    if probe {
        ctx.breaker.probe_ended();
    }
    match disposition {
        Disposition::Ack => {
            settle("ack", limit, delivery.acker.ack(BasicAckOptions::default())).await
        }
        Disposition::Requeue(reason) => {
            // The broker's count of earlier returns: on RabbitMQ 4.x a quorum queue
            // dead-letters the request once it passes the queue's delivery limit (20 by default).
            tracing::warn!(
                %reason,
                delivery_count = delivery::delivery_count(&delivery.properties),
                "requeueing the request"
            );
            // Only a broken publisher of the current session ends it: one of an earlier session
            // (this job outlived its connection) must not end the healthy one that replaced it.
            sessions
                .report_broken(|current| Arc::ptr_eq(current, &publisher) && !current.is_usable());
            tokio::time::sleep(REQUEUE_DELAY).await;
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            settle("nack", limit, delivery.acker.nack(requeue)).await;
        }
    }
    ctx.metrics.in_flight(-1);
    ctx.metrics.job_settled(taken.elapsed());
    drop(permit);
}

/// Awaits an ack or nack within `limit`; a failure only means the broker will redeliver.
async fn settle(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = Result<bool, lapin::Error>>,
) {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "{what} failed; the broker will redeliver this request")
        }
        Err(_) => tracing::warn!("{what} timed out; the broker will redeliver this request"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of five owned arguments returns.
    fn future_size<A, B, C, D, E, F: Future>(_: impl FnOnce(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn brokers_are_tried_as_written_or_in_an_order_drawn_per_process() {
        let mut config = Config::load(
            None,
            [(
                "AMQP_URL".to_owned(),
                "amqp://a/%2f,amqp://b/%2f,amqp://c/%2f,amqp://d/%2f".to_owned(),
            )],
        )
        .unwrap();
        config.amqp.failover_order = crate::config::FailoverOrder::InOrder;
        let written: Vec<String> = broker_order(&config)
            .iter()
            .map(|u| u.expose().to_owned())
            .collect();
        assert_eq!(
            written,
            [
                "amqp://a/%2f",
                "amqp://b/%2f",
                "amqp://c/%2f",
                "amqp://d/%2f"
            ]
        );
        config.amqp.failover_order = crate::config::FailoverOrder::Shuffle;
        let mut orders = std::collections::HashSet::new();
        for _ in 0..200 {
            let order: Vec<String> = broker_order(&config)
                .iter()
                .map(|u| u.expose().to_owned())
                .collect();
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, written, "a shuffle keeps every broker once");
            orders.insert(order);
        }
        // 24 orders are possible; 200 draws that all fell on a few would be a broken shuffle.
        assert!(orders.len() > 12, "{} orders in 200 draws", orders.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_step_that_fails_keeps_the_brokers_error_as_its_source() {
        let broker_error = lapin::Error::from(lapin::ErrorKind::ChannelsLimitReached);
        let shown = broker_error.to_string();
        let failed = session_step("basic.qos", Duration::from_secs(1), async {
            Err::<(), _>(broker_error)
        })
        .await
        .unwrap_err();
        assert_eq!(
            failed.to_string(),
            format!("opening channels: basic.qos: {shown}")
        );
        let source = std::error::Error::source(&failed).expect("the broker's error");
        assert!(
            source.downcast_ref::<lapin::Error>().is_some(),
            "{source:?}"
        );

        let silent = std::future::pending::<Result<(), lapin::Error>>();
        let late = session_step("basic.consume", Duration::from_millis(10), silent)
            .await
            .unwrap_err();
        assert_eq!(
            late.to_string(),
            "opening channels: basic.consume: no answer within 10ms"
        );
    }

    #[test]
    fn reconnect_pauses_double_up_to_any_configured_cap() {
        let cap = Duration::from_secs(30);
        assert_eq!(
            next_reconnect_delay(RECONNECT_INITIAL, cap),
            Duration::from_secs(1)
        );
        assert_eq!(next_reconnect_delay(Duration::from_secs(20), cap), cap);
        let mut delay = RECONNECT_INITIAL;
        for _ in 0..100 {
            delay = next_reconnect_delay(delay, Duration::MAX);
        }
        assert_eq!(delay, Duration::MAX);
        assert_eq!(next_reconnect_delay(delay, Duration::MAX), Duration::MAX);
    }

    #[test]
    fn a_jobs_state_machine_stays_small() {
        // Every job's future is moved whole when it is spawned and when its nested calls start;
        // it once carried lapin's publish future twice and the rare paths inline (12.6 KiB,
        // a measurable share of the worker's CPU in memmove).
        let size = future_size(handle);
        assert!(
            size <= 8 * 1024,
            "a job's future is {size} bytes; box the large, rare awaits"
        );
    }
}
