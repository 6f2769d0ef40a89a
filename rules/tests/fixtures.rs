//! Data-driven tests: every directory under `tests/fixtures/` is one case.
//!
//! - `eval/<case>/`: `rules.toml` (and any other `*.toml`), `readings.jsonl` and
//!   `expected.jsonl`. Each line of `readings.jsonl` is one step:
//!   - a reading: `{"time", "device", "source", "fields"}` (`time` RFC 3339, default
//!     the Unix epoch; `device` default `dev`; `source` default `local`);
//!   - `{"tick": "<time>"}`: [`RuleSet::tick`] at that time;
//!   - `{"restart": true}`: save [`RuleSet::alert_state`], compile the same files
//!     afresh and restore it, as the agent does across a restart;
//!   - `{"reload": "<dir>"}`: compile the `*.toml` files of that subdirectory of the
//!     case and [`RuleSet::adopt_state`] from the running set, as on a hot reload.
//!
//!   Each line of `expected.jsonl` is what one step gave:
//!   `{"forward", "alerts": [...], "actions": [...], "errors": [...]}`. An alert has
//!   `rule`, `type`, `transition`, `device`, `source`, `time`, `severity`, `to`, and
//!   `data` if the expected alert has it (all of them when the file is first
//!   blessed); an error has `rule` and `message`; an action is `{"mqtt_publish":
//!   {"rule", "topic", "payload", "qos", "retain"}}` or `{"serial_write": {"rule",
//!   "port", "line"}}`; `"state": "progress"` or
//!   `"transition"` when the saved state changed. Restart and reload steps give
//!   `{"restored": ...}` / `{"reloaded": true}` lines.
//! - `diagnostics/<case>/`: one or more `*.toml` files (compiled together, in name
//!   order, named by their file name), an optional `options.json`
//!   (`{"known_sinks": [...], "known_serial_ports": [...]}`), and `expected.txt`: every diagnostic as displayed,
//!   separated by blank lines.
//!
//! Run with `FERRY_BLESS=1` to write the actual results over the expected files after
//! a deliberate change, then review the diff.

use ferry_rules::{Action, CheckOptions, Outcome, Reading, RuleSet, SourceFile, StateChange};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind);
    let mut cases: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.map(|e| e.path()).unwrap_or_default())
        .filter(|path| path.is_dir())
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases in {}", dir.display());
    cases
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn bless() -> bool {
    std::env::var_os("FERRY_BLESS").is_some()
}

/// Every `*.toml` file of a case, in name order, named by file name.
fn sources(case: &Path) -> Vec<SourceFile> {
    let mut paths: Vec<PathBuf> = fs::read_dir(case)
        .unwrap_or_else(|e| panic!("{}: {e}", case.display()))
        .map(|entry| entry.map(|e| e.path()).unwrap_or_default())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| SourceFile {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            text: read(path),
        })
        .collect()
}

/// `max_devices` from `options.json`, if given.
fn max_devices(case: &Path) -> Option<usize> {
    let path = case.join("options.json");
    let options: Value = serde_json::from_str(&fs::read_to_string(path).ok()?).ok()?;
    options["max_devices"].as_u64().map(|n| n as usize)
}

fn options(case: &Path) -> CheckOptions {
    let path = case.join("options.json");
    if !path.exists() {
        return CheckOptions::default();
    }
    let options: Value = serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{e}"));
    let names = |key: &str| {
        options[key].as_array().map(|names| {
            names
                .iter()
                .map(|s| s.as_str().unwrap_or_default().to_owned())
                .collect()
        })
    };
    CheckOptions {
        known_sinks: names("known_sinks"),
        known_serial_ports: names("known_serial_ports"),
    }
}

#[test]
fn diagnostics_fixtures() {
    let mut failures = Vec::new();
    for case in fixtures("diagnostics") {
        let actual = match RuleSet::compile(&sources(&case), &options(&case)) {
            Ok(rules) => format!("(compiled: {} rules)\n", rules.len()),
            Err(diagnostics) => {
                let shown: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
                shown.join("\n\n") + "\n"
            }
        };
        let expected_path = case.join("expected.txt");
        if bless() {
            fs::write(&expected_path, &actual).unwrap_or_else(|e| panic!("{e}"));
            continue;
        }
        let expected = read(&expected_path);
        if actual != expected {
            failures.push(format!(
                "{}:\n--- expected\n{expected}--- actual\n{actual}",
                case.display()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The comparable part of an outcome, in the `expected.jsonl` shape.
fn summary(outcome: &Outcome, with_data: &dyn Fn(usize) -> bool) -> Value {
    let alerts: Vec<Value> = outcome
        .alerts
        .iter()
        .enumerate()
        .map(|(i, alert)| {
            let mut shown = json!({
                "rule": alert.rule,
                "type": alert.event_type,
                "transition": alert.transition.to_string(),
                "device": alert.device,
                "source": alert.source,
                "time": alert.time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                "severity": alert.severity,
                "to": alert.to,
            });
            if with_data(i) {
                shown["data"] = alert.data.clone();
            }
            shown
        })
        .collect();
    let actions: Vec<Value> = outcome
        .actions
        .iter()
        .map(|action| match action {
            Action::MqttPublish {
                rule,
                topic,
                payload,
                qos,
                retain,
            } => json!({"mqtt_publish": {
                "rule": rule, "topic": topic, "payload": payload, "qos": qos, "retain": retain
            }}),
            Action::SerialWrite { rule, port, line } => json!({"serial_write": {
                "rule": rule, "port": port, "line": line
            }}),
        })
        .collect();
    let errors: Vec<Value> = outcome
        .errors
        .iter()
        .map(|e| json!({"rule": e.rule, "message": e.message}))
        .collect();
    let mut shown =
        json!({"forward": outcome.forward, "alerts": alerts, "actions": actions, "errors": errors});
    match outcome.state {
        StateChange::Unchanged => {}
        StateChange::Progress => shown["state"] = json!("progress"),
        StateChange::Transition => shown["state"] = json!("transition"),
    }
    shown
}

fn compile_case(dir: &Path, case: &Path) -> RuleSet {
    let mut rules = RuleSet::compile(&sources(dir), &options(case)).unwrap_or_else(|d| {
        let shown: Vec<String> = d.iter().map(|d| d.to_string()).collect();
        panic!("{}:\n{}", dir.display(), shown.join("\n"))
    });
    if let Some(max) = max_devices(case) {
        rules.set_max_devices_per_rule(max);
    }
    rules
}

fn time(value: &Value) -> chrono::DateTime<chrono::Utc> {
    match value.as_str() {
        None => chrono::DateTime::UNIX_EPOCH,
        Some(text) => chrono::DateTime::parse_from_rfc3339(text)
            .unwrap_or_else(|e| panic!("bad time {text}: {e}"))
            .to_utc(),
    }
}

/// Runs one step of `readings.jsonl`.
fn step(
    case: &Path,
    rules: &mut RuleSet,
    step: &Value,
    with_data: &dyn Fn(usize) -> bool,
) -> Value {
    if let Some(at) = step.get("tick") {
        return summary(&rules.tick(time(at)), with_data);
    }
    if step.get("restart").is_some() {
        let saved = rules.alert_state();
        // What is saved must survive being written out and read back.
        let saved: Value =
            serde_json::from_str(&saved.to_string()).unwrap_or_else(|e| panic!("{e}"));
        *rules = compile_case(case, case);
        let restored = rules.restore_alert_state(&saved);
        return json!({"restored": restored.rules, "ignored": restored.ignored});
    }
    if let Some(dir) = step.get("reload").and_then(Value::as_str) {
        let mut reloaded = compile_case(&case.join(dir), case);
        reloaded.adopt_state(std::mem::take(rules));
        *rules = reloaded;
        return json!({"reloaded": dir});
    }
    let empty = serde_json::Map::new();
    let outcome = rules.evaluate(&Reading {
        source: step["source"].as_str().unwrap_or("local"),
        device: step["device"].as_str().unwrap_or("dev"),
        time: time(&step["time"]),
        fields: step["fields"].as_object().unwrap_or(&empty),
    });
    summary(&outcome, with_data)
}

#[test]
fn eval_fixtures() {
    let mut failures = Vec::new();
    for case in fixtures("eval") {
        let mut rules = compile_case(&case, &case);
        let readings = read(&case.join("readings.jsonl"));
        let expected_path = case.join("expected.jsonl");
        let first_bless = !expected_path.exists();
        let expected_text = if expected_path.exists() {
            read(&expected_path)
        } else {
            String::new()
        };
        let mut expected_lines = expected_text.lines().filter(|l| !l.trim().is_empty());
        let mut blessed = String::new();
        for (n, line) in readings
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("//"))
            .enumerate()
        {
            let reading: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: step {}: {e}", case.display(), n + 1));
            let expected: Option<Value> = expected_lines
                .next()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}")));
            // Alerts whose expected `data` is given have theirs compared (and kept
            // when blessing).
            let with_data: Vec<bool> = expected
                .as_ref()
                .and_then(|e| e["alerts"].as_array())
                .map(|alerts| alerts.iter().map(|a| a.get("data").is_some()).collect())
                .unwrap_or_default();
            let with_data = |i: usize| first_bless || with_data.get(i).copied().unwrap_or(false);
            let actual = step(&case, &mut rules, &reading, &with_data);
            if bless() {
                blessed.push_str(&actual.to_string());
                blessed.push('\n');
                continue;
            }
            match expected {
                Some(expected) if expected == actual => {}
                Some(expected) => failures.push(format!(
                    "{} step {}:\n  expected {expected}\n  actual   {actual}",
                    case.display(),
                    n + 1
                )),
                None => failures.push(format!("{}: no expected line {}", case.display(), n + 1)),
            }
        }
        if bless() {
            fs::write(&expected_path, blessed).unwrap_or_else(|e| panic!("{e}"));
        } else {
            assert!(
                expected_lines.next().is_none(),
                "{}: more expected lines than steps",
                case.display()
            );
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
