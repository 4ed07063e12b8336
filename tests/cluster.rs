//! Failover across a three-node RabbitMQ cluster (`scripts/rabbitmq-cluster.sh`: rabbit-a, -b
//! and -c on 127.0.0.1:5681-5683). Each test brings the cluster up if it is not (`up` is
//! idempotent), stops or kills nodes, and leaves all three running. The accounting is the fault
//! suite's: every key answered, SWR executions per key, fresh (non-replayed) outcomes per key,
//! the dead-letter queue. Each test prints its figures (run with `--no-capture` to see them).
//!
//! They stop and kill broker nodes, so they are `#[ignore]`d and run in the serial step of the
//! test command (`--run-ignored only --test-threads 1`). `SWR_TEST_CLUSTER=skip` skips them
//! (.ci/run's RabbitMQ 4.x pass: the cluster is the host's 3.10, already tested in the 3.10 pass).

mod common;

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde_json::json;
use tokio::task::JoinHandle;

use common::{WorkerProcess, TOKEN};
use swr_stage_worker::amqp::{connect, topology};
use swr_stage_worker::config::{AmqpTlsConfig, Config, Secret};
use swr_stage_worker::outcome::{Outcome, Status};
use swr_stage_worker::sim::{FaultRule, SimConfig, SimHandle};
use swr_stage_worker::worker::JobContext;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq-cluster.sh");
const NODES: [char; 3] = ['a', 'b', 'c'];

fn skipped() -> bool {
    if std::env::var("SWR_TEST_CLUSTER").is_ok_and(|v| v == "skip") {
        eprintln!("skipped: SWR_TEST_CLUSTER=skip (the cluster tests ran in another pass)");
        return true;
    }
    false
}

fn pg_url() -> String {
    std::env::var("IDEMPOTENCY_TEST_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Runs the cluster script and returns its output; a failure fails the test with that output.
async fn cluster(args: &[&str]) -> String {
    let run = tokio::process::Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .unwrap_or_else(|_| panic!("rabbitmq-cluster.sh {args:?} did not finish within 300 s"))
        .expect("bash runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "rabbitmq-cluster.sh {args:?}: {text}"
    );
    text
}

/// The same script call in the background, so the test keeps reading outcomes meanwhile.
fn cluster_in_background(args: &[&'static str]) -> JoinHandle<String> {
    let args = args.to_vec();
    tokio::spawn(async move { cluster(&args).await })
}

fn port(node: char) -> u16 {
    5681 + (node as u16 - 'a' as u16)
}

fn node_url(node: char) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/%2f", port(node))
}

/// `amqp.url` for a list of nodes, in that order.
fn list(nodes: &[char]) -> String {
    nodes
        .iter()
        .map(|&n| node_url(n))
        .collect::<Vec<_>>()
        .join(",")
}

/// The node a (redacted) broker URL names.
fn node_of(url: &str) -> char {
    NODES
        .into_iter()
        .find(|&n| url.contains(&format!(":{}/", port(n))))
        .unwrap_or_else(|| panic!("{url} is not a cluster node"))
}

/// The node that holds the quorum queue's leader, asked of `via`.
async fn leader_of(queue: &str, via: char) -> char {
    let via = via.to_string();
    let listing = cluster(&[
        "ctl",
        &via,
        "list_queues",
        "name",
        "leader",
        "--quiet",
        "--no-table-headers",
    ])
    .await;
    let leader = listing
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(queue)).then(|| fields.next().map(str::to_owned))?
        })
        .unwrap_or_else(|| panic!("{queue} has no leader in: {listing}"));
    NODES
        .into_iter()
        .find(|&n| leader == format!("rabbit-{n}@localhost"))
        .unwrap_or_else(|| panic!("unknown leader {leader}"))
}

/// Consumers of `queue`, asked of `via`.
async fn consumers_of(queue: &str, via: char) -> u32 {
    let via = via.to_string();
    let listing = cluster(&[
        "ctl",
        &via,
        "list_queues",
        "name",
        "consumers",
        "--quiet",
        "--no-table-headers",
    ])
    .await;
    listing
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(queue)).then(|| fields.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

/// The test's view of the results: a quorum queue bound to the results exchange (a classic
/// queue would be lost with its node), read with manual acks over a connection that moves to
/// another node when its own goes away.
struct Outcomes {
    urls: Secret,
    queue: String,
    exchange: String,
    name: String,
    session: Option<(Connection, Channel, Consumer)>,
    /// Bodies seen, so a delivery the broker redelivers to the test (its ack was lost with a
    /// connection) is not counted twice. A second copy the worker published is not redelivered
    /// and is counted.
    seen: HashSet<u64>,
    /// When each counted outcome arrived.
    pub arrivals: Vec<Instant>,
}

impl Outcomes {
    fn new(prefix: &str, config: &Config, nodes: &[char]) -> Outcomes {
        Outcomes {
            urls: Secret::new(list(nodes)),
            queue: format!("{prefix}.seen"),
            exchange: config.amqp.results_exchange.clone(),
            name: format!("{prefix}.test"),
            session: None,
            seen: HashSet::new(),
            arrivals: Vec::new(),
        }
    }

    async fn open(&mut self) -> Result<(), String> {
        let connection = connect(
            &self.urls,
            &AmqpTlsConfig::default(),
            &self.name,
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| e.to_string())?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| e.to_string())?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        let opened = async {
            channel
                .queue_declare(
                    self.queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await?;
            channel
                .queue_bind(
                    self.queue.as_str().into(),
                    self.exchange.as_str().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            channel.basic_qos(1_000, BasicQosOptions::default()).await?;
            channel
                .basic_consume(
                    self.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        };
        let consumer = opened.await.map_err(|e| e.to_string())?;
        self.session = Some((connection, channel, consumer));
        Ok(())
    }

    /// The next outcome; reconnects (within 60 s) when the session is lost.
    async fn next(&mut self) -> Outcome {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.session.is_none() {
                if let Err(e) = self.open().await {
                    assert!(
                        Instant::now() < deadline,
                        "the test could not reach the cluster for 60 s: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            let (_, _, consumer) = self.session.as_mut().expect("open");
            match tokio::time::timeout(common::WAIT, consumer.next()).await {
                Err(_) => panic!("no outcome within {:?}", common::WAIT),
                Ok(Some(Ok(delivery))) => {
                    let mut hasher = DefaultHasher::new();
                    delivery.data.hash(&mut hasher);
                    let fresh_body = self.seen.insert(hasher.finish());
                    // A lost ack is redelivered later; the body is then known.
                    let _ = delivery.ack(Default::default()).await;
                    if !fresh_body && delivery.redelivered {
                        continue;
                    }
                    self.arrivals.push(Instant::now());
                    return serde_json::from_slice(&delivery.data).expect("contract JSON");
                }
                Ok(_) => {
                    self.session = None;
                }
            }
        }
    }

    async fn channel(&mut self) -> Channel {
        let lost = self
            .session
            .as_ref()
            .is_some_and(|(connection, channel, _)| {
                !connection.status().connected() || !channel.status().connected()
            });
        if lost {
            self.session = None;
        }
        if self.session.is_none() {
            self.open().await.expect("the cluster answers");
        }
        self.session.as_ref().expect("open").1.clone()
    }

    /// The longest pause between two outcomes that arrived after `since`, and when the outcome
    /// that ended it arrived, counted from `since`.
    fn longest_gap_after(&self, since: Instant) -> (Duration, Duration) {
        let after: Vec<Instant> = self
            .arrivals
            .iter()
            .copied()
            .filter(|&t| t >= since)
            .collect();
        let mut gap = (Duration::ZERO, Duration::ZERO);
        let mut before = since;
        for t in after {
            if t - before > gap.0 {
                gap = (t - before, t - since);
            }
            before = t;
        }
        gap
    }

    async fn close(mut self) {
        if let Some((connection, _, _)) = self.session.take() {
            let _ = connection.close(200, "test done".into()).await;
        }
    }
}

/// One test's world on the cluster: the simulator, the topology (declared through `via`), the
/// outcome reader, and the test's environment for workers.
struct ClusterEnv {
    prefix: String,
    sim: SimHandle,
    config: Config,
    vars: Vec<(String, String)>,
    outcomes: Outcomes,
}

impl ClusterEnv {
    /// `workers`: the `amqp.url` the workers get; `test`: the nodes the test reads through, in
    /// order; `extra`: more configuration.
    async fn start(
        name: &str,
        workers: &str,
        test: &[char],
        extra: &[(&str, &str)],
        swr_delay_ms: u64,
    ) -> ClusterEnv {
        cluster(&["up"]).await;
        let prefix = common::unique(name);
        let sim = SimHandle::start(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            SimConfig {
                tokens: vec![TOKEN.to_owned()],
                ..SimConfig::default()
            },
        )
        .await
        .expect("simulator starts");
        if swr_delay_ms > 0 {
            sim.add_rule(FaultRule {
                delay_ms: Some(swr_delay_ms),
                ..FaultRule::default()
            });
        }
        let mut extra: Vec<(&str, &str)> = extra.to_vec();
        extra.extend([
            ("AMQP_URL", workers),
            ("SWR_STAGE_WORKER__AMQP__RECONNECT_MAX_INTERVAL", "2s"),
            // Pipeline ids are random per test, but the guard is about loops, not this traffic.
            ("SWR_STAGE_WORKER__GUARD__MAX_EXECUTIONS", "0"),
        ]);
        let vars = common::test_env(&prefix, &sim.url(), &extra);
        let config = Config::load(None, vars.clone()).expect("test configuration is valid");
        // The topology first, as the worker would declare it: the outcome queue binds to it.
        let setup = connect(
            &Secret::new(list(test)),
            &AmqpTlsConfig::default(),
            &format!("{prefix}.setup"),
            Duration::from_secs(10),
        )
        .await
        .expect("the cluster answers");
        let channel = setup.create_channel().await.unwrap();
        topology::declare(&channel, &config.amqp)
            .await
            .expect("topology on the cluster");
        let _ = setup.close(200, "declared".into()).await;
        let mut outcomes = Outcomes::new(&prefix, &config, test);
        outcomes.channel().await;
        ClusterEnv {
            prefix,
            sim,
            config,
            vars,
            outcomes,
        }
    }

    /// `n` requests with keys `<prefix>-<first + i>`, confirmed.
    async fn publish(&mut self, first: usize, n: usize) -> Vec<String> {
        let channel = self.outcomes.channel().await;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let base = 1 + (uuid::Uuid::new_v4().as_u128() % 1_000_000_000) as usize;
        let mut keys = Vec::with_capacity(n);
        for chunk in (first..first + n).collect::<Vec<_>>().chunks(1_000) {
            for &i in chunk {
                let key = format!("{}-{i}", self.prefix);
                let body =
                    json!({"pipeline_id": base + i, "stage_index": i % 4, "idempotency_key": key});
                channel
                    .basic_publish(
                        "".into(),
                        self.config.amqp.request_queue.as_str().into(),
                        BasicPublishOptions::default(),
                        body.to_string().as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap();
                keys.push(key);
            }
            assert!(
                channel.wait_for_confirms().await.unwrap().is_empty(),
                "the cluster took every request"
            );
        }
        keys
    }

    async fn dead_letters(&mut self) -> u32 {
        let channel = self.outcomes.channel().await;
        channel
            .queue_declare(
                self.config.amqp.dead_letter_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the dead-letter queue")
            .message_count()
    }

    /// Removes the test's queues and exchanges.
    async fn teardown(mut self) {
        let channel = self.outcomes.channel().await;
        let amqp = &self.config.amqp;
        for q in [
            amqp.request_queue.as_str(),
            amqp.dead_letter_queue.as_str(),
            self.outcomes.queue.as_str(),
        ] {
            let _ = channel.queue_delete(q.into(), Default::default()).await;
        }
        for x in [&amqp.dead_letter_exchange, &amqp.results_exchange] {
            let _ = channel
                .exchange_delete(x.as_str().into(), Default::default())
                .await;
        }
        self.outcomes.close().await;
        self.sim.shutdown().await;
    }
}

/// What a run of outcomes says about its keys.
#[derive(Debug)]
struct Tally {
    keys: usize,
    outcomes: usize,
    /// Keys with no fresh outcome (only replays), and with two or more.
    fresh_none: usize,
    fresh_many: usize,
    not_succeeded: usize,
    max_executions: u32,
    executed_keys: usize,
}

/// Reads outcomes until every key in `keys` has one, calling `during` after each.
async fn collect_all(
    env: &mut ClusterEnv,
    keys: &[String],
    mut during: impl AsyncFnMut(usize),
) -> Vec<Outcome> {
    let wanted: HashSet<&str> = keys.iter().map(String::as_str).collect();
    let mut answered: HashSet<String> = HashSet::new();
    let mut all = Vec::new();
    while answered.len() < wanted.len() {
        let outcome = env.outcomes.next().await;
        if wanted.contains(outcome.idempotency_key.as_str()) {
            answered.insert(outcome.idempotency_key.clone());
        }
        all.push(outcome);
        during(answered.len()).await;
    }
    all
}

fn tally(env: &ClusterEnv, keys: &[String], outcomes: &[Outcome]) -> Tally {
    let mut fresh: HashMap<&str, usize> = HashMap::new();
    for o in outcomes.iter().filter(|o| !o.replayed) {
        *fresh.entry(o.idempotency_key.as_str()).or_default() += 1;
    }
    let executions = env.sim.executions();
    Tally {
        keys: keys.len(),
        outcomes: outcomes.len(),
        fresh_none: keys
            .iter()
            .filter(|k| !fresh.contains_key(k.as_str()))
            .count(),
        fresh_many: fresh.values().filter(|&&n| n > 1).count(),
        not_succeeded: outcomes
            .iter()
            .filter(|o| o.status != Status::Succeeded)
            .count(),
        max_executions: executions.values().copied().max().unwrap_or(0),
        executed_keys: keys
            .iter()
            .filter(|k| executions.contains_key(k.as_str()))
            .count(),
    }
}

/// The guarantees every scenario keeps; `tolerated` keys may lack exactly one fresh outcome
/// (jobs in flight on a connection that was lost: docs/contract.md, "Windows").
fn assert_guarantees(name: &str, t: &Tally, tolerated: usize) {
    assert_eq!(t.not_succeeded, 0, "{name}: every job succeeded: {t:?}");
    assert_eq!(
        t.executed_keys, t.keys,
        "{name}: every key reached SWR: {t:?}"
    );
    assert_eq!(t.max_executions, 1, "{name}: SWR ran each key once: {t:?}");
    assert!(
        t.fresh_none + t.fresh_many <= tolerated,
        "{name}: at most {tolerated} keys without exactly one fresh outcome: {t:?}"
    );
}

/// Waits until the worker's session runs on a node other than `lost`; returns that node.
async fn wait_moved(ctx: &JobContext, lost: char) -> char {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let node = ctx.broker_node.lock().unwrap().clone();
        if let Some(node) = node.map(|n| node_of(&n)).filter(|&n| n != lost) {
            if ctx.metrics.broker_connected() {
                return node;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not move off rabbit-{lost} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_connected(ctx: &JobContext) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ctx.metrics.broker_connected() {
        assert!(
            Instant::now() < deadline,
            "the worker did not consume within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An in-process worker on `env`'s configuration; returns its context and the stop switch.
async fn start_worker(
    env: &ClusterEnv,
) -> (
    Arc<JobContext>,
    tokio::sync::oneshot::Sender<()>,
    JoinHandle<Result<(), swr_stage_worker::service::RunError>>,
) {
    let ctx = Arc::new(
        JobContext::new(Arc::new(env.config.clone()))
            .await
            .expect("job context"),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(swr_stage_worker::service::run_with_context(
        ctx.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    wait_connected(&ctx).await;
    (ctx, stop, worker)
}

async fn stop_worker(
    stop: tokio::sync::oneshot::Sender<()>,
    worker: JoinHandle<Result<(), swr_stage_worker::service::RunError>>,
) {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), worker)
        .await
        .expect("the worker stops within 60 s")
        .expect("worker task")
        .expect("the worker ends cleanly");
}

/// Two worker processes sharing PostgreSQL, 5,000 requests; the node holding the request
/// queue's leader is stopped at 30% and started again at 60%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops cluster nodes: runs in the serial step (--run-ignored only --test-threads 1)"]
async fn the_request_queue_leader_stopped_mid_run() {
    if skipped() {
        return;
    }
    const JOBS: usize = 5_000;
    let pg = pg_url();
    let mut env = ClusterEnv::start(
        "cluster_leader",
        &list(&NODES),
        &['a', 'b', 'c'],
        &[
            ("SWR_STAGE_WORKER__IDEMPOTENCY__BACKEND", "postgres"),
            ("SWR_STAGE_WORKER__IDEMPOTENCY__URL", &pg),
        ],
        // 2 workers × 16 jobs in flight, 50 ms each: about 640 jobs/s, so the run lasts ~8 s.
        50,
    )
    .await;
    let keys = env.publish(0, JOBS).await;
    let queue = env.config.amqp.request_queue.clone();
    let leader = leader_of(&queue, 'a').await;
    let mut workers: Vec<WorkerProcess> = (0..2)
        .map(|i| {
            let mut vars = env.vars.clone();
            let name = format!("{}.w{i}", env.prefix);
            vars.push((
                "SWR_STAGE_WORKER__AMQP__CONNECTION_NAME".into(),
                name.clone(),
            ));
            vars.push(("RUST_LOG".into(), "warn".into()));
            WorkerProcess::spawn(&vars, &name)
        })
        .collect();
    let started = Instant::now();
    let mut stop: Option<(Instant, JoinHandle<String>)> = None;
    let mut restart: Option<JoinHandle<String>> = None;
    let leader_name: &'static str = ["a", "b", "c"][(leader as u8 - b'a') as usize];
    let outcomes = collect_all(&mut env, &keys, async |answered| {
        if stop.is_none() && answered >= JOBS * 3 / 10 {
            stop = Some((
                Instant::now(),
                cluster_in_background(&["stop", leader_name]),
            ));
        }
        let stopped = stop.as_ref().is_some_and(|(_, task)| task.is_finished());
        if restart.is_none() && stopped && answered >= JOBS * 6 / 10 {
            restart = Some(cluster_in_background(&["start", leader_name]));
        }
    })
    .await;
    let total = started.elapsed();
    let (stopped_at, stopping) = stop.expect("the leader was stopped mid-run");
    stopping.await.expect("stop task");
    match restart {
        Some(task) => task.await.expect("start task"),
        None => cluster(&["start", leader_name]).await,
    };
    let (gap, resumed) = env.outcomes.longest_gap_after(stopped_at);
    // Both workers consume again (one of them was on the stopped node, or both, or none).
    let survivor = NODES.into_iter().find(|&n| n != leader).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let consumers = consumers_of(&queue, survivor).await;
        if consumers == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both workers consume again within 60 s (consumers: {consumers})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for w in workers.drain(..) {
        let (status, log) = w.terminate().await;
        assert!(
            status.success(),
            "worker exit {status:?}; log tail: {}",
            log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        );
    }
    let t = tally(&env, &keys, &outcomes);
    let dead = env.dead_letters().await;
    println!(
        "leader rabbit-{leader} stopped at 30%: {} keys, {} outcomes, fresh none/2+ {}/{}, max SWR executions {}, DLQ {dead}, longest pause in outcomes {:.2} s (ended {:.2} s after the stop), run {:.1} s",
        t.keys,
        t.outcomes,
        t.fresh_none,
        t.fresh_many,
        t.max_executions,
        gap.as_secs_f64(),
        resumed.as_secs_f64(),
        total.as_secs_f64()
    );
    assert_eq!(dead, 0, "nothing was dead-lettered");
    // Only jobs in flight on a lost connection (16 per worker) can lack their one fresh outcome.
    assert_guarantees("leader stopped", &t, 32);
    env.teardown().await;
}

/// The node a worker is connected to is killed (`kill -9` of its Erlang VM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills a cluster node: runs in the serial step (--run-ignored only --test-threads 1)"]
async fn the_node_a_worker_uses_is_killed() {
    if skipped() {
        return;
    }
    const JOBS: usize = 2_000;
    let mut env = ClusterEnv::start(
        "cluster_kill",
        &list(&NODES),
        &['c', 'b'],
        &[("SWR_STAGE_WORKER__AMQP__FAILOVER_ORDER", "in_order")],
        20,
    )
    .await;
    let keys = env.publish(0, JOBS).await;
    let (ctx, stop, worker) = start_worker(&env).await;
    let victim = node_of(&ctx.broker_node.lock().unwrap().clone().expect("a node"));
    assert_eq!(victim, 'a', "in_order: the worker starts on the first node");
    let mut killed: Option<Instant> = None;
    let mut moved: Option<(char, Duration)> = None;
    let outcomes = collect_all(&mut env, &keys, async |answered| {
        if killed.is_none() && answered >= JOBS * 3 / 10 {
            let at = Instant::now();
            cluster(&["kill", "a"]).await;
            killed = Some(at);
            let node = wait_moved(&ctx, victim).await;
            moved = Some((node, at.elapsed()));
        }
    })
    .await;
    let (node, took) = moved.expect("the node was killed mid-run");
    cluster(&["start", "a"]).await;
    stop_worker(stop, worker).await;
    let t = tally(&env, &keys, &outcomes);
    let dead = env.dead_letters().await;
    println!(
        "rabbit-a killed at 30%: the worker consumed from rabbit-{node} {:.2} s later; {} keys, {} outcomes, fresh none/2+ {}/{}, max SWR executions {}, DLQ {dead}",
        took.as_secs_f64(),
        t.keys,
        t.outcomes,
        t.fresh_none,
        t.fresh_many,
        t.max_executions
    );
    // The first pause after a loss is 500 ms, then the other nodes are tried at once.
    assert!(
        took < Duration::from_secs(10),
        "the worker moved within its first back-off and a connect: {took:?}"
    );
    assert_eq!(dead, 0, "nothing was dead-lettered");
    assert_guarantees("connected node killed", &t, 16);
    env.teardown().await;
}

/// A node that neither the worker nor the test uses dies: nothing but, perhaps, a short pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills a cluster node: runs in the serial step (--run-ignored only --test-threads 1)"]
async fn a_node_no_worker_uses_dies() {
    if skipped() {
        return;
    }
    const JOBS: usize = 2_000;
    let mut env = ClusterEnv::start(
        "cluster_bystander",
        &list(&NODES),
        &['a'],
        &[("SWR_STAGE_WORKER__AMQP__FAILOVER_ORDER", "in_order")],
        20,
    )
    .await;
    let keys = env.publish(0, JOBS).await;
    let (ctx, stop, worker) = start_worker(&env).await;
    let connects = ctx.metrics.broker_connects();
    let mut killed: Option<Instant> = None;
    let outcomes = collect_all(&mut env, &keys, async |answered| {
        if killed.is_none() && answered >= JOBS * 3 / 10 {
            let at = Instant::now();
            cluster(&["kill", "c"]).await;
            killed = Some(at);
        }
    })
    .await;
    let (gap, _) = env
        .outcomes
        .longest_gap_after(killed.expect("the node was killed mid-run"));
    let node = node_of(&ctx.broker_node.lock().unwrap().clone().expect("a node"));
    let connects_after = ctx.metrics.broker_connects();
    cluster(&["start", "c"]).await;
    stop_worker(stop, worker).await;
    let t = tally(&env, &keys, &outcomes);
    let dead = env.dead_letters().await;
    println!(
        "rabbit-c (unused) killed at 30%: longest pause in outcomes {:.2} s; {} keys, {} outcomes, fresh none/2+ {}/{}, max SWR executions {}, DLQ {dead}",
        gap.as_secs_f64(),
        t.keys,
        t.outcomes,
        t.fresh_none,
        t.fresh_many,
        t.max_executions
    );
    assert_eq!(node, 'a', "the worker stayed on its node");
    assert_eq!(
        connects_after, connects,
        "the worker's session was never lost"
    );
    assert_eq!(dead, 0, "nothing was dead-lettered");
    assert_guarantees("unused node killed", &t, 0);
    env.teardown().await;
}

/// All three nodes stop; the worker waits without spinning and resumes when they are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the whole cluster: runs in the serial step (--run-ignored only --test-threads 1)"]
async fn all_nodes_down_then_up() {
    if skipped() {
        return;
    }
    const DOWN_FOR: Duration = Duration::from_secs(10);
    let mut env = ClusterEnv::start(
        "cluster_all_down",
        &list(&NODES),
        &NODES,
        &[("SWR_STAGE_WORKER__AMQP__FAILOVER_ORDER", "in_order")],
        0,
    )
    .await;
    let (ctx, stop, worker) = start_worker(&env).await;
    let mut keys = env.publish(0, 200).await;
    let mut outcomes = collect_all(&mut env, &keys, async |_| {}).await;

    let stops: Vec<JoinHandle<String>> = [["stop", "a"], ["stop", "b"], ["stop", "c"]]
        .iter()
        .map(|args| cluster_in_background(args))
        .collect();
    for s in stops {
        s.await.expect("stop task");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctx.metrics.broker_connected() {
        assert!(Instant::now() < deadline, "the worker saw the cluster go");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The outage lasts a fixed time: what the worker does during it is what is measured.
    let (connects_before, cpu_before) = (
        ctx.metrics.broker_connects(),
        swr_stage_worker::procstat::cpu_seconds(std::process::id()).expect("/proc"),
    );
    tokio::time::sleep(DOWN_FOR).await;
    let (connects_down, cpu_down) = (
        ctx.metrics.broker_connects() - connects_before,
        swr_stage_worker::procstat::cpu_seconds(std::process::id()).expect("/proc") - cpu_before,
    );
    let up = Instant::now();
    cluster(&["up"]).await;
    let cluster_up = up.elapsed();
    wait_connected(&ctx).await;
    let resumed = up.elapsed();
    keys.extend(env.publish(200, 200).await);
    outcomes.extend(collect_all(&mut env, &keys[200..], async |_| {}).await);
    stop_worker(stop, worker).await;
    let t = tally(&env, &keys, &outcomes);
    println!(
        "all nodes down for {DOWN_FOR:?}: {connects_down} session attempts, {cpu_down:.2} s CPU (test process); the cluster was back {:.1} s after `up`, the worker consuming {:.1} s after; {} keys, fresh none/2+ {}/{}, max SWR executions {}",
        cluster_up.as_secs_f64(),
        resumed.as_secs_f64(),
        t.keys,
        t.fresh_none,
        t.fresh_many,
        t.max_executions
    );
    // Back-off from 500 ms doubling to amqp.reconnect_max_interval (2 s): about 7 attempts in
    // 10 s. A loop without the pause would make thousands.
    assert!(
        (2..=12).contains(&connects_down),
        "the worker kept trying, with back-off: {connects_down} attempts in {DOWN_FOR:?}"
    );
    assert!(
        cpu_down < DOWN_FOR.as_secs_f64() / 10.0,
        "the worker did not spin: {cpu_down:.2} s CPU in {DOWN_FOR:?}"
    );
    assert_guarantees("all nodes down", &t, 0);
    env.teardown().await;
}
