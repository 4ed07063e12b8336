//! `swr-stage-worker status`: what an operator looks at first. The topology's state on the
//! broker (queue depths, consumer counts, the DLQ, whether the exchanges exist) and, given a
//! worker's telemetry address, its readiness and key counters.
//!
//! Read-only: every broker object is looked at with a passive declare, which never creates or
//! changes anything.

use std::fmt::Write;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};

use crate::amqp::connect;
use crate::config::Config;
use crate::swr::client::read_capped;

/// Limit for each look at the broker or the worker.
const LOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Most bytes read of each answer from a worker's telemetry server (a worker's /metrics is a few
/// KiB): whatever answers at that address cannot make `status` buffer without bound.
const MAX_TELEMETRY_BYTES: usize = 1024 * 1024;

/// Why the status could not be gathered.
#[derive(Debug, thiserror::Error)]
#[error("status: {0}")]
pub struct StatusError(String);

/// Counters worth a glance, in the order they are printed.
const KEY_METRICS: [&str; 8] = [
    "swr_stage_jobs_total",
    "swr_stage_errors_total",
    "swr_stage_job_panics_total",
    "swr_stage_in_flight",
    "swr_stage_replayed_total",
    "swr_stage_retries_total",
    "swr_stage_broker_connected",
    "swr_stage_circuit_open",
];

/// Gathers the report. `telemetry` is a worker's `telemetry.listen` address (host:port).
pub async fn report(config: &Config, telemetry: Option<&str>) -> Result<String, StatusError> {
    let amqp = &config.amqp;
    let mut out = String::new();
    let connection = connect(
        &amqp.url,
        &amqp.tls,
        &format!("{}.status", amqp.connection_name),
        LOOK_TIMEOUT,
    )
    .await
    .map_err(|e| StatusError(e.to_string()))?;
    let _ = writeln!(out, "broker {}", crate::amqp::redact_urls(&amqp.url));
    let _ = writeln!(
        out,
        "{:<40} {:>10} {:>10}",
        "queue", "messages", "consumers"
    );
    for queue in [&amqp.request_queue, &amqp.dead_letter_queue] {
        let line = match queue_state(&connection, queue).await {
            Ok((messages, consumers)) => format!("{queue:<40} {messages:>10} {consumers:>10}"),
            Err(e) => format!("{queue:<40} {e}"),
        };
        let _ = writeln!(out, "{line}");
    }
    for (exchange, kind) in [
        (&amqp.results_exchange, ExchangeKind::Topic),
        (&amqp.dead_letter_exchange, ExchangeKind::Fanout),
    ] {
        let state = exchange_state(&connection, exchange, kind).await;
        let _ = writeln!(out, "exchange {exchange}: {state}");
    }
    let _ = tokio::time::timeout(LOOK_TIMEOUT, connection.close(200, "status done".into())).await;
    if let Some(address) = telemetry {
        out.push_str(&worker_state(address).await);
    }
    Ok(out)
}

/// (messages ready, consumers) of a queue, or why it could not be seen.
async fn queue_state(connection: &Connection, queue: &str) -> Result<(u32, u32), String> {
    // A passive declare of a missing queue closes its channel: one channel per look.
    let look = async {
        let channel = connection.create_channel().await?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let q = channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await?;
        let _ = channel.close(200, "looked".into()).await;
        Ok::<_, lapin::Error>((q.message_count(), q.consumer_count()))
    };
    match tokio::time::timeout(LOOK_TIMEOUT, look).await {
        Ok(Ok(state)) => Ok(state),
        Ok(Err(e)) => Err(format!(
            "missing or unreadable ({e}); a worker declares it at start"
        )),
        Err(_) => Err(format!("no answer within {LOOK_TIMEOUT:?}")),
    }
}

async fn exchange_state(connection: &Connection, exchange: &str, kind: ExchangeKind) -> String {
    let look = async {
        let channel = connection.create_channel().await?;
        let options = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(exchange.into(), kind, options, FieldTable::default())
            .await?;
        let _ = channel.close(200, "looked".into()).await;
        Ok::<_, lapin::Error>(())
    };
    match tokio::time::timeout(LOOK_TIMEOUT, look).await {
        Ok(Ok(())) => "present".into(),
        Ok(Err(e)) => format!("missing ({e})"),
        Err(_) => format!("no answer within {LOOK_TIMEOUT:?}"),
    }
}

/// The worker's readiness and key counters from its telemetry server.
async fn worker_state(address: &str) -> String {
    let base = if address.starts_with("http") {
        address.trim_end_matches('/').to_owned()
    } else {
        format!("http://{address}")
    };
    let client = match reqwest::Client::builder().timeout(LOOK_TIMEOUT).build() {
        Ok(client) => client,
        Err(e) => return format!("worker {base}: {e}\n"),
    };
    let mut out = String::new();
    match client.get(format!("{base}/readyz")).send().await {
        Ok(answer) => {
            let status = answer.status();
            let body = read_text(answer).await;
            let word = if status.is_success() {
                "ready"
            } else {
                "NOT READY"
            };
            let _ = writeln!(out, "worker {base}: {word} {}", body.trim());
        }
        Err(e) => {
            let _ = writeln!(out, "worker {base}: unreachable ({e})");
            return out;
        }
    }
    if let Ok(answer) = client.get(format!("{base}/metrics")).send().await {
        let text = read_text(answer).await;
        for name in KEY_METRICS {
            for line in text
                .lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    out
}

/// An answer's body as text, at most [`MAX_TELEMETRY_BYTES`] of it; empty when it cannot be read.
async fn read_text(answer: reqwest::Response) -> String {
    let body = read_capped(answer, MAX_TELEMETRY_BYTES)
        .await
        .unwrap_or_default();
    String::from_utf8_lossy(&body).into_owned()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A telemetry server whose /readyz and /metrics bodies never end: `status` reads the start
    /// of each and goes on, instead of buffering until its timeout.
    #[tokio::test]
    async fn endless_telemetry_answers_are_read_only_up_to_the_cap() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let first = if request.starts_with(b"GET /readyz") {
                        "ready "
                    } else {
                        "swr_stage_jobs_total{mode=\"retry\",status=\"succeeded\"} 7\n"
                    };
                    let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n";
                    let mut out = format!("{head}{first}").into_bytes();
                    // Ends when the client stops reading and closes the connection.
                    loop {
                        if stream.write_all(&out).await.is_err() {
                            return;
                        }
                        out = vec![b'#'; 64 * 1024];
                    }
                });
            }
        });
        let started = std::time::Instant::now();
        let report = worker_state(&address).await;
        assert!(
            started.elapsed() < LOOK_TIMEOUT,
            "took {:?}",
            started.elapsed()
        );
        assert!(report.contains(": ready ready "), "{}", &report[..200]);
        assert!(
            report.contains("  swr_stage_jobs_total{mode=\"retry\",status=\"succeeded\"} 7\n"),
            "{}",
            &report[..200]
        );
        assert!(report.len() < 2 * MAX_TELEMETRY_BYTES, "{}", report.len());
    }
}
