//! Rate limiting for log lines about bad input, so a flood of garbage cannot flood
//! the journal. Pure: the caller passes the clock in.

use std::time::{Duration, Instant};

/// Lets `burst` events through per `window`, then counts what it suppressed and
/// reports that count with the next event let through.
#[derive(Debug)]
pub struct RateLimit {
    window: Duration,
    burst: u32,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(burst: u32, window: Duration) -> Self {
        Self {
            window,
            burst,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` if this event should be logged, with `n` events suppressed before it;
    /// `None` if it should be suppressed.
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) >= self.window {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rest_of_the_window_is_suppressed() {
        let mut rl = RateLimit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let passed: Vec<_> = (0..10).map(|_| rl.check(t0)).collect();
        assert_eq!(passed.iter().filter(|p| p.is_some()).count(), 3);
    }

    #[test]
    fn the_next_window_reports_how_many_were_suppressed() {
        let mut rl = RateLimit::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(rl.check(t0), Some(0));
        assert_eq!(rl.check(t0), None);
        assert_eq!(rl.check(t0), None);
        assert_eq!(rl.check(t0 + Duration::from_secs(11)), Some(2));
    }
}
