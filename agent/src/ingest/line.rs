//! Serial line settings shared by the sources that own a serial port (`serial` and
//! `modbus`): the settings' types, their checks, and opening a port with them.
//!
//! Each source keeps the fields in its own config table (with its own defaults: a
//! Modbus bus defaults to the Modbus serial line specification's 19200 8E1) and
//! builds a [`LineSettings`] from them, so the checks and the open are written once.

use std::path::Path;

use serde::Deserialize;
use tokio_serial::{SerialPortBuilderExt, SerialStream};

use crate::config::{PathSeg, Problem};

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
