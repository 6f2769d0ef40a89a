//! The store's backends side by side: redb and sled under the same ledger.
//!
//! ```sh
//! cargo bench -p ferry-agent --bench store_backends -- [--events N] [--backends redb,sled]
//!     [--cache SIZE_BYTES] [--pad BYTES]
//! ```
//!
//! For each backend, each step runs in its own process (so its peak RSS is its
//! own) on the same directory:
//! - `commit`: 2,000 appends of one record each, every one durable: commits/s;
//! - `fill`: N records appended in batches of 100 (durable): records/s, peak RSS,
//!   size on disk;
//! - `open`: opening the filled store: time and peak RSS;
//! - `drain`: reading and advancing a sink through all N in reads of 500: records/s,
//!   peak RSS;
//! - `bound`: a 32 MiB store under `drop_oldest` fed 96 MiB of records: its files'
//!   size over `max_bytes`.
//!
//! Records are readings of about 200 bytes, as the commit task stores them. It is a
//! command that prints figures, not a test: results go in docs/BENCHMARKS.md.

use std::path::Path;
use std::time::Instant;

mod common;

use common::{dir_size, status_kib};

use ferry_agent::config::Bytes;
use ferry_agent::store::{self, BackendKind, Record, StateWrite, Store, StoreConfig, WhenFull};

fn record(i: u64, pad: usize) -> Record {
    Record {
        source: "/ferry/gw-0042/mqtt/local".into(),
        event_type: "io.ferry.reading".into(),
        subject: format!("freezer-{}", i % 50),
        time: chrono::Utc::now(),
        data: serde_json::json!({
            "temperature": -18.5 + (i % 10) as f64 / 10.0,
            "humidity": 40 + i % 7,
            "battery": 3.1,
            "seq": i,
            "pad": "x".repeat(pad),
        })
        .into(),
        ext: Default::default(),
        to: None,
        origin: None,
    }
}

fn config(kind: BackendKind, cache: u64, max_bytes: u64) -> StoreConfig {
    StoreConfig {
        backend: kind,
        max_bytes: Bytes(max_bytes),
        when_full: WhenFull::DropOldest,
        cache_capacity: Bytes(cache),
        ..StoreConfig::default()
    }
}

fn peak_rss_kib() -> u64 {
    status_kib("self", "VmHWM").unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One step, in this process: prints one line of `key=value` figures.
fn step(name: &str, kind: BackendKind, dir: &Path, events: u64, cache: u64, pad: usize) {
    let sinks = vec!["cloud".to_string()];
    let roomy = config(kind, cache, 64 << 30);
    let none = StateWrite::default();
    match name {
        "commit" => {
            let s = store::open(dir, &roomy, &sinks).expect("open").ledger;
            let n = 2_000;
            let start = Instant::now();
            for i in 0..n {
                s.append(&[record(i, pad)], &none).expect("append");
            }
            let secs = start.elapsed().as_secs_f64();
            println!("commits_per_s={:.0}", n as f64 / secs);
        }
        "fill" => {
            let s = store::open(dir, &roomy, &sinks).expect("open").ledger;
            let start = Instant::now();
            let mut i = 0;
            while i < events {
                let batch: Vec<Record> =
                    (i..(i + 100).min(events)).map(|j| record(j, pad)).collect();
                i += batch.len() as u64;
                s.append(&batch, &none).expect("append");
            }
            let secs = start.elapsed().as_secs_f64();
            let stored = s.stats().bytes;
            drop(s);
            println!(
                "fill_per_s={:.0} fill_peak_rss_mib={:.1} stored_mib={:.1} disk_mib={:.1}",
                events as f64 / secs,
                mib(peak_rss_kib()),
                stored as f64 / 1048576.0,
                dir_size(dir) as f64 / 1048576.0
            );
        }
        "open" => {
            let start = Instant::now();
            let s = store::open(dir, &roomy, &sinks).expect("open").ledger;
            let secs = start.elapsed().as_secs_f64();
            let records = s.stats().records;
            println!(
                "open_s={secs:.3} open_records={records} open_peak_rss_mib={:.1}",
                mib(peak_rss_kib())
            );
        }
        "drain" => {
            let s = store::open(dir, &roomy, &sinks).expect("open").ledger;
            let start = Instant::now();
            let mut cursor = s.cursor("cloud").expect("cursor");
            let mut n = 0u64;
            loop {
                let read = s.read(cursor, 500, 1 << 20).expect("read");
                if read.records.is_empty() {
                    break;
                }
                n += read.records.len() as u64;
                cursor = read.next;
                s.advance("cloud", cursor).expect("advance");
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "drain_per_s={:.0} drained={n} drain_peak_rss_mib={:.1}",
                n as f64 / secs,
                mib(peak_rss_kib())
            );
        }
        "bound" => {
            let max = 32u64 << 20;
            let s = store::open(dir, &config(kind, cache, max), &sinks)
                .expect("open")
                .ledger;
            let mut fed = 0u64;
            let mut i = 0;
            while fed < 3 * max {
                let batch: Vec<Record> = (i..i + 100).map(|j| record(j, pad)).collect();
                i += 100;
                fed += batch
                    .iter()
                    .map(|r| serde_json::to_vec(r).map_or(0, |v| v.len() as u64))
                    .sum::<u64>();
                s.append(&batch, &none).expect("append");
            }
            drop(s);
            println!(
                "disk_per_max_bytes={:.2}",
                dir_size(dir) as f64 / max as f64
            );
        }
        other => panic!("unknown step {other}"),
    }
}

fn main() {
    let mut events = 100_000u64;
    let mut backends = "redb,sled".to_string();
    let mut cache = 16u64 << 20;
    let mut pad = 0usize;
    let mut child: Option<(String, String, String)> = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--events" => events = it.next().and_then(|v| v.parse().ok()).unwrap_or(events),
            "--backends" => backends = it.next().unwrap_or(backends),
            "--cache" => cache = it.next().and_then(|v| v.parse().ok()).unwrap_or(cache),
            "--pad" => pad = it.next().and_then(|v| v.parse().ok()).unwrap_or(pad),
            "--step" => {
                let (s, k, d) = (it.next(), it.next(), it.next());
                child = s.zip(k).zip(d).map(|((s, k), d)| (s, k, d));
            }
            _ => {}
        }
    }
    let kind_of = |k: &str| match k {
        "sled" => BackendKind::Sled,
        _ => BackendKind::Redb,
    };
    if let Some((name, kind, dir)) = child {
        step(&name, kind_of(&kind), Path::new(&dir), events, cache, pad);
        return;
    }

    let exe = std::env::current_exe().expect("own path");
    println!("events={events} cache={cache} pad={pad}");
    for kind in backends.split(',') {
        let base =
            tempfile::tempdir_in(std::env::var("FERRY_BENCH_DIR").unwrap_or_else(|_| ".".into()))
                .expect("temporary directory");
        let mut line = format!("backend={kind}");
        for (name, sub) in [
            ("commit", "commit"),
            ("fill", "main"),
            ("open", "main"),
            ("drain", "main"),
            ("bound", "bound"),
        ] {
            let dir = base.path().join(sub);
            let out = std::process::Command::new(&exe)
                .args([
                    "--events",
                    &events.to_string(),
                    "--cache",
                    &cache.to_string(),
                ])
                .args(["--pad", &pad.to_string(), "--step", name, kind])
                .arg(&dir)
                .output()
                .expect("run a step");
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                eprintln!(
                    "{kind} {name} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            line.push(' ');
            line.push_str(text.trim());
        }
        println!("{line}");
    }
}
