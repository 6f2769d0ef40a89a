//! Rules in a running agent: hot reload on save and on SIGHUP (a bad file keeps the
//! running rules), local actuation over MQTT, and open alerts that survive a restart.

mod support;

use serde_json::json;
use support::*;

const WARM: &str = r#"[[rule]]
id = "warm"
when = "temperature > 30"
clear_when = "temperature < 25"
emit = { type = "com.example.warm", severity = "warning" }
"#;

const HOT: &str = r#"[[rule]]
id = "hot"
when = "temperature > 50"
clear_when = "temperature < 40"
emit = { type = "com.example.hot", severity = "critical" }
"#;

fn publish(broker: &Mosquitto, device: &str, temperature: f64) {
    broker.publish(
        &format!("sensors/{device}/telemetry"),
        json!({ "temperature": temperature }).to_string(),
        1,
    );
}

/// Saves a rule file the way editors do: write a temporary file, rename it over.
fn save(agent: &Agent, name: &str, text: &str) {
    let dir = agent.dir().join("rules");
    let tmp = dir.join(format!(".{name}.swp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn alerts(receiver: &Receiver, ty: &str) -> Vec<Event> {
    receiver
        .events()
        .into_iter()
        .filter(|e| e.ty == ty)
        .collect()
}

/// The first arrival of each event id, in arrival order.
fn once_per_id(events: Vec<Event>) -> Vec<Event> {
    let mut seen = std::collections::HashSet::new();
    events
        .into_iter()
        .filter(|e| seen.insert((e.source.clone(), e.id.clone())))
        .collect()
}

fn wait_for_alerts(agent: &mut Agent, receiver: &Receiver, ty: &str, n: usize) -> Vec<Event> {
    agent.eventually(&format!("{n} {ty} event(s)"), |_| {
        let a = alerts(receiver, ty);
        if a.len() >= n {
            Ok(a)
        } else {
            Err(format!("{} so far", a.len()))
        }
    })
}

#[test]
fn a_saved_rule_file_takes_effect_and_a_broken_one_keeps_the_running_rules() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-reload", &broker).http(&receiver.url(), "structured");
    let mut agent = Agent::start(&config.toml(), &[("alerts.toml", WARM)]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    publish(&broker, "oven-1", 35.0);
    wait_for_alerts(&mut agent, &receiver, "com.example.warm", 1);

    // The new set also reports a sensor silent for 1s: the agent's own clock, to
    // show later that time passed without anything reloading.
    let hot_and_silent = format!(
        "{HOT}\n[[rule]]\nid = \"silent\"\nstale = \"1s\"\n\
         emit = {{ type = \"com.example.silent\", severity = \"info\" }}\n"
    );
    save(&agent, "alerts.toml", &hot_and_silent);
    agent.wait_for_metric("ferry_rules_reloads_total", &[("result", "ok")], 1.0);
    publish(&broker, "oven-2", 35.0);
    publish(&broker, "oven-2", 55.0);
    let hot = wait_for_alerts(&mut agent, &receiver, "com.example.hot", 1);
    assert_eq!(hot[0].subject.as_deref(), Some("oven-2"));
    assert_eq!(
        alerts(&receiver, "com.example.warm").len(),
        1,
        "the replaced rule no longer fires"
    );

    save(
        &agent,
        "alerts.toml",
        "[[rule]]\nid = \"broken\"\nwhen = \"temperature >\"\n",
    );
    agent.wait_for_metric("ferry_rules_reloads_total", &[("result", "failed")], 1.0);
    assert!(
        agent.stderr_contains("alerts.toml:3:"),
        "the error names file and line:\n{}",
        agent.stderr()
    );
    publish(&broker, "oven-3", 60.0);
    let hot = wait_for_alerts(&mut agent, &receiver, "com.example.hot", 2);
    assert_eq!(
        hot[1].subject.as_deref(),
        Some("oven-3"),
        "the running rules stayed"
    );
    // Reading the files for a reload is not a change: nothing reloads by itself
    // afterwards. oven-3 is reported silent only after 1s of the agent's time, more
    // than three of the watcher's 300ms debounce windows.
    let silent = agent.eventually("oven-3 to be reported silent", |_| {
        alerts(&receiver, "com.example.silent")
            .into_iter()
            .find(|e| e.subject.as_deref() == Some("oven-3"))
            .ok_or_else(|| "not yet".to_string())
    });
    assert_eq!(silent.data["transition"], "fired");
    let m = agent.metrics();
    for result in ["ok", "failed"] {
        assert_eq!(
            m.value("ferry_rules_reloads_total", &[("result", result)]),
            1.0,
            "{}",
            m.ferry_lines()
        );
    }
    assert!(agent.stop().success());
}

#[test]
fn with_watching_off_a_saved_rule_file_waits_for_sighup_and_sighup_reloads_it() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-hup", &broker).http(&receiver.url(), "structured");
    let text = config
        .toml()
        .replacen("dir = \"rules\"\n", "dir = \"rules\"\nreload = false\n", 1);
    let mut agent = Agent::start(&text, &[("alerts.toml", WARM)]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    // Saved, not signalled: a reading taken after the save still meets the old rules.
    save(&agent, "alerts.toml", HOT);
    publish(&broker, "kiln-1", 55.0);
    let warm = wait_for_alerts(&mut agent, &receiver, "com.example.warm", 1);
    assert_eq!(warm[0].subject.as_deref(), Some("kiln-1"));
    assert!(alerts(&receiver, "com.example.hot").is_empty());
    let m = agent.metrics();
    assert_eq!(
        m.value("ferry_rules_reloads_total", &[]),
        0.0,
        "nothing reloads before the signal: {}",
        m.ferry_lines()
    );

    agent.hup();
    agent.wait_for_metric("ferry_rules_reloads_total", &[("result", "ok")], 1.0);
    let reloads: Vec<String> = agent
        .stderr()
        .lines()
        .filter(|l| l.contains("rules reloaded"))
        .map(str::to_string)
        .collect();
    assert!(
        reloads.len() == 1 && reloads[0].contains("SIGHUP"),
        "exactly one reload, for the signal: {reloads:?}"
    );
    publish(&broker, "kiln-2", 55.0);
    let hot = wait_for_alerts(&mut agent, &receiver, "com.example.hot", 1);
    assert_eq!(hot[0].subject.as_deref(), Some("kiln-2"));
    assert_eq!(
        alerts(&receiver, "com.example.warm").len(),
        1,
        "the replaced rule no longer fires"
    );
    assert!(agent.stop().success());
}

#[test]
fn a_rule_switches_a_local_actuator_over_mqtt_without_any_uplink() {
    let broker = Mosquitto::start();
    // The cloud is unreachable for the whole test.
    let cloud = DownPort::hold();
    let config = TestConfig::new("gw-fan", &broker).http(&cloud.url(), "batch");
    let fan = r#"[[rule]]
id = "fan"
when = "temperature > 35"
clear_when = "temperature < 32"
action = { mqtt_publish = { topic = "actuators/{device}/fan", payload = "on", clear_payload = "off", qos = 1 } }
"#;
    let mut agent = Agent::start(&config.toml(), &[("fan.toml", fan)]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");
    let actuator = broker.subscribe("actuators/#");
    broker.wait_for_subscription(SUBSCRIBER_ID, "actuators/#");

    publish(&broker, "barn", 36.0);
    publish(&broker, "barn", 31.0);
    let messages = agent.eventually("the fan to be switched on and off", |_| {
        let m = actuator.messages();
        if m.len() >= 2 {
            Ok(m)
        } else {
            Err(format!("{m:?}"))
        }
    });
    assert_eq!(
        messages,
        vec!["actuators/barn/fan on", "actuators/barn/fan off"]
    );
    assert!(agent.stop().success());
}

#[test]
fn an_open_alert_survives_a_restart_without_firing_again() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-state", &broker).http(&receiver.url(), "structured");
    let mut agent = Agent::start(&config.toml(), &[("alerts.toml", WARM)]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    publish(&broker, "vat-1", 35.0);
    wait_for_alerts(&mut agent, &receiver, "com.example.warm", 1);
    assert!(agent.stop().success());

    agent.start_again();
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");
    publish(&broker, "vat-1", 36.0);
    publish(&broker, "vat-1", 20.0);
    let events = wait_for_alerts(&mut agent, &receiver, "com.example.warm", 2);
    let transitions: Vec<String> = events
        .iter()
        .map(|e| e.data["transition"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(
        transitions,
        vec!["fired", "resolved"],
        "the restart neither re-fired nor forgot the open alert"
    );
    assert!(agent.stop().success());
}

#[test]
fn an_open_alert_survives_a_kill_after_its_event_was_delivered_without_firing_again_or_being_forgotten(
) {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-state-kill", &broker).http(&receiver.url(), "structured");
    let mut agent = Agent::start(&config.toml(), &[("alerts.toml", WARM)]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    publish(&broker, "vat-2", 35.0);
    let fired = wait_for_alerts(&mut agent, &receiver, "com.example.warm", 1);
    // Delivered means committed: no shutdown runs to save the alert state later.
    agent.kill();

    agent.start_again();
    publish(&broker, "vat-2", 36.0);
    publish(&broker, "vat-2", 20.0);
    // Cursor moves are not flushed, so the fired event may arrive again after the
    // kill, under its first id: count each id once.
    let events = agent.eventually("the warm alert to resolve", |_| {
        let events = once_per_id(alerts(&receiver, "com.example.warm"));
        if events.iter().any(|e| e.data["transition"] == "resolved") {
            Ok(events)
        } else {
            Err(format!("{} warm event(s)", events.len()))
        }
    });
    let transitions: Vec<&str> = events
        .iter()
        .map(|e| e.data["transition"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        transitions,
        vec!["fired", "resolved"],
        "the kill neither re-fired nor forgot the open alert"
    );
    assert_eq!(events[0].id, fired[0].id, "one fired event, under one id");
    assert!(agent.stop().success());
}

#[test]
fn a_silent_sensor_is_reported_by_the_agents_own_clock() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-stale", &broker).http(&receiver.url(), "structured");
    let silent = r#"[[rule]]
id = "silent"
stale = "2s"
emit = { type = "com.example.silent", severity = "warning" }
"#;
    let mut agent = Agent::start(&config.toml(), &[("silent.toml", silent)]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    publish(&broker, "probe-1", 20.0);
    // No more readings: only the agent's tick can notice the silence.
    let fired = wait_for_alerts(&mut agent, &receiver, "com.example.silent", 1);
    assert_eq!(fired[0].subject.as_deref(), Some("probe-1"));
    assert_eq!(fired[0].data["transition"], "fired");

    publish(&broker, "probe-1", 20.5);
    let events = wait_for_alerts(&mut agent, &receiver, "com.example.silent", 2);
    assert_eq!(events[1].data["transition"], "resolved");
    assert!(agent.stop().success());
}

#[test]
fn after_a_restart_with_a_broken_rule_file_the_last_valid_rules_run_and_the_errors_are_logged() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-lastgood", &broker).http(&receiver.url(), "structured");
    let mut agent = Agent::start(&config.toml(), &[("alerts.toml", HOT)]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");
    assert!(agent.stop().success());

    // A power cut mid-copy leaves half a file: `ferry check` refuses it...
    let broken = "[[rule]]\nid = \"hot\"\nwhen = \"temperature >\"\n";
    std::fs::write(agent.dir().join("rules").join("alerts.toml"), broken).unwrap();
    let check = ferry()
        .args(["check", "--config"])
        .arg(agent.config_path())
        .output()
        .unwrap();
    assert!(
        !check.status.success(),
        "ferry check accepted a broken rule file"
    );

    // ...but the agent starts with the last valid rules and says why.
    agent.start_again();
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");
    publish(&broker, "oven-1", 60.0);
    let fired = wait_for_alerts(&mut agent, &receiver, "com.example.hot", 1);
    assert_eq!(fired[0].subject.as_deref(), Some("oven-1"));
    let log = agent.stderr();
    assert!(
        log.contains("alerts.toml:3:"),
        "the error is logged with its place:\n{log}"
    );
    assert!(log.contains("running the last valid rule set"), "{log}");
    let m = agent.metrics();
    assert_eq!(
        m.value("ferry_rules_reloads_total", &[("result", "failed")]),
        1.0
    );
    assert!(agent.stop().success());
}

#[test]
fn a_first_start_with_a_broken_rule_file_and_no_saved_rules_is_refused() {
    let broker = Mosquitto::start();
    let config = TestConfig::new("gw-nogood", &broker);
    let mut agent = Agent::start(&config.toml(), &[("alerts.toml", "[[rule]]\nid = 1\n")]);
    let status = agent.wait_for_exit();
    assert!(
        !status.success(),
        "started with broken rules and nothing to fall back on"
    );
    assert!(
        agent.stderr().contains("rule file error"),
        "{}",
        agent.stderr()
    );
}

#[test]
fn a_reloaded_rule_set_becomes_the_last_valid_one() {
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-reloadgood", &broker).http(&receiver.url(), "structured");
    let mut agent = Agent::start(&config.toml(), &[("alerts.toml", HOT)]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");
    save(&agent, "alerts.toml", WARM);
    agent.eventually("the reload", |a| {
        if a.stderr_contains("rules reloaded") {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert!(agent.stop().success());

    std::fs::write(
        agent.dir().join("rules").join("alerts.toml"),
        "[[rule]]\nid = 1\n",
    )
    .unwrap();
    agent.start_again();
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");
    // 35 °C: warm (the reloaded set), not hot (the set the agent first started with).
    publish(&broker, "vat-2", 35.0);
    let warm = wait_for_alerts(&mut agent, &receiver, "com.example.warm", 1);
    assert_eq!(warm[0].subject.as_deref(), Some("vat-2"));
    assert!(alerts(&receiver, "com.example.hot").is_empty());
}
