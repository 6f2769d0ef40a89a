//! The installer's tools: `ferry rules check DIR` and `ferry rules test DIR --readings`.

mod support;

use std::process::Output;

use support::*;

const FREEZER: &str = r#"[[rule]]
id = "freezer-warm"
match = { device = "freezer-*" }
when = "temperature > -15"
clear_when = "temperature < -18"
emit = { type = "com.acme.freezer.warm", severity = "critical" }
"#;

const READINGS: &str = r#"{"device": "freezer-1", "time": "2026-01-01T00:00:00Z", "temperature": -20}
{"device": "freezer-1", "time": "2026-01-01T00:01:00Z", "temperature": -12.5}
{"device": "freezer-1", "time": "2026-01-01T00:02:00Z", "temperature": -13}
{"device": "pantry-1", "time": "2026-01-01T00:02:30Z", "temperature": 4}
{"device": "freezer-1", "time": "2026-01-01T00:03:00Z", "temperature": -19}
"#;

fn rules_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn run(args: &[&str]) -> Output {
    ferry().args(args).output().expect("run ferry")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn rules_check_accepts_good_files_and_lists_every_mistake_with_its_place() {
    let good = rules_dir(&[("freezer.toml", FREEZER)]);
    let out = run(&["rules", "check", good.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("ok (1 rules)"),
        "{}",
        text(&out.stdout)
    );

    let bad = rules_dir(&[
        (
            "a.toml",
            "[[rule]]\nid = \"a\"\nwhen = \"temperature >\"\nemit = { type = \"t\" }\n",
        ),
        (
            "b.toml",
            "[[rule]]\nid = \"b\"\nwhen = \"x > 1\"\nemit = { type = \"t\" }\nsevrity = \"high\"\n",
        ),
    ]);
    let out = run(&["rules", "check", bad.path().to_str().unwrap()]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("a.toml:3:"), "{err}");
    assert!(err.contains("b.toml:5:1"), "{err}");
    assert!(err.contains("2 errors found"), "{err}");
}

#[test]
fn rules_test_replays_readings_and_prints_each_transition_with_its_values() {
    let dir = rules_dir(&[("freezer.toml", FREEZER)]);
    let readings = dir.path().join("readings.jsonl");
    std::fs::write(&readings, READINGS).unwrap();
    let out = run(&[
        "rules",
        "test",
        dir.path().to_str().unwrap(),
        "--readings",
        readings.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", text(&out.stderr));
    let events: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("freezer-warm"))
        .collect();
    assert_eq!(
        events.len(),
        2,
        "one line per transition, not per reading:\n{stdout}"
    );
    assert!(events[0].starts_with("2026-01-01T00:01:00Z"), "{stdout}");
    assert!(
        events[0].contains("fired") && events[0].contains("-12.5"),
        "{stdout}"
    );
    assert!(events[1].starts_with("2026-01-01T00:03:00Z"), "{stdout}");
    assert!(events[1].contains("resolved"), "{stdout}");
    assert!(stdout.contains("5 readings"), "{stdout}");
}

#[test]
fn rules_test_json_prints_the_would_be_cloudevents() {
    let dir = rules_dir(&[("freezer.toml", FREEZER)]);
    let readings = dir.path().join("readings.jsonl");
    std::fs::write(&readings, READINGS).unwrap();
    let out = run(&[
        "rules",
        "test",
        dir.path().to_str().unwrap(),
        "--readings",
        readings.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let events: Vec<cloudevents::Event> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is a CloudEvent"))
        .collect();
    assert_eq!(events.len(), 2);
    use cloudevents::AttributesReader;
    assert_eq!(events[0].ty(), "com.acme.freezer.warm");
    assert_eq!(events[0].subject(), Some("freezer-1"));
}

#[test]
fn rules_test_reports_a_bad_readings_line_with_its_number() {
    let dir = rules_dir(&[("freezer.toml", FREEZER)]);
    let readings = dir.path().join("readings.jsonl");
    std::fs::write(
        &readings,
        "{\"device\": \"freezer-1\", \"temperature\": -20}\n{oops\n",
    )
    .unwrap();
    let out = run(&[
        "rules",
        "test",
        dir.path().to_str().unwrap(),
        "--readings",
        readings.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("readings.jsonl:2:"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_bundled_gateway_rules_replay_the_bundled_readings_as_documented() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = run(&[
        "rules",
        "test",
        root.join("deploy/examples/rules/gateway").to_str().unwrap(),
        "--readings",
        root.join("deploy/examples/readings/gateway.jsonl")
            .to_str()
            .unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{stdout}", text(&out.stderr));
    let has = |time: &str, rule: &str, transition: &str| {
        stdout.lines().any(|l| {
            l.starts_with(time) && l.contains(rule) && l.contains(&format!(" {transition} "))
        })
    };
    // Sustained: warm since 10:01, fires once it has lasted 10 minutes (first
    // reading at or after 10:11); hysteresis: resolves only below -18.
    assert!(
        has("2026-01-01T10:11:00Z", "freezer-warm", "fired"),
        "{stdout}"
    );
    assert!(
        has("2026-01-01T10:14:00Z", "freezer-warm", "resolved"),
        "{stdout}"
    );
    // Stale: nothing from freezer-1 for 15 minutes after 10:14.
    assert!(
        has("2026-01-01T10:29:00Z", "freezer-silent", "fired"),
        "{stdout}"
    );
    // Aggregates: one event per closed 5-minute window.
    assert!(
        has("2026-01-01T10:05:00Z", "climate-5m", "window"),
        "{stdout}"
    );
    // Rate of change and local actuation.
    assert!(
        has("2026-01-01T10:02:00Z", "heating-fast", "fired"),
        "{stdout}"
    );
    assert!(
        stdout.contains("publish \"on\" to actuators/room-1/fan"),
        "{stdout}"
    );
    // Deadband: the 0.2 °C move at 10:01 is not forwarded.
    assert!(
        stdout.contains("line 4: reading from room-1 not forwarded"),
        "{stdout}"
    );
}

/// A rule whose work grows with the square of a reading's size.
const PAIRS: &str = r#"[[rule]]
id = "pairs"
when = "a.exists(x, a.exists(y, x + y < 0.0))"
emit = { type = "com.acme.pairs" }
"#;

#[test]
fn a_nested_list_macro_is_a_warning_that_neither_check_fails_on() {
    let dir = rules_dir(&[("pairs.toml", PAIRS)]);
    let out = run(&["rules", "check", dir.path().to_str().unwrap()]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(text(&out.stdout).contains("ok (1 rules)"), "{err}");
    assert!(
        err.contains("pairs.toml:3:8: warning: `when` runs a list macro"),
        "{err}"
    );
    assert!(!err.contains(" found"), "counted as an error: {err}");

    let etc = config_for(dir.path());
    let config = etc.path().join("ferry.toml");
    let out = run(&["check", "--config", config.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(text(&out.stdout).contains("1 rules)"), "{err}");
    assert!(
        err.contains("pairs.toml:3:8: warning: `when` runs a list macro"),
        "{err}"
    );
}

/// A directory holding a `ferry.toml` whose rules are in `rules`.
fn config_for(rules: &std::path::Path) -> tempfile::TempDir {
    let etc = tempfile::tempdir().unwrap();
    std::fs::write(
        etc.path().join("ferry.toml"),
        format!(
            "[agent]\nid = \"t\"\n\n[[source.simulator]]\nname = \"demo\"\n\n\
             [rules]\ndir = {rules:?}\n\n[[sink.console]]\nname = \"stdout\"\n"
        ),
    )
    .unwrap();
    etc
}

#[test]
fn a_symlink_to_a_secret_file_is_reported_by_name_without_its_contents() {
    let secrets = tempfile::tempdir().unwrap();
    let shadow = secrets.path().join("shadow");
    std::fs::write(
        &shadow,
        "root:SECRET-HASH:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
    )
    .unwrap();
    let dir = rules_dir(&[("freezer.toml", FREEZER)]);
    let link = dir.path().join("shadow.toml");
    std::os::unix::fs::symlink(&shadow, &link).unwrap();

    let etc = config_for(dir.path());
    let config = etc.path().join("ferry.toml");
    for args in [
        vec!["rules", "check", dir.path().to_str().unwrap()],
        vec!["check", "--config", config.to_str().unwrap()],
    ] {
        let out = run(&args);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(!out.status.success(), "{args:?}: {stdout}");
        assert_eq!(
            stderr,
            format!(
                "{}: cannot read as a rule file: it is not TOML\n1 error found\n",
                link.display()
            ),
            "{args:?}"
        );
        assert!(
            !stdout.contains("SECRET") && !stdout.contains("root"),
            "{stdout}"
        );
    }
}

#[test]
fn a_binary_file_is_reported_by_name_and_does_not_hide_the_other_files_mistakes() {
    let dir = rules_dir(&[
        ("a.toml", FREEZER),
        (
            "c.toml",
            "[[rule]]\nid = \"c\"\nwhen = \"temperature >\"\nemit = { type = \"t\" }\n",
        ),
    ]);
    let binary = dir.path().join("b.toml");
    std::fs::write(
        &binary,
        b"\x7fELF\x02\x01\x01\x00\xff\xfe[[rule]]\n\x00\x00",
    )
    .unwrap();
    let out = run(&["rules", "check", dir.path().to_str().unwrap()]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let reports: Vec<&str> = err.lines().filter(|l| !l.starts_with("  ")).collect();
    assert_eq!(
        reports,
        [
            format!(
                "{}: cannot read as a rule file: it is not UTF-8 text",
                binary.display()
            )
            .as_str(),
            format!(
                "{}:3:22: syntax error in `when`: mismatched input '<EOF>' expecting {{'[', \
                 '{{', '(', '.', '-', '!', 'true', 'false', 'null', NUM_FLOAT, NUM_INT, \
                 NUM_UINT, STRING, BYTES, IDENTIFIER}}",
                dir.path().join("c.toml").display()
            )
            .as_str(),
            "2 errors found",
        ]
    );
    assert!(!err.contains(":0:0"), "{err}");
}
