//! `rate`: how fast a field changes between consecutive readings of a device.

use super::{restore_entries, save_entries};
use crate::devices::{Devices, Untracked};
use crate::engine::{Outcome, Reading, Transition};
use crate::rule::{time_value, values, Effects, Event, FieldPath};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Fires when the rate of change of `field`, in units per `per`, between a reading
/// and the device's previous one is above `above` (or below `below`); resolves on
/// the first reading whose rate is not.
///
/// A reading whose time is not after the previous one's gives no rate and is
/// otherwise ignored (the previous reading stays the reference).
#[derive(Debug)]
pub(crate) struct Rate {
    pub field: FieldPath,
    pub per: TimeDelta,
    pub above: Option<f64>,
    pub below: Option<f64>,
    pub devices: Devices<State>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct State {
    /// Time and value of the previous reading with a value.
    previous: Option<(DateTime<Utc>, f64)>,
    fired_at: Option<DateTime<Utc>>,
}

/// Saved per device (firing devices only: the previous value is not worth a write).
#[derive(Serialize, Deserialize)]
struct Saved {
    #[serde(default)]
    source: String,
    fired_at: DateTime<Utc>,
}

impl Rate {
    pub(crate) fn evaluate(
        &mut self,
        fx: &Effects<'_>,
        reading: &Reading<'_>,
        limit: usize,
        out: &mut Outcome,
    ) {
        let value = match self.field.number(reading.fields) {
            Ok(value) => value,
            Err(message) => return fx.error(out, format!("`rate.field`: {message}")),
        };
        let tracked = match self.devices.get_or_insert_with(
            reading.device,
            reading.source,
            limit,
            State::default,
        ) {
            Ok(tracked) => tracked,
            Err(Untracked::Full(message)) => {
                if let Some(message) = message {
                    fx.error(out, message);
                }
                return;
            }
        };
        let now = reading.time;
        let Some((then, previous)) = tracked.state.previous else {
            tracked.state.previous = Some((now, value));
            return;
        };
        let elapsed = (now - then).num_milliseconds();
        if elapsed <= 0 {
            return;
        }
        tracked.state.previous = Some((now, value));
        let rate = (value - previous) / elapsed as f64 * self.per.num_milliseconds() as f64;
        if !rate.is_finite() {
            return fx.error(out, "`rate`: the rate is too large a number");
        }
        let active = self.above.is_some_and(|above| rate > above)
            || self.below.is_some_and(|below| rate < below);
        let transition = match (tracked.state.fired_at, active) {
            (None, true) => {
                tracked.state.fired_at = Some(now);
                Transition::Fired
            }
            (Some(_), false) => Transition::Resolved,
            _ => return,
        };
        let mut data = Map::new();
        data.insert("values".into(), values(reading));
        data.insert("rate".into(), Value::from(rate));
        if transition == Transition::Resolved {
            if let Some(fired_at) = tracked.state.fired_at.take() {
                data.insert("fired_at".into(), time_value(fired_at));
            }
        }
        fx.transition(
            out,
            Event {
                transition,
                device: reading.device,
                source: reading.source,
                time: now,
                data,
            },
        );
    }

    pub(crate) fn adopt(&mut self, previous: &mut Rate) {
        self.devices = std::mem::take(&mut previous.devices);
    }

    pub(crate) fn save(&self, only: Option<&str>) -> Map<String, Value> {
        save_entries(&self.devices, only, |tracked| {
            Some(Saved {
                source: tracked.source.clone(),
                fired_at: tracked.state.fired_at?,
            })
        })
    }

    pub(crate) fn restore(&mut self, saved: &Map<String, Value>, limit: usize) -> usize {
        restore_entries(&mut self.devices, saved, limit, |saved: Saved| {
            Some((
                saved.source,
                State {
                    previous: None,
                    fired_at: Some(saved.fired_at),
                },
            ))
        })
    }
}
