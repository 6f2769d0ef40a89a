//! Turning rule files into [`Rule`]s, reporting every mistake in every file.

use crate::diagnostic::Diagnostic;
use crate::expr::Condition;
use crate::file::{self, RuleDef};
use crate::glob::Glob;
use crate::rule::{Emit, Matcher, Rule, Trigger};
use crate::toml_string::StringMap;
use cel::Env;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use toml::Spanned;

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
}

/// Checks and compiles every rule of every file. Needs a big stack (it compiles CEL).
pub(crate) fn compile(
    files: &[SourceFile],
    opts: &CheckOptions,
    env: &Env,
) -> Result<Vec<Rule>, Vec<Diagnostic>> {
    let mut checker = Checker {
        opts,
        env,
        ids: HashMap::new(),
    };
    let mut rules = Vec::new();
    let mut diagnostics = Vec::new();
    for source in files {
        let parsed = file::parse(&source.text);
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
    }
    if diagnostics.is_empty() {
        Ok(rules)
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
}

/// `(byte offset into the file, message)`.
type Found = (usize, String);

impl Checker<'_> {
    /// Checks one rule; `Err` has every mistake in it.
    fn rule(&mut self, source: &SourceFile, def: RuleDef) -> Result<Rule, Vec<Found>> {
        let text = source.text.as_str();
        let mut errors: Vec<Found> = Vec::new();

        let id = def.id.get_ref();
        if id.trim().is_empty() {
            errors.push((def.id.span().start, "`id` is empty".into()));
        } else {
            match self.ids.entry(id.clone()) {
                Entry::Occupied(first) => errors.push((
                    def.id.span().start,
                    format!(
                        "duplicate rule id `{id}`; it is first used at {}",
                        first.get()
                    ),
                )),
                Entry::Vacant(slot) => {
                    let here = Diagnostic::at(&source.name, text, def.id.span().start, "");
                    slot.insert(format!("{}:{}:{}", here.file, here.line, here.col));
                }
            }
        }

        let mut matcher = Matcher::default();
        if let Some(def) = &def.matcher {
            matcher.device = glob(text, def.device.as_ref(), "match.device", &mut errors);
            matcher.source = glob(text, def.source.as_ref(), "match.source", &mut errors);
        }

        let when = match Condition::compile(self.env, def.when.get_ref()) {
            Ok(condition) => Some(condition),
            Err(error) => {
                let at = string_offset(text, &def.when, error.offset);
                errors.push((at, error.message));
                None
            }
        };

        let emit = &def.emit;
        if emit.event_type.get_ref().trim().is_empty() {
            errors.push((emit.event_type.span().start, "`emit.type` is empty".into()));
        }
        if let Some(severity) = &emit.severity {
            if severity.get_ref().trim().is_empty() {
                errors.push((
                    severity.span().start,
                    "`emit.severity` is empty; leave it out for none".into(),
                ));
            }
        }
        if let Some(to) = &emit.to {
            self.sinks(to, &mut errors);
        }

        match when {
            Some(when) if errors.is_empty() => Ok(Rule {
                id: def.id.into_inner(),
                matcher,
                trigger: Trigger { when },
                emit: Emit {
                    event_type: def.emit.event_type.into_inner(),
                    severity: def.emit.severity.map(Spanned::into_inner),
                    to: def.emit.to.map(|to| {
                        to.into_inner()
                            .into_iter()
                            .map(Spanned::into_inner)
                            .collect()
                    }),
                },
            }),
            _ => Err(errors),
        }
    }

    /// Checks `emit.to`: not empty, no name twice, every name a known sink.
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

/// The file offset of byte `at` of the string value `value`; of its opening quote
/// for `None` (a mistake in the value as a whole).
fn string_offset(text: &str, value: &Spanned<String>, at: Option<usize>) -> usize {
    match at {
        Some(at) => StringMap::new(text, value.span(), value.get_ref()).file_offset(at),
        None => value.span().start,
    }
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
        compile(&files, opts, &crate::expr::new_env())
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
        };
        let rules = check(&[("a.toml", GOOD)], &opts);
        let Ok(rules) = rules else {
            panic!("{:?}", places(rules));
        };
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].id, "r");
        assert_eq!(rules[0].emit.to, Some(vec!["cloud".to_owned()]));
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
        assert!(check(&[("a.toml", GOOD)], &CheckOptions::default()).is_ok());
        let none_known = CheckOptions {
            known_sinks: Some(Vec::new()),
        };
        assert_eq!(
            places(check(&[("a.toml", GOOD)], &none_known)),
            ["a.toml:4:28: unknown sink `cloud` in `emit.to`; no sinks are configured"]
        );
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
