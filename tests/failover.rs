//! Several broker addresses in `amqp.url`: the worker connects to the first that answers and,
//! when its connection is lost, tries the others before starting over. Against the real broker,
//! reached under two names (127.0.0.1 and localhost) and beside a dead address.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{close_connections_named, TestEnv};
use serde_json::json;
use swr_stage_worker::amqp::connect;
use swr_stage_worker::config::{AmqpTlsConfig, FailoverOrder, Secret};
use swr_stage_worker::outcome::Status;
use swr_stage_worker::worker::JobContext;

/// Nothing listens on port 1: a connect there is refused at once.
fn dead_broker() -> String {
    common::amqp_url().replacen(&format!(":{}/", broker_port()), ":1/", 1)
}

fn broker_port() -> u16 {
    common::amqp_url()
        .parse::<lapin::uri::AMQPUri>()
        .expect("AMQP_URL parses")
        .authority
        .port
}

/// The test broker under its other name, so the two entries of a list can be told apart.
fn by_localhost() -> String {
    common::amqp_url().replacen("127.0.0.1", "localhost", 1)
}

/// Waits until the job context says the session runs on a broker whose URL contains `host`.
async fn wait_for_node(ctx: &JobContext, host: &str) -> String {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let node = ctx.broker_node.lock().unwrap().clone();
        if let Some(node) = node.filter(|n| n.contains(host)) {
            if ctx.metrics.broker_connected() {
                return node;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never consumed from a broker at {host}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_dead_first_broker_is_skipped_and_the_job_runs_on_the_next() {
    let mut env = TestEnv::without_worker("failover_skip", &[]).await;
    env.config.amqp.url = Secret::new(format!("{},{}", dead_broker(), common::amqp_url()));
    env.config.amqp.failover_order = FailoverOrder::InOrder;
    let ctx = Arc::new(JobContext::new(Arc::new(env.config.clone())).await.unwrap());
    env.start_worker_with(ctx.clone());
    let node = wait_for_node(&ctx, "127.0.0.1").await;
    assert!(!node.contains(":1/"), "{node}");
    assert!(
        !node.contains("guest:guest"),
        "the password is hidden: {node}"
    );
    env.publish_json(&json!({"pipeline_id": 7101, "stage_index": 1}))
        .await;
    let (outcome, _) = env.next_outcome().await;
    assert_eq!(outcome.status, Status::Succeeded);
    env.teardown().await;
}

#[tokio::test]
async fn a_lost_connection_moves_the_worker_to_the_next_broker_of_the_list() {
    let mut env = TestEnv::without_worker("failover_move", &[]).await;
    env.config.amqp.url = Secret::new(format!("{},{}", common::amqp_url(), by_localhost()));
    env.config.amqp.failover_order = FailoverOrder::InOrder;
    let ctx = Arc::new(JobContext::new(Arc::new(env.config.clone())).await.unwrap());
    env.start_worker_with(ctx.clone());
    wait_for_node(&ctx, "127.0.0.1").await;
    let name = env.config.amqp.connection_name.clone();
    assert_eq!(close_connections_named(&name).await, 1);
    wait_for_node(&ctx, "localhost").await;
    env.publish_json(&json!({"pipeline_id": 7102, "stage_index": 1}))
        .await;
    let (outcome, _) = env.next_outcome().await;
    assert_eq!(outcome.status, Status::Succeeded);
    env.teardown().await;
}

#[tokio::test]
async fn tools_take_the_list_too_and_never_send_it_as_a_vhost() {
    // The second entry has a wrong password: were the list sent whole, it would be a vhost name
    // and the broker would refuse it, quoting it.
    let list = Secret::new(format!(
        "{},amqp://guest:hunter2@127.0.0.1:1/%2f",
        common::amqp_url()
    ));
    let connection = connect(
        &list,
        &AmqpTlsConfig::default(),
        &common::unique("failover_tool"),
        Duration::from_secs(10),
    )
    .await
    .expect("the first broker of the list answers");
    assert!(connection.status().connected());
    connection.close(200, "test done".into()).await.unwrap();

    let none = Secret::new(format!(
        "{},amqp://guest:hunter2@127.0.0.1:1/%2f",
        dead_broker()
    ));
    let error = connect(
        &none,
        &AmqpTlsConfig::default(),
        &common::unique("failover_none"),
        Duration::from_secs(10),
    )
    .await
    .expect_err("no broker of the list answers");
    let text = error.to_string();
    assert!(text.starts_with("no broker answered"), "{text}");
    assert_eq!(
        text.matches("cannot connect to RabbitMQ at").count(),
        2,
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}
