//! The simulated IAM token endpoint (`POST /v3/auth/tokens`, password method, project scope) and
//! the tokens it has issued: which are still valid and how many there were.
//!
//! Pure logic like `model/`: the HTTP layer hands it the method and body and sends back what it
//! answers. It never decides anything about the SWR route beyond "is this token one I issued, and
//! has it expired".

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use serde_json::json;

use super::model::lock;

/// Issued tokens start with this, like real ones (`MII…`), and carry a marker so a test can
/// search a log for any token the simulator ever issued.
pub const ISSUED_TOKEN_PREFIX: &str = "MIIsim";

/// Above this many remembered tokens, expired ones are forgotten when a new one is issued, so a
/// long run cannot grow the map without bound.
const MAX_REMEMBERED: usize = 10_000;

/// What the SWR route learns about a token from IAM's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Issued {
    /// Issued here and not expired.
    Valid,
    /// Issued here, but past its expiry (or expired on purpose).
    Expired,
    /// Not a token this endpoint issued.
    Unknown,
}

/// One answer of the token endpoint, minus the `X-Request-Id` the HTTP layer adds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IamAnswer {
    /// HTTP status: 201 on success.
    pub status: u16,
    /// JSON body: the token's details, or IAM's `{"error": {...}}`.
    pub body: String,
    /// The new token, sent as `X-Subject-Token` (IAM never puts it in the body).
    pub subject_token: Option<String>,
}

/// The endpoint's state: who may sign in and what was issued.
#[derive(Debug)]
pub(crate) struct Iam {
    /// User name → password; empty means every sign-in is refused.
    users: HashMap<String, String>,
    /// Lifetime of an issued token.
    ttl: Duration,
    /// Issued token → when it stops being accepted.
    issued: Mutex<HashMap<String, Instant>>,
    /// Calls to the token endpoint, whatever the answer, to count sign-in attempts.
    requests: AtomicU64,
    /// Tokens issued, so a test can show that N waiting jobs caused one renewal.
    tokens_issued: AtomicU64,
}

/// The request body of password authentication, only the parts the simulator checks.
#[derive(Deserialize)]
struct AuthRequest {
    /// The `auth` object.
    auth: Auth,
}

#[derive(Deserialize)]
struct Auth {
    /// Who is signing in and how.
    identity: Identity,
    /// What the token is for; SWR needs a project.
    scope: Option<Scope>,
}

#[derive(Deserialize)]
struct Identity {
    /// Must include "password".
    methods: Vec<String>,
    /// The password method's details.
    password: Option<PasswordMethod>,
}

#[derive(Deserialize)]
struct PasswordMethod {
    /// The user signing in.
    user: User,
}

#[derive(Deserialize)]
struct User {
    /// IAM user name.
    name: String,
    /// The user's password.
    password: String,
    /// The account the user belongs to.
    domain: Named,
}

#[derive(Deserialize)]
struct Scope {
    /// The project the token is scoped to.
    project: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    /// The name; IAM also accepts ids, the simulator only names.
    name: String,
}

impl Iam {
    pub(crate) fn new(users: &[(String, String)], ttl: Duration) -> Iam {
        Iam {
            users: users.iter().cloned().collect(),
            // `--token-ttl` is the operator's to write: capped so that now + ttl fits every
            // clock and `expires_at` stays a four-digit year.
            ttl: ttl.min(crate::deadline::HORIZON),
            issued: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
            tokens_issued: AtomicU64::new(0),
        }
    }

    /// Whether any token can have been issued, so the SWR route can skip the lookup otherwise.
    pub(crate) fn enabled(&self) -> bool {
        !self.users.is_empty()
    }

    /// Whether `token` was issued here and is still valid.
    pub(crate) fn check(&self, token: &str) -> Issued {
        match lock(&self.issued).get(token) {
            None => Issued::Unknown,
            Some(expires) if Instant::now() < *expires => Issued::Valid,
            Some(_) => Issued::Expired,
        }
    }

    /// Answers one call to `POST /v3/auth/tokens`.
    pub(crate) fn issue(&self, method: &str, body: &[u8]) -> IamAnswer {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if method != "POST" {
            return iam_error(
                405,
                "Method Not Allowed",
                &format!("Method {method} is not allowed; use POST"),
            );
        }
        let request: AuthRequest = match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(e) => {
                return iam_error(
                    400,
                    "Bad Request",
                    &format!("The request body is invalid: {e}"),
                )
            }
        };
        let identity = request.auth.identity;
        let Some(password) = identity
            .password
            .filter(|_| identity.methods.iter().any(|m| m == "password"))
        else {
            return iam_error(
                400,
                "Bad Request",
                "The simulator supports auth.identity.methods [\"password\"] with auth.identity.password only",
            );
        };
        let Some(project) = request
            .auth
            .scope
            .and_then(|s| s.project)
            .filter(|p| !p.name.is_empty())
        else {
            return iam_error(
                400,
                "Bad Request",
                "auth.scope.project.name is required (the simulator issues project-scoped tokens only)",
            );
        };
        let user = password.user;
        if user.domain.name.is_empty()
            || self.users.get(&user.name) != Some(&user.password)
            || user.password.is_empty()
        {
            return iam_error(401, "Unauthorized", "The username or password is wrong.");
        }

        let token = format!(
            "{ISSUED_TOKEN_PREFIX}{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let now = SystemTime::now();
        {
            let mut issued = lock(&self.issued);
            let expires = Instant::now() + self.ttl;
            if issued.len() >= MAX_REMEMBERED {
                let now = Instant::now();
                issued.retain(|_, until| *until > now);
            }
            issued.insert(token.clone(), expires);
        }
        self.tokens_issued.fetch_add(1, Ordering::Relaxed);
        let body = json!({
            "token": {
                "expires_at": huawei_time(now + self.ttl),
                "issued_at": huawei_time(now),
                "methods": ["password"],
                "user": {"name": user.name, "domain": {"name": user.domain.name}},
                "project": {"name": project.name},
            }
        });
        IamAnswer {
            status: 201,
            body: body.to_string(),
            subject_token: Some(token),
        }
    }

    /// Makes every issued token expire now; returns how many were still valid.
    pub(crate) fn expire_all(&self) -> usize {
        let now = Instant::now();
        let mut issued = lock(&self.issued);
        let mut expired = 0;
        for until in issued.values_mut() {
            if *until > now {
                *until = now;
                expired += 1;
            }
        }
        expired
    }

    /// Calls to the token endpoint.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Tokens issued.
    pub(crate) fn tokens_issued(&self) -> u64 {
        self.tokens_issued.load(Ordering::Relaxed)
    }

    /// Zeroes the counters; issued tokens stay valid (clients still hold them).
    pub(crate) fn reset_counters(&self) {
        self.requests.store(0, Ordering::Relaxed);
        self.tokens_issued.store(0, Ordering::Relaxed);
    }
}

/// IAM's own error shape: `{"error": {"code", "message", "title"}}`.
fn iam_error(status: u16, title: &str, message: &str) -> IamAnswer {
    IamAnswer {
        status,
        body: json!({"error": {"code": status, "message": message, "title": title}}).to_string(),
        subject_token: None,
    }
}

/// UTC with microseconds and `Z`, as IAM writes `expires_at`: `2026-11-30T05:20:28.123000Z`.
fn huawei_time(at: SystemTime) -> String {
    let t = time::OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn iam() -> Iam {
        Iam::new(
            &[("alice".into(), "pw-1".into())],
            Duration::from_secs(3600),
        )
    }

    fn body(user: &str, password: &str, project: &str) -> Vec<u8> {
        json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": user, "password": password, "domain": {"name": "acct"}}}},
            "scope": {"project": {"name": project}}}})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn good_credentials_get_a_token_in_the_header_and_expiry_in_the_body() {
        let iam = iam();
        let answer = iam.issue("POST", &body("alice", "pw-1", "cn-north-4"));
        assert_eq!(answer.status, 201);
        let token = answer.subject_token.expect("X-Subject-Token");
        assert!(token.starts_with(ISSUED_TOKEN_PREFIX) && token.len() > 64);
        assert!(
            !answer.body.contains(&token),
            "the token is only in the header"
        );
        let b: Value = serde_json::from_str(&answer.body).unwrap();
        let expires = b["token"]["expires_at"].as_str().unwrap();
        let parsed =
            time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
                .unwrap();
        let left = parsed - time::OffsetDateTime::now_utc();
        assert!(left > time::Duration::minutes(59) && left <= time::Duration::hours(1));
        assert!(expires.ends_with('Z') && expires.len() == "2026-11-30T05:20:28.123000Z".len());
        assert_eq!(b["token"]["project"]["name"], "cn-north-4");
        assert_eq!(iam.check(&token), Issued::Valid);
        assert_eq!((iam.requests(), iam.tokens_issued()), (1, 1));
    }

    #[test]
    fn wrong_password_or_user_is_401_in_iam_shape() {
        let iam = iam();
        for (user, password) in [("alice", "nope"), ("bob", "pw-1"), ("alice", "")] {
            let answer = iam.issue("POST", &body(user, password, "p"));
            assert_eq!(answer.status, 401, "{user}/{password}");
            assert_eq!(answer.subject_token, None);
            let b: Value = serde_json::from_str(&answer.body).unwrap();
            assert_eq!(b["error"]["code"], 401);
            assert_eq!(b["error"]["message"], "The username or password is wrong.");
        }
        assert_eq!((iam.requests(), iam.tokens_issued()), (3, 0));
    }

    #[test]
    fn malformed_or_unscoped_requests_are_400() {
        let iam = iam();
        let unscoped = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": "alice", "password": "pw-1", "domain": {"name": "acct"}}}}}})
        .to_string();
        for raw in [&b"{"[..], b"{}", unscoped.as_bytes()] {
            assert_eq!(iam.issue("POST", raw).status, 400);
        }
        assert_eq!(iam.issue("GET", &body("alice", "pw-1", "p")).status, 405);
        assert_eq!(iam.tokens_issued(), 0);
    }

    #[test]
    fn expire_all_ends_every_issued_token_and_unknown_tokens_stay_unknown() {
        let iam = iam();
        let a = iam
            .issue("POST", &body("alice", "pw-1", "p"))
            .subject_token
            .unwrap();
        let b = iam
            .issue("POST", &body("alice", "pw-1", "p"))
            .subject_token
            .unwrap();
        assert_ne!(a, b);
        assert_eq!(iam.expire_all(), 2);
        assert_eq!(iam.check(&a), Issued::Expired);
        assert_eq!(iam.check(&b), Issued::Expired);
        assert_eq!(iam.expire_all(), 0, "already expired");
        assert_eq!(iam.check("someone-else"), Issued::Unknown);
        let c = iam
            .issue("POST", &body("alice", "pw-1", "p"))
            .subject_token
            .unwrap();
        assert_eq!(iam.check(&c), Issued::Valid, "new tokens are not affected");
    }

    #[test]
    fn a_lifetime_as_long_as_a_duration_holds_is_capped_at_the_horizon() {
        let iam = Iam::new(&[("alice".into(), "pw-1".into())], Duration::MAX);
        let answer = iam.issue("POST", &body("alice", "pw-1", "p"));
        assert_eq!(answer.status, 201);
        let b: Value = serde_json::from_str(&answer.body).unwrap();
        let expires = b["token"]["expires_at"].as_str().unwrap();
        let parsed =
            time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
                .unwrap();
        let left = parsed - time::OffsetDateTime::now_utc();
        assert!(
            left > time::Duration::days(29 * 365) && left <= time::Duration::days(30 * 365),
            "{expires}"
        );
        assert_eq!(iam.check(&answer.subject_token.unwrap()), Issued::Valid);
    }

    #[test]
    fn a_zero_lifetime_token_is_expired_at_once() {
        let iam = Iam::new(&[("alice".into(), "pw-1".into())], Duration::ZERO);
        let t = iam
            .issue("POST", &body("alice", "pw-1", "p"))
            .subject_token
            .unwrap();
        assert_eq!(iam.check(&t), Issued::Expired);
    }
}
