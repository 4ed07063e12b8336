//! Where the `X-Auth-Token` comes from. A small trait so that a refreshing source (IAM, in
//! `iam.rs`) slots in beside the static one without touching the call path.

use futures_util::future::BoxFuture;

use crate::config::Secret;

/// Why no token could be had. The kind decides what the job does: a refusal fails it at once
/// (`unauthorized`), an outage is retried like a transport error.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AuthError {
    /// The identity service refused the credentials or the request; asking again will not help
    /// until the configuration changes.
    #[error("token source: {0}")]
    Refused(String),
    /// The identity service could not be asked, or failed; it may work later.
    #[error("token source: {0}")]
    Unavailable(String),
}

/// A source of SWR tokens, shared by every job.
pub trait TokenSource: Send + Sync {
    /// The token to send now.
    fn token(&self) -> BoxFuture<'_, Result<Secret, AuthError>>;
    /// Called after SWR refused `refused`. Returns true when a different token is now available
    /// (the caller tries once more), false when this source cannot renew (the job fails
    /// `unauthorized`).
    fn refresh<'a>(&'a self, refused: &'a Secret) -> BoxFuture<'a, Result<bool, AuthError>>;
}

/// A fixed token from configuration or `SWR_AUTH_TOKEN`; it cannot be renewed.
pub struct StaticToken(Secret);

impl StaticToken {
    pub fn new(token: Secret) -> Self {
        StaticToken(token)
    }
}

impl TokenSource for StaticToken {
    fn token(&self) -> BoxFuture<'_, Result<Secret, AuthError>> {
        let token = self.0.clone();
        Box::pin(async move { Ok(token) })
    }

    fn refresh<'a>(&'a self, _refused: &'a Secret) -> BoxFuture<'a, Result<bool, AuthError>> {
        Box::pin(async { Ok(false) })
    }
}
