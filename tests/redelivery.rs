//! One id per reading: a reading the broker delivers again because its PUBACK never
//! reached the broker after ferry committed it (a crash, a lost connection) is
//! acknowledged without being stored again, so it reaches the upstream once, under
//! the id it was committed with. A proxy between the agent and mosquitto swallows
//! the agent's PUBACKs to make that moment on purpose.

mod support;

use std::collections::BTreeSet;

use serde_json::json;
use support::*;

const TOPIC: &str = "sensors/pump-3/telemetry";

/// A broker, a proxy in front of it, an HTTP receiver and an agent that reaches the
/// broker through the proxy, subscribed.
fn setup(agent_id: &str) -> (Mosquitto, MqttProxy, Receiver, TestConfig, Agent) {
    let broker = Mosquitto::start();
    let proxy = MqttProxy::start(broker.port());
    let receiver = Receiver::start();
    let mut config = TestConfig::new(agent_id, &broker).http(&receiver.url(), "batch");
    config.broker_port = proxy.port();
    let agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");
    (broker, proxy, receiver, config, agent)
}

/// Publishes reading `seq` and waits until the agent has committed and sent it,
/// and written its PUBACK, which the proxy swallowed.
fn committed_but_not_acknowledged(
    broker: &Mosquitto,
    proxy: &MqttProxy,
    receiver: &Receiver,
    seq: u64,
) {
    proxy.drop_pubacks(true);
    let swallowed = proxy.dropped_pubacks();
    broker.publish(TOPIC, json!({"pressure": 2.0, "seq": seq}).to_string(), 1);
    receiver.wait_for_reading("pump-3", seq);
    eventually("the agent's PUBACK to be swallowed", || {
        if proxy.dropped_pubacks() > swallowed {
            Ok(())
        } else {
            Err("no PUBACK yet".into())
        }
    });
}

/// Every `source` + `id` reading `seq` arrived under.
fn ids_of(receiver: &Receiver, seq: u64) -> BTreeSet<(String, String)> {
    receiver
        .readings()
        .into_iter()
        .filter(|e| e.seq() == Some(seq))
        .map(|e| (e.source, e.id))
        .collect()
}

/// Every PUBLISH mosquitto sent `client_id`, as (DUP flag, packet id), from its log
/// lines `Sending PUBLISH to {client} (d1, q1, r0, m7, 'topic', ... )`.
fn publishes_to(broker: &Mosquitto, client_id: &str) -> Vec<(bool, u16)> {
    let needle = format!("Sending PUBLISH to {client_id} (d");
    broker
        .log()
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(&needle)? + needle.len()..];
            let dup = rest.starts_with('1');
            let m = rest.split(", ").find_map(|f| f.strip_prefix('m'))?;
            Some((dup, m.parse().ok()?))
        })
        .collect()
}

/// The first delivery was sent again, with DUP and under its own packet id.
fn assert_sent_again_under_the_same_packet_id(broker: &Mosquitto, client_id: &str) {
    let sent = publishes_to(broker, client_id);
    assert!(
        matches!(sent.as_slice(), [(false, a), (true, b), ..] if a == b),
        "{sent:?}"
    );
}

#[test]
fn a_reading_committed_before_a_kill_that_cut_off_its_puback_arrives_once_under_one_id() {
    let (broker, proxy, receiver, config, mut agent) = setup("gw-redeliver-kill");
    committed_but_not_acknowledged(&broker, &proxy, &receiver, 0);

    agent.kill();
    proxy.drop_pubacks(false);
    agent.start_again();
    // The broker still holds reading 0: it sends it again, with DUP set, and this
    // time it gets the PUBACK.
    reading_zero_is_acknowledged_once_and_arrives_under_one_id(
        &broker, &receiver, &config, &mut agent,
    );
    assert_eq!(
        agent.metrics().value("ferry_store_committed_total", &[]),
        1.0,
        "after the restart, only reading 1 was stored"
    );
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}

#[test]
fn a_reading_sent_again_after_a_lost_connection_is_acknowledged_without_a_second_id() {
    let (broker, proxy, receiver, config, mut agent) = setup("gw-redeliver-cut");
    committed_but_not_acknowledged(&broker, &proxy, &receiver, 0);

    // The connection drops with the PUBACK lost on the way; the agent reconnects
    // and the broker sends reading 0 again.
    proxy.drop_pubacks(false);
    proxy.cut();
    reading_zero_is_acknowledged_once_and_arrives_under_one_id(
        &broker, &receiver, &config, &mut agent,
    );
    assert_eq!(
        agent.metrics().value("ferry_store_committed_total", &[]),
        2.0,
        "readings 0 and 1, each once"
    );
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}

/// Once the broker has sent reading 0 again (DUP set, same packet id) and had its
/// PUBACK, a later reading 1 arrives after it, and reading 0 arrived under one id
/// only, recognised as a redelivery.
fn reading_zero_is_acknowledged_once_and_arrives_under_one_id(
    broker: &Mosquitto,
    receiver: &Receiver,
    config: &TestConfig,
    agent: &mut Agent,
) {
    eventually("the broker to get the PUBACK", || {
        match broker.pubacks_from(&config.client_id()) {
            0 => Err("none yet".into()),
            n => Ok(n),
        }
    });

    broker.publish(TOPIC, json!({"pressure": 2.0, "seq": 1}).to_string(), 1);
    receiver.wait_for_reading("pump-3", 1);
    // Had reading 0 been stored again, it would have arrived before reading 1.
    let ids = ids_of(receiver, 0);
    assert_eq!(ids.len(), 1, "reading 0 arrived under {ids:?}");
    assert_sent_again_under_the_same_packet_id(broker, &config.client_id());
    let m = agent.metrics();
    assert_eq!(
        m.value("ferry_input_redeliveries_total", &[("source", "local")]),
        1.0
    );
}

#[test]
fn a_new_reading_with_the_same_bytes_is_stored_again() {
    // Byte-identical payloads published twice are two readings: the broker sends
    // the second without DUP, under another packet id.
    let (broker, _proxy, receiver, config, mut agent) = setup("gw-redeliver-same");
    let payload = json!({"pressure": 2.0, "seq": 0}).to_string();
    broker.publish(TOPIC, &payload, 1);
    broker.publish(TOPIC, &payload, 1);
    receiver.wait_for_readings("both copies", |r| r.len() >= 2);
    let ids = ids_of(&receiver, 0);
    assert_eq!(ids.len(), 2, "two readings, two ids: {ids:?}");
    let m = agent.metrics();
    assert_eq!(m.value("ferry_input_redeliveries_total", &[]), 0.0);
    // mosquitto counts packet ids up per client: the second copy gets the next one.
    let sent = publishes_to(&broker, &config.client_id());
    assert_eq!(sent, [(false, 1), (false, 2)]);
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}
