//! Bad input (malformed JSON, JSON that is not an object, a payload over
//! `max_payload`) is counted by reason and logged; it never stops the agent nor the
//! good readings that follow it. Nor does a log pipe whose reader went away.

mod support;

use serde_json::json;
use support::*;

/// One bad message: where it is published, what it is, and what must be said of it.
struct Bad {
    topic: &'static str,
    payload: Vec<u8>,
    reason: &'static str,
    /// Words of which the log line about it must contain one (lower-case).
    words: &'static [&'static str],
}

fn bad_messages() -> Vec<Bad> {
    // A well-formed object, just too big for max_payload = "2KiB".
    let huge = json!({"temperature": 21.5, "seq": 999, "padding": "x".repeat(4096)}).to_string();
    vec![
        Bad {
            topic: "sensors/broken-json/telemetry",
            payload: br#"{"temperature": 21.5, "seq": "#.to_vec(),
            reason: "malformed",
            words: &["malformed", "not valid json", "invalid json"],
        },
        Bad {
            topic: "sensors/json-array/telemetry",
            payload: b"[21.5, 22.0]".to_vec(),
            reason: "not_an_object",
            words: &["not_an_object", "not an object"],
        },
        Bad {
            topic: "sensors/huge/telemetry",
            payload: huge.into_bytes(),
            reason: "oversize",
            words: &["oversize", "too large", "too big", "exceeds", "max_payload"],
        },
    ]
}

#[test]
fn bad_payloads_are_counted_and_logged_and_good_readings_still_arrive() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let mut config = TestConfig::new("gw-bad", &broker).http(&receiver.url(), "binary");
    config.max_payload = Some("2KiB".to_string());
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    let good = |seq: u64| json!({"temperature": 20 + seq, "seq": seq}).to_string();
    let bad = bad_messages();
    // good, bad, good, bad, good, bad, good
    broker.publish("sensors/good/telemetry", good(0), 1);
    for (i, b) in bad.iter().enumerate() {
        broker.publish(b.topic, &b.payload, 1);
        broker.publish("sensors/good/telemetry", good(i as u64 + 1), 1);
    }

    let readings = agent.eventually("the good readings to arrive", |_| {
        let r = receiver.readings();
        if r.len() >= 4 {
            Ok(r)
        } else {
            Err(format!("{} readings delivered", r.len()))
        }
    });
    let subjects: Vec<Option<&str>> = readings.iter().map(|e| e.subject.as_deref()).collect();
    assert_eq!(
        subjects,
        vec![Some("good"); 4],
        "only the good readings are forwarded"
    );
    let seqs: Vec<Option<u64>> = readings.iter().map(|e| e.seq()).collect();
    assert_eq!(seqs, vec![Some(0), Some(1), Some(2), Some(3)]);

    for b in &bad {
        let labels = [("source", "local"), ("reason", b.reason)];
        let m = agent.wait_for_metric("ferry_input_rejected_total", &labels, 1.0);
        assert_eq!(
            m.value("ferry_input_rejected_total", &labels),
            1.0,
            "exactly one {} rejection: {}",
            b.reason,
            m.ferry_lines()
        );
        // The log line names the source and says why (its topic would help too,
        // but is not required).
        agent.eventually(&format!("a log line about the {} payload", b.reason), |a| {
            let stderr = a.stderr();
            let logged = stderr.lines().any(|l| {
                let l = l.to_lowercase();
                l.contains("local") && b.words.iter().any(|w| l.contains(w))
            });
            if logged {
                Ok(())
            } else {
                Err(format!(
                    "no stderr line names source `local` and says one of {:?}",
                    b.words
                ))
            }
        });
    }
    let m = agent.metrics();
    assert_eq!(
        m.value("ferry_input_rejected_total", &[("source", "local")]),
        3.0,
        "three rejections in all: {}",
        m.ferry_lines()
    );

    // Still running and still taking input.
    broker.publish("sensors/good/telemetry", good(4), 1);
    receiver.wait_for_reading("good", 4);
    agent.assert_running();
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}

#[test]
fn a_log_pipe_whose_reader_is_gone_neither_kills_the_agent_nor_stops_its_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    let admin = free_port();
    std::fs::write(
        &config,
        format!(
            "[agent]\nid = \"gw\"\ndata_dir = \"data\"\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
             [[source.simulator]]\nname = \"demo\"\ninterval = \"50ms\"\n\n\
             [[sink.console]]\nname = \"out\"\n"
        ),
    )
    .unwrap();
    let mut child = ferry()
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read the first line, then close the pipe: every later log line fails to write.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut first).unwrap();
    drop(stderr);
    // Readings keep being committed well after the pipe closed (one every 50ms).
    let after_close = eventually("the admin endpoint to answer", || scrape(admin))
        .value("ferry_store_committed_total", &[]);
    eventually(
        "20 more readings committed with the log pipe closed",
        || {
            assert!(child.try_wait().unwrap().is_none(), "the agent died");
            let now = scrape(admin)?.value("ferry_store_committed_total", &[]);
            if now >= after_close + 20.0 {
                Ok(())
            } else {
                Err(format!(
                    "{now} committed, {after_close} when the pipe closed"
                ))
            }
        },
    );
    assert!(child.try_wait().unwrap().is_none(), "the agent died");
    signal(&child, libc::SIGTERM);
    let status = wait_with_deadline(&mut child, std::time::Duration::from_secs(15));
    if status.is_none() {
        let _ = child.kill();
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM must stop it: {status:?}"
    );
}

#[test]
fn a_device_id_with_a_line_break_and_escape_codes_cannot_forge_a_log_line() {
    const FORGED: &str = "oven-1\n2026-01-01T00:00:00Z  INFO fake line \u{1b}[31mred";
    let broker = Mosquitto::start();
    let config = TestConfig::new("gw-forge", &broker)
        .toml()
        .replace("device = \"{topic.1}\"", "device = \"{payload.device}\"");
    // A reading without `pressure` fails this rule, and the failure names the device.
    let rules = [(
        "pressure.toml",
        "[[rule]]\nid = \"needs-pressure\"\nwhen = \"pressure > 1.0\"\nemit = { type = \"com.example.pressure\" }\n",
    )];
    let mut agent = Agent::start(&config, &rules);
    broker.wait_for_subscription("ferry-gw-forge-local", "sensors/+/telemetry");

    let payload = json!({"device": FORGED, "temperature": 21.5}).to_string();
    broker.publish("sensors/x/telemetry", payload, 1);
    agent.wait_for_metric(
        "ferry_rule_errors_total",
        &[("rule", "needs-pressure")],
        1.0,
    );
    let stderr = agent.eventually("the rule error in the log", |a| {
        let stderr = a.stderr();
        if stderr.contains("rule evaluation failed") {
            Ok(stderr)
        } else {
            Err("no line says `rule evaluation failed`".to_string())
        }
    });
    let escaped = r"oven-1\n2026-01-01T00:00:00Z  INFO fake line \u{1b}[31mred";
    assert!(
        stderr.contains(escaped),
        "the device id is logged, escaped:\n{stderr}"
    );
    assert!(
        !stderr
            .lines()
            .any(|l| l.starts_with("2026-01-01T00:00:00Z")),
        "a forged line made it into the log:\n{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "a raw escape byte made it into the log:\n{stderr:?}"
    );
    assert!(agent.stop().success());
}
