//! Input that is valid but hostile: nesting at and past the one depth limit, a
//! device id past its cap, a reading whose clock is decades off, and a record in the
//! store that can no longer be decoded. None of it may lose an acknowledged reading,
//! stall a sink, or keep the agent from stopping.

mod support;

use serde_json::{json, Value};
use support::*;

/// A JSON object nested `levels` deep (the payload object is level 1), with the
/// reading's `temperature` at the top.
fn nested(levels: usize, temperature: f64) -> String {
    let inner = format!(
        "{}1{}",
        "{\"a\":".repeat(levels - 1),
        "}".repeat(levels - 1)
    );
    format!("{{\"temperature\":{temperature},\"deep\":{inner}}}")
}

const HOT_RULE: &str = r#"
[[rule]]
id = "hot"
when = "temperature > 30.0"
clear_when = "temperature < 25.0"
emit = { type = "com.example.hot" }
"#;

#[test]
fn a_reading_at_the_depth_limit_is_delivered_with_its_alert_and_one_deeper_is_malformed() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let mut config = TestConfig::new("gw-deep", &broker).http(&receiver.url(), "batch");
    config.max_payload = Some("64KiB".to_string());
    let mut agent = Agent::start(&config.toml(), &[("hot.toml", HOT_RULE)]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    // 127 levels used to be acknowledged, then be unreadable in the store.
    broker.publish("sensors/too-deep/telemetry", nested(127, 40.0), 1);
    broker.publish("sensors/too-deep/telemetry", nested(65, 40.0), 1);
    // 64 is the limit: accepted, stored, alerted on and delivered.
    broker.publish("sensors/deep/telemetry", nested(64, 40.0), 1);
    broker.publish(
        "sensors/shallow/telemetry",
        json!({"temperature": 20.0}).to_string(),
        1,
    );

    let events = receiver.wait_for_readings("the deep and the shallow reading", |r| r.len() >= 2);
    let subjects: Vec<_> = events
        .iter()
        .map(|e| e.subject.clone().unwrap_or_default())
        .collect();
    assert_eq!(subjects, vec!["deep", "shallow"]);
    let alert = eventually("the alert on the deep reading", || {
        receiver
            .events()
            .into_iter()
            .find(|e| e.ty == "com.example.hot")
            .ok_or_else(|| "no alert yet".to_string())
    });
    assert_eq!(alert.subject.as_deref(), Some("deep"));
    let m = agent.wait_for_metric(
        "ferry_input_rejected_total",
        &[("reason", "malformed")],
        2.0,
    );
    assert_eq!(
        m.value("ferry_input_rejected_total", &[("reason", "malformed")]),
        2.0
    );
    assert_eq!(
        m.value("ferry_store_dropped_total", &[("reason", "corrupt")]),
        0.0
    );
    assert!(agent.stop().success());
}

#[test]
fn a_device_id_over_256_bytes_is_rejected_as_bad_device() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-dev", &broker).http(&receiver.url(), "batch");
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    let long = "d".repeat(257);
    broker.publish(&format!("sensors/{long}/telemetry"), r#"{"t":1}"#, 1);
    let fits = "d".repeat(256);
    broker.publish(&format!("sensors/{fits}/telemetry"), r#"{"t":2}"#, 1);

    let events = receiver.wait_for_readings("the reading with a 256-byte id", |r| !r.is_empty());
    assert_eq!(events[0].subject.as_deref(), Some(fits.as_str()));
    agent.wait_for_metric(
        "ferry_input_rejected_total",
        &[("reason", "bad_device")],
        1.0,
    );
    assert_eq!(receiver.readings().len(), 1);
}

#[test]
fn a_reading_from_the_year_9999_does_not_stop_its_device_windows_or_alerts() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-clock", &broker).http(&receiver.url(), "batch");
    let rules = r#"
[[rule]]
id = "hot-for"
when = "temperature > 30.0"
for = "1s"
emit = { type = "com.example.hot" }
"#;
    let mut agent = Agent::start(&config.toml(), &[("hot.toml", rules)]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    let t = "sensors/liar/telemetry";
    broker.publish(
        t,
        json!({"temperature": 20.0, "time": "9999-12-31T23:59:59Z"}).to_string(),
        1,
    );
    let first = receiver.wait_for_readings("the lying reading", |r| !r.is_empty());
    let data: &Value = &first[0].data;
    assert_eq!(data["reported_time"], json!("9999-12-31T23:59:59Z"));
    let time = first[0].time.expect("a time");
    assert!(
        time < chrono::Utc::now() + chrono::TimeDelta::days(1),
        "{time}"
    );

    // Later readings with no time of their own still drive the `for` timer.
    agent.eventually("the sustained alert after the bad clock", |_| {
        broker.publish(t, json!({"temperature": 40.0}).to_string(), 1);
        receiver
            .events()
            .into_iter()
            .find(|e| e.ty == "com.example.hot")
            .ok_or_else(|| "no alert yet".to_string())
    });
    let m = agent.metrics();
    assert_eq!(
        m.value("ferry_input_clock_skew_total", &[("direction", "ahead")]),
        1.0
    );
    assert_eq!(
        agent
            .stderr()
            .matches("too far from the agent's clock")
            .count(),
        1,
        "logged once per device"
    );
}

#[test]
fn an_undecodable_stored_record_is_skipped_once_and_the_rest_delivered_and_shutdown_is_prompt() {
    let broker = Mosquitto::start();
    let down = Receiver::start();
    let url = down.url();
    down.set_failing(Some(503));
    let config = TestConfig::new("gw-corrupt", &broker).http(&url, "batch");
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");
    for seq in 0..3 {
        broker.publish("sensors/d/telemetry", json!({"seq": seq}).to_string(), 1);
    }
    agent.wait_for_metric("ferry_store_committed_total", &[], 3.0);
    assert!(agent.stop().success());

    // Damage the middle record as a bit flip or an older release's bug would.
    {
        use ferry_agent::store::backend::{Backend, Batch};
        let db = ferry_agent::store::redb::RedbBackend::open(&agent.dir().join("data"), 1 << 20)
            .expect("open the stopped agent's store");
        let mut keys = Vec::new();
        db.scan(b"e", b"f", &mut |k, _| {
            keys.push(k.to_vec());
            true
        })
        .unwrap();
        let mut batch = Batch::durable();
        batch.put(keys[1].clone(), b"{\"source\":".to_vec());
        db.commit(batch).unwrap();
    }

    down.set_failing(None);
    agent.start_again();
    let events = down.wait_for_readings("the two readable records", |r| r.len() >= 2);
    let seqs: Vec<_> = events.iter().map(|e| e.seq()).collect();
    assert_eq!(seqs, vec![Some(0), Some(2)]);
    let m = agent.wait_for_metric("ferry_store_dropped_total", &[("reason", "corrupt")], 1.0);
    assert_eq!(
        m.value("ferry_store_dropped_total", &[("reason", "corrupt")]),
        1.0
    );
    assert_eq!(agent.stderr().matches("cannot be decoded").count(), 1);

    // More input flows behind it, and a stop is prompt (the sink is not spinning).
    broker.publish("sensors/d/telemetry", json!({"seq": 3}).to_string(), 1);
    down.wait_for_readings("the reading after the damaged one", |r| r.len() >= 3);
    assert!(agent.stop().success());

    agent.start_again();
    agent.wait_for_metric("ferry_store_committed_total", &[], 0.0);
    assert_eq!(
        agent
            .metrics()
            .value("ferry_store_dropped_total", &[("reason", "corrupt")]),
        0.0,
        "counted once, not again after a restart"
    );
}
