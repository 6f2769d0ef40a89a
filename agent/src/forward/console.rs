//! The console sink: each CloudEvent as one JSON line on stdout. For trying ferry out
//! and for piping into other tools; logs go to stderr so the two never mix.

use std::io::Write;

use cloudevents::Event;
use serde::Deserialize;

use super::{cloudevent, Delivery};

/// `[[sink.console]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSinkConfig {
    /// The sink's name (rules address sinks by name).
    pub name: String,
}

pub struct ConsoleSink {
    pub name: String,
}

impl ConsoleSink {
    pub fn new(cfg: &ConsoleSinkConfig) -> Self {
        Self {
            name: cfg.name.clone(),
        }
    }

    pub fn send(&self, events: &[Event]) -> Delivery {
        let mut out = std::io::stdout().lock();
        for e in events {
            let mut line = cloudevent::structured(e);
            line.push(b'\n');
            if let Err(e) = out.write_all(&line) {
                return Delivery::Retry {
                    kind: "io",
                    detail: e.to_string(),
                    after: None,
                };
            }
        }
        match out.flush() {
            Ok(()) => Delivery::Accepted,
            Err(e) => Delivery::Retry {
                kind: "io",
                detail: e.to_string(),
                after: None,
            },
        }
    }
}
