//! What both targets do with rules that compiled, and how they judge diagnostics.

use chrono::{DateTime, TimeDelta, Utc};
use ferry_rules::{CheckOptions, Diagnostic, Reading, RuleSet, SourceFile};

/// Replaces libfuzzer-sys's panic hook, which aborts at once, even for a panic
/// that is caught. The CEL library can panic on odd input; the engine catches that
/// and reports it (a diagnostic, or an evaluation error), which is what it is for,
/// so panics inside the CEL crate are silent and not fatal. Any other panic is
/// printed and still fails the run: caught by `RuleSet::compile`, it becomes an
/// "internal error" diagnostic that [`compile`] fails on; escaping the target,
/// libfuzzer-sys aborts on it.
pub fn quiet_cel_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_cel = info
            .location()
            .is_some_and(|l| l.file().contains("/cel-") || l.file().contains("\\cel-"));
        if !in_cel {
            default_hook(info);
        }
    }));
}

/// Readings with every kind of value, including ones a rule may choke on.
fn readings() -> Vec<serde_json::Map<String, serde_json::Value>> {
    let values = [
        serde_json::json!({"temperature": 31, "humidity": 40, "door": "open", "alarm": true,
                           "bp": {"systolic": 150, "diastolic": 80}, "t": 1.5}),
        serde_json::json!({"temperature": -20.5, "zones": [1, 2.5, "x", null], "device": 3}),
        serde_json::json!({"bp": [], "door": {"a": {"b": true}}, "t": "x"}),
        serde_json::json!({}),
        serde_json::json!({"temperature": 1e300, "t": -1e300, "alarm": false}),
    ];
    values
        .into_iter()
        .filter_map(|v| v.as_object().cloned())
        .collect()
}

/// Compiles `text` as one rule file. A compiler panic is a bug even though
/// `RuleSet::compile` turns it into a diagnostic, so it fails the run.
pub fn compile(text: &str) -> Result<RuleSet, Vec<Diagnostic>> {
    let files = [SourceFile {
        name: "fuzz.toml".into(),
        text: text.into(),
    }];
    let result = RuleSet::compile(&files, &CheckOptions::default());
    if let Err(diagnostics) = &result {
        for d in diagnostics {
            assert!(
                !d.message.starts_with("internal error"),
                "the compiler panicked: {d}"
            );
            // Line 0 is a mistake about the file as a whole, shown with no snippet.
            let whole_file = d.line == 0 && d.col == 0 && d.snippet.is_empty();
            assert!(whole_file || (d.line >= 1 && d.col >= 1), "{d}");
            let _ = d.to_string();
        }
    }
    result
}

/// Runs readings (at odd times too), ticks, and a save/restore through the rules.
pub fn exercise(rules: &mut RuleSet) {
    let times = [
        DateTime::<Utc>::UNIX_EPOCH,
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::minutes(7),
        DateTime::<Utc>::MAX_UTC,
        DateTime::<Utc>::MIN_UTC,
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::hours(2),
    ];
    for (i, fields) in readings().iter().enumerate() {
        for device in ["freezer-1", "", "a+#/b"] {
            let _ = rules.evaluate(&Reading {
                source: "local",
                device,
                time: times[i % times.len()],
                fields,
            });
        }
        let _ = rules.tick(times[(i + 1) % times.len()]);
    }
    let saved = rules.alert_state();
    let text = saved.to_string();
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let _ = rules.restore_alert_state(&parsed);
    let _ = rules.describe();
}
