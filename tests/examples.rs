//! `ferry check`: every shipped example config passes it, and mistakes are reported
//! each with `file:line:col` and a non-zero exit.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use support::*;

fn check(config: &Path) -> Output {
    ferry()
        .arg("check")
        .arg("--config")
        .arg(config)
        .output()
        .expect("run ferry check")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every `*.toml` under `dir`, recursively, except rule files (inside a `rules` dir).
fn configs_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "rules") {
                continue;
            }
            configs_under(&p, out);
        } else if p.extension().is_some_and(|e| e == "toml") {
            out.push(p);
        }
    }
}

/// Whether every problem `ferry check` printed for `config` is a certificate, key
/// or secret under `/etc/ferry/` that cannot be read: files an installer puts on
/// each device (AWS IoT Core and Azure IoT Hub examples name them), not mistakes in
/// the example. Everything else in such an example is still checked.
fn only_device_files_missing(output: &str, config: &Path) -> bool {
    let prefix = format!("{}:", config.display());
    let problems: Vec<&str> = output.lines().filter(|l| l.starts_with(&prefix)).collect();
    !problems.is_empty()
        && problems
            .iter()
            .all(|l| l.contains(": cannot read ") && l.contains("/etc/ferry/"))
}

/// The `(line, col)` of every diagnostic `ferry check` printed for `file`.
fn positions(output: &str, file: &str) -> Vec<(usize, usize)> {
    output
        .lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix(file)?.strip_prefix(':')?;
            let mut parts = rest.splitn(3, ':');
            let line = parts.next()?.parse().ok()?;
            let col = parts.next()?.parse().ok()?;
            parts.next()?;
            Some((line, col))
        })
        .collect()
}

#[test]
fn every_example_config_under_deploy_passes_ferry_check() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut configs = Vec::new();
    configs_under(&deploy, &mut configs);
    assert!(
        !configs.is_empty(),
        "no example configs (*.toml outside rules/) under {}",
        deploy.display()
    );
    let mut failures = Vec::new();
    for c in &configs {
        let out = check(c);
        if !out.status.success() && !only_device_files_missing(&text(&out), c) {
            failures.push(format!("{} ({}):\n{}", c.display(), out.status, text(&out)));
        }
    }
    assert!(
        failures.is_empty(),
        "ferry check failed on:\n{}",
        failures.join("\n")
    );
}

#[test]
fn ferry_check_reports_every_config_mistake_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.toml");
    // Three mistakes: an id with a space (line 2), a sink url that is not a URL
    // (line 14), and a sink name used twice (line 17).
    std::fs::write(
        &path,
        r#"[agent]
id = "gw 7"
data_dir = "data"

[[source.mqtt]]
name = "local"
url = "mqtt://127.0.0.1:1883"
topics = ["sensors/+/telemetry"]
qos = 1
device = "{topic.1}"

[[sink.http]]
name = "cloud"
url = "not a url"

[[sink.console]]
name = "cloud"
"#,
    )
    .unwrap();
    let out = check(&path);
    let printed = text(&out);
    assert!(
        !out.status.success(),
        "ferry check accepted a broken config:\n{printed}"
    );
    let file = path.display().to_string();
    let at = positions(&printed, &file);
    let lines: Vec<usize> = at.iter().map(|(l, _)| *l).collect();
    for expected in [2, 14, 17] {
        assert!(
            lines.contains(&expected),
            "no `{file}:{expected}:COL: message` diagnostic; got positions {at:?} in:\n{printed}"
        );
    }
    assert!(
        at.iter().all(|(_, c)| *c >= 1),
        "columns are 1-based: {at:?}"
    );
}

#[test]
fn ferry_check_reports_a_rule_file_mistake_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.toml");
    std::fs::write(
        &path,
        r#"[agent]
id = "gw-7"
data_dir = "data"

[[source.mqtt]]
name = "local"
url = "mqtt://127.0.0.1:1883"
topics = ["sensors/+/telemetry"]
device = "{topic.1}"

[rules]
dir = "rules"

[[sink.console]]
name = "stdout"
"#,
    )
    .unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(rules.join("good.toml"), TOO_HOT_RULE).unwrap();
    // The expression on line 3 is cut short.
    let bad = rules.join("bad.toml");
    std::fs::write(
        &bad,
        "[[rule]]\nid = \"too-cold\"\nwhen = \"temperature < \"\nemit = { type = \"com.example.too-cold\" }\n",
    )
    .unwrap();

    let out = check(&path);
    let printed = text(&out);
    assert!(
        !out.status.success(),
        "ferry check accepted a broken rule file:\n{printed}"
    );
    let at: Vec<(usize, usize)> = printed
        .lines()
        .filter_map(|l| {
            let i = l.find("bad.toml:")?;
            positions(&l[i..], "bad.toml").into_iter().next()
        })
        .collect();
    assert!(
        at.iter().any(|(line, col)| *line == 3 && *col >= 1),
        "no `.../bad.toml:3:COL: message` diagnostic; got {at:?} in:\n{printed}"
    );
    assert!(
        !printed.contains("good.toml:"),
        "the good rule file was blamed:\n{printed}"
    );

    // Fixing it makes the check pass.
    std::fs::remove_file(&bad).unwrap();
    let out = check(&path);
    assert!(
        out.status.success(),
        "ferry check rejected a good config:\n{}",
        text(&out)
    );
}
