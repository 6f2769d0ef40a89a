//! The Modbus source: polls the slaves on one Modbus RTU bus (a serial port, usually
//! RS-485) and turns each slave's answered poll into one reading.
//!
//! What to ask and what the answers mean (register map, reads, schedule) is decided
//! in [`crate::modbus`], without I/O; this module owns the port.
//!
//! # One task per bus
//! An RTU bus is half-duplex: one request, then its answer, then the next request.
//! So each bus is one task that sends one request at a time, to the slave the
//! [`Schedule`] says is due, and waits at most that slave's `timeout` for the answer.
//! A dead slave therefore costs the bus its timeout per poll and never more; after
//! [`SILENT_AFTER`](crate::modbus::schedule::SILENT_AFTER) timeouts in a row it is
//! polled less and less often (up to `silent_poll_max`), so the live slaves keep most
//! of the bus, and it is back on its own interval at its first answer.
//!
//! # Exceptions and left-out values
//! A slave that refuses a read with a Modbus exception (an address it does not have,
//! say) is alive: only that read's fields are missing, its other reads still go out
//! and its reading carries what they returned. Likewise a value that is not a finite
//! number is left out and the rest of the reading goes. Both usually last (a wrong
//! register map entry is refused on every poll), so each is counted on every poll but
//! logged when it starts and when it ends ([`Gaps`]), naming the read (function,
//! address, count and the fields it covers) or the field.
//!
//! # Late answers
//! A slave that answers after its timeout must not be taken for the next slave's
//! answer. Three things stop that: whatever sits in the receive buffer when a request
//! goes out is discarded ([`Line`] clears the port's input, tokio-modbus clears its
//! own read buffer before each request); tokio-modbus refuses an answer whose unit id
//! or function differs from the request's; and an answer with the wrong number of
//! registers is refused here. Each refusal is counted as `mismatch`.
//!
//! # The port
//! A port that is absent at start, or fails (unplugged: a read or write error, or end
//! of file), is closed and reopened by the same path with jittered backoff, logged
//! once per change; other sources are not affected. A garbled answer that
//! tokio-modbus cannot decode leaves its decoder in an error state, so the port is
//! reopened at once, quietly, with a fresh one.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_modbus::client::{rtu, Client, Context};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tokio_serial::{ClearBuffer, SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::line::{FlowControl, Keeper, LineSettings, Parity};
use super::{Inlet, Input, Origin, Payload};
use crate::config::{problem, BackoffConfig, Dur, Problem};
use crate::modbus::schedule::LONGEST;
use crate::modbus::{
    frame_gap, outcome, Answer, Change, DecodeError, Failure, Function, Gaps, Plan, Read, Register,
    RegisterConfig, Schedule, Turn,
};
use crate::ratelimit::RateLimit;

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

/// A Modbus source ready to run.
pub struct ModbusSource {
    pub cfg: ModbusSourceConfig,
    pub origin: Arc<Origin>,
}

/// Why a port session ended.
enum Ended {
    Cancelled,
    /// The port failed: reopen with backoff.
    Lost(String),
    /// An answer left tokio-modbus's decoder in its error state: reopen at once.
    Garbled,
}

impl ModbusSource {
    /// Runs until `cancel`: open the port, poll the slaves, reopen when the port fails.
    pub async fn run(self, tx: Inlet, cancel: CancellationToken) {
        let name = self.cfg.name.clone();
        let path = self.cfg.path.display().to_string();
        let slaves = match self.cfg.slaves() {
            Ok(s) => s,
            Err(error) => {
                // Validation catches this first; never take the other sources down.
                warn!(source = %name, %error, "cannot start modbus source");
                return;
            }
        };
        let mut bus = Bus {
            name: &name,
            origin: &self.origin,
            schedule: Schedule::new(
                slaves.iter().map(|s| s.poll),
                self.cfg.silent_poll_max.0,
                Instant::now(),
            ),
            slaves: &slaves,
            gaps: slaves.iter().map(|_| SlaveGaps::default()).collect(),
            gap: frame_gap(self.cfg.baud),
            log_limit: RateLimit::new(10, Duration::from_secs(60)),
            tx: &tx,
            cancel: &cancel,
        };
        let mut keeper = Keeper::new(
            "modbus",
            &name,
            &self.cfg.path,
            self.cfg.line(),
            self.cfg.reopen,
        );
        let mut quiet_reopen = false;
        while let Some(port) = keeper.open(&cancel).await {
            if quiet_reopen {
                debug!(source = %name, %path, "modbus port reopened after a garbled answer");
            } else if keeper.quiet() {
                debug!(source = %name, %path, "modbus port open again");
            } else {
                info!(source = %name, %path, slaves = slaves.len(), "modbus port open");
            }
            quiet_reopen = false;
            let (ended, answered) = bus.session(port).await;
            if answered {
                keeper.worked();
            }
            match ended {
                Ended::Cancelled => return,
                Ended::Garbled => quiet_reopen = true,
                Ended::Lost(why) => {
                    if !keeper.lost(&why, &cancel).await {
                        return;
                    }
                }
            }
        }
    }
}

/// One bus's polling state; it outlives port sessions, so a reopened port carries on
/// with the same schedule, slave health and gaps (nothing is logged again for a
/// read that was already refused before the port was reopened).
struct Bus<'a> {
    name: &'a str,
    origin: &'a Arc<Origin>,
    slaves: &'a [SlaveSpec],
    schedule: Schedule,
    /// One per slave, as `slaves`.
    gaps: Vec<SlaveGaps>,
    gap: Duration,
    /// For the log lines of a read or field that keeps coming and going (see [`Gaps`]).
    log_limit: RateLimit,
    tx: &'a Inlet,
    cancel: &'a CancellationToken,
}

impl Bus<'_> {
    /// Polls on one open port until it fails or `cancel`; also says whether any slave
    /// answered.
    async fn session(&mut self, port: SerialStream) -> (Ended, bool) {
        let state = Arc::new(LineState::default());
        let mut ctx = rtu::attach(Line {
            port,
            state: Arc::clone(&state),
        });
        let mut answered = false;
        let mut quiet_from = Instant::now();
        loop {
            let Some((i, due)) = self.schedule.next() else {
                self.cancel.cancelled().await;
                return (Ended::Cancelled, answered);
            };
            let Some(slave) = self.slaves.get(i) else {
                // The schedule has one entry per slave, so this is never reached.
                return (Ended::Lost("the schedule names no slave".into()), answered);
            };
            let start = due.max(quiet_from + self.gap);
            tokio::select! {
                _ = self.cancel.cancelled() => return (Ended::Cancelled, answered),
                _ = tokio::time::sleep_until(start.into()) => {}
            }
            metrics::counter!("ferry_modbus_polls_total", "source" => self.name.to_string(), "slave" => slave.id.to_string())
                .increment(1);
            let result = tokio::select! {
                _ = self.cancel.cancelled() => return (Ended::Cancelled, answered),
                r = poll(&mut ctx, &state, slave) => r,
            };
            quiet_from = Instant::now();
            match result {
                Ok(replies) => {
                    answered = true;
                    let (input, outcome) = self.reading(i, slave, replies);
                    if let Some(input) = input {
                        tokio::select! {
                            _ = self.cancel.cancelled() => return (Ended::Cancelled, answered),
                            r = self.tx.send(input) => if r.is_err() { return (Ended::Cancelled, answered) },
                        }
                    }
                    let why = match outcome {
                        Err(Failure::Exception) => "every read was refused with an exception",
                        _ => "no value in the answers could be decoded",
                    };
                    let change = self.schedule.record(i, outcome, Instant::now());
                    self.report(i, slave, change, why);
                }
                Err(e) => {
                    let failure = e.failure();
                    answered |= !matches!(failure, Failure::Timeout | Failure::Io);
                    self.count(slave, failure);
                    debug!(source = %self.name, slave = slave.id, device = %slave.device, reason = failure.reason(), error = %e, "modbus poll failed");
                    let ended = match &e {
                        PollError::Lost(why) => Some(Ended::Lost(why.clone())),
                        PollError::Timeout {
                            request_stuck: true,
                        } => Some(Ended::Lost(
                            "a request could not be sent within the timeout".into(),
                        )),
                        PollError::Garbled(_) => Some(Ended::Garbled),
                        _ => None,
                    };
                    let change = self.schedule.record(i, Err(failure), Instant::now());
                    self.report(i, slave, change, &e);
                    if let Some(ended) = ended {
                        return (ended, answered);
                    }
                }
            }
        }
    }

    /// The reading of a poll whose reads all got a reply (`None` if it holds no
    /// field), and how the poll went for the schedule. Refused reads and values left
    /// out are counted on every poll and logged once per change.
    fn reading(
        &mut self,
        i: usize,
        slave: &SlaveSpec,
        replies: Vec<Reply>,
    ) -> (Option<Input>, Result<(), Failure>) {
        let mut answers = Vec::with_capacity(replies.len());
        for (k, reply) in replies.into_iter().enumerate() {
            let refused = reply.as_ref().err().copied();
            if refused.is_some() {
                self.count(slave, Failure::Exception);
            }
            let turn = self
                .gaps
                .get_mut(i)
                .and_then(|g| g.reads.observe(k, refused));
            if let (Some(turn), Some(read)) = (turn, slave.plan.reads.get(k)) {
                self.log_read(slave, k, read, turn, refused);
            }
            answers.push(reply.ok());
        }
        let reads_answered = answers.iter().filter(|a| a.is_some()).count();
        let values = slave.plan.values(&slave.registers, &answers);
        let mut fields = serde_json::Map::new();
        for (k, (register, value)) in slave.registers.iter().zip(values).enumerate() {
            let error = match value {
                // Its read was refused: whether it has a value is not known.
                None => continue,
                Some(Ok(v)) => {
                    fields.insert(register.field.clone(), v);
                    None
                }
                Some(Err(e)) => {
                    self.count(slave, Failure::Decode);
                    Some(e)
                }
            };
            let turn = self
                .gaps
                .get_mut(i)
                .and_then(|g| g.fields.observe(k, error.as_ref().map(|_| ())));
            if let Some(turn) = turn {
                self.log_field(slave, register, turn, error.as_ref());
            }
        }
        let outcome = outcome(fields.len(), reads_answered);
        if fields.is_empty() {
            return (None, outcome);
        }
        metrics::counter!("ferry_input_received_total", "source" => self.name.to_string())
            .increment(1);
        let input = Input {
            origin: Arc::clone(self.origin),
            received: chrono::Utc::now(),
            payload: Payload::Fields {
                device: slave.device.clone(),
                fields,
            },
            ack: None,
            delivery: None,
        };
        (Some(input), outcome)
    }

    /// Whether to log `turn`, and how many such lines were suppressed before it: a
    /// key's first turns (it went missing, it came back) always are; the later ones
    /// of a key that keeps coming and going share the bus's rate limit.
    fn let_through(&mut self, turn: Turn) -> Option<u64> {
        if turn.first() {
            return Some(0);
        }
        self.log_limit.check(Instant::now())
    }

    /// Logs that read `k` of `slave` started being refused (with `refused`) or is
    /// answered again.
    fn log_read(
        &mut self,
        slave: &SlaveSpec,
        k: usize,
        read: &Read,
        turn: Turn,
        refused: Option<ExceptionCode>,
    ) {
        let Some(suppressed) = self.let_through(turn) else {
            return;
        };
        let (source, id, device) = (self.name, slave.id, &slave.device);
        let (function, address, count) = (read.function.name(), read.address, read.count);
        // Logged as a str, which text logs quote: `fields="setpoint, flow"` reads as
        // one value.
        let fields = fields_of(slave, k);
        match (turn, refused) {
            (Turn::Opened { .. }, Some(exception)) => warn!(
                %source, slave = id, %device, function, address, count, fields = fields.as_str(), %exception, suppressed,
                "modbus read refused; its fields are left out of the readings until it is answered"
            ),
            (Turn::Closed { polls, .. }, _) => info!(
                %source, slave = id, %device, function, address, count, fields = fields.as_str(), refused_polls = polls, suppressed,
                "modbus read answered again"
            ),
            // An opened gap always comes with its exception.
            (Turn::Opened { .. }, None) => {}
        }
    }

    /// Logs that `register`'s value started being left out (for `error`) or is back.
    fn log_field(
        &mut self,
        slave: &SlaveSpec,
        register: &Register,
        turn: Turn,
        error: Option<&DecodeError>,
    ) {
        let Some(suppressed) = self.let_through(turn) else {
            return;
        };
        let (source, id, device, field) = (self.name, slave.id, &slave.device, &register.field);
        match (turn, error) {
            (Turn::Opened { .. }, Some(error)) => warn!(
                %source, slave = id, %device, %field, %error, suppressed,
                "modbus value left out of the readings until it has a value again"
            ),
            (Turn::Closed { polls, .. }, _) => info!(
                %source, slave = id, %device, %field, left_out_polls = polls, suppressed,
                "modbus value back in the readings"
            ),
            (Turn::Opened { .. }, None) => {}
        }
    }

    fn count(&self, slave: &SlaveSpec, failure: Failure) {
        metrics::counter!(
            "ferry_modbus_errors_total",
            "source" => self.name.to_string(),
            "slave" => slave.id.to_string(),
            "reason" => failure.reason()
        )
        .increment(1);
    }

    /// Logs a change in a slave's health, once per change; `why` is the failure's
    /// detail (e.g. the exception), for the line that says it started failing.
    fn report(
        &self,
        i: usize,
        slave: &SlaveSpec,
        change: Option<Change>,
        why: impl std::fmt::Display,
    ) {
        let (source, id, device) = (self.name, slave.id, &slave.device);
        match change {
            None => {}
            Some(Change::Answering { after_failures: 0 }) => {
                info!(%source, slave = id, %device, "modbus slave answering")
            }
            Some(Change::Answering { after_failures }) => {
                info!(%source, slave = id, %device, failed_polls = after_failures, "modbus slave answering again")
            }
            Some(Change::Failing(Failure::Timeout)) => warn!(
                %source, slave = id, %device, timeout = ?slave.timeout,
                "modbus slave not answering; polled less often while it stays silent"
            ),
            Some(Change::Failing(failure)) => warn!(
                %source, slave = id, %device, reason = failure.reason(), error = %why,
                next_poll_in = ?self.schedule.interval(i), "modbus slave polls failing"
            ),
        }
    }
}

/// What the slave sent back for one read: its answer, or the exception it refused
/// the read with.
type Reply = Result<Answer, ExceptionCode>;

/// What is missing from one slave's readings now: its refused reads, by index in its
/// plan, and its values left out, by index in its register map.
#[derive(Debug, Default)]
struct SlaveGaps {
    reads: Gaps<usize, ExceptionCode>,
    fields: Gaps<usize, ()>,
}

/// The fields read `k` of `slave` covers, for a log line: "setpoint, flow".
fn fields_of(slave: &SlaveSpec, k: usize) -> String {
    let names: Vec<&str> = slave
        .plan
        .registers_of(k)
        .filter_map(|r| slave.registers.get(r))
        .map(|r| r.field.as_str())
        .collect();
    names.join(", ")
}

/// Why one poll failed.
#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error("no answer within the timeout")]
    Timeout { request_stuck: bool },
    #[error("answer refused: {0}")]
    Mismatch(String),
    #[error("garbled answer: {0}")]
    Garbled(io::Error),
    #[error("port failed: {0}")]
    Lost(String),
}

impl PollError {
    fn failure(&self) -> Failure {
        match self {
            PollError::Timeout { .. } => Failure::Timeout,
            PollError::Mismatch(_) => Failure::Mismatch,
            PollError::Garbled(_) => Failure::Decode,
            PollError::Lost(_) => Failure::Io,
        }
    }
}

/// Sends a slave's reads one after the other, each bounded by its timeout, and
/// returns one reply per read. An exception refuses only its own read: the slave is
/// alive, so its other reads still go out. Any other failure ends the poll at once,
/// so a dead slave costs one timeout, not one per read.
async fn poll(
    ctx: &mut Context,
    line: &LineState,
    slave: &SlaveSpec,
) -> Result<Vec<Reply>, PollError> {
    ctx.set_slave(Slave(slave.id));
    let mut replies = Vec::with_capacity(slave.plan.reads.len());
    for read in &slave.plan.reads {
        let request = match read.function {
            Function::Holding => Request::ReadHoldingRegisters(read.address, read.count),
            Function::Input => Request::ReadInputRegisters(read.address, read.count),
            Function::Coil => Request::ReadCoils(read.address, read.count),
            Function::Discrete => Request::ReadDiscreteInputs(read.address, read.count),
        };
        line.discard_input.store(true, Ordering::Relaxed);
        // `call`, not tokio-modbus's `read_*` helpers: those assert the register count
        // in debug builds, and a wrong count is a late answer to count, not a panic.
        let response = match tokio::time::timeout(slave.timeout, ctx.call(request)).await {
            Err(_elapsed) => {
                return Err(PollError::Timeout {
                    request_stuck: line.writing.load(Ordering::Relaxed),
                })
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                return Err(if line.failed.load(Ordering::Relaxed) {
                    PollError::Lost(e.to_string())
                } else {
                    PollError::Garbled(e)
                })
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => {
                return Err(PollError::Mismatch(e.to_string()))
            }
            Ok(Ok(Err(code))) => {
                replies.push(Err(code));
                continue;
            }
            Ok(Ok(Ok(response))) => response,
        };
        replies.push(Ok(answer_of(read, response)?));
    }
    Ok(replies)
}

/// The answer to `read`, if `response` is one: same function, and as many registers
/// as asked (bits come padded to whole bytes).
fn answer_of(read: &Read, response: Response) -> Result<Answer, PollError> {
    let want = usize::from(read.count);
    let got = match (read.function, response) {
        (Function::Holding, Response::ReadHoldingRegisters(words))
        | (Function::Input, Response::ReadInputRegisters(words)) => {
            if words.len() == want {
                return Ok(Answer::Words(words));
            }
            words.len()
        }
        (Function::Coil, Response::ReadCoils(mut bits))
        | (Function::Discrete, Response::ReadDiscreteInputs(mut bits)) => {
            if bits.len() == want.div_ceil(8) * 8 {
                bits.truncate(want);
                return Ok(Answer::Bits(bits));
            }
            bits.len()
        }
        (_, other) => {
            return Err(PollError::Mismatch(format!(
                "asked to read {} {} values, got an answer to {:?}",
                want,
                read.function.name(),
                other.function_code()
            )))
        }
    };
    Err(PollError::Mismatch(format!(
        "asked for {want} {} values at {}, got {got}",
        read.function.name(),
        read.address
    )))
}

/// What the bus task and the port wrapper share about one open port.
#[derive(Debug, Default)]
struct LineState {
    /// Set before each request; the request's first write then clears the receive
    /// buffer, so nothing that arrived before it can pass for its answer.
    discard_input: AtomicBool,
    /// A read or write failed, or a read hit end of file: the port is gone.
    failed: AtomicBool,
    /// A write is waiting. A request that times out in this state may be half sent,
    /// and tokio-modbus would send its rest before the next one: the session ends.
    writing: AtomicBool,
}

/// The port as tokio-modbus drives it, reporting to a [`LineState`].
struct Line {
    port: SerialStream,
    state: Arc<LineState>,
}

impl Line {
    fn note<T>(&self, r: &Poll<io::Result<T>>) {
        match r {
            Poll::Pending => self.state.writing.store(true, Ordering::Relaxed),
            Poll::Ready(result) => {
                self.state.writing.store(false, Ordering::Relaxed);
                if result.is_err() {
                    self.state.failed.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}

impl AsyncRead for Line {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let (room, before) = (buf.remaining(), buf.filled().len());
        let r = Pin::new(&mut this.port).poll_read(cx, buf);
        let eof = matches!(r, Poll::Ready(Ok(()))) && room > 0 && buf.filled().len() == before;
        if eof || matches!(r, Poll::Ready(Err(_))) {
            this.state.failed.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Line {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.state.discard_input.swap(false, Ordering::Relaxed) {
            if let Err(error) = this.port.clear(ClearBuffer::Input) {
                debug!(%error, "cannot clear the modbus port's receive buffer");
            }
        }
        let r = Pin::new(&mut this.port).poll_write(cx, data);
        this.note(&r);
        r
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        // Nothing of ours to flush: written bytes are in the kernel's queue. The
        // port's own flush is a blocking tcdrain, which would hold a runtime thread
        // for the whole transmission, or forever on a wedged adapter.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().port).poll_shutdown(cx)
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

    fn read(function: Function, address: u16, count: u16) -> Read {
        Read {
            function,
            address,
            count,
        }
    }

    #[test]
    fn an_answer_with_the_registers_asked_for_is_taken() {
        let r = read(Function::Input, 10, 2);
        let a = answer_of(&r, Response::ReadInputRegisters(vec![1, 2])).unwrap();
        assert_eq!(a, Answer::Words(vec![1, 2]));
        let r = read(Function::Coil, 0, 3);
        let a = answer_of(
            &r,
            Response::ReadCoils(vec![true, false, true, false, false, false, false, false]),
        )
        .unwrap();
        assert_eq!(a, Answer::Bits(vec![true, false, true]));
    }

    #[test]
    fn a_late_answer_to_another_read_is_a_mismatch() {
        let r = read(Function::Holding, 0, 4);
        let wrong_count = answer_of(&r, Response::ReadHoldingRegisters(vec![1, 2])).unwrap_err();
        assert_eq!(wrong_count.failure(), Failure::Mismatch, "{wrong_count}");
        let wrong_table =
            answer_of(&r, Response::ReadInputRegisters(vec![1, 2, 3, 4])).unwrap_err();
        assert_eq!(wrong_table.failure(), Failure::Mismatch, "{wrong_table}");
        let r = read(Function::Discrete, 0, 9);
        let short_bits = answer_of(&r, Response::ReadDiscreteInputs(vec![true; 8])).unwrap_err();
        assert_eq!(short_bits.failure(), Failure::Mismatch, "{short_bits}");
    }

    /// An RTU frame: `pdu` after the unit id, then the CRC (little-endian).
    fn frame(unit: u8, pdu: &[u8]) -> Vec<u8> {
        let mut out = vec![unit];
        out.extend_from_slice(pdu);
        let mut crc: u16 = 0xFFFF;
        for b in &out {
            crc ^= u16::from(*b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xA001
                } else {
                    crc >> 1
                };
            }
        }
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Units 1 and 2, each with one holding register at 0 and a 100ms timeout.
    fn units() -> (SlaveSpec, SlaveSpec) {
        let c = cfg(r#"
name = "plant"
path = "/dev/x"
[[slave]]
id = 1
timeout = "100ms"
[[slave.register]]
field = "v"
address = 0
[[slave]]
id = 2
timeout = "100ms"
[[slave.register]]
field = "v"
address = 0
"#);
        let mut s = c.slaves().unwrap().into_iter();
        (s.next().unwrap(), s.next().unwrap())
    }

    /// A pty pair: the bus as the source drives it, and the far end the test plays.
    fn bus() -> (Context, Arc<LineState>, SerialStream) {
        let (device, port) = SerialStream::pair().expect("a pty pair");
        let state = Arc::new(LineState::default());
        let ctx = rtu::attach(Line {
            port,
            state: Arc::clone(&state),
        });
        (ctx, state, device)
    }

    async fn request(device: &mut SerialStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut req = vec![0u8; 8];
        device.read_exact(&mut req).await.unwrap();
        req
    }

    #[tokio::test]
    async fn a_late_answer_waiting_before_the_next_request_is_discarded() {
        use tokio::io::AsyncWriteExt;
        let (mut ctx, state, mut device) = bus();
        let (live, dead) = units();

        let r = poll(&mut ctx, &state, &dead).await;
        assert!(
            matches!(
                r,
                Err(PollError::Timeout {
                    request_stuck: false
                })
            ),
            "{r:?}"
        );
        assert_eq!(request(&mut device).await, frame(2, &[3, 0, 0, 0, 1]));
        // Unit 2 answers after its timeout, before unit 1 is asked.
        device.write_all(&frame(2, &[3, 2, 0, 99])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;

        let far_end = tokio::spawn(async move {
            let req = request(&mut device).await;
            device.write_all(&frame(1, &[3, 2, 0, 7])).await.unwrap();
            (req, device)
        });
        let r = poll(&mut ctx, &state, &live).await;
        assert_eq!(r.unwrap(), [Ok(Answer::Words(vec![7]))]);
        let (req, _device) = far_end.await.unwrap();
        assert_eq!(req, frame(1, &[3, 0, 0, 0, 1]));
    }

    #[tokio::test]
    async fn a_late_answer_arriving_after_the_next_request_is_refused_not_taken() {
        use tokio::io::AsyncWriteExt;
        let (mut ctx, state, mut device) = bus();
        let (live, dead) = units();

        let _ = poll(&mut ctx, &state, &dead).await;
        request(&mut device).await;
        let far_end = tokio::spawn(async move {
            request(&mut device).await;
            // Unit 2's late answer lands just before unit 1's own.
            let mut both = frame(2, &[3, 2, 0, 99]);
            both.extend(frame(1, &[3, 2, 0, 7]));
            device.write_all(&both).await.unwrap();
            device
        });
        let r = poll(&mut ctx, &state, &live).await;
        assert_eq!(r.unwrap_err().failure(), Failure::Mismatch);
        let mut device = far_end.await.unwrap();

        // The next poll starts clean: unit 1's leftover answer is discarded too.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let far_end = tokio::spawn(async move {
            request(&mut device).await;
            device.write_all(&frame(1, &[3, 2, 0, 8])).await.unwrap();
            device
        });
        let r = poll(&mut ctx, &state, &live).await;
        assert_eq!(r.unwrap(), [Ok(Answer::Words(vec![8]))]);
        far_end.await.unwrap();
    }

    #[tokio::test]
    async fn a_port_whose_far_end_is_gone_is_reported_lost() {
        let (mut ctx, state, device) = bus();
        let (live, _) = units();
        drop(device);
        let r = poll(&mut ctx, &state, &live).await;
        assert!(matches!(r, Err(PollError::Lost(_))), "{r:?}");
    }

    /// Unit 1 with a holding read at 0 (setpoint, flow) and one at 100 (valve).
    fn two_reads() -> SlaveSpec {
        let c = cfg(r#"
name = "plant"
path = "/dev/x"
[[slave]]
id = 1
timeout = "100ms"
[[slave.register]]
field = "setpoint"
address = 0
type = "i16"
[[slave.register]]
field = "valve"
address = 100
[[slave.register]]
field = "flow"
address = 1
type = "f32"
"#);
        c.slaves().unwrap().remove(0)
    }

    /// Runs `f` on a bus polling `slaves`, with nothing plugged in.
    fn on_bus<R>(slaves: &[SlaveSpec], f: impl FnOnce(&mut Bus) -> R) -> R {
        let origin = Origin::new("gw", "modbus", "plant", None);
        let (tx, _rx) = Inlet::channel(8, 1 << 20);
        let cancel = CancellationToken::new();
        let mut bus = Bus {
            name: "plant",
            origin: &origin,
            schedule: Schedule::new(
                slaves.iter().map(|s| s.poll),
                Duration::from_secs(60),
                Instant::now(),
            ),
            slaves,
            gaps: slaves.iter().map(|_| SlaveGaps::default()).collect(),
            gap: Duration::ZERO,
            log_limit: RateLimit::new(10, Duration::from_secs(60)),
            tx: &tx,
            cancel: &cancel,
        };
        f(&mut bus)
    }

    fn fields_in(input: Option<Input>) -> serde_json::Value {
        match input.map(|i| i.payload) {
            Some(Payload::Fields { fields, .. }) => serde_json::Value::Object(fields),
            Some(_) => panic!("a reading without fields"),
            None => panic!("no reading"),
        }
    }

    #[test]
    fn a_log_line_names_the_fields_a_read_covers_in_map_order() {
        let slave = two_reads();
        assert_eq!(
            slave.plan.reads,
            [
                read(Function::Holding, 0, 3),
                read(Function::Holding, 100, 1)
            ]
        );
        assert_eq!(fields_of(&slave, 0), "setpoint, flow");
        assert_eq!(fields_of(&slave, 1), "valve");
    }

    #[test]
    fn a_refused_read_leaves_out_only_its_fields_and_the_poll_counts_as_answered() {
        let slave = two_reads();
        let flow = 12.75f32.to_bits();
        let words = vec![(-20i16) as u16, (flow >> 16) as u16, flow as u16];
        let replies = vec![
            Ok(Answer::Words(words)),
            Err(ExceptionCode::IllegalDataAddress),
        ];
        let (input, outcome) = on_bus(std::slice::from_ref(&slave), |bus| {
            bus.reading(0, &slave, replies)
        });
        assert_eq!(outcome, Ok(()));
        assert_eq!(
            fields_in(input),
            serde_json::json!({"setpoint": -20, "flow": 12.75})
        );
    }

    #[test]
    fn a_slave_that_refuses_every_read_sends_nothing_and_fails_with_exception() {
        let slave = two_reads();
        let replies = vec![
            Err(ExceptionCode::IllegalDataAddress),
            Err(ExceptionCode::IllegalDataAddress),
        ];
        let (input, outcome) = on_bus(std::slice::from_ref(&slave), |bus| {
            bus.reading(0, &slave, replies)
        });
        assert!(input.is_none());
        assert_eq!(outcome, Err(Failure::Exception));
    }

    #[test]
    fn a_nan_is_left_out_and_the_other_fields_still_go() {
        let slave = two_reads();
        let nan = f32::NAN.to_bits();
        let replies = vec![
            Ok(Answer::Words(vec![7, (nan >> 16) as u16, nan as u16])),
            Ok(Answer::Words(vec![1])),
        ];
        let (input, outcome) = on_bus(std::slice::from_ref(&slave), |bus| {
            bus.reading(0, &slave, replies)
        });
        assert_eq!(outcome, Ok(()));
        assert_eq!(
            fields_in(input),
            serde_json::json!({"setpoint": 7, "valve": 1})
        );
    }

    #[test]
    fn a_refused_read_does_not_pass_for_its_nan_coming_back() {
        let slave = two_reads();
        let nan = f32::NAN.to_bits();
        let with_nan = vec![
            Ok(Answer::Words(vec![7, (nan >> 16) as u16, nan as u16])),
            Ok(Answer::Words(vec![1])),
        ];
        let refused = vec![
            Err(ExceptionCode::ServerDeviceBusy),
            Ok(Answer::Words(vec![1])),
        ];
        on_bus(std::slice::from_ref(&slave), |bus| {
            assert_eq!(bus.reading(0, &slave, with_nan).1, Ok(()));
            assert_eq!(bus.reading(0, &slave, refused).1, Ok(()));
            let flow = 2; // "flow" is the third register of the map
            let gaps = &mut bus.gaps[0];
            assert_eq!(
                gaps.fields.observe(flow, Some(())),
                None,
                "flow is still left out, not back and gone again"
            );
            assert_eq!(
                gaps.reads.observe(0, None),
                Some(Turn::Closed {
                    first: true,
                    polls: 1
                }),
                "the busy read is refused until answered"
            );
        });
    }

    #[tokio::test]
    async fn an_exception_refuses_only_its_read_and_the_next_read_still_goes_out() {
        use tokio::io::AsyncWriteExt;
        let (mut ctx, state, mut device) = bus();
        let slave = two_reads();
        let far_end = tokio::spawn(async move {
            let first = request(&mut device).await;
            // Exception 2 (illegal data address) to function 3.
            device.write_all(&frame(1, &[0x83, 2])).await.unwrap();
            let second = request(&mut device).await;
            device.write_all(&frame(1, &[3, 2, 0, 9])).await.unwrap();
            (first, second, device)
        });
        let r = poll(&mut ctx, &state, &slave).await.unwrap();
        let (first, second, _device) = far_end.await.unwrap();
        assert_eq!(first, frame(1, &[3, 0, 0, 0, 3]));
        assert_eq!(second, frame(1, &[3, 0, 100, 0, 1]));
        assert_eq!(
            r,
            [
                Err(ExceptionCode::IllegalDataAddress),
                Ok(Answer::Words(vec![9]))
            ]
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
