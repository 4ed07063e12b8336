//! TLS against real servers (contract §7): RabbitMQ's TLS listener on 127.0.0.1:5671, PostgreSQL
//! with `ssl = on`, and the simulator serving HTTPS, all with certificates of a throwaway CA that
//! `scripts/tls-setup.sh` makes (in `SWR_TEST_TLS_DIR`, default
//! /var/lib/swr-stage-worker/test-tls). Nothing is mocked at the TLS layer.

mod common;

use std::time::Duration;

use common::{TestEnv, WorkerProcess, TOKEN};
use serde_json::{json, Value};
use swr_stage_worker::amqp::connect;
use swr_stage_worker::config::{
    AmqpTlsConfig, Config, IdempotencyBackend, IdempotencyConfig, Secret,
};
use swr_stage_worker::idempotency::postgres::PostgresStore;
use swr_stage_worker::outcome::{ErrorKind, Status};
use swr_stage_worker::sim::{SimConfig, SimTls};
use swr_stage_worker::tls::Failure;
use tokio::io::AsyncReadExt;

const AMQPS: &str = "amqps://guest:guest@localhost:5671/%2f";
const PG: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A file made by scripts/tls-setup.sh; a missing one fails with the fix.
fn tls_file(name: &str) -> String {
    let dir = std::env::var("SWR_TEST_TLS_DIR")
        .unwrap_or_else(|_| "/var/lib/swr-stage-worker/test-tls".to_owned());
    let path = format!("{dir}/{name}");
    assert!(
        std::path::Path::new(&path).is_file(),
        "{path} is missing: run `bash scripts/tls-setup.sh` (as root) to make the test CA and turn on \
         RabbitMQ's and PostgreSQL's TLS listeners"
    );
    path
}

fn with_ca() -> AmqpTlsConfig {
    AmqpTlsConfig {
        ca_file: tls_file("ca.pem"),
        ..AmqpTlsConfig::default()
    }
}

/// Points this test's plain AMQP connections at the node that serves `AMQPS`, for the tests
/// that watch a TLS worker's outcomes and connections: `SWR_TEST_TLS_AMQP_URL` when set (.ci/run
/// sets it to the 3.10 node's 5672 while AMQP_URL names the 4.x node), else AMQP_URL as it is.
/// Every test here sets the same value, so tests sharing a process agree.
fn on_the_tls_node() {
    if let Ok(url) = std::env::var("SWR_TEST_TLS_AMQP_URL") {
        std::env::set_var("AMQP_URL", url);
    }
}

/// The broker's view of the connection whose client-provided name is `name`:
/// (ssl, peer_cert_subject, user). Asks the TLS node's `rabbitmqctl`: `SWR_TEST_TLS_RABBITMQCTL`
/// when set, else the one on PATH.
async fn broker_view(name: &str) -> Option<(String, String, String)> {
    let program =
        std::env::var("SWR_TEST_TLS_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
    let listing = common::rabbitmqctl_at(
        &program,
        &[
            "list_connections",
            "client_properties",
            "ssl",
            "peer_cert_subject",
            "user",
            "--quiet",
            "--no-table-headers",
        ],
    )
    .await;
    let wanted = format!("{{\"connection_name\",\"{name}\"}}");
    listing.lines().find(|l| l.contains(&wanted)).map(|line| {
        let columns: Vec<&str> = line.rsplitn(4, '\t').collect();
        (
            columns[2].to_owned(),
            columns[1].to_owned(),
            columns[0].to_owned(),
        )
    })
}

#[tokio::test]
async fn amqps_with_the_ca_runs_a_job_over_a_verified_tls_connection() {
    on_the_tls_node();
    let mut env = TestEnv::without_worker("tls_amqps_job", &[]).await;
    env.config.amqp.url = Secret::new(AMQPS);
    env.config.amqp.tls = with_ca();
    env.start_worker();
    env.publish_json(&json!({"pipeline_id": 7001, "stage_index": 1}))
        .await;
    let (outcome, _) = env.next_outcome().await;
    assert_eq!(outcome.status, Status::Succeeded);
    let name = env.config.amqp.connection_name.clone();
    let (ssl, _, _) = broker_view(&name)
        .await
        .expect("the worker's connection is listed");
    assert_eq!(ssl, "true", "the worker's connection is TLS");
    env.teardown().await;
}

#[tokio::test]
async fn amqps_without_the_ca_does_not_connect_and_names_the_certificate_problem() {
    let error = connect(
        &Secret::new(AMQPS),
        &AmqpTlsConfig::default(),
        &common::unique("tls_no_ca"),
        Duration::from_secs(10),
    )
    .await
    .expect_err("a broker certificate of an unknown CA is refused");
    assert_eq!(error.tls_failure(), Some(&Failure::UnknownIssuer));
    let text = error.to_string();
    assert!(text.contains("unknown issuer"), "{text}");
    assert!(text.contains("amqp.tls.ca_file"), "{text}");
    assert!(
        !text.contains("guest:guest"),
        "the password is redacted: {text}"
    );
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_naming_server_name() {
    let tls = AmqpTlsConfig {
        server_name: "broker.example".to_owned(),
        ..with_ca()
    };
    let error = connect(
        &Secret::new(AMQPS),
        &tls,
        &common::unique("tls_name"),
        Duration::from_secs(10),
    )
    .await
    .expect_err("the certificate is for localhost and 127.0.0.1 only");
    assert_eq!(error.tls_failure(), Some(&Failure::NameMismatch));
    assert!(
        error.to_string().contains("amqp.tls.server_name"),
        "{error}"
    );
}

#[tokio::test]
async fn amqps_to_a_plain_listener_sends_a_tls_client_hello_never_the_amqp_header() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let first_bytes = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut bytes = [0u8; 5];
        socket.read_exact(&mut bytes).await.unwrap();
        bytes
    });
    let url = Secret::new(format!("amqps://guest:guest@127.0.0.1:{port}/%2f"));
    let result = connect(
        &url,
        &AmqpTlsConfig::default(),
        &common::unique("tls_plain"),
        Duration::from_secs(5),
    )
    .await;
    let bytes = tokio::time::timeout(common::WAIT, first_bytes)
        .await
        .expect("the client wrote")
        .unwrap();
    assert_ne!(
        &bytes[..4],
        b"AMQP",
        "the protocol header went out in clear"
    );
    // A TLS record: handshake (22), version 3.x.
    assert_eq!(bytes[0], 0x16, "first bytes {bytes:?}");
    assert_eq!(bytes[1], 0x03, "first bytes {bytes:?}");
    assert!(result.is_err(), "nothing answered the handshake");
}

#[tokio::test]
async fn an_ipv6_literal_is_dialled_as_written() {
    let Ok(listener) = tokio::net::TcpListener::bind("[::1]:0").await else {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    };
    let port = listener.local_addr().unwrap().port();
    let accepted = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
    let url = Secret::new(format!("amqps://guest:guest@[::1]:{port}/%2f"));
    let _ = connect(
        &url,
        &AmqpTlsConfig::default(),
        &common::unique("tls_ipv6"),
        Duration::from_secs(2),
    )
    .await;
    tokio::time::timeout(common::WAIT, accepted)
        .await
        .expect("the client connected to [::1], not to localhost's first address")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_client_certificate_is_presented_and_logs_in_with_external() {
    on_the_tls_node();
    let mut env = TestEnv::without_worker("tls_mutual", &[]).await;
    env.config.amqp.url = Secret::new("amqps://localhost:5671/%2f?auth_mechanism=external");
    env.config.amqp.tls = AmqpTlsConfig {
        client_cert_file: tls_file("client.pem"),
        client_key_file: tls_file("client.key"),
        ..with_ca()
    };
    env.start_worker();
    env.publish_json(&json!({"pipeline_id": 7002, "stage_index": 0}))
        .await;
    let (outcome, _) = env.next_outcome().await;
    assert_eq!(outcome.status, Status::Succeeded);
    let name = env.config.amqp.connection_name.clone();
    let (ssl, subject, user) = broker_view(&name)
        .await
        .expect("the worker's connection is listed");
    assert_eq!(ssl, "true");
    assert!(
        subject.contains("CN=swr-tls-client"),
        "peer_cert_subject {subject:?}"
    );
    assert_eq!(
        user, "swr-tls-client",
        "logged in as the certificate's subject"
    );
    env.teardown().await;
}

#[tokio::test]
async fn config_refuses_tls_keys_with_a_plain_url_and_half_a_client_identity() {
    let load = |vars: &[(&str, &str)]| {
        Config::load(
            None,
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    };
    let plain = load(&[("SWR_STAGE_WORKER__AMQP__TLS__CA_FILE", &tls_file("ca.pem"))]).unwrap_err();
    assert!(plain.to_string().contains("amqp.url"), "{plain}");
    let half = load(&[
        ("AMQP_URL", AMQPS),
        (
            "SWR_STAGE_WORKER__AMQP__TLS__CLIENT_CERT_FILE",
            &tls_file("client.pem"),
        ),
    ])
    .unwrap_err();
    assert!(
        half.to_string().contains("amqp.tls.client_key_file"),
        "{half}"
    );
    let missing = load(&[
        ("AMQP_URL", AMQPS),
        (
            "SWR_STAGE_WORKER__AMQP__TLS__CA_FILE",
            "/nonexistent/ca.pem",
        ),
    ])
    .unwrap_err();
    assert!(
        missing.to_string().contains("amqp.tls.ca_file"),
        "{missing}"
    );
}

/// The simulator serving HTTPS with the test CA's certificate (valid for 127.0.0.1).
fn https_sim() -> SimConfig {
    SimConfig {
        tokens: vec![TOKEN.to_owned()],
        tls: Some(SimTls {
            cert: tls_file("server.pem").into(),
            key: tls_file("server.key").into(),
        }),
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn swr_over_https_with_http_ca_file_works() {
    let ca = tls_file("ca.pem");
    let mut env = TestEnv::with_sim(
        "tls_https_ok",
        https_sim(),
        &[("SWR_STAGE_WORKER__HTTP__CA_FILE", &ca)],
    )
    .await;
    assert!(env.sim.url().starts_with("https://"));
    env.start_worker();
    env.publish_json(&json!({"pipeline_id": 7003, "stage_index": 1}))
        .await;
    let (outcome, _) = env.next_outcome().await;
    assert_eq!(outcome.status, Status::Succeeded, "{outcome:?}");
    assert_eq!(env.sim.calls().len(), 1);
    env.teardown().await;
}

#[tokio::test]
async fn swr_over_https_without_the_ca_is_a_transport_failure_and_swr_sees_nothing() {
    let mut env = TestEnv::with_sim(
        "tls_https_no_ca",
        https_sim(),
        &[("SWR_STAGE_WORKER__RETRY__MAX_ATTEMPTS", "2")],
    )
    .await;
    env.start_worker();
    env.publish_json(&json!({"pipeline_id": 7004, "stage_index": 1}))
        .await;
    let (outcome, _) = env.next_outcome().await;
    assert_eq!(outcome.status, Status::Failed);
    let error = outcome.error.expect("an error");
    assert_eq!(error.kind, ErrorKind::Transport);
    assert!(error.retryable);
    assert!(
        error.message.contains("unknown issuer"),
        "{}",
        error.message
    );
    assert!(error.message.contains("http.ca_file"), "{}", error.message);
    assert!(
        error.message.contains(&env.sim.url()),
        "names the endpoint: {}",
        error.message
    );
    assert_eq!(outcome.http_status, None);
    assert_eq!(outcome.attempts, 2);
    assert!(
        env.sim.calls().is_empty(),
        "SWR saw no request (and no token)"
    );
    env.teardown().await;
}

fn pg_config(url: &str) -> IdempotencyConfig {
    let mut config = Config::load(None, Vec::new()).unwrap().idempotency;
    config.backend = IdempotencyBackend::Postgres;
    config.url = Secret::new(url);
    config
}

/// `ssl` of every connection with `application_name`, from PostgreSQL's own view.
async fn pg_ssl(application_name: &str) -> Vec<bool> {
    let (client, connection) = tokio_postgres::connect(PG, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL answers on 127.0.0.1:5432");
    tokio::spawn(connection);
    client
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = $1",
            &[&application_name],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn postgres_verify_full_with_the_right_root_connects_over_tls() {
    let app = common::unique("pg_verify_full").replace('.', "_");
    let url = format!(
        "{PG}?sslmode=verify-full&sslrootcert={}&application_name={app}",
        tls_file("ca.pem")
    );
    let store = PostgresStore::connect(&pg_config(&url))
        .await
        .expect("verify-full with the test CA connects");
    let ssl = pg_ssl(&app).await;
    assert!(!ssl.is_empty(), "the store holds a connection");
    assert!(
        ssl.iter().all(|on| *on),
        "every store connection is TLS: {ssl:?}"
    );
    drop(store);
}

#[tokio::test]
async fn postgres_verify_ca_accepts_another_name_but_only_from_the_named_ca() {
    // The server's certificate is for localhost and 127.0.0.1; connect to 127.0.0.1 under
    // another name, which is what TLS then verifies.
    let url = |mode: &str, root: &str| {
        format!(
            "postgres://postgres@db.example:5432/test?hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={}",
            tls_file(root)
        )
    };
    PostgresStore::connect(&pg_config(&url("verify-ca", "ca.pem")))
        .await
        .expect("verify-ca checks the chain, not the name");
    let full = PostgresStore::connect(&pg_config(&url("verify-full", "ca.pem")))
        .await
        .err()
        .expect("verify-full checks the name");
    assert!(full.to_string().contains("name mismatch"), "{full}");
    for mode in ["verify-ca", "require"] {
        let wrong = PostgresStore::connect(&pg_config(&url(mode, "other-ca.pem")))
            .await
            .err()
            .unwrap_or_else(|| {
                panic!("{mode} with a CA that did not sign the server's certificate")
            });
        assert!(
            wrong.to_string().contains("unknown issuer"),
            "{mode}: {wrong}"
        );
    }
}

#[tokio::test]
async fn postgres_prefer_tries_tls_first_and_disable_does_not() {
    for (mode, expected) in [("prefer", true), ("disable", false)] {
        let app = common::unique(&format!("pg_{mode}")).replace('.', "_");
        let url = format!("{PG}?sslmode={mode}&application_name={app}");
        let store = PostgresStore::connect(&pg_config(&url)).await.unwrap();
        let ssl = pg_ssl(&app).await;
        assert!(!ssl.is_empty(), "{mode}: the store holds a connection");
        assert!(ssl.iter().all(|on| *on == expected), "{mode}: {ssl:?}");
        drop(store);
    }
}

#[tokio::test]
async fn postgres_verify_full_with_a_wrong_root_stops_the_worker_at_start() {
    let url = format!(
        "{PG}?sslmode=verify-full&sslrootcert={}",
        tls_file("other-ca.pem")
    );
    let error = PostgresStore::connect(&pg_config(&url))
        .await
        .err()
        .expect("a server certificate of another CA is refused");
    assert!(error.to_string().contains("idempotency.url"), "{error}");
    assert!(error.to_string().contains("unknown issuer"), "{error}");

    let env = TestEnv::without_worker("tls_pg_wrong_root", &[]).await;
    let mut vars = env.binary_env();
    vars.push((
        "SWR_STAGE_WORKER__IDEMPOTENCY__BACKEND".into(),
        "postgres".into(),
    ));
    vars.push(("SWR_STAGE_WORKER__IDEMPOTENCY__URL".into(), url));
    vars.push(("SWR_STAGE_WORKER__TELEMETRY__LISTEN".into(), String::new()));
    let mut worker = WorkerProcess::spawn(&vars, &env.prefix);
    let status = tokio::time::timeout(common::WAIT, worker.child.wait())
        .await
        .expect("the worker exits by itself")
        .unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(&worker.log).unwrap();
    assert!(log.contains("idempotency.url"), "{log}");
    assert!(log.contains("unknown issuer"), "{log}");
    env.teardown().await;
}

#[tokio::test]
async fn readyz_says_why_the_broker_is_not_ready_after_a_failed_handshake() {
    let mut env = TestEnv::without_worker("tls_readyz", &[]).await;
    env.config.amqp.url = Secret::new(AMQPS);
    let base = env.start_worker_with_telemetry().await;
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let body: Value = loop {
        if let Ok(answer) = reqwest::get(format!("{base}/readyz")).await {
            let body: Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
            if body["broker_error"].is_string() {
                break body;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never named the broker error"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(body["ready"], false);
    let reason = body["broker_error"].as_str().unwrap();
    assert!(reason.contains("unknown issuer"), "{reason}");
    assert!(!reason.contains("guest:guest"), "{reason}");
    env.teardown().await;
}
