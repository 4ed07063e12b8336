//! The job without a broker: an in-memory sink, the embedded store on a temporary file, and the
//! crate's simulator in-process on port 0. Nothing here needs RabbitMQ or PostgreSQL.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::*;
use crate::config::{Config, IdempotencyConfig};
use crate::idempotency::embedded::EmbeddedStore;
use crate::idempotency::{Claim, Gate, Store, StoreError};
use crate::outcome::{ErrorKind, Outcome, Status};
use crate::sim::{FaultRule, SimConfig, SimHandle};

/// What the job sent out, in order.
#[derive(Debug)]
enum Sent {
    /// A DLQ copy, with its `x-swr-error` reason.
    DeadLetter(String),
    /// An outcome, with what its publish was told to do if the session broke.
    Outcome(Box<Outcome>, OnBrokenSession),
}

/// A sink that keeps what is published; told to, it refuses outcomes as an unconfirmed publish.
#[derive(Default)]
struct MemorySink {
    /// Everything confirmed, in order.
    sent: Mutex<Vec<Sent>>,
    /// Refuse outcomes (not DLQ copies) while set.
    refuse_outcomes: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
#[error("no confirm from the in-memory sink")]
struct NotConfirmed;

impl OutcomeSink for MemorySink {
    type Error = NotConfirmed;

    async fn publish_outcome(
        &self,
        _envelope: &Envelope<'_>,
        outcome: &Outcome,
        body: &str,
        on_broken: OnBrokenSession,
    ) -> Result<(), NotConfirmed> {
        if self.refuse_outcomes.load(Ordering::SeqCst) {
            return Err(NotConfirmed);
        }
        let parsed: Outcome = serde_json::from_str(body).expect("the body is the outcome's JSON");
        assert_eq!(&parsed, outcome, "the body is this outcome");
        let sent = Sent::Outcome(Box::new(parsed), on_broken);
        self.sent.lock().unwrap().push(sent);
        Ok(())
    }

    async fn publish_dead_letter(
        &self,
        _envelope: &Envelope<'_>,
        reason: &str,
    ) -> Result<(), NotConfirmed> {
        let sent = Sent::DeadLetter(reason.to_owned());
        self.sent.lock().unwrap().push(sent);
        Ok(())
    }
}

impl MemorySink {
    /// The outcomes published so far.
    fn outcomes(&self) -> Vec<Outcome> {
        let sent = self.sent.lock().unwrap();
        let outcomes = sent.iter().filter_map(|sent| match sent {
            Sent::Outcome(outcome, _) => Some(outcome.as_ref().clone()),
            Sent::DeadLetter(_) => None,
        });
        outcomes.collect()
    }

    /// The only outcome published so far.
    fn only_outcome(&self) -> Outcome {
        let outcomes = self.outcomes();
        assert_eq!(outcomes.len(), 1, "{outcomes:?}");
        outcomes.into_iter().next().unwrap()
    }
}

/// A temporary SQLite file, removed with its journal files when the test ends.
struct TempStore(PathBuf);

impl TempStore {
    fn new() -> TempStore {
        let name = format!("swr-worker-unit-{}.db", uuid::Uuid::new_v4().simple());
        TempStore(std::env::temp_dir().join(name))
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A worker's job context on the simulator and a temporary embedded store.
struct Setup {
    ctx: JobContext,
    sim: SimHandle,
    /// Removes the store's file after the context is gone (fields drop in order).
    _store: TempStore,
}

async fn setup(extra: &[(&str, &str)]) -> Setup {
    let sim = SimHandle::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
        .await
        .unwrap();
    let store = TempStore::new();
    let mut env: Vec<(String, String)> = [
        ("SWR_ENDPOINT", sim.url().as_str()),
        ("SWR_AUTH_TOKEN", "unit-token"),
        (
            "SWR_STAGE_WORKER__IDEMPOTENCY__PATH",
            store.0.to_str().unwrap(),
        ),
        ("SWR_STAGE_WORKER__RETRY__INITIAL_INTERVAL", "10ms"),
        ("SWR_STAGE_WORKER__RETRY__MAX_INTERVAL", "50ms"),
        ("SWR_STAGE_WORKER__HTTP__TIMEOUT", "2s"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let config = Config::load(None, env).expect("a valid test configuration");
    let ctx = JobContext::new(Arc::new(config))
        .await
        .expect("job context");
    Setup {
        ctx,
        sim,
        _store: store,
    }
}

/// A valid request for `pipeline_id`, stage 0, retry, with its own key.
fn request(pipeline_id: i64, key: &str) -> Vec<u8> {
    format!(r#"{{"pipeline_id":{pipeline_id},"stage_index":0,"mode":"retry","idempotency_key":"{key}"}}"#)
        .into_bytes()
}

#[tokio::test]
async fn a_request_swr_accepts_is_published_succeeded_and_acked() {
    let s = setup(&[]).await;
    let sink = MemorySink::default();
    let body = request(1, "k-success");
    let disposition = process(&s.ctx, &sink, Envelope::new(&body), false).await;
    assert_eq!(disposition, Disposition::Ack);
    let outcome = sink.only_outcome();
    assert_eq!(
        (outcome.status, outcome.attempts, outcome.replayed),
        (Status::Succeeded, 1, false)
    );
    assert_eq!(outcome.idempotency_key, "k-success");
    assert!(
        matches!(outcome.http_status, Some(200..=299)),
        "{outcome:?}"
    );
    assert!(outcome.finished_at >= outcome.started_at, "{outcome:?}");
    assert_eq!(s.sim.calls().len(), 1);
}

#[tokio::test]
async fn a_transient_failure_is_retried_until_swr_accepts() {
    let s = setup(&[]).await;
    s.sim.add_rule(FaultRule {
        pipeline_id: Some(2),
        status: Some(503),
        times: Some(1),
        ..FaultRule::default()
    });
    let sink = MemorySink::default();
    let body = request(2, "k-transient");
    let disposition = process(&s.ctx, &sink, Envelope::new(&body), false).await;
    assert_eq!(disposition, Disposition::Ack);
    let outcome = sink.only_outcome();
    assert_eq!((outcome.status, outcome.attempts), (Status::Succeeded, 2));
    assert_eq!(s.sim.calls().len(), 2);
}

#[tokio::test]
async fn a_permanent_failure_is_published_failed_after_one_attempt() {
    let s = setup(&[]).await;
    s.sim.add_rule(FaultRule {
        pipeline_id: Some(3),
        status: Some(404),
        ..FaultRule::default()
    });
    let sink = MemorySink::default();
    let body = request(3, "k-permanent");
    let disposition = process(&s.ctx, &sink, Envelope::new(&body), false).await;
    assert_eq!(disposition, Disposition::Ack);
    let outcome = sink.only_outcome();
    assert_eq!((outcome.status, outcome.attempts), (Status::Failed, 1));
    let error = outcome.error.expect("a failed outcome says why");
    assert_eq!((error.kind, error.retryable), (ErrorKind::NotFound, false));
    assert_eq!(outcome.http_status, Some(404));
}

#[tokio::test]
async fn a_finished_key_is_replayed_without_calling_swr_again() {
    let s = setup(&[]).await;
    let sink = MemorySink::default();
    let body = request(4, "k-replay");
    for _ in 0..2 {
        let disposition = process(&s.ctx, &sink, Envelope::new(&body), false).await;
        assert_eq!(disposition, Disposition::Ack);
    }
    let outcomes = sink.outcomes();
    assert_eq!(outcomes.len(), 2);
    assert!(
        !outcomes[0].replayed && outcomes[1].replayed,
        "{outcomes:?}"
    );
    let mut replayed = outcomes[1].clone();
    replayed.replayed = false;
    assert_eq!(
        replayed, outcomes[0],
        "the stored outcome, as first published"
    );
    assert_eq!(s.sim.calls().len(), 1, "SWR was called once");
    let sent = sink.sent.lock().unwrap();
    assert!(
        matches!(&sent[1], Sent::Outcome(_, OnBrokenSession::Fail)),
        "a replay is requeued, not carried to the next session, when its session breaks"
    );
}

#[tokio::test]
async fn a_request_past_its_deadline_is_rejected_expired_and_its_key_freed() {
    let s = setup(&[]).await;
    let sink = MemorySink::default();
    let body = br#"{"pipeline_id":5,"stage_index":0,"idempotency_key":"k-expired","not_after":"2001-01-01T00:00:00Z"}"#;
    let disposition = process(&s.ctx, &sink, Envelope::new(body), false).await;
    assert_eq!(disposition, Disposition::Ack);
    let outcome = sink.only_outcome();
    assert_eq!((outcome.status, outcome.attempts), (Status::Rejected, 0));
    let error = outcome.error.expect("why it was rejected");
    assert_eq!(error.kind, ErrorKind::Expired);
    assert!(
        error.message.contains("2001-01-01T00:00:00Z"),
        "{}",
        error.message
    );
    assert!(s.sim.calls().is_empty(), "SWR is not called");
    // The key was released, not stored: a fresh request with it runs.
    let fresh = request(5, "k-expired");
    process(&s.ctx, &sink, Envelope::new(&fresh), false).await;
    assert_eq!(sink.outcomes()[1].status, Status::Succeeded);
}

#[tokio::test]
async fn the_loop_guard_refuses_a_step_run_too_often() {
    let s = setup(&[("SWR_STAGE_WORKER__GUARD__MAX_EXECUTIONS", "1")]).await;
    let sink = MemorySink::default();
    for key in ["k-guard-1", "k-guard-2"] {
        let body = request(6, key);
        let disposition = process(&s.ctx, &sink, Envelope::new(&body), false).await;
        assert_eq!(disposition, Disposition::Ack);
    }
    let outcomes = sink.outcomes();
    assert_eq!(outcomes[0].status, Status::Succeeded);
    let refused = &outcomes[1];
    assert_eq!((refused.status, refused.attempts), (Status::Rejected, 0));
    assert_eq!(refused.error.as_ref().unwrap().kind, ErrorKind::LoopGuard);
    assert_eq!(s.sim.calls().len(), 1, "the refused job did not call SWR");
}

#[tokio::test]
async fn an_invalid_body_is_copied_to_the_dlq_once_then_its_outcome_published() {
    let s = setup(&[]).await;
    let sink = MemorySink::default();
    let body = br#"{"pipeline_id":"seven","stage_index":0}"#;
    let mut envelope = Envelope::new(body);
    envelope.message_id = Some("m-invalid");
    let disposition = process(&s.ctx, &sink, envelope.clone(), false).await;
    assert_eq!(disposition, Disposition::Ack);
    {
        let sent = sink.sent.lock().unwrap();
        assert_eq!(sent.len(), 2, "{sent:?}");
        let Sent::DeadLetter(reason) = &sent[0] else {
            panic!("the DLQ copy goes first: {sent:?}");
        };
        assert!(reason.contains("pipeline_id"), "{reason}");
        let Sent::Outcome(outcome, _) = &sent[1] else {
            panic!("then the outcome: {sent:?}");
        };
        assert_eq!(outcome.status, Status::Rejected);
        assert_eq!(outcome.idempotency_key, "m-invalid");
        let error = outcome.error.as_ref().unwrap();
        assert_eq!(
            (error.kind, &error.message),
            (ErrorKind::InvalidRequest, reason)
        );
    }
    // Its redelivery (the ack was lost) adds no second copy: the outcome is replayed.
    envelope.redelivered = true;
    let disposition = process(&s.ctx, &sink, envelope, false).await;
    assert_eq!(disposition, Disposition::Ack);
    let sent = sink.sent.lock().unwrap();
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert!(
        matches!(&sent[2], Sent::Outcome(o, _) if o.replayed),
        "{sent:?}"
    );
    assert!(s.sim.calls().is_empty());
}

#[tokio::test]
async fn an_unconfirmed_outcome_requeues_and_its_redelivery_replays_the_stored_one() {
    let s = setup(&[]).await;
    let sink = MemorySink::default();
    sink.refuse_outcomes.store(true, Ordering::SeqCst);
    let body = request(8, "k-unconfirmed");
    let disposition = process(&s.ctx, &sink, Envelope::new(&body), false).await;
    let Disposition::Requeue(reason) = disposition else {
        panic!("an unconfirmed outcome must not be acked");
    };
    assert!(reason.starts_with("outcome not confirmed: "), "{reason}");
    assert!(
        s.ctx.metrics.render().contains("swr_stage"),
        "metrics render"
    );
    // The outcome was stored before the publish: the redelivery replays it, SWR is not called.
    sink.refuse_outcomes.store(false, Ordering::SeqCst);
    let mut again = Envelope::new(&body);
    again.redelivered = true;
    assert_eq!(process(&s.ctx, &sink, again, false).await, Disposition::Ack);
    let outcome = sink.only_outcome();
    assert!(
        outcome.replayed && outcome.status == Status::Succeeded,
        "{outcome:?}"
    );
    assert_eq!(s.sim.calls().len(), 1);
}

/// A store that answers nothing but `error`.
struct Unreachable(StoreError);

impl Unreachable {
    /// A real error of the embedded store: its file cannot be made (its directory is a file).
    fn new(store: &TempStore) -> Unreachable {
        std::fs::write(&store.0, b"not a directory").unwrap();
        let config = IdempotencyConfig {
            path: store.0.join("store.db").to_str().unwrap().to_owned(),
            ..Config::load(None, Vec::new()).unwrap().idempotency
        };
        Unreachable(
            EmbeddedStore::open(&config)
                .err()
                .expect("the store cannot open"),
        )
    }

    fn fail<'a, T: Send + 'a>(&'a self) -> BoxFuture<'a, Result<T, StoreError>> {
        Box::pin(async move { Err(self.0.clone()) })
    }
}

impl Store for Unreachable {
    fn claim<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        self.fail()
    }
    fn complete_json<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.fail()
    }
    fn finished<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Option<Outcome>, StoreError>> {
        self.fail()
    }
    fn release<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        self.fail()
    }
    fn count_execution<'a>(
        &'a self,
        _: &'a str,
        _: Duration,
        _: u32,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.fail()
    }
    fn prune(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        self.fail()
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.fail()
    }
}

#[tokio::test]
async fn a_store_that_cannot_answer_requeues_without_calling_swr_or_publishing() {
    let mut s = setup(&[]).await;
    let broken = TempStore::new();
    let store = Arc::new(Unreachable::new(&broken));
    s.ctx.gate = Some(Gate::new(store, "unit", &s.ctx.config.idempotency));
    let sink = MemorySink::default();
    let body = request(9, "k-store-down");
    let disposition = process(&s.ctx, &sink, Envelope::new(&body), false).await;
    let Disposition::Requeue(reason) = disposition else {
        panic!("a job whose key cannot be claimed must not run");
    };
    assert!(reason.contains("idempotency store"), "{reason}");
    assert!(sink.sent.lock().unwrap().is_empty());
    assert!(s.sim.calls().is_empty());
    // An invalid request's redelivery cannot tell whether its DLQ copy went out: it waits.
    let mut invalid = Envelope::new(b"{}");
    invalid.delivery_count = 1;
    let disposition = process(&s.ctx, &sink, invalid, false).await;
    assert!(
        matches!(&disposition, Disposition::Requeue(r) if r.starts_with("idempotency store unavailable")),
        "{disposition:?}"
    );
    assert!(sink.sent.lock().unwrap().is_empty());
}
