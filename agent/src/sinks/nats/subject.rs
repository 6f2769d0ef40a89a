//! Subject templates: `ferry.{agent}.{type}.{subject}` made into one NATS subject
//! per event (pure).
//!
//! A NATS subject is a list of `.`-separated tokens; `*` and `>` are wildcards and
//! whitespace ends it. The template alone decides the tokens: it is checked when the
//! config is read (no empty token, no wildcard, no whitespace, no `$` system
//! prefix), and every value put into it is sanitised so it stays inside its token:
//! ASCII letters, digits, `-` and `_` are kept, every other character (`.`, `*`,
//! `>`, spaces, `/`, non-ASCII, ...) becomes `_`, and an empty value becomes `_`.
//! So a device called `a.b` or `>` can neither add a token nor turn a subject into
//! a wildcard; the price is that `a.b` and `a_b` share a subject (the event's own
//! `subject` attribute still tells them apart).

use std::fmt;

/// The placeholders a template may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The agent's id (`[agent] id`).
    Agent,
    /// The kind of source the event came from: the second-to-last segment of its
    /// `source` (`/ferry/gw-1/mqtt/local` gives `mqtt`; an alert's
    /// `/ferry/rules/NAME` gives `rules`).
    SourceKind,
    /// The name of that source: the last segment of `source` (`local`).
    SourceName,
    /// The event's `subject`: the device id.
    Subject,
    /// The event's `type` (`io.ferry.reading` becomes `io_ferry_reading`).
    Type,
}

impl Field {
    const ALL: [(&'static str, Field); 5] = [
        ("agent", Field::Agent),
        ("source_kind", Field::SourceKind),
        ("source_name", Field::SourceName),
        ("subject", Field::Subject),
        ("type", Field::Type),
    ];
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(Field),
}

/// A checked subject template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    parts: Vec<Part>,
}

/// Why a template is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("the subject template is empty")]
    Empty,
    #[error("the subject template is {0} bytes long; at most 256")]
    TooLong(usize),
    #[error("unknown placeholder {{{0}}}: use {{agent}}, {{source_kind}}, {{source_name}}, {{subject}} or {{type}}")]
    Unknown(String),
    #[error("a {{ without its }}")]
    Unclosed,
    #[error("a }} without its {{")]
    Unopened,
    #[error(
        "{0:?} is a NATS wildcard: a sink publishes to one subject per event, so it cannot use one"
    )]
    Wildcard(char),
    #[error("whitespace cannot be part of a NATS subject")]
    Whitespace,
    #[error("empty token: a subject cannot start or end with `.` or have `..`")]
    EmptyToken,
    #[error("subjects starting with `$` are reserved for the server's own APIs")]
    System,
}

/// What one event contributes to its subject.
#[derive(Debug, Clone, Copy)]
pub struct Values<'a> {
    pub agent: &'a str,
    pub source: &'a str,
    pub subject: &'a str,
    pub ty: &'a str,
}

impl SubjectTemplate {
    /// Parses and checks a template.
    pub fn parse(text: &str) -> Result<SubjectTemplate, TemplateError> {
        if text.is_empty() {
            return Err(TemplateError::Empty);
        }
        if text.len() > 256 {
            return Err(TemplateError::TooLong(text.len()));
        }
        if text.starts_with('$') {
            return Err(TemplateError::System);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            match c {
                '{' => {
                    let end = rest.find('}').ok_or(TemplateError::Unclosed)?;
                    let name = &rest[1..end];
                    let field = Field::ALL
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, f)| *f)
                        .ok_or_else(|| TemplateError::Unknown(name.to_string()))?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(field));
                    rest = &rest[end + 1..];
                    continue;
                }
                '}' => return Err(TemplateError::Unopened),
                '*' | '>' => return Err(TemplateError::Wildcard(c)),
                c if c.is_whitespace() || c.is_control() => return Err(TemplateError::Whitespace),
                c => literal.push(c),
            }
            rest = &rest[c.len_utf8()..];
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        let template = SubjectTemplate { parts };
        // Every placeholder renders to at least one character, so a token is empty
        // only if the literals alone leave it empty.
        if template.shape().split('.').any(str::is_empty) {
            return Err(TemplateError::EmptyToken);
        }
        Ok(template)
    }

    /// A subject filter capturing every subject the template can make: its leading
    /// all-literal tokens followed by `>` (`ferry.{agent}.{subject}` gives
    /// `ferry.>`), for the hint to create a stream.
    pub fn capture_all(&self) -> String {
        let mut literal = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => literal.push_str(s),
                Part::Field(_) => break,
            }
        }
        let complete = self.parts.iter().all(|p| matches!(p, Part::Literal(_)));
        if complete {
            return literal;
        }
        // Only whole tokens: drop a token the first placeholder shares.
        match literal.rfind('.') {
            Some(dot) => format!("{}.>", &literal[..dot]),
            None => ">".to_string(),
        }
    }

    /// The template with every placeholder as `x`: its token structure.
    fn shape(&self) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.as_str(),
                Part::Field(_) => "x",
            })
            .collect()
    }

    /// The subject for one event: placeholders replaced by sanitised values.
    pub fn render(&self, v: &Values<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Field(f) => {
                    let value = match f {
                        Field::Agent => v.agent,
                        Field::SourceKind => source_segment(v.source, 1),
                        Field::SourceName => source_segment(v.source, 0),
                        Field::Subject => v.subject,
                        Field::Type => v.ty,
                    };
                    push_sanitised(&mut out, value);
                }
            }
        }
        out
    }
}

impl fmt::Display for SubjectTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Literal(s) => f.write_str(s)?,
                Part::Field(field) => {
                    let name = Field::ALL
                        .iter()
                        .find(|(_, x)| x == field)
                        .map_or("?", |(n, _)| n);
                    write!(f, "{{{name}}}")?;
                }
            }
        }
        Ok(())
    }
}

/// The `n`th `/`-separated segment of `source` counted from the end (0 = last),
/// ignoring empty ones; "" when there are not that many.
fn source_segment(source: &str, n: usize) -> &str {
    source
        .rsplit('/')
        .filter(|s| !s.is_empty())
        .nth(n)
        .unwrap_or("")
}

/// Appends `value` with every character outside `[A-Za-z0-9_-]` as `_`; an empty
/// value as `_`.
fn push_sanitised(out: &mut String, value: &str) {
    if value.is_empty() {
        out.push('_');
        return;
    }
    out.extend(value.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            c
        } else {
            '_'
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<'a>(subject: &'a str) -> Values<'a> {
        Values {
            agent: "gw-1",
            source: "/ferry/gw-1/mqtt/local",
            subject,
            ty: "io.ferry.reading",
        }
    }

    #[test]
    fn every_placeholder_is_replaced_by_its_value_with_dots_made_underscores() {
        let t =
            SubjectTemplate::parse("ferry.{agent}.{source_kind}.{source_name}.{type}.{subject}")
                .unwrap();
        assert_eq!(
            t.render(&values("freezer-1")),
            "ferry.gw-1.mqtt.local.io_ferry_reading.freezer-1"
        );
    }

    #[test]
    fn a_device_id_cannot_add_tokens_or_become_a_wildcard() {
        let t = SubjectTemplate::parse("ferry.{subject}.data").unwrap();
        for (device, want) in [
            ("a.b", "ferry.a_b.data"),
            (">", "ferry._.data"),
            ("*", "ferry._.data"),
            ("two words", "ferry.two_words.data"),
            ("", "ferry._.data"),
            ("kühl\r\n", "ferry.k_hl__.data"),
            ("$SYS", "ferry._SYS.data"),
        ] {
            assert_eq!(t.render(&values(device)), want, "device {device:?}");
        }
    }

    #[test]
    fn placeholders_may_share_a_token_with_literal_text() {
        let t = SubjectTemplate::parse("site-{agent}.{source_name}_{subject}").unwrap();
        assert_eq!(t.render(&values("f1")), "site-gw-1.local_f1");
        assert_eq!(t.to_string(), "site-{agent}.{source_name}_{subject}");
    }

    #[test]
    fn an_alert_source_gives_rules_as_its_kind_and_the_rule_source_as_its_name() {
        let t = SubjectTemplate::parse("{source_kind}.{source_name}").unwrap();
        let v = Values {
            source: "/ferry/rules/freezer",
            ..values("f")
        };
        assert_eq!(t.render(&v), "rules.freezer");
        let odd = Values {
            source: "urn:x",
            ..values("f")
        };
        assert_eq!(t.render(&odd), "_.urn_x");
    }

    #[test]
    fn the_stream_hint_captures_every_subject_the_template_can_make() {
        for (text, want) in [
            ("ferry.{agent}.{subject}", "ferry.>"),
            ("site.a.pre-{agent}.x", "site.a.>"),
            ("{agent}.x", ">"),
            ("ferry.fixed", "ferry.fixed"),
        ] {
            assert_eq!(SubjectTemplate::parse(text).unwrap().capture_all(), want);
        }
    }

    #[test]
    fn templates_with_wildcards_empty_tokens_whitespace_or_unknown_names_are_refused() {
        for (text, err) in [
            ("", TemplateError::Empty),
            ("ferry.*", TemplateError::Wildcard('*')),
            ("ferry.>", TemplateError::Wildcard('>')),
            ("ferry..{subject}", TemplateError::EmptyToken),
            (".ferry", TemplateError::EmptyToken),
            ("ferry.", TemplateError::EmptyToken),
            ("ferry {subject}", TemplateError::Whitespace),
            ("ferry.{device}", TemplateError::Unknown("device".into())),
            ("ferry.{subject", TemplateError::Unclosed),
            ("ferry.subject}", TemplateError::Unopened),
            ("$JS.API.x", TemplateError::System),
        ] {
            assert_eq!(SubjectTemplate::parse(text), Err(err), "template {text:?}");
        }
        assert_eq!(
            SubjectTemplate::parse(&"a".repeat(300)),
            Err(TemplateError::TooLong(300))
        );
    }
}
