//! Dead letters against a real receiver, a real broker and the real binary: an
//! event the upstream refuses for good (422) is kept instead of vanishing, `ferry
//! dead-letters` lists it on the running agent (through its admin endpoint) and on
//! the stopped one (opening its store), `replay` sends it again with the id it was
//! first sent with once the upstream takes it, `purge` removes it, and the
//! `ferry_dead_letters` gauge follows. The area is bounded: the oldest go first,
//! counted.

mod support;

use std::process::Output;

use serde_json::json;
use support::*;

const TOPIC: &str = "sensors/press-1/telemetry";

fn payloads(n: u64, poison: &[u64]) -> Vec<String> {
    (0..n)
        .map(|i| {
            if poison.contains(&i) {
                json!({"pressure": 1.0, "seq": i, "poison": true}).to_string()
            } else {
                json!({"pressure": 1.0, "seq": i}).to_string()
            }
        })
        .collect()
}

/// `ferry dead-letters ARGS --config CONFIG`.
fn dead_letters(config: &std::path::Path, args: &[&str]) -> Output {
    ferry()
        .arg("dead-letters")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run ferry dead-letters")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "ferry dead-letters failed ({}): {}{}",
        o.status,
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

/// The id of the refused attempt(s) of reading `seq`, as the receiver saw it.
fn refused_id(receiver: &Receiver, seq: u64) -> (String, String) {
    let attempt = receiver
        .rejected()
        .iter()
        .flat_map(|r| r.events())
        .find(|e| e.seq() == Some(seq))
        .expect("the refused attempt was recorded");
    (attempt.source, attempt.id)
}

#[test]
fn an_event_refused_with_422_is_kept_listed_replayed_with_its_first_id_and_purged() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    receiver.refuse_containing("\"poison\"", 422);
    let config = TestConfig::new("gw-dead", &broker).http(&receiver.url(), "binary");
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    broker.publish_lines(TOPIC, &payloads(6, &[2, 4]), 1);
    receiver.wait_for_reading("press-1", 5);
    agent.wait_for_metric("ferry_dead_letters", &[], 2.0);
    let (source, first_id) = refused_id(&receiver, 2);

    // On the running agent: through its admin endpoint.
    let list = ok(dead_letters(agent.config_path(), &["list"]));
    assert_eq!(list.matches("HTTP 422").count(), 2, "{list}");
    assert!(list.contains(&first_id), "{list}");
    let shown = ok(dead_letters(agent.config_path(), &["show", "0"]));
    let shown: serde_json::Value = serde_json::from_str(&shown).expect("show prints JSON");
    assert_eq!(shown["sink"], "cloud");
    assert_eq!(shown["record"]["data"]["seq"], 2);

    // The upstream is fixed: the replay arrives with the id of the refused attempt.
    receiver.stop_refusing();
    let replayed = ok(dead_letters(agent.config_path(), &["replay", "0"]));
    assert!(replayed.contains("1 replayed"), "{replayed}");
    let readings = receiver.wait_for_reading("press-1", 2);
    let again = readings
        .iter()
        .find(|e| e.seq() == Some(2))
        .expect("the replayed reading");
    assert_eq!((&again.source, &again.id), (&source, &first_id));
    assert_eq!(
        again.sequence,
        first_id.rsplit('-').next().and_then(|s| s.parse().ok())
    );
    let m = agent.wait_for_metric("ferry_sink_sent_total", &[("sink", "cloud")], 5.0);
    assert_eq!(
        m.value("ferry_dead_letters", &[]),
        1.0,
        "{}",
        m.ferry_lines()
    );
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");

    // On the stopped agent: the command opens the store itself.
    let list = ok(dead_letters(agent.config_path(), &["list"]));
    assert_eq!(list.matches("HTTP 422").count(), 1, "{list}");
    assert!(!list.contains(&first_id), "{list}");
    assert!(ok(dead_letters(agent.config_path(), &["purge", "1"])).contains("1 purged"));
    assert!(ok(dead_letters(agent.config_path(), &["list"])).contains("no dead letters"));
    let missing = dead_letters(agent.config_path(), &["show", "1"]);
    assert!(!missing.status.success(), "{}", stdout(&missing));

    agent.start_again();
    agent.eventually("the gauge after a restart", |a| {
        let m = a.try_metrics()?;
        if m.has("ferry_dead_letters") && m.value("ferry_dead_letters", &[]) == 0.0 {
            Ok(())
        } else {
            Err(m.ferry_lines())
        }
    });
    let seqs: Vec<u64> = receiver.readings().iter().filter_map(|e| e.seq()).collect();
    assert_eq!(
        seqs.iter().filter(|s| **s == 4).count(),
        0,
        "a purged event never arrives"
    );
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}

#[test]
fn when_dead_letters_fill_their_bound_the_oldest_go_and_are_counted() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    receiver.refuse_containing("\"poison\"", 400);
    let config = TestConfig::new("gw-dead-full", &broker).http(&receiver.url(), "binary");
    let toml = config
        .toml()
        .replace("when_full = ", "dead_letters_max = 2\nwhen_full = ");
    let mut agent = Agent::start(&toml, &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    broker.publish_lines(TOPIC, &payloads(6, &[0, 1, 2, 3]), 1);
    receiver.wait_for_reading("press-1", 5);
    let m = agent.wait_for_metric(
        "ferry_store_dropped_total",
        &[("reason", "dead_letters_full")],
        2.0,
    );
    assert_eq!(
        m.value("ferry_dead_letters", &[]),
        2.0,
        "{}",
        m.ferry_lines()
    );
    let list = ok(dead_letters(agent.config_path(), &["list"]));
    let ids: Vec<&str> = list
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(ids, ["2", "3"], "the newest are kept: {list}");

    // Without [admin] the command cannot reach the running agent, and says what to do.
    let plain = agent.dir().join("no-admin.toml");
    let text = toml.replace(
        &format!("[admin]\nlisten = \"127.0.0.1:{}\"\n", config.admin_port),
        "",
    );
    std::fs::write(&plain, text).unwrap();
    let refused = dead_letters(&plain, &["list"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("in use") && err.contains("[admin] listen"),
        "{err}"
    );
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}
