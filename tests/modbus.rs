//! Modbus RTU polling against a real pseudo-terminal bus (socat): on the far end,
//! tokio-modbus's RTU server plays the devices. Unit 1 answers with known holding,
//! input and coil values, which must arrive as one reading per poll with the right
//! numbers; unit 2 on the same bus never answers, which must cost the bus only its
//! timeouts (unit 1 keeps its pace) and be counted. A register map entry at an
//! address unit 1 refuses, and a value it sends as NaN, leave out only their own
//! fields and are each logged once. A bus that is absent at start, then unplugged and
//! replugged, is reopened and polling resumes.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use support::*;
use tokio_modbus::prelude::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_modbus::server::rtu::Server;
use tokio_modbus::server::Service;

/// Unit 1's register tables: holding, input and coil values by address.
struct Boiler {
    holding: HashMap<u16, u16>,
    input: HashMap<u16, u16>,
    coils: HashMap<u16, bool>,
}

impl Boiler {
    fn new() -> Boiler {
        let flow = 12.75f32.to_bits();
        let energy: u32 = 70_000;
        let nan = f32::NAN.to_bits();
        Boiler {
            holding: HashMap::from([
                (0, (-20i16) as u16),     // setpoint, i16
                (1, (flow >> 16) as u16), // flow, f32 high word first
                (2, flow as u16),         //
                (3, 0xFFFF),              // unmapped, never read
                (10, (nan >> 16) as u16), // outdoor, f32: NaN, "no sensor fitted"
                (11, nan as u16),         //
            ]),
            input: HashMap::from([
                (0, 456),                      // humidity, u16 * 0.1
                (1, (energy & 0xFFFF) as u16), // energy, u32 low word first
                (2, (energy >> 16) as u16),    //
                (3, (-215i16) as u16),         // temperature, i16 * 0.1
            ]),
            coils: HashMap::from([(0, true)]),
        }
    }

    fn words(table: &HashMap<u16, u16>, addr: u16, n: u16) -> Result<Vec<u16>, ExceptionCode> {
        (addr..addr.saturating_add(n))
            .map(|a| {
                table
                    .get(&a)
                    .copied()
                    .ok_or(ExceptionCode::IllegalDataAddress)
            })
            .collect()
    }

    fn answer(&self, request: Request<'static>) -> Result<Response, ExceptionCode> {
        match request {
            Request::ReadHoldingRegisters(a, n) => {
                Self::words(&self.holding, a, n).map(Response::ReadHoldingRegisters)
            }
            Request::ReadInputRegisters(a, n) => {
                Self::words(&self.input, a, n).map(Response::ReadInputRegisters)
            }
            Request::ReadCoils(a, n) => (a..a.saturating_add(n))
                .map(|a| {
                    self.coils
                        .get(&a)
                        .copied()
                        .ok_or(ExceptionCode::IllegalDataAddress)
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Response::ReadCoils),
            _ => Err(ExceptionCode::IllegalFunction),
        }
    }
}

/// The devices on the bus: unit 1 is the boiler, every other unit id stays silent.
struct Bus {
    boiler: Boiler,
}

impl Service for Bus {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: SlaveRequest<'static>) -> Self::Future {
        std::future::ready(match req.slave {
            1 => self.boiler.answer(req.request).map(Some),
            _ => Ok(None),
        })
    }
}

/// The devices, powered on at the far end of a cable: they serve whatever is plugged
/// in at `path` and, like real devices, carry on when the cable comes back.
struct Devices {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Devices {
    fn power_on(path: &Path) -> Devices {
        let stop = Arc::new(AtomicBool::new(false));
        let (path, stopped) = (path.to_path_buf(), Arc::clone(&stop));
        let thread = std::thread::spawn(move || serve(path, stopped));
        Devices {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(path: PathBuf, stop: Arc<AtomicBool>) {
    use tokio_serial::SerialPortBuilderExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the simulated devices");
    rt.block_on(async move {
        let stopped = || {
            let stop = Arc::clone(&stop);
            async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        while !stop.load(Ordering::Relaxed) {
            // Absent while the cable is unplugged; a server that stops (the cable was
            // pulled, or it read something it could not decode) starts again.
            match tokio_serial::new(path.to_string_lossy(), 19200).open_native_async() {
                Ok(port) => {
                    let bus = Bus {
                        boiler: Boiler::new(),
                    };
                    let _ = Server::new(port).serve_until(bus, stopped()).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
}

fn config(receiver: &Receiver, admin: u16, port: &Path) -> String {
    config_with(receiver, admin, port, "")
}

/// The config, with `more` (register tables) added to unit 1's register map.
fn config_with(receiver: &Receiver, admin: u16, port: &Path, more: &str) -> String {
    format!(
        r#"[agent]
id = "gw-modbus"
data_dir = "data"

[admin]
listen = "127.0.0.1:{admin}"

[[source.modbus]]
name = "plant"
path = {port:?}
reopen = {{ min = "100ms", max = "500ms" }}
silent_poll_max = "5s"

[[source.modbus.slave]]
id = 1
device = "boiler"
poll = "200ms"
timeout = "500ms"

[[source.modbus.slave.register]]
field = "setpoint"
address = 0
type = "i16"

[[source.modbus.slave.register]]
field = "flow"
address = 1
type = "f32"

[[source.modbus.slave.register]]
field = "humidity"
function = "input"
address = 0
scale = 0.1

[[source.modbus.slave.register]]
field = "energy"
function = "input"
address = 1
type = "u32"
word_order = "little"

[[source.modbus.slave.register]]
field = "temperature"
function = "input"
address = 3
type = "i16"
scale = 0.1

[[source.modbus.slave.register]]
field = "pump"
function = "coil"
address = 0
{more}
[[source.modbus.slave]]
id = 2
poll = "200ms"
timeout = "1s"

[[source.modbus.slave.register]]
field = "level"
address = 0

[[sink.http]]
name = "cloud"
url = "{url}"
mode = "batch"
retry = {{ min = "100ms", max = "1s" }}
"#,
        port = port.display().to_string(),
        url = receiver.url(),
    )
}

fn boiler_readings(receiver: &Receiver) -> Vec<Event> {
    receiver
        .readings()
        .into_iter()
        .filter(|e| e.subject.as_deref() == Some("boiler"))
        .collect()
}

fn time_of(e: &Event) -> DateTime<Utc> {
    e.time.expect("every reading has a time")
}

/// Waits until a boiler reading taken after `after` has arrived; returns them all.
fn boiler_readings_after(
    agent: &mut Agent,
    receiver: &Receiver,
    after: DateTime<Utc>,
) -> Vec<Event> {
    agent.eventually(&format!("a boiler reading taken after {after}"), |_| {
        let r = boiler_readings(receiver);
        if r.iter().any(|e| time_of(e) > after) {
            Ok(r)
        } else {
            Err(format!("{} boiler readings so far", r.len()))
        }
    })
}

#[test]
fn unit_1_arrives_as_readings_while_silent_unit_2_costs_only_its_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let cable = Cable::plug(dir.path(), "rs485");
    let _devices = Devices::power_on(&cable.sensor());
    let receiver = Receiver::start();
    let mut agent = Agent::start(&config(&receiver, free_port(), &cable.port()), &[]);

    let first = boiler_readings_after(&mut agent, &receiver, DateTime::<Utc>::MIN_UTC);
    let r = &first[0];
    assert_eq!(r.source, "/ferry/gw-modbus/modbus/plant");
    assert_eq!(
        r.data,
        json!({
            "setpoint": -20,
            "flow": 12.75,
            "humidity": 45.6,
            "energy": 70000,
            "temperature": -21.5,
            "pump": true,
        })
    );
    assert!(
        r.data["setpoint"].is_i64() && r.data["energy"].is_u64(),
        "unscaled integers stay integers: {}",
        r.data
    );

    // Five timeouts in a row: unit 2 is on its longer interval now.
    agent.wait_for_metric(
        "ferry_modbus_errors_total",
        &[("source", "plant"), ("slave", "2"), ("reason", "timeout")],
        5.0,
    );
    let window = chrono::Duration::seconds(6);
    let start = Utc::now();
    std::thread::sleep(Duration::from_secs(6));
    let all = boiler_readings_after(&mut agent, &receiver, start + window);
    let in_window = all
        .iter()
        .filter(|e| time_of(e) >= start && time_of(e) < start + window)
        .count();
    // Unit 1 alone would give 30 readings in 6s (every 200ms). If each of unit 2's
    // polls blocked the bus it would be 0; if unit 2 were polled every 200ms at 1s
    // a timeout, about 10; with unit 2 backed off to one 1s timeout every 6s, about 25.
    assert!(
        in_window >= 15,
        "only {in_window} boiler readings in {window}: the silent unit holds the bus"
    );
    // One dead slave costs at most its timeout: no gap between two boiler readings
    // is much longer than unit 2's 1s timeout plus unit 1's 200ms interval.
    let times: Vec<_> = all.iter().map(time_of).collect();
    let longest = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        longest < chrono::Duration::milliseconds(2500),
        "unit 1 went {longest} without a reading"
    );

    let m = agent.metrics();
    assert!(
        m.value("ferry_modbus_polls_total", &[("slave", "1")]) >= all.len() as f64,
        "{}",
        m.ferry_lines()
    );
    assert_eq!(
        m.value("ferry_modbus_errors_total", &[("slave", "1")]),
        0.0,
        "unit 1 never failed, and no late answer was taken for it: {}",
        m.ferry_lines()
    );
    assert!(
        receiver
            .readings()
            .iter()
            .all(|e| e.subject.as_deref() == Some("boiler")),
        "the silent unit produced a reading"
    );
    assert!(agent.stderr_contains("modbus slave not answering"));
    assert_eq!(
        agent.stderr().matches("modbus slave not answering").count(),
        1,
        "a silent slave is reported once, not per poll"
    );
    assert!(agent.stop().success());
}

#[test]
fn a_bus_absent_at_start_then_unplugged_and_replugged_is_polled_again() {
    let dir = tempfile::tempdir().unwrap();
    let port = dir.path().join("rs485-port");
    let receiver = Receiver::start();
    let mut agent = Agent::start(&config(&receiver, free_port(), &port), &[]);
    agent.eventually("the agent to report the absent port", |a| {
        if a.stderr_contains("cannot open modbus port") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });

    let mut cable = Cable::plug(dir.path(), "rs485");
    assert_eq!(cable.port(), port);
    let _devices = Devices::power_on(&cable.sensor());
    boiler_readings_after(&mut agent, &receiver, DateTime::<Utc>::MIN_UTC);

    cable.unplug();
    agent.eventually("the agent to notice the unplug", |a| {
        if a.stderr_contains("modbus port lost") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });
    agent.wait_for_metric(
        "ferry_modbus_errors_total",
        &[("source", "plant"), ("reason", "io")],
        1.0,
    );

    cable.replug();
    let replugged = Utc::now();
    let r = boiler_readings_after(&mut agent, &receiver, replugged);
    let after = r.iter().find(|e| time_of(e) > replugged).unwrap();
    assert_eq!(after.data["temperature"], json!(-21.5));
    assert_eq!(
        agent.stderr().matches("cannot open modbus port").count(),
        1,
        "an absent port is reported once, not per retry"
    );
    assert!(agent.stop().success());
}

#[test]
fn a_refused_register_and_a_nan_leave_out_only_their_fields_and_are_logged_once() {
    let dir = tempfile::tempdir().unwrap();
    let cable = Cable::plug(dir.path(), "rs485");
    let _devices = Devices::power_on(&cable.sensor());
    let receiver = Receiver::start();
    // "valve" is numbered as in a manual (holding register 40101 is address 100 on
    // the wire): unit 1 has no such address and refuses that read with an exception.
    let more = r#"
[[source.modbus.slave.register]]
field = "valve"
address = 40101

[[source.modbus.slave.register]]
field = "outdoor"
address = 10
type = "f32"
"#;
    let mut agent = Agent::start(
        &config_with(&receiver, free_port(), &cable.port(), more),
        &[],
    );

    // Several polls, each refusing the valve's read and leaving out the NaN.
    agent.wait_for_metric(
        "ferry_modbus_errors_total",
        &[("source", "plant"), ("slave", "1"), ("reason", "exception")],
        5.0,
    );
    agent.wait_for_metric(
        "ferry_modbus_errors_total",
        &[("source", "plant"), ("slave", "1"), ("reason", "decode")],
        5.0,
    );
    let readings = agent.eventually("three boiler readings", |_| {
        let r = boiler_readings(&receiver);
        if r.len() >= 3 {
            Ok(r)
        } else {
            Err(format!("{} boiler readings so far", r.len()))
        }
    });
    for r in &readings {
        assert_eq!(
            r.data,
            json!({
                "setpoint": -20,
                "flow": 12.75,
                "humidity": 45.6,
                "energy": 70000,
                "temperature": -21.5,
                "pump": true,
            }),
            "only valve and outdoor are left out"
        );
    }

    let stderr = agent.stderr();
    let refused: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("modbus read refused"))
        .collect();
    assert_eq!(refused.len(), 1, "logged once, not per poll: {refused:#?}");
    for needle in [
        "slave=1",
        "function=\"holding\"",
        "address=40101",
        "count=1",
        "fields=\"valve\"",
        "Illegal data address",
    ] {
        assert!(refused[0].contains(needle), "{needle} in {}", refused[0]);
    }
    let left_out: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("modbus value left out"))
        .collect();
    assert_eq!(
        left_out.len(),
        1,
        "logged once, not per poll: {left_out:#?}"
    );
    assert!(left_out[0].contains("outdoor"), "{}", left_out[0]);
    assert!(
        !stderr.contains("modbus slave polls failing"),
        "unit 1 answers: a refused read is not a failing slave"
    );
    assert!(agent.stop().success());
}
