//! Dead letters: events an upstream refused for good (an HTTP 400, 413, 415 or
//! 422, an MQTT PUBACK or JetStream ack that refuses the message itself) or that
//! are larger than the sink's `max_message`. Instead of vanishing once every sink
//! passed them, they are kept in a bounded area of the store, one entry per sink
//! and record, for an operator to look at, replay or purge (`ferry dead-letters`).
//!
//! A replay appends the record again for that sink only, with the CloudEvents id
//! (and `sequence`) it was first sent with: the upstream deduplicates on `source` +
//! `id`, and refused the first attempt, so it has never kept that id; the replay is
//! then accepted as the event it always was, and a second replay (an operator
//! running it twice, or a crash between the append and the removal of the dead
//! letter) is dropped upstream as a duplicate instead of arriving twice.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Record;

/// Where an event's CloudEvents id comes from: the store epoch and sequence of
/// the record's first commit. The id is `{epoch}-{seq}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventOrigin {
    pub epoch: String,
    pub seq: u64,
}

impl EventOrigin {
    /// The CloudEvents `id`.
    pub fn event_id(&self) -> String {
        format!("{}-{}", self.epoch, self.seq)
    }
}

/// What a sink hands the store when it gives up on an event.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeadLetter {
    pub sink: String,
    /// The record's sequence in the store when it was refused.
    pub seq: u64,
    pub record: Record,
    /// `HTTP 422`, `too_large`, the broker's reason...
    pub reason: String,
}

/// One kept dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its id among dead letters: increasing, never reused.
    pub id: u64,
    pub sink: String,
    /// The record's sequence in the store when it was refused.
    pub seq: u64,
    /// The CloudEvents id the event was sent with (and a replay keeps).
    pub origin: EventOrigin,
    pub reason: String,
    /// When it was refused.
    pub at: DateTime<Utc>,
    /// The record as it was stored.
    pub record: Record,
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replayed {
    /// Dead letter id and the sequence its record was appended at.
    pub replayed: Vec<(u64, u64)>,
    /// Ids asked for that are not kept.
    pub missing: Vec<u64>,
    /// Dead letters of sinks that are no longer configured: kept, not replayed.
    pub unknown_sink: Vec<u64>,
}

/// How many of the oldest dead letters must go for `incoming` more, of
/// `incoming_bytes`, to fit within `max` entries and `max_bytes`. `kept` is the
/// size of each kept one, oldest first.
pub fn evictions(
    kept: impl IntoIterator<Item = u64>,
    count: usize,
    bytes: u64,
    incoming_bytes: u64,
    max: usize,
    max_bytes: u64,
) -> usize {
    let (mut count, mut bytes) = (count + 1, bytes.saturating_add(incoming_bytes));
    let mut out = 0;
    for size in kept {
        if count <= max && bytes <= max_bytes {
            break;
        }
        out += 1;
        count -= 1;
        bytes = bytes.saturating_sub(size);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_goes_while_there_is_room() {
        assert_eq!(evictions([10, 10], 2, 20, 10, 3, 100), 0);
    }

    #[test]
    fn the_oldest_go_first_until_the_count_fits() {
        assert_eq!(evictions([10, 10, 10], 3, 30, 10, 3, 1000), 1);
        assert_eq!(evictions([10, 10, 10], 3, 30, 10, 1, 1000), 3);
    }

    #[test]
    fn the_oldest_go_first_until_the_bytes_fit() {
        assert_eq!(evictions([50, 10, 10], 3, 70, 40, 10, 100), 1);
        assert_eq!(evictions([10, 10, 50], 3, 70, 40, 10, 60), 3);
    }

    #[test]
    fn an_event_id_is_the_epoch_and_the_sequence() {
        let o = EventOrigin {
            epoch: "18a".into(),
            seq: 7,
        };
        assert_eq!(o.event_id(), "18a-7");
    }
}
