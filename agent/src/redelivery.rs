//! One id per reading: recognising an MQTT delivery the broker sends again after
//! ferry committed it but before the broker had its PUBACK (a crash or a lost
//! connection between the two), so it is acknowledged without being stored twice.
//!
//! A delivery is identified by its source, its MQTT packet id and a digest of its
//! topic and payload ([`Key`]: 2 + 8 bytes). For each MQTT source the commit task
//! keeps a *window*: the keys of the deliveries acknowledged by the last commit that
//! acknowledged any delivery of that source, plus those of earlier commits whose
//! PUBACK has not gone out on the connection they came from (see [`Window::next`]).
//! The window is saved in the same store transaction as the records it covers, so
//! the two never disagree, and loaded at start.
//!
//! Only a delivery with the DUP flag set is compared with the window ([`Windows::is_redelivery`]):
//! a match is acknowledged without being stored. A delivery without DUP is never
//! dropped.
//!
//! # When a match is wrong
//! A match drops a reading wrongly only if the broker received our PUBACK for the
//! windowed delivery, then delivered a new message with the same packet id and a
//! byte-identical topic and payload, and ferry crashed or lost the connection before
//! its next commit for that source, so the broker sends that new message again with
//! DUP set. From what is saved and the message alone that case cannot be told from
//! the one the window is for (the PUBACK never arrived): the broker's redelivery is
//! the same bytes under the same packet id either way, and whether a PUBACK reached
//! the broker is known only to the broker. Telling them apart would take a durable
//! write between the PUBACK and the next delivery, which is a second write per
//! reading. It does not happen in practice: mosquitto hands out packet ids by
//! incrementing a per-client counter, so an id comes back only after 65,535 other
//! deliveries, and any commit for the source in between replaces the window; and a
//! payload that carries a time or a counter never repeats. The exception is a broker
//! that lost the session (restarted without persistence): its ids start again at 1.
//! ferry empties the window in memory when the broker says the session is new, and
//! the next commit for the source replaces the saved one, so only a crash within
//! the first commit of the new session, on a reading byte-identical to one of the
//! last commit of the old session under the same small id, could drop a reading.
//!
//! Rejected input is acknowledged without a commit and does not replace the window:
//! replacing it would cost a store write per batch of garbage (flash wear driven by
//! bad input), and a wrong match through rejected input needs all of the 65,535
//! deliveries between the two uses of an id to be rejected, and then a byte-identical
//! copy of a reading that was valid.

use std::collections::HashMap;
use std::sync::Mutex;

/// Most keys one window holds. One commit acknowledges at most a batch (1024); the
/// rest is room for acknowledgements a lost connection took with it, awaiting
/// their redeliveries. Past it the oldest go (their redelivery would be stored
/// again: a second id, never a loss).
pub const MAX_WINDOW: usize = 8192;

/// The version byte of [`Window::encode`].
const ENCODING: u8 = 1;

/// What identifies one delivery of a source: its packet id and the digest of its
/// topic and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub packet_id: u16,
    pub digest: [u8; 8],
}

impl Key {
    pub fn new(packet_id: u16, topic: &str, payload: &[u8]) -> Key {
        Key {
            packet_id,
            digest: digest(topic, payload),
        }
    }
}

/// SHA-256 of the topic (length first, so topic and payload cannot trade bytes) and
/// the payload, cut to 8 bytes: stable across releases and platforms, unlike
/// std's hasher, because it is saved.
pub fn digest(topic: &str, payload: &[u8]) -> [u8; 8] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&(topic.len() as u64).to_be_bytes());
    ctx.update(topic.as_bytes());
    ctx.update(payload);
    let full = ctx.finish();
    let mut out = [0u8; 8];
    out.copy_from_slice(&full.as_ref()[..8]);
    out
}

/// One MQTT QoS 1 delivery, as the source received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub key: Key,
    /// The DUP flag: the broker says it may have sent this message before.
    pub dup: bool,
    /// The connection it came on (counted from 1 by the source); its PUBACK can
    /// only go out on that one.
    pub connection: u64,
}

/// What the MQTT source tells the commit task about acknowledgements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The PUBACK for `packet_id` was written on `connection`.
    Written { connection: u64, packet_id: u16 },
    /// `connection` opened without the broker's session: nothing from before it
    /// will be delivered again.
    SessionLost { connection: u64 },
}

/// Events from one MQTT source to the commit task, taken at every commit.
#[derive(Debug, Default)]
pub struct Feed(Mutex<Vec<Event>>);

impl Feed {
    pub fn push(&self, event: Event) {
        // A panic elsewhere while holding the lock leaves the Vec whole.
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }

    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Whether an entry's PUBACK may still be on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// Acknowledged on this connection, PUBACK not yet written.
    Pending(u64),
    /// The PUBACK was written.
    Written,
    /// Loaded from the store: whatever it was, it lasts until the next commit.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    key: Key,
    sent: Sent,
}

/// The window of one source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    /// In the order they were acknowledged.
    entries: Vec<Entry>,
}

impl Window {
    pub fn contains(&self, key: &Key) -> bool {
        self.entries.iter().any(|e| e.key == *key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The window after a commit that acknowledges `acked` (deliveries of this
    /// source, in order): those, after the entries whose PUBACK may still go out or
    /// be lost with a connection (pending), which the broker may send again. Entries
    /// whose PUBACK was written, and entries loaded at start, are left out: this
    /// commit is the next one after them.
    pub fn next(&self, acked: &[Delivery]) -> Window {
        let mut entries: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| matches!(e.sent, Sent::Pending(_)))
            .filter(|e| !acked.iter().any(|d| d.key == e.key))
            .copied()
            .collect();
        for d in acked {
            entries.retain(|e| e.key != d.key);
            entries.push(Entry {
                key: d.key,
                sent: Sent::Pending(d.connection),
            });
        }
        let excess = entries.len().saturating_sub(MAX_WINDOW);
        entries.drain(..excess);
        Window { entries }
    }

    /// `acked` were acknowledged again without a commit (redeliveries): their
    /// PUBACK is pending on their new connection.
    fn reacknowledged(&mut self, acked: &[Delivery]) {
        for d in acked {
            for e in self.entries.iter_mut().filter(|e| e.key == d.key) {
                e.sent = Sent::Pending(d.connection);
            }
        }
    }

    fn apply(&mut self, event: Event) {
        match event {
            Event::Written {
                connection,
                packet_id,
            } => {
                for e in &mut self.entries {
                    if e.sent == Sent::Pending(connection) && e.key.packet_id == packet_id {
                        e.sent = Sent::Written;
                    }
                }
            }
            Event::SessionLost { connection } => self
                .entries
                .retain(|e| matches!(e.sent, Sent::Pending(c) if c >= connection)),
        }
    }

    /// The saved form: a version byte, then per entry the packet id (big-endian)
    /// and the digest.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.entries.len() * 10);
        out.push(ENCODING);
        for e in &self.entries {
            out.extend_from_slice(&e.key.packet_id.to_be_bytes());
            out.extend_from_slice(&e.key.digest);
        }
        out
    }

    /// A saved window; `None` if it is not one this release wrote.
    pub fn decode(bytes: &[u8]) -> Option<Window> {
        let (&version, rest) = bytes.split_first()?;
        if version != ENCODING || rest.len() % 10 != 0 {
            return None;
        }
        let entries = rest
            .chunks_exact(10)
            .map(|c| {
                let (id, digest) = c.split_at(2);
                Some(Entry {
                    key: Key {
                        packet_id: u16::from_be_bytes(id.try_into().ok()?),
                        digest: digest.try_into().ok()?,
                    },
                    sent: Sent::Unknown,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Window { entries })
    }
}

/// The deliveries one batch acknowledges (stored or recognised as redelivered;
/// not rejected ones), by source, in order.
#[derive(Debug, Default)]
pub struct Acknowledged {
    by_source: HashMap<String, Vec<Delivery>>,
}

impl Acknowledged {
    pub fn push(&mut self, source: &str, delivery: Delivery) {
        match self.by_source.get_mut(source) {
            Some(list) => list.push(delivery),
            None => {
                self.by_source.insert(source.to_string(), vec![delivery]);
            }
        }
    }

    fn contains(&self, source: &str, key: &Key) -> bool {
        self.by_source
            .get(source)
            .is_some_and(|l| l.iter().any(|d| d.key == *key))
    }

    pub fn is_empty(&self) -> bool {
        self.by_source.is_empty()
    }
}

/// The windows of every MQTT source.
#[derive(Debug, Default)]
pub struct Windows {
    by_source: HashMap<String, Window>,
}

/// The windows a commit writes, to be adopted once it is durable.
#[derive(Debug, Default)]
pub struct Plan(Vec<(String, Window)>);

impl Plan {
    /// `(source, encoded window)` for the store.
    pub fn encoded(&self) -> Vec<(String, Vec<u8>)> {
        self.0
            .iter()
            .map(|(s, w)| (s.clone(), w.encode()))
            .collect()
    }
}

impl Windows {
    /// Starts `source` with the window saved by the last run.
    pub fn load(&mut self, source: &str, window: Window) {
        self.by_source.insert(source.to_string(), window);
    }

    pub fn window(&self, source: &str) -> Option<&Window> {
        self.by_source.get(source)
    }

    /// Whether `delivery` of `source` is one already acknowledged: it has DUP set
    /// and its key is in the source's window or earlier in this batch.
    pub fn is_redelivery(&self, source: &str, delivery: &Delivery, batch: &Acknowledged) -> bool {
        delivery.dup
            && (self
                .by_source
                .get(source)
                .is_some_and(|w| w.contains(&delivery.key))
                || batch.contains(source, &delivery.key))
    }

    /// Applies what `source` reported.
    pub fn apply(&mut self, source: &str, events: impl IntoIterator<Item = Event>) {
        if let Some(w) = self.by_source.get_mut(source) {
            for e in events {
                w.apply(e);
            }
        }
    }

    /// The windows a commit acknowledging `batch` replaces.
    pub fn plan(&self, batch: &Acknowledged) -> Plan {
        let mut out: Vec<(String, Window)> = batch
            .by_source
            .iter()
            .map(|(source, acked)| {
                let now = self.by_source.get(source).cloned().unwrap_or_default();
                (source.clone(), now.next(acked))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Plan(out)
    }

    /// The commit of `plan` is durable.
    pub fn adopt(&mut self, plan: Plan) {
        for (source, window) in plan.0 {
            self.by_source.insert(source, window);
        }
    }

    /// `batch` was acknowledged without a commit: only redeliveries of windowed
    /// deliveries change anything (their PUBACK is pending again).
    pub fn without_commit(&mut self, batch: &Acknowledged) {
        for (source, acked) in &batch.by_source {
            if let Some(w) = self.by_source.get_mut(source) {
                w.reacknowledged(acked);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(id: u16, payload: &str, dup: bool, connection: u64) -> Delivery {
        Delivery {
            key: Key::new(id, "sensors/a/telemetry", payload.as_bytes()),
            dup,
            connection,
        }
    }

    fn committed(windows: &mut Windows, source: &str, acked: &[Delivery]) {
        let mut batch = Acknowledged::default();
        for d in acked {
            batch.push(source, *d);
        }
        let plan = windows.plan(&batch);
        windows.adopt(plan);
    }

    fn written(windows: &mut Windows, source: &str, connection: u64, ids: &[u16]) {
        let events = ids.iter().map(|&packet_id| Event::Written {
            connection,
            packet_id,
        });
        windows.apply(source, events);
    }

    #[test]
    fn the_digest_is_the_same_in_every_release() {
        // Saved windows are compared with new deliveries after an upgrade: this
        // value must never change. It is the first 8 bytes of SHA-256 over
        // u64be(19) + "sensors/a/telemetry" + `{"t":1}`, as any SHA-256 computes it.
        assert_eq!(
            digest("sensors/a/telemetry", br#"{"t":1}"#),
            [0x5f, 0x51, 0xdb, 0x42, 0x4d, 0x09, 0x8e, 0xf5]
        );
    }

    #[test]
    fn topic_and_payload_cannot_trade_bytes() {
        assert_ne!(digest("a/b", b"c"), digest("a/", b"bc"));
    }

    #[test]
    fn a_committed_delivery_sent_again_with_dup_is_a_redelivery() {
        let mut w = Windows::default();
        committed(&mut w, "local", &[delivery(7, "x", false, 1)]);
        let again = delivery(7, "x", true, 2);
        assert!(w.is_redelivery("local", &again, &Acknowledged::default()));
    }

    #[test]
    fn a_delivery_without_dup_is_never_a_redelivery() {
        let mut w = Windows::default();
        committed(&mut w, "local", &[delivery(7, "x", false, 1)]);
        let same = delivery(7, "x", false, 1);
        assert!(!w.is_redelivery("local", &same, &Acknowledged::default()));
    }

    #[test]
    fn the_same_packet_id_with_other_bytes_is_a_new_reading() {
        let mut w = Windows::default();
        committed(&mut w, "local", &[delivery(7, "x", false, 1)]);
        let other = delivery(7, "y", true, 2);
        assert!(!w.is_redelivery("local", &other, &Acknowledged::default()));
    }

    #[test]
    fn the_same_bytes_under_another_packet_id_are_a_new_reading() {
        let mut w = Windows::default();
        committed(&mut w, "local", &[delivery(7, "x", false, 1)]);
        let other = delivery(8, "x", true, 2);
        assert!(!w.is_redelivery("local", &other, &Acknowledged::default()));
    }

    #[test]
    fn another_source_s_window_does_not_match() {
        let mut w = Windows::default();
        committed(&mut w, "local", &[delivery(7, "x", false, 1)]);
        let again = delivery(7, "x", true, 2);
        assert!(!w.is_redelivery("plant", &again, &Acknowledged::default()));
    }

    #[test]
    fn a_redelivery_of_a_delivery_earlier_in_the_same_batch_is_recognised() {
        let w = Windows::default();
        let mut batch = Acknowledged::default();
        batch.push("local", delivery(7, "x", false, 1));
        assert!(w.is_redelivery("local", &delivery(7, "x", true, 2), &batch));
    }

    #[test]
    fn a_commit_replaces_the_deliveries_whose_puback_was_written() {
        let mut w = Windows::default();
        committed(&mut w, "local", &[delivery(1, "a", false, 1)]);
        written(&mut w, "local", 1, &[1]);
        committed(&mut w, "local", &[delivery(2, "b", false, 1)]);
        let window = w.window("local").unwrap();
        assert!(!window.contains(&delivery(1, "a", true, 1).key));
        assert!(window.contains(&delivery(2, "b", true, 1).key));
        assert_eq!(window.len(), 1);
    }

    #[test]
    fn a_delivery_whose_puback_is_not_yet_written_stays_in_the_next_window() {
        let mut w = Windows::default();
        committed(&mut w, "local", &[delivery(1, "a", false, 1)]);
        committed(&mut w, "local", &[delivery(2, "b", false, 1)]);
        let window = w.window("local").unwrap();
        assert_eq!(window.len(), 2);
        assert!(window.contains(&delivery(1, "a", true, 1).key));
    }

    #[test]
    fn a_puback_written_on_another_connection_does_not_count() {
        let mut w = Windows::default();
        committed(&mut w, "local", &[delivery(1, "a", false, 1)]);
        // Connection 2 reuses packet id 1 for something else.
        written(&mut w, "local", 2, &[1]);
        committed(&mut w, "local", &[delivery(2, "b", false, 2)]);
        assert!(w
            .window("local")
            .unwrap()
            .contains(&delivery(1, "a", true, 1).key));
    }

    #[test]
    fn a_delivery_whose_puback_was_lost_with_its_connection_stays_until_its_redelivery_is_acknowledged(
    ) {
        let mut w = Windows::default();
        committed(&mut w, "local", &[delivery(1, "a", false, 1)]);
        // Connection 1 is lost before the PUBACK goes out; more of its deliveries
        // are committed while the broker sends 1 again on connection 2.
        committed(&mut w, "local", &[delivery(2, "b", false, 1)]);
        committed(&mut w, "local", &[delivery(3, "c", false, 1)]);
        let again = delivery(1, "a", true, 2);
        assert!(w.is_redelivery("local", &again, &Acknowledged::default()));
        committed(&mut w, "local", &[again, delivery(4, "d", false, 2)]);
        written(&mut w, "local", 2, &[1, 4]);
        committed(&mut w, "local", &[delivery(5, "e", false, 2)]);
        let window = w.window("local").unwrap();
        assert!(!window.contains(&again.key));
        assert!(window.contains(&delivery(2, "b", true, 1).key));
    }

    #[test]
    fn a_window_loaded_at_start_lasts_until_the_next_commit_of_its_source() {
        let mut saved = Windows::default();
        committed(&mut saved, "local", &[delivery(1, "a", false, 1)]);
        let bytes = saved.window("local").unwrap().encode();

        let mut w = Windows::default();
        w.load("local", Window::decode(&bytes).unwrap());
        assert!(w.is_redelivery(
            "local",
            &delivery(1, "a", true, 1),
            &Acknowledged::default()
        ));
        committed(&mut w, "local", &[delivery(2, "b", false, 1)]);
        assert!(!w.is_redelivery(
            "local",
            &delivery(1, "a", true, 1),
            &Acknowledged::default()
        ));
    }

    #[test]
    fn a_lost_session_empties_the_window() {
        let mut w = Windows::default();
        committed(&mut w, "local", &[delivery(1, "a", false, 1)]);
        w.apply("local", [Event::SessionLost { connection: 2 }]);
        assert!(w.window("local").unwrap().is_empty());
    }

    #[test]
    fn a_redelivery_acknowledged_without_a_commit_waits_for_its_new_puback() {
        let mut w = Windows::default();
        committed(&mut w, "local", &[delivery(1, "a", false, 1)]);
        written(&mut w, "local", 1, &[1]);
        let mut batch = Acknowledged::default();
        batch.push("local", delivery(1, "a", true, 2));
        w.without_commit(&batch);
        // Its PUBACK on connection 2 is not written yet: a later commit keeps it.
        committed(&mut w, "local", &[delivery(2, "b", false, 2)]);
        assert!(w
            .window("local")
            .unwrap()
            .contains(&delivery(1, "a", true, 2).key));
    }

    #[test]
    fn a_window_keeps_at_most_its_bound_and_drops_the_oldest() {
        let mut w = Windows::default();
        let many: Vec<Delivery> = (0..MAX_WINDOW as u16 + 10)
            .map(|i| delivery(i, &i.to_string(), false, 1))
            .collect();
        committed(&mut w, "local", &many);
        let window = w.window("local").unwrap();
        assert_eq!(window.len(), MAX_WINDOW);
        assert!(!window.contains(&many[0].key));
        assert!(window.contains(&many[many.len() - 1].key));
    }

    #[test]
    fn a_window_reads_back_as_it_was_saved() {
        let mut w = Windows::default();
        committed(
            &mut w,
            "local",
            &[delivery(1, "a", false, 1), delivery(65535, "b", false, 1)],
        );
        let bytes = w.window("local").unwrap().encode();
        assert_eq!(bytes.len(), 1 + 2 * 10);
        let back = Window::decode(&bytes).unwrap();
        assert!(back.contains(&delivery(65535, "b", true, 3).key));
        assert_eq!(back.len(), 2);
    }

    #[test]
    fn a_saved_window_that_is_not_one_is_refused() {
        assert_eq!(Window::decode(&[]), None);
        assert_eq!(Window::decode(&[2]), None);
        assert_eq!(Window::decode(&[ENCODING, 1, 2, 3]), None);
        assert_eq!(Window::decode(&[ENCODING]), Some(Window::default()));
    }
}
