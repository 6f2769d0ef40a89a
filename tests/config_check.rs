//! `ferry check` on configs with mistakes: every mistake is reported in one run,
//! each with its place in the file, and the exit status says the config is bad.

mod support;

use support::*;

fn check(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.toml");
    std::fs::write(&path, config).unwrap();
    let out = ferry()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reports_an_unknown_key_a_wrong_type_and_an_unknown_sink_key_in_one_run() {
    let (ok, stderr) = check(
        r#"[agent]
id = "gw-1"
colour = "red"

[[source.simulator]]
name = "sim"

[store]
cache_capacity = true

[[sink.http]]
name = "cloud"
url = "https://example.com/events"
retries = 3
"#,
    );
    assert!(!ok, "the config was accepted:\n{stderr}");
    for (at, word) in [
        ("ferry.toml:3:1:", "colour"),
        ("ferry.toml:9:18:", "invalid type"),
        ("ferry.toml:14:1:", "retries"),
    ] {
        assert!(
            stderr.lines().any(|l| l.contains(at) && l.contains(word)),
            "no line at {at} about {word}:\n{stderr}"
        );
    }
    assert!(stderr.contains("3 errors found"), "{stderr}");
}

#[test]
fn check_refuses_a_keep_alive_that_would_wrap_and_a_cache_sled_cannot_open() {
    let (ok, stderr) = check(
        r#"[agent]
id = "gw-1"

[[source.mqtt]]
name = "m"
url = "mqtt://127.0.0.1"
topics = ["sensors/#"]
keep_alive = "65536s"

[store]
cache_capacity = 0

[[sink.console]]
name = "out"
"#,
    );
    assert!(!ok, "the config was accepted:\n{stderr}");
    assert!(stderr.contains("ferry.toml:8:14:"), "{stderr}");
    assert!(stderr.contains("ferry.toml:11:18:"), "{stderr}");
    assert!(stderr.contains("2 errors found"), "{stderr}");
}
