//! Which published messages the broker has acknowledged: pure bookkeeping, no I/O.
//!
//! rumqttc's `publish` returns once a message is queued, not once the broker has it.
//! The publisher task therefore follows each message through three places, in
//! submission order:
//!
//! ```text
//!  submit ──> queue ──(next_to_send: handed to the client)──> handed
//!                ^                                       │ Outgoing::Publish(pkid), in order
//!                │                                       v
//!                └──── disconnected: requeued ──── in flight (by pkid) ──PUBACK──> acked
//! ```
//!
//! - A message leaves `queue` only while connected, not paused, and with fewer than
//!   `limit` messages handed or in flight: in-flight is bounded.
//! - rumqttc assigns packet ids in the order it takes requests, and reports each as
//!   `Outgoing::Publish(pkid)`: the oldest handed message gets that pkid.
//! - A batch is done when every one of its messages has its PUBACK.
//! - On a disconnect every unacknowledged message goes back to the front of the
//!   queue in submission order and is published again after the reconnect (the
//!   publisher drops rumqttc's own resend list, so each message is resent once,
//!   by us, with a fresh packet id). "Accepted" still means a PUBACK for that
//!   very message, never one for an earlier packet with the same id.
//! - A batch whose caller gave up (timeout) is withdrawn: its queued messages are
//!   dropped, and those already sent become orphans that still count toward the
//!   in-flight bound until their PUBACK (or a disconnect) clears them.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// Names one `publish` call.
pub type BatchId = u64;

/// One message of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub batch: BatchId,
    pub index: usize,
}

/// A message on its way: `order` is its place in submission order; `slot` is
/// `None` once its batch was withdrawn.
#[derive(Debug, Clone, Copy)]
struct Entry {
    order: u64,
    slot: Option<Slot>,
}

#[derive(Debug)]
struct Progress {
    acked: Vec<bool>,
    remaining: usize,
}

/// What a PUBACK meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acked {
    /// The last missing acknowledgement of this batch: it is accepted.
    BatchDone(BatchId),
    /// One more message of a batch that still waits for others.
    Progress,
    /// The broker refused this message (MQTT 5 reason code): the batch has failed
    /// and is withdrawn; `accepted` of its messages, from the start, had PUBACKs.
    Refused { slot: Slot, accepted: usize },
    /// A message whose batch was withdrawn.
    Orphan,
    /// No message was sent with this packet id (a broker bug, or a PUBACK that
    /// arrived after a reconnect): ignored.
    Unknown,
}

#[derive(Debug)]
pub struct Tracker {
    limit: usize,
    connected: bool,
    paused: bool,
    next_order: u64,
    queue: VecDeque<Entry>,
    handed: VecDeque<Entry>,
    in_flight: BTreeMap<u16, Entry>,
    batches: HashMap<BatchId, Progress>,
}

impl Tracker {
    /// A tracker allowing `limit` (at least 1) messages handed or in flight.
    pub fn new(limit: usize) -> Tracker {
        Tracker {
            limit: limit.max(1),
            connected: false,
            paused: false,
            next_order: 0,
            queue: VecDeque::new(),
            handed: VecDeque::new(),
            in_flight: BTreeMap::new(),
            batches: HashMap::new(),
        }
    }

    /// Adds a batch of `len` messages behind everything submitted before. Returns
    /// false for an empty batch, which is done at once.
    pub fn submit(&mut self, batch: BatchId, len: usize) -> bool {
        if len == 0 {
            return false;
        }
        for index in 0..len {
            self.queue.push_back(Entry {
                order: self.next_order,
                slot: Some(Slot { batch, index }),
            });
            self.next_order += 1;
        }
        self.batches.insert(
            batch,
            Progress {
                acked: vec![false; len],
                remaining: len,
            },
        );
        true
    }

    /// The next message to hand to the client, if one may go now.
    pub fn next_to_send(&mut self) -> Option<Slot> {
        if !self.connected || self.paused || self.outstanding() >= self.limit {
            return None;
        }
        let entry = self.queue.pop_front()?;
        self.handed.push_back(entry);
        entry.slot
    }

    /// rumqttc sent the oldest handed message with packet id `pkid`. False when no
    /// message was waiting for one (nothing is recorded then).
    pub fn sent(&mut self, pkid: u16) -> bool {
        let Some(entry) = self.handed.pop_front() else {
            return false;
        };
        // A pkid still in flight would mean rumqttc reused it before its PUBACK;
        // it never does (it waits on a collision), but if it did the old message
        // goes back to the queue rather than being taken as acknowledged later.
        if let Some(old) = self.in_flight.insert(pkid, entry) {
            self.requeue(vec![old]);
        }
        true
    }

    /// A PUBACK for `pkid`; `ok` is false when its reason code refused the message.
    pub fn acked(&mut self, pkid: u16, ok: bool) -> Acked {
        let Some(entry) = self.in_flight.remove(&pkid) else {
            return Acked::Unknown;
        };
        let Some(slot) = entry.slot else {
            return Acked::Orphan;
        };
        if !ok {
            let accepted = self.withdraw(slot.batch);
            return Acked::Refused { slot, accepted };
        }
        let Some(progress) = self.batches.get_mut(&slot.batch) else {
            return Acked::Orphan;
        };
        if let Some(flag) = progress.acked.get_mut(slot.index) {
            if !*flag {
                *flag = true;
                progress.remaining -= 1;
            }
        }
        if progress.remaining == 0 {
            self.batches.remove(&slot.batch);
            Acked::BatchDone(slot.batch)
        } else {
            Acked::Progress
        }
    }

    /// Connected (again): messages may be handed out. `receive_max` is the
    /// broker's limit on unacknowledged messages (MQTT 5), if it gave one.
    pub fn connected(&mut self, receive_max: Option<u16>, limit: usize) {
        self.connected = true;
        self.limit = match receive_max {
            Some(r) => limit.min(usize::from(r)),
            None => limit,
        }
        .max(1);
    }

    /// The connection is gone: every unacknowledged message of a live batch goes
    /// back to the front of the queue, in submission order; orphans are forgotten.
    pub fn disconnected(&mut self) {
        self.connected = false;
        let mut back: Vec<Entry> = self.handed.drain(..).collect();
        back.extend(std::mem::take(&mut self.in_flight).into_values());
        self.requeue(back);
    }

    fn requeue(&mut self, mut back: Vec<Entry>) {
        back.retain(|e| e.slot.is_some());
        back.sort_by_key(|e| e.order);
        for entry in back.into_iter().rev() {
            self.queue.push_front(entry);
        }
        // A requeued entry may be older than some still queued (only after the
        // pkid-reuse case in `sent`): keep the queue in submission order.
        self.queue.make_contiguous().sort_by_key(|e| e.order);
    }

    /// The caller of `batch` gave up: its queued messages are dropped and those
    /// already sent become orphans. Returns how many of its messages, from the
    /// first, had PUBACKs.
    pub fn withdraw(&mut self, batch: BatchId) -> usize {
        let accepted = self
            .batches
            .remove(&batch)
            .map(|p| p.acked.iter().take_while(|a| **a).count())
            .unwrap_or(0);
        self.queue
            .retain(|e| e.slot.map(|s| s.batch) != Some(batch));
        for entry in self.handed.iter_mut().chain(self.in_flight.values_mut()) {
            if entry.slot.map(|s| s.batch) == Some(batch) {
                entry.slot = None;
            }
        }
        accepted
    }

    /// Stops (or resumes) handing out messages, to let what is in flight drain
    /// before a planned reconnect.
    pub fn pause(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Nothing handed or in flight.
    pub fn idle(&self) -> bool {
        self.outstanding() == 0
    }

    /// Messages handed to the client or in flight.
    pub fn outstanding(&self) -> usize {
        self.handed.len() + self.in_flight.len()
    }

    /// Batches not yet done or withdrawn.
    pub fn batches(&self) -> usize {
        self.batches.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(batch: BatchId, index: usize) -> Slot {
        Slot { batch, index }
    }

    /// Hands out everything allowed and sends it with pkids from `first`.
    fn send_all(t: &mut Tracker, first: u16) -> Vec<(u16, Slot)> {
        let mut out = Vec::new();
        let mut pkid = first;
        while let Some(s) = t.next_to_send() {
            assert!(t.sent(pkid));
            out.push((pkid, s));
            pkid += 1;
        }
        out
    }

    #[test]
    fn nothing_is_handed_out_before_the_first_connection() {
        let mut t = Tracker::new(4);
        t.submit(1, 2);
        assert_eq!(t.next_to_send(), None);
        t.connected(None, 4);
        assert_eq!(t.next_to_send(), Some(slot(1, 0)));
    }

    #[test]
    fn a_batch_is_done_only_when_every_message_has_its_puback() {
        let mut t = Tracker::new(4);
        t.connected(None, 4);
        t.submit(7, 3);
        let sent = send_all(&mut t, 1);
        assert_eq!(sent.len(), 3);
        assert_eq!(t.acked(1, true), Acked::Progress);
        assert_eq!(t.acked(3, true), Acked::Progress);
        assert_eq!(t.acked(2, true), Acked::BatchDone(7));
        assert!(t.idle());
        assert_eq!(t.batches(), 0);
    }

    #[test]
    fn in_flight_messages_never_exceed_the_limit() {
        let mut t = Tracker::new(2);
        t.connected(None, 2);
        t.submit(1, 5);
        assert_eq!(send_all(&mut t, 1).len(), 2);
        assert_eq!(t.next_to_send(), None);
        t.acked(1, true);
        assert_eq!(t.next_to_send(), Some(slot(1, 2)));
        assert_eq!(t.next_to_send(), None);
    }

    #[test]
    fn the_brokers_receive_maximum_lowers_the_limit() {
        let mut t = Tracker::new(10);
        t.connected(Some(3), 10);
        t.submit(1, 10);
        assert_eq!(send_all(&mut t, 1).len(), 3);
    }

    #[test]
    fn pkids_are_matched_to_messages_in_the_order_they_were_handed_out() {
        let mut t = Tracker::new(8);
        t.connected(None, 8);
        t.submit(1, 1);
        t.submit(2, 1);
        assert_eq!(t.next_to_send(), Some(slot(1, 0)));
        assert_eq!(t.next_to_send(), Some(slot(2, 0)));
        assert!(t.sent(9));
        assert!(t.sent(4));
        assert_eq!(t.acked(4, true), Acked::BatchDone(2));
        assert_eq!(t.acked(9, true), Acked::BatchDone(1));
    }

    #[test]
    fn an_outgoing_publish_nobody_handed_out_is_not_recorded() {
        let mut t = Tracker::new(8);
        t.connected(None, 8);
        assert!(!t.sent(1));
        assert_eq!(t.acked(1, true), Acked::Unknown);
    }

    #[test]
    fn after_a_disconnect_unacknowledged_messages_are_sent_again_in_order() {
        let mut t = Tracker::new(3);
        t.connected(None, 3);
        t.submit(1, 5);
        let first = send_all(&mut t, 1);
        assert_eq!(first.len(), 3);
        // Message 1 is acknowledged; 0 and 2 are not when the connection drops.
        t.acked(2, true);
        t.disconnected();
        assert_eq!(t.next_to_send(), None, "nothing goes while disconnected");
        t.connected(None, 3);
        let again: Vec<Slot> = send_all(&mut t, 1).into_iter().map(|(_, s)| s).collect();
        assert_eq!(again, [slot(1, 0), slot(1, 2), slot(1, 3)]);
    }

    #[test]
    fn a_puback_for_a_pkid_from_before_the_reconnect_does_not_count_for_a_new_message() {
        let mut t = Tracker::new(2);
        t.connected(None, 2);
        t.submit(1, 1);
        send_all(&mut t, 1);
        t.disconnected();
        // A late PUBACK of the old connection: pkid 1 is no longer in flight.
        assert_eq!(t.acked(1, true), Acked::Unknown);
        t.connected(None, 2);
        send_all(&mut t, 1);
        assert_eq!(t.acked(1, true), Acked::BatchDone(1));
    }

    #[test]
    fn a_message_handed_out_but_never_sent_is_requeued_by_a_disconnect() {
        let mut t = Tracker::new(4);
        t.connected(None, 4);
        t.submit(1, 2);
        assert_eq!(t.next_to_send(), Some(slot(1, 0)));
        assert!(t.sent(1));
        assert_eq!(t.next_to_send(), Some(slot(1, 1)));
        t.disconnected();
        t.connected(None, 4);
        assert_eq!(t.next_to_send(), Some(slot(1, 0)));
        assert_eq!(t.next_to_send(), Some(slot(1, 1)));
    }

    #[test]
    fn a_refused_message_fails_its_batch_and_says_how_many_before_it_were_accepted() {
        let mut t = Tracker::new(4);
        t.connected(None, 4);
        t.submit(1, 4);
        send_all(&mut t, 1);
        t.acked(1, true);
        assert_eq!(
            t.acked(2, false),
            Acked::Refused {
                slot: slot(1, 1),
                accepted: 1
            }
        );
        assert_eq!(t.acked(3, true), Acked::Orphan);
        assert_eq!(t.batches(), 0);
    }

    #[test]
    fn a_withdrawn_batch_leaves_the_queue_and_its_sent_messages_become_orphans() {
        let mut t = Tracker::new(2);
        t.connected(None, 2);
        t.submit(1, 3);
        t.submit(2, 1);
        send_all(&mut t, 1);
        t.acked(1, true);
        assert_eq!(t.withdraw(1), 1);
        // Message 1 (pkid 2) still holds a place in flight until its PUBACK.
        assert_eq!(t.next_to_send(), Some(slot(2, 0)));
        assert_eq!(t.next_to_send(), None);
        t.sent(3);
        assert_eq!(t.acked(2, true), Acked::Orphan);
        assert_eq!(t.acked(3, true), Acked::BatchDone(2));
        assert!(t.idle());
    }

    #[test]
    fn orphans_are_forgotten_at_a_disconnect() {
        let mut t = Tracker::new(2);
        t.connected(None, 2);
        t.submit(1, 2);
        send_all(&mut t, 1);
        t.withdraw(1);
        t.disconnected();
        assert!(t.idle());
        t.connected(None, 2);
        assert_eq!(t.next_to_send(), None);
    }

    #[test]
    fn a_paused_tracker_hands_out_nothing_until_resumed() {
        let mut t = Tracker::new(4);
        t.connected(None, 4);
        t.submit(1, 2);
        t.pause(true);
        assert_eq!(t.next_to_send(), None);
        t.pause(false);
        assert_eq!(t.next_to_send(), Some(slot(1, 0)));
    }

    #[test]
    fn a_later_batch_waits_behind_an_earlier_one_after_a_reconnect() {
        let mut t = Tracker::new(2);
        t.connected(None, 2);
        t.submit(1, 2);
        t.submit(2, 2);
        send_all(&mut t, 1);
        t.disconnected();
        t.connected(None, 4);
        let order: Vec<Slot> = send_all(&mut t, 1).into_iter().map(|(_, s)| s).collect();
        assert_eq!(order, [slot(1, 0), slot(1, 1), slot(2, 0), slot(2, 1)]);
    }

    #[test]
    fn an_empty_batch_is_done_at_once() {
        let mut t = Tracker::new(1);
        assert!(!t.submit(1, 0));
        assert_eq!(t.batches(), 0);
    }
}
