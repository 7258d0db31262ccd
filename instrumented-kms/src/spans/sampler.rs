//! Rate limit for ordinary export: at most N new traces per second are
//! sampled. At the rates a KMS sees (tens of requests per second) every
//! trace is; under a flood the export cost stays bounded. The decision is
//! taken at the root span and inherited, so a sampled trace is complete.
//! Slow, failed and stuck spans are exported whatever the decision.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A per-second window counter (lock-free; a race at a window boundary may
/// let a few extra traces through, which is fine).
#[derive(Debug)]
pub(crate) struct Sampler {
    /// Traces per second; 0 means no limit.
    limit: u64,
    base: Instant,
    /// (window second << 32) | count in that window.
    state: AtomicU64,
}

impl Sampler {
    pub(crate) fn new(limit: u32) -> Self {
        Self {
            limit: u64::from(limit),
            base: Instant::now(),
            state: AtomicU64::new(0),
        }
    }

    /// Whether a new trace starting at `now` is sampled.
    pub(crate) fn sample(&self, now: Instant) -> bool {
        if self.limit == 0 {
            return true;
        }
        let second = now.saturating_duration_since(self.base).as_secs() & 0xFFFF_FFFF;
        let mut current = self.state.load(Ordering::Relaxed);
        loop {
            let (window, count) = (current >> 32, current & 0xFFFF_FFFF);
            let next = if window == second {
                if count >= self.limit {
                    return false;
                }
                current + 1
            } else {
                (second << 32) | 1
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn limits_per_second_window() {
        let s = Sampler::new(3);
        let t = s.base;
        assert!((0..3).all(|_| s.sample(t)));
        assert!(!s.sample(t));
        let later = t + Duration::from_secs(1);
        assert!(s.sample(later));
    }

    #[test]
    fn zero_means_unlimited() {
        let s = Sampler::new(0);
        assert!((0..10_000).all(|_| s.sample(Instant::now())));
    }
}
