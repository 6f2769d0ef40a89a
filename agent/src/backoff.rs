//! Jittered exponential backoff state, shared by every component that retries.
//!
//! It is pure bookkeeping (no sleeping here) so the retry decisions are unit tested
//! without sockets; callers sleep for [`Backoff::next_delay`] themselves.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use crate::config::BackoffConfig;

/// Delays that grow from `min` to `max`, each with random jitter, until [`reset`].
///
/// [`reset`]: Backoff::reset
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    current: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(cfg: BackoffConfig) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(cfg.min.0)
            .with_max_delay(cfg.max.0)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            current: builder.build(),
            builder,
            max: cfg.max.0,
        }
    }

    /// The delay before the next attempt. Never zero, never past `2 * max`
    /// (backon's jitter adds up to one more `max`), so a failure loop is never hot.
    pub fn next_delay(&mut self) -> Duration {
        // `without_max_times` makes the iterator endless; `max` is the fallback that
        // keeps this total even if that ever changes.
        self.current.next().unwrap_or(self.max)
    }

    /// Starts again from `min` after a success.
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(min_ms: u64, max_ms: u64) -> Backoff {
        Backoff::new(BackoffConfig::new(
            Duration::from_millis(min_ms),
            Duration::from_millis(max_ms),
        ))
    }

    #[test]
    fn delays_grow_and_stay_within_bounds() {
        let mut b = backoff(100, 1000);
        let delays: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        for d in &delays {
            assert!(*d >= Duration::from_millis(100), "{d:?}");
            assert!(*d <= Duration::from_millis(2000), "{d:?}");
        }
        assert!(delays[10] >= Duration::from_millis(1000), "{delays:?}");
    }

    #[test]
    fn reset_starts_again_from_the_minimum() {
        let mut b = backoff(100, 10_000);
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(300));
    }

    #[test]
    fn jitter_spreads_retries_of_many_agents() {
        let firsts: std::collections::HashSet<_> = (0..20)
            .map(|_| backoff(1000, 60_000).next_delay())
            .collect();
        assert!(firsts.len() > 1, "all agents would retry in lockstep");
    }
}
