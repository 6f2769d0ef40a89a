//! A store whose file is damaged while the agent is stopped (a power cut that cut
//! it short) does not stop the gateway: the agent moves the file aside into
//! `data_dir/quarantine/<time>/`, starts on a fresh store, counts it, logs it, tells
//! the upstream with an `io.ferry.agent.store_quarantined` event, and goes on
//! forwarding readings.

mod support;

use serde_json::json;
use support::*;

const QUARANTINED: &str = "io.ferry.agent.store_quarantined";

/// The epoch part of an event id, `{epoch}-{sequence}`.
fn epoch(e: &Event) -> &str {
    e.id.rsplit_once('-').map(|(epoch, _)| epoch).unwrap_or("")
}

#[test]
fn a_store_damaged_while_the_agent_was_stopped_is_quarantined_reported_upstream_and_readings_flow_again(
) {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-damaged", &broker).http(&receiver.url(), "batch");
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");
    for seq in 0..3 {
        broker.publish("sensors/d/telemetry", json!({"seq": seq}).to_string(), 1);
    }
    let before = receiver.wait_for_readings("the first three readings", |r| r.len() >= 3);
    let old_epoch = epoch(&before[0]).to_string();
    assert!(agent.stop().success());

    // The file cut to half its length, as a power cut can leave it.
    let data = agent.dir().join("data");
    let file = data.join("store.redb");
    let bytes = std::fs::read(&file).unwrap();
    let damaged = bytes[..bytes.len() / 2].to_vec();
    std::fs::write(&file, &damaged).unwrap();

    agent.start_again();
    let m = agent.wait_for_metric("ferry_store_quarantined_total", &[], 1.0);
    assert_eq!(m.value("ferry_store_quarantined_total", &[]), 1.0);

    // Moved whole, never deleted: quarantine/<UTC time>/store.redb.
    let folders: Vec<_> = std::fs::read_dir(data.join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(folders.len(), 1, "{folders:?}");
    let name = folders[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.len() == 16 && name.ends_with('Z') && name.as_bytes()[8] == b'T',
        "{name}"
    );
    assert_eq!(
        std::fs::read(folders[0].join("store.redb")).unwrap(),
        damaged
    );

    // Told upstream, from the agent itself.
    let events = eventually("the quarantine event upstream", || {
        let found: Vec<Event> = receiver
            .events()
            .into_iter()
            .filter(|e| e.ty == QUARANTINED)
            .collect();
        if found.is_empty() {
            Err("not yet".into())
        } else {
            Ok(found)
        }
    });
    let e = &events[0];
    assert_eq!(e.source, "/ferry/gw-damaged/agent/store");
    assert_eq!(e.subject.as_deref(), Some("gw-damaged"));
    assert_eq!(
        e.data["moved_to"].as_str(),
        Some(folders[0].to_string_lossy().as_ref())
    );
    assert!(
        e.data["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{}",
        e.data
    );
    assert!(e.data["at"].as_str().is_some(), "{}", e.data);
    assert_ne!(epoch(e), old_epoch, "the fresh store has a new epoch");
    assert!(agent.stderr_contains("moved them aside"));

    // New readings flow, under the fresh store's ids.
    broker.publish("sensors/d/telemetry", json!({"seq": 3}).to_string(), 1);
    let after = receiver.wait_for_reading("d", 3);
    let reading = after.iter().find(|r| r.seq() == Some(3)).unwrap();
    assert_eq!(epoch(reading), epoch(e));
    assert!(agent.stop().success());

    // The fresh store is a store like any other: the next start opens it.
    agent.start_again();
    agent.wait_for_metric("ferry_store_committed_total", &[], 0.0);
    assert_eq!(
        agent.metrics().value("ferry_store_quarantined_total", &[]),
        0.0
    );
    assert_eq!(
        std::fs::read_dir(data.join("quarantine")).unwrap().count(),
        1
    );
    assert!(agent.stop().success());
}
