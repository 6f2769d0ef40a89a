//! Turning rule files into [`Rule`]s, reporting every mistake in every file.

use crate::cost::MAX_EVAL_STEPS;
use crate::diagnostic::Diagnostic;
use crate::duration;
use crate::expr::{self, Condition};
use crate::file::{
    self, ActionDef, AggregateDef, CountDef, EmitDef, ForwardDef, MqttPublishDef, Placed, RateDef,
    RuleDef, SerialWriteDef,
};
use crate::glob::Glob;
use crate::kinds::{
    Aggregate, ConditionAlert, Count, Deadband, EveryReading, Function, Kind, Rate, Stale,
    MAX_COUNT,
};
use crate::rule::{Actuation, Emit, FieldPath, Matcher, Publish, Rule, SerialWrite};
use crate::toml_string::StringMap;
use cel::Env;
use chrono::TimeDelta;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt::Debug;
use toml::Spanned;

/// The most fields an `aggregate` or a deadband may list.
pub const MAX_FIELDS: usize = 64;

/// One rule file's contents, read by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Shown in diagnostics; usually the file's path.
    pub name: String,
    /// The file's text.
    pub text: String,
}

/// What [`RuleSet::compile`](crate::RuleSet::compile) checks beyond the rule files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckOptions {
    /// The configured sink names. When `Some`, every name in a rule's `emit.to` must
    /// be one of them; when `None`, `emit.to` names are not checked.
    pub known_sinks: Option<Vec<String>>,
    /// The configured serial source names. When `Some`, a rule's
    /// `action.serial_write.port` must be one of them; when `None`, it is not checked.
    pub known_serial_ports: Option<Vec<String>>,
}

/// What compiling gives when nothing is wrong: the rules, and the warnings about
/// rules that work but may not work as meant.
pub(crate) struct Compiled {
    pub rules: Vec<Rule>,
    pub warnings: Vec<Diagnostic>,
}

/// Checks and compiles every rule of every file. Needs a big stack (it compiles CEL).
pub(crate) fn compile(
    files: &[SourceFile],
    opts: &CheckOptions,
    env: &Env,
) -> Result<Compiled, Vec<Diagnostic>> {
    let mut checker = Checker {
        opts,
        env,
        ids: HashMap::new(),
        warnings: Vec::new(),
    };
    let mut rules = Vec::new();
    let mut diagnostics = Vec::new();
    let mut warnings = Vec::new();
    for source in files {
        let parsed = file::parse(&source.text);
        if !parsed.errors.is_empty() && !file::looks_like_rules(&source.text) {
            diagnostics.push(Diagnostic::whole_file(
                &source.name,
                format!(
                    "cannot read as a rule file: {}",
                    file::not_rules(&source.text)
                ),
            ));
            continue;
        }
        let mut found: Vec<(usize, String)> = parsed.errors;
        for def in parsed.rules {
            match checker.rule(source, def) {
                Ok(rule) => rules.push(rule),
                Err(errors) => found.extend(errors),
            }
        }
        found.sort_by_key(|(at, _)| *at);
        diagnostics.extend(
            found
                .into_iter()
                .map(|(at, message)| Diagnostic::at(&source.name, &source.text, at, message)),
        );
        warnings.extend(
            checker
                .warnings
                .drain(..)
                .map(|(at, message)| Diagnostic::at(&source.name, &source.text, at, message)),
        );
    }
    if diagnostics.is_empty() {
        Ok(Compiled { rules, warnings })
    } else {
        Err(diagnostics)
    }
}

/// Where an id was first defined: `file:line:col`.
type Place = String;

struct Checker<'a> {
    opts: &'a CheckOptions,
    env: &'a Env,
    /// Every id seen so far, across files, for duplicate detection.
    ids: HashMap<String, Place>,
    /// Warnings about the file being checked.
    warnings: Vec<Found>,
}

/// `(byte offset into the file, message)`.
type Found = (usize, String);

/// The keys that decide a rule's kind, at most one per rule.
const TRIGGERS: [&str; 5] = ["rate", "stale", "count", "aggregate", "forward"];

impl Checker<'_> {
    /// Checks one rule; `Err` has every mistake in it.
    fn rule(&mut self, source: &SourceFile, def: Spanned<RuleDef>) -> Result<Rule, Vec<Found>> {
        let text = source.text.as_str();
        let header = def.span().start;
        let def = def.into_inner();
        let mut errors: Vec<Found> = Vec::new();
        let mut canon = Canon::default();

        self.id(source, &def.id, &mut errors);

        let mut matcher = Matcher::default();
        if let Some(def) = &def.matcher {
            matcher.device = glob(text, def.device.as_ref(), "match.device", &mut errors);
            matcher.source = glob(text, def.source.as_ref(), "match.source", &mut errors);
            canon.add("match.device", def.device.as_ref().map(|g| g.get_ref()));
            canon.add("match.source", def.source.as_ref().map(|g| g.get_ref()));
        }

        let when = def
            .when
            .as_ref()
            .and_then(|w| self.condition(text, w, "when", &mut errors));
        let clear_when = def
            .clear_when
            .as_ref()
            .and_then(|w| self.condition(text, w, "clear_when", &mut errors));
        let sustained = def
            .sustained
            .as_ref()
            .and_then(|d| duration(text, d, "for", &mut errors));
        canon.add(
            "when",
            def.when.as_ref().map(|w| expr::canonical(w.get_ref())),
        );
        canon.add(
            "clear_when",
            def.clear_when
                .as_ref()
                .map(|w| expr::canonical(w.get_ref())),
        );
        canon.add("for", sustained.map(|d| d.num_milliseconds()));

        // Which kind of rule this is: at most one of the trigger keys.
        let starts = [
            def.rate.as_ref().map(|v| v.start().unwrap_or(header)),
            def.stale.as_ref().map(|v| v.span().start),
            def.count.as_ref().map(|v| v.start().unwrap_or(header)),
            def.aggregate.as_ref().map(|v| v.start().unwrap_or(header)),
            def.forward.as_ref().map(|v| v.start().unwrap_or(header)),
        ];
        let present: Vec<(&str, usize)> = TRIGGERS
            .iter()
            .zip(starts)
            .filter_map(|(&key, at)| Some((key, at?)))
            .collect();
        let trigger = present.first().map(|&(key, _)| key);
        for &(key, at) in present.iter().skip(1) {
            let first = trigger.unwrap_or_default();
            errors.push((
                at,
                format!(
                    "`{key}` cannot be combined with `{first}` in one rule; write a rule for each"
                ),
            ));
        }

        let every_reading = def
            .emit
            .as_ref()
            .and_then(|e| e.get_ref().every_reading.as_ref())
            .filter(|b| *b.get_ref())
            .map(|b| b.span().start);
        let lifecycle_keys = [
            ("for", def.sustained.as_ref().map(|v| v.span().start)),
            (
                "clear_when",
                def.clear_when.as_ref().map(|v| v.span().start),
            ),
        ];
        for (key, at) in lifecycle_keys {
            let Some(at) = at else { continue };
            if let Some(trigger) = trigger {
                errors.push((
                    at,
                    format!(
                        "`{key}` cannot be used with `{trigger}`: it belongs to alerts on a \
                         `when` condition"
                    ),
                ));
            } else if def.when.is_none() {
                errors.push((at, format!("`{key}` needs a `when` condition")));
            } else if every_reading.is_some() {
                errors.push((
                    at,
                    format!(
                        "`{key}` cannot be used with `emit.every_reading = true`, which raises \
                         an event for every reading instead of an alert with a lifecycle"
                    ),
                ));
            }
        }
        if let (Some(every_reading), Some(trigger)) = (every_reading, trigger) {
            errors.push((
                every_reading,
                format!(
                    "`emit.every_reading` only works with a `when` condition alone, not with \
                     `{trigger}`"
                ),
            ));
        }

        // What the rule does: forward, or emit and/or action.
        if trigger == Some("forward") {
            for (key, at) in [
                (
                    "emit",
                    def.emit.as_ref().map(|v| v.start().unwrap_or(header)),
                ),
                (
                    "action",
                    def.action.as_ref().map(|v| v.start().unwrap_or(header)),
                ),
            ] {
                if let Some(at) = at {
                    errors.push((
                        at,
                        format!(
                            "`{key}` cannot be used with `forward`: a rule either thins out \
                             readings or raises alerts; write a rule for each"
                        ),
                    ));
                }
            }
        } else if def.emit.is_none() && def.action.is_none() {
            errors.push((
                header,
                "this rule does nothing: give it `emit` (raise events), `action` (publish to \
                 MQTT or write to a serial port) or `forward` (drop or thin out readings)"
                    .into(),
            ));
        } else if trigger.is_none() && def.when.is_none() {
            errors.push((
                header,
                "this rule needs a `when` condition, or one of `rate`, `stale`, `count`, \
                 `aggregate`"
                    .into(),
            ));
        }
        if trigger == Some("aggregate") {
            if let Some(action) = &def.action {
                errors.push((
                    action.start().unwrap_or(header),
                    "`action` cannot be used with `aggregate`: a window has nothing to switch \
                     on or off"
                        .into(),
                ));
            }
            if def.emit.is_none() {
                errors.push((
                    def.aggregate
                        .as_ref()
                        .and_then(|a| a.start())
                        .unwrap_or(header),
                    "`aggregate` needs `emit`: each window is sent as an event".into(),
                ));
            }
        }

        let emit = def
            .emit
            .map(|e| self.emit(e.into_inner(), &mut canon, &mut errors));
        let no_clear = if every_reading.is_some() {
            Some("`emit.every_reading = true`: there is nothing to resolve")
        } else {
            None
        };
        let action = def.action.map(|a| {
            let at = a.start().unwrap_or(header);
            self.action(text, at, a.into_inner(), no_clear, &mut canon, &mut errors)
        });

        let mut filter = None;
        let kind = match trigger {
            Some("rate") => def
                .rate
                .and_then(|r| rate(text, r, header, &mut canon, &mut errors))
                .map(Kind::Rate),
            Some("stale") => def
                .stale
                .and_then(|s| duration(text, &s, "stale", &mut errors))
                .map(|after| {
                    canon.add("stale", Some(after.num_milliseconds()));
                    Kind::Stale(Stale {
                        after,
                        devices: Default::default(),
                        next_due: None,
                    })
                }),
            Some("count") => def
                .count
                .and_then(|c| count(text, c, &mut canon, &mut errors))
                .map(Kind::Count),
            Some("aggregate") => def
                .aggregate
                .and_then(|a| aggregate(text, a, &mut canon, &mut errors))
                .map(Kind::Aggregate),
            Some(_) => def
                .forward
                .and_then(|f| forward(text, f, header, &mut canon, &mut errors)),
            None => None,
        };
        let kind = match (trigger, when) {
            (Some(_), when) => {
                filter = when;
                kind
            }
            (None, Some(when)) if every_reading.is_some() => {
                canon.add("every_reading", Some(true));
                Some(Kind::EveryReading(EveryReading { when }))
            }
            (None, Some(when)) => Some(Kind::Condition(ConditionAlert {
                when,
                sustained,
                clear_when,
                devices: Default::default(),
            })),
            (None, None) => None,
        };
        canon.add("kind", kind.as_ref().map(Kind::name));

        match (kind, emit, action) {
            (Some(kind), emit, action) if errors.is_empty() => {
                let emit = emit.flatten();
                let action = action.flatten();
                let summary = summary(
                    &kind,
                    def.when.as_ref().map(|w| w.get_ref().as_str()),
                    def.clear_when.as_ref().map(|w| w.get_ref().as_str()),
                    emit.as_ref(),
                    action.as_ref(),
                );
                Ok(Rule {
                    id: def.id.into_inner(),
                    fingerprint: canon.fingerprint(),
                    summary,
                    matcher,
                    filter,
                    kind,
                    emit,
                    action,
                })
            }
            _ => Err(errors),
        }
    }

    /// Checks `id`: not empty, not used before.
    fn id(&mut self, source: &SourceFile, id: &Spanned<String>, errors: &mut Vec<Found>) {
        let name = id.get_ref();
        if name.trim().is_empty() {
            errors.push((id.span().start, "`id` is empty".into()));
            return;
        }
        match self.ids.entry(name.clone()) {
            Entry::Occupied(first) => errors.push((
                id.span().start,
                format!(
                    "duplicate rule id `{name}`; it is first used at {}",
                    first.get()
                ),
            )),
            Entry::Vacant(slot) => {
                let here = Diagnostic::at(&source.name, &source.text, id.span().start, "");
                slot.insert(format!("{}:{}:{}", here.file, here.line, here.col));
            }
        }
    }

    /// Compiles a condition written under `key`.
    fn condition(
        &mut self,
        text: &str,
        source: &Spanned<String>,
        key: &'static str,
        errors: &mut Vec<Found>,
    ) -> Option<Condition> {
        match Condition::compile(self.env, key, source.get_ref()) {
            Ok(condition) => {
                if let Some(warning) = costly(&condition, key) {
                    self.warnings
                        .push((string_offset(text, source, None), warning));
                }
                Some(condition)
            }
            Err(error) => {
                errors.push((string_offset(text, source, error.offset), error.message));
                None
            }
        }
    }

    /// Checks `emit`. `None` if something is wrong (recorded in `errors`).
    fn emit(&self, def: EmitDef, canon: &mut Canon, errors: &mut Vec<Found>) -> Option<Emit> {
        let before = errors.len();
        if def.event_type.get_ref().trim().is_empty() {
            errors.push((def.event_type.span().start, "`emit.type` is empty".into()));
        }
        if let Some(severity) = &def.severity {
            if severity.get_ref().trim().is_empty() {
                errors.push((
                    severity.span().start,
                    "`emit.severity` is empty; leave it out for none".into(),
                ));
            }
        }
        if let Some(to) = &def.to {
            self.sinks(to, errors);
        }
        let emit = Emit {
            event_type: def.event_type.into_inner(),
            severity: def.severity.map(Spanned::into_inner),
            to: def.to.map(|to| {
                to.into_inner()
                    .into_iter()
                    .map(Spanned::into_inner)
                    .collect()
            }),
        };
        canon.add("emit.type", Some(&emit.event_type));
        canon.add("emit.severity", emit.severity.as_ref());
        canon.add("emit.to", emit.to.as_ref());
        (errors.len() == before).then_some(emit)
    }

    /// Checks `emit.to`: not empty, no name twice, every name a known sink.
    /// Checks `action`: `mqtt_publish`, `serial_write`, or both. `at`: where the
    /// `action` table starts.
    fn action(
        &self,
        text: &str,
        at: usize,
        def: ActionDef,
        no_clear: Option<&str>,
        canon: &mut Canon,
        errors: &mut Vec<Found>,
    ) -> Option<Actuation> {
        let before = errors.len();
        if def.mqtt_publish.is_none() && def.serial_write.is_none() {
            errors.push((
                at,
                "`action` needs `mqtt_publish` or `serial_write` (or both)".into(),
            ));
        }
        let publish = def
            .mqtt_publish
            .map(|p| publish(text, p.into_inner(), no_clear, canon, errors));
        let write = def.serial_write.map(|w| {
            let ports = self.opts.known_serial_ports.as_deref();
            serial_write(w.into_inner(), ports, no_clear, canon, errors)
        });
        (errors.len() == before).then(|| Actuation {
            publish: publish.flatten(),
            write: write.flatten(),
        })
    }

    fn sinks(&self, to: &Spanned<Vec<Spanned<String>>>, errors: &mut Vec<Found>) {
        if to.get_ref().is_empty() {
            errors.push((
                to.span().start,
                "`emit.to` is empty, so the alert would go nowhere; leave it out to let \
                 the agent route it"
                    .into(),
            ));
        }
        for (i, sink) in to.get_ref().iter().enumerate() {
            let name = sink.get_ref();
            if to.get_ref()[..i].iter().any(|s| s.get_ref() == name) {
                errors.push((
                    sink.span().start,
                    format!("sink `{name}` is listed twice in `emit.to`"),
                ));
                continue;
            }
            let Some(known) = &self.opts.known_sinks else {
                continue;
            };
            if !known.contains(name) {
                let message = if known.is_empty() {
                    format!("unknown sink `{name}` in `emit.to`; no sinks are configured")
                } else {
                    format!(
                        "unknown sink `{name}` in `emit.to`; the configured sinks are: {}",
                        known.join(", ")
                    )
                };
                errors.push((sink.span().start, message));
            }
        }
    }
}

/// Checks `action.serial_write`. `no_clear`: as for [`publish`].
fn serial_write(
    def: SerialWriteDef,
    known_ports: Option<&[String]>,
    no_clear: Option<&str>,
    canon: &mut Canon,
    errors: &mut Vec<Found>,
) -> Option<SerialWrite> {
    let before = errors.len();
    let port = &def.port;
    if port.get_ref().is_empty() {
        errors.push((
            port.span().start,
            "`action.serial_write.port` is empty".into(),
        ));
    } else if let Some(known) = known_ports {
        if !known.contains(port.get_ref()) {
            let message = if known.is_empty() {
                format!(
                    "unknown serial port `{}` in `action.serial_write.port`; no \
                     [[source.serial]] is configured",
                    port.get_ref()
                )
            } else {
                format!(
                    "unknown serial port `{}` in `action.serial_write.port`; the serial \
                     sources are: {}",
                    port.get_ref(),
                    known.join(", ")
                )
            };
            errors.push((port.span().start, message));
        }
    }
    for (key, line) in [
        ("line", Some(&def.line)),
        ("clear_line", def.clear_line.as_ref()),
    ] {
        let Some(line) = line else { continue };
        let text = line.get_ref();
        let message = if text.is_empty() {
            Some(format!("`action.serial_write.{key}` is empty"))
        } else if text.contains(['\r', '\n', '\0']) {
            Some(format!(
                "`action.serial_write.{key}` is one line: no line break or NUL (the port's \
                 line ending is added)"
            ))
        } else {
            unknown_placeholder(text).map(|name| {
                format!(
                    "`action.serial_write.{key}`: unknown placeholder `{{{name}}}`; the \
                     placeholders are `{{device}}` and `{{rule}}`"
                )
            })
        };
        if let Some(message) = message {
            errors.push((line.span().start, message));
        }
    }
    if let (Some(clear), Some(why)) = (&def.clear_line, no_clear) {
        errors.push((
            clear.span().start,
            format!("`action.serial_write.clear_line` cannot be used with {why}"),
        ));
    }
    let write = SerialWrite {
        port: def.port.into_inner(),
        line: def.line.into_inner(),
        clear_line: def.clear_line.map(Spanned::into_inner),
    };
    canon.add("action.serial_write", Some(&write));
    (errors.len() == before).then_some(write)
}

/// Checks `action.mqtt_publish`. `no_clear`: why `clear_payload` makes no sense for
/// this rule, if it does not.
fn publish(
    text: &str,
    def: MqttPublishDef,
    no_clear: Option<&str>,
    canon: &mut Canon,
    errors: &mut Vec<Found>,
) -> Option<Publish> {
    let before = errors.len();
    let topic = &def.topic;
    let name = topic.get_ref();
    let key = "`action.mqtt_publish.topic`";
    if name.is_empty() {
        errors.push((topic.span().start, format!("{key} is empty")));
    } else if name.starts_with('$') {
        errors.push((
            topic.span().start,
            format!("{key} starts with `$`, which MQTT keeps for the broker's own topics"),
        ));
    } else if name.len() > 65_535 {
        errors.push((
            topic.span().start,
            format!("{key} is longer than MQTT allows (65535 bytes)"),
        ));
    } else if let Err((at, message)) = check_topic(name) {
        errors.push((
            string_offset(text, topic, Some(at)),
            format!("{key}: {message}"),
        ));
    }
    let qos = match &def.qos {
        None => 1,
        Some(qos) => match u8::try_from(*qos.get_ref()) {
            Ok(qos @ (0 | 1)) => qos,
            _ => {
                errors.push((
                    qos.span().start,
                    "`action.mqtt_publish.qos` must be 0 or 1".into(),
                ));
                0
            }
        },
    };
    if let (Some(clear), Some(why)) = (&def.clear_payload, no_clear) {
        errors.push((
            clear.span().start,
            format!("`action.mqtt_publish.clear_payload` cannot be used with {why}"),
        ));
    }
    let publish = Publish {
        topic: def.topic.into_inner(),
        payload: def.payload.into_inner(),
        clear_payload: def.clear_payload.map(Spanned::into_inner),
        qos,
        retain: def.retain.unwrap_or(false),
    };
    canon.add("action.mqtt_publish", Some(&publish));
    (errors.len() == before).then_some(publish)
}

/// The first `{name}` in `text` that looks like a placeholder (a name of letters,
/// digits, `_` and `.` in braces) but is not `{device}` or `{rule}`: a typo that
/// would otherwise go to the device as written. Other braces (JSON, say) are text.
fn unknown_placeholder(text: &str) -> Option<&str> {
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(after.len());
        let name = &after[..name_len];
        let closed = after[name_len..].starts_with('}');
        if closed && !name.is_empty() && name != "device" && name != "rule" {
            return Some(name);
        }
        rest = after;
    }
    None
}

/// Checks a topic to publish to: no wildcards, no NUL, placeholders only `{device}`
/// and `{rule}`. `Err` is `(byte offset into the topic, message)`.
fn check_topic(topic: &str) -> Result<(), (usize, String)> {
    let mut chars = topic.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '+' | '#' => {
                return Err((
                    at,
                    format!(
                        "`{c}` is an MQTT wildcard, which a topic to publish to may not contain"
                    ),
                ))
            }
            '\0' => return Err((at, "contains a NUL character".into())),
            '}' => return Err((at, "`}` without an opening `{`".into())),
            '{' => {
                let rest = &topic[at + 1..];
                let Some(end) = rest.find('}') else {
                    return Err((at, "`{` without a closing `}`".into()));
                };
                let name = &rest[..end];
                if name != "device" && name != "rule" {
                    return Err((
                        at,
                        format!(
                            "unknown placeholder `{{{name}}}`; the placeholders are `{{device}}` \
                             and `{{rule}}`"
                        ),
                    ));
                }
                // Skip the name and the closing brace (ASCII, one byte each).
                for _ in 0..=end {
                    chars.next();
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks a field name (`rate.field`, `aggregate.fields`, deadband keys).
fn field(name: &str) -> Result<FieldPath, String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.split('.').any(str::is_empty) {
        return Err(format!("`{name}` is not a field name or a path like `a.b`"));
    }
    Ok(FieldPath::new(name))
}

/// A finite number, or an error at its place.
fn finite(value: &Spanned<f64>, key: &str, errors: &mut Vec<Found>) -> Option<f64> {
    let number = *value.get_ref();
    if number.is_finite() {
        Some(number)
    } else {
        errors.push((
            value.span().start,
            format!("`{key}` must be a finite number"),
        ));
        None
    }
}

fn rate(
    text: &str,
    def: Placed<RateDef>,
    header: usize,
    canon: &mut Canon,
    errors: &mut Vec<Found>,
) -> Option<Rate> {
    let before = errors.len();
    let at = def.start().unwrap_or(header);
    let def = def.into_inner();
    let path = field(def.field.get_ref())
        .map_err(|m| errors.push((def.field.span().start, format!("`rate.field` {m}"))))
        .ok();
    let per = match &def.per {
        Some(per) => duration(text, per, "rate.per", errors),
        None => Some(TimeDelta::seconds(1)),
    };
    let above = def
        .above
        .as_ref()
        .and_then(|a| finite(a, "rate.above", errors));
    let below = def
        .below
        .as_ref()
        .and_then(|b| finite(b, "rate.below", errors));
    if def.above.is_none() && def.below.is_none() {
        errors.push((at, "`rate` needs `above` or `below` (or both)".into()));
    }
    if let (Some(above), Some(below), Some(spanned)) = (above, below, &def.below) {
        if below >= above {
            errors.push((
                spanned.span().start,
                format!(
                    "`rate.below` ({below}) is not less than `rate.above` ({above}), so every \
                     rate would fire"
                ),
            ));
        }
    }
    canon.add("rate.field", Some(def.field.get_ref()));
    canon.add("rate.per", per.map(|p| p.num_milliseconds()));
    canon.add("rate.above", above.map(f64::to_bits));
    canon.add("rate.below", below.map(f64::to_bits));
    if errors.len() != before {
        return None;
    }
    Some(Rate {
        field: path?,
        per: per?,
        above,
        below,
        devices: Default::default(),
    })
}

fn count(
    text: &str,
    def: Placed<CountDef>,
    canon: &mut Canon,
    errors: &mut Vec<Found>,
) -> Option<Count> {
    let def = def.into_inner();
    let at_least = *def.at_least.get_ref();
    let within = duration(text, &def.within, "count.within", errors);
    if at_least < 1 {
        errors.push((
            def.at_least.span().start,
            "`count.at_least` must be at least 1".into(),
        ));
        return None;
    }
    if at_least > MAX_COUNT {
        errors.push((
            def.at_least.span().start,
            format!("`count.at_least` is more than {MAX_COUNT}, the limit"),
        ));
        return None;
    }
    canon.add("count.at_least", Some(at_least));
    canon.add("count.within", within.map(|w| w.num_milliseconds()));
    Some(Count {
        at_least: usize::try_from(at_least).ok()?,
        within: within?,
        devices: Default::default(),
        next_due: None,
    })
}

fn aggregate(
    text: &str,
    def: Placed<AggregateDef>,
    canon: &mut Canon,
    errors: &mut Vec<Found>,
) -> Option<Aggregate> {
    let before = errors.len();
    let def = def.into_inner();
    let every = duration(text, &def.every, "aggregate.every", errors);
    if every.is_some_and(|every| every < TimeDelta::seconds(1)) {
        errors.push((
            def.every.span().start,
            "`aggregate.every` must be at least 1s".into(),
        ));
    }
    let fields = names(&def.fields, "aggregate.fields", errors)
        .into_iter()
        .filter_map(|(name, at)| {
            field(name)
                .map_err(|m| errors.push((at, format!("`aggregate.fields`: field {m}"))))
                .ok()
        })
        .collect::<Vec<_>>();
    let functions = match &def.functions {
        None => Function::ALL.to_vec(),
        Some(list) => names(list, "aggregate.functions", errors)
            .into_iter()
            .filter_map(|(name, at)| {
                let function = Function::from_name(name);
                if function.is_none() {
                    let all: Vec<&str> = Function::ALL.iter().map(|f| f.name()).collect();
                    errors.push((
                        at,
                        format!(
                            "unknown function `{name}` in `aggregate.functions`; the functions \
                             are: {}",
                            all.join(", ")
                        ),
                    ));
                }
                function
            })
            .collect(),
    };
    canon.add("aggregate.every", every.map(|e| e.num_milliseconds()));
    canon.add(
        "aggregate.fields",
        Some(fields.iter().map(|f| &f.name).collect::<Vec<_>>()),
    );
    canon.add(
        "aggregate.functions",
        Some(functions.iter().map(|f| f.name()).collect::<Vec<_>>()),
    );
    if errors.len() != before {
        return None;
    }
    Some(Aggregate {
        every: every?,
        fields,
        functions,
        devices: Default::default(),
        next_due: None,
    })
}

/// The names of a list key: not empty, none twice, at most [`MAX_FIELDS`]; returns
/// the names that are not repeats, with their places.
fn names<'a>(
    list: &'a Spanned<Vec<Spanned<String>>>,
    key: &str,
    errors: &mut Vec<Found>,
) -> Vec<(&'a str, usize)> {
    let items = list.get_ref();
    if items.is_empty() {
        errors.push((list.span().start, format!("`{key}` is empty")));
    }
    if items.len() > MAX_FIELDS {
        errors.push((
            list.span().start,
            format!("`{key}` lists more than {MAX_FIELDS} names, the limit"),
        ));
    }
    let mut seen: Vec<(&str, usize)> = Vec::new();
    for item in items {
        let name = item.get_ref().as_str();
        if seen.iter().any(|(n, _)| *n == name) {
            errors.push((
                item.span().start,
                format!("`{name}` is listed twice in `{key}`"),
            ));
        } else {
            seen.push((name, item.span().start));
        }
    }
    seen
}

fn forward(
    text: &str,
    def: Placed<ForwardDef>,
    header: usize,
    canon: &mut Canon,
    errors: &mut Vec<Found>,
) -> Option<Kind> {
    let at = def.start().unwrap_or(header);
    let table = match def.into_inner() {
        ForwardDef::Bool(false) => {
            canon.add("forward", Some(false));
            return Some(Kind::Drop);
        }
        ForwardDef::Bool(true) => {
            errors.push((
                at,
                "`forward = true` is what happens anyway; leave it out, or write `forward = \
                 false` to drop the readings this rule matches"
                    .into(),
            ));
            return None;
        }
        ForwardDef::Table(table) => table,
    };
    let before = errors.len();
    let deadband = table.deadband.get_ref();
    if deadband.is_empty() {
        errors.push((
            table.deadband.start().unwrap_or(at),
            "`forward.deadband` is empty: name the fields to watch, like { temperature = 0.5 }"
                .into(),
        ));
    }
    if deadband.len() > MAX_FIELDS {
        errors.push((
            table.deadband.start().unwrap_or(at),
            format!("`forward.deadband` lists more than {MAX_FIELDS} fields, the limit"),
        ));
    }
    let mut fields = Vec::new();
    for (name, band) in deadband {
        let path = field(name)
            .map_err(|m| errors.push((band.span().start, format!("`forward.deadband`: field {m}"))))
            .ok();
        let value = *band.get_ref();
        if !(value.is_finite() && value >= 0.0) {
            errors.push((
                band.span().start,
                format!("`forward.deadband`: the band of `{name}` must be a number of at least 0"),
            ));
        }
        fields.extend(path.map(|path| (path, value)));
    }
    let at_least_every = table
        .at_least_every
        .as_ref()
        .and_then(|every| duration(text, every, "forward.at_least_every", errors));
    canon.add(
        "forward.deadband",
        Some(
            fields
                .iter()
                .map(|(f, band)| (&f.name, band.to_bits()))
                .collect::<Vec<_>>(),
        ),
    );
    canon.add(
        "forward.at_least_every",
        at_least_every.map(|d| d.num_milliseconds()),
    );
    if errors.len() != before {
        return None;
    }
    Some(Kind::Deadband(Deadband {
        fields,
        at_least_every,
        devices: Default::default(),
    }))
}

/// Parses a duration written under `key`.
fn duration(
    text: &str,
    value: &Spanned<String>,
    key: &str,
    errors: &mut Vec<Found>,
) -> Option<TimeDelta> {
    match duration::parse(value.get_ref()) {
        Ok(duration) => Some(duration),
        Err((at, message)) => {
            errors.push((
                string_offset(text, value, at),
                format!("`{key}`: {message}"),
            ));
            None
        }
    }
}

/// Checks one glob of `match`, recording a mistake in `errors`.
fn glob(
    text: &str,
    pattern: Option<&Spanned<String>>,
    key: &str,
    errors: &mut Vec<Found>,
) -> Option<Glob> {
    let pattern = pattern?;
    match Glob::new(pattern.get_ref()) {
        Ok(glob) => Some(glob),
        Err((at, message)) => {
            let at = string_offset(text, pattern, at);
            errors.push((at, format!("`{key}`: {message}")));
            None
        }
    }
}

/// A warning for a condition whose work grows with the square of a reading's size or
/// faster: it works on small readings and fails with an evaluation error on large
/// ones, which an installer testing with small readings would not see.
fn costly(condition: &Condition, key: &str) -> Option<String> {
    let cost = condition.cost();
    if cost.degree() < 2 {
        return None;
    }
    let why = if cost.nesting >= 2 {
        "runs a list macro (`all`, `exists`, `exists_one`, `map`, `filter`) inside another"
    } else {
        "does work on a whole field inside a list macro (like `x in list` or `list + [x]` \
         inside `exists`)"
    };
    Some(format!(
        "warning: `{key}` {why}, so its work grows with the square of a reading's size or \
         faster; a reading with large lists gets an evaluation error instead of a result \
         once the work could pass {MAX_EVAL_STEPS} steps"
    ))
}

/// The file offset of byte `at` of the string value `value`; of its opening quote
/// for `None` (a mistake in the value as a whole).
fn string_offset(text: &str, value: &Spanned<String>, at: Option<usize>) -> usize {
    match at {
        Some(at) => StringMap::new(text, value.span(), value.get_ref()).file_offset(at),
        None => value.span().start,
    }
}

/// A rule's definition in a canonical form: every key that changes what the rule
/// does, in a fixed order, values normalized (expressions without layout, durations
/// in milliseconds). Two rules with the same canonical form behave the same.
#[derive(Default)]
struct Canon(Vec<String>);

impl Canon {
    fn add(&mut self, key: &str, value: Option<impl Debug>) {
        if let Some(value) = value {
            self.0.push(format!("{key}={value:?}"));
        }
    }

    /// FNV-1a (64 bits) of the canonical form, in hex: stable across builds and
    /// versions of Rust, so it can be saved.
    fn fingerprint(&self) -> String {
        let mut parts = self.0.clone();
        parts.sort();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in parts.join("\n").bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

/// The rule in one line, for listings.
fn summary(
    kind: &Kind,
    when: Option<&str>,
    clear_when: Option<&str>,
    emit: Option<&Emit>,
    action: Option<&Actuation>,
) -> String {
    let one_line = |text: Option<&str>| {
        text.unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (when, clear_when) = (one_line(when), clear_when.map(|c| one_line(Some(c))));
    let mut text = match kind {
        Kind::Condition(kind) => {
            let mut text = format!("alert while `{when}`");
            if let Some(sustained) = kind.sustained {
                text.push_str(&format!(" for {}", duration::format(sustained)));
            }
            if let Some(clear_when) = clear_when {
                text.push_str(&format!(", until `{clear_when}`"));
            }
            text
        }
        Kind::EveryReading(_) => {
            format!("event on every reading where `{when}`")
        }
        Kind::Rate(rate) => {
            let mut bounds = Vec::new();
            if let Some(above) = rate.above {
                bounds.push(format!("above {above}"));
            }
            if let Some(below) = rate.below {
                bounds.push(format!("below {below}"));
            }
            format!(
                "alert while `{}` changes at a rate {} per {}",
                rate.field.name,
                bounds.join(" or "),
                duration::format(rate.per)
            )
        }
        Kind::Stale(stale) => format!(
            "alert when a device sends no reading for {}",
            duration::format(stale.after)
        ),
        Kind::Count(count) => format!(
            "alert while at least {} readings{} come within {}",
            count.at_least,
            if when.is_empty() {
                String::new()
            } else {
                format!(" where `{when}`")
            },
            duration::format(count.within)
        ),
        Kind::Aggregate(aggregate) => {
            let functions: Vec<&str> = aggregate.functions.iter().map(|f| f.name()).collect();
            let fields: Vec<&str> = aggregate.fields.iter().map(|f| f.name.as_str()).collect();
            format!(
                "{} of {} every {}",
                functions.join("/"),
                fields.join(", "),
                duration::format(aggregate.every)
            )
        }
        Kind::Deadband(deadband) => {
            let bands: Vec<String> = deadband
                .fields
                .iter()
                .map(|(field, band)| format!("{} moves by more than {band}", field.name))
                .collect();
            let mut text = format!("forward only when {}", bands.join(" or "));
            if let Some(every) = deadband.at_least_every {
                text.push_str(&format!(", or every {}", duration::format(every)));
            }
            text
        }
        Kind::Drop if when.is_empty() => "drop readings".to_owned(),
        Kind::Drop => format!("drop readings where `{when}`"),
    };
    let filtered = matches!(
        kind,
        Kind::Rate(_) | Kind::Stale(_) | Kind::Aggregate(_) | Kind::Deadband(_)
    );
    if filtered && !when.is_empty() {
        text.push_str(&format!(" (only readings where `{when}`)"));
    }
    if let Some(emit) = emit {
        text.push_str(&format!("; emits {}", emit.event_type));
    }
    if let Some(publish) = action.and_then(|a| a.publish.as_ref()) {
        text.push_str(&format!("; publishes to {}", publish.topic));
    }
    if let Some(write) = action.and_then(|a| a.write.as_ref()) {
        text.push_str(&format!("; writes to serial port {}", write.port));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(files: &[(&str, &str)], opts: &CheckOptions) -> Result<Vec<Rule>, Vec<Diagnostic>> {
        let files: Vec<SourceFile> = files
            .iter()
            .map(|(name, text)| SourceFile {
                name: (*name).into(),
                text: (*text).into(),
            })
            .collect();
        compile(&files, opts, &crate::expr::new_env()).map(|c| c.rules)
    }

    /// `file:line:col: message` of every diagnostic.
    fn places(result: Result<Vec<Rule>, Vec<Diagnostic>>) -> Vec<String> {
        match result {
            Ok(_) => Vec::new(),
            Err(diagnostics) => diagnostics
                .iter()
                .map(|d| format!("{}:{}:{}: {}", d.file, d.line, d.col, d.message))
                .collect(),
        }
    }

    const GOOD: &str = r#"[[rule]]
id = "r"
when = "t > 1"
emit = { type = "x", to = ["cloud"] }
"#;

    #[test]
    fn a_good_rule_compiles_with_its_settings() {
        let opts = CheckOptions {
            known_sinks: Some(vec!["cloud".into()]),
            ..CheckOptions::default()
        };
        let rules = check(&[("a.toml", GOOD)], &opts);
        let Ok(rules) = rules else {
            panic!("{:?}", places(rules));
        };
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].id, "r");
        assert_eq!(
            rules[0].emit.as_ref().and_then(|e| e.to.clone()),
            Some(vec!["cloud".to_owned()])
        );
    }

    #[test]
    fn every_mistake_in_a_rule_is_reported_not_just_the_first() {
        let text = r#"[[rule]]
id = ""
match = { device = "" }
when = "t >"
emit = { type = "" }
"#;
        assert_eq!(
            places(check(&[("a.toml", text)], &CheckOptions::default())),
            [
                "a.toml:2:6: `id` is empty",
                "a.toml:3:20: `match.device`: empty glob; leave the key out to match everything",
                "a.toml:4:12: syntax error in `when`: mismatched input '<EOF>' expecting {'[', \
                 '{', '(', '.', '-', '!', 'true', 'false', 'null', NUM_FLOAT, NUM_INT, NUM_UINT, \
                 STRING, BYTES, IDENTIFIER}",
                "a.toml:5:17: `emit.type` is empty",
            ]
        );
    }

    #[test]
    fn sinks_are_not_checked_without_a_list_of_known_sinks() {
        let sinks = |rules: Vec<Rule>| -> Vec<Option<Vec<String>>> {
            rules
                .iter()
                .map(|rule| rule.emit.as_ref().and_then(|emit| emit.to.clone()))
                .collect()
        };
        assert_eq!(
            check(&[("a.toml", GOOD)], &CheckOptions::default()).map(sinks),
            Ok(vec![Some(vec!["cloud".to_owned()])])
        );
        let none_known = CheckOptions {
            known_sinks: Some(Vec::new()),
            ..CheckOptions::default()
        };
        assert_eq!(
            places(check(&[("a.toml", GOOD)], &none_known)),
            ["a.toml:4:28: unknown sink `cloud` in `emit.to`; no sinks are configured"]
        );
    }

    #[test]
    fn a_serial_write_must_name_a_configured_port_and_be_one_line() {
        let text = r#"[[rule]]
id = "valve"
when = "level > 90"
action = { serial_write = { port = "pump", line = "OPEN\nALL", clear_line = "CLOSE" } }

[[rule]]
id = "empty"
when = "level > 95"
action = {}
"#;
        let opts = CheckOptions {
            known_serial_ports: Some(vec!["valves".into(), "display".into()]),
            ..CheckOptions::default()
        };
        assert_eq!(
            places(check(&[("a.toml", text)], &opts)),
            [
                "a.toml:4:36: unknown serial port `pump` in `action.serial_write.port`; the \
                 serial sources are: valves, display",
                "a.toml:4:51: `action.serial_write.line` is one line: no line break or NUL (the \
                 port's line ending is added)",
                "a.toml:9:10: `action` needs `mqtt_publish` or `serial_write` (or both)",
            ]
        );
        let fixed = text
            .replace("pump", "valves")
            .replace("OPEN\\nALL", "OPEN")
            .replace(
                "action = {}",
                "action.serial_write = { port = \"display\", line = \"FULL\" }",
            );
        let rules = check(&[("a.toml", &fixed)], &opts);
        let Ok(rules) = rules else {
            panic!("{:?}", places(rules));
        };
        assert!(rules[0].summary.ends_with("; writes to serial port valves"));
    }

    #[test]
    fn a_misspelt_placeholder_is_found_but_json_braces_are_text() {
        assert_eq!(unknown_placeholder("CLOSE {devce}"), Some("devce"));
        assert_eq!(unknown_placeholder("{device} by {rule}"), None);
        assert_eq!(
            unknown_placeholder(r#"{"valve": "{device}", "open": true}"#),
            None
        );
        assert_eq!(unknown_placeholder("{payload.id}"), Some("payload.id"));
        assert_eq!(unknown_placeholder("{ unclosed"), None);
    }

    #[test]
    fn errors_in_two_files_are_reported_together_in_file_order() {
        let broken = "[[rule]\n";
        let dup = GOOD;
        assert_eq!(
            places(check(
                &[("a.toml", GOOD), ("b.toml", broken), ("c.toml", dup)],
                &CheckOptions::default()
            )),
            [
                "b.toml:1:7: invalid table header; expected `.`, `]]`",
                "c.toml:2:6: duplicate rule id `r`; it is first used at a.toml:2:6",
            ]
        );
    }

    #[test]
    fn positions_inside_a_crlf_multi_line_expression_are_exact() {
        let text = "[[rule]]\r\nid = \"r\"\r\nwhen = '''\r\n  a > 1 ||\r\n  b > > 2'''\r\n\
                    emit = { type = \"x\" }\r\n";
        let found = places(check(&[("a.toml", text)], &CheckOptions::default()));
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with("a.toml:5:7: syntax error in `when`: extraneous input '>'"),
            "{found:?}"
        );
    }
}
