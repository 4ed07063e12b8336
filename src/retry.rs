//! The retry *schedule*: how long to wait before the next attempt, and when to stop.
//!
//! Whether an answer is worth retrying is decided elsewhere (`swr::classify`); this module only
//! counts attempts and time. It is the one place that uses the `backoff` crate (unmaintained,
//! RUSTSEC-2025-0012), so replacing it touches this file alone. Time is tokio's clock, so tests
//! pin the schedule with paused time.

use std::time::{Duration, SystemTime};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use tokio::time::Instant;

use crate::config::RetryConfig;

/// Why the schedule said stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUp {
    /// `retry.max_attempts` attempts were made.
    Attempts,
    /// The next wait would end after `retry.max_elapsed`.
    Elapsed,
}

/// One job's schedule: create it when the job starts, ask it after each transient failure.
pub struct RetrySchedule {
    /// Exponential intervals with jitter; its own elapsed limit is off (we use tokio's clock).
    backoff: ExponentialBackoff,
    /// When the job's first attempt started.
    started: Instant,
    /// Attempts made so far (the caller reports each).
    attempts: u32,
    /// `retry.max_attempts`.
    max_attempts: u32,
    /// `retry.max_elapsed`.
    max_elapsed: Duration,
    /// `retry.max_interval`: also caps a jittered interval.
    max_interval: Duration,
}

impl RetrySchedule {
    pub fn new(config: &RetryConfig) -> Self {
        let backoff = ExponentialBackoff {
            current_interval: config.initial_interval,
            initial_interval: config.initial_interval,
            randomization_factor: config.randomization_factor,
            multiplier: config.multiplier,
            max_interval: config.max_interval,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        RetrySchedule {
            backoff,
            started: Instant::now(),
            attempts: 0,
            max_attempts: config.max_attempts,
            max_elapsed: config.max_elapsed,
            max_interval: config.max_interval,
        }
    }

    /// Records that an attempt is about to be made; false when the budget allows no more.
    pub fn begin_attempt(&mut self) -> bool {
        if self.attempts >= self.max_attempts {
            return false;
        }
        self.attempts += 1;
        true
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// After a transient failure: the wait before the next attempt, at least `retry_after`
    /// (the server's `Retry-After`), or why to stop.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Result<Duration, GiveUp> {
        if self.attempts >= self.max_attempts {
            return Err(GiveUp::Attempts);
        }
        let interval = self
            .backoff
            .next_backoff()
            .unwrap_or(self.max_interval)
            .min(self.max_interval);
        let delay = interval.max(retry_after.unwrap_or_default());
        // Saturating: a server's Retry-After can be as long as a Duration holds (u64::MAX s).
        if self.started.elapsed().saturating_add(delay) > self.max_elapsed {
            return Err(GiveUp::Elapsed);
        }
        Ok(delay)
    }
}

/// A `Retry-After` header value: delay-seconds, or an HTTP date (relative to `now`).
/// Unparsable values (garbage, a sign, a fraction) are ignored (None), as RFC 9110 allows.
/// Delay-seconds too many for a `u64` are still delay-seconds (`1*DIGIT`): they saturate, like
/// RFC 9111's delta-seconds, so the schedule sees a wait beyond its budget and stops.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    // Digits only: `u64::from_str` would also take a leading `+`, which delay-seconds has not.
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(jitter: f64) -> RetryConfig {
        RetryConfig {
            initial_interval: Duration::from_millis(200),
            multiplier: 2.0,
            max_interval: Duration::from_secs(30),
            max_elapsed: Duration::from_secs(300),
            max_attempts: 8,
            randomization_factor: jitter,
        }
    }

    /// Runs a job whose every attempt fails, returning the waits and why it stopped.
    async fn run_failing(
        cfg: &RetryConfig,
        retry_after: Option<Duration>,
    ) -> (Vec<Duration>, GiveUp, u32) {
        let mut schedule = RetrySchedule::new(cfg);
        let mut waits = Vec::new();
        loop {
            assert!(schedule.begin_attempt());
            match schedule.next_delay(retry_after) {
                Ok(d) => {
                    waits.push(d);
                    tokio::time::sleep(d).await;
                }
                Err(why) => return (waits, why, schedule.attempts()),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn exponential_without_jitter_is_exact() {
        let (waits, why, attempts) = run_failing(&config(0.0), None).await;
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 6400, 12800]);
        assert_eq!((why, attempts), (GiveUp::Attempts, 8));
    }

    #[tokio::test(start_paused = true)]
    async fn intervals_are_capped_at_max_interval() {
        let mut cfg = config(0.0);
        cfg.max_attempts = 12;
        let (waits, _, _) = run_failing(&cfg, None).await;
        assert_eq!(waits[7], Duration::from_millis(25600));
        assert!(
            waits[8..].iter().all(|w| *w == Duration::from_secs(30)),
            "{waits:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_stays_within_the_randomization_band() {
        for _ in 0..50 {
            let (waits, _, _) = run_failing(&config(0.5), None).await;
            let mut nominal = 200.0;
            for w in waits {
                let ms = w.as_secs_f64() * 1000.0;
                assert!(
                    ms >= nominal * 0.5 - 1.0 && ms <= nominal * 1.5 + 1.0,
                    "{ms} vs {nominal}"
                );
                nominal *= 2.0;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_a_lower_bound() {
        let (waits, _, _) = run_failing(&config(0.0), Some(Duration::from_secs(2))).await;
        assert_eq!(waits[0], Duration::from_secs(2));
        assert_eq!(waits[3], Duration::from_secs(2));
        assert_eq!(
            waits[4],
            Duration::from_millis(3200),
            "backoff wins once it is longer"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn max_elapsed_stops_before_a_wait_that_would_overrun() {
        let mut cfg = config(0.0);
        cfg.max_attempts = 100;
        cfg.max_elapsed = Duration::from_secs(5);
        let (waits, why, attempts) = run_failing(&cfg, None).await;
        // 0.2+0.4+0.8+1.6 = 3.0 s; the next 3.2 s wait would end at 6.2 s > 5 s.
        assert_eq!(waits.len(), 4);
        assert_eq!((why, attempts), (GiveUp::Elapsed, 5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_retry_after_ends_the_job_instead_of_sleeping_past_the_budget() {
        let (waits, why, attempts) =
            run_failing(&config(0.0), Some(Duration::from_secs(3600))).await;
        assert!(waits.is_empty());
        assert_eq!((why, attempts), (GiveUp::Elapsed, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_as_long_as_a_duration_holds_ends_the_job_without_overflow() {
        let longest = Some(Duration::from_secs(u64::MAX));
        let (waits, why, attempts) = run_failing(&config(0.0), longest).await;
        assert!(waits.is_empty());
        assert_eq!((why, attempts), (GiveUp::Elapsed, 1));
        // Later in the budget too (elapsed > 0), and with the largest Duration there is.
        let mut schedule = RetrySchedule::new(&config(0.0));
        schedule.begin_attempt();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            schedule.next_delay(Some(Duration::MAX)),
            Err(GiveUp::Elapsed)
        );
    }

    #[test]
    fn one_attempt_budget_means_no_retry() {
        let mut cfg = config(0.0);
        cfg.max_attempts = 1;
        let mut s = RetrySchedule::new(&cfg);
        assert!(s.begin_attempt());
        assert_eq!(s.next_delay(None), Err(GiveUp::Attempts));
        assert!(!s.begin_attempt());
    }

    #[test]
    fn retry_after_formats() {
        let now = httpdate::parse_http_date("Sun, 29 Nov 2026 05:00:00 GMT").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sun, 29 Nov 2026 05:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 29 Nov 2026 04:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn retry_after_extremes_saturate_or_are_ignored() {
        let now = httpdate::parse_http_date("Sun, 29 Nov 2026 05:00:00 GMT").unwrap();
        let longest = Some(Duration::from_secs(u64::MAX));
        assert_eq!(parse_retry_after("18446744073709551615", now), longest);
        // More digits than a u64 holds: still a delay, the longest one.
        assert_eq!(
            parse_retry_after("99999999999999999999999999", now),
            longest
        );
        // The last date HTTP can write, and one long past.
        let far = parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now).unwrap();
        assert!(far > Duration::from_secs(7000 * 365 * 86400), "{far:?}");
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        for junk in [
            "", " ", "+5", "1.5", "0x10", "1e9", "5 s", "-0", "Infinity", "\u{0661}",
        ] {
            assert_eq!(parse_retry_after(junk, now), None, "{junk:?}");
        }
    }
}
