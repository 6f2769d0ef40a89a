//! End-to-end throughput benchmark: N QoS 1 readings published to a local mosquitto,
//! through the real `ferry` binary, to a local HTTP receiver.
//!
//! ```sh
//! cargo bench -p ferry-agent --bench pipeline -- [--readings N] [--mode binary|structured|batch]
//!     [--batch-max N] [--offline] [--broker-inflight N] [--max-bytes SIZE]
//!     [--pad BYTES] [--cache SIZE]
//! ```
//!
//! `--cache SIZE` sets `store.cache_capacity` (default: ferry's).
//!
//! `--pad BYTES` adds a string of that many bytes to every reading (large payloads:
//! memory and disk must stay bounded by configuration, not by what is sent).
//!
//! The broker keeps every queued message (`max_queued_messages` is raised from
//! mosquitto's default of 1000, past which it drops messages for a slow subscriber)
//! and lets `--broker-inflight` (mosquitto `max_inflight_messages`, default 20)
//! unacknowledged messages be in flight to ferry, which bounds ferry's group commits.
//!
//! Prints readings/s delivered, readings lost, duplicates, ferry's CPU time and
//! its peak RSS (VmHWM). `FERRY_BIN=path/to/ferry` measures that binary instead of
//! the one cargo built (e.g. a static musl build). With `--offline` the upstream is
//! down while the readings are published, so they are all buffered first; it then
//! also prints the store's size on disk with everything buffered and how fast the
//! backlog drains once the upstream is back.
//! It is a command that prints figures, not a test: results go in
//! docs/BENCHMARKS.md with the command that produced them.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{dir_size, status_kib};
use support::{eventually_within, Agent, Mosquitto, Receiver, TestConfig};

struct Args {
    readings: u64,
    mode: String,
    batch_max: usize,
    offline: bool,
    broker_inflight: u32,
    max_bytes: String,
    cache: Option<String>,
    pad: usize,
}

fn args() -> Args {
    let mut a = Args {
        readings: 20_000,
        mode: "batch".to_string(),
        batch_max: 500,
        offline: false,
        broker_inflight: 20,
        max_bytes: "256MiB".to_string(),
        cache: None,
        pad: 0,
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
            "--pad" => a.pad = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.pad),
            "--max-bytes" => a.max_bytes = it.next().unwrap_or(a.max_bytes),
            "--cache" => a.cache = it.next(),
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

/// CPU time a process used so far (user + system), in seconds: what a build costs
/// per reading, which the end-to-end rate hides when the publisher is the bottleneck.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses: state is field 3,
    // utime 14 and stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
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
    if args.pad > 0 {
        cfg.max_payload = Some(format!("{}B", args.pad + 1024));
    }
    let mut store = format!("max_bytes = {:?}", args.max_bytes);
    if let Some(cache) = &args.cache {
        store.push_str(&format!("\ncache_capacity = {cache:?}"));
    }
    let config = cfg.toml().replace("max_bytes = \"64MiB\"", &store);
    let agent = Agent::start(&config, &[]);
    broker.wait_for_subscription(&cfg.client_id(), "sensors/+/telemetry");
    let pid = agent.pid().expect("agent running");

    let pad = "x".repeat(args.pad);
    let lines: Vec<String> = (0..args.readings)
        .map(|i| {
            if pad.is_empty() {
                format!(r#"{{"seq":{i},"temperature":{}.5,"humidity":40}}"#, i % 40)
            } else {
                format!(r#"{{"seq":{i},"temperature":{}.5,"pad":"{pad}"}}"#, i % 40)
            }
        })
        .collect();
    let start = Instant::now();
    // One mosquitto_pub per 10000 lines: a single `mosquitto_pub -l` was seen to
    // exit successfully after publishing only part of 100000 lines.
    for chunk in lines.chunks(10_000) {
        broker.publish_lines("sensors/bench-1/telemetry", chunk, 1);
    }
    let published = start.elapsed();

    let mut buffered_on_disk = None;
    let mut ingest = None;
    let drain_start = if args.offline {
        // The broker acknowledged the publisher; wait until ferry has committed
        // (and so acknowledged) every reading too.
        let n = args.readings as f64;
        eventually_within(Duration::from_secs(600), "every reading committed", || {
            let m = agent.try_metrics()?;
            let c = m.value("ferry_store_committed_total", &[]);
            if c >= n {
                Ok(())
            } else {
                Err(format!("{c} committed"))
            }
        });
        ingest = Some(start.elapsed());
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
    let mut dropped = 0u64;
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
        // Readings the store bound dropped (drop_oldest) will never arrive.
        if let Ok(m) = agent.try_metrics() {
            dropped = m.value("ferry_store_dropped_total", &[("reason", "store_full")]) as u64;
        }
        if seen.len() as u64 + dropped >= args.readings {
            done_at = Some(drain_start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss = status_kib(&pid.to_string(), "VmHWM");
    let cpu = cpu_seconds(pid);
    let rss_after = status_kib(&pid.to_string(), "VmRSS");
    let disk_after = dir_size(&agent.dir().join("data"));
    let elapsed = done_at.unwrap_or_else(|| drain_start.elapsed());
    let delivered = seen.len() as u64;
    let what = if args.offline {
        "backlog drained in"
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
        "publish time          {:.2} s = {:.0} readings/s accepted (mosquitto_pub -l to the broker, QoS 1)",
        published.as_secs_f64(),
        args.readings as f64 / published.as_secs_f64()
    );
    if let Some(t) = ingest {
        println!(
            "all committed after   {:.2} s = {:.0} readings/s into the store, upstream down",
            t.as_secs_f64(),
            args.readings as f64 / t.as_secs_f64()
        );
    }
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
        "dropped, store full   {dropped} (counted; store.max_bytes = {})",
        args.max_bytes
    );
    println!(
        "lost                  {} (neither delivered nor counted as dropped)",
        args.readings.saturating_sub(delivered + dropped)
    );
    println!("duplicates            {}", total.saturating_sub(seen.len()));
    if let Some(secs) = cpu {
        println!(
            "ferry CPU time        {secs:.2} s user + system = {:.1} µs per reading",
            secs * 1e6 / args.readings as f64
        );
    }
    match rss {
        Some(kib) => println!("ferry peak RSS        {:.1} MiB", kib as f64 / 1024.0),
        None => println!("ferry peak RSS        unknown"),
    }
    if let Some(kib) = rss_after {
        println!("ferry RSS after       {:.1} MiB", kib as f64 / 1024.0);
    }
    println!("store on disk after   {:.1} MiB", mib(disk_after));
    drop(agent);
}
