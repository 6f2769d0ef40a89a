//! The agent is stopped mid-stream and started again on the same data dir while a
//! publisher keeps publishing QoS 1: with SIGTERM (a clean shutdown) and with
//! SIGKILL (nothing of the shutdown runs, so only what was committed survives).
//! Every reading the broker handed over is delivered at least once; a reading
//! delivered twice carries the same `source` + `id` both times, and no id ever names
//! two different readings. An event committed before a kill is resent after the
//! restart under the id it was first sent with, and a reading the broker sends again
//! because the kill came between its commit and its PUBACK is not stored again.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::json;
use support::*;

const TOPIC: &str = "sensors/pump-7/telemetry";

/// Distinct readings delivered so far.
fn delivered(receiver: &Receiver) -> usize {
    let seqs: BTreeSet<u64> = receiver.readings().iter().filter_map(|e| e.seq()).collect();
    seqs.len()
}

fn wait_for_delivered(agent: &mut Agent, receiver: &Receiver, at_least: usize) {
    agent.eventually(&format!("{at_least} distinct readings delivered"), |_| {
        let n = delivered(receiver);
        if n >= at_least {
            Ok(n)
        } else {
            Err(format!("{n} delivered"))
        }
    });
}

/// Waits until every reading `0..published` has arrived, then checks the copies:
/// none missing, none made up, and no `source` + `id` names two different readings.
/// With `same_id_per_reading`, every copy of a reading also carries one id.
fn check_all_arrived(
    agent: &mut Agent,
    receiver: &Receiver,
    published: u64,
    same_id_per_reading: bool,
) {
    let readings = agent.eventually(
        &format!("all {published} published readings to arrive"),
        |_| {
            let r = receiver.readings();
            let seqs: BTreeSet<u64> = r.iter().filter_map(|e| e.seq()).collect();
            let missing: Vec<u64> = (0..published).filter(|s| !seqs.contains(s)).collect();
            if missing.is_empty() {
                Ok(r)
            } else {
                Err(format!(
                    "{} of {published} delivered; missing (first 20): {:?}",
                    seqs.len(),
                    &missing[..missing.len().min(20)]
                ))
            }
        },
    );

    let mut by_seq: HashMap<u64, Vec<&Event>> = HashMap::new();
    for e in &readings {
        by_seq
            .entry(e.seq().expect("seq in data"))
            .or_default()
            .push(e);
    }
    let made_up: Vec<u64> = by_seq
        .keys()
        .filter(|s| **s >= published)
        .copied()
        .collect();
    assert!(
        made_up.is_empty(),
        "readings that were never published arrived: {made_up:?}"
    );

    // A backend that drops duplicates by source+id must never lose a reading to it.
    let mut payload_of: HashMap<(&str, &str), &serde_json::Value> = HashMap::new();
    for e in &readings {
        if let Some(other) = payload_of.insert((&e.source, &e.id), &e.data) {
            assert_eq!(
                other, &e.data,
                "source+id {} {} was sent with two different payloads",
                e.source, e.id
            );
        }
    }
    if same_id_per_reading {
        for (seq, copies) in &by_seq {
            let ids: BTreeSet<(&str, &str)> = copies
                .iter()
                .map(|c| (c.source.as_str(), c.id.as_str()))
                .collect();
            assert_eq!(
                ids.len(),
                1,
                "reading {seq} was re-sent under other ids: {ids:?}"
            );
        }
    }
    eprintln!(
        "{published} readings published, {} deliveries, {} duplicates",
        readings.len(),
        readings.len() - by_seq.len()
    );
}

#[test]
fn no_reading_is_lost_when_the_agent_is_stopped_mid_stream_and_restarted() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-restart", &broker).http(&receiver.url(), "binary");
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    let stream = Stream::start(&broker, TOPIC, Duration::from_millis(10));
    for (round, after) in [(1, 60), (2, 160)] {
        wait_for_delivered(&mut agent, &receiver, after);
        assert!(
            stream.is_publishing(),
            "the publisher must still be publishing"
        );
        let status = agent.stop();
        assert!(
            status.success(),
            "ferry must exit 0 on SIGTERM (stop #{round}), got {status}"
        );
        // Let the broker queue readings for the stopped agent's session.
        stream.wait_for_more(30);
        agent.start_again();
    }
    wait_for_delivered(&mut agent, &receiver, 260);
    let published = stream.finish();

    // A clean stop commits and acknowledges in order, so a reading never needs a
    // second id.
    check_all_arrived(&mut agent, &receiver, published, true);
    let status = agent.stop();
    assert!(
        status.success(),
        "ferry must exit 0 on SIGTERM, got {status}"
    );
}

#[test]
fn no_acknowledged_reading_is_lost_when_the_agent_is_killed_mid_stream_and_restarted() {
    // Readings queue at the broker while the agent is dead: no cap on that queue, so
    // a missing reading can only be the agent's doing.
    let broker = Mosquitto::start_with("max_queued_messages 0");
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-kill", &broker).http(&receiver.url(), "batch");
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    // Fast enough that commits, acknowledgements and sends overlap when the kill comes.
    let stream = Stream::start(&broker, TOPIC, Duration::from_millis(2));
    let mut after = 0;
    // Each kill lands at a random point of the commit cycle: several of them give a
    // wrong order of commit and acknowledgement many chances to lose a reading.
    for round in 1..=10 {
        after += 60;
        wait_for_delivered(&mut agent, &receiver, after);
        assert!(
            stream.is_publishing(),
            "the publisher must still be publishing"
        );
        agent.kill();
        stream.wait_for_more(20);
        agent.start_again();
        eprintln!("kill #{round} after {after} readings delivered");
    }
    wait_for_delivered(&mut agent, &receiver, after + 100);
    let published = stream.finish();

    // A reading the broker sends again after a kill between its commit and its
    // PUBACK is recognised, so every resend carries the id of the first send.
    check_all_arrived(&mut agent, &receiver, published, true);
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}

#[test]
fn an_event_committed_before_a_kill_is_resent_after_the_restart_with_the_id_it_was_first_sent_with()
{
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    receiver.set_failing(Some(503));
    let mut config = TestConfig::new("gw-kill-ids", &broker).http(&receiver.url(), "batch");
    config.batch_max = 10;
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    let lines: Vec<String> = (0..10)
        .map(|i| json!({"pressure": 2.0, "seq": i}).to_string())
        .collect();
    broker.publish_lines(TOPIC, &lines, 1);
    agent.wait_for_metric("ferry_store_committed_total", &[], 10.0);
    // The sink keeps retrying the window it read first: those readings have been
    // sent (and refused), so their ids are on record.
    let first_ids: HashMap<u64, (String, String)> =
        agent.eventually("readings to be tried upstream", |_| {
            let tried: HashMap<u64, (String, String)> = receiver
                .rejected()
                .iter()
                .flat_map(|r| r.events())
                .map(|e| (e.seq().expect("seq in data"), (e.source, e.id)))
                .collect();
            if tried.is_empty() {
                Err("nothing tried yet".into())
            } else {
                Ok(tried)
            }
        });

    agent.kill();
    receiver.set_failing(None);
    agent.start_again();
    let readings = receiver.wait_for_readings("the 10 readings to be accepted", |r| {
        r.iter()
            .filter_map(|e| e.seq())
            .collect::<BTreeSet<_>>()
            .len()
            == 10
    });
    for e in readings
        .iter()
        .filter(|e| first_ids.contains_key(&e.seq().unwrap()))
    {
        let seq = e.seq().expect("seq in data");
        assert_eq!(
            Some(&(e.source.clone(), e.id.clone())),
            first_ids.get(&seq),
            "reading {seq} was resent under another source/id"
        );
    }

    // The sequence goes on after the kill: a new reading gets an id never used.
    broker.publish(TOPIC, json!({"pressure": 2.5, "seq": 10}).to_string(), 1);
    let readings = receiver.wait_for_reading("pump-7", 10);
    let new = readings
        .iter()
        .find(|e| e.seq() == Some(10))
        .expect("waited for it");
    assert!(
        first_ids.values().all(|(_, id)| *id != new.id),
        "the reading after the restart reused id {}",
        new.id
    );
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}

/// The crash battery: 30 SIGKILLs at random moments (mid-commit, mid-send,
/// mid-reload) under a steady QoS 1 stream. `cargo bench --bench crash_battery`
/// runs the long version and prints the counts.
#[test]
fn thirty_kills_at_random_moments_lose_no_acknowledged_reading() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let b = run_battery(30, seed, Duration::from_secs(120));
    eprintln!("{b:?}");
    assert_eq!(b.lost, 0, "{b:?}");
    assert_eq!(b.id_reused, 0, "an id named two different readings: {b:?}");
    assert_eq!(
        b.two_ids, 0,
        "a reading was stored twice, under two ids: {b:?}"
    );
    assert!(b.published > 0, "{b:?}");
}
