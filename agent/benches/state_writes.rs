//! Flash wear from rule state: bytes ferry writes to disk per reading that opens an
//! alert, with 0, 100 and 10,000 alerts already open.
//!
//! ```sh
//! cargo bench -p ferry-agent --bench state_writes -- [--readings N] [--open N,N,...]
//! ```
//!
//! For each number of open alerts: a fresh agent (real binary, real mosquitto, an
//! HTTP receiver) with two alert rules (a rule tracks at most 10,000 devices) gets
//! 5,000 readings of distinct devices, the first of which open an alert in both
//! rules, then `--readings` more readings from new devices, each opening two more
//! alerts (transitions, so their state is committed with them). Two figures per
//! reading over those readings: the rule state ferry wrote with its commits
//! (`ferry_store_state_bytes_total`), which must not grow with the number of open
//! alerts, since a commit writes only the alerts it changed; and the growth of the
//! agent's `write_bytes` (`/proc/PID/io`: what the process caused to be written to
//! the block layer, the store's own log writing and cleaning included), which is
//! what the flash sees.
//! It is a command that prints figures, not a test: results go in docs/BENCHMARKS.md.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use support::{Agent, Mosquitto, Receiver, TestConfig};

const RULES: &str = r#"
[[rule]]
id = "hot"
when = "t > 30.0"
clear_when = "t < 0.0"
emit = { type = "com.example.hot" }

[[rule]]
id = "very-hot"
when = "t > 35.0"
clear_when = "t < 0.0"
emit = { type = "com.example.very_hot" }
"#;

/// Records committed per reading: the reading and one alert per rule.
const RECORDS_PER_READING: usize = 3;
/// Readings every run gets before the measured ones, the first of them opening the
/// alerts: the same store history for every case, since the store's own log
/// cleaning after earlier traffic would otherwise count against the measured window.
const PRIOR: usize = 5_000;

fn write_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("write_bytes in /proc/PID/io")
}

/// Publishes one reading per device id, through one `mosquitto_pub -l` per 1,000:
/// the first `hot` open alerts, the others are cool.
fn publish(broker: &Mosquitto, prefix: &str, n: usize, hot: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let t = if i < hot { 40 } else { 10 };
            format!(r#"{{"id":"{prefix}-{i:05}","t":{t}}}"#)
        })
        .collect();
    for chunk in lines.chunks(1000) {
        broker.publish_lines("sensors/bench/telemetry", chunk, 1);
    }
}

fn main() {
    let mut readings = 200usize;
    let mut open = vec![0usize, 100, 10_000];
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--readings" => readings = it.next().and_then(|v| v.parse().ok()).unwrap_or(readings),
            "--open" => {
                open = it
                    .next()
                    .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
                    .unwrap_or(open)
            }
            _ => {}
        }
    }
    println!("| open alerts | readings | rule state written per reading | disk writes (write_bytes) per reading |");
    println!("|---|---|---|---|");
    for n in open {
        let broker = Mosquitto::start_with("max_queued_messages 0\n");
        let receiver = Receiver::start();
        let config = TestConfig::new("gw-wear", &broker).http(&receiver.url(), "batch");
        let toml = config
            .toml()
            .replace(r#"device = "{topic.1}""#, r#"device = "{payload.id}""#);
        let mut agent = Agent::start(&toml, &[("hot.toml", RULES)]);
        broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");
        let pid = agent.pid().expect("running");

        let devices = n / 2;
        assert!(devices <= PRIOR, "at most {} open alerts", 2 * PRIOR);
        publish(&broker, "open", PRIOR, devices);
        let records = PRIOR + (RECORDS_PER_READING - 1) * devices;
        agent.wait_for_metric("ferry_store_committed_total", &[], records as f64);
        // Let background flushes of what came before settle.
        std::thread::sleep(Duration::from_secs(2));
        let before = write_bytes(pid);
        let state_before = agent.metrics().value("ferry_store_state_bytes_total", &[]);
        publish(&broker, "new", readings, readings);
        let records = records + RECORDS_PER_READING * readings;
        agent.wait_for_metric("ferry_store_committed_total", &[], records as f64);
        let errors = agent.metrics().value("ferry_rule_errors_total", &[]);
        assert_eq!(errors, 0.0, "a rule could not track every device");
        std::thread::sleep(Duration::from_secs(2));
        let written = write_bytes(pid) - before;
        let state = agent.metrics().value("ferry_store_state_bytes_total", &[]) - state_before;
        println!(
            "| {n} | {readings} | {:.0} B | {} B |",
            state / readings as f64,
            written / readings as u64
        );
        agent.stop();
    }
}
