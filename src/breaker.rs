//! The circuit breaker: when most recent SWR attempts fail transiently (an outage), the worker
//! stops taking new deliveries, so requests wait in the queue instead of burning their retry
//! budgets against a dead service. After `breaker.cooldown` one probe job is let through; its
//! success closes the breaker, its failure opens it for another cool-down.
//!
//! It only gates *new* deliveries (the consumer asks [`Breaker::admit`] before each); jobs
//! already running keep their own back-off.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::BreakerConfig;

/// What the breaker is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Normal operation.
    Closed,
    /// Not taking deliveries until the cool-down ends.
    Open { until: Instant },
    /// One probe job is (or may be) running; others wait for its answer.
    HalfOpen { probing: bool },
}

/// What [`Breaker::admit`] lets through, until a job takes it. Dropped unused (the session
/// ended, or a connection event came before a delivery), a probe goes back, so the next delivery
/// probes instead of every later one waiting for an answer that never comes.
#[must_use]
pub struct Pass<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

impl Pass<'_> {
    /// Hands the pass to the job that runs: whether that job is the probe.
    pub fn take(mut self) -> bool {
        std::mem::take(&mut self.probe)
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.probe_ended();
        }
    }
}

/// Shared by the consumer (admit) and every job (record).
pub struct Breaker {
    /// Off when `breaker.enabled = false`: admit never waits, record does nothing.
    enabled: bool,
    /// Recent attempt results (true = transient failure), newest last.
    recent: Mutex<VecDeque<bool>>,
    /// How many recent attempts are judged.
    window: usize,
    /// Fewest attempts in the window before the breaker may open.
    min_calls: usize,
    /// Failure share (0..=1) of the window that opens the breaker.
    failure_ratio: f64,
    /// How long it stays open before a probe.
    cooldown: Duration,
    /// The state; a watch so waiters wake on every change.
    state: watch::Sender<BreakerState>,
}

impl Breaker {
    pub fn new(config: &BreakerConfig) -> Breaker {
        Breaker {
            enabled: config.enabled,
            recent: Mutex::new(VecDeque::with_capacity(config.window)),
            window: config.window,
            min_calls: config.min_calls,
            failure_ratio: config.failure_ratio,
            cooldown: config.cooldown,
            state: watch::channel(BreakerState::Closed).0,
        }
    }

    /// The current state (for logs, readiness and metrics).
    pub fn state(&self) -> BreakerState {
        *self.state.borrow()
    }

    /// True while new deliveries are held back.
    pub fn is_open(&self) -> bool {
        !matches!(self.state(), BreakerState::Closed)
    }

    /// Waits until a new delivery may be taken. [`Pass::take`] tells whether the caller's job is
    /// the probe.
    pub async fn admit(&self) -> Pass<'_> {
        Pass {
            breaker: self,
            probe: self.wait_for_turn().await,
        }
    }

    async fn wait_for_turn(&self) -> bool {
        if !self.enabled {
            return false;
        }
        let mut changes = self.state.subscribe();
        loop {
            let current = *changes.borrow_and_update();
            match current {
                BreakerState::Closed => return false,
                BreakerState::Open { until } => {
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => {
                            self.state.send_if_modified(|s| {
                                if *s == current {
                                    *s = BreakerState::HalfOpen { probing: false };
                                    true
                                } else {
                                    false
                                }
                            });
                        }
                        _ = changes.changed() => {}
                    }
                }
                BreakerState::HalfOpen { probing: false } => {
                    let took = self.state.send_if_modified(|s| {
                        if *s == (BreakerState::HalfOpen { probing: false }) {
                            *s = BreakerState::HalfOpen { probing: true };
                            true
                        } else {
                            false
                        }
                    });
                    if took {
                        tracing::info!("circuit breaker: letting one probe job through");
                        return true;
                    }
                }
                BreakerState::HalfOpen { probing: true } => {
                    let _ = changes.changed().await;
                }
            }
        }
    }

    /// Records one SWR attempt: `transient_failure` for 429/5xx/timeouts/transport errors.
    /// `probe` is what [`admit`](Self::admit) returned for this job.
    pub fn record(&self, transient_failure: bool, probe: bool) {
        if !self.enabled {
            return;
        }
        if probe || matches!(self.state(), BreakerState::HalfOpen { .. }) {
            if !probe {
                return;
            }
            if transient_failure {
                self.open("the probe failed");
            } else {
                self.recent.lock().expect("breaker lock").clear();
                self.state.send_replace(BreakerState::Closed);
                tracing::info!("circuit breaker closed: SWR answers again");
            }
            return;
        }
        let trip = {
            let mut recent = self.recent.lock().expect("breaker lock");
            if recent.len() == self.window {
                recent.pop_front();
            }
            recent.push_back(transient_failure);
            let failures = recent.iter().filter(|f| **f).count();
            recent.len() >= self.min_calls
                && failures as f64 >= self.failure_ratio * recent.len() as f64
        };
        if trip && self.state() == BreakerState::Closed {
            self.open("most recent SWR attempts failed transiently");
        }
    }

    /// Called when a probe job ended: if it never reached SWR (a replay, an invalid request), the
    /// next delivery becomes the probe instead.
    pub fn probe_ended(&self) {
        self.state.send_if_modified(|s| {
            if *s == (BreakerState::HalfOpen { probing: true }) {
                *s = BreakerState::HalfOpen { probing: false };
                true
            } else {
                false
            }
        });
    }

    fn open(&self, why: &str) {
        let until = crate::deadline::after(Instant::now(), self.cooldown);
        self.state.send_replace(BreakerState::Open { until });
        self.recent.lock().expect("breaker lock").clear();
        tracing::warn!(
            reason = why,
            cooldown_ms = self.cooldown.as_millis() as u64,
            "circuit breaker open: not taking new requests until a probe succeeds"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn breaker_config() -> BreakerConfig {
        BreakerConfig {
            enabled: true,
            window: 10,
            min_calls: 5,
            failure_ratio: 0.5,
            cooldown: Duration::from_secs(30),
        }
    }

    fn breaker() -> Breaker {
        Breaker::new(&breaker_config())
    }

    #[tokio::test(start_paused = true)]
    async fn opens_when_most_recent_attempts_fail() {
        let b = breaker();
        for _ in 0..4 {
            b.record(true, false);
        }
        assert_eq!(b.state(), BreakerState::Closed, "fewer than min_calls");
        b.record(true, false);
        assert!(matches!(b.state(), BreakerState::Open { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn successes_keep_it_closed() {
        let b = breaker();
        for i in 0..100 {
            b.record(i % 3 == 0, false);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_cooldown_one_probe_goes_and_its_success_closes() {
        let b = Arc::new(breaker());
        for _ in 0..5 {
            b.record(true, false);
        }
        let start = Instant::now();
        let probe = b.admit().await.take();
        assert!(probe);
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        // A second job waits while the probe runs.
        let waiter = tokio::spawn({
            let b = b.clone();
            async move {
                let probe = b.admit().await.take();
                (probe, Instant::now())
            }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished());
        b.record(false, true);
        let (second_is_probe, admitted_at) = waiter.await.unwrap();
        assert!(!second_is_probe);
        assert_eq!(admitted_at.duration_since(start), Duration::from_secs(35));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again() {
        let b = breaker();
        for _ in 0..5 {
            b.record(true, false);
        }
        assert!(b.admit().await.take());
        b.record(true, true);
        assert!(matches!(b.state(), BreakerState::Open { .. }));
        let start = Instant::now();
        assert!(
            b.admit().await.take(),
            "the next probe after another cool-down"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_called_swr_hands_the_probe_on() {
        let b = breaker();
        for _ in 0..5 {
            b.record(true, false);
        }
        assert!(b.admit().await.take());
        b.probe_ended();
        assert!(b.admit().await.take(), "the next job probes");
        b.record(false, true);
        b.probe_ended();
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "ending an answered probe changes nothing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_dropped_before_a_job_took_it_hands_the_probe_on() {
        let b = breaker();
        for _ in 0..5 {
            b.record(true, false);
        }
        drop(b.admit().await);
        let next = tokio::time::timeout(Duration::from_secs(1), b.admit())
            .await
            .expect("the dropped probe went back: the next delivery probes at once");
        assert!(next.take());
        // A pass that was taken stays the job's: dropping the taken value changes nothing.
        assert_eq!(b.state(), BreakerState::HalfOpen { probing: true });
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooldown_as_long_as_a_duration_holds_opens_without_overflow() {
        let b = Breaker::new(&BreakerConfig {
            cooldown: Duration::MAX,
            ..breaker_config()
        });
        for _ in 0..5 {
            b.record(true, false);
        }
        assert!(matches!(b.state(), BreakerState::Open { .. }));
        assert!(
            tokio::time::timeout(Duration::from_secs(365 * 86400), b.admit())
                .await
                .is_err(),
            "still open a year later"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_never_waits() {
        let b = Breaker::new(&BreakerConfig {
            enabled: false,
            window: 10,
            min_calls: 1,
            failure_ratio: 0.1,
            cooldown: Duration::from_secs(30),
        });
        for _ in 0..50 {
            b.record(true, false);
        }
        assert!(!b.admit().await.take());
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
