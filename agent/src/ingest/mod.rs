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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

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
    /// How many of this source's inputs its producer lets wait unacknowledged (an
    /// MQTT broker's in-flight limit), if it has such a limit: once that many wait,
    /// no more come until a commit acknowledges them ([`crate::group_commit`]).
    pub window: Option<usize>,
    /// Of a windowed source: its inputs sent and not yet acknowledged.
    pending: AtomicUsize,
}

impl Origin {
    pub fn new(agent: &str, kind: &str, name: &str, decode: Option<DecodeConfig>) -> Arc<Self> {
        Self::with_window(agent, kind, name, decode, None)
    }

    /// A source whose producer sends at most `window` inputs before it waits for
    /// their acknowledgements.
    pub fn windowed(
        agent: &str,
        kind: &str,
        name: &str,
        decode: Option<DecodeConfig>,
        window: usize,
    ) -> Arc<Self> {
        Self::with_window(agent, kind, name, decode, Some(window.max(1)))
    }

    fn with_window(
        agent: &str,
        kind: &str,
        name: &str,
        decode: Option<DecodeConfig>,
        window: Option<usize>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            uri: format!("/ferry/{agent}/{kind}/{name}"),
            decode,
            window,
            pending: AtomicUsize::new(0),
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
    /// For an MQTT QoS 1 delivery: what identifies it, so the commit task can tell
    /// a delivery the broker sends again from a new one ([`crate::redelivery`]).
    pub delivery: Option<crate::redelivery::Delivery>,
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

impl Payload {
    /// About how much memory the payload holds, for the input budget: exact for
    /// raw bytes, an estimate from the top-level values for built readings.
    fn size(&self) -> usize {
        match self {
            Payload::Raw { topic, bytes } => topic.len() + bytes.len(),
            Payload::Fields { device, fields } => {
                let values: usize = fields
                    .iter()
                    .map(|(k, v)| {
                        k.len()
                            + match v {
                                Value::String(s) => s.len(),
                                _ => 16,
                            }
                    })
                    .sum();
                device.len() + values
            }
        }
    }
}

/// The sending end of the channel from the sources to the commit task, bounded in
/// inputs and in bytes: an input waits for room in both, so a burst of large
/// payloads holds back its sources (and so the broker) instead of growing memory.
#[derive(Clone)]
pub struct Inlet {
    tx: mpsc::Sender<Admitted>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    window_full: Arc<Notify>,
}

/// An input with its share of the byte budget, given back when it is dropped
/// (after the commit task has dealt with it).
pub struct Admitted {
    pub input: Input,
    _bytes: OwnedSemaphorePermit,
}

/// The channel's receiving end was dropped: the pipeline is stopping.
#[derive(Debug)]
pub struct Closed;

impl Inlet {
    /// A channel of at most `inputs` inputs and about `max_bytes` of payloads.
    pub fn channel(inputs: usize, max_bytes: usize) -> (Inlet, mpsc::Receiver<Admitted>) {
        let (tx, rx) = mpsc::channel(inputs);
        let max_bytes = max_bytes.clamp(1, Semaphore::MAX_PERMITS);
        let inlet = Inlet {
            tx,
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_bytes,
            window_full: Arc::new(Notify::new()),
        };
        (inlet, rx)
    }

    /// Notified when a windowed source ([`Origin::windowed`]) has its whole window
    /// sent and unacknowledged: its producer sends nothing more until a commit
    /// acknowledges some, so the commit task need not wait for more.
    pub fn window_full(&self) -> Arc<Notify> {
        Arc::clone(&self.window_full)
    }

    /// Sends `input` once there is room. An input larger than the whole budget
    /// waits for all of it, so it still gets through, alone.
    pub async fn send(&self, mut input: Input) -> Result<(), Closed> {
        // Counted before it is sent, so its acknowledgement never comes first.
        let mut waiting = 0;
        if let (Some(window), Some(ack)) = (input.origin.window, input.ack.take()) {
            let origin = Arc::clone(&input.origin);
            waiting = origin.pending.fetch_add(1, Ordering::AcqRel) + 1;
            waiting = if waiting >= window { waiting } else { 0 };
            input.ack = Some(Box::new(move || {
                origin.pending.fetch_sub(1, Ordering::AcqRel);
                ack()
            }));
        }
        let want = input.payload.size().clamp(1, self.max_bytes);
        // `want` is at most `max_bytes`, which fits the semaphore, so it fits u32
        // whenever the semaphore's own maximum does; clamp anyway.
        let want = u32::try_from(want).unwrap_or(u32::MAX);
        let permit = Arc::clone(&self.bytes)
            .acquire_many_owned(want)
            .await
            .map_err(|_| Closed)?;
        self.tx
            .send(Admitted {
                input,
                _bytes: permit,
            })
            .await
            .map_err(|_| Closed)?;
        if waiting > 0 {
            self.window_full.notify_one();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn input(origin: &Arc<Origin>, acked: bool) -> Input {
        Input {
            origin: Arc::clone(origin),
            payload: Payload::Raw {
                topic: "sensors/d1/telemetry".into(),
                bytes: b"{}".to_vec(),
            },
            received: Utc::now(),
            ack: acked.then(|| Box::new(|| {}) as Ack),
            delivery: None,
        }
    }

    async fn signalled(full: &Notify) -> bool {
        tokio::time::timeout(Duration::from_millis(20), full.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_full_window_is_signalled_once_and_acknowledgements_make_room_again() {
        let (inlet, mut rx) = Inlet::channel(16, 1 << 20);
        let full = inlet.window_full();
        let broker = Origin::windowed("gw", "mqtt", "local", None, 2);
        inlet.send(input(&broker, true)).await.unwrap();
        assert!(!signalled(&full).await, "one of two is not a full window");
        inlet.send(input(&broker, true)).await.unwrap();
        assert!(signalled(&full).await);

        for _ in 0..2 {
            let ack = rx.recv().await.unwrap().input.ack.unwrap();
            ack();
        }
        inlet.send(input(&broker, true)).await.unwrap();
        assert!(
            !signalled(&full).await,
            "the acknowledged ones left the window"
        );
    }

    #[tokio::test]
    async fn inputs_without_an_acknowledgement_or_a_window_never_fill_one() {
        let (inlet, _rx) = Inlet::channel(16, 1 << 20);
        let full = inlet.window_full();
        let broker = Origin::windowed("gw", "mqtt", "local", None, 1);
        let serial = Origin::new("gw", "serial", "port", None);
        inlet.send(input(&broker, false)).await.unwrap();
        inlet.send(input(&serial, true)).await.unwrap();
        assert!(!signalled(&full).await);
    }
}
