//! Deadlines from durations that come from outside: the configuration, a message, an SWR or IAM
//! answer. Such a duration can be as long as a `Duration` holds, and `Instant + Duration` panics
//! when the sum overflows the platform's clock; every such sum goes through [`after`].

use std::time::Duration;

use tokio::time::Instant;

/// The farthest a deadline is set: 30 years, tokio's own cap on a sleep (longer sums overflow
/// the clock on some platforms: 100 years on FreeBSD, 1,000 on macOS). For a process, a deadline
/// that far away is never.
pub const HORIZON: Duration = Duration::from_secs(86400 * 365 * 30);

/// `from + wait`, with `wait` capped at [`HORIZON`]: never overflows.
pub fn after(from: Instant, wait: Duration) -> Instant {
    from + wait.min(HORIZON)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wait_as_long_as_a_duration_holds_ends_at_the_horizon() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::MAX), now + HORIZON);
        assert_eq!(after(now, Duration::from_secs(u64::MAX / 2)), now + HORIZON);
        assert_eq!(
            after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        // tokio sleeps until it without complaint.
        let far = after(now, Duration::MAX);
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), tokio::time::sleep_until(far))
                .await
                .is_err()
        );
    }
}
