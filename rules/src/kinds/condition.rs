//! `when` conditions: an alert with a lifecycle (optionally sustained with `for`,
//! optionally with a separate `clear_when`), or one event per reading.

use super::{restore_entries, save_entries};
use crate::devices::{Devices, Untracked};
use crate::engine::{Outcome, Transition};
use crate::expr::Condition;
use crate::rule::{time_value, values, Ctx, Effects, Event};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An alert raised when `when` becomes true (and, with `for`, has stayed true that
/// long by reading time), resolved when `clear_when` is true, or without it when
/// `when` is false again.
///
/// | state | reading of the device | next state |
/// |---|---|---|
/// | idle | `when` true, no `for` | firing: `fired` |
/// | idle | `when` true, `for` given | pending since this reading |
/// | pending | `when` true, `for` elapsed since | firing: `fired` |
/// | pending | `when` false | idle |
/// | firing | `clear_when` true (without it: `when` false) | idle: `resolved` |
///
/// A reading the condition cannot be evaluated on (an [`EvalError`](crate::EvalError))
/// changes nothing: a pending timer keeps running, an open alert stays open.
#[derive(Debug)]
pub(crate) struct ConditionAlert {
    pub when: Condition,
    pub sustained: Option<TimeDelta>,
    pub clear_when: Option<Condition>,
    /// Only devices that are pending or firing have an entry.
    pub devices: Devices<State>,
}

/// A device that is pending or firing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct State {
    /// When the alert fired; `Some` while it is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fired_at: Option<DateTime<Utc>>,
    /// With `for`: the time of the first reading of the current run of readings
    /// `when` was true for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_since: Option<DateTime<Utc>>,
}

/// What is saved per device: the state and the source.
#[derive(Serialize, Deserialize)]
struct Saved {
    #[serde(default)]
    source: String,
    #[serde(flatten)]
    state: State,
}

impl ConditionAlert {
    pub(crate) fn evaluate(&mut self, fx: &Effects<'_>, ctx: &mut Ctx<'_, '_>, out: &mut Outcome) {
        let reading = ctx.reading;
        let device = reading.device;
        let fired_at = self.devices.get(device).and_then(|t| t.state.fired_at);
        if let Some(fired_at) = fired_at {
            // Firing: only the clear condition matters.
            let resolved = match &self.clear_when {
                Some(clear_when) => ctx.eval(clear_when),
                None => ctx.eval(&self.when).map(|when| !when),
            };
            match resolved {
                Err(message) => fx.error(out, message),
                Ok(false) => {
                    if let Some(tracked) = self.devices.get_mut(device) {
                        if tracked.source != reading.source {
                            reading.source.clone_into(&mut tracked.source);
                        }
                    }
                }
                Ok(true) => {
                    self.devices.remove(device, ctx.limit);
                    let mut data = Map::new();
                    data.insert("values".into(), values(reading));
                    data.insert("fired_at".into(), time_value(fired_at));
                    fx.transition(
                        out,
                        Event {
                            transition: Transition::Resolved,
                            device,
                            source: reading.source,
                            time: reading.time,
                            data,
                        },
                    );
                }
            }
            return;
        }
        match ctx.eval(&self.when) {
            Err(message) => fx.error(out, message),
            Ok(false) => {
                if self.devices.get(device).is_some() {
                    self.devices.remove(device, ctx.limit);
                    fx.progress(out, device);
                }
            }
            Ok(true) => {
                let now = reading.time;
                let tracked = self.devices.get_or_insert_with(
                    device,
                    reading.source,
                    ctx.limit,
                    State::default,
                );
                let tracked = match tracked {
                    Ok(tracked) => tracked,
                    Err(Untracked::Full(message)) => {
                        if let Some(message) = message {
                            fx.error(out, message);
                        }
                        return;
                    }
                };
                let mut data = Map::new();
                data.insert("values".into(), values(reading));
                if let Some(sustained) = self.sustained {
                    if tracked.state.pending_since.is_none() {
                        fx.progress(out, device);
                    }
                    let since = *tracked.state.pending_since.get_or_insert(now);
                    if now - since < sustained {
                        return;
                    }
                    data.insert("since".into(), time_value(since));
                }
                tracked.state = State {
                    fired_at: Some(now),
                    pending_since: None,
                };
                fx.transition(
                    out,
                    Event {
                        transition: Transition::Fired,
                        device,
                        source: reading.source,
                        time: now,
                        data,
                    },
                );
            }
        }
    }

    pub(crate) fn adopt(&mut self, previous: &mut ConditionAlert) {
        self.devices = std::mem::take(&mut previous.devices);
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
        let sustained = self.sustained.is_some();
        restore_entries(&mut self.devices, saved, limit, |saved: Saved| {
            let state = State {
                fired_at: saved.state.fired_at,
                // A `for` timer only means something for a rule with `for`.
                pending_since: saved
                    .state
                    .pending_since
                    .filter(|_| sustained && saved.state.fired_at.is_none()),
            };
            (state != State::default()).then_some((saved.source, state))
        })
    }
}

/// One event for every reading `when` is true for (`emit.every_reading = true`):
/// no state, no lifecycle, every event is `fired`.
#[derive(Debug)]
pub(crate) struct EveryReading {
    pub when: Condition,
}

impl EveryReading {
    pub(crate) fn evaluate(&mut self, fx: &Effects<'_>, ctx: &mut Ctx<'_, '_>, out: &mut Outcome) {
        match ctx.eval(&self.when) {
            Ok(true) => {
                let reading = ctx.reading;
                let mut data = Map::new();
                data.insert("values".into(), values(reading));
                fx.transition(
                    out,
                    Event {
                        transition: Transition::Fired,
                        device: reading.device,
                        source: reading.source,
                        time: reading.time,
                        data,
                    },
                );
            }
            Ok(false) => {}
            Err(message) => fx.error(out, message),
        }
    }
}
