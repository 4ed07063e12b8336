//! A smooth pace, one call every `1/rate` seconds: the per-process pace of SWR calls
//! (`swr.max_requests_per_second`), so a campaign of 10,000 jobs at 50/s takes about 200 s instead
//! of arriving as a burst, and `submit --rate`. Each caller reserves the next free slot and
//! sleeps until it; there is no queue to grow, only a time.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Paces calls to at most `rate` per second; `None` rate means unlimited.
pub struct RateLimiter {
    /// Time between two calls; `None` when unlimited.
    interval: Option<Duration>,
    /// How far behind its slot a caller may come and still take it.
    catch_up: Duration,
    /// The earliest time the next call may start.
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// `rate` calls per second; 0 (or less) means unlimited.
    pub fn new(rate: f64) -> RateLimiter {
        RateLimiter::with_catch_up(rate, Duration::ZERO)
    }

    /// Like [`new`](Self::new), but a caller up to `catch_up` late for its slot still takes it,
    /// so timer jitter and short waits elsewhere do not lower the average rate. A caller later
    /// than that (a stall) starts the schedule again from now: what was not sent during the
    /// stall is spread over the time after it, not released at once.
    pub fn with_catch_up(rate: f64, catch_up: Duration) -> RateLimiter {
        RateLimiter {
            // A rate too small for a Duration's interval (callers validate; this is the
            // floor under them) paces as slowly as a Duration allows instead of panicking.
            interval: (rate > 0.0)
                .then(|| Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::MAX)),
            catch_up,
            next: Mutex::new(None),
        }
    }

    /// Waits for this caller's slot. The first call after an idle spell goes at once; a backlog
    /// is spread out evenly, never released as a burst.
    pub async fn until_ready(&self) {
        let Some(interval) = self.interval else {
            return;
        };
        let slot = {
            let mut next = self.next.lock().expect("rate limiter lock");
            let now = Instant::now();
            let slot = match *next {
                Some(n) if now <= crate::deadline::after(n, self.catch_up) => n,
                _ => now,
            };
            *next = Some(crate::deadline::after(slot, interval));
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn calls_are_spread_evenly_at_the_rate() {
        let limiter = std::sync::Arc::new(RateLimiter::new(5.0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let limiter = limiter.clone();
            tasks.push(tokio::spawn(async move {
                limiter.until_ready().await;
                start.elapsed()
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap());
        }
        times.sort();
        let ms: Vec<u128> = times.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 200, 400, 600, 800, 1000, 1200, 1400, 1600, 1800]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_spell_does_not_bank_a_burst() {
        let limiter = RateLimiter::new(10.0);
        limiter.until_ready().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let start = Instant::now();
        for _ in 0..3 {
            limiter.until_ready().await;
        }
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(200),
            "first at once, then 100 ms apart"
        );
    }

    /// Times of `n` calls, from `start`, in ms.
    async fn calls(limiter: &RateLimiter, start: Instant, n: usize) -> Vec<u128> {
        let mut times = Vec::new();
        for _ in 0..n {
            limiter.until_ready().await;
            times.push(start.elapsed().as_millis());
        }
        times
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_a_little_late_keeps_the_schedule() {
        let limiter = RateLimiter::with_catch_up(10.0, Duration::from_millis(100));
        let start = Instant::now();
        assert_eq!(calls(&limiter, start, 4).await, [0, 100, 200, 300]);
        // Woken 50 ms late for the fifth slot (400): it goes now, and the schedule holds, so
        // the average rate does.
        tokio::time::sleep_until(start + Duration::from_millis(450)).await;
        assert_eq!(calls(&limiter, start, 2).await, [450, 500]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_does_not_release_a_burst() {
        let limiter = RateLimiter::with_catch_up(10.0, Duration::from_millis(100));
        let start = Instant::now();
        assert_eq!(calls(&limiter, start, 3).await, [0, 100, 200]);
        // A 5 s stall: the next call goes now, and the rest follow at the rate, not the 47
        // calls "owed" at once.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = Instant::now();
        assert_eq!(calls(&limiter, after, 4).await, [0, 100, 200, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_too_small_for_a_duration_paces_without_overflow() {
        let limiter = RateLimiter::with_catch_up(1e-300, Duration::MAX);
        let start = Instant::now();
        limiter.until_ready().await;
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the first call goes at once"
        );
        let year = Duration::from_secs(365 * 86400);
        assert!(
            tokio::time::timeout(year, limiter.until_ready())
                .await
                .is_err(),
            "the next one waits its (very long) interval"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_means_unlimited() {
        let limiter = RateLimiter::new(0.0);
        let start = Instant::now();
        for _ in 0..1000 {
            limiter.until_ready().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
