//! When each slave on a bus is polled next, what a run of timeouts does to that, and
//! which outcomes are worth a log line. Pure: the caller passes the clock in.
//!
//! # Policy
//! - A bus carries one request at a time, so the slave due earliest goes next (config
//!   order breaks ties). Due times are absolute: a slave that had to wait while the bus
//!   was busy is simply overdue and goes first, so no slave is starved.
//! - After a poll that got an answer (even an exception), a slave is due `poll` after
//!   its previous due time, keeping a steady cadence; if it had to wait so long that
//!   this is less than half an interval away, it is due half an interval from now, so
//!   a late poll is not followed by a near-duplicate.
//! - After a timeout it is due again `poll` after the failed attempt ended. From the
//!   [`SILENT_AFTER`]th timeout in a row the interval doubles with each further
//!   timeout, up to `silent_max` (or the slave's own `poll` if that is longer), so a
//!   dead slave takes at most `timeout / (timeout + interval)` of the bus and the live
//!   slaves get the rest. The first answer puts it back on its own interval.
//! - A failure of the port itself ([`Failure::Io`]) says nothing about the slave: its
//!   run of timeouts is neither extended nor ended, and its health does not change.
//! - A read refused with an exception does not make a poll fail: the slave answered,
//!   and the refusal is a register map problem, logged per read. Only a poll that
//!   leaves nothing to send fails (see [`outcome`]); one whose reads were all refused
//!   is an exception, which keeps the slave on its own interval like any answer.
//!
//! Health is tracked per slave so that the caller logs once per change (a slave starts
//! failing, fails in a different way, answers again), not once per poll.

use std::time::{Duration, Instant};

/// Timeouts in a row after which a slave is polled less often. One lost frame is
/// common on a noisy RS-485 line, so the first retries keep the normal interval.
pub const SILENT_AFTER: u32 = 3;

/// The longest interval the schedule uses, whatever the config says; it keeps every
/// `Instant + interval` far from overflowing.
pub const LONGEST: Duration = Duration::from_secs(24 * 3600);

/// The silent interval that must pass between two frames on an RTU bus so every
/// device sees where one ends: 3.5 character times of 11 bits (start, 8 data, parity
/// or a second stop bit, stop), fixed at 1.75ms above 19200 baud by the Modbus serial
/// line specification.
pub fn frame_gap(baud: u32) -> Duration {
    if baud > 19_200 {
        Duration::from_micros(1750)
    } else {
        Duration::from_micros(38_500_000 / u64::from(baud.max(1)))
    }
}

/// Why a poll failed; `reason()` is the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No (complete) answer within the slave's timeout.
    Timeout,
    /// The slave answered a read with a Modbus exception (e.g. illegal data address).
    /// As a poll's outcome: it refused every read.
    Exception,
    /// An answer that is not the one asked for: another unit id, another function,
    /// or the wrong number of registers (a late answer to an earlier request).
    Mismatch,
    /// An answer that could not be decoded: a garbled frame, or no field left to send.
    Decode,
    /// The port failed (unplugged, write or read error).
    Io,
}

impl Failure {
    pub fn reason(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Exception => "exception",
            Failure::Mismatch => "mismatch",
            Failure::Decode => "decode",
            Failure::Io => "io",
        }
    }
}

/// How a poll whose reads all got a reply went, for [`Schedule::record`], from how
/// many fields its reading holds and how many of its reads were answered (not
/// refused with an exception): answered if the reading holds any field. Otherwise it
/// failed with [`Failure::Exception`] if every read was refused (the slave is alive
/// but gives nothing), or with [`Failure::Decode`] if no value it sent could be
/// decoded.
pub fn outcome(fields: usize, reads_answered: usize) -> Result<(), Failure> {
    match (fields, reads_answered) {
        (1.., _) => Ok(()),
        (0, 0) => Err(Failure::Exception),
        (0, _) => Err(Failure::Decode),
    }
}

/// A change in a slave's health worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// It answered, for the first time or after `after_failures` failed polls.
    Answering { after_failures: u32 },
    /// It started failing, or now fails for another reason.
    Failing(Failure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Unknown,
    Answering,
    Failing(Failure),
}

#[derive(Debug, Clone)]
struct SlaveState {
    poll: Duration,
    due: Instant,
    timeouts_in_a_row: u32,
    failed_polls: u32,
    health: Health,
}

/// The polling schedule of one bus.
#[derive(Debug, Clone)]
pub struct Schedule {
    slaves: Vec<SlaveState>,
    silent_max: Duration,
}

impl Schedule {
    /// One entry per slave, with its poll interval; all are due at `now`.
    pub fn new(
        polls: impl IntoIterator<Item = Duration>,
        silent_max: Duration,
        now: Instant,
    ) -> Self {
        Schedule {
            slaves: polls
                .into_iter()
                .map(|poll| SlaveState {
                    poll: poll.min(LONGEST),
                    due: now,
                    timeouts_in_a_row: 0,
                    failed_polls: 0,
                    health: Health::Unknown,
                })
                .collect(),
            silent_max,
        }
    }

    /// The slave to poll next and when it is due: the earliest due, the first in
    /// config order among equals. `None` only without slaves.
    pub fn next(&self) -> Option<(usize, Instant)> {
        self.slaves
            .iter()
            .enumerate()
            .min_by_key(|(i, s)| (s.due, *i))
            .map(|(i, s)| (i, s.due))
    }

    /// The interval slave `i` is on now: its `poll`, or longer while it keeps timing out.
    pub fn interval(&self, i: usize) -> Duration {
        self.slaves
            .get(i)
            .map_or(Duration::ZERO, |s| self.interval_of(s))
    }

    fn interval_of(&self, s: &SlaveState) -> Duration {
        if s.timeouts_in_a_row < SILENT_AFTER {
            return s.poll;
        }
        let doublings = (s.timeouts_in_a_row - SILENT_AFTER + 1).min(30);
        let cap = self.silent_max.max(s.poll).min(LONGEST);
        s.poll.saturating_mul(1 << doublings).min(cap)
    }

    /// Records how the poll of slave `i` that ended at `now` went, schedules its next
    /// poll, and says whether its health changed.
    pub fn record(
        &mut self,
        i: usize,
        outcome: Result<(), Failure>,
        now: Instant,
    ) -> Option<Change> {
        let mut s = self.slaves.get(i)?.clone();
        match outcome {
            Err(Failure::Timeout) => s.timeouts_in_a_row = s.timeouts_in_a_row.saturating_add(1),
            Err(Failure::Io) => {}
            Ok(()) | Err(_) => s.timeouts_in_a_row = 0,
        }
        s.due = match outcome {
            Err(Failure::Timeout) => now + self.interval_of(&s),
            // `min`: the poll that just ended was due no later than now.
            _ => (s.due.min(now) + s.poll).max(now + s.poll / 2),
        };
        let change = match outcome {
            Ok(()) => {
                let change = (s.health != Health::Answering).then_some(Change::Answering {
                    after_failures: s.failed_polls,
                });
                s.health = Health::Answering;
                s.failed_polls = 0;
                change
            }
            // The port's own log line covers it; the slave may be fine.
            Err(Failure::Io) => None,
            Err(f) => {
                s.failed_polls = s.failed_polls.saturating_add(1);
                let change = (s.health != Health::Failing(f)).then_some(Change::Failing(f));
                s.health = Health::Failing(f);
                change
            }
        };
        self.slaves[i] = s;
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_frame_gap_is_three_and_a_half_characters_and_at_least_1750_microseconds() {
        assert_eq!(frame_gap(9600), Duration::from_micros(4010));
        assert_eq!(frame_gap(19_200), Duration::from_micros(2005));
        assert_eq!(frame_gap(115_200), Duration::from_micros(1750));
        assert!(frame_gap(0) > Duration::ZERO);
    }

    #[test]
    fn every_slave_is_due_at_once_and_config_order_breaks_ties() {
        let t0 = Instant::now();
        let s = Schedule::new([200 * MS, 1000 * MS], 60_000 * MS, t0);
        assert_eq!(s.next(), Some((0, t0)));
    }

    #[test]
    fn an_answering_slave_keeps_a_steady_cadence() {
        let t0 = Instant::now();
        let mut s = Schedule::new([200 * MS], 60_000 * MS, t0);
        // Each poll takes 30ms; the next is due 200ms after the previous due time.
        let mut due = t0;
        for _ in 0..5 {
            s.record(0, Ok(()), due + 30 * MS);
            due += 200 * MS;
            assert_eq!(s.next(), Some((0, due)));
        }
    }

    #[test]
    fn the_slave_due_earliest_goes_next_so_an_overdue_one_is_not_starved() {
        let t0 = Instant::now();
        let mut s = Schedule::new([200 * MS, 200 * MS], 60_000 * MS, t0);
        // Slave 0 answers; slave 1 then times out for 1s, making slave 0 overdue.
        s.record(0, Ok(()), t0 + 10 * MS);
        assert_eq!(s.next(), Some((1, t0)));
        s.record(1, Err(Failure::Timeout), t0 + 1010 * MS);
        assert_eq!(s.next(), Some((0, t0 + 200 * MS)));
    }

    #[test]
    fn a_late_poll_is_not_followed_by_a_near_duplicate() {
        let t0 = Instant::now();
        let mut s = Schedule::new([1000 * MS], 60_000 * MS, t0);
        // Polled 900ms late: due + poll is only 100ms away, so half a period instead.
        s.record(0, Ok(()), t0 + 900 * MS);
        assert_eq!(s.next(), Some((0, t0 + 1400 * MS)));
    }

    #[test]
    fn a_slave_that_keeps_timing_out_is_polled_less_often_up_to_the_cap() {
        let t0 = Instant::now();
        let mut s = Schedule::new([200 * MS], 2000 * MS, t0);
        let mut now = t0;
        let mut intervals = Vec::new();
        for _ in 0..8 {
            now += 1000 * MS; // each attempt costs the 1s timeout
            s.record(0, Err(Failure::Timeout), now);
            let (_, due) = s.next().unwrap();
            intervals.push((due - now).as_millis());
            now = due;
        }
        assert_eq!(intervals, [200, 200, 400, 800, 1600, 2000, 2000, 2000]);
    }

    #[test]
    fn an_answer_puts_a_silent_slave_back_on_its_own_interval() {
        let t0 = Instant::now();
        let mut s = Schedule::new([200 * MS], 60_000 * MS, t0);
        let mut now = t0;
        for _ in 0..6 {
            now += 1000 * MS;
            s.record(0, Err(Failure::Timeout), now);
        }
        assert!(s.interval(0) > 200 * MS);
        now += 10 * MS;
        s.record(0, Ok(()), now);
        assert_eq!(s.interval(0), 200 * MS);
        let (_, due) = s.next().unwrap();
        assert!(due - now <= 200 * MS, "{:?}", due - now);
    }

    #[test]
    fn an_exception_shows_the_slave_is_alive_and_ends_the_backoff() {
        let t0 = Instant::now();
        let mut s = Schedule::new([200 * MS], 60_000 * MS, t0);
        for k in 1..=4 {
            s.record(0, Err(Failure::Timeout), t0 + k * 1000 * MS);
        }
        assert!(s.interval(0) > 200 * MS);
        s.record(0, Err(Failure::Exception), t0 + 5000 * MS);
        assert_eq!(s.interval(0), 200 * MS);
    }

    #[test]
    fn a_port_failure_neither_extends_nor_ends_a_run_of_timeouts_nor_changes_health() {
        let t0 = Instant::now();
        let mut s = Schedule::new([200 * MS], 60_000 * MS, t0);
        for k in 1..=3 {
            s.record(0, Err(Failure::Timeout), t0 + k * 1000 * MS);
        }
        let before = s.interval(0);
        assert_eq!(s.record(0, Err(Failure::Io), t0 + 4000 * MS), None);
        assert_eq!(s.interval(0), before);
        assert_eq!(
            s.record(0, Err(Failure::Timeout), t0 + 5000 * MS),
            None,
            "still the same run of timeouts"
        );
    }

    #[test]
    fn the_cap_never_makes_a_slave_poll_faster_than_its_own_interval() {
        let t0 = Instant::now();
        let mut s = Schedule::new([5000 * MS], 1000 * MS, t0);
        for k in 1..=6 {
            s.record(0, Err(Failure::Timeout), t0 + k * 1000 * MS);
        }
        assert_eq!(s.interval(0), 5000 * MS);
    }

    #[test]
    fn many_timeouts_and_huge_settings_do_not_overflow() {
        let t0 = Instant::now();
        let mut s = Schedule::new([Duration::MAX], Duration::MAX, t0);
        for _ in 0..100 {
            s.record(0, Err(Failure::Timeout), t0);
        }
        assert_eq!(s.interval(0), LONGEST);
        s.record(0, Ok(()), t0);
        let (slave, due) = s.next().expect("one slave is always scheduled");
        assert_eq!(slave, 0);
        assert!(due > t0, "the next poll is after this one: {due:?}");
    }

    #[test]
    fn health_changes_are_reported_once_each() {
        let t0 = Instant::now();
        let mut s = Schedule::new([200 * MS], 60_000 * MS, t0);
        let mut changes = Vec::new();
        let outcomes = [
            Ok(()),
            Ok(()),
            Err(Failure::Timeout),
            Err(Failure::Timeout),
            Err(Failure::Timeout),
            Err(Failure::Exception),
            Err(Failure::Exception),
            Ok(()),
            Ok(()),
        ];
        for (k, o) in outcomes.into_iter().enumerate() {
            changes.push(s.record(0, o, t0 + k as u32 * 1000 * MS));
        }
        assert_eq!(
            changes,
            [
                Some(Change::Answering { after_failures: 0 }),
                None,
                Some(Change::Failing(Failure::Timeout)),
                None,
                None,
                Some(Change::Failing(Failure::Exception)),
                None,
                Some(Change::Answering { after_failures: 5 }),
                None,
            ]
        );
    }

    #[test]
    fn an_unknown_slave_index_is_ignored() {
        let t0 = Instant::now();
        let mut s = Schedule::new([200 * MS], 60_000 * MS, t0);
        assert_eq!(s.record(7, Ok(()), t0), None);
        assert_eq!(s.interval(7), Duration::ZERO);
        assert_eq!(Schedule::new([], 60_000 * MS, t0).next(), None);
    }

    #[test]
    fn a_poll_is_answered_if_its_reading_holds_any_field_even_with_reads_refused() {
        assert_eq!(outcome(3, 2), Ok(()));
        assert_eq!(outcome(1, 1), Ok(()), "the other reads were refused");
        assert_eq!(outcome(0, 0), Err(Failure::Exception), "every read refused");
        assert_eq!(outcome(0, 1), Err(Failure::Decode), "nothing decodable");
    }

    #[test]
    fn a_slave_that_refuses_every_read_keeps_its_own_interval_and_is_reported_once() {
        let t0 = Instant::now();
        let mut s = Schedule::new([200 * MS], 60_000 * MS, t0);
        let mut changes = Vec::new();
        let mut due = t0;
        for _ in 0..5 {
            changes.push(s.record(0, Err(Failure::Exception), due + 30 * MS));
            due += 200 * MS;
            assert_eq!(s.next(), Some((0, due)));
        }
        assert_eq!(changes[0], Some(Change::Failing(Failure::Exception)));
        assert!(changes[1..].iter().all(Option::is_none), "{changes:?}");
    }
}
