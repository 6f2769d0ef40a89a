//! Exact `drop_oldest` counting: what each sink has read and not yet settled.
//!
//! A sink reads a window of records, sends them, and only then moves its cursor
//! past them. If the store fills meanwhile, `drop_oldest` may remove records of
//! that window: the sink still has them in memory and will deliver them, so they
//! must not be counted as dropped. But if the sink never settles them (it starts
//! over from its cursor, as after a restart), they are lost for it and must be
//! counted then. This bookkeeping decides which, in memory only: a crash loses
//! the sink's window with the process, and the counters with it.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Default, Clone)]
pub struct Holds {
    /// Per sink, the sequences `[from, to)` it has read and not yet settled.
    windows: HashMap<String, (u64, u64)>,
    /// Records removed to make room while held: sequence -> the sinks that held
    /// them and needed them. Settled when each of them advances past it; counted
    /// once if one of them gives its window up instead.
    unsettled: BTreeMap<u64, Vec<String>>,
    /// Records counted dropped (`store_full`) so far, for tests.
    pub counted: u64,
}

impl Holds {
    /// `sink` read `[from, to)`: its new window. What it held before and did not
    /// settle is given up: returns how many of those records to count now.
    pub fn read(&mut self, sink: &str, from: u64, to: u64) -> u64 {
        let mut lost = 0;
        self.unsettled.retain(|_, holders| {
            let held = holders.iter().any(|h| h == sink);
            lost += u64::from(held);
            !held
        });
        if to > from {
            self.windows.insert(sink.to_string(), (from, to));
        } else {
            self.windows.remove(sink);
        }
        self.counted += lost;
        lost
    }

    /// `sink` has settled everything before `to` (accepted, refused, or never sent
    /// for a reason its own counters give).
    pub fn advance(&mut self, sink: &str, to: u64) {
        if let Some(w) = self.windows.get_mut(sink) {
            w.0 = w.0.max(to);
            if w.0 >= w.1 {
                self.windows.remove(sink);
            }
        }
        let settled: Vec<u64> = self
            .unsettled
            .range(..to)
            .filter(|(_, holders)| holders.iter().any(|h| h == sink))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in settled {
            if let Some(holders) = self.unsettled.get_mut(&seq) {
                holders.retain(|h| h != sink);
                if holders.is_empty() {
                    self.unsettled.remove(&seq);
                }
            }
        }
    }

    /// Whether `sink` holds record `seq` in its window.
    pub fn holds(&self, sink: &str, seq: u64) -> bool {
        self.windows
            .get(sink)
            .is_some_and(|(from, to)| (*from..*to).contains(&seq))
    }

    /// Record `seq` was removed to make room; `needers` are the sinks it was for
    /// that had not moved past it. Counted now (returns true) if one of them does
    /// not hold it; if every one does, it waits for them to settle it. A record no
    /// sink still needed is no loss at all.
    pub fn removed(&mut self, seq: u64, needers: Vec<String>) -> bool {
        if needers.is_empty() {
            return false;
        }
        if needers.iter().all(|n| self.holds(n, seq)) {
            self.unsettled.insert(seq, needers);
            return false;
        }
        self.counted += 1;
        true
    }

    /// Removed records still waiting for their holders.
    #[cfg(test)]
    pub fn unsettled(&self) -> usize {
        self.unsettled.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_held_record_removed_and_then_delivered_is_never_counted() {
        let mut h = Holds::default();
        assert_eq!(h.read("a", 0, 2), 0);
        assert!(!h.removed(0, names(&["a"])));
        assert!(!h.removed(1, names(&["a"])));
        h.advance("a", 2);
        assert_eq!(h.read("a", 5, 6), 0);
        assert_eq!(h.counted, 0);
        assert_eq!(h.unsettled(), 0);
    }

    #[test]
    fn a_held_record_the_sink_gives_up_is_counted_once_when_it_reads_again() {
        let mut h = Holds::default();
        h.read("a", 0, 2);
        h.removed(0, names(&["a"]));
        h.removed(1, names(&["a"]));
        // A partial settle (a retry keeps what went through).
        h.advance("a", 1);
        // A restart: the sink reads again from its cursor, past the removed ones.
        assert_eq!(h.read("a", 7, 9), 1);
        assert_eq!(h.read("a", 7, 9), 0);
        assert_eq!(h.counted, 1);
    }

    #[test]
    fn a_record_removed_outside_every_window_is_counted_at_once() {
        let mut h = Holds::default();
        h.read("a", 3, 5);
        assert!(h.removed(0, names(&["a"])));
        assert!(h.removed(5, names(&["a"])));
        assert_eq!(h.counted, 2);
    }

    #[test]
    fn a_record_lost_for_one_sink_is_counted_though_another_delivers_it() {
        let mut h = Holds::default();
        h.read("a", 0, 1);
        assert!(h.removed(0, names(&["a", "b"])), "b never read it");
        // Both hold it: counted only when one gives it up, and only once.
        h.read("b", 1, 2);
        h.read("a", 1, 2);
        assert!(!h.removed(1, names(&["a", "b"])));
        h.advance("a", 2);
        assert_eq!(h.read("b", 3, 4), 1);
        assert_eq!(h.read("a", 3, 4), 0);
        assert_eq!(h.counted, 2);
    }

    #[test]
    fn a_record_no_sink_needed_any_more_is_no_loss() {
        let mut h = Holds::default();
        assert!(!h.removed(0, Vec::new()));
        assert_eq!(h.counted, 0);
    }
}
