//! What a rule watches for, with the state it keeps per device.
//!
//! | kind | keys | state per device |
//! |---|---|---|
//! | [`ConditionAlert`] | `when`, `for`, `clear_when` | open alert, `for` timer |
//! | [`EveryReading`] | `when`, `emit.every_reading` | none |
//! | [`Rate`] | `rate` | previous value, open alert |
//! | [`Stale`] | `stale` | last reading time, open alert |
//! | [`Count`] | `count` | the last `at_least` counted times, open alert |
//! | [`Aggregate`] | `aggregate` | the open window's accumulators |
//! | [`Deadband`] | `forward = { deadband }` | last forwarded values |
//! | `Drop` | `forward = false` | none |
//!
//! Every kind keeps its state in a [`Devices`](crate::devices::Devices) map, which
//! moves as a whole to an unchanged rule on reload ([`Kind::adopt`]) and is saved
//! and restored across restarts as far as alerts need it ([`Kind::save`],
//! [`Kind::restore`]).

mod aggregate;
mod condition;
mod count;
mod forward;
mod rate;
mod stale;

pub(crate) use aggregate::{Aggregate, Function};
pub(crate) use condition::{ConditionAlert, EveryReading};
pub(crate) use count::Count;
pub use count::MAX_COUNT;
pub(crate) use forward::Deadband;
pub(crate) use rate::Rate;
pub(crate) use stale::Stale;

use crate::engine::{Outcome, Reading};
use crate::rule::{Ctx, Effects, Vote};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

#[derive(Debug)]
pub(crate) enum Kind {
    Condition(ConditionAlert),
    EveryReading(EveryReading),
    Rate(Rate),
    Stale(Stale),
    Count(Count),
    Aggregate(Aggregate),
    Deadband(Deadband),
    Drop,
}

impl Kind {
    /// A reading that passed the rule's matcher and filter.
    pub(crate) fn evaluate(
        &mut self,
        fx: &Effects<'_>,
        ctx: &mut Ctx<'_, '_>,
        out: &mut Outcome,
    ) -> Vote {
        match self {
            Kind::Condition(kind) => kind.evaluate(fx, ctx, out),
            Kind::EveryReading(kind) => kind.evaluate(fx, ctx, out),
            Kind::Rate(kind) => kind.evaluate(fx, ctx.reading, ctx.limit, out),
            Kind::Stale(kind) => kind.evaluate(fx, ctx.reading, ctx.limit, out),
            Kind::Count(kind) => kind.evaluate(fx, ctx.reading, ctx.limit, out),
            Kind::Aggregate(kind) => kind.evaluate(fx, ctx.reading, ctx.limit, out),
            Kind::Deadband(kind) => return kind.decide(ctx.reading),
            Kind::Drop => return Vote::Drop,
        }
        Vote::Keep
    }

    pub(crate) fn commit(
        &mut self,
        fx: &Effects<'_>,
        reading: &Reading<'_>,
        limit: usize,
        out: &mut Outcome,
    ) {
        if let Kind::Deadband(kind) = self {
            kind.commit(fx, reading, limit, out);
        }
    }

    pub(crate) fn tick(
        &mut self,
        fx: &Effects<'_>,
        now: DateTime<Utc>,
        limit: usize,
        out: &mut Outcome,
    ) {
        match self {
            Kind::Stale(kind) => kind.tick(fx, now, out),
            Kind::Count(kind) => kind.tick(fx, now, limit, out),
            Kind::Aggregate(kind) => kind.tick(fx, now, out),
            _ => {}
        }
    }

    /// Takes the state of `previous`, the same rule before a reload.
    pub(crate) fn adopt(&mut self, previous: &mut Kind) {
        match (self, previous) {
            (Kind::Condition(new), Kind::Condition(old)) => new.adopt(old),
            (Kind::Rate(new), Kind::Rate(old)) => new.adopt(old),
            (Kind::Stale(new), Kind::Stale(old)) => new.adopt(old),
            (Kind::Count(new), Kind::Count(old)) => new.adopt(old),
            (Kind::Aggregate(new), Kind::Aggregate(old)) => new.adopt(old),
            (Kind::Deadband(new), Kind::Deadband(old)) => new.adopt(old),
            _ => {}
        }
    }

    /// The state to keep across a restart, device by device, in device order (only
    /// `only`'s, when given); `None` when there is none.
    pub(crate) fn save(&self, only: Option<&str>) -> Option<Map<String, Value>> {
        let saved = match self {
            Kind::Condition(kind) => kind.save(only),
            Kind::Rate(kind) => kind.save(only),
            Kind::Stale(kind) => kind.save(only),
            Kind::Count(kind) => kind.save(only),
            _ => Map::new(),
        };
        (!saved.is_empty()).then_some(saved)
    }

    /// Restores what [`Kind::save`] gave; returns how many devices were restored.
    /// Entries that do not parse are skipped.
    pub(crate) fn restore(&mut self, devices: &Map<String, Value>, limit: usize) -> usize {
        match self {
            Kind::Condition(kind) => kind.restore(devices, limit),
            Kind::Rate(kind) => kind.restore(devices, limit),
            Kind::Stale(kind) => kind.restore(devices, limit),
            Kind::Count(kind) => kind.restore(devices, limit),
            _ => 0,
        }
    }

    /// A short name for the kind.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Kind::Condition(kind) if kind.sustained.is_some() => "sustained",
            Kind::Condition(kind) if kind.clear_when.is_some() => "hysteresis",
            Kind::Condition(_) => "condition",
            Kind::EveryReading(_) => "every-reading",
            Kind::Rate(_) => "rate",
            Kind::Stale(_) => "stale",
            Kind::Count(_) => "count",
            Kind::Aggregate(_) => "aggregate",
            Kind::Deadband(_) => "deadband",
            Kind::Drop => "drop",
        }
    }

    /// Whether the kind's alerts open and close (and are saved across restarts).
    pub(crate) fn has_lifecycle(&self) -> bool {
        matches!(
            self,
            Kind::Condition(_) | Kind::Rate(_) | Kind::Stale(_) | Kind::Count(_)
        )
    }

    /// Whether the kind has anything for [`Kind::tick`] to do.
    pub(crate) fn has_timers(&self) -> bool {
        matches!(self, Kind::Stale(_) | Kind::Count(_) | Kind::Aggregate(_))
    }

    /// How many devices the rule tracks.
    pub(crate) fn tracked(&self) -> usize {
        match self {
            Kind::Condition(kind) => kind.devices.len(),
            Kind::Rate(kind) => kind.devices.len(),
            Kind::Stale(kind) => kind.devices.len(),
            Kind::Count(kind) => kind.devices.len(),
            Kind::Aggregate(kind) => kind.devices.len(),
            Kind::Deadband(kind) => kind.devices.len(),
            Kind::EveryReading(_) | Kind::Drop => 0,
        }
    }
}

/// Saves every tracked device (or only `only`) that `save` turns into an entry, in
/// device order.
pub(crate) fn save_entries<S, P: serde::Serialize>(
    devices: &crate::devices::Devices<S>,
    only: Option<&str>,
    mut save: impl FnMut(&crate::devices::Tracked<S>) -> Option<P>,
) -> Map<String, Value> {
    let chosen = match only {
        Some(device) => devices.get_key_value(device).into_iter().collect(),
        None => devices.sorted(),
    };
    chosen
        .into_iter()
        .filter_map(|(device, tracked)| {
            Some((device.clone(), serde_json::to_value(save(tracked)?).ok()?))
        })
        .collect()
}

/// Restores saved entries of type `P` into `devices`, converting each with `make`.
pub(crate) fn restore_entries<S, P: serde::de::DeserializeOwned>(
    devices: &mut crate::devices::Devices<S>,
    saved: &Map<String, Value>,
    limit: usize,
    mut make: impl FnMut(P) -> Option<(String, S)>,
) -> usize {
    let mut restored = 0;
    for (device, entry) in saved {
        let Ok(parsed) = serde_json::from_value::<P>(entry.clone()) else {
            continue;
        };
        let Some((source, state)) = make(parsed) else {
            continue;
        };
        if devices.insert(
            device.clone(),
            crate::devices::Tracked { source, state },
            limit,
        ) {
            restored += 1;
        }
    }
    restored
}

/// The earlier of two optional times.
pub(crate) fn earliest(
    a: Option<DateTime<Utc>>,
    b: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `time + delta`, saturating at the last representable time instead of panicking
/// (a device can send any time it likes).
pub(crate) fn plus(time: DateTime<Utc>, delta: chrono::TimeDelta) -> DateTime<Utc> {
    time.checked_add_signed(delta)
        .unwrap_or(if delta < chrono::TimeDelta::zero() {
            DateTime::<Utc>::MIN_UTC
        } else {
            DateTime::<Utc>::MAX_UTC
        })
}

/// `time - delta`, saturating.
pub(crate) fn minus(time: DateTime<Utc>, delta: chrono::TimeDelta) -> DateTime<Utc> {
    time.checked_sub_signed(delta)
        .unwrap_or(if delta < chrono::TimeDelta::zero() {
            DateTime::<Utc>::MAX_UTC
        } else {
            DateTime::<Utc>::MIN_UTC
        })
}
