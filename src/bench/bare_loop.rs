//! The bare loop (the hidden `bench-bare-loop` command, run by `bench` as a child): consume
//! with prefetch = `worker.concurrency`, POST with the same HTTP client settings, publish a
//! result with a confirm, ack. No validation, no store, no outcome building, no logging: the
//! ceiling the worker is measured against.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

use swr_stage_worker::config::{Config, Secret};
use swr_stage_worker::swr::client::SwrClient;
use swr_stage_worker::trace::TraceContext;

use super::{close_broker, connect_broker, fail, BenchError, Bounded, NET_TIMEOUT};

/// What every job of the loop shares.
#[derive(Clone)]
struct Loop {
    client: SwrClient,
    /// The channel results are published on, with confirms.
    publish: Channel,
    exchange: Arc<str>,
    token: Secret,
}

/// Processes `jobs` deliveries from `amqp.request_queue`, then exits.
pub(super) async fn bare_loop(config: Config, jobs: usize) -> Result<(), BenchError> {
    let broker = connect_broker(&config.amqp, &config.amqp.connection_name).await?;
    let consume = broker.create_channel().bounded().await?;
    consume
        .basic_qos(config.worker.concurrency as u16, BasicQosOptions::default())
        .bounded()
        .await?;
    let publish = broker.create_channel().bounded().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .bounded()
        .await?;
    let client = SwrClient::new(
        &config.swr.endpoint,
        &config.http,
        config.http.client_config().map_err(fail)?,
    )
    .map_err(fail)?;
    let shared = Loop {
        client,
        publish,
        exchange: config.amqp.results_exchange.as_str().into(),
        token: config.swr.auth.token.clone(),
    };
    let mut deliveries = consume
        .basic_consume(
            config.amqp.request_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .bounded()
        .await?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..jobs {
        let delivery = tokio::time::timeout(NET_TIMEOUT, deliveries.next())
            .await
            .map_err(|_| fail(format!("no request delivered within {NET_TIMEOUT:?}")))?
            .ok_or_else(|| fail("consumer ended"))?
            .map_err(fail)?;
        tasks.spawn(bare_job(shared.clone(), delivery, i));
        while let Some(done) = tasks.try_join_next() {
            done.map_err(fail)??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(fail)??;
    }
    close_broker(&broker, "done").await;
    Ok(())
}

/// Job `i`: POST, publish the result with a confirm, ack the delivery.
async fn bare_job(shared: Loop, delivery: Delivery, i: usize) -> Result<(), BenchError> {
    let Loop {
        client,
        publish,
        exchange,
        token,
    } = shared;
    let url = format!(
        "{}/v3/manage/pipelines/{}/stages/0?mode=retry",
        client.endpoint(),
        i + 1
    );
    // A connection the endpoint closed as a request left (keep-alive race) is tried
    // again, as the worker's retry would; the loop must not die of a rare reset.
    let key = format!("bare-{i}");
    // The same headers as the worker's attempts send.
    let trace = TraceContext::root();
    let mut reply = client.attempt(&url, &key, &token, &trace).await;
    for _ in 0..2 {
        if reply.is_ok() {
            break;
        }
        reply = client.attempt(&url, &key, &token, &trace).await;
    }
    let reply = reply.map_err(fail)?;
    if reply.status != 201 {
        return Err(fail(format!("endpoint answered {}", reply.status)));
    }
    let result = format!(r#"{{"pipeline_id":{},"status":"succeeded"}}"#, i + 1);
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(id) = delivery.properties.correlation_id() {
        properties = properties.with_correlation_id(id.clone());
    }
    let confirm = publish
        .basic_publish(
            exchange.as_ref().into(),
            "stage.retry.succeeded".into(),
            BasicPublishOptions::default(),
            result.as_bytes(),
            properties,
        )
        .bounded()
        .await?
        .bounded()
        .await?;
    if !confirm.is_ack() {
        return Err(fail("result nacked"));
    }
    delivery.ack(BasicAckOptions::default()).bounded().await?;
    Ok(())
}
