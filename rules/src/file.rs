//! The rule file format: TOML, one `[[rule]]` table per rule.
//!
//! This module only turns text into these structs, with the position of every value
//! that a later check may need to point at; what the values mean is checked in
//! [`check`](crate::check).

use serde::Deserialize;
use std::ops::Range;
use toml::Spanned;

/// A whole rule file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleFile {
    /// The `[[rule]]` tables, in file order. A file without any is valid.
    #[serde(default)]
    pub rule: Vec<RuleDef>,
}

/// One `[[rule]]` table.
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
    /// The CEL condition; the rule fires for every reading it is true for.
    pub when: Spanned<String>,
    /// The alert raised when the rule fires.
    pub emit: EmitDef,
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

/// `emit = { type = "...", severity = "...", to = [...] }`.
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
}

/// What [`parse`] found in one file.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    /// Every rule that deserialized.
    pub rules: Vec<RuleDef>,
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
        let a = &parsed.rules[0];
        assert_eq!(a.id.get_ref(), "a");
        assert_eq!(&GOOD[a.id.span()], "\"a\"");
        assert_eq!(&GOOD[a.when.span()], "\"t > 1\"");
        assert_eq!(a.description.as_deref(), Some("first"));
        let b = &parsed.rules[1];
        assert_eq!(b.emit.event_type.get_ref(), "x.z");
        assert_eq!(b.when.get_ref(), "t > 2");
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
                     `when`, `emit`"
                        .into()
                ),
                (7, 1, "missing field `emit`".into()),
                (17, 6, "invalid type: integer `4`, expected a string".into()),
            ]
        );
        // The good rule is still there to be checked.
        let parsed = parse(text);
        let ids: Vec<&str> = parsed
            .rules
            .iter()
            .map(|r| r.id.get_ref().as_str())
            .collect();
        assert_eq!(ids, ["c"]);
    }

    #[test]
    fn isolating_keeps_offsets_of_multibyte_text() {
        let text = "# températures\n[[rule]]\nid = \"é\"\nwhen = \"t\"\nemit = {}\n";
        assert_eq!(errors(text), [(5, 8, "missing field `type`".into())]);
    }

    #[test]
    fn an_inline_array_of_rules_reports_its_first_error() {
        let text = "rule = [{ id = \"a\", when = \"t\" }, { id = 1 }]\n";
        assert_eq!(errors(text), [(1, 9, "missing field `emit`".into())]);
    }
}
