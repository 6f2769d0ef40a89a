//! Modbus RTU polling against a real pseudo-terminal bus (socat): on the far end,
//! tokio-modbus's RTU server plays the devices. Unit 1 answers with known holding,
//! input and coil values, which must arrive as one reading per poll with the right
//! numbers; unit 2 on the same bus answers too late (or, in the other tests, never),
//! which must cost the bus only its timeouts (unit 1 keeps its pace), be counted,
//! and never have its late answer taken for unit 1's. A register map entry at an
//! address unit 1 refuses, and a value it sends as NaN, leave out only their own
//! fields and are each logged once. A bus that is absent at start, then unplugged and
//! replugged, is reopened and polling resumes.

mod support;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// How long unit 2 takes to answer: longer than its 1s timeout, so every answer of
/// it comes late, when the agent has moved on to unit 1.
const UNIT_2_DELAY: Duration = Duration::from_millis(1300);

/// What unit 2 answers, too late to be taken: nothing of it may reach a reading.
const UNIT_2_LEVEL: u16 = 777;

/// The devices on the bus: unit 1 is the boiler; unit 2 stays silent, or with
/// `unit_2_late` always answers too late; every other unit id stays silent. The bus
/// serves one request at a time, so unit 2's late answer is on the wire just before
/// unit 1's answer to the next poll.
struct Bus {
    boiler: Boiler,
    unit_2_late: bool,
    late_answers: Arc<AtomicUsize>,
}

impl Service for Bus {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

    fn call(&self, req: SlaveRequest<'static>) -> Self::Future {
        match req.slave {
            1 => Box::pin(std::future::ready(
                self.boiler.answer(req.request).map(Some),
            )),
            2 if self.unit_2_late => {
                let late_answers = Arc::clone(&self.late_answers);
                Box::pin(async move {
                    tokio::time::sleep(UNIT_2_DELAY).await;
                    late_answers.fetch_add(1, Ordering::Relaxed);
                    Ok(Some(Response::ReadHoldingRegisters(vec![UNIT_2_LEVEL])))
                })
            }
            _ => Box::pin(std::future::ready(Ok(None))),
        }
    }
}

/// The devices, powered on at the far end of a cable: they serve whatever is plugged
/// in at `path` and, like real devices, carry on when the cable comes back.
struct Devices {
    stop: Arc<AtomicBool>,
    late_answers: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Devices {
    fn power_on(path: &Path) -> Devices {
        Self::power_on_with(path, false)
    }

    /// The devices, with unit 2 answering every request too late.
    fn power_on_with_late_unit_2(path: &Path) -> Devices {
        Self::power_on_with(path, true)
    }

    fn power_on_with(path: &Path, unit_2_late: bool) -> Devices {
        let stop = Arc::new(AtomicBool::new(false));
        let late_answers = Arc::new(AtomicUsize::new(0));
        let (path, stopped, late) = (
            path.to_path_buf(),
            Arc::clone(&stop),
            Arc::clone(&late_answers),
        );
        let thread = std::thread::spawn(move || serve(path, stopped, unit_2_late, late));
        Devices {
            stop,
            late_answers,
            thread: Some(thread),
        }
    }

    /// Answers unit 2 has put on the wire, each after the agent gave up on it.
    fn late_answers(&self) -> usize {
        self.late_answers.load(Ordering::Relaxed)
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

fn serve(path: PathBuf, stop: Arc<AtomicBool>, unit_2_late: bool, late_answers: Arc<AtomicUsize>) {
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
                        unit_2_late,
                        late_answers: Arc::clone(&late_answers),
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
fn unit_1_arrives_as_readings_while_unit_2_answering_too_late_is_polled_less_often_and_never_taken_for_unit_1(
) {
    let dir = tempfile::tempdir().unwrap();
    let cable = Cable::plug(dir.path(), "rs485");
    let devices = Devices::power_on_with_late_unit_2(&cable.sensor());
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
    let errors_2 = [("source", "plant"), ("slave", "2"), ("reason", "timeout")];
    let polls_1 = [("source", "plant"), ("slave", "1")];
    let m = agent.wait_for_metric("ferry_modbus_errors_total", &errors_2, 5.0);
    let (timeouts_before, polls_before) = (
        m.value("ferry_modbus_errors_total", &errors_2),
        m.value("ferry_modbus_polls_total", &polls_1),
    );
    let m = agent.wait_for_metric(
        "ferry_modbus_errors_total",
        &errors_2,
        timeouts_before + 2.0,
    );
    let timeouts = m.value("ferry_modbus_errors_total", &errors_2) - timeouts_before;
    let polls = m.value("ferry_modbus_polls_total", &polls_1) - polls_before;
    // Counted in polls, not seconds. Unit 1 is polled every 200ms; a poll of unit 2
    // holds the bus 1.3s. Polled at its own 200ms pace, unit 2 would leave unit 1
    // about one poll per timeout; backed off to once in 5s, some fifteen.
    assert!(
        polls >= 5.0 * timeouts,
        "unit 1 was polled {polls} times during {timeouts} timeouts of unit 2: \
         the failing unit holds the bus"
    );

    // Unit 2's late answers reached the agent while it waited for unit 1, and none
    // was taken for unit 1's: every boiler reading is unit 1's own.
    let late = devices.late_answers();
    assert!(late >= 2, "unit 2 answered late only {late} times");
    let all = boiler_readings_after(&mut agent, &receiver, Utc::now());
    let wrong: Vec<&Event> = all.iter().filter(|e| e.data != first[0].data).collect();
    assert!(
        wrong.is_empty(),
        "readings not from unit 1's registers: {wrong:?}"
    );

    let m = agent.metrics();
    assert!(
        m.value("ferry_modbus_polls_total", &[("slave", "1")]) >= all.len() as f64,
        "{}",
        m.ferry_lines()
    );
    // A late answer that comes while unit 1's answer is awaited is refused (its
    // header names unit 2), and today that costs unit 1 that one poll: at most one
    // refused poll per late answer, and no other failure.
    let mismatches = m.value(
        "ferry_modbus_errors_total",
        &[("slave", "1"), ("reason", "mismatch")],
    );
    assert!(
        mismatches <= devices.late_answers() as f64,
        "more refused answers than late ones: {}",
        m.ferry_lines()
    );
    assert_eq!(
        m.value("ferry_modbus_errors_total", &[("slave", "1")]),
        mismatches,
        "unit 1 failed for another reason: {}",
        m.ferry_lines()
    );
    assert!(
        receiver
            .readings()
            .iter()
            .all(|e| e.subject.as_deref() == Some("boiler")),
        "the late unit produced a reading"
    );
    assert!(agent.stderr_contains("modbus slave not answering"));
    assert_eq!(
        agent.stderr().matches("modbus slave not answering").count(),
        1,
        "a slave that does not answer in time is reported once, not per poll"
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
