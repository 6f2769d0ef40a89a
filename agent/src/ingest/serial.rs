//! The serial source: reads a serial port, cuts the byte stream into frames and turns
//! each frame into a reading (framing and formats live in [`crate::serial`]).
//!
//! A port that disappears (USB adapter unplugged: a read returns 0 bytes or an error)
//! is closed and reopened by the same path with jittered backoff until it is back,
//! without touching any other source. State changes are logged once, not per retry.
//! Each port runs in its own task, so a port that is absent, stalls or floods garbage
//! delays nothing else.
//!
//! The same task writes rule actions (`action.serial_write`) to the port, from a
//! [`WriteQueue`] the commit task fills without waiting: lines wait there while the
//! port is away and go out, oldest first, once it is back. A full queue lets its
//! oldest line go to make room, and a line older than `write.max_age` is dropped
//! instead of written (for an actuator the newest command matters, and a stale one
//! can do harm); both are counted.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::line::{FlowControl, Keeper, LineSettings, Parity};
use super::{Inlet, Input, Origin, Payload};
use crate::config::{problem, BackoffConfig, Bytes, Dur, Problem};
use crate::decode::{take_time, DeviceTemplate};
use crate::ratelimit::RateLimit;
use crate::serial::{Format, FormatConfig, Framer, Framing, LengthBytes, LineQueue, QueuedLine};

/// `[[source.serial]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSourceConfig {
    /// The source's name (in CloudEvents `source`: `/ferry/{agent}/serial/{name}`).
    pub name: String,
    /// The port. Prefer the stable `/dev/serial/by-id/...` name over `/dev/ttyUSB0`,
    /// which can change when adapters are replugged.
    pub path: PathBuf,
    /// Line speed. Default 9600.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// 5, 6, 7 or 8. Default 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// `none`, `even` or `odd`. Default `none`.
    #[serde(default)]
    pub parity: Parity,
    /// 1 or 2. Default 1.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// `none`, `software` (XON/XOFF) or `hardware` (RTS/CTS). Default `none`.
    #[serde(default)]
    pub flow_control: FlowControl,
    /// How frames are delimited: `lines`, `cobs` or `length_prefixed`. Default `lines`.
    #[serde(default)]
    pub framing: Framing,
    /// For `length_prefixed`: 1 or 2 length bytes. Default 2.
    #[serde(default)]
    pub length_bytes: LengthBytes,
    /// Longest frame accepted; a longer one is discarded up to the next delimiter and
    /// counted (`too_long`). Memory per port stays within this. Default 4KiB.
    #[serde(default = "default_max_frame")]
    pub max_frame: Bytes,
    /// How a frame becomes fields: `csv`, `json`, `kv` or `nmea`.
    pub format: Format,
    /// For `csv`: the field names, in column order.
    #[serde(default)]
    pub fields: Vec<String>,
    /// The device id: literal text, or `{payload.field}` to take it from the frame.
    /// Default: the source name.
    #[serde(default)]
    pub device: Option<String>,
    /// Field holding the reading's time (RFC 3339), for `json` and `kv`. Default `time`.
    #[serde(default = "default_time_field")]
    pub time_field: Option<String>,
    /// Reopen backoff bounds while the port is away. Default `{ min = "500ms", max = "30s" }`.
    #[serde(default = "default_reopen")]
    pub reopen: BackoffConfig,
    /// How rule actions write lines to this port.
    #[serde(default)]
    pub write: WriteConfig,
}

/// `[source.serial.write]`: lines written by `action.serial_write`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteConfig {
    /// Added after each line: `lf`, `crlf` or `cr`. Default `lf`.
    #[serde(default)]
    pub line_ending: LineEnding,
    /// Lines that may wait while the port is away; one more is dropped. Default 64.
    #[serde(default = "default_write_queue")]
    pub queue: usize,
    /// A line that waited longer is dropped, not written. Default 5 minutes.
    #[serde(default = "default_write_max_age")]
    pub max_age: Dur,
    /// A write that takes longer (flow control holding it back) counts as a lost
    /// port: it is reopened and the line written again. Default 5 seconds.
    #[serde(default = "default_write_timeout")]
    pub timeout: Dur,
}

impl Default for WriteConfig {
    fn default() -> Self {
        Self {
            line_ending: LineEnding::default(),
            queue: default_write_queue(),
            max_age: default_write_max_age(),
            timeout: default_write_timeout(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineEnding {
    #[default]
    Lf,
    Crlf,
    Cr,
}

impl LineEnding {
    fn bytes(self) -> &'static [u8] {
        match self {
            LineEnding::Lf => b"\n",
            LineEnding::Crlf => b"\r\n",
            LineEnding::Cr => b"\r",
        }
    }
}

/// A port's write queue, shared by the commit task (which adds lines) and the port's
/// task (which writes them).
#[derive(Debug)]
pub struct WriteQueue {
    source: String,
    lines: Mutex<LineQueue>,
    /// Wakes the port's task when a line is added.
    added: Notify,
}

impl WriteQueue {
    pub fn new(source: &str, cfg: &WriteConfig) -> Arc<Self> {
        Arc::new(Self {
            source: source.to_string(),
            lines: Mutex::new(LineQueue::new(cfg.queue, cfg.max_age.0)),
            added: Notify::new(),
        })
    }

    /// Queues a line for the port, never waiting. A full queue drops its oldest line.
    pub fn push(&self, rule: String, line: String) {
        let displaced = self.with_lines(|q| q.push(QueuedLine::new(rule, line, Instant::now())));
        if let Some(old) = displaced {
            self.dropped(&old, "queue_full");
        }
        self.added.notify_one();
    }

    /// The next line to write, dropping (and counting) the ones that waited too long.
    fn pop(&self) -> Option<QueuedLine> {
        let mut expired = Vec::new();
        let next = self.with_lines(|q| q.pop(Instant::now(), &mut expired));
        for old in &expired {
            self.dropped(old, "expired");
        }
        next
    }

    /// Puts back a line that could not be written, to go first.
    fn requeue(&self, line: QueuedLine) {
        if let Some(old) = self.with_lines(|q| q.requeue(line)) {
            self.dropped(&old, "queue_full");
        }
    }

    fn with_lines<T>(&self, f: impl FnOnce(&mut LineQueue) -> T) -> T {
        // A panic while holding the lock cannot leave the queue half-changed (each
        // operation is one VecDeque call), so a poisoned lock is still usable.
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut lines)
    }

    fn dropped(&self, line: &QueuedLine, reason: &'static str) {
        metrics::counter!("ferry_actions_dropped_total", "reason" => reason).increment(1);
        let waited =
            humantime::format_duration(Duration::from_secs(line.queued.elapsed().as_secs()));
        warn!(source = %self.source, rule = %line.rule, reason, %waited, "serial write dropped");
    }
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_max_frame() -> Bytes {
    Bytes(4096)
}
fn default_time_field() -> Option<String> {
    Some("time".to_string())
}
fn default_write_queue() -> usize {
    64
}
fn default_write_max_age() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_write_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_reopen() -> BackoffConfig {
    BackoffConfig::new(Duration::from_millis(500), Duration::from_secs(30))
}

impl SerialSourceConfig {
    fn line(&self) -> LineSettings {
        LineSettings {
            baud: self.baud,
            data_bits: self.data_bits,
            parity: self.parity,
            stop_bits: self.stop_bits,
            flow_control: self.flow_control,
        }
    }

    fn format_config(&self) -> FormatConfig {
        FormatConfig {
            format: self.format,
            fields: self.fields.clone(),
        }
    }

    fn device_template(&self) -> Result<DeviceTemplate, String> {
        DeviceTemplate::parse(self.device.as_deref().unwrap_or(&self.name))
    }

    pub fn validate(&self, i: usize) -> Vec<Problem> {
        let mut out = Vec::new();
        let n = &self.name;
        out.extend(
            self.line()
                .validate(&["source".into(), "serial".into(), i.into()], n),
        );
        if !(16..=1024 * 1024).contains(&self.max_frame.0) {
            out.push(problem!(
                ["source", "serial", i, "max_frame"],
                "source {n:?}: max_frame must be between 16 bytes and 1MiB"
            ));
        }
        if let Err(e) = self.format_config().validate() {
            out.push(problem!(
                ["source", "serial", i, "format"],
                "source {n:?}: {e}"
            ));
        }
        match self.device_template() {
            Err(e) => out.push(problem!(
                ["source", "serial", i, "device"],
                "source {n:?}: {e}"
            )),
            Ok(t) if t.uses_topic() => out.push(problem!(
                ["source", "serial", i, "device"],
                "source {n:?}: a serial frame has no topic: use literal text or {{payload.field}}"
            )),
            Ok(_) => {}
        }
        if !(1..=100_000).contains(&self.write.queue) {
            out.push(problem!(
                ["source", "serial", i, "write", "queue"],
                "source {n:?}: write.queue must be between 1 and 100000 lines"
            ));
        }
        for (key, value) in [
            ("max_age", self.write.max_age),
            ("timeout", self.write.timeout),
        ] {
            if value.0.is_zero() || value.0 > crate::config::LONGEST {
                out.push(problem!(
                    ["source", "serial", i, "write", key],
                    "source {n:?}: write.{key} must be more than 0 and at most 24h"
                ));
            }
        }
        out.extend(self.reopen.validate(&[
            "source".into(),
            "serial".into(),
            i.into(),
            "reopen".into(),
        ]));
        out
    }
}

/// A serial source ready to run.
pub struct SerialSource {
    pub cfg: SerialSourceConfig,
    pub origin: Arc<Origin>,
}

/// Why a port session ended.
enum Ended {
    Cancelled,
    Lost(String),
}

impl SerialSource {
    /// Runs until `cancel`: open, read, write the lines queued in `writes`, and
    /// reopen whenever the port goes away.
    pub async fn run(self, tx: Inlet, writes: Arc<WriteQueue>, cancel: CancellationToken) {
        let name = self.cfg.name.clone();
        let path = self.cfg.path.display().to_string();
        let (format, template) = match (self.cfg.format_config(), self.cfg.device_template()) {
            (f, Ok(t)) => (f, t),
            (_, Err(error)) => {
                // Validation catches this first; never take the other sources down.
                warn!(source = %name, %error, "cannot start serial source");
                return;
            }
        };
        let mut framer = Framer::with_length_bytes(
            self.cfg.framing,
            self.cfg.length_bytes,
            self.cfg.max_frame.0 as usize,
        );
        let mut log_limit = RateLimit::new(10, Duration::from_secs(60));
        let ctx = Session {
            name: &name,
            origin: &self.origin,
            format: &format,
            template: &template,
            time_field: self.cfg.time_field.as_deref(),
            write: &self.cfg.write,
        };
        let mut keeper = Keeper::new(
            "serial",
            &name,
            &self.cfg.path,
            self.cfg.line(),
            self.cfg.reopen,
        );
        while let Some(port) = keeper.open(&cancel).await {
            if keeper.quiet() {
                debug!(source = %name, %path, "serial port open again");
            } else {
                info!(source = %name, %path, "serial port open");
            }
            framer.reset();
            let mut worked = false;
            let io = Io {
                framer: &mut framer,
                tx: &tx,
                writes: &writes,
                log_limit: &mut log_limit,
                worked: &mut worked,
            };
            let ended = ctx.serve(port, io, &cancel).await;
            if worked {
                keeper.worked();
            }
            match ended {
                Ended::Cancelled => return,
                Ended::Lost(why) => {
                    if !keeper.lost(&why, &cancel).await {
                        return;
                    }
                }
            }
        }
    }
}

/// What one port session needs to turn bytes into inputs.
struct Session<'a> {
    name: &'a str,
    origin: &'a Arc<Origin>,
    format: &'a FormatConfig,
    template: &'a DeviceTemplate,
    time_field: Option<&'a str>,
    write: &'a WriteConfig,
}

/// What a port session reads into and writes from; kept across sessions.
struct Io<'a> {
    framer: &'a mut Framer,
    tx: &'a Inlet,
    writes: &'a WriteQueue,
    log_limit: &'a mut RateLimit,
    /// Set once a byte was read or a line written in this session.
    worked: &'a mut bool,
}

impl Session<'_> {
    /// Reads frames and writes queued lines until the port is lost or `cancel`.
    async fn serve(
        &self,
        port: tokio_serial::SerialStream,
        io: Io<'_>,
        cancel: &CancellationToken,
    ) -> Ended {
        let Io {
            framer,
            tx,
            writes,
            log_limit,
            worked,
        } = io;
        let (mut reader, mut writer) = tokio::io::split(port);
        let mut buf = [0u8; 1024];
        let mut frames = Vec::new();
        loop {
            // Queued lines go out before the next read.
            while let Some(mut queued) = writes.pop() {
                if let Err((why, cut)) = self.write_line(&mut writer, &queued).await {
                    queued.cut |= cut;
                    writes.requeue(queued);
                    return Ended::Lost(why);
                }
                *worked = true;
            }
            let n = tokio::select! {
                _ = cancel.cancelled() => return Ended::Cancelled,
                _ = writes.added.notified() => continue,
                r = reader.read(&mut buf) => match r {
                    Ok(0) => return Ended::Lost("end of stream".to_string()),
                    Ok(n) => {
                        *worked = true;
                        n
                    }
                    Err(e) => return Ended::Lost(e.to_string()),
                },
            };
            framer.push(&buf[..n], &mut frames);
            for frame in frames.drain(..) {
                let fields = match frame {
                    Err(e) => Err(e.reason()),
                    Ok(bytes) => match self.format.parse(&bytes) {
                        Err(e) if e.is_skip() => {
                            self.skip(e.reason());
                            continue;
                        }
                        parsed => parsed.map_err(|e| e.reason()),
                    },
                };
                let mut fields = match fields {
                    Ok(f) => f,
                    Err(reason) => {
                        self.reject(reason, log_limit);
                        continue;
                    }
                };
                let device = match self.template.render(self.name, &fields) {
                    Ok(d) => d,
                    Err(e) => {
                        self.reject(e.reason(), log_limit);
                        continue;
                    }
                };
                metrics::counter!("ferry_input_received_total", "source" => self.name.to_string())
                    .increment(1);
                let now = chrono::Utc::now();
                let input = Input {
                    origin: Arc::clone(self.origin),
                    received: take_time(self.time_field, &mut fields).unwrap_or(now),
                    payload: Payload::Fields { device, fields },
                    ack: None,
                    delivery: None,
                };
                tokio::select! {
                    _ = cancel.cancelled() => return Ended::Cancelled,
                    r = tx.send(input) => if r.is_err() { return Ended::Cancelled },
                }
            }
        }
    }

    /// Writes one queued line with the port's line ending. A line that was cut off
    /// before is preceded by a line ending, so the device sees the broken line end
    /// and then the whole line, not the two run together. `Err` (the port is lost)
    /// says why and whether part of the line went out.
    async fn write_line(
        &self,
        writer: &mut tokio::io::WriteHalf<tokio_serial::SerialStream>,
        queued: &QueuedLine,
    ) -> Result<(), (String, bool)> {
        let ending = self.write.line_ending.bytes();
        let mut bytes = Vec::with_capacity(queued.line.len() + 2 * ending.len());
        if queued.cut {
            bytes.extend_from_slice(ending);
        }
        bytes.extend_from_slice(queued.line.as_bytes());
        bytes.extend_from_slice(ending);
        // No flush: the port has no buffer of ours, and tokio-serial's flush is a
        // blocking tcdrain that a wedged adapter could hold forever on a runtime thread.
        let mut sent = 0;
        let written = async {
            while sent < bytes.len() {
                match writer.write(&bytes[sent..]).await? {
                    0 => return Err(std::io::ErrorKind::WriteZero.into()),
                    n => sent += n,
                }
            }
            Ok::<(), std::io::Error>(())
        };
        let result = tokio::time::timeout(self.write.timeout.0, written).await;
        match result {
            Ok(Ok(())) => {
                metrics::counter!("ferry_actions_sent_total", "rule" => queued.rule.clone())
                    .increment(1);
                debug!(source = %self.name, rule = %queued.rule, "rule action written to the serial port");
                Ok(())
            }
            Ok(Err(e)) => Err((format!("write failed: {e}"), sent > 0)),
            Err(_) => Err(("write timed out".to_string(), sent > 0)),
        }
    }

    /// A frame that carries nothing to read: counted apart from the rejected ones so
    /// that an alert on rejections means trouble, and not logged.
    fn skip(&self, reason: &'static str) {
        metrics::counter!("ferry_input_skipped_total", "source" => self.name.to_string(), "reason" => reason).increment(1);
        debug!(source = %self.name, reason, "serial frame skipped");
    }

    fn reject(&self, reason: &'static str, log_limit: &mut RateLimit) {
        metrics::counter!("ferry_input_rejected_total", "source" => self.name.to_string(), "reason" => reason).increment(1);
        if let Some(suppressed) = log_limit.check(Instant::now()) {
            warn!(source = %self.name, reason, suppressed, "serial frame rejected");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> SerialSourceConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_are_9600_8n1_lines_and_the_source_name_as_device() {
        let c = cfg("name='freezer'\npath='/dev/ttyUSB0'\nformat='csv'\nfields=['t']");
        assert_eq!(
            (c.baud, c.data_bits, c.parity, c.stop_bits),
            (9600, 8, Parity::None, 1)
        );
        assert_eq!(c.framing, Framing::Lines);
        assert_eq!(
            (
                c.write.line_ending.bytes(),
                c.write.queue,
                c.write.max_age.0
            ),
            (&b"\n"[..], 64, Duration::from_secs(300))
        );
        assert!(c.validate(0).is_empty(), "{:?}", c.validate(0));
        let t = c.device_template().unwrap();
        assert_eq!(
            t.render("freezer", &serde_json::Map::new()).unwrap(),
            "freezer"
        );
    }

    #[test]
    fn impossible_line_settings_are_all_reported() {
        let c = cfg(
            "name='a'\npath='/dev/x'\nformat='csv'\nbaud=0\ndata_bits=9\nstop_bits=3\nmax_frame=2\n\
             write={queue=0, max_age='0s', timeout='0s'}",
        );
        let msgs: Vec<String> = c.validate(0).into_iter().map(|p| p.message).collect();
        // baud, data_bits, stop_bits, max_frame, csv without field names, and the
        // three write settings
        assert_eq!(msgs.len(), 8, "{msgs:#?}");
    }
}
