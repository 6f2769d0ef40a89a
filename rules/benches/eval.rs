//! Evaluation cost per reading: one threshold rule (the common case), and 10 and
//! 100 rules of mixed kinds.
//!
//! `cargo bench -p ferry-rules --bench eval` (release profile). Prints ns per
//! reading for `RuleSet::evaluate`, and the cost of `RuleSet::tick` when nothing is
//! due (what the agent pays every second).

use chrono::{DateTime, TimeDelta, Utc};
use ferry_rules::{CheckOptions, Reading, RuleSet, SourceFile};
use serde_json::{json, Map, Value};
use std::hint::black_box;
use std::time::Instant;

/// Devices the readings come from, in turn: one reading per second in all, so each
/// device sends one every 50 s (six per 5-minute aggregate window).
const DEVICES: usize = 50;

/// Rule `i` of a mixed set: every kind in turn, a third of them limited by `match`.
fn rule(i: usize) -> String {
    let matcher = match i % 3 {
        0 => String::new(),
        1 => "match = { device = \"sensor-1*\" }\n".into(),
        _ => "match = { device = \"sensor-*\", source = \"local\" }\n".into(),
    };
    let threshold = 20 + i % 10;
    let body = match i % 10 {
        0 => format!("when = \"temperature > {threshold}\"\nemit = {{ type = \"x.{i}\" }}"),
        1 => format!(
            "when = \"temperature > {threshold} && humidity > 50\"\nfor = \"5m\"\n\
             clear_when = \"temperature < 15\"\nemit = {{ type = \"x.{i}\", severity = \"critical\" }}"
        ),
        2 => format!(
            "rate = {{ field = \"temperature\", per = \"1m\", above = 2.0 }}\nemit = {{ type = \"x.{i}\" }}"
        ),
        3 => format!("stale = \"15m\"\nemit = {{ type = \"x.{i}\" }}"),
        4 => format!(
            "when = \"door == 'open'\"\ncount = {{ at_least = 5, within = \"1h\" }}\nemit = {{ type = \"x.{i}\" }}"
        ),
        5 => format!(
            "aggregate = {{ every = \"5m\", fields = [\"temperature\", \"humidity\"] }}\nemit = {{ type = \"x.{i}\" }}"
        ),
        6 => "forward = { deadband = { temperature = 0.5, humidity = 2 } }".to_owned(),
        7 => format!(
            "when = \"temperature > {threshold}\"\nclear_when = \"temperature < 18\"\n\
             action = {{ mqtt_publish = {{ topic = \"a/{{device}}/fan\", payload = \"on\", clear_payload = \"off\" }} }}"
        ),
        8 => format!(
            "when = \"status.battery < 10.0 || status.rssi < -90\"\nemit = {{ type = \"x.{i}\" }}"
        ),
        _ => "when = \"device.startsWith('test-')\"\nforward = false".to_owned(),
    };
    format!("[[rule]]\nid = \"r{i}\"\n{matcher}{body}\n\n")
}

fn rules(n: usize) -> RuleSet {
    let text: String = (0..n).map(rule).collect();
    let files = [SourceFile {
        name: "bench.toml".into(),
        text,
    }];
    match RuleSet::compile(&files, &CheckOptions::default()) {
        Ok(rules) => rules,
        Err(diagnostics) => panic!("{}", diagnostics[0]),
    }
}

/// Readings at one per second over `DEVICES` devices: each device's temperature
/// drifts slowly (a sine wave over about two hours, its phase set by the device) with
/// a little noise, so alerts fire and resolve now and then, not on every reading.
fn readings(count: usize) -> Vec<(String, DateTime<Utc>, Map<String, Value>)> {
    let start = DateTime::from_timestamp(1_714_564_800, 0).unwrap_or_default();
    (0..count)
        .map(|i| {
            let d = i % DEVICES;
            let device = format!("sensor-{d}");
            let phase = i as f64 / 1200.0 + d as f64;
            let noise = ((i * 7919) % 11) as f64 * 0.02;
            let fields = json!({
                "temperature": 24.0 + 6.0 * phase.sin() + noise,
                "humidity": 50 + (i / DEVICES) % 10,
                "door": if (i / DEVICES) % 97 == d % 97 { "open" } else { "closed" },
                "status": {"battery": 80 - ((i / 3600) % 80) as i64, "rssi": -60 - (d % 40) as i64},
            });
            let fields = fields.as_object().cloned().unwrap_or_default();
            (device, start + TimeDelta::seconds(i as i64), fields)
        })
        .collect()
}

fn bench(n: usize, readings: &[(String, DateTime<Utc>, Map<String, Value>)]) {
    let mut set = rules(n);
    let run = |set: &mut RuleSet, readings: &[(String, DateTime<Utc>, Map<String, Value>)]| {
        let mut events = 0usize;
        for (device, time, fields) in readings {
            let outcome = set.evaluate(&Reading {
                source: "local",
                device,
                time: *time,
                fields,
            });
            events += outcome.alerts.len() + outcome.actions.len();
            black_box(&outcome);
        }
        events
    };
    // Warm up on the first quarter (every device known to every rule, caches warm),
    // measure the steady state on the rest.
    let (warm_up, measured) = readings.split_at(readings.len() / 4);
    run(&mut set, warm_up);
    let started = Instant::now();
    let events = run(&mut set, measured);
    let elapsed = started.elapsed();
    let per_reading = elapsed.as_nanos() as f64 / measured.len() as f64;

    // Tick with nothing due, as the agent does every second.
    let now = measured.last().map_or(DateTime::UNIX_EPOCH, |r| r.1);
    let _ = set.tick(now);
    let ticks = 100_000;
    let started = Instant::now();
    for _ in 0..ticks {
        black_box(set.tick(black_box(now)));
    }
    let per_tick = started.elapsed().as_nanos() as f64 / ticks as f64;
    println!(
        "{n:>3} rules: {per_reading:>8.0} ns/reading ({:.0} readings/s on one core; {} readings, \
         {events} events and actions); tick with nothing due: {per_tick:.0} ns",
        1e9 / per_reading,
        measured.len(),
    );
}

fn main() {
    let readings = readings(400_000);
    println!(
        "ferry-rules evaluation, {} readings from {DEVICES} devices",
        readings.len()
    );
    for n in [1, 10, 100] {
        bench(n, &readings);
    }
}
