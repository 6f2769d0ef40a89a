//! The rule file format: TOML, one `[[rule]]` table per rule.
//!
//! This module only turns text into these structs, with the position of every value
//! that a later check may need to point at; what the values mean is checked in
//! [`check`](crate::check).

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use toml::Spanned;

/// A whole rule file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleFile {
    /// The `[[rule]]` tables, in file order, each with its place (from its header).
    /// A file without any is valid.
    #[serde(default)]
    pub rule: Vec<Spanned<RuleDef>>,
}

/// One `[[rule]]` table. Which keys may go together is checked in
/// [`check`](crate::check); here every key is optional but `id`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a rule table")]
pub(crate) struct RuleDef {
    /// Names the rule in alerts, logs and metrics; unique across all files.
    pub id: Spanned<String>,
    /// Free text for people reading the file. Declared so that it is accepted and
    /// checked to be a string; the engine never reads it.
    #[serde(default)]
    #[allow(dead_code)]
    pub description: Option<String>,
    /// Which readings the rule looks at; all of them when left out.
    #[serde(rename = "match", default)]
    pub matcher: Option<MatchDef>,
    /// A CEL condition: what fires an alert, or (with `rate`, `stale`, `count`,
    /// `aggregate`, `forward`) which readings the rule looks at.
    #[serde(default)]
    pub when: Option<Spanned<String>>,
    /// Sustained: `when` must hold this long (by reading time) before firing.
    #[serde(rename = "for", default)]
    pub sustained: Option<Spanned<String>>,
    /// Hysteresis: the condition that resolves a firing alert.
    #[serde(default)]
    pub clear_when: Option<Spanned<String>>,
    /// Rate of change of one field between consecutive readings of a device.
    #[serde(default)]
    pub rate: Option<Placed<RateDef>>,
    /// Stale sensor: no (matching) reading from a device for this long.
    #[serde(default)]
    pub stale: Option<Spanned<String>>,
    /// At least N matching readings within a sliding window.
    #[serde(default)]
    pub count: Option<Placed<CountDef>>,
    /// Tumbling-window aggregates per device.
    #[serde(default)]
    pub aggregate: Option<Placed<AggregateDef>>,
    /// Drop readings (`false`) or forward only changes (`{ deadband = {...} }`).
    #[serde(default)]
    pub forward: Option<Placed<ForwardDef>>,
    /// The CloudEvent raised on each transition.
    #[serde(default)]
    pub emit: Option<Placed<EmitDef>>,
    /// A local action run on each transition.
    #[serde(default)]
    pub action: Option<Placed<ActionDef>>,
}

/// `match = { device = "...", source = "..." }`: globs the reading must match. Both
/// are optional; a reading must match every one given.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { device = \"...\", source = \"...\" }"
)]
pub(crate) struct MatchDef {
    /// Glob on the reading's device id.
    #[serde(default)]
    pub device: Option<Spanned<String>>,
    /// Glob on the name of the input the reading came from (`[[source.*]] name`).
    #[serde(default)]
    pub source: Option<Spanned<String>>,
}

/// `emit = { type = "...", severity = "...", to = [...], every_reading = false }`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { type = \"...\", severity = \"...\", to = [...] }"
)]
pub(crate) struct EmitDef {
    /// The CloudEvents `type` of the alert, e.g. `com.acme.freezer.warm`.
    #[serde(rename = "type")]
    pub event_type: Spanned<String>,
    /// Free text carried in the alert (the agent sends it as the `severity` extension).
    #[serde(default)]
    pub severity: Option<Spanned<String>>,
    /// Names of the sinks to send the alert to; when left out, the agent decides.
    #[serde(default)]
    pub to: Option<Spanned<Vec<Spanned<String>>>>,
    /// `true`: one event for every reading `when` is true for (v1's behaviour),
    /// instead of one per transition.
    #[serde(default)]
    pub every_reading: Option<Spanned<bool>>,
}

/// `rate = { field = "temperature", per = "1m", above = 2.0, below = -2.0 }`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { field = \"temperature\", per = \"1m\", above = 2.0 }"
)]
pub(crate) struct RateDef {
    /// The field whose rate of change is watched; `a.b` for a nested one.
    pub field: Spanned<String>,
    /// The time unit of the rate; `1s` when left out.
    #[serde(default)]
    pub per: Option<Spanned<String>>,
    /// Fires while the rate is above this.
    #[serde(default)]
    pub above: Option<Spanned<f64>>,
    /// Fires while the rate is below this.
    #[serde(default)]
    pub below: Option<Spanned<f64>>,
}

/// `count = { at_least = 10, within = "1h" }`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { at_least = 10, within = \"1h\" }"
)]
pub(crate) struct CountDef {
    pub at_least: Spanned<i64>,
    pub within: Spanned<String>,
}

/// `aggregate = { every = "5m", fields = [...], functions = [...] }`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { every = \"5m\", fields = [\"temperature\"] }"
)]
pub(crate) struct AggregateDef {
    pub every: Spanned<String>,
    pub fields: Spanned<Vec<Spanned<String>>>,
    /// All of them when left out.
    #[serde(default)]
    pub functions: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `forward = false` or `forward = { deadband = {...}, at_least_every = "15m" }`.
#[derive(Debug)]
pub(crate) enum ForwardDef {
    Bool(bool),
    Table(ForwardTable),
}

/// The table form of `forward`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { deadband = { temperature = 0.5 } }"
)]
pub(crate) struct ForwardTable {
    /// Field (or `a.b` path) to the change that makes a reading worth forwarding.
    pub deadband: Placed<BTreeMap<String, Spanned<f64>>>,
    /// Forward a reading anyway when none was forwarded for this long.
    #[serde(default)]
    pub at_least_every: Option<Spanned<String>>,
}

impl<'de> Deserialize<'de> for ForwardDef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> Visitor<'de> for Either {
            type Value = ForwardDef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`false`, or a table like { deadband = { temperature = 0.5 } }")
            }
            fn visit_bool<E: de::Error>(self, value: bool) -> Result<ForwardDef, E> {
                Ok(ForwardDef::Bool(value))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ForwardDef, A::Error> {
                ForwardTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(ForwardDef::Table)
            }
        }
        deserializer.deserialize_any(Either)
    }
}

/// `action = { mqtt_publish = {...} }` and/or `action = { serial_write = {...} }`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { mqtt_publish = { topic = \"...\", payload = \"...\" } } \
                 or { serial_write = { port = \"...\", line = \"...\" } }"
)]
pub(crate) struct ActionDef {
    #[serde(default)]
    pub mqtt_publish: Option<Placed<MqttPublishDef>>,
    #[serde(default)]
    pub serial_write: Option<Placed<SerialWriteDef>>,
}

/// `serial_write = { port, line, clear_line }`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { port = \"...\", line = \"...\" }"
)]
pub(crate) struct SerialWriteDef {
    pub port: Spanned<String>,
    pub line: Spanned<String>,
    #[serde(default)]
    pub clear_line: Option<Spanned<String>>,
}

/// `mqtt_publish = { topic, payload, clear_payload, qos, retain }`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a table like { topic = \"...\", payload = \"...\" }"
)]
pub(crate) struct MqttPublishDef {
    pub topic: Spanned<String>,
    pub payload: Spanned<String>,
    #[serde(default)]
    pub clear_payload: Option<Spanned<String>>,
    #[serde(default)]
    pub qos: Option<Spanned<i64>>,
    #[serde(default)]
    pub retain: Option<bool>,
}

/// A value with its place in the file, like [`Spanned`], except that it also
/// accepts a table toml has no place for: one that only exists through dotted keys
/// (`emit.type = "x"`) or a dotted header (`[rule.forward.deadband]`), which
/// `Spanned` refuses. Such a table has `span: None`, and mistakes about it as a whole
/// are reported at the rule.
#[derive(Debug)]
pub(crate) struct Placed<T> {
    pub span: Option<Range<usize>>,
    pub value: T,
}

impl<T> Placed<T> {
    pub(crate) fn get_ref(&self) -> &T {
        &self.value
    }

    pub(crate) fn into_inner(self) -> T {
        self.value
    }

    /// Where the value starts, if toml said.
    pub(crate) fn start(&self) -> Option<usize> {
        self.span.as_ref().map(|span| span.start)
    }
}

/// How toml asks for a span: a struct of this name with these fields (the protocol
/// of `serde_spanned`, which [`Spanned`] speaks; checked by the tests below).
const SPANNED: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Placed<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PlacedVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for PlacedVisitor<T> {
            type Value = Placed<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Placed<T>, A::Error> {
                let first: Option<String> = map.next_key()?;
                if first.as_deref() != Some(SPANNED_START) {
                    // A table without a span: these are its own keys.
                    let value = T::deserialize(de::value::MapAccessDeserializer::new(Replay {
                        first,
                        map,
                    }))?;
                    return Ok(Placed { span: None, value });
                }
                let start: usize = map.next_value()?;
                let _end_key: Option<String> = map.next_key()?;
                let end: usize = map.next_value()?;
                let _value_key: Option<String> = map.next_key()?;
                let value: T = map.next_value()?;
                Ok(Placed {
                    span: Some(start..end),
                    value,
                })
            }
        }
        deserializer.deserialize_struct(
            SPANNED,
            &[SPANNED_START, SPANNED_END, SPANNED_VALUE],
            PlacedVisitor(PhantomData),
        )
    }
}

/// A map whose first key was already read, read from the start again.
struct Replay<A> {
    first: Option<String>,
    map: A,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Replay<A> {
    type Error = A::Error;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        match self.first.take() {
            Some(key) => seed
                .deserialize(de::value::StringDeserializer::<A::Error>::new(key))
                .map(Some),
            None => self.map.next_key_seed(seed),
        }
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// What [`parse`] found in one file.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    /// Every rule that deserialized, with the place of its table.
    pub rules: Vec<Spanned<RuleDef>>,
    /// `(byte offset, message)` for every TOML or schema error found.
    pub errors: Vec<(usize, String)>,
}

/// Just enough structure to find where each `[[rule]]` table is.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Outline {
    #[serde(default)]
    rule: Vec<Spanned<toml::Table>>,
}

/// Parses one rule file.
///
/// TOML syntax errors stop the file at the first one. A schema error (unknown key,
/// missing key, wrong type) in one `[[rule]]` table does not hide the others: each
/// table is then deserialized on its own (see [`isolate`]), so every table with a
/// schema error is reported and every other table is still checked.
pub(crate) fn parse(text: &str) -> Parsed {
    let error = match toml::from_str::<RuleFile>(text) {
        Ok(file) => {
            return Parsed {
                rules: file.rule,
                errors: Vec::new(),
            }
        }
        Err(error) => error,
    };
    let whole = (error.span().map_or(0, |span| span.start), message(&error));
    let Ok(outline) = toml::from_str::<Outline>(text) else {
        // A syntax error, or a wrong top-level key: nothing more can be trusted.
        return Parsed {
            rules: Vec::new(),
            errors: vec![whole],
        };
    };
    let spans: Vec<Range<usize>> = outline.rule.iter().map(Spanned::span).collect();
    let mut parsed = isolate(text, &spans).unwrap_or_default();
    if parsed.errors.is_empty() {
        // Isolation did not reproduce the error (e.g. `rule = [{...}, {...}]` written
        // as an inline array): report it as it is, and check nothing else.
        parsed = Parsed {
            rules: Vec::new(),
            errors: vec![whole],
        };
    }
    parsed
}

/// Deserializes each `[[rule]]` table on its own: for table `i`, every byte of the
/// file outside the text before the first table and outside table `i`'s region (from
/// its header to the next table's header, which takes in `[rule.emit]`-style
/// sub-tables) is blanked to a space, keeping line breaks, so offsets in errors are
/// still offsets into the real file.
///
/// `None` if the tables are not all `[[rule]]` headers (inline arrays can't be
/// blanked out and stay valid TOML).
fn isolate(text: &str, spans: &[Range<usize>]) -> Option<Parsed> {
    let mut starts: Vec<usize> = spans.iter().map(|span| span.start).collect();
    starts.sort_unstable();
    if !starts
        .iter()
        .all(|&start| text.get(start..).is_some_and(|rest| rest.starts_with("[[")))
    {
        return None;
    }
    let prefix_end = starts.first().copied().unwrap_or(text.len());
    let mut parsed = Parsed::default();
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(text.len());
        let masked: String = text
            .char_indices()
            .flat_map(|(at, c)| {
                let keep = at < prefix_end || (start..end).contains(&at) || c == '\n' || c == '\r';
                let (c, n) = if keep { (c, 1) } else { (' ', c.len_utf8()) };
                std::iter::repeat_n(c, n)
            })
            .collect();
        match toml::from_str::<RuleFile>(&masked) {
            Ok(file) => parsed.rules.extend(file.rule),
            Err(error) => {
                let at = error.span().map_or(start, |span| span.start);
                if (start..end).contains(&at) {
                    parsed.errors.push((at, message(&error)));
                }
            }
        }
    }
    Some(parsed)
}

/// Whether `text` is meant as a rule file: some line starts a `[[rule]]` table (even
/// with a broken header, or as `[[rules]]`) or sets `rule` (an inline array). Not
/// `[rule`: an INI file's `[rules]` section would pass for one. A file that is not (a config file, a key,
/// `/etc/shadow` behind a symlink) and does not parse is reported as a whole,
/// never quoted: its lines may be secrets, and a complaint about its third line
/// helps no one.
pub(crate) fn looks_like_rules(text: &str) -> bool {
    text.lines().any(|line| {
        let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
        ["[[rule", "rule="]
            .iter()
            .any(|start| compact.starts_with(start))
    })
}

/// Why `text`, which does not look like rule file, is not one, in words that quote
/// nothing from it.
pub(crate) fn not_rules(text: &str) -> &'static str {
    if text.parse::<toml::Table>().is_err() {
        "it is not TOML"
    } else {
        "it has no `[[rule]]` table"
    }
}

/// The error's message on one line (toml puts what it expected on a second line).
fn message(error: &toml::de::Error) -> String {
    error.message().trim().replace('\n', "; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(line, col, message)` of every error, for readable assertions.
    fn errors(text: &str) -> Vec<(usize, usize, String)> {
        parse(text)
            .errors
            .into_iter()
            .map(|(at, message)| {
                let d = crate::Diagnostic::at("f", text, at, message);
                (d.line, d.col, d.message)
            })
            .collect()
    }

    const GOOD: &str = r#"
[[rule]]
id = "a"
description = "first"
match = { device = "fz-*", source = "local" }
when = "t > 1"
emit = { type = "x.y", severity = "critical", to = ["cloud"] }

[[rule]]
id = "b"
when = '''
t > 2'''
[rule.emit]
type = "x.z"
"#;

    #[test]
    fn a_good_file_gives_every_rule_with_spans() {
        let parsed = parse(GOOD);
        assert!(parsed.errors.is_empty());
        assert_eq!(parsed.rules.len(), 2);
        assert_eq!(&GOOD[parsed.rules[0].span()][..8], "[[rule]]");
        let a = parsed.rules[0].get_ref();
        assert_eq!(a.id.get_ref(), "a");
        assert_eq!(&GOOD[a.id.span()], "\"a\"");
        assert_eq!(a.when.as_ref().map(|w| &GOOD[w.span()]), Some("\"t > 1\""));
        assert_eq!(a.description.as_deref(), Some("first"));
        let b = parsed.rules[1].get_ref();
        assert_eq!(
            b.emit
                .as_ref()
                .map(|e| e.get_ref().event_type.get_ref().as_str()),
            Some("x.z")
        );
        assert_eq!(b.when.as_ref().map(|w| w.get_ref().as_str()), Some("t > 2"));
    }

    #[test]
    fn a_file_is_taken_for_a_rule_file_by_a_rule_header_or_a_rule_key_only() {
        for rules in [
            "[[rule]]\nid = \"a\"",
            "# x\n  [[ rule ]]\n",
            "[[rule]\nid = \"a\"",
            "[[rules]]\n",
            "rule = [{ id = \"a\" }]",
        ] {
            assert!(looks_like_rules(rules), "{rules}");
        }
        for other in [
            "",
            "root:SECRET:19000:0:99999:7:::\n",
            "[mqtt]\npassword = \"hunter2\"\n",
            "[rules]\nallow = all\n",
            "# [[rule]] in a comment\n",
        ] {
            assert!(!looks_like_rules(other), "{other}");
        }
        assert_eq!(not_rules("root:SECRET:19000\n"), "it is not TOML");
        assert_eq!(
            not_rules("[mqtt]\npassword = \"x\"\n"),
            "it has no `[[rule]]` table"
        );
    }

    #[test]
    fn an_empty_file_has_no_rules() {
        let parsed = parse("# nothing yet\n");
        assert!(parsed.errors.is_empty() && parsed.rules.is_empty());
    }

    #[test]
    fn a_syntax_error_is_reported_where_it_is() {
        let text = "[[rule]]\nid = \"a\nwhen = \"t\"\n";
        assert_eq!(errors(text), [(2, 8, "invalid basic string".into())]);
    }

    #[test]
    fn an_unknown_top_level_key_is_reported() {
        let text = "[[rules]]\nid = \"a\"\n";
        assert_eq!(
            errors(text),
            [(1, 3, "unknown field `rules`, expected `rule`".into())]
        );
    }

    #[test]
    fn a_schema_error_in_one_rule_does_not_hide_those_in_the_others() {
        let text = r#"[[rule]]
id = "a"
when = "t > 1"
emit = { type = "x" }
colour = "red"

[[rule]]
id = "b"
when = "t > 1"
rate = { field = "t", above = "2" }

[[rule]]
id = "c"
when = "t > 1"
emit = { type = "x" }

[[rule]]
id = 4
when = "t > 1"
[rule.emit]
type = "x"
sevrity = "low"
"#;
        assert_eq!(
            errors(text),
            [
                (
                    5,
                    1,
                    "unknown field `colour`, expected one of `id`, `description`, `match`, \
                     `when`, `for`, `clear_when`, `rate`, `stale`, `count`, `aggregate`, \
                     `forward`, `emit`, `action`"
                        .into()
                ),
                (10, 31, "invalid type: string \"2\", expected f64".into()),
                (18, 6, "invalid type: integer `4`, expected a string".into()),
            ]
        );
        // The good rule is still there to be checked.
        let parsed = parse(text);
        let ids: Vec<&str> = parsed
            .rules
            .iter()
            .map(|r| r.get_ref().id.get_ref().as_str())
            .collect();
        assert_eq!(ids, ["c"]);
    }

    #[test]
    fn a_placed_table_has_its_span_when_toml_knows_it_and_none_when_it_is_implicit() {
        let text = "[[rule]]\nid = \"a\"\nemit = { type = \"x\" }\n\n\
                    [[rule]]\nid = \"b\"\nemit.type = \"y\"\n\
                    [rule.action.mqtt_publish]\ntopic = \"t\"\npayload = \"p\"\n";
        let parsed = parse(text);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let a = parsed.rules[0].get_ref();
        let emit = a.emit.as_ref().and_then(|e| e.span.clone());
        assert_eq!(emit.map(|span| &text[span]), Some("{ type = \"x\" }"));
        let b = parsed.rules[1].get_ref();
        let emit = b
            .emit
            .as_ref()
            .map(|e| (e.span.clone(), e.get_ref().event_type.get_ref()));
        assert_eq!(emit, Some((None, &"y".to_owned())));
        let publish = b
            .action
            .as_ref()
            .and_then(|a| a.get_ref().mqtt_publish.as_ref());
        assert_eq!(
            publish.map(|p| (p.span.is_some(), p.get_ref().topic.get_ref().as_str())),
            Some((true, "t"))
        );
    }

    #[test]
    fn forward_is_either_false_or_a_deadband_table() {
        let text = r#"[[rule]]
id = "a"
forward = false

[[rule]]
id = "b"
forward = { deadband = { temperature = 0.5, "bp.systolic" = 2 }, at_least_every = "15m" }

[[rule]]
id = "c"
forward = "no"

[[rule]]
id = "d"
forward = { deadband = { t = 1 }, every = "1m" }
"#;
        let parsed = parse(text);
        assert!(matches!(
            parsed.rules[0]
                .get_ref()
                .forward
                .as_ref()
                .map(|f| f.get_ref()),
            Some(ForwardDef::Bool(false))
        ));
        let Some(ForwardDef::Table(table)) = parsed.rules[1]
            .get_ref()
            .forward
            .as_ref()
            .map(|f| f.get_ref())
        else {
            panic!("no deadband table");
        };
        let bands: Vec<(&str, f64)> = table
            .deadband
            .get_ref()
            .iter()
            .map(|(k, v)| (k.as_str(), *v.get_ref()))
            .collect();
        assert_eq!(bands, [("bp.systolic", 2.0), ("temperature", 0.5)]);
        assert_eq!(
            errors(text),
            [
                (
                    11,
                    11,
                    "invalid type: string \"no\", expected `false`, or a table like \
                     { deadband = { temperature = 0.5 } }"
                        .into()
                ),
                (
                    15,
                    35,
                    "unknown field `every`, expected `deadband` or `at_least_every`".into()
                ),
            ]
        );
    }

    #[test]
    fn isolating_keeps_offsets_of_multibyte_text() {
        let text = "# températures\n[[rule]]\nid = \"é\"\nwhen = \"t\"\nemit = {}\n";
        assert_eq!(errors(text), [(5, 8, "missing field `type`".into())]);
    }

    #[test]
    fn an_inline_array_of_rules_reports_its_first_error() {
        let text = "rule = [{ id = \"a\", when = 1 }, { id = 1 }]\n";
        assert_eq!(
            errors(text),
            [(1, 28, "invalid type: integer `1`, expected a string".into())]
        );
    }
}
