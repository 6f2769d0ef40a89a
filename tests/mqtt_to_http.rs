//! Readings published over MQTT (QoS 1) arrive upstream as valid CloudEvents, in
//! each of the three HTTP modes, and alerts fire exactly for the readings that cross
//! a rule.

mod support;

use std::collections::{BTreeSet, HashSet};

use serde_json::{json, Value};
use support::*;

const DEVICES: [&str; 3] = ["dev-a", "dev-b", "dev-c"];
const READINGS: u64 = 50;
const ALERT: &str = "com.example.too-hot";

/// One reading the test publishes.
struct Planned {
    seq: u64,
    device: &'static str,
    payload: Value,
    /// Whether `temperature > 30` (the rule in [`TOO_HOT_RULE`]).
    hot: bool,
}

impl Planned {
    fn topic(&self) -> String {
        format!("sensors/{}/telemetry", self.device)
    }
}

/// 50 readings over 3 devices. Every fifth is hot (31 or 35.5), one in five sits
/// exactly on the threshold (30, not an alert), and no hot reading follows another
/// (globally or per device), so "fires for readings above" and "fires on crossing"
/// expect the same alerts. dev-c's readings carry their own `time`.
fn plan() -> Vec<Planned> {
    (0..READINGS)
        .map(|i| {
            let device = DEVICES[(i % 3) as usize];
            let temperature = match i % 10 {
                2 => json!(31),
                7 => json!(35.5),
                4 | 9 => json!(30),
                n => json!(20.0 + n as f64 / 4.0),
            };
            let mut payload = json!({
                "temperature": temperature,
                "humidity": 40 + i % 7,
                "seq": i,
            });
            if device == "dev-c" {
                payload["time"] = json!(format!("2024-05-01T12:{:02}:{:02}Z", i / 60, i % 60));
            }
            Planned {
                seq: i,
                device,
                payload,
                hot: i % 5 == 2,
            }
        })
        .collect()
}

/// Whether `data` equals the published payload. A payload's `time` sets the event
/// time, so the agent may keep it in `data` or move it out.
fn same_fields(data: &Value, payload: &Value) -> bool {
    if data == payload {
        return true;
    }
    let mut without_time = payload.clone();
    if let Some(o) = without_time.as_object_mut() {
        o.remove("time");
    }
    *data == without_time
}

fn every_reading_and_alert_arrives(mode: &str) {
    let started = chrono::Utc::now();
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let mut config = TestConfig::new(&format!("gw-{mode}"), &broker).http(&receiver.url(), mode);
    if mode == "batch" {
        // Hold the upstream off (503) until every reading is in, so the backlog is
        // sent in batches and batch_max is exercised.
        config.batch_max = 8;
        receiver.set_failing(Some(503));
    }
    let mut agent = Agent::start(&config.toml(), &[("alerts.toml", TOO_HOT_RULE)]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    let plan = plan();
    for r in &plan {
        broker.publish(&r.topic(), r.payload.to_string(), 1);
    }

    if mode == "batch" {
        agent.wait_for_metric(
            "ferry_input_received_total",
            &[("source", "local")],
            READINGS as f64,
        );
        agent.eventually(
            "the sink to try (and be refused) while upstream answers 503",
            |_| {
                let n = receiver.rejected().len();
                if n > 0 {
                    Ok(n)
                } else {
                    Err("no request yet".into())
                }
            },
        );
        receiver.set_failing(None);
    }

    // Order is kept per sink: once the last reading is in, every alert raised before
    // it is in too.
    let expected_alerts = plan.iter().filter(|r| r.hot).count();
    let events = agent.eventually(&format!("all {READINGS} readings to arrive"), |_| {
        let events = receiver.events();
        let seqs: BTreeSet<u64> = events
            .iter()
            .filter(|e| e.ty == READING)
            .filter_map(|e| e.seq())
            .collect();
        if seqs.len() as u64 == READINGS {
            Ok(events)
        } else {
            Err(format!(
                "{} distinct readings, {} events, {} requests ({} rejected)",
                seqs.len(),
                events.len(),
                receiver.requests().len(),
                receiver.rejected().len()
            ))
        }
    });

    // -- The HTTP binding of the mode. --
    let accepted = receiver.accepted();
    for req in &accepted {
        assert_eq!(req.method, "POST", "{req:?}");
        assert_eq!(req.url, "/events", "{req:?}");
        let ct = req.content_type();
        match mode {
            "binary" => {
                assert!(
                    ct.starts_with("application/json"),
                    "binary mode content-type {ct:?}"
                );
                for h in [
                    "ce-specversion",
                    "ce-id",
                    "ce-source",
                    "ce-type",
                    "ce-subject",
                    "ce-time",
                    "ce-sequence",
                ] {
                    assert!(
                        req.header(h).is_some(),
                        "binary mode request lacks {h}: {:?}",
                        req.headers
                    );
                }
                assert_eq!(req.header("ce-specversion"), Some("1.0"));
            }
            "structured" => {
                assert!(
                    ct.starts_with("application/cloudevents+json"),
                    "structured mode content-type {ct:?}"
                );
            }
            "batch" => {
                assert!(
                    ct.starts_with("application/cloudevents-batch+json"),
                    "batch mode content-type {ct:?}"
                );
                let n = req.events().len();
                assert!(
                    (1..=8).contains(&n),
                    "a batch of {n} events (batch_max = 8)"
                );
            }
            _ => unreachable!(),
        }
    }
    if mode == "batch" {
        let largest = accepted.iter().map(|r| r.events().len()).max().unwrap_or(0);
        assert!(
            largest > 1,
            "a backlog of {} events went out one per request",
            events.len()
        );
    } else {
        assert_eq!(
            accepted.len(),
            events.len(),
            "{mode} mode sends one event per request"
        );
    }

    // -- Every event. --
    let mut ids = HashSet::new();
    let mut last_sequence = None;
    for e in &events {
        assert_eq!(e.specversion, "1.0");
        assert_eq!(e.source, config.source(), "source of {e:?}");
        assert!(
            ids.insert(e.id.clone()),
            "id {} appears twice (no retries happened)",
            e.id
        );
        let sequence = e
            .sequence
            .unwrap_or_else(|| panic!("no numeric `sequence` extension: {e:?}"));
        assert!(
            e.sequence_is_string,
            "`sequence` must be a decimal string: {e:?}"
        );
        assert!(
            e.id.ends_with(&format!("-{sequence}")),
            "id {:?} is not {{store-epoch}}-{{sequence}} for sequence {sequence}",
            e.id
        );
        if let Some(prev) = last_sequence {
            assert!(
                sequence > prev,
                "sequence went from {prev} to {sequence} (must increase): {e:?}"
            );
        }
        last_sequence = Some(sequence);
        assert!(e.time.is_some(), "no time: {e:?}");
    }

    // -- Readings. --
    let readings: Vec<&Event> = events.iter().filter(|e| e.ty == READING).collect();
    assert_eq!(readings.len() as u64, READINGS, "each reading exactly once");
    for (r, e) in plan.iter().zip(&readings) {
        assert_eq!(e.seq(), Some(r.seq), "readings out of publish order");
        assert_eq!(e.subject.as_deref(), Some(r.device), "subject of {e:?}");
        assert!(
            e.datacontenttype
                .as_deref()
                .unwrap_or("")
                .starts_with("application/json"),
            "datacontenttype of {e:?}"
        );
        assert!(
            same_fields(&e.data, &r.payload),
            "data {} != payload {}",
            e.data,
            r.payload
        );
        let time = e.time.unwrap();
        match r.payload.get("time").and_then(Value::as_str) {
            Some(t) => assert_eq!(
                time,
                chrono::DateTime::parse_from_rfc3339(t).unwrap(),
                "time of {e:?}"
            ),
            None => assert!(
                time >= started - chrono::Duration::seconds(1)
                    && time <= chrono::Utc::now() + chrono::Duration::seconds(1),
                "ingest time {time} is not within the test run: {e:?}"
            ),
        }
    }

    // -- Alerts: one "fired" per hot reading (each follows a cold one), none for the
    // others; the cold reading after each hot one resolves it. --
    let alerts: Vec<&Event> = events
        .iter()
        .filter(|e| e.ty == ALERT && e.data["transition"] == "fired")
        .collect();
    let others: Vec<&Event> = events
        .iter()
        .filter(|e| e.ty != ALERT && e.ty != READING)
        .collect();
    assert!(others.is_empty(), "unexpected event types: {others:?}");
    let alerted: Vec<u64> = alerts.iter().filter_map(|e| e.seq()).collect();
    let hot: Vec<u64> = plan.iter().filter(|r| r.hot).map(|r| r.seq).collect();
    assert_eq!(
        alerted, hot,
        "alerts must fire exactly for the readings above 30"
    );
    assert_eq!(alerts.len(), expected_alerts);
    for a in alerts {
        let r = &plan[a.seq().unwrap() as usize];
        assert_eq!(a.subject.as_deref(), Some(r.device), "alert subject: {a:?}");
        assert_eq!(
            a.ext("rule"),
            Some("too-hot"),
            "alert `rule` extension: {a:?}"
        );
        assert_eq!(
            a.ext("severity"),
            Some("warning"),
            "alert `severity` extension: {a:?}"
        );
        assert_eq!(a.data["rule"], json!("too-hot"), "alert data: {}", a.data);
        assert_eq!(a.data["device"], json!(r.device), "alert data: {}", a.data);
        assert!(
            same_fields(&a.data["values"], &r.payload),
            "alert values {} != payload {}",
            a.data["values"],
            r.payload
        );
    }

    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
}

#[test]
fn every_published_reading_arrives_as_a_binary_mode_cloudevent() {
    every_reading_and_alert_arrives("binary");
}

#[test]
fn every_published_reading_arrives_as_a_structured_mode_cloudevent() {
    every_reading_and_alert_arrives("structured");
}

#[test]
fn every_published_reading_arrives_in_batches_no_larger_than_batch_max() {
    every_reading_and_alert_arrives("batch");
}
