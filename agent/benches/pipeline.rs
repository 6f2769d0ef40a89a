//! End-to-end throughput benchmark: N QoS 1 readings published to a local mosquitto,
//! through the real `ferry` binary, to a local HTTP receiver.
//!
//! ```sh
//! cargo bench -p ferry-agent --bench pipeline -- [--readings N] [--mode binary|structured|batch]
//! ```
//!
//! Prints readings/s delivered, readings lost, duplicates, and ferry's peak RSS
//! (VmHWM). It is a command that prints figures, not a test: results go in
//! docs/BENCHMARKS.md with the command that produced them.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::{Agent, Mosquitto, Receiver, TestConfig};

struct Args {
    readings: u64,
    mode: String,
    batch_max: usize,
}

fn args() -> Args {
    let mut a = Args {
        readings: 20_000,
        mode: "batch".to_string(),
        batch_max: 500,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--readings" => {
                a.readings = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.readings)
            }
            "--mode" => a.mode = it.next().unwrap_or(a.mode),
            "--batch-max" => {
                a.batch_max = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(a.batch_max)
            }
            // `cargo bench` passes `--bench`; ignore what we do not know.
            _ => {}
        }
    }
    a
}

/// Peak resident set size of a process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() {
    let args = args();
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let mut cfg = TestConfig::new("bench", &broker).http(&receiver.url(), &args.mode);
    cfg.batch_max = args.batch_max;
    let agent = Agent::start(&cfg.toml(), &[]);
    broker.wait_for_subscription(&cfg.client_id(), "sensors/+/telemetry");
    let pid = agent.pid().expect("agent running");

    let lines: Vec<String> = (0..args.readings)
        .map(|i| format!(r#"{{"seq":{i},"temperature":{}.5,"humidity":40}}"#, i % 40))
        .collect();
    let start = Instant::now();
    broker.publish_lines("sensors/bench-1/telemetry", &lines, 1);
    let published = start.elapsed();

    let deadline = Instant::now() + Duration::from_secs(600);
    let mut seen = HashSet::new();
    let mut total = 0usize;
    let mut done_at = None;
    while Instant::now() < deadline {
        let readings = receiver.readings();
        total = readings.len();
        seen = readings.iter().filter_map(|e| e.seq()).collect();
        if seen.len() as u64 >= args.readings {
            done_at = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let rss = peak_rss_kib(pid);
    let elapsed = done_at.unwrap_or_else(|| start.elapsed());
    let delivered = seen.len() as u64;
    println!(
        "ferry pipeline benchmark: MQTT QoS1 -> ferry -> HTTP ({} mode, batch_max {})",
        args.mode, args.batch_max
    );
    println!("readings published    {}", args.readings);
    println!(
        "publish time          {:.2} s (mosquitto_pub -l, QoS 1, acked by ferry after commit)",
        published.as_secs_f64()
    );
    println!("all delivered after   {:.2} s", elapsed.as_secs_f64());
    println!(
        "throughput            {:.0} readings/s end to end",
        delivered as f64 / elapsed.as_secs_f64()
    );
    println!("delivered             {delivered}");
    println!(
        "lost                  {}",
        args.readings.saturating_sub(delivered)
    );
    println!("duplicates            {}", total.saturating_sub(seen.len()));
    match rss {
        Some(kib) => println!("ferry peak RSS        {:.1} MiB", kib as f64 / 1024.0),
        None => println!("ferry peak RSS        unknown"),
    }
    drop(agent);
}
