//! `forward = { deadband = {...} }`: forward a reading only when it says something
//! new.

use crate::devices::{Devices, Untracked};
use crate::engine::{Outcome, Reading};
use crate::rule::{Effects, FieldPath, Vote};
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;

/// A reading is forwarded if, for some listed field, it moved by more than that
/// field's deadband since the device's last *forwarded* reading (numbers: by
/// absolute difference; any other value: by being different; a field the last
/// forwarded reading did not have: by being there), or if `at_least_every` has
/// passed since then. Otherwise it is dropped.
///
/// Always forwarded: a device's first reading, and a reading with none of the listed
/// fields (not this rule's business). A device the rule cannot track (over the
/// limit) is forwarded: thinning out never costs data by accident.
#[derive(Debug)]
pub(crate) struct Deadband {
    pub fields: Vec<(FieldPath, f64)>,
    pub at_least_every: Option<TimeDelta>,
    pub devices: Devices<State>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct State {
    /// Per listed field, its value in the last forwarded reading that had it.
    last: Vec<Option<Last>>,
    /// Time of the last forwarded reading.
    time: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
enum Last {
    Number(f64),
    Other(Value),
}

impl Deadband {
    pub(crate) fn decide(&self, reading: &Reading<'_>) -> Vote {
        let Some(tracked) = self.devices.get(reading.device) else {
            return Vote::Passed;
        };
        if self
            .at_least_every
            .is_some_and(|every| reading.time - tracked.state.time >= every)
        {
            return Vote::Passed;
        }
        let mut any_listed = false;
        for ((field, band), last) in self.fields.iter().zip(&tracked.state.last) {
            let Some(value) = field.lookup(reading.fields) else {
                continue;
            };
            any_listed = true;
            let moved = match (last, value.as_f64()) {
                (None, _) => true,
                (Some(Last::Number(last)), Some(now)) => (now - last).abs() > *band,
                (Some(Last::Other(last)), _) => last != value,
                (Some(Last::Number(_)), None) => true,
            };
            if moved {
                return Vote::Passed;
            }
        }
        if any_listed {
            Vote::Drop
        } else {
            Vote::Keep
        }
    }

    /// The reading was forwarded: it is the device's new reference.
    pub(crate) fn commit(
        &mut self,
        fx: &Effects<'_>,
        reading: &Reading<'_>,
        limit: usize,
        out: &mut Outcome,
    ) {
        let fields = self.fields.len();
        let tracked =
            match self
                .devices
                .get_or_insert_with(reading.device, reading.source, limit, || State {
                    last: vec![None; fields],
                    time: reading.time,
                }) {
                Ok(tracked) => tracked,
                Err(Untracked::Full(message)) => {
                    if let Some(message) = message {
                        fx.error(out, message);
                    }
                    return;
                }
            };
        tracked.state.time = reading.time;
        for ((field, _), last) in self.fields.iter().zip(&mut tracked.state.last) {
            if let Some(value) = field.lookup(reading.fields) {
                *last = Some(match value.as_f64() {
                    Some(number) => Last::Number(number),
                    None => Last::Other(value.clone()),
                });
            }
        }
    }

    pub(crate) fn adopt(&mut self, previous: &mut Deadband) {
        self.devices = std::mem::take(&mut previous.devices);
    }
}
