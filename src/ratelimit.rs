//! The per-process pace of SWR calls (`swr.max_requests_per_second`): a smooth schedule, one
//! call every `1/rate` seconds, so a campaign of 10,000 jobs at 50/s takes about 200 s instead of
//! arriving as a burst. Each caller reserves the next free slot and sleeps until it; there is no
//! queue to grow, only a time.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Paces calls to at most `rate` per second; `None` rate means unlimited.
pub struct RateLimiter {
    /// Time between two calls; `None` when unlimited.
    interval: Option<Duration>,
    /// The earliest time the next call may start.
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// `rate` calls per second; 0 (or less) means unlimited.
    pub fn new(rate: f64) -> RateLimiter {
        RateLimiter {
            interval: (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate)),
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
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + interval);
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
