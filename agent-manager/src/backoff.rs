//! Crash-loop backoff.

use std::time::Duration;

/// Exponential restart backoff, as kubelet's CrashLoopBackOff: the first restart waits
/// `initial`, each further consecutive failure doubles the wait up to `max`, and a run
/// that lasted `reset_after` clears the streak.
#[serde_with::serde_as]
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// The first wait. Key `initial_secs`.
    #[serde(rename = "initial_secs")]
    #[serde_as(as = "serde_with::DurationSeconds<u64>")]
    pub initial: Duration,
    /// The longest wait. Key `max_secs`.
    #[serde(rename = "max_secs")]
    #[serde_as(as = "serde_with::DurationSeconds<u64>")]
    pub max: Duration,
    /// A run at least this long clears the streak. Key `reset_after_secs`.
    #[serde(rename = "reset_after_secs")]
    #[serde_as(as = "serde_with::DurationSeconds<u64>")]
    pub reset_after: Duration,
}

impl Default for Backoff {
    /// 10 s doubling to 5 min, reset after 10 min of running.
    fn default() -> Self {
        Self { initial: Duration::from_secs(10), max: Duration::from_secs(300), reset_after: Duration::from_secs(600) }
    }
}

impl Backoff {
    /// The wait before restart number `streak` of a crash loop (1 for the first).
    pub fn delay(&self, streak: u32) -> Duration {
        let doublings = streak.saturating_sub(1).min(31);
        self.initial.saturating_mul(1u32 << doublings).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_ten_seconds_to_a_five_minute_cap() {
        let b = Backoff::default();
        let secs: Vec<u64> = (1..=9).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(secs, [10, 20, 40, 80, 160, 300, 300, 300, 300]);
        assert_eq!(b.delay(1000), Duration::from_secs(300));
    }
}
