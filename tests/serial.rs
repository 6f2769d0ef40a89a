//! Serial ports against real pseudo-terminals (socat): lines in every format (CSV,
//! JSON, `key=value`, NMEA) arrive as readings with numbers, a noisy or over-long line
//! or a bad checksum is counted and skipped, an unplugged port (the pty pair destroyed
//! and recreated) is reopened and readings continue, a second port keeps flowing while
//! the first is gone, and a rule action writes lines to a port, waiting while it is
//! away.

mod support;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use support::*;

const CSV: &str = "format = \"csv\"\nfields = [\"temperature\", \"door\"]\nmax_frame = \"64B\"";

fn config(receiver: &Receiver, admin: u16, ports: &[(&str, &Path)]) -> String {
    let ports: Vec<_> = ports
        .iter()
        .map(|(name, path)| (*name, *path, CSV))
        .collect();
    config_with(receiver, admin, &ports)
}

/// A config with a serial source for each `(name, path, settings)`: `settings` are
/// the source's format lines.
fn config_with(receiver: &Receiver, admin: u16, ports: &[(&str, &Path, &str)]) -> String {
    let mut s = format!(
        "[agent]\nid = \"gw-serial\"\ndata_dir = \"data\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[rules]\ndir = \"rules\"\n"
    );
    for (name, path, settings) in ports {
        s.push_str(&format!(
            "\n[[source.serial]]\nname = \"{name}\"\npath = {:?}\n{settings}\nreopen = {{ min = \"100ms\", max = \"500ms\" }}\n",
            path.display().to_string()
        ));
    }
    s.push_str(&format!(
        "\n[[sink.http]]\nname = \"cloud\"\nurl = \"{}\"\nmode = \"batch\"\nretry = {{ min = \"100ms\", max = \"1s\" }}\n",
        receiver.url()
    ));
    s
}

/// Waits until every serial port of the config is open.
fn wait_until_open(agent: &mut Agent, ports: usize) {
    agent.eventually(&format!("{ports} ports to be opened"), |a| {
        let n = a.stderr().matches("serial port open").count();
        if n >= ports {
            Ok(())
        } else {
            Err(format!("{n} open"))
        }
    });
}

fn readings_from(receiver: &Receiver, device: &str) -> Vec<Event> {
    receiver
        .readings()
        .into_iter()
        .filter(|e| e.subject.as_deref() == Some(device))
        .collect()
}

fn wait_for(agent: &mut Agent, receiver: &Receiver, device: &str, n: usize) -> Vec<Event> {
    agent.eventually(&format!("{n} readings from {device}"), |_| {
        let r = readings_from(receiver, device);
        if r.len() >= n {
            Ok(r)
        } else {
            Err(format!("{} so far", r.len()))
        }
    })
}

#[test]
fn csv_lines_from_a_serial_port_arrive_as_readings_and_noise_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let cable = Cable::plug(dir.path(), "freezer");
    let receiver = Receiver::start();
    let mut agent = Agent::start(
        &config(&receiver, free_port(), &[("freezer", &cable.port())]),
        &[],
    );
    agent.eventually("the port to be opened", |a| {
        if a.stderr_contains("serial port open") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });

    // A frame split across writes, invalid UTF-8, an over-long line, CRLF.
    cable.send(b"-18.5,cl");
    cable.send(b"osed\n\xff\xfe\n");
    cable.send(&[b'9'; 200]);
    cable.send(b"\n-17.0,open\r\n");
    let readings = wait_for(&mut agent, &receiver, "freezer", 2);
    assert_eq!(
        readings[0].data,
        serde_json::json!({"temperature": -18.5, "door": "closed"})
    );
    assert_eq!(
        readings[1].data,
        serde_json::json!({"temperature": -17.0, "door": "open"})
    );
    assert_eq!(readings[0].source, "/ferry/gw-serial/serial/freezer");
    let m = agent.wait_for_metric(
        "ferry_input_rejected_total",
        &[("source", "freezer"), ("reason", "too_long")],
        1.0,
    );
    assert_eq!(
        m.value(
            "ferry_input_rejected_total",
            &[("source", "freezer"), ("reason", "invalid_utf8")]
        ),
        1.0,
        "{}",
        m.ferry_lines()
    );
    assert!(agent.stop().success());
}

#[test]
fn an_unplugged_port_is_reopened_and_another_port_keeps_flowing_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Cable::plug(dir.path(), "first");
    let second = Cable::plug(dir.path(), "second");
    let receiver = Receiver::start();
    let config = config(
        &receiver,
        free_port(),
        &[("first", &first.port()), ("second", &second.port())],
    );
    let mut agent = Agent::start(&config, &[]);
    agent.eventually("both ports to be opened", |a| {
        let n = a.stderr().matches("serial port open").count();
        if n >= 2 {
            Ok(())
        } else {
            Err(format!("{n} open"))
        }
    });
    first.send(b"1,a\n");
    second.send(b"2,b\n");
    wait_for(&mut agent, &receiver, "first", 1);
    wait_for(&mut agent, &receiver, "second", 1);

    first.unplug();
    agent.eventually("the agent to notice the unplug", |a| {
        if a.stderr_contains("serial port lost") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });
    second.send(b"3,c\n");
    wait_for(&mut agent, &receiver, "second", 2);

    first.replug();
    agent.eventually("the first port to be reopened", |a| {
        let n = a.stderr().matches("serial port open").count();
        if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n} opens"))
        }
    });
    first.send(b"4,d\n");
    let r = wait_for(&mut agent, &receiver, "first", 2);
    assert_eq!(
        r[1].data,
        serde_json::json!({"temperature": 4, "door": "d"})
    );
    assert!(agent.stop().success());
}

/// A tank level sensor (CSV `id,level`) on one port and a valve controller on
/// another, which `rules` write to; `write` is the valve port's `write` table.
struct Tanks {
    _dir: tempfile::TempDir,
    tank: Cable,
    valves: Cable,
    receiver: Receiver,
    agent: Agent,
}

impl Tanks {
    fn start(write: &str, rules: &str) -> Tanks {
        let dir = tempfile::tempdir().unwrap();
        let tank = Cable::plug(dir.path(), "tank");
        let valves = Cable::plug(dir.path(), "valves");
        let receiver = Receiver::start();
        let valve_settings = format!("format = \"kv\"\nwrite = {write}");
        let config = config_with(
            &receiver,
            free_port(),
            &[
                (
                    "tank",
                    &tank.port(),
                    "format = \"csv\"\nfields = [\"id\", \"level\"]\ndevice = \"{payload.id}\"",
                ),
                ("valves", &valves.port(), &valve_settings),
            ],
        );
        let mut agent = Agent::start(&config, &[("valves.toml", rules)]);
        wait_until_open(&mut agent, 2);
        Tanks {
            _dir: dir,
            tank,
            valves,
            receiver,
            agent,
        }
    }

    /// Unplugs the valve controller and waits until the agent has noticed.
    fn unplug_valves(&mut self) {
        self.valves.unplug();
        self.agent
            .eventually("the agent to notice the unplug", |a| {
                if a.stderr_contains("serial port lost") {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            });
    }

    /// Waits until the valve controller has heard exactly `expected`.
    fn wait_for_heard(&mut self, heard: &Heard, what: &str, expected: &str) {
        self.agent.eventually(what, |_| {
            let text = heard.text();
            if text == expected {
                Ok(())
            } else {
                Err(format!("heard {text:?}"))
            }
        });
    }
}

/// An NMEA sentence with its checksum.
fn nmea(body: &str) -> String {
    let sum = body.bytes().fold(0u8, |acc, b| acc ^ b);
    format!("${body}*{sum:02X}\r\n")
}

#[test]
fn json_kv_and_nmea_lines_arrive_as_readings_with_numbers_and_bad_ones_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let json = Cable::plug(dir.path(), "json");
    let kv = Cable::plug(dir.path(), "kv");
    let gps = Cable::plug(dir.path(), "gps");
    let receiver = Receiver::start();
    let config = config_with(
        &receiver,
        free_port(),
        &[
            (
                "json",
                &json.port(),
                "format = \"json\"\ndevice = \"{payload.id}\"",
            ),
            ("kv", &kv.port(), "format = \"kv\""),
            (
                "gps",
                &gps.port(),
                "format = \"nmea\"\ndevice = \"truck-7\"",
            ),
        ],
    );
    let mut agent = Agent::start(&config, &[]);
    wait_until_open(&mut agent, 3);

    json.send(
        b"{\"id\": \"pump-1\", \"rpm\": 1450, \"on\": true, \"time\": \"2026-11-24T10:00:00Z\"}\n",
    );
    json.send(b"{\"id\": \"pump-1\", \"rpm\": \n");
    kv.send(b"t=21.5 rh=40 door=open\r\n");
    let gga = nmea("GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,");
    let rmc = nmea("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W");
    let corrupted = gga.replace("545.4", "545.5");
    gps.send(format!("{gga}{corrupted}{rmc}").as_bytes());

    let pump = wait_for(&mut agent, &receiver, "pump-1", 1);
    assert_eq!(
        pump[0].data,
        serde_json::json!({"id": "pump-1", "rpm": 1450, "on": true})
    );
    let sent = chrono::DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z").unwrap();
    assert_eq!(pump[0].time, Some(sent.to_utc()));
    assert_eq!(pump[0].source, "/ferry/gw-serial/serial/json");
    let room = wait_for(&mut agent, &receiver, "kv", 1);
    assert_eq!(
        room[0].data,
        serde_json::json!({"t": 21.5, "rh": 40, "door": "open"})
    );
    let fixes = wait_for(&mut agent, &receiver, "truck-7", 2);
    assert_eq!(fixes[0].data["sentence"], "GGA");
    assert_eq!(fixes[0].data["altitude_m"], 545.4);
    assert_eq!(fixes[0].data["satellites"], 8);
    assert_eq!(fixes[1].data["sentence"], "RMC");
    assert_eq!(fixes[1].data["speed_knots"], 22.4);
    assert!((fixes[1].data["latitude"].as_f64().unwrap() - 48.1173).abs() < 1e-4);

    let m = agent.wait_for_metric(
        "ferry_input_rejected_total",
        &[("source", "gps"), ("reason", "bad_checksum")],
        1.0,
    );
    assert_eq!(
        m.value(
            "ferry_input_rejected_total",
            &[("source", "json"), ("reason", "malformed")]
        ),
        1.0,
        "{}",
        m.ferry_lines()
    );
    assert_eq!(readings_from(&receiver, "truck-7").len(), 2);
    assert!(agent.stop().success());
}

#[test]
fn a_rule_action_writes_lines_to_a_serial_port_and_holds_them_while_it_is_unplugged() {
    let rules = r#"
[[rule]]
id = "tank-full"
when = "level > 90"
clear_when = "level < 80"
action.serial_write = { port = "valves", line = "CLOSE {device}", clear_line = "OPEN {device}" }
"#;
    let mut t = Tanks::start("{ line_ending = \"crlf\" }", rules);
    let heard = t.valves.listen();
    t.tank.send(b"tank-1,95\n");
    t.wait_for_heard(&heard, "the valve to be closed", "CLOSE tank-1\r\n");

    // The valve controller goes away; the next command waits for it.
    t.unplug_valves();
    t.tank.send(b"tank-1,70\n");
    wait_for(&mut t.agent, &t.receiver, "tank-1", 2);
    t.valves.replug();
    let heard = t.valves.listen();
    t.wait_for_heard(
        &heard,
        "the held command after the replug",
        "OPEN tank-1\r\n",
    );
    let m = t.agent.metrics();
    assert_eq!(
        m.value("ferry_actions_sent_total", &[("rule", "tank-full")]),
        2.0,
        "{}",
        m.ferry_lines()
    );
    assert!(t.agent.stop().success());
}

#[test]
fn a_port_absent_at_start_and_a_port_flooding_garbage_stop_neither_other_ports_nor_mqtt() {
    let dir = tempfile::tempdir().unwrap();
    let flood = Cable::plug(dir.path(), "flood");
    let live = Cable::plug(dir.path(), "live");
    let late_port = dir.path().join("late-port");
    let broker = Mosquitto::start();
    let receiver = Receiver::start();
    let mut cfg = TestConfig::new("gw-iso", &broker).http(&receiver.url(), "batch");
    for (name, path) in [
        ("flood", flood.port()),
        ("live", live.port()),
        ("late", late_port.clone()),
    ] {
        cfg.extra.push_str(&format!(
            "\n[[source.serial]]\nname = \"{name}\"\npath = {:?}\n{CSV}\nreopen = {{ min = \"100ms\", max = \"500ms\" }}\n",
            path.display().to_string()
        ));
    }
    let mut agent = Agent::start(&cfg.toml(), &[]);
    wait_until_open(&mut agent, 2);
    broker.wait_for_subscription(&cfg.client_id(), "sensors/+/telemetry");

    // Garbage as fast as the pty takes it, until the test ends.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = {
        let stop = Arc::clone(&stop);
        let mut port = std::fs::OpenOptions::new()
            .write(true)
            .open(flood.sensor())
            .unwrap();
        std::thread::spawn(move || {
            let mut state = 0x2545_f491_4f6c_dd1d_u64;
            let mut chunk = [0u8; 4096];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for b in chunk.iter_mut() {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    *b = state as u8;
                }
                if port.write_all(&chunk).is_err() {
                    return;
                }
            }
        })
    };
    agent.wait_for_metric(
        "ferry_input_rejected_total",
        &[("source", "flood"), ("reason", "too_long")],
        10.0,
    );

    broker.publish("sensors/room-1/telemetry", r#"{"seq": 1}"#, 1);
    live.send(b"5,shut\n");
    receiver.wait_for_reading("room-1", 1);
    wait_for(&mut agent, &receiver, "live", 1);

    // The port that was missing at start is plugged in and picked up.
    let late = Cable::plug(dir.path(), "late");
    assert_eq!(late.port(), late_port);
    wait_until_open(&mut agent, 3);
    late.send(b"7,open\n");
    let r = wait_for(&mut agent, &receiver, "late", 1);
    assert_eq!(
        r[0].data,
        serde_json::json!({"temperature": 7, "door": "open"})
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(flood);
    let _ = flooding.join();
    assert!(agent.stop().success());
}

#[test]
fn a_fresh_command_displaces_stale_ones_queued_while_the_port_was_away() {
    // "quiet" reports a tank silent for 4s, by the agent's own clock: longer than
    // the queue's 3s max_age, so a command queued with the reading is stale by then.
    let rules = r#"
[[rule]]
id = "tank-full"
when = "level > 90"
action.serial_write = { port = "valves", line = "CLOSE {device}" }

[[rule]]
id = "quiet"
stale = "4s"
emit = { type = "com.example.quiet", severity = "info" }
"#;
    let mut t = Tanks::start("{ queue = 2, max_age = \"3s\" }", rules);
    t.unplug_valves();

    // Two commands wait until they are stale; a third finds the queue full.
    t.tank.send(b"tank-1,95\ntank-2,95\n");
    wait_for(&mut t.agent, &t.receiver, "tank-2", 1);
    let receiver = &t.receiver;
    t.agent.eventually("tank-2 to be reported quiet", |_| {
        let quiet = receiver
            .events()
            .iter()
            .any(|e| e.ty == "com.example.quiet" && e.subject.as_deref() == Some("tank-2"));
        if quiet {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });
    t.tank.send(b"tank-3,95\n");
    wait_for(&mut t.agent, &t.receiver, "tank-3", 1);
    t.valves.replug();
    let heard = t.valves.listen();
    t.wait_for_heard(
        &heard,
        "the fresh command after the replug",
        "CLOSE tank-3\n",
    );
    let m = t.agent.metrics();
    for reason in ["queue_full", "expired"] {
        assert_eq!(
            m.value("ferry_actions_dropped_total", &[("reason", reason)]),
            1.0,
            "{reason}: {}",
            m.ferry_lines()
        );
    }
    assert!(t.agent.stop().success());
}
