//! End-to-end throughput benchmark: N QoS 1 readings published to a local mosquitto,
//! through the real `ferry` binary, to a local HTTP receiver.
//!
//! ```sh
//! cargo bench -p ferry-agent --bench pipeline -- [--readings N] [--mode binary|structured|batch]
//!     [--batch-max N] [--offline] [--broker-inflight N]
//! ```
//!
//! The broker keeps every queued message (`max_queued_messages` is raised from
//! mosquitto's default of 1000, past which it drops messages for a slow subscriber)
//! and lets `--broker-inflight` (mosquitto `max_inflight_messages`, default 20)
//! unacknowledged messages be in flight to ferry, which bounds ferry's group commits.
//!
//! Prints readings/s delivered, readings lost, duplicates, and ferry's peak RSS
//! (VmHWM). With `--offline` the upstream is down while the readings are published,
//! so they are all buffered first; it then also prints the store's size on disk with
//! everything buffered and how fast the backlog drains once the upstream is back.
//! It is a command that prints figures, not a test: results go in
//! docs/BENCHMARKS.md with the command that produced them.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use support::{Agent, Mosquitto, Receiver, TestConfig};

struct Args {
    readings: u64,
    mode: String,
    batch_max: usize,
    offline: bool,
    broker_inflight: u32,
}

fn args() -> Args {
    let mut a = Args {
        readings: 20_000,
        mode: "batch".to_string(),
        batch_max: 500,
        offline: false,
        broker_inflight: 20,
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
            "--offline" => a.offline = true,
            "--broker-inflight" => {
                a.broker_inflight = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(a.broker_inflight)
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

/// Bytes of all files under `dir`.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() {
    let args = args();
    let broker = Mosquitto::start_with(&format!(
        "max_queued_messages 10000000\nmax_inflight_messages {}",
        args.broker_inflight
    ));
    let port = support::free_port();
    // Offline: nobody listens on the sink's port until everything is buffered.
    let mut receiver = (!args.offline).then(|| Receiver::on_port(port));
    let url = format!("http://127.0.0.1:{port}/events");
    let mut cfg = TestConfig::new("bench", &broker).http(&url, &args.mode);
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

    let mut buffered_on_disk = None;
    let drain_start = if args.offline {
        // mosquitto_pub has had every PUBACK, so every reading is committed.
        buffered_on_disk = Some(dir_size(&agent.dir().join("data")));
        receiver = Some(Receiver::on_port(port));
        Instant::now()
    } else {
        start
    };
    let receiver = receiver.expect("receiver started");

    let deadline = Instant::now() + Duration::from_secs(600);
    let mut seen = HashSet::new();
    let mut total = 0usize;
    let mut parsed_requests = 0;
    let mut done_at = None;
    while Instant::now() < deadline {
        // Parse only the requests that arrived since the last look.
        let requests = receiver.accepted();
        for r in &requests[parsed_requests..] {
            for e in r.events() {
                total += 1;
                seen.extend(e.seq());
            }
        }
        parsed_requests = requests.len();
        if seen.len() as u64 >= args.readings {
            done_at = Some(drain_start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss = peak_rss_kib(pid);
    let elapsed = done_at.unwrap_or_else(|| drain_start.elapsed());
    let delivered = seen.len() as u64;
    let what = if args.offline {
        "drained after upstream came back"
    } else {
        "all delivered after"
    };
    println!(
        "ferry pipeline benchmark: MQTT QoS1 -> ferry -> HTTP ({} mode, batch_max {}{})",
        args.mode,
        args.batch_max,
        if args.offline {
            ", upstream down while publishing"
        } else {
            ""
        }
    );
    println!(
        "broker                mosquitto, max_inflight_messages {}",
        args.broker_inflight
    );
    println!("readings published    {}", args.readings);
    println!(
        "publish time          {:.2} s = {:.0} readings/s accepted (mosquitto_pub -l, QoS 1, PUBACK after commit)",
        published.as_secs_f64(),
        args.readings as f64 / published.as_secs_f64()
    );
    if let Some(bytes) = buffered_on_disk {
        println!(
            "store on disk         {:.1} MiB with all readings buffered",
            mib(bytes)
        );
    }
    println!("{what:<22}{:.2} s", elapsed.as_secs_f64());
    println!(
        "throughput            {:.0} readings/s {}",
        delivered as f64 / elapsed.as_secs_f64(),
        if args.offline {
            "draining the backlog"
        } else {
            "end to end"
        }
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
