//! The local broker is killed and restarted on the same port (it keeps no sessions):
//! the agent reconnects, subscribes again, and readings published afterwards arrive.

mod support;

use serde_json::json;
use support::*;

const DEVICE: &str = "boiler-2";

fn publish(broker: &Mosquitto, seqs: std::ops::Range<u64>) {
    for i in seqs {
        let payload = json!({"temperature": 60 + i % 5, "seq": i}).to_string();
        broker.publish(&format!("sensors/{DEVICE}/telemetry"), payload, 1);
    }
}

#[test]
fn the_agent_reconnects_and_resubscribes_after_the_broker_restarts() {
    let mut broker = Mosquitto::start();
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-broker", &broker).http(&receiver.url(), "structured");
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    publish(&broker, 0..10);
    agent.eventually("the readings published before the restart", |_| {
        let n = receiver.readings().len();
        if n >= 10 {
            Ok(n)
        } else {
            Err(format!("{n} delivered"))
        }
    });

    for round in 1..=2 {
        broker.restart();
        // A fresh broker knows nothing of the agent: it must connect and subscribe again.
        broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");
        let from = 10 * round;
        publish(&broker, from..from + 10);
        agent.eventually(
            &format!("the readings published after restart #{round}"),
            |_| {
                let seqs: Vec<u64> = receiver.readings().iter().filter_map(|e| e.seq()).collect();
                if (from..from + 10).all(|s| seqs.contains(&s)) {
                    Ok(())
                } else {
                    Err(format!("delivered seqs: {seqs:?}"))
                }
            },
        );
    }

    let seqs: Vec<u64> = receiver.readings().iter().filter_map(|e| e.seq()).collect();
    assert_eq!(
        seqs,
        (0..30).collect::<Vec<_>>(),
        "each reading once, in order"
    );
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}
