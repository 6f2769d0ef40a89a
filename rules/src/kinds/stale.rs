//! `stale`: no reading from a device for a while.

use super::{earliest, plus, restore_entries, save_entries};
use crate::devices::{Devices, Untracked};
use crate::engine::{Outcome, Reading, Transition};
use crate::rule::{seconds_value, time_value, values, Effects, Event};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Fires when a device the rule has seen sends no (matching) reading for `after`:
/// at the tick at or after `last_seen + after`, with that moment as the event time.
/// Resolves on the device's next reading.
///
/// A reading that arrives after a longer silence than `after` with no tick in
/// between (replaying recorded readings, or a tick that came late) gives both
/// events at once: fired at `last_seen + after`, resolved at the reading's time.
#[derive(Debug)]
pub(crate) struct Stale {
    pub after: TimeDelta,
    pub devices: Devices<State>,
    /// No device is due before this; `None` if none is due at all. May be early
    /// (a reading moved a device's time on), never late.
    pub next_due: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct State {
    /// The latest reading time seen.
    last_seen: DateTime<Utc>,
    /// When the device became stale (`last_seen + after`); `Some` while firing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fired_at: Option<DateTime<Utc>>,
}

/// Saved per device: every device, so that one that went silent while the agent was
/// down is still noticed.
#[derive(Serialize, Deserialize)]
struct Saved {
    #[serde(default)]
    source: String,
    #[serde(flatten)]
    state: State,
}

impl Stale {
    pub(crate) fn evaluate(
        &mut self,
        fx: &Effects<'_>,
        reading: &Reading<'_>,
        limit: usize,
        out: &mut Outcome,
    ) {
        let now = reading.time;
        let after = self.after;
        let known = self.devices.get(reading.device).is_some();
        let tracked =
            match self
                .devices
                .get_or_insert_with(reading.device, reading.source, limit, || State {
                    last_seen: now,
                    fired_at: None,
                }) {
                Ok(tracked) => tracked,
                Err(Untracked::Full(message)) => {
                    if let Some(message) = message {
                        fx.error(out, message);
                    }
                    return;
                }
            };
        if known {
            let state = &mut tracked.state;
            let missed = plus(state.last_seen, after);
            if state.fired_at.is_none() && missed <= now {
                // Went stale and no tick has said so yet.
                state.fired_at = Some(missed);
                fx.transition(out, fired(reading.device, &tracked.source, state, after));
            }
            let state = &mut tracked.state;
            if let Some(fired_at) = state.fired_at.take() {
                let mut data = Map::new();
                data.insert("values".into(), values(reading));
                data.insert("last_seen".into(), time_value(state.last_seen));
                data.insert(
                    "stale_for_seconds".into(),
                    seconds_value(now - state.last_seen),
                );
                data.insert("fired_at".into(), time_value(fired_at));
                fx.transition(
                    out,
                    Event {
                        transition: Transition::Resolved,
                        device: reading.device,
                        source: reading.source,
                        time: now,
                        data,
                    },
                );
            }
            if now > state.last_seen {
                state.last_seen = now;
                fx.progress(out, reading.device);
            }
        } else {
            fx.progress(out, reading.device);
        }
        let due = plus(tracked.state.last_seen, after);
        self.next_due = earliest(self.next_due, Some(due));
    }

    pub(crate) fn tick(&mut self, fx: &Effects<'_>, now: DateTime<Utc>, out: &mut Outcome) {
        if self.next_due.is_none_or(|due| due > now) {
            return;
        }
        let after = self.after;
        let mut due: Vec<(DateTime<Utc>, String)> = self
            .devices
            .iter()
            .filter(|(_, t)| t.state.fired_at.is_none() && plus(t.state.last_seen, after) <= now)
            .map(|(device, t)| (plus(t.state.last_seen, after), device.clone()))
            .collect();
        due.sort();
        for (at, device) in due {
            if let Some(tracked) = self.devices.get_mut(&device) {
                tracked.state.fired_at = Some(at);
                fx.transition(out, fired(&device, &tracked.source, &tracked.state, after));
            }
        }
        self.next_due = self.recompute_due();
    }

    fn recompute_due(&self) -> Option<DateTime<Utc>> {
        self.devices
            .iter()
            .filter(|(_, t)| t.state.fired_at.is_none())
            .map(|(_, t)| plus(t.state.last_seen, self.after))
            .min()
    }

    pub(crate) fn adopt(&mut self, previous: &mut Stale) {
        self.devices = std::mem::take(&mut previous.devices);
        self.next_due = self.recompute_due();
    }

    pub(crate) fn save(&self, only: Option<&str>) -> Map<String, Value> {
        save_entries(&self.devices, only, |tracked| {
            Some(Saved {
                source: tracked.source.clone(),
                state: tracked.state.clone(),
            })
        })
    }

    pub(crate) fn restore(&mut self, saved: &Map<String, Value>, limit: usize) -> usize {
        let restored = restore_entries(&mut self.devices, saved, limit, |saved: Saved| {
            Some((saved.source, saved.state))
        });
        self.next_due = self.recompute_due();
        restored
    }
}

/// The `fired` event of a device that went stale at `state.fired_at`.
fn fired<'a>(device: &'a str, source: &'a str, state: &State, after: TimeDelta) -> Event<'a> {
    let mut data = Map::new();
    data.insert("last_seen".into(), time_value(state.last_seen));
    data.insert("stale_for_seconds".into(), seconds_value(after));
    Event {
        transition: Transition::Fired,
        device,
        source,
        time: state.fired_at.unwrap_or(plus(state.last_seen, after)),
        data,
    }
}
