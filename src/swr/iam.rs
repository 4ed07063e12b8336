//! IAM password tokens (`swr.auth.kind = "iam_password"`): sign in with
//! `POST {iam.endpoint}/v3/auth/tokens`, keep the project-scoped token, renew it `refresh_ahead`
//! before its `expires_at`, and renew it once when SWR refuses it.
//!
//! [`IamClient`] is one sign-in over HTTP; [`IamToken`] is the cache every job shares. All renewal
//! happens under one async lock held across the sign-in, so however many jobs wait, IAM is asked
//! once (single flight), and a failure is handed to everyone who waited for it. The password and
//! the tokens are [`Secret`]s: they never reach a log line, an error or an outcome.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use reqwest::header::CONTENT_TYPE;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::config::{AuthConfig, ConfigError, Secret};
use crate::outcome::capped;
use crate::swr::auth::{AuthError, TokenSource};
use crate::swr::classify::parse_error_body;
use crate::swr::client::{error_chain, read_capped};
use crate::telemetry::metrics::Metrics;

/// Largest IAM answer read. With `nocatalog=true` it is about a kilobyte; the bound keeps a
/// misbehaving server from making us buffer without limit.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// After IAM refused the credentials, jobs get the same refusal for this long without asking
/// again: a wrong password will not become right by itself, and IAM locks users out after
/// repeated failed sign-ins.
const REFUSAL_HOLD: Duration = Duration::from_secs(60);

/// After IAM could not be reached (or failed), jobs get that error for this long without asking
/// again, so an outage is not answered with a sign-in per job; the jobs' own back-off retries.
const OUTAGE_HOLD: Duration = Duration::from_secs(2);

/// Who signs in. `Debug` shows everything but the password.
#[derive(Clone, Debug)]
pub struct IamCredentials {
    /// IAM user name.
    pub user: String,
    /// Account (domain) name that owns the user; IAM needs it to find the user.
    pub domain: String,
    /// Project name the token is scoped to; SWR only accepts project-scoped tokens.
    pub project: String,
    /// The user's password; only [`IamClient`] reads it, to build the sign-in body.
    pub password: Secret,
}

impl IamCredentials {
    /// The credentials of `swr.auth.*`, reading the password from its file or variable.
    pub fn from_config(auth: &AuthConfig) -> Result<IamCredentials, ConfigError> {
        Ok(IamCredentials {
            user: auth.user.clone(),
            domain: auth.domain.clone(),
            project: auth.project.clone(),
            password: auth.iam_password()?,
        })
    }
}

/// Why no token could be had from IAM. Messages carry IAM's status, code and message and the
/// user's names, never the password or a token.
#[derive(Debug, thiserror::Error)]
pub enum IamError {
    /// IAM refused the sign-in (wrong user, password, domain or project, or a bad request);
    /// asking again will not help until the configuration changes.
    #[error("IAM refused the sign-in of user {user:?} (domain {domain:?}, project {project:?}): it answered {status}{detail}")]
    Refused {
        /// IAM's HTTP status.
        status: u16,
        /// The user that was refused, so the operator knows which setting to check.
        user: String,
        /// The domain that was given.
        domain: String,
        /// The project that was asked for.
        project: String,
        /// `" (code: message)"` from IAM's answer, or empty.
        detail: String,
    },
    /// IAM throttled the request or failed itself (429, 5xx); it may work later.
    #[error("IAM answered {status}{detail}")]
    Unavailable {
        /// IAM's HTTP status.
        status: u16,
        /// `" (code: message)"` from IAM's answer, or empty.
        detail: String,
    },
    /// No answer within `iam.timeout`.
    #[error("IAM gave no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// Connect error, reset, broken answer.
    #[error("could not reach IAM: {0}")]
    Transport(String),
    /// IAM said yes but the answer lacks a usable token or expiry.
    #[error("IAM's answer has no usable token: {0}")]
    BadAnswer(String),
}

impl From<IamError> for AuthError {
    fn from(e: IamError) -> AuthError {
        match e {
            IamError::Refused { .. } => AuthError::Refused(e.to_string()),
            _ => AuthError::Unavailable(e.to_string()),
        }
    }
}

/// A token IAM just issued.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The `X-Subject-Token` header, sent to SWR as `X-Auth-Token`.
    pub token: Secret,
    /// `token.expires_at` from the body, for log lines.
    pub expires_at: OffsetDateTime,
    /// How long it is valid from now by this host's clock: renewal is scheduled on the monotonic
    /// clock with it, so a wall-clock jump cannot make the cache hand out an expired token.
    pub valid_for: Duration,
}

/// One sign-in over HTTP. Cheap to share: one connection pool.
pub struct IamClient {
    /// reqwest client with the `iam.timeout` and no redirects.
    http: reqwest::Client,
    /// `{iam.endpoint}/v3/auth/tokens?nocatalog=true`; only configuration sets it.
    url: String,
    /// Limit for the whole exchange, reported in timeout errors.
    timeout: Duration,
    /// Who signs in.
    credentials: IamCredentials,
}

impl IamClient {
    pub fn new(
        endpoint: &str,
        timeout: Duration,
        credentials: IamCredentials,
        tls: rustls::ClientConfig,
    ) -> Result<IamClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            // The system's roots plus `http.ca_file` (HttpConfig::client_config).
            .use_preconfigured_tls(tls)
            .timeout(timeout)
            // A redirect would resend the password to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("swr-stage-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(IamClient {
            http,
            // nocatalog: the service catalog is large and the worker does not need it.
            url: format!(
                "{}/v3/auth/tokens?nocatalog=true",
                endpoint.trim_end_matches('/')
            ),
            timeout,
            credentials,
        })
    }

    /// Signs in once and returns the new token.
    pub async fn issue(&self) -> Result<IssuedToken, IamError> {
        let c = &self.credentials;
        let body = json!({"auth": {
            "identity": {
                "methods": ["password"],
                "password": {"user": {
                    "name": c.user,
                    "password": c.password.expose(),
                    "domain": {"name": c.domain},
                }},
            },
            "scope": {"project": {"name": c.project}},
        }})
        .to_string();
        let exchange = async {
            let response = self
                .http
                .post(&self.url)
                .header(CONTENT_TYPE, "application/json;charset=utf8")
                .body(body)
                .send()
                .await
                .map_err(|e| self.transport(e))?;
            let status = response.status().as_u16();
            let token = response
                .headers()
                .get("X-Subject-Token")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(Secret::new);
            let answer = read_capped(response, MAX_ANSWER_BYTES)
                .await
                .map_err(|e| self.transport(e))?;
            Ok::<_, IamError>((status, token, answer))
        };
        // reqwest's own timeout covers the same; this one also bounds anything around it.
        let (status, token, answer) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| IamError::Timeout(self.timeout))??;
        if !(200..300).contains(&status) {
            let detail = error_detail(&answer);
            return Err(if status == 429 || status >= 500 {
                IamError::Unavailable { status, detail }
            } else {
                IamError::Refused {
                    status,
                    user: c.user.clone(),
                    domain: c.domain.clone(),
                    project: c.project.clone(),
                    detail,
                }
            });
        }
        let token = token.ok_or_else(|| {
            IamError::BadAnswer(format!(
                "it answered {status} without an X-Subject-Token header"
            ))
        })?;
        let expires_at = parse_expires_at(&answer)?;
        let left = expires_at - OffsetDateTime::now_utc();
        let valid_for = Duration::try_from(left)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                IamError::BadAnswer(format!(
                    "token.expires_at {} is not in the future by this host's clock; check the clock",
                    expires_at.format(&Rfc3339).unwrap_or_default()
                ))
            })?;
        Ok(IssuedToken {
            token,
            expires_at,
            valid_for,
        })
    }

    fn transport(&self, error: reqwest::Error) -> IamError {
        // The URL names the endpoint, which may carry login details: it stays out of the text.
        let error = error.without_url();
        if error.is_timeout() {
            IamError::Timeout(self.timeout)
        } else {
            IamError::Transport(error_chain(&error))
        }
    }
}

/// `token.expires_at` (RFC 3339; IAM writes microseconds and `Z`).
fn parse_expires_at(answer: &[u8]) -> Result<OffsetDateTime, IamError> {
    let value: Value = serde_json::from_slice(answer)
        .map_err(|e| IamError::BadAnswer(format!("the body is not JSON: {e}")))?;
    let text = value
        .pointer("/token/expires_at")
        .and_then(Value::as_str)
        .ok_or_else(|| IamError::BadAnswer("the body has no token.expires_at".into()))?;
    OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
        // Quoted in logs and outcomes: IAM must not decide how long.
        let text = capped(text.to_owned(), 64);
        IamError::BadAnswer(format!(
            "token.expires_at {text:?} is not an RFC 3339 time: {e}"
        ))
    })
}

/// `" (code: message)"` from an IAM error in any of its shapes: IAM's own
/// `{"error": {"code", "message"}}`, or `{"error_code", "error_msg"}` (IAM and its gateway).
/// One line, at most 300 characters: it ends up in outcomes.
fn error_detail(answer: &[u8]) -> String {
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let nested = serde_json::from_slice::<Value>(answer)
        .ok()
        .and_then(|v| v.get("error").filter(|e| e.is_object()).cloned());
    let (code, message) = match nested {
        Some(error) => (text(error.get("code")), text(error.get("message"))),
        None => parse_error_body(answer),
    };
    let detail = match (code, message) {
        (Some(c), Some(m)) => format!(" ({c}: {m})"),
        (Some(c), None) => format!(" ({c})"),
        (None, Some(m)) => format!(" ({m})"),
        (None, None) => String::new(),
    };
    capped(detail.replace(['\n', '\r'], " "), 300)
}

/// Where new tokens come from: [`IamClient`] in the worker, a scripted one in unit tests.
trait Issue: Send + Sync {
    fn issue(&self) -> BoxFuture<'_, Result<IssuedToken, IamError>>;
}

impl Issue for IamClient {
    fn issue(&self) -> BoxFuture<'_, Result<IssuedToken, IamError>> {
        Box::pin(IamClient::issue(self))
    }
}

/// The token in use.
struct Current {
    /// Sent as `X-Auth-Token`.
    token: Secret,
    /// From here on the next caller renews it first.
    renew_at: Instant,
    /// After this it is never handed out.
    expires: Instant,
}

/// The last sign-in that failed.
struct Failure {
    /// When it failed: callers that were waiting before then get its error instead of asking again.
    at: Instant,
    /// Until then every caller gets its error (see `REFUSAL_HOLD`, `OUTAGE_HOLD`).
    hold_until: Instant,
    /// What failed.
    error: AuthError,
}

/// What the lock protects.
#[derive(Default)]
struct State {
    /// `None` before the first sign-in, and after SWR refused the token.
    current: Option<Current>,
    /// Cleared by the next successful sign-in.
    failure: Option<Failure>,
}

impl State {
    /// The error of a sign-in that failed while the caller waited (asked before it ended), or one
    /// still on hold.
    fn held_failure(&self, asked: Instant, now: Instant) -> Option<AuthError> {
        self.failure
            .as_ref()
            .filter(|f| f.at >= asked || now < f.hold_until)
            .map(|f| f.error.clone())
    }

    /// The current token if it may still be sent, even though renewal is due.
    fn unexpired(&self, now: Instant) -> Option<Secret> {
        self.current
            .as_ref()
            .filter(|c| now < c.expires)
            .map(|c| c.token.clone())
    }
}

/// The IAM token source: a cached project-scoped token, renewed ahead of expiry and on a 401,
/// one sign-in at a time.
pub struct IamToken {
    /// Signs in.
    issuer: Box<dyn Issue>,
    /// Renew this long before expiry (capped at half a token's lifetime).
    refresh_ahead: Duration,
    /// Held across a sign-in, so concurrent callers wait for its result instead of signing in too.
    state: Mutex<State>,
    /// Counts sign-ins by result (`swr_stage_token_refresh_total`), when the worker runs one.
    metrics: Option<Arc<Metrics>>,
}

impl IamToken {
    /// A source that signs in with `client` on first use.
    pub fn new(client: IamClient, refresh_ahead: Duration) -> IamToken {
        IamToken::with_issuer(Box::new(client), refresh_ahead)
    }

    fn with_issuer(issuer: Box<dyn Issue>, refresh_ahead: Duration) -> IamToken {
        IamToken {
            issuer,
            refresh_ahead,
            state: Mutex::new(State::default()),
            metrics: None,
        }
    }

    /// Reports every sign-in to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> IamToken {
        self.metrics = Some(metrics);
        self
    }

    async fn current_token(&self) -> Result<Secret, AuthError> {
        let asked = Instant::now();
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if let Some(current) = state.current.as_ref().filter(|c| now < c.renew_at) {
            return Ok(current.token.clone());
        }
        if let Some(error) = state.held_failure(asked, now) {
            return state.unexpired(now).ok_or(error);
        }
        match self.sign_in(&mut state).await {
            Ok(token) => Ok(token),
            Err(error) => match state.unexpired(Instant::now()) {
                Some(token) => {
                    tracing::warn!(error = %error, "could not renew the IAM token ahead of its expiry; using the current one meanwhile");
                    Ok(token)
                }
                None => Err(error),
            },
        }
    }

    async fn renew_refused(&self, refused: &Secret) -> Result<bool, AuthError> {
        let asked = Instant::now();
        let mut state = self.state.lock().await;
        if state.current.as_ref().is_some_and(|c| c.token != *refused) {
            // Someone renewed it while this caller waited: nothing to do.
            return Ok(true);
        }
        // SWR refused it, so it is never handed out again, whatever happens next.
        state.current = None;
        if let Some(error) = state.held_failure(asked, Instant::now()) {
            return Err(error);
        }
        self.sign_in(&mut state).await.map(|_| true)
    }

    /// Signs in (the caller holds the lock) and records the result.
    async fn sign_in(&self, state: &mut State) -> Result<Secret, AuthError> {
        let issued = self.issuer.issue().await;
        if let Some(metrics) = &self.metrics {
            metrics.token_refresh(issued.is_ok());
        }
        match issued {
            Ok(issued) => {
                let now = Instant::now();
                let early = self.refresh_ahead.min(issued.valid_for / 2);
                tracing::info!(
                    expires_at = %issued.expires_at.format(&Rfc3339).unwrap_or_default(),
                    renew_in_s = (issued.valid_for - early).as_secs(),
                    "obtained an IAM token"
                );
                // `expires_at` is IAM's to write, up to the year 9999: the sums saturate.
                state.current = Some(Current {
                    token: issued.token.clone(),
                    renew_at: crate::deadline::after(now, issued.valid_for - early),
                    expires: crate::deadline::after(now, issued.valid_for),
                });
                state.failure = None;
                Ok(issued.token)
            }
            Err(e) => {
                let now = Instant::now();
                let hold = if matches!(e, IamError::Refused { .. }) {
                    REFUSAL_HOLD
                } else {
                    OUTAGE_HOLD
                };
                tracing::warn!(error = %e, "IAM sign-in failed");
                let error = AuthError::from(e);
                state.failure = Some(Failure {
                    at: now,
                    hold_until: now + hold,
                    error: error.clone(),
                });
                Err(error)
            }
        }
    }
}

impl TokenSource for IamToken {
    fn token(&self) -> BoxFuture<'_, Result<Secret, AuthError>> {
        Box::pin(self.current_token())
    }

    fn refresh<'a>(&'a self, refused: &'a Secret) -> BoxFuture<'a, Result<bool, AuthError>> {
        Box::pin(self.renew_refused(refused))
    }
}

#[cfg(test)]
mod tests;
