//! One HTTP attempt against SWR: build the call of contract §1, send it with the per-attempt
//! timeout, and read the answer (bounded). No retry logic and no classification here.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderValue, CONTENT_LENGTH};

use crate::config::{redact_url, HttpConfig, Secret};
use crate::outcome::{capped, MAX_REQUEST_ID_CHARS};
use crate::request::{Mode, StageRequest, ROLLBACK_SOURCE};
use crate::retry::parse_retry_after;
use crate::swr::classify::parse_error_body;
use crate::tls;
use crate::trace::{TraceContext, TRACEPARENT, TRACESTATE};

/// What SWR answered to one attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// `error_code` from the body, in any of Huawei's shapes.
    pub error_code: Option<String>,
    /// `error_msg` from the body.
    pub error_msg: Option<String>,
    /// `X-Request-Id` header: how Huawei support finds the call.
    pub request_id: Option<String>,
    /// `Retry-After`, as a duration from now.
    pub retry_after: Option<Duration>,
}

/// An attempt that got no answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AttemptError {
    /// The per-attempt timeout (`http.timeout`) ran out.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connect error, reset, broken answer.
    #[error(transparent)]
    Transport(TransportError),
}

/// Why an attempt reached no answer: a line that says what failed (the endpoint's login details
/// left out), and the HTTP client's error behind it, without its URL, as the `source()`.
#[derive(Clone, Debug)]
pub struct TransportError {
    /// What failed and why, on one line, with the causes.
    message: String,
    /// reqwest's error (its URL removed); shared, so the error stays `Clone`.
    cause: Option<Arc<reqwest::Error>>,
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TransportError {
    /// reqwest's error itself (not its `Arc`), so a caller can downcast it.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let cause: &reqwest::Error = self.cause.as_deref()?;
        Some(cause)
    }
}

impl TransportError {
    /// A failure with no error behind it.
    fn new(message: impl Into<String>) -> Self {
        TransportError {
            message: message.into(),
            cause: None,
        }
    }

    /// A failure caused by `source` (whose URL is already removed).
    fn caused_by(message: String, cause: reqwest::Error) -> Self {
        TransportError {
            message,
            cause: Some(Arc::new(cause)),
        }
    }
}

/// How long the body of a 2xx answer is waited for (it is read only to reuse the connection).
const SUCCESS_BODY_WAIT: Duration = Duration::from_secs(1);

/// The shared SWR HTTP client: one connection pool for every job (keep-alive).
#[derive(Clone)]
pub struct SwrClient {
    /// reqwest client; cheap to clone, shares its pool.
    http: reqwest::Client,
    /// Base URL without a trailing slash; only configuration sets it (contract §1).
    endpoint: String,
    /// Per-attempt timeout, reported in timeout errors.
    timeout: Duration,
    /// TCP connect limit, reported in connect errors.
    connect_timeout: Duration,
    /// Cap on the answer body read.
    max_response_bytes: usize,
}

impl SwrClient {
    /// `tls` is [`HttpConfig::client_config`]: the system's roots plus `http.ca_file`.
    pub fn new(
        endpoint: &str,
        http: &HttpConfig,
        tls: rustls::ClientConfig,
    ) -> Result<SwrClient, reqwest::Error> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(http.connect_timeout)
            .timeout(http.timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            // Redirects could send the token elsewhere; SWR does not redirect this call.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("swr-stage-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(SwrClient {
            http: client,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            timeout: http.timeout,
            connect_timeout: http.connect_timeout,
            max_response_bytes: http.max_response_bytes,
        })
    }

    /// The base URL, without a trailing slash.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The URL for a request: path parameters from the validated request, `source` only for rollback.
    pub fn url(&self, request: &StageRequest) -> String {
        let query = match request.mode {
            Mode::Retry => "mode=retry".to_owned(),
            Mode::Rollback => format!("mode=rollback&source={ROLLBACK_SOURCE}"),
        };
        format!(
            "{}/v3/manage/pipelines/{}/stages/{}?{query}",
            self.endpoint, request.pipeline_id, request.stage_index
        )
    }

    /// Sends one attempt. `key` goes in `Idempotency-Key`, identical on every attempt of a job.
    pub async fn attempt(
        &self,
        url: &str,
        key: &str,
        token: &Secret,
        trace: &TraceContext,
    ) -> Result<Reply, AttemptError> {
        let mut token_header = HeaderValue::from_str(token.expose()).map_err(|_| {
            AttemptError::Transport(TransportError::new("the token is not a valid header value"))
        })?;
        token_header.set_sensitive(true);
        let request = self
            .http
            .post(url)
            .header("X-Auth-Token", token_header)
            .header("Idempotency-Key", key)
            .header(TRACEPARENT, trace.traceparent());
        // Only a state that parsed as printable ASCII is kept, so it is a valid header value.
        let request = match &trace.state {
            Some(state) => request.header(TRACESTATE, state.as_str()),
            None => request,
        };
        let response = request
            .header(CONTENT_LENGTH, "0")
            .body(reqwest::Body::from(Vec::new()))
            .send()
            .await
            .map_err(|e| self.attempt_error(e))?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let request_id = header("X-Request-Id").map(|id| capped(id, MAX_REQUEST_ID_CHARS));
        let retry_after =
            header("Retry-After").and_then(|v| parse_retry_after(&v, SystemTime::now()));
        let (error_code, error_msg) = if (200..300).contains(&status) {
            // Any 2xx is success (contract §1): its body means nothing, so a body cut off or
            // late does not turn a done step into a retry, nor hold the job. It is still read
            // (briefly), to keep the connection for the next call.
            match tokio::time::timeout(SUCCESS_BODY_WAIT, self.read_body(response)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(status, error = %e, "the body of a 2xx answer could not be read; the step succeeded all the same");
                }
                Err(_) => {
                    tracing::debug!(status, "the body of a 2xx answer did not arrive in {SUCCESS_BODY_WAIT:?}; the step succeeded all the same");
                }
            }
            (None, None)
        } else {
            parse_error_body(&self.read_body(response).await?)
        };
        Ok(Reply {
            status,
            error_code,
            error_msg,
            request_id,
            retry_after,
        })
    }

    /// Reads at most `max_response_bytes` of the body; the rest is left unread.
    async fn read_body(&self, response: reqwest::Response) -> Result<Vec<u8>, AttemptError> {
        read_capped(response, self.max_response_bytes)
            .await
            .map_err(|e| self.attempt_error(e))
    }

    fn attempt_error(&self, error: reqwest::Error) -> AttemptError {
        // The URL holds the endpoint, which may carry login details: it stays out of the text
        // and out of the cause.
        let error = error.without_url();
        // A failed handshake sent nothing (no token): a transport failure that says why.
        let message = if let Some(failure) = tls::Failure::find(&error) {
            format!(
                "TLS handshake with {} failed: {failure}; {}",
                redact_url(&self.endpoint),
                failure.hint("http.ca_file", None, None)
            )
        // A connect that failed or ran out of `http.connect_timeout` is a connect error (no
        // request went out), not the attempt's timeout, whose limit would be misreported.
        } else if error.is_connect() && error.is_timeout() {
            format!(
                "cannot connect within {:?} (http.connect_timeout): {}",
                self.connect_timeout,
                error_chain(&error)
            )
        } else if error.is_connect() {
            format!("cannot connect: {}", error_chain(&error))
        } else if error.is_timeout() {
            return AttemptError::Timeout(self.timeout);
        } else {
            error_chain(&error)
        };
        AttemptError::Transport(TransportError::caused_by(message, error))
    }
}

/// Reads at most `max` bytes of an answer's body and leaves the rest unread: how every HTTP
/// body from elsewhere (SWR, IAM, a worker's telemetry) is read, so no server decides how much
/// this process buffers. The caller's client bounds the time.
pub(crate) async fn read_capped(
    mut response: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = max.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= max {
            break;
        }
    }
    Ok(body)
}

/// The error and its causes on one line. Callers strip reqwest's URL first
/// (`reqwest::Error::without_url`): it would name the endpoint.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut current = Some(error);
    while let Some(e) = current {
        let text = e.to_string();
        if !parts.iter().any(|p: &String| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
    /// hangs until the client's connect timeout.
    fn full_listener() -> (tokio::net::TcpListener, Vec<std::net::TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        // Backlog 0 still queues one connection; two fill it whatever the kernel rounds to.
        let held = (0..2)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
            })
            .collect();
        (listener, held)
    }

    #[tokio::test]
    async fn a_connect_that_times_out_is_a_transport_error_naming_the_connect() {
        let (listener, _held) = full_listener();
        let mut http = Config::load(None, [("SWR_AUTH_TOKEN".to_owned(), "t".to_owned())])
            .unwrap()
            .http;
        http.connect_timeout = Duration::from_millis(300);
        http.timeout = Duration::from_secs(20);
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let client = SwrClient::new(&endpoint, &http, http.client_config().unwrap()).unwrap();
        let started = std::time::Instant::now();
        let error = client
            .attempt(
                &format!("{endpoint}/v3/x"),
                "k",
                &Secret::new("t"),
                &TraceContext::root(),
            )
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the connect timeout, not the attempt's, ended it"
        );
        match error {
            AttemptError::Transport(error) => {
                let message = error.to_string();
                assert!(
                    message.contains("connect") && message.contains("300ms"),
                    "{message}"
                );
                let cause = std::error::Error::source(&error).expect("the client's error");
                assert!(
                    cause.downcast_ref::<reqwest::Error>().is_some(),
                    "{cause:?}"
                );
            }
            other => panic!("expected a transport error, got {other:?}"),
        }
        // A refused connect is a connect error too.
        drop((listener, _held));
        let error = client
            .attempt(
                &format!("{endpoint}/v3/x"),
                "k",
                &Secret::new("t"),
                &TraceContext::root(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&error, AttemptError::Transport(m) if m.to_string().starts_with("cannot connect: ")),
            "{error:?}"
        );
    }

    /// A one-shot HTTP server: answers the first connection with `answer`, then closes it, or
    /// with `hold`, keeps it open until the client closes it.
    async fn answer_once(answer: &'static str) -> String {
        answer_once_holding(answer, false).await
    }

    async fn answer_once_holding(answer: &'static str, hold: bool) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(answer.as_bytes()).await;
            // The client sends nothing more: this read ends when it closes the connection.
            while hold && matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        endpoint
    }

    fn client_for(endpoint: &str) -> SwrClient {
        let http = Config::load(None, [("SWR_AUTH_TOKEN".to_owned(), "t".to_owned())])
            .unwrap()
            .http;
        SwrClient::new(endpoint, &http, http.client_config().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_2xx_whose_body_is_cut_off_is_still_a_success() {
        // 100 bytes announced, 2 sent, then the connection closes.
        let endpoint = answer_once(
            "HTTP/1.1 201 Created\r\nContent-Length: 100\r\nX-Request-Id: req-201\r\n\r\n{}",
        )
        .await;
        let reply = client_for(&endpoint)
            .attempt(
                &format!("{endpoint}/v3/x"),
                "k",
                &Secret::new("t"),
                &TraceContext::root(),
            )
            .await
            .expect("any 2xx is success, whatever its body");
        assert_eq!(reply.status, 201);
        assert_eq!(reply.request_id.as_deref(), Some("req-201"));
        assert_eq!(reply.error_code, None);
        // The same cut-off body on an error answer is a transport error: its body was needed.
        let endpoint =
            answer_once("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 100\r\n\r\n{}").await;
        let error = client_for(&endpoint)
            .attempt(
                &format!("{endpoint}/v3/x"),
                "k",
                &Secret::new("t"),
                &TraceContext::root(),
            )
            .await
            .unwrap_err();
        assert!(matches!(error, AttemptError::Transport(_)), "{error:?}");
    }

    #[tokio::test]
    async fn an_answer_cannot_make_the_request_id_code_or_message_long() {
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\nX-Request-Id: {}\r\nContent-Type: application/json\r\n\r\n{{\"error_code\":\"{}\",\"error_msg\":\"{}\"}}",
            "r".repeat(4000),
            "C".repeat(4000),
            "m".repeat(20_000),
        );
        let endpoint = answer_once(Box::leak(answer.into_boxed_str())).await;
        let reply = client_for(&endpoint)
            .attempt(
                &format!("{endpoint}/v3/x"),
                "k",
                &Secret::new("t"),
                &TraceContext::root(),
            )
            .await
            .unwrap();
        let count = |s: &Option<String>| s.as_deref().map(|s| s.chars().count());
        assert_eq!(count(&reply.request_id), Some(MAX_REQUEST_ID_CHARS));
        assert_eq!(count(&reply.error_code), Some(128));
        assert_eq!(count(&reply.error_msg), Some(1024));
        assert!(reply.request_id.unwrap().ends_with('…'));
    }

    #[tokio::test]
    async fn a_2xx_whose_body_stalls_succeeds_without_waiting_for_the_attempt_timeout() {
        let endpoint = answer_once_holding(
            "HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n{}",
            true,
        )
        .await;
        let mut http = Config::load(None, [("SWR_AUTH_TOKEN".to_owned(), "t".to_owned())])
            .unwrap()
            .http;
        http.timeout = Duration::from_secs(30);
        let client = SwrClient::new(&endpoint, &http, http.client_config().unwrap()).unwrap();
        let started = std::time::Instant::now();
        let reply = client
            .attempt(
                &format!("{endpoint}/v3/x"),
                "k",
                &Secret::new("t"),
                &TraceContext::root(),
            )
            .await
            .expect("any 2xx is success");
        assert_eq!(reply.status, 201);
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the stalled body held the job for {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_transport_error_does_not_name_the_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let endpoint = format!("http://swr-user:hunter2@127.0.0.1:{port}");
        let error = client_for(&endpoint)
            .attempt(
                &format!("{endpoint}/v3/x"),
                "k",
                &Secret::new("t"),
                &TraceContext::root(),
            )
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with("cannot connect: "), "{text}");
        assert!(
            !text.contains("hunter2") && !text.contains("swr-user") && !text.contains("/v3/x"),
            "{text}"
        );
        // The cause is kept, and neither it nor anything under it names the URL either.
        let mut cause = std::error::Error::source(&error);
        assert!(cause.is_some(), "the client's error is the source");
        while let Some(e) = cause {
            let shown = format!("{e} {e:?}");
            assert!(
                !shown.contains("hunter2") && !shown.contains("/v3/x"),
                "{shown}"
            );
            cause = e.source();
        }
    }
}
