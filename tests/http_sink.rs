//! The HTTP sink's options against a real receiver: gzip bodies decode to the same
//! events, a key header read from a file arrives with every request and never in
//! the logs, and an event over `max_message` is refused for good and counted
//! without holding up the events after it.

mod support;

use serde_json::json;
use support::*;

const TOPIC: &str = "sensors/meter-1/telemetry";

fn lines(seqs: std::ops::Range<u64>) -> Vec<String> {
    seqs.map(|i| json!({"power": 100 + i, "seq": i}).to_string())
        .collect()
}

#[test]
fn gzip_bodies_decode_at_the_receiver_to_every_event_in_order() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let mut config = TestConfig::new("gw-gzip", &broker).http(&receiver.url(), "batch");
    config.batch_max = 8;
    config.extra = "compression = \"gzip\"\n".into();
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    broker.publish_lines(TOPIC, &lines(0..40), 1);
    let readings = receiver.wait_for_readings("all 40 readings to arrive", |r| r.len() >= 40);

    let seqs: Vec<Option<u64>> = readings.iter().map(|e| e.seq()).collect();
    assert_eq!(seqs, (0..40).map(Some).collect::<Vec<_>>());
    for r in receiver.accepted() {
        assert_eq!(r.header("content-encoding"), Some("gzip"), "{r:?}");
        assert_eq!(r.content_type(), "application/cloudevents-batch+json");
        assert_ne!(r.wire_len, r.body.len(), "the body came compressed");
    }
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}

#[test]
fn a_key_header_read_from_a_file_arrives_with_every_request_and_never_in_the_logs() {
    const KEY: &str = "c2VjcmV0LWV2ZW50LWdyaWQta2V5";
    let secrets = tempfile::tempdir().unwrap();
    let key_file = secrets.path().join("event-grid.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();

    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let mut config = TestConfig::new("gw-key", &broker).http(&receiver.url(), "structured");
    config.extra = format!(
        "auth = {{ header = \"aeg-sas-key\", value_file = {:?} }}\n",
        key_file.display().to_string()
    );
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    broker.publish_lines(TOPIC, &lines(0..5), 1);
    receiver.wait_for_readings("all 5 readings to arrive", |r| r.len() >= 5);
    agent.wait_for_metric("ferry_sink_sent_total", &[("sink", "cloud")], 5.0);

    for r in receiver.requests() {
        assert_eq!(r.header("aeg-sas-key"), Some(KEY), "{r:?}");
        assert_eq!(r.header("authorization"), None, "{r:?}");
    }
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
    assert!(
        !agent.stderr().contains(KEY),
        "the key leaked into the log:\n{}",
        agent.stderr()
    );
}

#[test]
fn an_event_over_max_message_is_counted_too_large_and_the_events_after_it_arrive() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let mut config = TestConfig::new("gw-max", &broker).http(&receiver.url(), "binary");
    config.extra = "max_message = \"1KiB\"\n".into();
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    let mut payloads = lines(0..6);
    // seq 2's data is 2 KiB: over the limit in binary mode, where the body is the data.
    payloads[2] = json!({"power": 102, "seq": 2, "trace": "x".repeat(2048)}).to_string();
    broker.publish_lines(TOPIC, &payloads, 1);

    let readings = receiver.wait_for_readings("the 5 readings under the limit to arrive", |r| {
        r.iter().any(|e| e.seq() == Some(5))
    });
    let seqs: Vec<Option<u64>> = readings.iter().map(|e| e.seq()).collect();
    assert_eq!(seqs, [Some(0), Some(1), Some(3), Some(4), Some(5)]);
    let m = agent.wait_for_metric(
        "ferry_sink_dropped_total",
        &[("sink", "cloud"), ("reason", "too_large")],
        1.0,
    );
    assert_eq!(
        m.value(
            "ferry_sink_dropped_total",
            &[("sink", "cloud"), ("reason", "too_large")]
        ),
        1.0
    );
    assert!(
        receiver.requests().iter().all(|r| r.body.len() <= 1024),
        "an event over max_message was sent"
    );
    assert!(agent.stderr_contains("larger than the sink's max_message"));
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}
