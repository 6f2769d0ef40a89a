//! Sources: where readings come from.
//!
//! A source runs as one task, turns what it receives into [`Input`]s and sends them
//! down a bounded channel to the pipeline. When the channel is full the source waits,
//! which is how backpressure reaches the producer (an MQTT source stops reading, so
//! the broker stops delivering to it).
//!
//! Every input may carry an [`Ack`]: the pipeline runs it after the input is durably
//! committed (or counted as rejected), in the order the inputs arrived. For MQTT QoS 1
//! that is the PUBACK, so the broker keeps anything the agent has not committed.

pub mod line;
pub mod modbus;
pub mod mqtt;
pub mod serial;
pub mod simulator;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::decode::DecodeConfig;

/// What a source is, for CloudEvents `source`, metrics and logs.
#[derive(Debug)]
pub struct Origin {
    /// The source's configured name.
    pub name: String,
    /// The CloudEvents `source` attribute: `/ferry/{agent}/{kind}/{name}`.
    pub uri: String,
    /// How raw payloads from this source are decoded; `None` for sources that
    /// build readings themselves.
    pub decode: Option<DecodeConfig>,
}

impl Origin {
    pub fn new(agent: &str, kind: &str, name: &str, decode: Option<DecodeConfig>) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            uri: format!("/ferry/{agent}/{kind}/{name}"),
            decode,
        })
    }
}

/// The acknowledgement of one input; run after commit.
pub type Ack = Box<dyn FnOnce() + Send>;

/// One thing a source received.
pub struct Input {
    pub origin: Arc<Origin>,
    pub payload: Payload,
    /// When the agent received it; the reading's time if the payload has none.
    pub received: DateTime<Utc>,
    pub ack: Option<Ack>,
}

/// Raw bytes to decode, or a reading a source already built.
pub enum Payload {
    Raw {
        topic: String,
        bytes: Vec<u8>,
    },
    Fields {
        device: String,
        fields: Map<String, Value>,
    },
}
