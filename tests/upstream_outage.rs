//! While the upstream is down (connection refused, then 503), readings keep being
//! accepted and buffered; once it recovers every one is delivered, in order, and
//! each retry carried the same CloudEvents `source` + `id`. An event the upstream
//! refuses for good (4xx) is dropped and counted, and costs only itself.

mod support;

use std::collections::HashMap;

use serde_json::json;
use support::*;

const TOPIC: &str = "sensors/freezer-1/telemetry";

fn lines(seqs: std::ops::Range<u64>) -> Vec<String> {
    seqs.map(|i| json!({"temperature": -18.0 + (i % 5) as f64 / 10.0, "seq": i}).to_string())
        .collect()
}

#[test]
fn readings_are_buffered_while_upstream_is_down_and_delivered_in_order_after() {
    let broker = Mosquitto::start();
    // Bound but not listening: the sink's connections are refused.
    let upstream = DownPort::hold();
    let config = TestConfig::new("gw-outage", &broker).http(&upstream.url(), "binary");
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    // -- Phase 1: nobody listens. --
    broker.publish_lines(TOPIC, &lines(0..30), 1);
    let m = agent.wait_for_metric("ferry_input_received_total", &[("source", "local")], 30.0);
    assert_eq!(m.value("ferry_sink_sent_total", &[("sink", "cloud")]), 0.0);
    agent.wait_for_metric("ferry_sink_errors_total", &[("sink", "cloud")], 1.0);
    // The lag an operator alerts on grows while nothing is delivered.
    agent.wait_for_metric("ferry_sink_lag_records", &[("sink", "cloud")], 30.0);

    // -- Phase 2: the upstream answers 503. --
    let receiver = Receiver::on_failing(upstream, 503);
    broker.publish_lines(TOPIC, &lines(30..60), 1);
    agent.wait_for_metric("ferry_input_received_total", &[("source", "local")], 60.0);
    agent.eventually("the sink to retry against the 503s", |_| {
        let n = receiver.rejected().len();
        if n >= 3 {
            Ok(n)
        } else {
            Err(format!("{n} rejected requests"))
        }
    });
    assert!(
        receiver.accepted().is_empty(),
        "nothing can be accepted while failing"
    );
    let m = agent.metrics();
    assert_eq!(
        m.value("ferry_sink_sent_total", &[("sink", "cloud")]),
        0.0,
        "{}",
        m.ferry_lines()
    );

    // -- Phase 3: recovered. --
    receiver.set_failing(None);
    let readings = agent.eventually("all 60 readings to be delivered", |_| {
        let r = receiver.readings();
        if r.len() >= 60 {
            Ok(r)
        } else {
            Err(format!("{} delivered", r.len()))
        }
    });
    let delivered: Vec<Option<u64>> = readings.iter().map(|e| e.seq()).collect();
    let expected: Vec<Option<u64>> = (0..60).map(Some).collect();
    assert_eq!(
        delivered, expected,
        "every reading exactly once, in publish order"
    );

    // Retries re-send the same event: every rejected attempt carries the source+id
    // of the event finally accepted for that reading.
    let accepted: HashMap<u64, (String, String)> = readings
        .iter()
        .map(|e| (e.seq().unwrap(), (e.source.clone(), e.id.clone())))
        .collect();
    let rejected = receiver.rejected();
    for attempt in rejected.iter().flat_map(|r| r.events()) {
        let seq = attempt.seq().expect("a retried reading carries its seq");
        assert_eq!(
            Some(&(attempt.source.clone(), attempt.id.clone())),
            accepted.get(&seq),
            "a retry of reading {seq} changed its source/id"
        );
    }
    let m = agent.metrics();
    assert!(
        m.value("ferry_sink_sent_total", &[("sink", "cloud")]) >= 60.0,
        "{}",
        m.ferry_lines()
    );
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}

#[test]
fn an_event_the_upstream_refuses_for_good_is_dropped_and_counted_and_the_rest_of_its_batch_arrives()
{
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    receiver.refuse_containing("\"poison\"", 400);
    let mut config = TestConfig::new("gw-refusal", &broker).http(&receiver.url(), "batch");
    config.batch_max = 10;
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    let mut payloads = lines(0..20);
    payloads[7] = json!({"seq": 7, "poison": true}).to_string();
    broker.publish_lines(TOPIC, &payloads, 1);

    let readings = agent.eventually("the 19 good readings to be delivered", |_| {
        let r = receiver.readings();
        if r.len() >= 19 {
            Ok(r)
        } else {
            Err(format!("{} delivered", r.len()))
        }
    });
    let delivered: Vec<u64> = readings.iter().filter_map(|e| e.seq()).collect();
    let expected: Vec<u64> = (0..20).filter(|i| *i != 7).collect();
    assert_eq!(delivered, expected, "every good reading once, in order");
    let m = agent.wait_for_metric(
        "ferry_sink_dropped_total",
        &[("sink", "cloud"), ("reason", "rejected")],
        1.0,
    );
    assert_eq!(
        m.value(
            "ferry_sink_dropped_total",
            &[("sink", "cloud"), ("reason", "rejected")]
        ),
        1.0,
        "only the refused event is dropped: {}",
        m.ferry_lines()
    );
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}
