//! The agent is stopped with SIGTERM mid-stream and started again on the same data
//! dir, twice, while a publisher keeps publishing QoS 1: every published reading is
//! delivered at least once, and a reading delivered twice carries the same
//! `source` + `id` both times.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::*;

const TOPIC: &str = "sensors/pump-7/telemetry";

/// Distinct readings delivered so far.
fn delivered(receiver: &Receiver) -> usize {
    let mut seqs: Vec<u64> = receiver.readings().iter().filter_map(|e| e.seq()).collect();
    seqs.sort_unstable();
    seqs.dedup();
    seqs.len()
}

/// Sets the flag when dropped (also while unwinding from a failed assertion).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn no_reading_is_lost_when_the_agent_is_stopped_mid_stream_and_restarted() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-restart", &broker).http(&receiver.url(), "binary");
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    // A publisher that keeps publishing (QoS 1, one reading every 10 ms) until told
    // to stop; it reports how many readings the broker acknowledged.
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // If the test fails early, the publisher thread stops too.
    let _stop_on_failure = StopOnDrop(stop.clone());
    let mut publisher = broker.line_publisher(TOPIC, 1);
    let publishing = {
        let (sent, stop) = (sent.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                publisher
                    .send(&json!({"pressure": 1.0 + (i % 10) as f64 / 10.0, "seq": i}).to_string());
                i += 1;
                sent.store(i, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            publisher.finish(); // waits for every PUBACK
            i
        })
    };

    for (round, after) in [(1, 60), (2, 160)] {
        agent.eventually(
            &format!("{after} readings delivered before stop #{round}"),
            |_| {
                let n = delivered(&receiver);
                if n >= after {
                    Ok(n)
                } else {
                    Err(format!("{n} delivered"))
                }
            },
        );
        assert!(
            !publishing.is_finished(),
            "the publisher must still be publishing"
        );
        let status = agent.stop();
        assert!(
            status.success(),
            "ferry must exit 0 on SIGTERM (stop #{round}), got {status}"
        );

        // Let the broker queue readings for the stopped agent's session.
        let at_stop = sent.load(Ordering::Relaxed);
        eventually("the publisher to go on while the agent is down", || {
            let now = sent.load(Ordering::Relaxed);
            if now >= at_stop + 30 {
                Ok(now)
            } else {
                Err(format!("{now} sent"))
            }
        });
        agent.start_again();
    }

    agent.eventually("readings to flow after the last restart", |_| {
        let n = delivered(&receiver);
        if n >= 260 {
            Ok(n)
        } else {
            Err(format!("{n} delivered"))
        }
    });
    stop.store(true, Ordering::Relaxed);
    let published = publishing.join().expect("publisher thread");

    let readings = agent.eventually(
        &format!("all {published} published readings to arrive"),
        |_| {
            let r = receiver.readings();
            let seqs: std::collections::HashSet<u64> = r.iter().filter_map(|e| e.seq()).collect();
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

    // None lost.
    let mut by_seq: HashMap<u64, Vec<&Event>> = HashMap::new();
    for e in &readings {
        by_seq
            .entry(e.seq().expect("seq in data"))
            .or_default()
            .push(e);
    }
    let missing: Vec<u64> = (0..published).filter(|s| !by_seq.contains_key(s)).collect();
    assert!(missing.is_empty(), "readings lost: {missing:?}");
    assert_eq!(
        by_seq.len() as u64,
        published,
        "readings that were never published arrived"
    );

    // Duplicates, if any, are the same event; distinct readings never share an id
    // (a backend dropping duplicates by source+id would lose them).
    let mut owner: HashMap<(String, String), u64> = HashMap::new();
    for (seq, copies) in &by_seq {
        let first = (copies[0].source.clone(), copies[0].id.clone());
        for c in copies {
            assert_eq!(
                (c.source.clone(), c.id.clone()),
                first,
                "reading {seq} re-sent with another source/id"
            );
        }
        if let Some(other) = owner.insert(first.clone(), *seq) {
            panic!("readings {other} and {seq} share source+id {first:?}");
        }
    }
    let duplicates = readings.len() - by_seq.len();
    eprintln!(
        "{published} readings published, {} deliveries, {duplicates} duplicates",
        readings.len()
    );

    let status = agent.stop();
    assert!(
        status.success(),
        "ferry must exit 0 on SIGTERM, got {status}"
    );
}
