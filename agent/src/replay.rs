//! `ferry rules test`: replays recorded readings through a rule set in virtual time,
//! so an installer sees what a rule would have done before deploying it.
//!
//! The readings file has one JSON object per line. `device`, `source` and `time`
//! (RFC 3339) are recognised; every other key is a field. Time only moves with the
//! readings: before each reading the rules get a tick at its time (stale sensors,
//! window ends), and one last tick at the final reading's time.

use chrono::{DateTime, Utc};
use ferry_rules::{Action, Alert, EvalError, RuleSet};
use serde_json::{Map, Value};

use crate::decode::take_time;
use crate::sinks::Event;
use crate::store::{Record, Stored};

/// Something the replay produced, in order.
#[derive(Debug)]
pub enum Line {
    Alert(Alert),
    Action { time: DateTime<Utc>, action: Action },
    Dropped { line: usize, device: String },
    Error { line: usize, error: EvalError },
}

/// A readings-file line that is not a usable reading.
#[derive(Debug, PartialEq)]
pub struct BadLine {
    pub line: usize,
    pub message: String,
}

/// Result of a replay.
#[derive(Debug, Default)]
pub struct Replay {
    pub lines: Vec<Line>,
    pub readings: usize,
    pub forwarded: usize,
    pub bad: Vec<BadLine>,
}

/// Replays `text` (JSON lines) through `rules`. Readings without a time are taken to
/// come one second after the previous one (the first at the Unix epoch), so a file of
/// bare values still replays in order.
pub fn replay(rules: &mut RuleSet, text: &str) -> Replay {
    let mut out = Replay::default();
    let mut clock: Option<DateTime<Utc>> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let mut fields: Map<String, Value> = match serde_json::from_str(raw) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                out.bad.push(BadLine {
                    line,
                    message: "not a JSON object".into(),
                });
                continue;
            }
            Err(e) => {
                out.bad.push(BadLine {
                    line,
                    message: e.to_string(),
                });
                continue;
            }
        };
        let device = match fields.remove("device") {
            Some(Value::String(d)) => d,
            Some(Value::Number(n)) => n.to_string(),
            _ => "device".to_string(),
        };
        let source = match fields.remove("source") {
            Some(Value::String(s)) => s,
            _ => "test".to_string(),
        };
        let time = match take_time(Some("time"), &mut fields) {
            Some(t) => t,
            None if fields.contains_key("time") => {
                out.bad.push(BadLine {
                    line,
                    message: "`time` is not RFC 3339".into(),
                });
                continue;
            }
            None => clock.map_or(DateTime::<Utc>::UNIX_EPOCH, |c| {
                c + chrono::Duration::seconds(1)
            }),
        };
        clock = Some(time);
        collect(&mut out, line, time, rules.tick(time));
        let outcome = rules.evaluate(&ferry_rules::Reading {
            source: &source,
            device: &device,
            time,
            fields: &fields,
        });
        out.readings += 1;
        if outcome.forward {
            out.forwarded += 1;
        } else {
            out.lines.push(Line::Dropped {
                line,
                device: device.clone(),
            });
        }
        collect(&mut out, line, time, outcome);
    }
    if let Some(t) = clock {
        collect(&mut out, text.lines().count(), t, rules.tick(t));
    }
    out
}

fn collect(out: &mut Replay, line: usize, now: DateTime<Utc>, outcome: ferry_rules::Outcome) {
    let time = outcome.alerts.first().map_or(now, |a| a.time);
    out.lines.extend(
        outcome
            .errors
            .into_iter()
            .map(|error| Line::Error { line, error }),
    );
    out.lines
        .extend(outcome.alerts.into_iter().map(Line::Alert));
    for action in outcome.actions {
        out.lines.push(Line::Action { time, action });
    }
}

/// The human line for an alert: when, which rule, which transition, device, values.
pub fn describe(a: &Alert) -> String {
    // What made it true: the reading's values, or what the kind reports instead
    // (a window's aggregates, a silent sensor's last reading, a count).
    let values = ["values", "aggregates", "last_seen", "count"]
        .iter()
        .find_map(|k| a.data.get(*k).map(|v| format!("{k}={v}")))
        .unwrap_or_default();
    format!(
        "{}  {:<24} {:<9} {:<16} {}",
        a.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        a.rule,
        a.transition.to_string(),
        a.device,
        values
    )
}

/// The CloudEvent an alert would become (`--json`), with a stand-in id.
pub fn as_cloudevent(a: &Alert, seq: u64) -> Option<String> {
    let source = if a.source.is_empty() {
        "rules"
    } else {
        &a.source
    };
    let stored = Stored {
        seq,
        record: Record::alert(a.clone(), format!("/ferry/test/{source}")),
        bytes: 0,
    };
    Event::from_stored("test", &stored)
        .ok()
        .map(|e| String::from_utf8_lossy(&e.structured()).into_owned())
}
