//! One checked rule: which readings it looks at, when it fires, what it emits.
//!
//! A rule is split the way later versions grow: [`Matcher`] picks readings,
//! [`Trigger`] decides whether to fire (and will own the per-rule state that
//! sustained `for`, `clear_when` hysteresis, deadbands, rates and windows need), and
//! [`Emit`] shapes the alert.

use crate::engine::{Alert, EvalError, Reading};
use crate::expr::{Bindings, Condition};
use crate::glob::Glob;

/// A rule ready to evaluate.
#[derive(Debug)]
pub(crate) struct Rule {
    /// Unique across the rule set.
    pub id: String,
    pub matcher: Matcher,
    pub trigger: Trigger,
    pub emit: Emit,
}

impl Rule {
    /// Runs one reading through the rule: `Ok(None)` if it does not apply or does not
    /// fire, `Ok(Some(alert))` if it fires.
    pub(crate) fn evaluate(
        &mut self,
        bindings: &Bindings<'_>,
        reading: &Reading<'_>,
    ) -> Result<Option<Alert>, EvalError> {
        match self.trigger.evaluate(bindings) {
            Ok(true) => Ok(Some(self.emit.alert(&self.id, reading))),
            Ok(false) => Ok(None),
            Err(message) => Err(EvalError {
                rule: self.id.clone(),
                message,
            }),
        }
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

/// When a rule fires. In v1, for every reading its `when` condition is true for.
#[derive(Debug)]
pub(crate) struct Trigger {
    pub when: Condition,
}

impl Trigger {
    /// `&mut self`: triggers with memory (sustained, windows) update it here.
    fn evaluate(&mut self, bindings: &Bindings<'_>) -> Result<bool, String> {
        self.when.evaluate(bindings)
    }
}

/// `emit`: the alert a firing rule raises.
#[derive(Debug)]
pub(crate) struct Emit {
    pub event_type: String,
    pub severity: Option<String>,
    pub to: Option<Vec<String>>,
}

impl Emit {
    /// The alert for `reading`; `data` is `{"rule", "device", "values"}`.
    fn alert(&self, rule: &str, reading: &Reading<'_>) -> Alert {
        Alert {
            rule: rule.to_owned(),
            event_type: self.event_type.clone(),
            severity: self.severity.clone(),
            to: self.to.clone(),
            data: serde_json::json!({
                "rule": rule,
                "device": reading.device,
                "values": reading.fields,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn reading<'a>(
        device: &'a str,
        source: &'a str,
        fields: &'a serde_json::Map<String, serde_json::Value>,
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
        let fields = serde_json::Map::new();
        assert!(Matcher::default().matches(&reading("any", "thing", &fields)));
    }

    #[test]
    fn a_reading_must_match_every_glob_given() {
        let fields = serde_json::Map::new();
        let matcher = Matcher {
            device: glob("fz-*"),
            source: glob("serial-?"),
        };
        assert!(matcher.matches(&reading("fz-1", "serial-1", &fields)));
        assert!(!matcher.matches(&reading("fz-1", "local", &fields)));
        assert!(!matcher.matches(&reading("fridge-1", "serial-1", &fields)));
    }

    #[test]
    fn an_alert_carries_the_emit_settings_and_the_documented_data() {
        let emit = Emit {
            event_type: "com.acme.x".into(),
            severity: Some("low".into()),
            to: None,
        };
        let fields = serde_json::json!({"t": 1, "nested": {"a": [true]}});
        let fields = fields.as_object().cloned().unwrap_or_default();
        let alert = emit.alert("r1", &reading("dev-9", "local", &fields));
        assert_eq!(alert.rule, "r1");
        assert_eq!(alert.event_type, "com.acme.x");
        assert_eq!(alert.severity.as_deref(), Some("low"));
        assert_eq!(alert.to, None);
        assert_eq!(
            alert.data,
            serde_json::json!({
                "rule": "r1",
                "device": "dev-9",
                "values": {"t": 1, "nested": {"a": [true]}},
            })
        );
    }
}
