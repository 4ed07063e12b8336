//! End-to-end tests over real sockets, with a hand-written HTTP/1.1 client
//! so the simulator is checked independently of the worker's HTTP stack.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// Bounds every network wait so a regression fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

const RETRY: &str = "/v3/manage/pipelines/7/stages/1?mode=retry";

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
struct RawResponse {
    /// Status code from the status line.
    status: u16,
    /// Headers in arrival order, names as sent.
    headers: Vec<(String, String)>,
    /// The `Content-Length` bytes of body, as text.
    body: String,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

fn request_bytes(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: sim\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    req.into_bytes()
}

/// Index just past the header block, if it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses one response that must be complete and `Content-Length`-framed;
/// returns it and how many bytes it used.
fn parse_response(buf: &[u8]) -> Option<(RawResponse, usize)> {
    let end = head_end(buf)?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)?
        .parse()
        .ok()?;
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))?
        .1
        .parse()
        .ok()?;
    let body = buf.get(end..end + len)?;
    let body = String::from_utf8(body.to_vec()).ok()?;
    Some((
        RawResponse {
            status,
            headers,
            body,
        },
        end + len,
    ))
}

/// One request on a fresh connection the server is asked to close; returns
/// every byte the server sent, or the transport error.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(IO_TIMEOUT, async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(raw).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        Ok(buf)
    })
    .await
    .expect("simulator did not answer in time")
}

async fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> RawResponse {
    let mut all_headers = vec![("Connection", "close")];
    all_headers.extend_from_slice(headers);
    let raw = exchange(addr, &request_bytes(method, target, &all_headers, body))
        .await
        .expect("transport error");
    let (response, used) = parse_response(&raw)
        .unwrap_or_else(|| panic!("incomplete response: {:?}", String::from_utf8_lossy(&raw)));
    assert_eq!(used, raw.len(), "trailing bytes after the response");
    response
}

async fn post_step(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> RawResponse {
    send(addr, "POST", target, headers, "").await
}

async fn start(tokens: &[&str]) -> SimHandle {
    SimHandle::start(
        "127.0.0.1:0".parse().unwrap(),
        SimConfig {
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            ..SimConfig::default()
        },
    )
    .await
    .unwrap()
}

fn assert_request_id(response: &RawResponse) -> String {
    let id = response.header("x-request-id").expect("X-Request-Id");
    let parsed = uuid::Uuid::parse_str(id).unwrap();
    assert_eq!(parsed.get_version_num(), 4);
    id.to_owned()
}

#[tokio::test]
async fn success_is_201_with_request_id() {
    let sim = start(&["T"]).await;
    assert!(sim.url().starts_with("http://127.0.0.1:"));
    let r = post_step(sim.addr(), RETRY, &[("X-Auth-Token", "T")]).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body, "{}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_request_id(&r);
    let r = post_step(
        sim.addr(),
        "/v3/manage/pipelines/7/stages/4?mode=rollback&source=rollback%3A%3Atrue",
        &[("X-Auth-Token", "T")],
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(sim.stats().executions, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn missing_or_unknown_token_is_401_in_gateway_shape() {
    let sim = start(&["T"]).await;
    for headers in [&[][..], &[("X-Auth-Token", "nope")][..]] {
        let r = post_step(sim.addr(), RETRY, headers).await;
        assert_eq!(r.status, 401);
        let id = assert_request_id(&r);
        let body = r.json();
        assert_eq!(body["error_code"], "APIG.0301");
        assert!(body["error_msg"]
            .as_str()
            .unwrap()
            .starts_with("Incorrect IAM authentication information: "));
        assert_eq!(body["request_id"], id.as_str());
    }
    assert_eq!(sim.stats().executions, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn validation_errors_are_400_in_swr_shape() {
    let sim = start(&[]).await;
    let r = post_step(
        sim.addr(),
        "/v3/manage/pipelines/abc/stages/1?mode=retry",
        &[("X-Auth-Token", "any")],
    )
    .await;
    assert_eq!(r.status, 400);
    assert_request_id(&r);
    let body = r.json();
    assert_eq!(body["error_code"], "SVCSTG.SWR.4000001");
    assert!(body["error_msg"].as_str().unwrap().contains("pipeline_id"));
    assert_eq!(body["errors"][0]["errorCode"], "SVCSTG.SWR.4000001");
    sim.shutdown().await;
}

#[tokio::test]
async fn rule_answers_503_twice_then_the_step_executes_once() {
    let sim = start(&["T"]).await;
    let rule = sim.add_rule(FaultRule {
        pipeline_id: Some(7),
        status: Some(503),
        retry_after: Some("2".into()),
        times: Some(2),
        ..FaultRule::default()
    });
    let headers = [("X-Auth-Token", "T"), ("Idempotency-Key", "job-1")];
    for _ in 0..2 {
        let r = post_step(sim.addr(), RETRY, &headers).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("2"));
        assert_request_id(&r);
        assert_eq!(r.json()["error_code"], "SVCSTG.SWR.5030001");
    }
    assert!(sim.executions().is_empty(), "faults must not execute");
    for _ in 0..2 {
        // The second one is an idempotent replay.
        let r = post_step(sim.addr(), RETRY, &headers).await;
        assert_eq!((r.status, r.body.as_str()), (201, "{}"));
    }
    assert_eq!(sim.executions(), HashMap::from([("job-1".to_owned(), 1)]));
    let calls = sim.calls();
    let seen: Vec<_> = calls
        .iter()
        .map(|c| (c.status, c.fault_rule, c.executed, c.replayed))
        .collect();
    assert_eq!(
        seen,
        [
            (Some(503), Some(rule), false, false),
            (Some(503), Some(rule), false, false),
            (Some(201), None, true, false),
            (Some(201), None, false, true),
        ]
    );
    assert_eq!(calls[0].idempotency_key.as_deref(), Some("job-1"));
    assert_eq!(calls[0].pipeline_id, Some(7));
    sim.shutdown().await;
}

#[tokio::test]
async fn drop_connection_gives_the_client_no_response() {
    let sim = start(&[]).await;
    sim.add_rule(FaultRule {
        drop_connection: true,
        times: Some(1),
        ..FaultRule::default()
    });
    // Without `Connection: close`: the server must end the connection itself.
    let raw = request_bytes("POST", RETRY, &[("X-Auth-Token", "t")], "");
    match exchange(sim.addr(), &raw).await {
        Err(_) => {}
        // Not even a status line: hyper drops the buffered head.
        Ok(bytes) => assert!(
            bytes.is_empty(),
            "got bytes: {:?}",
            String::from_utf8_lossy(&bytes)
        ),
    }
    let r = post_step(sim.addr(), RETRY, &[("X-Auth-Token", "t")]).await;
    assert_eq!(r.status, 201);
    let statuses: Vec<_> = sim.calls().iter().map(|c| c.status).collect();
    assert_eq!(statuses, [None, Some(201)]);
    sim.shutdown().await;
}

#[tokio::test]
async fn delay_rule_slows_the_answer_then_executes() {
    let sim = start(&[]).await;
    sim.add_rule(FaultRule {
        delay_ms: Some(300),
        times: Some(1),
        ..FaultRule::default()
    });
    let started = Instant::now();
    let r = post_step(sim.addr(), RETRY, &[("X-Auth-Token", "t")]).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(r.status, 201);
    assert_eq!(sim.stats().executions, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn wrong_method_and_unknown_path_are_huawei_shaped() {
    let sim = start(&[]).await;
    let r = send(sim.addr(), "GET", RETRY, &[("X-Auth-Token", "t")], "").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    assert_request_id(&r);
    let r = send(sim.addr(), "POST", "/v3/manage/nothing", &[], "").await;
    assert_eq!(r.status, 404);
    assert_request_id(&r);
    assert_eq!(r.json()["error_code"], "SVCSTG.SWR.4040001");
    sim.shutdown().await;
}

#[tokio::test]
async fn keep_alive_connection_serves_many_requests() {
    let sim = start(&[]).await;
    let mut stream = TcpStream::connect(sim.addr()).await.unwrap();
    let raw = request_bytes("POST", RETRY, &[("X-Auth-Token", "t")], "");
    let mut buf = Vec::new();
    for _ in 0..3 {
        stream.write_all(&raw).await.unwrap();
        let response = read_one(&mut stream, &mut buf).await;
        assert_eq!(response.status, 201);
    }
    assert_eq!(sim.stats().requests, 3);
    sim.shutdown().await;
}

/// Reads exactly one response from a keep-alive connection.
async fn read_one(stream: &mut TcpStream, buf: &mut Vec<u8>) -> RawResponse {
    loop {
        if let Some((response, used)) = parse_response(buf) {
            buf.drain(..used);
            return response;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(IO_TIMEOUT, stream.read(&mut chunk))
            .await
            .expect("timed out")
            .unwrap();
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn control_api_add_list_delete_and_reset() {
    let sim = start(&["T"]).await;
    let addr = sim.addr();

    let r = send(
        addr,
        "POST",
        "/_sim/rules",
        &[("Content-Type", "application/json")],
        r#"{"pipeline_id": 7, "status": 409, "times": 1}"#,
    )
    .await;
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_u64().unwrap();
    let r = send(
        addr,
        "POST",
        "/_sim/rules",
        &[],
        r#"{"pipeline_range": [100, 200], "drop_connection": true}"#,
    )
    .await;
    let other = r.json()["id"].as_u64().unwrap();
    assert!(other > id);

    let r = send(addr, "GET", "/_sim/rules", &[], "").await;
    assert_eq!(r.status, 200);
    let rules = r.json();
    assert_eq!(rules.as_array().unwrap().len(), 2);
    assert_eq!(rules[0]["id"], id);
    assert_eq!(rules[0]["status"], 409);
    assert_eq!(rules[0]["remaining"], 1);
    assert_eq!(sim.rules().len(), 2);

    // Bad input names the field and what was expected.
    let r = send(addr, "POST", "/_sim/rules", &[], r#"{"status": "soon"}"#).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["field"], "status");
    assert!(r.json()["error"].as_str().unwrap().contains("expected"));
    let r = send(addr, "POST", "/_sim/rules", &[], "not json").await;
    assert_eq!((r.status, r.json()["field"].clone()), (400, json!("body")));
    let r = send(addr, "DELETE", "/_sim/rules/abc", &[], "").await;
    assert_eq!((r.status, r.json()["field"].clone()), (400, json!("id")));
    let r = send(addr, "DELETE", "/_sim/rules/999", &[], "").await;
    assert_eq!(r.status, 404);
    let r = send(addr, "PUT", "/_sim/stats", &[], "").await;
    assert_eq!(r.status, 405);

    let r = send(addr, "DELETE", &format!("/_sim/rules/{other}"), &[], "").await;
    assert_eq!(r.status, 200);

    // The rule answers once, then the model does.
    let headers = [("X-Auth-Token", "T"), ("Idempotency-Key", "k")];
    let r = post_step(addr, RETRY, &headers).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["error_code"], "SVCSTG.SWR.4090001");
    assert_eq!(post_step(addr, RETRY, &headers).await.status, 201);

    let calls = send(addr, "GET", "/_sim/calls", &[], "").await.json();
    let statuses: Vec<_> = calls
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["status"].clone())
        .collect();
    assert_eq!(statuses, [json!(409), json!(201)]);
    let executions = send(addr, "GET", "/_sim/executions", &[], "").await.json();
    assert_eq!(executions, json!({"k": 1}));
    let stats = send(addr, "GET", "/_sim/stats", &[], "").await.json();
    assert_eq!(
        stats,
        json!({"requests": 2, "executions": 1, "recorded_overflow": 0,
               "iam_requests": 0, "tokens_issued": 0})
    );

    let r = send(addr, "POST", "/_sim/reset", &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        send(addr, "GET", "/_sim/stats", &[], "").await.json(),
        json!({"requests": 0, "executions": 0, "recorded_overflow": 0,
               "iam_requests": 0, "tokens_issued": 0})
    );
    assert_eq!(
        send(addr, "GET", "/_sim/rules", &[], "").await.json(),
        json!([])
    );
    assert_eq!(
        send(addr, "GET", "/_sim/calls", &[], "").await.json(),
        json!([])
    );
    assert_eq!(
        send(addr, "GET", "/_sim/executions", &[], "").await.json(),
        json!({})
    );

    let r = send(addr, "POST", "/_sim/rules", &[], r#"{"status": 500}"#).await;
    assert_eq!(r.status, 201);
    let r = send(addr, "DELETE", "/_sim/rules", &[], "").await;
    assert_eq!(r.json(), json!({"removed": 1}));
    assert!(sim.rules().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let sim = start(&[]).await;
    let addr = sim.addr();
    assert_eq!(
        post_step(addr, RETRY, &[("X-Auth-Token", "t")])
            .await
            .status,
        201
    );
    sim.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn serve_forever_stops_when_shutdown_resolves() {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_forever(
        "127.0.0.1:0".parse().unwrap(),
        SimConfig::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    stop.send(()).unwrap();
    tokio::time::timeout(IO_TIMEOUT, server)
        .await
        .expect("serve_forever did not stop")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn start_reports_bind_and_config_errors() {
    let sim = start(&[]).await;
    let taken = SimHandle::start(sim.addr(), SimConfig::default()).await;
    assert!(taken.is_err());
    let bad = SimHandle::start(
        "127.0.0.1:0".parse().unwrap(),
        SimConfig {
            stages: 0,
            ..SimConfig::default()
        },
    )
    .await;
    assert_eq!(
        bad.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::InvalidInput)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn iam_tokens_are_issued_accepted_and_expire_on_request() {
    let sim = SimHandle::start(
        "127.0.0.1:0".parse().unwrap(),
        SimConfig {
            tokens: vec!["STATIC".into()],
            iam_users: vec![("svc".into(), "pw".into())],
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let sign_in = |password: &str| {
        json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": "svc", "password": password, "domain": {"name": "acct"}}}},
            "scope": {"project": {"name": "cn-north-4"}}}})
        .to_string()
    };
    let r = send(
        sim.addr(),
        "POST",
        "/v3/auth/tokens?nocatalog=true",
        &[],
        &sign_in("pw"),
    )
    .await;
    assert_eq!(r.status, 201);
    assert_request_id(&r);
    let token = r
        .header("x-subject-token")
        .expect("X-Subject-Token")
        .to_owned();
    assert!(token.starts_with(ISSUED_TOKEN_PREFIX));
    let expires = r.json()["token"]["expires_at"].as_str().unwrap().to_owned();
    let left =
        time::OffsetDateTime::parse(&expires, &time::format_description::well_known::Rfc3339)
            .unwrap()
            - time::OffsetDateTime::now_utc();
    assert!(
        left > time::Duration::hours(23),
        "default lifetime is 24 h: {expires}"
    );

    let wrong = send(sim.addr(), "POST", "/v3/auth/tokens", &[], &sign_in("nope")).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.header("x-subject-token"), None);
    assert_eq!(wrong.json()["error"]["code"], 401);

    let ok = post_step(sim.addr(), RETRY, &[("X-Auth-Token", &token)]).await;
    assert_eq!(ok.status, 201);
    let expired = send(sim.addr(), "POST", "/_sim/tokens/expire", &[], "").await;
    assert_eq!(expired.json(), json!({"expired": 1}));
    let refused = post_step(sim.addr(), RETRY, &[("X-Auth-Token", &token)]).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["error_code"], "APIG.0301");
    assert_eq!(
        refused.json()["error_msg"],
        "Incorrect IAM authentication information: token expired"
    );
    let still = post_step(sim.addr(), RETRY, &[("X-Auth-Token", "STATIC")]).await;
    assert_eq!(still.status, 201, "static tokens never expire");

    let stats = send(sim.addr(), "GET", "/_sim/stats", &[], "").await.json();
    assert_eq!(
        (
            stats["iam_requests"].as_u64(),
            stats["tokens_issued"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert_eq!(sim.expire_tokens(), 0, "already expired");
    sim.shutdown().await;
}
