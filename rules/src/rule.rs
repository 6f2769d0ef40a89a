//! One checked rule: which readings it looks at ([`Matcher`], and `when` as a
//! filter), what it watches for ([`Kind`]), and what it does on a transition
//! ([`Emit`], [`Actuation`]).

use crate::engine::{Action, Alert, EvalError, Outcome, Reading, StateChange, Transition};
use crate::expr::{Bindings, Condition};
use crate::glob::Glob;
use crate::kinds::Kind;
use cel::Env;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde_json::{Map, Value};
use std::sync::Arc;

/// A rule ready to evaluate.
#[derive(Debug)]
pub(crate) struct Rule {
    /// Unique across the rule set.
    pub id: String,
    /// A hash of the rule's canonical definition (everything but `description`,
    /// independent of layout, comments and key order): state moves from an old
    /// rule to a new one, and is restored after a restart, only if it is the same.
    pub fingerprint: String,
    /// The rule in one line, for listings.
    pub summary: String,
    pub matcher: Matcher,
    /// `when` for the kinds where it picks the readings the rule looks at (rate,
    /// stale, count, aggregate, forward); `None` for the others, whose `when` is part
    /// of the [`Kind`].
    pub filter: Option<Condition>,
    pub kind: Kind,
    pub emit: Option<Emit>,
    pub action: Option<Actuation>,
}

/// What a rule says about forwarding the reading it just saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Vote {
    /// Forward it, as far as this rule is concerned.
    Keep,
    /// Drop it.
    Drop,
    /// A deadband passed it: forward it, and if it is forwarded, remember it as the
    /// device's last forwarded reading ([`Rule::commit`]).
    Passed,
}

impl Rule {
    /// Runs one reading that passed the matcher through the rule.
    pub(crate) fn evaluate(&mut self, ctx: &mut Ctx<'_, '_>, out: &mut Outcome) -> Vote {
        let fx = Effects {
            rule: &self.id,
            lifecycle: self.kind.has_lifecycle(),
            emit: self.emit.as_ref(),
            action: self.action.as_ref(),
        };
        if let Some(filter) = &self.filter {
            match ctx.eval(filter) {
                Ok(true) => {}
                Ok(false) => return Vote::Keep,
                Err(message) => {
                    fx.error(out, message);
                    return Vote::Keep;
                }
            }
        }
        self.kind.evaluate(&fx, ctx, out)
    }

    /// The reading a deadband passed was forwarded: remember it.
    pub(crate) fn commit(&mut self, reading: &Reading<'_>, limit: usize, out: &mut Outcome) {
        let fx = Effects {
            rule: &self.id,
            lifecycle: false,
            emit: None,
            action: None,
        };
        self.kind.commit(&fx, reading, limit, out);
    }

    /// Closes what is due at `now`: stale sensors, count windows, aggregate windows.
    pub(crate) fn tick(&mut self, now: DateTime<Utc>, limit: usize, out: &mut Outcome) {
        let fx = Effects {
            rule: &self.id,
            lifecycle: self.kind.has_lifecycle(),
            emit: self.emit.as_ref(),
            action: self.action.as_ref(),
        };
        self.kind.tick(&fx, now, limit, out);
    }
}

/// `match`: the readings a rule looks at. A glob left out matches everything.
#[derive(Debug, Default)]
pub(crate) struct Matcher {
    pub device: Option<Glob>,
    pub source: Option<Glob>,
}

impl Matcher {
    pub(crate) fn matches(&self, reading: &Reading<'_>) -> bool {
        self.device
            .as_ref()
            .is_none_or(|g| g.matches(reading.device))
            && self
                .source
                .as_ref()
                .is_none_or(|g| g.matches(reading.source))
    }
}

/// `emit`: the event raised on each transition.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Emit {
    pub event_type: String,
    pub severity: Option<String>,
    pub to: Option<Vec<String>>,
}

/// `action`: what a rule switches locally on a transition. At least one of the two.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Actuation {
    pub publish: Option<Publish>,
    pub write: Option<SerialWrite>,
}

impl Actuation {
    /// The actions for `transition` of `device`, each `Err` for one that cannot be
    /// done safely with this device id.
    fn actions(
        &self,
        rule: &str,
        device: &str,
        transition: Transition,
    ) -> impl Iterator<Item = Result<Action, String>> {
        let publish = self
            .publish
            .as_ref()
            .map(|p| p.action(rule, device, transition));
        let write = self
            .write
            .as_ref()
            .map(|w| w.action(rule, device, transition));
        [publish, write]
            .into_iter()
            .flatten()
            .filter_map(Result::transpose)
    }
}

/// The text for a transition: `on` when fired, `clear` (if given) when resolved,
/// nothing for a window.
fn pick<'a>(on: &'a str, clear: Option<&'a str>, transition: Transition) -> Option<&'a str> {
    match transition {
        Transition::Fired => Some(on),
        Transition::Resolved => clear,
        Transition::Window => None,
    }
}

/// `action.mqtt_publish`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Publish {
    /// With `{device}` and `{rule}` placeholders, checked to be the only ones.
    pub topic: String,
    pub payload: String,
    pub clear_payload: Option<String>,
    pub qos: u8,
    pub retain: bool,
}

impl Publish {
    /// The action for `transition` of `device`, if there is one: `payload` on fired,
    /// `clear_payload` (if given) on resolved. `Err` if the device id would put a
    /// wildcard or a NUL into the topic.
    fn action(
        &self,
        rule: &str,
        device: &str,
        transition: Transition,
    ) -> Result<Option<Action>, String> {
        let Some(payload) = pick(&self.payload, self.clear_payload.as_deref(), transition) else {
            return Ok(None);
        };
        let topic = substitute(&self.topic, rule, device);
        if self.topic.contains("{device}") && device.contains(['+', '#', '\0']) {
            return Err(format!(
                "not publishing to `{topic}`: the device id `{device}` puts an MQTT wildcard \
                 or NUL into the topic"
            ));
        }
        Ok(Some(Action::MqttPublish {
            rule: rule.to_owned(),
            topic,
            payload: substitute(payload, rule, device),
            qos: self.qos,
            retain: self.retain,
        }))
    }
}

/// `action.serial_write`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SerialWrite {
    /// The name of a serial source.
    pub port: String,
    /// With `{device}` and `{rule}` placeholders; checked to hold no line break.
    pub line: String,
    pub clear_line: Option<String>,
}

impl SerialWrite {
    /// The action for `transition` of `device`, if there is one: `line` on fired,
    /// `clear_line` (if given) on resolved. `Err` if the device id would put a line
    /// break or a NUL into the line: that would send the actuator a second command.
    fn action(
        &self,
        rule: &str,
        device: &str,
        transition: Transition,
    ) -> Result<Option<Action>, String> {
        let Some(line) = pick(&self.line, self.clear_line.as_deref(), transition) else {
            return Ok(None);
        };
        if line.contains("{device}") && device.contains(['\r', '\n', '\0']) {
            return Err(format!(
                "not writing to serial port `{}`: the device id {device:?} puts a line break \
                 or NUL into the line",
                self.port
            ));
        }
        Ok(Some(Action::SerialWrite {
            rule: rule.to_owned(),
            port: self.port.clone(),
            line: substitute(line, rule, device),
        }))
    }
}

/// `text` with `{device}` and `{rule}` replaced.
fn substitute(text: &str, rule: &str, device: &str) -> String {
    if !text.contains('{') {
        return text.to_owned();
    }
    text.replace("{device}", device).replace("{rule}", rule)
}

/// What a rule produces: events and actions on transitions, and errors.
pub(crate) struct Effects<'a> {
    pub rule: &'a str,
    /// Whether the rule's alerts have a lifecycle kept in its state (not
    /// `every_reading`, not aggregates).
    pub lifecycle: bool,
    pub emit: Option<&'a Emit>,
    pub action: Option<&'a Actuation>,
}

/// One transition of one device, for [`Effects::transition`].
pub(crate) struct Event<'a> {
    pub transition: Transition,
    pub device: &'a str,
    pub source: &'a str,
    pub time: DateTime<Utc>,
    /// The kind-specific part of `data`; `rule`, `device` and `transition` are added.
    pub data: Map<String, Value>,
}

impl Effects<'_> {
    /// Records a change of `device`'s saved state that is not a transition.
    pub(crate) fn progress(&self, out: &mut Outcome, device: &str) {
        out.state = out.state.max(StateChange::Progress);
        out.note_changed(self.rule, device);
    }

    pub(crate) fn error(&self, out: &mut Outcome, message: impl Into<String>) {
        out.errors.push(EvalError {
            rule: self.rule.to_owned(),
            message: message.into(),
        });
    }

    /// Raises the event (if the rule has `emit`) and runs the action (if the rule
    /// has one for this transition).
    pub(crate) fn transition(&self, out: &mut Outcome, event: Event<'_>) {
        if self.lifecycle && event.transition != Transition::Window {
            out.state = out.state.max(StateChange::Transition);
            out.note_changed(self.rule, event.device);
        }
        if let Some(actuation) = self.action {
            for action in actuation.actions(self.rule, event.device, event.transition) {
                match action {
                    Ok(action) => out.actions.push(action),
                    Err(message) => self.error(out, message),
                }
            }
        }
        let Some(emit) = self.emit else {
            return;
        };
        let mut data = Map::new();
        data.insert("rule".into(), Value::from(self.rule));
        data.insert("device".into(), Value::from(event.device));
        data.insert("transition".into(), Value::from(event.transition.as_str()));
        data.extend(event.data);
        out.alerts.push(Alert {
            rule: self.rule.to_owned(),
            event_type: emit.event_type.clone(),
            severity: emit.severity.clone(),
            to: emit.to.clone(),
            data: Value::Object(data),
            transition: event.transition,
            device: event.device.to_owned(),
            source: event.source.to_owned(),
            time: event.time,
        });
    }
}

/// One reading on its way through the rules, with the CEL variables built on first
/// use (readings only rules without conditions look at cost no conversion).
pub(crate) struct Ctx<'a, 'r> {
    pub reading: &'a Reading<'r>,
    env: &'a Arc<Env>,
    bindings: Option<Bindings<'r>>,
    /// [`Devices`](crate::devices::Devices) limit.
    pub limit: usize,
}

impl<'a, 'r> Ctx<'a, 'r> {
    pub(crate) fn new(env: &'a Arc<Env>, reading: &'a Reading<'r>, limit: usize) -> Self {
        Ctx {
            reading,
            env,
            bindings: None,
            limit,
        }
    }

    pub(crate) fn eval(&mut self, condition: &Condition) -> Result<bool, String> {
        if let Some(answer) = condition.threshold(self.reading.fields) {
            return Ok(answer);
        }
        let (env, reading) = (self.env, self.reading);
        let bindings = self
            .bindings
            .get_or_insert_with(|| Bindings::new(env, reading));
        condition.evaluate(bindings)
    }
}

/// A field named in a rule (`rate.field`, `aggregate.fields`, `forward.deadband`):
/// a top-level field, or with dots a path into nested objects. A top-level field
/// whose name has the dots in it wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldPath {
    pub name: String,
    parts: Vec<String>,
}

impl FieldPath {
    pub(crate) fn new(name: &str) -> FieldPath {
        FieldPath {
            name: name.to_owned(),
            parts: name.split('.').map(str::to_owned).collect(),
        }
    }

    pub(crate) fn lookup<'v>(&self, fields: &'v Map<String, Value>) -> Option<&'v Value> {
        if let Some(value) = fields.get(&self.name) {
            return Some(value);
        }
        if self.parts.len() < 2 {
            return None;
        }
        let (first, rest) = self.parts.split_first()?;
        let mut value = fields.get(first)?;
        for part in rest {
            value = value.as_object()?.get(part)?;
        }
        Some(value)
    }

    /// The field as a number; `Err` says why it is not one.
    pub(crate) fn number(&self, fields: &Map<String, Value>) -> Result<f64, String> {
        match self.lookup(fields) {
            None => Err(format!("no field `{}` in this reading", self.name)),
            Some(Value::Number(n)) => n
                .as_f64()
                .filter(|n| n.is_finite())
                .ok_or_else(|| format!("field `{}` is too large a number", self.name)),
            Some(other) => Err(format!(
                "field `{}` is {}, not a number",
                self.name,
                json_type(other)
            )),
        }
    }
}

/// "a string", "an object", ... for messages.
pub(crate) fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A time in event data: RFC 3339, UTC, `Z`, fractions only when there are some.
pub(crate) fn time_value(time: DateTime<Utc>) -> Value {
    Value::from(time.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// A duration in event data, in seconds: whole if it is.
pub(crate) fn seconds_value(duration: TimeDelta) -> Value {
    let ms = duration.num_milliseconds().max(0);
    if ms % 1000 == 0 {
        Value::from(ms / 1000)
    } else {
        Value::from(ms as f64 / 1000.0)
    }
}

/// The reading's fields, as they go into `data.values`.
pub(crate) fn values(reading: &Reading<'_>) -> Value {
    Value::Object(reading.fields.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reading<'a>(
        device: &'a str,
        source: &'a str,
        fields: &'a Map<String, Value>,
    ) -> Reading<'a> {
        Reading {
            source,
            device,
            time: DateTime::UNIX_EPOCH,
            fields,
        }
    }

    fn glob(pattern: &str) -> Option<Glob> {
        Glob::new(pattern).ok()
    }

    #[test]
    fn a_matcher_without_globs_matches_every_reading() {
        let fields = Map::new();
        assert!(Matcher::default().matches(&reading("any", "thing", &fields)));
    }

    #[test]
    fn a_reading_must_match_every_glob_given() {
        let fields = Map::new();
        let matcher = Matcher {
            device: glob("fz-*"),
            source: glob("serial-?"),
        };
        assert!(matcher.matches(&reading("fz-1", "serial-1", &fields)));
        assert!(!matcher.matches(&reading("fz-1", "local", &fields)));
        assert!(!matcher.matches(&reading("fridge-1", "serial-1", &fields)));
    }

    #[test]
    fn a_transition_carries_the_emit_settings_and_the_documented_data() {
        let emit = Emit {
            event_type: "com.acme.x".into(),
            severity: Some("low".into()),
            to: None,
        };
        let fx = Effects {
            rule: "r1",
            lifecycle: true,
            emit: Some(&emit),
            action: None,
        };
        let mut out = Outcome::default();
        let mut data = Map::new();
        data.insert("values".into(), json!({"t": 1}));
        fx.transition(
            &mut out,
            Event {
                transition: Transition::Fired,
                device: "dev-9",
                source: "local",
                time: DateTime::UNIX_EPOCH,
                data,
            },
        );
        let alert = &out.alerts[0];
        assert_eq!(alert.rule, "r1");
        assert_eq!(alert.event_type, "com.acme.x");
        assert_eq!(alert.severity.as_deref(), Some("low"));
        assert_eq!(alert.to, None);
        assert_eq!(
            (alert.device.as_str(), alert.source.as_str()),
            ("dev-9", "local")
        );
        assert_eq!(
            alert.data,
            json!({"rule": "r1", "device": "dev-9", "transition": "fired", "values": {"t": 1}})
        );
    }

    #[test]
    fn a_publish_substitutes_placeholders_and_refuses_wildcards_from_device_ids() {
        let publish = Publish {
            topic: "actuators/{device}/fan".into(),
            payload: "{\"on\": true, \"by\": \"{rule}\"}".into(),
            clear_payload: None,
            qos: 1,
            retain: true,
        };
        assert_eq!(
            publish.action("fan-on", "room-1", Transition::Fired),
            Ok(Some(Action::MqttPublish {
                rule: "fan-on".into(),
                topic: "actuators/room-1/fan".into(),
                payload: "{\"on\": true, \"by\": \"fan-on\"}".into(),
                qos: 1,
                retain: true,
            }))
        );
        assert_eq!(
            publish.action("fan-on", "room-1", Transition::Resolved),
            Ok(None)
        );
        assert_eq!(
            publish.action("fan-on", "room+1", Transition::Fired),
            Err(
                "not publishing to `actuators/room+1/fan`: the device id `room+1` puts an \
                 MQTT wildcard or NUL into the topic"
                    .into()
            )
        );
    }

    #[test]
    fn a_serial_write_sends_the_clear_line_on_resolve_and_refuses_line_breaks_from_device_ids() {
        let actuation = Actuation {
            publish: None,
            write: Some(SerialWrite {
                port: "valves".into(),
                line: "OPEN {device} by {rule}".into(),
                clear_line: Some("CLOSE {device}".into()),
            }),
        };
        let all = |device: &str, t| actuation.actions("r", device, t).collect::<Vec<_>>();
        let write = |line: &str| {
            Ok(Action::SerialWrite {
                rule: "r".into(),
                port: "valves".into(),
                line: line.into(),
            })
        };
        assert_eq!(all("v1", Transition::Fired), [write("OPEN v1 by r")]);
        assert_eq!(all("v1", Transition::Resolved), [write("CLOSE v1")]);
        assert_eq!(all("v1", Transition::Window), []);
        let injected = all("v1\nFLUSH", Transition::Fired);
        assert!(
            matches!(injected.as_slice(), [Err(m)] if m.contains("line break")),
            "{injected:?}"
        );
    }

    #[test]
    fn a_field_path_looks_into_nested_objects_but_a_dotted_top_level_name_wins() {
        let fields = json!({"bp": {"systolic": 150}, "a.b": 1, "a": {"b": 2}, "s": "x"});
        let fields = fields.as_object().cloned().unwrap_or_default();
        assert_eq!(FieldPath::new("bp.systolic").number(&fields), Ok(150.0));
        assert_eq!(FieldPath::new("a.b").number(&fields), Ok(1.0));
        assert_eq!(
            FieldPath::new("bp.pulse").number(&fields),
            Err("no field `bp.pulse` in this reading".into())
        );
        assert_eq!(
            FieldPath::new("s").number(&fields),
            Err("field `s` is a string, not a number".into())
        );
    }
}
