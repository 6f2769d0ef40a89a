//! Property tests: on random sequences of readings (and ticks, restarts, reloads),
//! the triggers keep their invariants and agree with naive recomputations written
//! independently of the engine.

use chrono::{DateTime, TimeDelta, Utc};
use ferry_rules::{Alert, CheckOptions, Outcome, Reading, RuleSet, SourceFile, Transition};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

const DEVICES: [&str; 3] = ["a", "b", "c"];

fn compile(text: &str) -> RuleSet {
    let files = [SourceFile {
        name: "p.toml".into(),
        text: text.into(),
    }];
    match RuleSet::compile(&files, &CheckOptions::default()) {
        Ok(rules) => rules,
        Err(diagnostics) => panic!("{}", diagnostics[0]),
    }
}

/// 2024-05-01T12:00:00Z.
fn start() -> DateTime<Utc> {
    DateTime::from_timestamp(1_714_564_800, 0).unwrap_or_default()
}

fn evaluate(rules: &mut RuleSet, device: &str, time: DateTime<Utc>, fields: &Value) -> Outcome {
    let empty = serde_json::Map::new();
    rules.evaluate(&Reading {
        source: "local",
        device,
        time,
        fields: fields.as_object().unwrap_or(&empty),
    })
}

/// One generated reading: which device, how long after the previous reading (of any
/// device), and a value.
#[derive(Debug, Clone)]
struct Step {
    device: usize,
    gap_ms: i64,
    value: i64,
    /// Whether to tick at this reading's time after it.
    tick: bool,
}

fn steps(
    min_gap_ms: i64,
    max_gap_ms: i64,
    values: std::ops::Range<i64>,
    len: usize,
) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (
            0..DEVICES.len(),
            min_gap_ms..=max_gap_ms,
            values,
            any::<bool>(),
        )
            .prop_map(|(device, gap_ms, value, tick)| Step {
                device,
                gap_ms,
                value,
                tick,
            }),
        1..len,
    )
}

/// `(device, time)` of each step.
fn timeline(steps: &[Step]) -> Vec<(&'static str, DateTime<Utc>)> {
    let mut time = start();
    steps
        .iter()
        .map(|step| {
            time += TimeDelta::milliseconds(step.gap_ms);
            (DEVICES[step.device], time)
        })
        .collect()
}

/// The transitions of one device, as `(transition, time)`.
fn of_device(alerts: &[Alert], device: &str) -> Vec<(Transition, DateTime<Utc>)> {
    alerts
        .iter()
        .filter(|a| a.device == device)
        .map(|a| (a.transition, a.time))
        .collect()
}

/// Fired and resolved alternate, starting with fired.
fn alternate(transitions: &[(Transition, DateTime<Utc>)]) -> bool {
    transitions.iter().enumerate().all(|(i, (t, _))| {
        *t == if i % 2 == 0 {
            Transition::Fired
        } else {
            Transition::Resolved
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Hysteresis: one event per transition; fired only on a reading `when` is true
    /// for while closed, resolved only on one `clear_when` is true for while open.
    #[test]
    fn hysteresis_fires_and_resolves_alternately_as_the_naive_model_says(
        steps in steps(0, 60_000, 0..50, 120)
    ) {
        let mut rules = compile(
            "[[rule]]\nid = \"h\"\nwhen = \"t > 30\"\nclear_when = \"t < 20\"\nemit = { type = \"x\" }\n",
        );
        let mut alerts = Vec::new();
        let mut expected = Vec::new();
        let mut open: HashMap<&str, bool> = HashMap::new();
        for (step, (device, time)) in steps.iter().zip(timeline(&steps)) {
            let outcome = evaluate(&mut rules, device, time, &json!({"t": step.value}));
            prop_assert!(outcome.errors.is_empty());
            alerts.extend(outcome.alerts);
            let is_open = open.entry(device).or_default();
            if !*is_open && step.value > 30 {
                *is_open = true;
                expected.push((device, Transition::Fired, time, step.value));
            } else if *is_open && step.value < 20 {
                *is_open = false;
                expected.push((device, Transition::Resolved, time, step.value));
            }
        }
        let actual: Vec<_> = alerts
            .iter()
            .map(|a| {
                let t = a.data["values"]["t"].as_i64().unwrap_or(-1);
                (a.device.as_str(), a.transition, a.time, t)
            })
            .collect();
        prop_assert_eq!(actual, expected);
        for device in DEVICES {
            prop_assert!(alternate(&of_device(&alerts, device)));
        }
    }

    /// Sustained: fires on the first reading at least `for` after the first of an
    /// unbroken run of true readings; resolves on the first false one.
    #[test]
    fn a_sustained_alert_fires_only_after_an_unbroken_run_of_for(
        steps in steps(0, 180_000, 25..40, 120)
    ) {
        let mut rules = compile(
            "[[rule]]\nid = \"s\"\nwhen = \"t > 30\"\nfor = \"5m\"\nemit = { type = \"x\" }\n",
        );
        let mut alerts = Vec::new();
        let mut expected = Vec::new();
        let mut since: HashMap<&str, DateTime<Utc>> = HashMap::new();
        let mut open: HashMap<&str, bool> = HashMap::new();
        for (step, (device, time)) in steps.iter().zip(timeline(&steps)) {
            alerts.extend(evaluate(&mut rules, device, time, &json!({"t": step.value})).alerts);
            let is_open = open.entry(device).or_default();
            let hot = step.value > 30;
            if *is_open {
                if !hot {
                    *is_open = false;
                    expected.push((device, Transition::Resolved, time, None));
                }
            } else if hot {
                let first = *since.entry(device).or_insert(time);
                if time - first >= TimeDelta::minutes(5) {
                    *is_open = true;
                    since.remove(device);
                    expected.push((device, Transition::Fired, time, Some(first)));
                }
            } else {
                since.remove(device);
            }
        }
        let actual: Vec<_> = alerts
            .iter()
            .map(|a| {
                let since = a.data.get("since").and_then(Value::as_str).and_then(|s| {
                    DateTime::parse_from_rfc3339(s).ok().map(|t| t.to_utc())
                });
                (a.device.as_str(), a.transition, a.time, since)
            })
            .collect();
        prop_assert_eq!(actual, expected);
    }

    /// Count in window: the alert is open exactly while at least N counted readings
    /// lie in the last `within`; the reported counts are the true counts.
    #[test]
    fn a_count_alert_is_open_exactly_while_the_window_holds_enough_readings(
        steps in steps(1, 300_000, 0..2, 150),
        at_least in 1usize..5,
        within_min in 1i64..20,
    ) {
        let within = TimeDelta::minutes(within_min);
        let mut rules = compile(&format!(
            "[[rule]]\nid = \"c\"\nwhen = \"alarm\"\ncount = {{ at_least = {at_least}, within = \"{within_min}m\" }}\nemit = {{ type = \"x\" }}\n"
        ));
        let mut alerts = Vec::new();
        let mut counted: BTreeMap<&str, Vec<DateTime<Utc>>> = BTreeMap::new();
        let timeline = timeline(&steps);
        for (step, &(device, time)) in steps.iter().zip(&timeline) {
            let alarm = step.value == 1;
            let outcome = evaluate(&mut rules, device, time, &json!({"alarm": alarm}));
            prop_assert!(outcome.errors.is_empty());
            alerts.extend(outcome.alerts);
            if step.tick {
                alerts.extend(rules.tick(time).alerts);
            }
            if alarm {
                counted.entry(device).or_default().push(time);
            }
        }
        let end = timeline.last().map_or(start(), |(_, t)| *t) + within + TimeDelta::seconds(1);
        alerts.extend(rules.tick(end).alerts);

        for device in DEVICES {
            let times = counted.get(device).cloned().unwrap_or_default();
            let count = |at: DateTime<Utc>| times.iter().filter(|&&x| x > at - within && x <= at).count();
            let mut points: Vec<DateTime<Utc>> = times.iter().flat_map(|&x| [x, x + within]).collect();
            points.sort();
            points.dedup();
            let mut expected = Vec::new();
            let mut open = false;
            for at in points {
                let n = count(at);
                if !open && n >= at_least {
                    open = true;
                    expected.push((Transition::Fired, at, n));
                } else if open && n < at_least {
                    open = false;
                    expected.push((Transition::Resolved, at, n));
                }
            }
            let actual: Vec<_> = alerts
                .iter()
                .filter(|a| a.device == device)
                .map(|a| (a.transition, a.time, a.data["count"].as_u64().unwrap_or(0) as usize))
                .collect();
            prop_assert_eq!(actual, expected, "device {}", device);
        }
    }

    /// Aggregates: every reading lands in exactly one window of its device, and each
    /// window's aggregates equal a recomputation from the readings in it.
    #[test]
    fn window_aggregates_equal_a_naive_recomputation(
        steps in steps(0, 40_000, -5..40, 150)
    ) {
        let mut rules = compile(
            "[[rule]]\nid = \"w\"\naggregate = { every = \"1m\", fields = [\"t\"] }\nemit = { type = \"x\" }\n",
        );
        let mut alerts = Vec::new();
        // (device, window start ms) -> values (None: the reading had no `t`).
        let mut windows: BTreeMap<(&str, i64), Vec<Option<f64>>> = BTreeMap::new();
        let timeline = timeline(&steps);
        for (step, &(device, time)) in steps.iter().zip(&timeline) {
            // Every fifth value is left out, to check count/avg over present values.
            let value = (step.value % 5 != 0).then_some(step.value as f64 / 4.0);
            let fields = match value {
                Some(v) => json!({"t": v}),
                None => json!({"other": 1}),
            };
            let outcome = evaluate(&mut rules, device, time, &fields);
            let errors: Vec<_> = outcome.errors.iter().map(|e| (e.rule.as_str(), e.message.as_str())).collect();
            let missing = (
                "w",
                "`aggregate.fields`: no field `t` in this reading; the other fields were aggregated",
            );
            prop_assert_eq!(errors, if value.is_none() { vec![missing] } else { vec![] });
            alerts.extend(outcome.alerts);
            if step.tick {
                alerts.extend(rules.tick(time).alerts);
            }
            let start_ms = time.timestamp_millis().div_euclid(60_000) * 60_000;
            windows.entry((device, start_ms)).or_default().push(value);
        }
        let end = timeline.last().map_or(start(), |(_, t)| *t) + TimeDelta::minutes(2);
        alerts.extend(rules.tick(end).alerts);

        let mut expected = BTreeMap::new();
        for ((device, start_ms), values) in &windows {
            let present: Vec<f64> = values.iter().flatten().copied().collect();
            let sum = present.iter().fold(0.0, |acc, v| acc + v);
            let n = present.len();
            let aggregates = if n == 0 {
                json!({"avg": null, "min": null, "max": null, "sum": 0.0, "count": 0, "last": null})
            } else {
                json!({
                    "avg": sum / n as f64,
                    "min": present.iter().copied().fold(f64::INFINITY, f64::min),
                    "max": present.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    "sum": sum,
                    "count": n,
                    "last": present[n - 1],
                })
            };
            expected.insert((device.to_string(), *start_ms), (values.len(), aggregates));
        }
        let mut actual = BTreeMap::new();
        for alert in &alerts {
            prop_assert_eq!(alert.transition, Transition::Window);
            let window_start = alert.data["window"]["start"].as_str().and_then(|s| DateTime::parse_from_rfc3339(s).ok());
            let start_ms = window_start.map_or(-1, |t| t.timestamp_millis());
            prop_assert_eq!(alert.time.timestamp_millis(), start_ms + 60_000);
            let readings = alert.data["readings"].as_u64().unwrap_or(0) as usize;
            let previous = actual.insert(
                (alert.device.clone(), start_ms),
                (readings, alert.data["aggregates"]["t"].clone()),
            );
            prop_assert!(previous.is_none(), "window sent twice");
        }
        prop_assert_eq!(&actual, &expected);
        let total: usize = actual.values().map(|(n, _)| n).sum();
        prop_assert_eq!(total, steps.len());
    }

    /// Deadband: a reading is forwarded exactly when it moved by more than the band
    /// since the device's last forwarded reading (the first always is).
    #[test]
    fn a_deadband_forwards_exactly_the_readings_that_moved_enough(
        steps in steps(0, 60_000, 0..40, 150)
    ) {
        let mut rules = compile("[[rule]]\nid = \"d\"\nforward = { deadband = { t = 1.5 } }\n");
        let mut last: HashMap<&str, f64> = HashMap::new();
        for (step, (device, time)) in steps.iter().zip(timeline(&steps)) {
            let t = step.value as f64 / 2.0;
            let forward = evaluate(&mut rules, device, time, &json!({"t": t})).forward;
            let expected = last.get(device).is_none_or(|&l| (t - l).abs() > 1.5);
            prop_assert_eq!(forward, expected);
            if forward {
                last.insert(device, t);
            }
        }
    }

    /// Stale: per device, fired at `last reading + stale` for every silence at least
    /// that long, resolved by the next reading; independent of when ticks come.
    #[test]
    fn a_stale_alert_fires_for_every_long_silence_and_resolves_on_the_next_reading(
        steps in steps(0, 400_000, 0..1, 80)
    ) {
        let after = TimeDelta::minutes(5);
        let mut rules = compile("[[rule]]\nid = \"s\"\nstale = \"5m\"\nemit = { type = \"x\" }\n");
        let mut alerts = Vec::new();
        let timeline = timeline(&steps);
        for (step, &(device, time)) in steps.iter().zip(&timeline) {
            alerts.extend(evaluate(&mut rules, device, time, &json!({})).alerts);
            if step.tick {
                alerts.extend(rules.tick(time).alerts);
            }
        }
        let end = timeline.last().map_or(start(), |(_, t)| *t) + TimeDelta::minutes(10);
        alerts.extend(rules.tick(end).alerts);
        for device in DEVICES {
            let seen: Vec<DateTime<Utc>> =
                timeline.iter().filter(|(d, _)| *d == device).map(|(_, t)| *t).collect();
            let mut expected = Vec::new();
            for pair in seen.windows(2) {
                if pair[1] - pair[0] >= after {
                    expected.push((Transition::Fired, pair[0] + after));
                    expected.push((Transition::Resolved, pair[1]));
                }
            }
            if let Some(&last) = seen.last() {
                expected.push((Transition::Fired, last + after));
            }
            prop_assert_eq!(of_device(&alerts, device), expected, "device {}", device);
        }
    }
}

/// Rules of every kind whose state is saved in full across a restart.
const SAVED_IN_FULL: &str = r#"
[[rule]]
id = "hysteresis"
when = "t > 30"
clear_when = "t < 20"
emit = { type = "x.h" }

[[rule]]
id = "sustained"
when = "t > 25"
for = "3m"
emit = { type = "x.s" }

[[rule]]
id = "stale"
stale = "4m"
emit = { type = "x.st" }
"#;

/// Rules of every kind.
const EVERY_KIND: &str = r#"
[[rule]]
id = "hysteresis"
when = "t > 30"
clear_when = "t < 20"
emit = { type = "x.h" }
action = { mqtt_publish = { topic = "a/{device}", payload = "on", clear_payload = "off" } }

[[rule]]
id = "sustained"
when = "t > 25"
for = "3m"
emit = { type = "x.s" }

[[rule]]
id = "rate"
rate = { field = "t", per = "1m", above = 5.0, below = -5.0 }
emit = { type = "x.r" }

[[rule]]
id = "stale"
stale = "4m"
emit = { type = "x.st" }

[[rule]]
id = "count"
when = "t > 30"
count = { at_least = 3, within = "10m" }
emit = { type = "x.c" }

[[rule]]
id = "aggregate"
aggregate = { every = "5m", fields = ["t"] }
emit = { type = "x.a" }

[[rule]]
id = "deadband"
forward = { deadband = { t = 3 } }
"#;

/// `EVERY_KIND` laid out differently, with comments and descriptions: the same rules.
const EVERY_KIND_REFORMATTED: &str = r#"
# Reformatted.
[[rule]]
description = "now described"
emit.type = "x.h"
clear_when = "t<20"
when = "t>30 // hot"
id = "hysteresis"
[rule.action.mqtt_publish]
clear_payload = "off"
payload = "on"
topic = "a/{device}"

[[rule]]
id = "sustained"
for = "3m"
when = '''
  t > 25
'''
[rule.emit]
type = "x.s"

[[rule]]
id = "rate"
rate = { below = -5, above = 5, per = "60s", field = "t" }
emit = { type = "x.r" }

[[rule]]
id = "stale"
stale = "240s"
emit = { type = "x.st" }

[[rule]]
id = "count"
count = { within = "600s", at_least = 3 }
when = "t  >  30"
emit = { type = "x.c" }

[[rule]]
id = "aggregate"
aggregate = { fields = ["t"], every = "300s", functions = ["avg", "min", "max", "sum", "count", "last"] }
emit = { type = "x.a" }

[[rule]]
id = "deadband"
forward.deadband.t = 3.0
"#;

/// Runs `steps` through `rules`, calling `interrupt` before step `at`, and returns
/// everything the rules said.
fn run(
    mut rules: RuleSet,
    steps: &[Step],
    at: usize,
    interrupt: impl FnOnce(RuleSet) -> RuleSet,
) -> Vec<Value> {
    let mut said = Vec::new();
    let mut interrupt = Some(interrupt);
    let timeline = timeline(steps);
    for (i, (step, &(device, time))) in steps.iter().zip(&timeline).enumerate() {
        if i == at {
            if let Some(interrupt) = interrupt.take() {
                rules = interrupt(rules);
            }
        }
        let outcome = evaluate(&mut rules, device, time, &json!({"t": step.value}));
        said.push(format!("{outcome:?}"));
        if step.tick {
            said.push(format!("{:?}", rules.tick(time)));
        }
    }
    let end = timeline.last().map_or(start(), |(_, t)| *t) + TimeDelta::hours(1);
    said.push(format!("{:?}", rules.tick(end)));
    said.into_iter().map(Value::from).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// A restart (state saved as JSON text, rules compiled afresh, state restored)
    /// neither re-fires nor forgets an alert: everything said afterwards is what
    /// would have been said without it.
    #[test]
    fn a_restart_changes_nothing_for_rules_whose_state_is_saved(
        steps in steps(0, 120_000, 10..40, 80),
        at in 0usize..80,
    ) {
        // Interrupted before one of the steps, never after the last: that would compare
        // a run with itself.
        let at = at % steps.len();
        let uninterrupted = run(compile(SAVED_IN_FULL), &steps, usize::MAX, |r| r);
        let restarted = run(compile(SAVED_IN_FULL), &steps, at, |rules| {
            let saved = rules.alert_state().to_string();
            drop(rules);
            let saved: Value = serde_json::from_str(&saved).unwrap_or_default();
            let mut fresh = compile(SAVED_IN_FULL);
            let restored = fresh.restore_alert_state(&saved);
            assert!(restored.ignored.is_empty());
            fresh
        });
        prop_assert_eq!(uninterrupted, restarted);
    }

    /// A hot reload to the same rules written differently keeps every rule's state:
    /// everything said afterwards is what would have been said without it.
    #[test]
    fn a_reload_to_the_same_rules_written_differently_changes_nothing(
        steps in steps(0, 120_000, 10..40, 80),
        at in 0usize..80,
    ) {
        // Interrupted before one of the steps, never after the last: that would compare
        // a run with itself.
        let at = at % steps.len();
        let uninterrupted = run(compile(EVERY_KIND), &steps, usize::MAX, |r| r);
        let reloaded = run(compile(EVERY_KIND), &steps, at, |rules| {
            let mut new = compile(EVERY_KIND_REFORMATTED);
            new.adopt_state(rules);
            new
        });
        prop_assert_eq!(uninterrupted, reloaded);
    }
}

#[test]
fn the_reformatted_rules_have_the_same_fingerprints_and_a_change_does_not() {
    let mut original = compile(EVERY_KIND);
    let fields = json!({"t": 35});
    let alerts = |outcome: Outcome| -> Vec<(String, Transition)> {
        outcome
            .alerts
            .into_iter()
            .map(|a| (a.rule, a.transition))
            .collect()
    };
    let fired = evaluate(&mut original, "a", start(), &fields);
    assert_eq!(
        alerts(fired),
        [("hysteresis".to_owned(), Transition::Fired)]
    );
    // Same rules: the open alert moves over, nothing fires again.
    let mut same = compile(EVERY_KIND_REFORMATTED);
    same.adopt_state(original);
    let again = evaluate(&mut same, "a", start() + TimeDelta::seconds(1), &fields);
    assert_eq!(alerts(again), []);
    // A changed threshold is a new rule: it fires afresh.
    let mut changed = compile(&EVERY_KIND.replace("t > 30", "t > 31"));
    changed.adopt_state(same);
    let fresh = evaluate(&mut changed, "a", start() + TimeDelta::seconds(2), &fields);
    assert_eq!(
        alerts(fresh),
        [("hysteresis".to_owned(), Transition::Fired)]
    );
}
