//! The console sink: each CloudEvent as one JSON line (structured mode) on stdout.
//! For trying ferry out and for piping into other tools; logs go to stderr so the
//! two never mix.

use std::io::Write;
use std::time::Duration;

use serde::Deserialize;

use super::{BuildContext, BuildError, Delivery, Event, Sink, SinkConfig};
use crate::config::{BackoffConfig, Problem};

/// `[[sink.console]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSinkConfig {
    /// The sink's name (rules address sinks by name).
    pub name: String,
}

impl SinkConfig for ConsoleSinkConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, _index: usize) -> Vec<Problem> {
        // A name is all there is, and names are checked with every other sink's.
        Vec::new()
    }

    fn build(&self, _ctx: &BuildContext<'_>) -> Result<Box<dyn Sink>, BuildError> {
        Ok(Box::new(ConsoleSink {
            name: self.name.clone(),
        }))
    }
}

pub struct ConsoleSink {
    name: String,
}

#[async_trait::async_trait]
impl Sink for ConsoleSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "console"
    }

    /// Writes the lines with stdout locked: a blocked pipe holds only this task's
    /// thread, and the lines of one request never interleave with another's.
    async fn send(&self, events: &[Event]) -> Delivery {
        let mut out = std::io::stdout().lock();
        for e in events {
            let mut line = e.structured();
            line.push(b'\n');
            if let Err(e) = out.write_all(&line) {
                return Delivery::retry("io", e.to_string());
            }
        }
        match out.flush() {
            Ok(()) => Delivery::Accepted,
            Err(e) => Delivery::retry("io", e.to_string()),
        }
    }

    fn per_request(&self) -> usize {
        256
    }

    fn bytes_per_request(&self) -> usize {
        1024 * 1024
    }

    fn max_in_flight(&self) -> usize {
        1
    }

    fn retry(&self) -> BackoffConfig {
        BackoffConfig::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}
