//! The ledger's dead-letter area (see [`crate::store::dead_letter`]). Keys:
//! - `x:` + id (big-endian u64): one dead letter, as JSON;
//! - `m:dead_next`: the next dead-letter id, so ids are never reused.
//!
//! Adding dead letters is a durable batch of its own, committed before the sink
//! moves its cursor past them: a crash in between makes the sink send the event
//! again, and a second refusal finds it kept already (same sink and sequence).

use std::collections::BTreeMap;

use chrono::Utc;
use tracing::{info, warn};

use super::{u64_of, Ledger};
use crate::store::backend::{prefix_end, Backend, Batch};
use crate::store::dead_letter::evictions;
use crate::store::{
    DeadLetter, EventOrigin, NewDeadLetter, Record, Replayed, StateWrite, Store, StoreError,
};

const DEAD_PREFIX: &[u8] = b"x:";
const DEAD_NEXT: &[u8] = b"m:dead_next";
/// Most dead letters appended again in one commit by a replay.
const REPLAY_CHUNK: usize = 256;
/// And at most about these bytes.
const REPLAY_CHUNK_BYTES: u64 = 512 * 1024;

fn dead_key(id: u64) -> Vec<u8> {
    [DEAD_PREFIX, &id.to_be_bytes()].concat()
}

fn id_of(key: &[u8]) -> Option<u64> {
    key.get(DEAD_PREFIX.len()..).and_then(u64_of)
}

#[derive(Debug, Clone)]
struct Entry {
    sink: String,
    seq: u64,
    bytes: u64,
}

/// What is kept, in memory: enough to bound the area and to find a dead letter
/// already kept, without reading the records.
#[derive(Debug, Default, Clone)]
pub struct Index {
    next: u64,
    /// By id, so oldest first.
    entries: BTreeMap<u64, Entry>,
    bytes: u64,
}

impl Index {
    pub fn load(backend: &dyn Backend) -> Result<Self, StoreError> {
        let mut idx = Index::default();
        backend.scan(DEAD_PREFIX, &prefix_end(DEAD_PREFIX), &mut |k, v| {
            let Some(id) = id_of(k) else { return true };
            // One that cannot be read still counts against the bound, and goes
            // first when room is needed (it is among the oldest or not).
            let (sink, seq) = match serde_json::from_slice::<DeadLetter>(v) {
                Ok(d) => (d.sink, d.seq),
                Err(_) => (String::new(), u64::MAX),
            };
            let bytes = v.len() as u64;
            idx.entries.insert(id, Entry { sink, seq, bytes });
            idx.bytes += bytes;
            idx.next = idx.next.max(id + 1);
            true
        })?;
        if let Some(n) = backend.get(DEAD_NEXT)?.and_then(|v| u64_of(&v)) {
            idx.next = idx.next.max(n);
        }
        Ok(idx)
    }

    pub fn count(&self) -> u64 {
        self.entries.len() as u64
    }
}

pub fn gauge(count: u64) {
    metrics::gauge!("ferry_dead_letters").set(count as f64);
}

impl Ledger {
    pub(super) fn add_dead(&self, letters: Vec<NewDeadLetter>) -> Result<(), StoreError> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut st = self.lock();
        // Work on a copy: `st` changes only once the batch is committed.
        let mut idx = st.dead.clone();
        let mut batch = Batch::durable();
        let mut evicted = 0u64;
        let now = Utc::now();
        for l in letters {
            if idx
                .entries
                .values()
                .any(|e| e.sink == l.sink && e.seq == l.seq)
            {
                continue;
            }
            let origin = l.record.origin.clone().unwrap_or_else(|| EventOrigin {
                epoch: self.epoch.clone(),
                seq: l.seq,
            });
            let letter = DeadLetter {
                id: idx.next,
                sink: l.sink,
                seq: l.seq,
                origin,
                reason: l.reason,
                at: now,
                record: l.record,
            };
            let value =
                serde_json::to_vec(&letter).map_err(|e| StoreError::Backend(e.to_string()))?;
            let size = value.len() as u64;
            if self.dead_max == 0 || size > self.dead_max_bytes {
                // No room even in an empty area.
                warn!(sink = %letter.sink, seq = letter.seq, bytes = size, "no room to keep a dead letter; dropping it");
                evicted += 1;
                continue;
            }
            let n = evictions(
                idx.entries.values().map(|e| e.bytes),
                idx.entries.len(),
                idx.bytes,
                size,
                self.dead_max,
                self.dead_max_bytes,
            );
            for _ in 0..n {
                if let Some((id, e)) = idx.entries.pop_first() {
                    batch.delete(dead_key(id));
                    idx.bytes -= e.bytes;
                    evicted += 1;
                }
            }
            info!(sink = %letter.sink, seq = letter.seq, id = letter.id, event_id = %letter.origin.event_id(), reason = %letter.reason, "kept a refused event as a dead letter");
            batch.put(dead_key(letter.id), value);
            idx.entries.insert(
                letter.id,
                Entry {
                    sink: letter.sink,
                    seq: letter.seq,
                    bytes: size,
                },
            );
            idx.bytes += size;
            idx.next += 1;
        }
        if !batch.is_empty() {
            batch.put(DEAD_NEXT, idx.next.to_be_bytes());
            self.backend.commit(batch)?;
            st.dead = idx;
        }
        gauge(st.dead.count());
        if evicted > 0 {
            metrics::counter!("ferry_store_dropped_total", "reason" => "dead_letters_full")
                .increment(evicted);
        }
        Ok(())
    }

    pub(super) fn list_dead(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut out = Vec::new();
        self.backend
            .scan(DEAD_PREFIX, &prefix_end(DEAD_PREFIX), &mut |k, v| {
                match serde_json::from_slice::<DeadLetter>(v) {
                    Ok(d) => out.push(d),
                    Err(error) => {
                        warn!(id = ?id_of(k), %error, "a dead letter cannot be read; purge removes it")
                    }
                }
                true
            })?;
        Ok(out)
    }

    pub(super) fn get_dead(&self, id: u64) -> Result<Option<DeadLetter>, StoreError> {
        match self.backend.get(&dead_key(id))? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("dead letter {id}: {e}"))),
            None => Ok(None),
        }
    }

    pub(super) fn replay_dead(&self, ids: Option<&[u64]>) -> Result<Replayed, StoreError> {
        let mut out = Replayed::default();
        let letters = match ids {
            None => self.list_dead()?,
            Some(ids) => {
                let mut found = Vec::new();
                for &id in ids {
                    match self.get_dead(id)? {
                        Some(d) => found.push(d),
                        None => out.missing.push(id),
                    }
                }
                found
            }
        };
        let known: Vec<String> = self.lock().cursors.keys().cloned().collect();
        let mut chunk: Vec<DeadLetter> = Vec::new();
        let mut chunk_bytes = 0u64;
        for letter in letters {
            if !known.contains(&letter.sink) {
                out.unknown_sink.push(letter.id);
                continue;
            }
            let bytes = serde_json::to_vec(&letter.record).map_or(0, |v| v.len() as u64);
            if !chunk.is_empty()
                && (chunk.len() >= REPLAY_CHUNK || chunk_bytes + bytes > REPLAY_CHUNK_BYTES)
            {
                self.replay_chunk(std::mem::take(&mut chunk), &mut out)?;
                chunk_bytes = 0;
            }
            chunk_bytes += bytes;
            chunk.push(letter);
        }
        if !chunk.is_empty() {
            self.replay_chunk(chunk, &mut out)?;
        }
        Ok(out)
    }

    /// Appends the letters' records (durably), then removes the letters. A crash
    /// in between leaves both: a second replay sends the same event ids again,
    /// which the upstream drops as duplicates.
    fn replay_chunk(&self, letters: Vec<DeadLetter>, out: &mut Replayed) -> Result<(), StoreError> {
        let records: Vec<Record> = letters
            .iter()
            .map(|d| Record {
                to: Some(vec![d.sink.clone()]),
                origin: Some(d.origin.clone()),
                ..d.record.clone()
            })
            .collect();
        let appended = self.append(&records, &StateWrite::default())?;
        let ids: Vec<u64> = letters.iter().map(|d| d.id).collect();
        self.purge_dead(Some(&ids))?;
        for (i, d) in letters.iter().enumerate() {
            info!(id = d.id, sink = %d.sink, event_id = %d.origin.event_id(), seq = appended.first + i as u64, "replayed a dead letter");
            out.replayed.push((d.id, appended.first + i as u64));
        }
        Ok(())
    }

    pub(super) fn purge_dead(&self, ids: Option<&[u64]>) -> Result<u64, StoreError> {
        let mut st = self.lock();
        let mut idx = st.dead.clone();
        let mut batch = Batch::durable();
        let purged = match ids {
            None => {
                batch.delete_range(DEAD_PREFIX, prefix_end(DEAD_PREFIX));
                let n = idx.count();
                idx.entries.clear();
                idx.bytes = 0;
                n
            }
            Some(ids) => {
                let mut n = 0;
                for id in ids {
                    if let Some(e) = idx.entries.remove(id) {
                        batch.delete(dead_key(*id));
                        idx.bytes -= e.bytes;
                        n += 1;
                    }
                }
                n
            }
        };
        if purged > 0 {
            self.backend.commit(batch)?;
            st.dead = idx;
        }
        gauge(st.dead.count());
        Ok(purged)
    }

    pub(super) fn dead_count(&self) -> u64 {
        self.lock().dead.count()
    }
}
