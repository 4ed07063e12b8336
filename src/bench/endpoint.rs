//! The endpoint every phase calls: the simulator in fast mode (counters only), and how many
//! requests a second it answers on its own, so that a phase's figure is not the endpoint's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use swr_stage_worker::sim::{FaultRule, SimConfig, SimHandle};

use super::{fail, BenchError, Bounded, TOKEN};

/// A fast-mode simulator (counters only) that answers after `delay`, if given.
pub(super) async fn fast_sim(delay: Option<Duration>) -> Result<SimHandle, BenchError> {
    let sim = SimHandle::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            tokens: vec![TOKEN.into()],
            record: false,
            ..SimConfig::default()
        },
    )
    .bounded()
    .await?;
    if let Some(delay) = delay.filter(|d| !d.is_zero()) {
        sim.add_rule(FaultRule {
            delay_ms: Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
            ..FaultRule::default()
        });
    }
    Ok(sim)
}

/// POSTs `n` requests straight at the endpoint with `concurrency` in flight.
pub(super) async fn endpoint_rate(
    url: &str,
    n: usize,
    concurrency: usize,
) -> Result<f64, BenchError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(fail)?;
    let slots = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = slots.clone().acquire_owned().bounded().await?;
        let (client, url) = (
            client.clone(),
            format!("{url}/v3/manage/pipelines/{}/stages/0?mode=retry", 1 + i),
        );
        tasks.spawn(async move {
            let ok = post(&client, &url, &format!("endpoint-{i}")).await;
            drop(permit);
            ok
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(fail)??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn post(client: &reqwest::Client, url: &str, key: &str) -> Result<(), BenchError> {
    let response = client
        .post(url)
        .header("X-Auth-Token", TOKEN)
        .header("Idempotency-Key", key)
        .header(reqwest::header::CONTENT_LENGTH, "0")
        .send()
        .bounded()
        .await?;
    if response.status().as_u16() != 201 {
        return Err(fail(format!("endpoint answered {}", response.status())));
    }
    response.bytes().bounded().await?;
    Ok(())
}
