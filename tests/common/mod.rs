//! Test harness: a real RabbitMQ (AMQP_URL, default localhost), the in-process SWR simulator, and
//! a worker with its own uniquely named queues and exchanges, so tests run in parallel.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use swr_stage_worker::amqp::topology;
use swr_stage_worker::config::{Config, Secret};
use swr_stage_worker::outcome::Outcome;
use swr_stage_worker::service::{self, RunError};
use swr_stage_worker::sim::{SimConfig, SimHandle};
use swr_stage_worker::worker::JobContext;

/// The token the test simulator accepts.
pub const TOKEN: &str = "test-token-5ecr3t-value";
/// Longest wait for any single expected event.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// The PostgreSQL database the tests that use the postgres idempotency backend share: the host's
/// (127.0.0.1:5432, database `test`) unless IDEMPOTENCY_TEST_URL names another, e.g. the
/// docker-compose stack's (docs/docker.md).
pub fn pg_url() -> String {
    std::env::var("IDEMPOTENCY_TEST_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Connects to the test broker or fails with the fix.
pub async fn broker(name: &str) -> Connection {
    let url = Secret::new(amqp_url());
    match swr_stage_worker::amqp::connect(
        &url,
        &Default::default(),
        name,
        Duration::from_secs(10),
    )
    .await {
        Ok(c) => c,
        Err(e) => panic!(
            "these tests need RabbitMQ: {e}. Start it with `rabbitmq-server -detached` (or `docker compose up -d rabbitmq`), or set AMQP_URL"
        ),
    }
}

/// A unique name prefix for one test.
pub fn unique(test: &str) -> String {
    format!(
        "t.{test}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Configuration for a test worker: own names, the simulator, short retry intervals.
pub fn test_config(prefix: &str, sim_url: &str, extra: &[(&str, &str)]) -> Config {
    Config::load(None, test_env(prefix, sim_url, extra)).expect("test configuration is valid")
}

/// The same configuration as environment variables, for running the binary.
pub fn test_env(prefix: &str, sim_url: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("AMQP_URL".into(), amqp_url()),
        ("SWR_ENDPOINT".into(), sim_url.to_owned()),
        ("SWR_AUTH_TOKEN".into(), TOKEN.to_owned()),
        // The simulator also serves IAM; only used with swr.auth.kind = "iam_password".
        ("SWR_STAGE_WORKER__IAM__ENDPOINT".into(), sim_url.to_owned()),
        (
            "SWR_STAGE_WORKER__RETRY__INITIAL_INTERVAL".into(),
            "10ms".into(),
        ),
        (
            "SWR_STAGE_WORKER__RETRY__MAX_INTERVAL".into(),
            "50ms".into(),
        ),
        ("SWR_STAGE_WORKER__RETRY__MAX_ELAPSED".into(), "20s".into()),
        ("SWR_STAGE_WORKER__HTTP__TIMEOUT".into(), "2s".into()),
        ("SWR_STAGE_WORKER__WORKER__CONCURRENCY".into(), "16".into()),
        ("SWR_STAGE_WORKER__SHUTDOWN__GRACE".into(), "10s".into()),
        // Tests that want the telemetry server pick a free port themselves.
        ("SWR_STAGE_WORKER__TELEMETRY__LISTEN".into(), String::new()),
        (
            "SWR_STAGE_WORKER__IDEMPOTENCY__PATH".into(),
            store_path(prefix),
        ),
    ];
    env.extend(broker_names(prefix));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// The environment that names the test's broker objects and connection after `prefix`.
fn broker_names(prefix: &str) -> Vec<(String, String)> {
    let mut amqp = Config::load(None, Vec::new())
        .expect("the defaults load")
        .amqp;
    amqp.name_after(prefix);
    amqp.names_env()
}

/// The worker binary as a child process with the test's configuration; stderr goes to a file
/// (trace output is too large for a pipe nobody reads while the test waits).
pub struct WorkerProcess {
    pub child: tokio::process::Child,
    pub log: std::path::PathBuf,
}

impl WorkerProcess {
    pub fn spawn(env: &[(String, String)], name: &str) -> WorkerProcess {
        let log = std::env::temp_dir()
            .join("swr-stage-worker-tests")
            .join(format!("{name}.log"));
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let file = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_swr-stage-worker"))
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().cloned())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("worker binary starts");
        WorkerProcess { child, log }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// SIGKILL: no drain, no cleanup, as a crash.
    pub async fn kill9(mut self) {
        self.signal("KILL");
        let _ = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("killed process exits");
    }

    /// SIGTERM twice (the second once the first is being handled): the worker exits at once.
    pub async fn terminate_twice(mut self) -> (std::process::ExitStatus, String) {
        self.signal("TERM");
        let deadline = tokio::time::Instant::now() + WAIT;
        // Wait for the first signal to be taken (the drain is logged) before sending the second.
        while !std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .contains("shutdown requested")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the first SIGTERM was not taken"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.signal("TERM");
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exits")
            .unwrap();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        (status, log)
    }

    /// SIGTERM and wait: returns the exit status and the log.
    pub async fn terminate(mut self) -> (std::process::ExitStatus, String) {
        self.signal("TERM");
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        (status, log)
    }
}

/// A fresh embedded-store file for one test (under the system temp dir).
pub fn store_path(prefix: &str) -> String {
    std::env::temp_dir()
        .join("swr-stage-worker-tests")
        .join(format!("{prefix}.db"))
        .display()
        .to_string()
}

/// A worker task and the sender that stops it.
type RunningWorker = (oneshot::Sender<()>, JoinHandle<Result<(), RunError>>);

/// One test's world: simulator, worker, a queue that sees every outcome.
pub struct TestEnv {
    pub prefix: String,
    pub config: Config,
    pub sim: SimHandle,
    pub conn: Connection,
    pub channel: Channel,
    outcomes: Consumer,
    /// Hashes of the outcome bodies read, so one the broker redelivers to the test (its ack
    /// was lost with the test's connection, e.g. in a broker restart) is not counted twice.
    seen: std::collections::HashSet<u64>,
    worker: Option<RunningWorker>,
}

impl TestEnv {
    pub async fn start(test: &str) -> TestEnv {
        TestEnv::start_with(test, &[]).await
    }

    /// Starts the simulator and a worker; `extra` are env-style config overrides.
    pub async fn start_with(test: &str, extra: &[(&str, &str)]) -> TestEnv {
        let mut env = TestEnv::without_worker(test, extra).await;
        env.start_worker();
        env
    }

    /// Everything but the worker (for tests that run the binary or start it later).
    pub async fn without_worker(test: &str, extra: &[(&str, &str)]) -> TestEnv {
        let sim = SimConfig {
            tokens: vec![TOKEN.to_owned()],
            ..SimConfig::default()
        };
        TestEnv::with_sim(test, sim, extra).await
    }

    /// Everything but the worker, with the simulator configured by the test (e.g. IAM users).
    pub async fn with_sim(test: &str, sim: SimConfig, extra: &[(&str, &str)]) -> TestEnv {
        let prefix = unique(test);
        let sim = SimHandle::start(SocketAddr::from(([127, 0, 0, 1], 0)), sim)
            .await
            .expect("simulator starts");
        let config = test_config(&prefix, &sim.url(), extra);
        let conn = broker(&format!("{prefix}.test")).await;
        let channel = conn.create_channel().await.unwrap();
        topology::declare(&channel, &config.amqp)
            .await
            .expect("topology");
        let outcomes = watch_outcomes(&channel, &prefix, &config.amqp.results_exchange).await;

        channel.confirm_select(Default::default()).await.unwrap();
        TestEnv {
            prefix,
            config,
            sim,
            conn,
            channel,
            outcomes,
            seen: std::collections::HashSet::new(),
            worker: None,
        }
    }

    pub fn start_worker(&mut self) {
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(service::run(self.config.clone(), async {
            let _ = stopped.await;
        }));
        self.worker = Some((stop, handle));
    }

    /// Starts the worker with a job context the test built (e.g. with its own token source).
    pub fn start_worker_with(&mut self, ctx: Arc<JobContext>) {
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(service::run_with_context(ctx, async {
            let _ = stopped.await;
        }));
        self.worker = Some((stop, handle));
    }

    /// Starts the worker with its telemetry server on a port the system picks (no other test
    /// can take it between choosing and binding); returns the server's base URL.
    pub async fn start_worker_with_telemetry(&mut self) -> String {
        self.config.telemetry.listen = "127.0.0.1:0".into();
        let ctx = Arc::new(
            JobContext::new(Arc::new(self.config.clone()))
                .await
                .expect("job context"),
        );
        self.start_worker_with(ctx.clone());
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(addr) = ctx.telemetry_addr.get() {
                return format!("http://{addr}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the telemetry server did not start within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asks the worker to stop and returns how `run` ended.
    pub async fn stop_worker(&mut self) -> Result<(), RunError> {
        let (stop, handle) = self.worker.take().expect("worker running");
        let _ = stop.send(());
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("worker stops in time")
            .expect("worker task")
    }

    /// Waits for the worker to end by itself (e.g. on a fatal error) and returns how it ended.
    pub async fn stop_worker_when_done(&mut self) -> Result<(), RunError> {
        let (_stop, handle) = self.worker.take().expect("worker running");
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("worker ends in time")
            .expect("worker task")
    }

    /// Waits until `condition` holds (checked every 10 ms, for at most `WAIT`).
    pub async fn wait_until(&self, what: &str, mut condition: impl FnMut(&SimHandle) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !condition(&self.sim) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not within 30 s: {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the simulator has recorded at least `n` calls.
    pub async fn wait_for_calls(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.sim.calls().len() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the simulator saw fewer than {n} calls in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Declares this test's reply queue (`<prefix>.replies`, deleted with its last consumer or
    /// by the teardown) and returns its name, for requests with `reply_to`.
    pub async fn reply_queue(&self) -> String {
        let name = format!("{}.replies", self.prefix);
        self.channel
            .queue_declare(
                name.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    // Durable: a transient non-exclusive queue is a deprecated feature on 4.x.
                    durable: true,
                    auto_delete: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .unwrap();
        name
    }

    /// Publishes a JSON request to the default exchange, confirmed.
    pub async fn publish_json(&self, body: &Value) {
        self.publish(body.to_string().as_bytes(), BasicProperties::default())
            .await;
    }

    pub async fn publish(&self, body: &[u8], properties: BasicProperties) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.config.amqp.request_queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }

    /// Opens a new connection after the broker restarted, and watches the same outcome queue.
    pub async fn reconnect(&mut self) {
        self.conn = broker(&format!("{}.test", self.prefix)).await;
        self.channel = self.conn.create_channel().await.unwrap();
        self.outcomes = watch_outcomes(
            &self.channel,
            &self.prefix,
            &self.config.amqp.results_exchange,
        )
        .await;
        self.channel
            .confirm_select(Default::default())
            .await
            .unwrap();
    }

    /// The next outcome published to the results exchange, with its AMQP delivery.
    pub async fn next_outcome(&mut self) -> (Outcome, lapin::message::Delivery) {
        loop {
            let delivery = tokio::time::timeout(WAIT, self.outcomes.next())
                .await
                .expect("an outcome within 30 s")
                .expect("outcome stream open")
                .expect("outcome delivery");
            // Acked only once read: what the test never saw stays in the queue across a
            // reconnect.
            delivery.ack(Default::default()).await.expect("ack outcome");
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&delivery.data, &mut hasher);
            // A redelivery of a body the test has read is the test's own lost ack, not a second
            // outcome from the worker (which is published anew, never redelivered).
            if !self.seen.insert(std::hash::Hasher::finish(&hasher)) && delivery.redelivered {
                continue;
            }
            let outcome: Outcome =
                serde_json::from_slice(&delivery.data).expect("outcome is contract JSON");
            return (outcome, delivery);
        }
    }

    /// Collects `n` outcomes.
    pub async fn outcomes(&mut self, n: usize) -> Vec<Outcome> {
        let mut all = Vec::with_capacity(n);
        for _ in 0..n {
            all.push(self.next_outcome().await.0);
        }
        all
    }

    /// Every message in this test's dead-letter queue (call after `stop_worker`, when every
    /// job, including its dead-letter confirm, has finished).
    pub async fn dead_letters(&self) -> Vec<lapin::message::BasicGetMessage> {
        let mut all = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(
                self.config.amqp.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            all.push(message);
        }
        all
    }

    /// Message count of a queue (passive declare).
    pub async fn depth(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    /// The environment that points the binary at this test's broker objects and simulator,
    /// for tests that run `swr-stage-worker` as a child process.
    pub fn binary_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("AMQP_URL".to_owned(), amqp_url()),
            ("SWR_ENDPOINT".to_owned(), self.sim.url()),
            ("SWR_AUTH_TOKEN".to_owned(), TOKEN.to_owned()),
            (
                "SWR_STAGE_WORKER__IDEMPOTENCY__PATH".to_owned(),
                store_path(&self.prefix),
            ),
        ];
        env.extend(self.config.amqp.names_env());
        env
    }

    /// Stops the worker (if running) and removes this test's broker objects.
    pub async fn teardown(mut self) {
        if self.worker.is_some() {
            self.stop_worker().await.expect("worker stops cleanly");
        }
        let amqp = &self.config.amqp;
        let (seen, replies) = (
            format!("{}.seen", self.prefix),
            format!("{}.replies", self.prefix),
        );
        // Deleting a queue that does not exist is not an error in RabbitMQ.
        for q in [
            &amqp.request_queue,
            &amqp.dead_letter_queue,
            &seen,
            &replies,
        ] {
            let _ = self
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for x in [&amqp.dead_letter_exchange, &amqp.results_exchange] {
            let _ = self
                .channel
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.conn.close(200, "test done".into()).await;
        self.sim.shutdown().await;
        remove_store_files(&self.prefix);
    }
}

/// Removes the embedded-store file of a test (`store_path`) and its companions (`-wal`,
/// `-shm`, ...), once its worker has stopped.
pub fn remove_store_files(prefix: &str) {
    let path = std::path::PathBuf::from(store_path(prefix));
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|f| f.starts_with(name))
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The test's durable outcome queue (`<prefix>.seen`, bound with `#`), consumed with manual
/// acks so outcomes survive a broker restart or a lost test connection.
pub async fn watch_outcomes(channel: &Channel, prefix: &str, exchange: &str) -> Consumer {
    let queue = format!("{prefix}.seen");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap()
}

/// Declares an exclusive queue bound to `exchange` with `pattern` and consumes it (auto-ack).
pub async fn bind_watcher(channel: &Channel, exchange: &str, pattern: &str) -> Consumer {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
}

/// Runs `rabbitmqctl` without blocking the test's runtime, which also serves the simulator: a
/// blocked runtime would stall SWR answers and open the worker's circuit breaker.
pub async fn rabbitmqctl(args: &[&str]) -> String {
    rabbitmqctl_at("rabbitmqctl", args).await
}

/// [`rabbitmqctl`] with the program named (a path, for a node other than the one on PATH).
pub async fn rabbitmqctl_at(program: &str, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("rabbitmqctl {args:?} did not finish within 120 s"))
    .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The broker's ids of the connections whose client-provided name is `name`.
pub async fn connections_named(name: &str) -> Vec<String> {
    let listing = rabbitmqctl(&[
        "list_connections",
        "pid",
        "client_properties",
        "--quiet",
        "--no-table-headers",
    ])
    .await;
    let wanted = format!("{{\"connection_name\",\"{name}\"}}");
    listing
        .lines()
        .filter(|l| l.contains(&wanted))
        .map(|line| line.split('\t').next().expect("pid column").to_owned())
        .collect()
}

/// Closes, from the server side, only the connections whose client-provided name is `name`
/// (never a neighbour test's). Returns how many were closed.
pub async fn close_connections_named(name: &str) -> usize {
    let pids = connections_named(name).await;
    for pid in &pids {
        rabbitmqctl(&["close_connection", pid, "closed by a resilience test"]).await;
    }
    pids.len()
}

/// Scrapes /metrics into "name{labels}" → value.
pub async fn scrape(base: &str) -> std::collections::HashMap<String, f64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            l.rsplit_once(' ')
                .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        })
        .collect()
}
