//! The Modbus source: polls the slaves on one Modbus RTU bus (a serial port, usually
//! RS-485) and turns each slave's answered poll into one reading.
//!
//! What to ask and what the answers mean (register map, reads, schedule) is decided
//! in [`crate::modbus`], without I/O; this module owns the port.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::line::{FlowControl, LineSettings, Parity};
use crate::config::{problem, BackoffConfig, Dur, Problem};
use crate::modbus::schedule::LONGEST;
use crate::modbus::{Plan, Register, RegisterConfig};

/// `[[source.modbus]]`: one bus, one port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusSourceConfig {
    /// The source's name (in CloudEvents `source`: `/ferry/{agent}/modbus/{name}`).
    pub name: String,
    /// The bus's port. Prefer the stable `/dev/serial/by-id/...` name over
    /// `/dev/ttyUSB0`, which can change when adapters are replugged.
    pub path: PathBuf,
    /// Line speed. Default 19200, the Modbus serial line default.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// 5, 6, 7 or 8. Default 8 (RTU needs 8).
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// `none`, `even` or `odd`. Default `even`, the Modbus serial line default.
    #[serde(default = "default_parity")]
    pub parity: Parity,
    /// 1 or 2. Default 1.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Reopen backoff bounds while the port is away. Default `{ min = "500ms", max = "30s" }`.
    #[serde(default = "default_reopen")]
    pub reopen: BackoffConfig,
    /// The longest interval between polls of a slave that keeps timing out. Default 1m.
    #[serde(default = "default_silent_poll_max")]
    pub silent_poll_max: Dur,
    /// The slaves polled on this bus.
    #[serde(default, rename = "slave")]
    pub slaves: Vec<SlaveConfig>,
}

/// `[[source.modbus.slave]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaveConfig {
    /// The unit id, 1 to 247, unique on the bus.
    pub id: i64,
    /// The device id of its readings. Default `{source name}-{id}`.
    #[serde(default)]
    pub device: Option<String>,
    /// Time between two polls. Default 1s.
    #[serde(default = "default_poll")]
    pub poll: Dur,
    /// How long to wait for each answer. Default 500ms.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// The values to read.
    #[serde(default, rename = "register")]
    pub registers: Vec<RegisterConfig>,
}

fn default_baud() -> u32 {
    19200
}
fn default_data_bits() -> u8 {
    8
}
fn default_parity() -> Parity {
    Parity::Even
}
fn default_stop_bits() -> u8 {
    1
}
fn default_reopen() -> BackoffConfig {
    BackoffConfig::new(Duration::from_millis(500), Duration::from_secs(30))
}
fn default_silent_poll_max() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_poll() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_timeout() -> Dur {
    Dur(Duration::from_millis(500))
}

/// The longest `timeout`: a device that needs more than this is not answering.
const LONGEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A slave ready to poll: checked config and its read plan.
#[derive(Debug, Clone)]
pub struct SlaveSpec {
    pub id: u8,
    pub device: String,
    pub poll: Duration,
    pub timeout: Duration,
    pub registers: Vec<Register>,
    pub plan: Plan,
}

impl ModbusSourceConfig {
    pub(crate) fn line(&self) -> LineSettings {
        LineSettings {
            baud: self.baud,
            data_bits: self.data_bits,
            parity: self.parity,
            stop_bits: self.stop_bits,
            flow_control: FlowControl::None,
        }
    }

    pub fn validate(&self, i: usize) -> Vec<Problem> {
        let mut out = Vec::new();
        let n = &self.name;
        out.extend(
            self.line()
                .validate(&["source".into(), "modbus".into(), i.into()], n),
        );
        out.extend(self.reopen.validate(&[
            "source".into(),
            "modbus".into(),
            i.into(),
            "reopen".into(),
        ]));
        if self.silent_poll_max.0.is_zero() || self.silent_poll_max.0 > LONGEST {
            out.push(problem!(
                ["source", "modbus", i, "silent_poll_max"],
                "source {n:?}: silent_poll_max must be more than 0 and at most 24h"
            ));
        }
        if self.slaves.is_empty() {
            out.push(problem!(
                ["source", "modbus", i],
                "source {n:?}: no slaves to poll: add a [[source.modbus.slave]] with its registers"
            ));
        }
        let mut ids = HashSet::new();
        for (j, s) in self.slaves.iter().enumerate() {
            let id = s.id;
            if !(1..=247).contains(&id) {
                out.push(problem!(
                    ["source", "modbus", i, "slave", j, "id"],
                    "source {n:?}: slave id {id} is out of range: unit ids are 1 to 247 (0 is broadcast, which nobody answers)"
                ));
            } else if !ids.insert(id) {
                out.push(problem!(
                    ["source", "modbus", i, "slave", j, "id"],
                    "source {n:?}: slave id {id} appears twice on this bus"
                ));
            }
            if s.device.as_deref().is_some_and(|d| d.trim().is_empty()) {
                out.push(problem!(
                    ["source", "modbus", i, "slave", j, "device"],
                    "source {n:?}, slave {id}: device must not be empty"
                ));
            }
            if s.poll.0.is_zero() || s.poll.0 > LONGEST {
                out.push(problem!(
                    ["source", "modbus", i, "slave", j, "poll"],
                    "source {n:?}, slave {id}: poll must be more than 0 and at most 24h"
                ));
            }
            if s.timeout.0.is_zero() || s.timeout.0 > LONGEST_TIMEOUT {
                out.push(problem!(
                    ["source", "modbus", i, "slave", j, "timeout"],
                    "source {n:?}, slave {id}: timeout must be more than 0 and at most 1m"
                ));
            }
            if s.registers.is_empty() {
                out.push(problem!(
                    ["source", "modbus", i, "slave", j],
                    "source {n:?}, slave {id}: no registers: add a [[source.modbus.slave.register]]"
                ));
            }
            let mut fields = HashSet::new();
            for (k, r) in s.registers.iter().enumerate() {
                let f = &r.field;
                if let Err(problems) = r.check() {
                    for p in problems {
                        out.push(problem!(
                            ["source", "modbus", i, "slave", j, "register", k, p.key],
                            "source {n:?}, slave {id}, register {f:?}: {}",
                            p.message
                        ));
                    }
                }
                if !fields.insert(f.as_str()) {
                    out.push(problem!(
                        ["source", "modbus", i, "slave", j, "register", k, "field"],
                        "source {n:?}, slave {id}: field {f:?} appears twice; each register needs its own field name"
                    ));
                }
            }
        }
        out
    }

    /// The checked slaves with their read plans. `Err` says what is wrong (validation
    /// reports the same, with positions, before a source ever starts).
    pub fn slaves(&self) -> Result<Vec<SlaveSpec>, String> {
        let problems = self.validate(0);
        if let Some(p) = problems.first() {
            return Err(p.message.clone());
        }
        self.slaves
            .iter()
            .map(|s| {
                let registers = s
                    .registers
                    .iter()
                    .map(|r| r.check())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|p| format!("slave {}: invalid register map {p:?}", s.id))?;
                Ok(SlaveSpec {
                    id: u8::try_from(s.id).map_err(|_| format!("slave id {}", s.id))?,
                    device: s
                        .device
                        .clone()
                        .unwrap_or_else(|| format!("{}-{}", self.name, s.id)),
                    poll: s.poll.0,
                    timeout: s.timeout.0,
                    plan: Plan::new(&registers),
                    registers,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> ModbusSourceConfig {
        toml::from_str(text).unwrap()
    }

    fn messages(c: &ModbusSourceConfig) -> Vec<String> {
        c.validate(0).into_iter().map(|p| p.message).collect()
    }

    const ONE_SLAVE: &str = r#"
name = "plant"
path = "/dev/ttyUSB0"
[[slave]]
id = 3
[[slave.register]]
field = "t"
address = 0
"#;

    #[test]
    fn defaults_are_19200_8e1_a_1s_poll_a_500ms_timeout_and_source_id_devices() {
        let c = cfg(ONE_SLAVE);
        assert_eq!(
            (c.baud, c.data_bits, c.parity, c.stop_bits),
            (19200, 8, Parity::Even, 1)
        );
        assert!(messages(&c).is_empty(), "{:?}", messages(&c));
        let slaves = c.slaves().unwrap();
        assert_eq!(slaves[0].device, "plant-3");
        assert_eq!(slaves[0].poll, Duration::from_secs(1));
        assert_eq!(slaves[0].timeout, Duration::from_millis(500));
        assert_eq!(c.silent_poll_max.0, Duration::from_secs(60));
    }

    #[test]
    fn a_bus_without_slaves_and_a_slave_without_registers_are_refused() {
        let c = cfg("name='plant'\npath='/dev/x'");
        assert!(messages(&c)[0].contains("no slaves"), "{:?}", messages(&c));
        let c = cfg("name='plant'\npath='/dev/x'\n[[slave]]\nid=1");
        assert!(
            messages(&c)[0].contains("no registers"),
            "{:?}",
            messages(&c)
        );
        assert!(c.slaves().is_err());
    }

    #[test]
    fn ids_poll_and_timeout_out_of_range_are_each_reported() {
        let c = cfg(r#"
name = "plant"
path = "/dev/x"
[[slave]]
id = 0
poll = "0s"
timeout = "0s"
[[slave.register]]
field = "a"
address = 0
[[slave]]
id = 248
timeout = "2m"
[[slave.register]]
field = "a"
address = 0
[[slave]]
id = 5
[[slave.register]]
field = "a"
address = 0
[[slave]]
id = 5
[[slave.register]]
field = "a"
address = 0
"#);
        let m = messages(&c);
        assert_eq!(m.len(), 6, "{m:#?}");
        assert!(m[0].contains("slave id 0 is out of range"), "{}", m[0]);
        assert!(m[1].contains("poll must be"), "{}", m[1]);
        assert!(m[2].contains("timeout must be"), "{}", m[2]);
        assert!(m[3].contains("slave id 248"), "{}", m[3]);
        assert!(m[4].contains("timeout must be"), "{}", m[4]);
        assert!(m[5].contains("appears twice"), "{}", m[5]);
    }

    #[test]
    fn register_problems_and_duplicate_fields_are_located_under_the_register() {
        let c = cfg(r#"
name = "plant"
path = "/dev/x"
[[slave]]
id = 1
[[slave.register]]
field = "t"
address = 70000
[[slave.register]]
field = "t"
address = 1
function = "coil"
type = "f32"
"#);
        let problems = c.validate(0);
        let m: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(m.len(), 3, "{m:#?}");
        assert!(m[0].contains("register \"t\": address 70000"), "{}", m[0]);
        assert!(m[1].contains("only be bool"), "{}", m[1]);
        assert!(m[2].contains("field \"t\" appears twice"), "{}", m[2]);
        let path = format!("{:?}", problems[1].path);
        assert!(
            path.contains("Index(1)") && path.contains("\"type\""),
            "{path}"
        );
    }

    #[test]
    fn an_unknown_key_in_a_register_is_an_error() {
        let err = toml::from_str::<ModbusSourceConfig>(
            "name='p'\npath='/x'\n[[slave]]\nid=1\n[[slave.register]]\nfield='a'\naddress=0\nscael=2.0",
        )
        .unwrap_err();
        assert!(err.to_string().contains("scael"), "{err}");
    }
}
