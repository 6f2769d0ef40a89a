//! Data-driven tests: every directory under `tests/fixtures/` is one case.
//!
//! - `eval/<case>/`: `rules.toml` (and any other `*.toml`), `readings.jsonl` (one
//!   reading per line: `{"device", "source", "fields"}`) and `expected.jsonl` (one
//!   line per reading: `{"alerts": [...], "errors": [...]}`). An expected alert has
//!   `rule`, `type`, `severity` and `to`, and `data` if it is to be compared too; an
//!   expected error has `rule` and `message`. Every reading is forwarded in v1, so
//!   `forward` is checked to be `true` for all.
//! - `diagnostics/<case>/`: one or more `*.toml` files (compiled together, in name
//!   order, named by their file name), an optional `options.json`
//!   (`{"known_sinks": [...]}`), and `expected.txt`: every diagnostic as displayed,
//!   separated by blank lines.
//!
//! Run with `FERRY_BLESS=1` to write the actual results over the expected files after
//! a deliberate change, then review the diff.

use ferry_rules::{CheckOptions, Outcome, Reading, RuleSet, SourceFile};
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

fn options(case: &Path) -> CheckOptions {
    let path = case.join("options.json");
    if !path.exists() {
        return CheckOptions::default();
    }
    let options: Value = serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{e}"));
    CheckOptions {
        known_sinks: options["known_sinks"].as_array().map(|sinks| {
            sinks
                .iter()
                .map(|s| s.as_str().unwrap_or_default().to_owned())
                .collect()
        }),
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
fn summary(outcome: &Outcome, with_data: &[bool]) -> Value {
    let alerts: Vec<Value> = outcome
        .alerts
        .iter()
        .enumerate()
        .map(|(i, alert)| {
            let mut shown = json!({
                "rule": alert.rule,
                "type": alert.event_type,
                "severity": alert.severity,
                "to": alert.to,
            });
            if with_data.get(i).copied().unwrap_or(false) {
                shown["data"] = alert.data.clone();
            }
            shown
        })
        .collect();
    let errors: Vec<Value> = outcome
        .errors
        .iter()
        .map(|e| json!({"rule": e.rule, "message": e.message}))
        .collect();
    json!({"alerts": alerts, "errors": errors})
}

#[test]
fn eval_fixtures() {
    let mut failures = Vec::new();
    for case in fixtures("eval") {
        let mut rules = RuleSet::compile(&sources(&case), &options(&case)).unwrap_or_else(|d| {
            let shown: Vec<String> = d.iter().map(|d| d.to_string()).collect();
            panic!("{}:\n{}", case.display(), shown.join("\n"))
        });
        let readings = read(&case.join("readings.jsonl"));
        let expected_path = case.join("expected.jsonl");
        let expected_text = if expected_path.exists() {
            read(&expected_path)
        } else {
            String::new()
        };
        let mut expected_lines = expected_text.lines().filter(|l| !l.trim().is_empty());
        let mut blessed = String::new();
        for (n, line) in readings
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
        {
            let reading: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: reading {}: {e}", case.display(), n + 1));
            let empty = serde_json::Map::new();
            let outcome = rules.evaluate(&Reading {
                source: reading["source"].as_str().unwrap_or("local"),
                device: reading["device"].as_str().unwrap_or("dev"),
                time: chrono::DateTime::UNIX_EPOCH,
                fields: reading["fields"].as_object().unwrap_or(&empty),
            });
            assert!(outcome.forward, "{}: reading {}", case.display(), n + 1);
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
            let actual = summary(&outcome, &with_data);
            if bless() {
                blessed.push_str(&actual.to_string());
                blessed.push('\n');
                continue;
            }
            match expected {
                Some(expected) if expected == actual => {}
                Some(expected) => failures.push(format!(
                    "{} reading {}:\n  expected {expected}\n  actual   {actual}",
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
                "{}: more expected lines than readings",
                case.display()
            );
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
