//! The simulator source: synthetic devices for trying ferry without hardware.
//!
//! Each device reports `temperature` and `humidity` on a slow sine wave with its own
//! phase, so some readings cross 30 °C and rules have something to fire on. The
//! values are a pure function of device and tick, so runs are repeatable.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Inlet, Input, Origin, Payload};
use crate::config::{problem, Dur, Problem};

/// `[[source.simulator]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorConfig {
    /// The source's name (in CloudEvents `source`: `/ferry/{agent}/simulator/{name}`).
    pub name: String,
    /// How many devices (`sim-1` ... `sim-N`). Default 3.
    #[serde(default = "default_devices")]
    pub devices: u32,
    /// Time between two readings of one device. Default 1s.
    #[serde(default = "default_interval")]
    pub interval: Dur,
    /// Stop after this many readings per device; unlimited when absent.
    #[serde(default)]
    pub count: Option<u64>,
}

fn default_devices() -> u32 {
    3
}
fn default_interval() -> Dur {
    Dur(std::time::Duration::from_secs(1))
}

impl SimulatorConfig {
    pub fn validate(&self, i: usize) -> Vec<Problem> {
        let mut out = Vec::new();
        if !(1..=10_000).contains(&self.devices) {
            out.push(problem!(
                ["source", "simulator", i, "devices"],
                "devices must be 1..=10000"
            ));
        }
        // tokio's interval adds the period to an Instant, which panics on overflow.
        if self.interval.0 < std::time::Duration::from_millis(1)
            || self.interval.0 > crate::config::LONGEST
        {
            out.push(problem!(
                ["source", "simulator", i, "interval"],
                "interval must be at least 1ms and at most 24h"
            ));
        }
        out
    }
}

/// The reading of device `d` (1-based) at tick `n`.
pub fn reading(d: u32, n: u64) -> Map<String, Value> {
    let phase = f64::from(d) * 1.7;
    let x = n as f64 / 6.0 + phase;
    let round = |v: f64| (v * 10.0).round() / 10.0;
    let mut m = Map::new();
    m.insert("temperature".into(), json!(round(24.0 + 8.0 * x.sin())));
    m.insert(
        "humidity".into(),
        json!(round(50.0 + 15.0 * (x * 0.7).cos())),
    );
    m.insert("seq".into(), json!(n));
    m
}

pub async fn run(cfg: SimulatorConfig, origin: Arc<Origin>, tx: Inlet, cancel: CancellationToken) {
    info!(source = %cfg.name, devices = cfg.devices, interval = %cfg.interval, "simulator started");
    let mut tick = tokio::time::interval(cfg.interval.0);
    let mut n = 0u64;
    loop {
        if cfg.count.is_some_and(|c| n >= c) {
            info!(source = %cfg.name, readings = n, "simulator finished its count");
            return;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        for d in 1..=cfg.devices {
            let input = Input {
                origin: Arc::clone(&origin),
                payload: Payload::Fields {
                    device: format!("sim-{d}"),
                    fields: reading(d, n),
                },
                received: chrono::Utc::now(),
                ack: None,
                delivery: None,
            };
            if tx.send(input).await.is_err() {
                return;
            }
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_is_a_fixed_function_of_device_and_tick() {
        let expected = json!({"temperature": 16.5, "humidity": 36.2, "seq": 10});
        assert_eq!(Value::Object(reading(2, 10)), expected);
    }

    #[test]
    fn some_readings_cross_thirty_degrees_and_some_do_not() {
        let temps: Vec<f64> = (0..40)
            .map(|n| reading(1, n)["temperature"].as_f64().unwrap())
            .collect();
        assert!(temps.iter().any(|t| *t > 30.0));
        assert!(temps.iter().any(|t| *t < 30.0));
    }
}
