//! [`Devices`]: a rule's memory of each device, with a cap on how many it tracks.

use std::collections::HashMap;

/// The most devices one rule keeps state for, unless the agent sets another limit
/// with [`RuleSet::set_max_devices_per_rule`](crate::RuleSet::set_max_devices_per_rule).
///
/// A rule with memory (an open alert, a `for` timer, a rate's previous reading, a
/// stale sensor's last reading, a count window, an aggregate window, a deadband's
/// last forwarded values) keeps a few dozen to a few hundred bytes per device (a
/// count window up to 16 bytes per counted reading). Past the limit a new device is
/// not tracked by that rule, which is reported once as an
/// [`EvalError`](crate::EvalError).
pub const MAX_DEVICES_PER_RULE: usize = 10_000;

/// One device's state in one rule.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tracked<S> {
    /// The input of the device's last reading, for events with no reading (stale,
    /// window close).
    pub source: String,
    pub state: S,
}

/// Per-device state of one rule.
#[derive(Debug, Clone)]
pub(crate) struct Devices<S> {
    map: HashMap<String, Tracked<S>>,
    /// Whether reaching the limit has been reported since the rule last had room.
    full_reported: bool,
}

impl<S> Default for Devices<S> {
    fn default() -> Self {
        Devices {
            map: HashMap::new(),
            full_reported: false,
        }
    }
}

/// Why a device could not be tracked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Untracked {
    /// The limit was reached; `Some` with the message the first time.
    Full(Option<String>),
}

impl<S> Devices<S> {
    pub(crate) fn get(&self, device: &str) -> Option<&Tracked<S>> {
        self.map.get(device)
    }

    pub(crate) fn get_key_value(&self, device: &str) -> Option<(&String, &Tracked<S>)> {
        self.map.get_key_value(device)
    }

    pub(crate) fn get_mut(&mut self, device: &str) -> Option<&mut Tracked<S>> {
        self.map.get_mut(device)
    }

    /// The device's entry, created with `make` if it has none and there is room (at
    /// most `limit` devices). The entry's `source` is set to `source`.
    pub(crate) fn get_or_insert_with(
        &mut self,
        device: &str,
        source: &str,
        limit: usize,
        make: impl FnOnce() -> S,
    ) -> Result<&mut Tracked<S>, Untracked> {
        if !self.map.contains_key(device) {
            if self.map.len() >= limit {
                let first = !self.full_reported;
                self.full_reported = true;
                return Err(Untracked::Full(first.then(|| {
                    format!(
                        "this rule already tracks {limit} devices, its limit; device \
                         `{device}` and any other new device are not evaluated by it"
                    )
                })));
            }
            self.map.insert(
                device.to_owned(),
                Tracked {
                    source: source.to_owned(),
                    state: make(),
                },
            );
        }
        match self.map.get_mut(device) {
            Some(tracked) => {
                if tracked.source != source {
                    source.clone_into(&mut tracked.source);
                }
                Ok(tracked)
            }
            // Inserted just above; never taken.
            None => Err(Untracked::Full(None)),
        }
    }

    /// Inserts without the once-only report (for restoring saved state); `false` if
    /// there is no room.
    pub(crate) fn insert(&mut self, device: String, tracked: Tracked<S>, limit: usize) -> bool {
        if self.map.len() >= limit && !self.map.contains_key(&device) {
            return false;
        }
        self.map.insert(device, tracked);
        true
    }

    pub(crate) fn remove(&mut self, device: &str, limit: usize) {
        self.map.remove(device);
        if self.map.len() < limit {
            self.full_reported = false;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &Tracked<S>)> {
        self.map.iter()
    }

    /// Every `(device, entry)` in device order, for output that must not depend on
    /// hashing.
    pub(crate) fn sorted(&self) -> Vec<(&String, &Tracked<S>)> {
        let mut all: Vec<_> = self.map.iter().collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_past_the_limit_are_refused_and_reported_once() {
        let mut devices: Devices<u32> = Devices::default();
        // The state of the device's entry, made with `state` if it is new.
        let mut entry = |device: &str, state: u32| {
            devices
                .get_or_insert_with(device, "s", 2, || state)
                .map(|tracked| tracked.state)
        };
        let full = |device: &str| {
            Untracked::Full(Some(format!(
                "this rule already tracks 2 devices, its limit; device `{device}` and any \
                 other new device are not evaluated by it"
            )))
        };
        assert_eq!(entry("a", 1), Ok(1));
        assert_eq!(entry("b", 2), Ok(2));
        assert_eq!(entry("c", 3), Err(full("c")));
        assert_eq!(entry("d", 4), Err(Untracked::Full(None)));
        // Known devices are still served, with the state they have.
        assert_eq!(entry("a", 9), Ok(1));
        // Once there is room again, the next refusal is reported again.
        devices.remove("a", 2);
        let mut entry = |device: &str, state: u32| {
            devices
                .get_or_insert_with(device, "s", 2, || state)
                .map(|tracked| tracked.state)
        };
        assert_eq!(entry("c", 3), Ok(3));
        assert_eq!(entry("e", 5), Err(full("e")));
    }

    #[test]
    fn the_source_follows_the_last_reading() {
        let mut devices: Devices<()> = Devices::default();
        let _ = devices.get_or_insert_with("a", "mqtt", 10, || ());
        let _ = devices.get_or_insert_with("a", "serial", 10, || ());
        assert_eq!(devices.get("a").map(|t| t.source.as_str()), Some("serial"));
    }
}
