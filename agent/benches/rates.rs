//! What a reading costs at the rates gateways see: CPU per reading, latency and peak
//! memory of the real `ferry` binary, next to a bare subscriber on the same broker
//! in the same run.
//!
//! ```sh
//! cargo bench -p ferry-agent --bench rates -- [--rate 100|2000|full ...]
//!     [--seconds S] [--readings N] [--devices N] [--linger DURATION]
//!     [--broker-inflight N] [--durable-subscriber]
//! ```
//!
//! For each rate (default: 100/s, 2,000/s and full speed) it starts a fresh
//! mosquitto on a loopback port, a local HTTP receiver, `ferry run` (an MQTT source,
//! a threshold rule that evaluates every reading and never fires, the store, an HTTP
//! sink in batch mode) and a bare subscriber: this bench's own executable started
//! again as a plain rumqttc client that subscribes with QoS 1 and only counts. A
//! publisher thread then sends QoS 1 readings to both, paced at the rate for
//! `--seconds` (default 20), or `--readings` (default 100,000) as fast as the
//! broker takes them. Every reading carries the time it was published, so latency
//! is publish to HTTP request received (ferry) or publish to delivery (bare).
//!
//! Prints, for ferry and the bare subscriber: CPU per reading (user + system,
//! process-wide, read with `clock_getcpuclockid` from just before the first
//! publish until everything has arrived), their ratio, p50/p99 latency, readings/s
//! delivered and peak RSS (`VmHWM`). Figures are only comparable within one run:
//! the machine is shared. `FERRY_BIN=path/to/ferry` measures another build (e.g. a
//! static musl binary); `--linger` sets `store.commit_linger` (default: ferry's);
//! `--broker-inflight N` sets mosquitto's `max_inflight_messages` (default 20, its
//! own default); the source's `broker_inflight` always matches it, as its
//! documentation asks.
//!
//! `--durable-subscriber` adds a third process on the same broker: the least any
//! subscriber must do to keep ferry's promise (a reading is acknowledged only once
//! it is on stable storage). It holds each reading's PUBACK, and when the broker's
//! window of readings waits or the linger (ferry's `commit_linger`) has passed
//! since the first, appends their payloads to a file, `fdatasync`s it and
//! acknowledges them; no decoding, rules, store or upstream. Its latency is publish
//! to durable. What ferry costs beyond it is what ferry's own work costs.
//! Results go in docs/BENCHMARKS.md with the command.

#[path = "../../tests/support/mod.rs"]
mod support;

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::status_kib;
use rumqttc::{AsyncClient, Client, Event, MqttOptions, Packet, Publish, QoS};
use support::{Agent, Mosquitto, Receiver, TestConfig, READING};

/// Set in the environment of the bench's own executable started as the bare
/// subscriber: `port readings`, or `port readings window linger_us` for the
/// durable one.
const BARE: &str = "FERRY_BENCH_BARE_SUBSCRIBER";
const TOPICS: &str = "sensors/+/telemetry";

const RULES: &str = r#"
[[rule]]
id = "too-hot"
match = { device = "bench-*" }
when = "temperature > 80"
clear_when = "temperature < 70"
emit = { type = "io.bench.too-hot", severity = "warning" }
"#;

#[derive(Clone, Copy)]
enum Rate {
    PerSecond(u32),
    Full,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::PerSecond(r) => write!(f, "{r}/s"),
            Rate::Full => write!(f, "full speed"),
        }
    }
}

struct Args {
    rates: Vec<Rate>,
    seconds: f64,
    readings: u64,
    devices: u32,
    linger: Option<String>,
    inflight: Option<u32>,
    durable: bool,
}

fn args() -> Args {
    let mut a = Args {
        rates: Vec::new(),
        seconds: 20.0,
        readings: 100_000,
        devices: 20,
        linger: None,
        inflight: None,
        durable: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_default();
        match arg.as_str() {
            "--rate" => match value().as_str() {
                "full" => a.rates.push(Rate::Full),
                r => match r.parse() {
                    Ok(r) if r > 0 => a.rates.push(Rate::PerSecond(r)),
                    _ => panic!("--rate takes readings per second or `full`, not {r:?}"),
                },
            },
            "--seconds" => a.seconds = value().parse().unwrap_or(a.seconds),
            "--readings" => a.readings = value().parse().unwrap_or(a.readings),
            "--devices" => a.devices = value().parse().unwrap_or(a.devices).max(1),
            "--linger" => a.linger = Some(value()),
            "--broker-inflight" => a.inflight = value().parse().ok(),
            "--durable-subscriber" => a.durable = true,
            // `cargo bench` passes `--bench`; ignore what we do not know.
            _ => {}
        }
    }
    if a.rates.is_empty() {
        a.rates = vec![Rate::PerSecond(100), Rate::PerSecond(2000), Rate::Full];
    }
    a
}

fn main() {
    if let Ok(spec) = std::env::var(BARE) {
        bare_subscriber(&spec);
    }
    let args = args();
    println!("ferry rates benchmark: MQTT QoS 1 -> ferry (rule, store, HTTP batch sink) vs a bare QoS 1 subscriber");
    let mut rows = Vec::new();
    for &rate in &args.rates {
        let readings = match rate {
            Rate::PerSecond(r) => (r as f64 * args.seconds).round() as u64,
            Rate::Full => args.readings,
        };
        let row = run(rate, readings, &args);
        row.print();
        rows.push(row);
    }
    println!();
    println!("| rate | readings | ferry CPU/reading | bare CPU/reading | ratio | ferry p50 / p99 | bare p50 / p99 | ferry readings/s | bare readings/s | ferry peak RSS | lost |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} µs | {:.1} µs | {:.1}× | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.0} | {:.0} | {:.1} MiB | {} |",
            r.rate,
            r.readings,
            r.ferry.cpu_us_per_reading,
            r.bare.cpu_us_per_reading,
            r.ferry.cpu_us_per_reading / r.bare.cpu_us_per_reading,
            r.ferry.p50_ms,
            r.ferry.p99_ms,
            r.bare.p50_ms,
            r.bare.p99_ms,
            r.ferry.per_second,
            r.bare.per_second,
            r.ferry.peak_rss_mib,
            r.lost,
        );
    }
    if args.durable {
        println!();
        println!("| rate | ferry CPU/reading | durable subscriber CPU/reading | ferry / durable | durable p50 / p99 |");
        println!("|---|---|---|---|---|");
        for r in &rows {
            if let Some(d) = &r.durable {
                println!(
                    "| {} | {:.1} µs | {:.1} µs | {:.1}× | {:.1} / {:.1} ms |",
                    r.rate,
                    r.ferry.cpu_us_per_reading,
                    d.cpu_us_per_reading,
                    r.ferry.cpu_us_per_reading / d.cpu_us_per_reading,
                    d.p50_ms,
                    d.p99_ms
                );
            }
        }
    }
}

/// What one process did with the readings of one run.
#[derive(Default)]
struct Side {
    cpu_us_per_reading: f64,
    p50_ms: f64,
    p99_ms: f64,
    per_second: f64,
    peak_rss_mib: f64,
}

/// The largest anonymous and file-backed resident memory seen while sampling.
#[derive(Default)]
struct Split {
    anon_kib: u64,
    file_kib: u64,
}

impl Split {
    fn sample(&mut self, pid: u32) {
        let pid = pid.to_string();
        self.anon_kib = self.anon_kib.max(status_kib(&pid, "RssAnon").unwrap_or(0));
        self.file_kib = self.file_kib.max(status_kib(&pid, "RssFile").unwrap_or(0));
    }
}

struct Row {
    rate: Rate,
    readings: u64,
    published_per_second: f64,
    ferry: Side,
    /// ferry's resident memory split, sampled every 50 ms.
    ferry_split: Split,
    bare: Side,
    /// The durable subscriber, with `--durable-subscriber`.
    durable: Option<Side>,
    lost: u64,
    duplicates: u64,
}

impl Row {
    fn print(&self) {
        println!();
        println!(
            "rate {}: {} readings published at {:.0}/s",
            self.rate, self.readings, self.published_per_second
        );
        let durable = self.durable.iter().map(|d| ("durable", d));
        for (who, s) in [("ferry", &self.ferry), ("bare subscriber", &self.bare)]
            .into_iter()
            .chain(durable)
        {
            println!(
                "  {who:<16} CPU {:>6.1} µs/reading  latency p50 {:>6.1} ms  p99 {:>6.1} ms  {:>7.0} readings/s  peak RSS {:>5.1} MiB",
                s.cpu_us_per_reading, s.p50_ms, s.p99_ms, s.per_second, s.peak_rss_mib
            );
        }
        println!(
            "  ferry resident memory, largest sampled: {:.1} MiB anonymous, {:.1} MiB file-backed (its binary and libraries)",
            self.ferry_split.anon_kib as f64 / 1024.0,
            self.ferry_split.file_kib as f64 / 1024.0
        );
        println!(
            "  ferry / bare CPU {:.1}×; ferry lost {}, duplicates {}",
            self.ferry.cpu_us_per_reading / self.bare.cpu_us_per_reading,
            self.lost,
            self.duplicates
        );
    }
}

fn run(rate: Rate, readings: u64, args: &Args) -> Row {
    let inflight = args.inflight.unwrap_or(20);
    let broker = Mosquitto::start_with(&format!(
        "max_queued_messages 10000000\nmax_inflight_messages {inflight}"
    ));
    let receiver = Receiver::start();
    let mut cfg = TestConfig::new("bench", &broker).http(&receiver.url(), "batch");
    cfg.batch_max = 500;
    cfg.topics = vec![TOPICS.to_string()];
    cfg.store_max_bytes = "256MiB".to_string();
    let mut config = cfg.toml();
    // Configured as the source's docs say: its window is the broker's.
    config = config.replace(
        "\nqos = 1\n",
        &format!("\nqos = 1\nbroker_inflight = {inflight}\n"),
    );
    if let Some(linger) = &args.linger {
        config = config.replace(
            "\n[store]\n",
            &format!("\n[store]\ncommit_linger = {linger:?}\n"),
        );
    }
    let agent = Agent::start(&config, &[("bench.toml", RULES)]);
    broker.wait_for_subscription(&cfg.client_id(), TOPICS);
    let ferry_pid = agent.pid().expect("agent running");
    let bare = Bare::start(broker.port(), &format!("{readings}"));
    let linger_us = args
        .linger
        .as_deref()
        .map(|l| humantime::parse_duration(l).expect("--linger is a duration"))
        // ferry's own default when not given, so both linger alike.
        .unwrap_or(ferry_agent::store::StoreConfig::default().commit_linger.0)
        .as_micros();
    let durable = args
        .durable
        .then(|| Bare::start(broker.port(), &format!("{readings} {inflight} {linger_us}")));
    // Let both settle after start (store open, connections) before measuring.
    std::thread::sleep(Duration::from_secs(1));

    let ferry_cpu = CpuClock::of(ferry_pid);
    let bare_cpu = CpuClock::of(bare.child.id());
    let durable_cpu = durable.as_ref().map(|d| CpuClock::of(d.child.id()));
    let (ferry_cpu0, bare_cpu0) = (ferry_cpu.now(), bare_cpu.now());
    let durable_cpu0 = durable_cpu.as_ref().map(CpuClock::now);
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = Arc::clone(&sampling);
        std::thread::spawn(move || {
            let mut split = Split::default();
            while sampling.load(Ordering::Relaxed) {
                split.sample(ferry_pid);
                std::thread::sleep(Duration::from_millis(50));
            }
            split
        })
    };
    let start = SystemTime::now();
    let published = publish(broker.port(), readings, rate, args.devices);
    let published_per_second = readings as f64 / published.as_secs_f64();

    // Wait for everything to arrive on both sides.
    let deadline = Instant::now() + Duration::from_secs(600) + published;
    let mut ferry_latency = Vec::with_capacity(readings as usize);
    let mut seen = HashSet::new();
    let mut parsed = 0;
    let mut total = 0u64;
    let mut ferry_last = start;
    while (seen.len() as u64) < readings && Instant::now() < deadline {
        let new = receiver.requests_from(parsed);
        parsed += new.len();
        for r in new.iter().filter(|r| r.status == 200) {
            for (seq, sent) in readings_in(&r.body) {
                total += 1;
                if seen.insert(seq) {
                    ferry_latency.push(since(sent, r.at));
                }
            }
            ferry_last = ferry_last.max(r.at);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let bare_report = bare.report(deadline);
    let durable_report = durable.as_ref().map(|d| d.report(deadline));
    // A moment for the last acknowledgements and cursor moves, on both sides.
    std::thread::sleep(Duration::from_millis(300));
    let ferry_cpu_used = ferry_cpu.now().saturating_sub(ferry_cpu0);
    let bare_cpu_used = bare_cpu.now().saturating_sub(bare_cpu0);
    let durable_cpu_used = durable_cpu
        .zip(durable_cpu0)
        .map(|(c, c0)| c.now().saturating_sub(c0));
    let peak = |pid: u32| status_kib(&pid.to_string(), "VmHWM").unwrap_or(0) as f64 / 1024.0;
    let ferry_rss = peak(ferry_pid);
    sampling.store(false, Ordering::Relaxed);
    let split = sampler.join().expect("memory sampler");
    let bare_rss = peak(bare.child.id());
    let durable_rss = durable.as_ref().map(|d| peak(d.child.id()));
    drop(bare);
    drop(durable);
    drop(agent);

    let per_reading = |cpu: Duration| cpu.as_secs_f64() * 1e6 / readings as f64;
    let rate_until = |last: SystemTime| {
        let took = last.duration_since(start).unwrap_or_default().as_secs_f64();
        readings as f64 / took.max(1e-9)
    };
    let (ferry_p50, ferry_p99) = percentiles(&mut ferry_latency);
    Row {
        rate,
        readings,
        published_per_second,
        ferry: Side {
            cpu_us_per_reading: per_reading(ferry_cpu_used),
            p50_ms: ferry_p50,
            p99_ms: ferry_p99,
            per_second: rate_until(ferry_last),
            peak_rss_mib: ferry_rss,
        },
        ferry_split: split,
        bare: Side {
            cpu_us_per_reading: per_reading(bare_cpu_used),
            p50_ms: bare_report.p50_ms,
            p99_ms: bare_report.p99_ms,
            per_second: rate_until(UNIX_EPOCH + Duration::from_micros(bare_report.last_us)),
            peak_rss_mib: bare_rss,
        },
        durable: durable_report.zip(durable_cpu_used).zip(durable_rss).map(
            |((report, cpu), rss)| Side {
                cpu_us_per_reading: per_reading(cpu),
                p50_ms: report.p50_ms,
                p99_ms: report.p99_ms,
                per_second: rate_until(UNIX_EPOCH + Duration::from_micros(report.last_us)),
                peak_rss_mib: rss,
            },
        ),
        lost: readings.saturating_sub(seen.len() as u64),
        duplicates: total.saturating_sub(seen.len() as u64),
    }
}

/// `(seq, sent_us)` of every reading in a batch request's body; other events
/// (none are expected: the rule never fires) are skipped.
fn readings_in(body: &[u8]) -> Vec<(u64, u64)> {
    let events: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap_or_default();
    events
        .iter()
        .filter(|e| e["type"] == READING)
        .filter_map(|e| Some((e["data"]["seq"].as_u64()?, e["data"]["sent_us"].as_u64()?)))
        .collect()
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

/// Latency in µs from a publish time to `at`.
fn since(sent_us: u64, at: SystemTime) -> u64 {
    micros(at).saturating_sub(sent_us)
}

/// p50 and p99 of latencies in µs, in ms.
fn percentiles(v: &mut [u64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    (at(0.50), at(0.99))
}

/// Publishes `readings` QoS 1 readings round-robin over `devices`, paced at `rate`,
/// and returns once the broker has acknowledged all of them.
fn publish(port: u16, readings: u64, rate: Rate, devices: u32) -> Duration {
    let mut opts = MqttOptions::new("bench-publisher", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = Client::new(opts, 1000);
    let acks = std::thread::spawn(move || {
        let mut acked = 0;
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked += 1;
                    if acked == readings {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("publisher connection: {e}"),
            }
        }
    });
    let start = Instant::now();
    for i in 0..readings {
        if let Rate::PerSecond(r) = rate {
            let due = start + Duration::from_secs_f64(i as f64 / r as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let payload = format!(
            r#"{{"seq":{i},"sent_us":{},"temperature":{}.5,"humidity":40}}"#,
            micros(SystemTime::now()),
            20 + i % 10
        );
        let topic = format!("sensors/bench-{}/telemetry", i % devices as u64);
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .expect("publish to the broker");
    }
    acks.join().expect("publisher acknowledgements");
    let took = start.elapsed();
    let _ = client.disconnect();
    took
}

/// A process's CPU clock: user + system time of all its threads, dead ones included.
struct CpuClock(libc::clockid_t);

impl CpuClock {
    fn of(pid: u32) -> CpuClock {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: clock_getcpuclockid writes one clockid_t through the pointer.
        let rc = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) };
        assert_eq!(rc, 0, "no CPU clock for process {pid}");
        CpuClock(clock)
    }

    fn now(&self) -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec through the pointer.
        let rc = unsafe { libc::clock_gettime(self.0, &mut ts) };
        assert_eq!(rc, 0, "reading a process CPU clock");
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }
}

/// The bare subscriber, running as a child process (so its CPU and memory are its
/// own). It prints `ready` once subscribed, then `done <p50_us> <p99_us> <last_us>`
/// when it has every reading, and exits when its stdin closes.
struct Bare {
    child: Child,
    lines: mpsc::Receiver<String>,
}

struct BareReport {
    p50_ms: f64,
    p99_ms: f64,
    last_us: u64,
}

impl Bare {
    /// `spec` is `readings`, or `readings window linger_us` for the durable one.
    fn start(port: u16, spec: &str) -> Bare {
        let mut child = Command::new(std::env::current_exe().expect("own executable"))
            .env(BARE, format!("{port} {spec}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the bare subscriber");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let bare = Bare { child, lines };
        match bare.lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line == "ready" => bare,
            other => panic!("the bare subscriber did not subscribe: {other:?}"),
        }
    }

    fn report(&self, deadline: Instant) -> BareReport {
        let wait = deadline.saturating_duration_since(Instant::now());
        let line = self
            .lines
            .recv_timeout(wait)
            .expect("the bare subscriber received every reading");
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        assert_eq!(f.len(), 3, "bare subscriber report {line:?}");
        BareReport {
            p50_ms: f[0] as f64 / 1000.0,
            p99_ms: f[1] as f64 / 1000.0,
            last_us: f[2],
        }
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// The bare subscriber's whole life: subscribe with QoS 1, note each reading's
/// latency, report, and keep acknowledging until stdin closes.
fn bare_subscriber(spec: &str) -> ! {
    let mut it = spec
        .split_whitespace()
        .filter_map(|v| v.parse::<u64>().ok());
    let (Some(port), Some(readings)) = (it.next(), it.next()) else {
        panic!("{BARE} is `port readings [window linger_us]`, not {spec:?}");
    };
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    if let (Some(window), Some(linger_us)) = (it.next(), it.next()) {
        durable_subscriber(port, readings, window, Duration::from_micros(linger_us));
    }
    let id = format!("bench-bare-{}", std::process::id());
    let mut opts = MqttOptions::new(id, "127.0.0.1", port as u16);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut connection) = Client::new(opts, 100);
    client
        .subscribe(TOPICS, QoS::AtLeastOnce)
        .expect("subscribe request");
    let mut latency = Vec::with_capacity(readings as usize);
    let mut out = std::io::stdout();
    for event in connection.iter() {
        match event {
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                let _ = writeln!(out, "ready");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let now = SystemTime::now();
                latency.push(since(sent_us(&p.payload), now));
                if latency.len() as u64 == readings {
                    report_done(&mut out, &mut latency, now);
                }
            }
            Ok(_) => {}
            Err(e) => panic!("bare subscriber connection: {e}"),
        }
    }
    std::process::exit(1)
}

/// A subscriber's last line: `done <p50_us> <p99_us> <last_us>` (see [`Bare`]).
fn report_done(out: &mut impl Write, latency: &mut [u64], last: SystemTime) {
    let (p50, p99) = percentiles(latency);
    let _ = writeln!(
        out,
        "done {:.0} {:.0} {}",
        p50 * 1000.0,
        p99 * 1000.0,
        micros(last)
    );
}

/// The `sent_us` number of a payload, found without parsing the JSON: a bare
/// subscriber does no more than it must.
fn sent_us(payload: &[u8]) -> u64 {
    const KEY: &[u8] = b"\"sent_us\":";
    let Some(at) = payload.windows(KEY.len()).position(|w| w == KEY) else {
        return 0;
    };
    payload[at + KEY.len()..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0, |n, b| n * 10 + u64::from(b - b'0'))
}

/// The durable subscriber's whole life (`--durable-subscriber`): as the bare one,
/// but a reading is acknowledged only once it is on stable storage, in group
/// commits as ferry makes them (the broker's window, or the linger).
fn durable_subscriber(port: u64, readings: u64, window: u64, linger: Duration) -> ! {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut log = std::fs::File::create(dir.path().join("readings")).expect("log file");
        let id = format!("bench-durable-{}", std::process::id());
        let mut opts = MqttOptions::new(id, "127.0.0.1", port as u16);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_manual_acks(true);
        let window = window.max(1) as usize;
        // Room for every acknowledgement of a run: `try_ack` must never find it
        // full, as awaiting room would wait on the event loop this task polls.
        let (client, mut eventloop) = AsyncClient::new(opts, readings as usize + window);
        client
            .subscribe(TOPICS, QoS::AtLeastOnce)
            .await
            .expect("subscribe request");
        let mut latency = Vec::with_capacity(readings as usize);
        let mut out = std::io::stdout();
        let mut pending: Vec<Publish> = Vec::with_capacity(window);
        let mut due: Option<tokio::time::Instant> = None;
        let mut buf = Vec::new();
        loop {
            let timer = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let lingered = tokio::select! {
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = writeln!(out, "ready");
                        false
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if pending.is_empty() {
                            due = Some(tokio::time::Instant::now() + linger);
                        }
                        pending.push(p);
                        false
                    }
                    Ok(_) => false,
                    Err(e) => panic!("durable subscriber connection: {e}"),
                },
                () = timer => true,
            };
            if pending.is_empty() || (!lingered && pending.len() < window) {
                continue;
            }
            buf.clear();
            for p in &pending {
                buf.extend_from_slice(&p.payload);
                buf.push(b'\n');
            }
            log.write_all(&buf).expect("write readings");
            log.sync_data().expect("fdatasync readings");
            let now = SystemTime::now();
            for p in pending.drain(..) {
                latency.push(since(sent_us(&p.payload), now));
                client.try_ack(&p).expect("ack queued");
            }
            due = None;
            if latency.len() as u64 == readings {
                report_done(&mut out, &mut latency, now);
            }
        }
    })
}
