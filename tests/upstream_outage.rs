//! While the upstream is down (connection refused, then 503), readings keep being
//! accepted and buffered; once it recovers every one is delivered, in order, and
//! each retry carried the same CloudEvents `source` + `id`. An event the upstream
//! refuses for good (4xx) is counted, kept as a dead letter, and costs only itself.
//! When a long outage fills the store, `drop_oldest` removes exactly the oldest
//! readings and counts each in `store_full` that is never delivered (exactly: the
//! one the sink held while retrying is delivered, not counted), and `reject_new` withholds the PUBACKs, so the
//! broker keeps what the store has no room for.

mod support;

use std::collections::{BTreeSet, HashMap};

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
    let m = agent.wait_for_metric("ferry_dead_letters", &[], 1.0);
    assert_eq!(
        m.value("ferry_dead_letters", &[]),
        1.0,
        "the refused event is kept as a dead letter: {}",
        m.ferry_lines()
    );
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}

/// A reading of about 16 KiB: 1 MiB of store holds some 60 of them.
fn big(seq: u64) -> String {
    json!({"temperature": -18.0, "seq": seq, "pad": "x".repeat(16 * 1024)}).to_string()
}

/// Publishes readings `0..n` ten at a time, each ten only once the agent has
/// committed the ones before or has stopped committing (its store is full and
/// refuses new input): one commit never holds more than a few tens of readings, far
/// below the 1 MiB store, so the store's policy alone decides what happens.
fn publish_in_tens(agent: &mut Agent, broker: &Mosquitto, n: u64) {
    for start in (0..n).step_by(10) {
        let end = (start + 10).min(n);
        broker.publish_lines(TOPIC, &(start..end).map(big).collect::<Vec<_>>(), 1);
        agent.eventually(
            &format!("readings up to {end} committed or the store full"),
            |a| {
                let committed = a.try_metrics()?.value("ferry_store_committed_total", &[]);
                if committed >= end as f64 || a.stderr_contains("store full: holding input") {
                    Ok(())
                } else {
                    Err(format!("{committed} committed"))
                }
            },
        );
    }
}

/// A config whose 1 MiB store fills during an outage of the `cloud` sink, which
/// reads (and then holds while retrying) one event at a time.
fn small_store(
    agent_id: &str,
    broker: &Mosquitto,
    upstream: &DownPort,
    when_full: &str,
) -> TestConfig {
    let mut config = TestConfig::new(agent_id, broker).http(&upstream.url(), "batch");
    config.batch_max = 1;
    config.store_max_bytes = "1MiB".into();
    config.when_full = when_full.into();
    config
}

#[test]
fn when_an_outage_fills_the_store_drop_oldest_removes_exactly_the_oldest_readings_and_counts_them()
{
    const N: u64 = 100;
    let broker = Mosquitto::start();
    let upstream = DownPort::hold();
    let config = small_store("gw-drop-oldest", &broker, &upstream, "drop_oldest");
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    publish_in_tens(&mut agent, &broker, N);
    // The store counts what it drops inside the commit, before the commit is
    // counted: once all N are committed, every drop so far is counted.
    let m = agent.eventually("every reading committed", |a| {
        let m = a.metrics();
        if m.value("ferry_store_committed_total", &[]) >= N as f64 {
            Ok(m)
        } else {
            Err(m.ferry_lines())
        }
    });
    let dropped = m.value("ferry_store_dropped_total", &[("reason", "store_full")]);
    assert!(
        dropped >= 1.0,
        "the store never filled: {}",
        m.ferry_lines()
    );
    assert!(
        m.value("ferry_store_bytes", &[]) <= (1024 * 1024) as f64,
        "the store outgrew max_bytes: {}",
        m.ferry_lines()
    );

    let receiver = Receiver::on(upstream);
    let readings = receiver.wait_for_reading("freezer-1", N - 1);
    let seqs: BTreeSet<u64> = readings.iter().filter_map(|e| e.seq()).collect();
    // What is left is the newest readings, without a gap...
    let kept = (0..N).rev().take_while(|s| seqs.contains(s)).count() as u64;
    // ...plus the one event the sink had read before the outage and held while
    // retrying: it left the store to make room, but the sink still had it and
    // delivered it, so it is not counted dropped.
    let held: Vec<u64> = seqs.iter().copied().filter(|s| *s < N - kept).collect();
    assert_eq!(
        held,
        [0],
        "readings other than the oldest were dropped: delivered {seqs:?}"
    );
    // Exact: every reading is delivered or counted dropped, never both, never neither.
    assert_eq!(
        dropped,
        (N - seqs.len() as u64) as f64,
        "store_full counts exactly the readings that were not delivered, delivered {seqs:?}"
    );
    eprintln!("{kept} newest kept, {dropped} dropped, held and delivered: {held:?}");
    let m = agent.metrics();
    assert_eq!(
        m.value("ferry_store_dropped_total", &[("reason", "store_full")]),
        dropped,
        "nothing more is dropped once the upstream is back: {}",
        m.ferry_lines()
    );
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}

#[test]
fn when_an_outage_fills_the_store_reject_new_withholds_pubacks_and_the_broker_redelivers_after_a_kill(
) {
    const N: u64 = 100;
    let broker = Mosquitto::start();
    let upstream = DownPort::hold();
    let config = small_store("gw-reject-new", &broker, &upstream, "reject_new");
    let mut agent = Agent::start(&config.toml(), &[]);
    let client = config.client_id();
    broker.wait_for_subscription(&client, "sensors/+/telemetry");

    publish_in_tens(&mut agent, &broker, N);
    agent.eventually("the store to refuse a batch", |a| {
        if a.stderr_contains("store full: holding input") {
            Ok(())
        } else {
            Err("no \"store full\" in the log".into())
        }
    });
    // The agent holds readings it received and could not commit...
    let committed = agent.eventually("readings handed over but not committed", |a| {
        let m = a.try_metrics()?;
        let committed = m.value("ferry_store_committed_total", &[]) as usize;
        let handed = broker.publishes_to(&client);
        if handed > committed {
            Ok(committed)
        } else {
            Err(format!("{handed} handed over, {committed} committed"))
        }
    });
    assert!(committed < N as usize, "the store never filled");
    // ...and has acknowledged only what is committed. The count of PUBACKs is read
    // before the (monotonic) commit count, so the check holds at every moment.
    let acked = broker.pubacks_from(&client);
    let m = agent.metrics();
    let committed = m.value("ferry_store_committed_total", &[]) as usize;
    assert!(acked > 0, "the committed readings were never acknowledged");
    eprintln!("{acked} acknowledged, {committed} committed");
    assert!(
        acked <= committed,
        "{acked} readings acknowledged but only {committed} committed: {}",
        m.ferry_lines()
    );
    assert_eq!(
        m.value("ferry_store_dropped_total", &[("reason", "store_full")]),
        0.0,
        "reject_new never drops: {}",
        m.ferry_lines()
    );

    // What was not acknowledged is still the broker's: it survives the agent.
    agent.kill();
    let receiver = Receiver::on(upstream);
    agent.start_again();
    let readings = receiver.wait_for_readings("every published reading to arrive", |r| {
        r.iter()
            .filter_map(|e| e.seq())
            .collect::<BTreeSet<_>>()
            .len()
            == N as usize
    });
    let seqs: BTreeSet<u64> = readings.iter().filter_map(|e| e.seq()).collect();
    assert_eq!(
        seqs,
        (0..N).collect(),
        "exactly the published readings arrived"
    );
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}
