//! `count`: at least N matching readings within a sliding window.

use super::{earliest, minus, plus, restore_entries, save_entries};
use crate::devices::{Devices, Untracked};
use crate::engine::{Outcome, Reading, Transition};
use crate::rule::{time_value, values, Effects, Event};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::VecDeque;

/// The largest `count.at_least`. A device's window keeps the times of its last
/// `at_least` counted readings (16 bytes each), so this bounds a count rule's memory
/// at 16 KB per device.
pub const MAX_COUNT: i64 = 1000;

/// Fires when at least `at_least` counted readings of a device fall within the last
/// `within` (strictly less than `within` before the newest one); resolves at the
/// moment the count drops below `at_least` again, which is when the oldest of those
/// readings leaves the window: that moment is the event time, whether a tick (once
/// the moment has passed: a reading at that very moment would keep the count up)
/// or a later reading of the device noticed it.
///
/// Whether the count reaches `at_least` only depends on the last `at_least` counted
/// times, so that is all that is kept.
#[derive(Debug)]
pub(crate) struct Count {
    pub at_least: usize,
    pub within: TimeDelta,
    pub devices: Devices<State>,
    /// No device is due before this (see [`Stale`](super::Stale)).
    pub next_due: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct State {
    /// The last `at_least` counted reading times, oldest first.
    times: VecDeque<DateTime<Utc>>,
    fired_at: Option<DateTime<Utc>>,
}

/// Saved per firing device, with its window so that it resolves on time.
#[derive(Serialize, Deserialize)]
struct Saved {
    #[serde(default)]
    source: String,
    fired_at: DateTime<Utc>,
    times: Vec<DateTime<Utc>>,
}

impl Count {
    /// When something is next due for a device: resolving if it fires (the oldest
    /// kept time leaves the window), forgetting it if not (the newest does).
    fn due(&self, state: &State) -> Option<DateTime<Utc>> {
        let time = if state.fired_at.is_some() {
            state.times.front()
        } else {
            state.times.back()
        };
        time.map(|&time| plus(time, self.within))
    }

    /// How many of the kept times are in the window that ends at `end`.
    fn in_window(&self, state: &State, end: DateTime<Utc>) -> usize {
        let start = minus(end, self.within);
        state
            .times
            .iter()
            .filter(|&&time| time > start && time <= end)
            .count()
    }

    /// The `resolved` event of a firing device whose count dropped at `at`.
    fn resolve(
        &self,
        fx: &Effects<'_>,
        device: &str,
        source: &str,
        state: &mut State,
        at: DateTime<Utc>,
        out: &mut Outcome,
    ) {
        let Some(fired_at) = state.fired_at.take() else {
            return;
        };
        let mut data = Map::new();
        data.insert("count".into(), Value::from(self.in_window(state, at)));
        data.insert("fired_at".into(), time_value(fired_at));
        fx.transition(
            out,
            Event {
                transition: Transition::Resolved,
                device,
                source,
                time: at,
                data,
            },
        );
    }

    pub(crate) fn evaluate(
        &mut self,
        fx: &Effects<'_>,
        reading: &Reading<'_>,
        limit: usize,
        out: &mut Outcome,
    ) {
        let now = reading.time;
        let mut state = match self.devices.get_or_insert_with(
            reading.device,
            reading.source,
            limit,
            State::default,
        ) {
            Ok(tracked) => std::mem::take(&mut tracked.state),
            Err(Untracked::Full(message)) => {
                if let Some(message) = message {
                    fx.error(out, message);
                }
                return;
            }
        };
        // First what time did before this reading: a count that dropped.
        if state.fired_at.is_some() {
            if let Some(due) = self.due(&state).filter(|&due| due < now) {
                self.resolve(fx, reading.device, reading.source, &mut state, due, out);
            }
        }
        // Then the reading: keep the times sorted, and only the last `at_least`.
        let at = state.times.partition_point(|&time| time <= now);
        state.times.insert(at, now);
        if state.times.len() > self.at_least {
            state.times.pop_front();
        }
        // Readings that left the window at this very moment (several at one time).
        if state.fired_at.is_some() && self.in_window(&state, now) < self.at_least {
            self.resolve(fx, reading.device, reading.source, &mut state, now, out);
        }
        if state.fired_at.is_none() {
            if let Some(&newest) = state.times.back() {
                let count = self.in_window(&state, newest);
                if count >= self.at_least {
                    state.fired_at = Some(now);
                    let since = state
                        .times
                        .iter()
                        .copied()
                        .find(|&time| time > minus(newest, self.within));
                    let mut data = Map::new();
                    data.insert("values".into(), values(reading));
                    data.insert("count".into(), Value::from(count));
                    if let Some(since) = since {
                        data.insert("since".into(), time_value(since));
                    }
                    fx.transition(
                        out,
                        Event {
                            transition: Transition::Fired,
                            device: reading.device,
                            source: reading.source,
                            time: now,
                            data,
                        },
                    );
                }
            }
        }
        if state.fired_at.is_some() {
            // An open alert's window is saved.
            fx.progress(out, reading.device);
        }
        self.next_due = earliest(self.next_due, self.due(&state));
        if let Some(tracked) = self.devices.get_mut(reading.device) {
            tracked.state = state;
        }
    }

    pub(crate) fn tick(
        &mut self,
        fx: &Effects<'_>,
        now: DateTime<Utc>,
        limit: usize,
        out: &mut Outcome,
    ) {
        if self.next_due.is_none_or(|due| due > now) {
            return;
        }
        // A count drops at its moment only if no reading arrives at that same moment,
        // so it is resolved once that moment has passed; a device is forgotten once
        // its newest reading has left the window.
        let mut due: Vec<(DateTime<Utc>, String)> = self
            .devices
            .iter()
            .filter_map(|(device, t)| Some((self.due(&t.state)?, device.clone(), t)))
            .filter(|(due, _, t)| *due < now || (t.state.fired_at.is_none() && *due <= now))
            .map(|(due, device, _)| (due, device))
            .collect();
        due.sort();
        for (at, device) in due {
            let Some(tracked) = self.devices.get_mut(&device) else {
                continue;
            };
            let mut state = std::mem::take(&mut tracked.state);
            let source = tracked.source.clone();
            if state.fired_at.is_some() {
                self.resolve(fx, &device, &source, &mut state, at, out);
            }
            // Forget a device whose every counted reading has left the window.
            let forget = state.fired_at.is_none()
                && state
                    .times
                    .back()
                    .is_none_or(|&newest| plus(newest, self.within) <= now);
            if forget {
                self.devices.remove(&device, limit);
            } else if let Some(tracked) = self.devices.get_mut(&device) {
                tracked.state = state;
            }
        }
        self.next_due = self.recompute_due();
    }

    fn recompute_due(&self) -> Option<DateTime<Utc>> {
        self.devices
            .iter()
            .filter_map(|(_, t)| self.due(&t.state))
            .min()
    }

    pub(crate) fn adopt(&mut self, previous: &mut Count) {
        self.devices = std::mem::take(&mut previous.devices);
        self.next_due = self.recompute_due();
    }

    pub(crate) fn save(&self, only: Option<&str>) -> Map<String, Value> {
        save_entries(&self.devices, only, |tracked| {
            Some(Saved {
                source: tracked.source.clone(),
                fired_at: tracked.state.fired_at?,
                times: tracked.state.times.iter().copied().collect(),
            })
        })
    }

    pub(crate) fn restore(&mut self, saved: &Map<String, Value>, limit: usize) -> usize {
        let at_least = self.at_least;
        let restored = restore_entries(&mut self.devices, saved, limit, |saved: Saved| {
            let mut times = saved.times;
            times.sort();
            let keep = times.len().saturating_sub(at_least);
            let times: VecDeque<_> = times.into_iter().skip(keep).collect();
            (!times.is_empty()).then_some((
                saved.source,
                State {
                    times,
                    fired_at: Some(saved.fired_at),
                },
            ))
        });
        self.next_due = self.recompute_due();
        restored
    }
}
