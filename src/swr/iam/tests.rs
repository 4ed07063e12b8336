//! The cache's timing on paused time with a scripted issuer, and the HTTP client against the
//! in-process simulator (real sockets, real time).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::*;
use crate::sim::{SimConfig, SimHandle, ISSUED_TOKEN_PREFIX};

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

/// What the scripted issuer does on its n-th sign-in (1-based).
type Script = dyn Fn(u32) -> Result<Duration, IamError> + Send + Sync;

/// An issuer that answers from a script, after `latency`, and counts sign-ins.
struct Scripted {
    /// Sign-ins so far; shared with the test.
    calls: Arc<AtomicU32>,
    /// How long a sign-in takes (paused time: costs nothing), so callers pile up behind it.
    latency: Duration,
    /// Lifetime of the n-th token, or its error.
    script: Box<Script>,
}

impl Issue for Scripted {
    fn issue(&self) -> BoxFuture<'_, Result<IssuedToken, IamError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(self.latency).await;
            let valid_for = (self.script)(n)?;
            let now = OffsetDateTime::now_utc();
            Ok(IssuedToken {
                token: Secret::new(format!("token-{n}")),
                // For log lines only; a lifetime past the year 9999 is written as now.
                expires_at: time::Duration::try_from(valid_for)
                    .ok()
                    .and_then(|d| now.checked_add(d))
                    .unwrap_or(now),
                valid_for,
            })
        })
    }
}

fn scripted(
    refresh_ahead: Duration,
    latency: Duration,
    script: impl Fn(u32) -> Result<Duration, IamError> + Send + Sync + 'static,
) -> (Arc<IamToken>, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let issuer = Scripted {
        calls: calls.clone(),
        latency,
        script: Box::new(script),
    };
    (
        Arc::new(IamToken::with_issuer(Box::new(issuer), refresh_ahead)),
        calls,
    )
}

fn outage() -> IamError {
    IamError::Unavailable {
        status: 503,
        detail: String::new(),
    }
}

fn refusal() -> IamError {
    IamError::Refused {
        status: 401,
        user: "u".into(),
        domain: "d".into(),
        project: "p".into(),
        detail: " (401: The username or password is wrong.)".into(),
    }
}

async fn token(source: &IamToken) -> String {
    source.token().await.unwrap().expose().to_owned()
}

#[tokio::test(start_paused = true)]
async fn a_fresh_token_is_reused_and_one_near_expiry_is_renewed_before_use() {
    let (source, calls) = scripted(HOUR, Duration::ZERO, |_| Ok(2 * HOUR));
    assert_eq!(token(&source).await, "token-1");
    tokio::time::advance(59 * MINUTE).await;
    assert_eq!(
        token(&source).await,
        "token-1",
        "61 minutes left: still fresh"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    tokio::time::advance(2 * MINUTE).await;
    assert_eq!(
        token(&source).await,
        "token-2",
        "59 minutes left: renewed before use"
    );
    assert_eq!(token(&source).await, "token-2");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_token_valid_for_as_long_as_a_duration_holds_is_cached_without_overflow() {
    // IAM writes `expires_at`: one in the year 9999 is some 8,000 years away, more than some
    // platforms' clocks can add, and a lifetime that long must not panic the job asking.
    let (source, calls) = scripted(HOUR, Duration::ZERO, |_| Ok(Duration::MAX));
    assert_eq!(token(&source).await, "token-1");
    tokio::time::advance(365 * 24 * HOUR).await;
    assert_eq!(token(&source).await, "token-1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn refresh_ahead_is_capped_at_half_a_short_lifetime() {
    let (source, calls) = scripted(HOUR, Duration::ZERO, |_| Ok(30 * MINUTE));
    assert_eq!(token(&source).await, "token-1");
    tokio::time::advance(14 * MINUTE).await;
    assert_eq!(token(&source).await, "token-1");
    tokio::time::advance(2 * MINUTE).await;
    assert_eq!(token(&source).await, "token-2");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn fifty_callers_refused_with_one_token_cause_one_sign_in() {
    let (source, calls) = scripted(HOUR, Duration::from_millis(300), |_| Ok(24 * HOUR));
    let refused = source.token().await.unwrap();
    let waiting: Vec<_> = (0..50)
        .map(|_| {
            let (source, refused) = (source.clone(), refused.clone());
            tokio::spawn(async move { source.refresh(&refused).await.unwrap() })
        })
        .collect();
    for task in waiting {
        assert!(task.await.unwrap(), "every caller may try again");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one sign-in for all fifty");
    assert_eq!(token(&source).await, "token-2");
    // A late caller with the old token learns it was already replaced, without a sign-in.
    assert!(source.refresh(&refused).await.unwrap());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_early_renewal_keeps_the_current_token_until_it_expires() {
    let (source, calls) = scripted(HOUR, Duration::ZERO, |n| {
        if n == 1 {
            Ok(2 * HOUR)
        } else {
            Err(outage())
        }
    });
    assert_eq!(token(&source).await, "token-1");
    tokio::time::advance(61 * MINUTE).await;
    assert_eq!(token(&source).await, "token-1", "IAM is down: keep it");
    assert_eq!(token(&source).await, "token-1");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the outage is held briefly"
    );
    tokio::time::advance(HOUR).await;
    let err = source.token().await.unwrap_err();
    assert!(matches!(err, AuthError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("IAM answered 503"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn callers_waiting_for_a_failed_sign_in_share_its_error() {
    let (source, calls) = scripted(HOUR, Duration::from_secs(1), |_| Err(outage()));
    let waiting: Vec<_> = (0..10)
        .map(|_| {
            let source = source.clone();
            tokio::spawn(async move { source.token().await })
        })
        .collect();
    for task in waiting {
        assert!(matches!(
            task.await.unwrap(),
            Err(AuthError::Unavailable(_))
        ));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    tokio::time::advance(OUTAGE_HOLD).await;
    assert!(source.token().await.is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "asked again after the hold"
    );
}

#[tokio::test(start_paused = true)]
async fn refused_credentials_are_not_tried_again_for_a_while() {
    let (source, calls) = scripted(HOUR, Duration::ZERO, |_| Err(refusal()));
    for _ in 0..5 {
        let err = source.token().await.unwrap_err();
        assert!(matches!(err, AuthError::Refused(_)), "{err}");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "IAM locks users out after failures"
    );
    tokio::time::advance(REFUSAL_HOLD).await;
    assert!(source.token().await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_refused_token_is_never_handed_out_again() {
    let (source, calls) = scripted(HOUR, Duration::ZERO, |n| {
        if n == 2 {
            Err(outage())
        } else {
            Ok(24 * HOUR)
        }
    });
    let refused = source.token().await.unwrap();
    assert!(matches!(
        source.refresh(&refused).await,
        Err(AuthError::Unavailable(_))
    ));
    // Still within the outage hold: an error, not the refused token.
    assert!(source.token().await.is_err());
    tokio::time::advance(OUTAGE_HOLD).await;
    assert_eq!(token(&source).await, "token-3");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

// --- against the in-process simulator --------------------------------------------------------

const USER: &str = "svc-swr";
const PASSWORD: &str = "pa55-w0rd-for-tests";

async fn sim() -> SimHandle {
    SimHandle::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SimConfig {
            iam_users: vec![(USER.into(), PASSWORD.into())],
            token_ttl: 2 * HOUR,
            ..SimConfig::default()
        },
    )
    .await
    .unwrap()
}

fn credentials(password: &str) -> IamCredentials {
    IamCredentials {
        user: USER.into(),
        domain: "acct".into(),
        project: "cn-north-4".into(),
        password: Secret::new(password),
    }
}

fn client(endpoint: &str, password: &str) -> IamClient {
    IamClient::new(
        endpoint,
        Duration::from_secs(5),
        credentials(password),
        tls(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_jobs_refused_with_one_token_cause_one_iam_request() {
    let sim = sim().await;
    let source = Arc::new(IamToken::new(client(&sim.url(), PASSWORD), HOUR));
    let refused = source.token().await.unwrap();
    assert!(refused.expose().starts_with(ISSUED_TOKEN_PREFIX));
    sim.expire_tokens();
    let waiting: Vec<_> = (0..50)
        .map(|_| {
            let (source, refused) = (source.clone(), refused.clone());
            tokio::spawn(async move { source.refresh(&refused).await })
        })
        .collect();
    for task in waiting {
        assert!(task.await.unwrap().unwrap());
    }
    let stats = sim.stats();
    assert_eq!((stats.iam_requests, stats.tokens_issued), (2, 2));
    let renewed = source.token().await.unwrap();
    assert_ne!(renewed, refused);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_client_reads_the_subject_token_and_expiry() {
    let sim = sim().await;
    let issued = client(&format!("{}/", sim.url()), PASSWORD)
        .issue()
        .await
        .unwrap();
    assert!(issued.token.expose().starts_with(ISSUED_TOKEN_PREFIX));
    assert!(issued.valid_for > 2 * HOUR - MINUTE && issued.valid_for <= 2 * HOUR);
    assert!(issued.expires_at > OffsetDateTime::now_utc() + (2 * HOUR - MINUTE));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_wrong_password_is_refused_with_iams_reason_and_without_the_password() {
    let sim = sim().await;
    let wrong = "wr0ng-pa55word";
    let err = client(&sim.url(), wrong).issue().await.unwrap_err();
    assert!(
        matches!(err, IamError::Refused { status: 401, .. }),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("The username or password is wrong.") && text.contains(USER),
        "{text}"
    );
    let as_auth = AuthError::from(err);
    assert!(matches!(as_auth, AuthError::Refused(_)));
    for shown in [text, format!("{as_auth:?}")] {
        assert!(
            !shown.contains(wrong) && !shown.contains(PASSWORD),
            "{shown}"
        );
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn unreachable_or_silent_iam_is_an_outage_not_a_refusal() {
    // Bound but never accepting: the connection is made and no answer ever comes.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let quick = IamClient::new(
        &silent_url,
        Duration::from_millis(200),
        credentials("x"),
        tls(),
    )
    .unwrap();
    let err = quick.issue().await.unwrap_err();
    assert!(matches!(err, IamError::Timeout(_)), "{err:?}");
    assert!(matches!(AuthError::from(err), AuthError::Unavailable(_)));

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // Login details in the endpoint stay out of the error (reqwest's text names the URL).
    let err = client(&format!("http://iam-user:hunter2@{closed}"), "x")
        .issue()
        .await
        .unwrap_err();
    assert!(matches!(err, IamError::Transport(_)), "{err:?}");
    assert!(err.to_string().starts_with("could not reach IAM"), "{err}");
    assert!(
        !err.to_string().contains("hunter2") && !err.to_string().contains("iam-user"),
        "{err}"
    );
}

#[test]
fn credentials_debug_hides_the_password() {
    let shown = format!("{:?}", credentials(PASSWORD));
    assert!(
        shown.contains(USER) && shown.contains("cn-north-4"),
        "{shown}"
    );
    assert!(!shown.contains(PASSWORD), "{shown}");
}

#[test]
fn expires_at_is_read_with_microseconds_or_without() {
    for (text, micros) in [
        ("2026-11-30T05:20:28.123000Z", 123_000),
        ("2026-11-30T05:20:28.123456Z", 123_456),
        ("2026-11-30T05:20:28Z", 0),
        ("2026-11-30T13:20:28.5+08:00", 500_000),
        // The ends of what RFC 3339 writes, in and out of the future.
        ("9999-12-31T05:20:28.999999Z", 999_999),
        ("0000-01-01T05:20:28Z", 0),
    ] {
        let body = format!(r#"{{"token":{{"expires_at":"{text}","methods":["password"]}}}}"#);
        let t = parse_expires_at(body.as_bytes()).unwrap();
        assert_eq!(
            (t.to_offset(time::UtcOffset::UTC).hour(), t.microsecond()),
            (5, micros),
            "{text}"
        );
    }
    for bad in [
        &br#"{"token":{}}"#[..],
        br#"{"token":{"expires_at":"tomorrow"}}"#,
        b"<html>",
    ] {
        assert!(matches!(parse_expires_at(bad), Err(IamError::BadAnswer(_))));
    }
}

#[test]
fn error_detail_reads_every_iam_shape_on_one_line() {
    assert_eq!(
        error_detail(br#"{"error":{"code":401,"message":"The username or password is wrong.","title":"Unauthorized"}}"#),
        " (401: The username or password is wrong.)"
    );
    assert_eq!(
        error_detail(br#"{"error_code":"IAM.0101","error_msg":"The user is locked.\nTry later"}"#),
        " (IAM.0101: The user is locked. Try later)"
    );
    assert_eq!(
        error_detail(br#"{"error":{"code":"IAM.0007","message":"Request parameter error"}}"#),
        " (IAM.0007: Request parameter error)"
    );
    assert_eq!(error_detail(b"<html>503</html>"), "");
    assert_eq!(error_detail(&[b'x'; 1000]), "");
    let long = format!(r#"{{"error_msg":"{}"}}"#, "m".repeat(1000));
    let detail = error_detail(long.as_bytes());
    assert_eq!(detail.chars().count(), 300);
    assert!(detail.ends_with('…'), "{detail}");
}

#[test]
fn a_long_unreadable_expiry_is_quoted_short() {
    let body = format!(r#"{{"token":{{"expires_at":"{}"}}}}"#, "9".repeat(100_000));
    let Err(IamError::BadAnswer(why)) = parse_expires_at(body.as_bytes()) else {
        panic!("expected a bad answer");
    };
    assert!(why.len() < 300 && why.contains('…'), "{why}");
}

fn tls() -> rustls::ClientConfig {
    crate::config::Config::load(None, std::iter::empty::<(String, String)>())
        .unwrap()
        .http
        .client_config()
        .unwrap()
}
