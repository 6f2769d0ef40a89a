//! When a commit stops waiting for more input (pure).
//!
//! Every store commit is fsync'd, and a commit costs about the same CPU whether it
//! holds one reading or a hundred; so does the upstream request each commit wakes
//! a sink for. At a few thousand readings a second, committing as soon as anything
//! is queued means a commit (and a request) per handful of readings. The commit
//! task therefore lets a batch gather for `store.commit_linger` after its first
//! input, and stops early when waiting longer cannot bring more:
//!
//! - the batch holds the most inputs one commit takes;
//! - an MQTT source has as many readings waiting for their PUBACK as its broker
//!   sends before it waits for one (`broker_inflight`): the broker sends nothing
//!   more until this commit acknowledges them, so lingering would only stall it.

use std::time::Duration;

/// How a batch gathers: for at most `linger`, at most `max_inputs`.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub linger: Duration,
    pub max_inputs: usize,
}

/// One batch gathering inputs.
#[derive(Debug)]
pub struct Gathering {
    max_inputs: usize,
    inputs: usize,
    /// Per source with a window: (name, its inputs in this batch waiting for an
    /// acknowledgement, its window). A gateway has a handful of sources.
    waiting: Vec<(String, usize, usize)>,
    full: bool,
}

impl Gathering {
    pub fn new(policy: &Policy) -> Gathering {
        Gathering {
            max_inputs: policy.max_inputs,
            inputs: 0,
            waiting: Vec::new(),
            full: false,
        }
    }

    /// Counts one input of `source`. `window` is how many of that source's inputs
    /// its producer lets wait unacknowledged (an MQTT broker's in-flight limit), if
    /// it has such a limit and this input waits for an acknowledgement.
    pub fn add(&mut self, source: &str, window: Option<usize>) {
        self.inputs += 1;
        if self.inputs >= self.max_inputs {
            self.full = true;
        }
        let Some(window) = window else { return };
        let count = match self.waiting.iter_mut().find(|(s, _, _)| s == source) {
            Some((_, n, _)) => {
                *n += 1;
                *n
            }
            None => {
                self.waiting.push((source.to_string(), 1, window));
                1
            }
        };
        if count >= window {
            self.full = true;
        }
    }

    /// Whether waiting longer cannot add to this batch: commit now.
    pub fn complete(&self) -> bool {
        self.full
    }

    /// Room left in this batch.
    pub fn room(&self) -> usize {
        self.max_inputs.saturating_sub(self.inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_inputs: usize) -> Policy {
        Policy {
            linger: Duration::from_millis(5),
            max_inputs,
        }
    }

    #[test]
    fn a_batch_keeps_gathering_while_no_source_is_at_its_window() {
        let mut g = Gathering::new(&policy(1024));
        for _ in 0..9 {
            g.add("local", Some(10));
        }
        g.add("serial", None);
        assert!(!g.complete());
        assert_eq!(g.room(), 1014);
    }

    #[test]
    fn a_source_with_its_whole_window_waiting_ends_the_gathering() {
        let mut g = Gathering::new(&policy(1024));
        for _ in 0..9 {
            g.add("a", Some(10));
            g.add("b", Some(20));
        }
        assert!(!g.complete());
        g.add("a", Some(10));
        assert!(g.complete());
    }

    #[test]
    fn inputs_that_wait_for_no_acknowledgement_never_fill_a_window() {
        let mut g = Gathering::new(&policy(1024));
        for _ in 0..100 {
            g.add("plc", None);
        }
        assert!(!g.complete());
    }

    #[test]
    fn a_batch_at_its_most_inputs_is_complete_and_has_no_room() {
        let mut g = Gathering::new(&policy(3));
        g.add("plc", None);
        g.add("plc", None);
        assert!(!g.complete());
        g.add("plc", None);
        assert!(g.complete());
        assert_eq!(g.room(), 0);
    }
}
