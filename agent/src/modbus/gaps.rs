//! What is missing from a slave's readings right now, so that it is logged when it
//! starts and when it ends, not on every poll. Pure: the caller says what each poll
//! found.
//!
//! Two things leave a field out of a reading while the slave itself answers: a read
//! the slave refuses with an exception (its fields are missing), and a value that
//! cannot be sent (an `f32` NaN, which many devices use for "no value"). Both tend to
//! last: a register map entry at an address the device does not have is refused on
//! every poll, for good, and a device sends NaN until a sensor is fitted. A line per
//! poll would bury everything else in the journal, so the bus task keeps one [`Gaps`]
//! per slave for its reads and one for its fields, and logs each [`Turn`].
//!
//! A key that keeps flipping (a value that is NaN every other poll, a device busy
//! one poll and failing the next) would still give a line per poll. So each turn
//! says whether it is one of the key's first: it went missing for the first time, or
//! came back from that. Those are always logged, so an installer sees every wrong
//! register at once, however many there are; the later turns of the same key may be
//! rate limited.

use std::collections::btree_map::{BTreeMap, Entry};

/// A change worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// The key went missing, or is missing now for another reason than before.
    Opened { first: bool },
    /// The key is back after `polls` polls without it.
    Closed { first: bool, polls: u32 },
}

impl Turn {
    /// Whether the key went missing for the first time, or came back from that
    /// (see the module docs).
    pub fn first(self) -> bool {
        match self {
            Turn::Opened { first } | Turn::Closed { first, .. } => first,
        }
    }
}

#[derive(Debug, Clone)]
struct Key<V> {
    /// Why it is missing now; `None` while it is not.
    missing: Option<V>,
    /// Polls in a row it has been missing.
    polls: u32,
    /// Times it went missing or changed reason, so far.
    opened: u32,
}

/// The keys (reads, fields) missing now, and why; `V` is the reason, compared to
/// tell a new reason from the same one again, so it should hold what is worth a new
/// line (an exception code), not a value that changes every poll.
#[derive(Debug, Clone)]
pub struct Gaps<K, V> {
    keys: BTreeMap<K, Key<V>>,
}

impl<K, V> Default for Gaps<K, V> {
    fn default() -> Self {
        Gaps {
            keys: BTreeMap::new(),
        }
    }
}

impl<K: Ord, V: PartialEq> Gaps<K, V> {
    /// Records what one poll found about `key`: `Some(why)` if it is missing, `None`
    /// if it is there. Call it only for keys the poll could tell about (a field of a
    /// refused read is neither missing nor there), so a refusal never passes for a
    /// value that came back.
    pub fn observe(&mut self, key: K, missing: Option<V>) -> Option<Turn> {
        let k = match self.keys.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(_) if missing.is_none() => return None,
            Entry::Vacant(e) => e.insert(Key {
                missing: None,
                polls: 0,
                opened: 0,
            }),
        };
        match missing {
            None => {
                // Not missing before either: nothing changed.
                k.missing.take()?;
                Some(Turn::Closed {
                    first: k.opened <= 1,
                    polls: std::mem::take(&mut k.polls),
                })
            }
            Some(why) => {
                k.polls = k.polls.saturating_add(1);
                if k.missing.as_ref() == Some(&why) {
                    return None;
                }
                k.opened = k.opened.saturating_add(1);
                k.missing = Some(why);
                Some(Turn::Opened {
                    first: k.opened <= 1,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_missing_on_every_poll_is_one_turn_not_one_per_poll() {
        let mut g = Gaps::default();
        let turns: Vec<_> = (0..100).map(|_| g.observe("valve", Some(2u8))).collect();
        assert_eq!(turns[0], Some(Turn::Opened { first: true }));
        assert!(turns[1..].iter().all(Option::is_none), "{turns:?}");
    }

    #[test]
    fn a_key_that_comes_back_says_after_how_many_polls() {
        let mut g = Gaps::default();
        for _ in 0..3 {
            g.observe("t", Some(()));
        }
        assert_eq!(
            g.observe("t", None),
            Some(Turn::Closed {
                first: true,
                polls: 3
            })
        );
        assert_eq!(g.observe("t", None), None);
    }

    #[test]
    fn a_key_that_was_never_missing_gives_no_turn() {
        let mut g: Gaps<&str, ()> = Gaps::default();
        assert_eq!(g.observe("t", None), None);
        assert_eq!(g.observe("t", None), None);
    }

    #[test]
    fn a_new_reason_is_a_new_turn_within_the_same_gap_but_not_a_first_one() {
        let mut g = Gaps::default();
        assert_eq!(g.observe(0, Some('a')), Some(Turn::Opened { first: true }));
        assert_eq!(g.observe(0, Some('b')), Some(Turn::Opened { first: false }));
        assert_eq!(g.observe(0, Some('b')), None);
        assert_eq!(
            g.observe(0, None),
            Some(Turn::Closed {
                first: false,
                polls: 3
            })
        );
    }

    #[test]
    fn keys_are_tracked_apart() {
        let mut g = Gaps::default();
        assert_eq!(g.observe(1, Some(())), Some(Turn::Opened { first: true }));
        assert_eq!(g.observe(2, Some(())), Some(Turn::Opened { first: true }));
        assert_eq!(
            g.observe(1, None),
            Some(Turn::Closed {
                first: true,
                polls: 1
            })
        );
        assert_eq!(g.observe(2, Some(())), None, "2 is still missing");
        assert_eq!(g.observe(1, None), None, "1 is back already");
    }

    #[test]
    fn only_the_first_gap_of_a_key_that_flips_is_marked_first() {
        let mut g = Gaps::default();
        let mut turns = Vec::new();
        for missing in [true, false, true, false, true] {
            turns.push(g.observe("t", missing.then_some(())));
        }
        assert_eq!(
            turns,
            [
                Some(Turn::Opened { first: true }),
                Some(Turn::Closed {
                    first: true,
                    polls: 1
                }),
                Some(Turn::Opened { first: false }),
                Some(Turn::Closed {
                    first: false,
                    polls: 1
                }),
                Some(Turn::Opened { first: false }),
            ]
        );
        assert!(turns.iter().flatten().take(2).all(|t| t.first()));
    }
}
