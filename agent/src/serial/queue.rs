//! The write queue of a serial port: lines that rule actions want written, oldest
//! first, bounded in number and in age.
//!
//! The commit task adds lines without waiting; the port's task takes them whenever
//! the port is open. While the port is away the queue holds them. When it is full
//! the oldest line makes room, and a line older than the maximum age is dropped
//! instead of written: for an actuator the newest command is the one that matters,
//! and a stale one can do harm.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A line a rule action wants written, waiting for the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedLine {
    /// The rule that decided it, for metrics and logs.
    pub rule: String,
    /// Without line ending.
    pub line: String,
    /// When the rule decided it; its age counts from here, across retries.
    pub queued: Instant,
    /// Part of it already went out before the port failed: the device has a broken
    /// line to be ended before the whole line is written again.
    pub cut: bool,
}

impl QueuedLine {
    pub fn new(rule: String, line: String, queued: Instant) -> Self {
        Self {
            rule,
            line,
            queued,
            cut: false,
        }
    }
}

/// Lines waiting for one port.
#[derive(Debug)]
pub struct LineQueue {
    lines: VecDeque<QueuedLine>,
    capacity: usize,
    max_age: Duration,
}

impl LineQueue {
    /// `capacity` is at least 1 (a smaller one is taken as 1).
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        Self {
            lines: VecDeque::new(),
            capacity: capacity.max(1),
            max_age,
        }
    }

    /// Adds `line` at the back. Returns the line that had to go to make room (the
    /// oldest), if the queue was full.
    pub fn push(&mut self, line: QueuedLine) -> Option<QueuedLine> {
        let displaced = if self.lines.len() >= self.capacity {
            self.lines.pop_front()
        } else {
            None
        };
        self.lines.push_back(line);
        displaced
    }

    /// Puts back at the front a line taken with [`LineQueue::pop`] that could not be
    /// written, so it goes first once the port is back. If the queue filled up
    /// meanwhile, it is the oldest line and is returned instead of kept.
    pub fn requeue(&mut self, line: QueuedLine) -> Option<QueuedLine> {
        if self.lines.len() >= self.capacity {
            return Some(line);
        }
        self.lines.push_front(line);
        None
    }

    /// The oldest line still young enough at `now`, after dropping (into `expired`)
    /// every older one in front of it.
    pub fn pop(&mut self, now: Instant, expired: &mut Vec<QueuedLine>) -> Option<QueuedLine> {
        while let Some(line) = self.lines.pop_front() {
            if now.saturating_duration_since(line.queued) > self.max_age {
                expired.push(line);
            } else {
                return Some(line);
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, at: Instant) -> QueuedLine {
        QueuedLine::new("r".into(), text.into(), at)
    }

    fn texts(lines: &[QueuedLine]) -> Vec<&str> {
        lines.iter().map(|l| l.line.as_str()).collect()
    }

    #[test]
    fn lines_come_out_oldest_first() {
        let t0 = Instant::now();
        let mut q = LineQueue::new(4, Duration::from_secs(60));
        assert_eq!(q.push(line("a", t0)), None);
        assert_eq!(q.push(line("b", t0)), None);
        let mut expired = Vec::new();
        assert_eq!(q.pop(t0, &mut expired).map(|l| l.line), Some("a".into()));
        assert_eq!(q.pop(t0, &mut expired).map(|l| l.line), Some("b".into()));
        assert_eq!(q.pop(t0, &mut expired), None);
        assert!(expired.is_empty());
    }

    #[test]
    fn a_full_queue_lets_the_oldest_line_go_so_a_fresh_command_always_gets_in() {
        let t0 = Instant::now();
        let mut q = LineQueue::new(2, Duration::from_secs(60));
        q.push(line("old-1", t0));
        q.push(line("old-2", t0));
        let displaced = q.push(line("fresh", t0 + Duration::from_secs(5)));
        assert_eq!(displaced.map(|l| l.line), Some("old-1".into()));
        let mut expired = Vec::new();
        let left: Vec<String> = std::iter::from_fn(|| q.pop(t0, &mut expired).map(|l| l.line))
            .take(3)
            .collect();
        assert_eq!(left, ["old-2", "fresh"]);
    }

    #[test]
    fn lines_older_than_the_maximum_age_are_dropped_and_the_fresh_one_behind_them_goes() {
        let t0 = Instant::now();
        let mut q = LineQueue::new(8, Duration::from_secs(3));
        q.push(line("stale-1", t0));
        q.push(line("stale-2", t0 + Duration::from_secs(1)));
        q.push(line("fresh", t0 + Duration::from_secs(5)));
        let mut expired = Vec::new();
        let next = q.pop(t0 + Duration::from_secs(6), &mut expired);
        assert_eq!(next.map(|l| l.line), Some("fresh".into()));
        assert_eq!(texts(&expired), ["stale-1", "stale-2"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_line_that_could_not_be_written_goes_first_again_unless_the_queue_filled_up() {
        let t0 = Instant::now();
        let mut q = LineQueue::new(2, Duration::from_secs(60));
        q.push(line("a", t0));
        let mut expired = Vec::new();
        let a = q.pop(t0, &mut expired).expect("the queue holds a");
        assert_eq!(a.line, "a");
        q.push(line("b", t0));
        assert_eq!(q.requeue(a.clone()), None);
        assert_eq!(q.pop(t0, &mut expired), Some(a.clone()));
        q.push(line("c", t0));
        assert_eq!(
            q.requeue(a.clone()),
            Some(a),
            "full: the oldest line is the one to go"
        );
        let mut rest = Vec::new();
        while let Some(l) = q.pop(t0, &mut expired) {
            rest.push(l);
        }
        assert_eq!(
            texts(&rest),
            ["b", "c"],
            "the queued lines stay as they were"
        );
        assert!(expired.is_empty());
    }

    #[test]
    fn a_capacity_of_zero_is_taken_as_one() {
        let t0 = Instant::now();
        let mut q = LineQueue::new(0, Duration::from_secs(1));
        assert_eq!(q.push(line("a", t0)), None);
        assert_eq!(q.push(line("b", t0)).map(|l| l.line), Some("a".into()));
        assert_eq!(q.len(), 1);
    }
}
