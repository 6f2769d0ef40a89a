//! [`RuleSet`]: the compiled rules, running readings and time through them, and
//! their state across reloads and restarts.

use crate::check::{self, CheckOptions, SourceFile};
use crate::devices::MAX_DEVICES_PER_RULE;
use crate::diagnostic::Diagnostic;
use crate::expr::{self, COMPILE_STACK_SIZE};
use crate::rule::{Ctx, Rule, Vote};
use cel::Env;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// The version of the JSON [`RuleSet::alert_state`] writes. A state of another
/// version is ignored by [`RuleSet::restore_alert_state`].
pub const ALERT_STATE_VERSION: u64 = 1;

/// Every rule of every rule file, compiled and checked, with the state rules keep
/// between readings.
///
/// Build one with [`RuleSet::compile`]; swap it for a new one when the files change
/// (a failed compile leaves the running set alone, so a bad edit never stops the
/// rules that work), moving the state of unchanged rules over with
/// [`RuleSet::adopt_state`].
pub struct RuleSet {
    /// The CEL standard library, shared by every condition.
    env: Arc<Env>,
    /// In file order, then in order within each file; evaluated in this order.
    rules: Vec<Rule>,
    /// Indexes of the rules with something for [`RuleSet::tick`] to do.
    timed: Vec<usize>,
    /// The most devices one rule tracks.
    max_devices: usize,
    /// Indexes of the deadband rules that passed the reading being evaluated
    /// (kept to reuse its allocation).
    passed: Vec<usize>,
    /// Found when compiling; see [`RuleSet::warnings`].
    warnings: Vec<Diagnostic>,
}

/// One reading, as the agent decoded it.
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    /// Name of the input the reading came from (`[[source.*]] name`).
    pub source: &'a str,
    /// The device id.
    pub device: &'a str,
    /// When the reading was taken (or received, if the device did not say). Every
    /// time-based trigger (`for`, `rate`, `stale`, `count`, `aggregate`) goes by it.
    pub time: DateTime<Utc>,
    /// The reading's values; each top-level key is a variable in expressions.
    pub fields: &'a serde_json::Map<String, serde_json::Value>,
}

/// What the rules made of one reading, or of one [`RuleSet::tick`].
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Whether to forward the reading itself: `false` if a `forward = false` rule
    /// matched it or a deadband held it back. Always `true` from [`RuleSet::tick`].
    pub forward: bool,
    /// The events raised, in rule order (and within a rule, in time order).
    pub alerts: Vec<Alert>,
    /// The local actions to run, in the order they were decided.
    pub actions: Vec<Action>,
    /// One error per rule that could not do its work on this reading; the other
    /// rules still ran.
    pub errors: Vec<EvalError>,
    /// Whether, and how much, the state [`RuleSet::alert_state`] returns changed.
    pub state: StateChange,
    /// The `(rule id, device)` pairs whose saved state may have changed, for
    /// [`RuleSet::changed_entries`]: saving only these keeps the bytes written per
    /// reading independent of how many alerts are open.
    pub changed: Vec<(String, String)>,
}

impl Outcome {
    pub(crate) fn note_changed(&mut self, rule: &str, device: &str) {
        let seen = self.changed.iter().any(|(r, d)| r == rule && d == device);
        if !seen {
            self.changed.push((rule.to_owned(), device.to_owned()));
        }
    }
}

/// One device's saved state under one rule, as [`RuleSet::state_entries`] and
/// [`RuleSet::changed_entries`] give it: a store can keep each under its own key,
/// and give them back to [`RuleSet::restore_entries`].
#[derive(Debug, Clone, PartialEq)]
pub struct StateEntry {
    pub rule: String,
    pub device: String,
    /// `None`: the device has nothing to keep any more (delete the key).
    pub value: Option<Value>,
}

/// How the state to keep across a restart ([`RuleSet::alert_state`]) changed
/// during one call. Ordered: a call reports the biggest change any rule made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StateChange {
    /// Not at all.
    #[default]
    Unchanged,
    /// Only bookkeeping: a `for` timer started or stopped, a stale sensor's last
    /// reading time moved on, an open count alert's window moved. Losing it in a
    /// crash costs little (a `for` wait starts over; a stale alert comes up to that
    /// much too early), so saving it now and then is enough.
    Progress,
    /// An alert opened or closed (whether or not the rule has `emit`): save the
    /// state with this call's events, so that a restart neither fires it again nor
    /// forgets it.
    Transition,
}

impl Default for Outcome {
    /// Nothing happened: forward the reading, no events, actions or errors.
    fn default() -> Self {
        Outcome {
            forward: true,
            alerts: Vec::new(),
            actions: Vec::new(),
            errors: Vec::new(),
            state: StateChange::Unchanged,
            changed: Vec::new(),
        }
    }
}

/// Which step of its life an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// The alert's condition became true (for `emit.every_reading` rules: was true
    /// on a reading).
    Fired,
    /// The alert's condition is over.
    Resolved,
    /// An aggregate window closed.
    Window,
}

impl Transition {
    /// `"fired"`, `"resolved"` or `"window"`, as in the event data.
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Fired => "fired",
            Transition::Resolved => "resolved",
            Transition::Window => "window",
        }
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event raised by a rule with `emit`.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// The rule's `id`.
    pub rule: String,
    /// `emit.type`: the CloudEvents `type`.
    pub event_type: String,
    /// `emit.severity`, if given.
    pub severity: Option<String>,
    /// `emit.to`, if given: the sinks to send the alert to.
    pub to: Option<Vec<String>>,
    /// `{"rule", "device", "transition", ...}` and what the kind of rule adds; see
    /// `docs/RULES.md`, "Events".
    pub data: serde_json::Value,
    /// Which step of the alert's life this is.
    pub transition: Transition,
    /// The device the event is about.
    pub device: String,
    /// The input of the device's last reading.
    pub source: String,
    /// When it happened: the reading's time for a transition a reading caused; the
    /// moment it became due for one time caused (a stale sensor: its last reading's
    /// time plus `stale`; a count that dropped: when its oldest reading left the
    /// window; an aggregate: the window's end), whichever call noticed it.
    pub time: DateTime<Utc>,
}

/// A local action decided by a rule with `action`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish `payload` to `topic` on the local MQTT broker.
    MqttPublish {
        /// The rule's `id`.
        rule: String,
        /// The topic, placeholders substituted; never contains a wildcard.
        topic: String,
        /// The payload, placeholders substituted.
        payload: String,
        /// 0 or 1.
        qos: u8,
        retain: bool,
    },
    /// Write `line` to the serial port of the serial source named `port`; the agent
    /// adds the port's line ending.
    SerialWrite {
        /// The rule's `id`.
        rule: String,
        /// The serial source's name.
        port: String,
        /// The line, placeholders substituted; never contains a line break or a NUL.
        line: String,
    },
}

impl Action {
    /// The `id` of the rule that decided it.
    pub fn rule(&self) -> &str {
        match self {
            Action::MqttPublish { rule, .. } | Action::SerialWrite { rule, .. } => rule,
        }
    }
}

/// A rule could not do its work on a reading: a field it uses is missing or of the
/// wrong type, a condition did not give a bool, a reading came too late for its
/// window, or the rule tracks as many devices as it may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalError {
    /// The rule's `id`.
    pub rule: String,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule `{}`: {}", self.rule, self.message)
    }
}

impl std::error::Error for EvalError {}

/// One rule, for listings ([`RuleSet::describe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleDescription {
    /// The rule's `id`.
    pub id: String,
    /// `condition`, `sustained`, `hysteresis`, `every-reading`, `rate`, `stale`,
    /// `count`, `aggregate`, `deadband` or `drop`.
    pub kind: &'static str,
    /// The rule in one line, e.g. ``alert while `temperature > -15` for 10m, until
    /// `temperature < -18` ``.
    pub summary: String,
    /// How many devices the rule keeps state for right now.
    pub tracked_devices: usize,
}

/// What [`RuleSet::restore_alert_state`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    /// Rules whose state was restored, in rule order, with how many devices each.
    pub rules: Vec<(String, usize)>,
    /// Rules in the saved state that were left out, each with the reason: no rule
    /// has that id any more, or its definition changed.
    pub ignored: Vec<(String, String)>,
}

impl RuleSet {
    /// A rule set with no rules: every reading is forwarded, nothing else happens.
    pub fn empty() -> Self {
        RuleSet {
            env: expr::new_env(),
            rules: Vec::new(),
            timed: Vec::new(),
            max_devices: MAX_DEVICES_PER_RULE,
            passed: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Parses, checks and compiles every file. On failure returns every mistake in
    /// every file (TOML syntax stops its own file at the first error; everything
    /// else is reported in full), ordered by file, then by position.
    ///
    /// Compiling runs on a thread of its own with a [`COMPILE_STACK_SIZE`] stack,
    /// because the CEL parser recurses deeply; this call blocks until it is done.
    pub fn compile(files: &[SourceFile], opts: &CheckOptions) -> Result<RuleSet, Vec<Diagnostic>> {
        let env = expr::new_env();
        let internal = |message: String| {
            let file = files.first().map_or("<rules>", |f| f.name.as_str());
            vec![Diagnostic::at(file, "", 0, message)]
        };
        let check::Compiled { rules, warnings } = std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("ferry-rules-compile".into())
                .stack_size(COMPILE_STACK_SIZE)
                .spawn_scoped(scope, || check::compile(files, opts, &env));
            match thread {
                Ok(thread) => thread.join().unwrap_or_else(|_| {
                    Err(internal(
                        "internal error: the rule compiler panicked".into(),
                    ))
                }),
                Err(error) => Err(internal(format!(
                    "could not start a thread to compile the rules: {error}"
                ))),
            }
        })?;
        let timed = (0..rules.len())
            .filter(|&i| rules[i].kind.has_timers())
            .collect();
        Ok(RuleSet {
            env,
            rules,
            timed,
            max_devices: MAX_DEVICES_PER_RULE,
            passed: Vec::new(),
            warnings,
        })
    }

    /// What compiling found that works but may not work as meant, in the form of
    /// [`Diagnostic`]s whose message starts with `warning: `: conditions whose work
    /// grows with the square of a reading's size or faster, which fail with an
    /// [`EvalError`] on readings large enough to pass
    /// [`MAX_EVAL_STEPS`](crate::MAX_EVAL_STEPS). Warnings never stop a rule set from
    /// compiling.
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }

    /// Sets how many devices each rule may keep state for (default
    /// [`MAX_DEVICES_PER_RULE`]). Devices already tracked stay tracked. A setting of
    /// the set, not of the rules: set it on every newly compiled set (a reload
    /// compiles one; [`RuleSet::adopt_state`] does not carry it over).
    pub fn set_max_devices_per_rule(&mut self, max: usize) {
        self.max_devices = max;
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules' ids, in evaluation order.
    pub fn rule_ids(&self) -> impl Iterator<Item = &str> + '_ {
        self.rules.iter().map(|rule| rule.id.as_str())
    }

    /// Every rule with its kind and a one-line summary, in evaluation order.
    pub fn describe(&self) -> Vec<RuleDescription> {
        self.rules
            .iter()
            .map(|rule| RuleDescription {
                id: rule.id.clone(),
                kind: rule.kind.name(),
                summary: rule.summary.clone(),
                tracked_devices: rule.kind.tracked(),
            })
            .collect()
    }

    /// Runs one reading through every rule whose `match` it satisfies, in order.
    ///
    /// Never panics and never fails as a whole: a rule that cannot do its work on
    /// this reading adds an [`EvalError`] and the others still run.
    pub fn evaluate(&mut self, reading: &Reading<'_>) -> Outcome {
        let mut outcome = Outcome::default();
        let mut ctx = Ctx::new(&self.env, reading, self.max_devices);
        self.passed.clear();
        for (i, rule) in self.rules.iter_mut().enumerate() {
            if !rule.matcher.matches(reading) {
                continue;
            }
            match rule.evaluate(&mut ctx, &mut outcome) {
                Vote::Keep => {}
                Vote::Drop => outcome.forward = false,
                Vote::Passed => self.passed.push(i),
            }
        }
        if outcome.forward {
            for &i in &self.passed {
                if let Some(rule) = self.rules.get_mut(i) {
                    rule.commit(reading, self.max_devices, &mut outcome);
                }
            }
        }
        outcome
    }

    /// Lets time pass: fires stale sensors and resolves counts whose moment came at
    /// or before `now`, and closes aggregate windows that ended by then. The agent
    /// calls it every second with its clock; `ferry rules test` with each reading's
    /// time and once at the end.
    ///
    /// Cheap when nothing is due: one comparison per rule with timers.
    pub fn tick(&mut self, now: DateTime<Utc>) -> Outcome {
        let mut outcome = Outcome::default();
        for &i in &self.timed {
            if let Some(rule) = self.rules.get_mut(i) {
                rule.tick(now, self.max_devices, &mut outcome);
            }
        }
        outcome
    }

    /// After a reload: takes over the state of every rule of `previous` that has the
    /// same id and the same definition (compared by a fingerprint of the parsed rule,
    /// so comments, layout, key order and `description` do not count). Every other
    /// rule starts afresh.
    pub fn adopt_state(&mut self, mut previous: RuleSet) {
        let old: HashMap<String, usize> = previous
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| (rule.id.clone(), i))
            .collect();
        for rule in &mut self.rules {
            let Some(old) = old.get(&rule.id).and_then(|&i| previous.rules.get_mut(i)) else {
                continue;
            };
            if old.fingerprint == rule.fingerprint {
                rule.kind.adopt(&mut old.kind);
            }
        }
    }

    /// The state to keep across a restart, as versioned JSON:
    ///
    /// ```json
    /// {"version": 1,
    ///  "rules": {"<rule id>": {"fingerprint": "<hex>", "devices": {"<device>": {...}}}}}
    /// ```
    ///
    /// Per device: open alerts and `for` timers (`when` rules), open alerts (`rate`),
    /// every device's last reading time (`stale`, so that a device that falls silent
    /// while the agent is down is still noticed), open alerts with their window
    /// (`count`). Aggregate windows in progress and deadband references are not kept.
    pub fn alert_state(&self) -> serde_json::Value {
        let mut rules = Map::new();
        for rule in &self.rules {
            let Some(devices) = rule.kind.save(None) else {
                continue;
            };
            let mut entry = Map::new();
            entry.insert("fingerprint".into(), Value::from(rule.fingerprint.as_str()));
            entry.insert("devices".into(), Value::Object(devices));
            rules.insert(rule.id.clone(), Value::Object(entry));
        }
        let mut state = Map::new();
        state.insert("version".into(), Value::from(ALERT_STATE_VERSION));
        state.insert("rules".into(), Value::Object(rules));
        Value::Object(state)
    }

    /// Every device's saved state, one entry each (what [`RuleSet::alert_state`]
    /// holds, cut per device), in rule then device order.
    pub fn state_entries(&self) -> Vec<StateEntry> {
        let mut out = Vec::new();
        for rule in &self.rules {
            for (device, saved) in rule.kind.save(None).unwrap_or_default() {
                out.push(StateEntry {
                    rule: rule.id.clone(),
                    value: Some(entry_value(&rule.fingerprint, saved)),
                    device,
                });
            }
        }
        out
    }

    /// The saved state of the given `(rule id, device)` pairs (from
    /// [`Outcome::changed`]), `None` for those with nothing to keep. Pairs of rules
    /// no longer in the set are left out.
    pub fn changed_entries<'a>(
        &self,
        changed: impl IntoIterator<Item = &'a (String, String)>,
    ) -> Vec<StateEntry> {
        let mut out = Vec::new();
        for (rule_id, device) in changed {
            let Some(rule) = self.rules.iter().find(|r| &r.id == rule_id) else {
                continue;
            };
            let value = rule
                .kind
                .save(Some(device))
                .and_then(|mut m| m.remove(device))
                .map(|saved| entry_value(&rule.fingerprint, saved));
            out.push(StateEntry {
                rule: rule_id.clone(),
                device: device.clone(),
                value,
            });
        }
        out
    }

    /// Restores entries saved from [`RuleSet::state_entries`] and
    /// [`RuleSet::changed_entries`], as [`RuleSet::restore_alert_state`] does.
    pub fn restore_entries(
        &mut self,
        entries: impl IntoIterator<Item = (String, String, Value)>,
    ) -> Restored {
        let mut rules = Map::new();
        for (rule, device, value) in entries {
            let (Some(fingerprint), Some(state)) = (
                value.get("fingerprint").and_then(Value::as_str),
                value.get("state"),
            ) else {
                continue;
            };
            let entry = rules.entry(rule).or_insert_with(|| {
                let mut e = Map::new();
                e.insert("fingerprint".into(), Value::from(fingerprint));
                e.insert("devices".into(), Value::Object(Map::new()));
                Value::Object(e)
            });
            if let Some(devices) = entry.get_mut("devices").and_then(Value::as_object_mut) {
                devices.insert(device, state.clone());
            }
        }
        let mut state = Map::new();
        state.insert("version".into(), Value::from(ALERT_STATE_VERSION));
        state.insert("rules".into(), Value::Object(rules));
        self.restore_alert_state(&Value::Object(state))
    }

    /// Restores what [`RuleSet::alert_state`] gave, at start, for the rules with the
    /// same id and definition; the state of every other rule in `state` is ignored,
    /// as is a state of another version or shape. Never fails: the worst case is
    /// starting afresh.
    pub fn restore_alert_state(&mut self, state: &serde_json::Value) -> Restored {
        let mut restored = Restored::default();
        if state.get("version").and_then(Value::as_u64) != Some(ALERT_STATE_VERSION) {
            return restored;
        }
        let Some(saved) = state.get("rules").and_then(Value::as_object) else {
            return restored;
        };
        for (id, entry) in saved {
            match self.rules.iter().find(|rule| &rule.id == id) {
                None => restored
                    .ignored
                    .push((id.clone(), "no rule has this id any more".into())),
                Some(rule)
                    if entry.get("fingerprint").and_then(Value::as_str)
                        != Some(rule.fingerprint.as_str()) =>
                {
                    restored
                        .ignored
                        .push((id.clone(), "the rule's definition changed".into()))
                }
                Some(_) => {}
            }
        }
        for rule in &mut self.rules {
            let Some(entry) = saved.get(&rule.id) else {
                continue;
            };
            if entry.get("fingerprint").and_then(Value::as_str) != Some(rule.fingerprint.as_str()) {
                continue;
            }
            let Some(devices) = entry.get("devices").and_then(Value::as_object) else {
                continue;
            };
            let count = rule.kind.restore(devices, self.max_devices);
            restored.rules.push((rule.id.clone(), count));
        }
        restored
    }
}

/// The value of one [`StateEntry`]: the rule's fingerprint (so a changed rule's
/// state is not restored into it) and the device's saved state.
fn entry_value(fingerprint: &str, saved: Value) -> Value {
    let mut m = Map::new();
    m.insert("fingerprint".into(), Value::from(fingerprint));
    m.insert("state".into(), saved);
    Value::Object(m)
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet::empty()
    }
}

impl fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleSet")
            .field("rules", &self.rule_ids().collect::<Vec<_>>())
            .finish()
    }
}

/// The agent moves a `RuleSet` into a task: keep it `Send`.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<RuleSet>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(text: &str) -> RuleSet {
        let files = [SourceFile {
            name: "r.toml".into(),
            text: text.into(),
        }];
        match RuleSet::compile(&files, &CheckOptions::default()) {
            Ok(rules) => rules,
            Err(diagnostics) => panic!("{}", diagnostics[0]),
        }
    }

    fn reading<'a>(
        device: &'a str,
        fields: &'a serde_json::Map<String, serde_json::Value>,
    ) -> Reading<'a> {
        Reading {
            source: "local",
            device,
            time: DateTime::<Utc>::UNIX_EPOCH,
            fields,
        }
    }

    fn object(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        match value {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        }
    }

    const FREEZER: &str = r#"
[[rule]]
id = "freezer-warm"
match = { device = "freezer-*" }
when = "temperature > -15"
emit = { type = "com.acme.freezer.warm", severity = "critical", to = ["cloud"] }

[[rule]]
id = "bp-high"
when = "bp.systolic > 140 || bp.diastolic > 90"
emit = { type = "com.clinic.bp.high" }
"#;

    #[test]
    fn an_empty_rule_set_forwards_everything_and_does_nothing_else() {
        let mut rules = RuleSet::empty();
        assert!(rules.is_empty());
        assert_eq!(rules.len(), 0);
        let fields = object(json!({"t": 1}));
        let outcome = rules.evaluate(&reading("d", &fields));
        assert_eq!(
            outcome,
            Outcome {
                forward: true,
                alerts: vec![],
                actions: vec![],
                errors: vec![],
                state: StateChange::Unchanged,
                changed: vec![],
            }
        );
    }

    #[test]
    fn a_firing_rule_raises_an_alert_with_the_documented_data() {
        let mut rules = rules(FREEZER);
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules.rule_ids().collect::<Vec<_>>(),
            ["freezer-warm", "bp-high"]
        );
        let fields = object(json!({"temperature": -14.5}));
        let outcome = rules.evaluate(&reading("freezer-3", &fields));
        assert!(outcome.forward);
        assert_eq!(
            outcome.alerts,
            [Alert {
                rule: "freezer-warm".into(),
                event_type: "com.acme.freezer.warm".into(),
                severity: Some("critical".into()),
                to: Some(vec!["cloud".into()]),
                data: json!({
                    "rule": "freezer-warm",
                    "device": "freezer-3",
                    "transition": "fired",
                    "values": {"temperature": -14.5},
                }),
                transition: Transition::Fired,
                device: "freezer-3".into(),
                source: "local".into(),
                time: DateTime::<Utc>::UNIX_EPOCH,
            }]
        );
        // bp-high has no `match`, so it saw the reading too, and had no `bp`.
        assert_eq!(outcome.errors.len(), 1);
        assert_eq!(outcome.errors[0].rule, "bp-high");
        assert_eq!(
            outcome.errors[0].message,
            "no field or function `bp` in this reading"
        );
    }

    #[test]
    fn a_rule_whose_match_does_not_apply_is_skipped() {
        let mut rules = rules(FREEZER);
        let fields = object(json!({"temperature": 20, "bp": {"systolic": 120, "diastolic": 80}}));
        let outcome = rules.evaluate(&reading("fridge-1", &fields));
        assert_eq!(outcome.alerts, []);
        assert_eq!(outcome.errors, []);
    }

    #[test]
    fn an_error_in_one_rule_does_not_stop_the_others() {
        let mut rules = rules(
            r#"
[[rule]]
id = "broken"
when = "missing > 1"
emit = { type = "t.a" }

[[rule]]
id = "not-bool"
when = "t"
emit = { type = "t.b" }

[[rule]]
id = "works"
when = "t > 1"
emit = { type = "t.c" }
"#,
        );
        let fields = object(json!({"t": 2}));
        let outcome = rules.evaluate(&reading("d", &fields));
        assert_eq!(outcome.alerts.len(), 1);
        assert_eq!(outcome.alerts[0].rule, "works");
        let failed: Vec<&str> = outcome.errors.iter().map(|e| e.rule.as_str()).collect();
        assert_eq!(failed, ["broken", "not-bool"]);
        assert_eq!(
            outcome.errors[1].to_string(),
            "rule `not-bool`: `when` must give true or false, but gave the double 2"
        );
    }

    #[test]
    fn a_rule_set_can_move_to_another_thread() {
        let mut rules = rules(FREEZER);
        let fired = std::thread::spawn(move || {
            let fields = object(json!({"temperature": 0}));
            rules.evaluate(&reading("freezer-1", &fields)).alerts.len()
        })
        .join()
        .ok();
        assert_eq!(fired, Some(1));
    }

    #[test]
    fn debug_shows_the_rule_ids() {
        assert_eq!(
            format!("{:?}", rules(FREEZER)),
            r#"RuleSet { rules: ["freezer-warm", "bp-high"] }"#
        );
    }

    const KINDS: &str = r#"
[[rule]]
id = "warm"
when = "t > 30"
for = "10m"
clear_when = "t < 20"
emit = { type = "x.warm" }

[[rule]]
id = "silent"
stale = "15m"
emit = { type = "x.silent" }

[[rule]]
id = "changes"
when = "source == 'local'"
forward = { deadband = { t = 0.5 } }

[[rule]]
id = "tests"
match = { device = "test-*" }
forward = false
"#;

    #[test]
    fn describe_gives_each_rule_its_kind_and_a_summary() {
        let described = rules(KINDS).describe();
        let shown: Vec<(&str, &str, &str)> = described
            .iter()
            .map(|d| (d.id.as_str(), d.kind, d.summary.as_str()))
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "warm",
                    "sustained",
                    "alert while `t > 30` for 10m, until `t < 20`; emits x.warm"
                ),
                (
                    "silent",
                    "stale",
                    "alert when a device sends no reading for 15m; emits x.silent"
                ),
                (
                    "changes",
                    "deadband",
                    "forward only when t moves by more than 0.5 (only readings where \
                     `source == 'local'`)"
                ),
                ("tests", "drop", "drop readings"),
            ]
        );
    }

    #[test]
    fn every_kind_has_a_one_line_summary() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/diagnostics/valid/rules.toml"
        ))
        .unwrap_or_default();
        let summaries: Vec<String> = rules(&text)
            .describe()
            .into_iter()
            .map(|d| format!("{} [{}] {}", d.id, d.kind, d.summary))
            .collect();
        assert_eq!(
            summaries,
            [
                "freezer-warm [sustained] alert while `temperature > -15` for 10m, until \
                 `temperature < -18`; emits com.acme.freezer.warm",
                "bp-high [condition] alert while `bp.systolic > 140 || bp.diastolic > 90`; \
                 emits com.clinic.bp.high",
                "hot-every-reading [every-reading] event on every reading where \
                 `temperature > 30`; emits com.acme.hot",
                "only-changes [deadband] forward only when humidity moves by more than 2 or \
                 status.door moves by more than 0 or temperature moves by more than 0.5, or \
                 every 15m",
                "drop-test-devices [drop] drop readings",
                "drop-heartbeats [drop] drop readings where `kind == 'heartbeat'`",
                "heating-fast [rate] alert while `temperature` changes at a rate above 2 per \
                 1m; emits com.acme.heating.fast",
                "pressure-swing [rate] alert while `line.pressure` changes at a rate above 1 \
                 or below -1 per 1s (only readings where `mode == 'run'`); emits \
                 com.acme.pressure.swing",
                "sensor-silent [stale] alert when a device sends no reading for 15m; emits \
                 com.acme.sensor.stale",
                "repeated-alarms [count] alert while at least 10 readings where \
                 `alarm == true` come within 1h; emits com.acme.alarm.repeated",
                "downsample [aggregate] avg/min/max/count/last of temperature, humidity every \
                 5m; emits com.acme.temperature.5m",
                "downsample-all-functions [aggregate] avg/min/max/sum/count/last of \
                 power.watts every 1h30m; emits com.acme.power.90m",
                "fan-on [hysteresis] alert while `temperature > 35`, until `temperature < 32`; \
                 publishes to actuators/{device}/fan",
                "siren [condition] alert while `door == 'open'`; emits com.acme.door.open; \
                 publishes to sirens/{rule}",
            ]
        );
    }

    #[test]
    fn transitions_are_shown_as_in_event_data() {
        assert_eq!(Transition::Fired.to_string(), "fired");
        assert_eq!(Transition::Resolved.to_string(), "resolved");
        assert_eq!(Transition::Window.to_string(), "window");
    }

    #[test]
    fn a_tick_with_nothing_due_says_nothing() {
        let mut rules = rules(KINDS);
        assert_eq!(rules.tick(DateTime::<Utc>::UNIX_EPOCH), Outcome::default());
        let fields = object(json!({"t": 1}));
        let _ = rules.evaluate(&reading("d", &fields));
        let soon = DateTime::<Utc>::UNIX_EPOCH + chrono::TimeDelta::minutes(14);
        assert_eq!(rules.tick(soon), Outcome::default());
        let late = DateTime::<Utc>::UNIX_EPOCH + chrono::TimeDelta::minutes(15);
        let stale: Vec<_> = rules
            .tick(late)
            .alerts
            .iter()
            .map(|a| (a.rule.clone(), a.transition, a.device.clone()))
            .collect();
        assert_eq!(
            stale,
            [("silent".to_owned(), Transition::Fired, "d".to_owned())]
        );
    }

    #[test]
    fn a_deadband_does_not_take_as_reference_a_reading_another_rule_dropped() {
        let mut rules = rules(KINDS);
        let at = |t: f64| object(json!({ "t": t }));
        // Dropped by `tests`: not forwarded, so not the deadband's reference either.
        assert!(!rules.evaluate(&reading("test-1", &at(1.0))).forward);
        let mut other = rules.evaluate(&reading("test-1", &at(1.2)));
        assert!(!other.forward);
        // Same device once not dropped any more: its first forwarded reading.
        rules = {
            let mut next = self::rules(&KINDS.replace("test-*", "nothing-*"));
            next.adopt_state(rules);
            next
        };
        other = rules.evaluate(&reading("test-1", &at(1.2)));
        assert!(
            other.forward,
            "the dropped readings were taken as forwarded"
        );
    }

    #[test]
    fn the_alert_state_has_open_alerts_and_last_readings_and_survives_a_round_trip() {
        let mut rules = rules(KINDS);
        let hot = object(json!({"t": 35}));
        let _ = rules.evaluate(&reading("d", &hot));
        let state = rules.alert_state();
        assert_eq!(state["version"], json!(1));
        assert_eq!(
            state["rules"]["warm"]["devices"]["d"],
            json!({"source": "local", "pending_since": "1970-01-01T00:00:00Z"})
        );
        assert_eq!(
            state["rules"]["silent"]["devices"]["d"],
            json!({"source": "local", "last_seen": "1970-01-01T00:00:00Z"})
        );
        assert!(state["rules"].get("changes").is_none());
        let mut restarted = self::rules(KINDS);
        let restored = restarted.restore_alert_state(&state);
        assert_eq!(
            restored.rules,
            [("warm".to_owned(), 1), ("silent".to_owned(), 1)]
        );
        assert_eq!(restarted.alert_state(), state);
    }

    #[test]
    fn a_reading_names_only_its_own_device_as_changed_however_many_alerts_are_open() {
        let mut rules = rules(KINDS);
        let hot = object(json!({"t": 35}));
        for i in 0..500 {
            let _ = rules.evaluate(&reading(&format!("other-{i}"), &hot));
        }
        let outcome = rules.evaluate(&reading("d", &hot));
        let mut changed = outcome.changed.clone();
        changed.sort();
        assert_eq!(
            changed,
            [
                ("silent".to_owned(), "d".to_owned()),
                ("warm".to_owned(), "d".to_owned())
            ]
        );
        let entries = rules.changed_entries(&outcome.changed);
        assert_eq!(entries.len(), 2);
        assert!(entries.iter().all(|e| e.device == "d" && e.value.is_some()));
    }

    #[test]
    fn state_entries_restore_to_the_same_alert_state_and_a_cleared_device_is_a_deletion() {
        let mut rules = rules(KINDS);
        let _ = rules.evaluate(&reading("d", &object(json!({"t": 35}))));
        let _ = rules.evaluate(&reading("e", &object(json!({"t": 35}))));
        let entries = rules.state_entries();
        let mut restarted = self::rules(KINDS);
        restarted.restore_entries(
            entries
                .iter()
                .map(|e| (e.rule.clone(), e.device.clone(), e.value.clone().unwrap())),
        );
        assert_eq!(restarted.alert_state(), rules.alert_state());

        // `warm` forgets a device that cools down before its `for` is up.
        let cooled = rules.evaluate(&reading("d", &object(json!({"t": 1}))));
        let entries = rules.changed_entries(&cooled.changed);
        let warm = entries.iter().find(|e| e.rule == "warm").unwrap();
        assert_eq!((warm.device.as_str(), &warm.value), ("d", &None));
    }

    #[test]
    fn a_saved_state_of_another_version_shape_or_rule_is_ignored() {
        let mut rules = rules(KINDS);
        for garbage in [
            json!(null),
            json!({"version": 2, "rules": {}}),
            json!({"version": 1, "rules": []}),
            json!({"version": 1, "rules": {"warm": {"fingerprint": 7, "devices": {}}}}),
            json!({"version": 1, "rules": {"silent": {"devices": {"d": {"last_seen": 3}}}}}),
        ] {
            let restored = rules.restore_alert_state(&garbage);
            assert!(restored.rules.is_empty(), "{garbage}");
        }
        let mut state = rules.alert_state();
        state["rules"]["gone"] = json!({"fingerprint": "0", "devices": {}});
        let fingerprint = rules.rules[0].fingerprint.clone();
        state["rules"]["warm"] = json!({
            "fingerprint": fingerprint,
            "devices": {"ok": {"fired_at": "2024-05-01T12:00:00Z"}, "bad": {"fired_at": "soon"}},
        });
        state["rules"]["silent"] = json!({"fingerprint": "changed", "devices": {}});
        let restored = rules.restore_alert_state(&state);
        assert_eq!(restored.rules, [("warm".to_owned(), 1)]);
        assert_eq!(
            restored.ignored,
            [
                ("gone".to_owned(), "no rule has this id any more".to_owned()),
                (
                    "silent".to_owned(),
                    "the rule's definition changed".to_owned()
                ),
            ]
        );
    }

    const PAIRS: &str = r#"
[[rule]]
id = "pairs"
when = "a.exists(x, a.exists(y, x + y < 0.0))"
emit = { type = "x.pairs" }

[[rule]]
id = "long"
when = "size(a) > 3"
emit = { type = "x.long" }
"#;

    #[test]
    fn a_condition_too_costly_for_a_reading_is_an_error_for_that_rule_and_reading_only() {
        let mut rules = rules(PAIRS);
        let fired = |outcome: &Outcome| {
            outcome
                .alerts
                .iter()
                .map(|a| a.rule.clone())
                .collect::<Vec<_>>()
        };
        // 40 KB: an 8,000-element list, on which the first rule would take 64 million
        // steps (the size also counts the key, `device` and `source`).
        let big: Vec<f64> = (0..8000).map(f64::from).collect();
        let fields = object(json!({ "a": big }));
        let outcome = rules.evaluate(&reading("d", &fields));
        assert_eq!(
            outcome.errors,
            [EvalError {
                rule: "pairs".into(),
                message: "`when` not evaluated: on a reading this large (size 8010: its values \
                          plus the bytes of its strings and keys) it could take up to \
                          898329514 steps; the limit is 1000000. Avoid a list macro inside \
                          another (`exists`, `all`, `map`, `filter`) on large lists"
                    .into(),
            }]
        );
        assert_eq!(fired(&outcome), ["long"]);
        assert!(outcome.forward);
        // The same rules on an everyday reading from another device.
        let fields = object(json!({ "a": [1, -2, 0.5] }));
        let outcome = rules.evaluate(&reading("e", &fields));
        assert_eq!(outcome.errors, []);
        assert_eq!(fired(&outcome), ["pairs"]);
    }

    #[test]
    fn a_condition_whose_work_grows_with_the_square_of_a_reading_compiles_with_a_warning() {
        let rules = rules(PAIRS);
        assert_eq!(rules.len(), 2);
        let warnings: Vec<String> = rules.warnings().iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            [
                "r.toml:4:8: warning: `when` runs a list macro (`all`, `exists`, `exists_one`, \
              `map`, `filter`) inside another, so its work grows with the square of a \
              reading's size or faster; a reading with large lists gets an evaluation error \
              instead of a result once the work could pass 1000000 steps\n  \
              when = \"a.exists(x, a.exists(y, x + y < 0.0))\"\n         ^"
            ]
        );
        assert_eq!(RuleSet::empty().warnings(), []);
        assert_eq!(super::tests::rules(FREEZER).warnings(), []);
    }
}
