//! The current broker session's publisher, shared by the session loop and the jobs: replaced on
//! every reconnect, so a job whose SWR call outlived its connection can still publish its outcome
//! on the next one; and the signal by which a job that found it broken asks for a new session.

use std::sync::Arc;

use tokio::sync::{watch, Notify};

use super::publisher::Publisher;
use crate::config::AmqpConfig;

/// The session state the consumer loop and the jobs' publishes share.
pub struct Sessions {
    /// The current session's publisher (`None` before the first session).
    current: watch::Sender<Option<Arc<Publisher>>>,
    /// A job whose publish found the session's publisher broken says so here; the session loop
    /// then opens a new session (a channel can break while its connection lives on).
    broken: Notify,
    /// The user the worker logs in to the broker as (the broker refuses a publish whose
    /// `user_id` property names anyone else).
    login: String,
}

impl Sessions {
    /// No session yet; the login is the user of the first broker of `amqp.url` (a cluster's
    /// nodes share their users).
    pub fn new(amqp: &AmqpConfig) -> Sessions {
        let login = super::broker_urls(&amqp.url)
            .first()
            .map(|url| url.expose().to_owned())
            .unwrap_or_default()
            .parse::<lapin::uri::AMQPUri>()
            .map(|uri| uri.authority.userinfo.username)
            .unwrap_or_default();
        Sessions {
            current: watch::channel(None).0,
            broken: Notify::new(),
            login,
        }
    }

    /// The user the worker logs in to the broker as.
    pub fn login(&self) -> &str {
        &self.login
    }

    /// Makes `publisher` the current session's. A "publisher broke" signal stored for the
    /// session that just ended must not end this one: it is taken once this session's publisher
    /// is the current one (a job signals under the same lock, for the publisher it finds
    /// current, so no signal for the old session can come after this).
    pub fn begin(&self, publisher: Arc<Publisher>) {
        use futures_util::FutureExt;
        self.current.send_replace(Some(publisher));
        let _ = self.broken.notified().now_or_never();
    }

    /// Resolves when a job reported the current session's publisher broken.
    pub async fn broken(&self) {
        self.broken.notified().await;
    }

    /// Ends the current broker session when `broken` says its publisher is broken. The check and
    /// the signal happen under the publishers' lock, so a session that replaces the current one
    /// meanwhile is never ended by a signal meant for its predecessor.
    pub fn report_broken(&self, broken: impl Fn(&Arc<Publisher>) -> bool) {
        self.current.send_if_modified(|current| {
            if current.as_ref().is_some_and(&broken) {
                self.broken.notify_one();
            }
            false
        });
    }

    /// Watches the current publisher, to wait for the next session.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Publisher>>> {
        self.current.subscribe()
    }
}
