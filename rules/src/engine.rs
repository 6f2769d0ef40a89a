//! [`RuleSet`]: the compiled rules, and running readings through them.

use crate::check::{self, CheckOptions, SourceFile};
use crate::diagnostic::Diagnostic;
use crate::expr::{self, Bindings, COMPILE_STACK_SIZE};
use crate::rule::Rule;
use cel::Env;
use chrono::{DateTime, Utc};
use std::fmt;
use std::sync::Arc;

/// Every rule of every rule file, compiled and checked, with the state rules keep
/// between readings.
///
/// Build one with [`RuleSet::compile`]; swap it for a new one when the files change
/// (a failed compile leaves the running set alone, so a bad edit never stops the
/// rules that work).
pub struct RuleSet {
    /// The CEL standard library, shared by every condition.
    env: Arc<Env>,
    /// In file order, then in order within each file; evaluated in this order.
    rules: Vec<Rule>,
}

/// One reading, as the agent decoded it.
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    /// Name of the input the reading came from (`[[source.*]] name`).
    pub source: &'a str,
    /// The device id.
    pub device: &'a str,
    /// When the reading was taken (or received, if the device did not say).
    pub time: DateTime<Utc>,
    /// The reading's values; each top-level key is a variable in `when` expressions.
    pub fields: &'a serde_json::Map<String, serde_json::Value>,
}

/// What to do with one reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Whether to forward the reading itself. Always `true` in this version; rules
    /// that drop or thin out readings come later.
    pub forward: bool,
    /// One alert per rule that fired, in rule order.
    pub alerts: Vec<Alert>,
    /// One error per rule whose condition could not be evaluated on this reading; the
    /// other rules still ran.
    pub errors: Vec<EvalError>,
}

/// An alert raised by a rule.
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
    /// `{"rule": <id>, "device": <device id>, "values": <the reading's fields>}`.
    pub data: serde_json::Value,
}

/// A rule's condition could not be evaluated on a reading: a field it uses is
/// missing or of the wrong type, or the condition did not give a bool.
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

impl RuleSet {
    /// A rule set with no rules: every reading is forwarded, nothing else happens.
    pub fn empty() -> Self {
        RuleSet {
            env: expr::new_env(),
            rules: Vec::new(),
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
        let rules = std::thread::scope(|scope| {
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
        Ok(RuleSet { env, rules })
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

    /// Runs one reading through every rule whose `match` it satisfies, in order.
    ///
    /// Never panics and never fails as a whole: a rule that cannot be evaluated on
    /// this reading adds an [`EvalError`] and the others still run.
    pub fn evaluate(&mut self, reading: &Reading<'_>) -> Outcome {
        let mut outcome = Outcome {
            forward: true,
            alerts: Vec::new(),
            errors: Vec::new(),
        };
        // Built on first use: readings no rule matches cost no conversion.
        let mut bindings: Option<Bindings<'_>> = None;
        for rule in &mut self.rules {
            if !rule.matcher.matches(reading) {
                continue;
            }
            let bindings = bindings.get_or_insert_with(|| Bindings::new(&self.env, reading));
            match rule.evaluate(bindings, reading) {
                Ok(Some(alert)) => outcome.alerts.push(alert),
                Ok(None) => {}
                Err(error) => outcome.errors.push(error),
            }
        }
        outcome
    }
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
                errors: vec![]
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
                    "values": {"temperature": -14.5},
                }),
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
}
