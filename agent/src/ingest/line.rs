//! Serial line settings shared by the sources that own a serial port (`serial` and
//! `modbus`): the settings' types, their checks, opening a port with them, and
//! [`Keeper`], which reopens a port that is absent or lost.
//!
//! Each source keeps the fields in its own config table (with its own defaults: a
//! Modbus bus defaults to the Modbus serial line specification's 19200 8E1) and
//! builds a [`LineSettings`] from them, so the checks and the open are written once.

use std::path::Path;

use serde::Deserialize;
use tokio_serial::{SerialPortBuilderExt, SerialStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::config::{BackoffConfig, PathSeg, Problem};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    #[default]
    None,
    Software,
    Hardware,
}

/// How a serial port is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSettings {
    pub baud: u32,
    /// 5 to 8.
    pub data_bits: u8,
    pub parity: Parity,
    /// 1 or 2.
    pub stop_bits: u8,
    pub flow_control: FlowControl,
}

impl LineSettings {
    /// Every impossible setting, located under `at` (the source's table, e.g.
    /// `["source", "serial", 0]`) and prefixed with the source's name.
    pub fn validate(&self, at: &[PathSeg], source: &str) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut check = |ok: bool, field: &'static str, rule: &str| {
            if !ok {
                let mut path = at.to_vec();
                path.push(PathSeg::Key(field));
                out.push(Problem {
                    path,
                    message: format!("source {source:?}: {field} must be {rule}"),
                });
            }
        };
        check(self.baud > 0, "baud", "more than 0");
        check(
            (5..=8).contains(&self.data_bits),
            "data_bits",
            "5, 6, 7 or 8",
        );
        check((1..=2).contains(&self.stop_bits), "stop_bits", "1 or 2");
        out
    }

    /// Opens `path` with these settings, registered with the tokio reactor.
    pub fn open(&self, path: &Path) -> tokio_serial::Result<SerialStream> {
        tokio_serial::new(path.to_string_lossy(), self.baud)
            .data_bits(match self.data_bits {
                5 => tokio_serial::DataBits::Five,
                6 => tokio_serial::DataBits::Six,
                7 => tokio_serial::DataBits::Seven,
                _ => tokio_serial::DataBits::Eight,
            })
            .parity(match self.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
            })
            .stop_bits(if self.stop_bits == 2 {
                tokio_serial::StopBits::Two
            } else {
                tokio_serial::StopBits::One
            })
            .flow_control(match self.flow_control {
                FlowControl::None => tokio_serial::FlowControl::None,
                FlowControl::Software => tokio_serial::FlowControl::Software,
                FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
            })
            .open_native_async()
    }
}

/// Keeps one source's port open: opens it, and after a failed open or a lost port
/// waits with jittered backoff before the next try. An outage is logged once, when
/// it starts, not at every retry; so is a port that keeps opening and failing at
/// once (an adapter that accepts the open but never moves a byte).
pub struct Keeper<'a> {
    /// `serial` or `modbus`, for the log lines.
    pub kind: &'static str,
    pub source: &'a str,
    pub path: &'a Path,
    pub line: LineSettings,
    backoff: Backoff,
    /// The current outage has been logged.
    reported: bool,
    /// The current session carried data ([`Keeper::worked`]).
    session_worked: bool,
    /// The last session was lost without carrying anything and the port opened
    /// again at once: a loop, already logged, that is not news until it ends.
    flapping: bool,
}

impl<'a> Keeper<'a> {
    pub fn new(
        kind: &'static str,
        source: &'a str,
        path: &'a Path,
        line: LineSettings,
        reopen: BackoffConfig,
    ) -> Self {
        Self {
            kind,
            source,
            path,
            line,
            backoff: Backoff::new(reopen),
            reported: false,
            session_worked: false,
            flapping: false,
        }
    }

    /// The open port, once it opens; `None` if `cancel` comes first.
    pub async fn open(&mut self, cancel: &CancellationToken) -> Option<SerialStream> {
        let (source, path, kind) = (self.source, self.path.display(), self.kind);
        loop {
            match self.line.open(self.path) {
                Ok(port) => {
                    self.reported = false;
                    self.session_worked = false;
                    return Some(port);
                }
                Err(error) => {
                    // Really absent: when it opens again, that is news.
                    self.flapping = false;
                    let hint = match error.kind {
                        tokio_serial::ErrorKind::Io(std::io::ErrorKind::PermissionDenied) => {
                            "; the agent's user needs the port's group (usually dialout)"
                        }
                        _ => "",
                    };
                    if self.reported {
                        debug!(%source, %path, %error, "{kind} port still absent");
                    } else {
                        warn!(%source, %path, %error, "cannot open {kind} port; retrying with backoff{hint}");
                        self.reported = true;
                    }
                }
            }
            if !self.pause(cancel).await {
                return None;
            }
        }
    }

    /// Whether opening the port now is not worth an info line: it is part of a
    /// loop of opens and immediate losses that was logged when it started.
    pub fn quiet(&self) -> bool {
        self.flapping
    }

    /// The port carried data: the next outage starts again from the shortest delay.
    /// (Not on every open: a port that opens and fails at once keeps backing off.)
    pub fn worked(&mut self) {
        self.backoff.reset();
        self.session_worked = true;
        self.flapping = false;
    }

    /// The open port failed: logs it (which also covers the failed reopens that
    /// follow) and waits before the next open. `false` if `cancel` came first.
    pub async fn lost(&mut self, why: &str, cancel: &CancellationToken) -> bool {
        let (source, path, kind) = (self.source, self.path.display(), self.kind);
        if self.flapping {
            debug!(%source, %path, reason = %why, "{kind} port lost again");
        } else {
            warn!(%source, %path, reason = %why, "{kind} port lost; reopening with backoff");
        }
        self.flapping = !self.session_worked;
        self.reported = true;
        self.pause(cancel).await
    }

    async fn pause(&mut self, cancel: &CancellationToken) -> bool {
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(self.backoff.next_delay()) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_impossible_setting_is_reported_under_the_sources_table() {
        let line = LineSettings {
            baud: 0,
            data_bits: 9,
            parity: Parity::None,
            stop_bits: 3,
            flow_control: FlowControl::None,
        };
        let at = ["source".into(), "modbus".into(), 2.into()];
        let problems = line.validate(&at, "plant");
        let fields: Vec<String> = problems
            .iter()
            .map(|p| format!("{:?}", p.path.last()))
            .collect();
        assert_eq!(problems.len(), 3, "{fields:?}");
        assert!(problems[0].message.starts_with("source \"plant\": baud"));
        assert!(matches!(problems[2].path[2], PathSeg::Index(2)));
    }

    #[test]
    fn usual_settings_pass() {
        let line = LineSettings {
            baud: 19200,
            data_bits: 8,
            parity: Parity::Even,
            stop_bits: 1,
            flow_control: FlowControl::None,
        };
        assert!(line.validate(&[], "x").is_empty());
    }
}
