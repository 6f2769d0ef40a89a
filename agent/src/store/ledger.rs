//! The ledger: ferry's [`Store`] on top of any key-value [`Backend`].
//!
//! It owns what the keys mean, and so every decision a backend must not make on
//! its own: sequence numbers, cursors, the size bound and its policy, statistics,
//! record encoding, and decode-or-quarantine. Keys:
//! - `e` + sequence (big-endian u64): a record, as JSON;
//! - `m:next`: the next sequence; `m:epoch`: the store's epoch;
//! - `m:stats`: records, bytes and head, committed with every change to them, so
//!   opening a store with a large backlog does not read the backlog;
//! - `r:` + key: one rule's saved state for one device, committed with the batch
//!   that changed it (`m:rules`, the whole state in one value, is what earlier
//!   releases wrote; it is read once and removed by the next full rewrite);
//! - `c:` + sink name: that sink's cursor;
//! - `d:` + MQTT source name: the source's delivery window (`crate::redelivery`),
//!   replaced by the batch that acknowledges its deliveries;
//! - `m:rule_files`: the files of the last rule set that compiled, to start with
//!   when the rule files are broken after a reboot;
//! - `q` + sequence: a record that could not be decoded, kept for inspection with
//!   the time it was moved aside ([`super::quarantine::entry`]); the newest
//!   [`QUARANTINE_KEEP`] are kept;
//! - `x:` + id: a dead letter, an event an upstream refused for good, kept for an
//!   operator ([`dead_letters`]); `m:dead_next`: the next dead-letter id.
//!
//! An append is one durable batch: records, next sequence, statistics and rule
//! state together, on stable storage before it returns, because callers acknowledge
//! input to producers on its return. Cursor moves and the trims they allow are not
//! durable on their own: after a crash a sink re-sends a little, with the same ids.
//!
//! `drop_oldest` is counted exactly ([`holds`]): a record a sink has read and is
//! still sending when it is removed to make room is counted dropped only if that
//! sink gives it up, never when it delivers it.

mod dead_letters;
mod holds;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, info};

use super::backend::{prefix_end, Backend, Batch};
use super::{
    overflow, trim_point, Appended, DeadLetter, NewDeadLetter, Read, Record, Replayed, SavedState,
    StateWrite, Stats, Store, StoreConfig, StoreError, Stored, WhenFull,
};

const NEXT: &[u8] = b"m:next";
const EPOCH: &[u8] = b"m:epoch";
const STATS: &[u8] = b"m:stats";
const LEGACY_RULES_STATE: &[u8] = b"m:rules";
const STATE_PREFIX: &[u8] = b"r:";
const CURSOR_PREFIX: &[u8] = b"c:";
const DELIVERIES_PREFIX: &[u8] = b"d:";
const RULE_FILES: &[u8] = b"m:rule_files";
const QUARANTINE_PREFIX: u8 = b'q';
/// Quarantined records kept; older ones go first. Enough to look into what went
/// wrong, never enough to fill the disk.
const QUARANTINE_KEEP: usize = 100;
/// Give disk space back when the store is empty and its files take more than this.
const COMPACT_ABOVE: u64 = 64 * 1024 * 1024;
/// And not more often than this, whatever the size.
const COMPACT_AT_MOST_EVERY: Duration = Duration::from_secs(600);

fn state_key(key: &str) -> Vec<u8> {
    [STATE_PREFIX, key.as_bytes()].concat()
}

fn deliveries_key(source: &str) -> Vec<u8> {
    [DELIVERIES_PREFIX, source.as_bytes()].concat()
}

fn seq_key(prefix: u8, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn event_key(seq: u64) -> [u8; 9] {
    seq_key(b'e', seq)
}

fn seq_of(key: &[u8]) -> Option<u64> {
    key.get(1..9)?.try_into().ok().map(u64::from_be_bytes)
}

fn cursor_key(sink: &str) -> Vec<u8> {
    [CURSOR_PREFIX, sink.as_bytes()].concat()
}

fn u64_of(v: &[u8]) -> Option<u64> {
    v.try_into().ok().map(u64::from_be_bytes)
}

fn encode_stats(s: &Stats) -> Vec<u8> {
    [s.records, s.bytes, s.head]
        .iter()
        .flat_map(|n| n.to_be_bytes())
        .collect()
}

fn decode_stats(v: &[u8], next: u64) -> Option<Stats> {
    let n = |i: usize| u64_of(v.get(i * 8..i * 8 + 8)?);
    Some(Stats {
        records: n(0)?,
        bytes: n(1)?,
        head: n(2)?,
        next,
    })
}

pub struct Ledger {
    backend: Box<dyn Backend>,
    epoch: String,
    when_full: WhenFull,
    max_bytes: u64,
    /// [`COMPACT_ABOVE`], but for tests.
    compact_above: u64,
    /// `store.dead_letters_max` and `dead_letters_max_bytes`.
    dead_max: usize,
    dead_max_bytes: u64,
    state: Mutex<State>,
    /// A copy of `state`'s statistics and cursors, taken at each change, for
    /// [`Store::stats`] and [`Store::cursor`]: those are asked from the async
    /// threads (gauges, a sink's lag), and `state` stays locked through a commit's
    /// fsync, which would stall every task on the runtime for milliseconds.
    shown: Mutex<Shown>,
}

#[derive(Debug, Clone)]
struct Shown {
    stats: Stats,
    cursors: HashMap<String, u64>,
}

/// In-memory bookkeeping mirrored from the backend, guarded by one lock so appends
/// and trims never interleave.
#[derive(Debug)]
struct State {
    stats: Stats,
    cursors: HashMap<String, u64>,
    /// When the files were last rebuilt to give space back.
    compacted_at: Option<Instant>,
    /// Bytes appended since the files' size was last looked at: it costs a stat
    /// and a directory read, too much for every advance that empties the store,
    /// and the files only grow by appending.
    appended_since_size_check: u64,
    /// What each sink has read and not yet settled, for exact `drop_oldest` counts.
    holds: holds::Holds,
    /// The dead letters kept.
    dead: dead_letters::Index,
}

impl Ledger {
    /// Opens the ledger kept in `backend` for the given sinks. Cursors of sinks no
    /// longer configured are removed so they cannot pin records forever; a new sink
    /// starts at the oldest stored record.
    pub fn open(
        backend: Box<dyn Backend>,
        cfg: &StoreConfig,
        sinks: &[String],
    ) -> Result<Self, StoreError> {
        let mut setup = Batch::durable();
        // The keys every store has: if they do not read back, nothing it holds can be
        // trusted, and the store is quarantined whole.
        let epoch = match backend.get(EPOCH)? {
            Some(v) => match String::from_utf8(v) {
                Ok(e) if !e.is_empty() => e,
                _ => return Err(StoreError::Damaged("its epoch is unreadable".into())),
            },
            None => {
                let e = new_epoch();
                setup.put(EPOCH, e.as_bytes());
                e
            }
        };
        let next = match backend.get(NEXT)? {
            Some(v) => u64_of(&v)
                .ok_or_else(|| StoreError::Damaged("its next sequence is unreadable".into()))?,
            None => 0,
        };
        let stats = match backend.get(STATS)?.and_then(|v| decode_stats(&v, next)) {
            Some(s) => s,
            // Written by a release that did not keep statistics: count once.
            None => {
                let s = count_records(backend.as_ref(), next)?;
                setup.put(STATS, encode_stats(&s));
                s
            }
        };

        let mut cursors = HashMap::new();
        let mut stale = Vec::new();
        backend.scan(CURSOR_PREFIX, &prefix_end(CURSOR_PREFIX), &mut |k, v| {
            let name = String::from_utf8_lossy(&k[CURSOR_PREFIX.len()..]).into_owned();
            if sinks.contains(&name) {
                cursors.insert(name, u64_of(v).unwrap_or(stats.head));
            } else {
                stale.push((name, k.to_vec()));
            }
            true
        })?;
        for (name, key) in stale {
            info!(sink = %name, "forgetting the cursor of a sink that is no longer configured");
            setup.delete(key);
        }
        for s in sinks {
            cursors.entry(s.clone()).or_insert(stats.head);
        }
        if !setup.is_empty() {
            backend.commit(setup)?;
        }
        let dead = dead_letters::Index::load(backend.as_ref())?;
        dead_letters::gauge(dead.count());
        info!(
            backend = backend.name(),
            records = stats.records,
            bytes = stats.bytes,
            head = stats.head,
            next = stats.next,
            dead_letters = dead.count(),
            "store opened"
        );
        let ledger = Self {
            backend,
            epoch,
            when_full: cfg.when_full,
            max_bytes: cfg.max_bytes.0,
            compact_above: COMPACT_ABOVE,
            dead_max: cfg.dead_letters_max,
            dead_max_bytes: cfg.dead_letters_max_bytes.0,
            shown: Mutex::new(Shown {
                stats,
                cursors: cursors.clone(),
            }),
            state: Mutex::new(State {
                stats,
                cursors,
                compacted_at: None,
                appended_since_size_check: u64::MAX,
                holds: holds::Holds::default(),
                dead,
            }),
        };
        ledger.trim(&mut ledger.lock(), Batch::lazy())?;
        Ok(ledger)
    }

    /// The same, giving disk space back as soon as an emptied store's files take
    /// more than `compact_above` bytes (tests).
    #[cfg(test)]
    pub fn with_compact_above(mut self, compact_above: u64) -> Self {
        self.compact_above = compact_above;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic while holding it; the state is still the
        // last consistent one we wrote (every mutation happens after its I/O), so
        // carry on rather than take the agent down.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shown(&self) -> std::sync::MutexGuard<'_, Shown> {
        // Only ever holds a finished copy: a poisoned lock still has a whole one.
        self.shown.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `st`'s statistics and cursors to [`Store::stats`] and [`Store::cursor`].
    fn show(&self, st: &State) {
        let mut shown = self.shown();
        shown.stats = st.stats;
        if shown.cursors != st.cursors {
            shown.cursors.clone_from(&st.cursors);
        }
    }

    /// Commits `batch` (a cursor move, or nothing) with the removal of the records
    /// every sink has passed, and gives disk space back if that emptied a store
    /// whose files grew large.
    fn trim(&self, st: &mut State, mut batch: Batch) -> Result<(), StoreError> {
        let to = trim_point(st.cursors.values().copied(), st.stats.head, st.stats.next);
        let mut stats = st.stats;
        self.remove_head(&mut stats, to, u64::MAX, &mut batch)?;
        if !batch.is_empty() {
            self.backend.commit(batch)?;
        }
        st.stats = stats;
        self.show(st);
        if st.stats.records == 0
            && st.appended_since_size_check >= self.compact_above / 4
            && st
                .compacted_at
                .is_none_or(|at| at.elapsed() >= COMPACT_AT_MOST_EVERY)
        {
            st.appended_since_size_check = 0;
            let size_before = self.backend.size_on_disk()?;
            if size_before > self.compact_above {
                st.compacted_at = Some(Instant::now());
                self.backend.reclaim()?;
                let size_after = self.backend.size_on_disk()?;
                info!(
                    size_before,
                    size_after, "store empty: rebuilt its files to give disk space back"
                );
            }
        }
        Ok(())
    }

    /// Adds to `batch` the removal of records from the head up to sequence `to`
    /// (exclusive), stopping early once `enough` bytes are freed, and the new
    /// statistics; updates `stats` to what they are once the batch is committed.
    /// Returns the records removed.
    fn remove_head(
        &self,
        stats: &mut Stats,
        to: u64,
        enough: u64,
        batch: &mut Batch,
    ) -> Result<u64, StoreError> {
        if to <= stats.head {
            return Ok(0);
        }
        let (mut n, mut freed, mut new_head) = (0u64, 0u64, stats.head);
        self.backend
            .scan(&event_key(stats.head), &event_key(to), &mut |k, v| {
                if freed >= enough {
                    return false;
                }
                n += 1;
                freed += v.len() as u64;
                new_head = seq_of(k).map_or(new_head, |s| s + 1);
                true
            })?;
        if freed < enough {
            new_head = to;
        }
        batch.delete_range(event_key(stats.head), event_key(new_head));
        stats.head = new_head.min(stats.next);
        stats.records -= n;
        stats.bytes -= freed;
        if stats.records == 0 {
            stats.head = stats.next;
        }
        batch.put(STATS, encode_stats(stats));
        Ok(n)
    }

    /// Moves records that cannot be decoded out of the event range, so they are
    /// counted and logged once, and no sink reads them again (nor after a restart).
    /// The newest [`QUARANTINE_KEEP`] of them are kept for inspection.
    fn quarantine(
        &self,
        records: Vec<(u64, Vec<u8>, serde_json::Error)>,
    ) -> Result<(), StoreError> {
        let mut st = self.lock();
        let mut stats = st.stats;
        let mut batch = Batch::durable();
        let mut moved = 0;
        for (seq, bytes, error) in records {
            // Another sink may have moved it already.
            if self.backend.get(&event_key(seq))?.is_none() {
                continue;
            }
            error!(seq, bytes = bytes.len(), %error, "a stored record cannot be decoded; quarantined it and moving on");
            stats.records -= 1;
            stats.bytes -= bytes.len() as u64;
            if seq == stats.head {
                stats.head += 1;
            }
            batch.delete(event_key(seq));
            batch.put(
                seq_key(QUARANTINE_PREFIX, seq),
                super::quarantine::entry(chrono::Utc::now(), &bytes),
            );
            moved += 1;
        }
        if stats.records == 0 {
            stats.head = stats.next;
        }
        let (q_from, q_to) = (
            seq_key(QUARANTINE_PREFIX, 0),
            prefix_end(&[QUARANTINE_PREFIX]),
        );
        let mut kept = Vec::new();
        self.backend.scan(&q_from, &q_to, &mut |k, _| {
            kept.push(k.to_vec());
            true
        })?;
        let keep_before_this_batch = QUARANTINE_KEEP.saturating_sub(moved);
        for key in kept.iter().rev().skip(keep_before_this_batch) {
            batch.delete(key.clone());
        }
        batch.put(STATS, encode_stats(&stats));
        self.backend.commit(batch)?;
        st.stats = stats;
        self.show(&st);
        metrics::counter!("ferry_store_dropped_total", "reason" => "corrupt")
            .increment(moved as u64);
        Ok(())
    }
}

fn new_epoch() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}", nanos as u64)
}

/// Statistics by reading every record: for stores written before they were kept.
fn count_records(backend: &dyn Backend, stored_next: u64) -> Result<Stats, StoreError> {
    let mut stats = Stats::default();
    backend.scan(&event_key(0), &prefix_end(b"e"), &mut |k, v| {
        if let Some(seq) = seq_of(k) {
            if stats.records == 0 {
                stats.head = seq;
            }
            stats.records += 1;
            stats.bytes += v.len() as u64;
            stats.next = seq + 1;
        }
        true
    })?;
    stats.next = stats.next.max(stored_next);
    if stats.records == 0 {
        stats.head = stats.next;
    }
    Ok(stats)
}

impl Store for Ledger {
    fn append(&self, records: &[Record], state: &StateWrite) -> Result<Appended, StoreError> {
        let mut st = self.lock();
        let encoded: Vec<Vec<u8>> = records
            .iter()
            .map(|r| serde_json::to_vec(r).map_err(|e| StoreError::Backend(e.to_string())))
            .collect::<Result<_, _>>()?;
        let incoming: u64 = encoded.iter().map(|e| e.len() as u64).sum();
        let sizes: Vec<usize> = encoded.iter().map(Vec::len).collect();

        // Work on a copy: `st` changes only once the batch is committed.
        let mut stats = st.stats;
        let mut batch = Batch::durable();
        let mut dropped = 0;
        let mut removed = Vec::new();
        let excess = overflow(st.stats.bytes, incoming, self.max_bytes);
        if excess > 0 {
            // Even an empty store has no room for it: refuse it whole, rather than
            // wipe what the sinks still need and break the bound anyway, or hold
            // input for a room that never comes.
            if incoming > self.max_bytes {
                return Err(StoreError::TooLarge {
                    bytes: incoming,
                    max: self.max_bytes,
                });
            }
            match self.when_full {
                WhenFull::RejectNew => {
                    return Err(StoreError::Full {
                        used: st.stats.bytes,
                        max: self.max_bytes,
                    })
                }
                WhenFull::DropOldest => {
                    let (next, head) = (stats.next, stats.head);
                    dropped = self.remove_head(&mut stats, next, excess, &mut batch)?;
                    removed = self.needers(&st, head, stats.head)?;
                }
            }
        }

        let first = stats.next;
        for (i, bytes) in encoded.into_iter().enumerate() {
            batch.put(event_key(first + i as u64), bytes);
        }
        let next = first + records.len() as u64;
        if stats.records == 0 {
            stats.head = first;
        }
        stats.records += records.len() as u64;
        stats.bytes += incoming;
        stats.next = next;
        batch.put(NEXT, next.to_be_bytes());
        batch.put(STATS, encode_stats(&stats));
        if state.replace_all {
            batch.delete(LEGACY_RULES_STATE);
            batch.delete_range(STATE_PREFIX, prefix_end(STATE_PREFIX));
        }
        for (key, value) in &state.entries {
            match value {
                Some(v) => batch.put(state_key(key), v.as_slice()),
                None => batch.delete(state_key(key)),
            }
        }
        for (source, window) in &state.deliveries {
            batch.put(deliveries_key(source), window.as_slice());
        }
        // Producers are acknowledged when this returns: the batch is durable.
        self.backend.commit(batch)?;

        st.stats = stats;
        self.show(&st);
        st.appended_since_size_check = st.appended_since_size_check.saturating_add(incoming);
        count_store_full(removed.into_iter().fold(0, |n, (seq, needers)| {
            n + u64::from(st.holds.removed(seq, needers))
        }));
        Ok(Appended {
            first,
            dropped,
            sizes,
        })
    }

    fn read(&self, from: u64, max: usize, max_bytes: usize) -> Result<Read, StoreError> {
        let mut out = Read {
            records: Vec::with_capacity(max.min(1024)),
            next: from,
        };
        let mut bytes = 0;
        let mut unreadable = Vec::new();
        self.backend
            .scan(&event_key(from), &prefix_end(b"e"), &mut |k, v| {
                if out.records.len() >= max || bytes >= max_bytes {
                    return false;
                }
                let Some(seq) = seq_of(k) else { return true };
                out.next = seq + 1;
                match serde_json::from_slice(v) {
                    Ok(record) => {
                        bytes += v.len();
                        out.records.push(Stored {
                            seq,
                            record,
                            bytes: v.len(),
                        })
                    }
                    Err(error) => unreadable.push((seq, v.to_vec(), error)),
                }
                true
            })?;
        if !unreadable.is_empty() {
            self.quarantine(unreadable)?;
        }
        Ok(out)
    }

    fn save_rule_files(&self, files: &[u8]) -> Result<(), StoreError> {
        let mut batch = Batch::durable();
        batch.put(RULE_FILES, files);
        self.backend.commit(batch)
    }

    fn rule_files(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.backend.get(RULE_FILES)
    }

    fn rules_state(&self) -> Result<SavedState, StoreError> {
        let legacy = self.backend.get(LEGACY_RULES_STATE)?;
        let mut entries = Vec::new();
        self.backend
            .scan(STATE_PREFIX, &prefix_end(STATE_PREFIX), &mut |k, v| {
                let key = String::from_utf8_lossy(&k[STATE_PREFIX.len()..]).into_owned();
                entries.push((key, v.to_vec()));
                true
            })?;
        Ok(SavedState { legacy, entries })
    }

    fn delivery_window(&self, source: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.backend.get(&deliveries_key(source))
    }

    fn cursor(&self, sink: &str) -> Result<u64, StoreError> {
        // A sink behind the head (records dropped to make room) needs nothing
        // before it.
        let shown = self.shown();
        let cursor = shown.cursors.get(sink).copied().unwrap_or(shown.stats.head);
        Ok(cursor.max(shown.stats.head))
    }

    fn advance(&self, sink: &str, to: u64) -> Result<(), StoreError> {
        let mut st = self.lock();
        let mut batch = Batch::lazy();
        batch.put(cursor_key(sink), to.to_be_bytes());
        st.cursors.insert(sink.to_string(), to);
        st.holds.advance(sink, to);
        let trimmed = self.trim(&mut st, batch);
        self.show(&st);
        trimmed
    }

    fn stats(&self) -> Stats {
        self.shown().stats
    }

    fn epoch(&self) -> &str {
        &self.epoch
    }

    fn read_for(
        &self,
        sink: &str,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Read, StoreError> {
        let mut read = self.read(from, max, max_bytes)?;
        let mut st = self.lock();
        // Removed to make room after the scan, while the sink held nothing: they
        // were counted dropped then, so the sink must not send them.
        let head = st.stats.head;
        read.records.retain(|r| r.seq >= head);
        let lost = st.holds.read(sink, from, read.next);
        drop(st);
        count_store_full(lost);
        Ok(read)
    }

    fn take_handed(&self, sink: &str, from: u64, to: u64) -> Option<u64> {
        let mut st = match self.state.try_lock() {
            Ok(st) => st,
            Err(std::sync::TryLockError::WouldBlock) => return None,
            // As `lock`: the state is the last consistent one.
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        let head = st.stats.head;
        let lost = st.holds.read(sink, from, to);
        drop(st);
        count_store_full(lost);
        Some(head)
    }

    fn add_dead_letters(&self, letters: Vec<NewDeadLetter>) -> Result<(), StoreError> {
        self.add_dead(letters)
    }

    fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.list_dead()
    }

    fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, StoreError> {
        self.get_dead(id)
    }

    fn replay_dead_letters(&self, ids: Option<&[u64]>) -> Result<Replayed, StoreError> {
        self.replay_dead(ids)
    }

    fn purge_dead_letters(&self, ids: Option<&[u64]>) -> Result<u64, StoreError> {
        self.purge_dead(ids)
    }

    fn dead_letter_count(&self) -> u64 {
        self.dead_count()
    }
}

/// Counts records `drop_oldest` removed before a sink that needed them had them.
fn count_store_full(n: u64) {
    if n > 0 {
        metrics::counter!("ferry_store_dropped_total", "reason" => "store_full").increment(n);
    }
}

/// Only the record's target list, read without the rest of it.
#[derive(serde::Deserialize)]
struct Targets {
    #[serde(default)]
    to: Option<Vec<String>>,
}

impl Ledger {
    /// For each record in `from..to` (about to be removed to make room), the
    /// sinks it was for that had not moved past it.
    fn needers(
        &self,
        st: &State,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Vec<String>)>, StoreError> {
        let mut out = Vec::new();
        if to <= from {
            return Ok(out);
        }
        self.backend
            .scan(&event_key(from), &event_key(to), &mut |k, v| {
                let Some(seq) = seq_of(k) else { return true };
                // A record whose targets cannot be read counts as for every sink.
                let to = serde_json::from_slice::<Targets>(v).ok().and_then(|t| t.to);
                let needers = st
                    .cursors
                    .iter()
                    .filter(|(sink, cursor)| {
                        **cursor <= seq && to.as_ref().is_none_or(|to| to.contains(sink))
                    })
                    .map(|(sink, _)| sink.clone())
                    .collect();
                out.push((seq, needers));
                true
            })?;
        Ok(out)
    }

    /// Records counted dropped (`store_full`) so far (tests).
    #[cfg(test)]
    pub fn counted_store_full(&self) -> u64 {
        self.lock().holds.counted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Bytes;
    use crate::store::BackendKind;
    use chrono::Utc;
    use std::path::Path;

    fn record(i: u64, pad: usize) -> Record {
        Record::test_reading(i, pad)
    }

    fn cfg(kind: BackendKind, max: u64, when_full: WhenFull) -> StoreConfig {
        StoreConfig {
            backend: kind,
            max_bytes: Bytes(max),
            when_full,
            cache_capacity: Bytes(1 << 20),
            ..StoreConfig::default()
        }
    }

    /// A backend whose commits wait, while it is held, as a commit waits for a
    /// slow disk's fsync.
    struct Held {
        inner: Box<dyn Backend>,
        /// (held, a commit is waiting)
        gate: std::sync::Arc<(std::sync::Mutex<(bool, bool)>, std::sync::Condvar)>,
    }

    impl Backend for Held {
        fn name(&self) -> &'static str {
            self.inner.name()
        }
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(key)
        }
        fn scan(
            &self,
            from: &[u8],
            to: &[u8],
            visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
        ) -> Result<(), StoreError> {
            self.inner.scan(from, to, visit)
        }
        fn commit(&self, batch: Batch) -> Result<(), StoreError> {
            let (lock, changed) = &*self.gate;
            let mut g = lock.lock().unwrap();
            g.1 = true;
            changed.notify_all();
            while g.0 {
                g = changed.wait(g).unwrap();
            }
            g.1 = false;
            drop(g);
            self.inner.commit(batch)
        }
        fn size_on_disk(&self) -> Result<u64, StoreError> {
            self.inner.size_on_disk()
        }
    }

    #[test]
    fn statistics_cursors_and_handoffs_are_answered_while_a_commit_waits_for_the_disk() {
        use std::sync::Arc;
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new((
            std::sync::Mutex::new((false, false)),
            std::sync::Condvar::new(),
        ));
        let backend = Held {
            inner: Box::new(crate::store::redb::RedbBackend::open(dir.path(), 1 << 20).unwrap()),
            gate: Arc::clone(&gate),
        };
        let c = cfg(BackendKind::Redb, 1 << 30, WhenFull::DropOldest);
        let ledger = Arc::new(Ledger::open(Box::new(backend), &c, &sinks(&["a"])).unwrap());
        let (lock, changed) = &*gate;
        lock.lock().unwrap().0 = true;
        let appending = {
            let l = Arc::clone(&ledger);
            std::thread::spawn(move || l.append(&[record(0, 0)], &StateWrite::default()))
        };
        let mut g = lock.lock().unwrap();
        while !g.1 {
            g = changed.wait(g).unwrap();
        }
        drop(g);

        // The append is inside its commit, holding the ledger's lock: gauges, a
        // sink's lag and a handed batch, asked from the async threads, must not
        // wait for the disk (a handed batch is read from the store instead).
        let (tx, rx) = std::sync::mpsc::channel();
        let l = Arc::clone(&ledger);
        std::thread::spawn(move || {
            let handed = l.take_handed("a", 0, 1);
            let _ = tx.send((l.stats().next, l.cursor("a").unwrap(), handed));
        });
        let answered = rx.recv_timeout(Duration::from_secs(10));
        lock.lock().unwrap().0 = false;
        changed.notify_all();
        appending.join().unwrap().unwrap();
        assert_eq!(
            answered,
            Ok((0, 0, None)),
            "answered before the commit, with what was committed before it"
        );
        assert_eq!(
            ledger.stats().next,
            1,
            "and the commit shows once it is done"
        );
    }

    fn open(dir: &Path, c: &StoreConfig, names: &[&str]) -> Ledger {
        crate::store::open(dir, c, &sinks(names)).unwrap().ledger
    }

    /// Each test runs on every backend: `store::ledger::tests::redb::…` and
    /// `…::sled::…`.
    macro_rules! on_every_backend {
        ($($name:ident),* $(,)?) => {
            mod redb {
                $(#[test] fn $name() { super::$name(super::BackendKind::Redb) })*
            }
            mod sled {
                $(#[test] fn $name() { super::$name(super::BackendKind::Sled) })*
            }
        };
    }

    on_every_backend!(
        appended_records_read_back_in_order_with_consecutive_sequences,
        records_stay_until_every_sink_has_passed_them,
        everything_survives_a_reopen_including_cursors_and_sequence,
        a_full_store_drops_the_oldest_and_counts_them,
        a_full_store_rejects_new_records_when_so_configured,
        rule_state_entries_commit_with_their_batch_and_survive_a_reopen,
        a_full_rewrite_removes_every_entry_and_the_legacy_state_first,
        bytes_written_for_one_changed_entry_do_not_grow_with_the_entries_kept,
        a_removed_sink_no_longer_holds_records,
        a_read_stops_at_its_byte_budget_but_always_returns_one_record,
        an_undecodable_record_is_quarantined_once_and_read_past,
        an_emptied_store_gives_its_disk_space_back_and_keeps_ids_cursors_and_rule_state,
        a_batch_larger_than_the_whole_store_is_refused_and_leaves_the_store_as_it_was,
        statistics_are_kept_so_an_open_need_not_read_the_backlog,
        a_record_a_sink_is_sending_when_drop_oldest_removes_it_is_counted_only_if_never_delivered,
        a_dead_letter_is_kept_once_per_sink_and_record_and_survives_a_reopen,
        dead_letters_over_their_bound_make_room_by_dropping_the_oldest,
        a_replayed_dead_letter_is_stored_again_for_its_sink_only_with_its_first_id,
        purge_removes_one_dead_letter_or_all_and_ids_are_never_reused,
        a_delivery_window_commits_with_its_batch_replaces_the_last_and_survives_a_reopen,
        a_refused_batch_leaves_the_delivery_window_as_it_was,
    );

    fn sinks(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// A store with room to spare and one sink, `a`.
    fn roomy(kind: BackendKind, dir: &Path) -> Ledger {
        open(dir, &cfg(kind, 1 << 30, WhenFull::DropOldest), &["a"])
    }

    fn put_raw(s: &Ledger, key: &[u8], value: &[u8]) {
        let mut batch = Batch::durable();
        batch.put(key, value);
        s.backend.commit(batch).unwrap();
    }

    fn appended_records_read_back_in_order_with_consecutive_sequences(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let s = roomy(kind, dir.path());
        s.append(&[record(0, 0), record(1, 0)], &StateWrite::default())
            .unwrap();
        let a = s.append(&[record(2, 0)], &StateWrite::default()).unwrap();
        assert_eq!(a.first, 2);
        let got = s.read(0, 10, usize::MAX).unwrap().records;
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(
            got[2].record,
            record(2, 0).clone_with_time(got[2].record.time)
        );
    }

    fn records_stay_until_every_sink_has_passed_them(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(
            dir.path(),
            &cfg(kind, 1 << 30, WhenFull::DropOldest),
            &["a", "b"],
        );
        s.append(
            &[record(0, 0), record(1, 0), record(2, 0)],
            &StateWrite::default(),
        )
        .unwrap();
        s.advance("a", 3).unwrap();
        assert_eq!(s.stats().records, 3);
        s.advance("b", 2).unwrap();
        assert_eq!(s.stats().records, 1);
        assert_eq!(s.read(0, 10, usize::MAX).unwrap().records[0].seq, 2);
    }

    fn everything_survives_a_reopen_including_cursors_and_sequence(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(kind, 1 << 30, WhenFull::DropOldest);
        let epoch;
        {
            let s = open(dir.path(), &c, &["a"]);
            s.append(
                &[record(0, 0), record(1, 0), record(2, 0)],
                &StateWrite::default(),
            )
            .unwrap();
            s.advance("a", 3).unwrap();
            epoch = s.epoch().to_string();
        }
        let s = open(dir.path(), &c, &["a"]);
        assert_eq!(s.epoch(), epoch);
        assert_eq!(s.cursor("a").unwrap(), 3);
        assert_eq!(s.stats().records, 0);
        // Sequences are never reused, so ids stay unique after the store empties.
        assert_eq!(
            s.append(&[record(3, 0)], &StateWrite::default())
                .unwrap()
                .first,
            3
        );
    }

    fn a_full_store_drops_the_oldest_and_counts_them(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), &cfg(kind, 10_000, WhenFull::DropOldest), &["a"]);
        let mut dropped = 0;
        for i in 0..30 {
            dropped += s
                .append(&[record(i, 1000)], &StateWrite::default())
                .unwrap()
                .dropped;
        }
        let st = s.stats();
        assert!(st.bytes <= 10_000, "{st:?}");
        assert_eq!(st.records + dropped, 30);
        assert_eq!(s.read(0, 100, usize::MAX).unwrap().records[0].seq, st.head);
        assert_eq!(
            s.read(0, 100, usize::MAX)
                .unwrap()
                .records
                .last()
                .unwrap()
                .seq,
            29
        );
    }

    fn a_full_store_rejects_new_records_when_so_configured(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), &cfg(kind, 5_000, WhenFull::RejectNew), &["a"]);
        let mut accepted = 0;
        for i in 0..10 {
            match s.append(&[record(i, 1000)], &StateWrite::default()) {
                Ok(_) => accepted += 1,
                Err(StoreError::Full { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!((3..10).contains(&accepted), "{accepted}");
        // Once the sink catches up there is room again.
        s.advance("a", accepted).unwrap();
        s.append(&[record(99, 1000)], &StateWrite::default())
            .unwrap();
    }

    fn put(entries: &[(&str, Option<&str>)]) -> StateWrite {
        StateWrite {
            replace_all: false,
            entries: entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(|v| v.as_bytes().to_vec())))
                .collect(),
            deliveries: Vec::new(),
        }
    }

    fn windows(windows: &[(&str, &[u8])]) -> StateWrite {
        StateWrite {
            deliveries: windows
                .iter()
                .map(|(source, w)| (source.to_string(), w.to_vec()))
                .collect(),
            ..StateWrite::default()
        }
    }

    fn a_delivery_window_commits_with_its_batch_replaces_the_last_and_survives_a_reopen(
        kind: BackendKind,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(kind, 1 << 30, WhenFull::DropOldest);
        {
            let s = open(dir.path(), &c, &["a"]);
            assert_eq!(s.delivery_window("local").unwrap(), None);
            s.append(
                &[record(0, 0)],
                &windows(&[("local", b"one"), ("plant", b"p")]),
            )
            .unwrap();
            s.append(&[record(1, 0)], &windows(&[("local", b"two")]))
                .unwrap();
            // A batch that acknowledges no delivery leaves the windows alone.
            s.append(&[record(2, 0)], &StateWrite::default()).unwrap();
        }
        let s = open(dir.path(), &c, &["a"]);
        assert_eq!(
            s.delivery_window("local").unwrap().as_deref(),
            Some(&b"two"[..])
        );
        assert_eq!(
            s.delivery_window("plant").unwrap().as_deref(),
            Some(&b"p"[..])
        );
        assert_eq!(s.stats().records, 3);
    }

    fn a_refused_batch_leaves_the_delivery_window_as_it_was(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), &cfg(kind, 10_000, WhenFull::RejectNew), &["a"]);
        s.append(&[record(0, 1000)], &windows(&[("local", b"kept")]))
            .unwrap();
        let huge: Vec<Record> = (1..14).map(|i| record(i, 1000)).collect();
        assert!(matches!(
            s.append(&huge, &windows(&[("local", b"never")])),
            Err(StoreError::TooLarge { .. })
        ));
        let mut full = Ok(());
        for i in 1..20 {
            if let Err(e) = s.append(&[record(i, 1000)], &windows(&[("local", b"never")])) {
                full = Err(e);
                break;
            }
            s.append(&[], &windows(&[("local", b"kept")])).unwrap();
        }
        assert!(matches!(full, Err(StoreError::Full { .. })), "{full:?}");
        assert_eq!(
            s.delivery_window("local").unwrap().as_deref(),
            Some(&b"kept"[..])
        );
    }

    fn saved(s: &Ledger) -> Vec<(String, String)> {
        s.rules_state()
            .unwrap()
            .entries
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v).unwrap()))
            .collect()
    }

    fn rule_state_entries_commit_with_their_batch_and_survive_a_reopen(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(kind, 1 << 30, WhenFull::DropOldest);
        {
            let s = open(dir.path(), &c, &["a"]);
            assert_eq!(s.rules_state().unwrap(), SavedState::default());
            s.append(&[record(0, 0)], &put(&[("a", Some("1")), ("b", Some("2"))]))
                .unwrap();
            s.append(&[record(1, 0)], &put(&[("a", None), ("c", Some("3"))]))
                .unwrap();
            s.append(&[record(2, 0)], &StateWrite::default()).unwrap();
        }
        let s = open(dir.path(), &c, &["a"]);
        assert_eq!(
            saved(&s),
            [
                ("b".to_string(), "2".to_string()),
                ("c".to_string(), "3".to_string())
            ]
        );
    }

    fn a_full_rewrite_removes_every_entry_and_the_legacy_state_first(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let s = roomy(kind, dir.path());
        put_raw(&s, LEGACY_RULES_STATE, b"{}");
        s.append(&[], &put(&[("old", Some("1")), ("kept", Some("1"))]))
            .unwrap();
        assert_eq!(
            s.rules_state().unwrap().legacy.as_deref(),
            Some(b"{}".as_slice())
        );
        let mut rewrite = put(&[("kept", Some("2"))]);
        rewrite.replace_all = true;
        s.append(&[], &rewrite).unwrap();
        let state = s.rules_state().unwrap();
        assert_eq!(state.legacy, None);
        assert_eq!(saved(&s), [("kept".to_string(), "2".to_string())]);
    }

    fn bytes_written_for_one_changed_entry_do_not_grow_with_the_entries_kept(kind: BackendKind) {
        // The write amplification that wore out flash: every commit rewrote every
        // open alert. Now a commit writes only its own entries, measured as the
        // growth of the store's files for the same single-entry commits.
        let dir = tempfile::tempdir().unwrap();
        let s = roomy(kind, dir.path());
        let many: Vec<(String, Option<Vec<u8>>)> = (0..10_000)
            .map(|i| (format!("open-{i}"), Some(vec![b'x'; 100])))
            .collect();
        s.append(
            &[],
            &StateWrite {
                entries: many,
                ..StateWrite::default()
            },
        )
        .unwrap();
        let size = || s.backend.size_on_disk().unwrap();
        let before = size();
        for i in 0..50 {
            s.append(&[record(i, 10)], &put(&[("changed", Some("y"))]))
                .unwrap();
        }
        let grown = size() - before;
        // 10,000 entries of 100 bytes are 1 MB; 50 rewrites of them would be 50 MB.
        // (redb's file grows by whole regions and keeps the pages of the last
        // commits until they may be reused, so allow it a few MB.)
        assert!(grown < 5_000_000, "{grown} bytes for 50 small commits");
    }

    fn a_removed_sink_no_longer_holds_records(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(kind, 1 << 30, WhenFull::DropOldest);
        {
            let s = open(dir.path(), &c, &["a", "old"]);
            s.append(&[record(0, 0), record(1, 0)], &StateWrite::default())
                .unwrap();
            s.advance("a", 2).unwrap();
            assert_eq!(s.stats().records, 2);
        }
        let s = open(dir.path(), &c, &["a"]);
        assert_eq!(s.stats().records, 0);
    }

    fn a_read_stops_at_its_byte_budget_but_always_returns_one_record(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let s = roomy(kind, dir.path());
        s.append(
            &[record(0, 1000), record(1, 1000), record(2, 1000)],
            &StateWrite::default(),
        )
        .unwrap();
        let one = s.read(0, 10, 10).unwrap();
        assert_eq!(
            one.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![0]
        );
        assert_eq!(one.next, 1);
        let two = s.read(0, 10, 1500).unwrap();
        assert_eq!(two.records.len(), 2);
        assert_eq!(two.next, 2);
    }

    fn an_undecodable_record_is_quarantined_once_and_read_past(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(kind, 1 << 30, WhenFull::DropOldest);
        let s = open(dir.path(), &c, &["a", "b"]);
        s.append(
            &[record(0, 0), record(1, 0), record(2, 0)],
            &StateWrite::default(),
        )
        .unwrap();
        // A record that no longer decodes (a bit flip, or an older bug's output).
        put_raw(&s, &event_key(1), b"{not json");
        let before = s.stats().bytes;

        let first = s.read(0, 10, usize::MAX).unwrap();
        assert_eq!(
            first.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(first.next, 3);
        // Gone from the event range for every sink: read once, counted once.
        let again = s.read(0, 10, usize::MAX).unwrap();
        assert_eq!(
            again.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(s.stats().records, 2);
        assert!(s.stats().bytes < before);
        let kept = s.backend.get(&seq_key(QUARANTINE_PREFIX, 1)).unwrap();
        let (at, bytes) = super::super::quarantine::read_entry(&kept.unwrap()).unwrap();
        assert_eq!(bytes, b"{not json");
        assert!(at.parse::<chrono::DateTime<Utc>>().is_ok(), "{at}");

        // A read that meets only undecodable records still moves past them.
        put_raw(&s, &event_key(2), b"\xff");
        let only_bad = s.read(2, 10, usize::MAX).unwrap();
        assert!(only_bad.records.is_empty());
        assert_eq!(only_bad.next, 3);
        drop(s);
        let reopened = open(dir.path(), &c, &["a", "b"]);
        assert_eq!(reopened.stats().records, 1);
    }

    /// Bytes under `dir`. sled's background thread may remove a file between
    /// the listing and its `stat`; a file gone by then uses no space.
    fn disk_use(dir: &Path) -> u64 {
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if gone(&e) => return 0,
            Err(e) => panic!("listing {}: {e}", dir.display()),
        };
        let mut total = 0;
        for e in entries {
            let e = e.unwrap();
            let m = match e.metadata() {
                Ok(m) => m,
                Err(err) if gone(&err) => continue,
                Err(err) => panic!("stat {}: {err}", e.path().display()),
            };
            total += if m.is_dir() {
                disk_use(&e.path())
            } else {
                m.len()
            };
        }
        total
    }

    fn an_emptied_store_gives_its_disk_space_back_and_keeps_ids_cursors_and_rule_state(
        kind: BackendKind,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(kind, 1 << 30, WhenFull::DropOldest);
        let mut s = open(dir.path(), &c, &["a"]);
        s.compact_above = 4 * 1024 * 1024;
        let epoch = s.epoch().to_string();
        s.append(&[], &put(&[("open-alert", Some("1"))])).unwrap();
        for i in 0..40 {
            let batch: Vec<Record> = (0..10).map(|j| record(i * 10 + j, 50_000)).collect();
            s.append(&batch, &StateWrite::default()).unwrap();
        }
        let full = disk_use(dir.path());
        assert!(full > 20_000_000, "{full}");

        s.advance("a", 400).unwrap();
        let emptied = disk_use(dir.path());
        assert!(emptied < full / 4, "{emptied} bytes left of {full}");
        // Still a working store: the next record gets the next sequence.
        assert_eq!(
            s.append(&[record(400, 0)], &StateWrite::default())
                .unwrap()
                .first,
            400
        );
        drop(s);

        let s = open(dir.path(), &c, &["a"]);
        assert_eq!(s.epoch(), epoch);
        assert_eq!(s.cursor("a").unwrap(), 400);
        assert_eq!(s.read(0, 10, usize::MAX).unwrap().records[0].seq, 400);
        assert_eq!(saved(&s), [("open-alert".to_string(), "1".to_string())]);
    }

    fn a_batch_larger_than_the_whole_store_is_refused_and_leaves_the_store_as_it_was(
        kind: BackendKind,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), &cfg(kind, 10_000, WhenFull::DropOldest), &["a"]);
        s.append(&[record(0, 1000), record(1, 1000)], &StateWrite::default())
            .unwrap();
        let before = s.stats();

        let huge: Vec<Record> = (2..14).map(|i| record(i, 1000)).collect();
        match s.append(&huge, &StateWrite::default()) {
            Err(StoreError::TooLarge { bytes, max }) => {
                assert!(bytes > 10_000, "{bytes}");
                assert_eq!(max, 10_000);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(s.stats(), before, "nothing was dropped or stored");
        let kept: Vec<u64> = s
            .read(0, 100, usize::MAX)
            .unwrap()
            .records
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(kept, vec![0, 1]);
        // A batch that fits still goes in, after the refused one, with the next sequence.
        assert_eq!(
            s.append(&[record(2, 1000)], &StateWrite::default())
                .unwrap()
                .first,
            2
        );
    }

    fn statistics_are_kept_so_an_open_need_not_read_the_backlog(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(kind, 1 << 30, WhenFull::DropOldest);
        let before = {
            let s = open(dir.path(), &c, &["a"]);
            s.append(
                &[record(0, 10), record(1, 20), record(2, 30)],
                &StateWrite::default(),
            )
            .unwrap();
            s.advance("a", 1).unwrap();
            s.stats()
        };
        {
            // Take a record away behind the ledger's back: an open that counted
            // the records would notice.
            let s = open(dir.path(), &c, &["a"]);
            let mut batch = Batch::durable();
            batch.delete(event_key(2));
            s.backend.commit(batch).unwrap();
        }
        let s = open(dir.path(), &c, &["a"]);
        assert_eq!(s.stats(), before);
        assert_eq!((before.records, before.head, before.next), (2, 1, 3));
    }

    fn a_record_a_sink_is_sending_when_drop_oldest_removes_it_is_counted_only_if_never_delivered(
        kind: BackendKind,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), &cfg(kind, 10_000, WhenFull::DropOldest), &["a"]);
        s.append(&[record(0, 1000)], &StateWrite::default())
            .unwrap();
        // The sink reads record 0 and is sending it (an outage: it retries).
        let held = s.read_for("a", 0, 1, usize::MAX).unwrap();
        assert_eq!(held.records.len(), 1);
        let mut removed = 0;
        for i in 1..30 {
            removed += s
                .append(&[record(i, 1000)], &StateWrite::default())
                .unwrap()
                .dropped;
        }
        assert!(removed > 1, "the store never filled");
        // Record 0 went with the others, but the sink still has it: not counted.
        assert_eq!(s.counted_store_full(), removed - 1);
        // The upstream takes it: delivered, and never counted.
        s.advance("a", held.next).unwrap();
        let rest = s
            .read_for("a", s.cursor("a").unwrap(), 100, usize::MAX)
            .unwrap();
        assert_eq!(s.counted_store_full(), removed - 1);
        // Every record is delivered (0), counted, or still stored: once each.
        assert_eq!(1 + s.counted_store_full() + rest.records.len() as u64, 30);

        // A sink that gives up a record it held (a restart: it reads again from
        // its cursor) has it counted then.
        let head = s.cursor("a").unwrap();
        s.read_for("a", head, 1, usize::MAX).unwrap();
        let before = s.counted_store_full();
        for i in 30..45 {
            s.append(&[record(i, 1000)], &StateWrite::default())
                .unwrap();
        }
        let newly = s.counted_store_full() - before;
        s.read_for("a", s.cursor("a").unwrap(), 100, usize::MAX)
            .unwrap();
        assert_eq!(s.counted_store_full() - before, newly + 1);
    }

    fn dead(sink: &str, seq: u64, pad: usize) -> NewDeadLetter {
        NewDeadLetter {
            sink: sink.into(),
            seq,
            record: record(seq, pad),
            reason: "HTTP 422".into(),
        }
    }

    fn dead_ids(s: &Ledger) -> Vec<u64> {
        s.dead_letters().unwrap().iter().map(|d| d.id).collect()
    }

    fn a_dead_letter_is_kept_once_per_sink_and_record_and_survives_a_reopen(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(kind, 1 << 30, WhenFull::DropOldest);
        let epoch;
        {
            let s = open(dir.path(), &c, &["a", "b"]);
            epoch = s.epoch().to_string();
            s.add_dead_letters(vec![dead("a", 4, 10), dead("b", 4, 10)])
                .unwrap();
            // The same refusal again (resent after a crash before the cursor moved).
            s.add_dead_letters(vec![dead("a", 4, 10)]).unwrap();
            assert_eq!(s.dead_letter_count(), 2);
        }
        let s = open(dir.path(), &c, &["a", "b"]);
        let kept = s.dead_letters().unwrap();
        assert_eq!(kept.len(), 2);
        assert_eq!((kept[0].id, kept[0].sink.as_str()), (0, "a"));
        assert_eq!(kept[0].origin.event_id(), format!("{epoch}-4"));
        assert_eq!(kept[0].reason, "HTTP 422");
        assert_eq!(kept[0].record.subject, "d4");
        assert_eq!(s.dead_letter(1).unwrap().unwrap().sink, "b");
        assert_eq!(s.dead_letter(9).unwrap(), None);
    }

    fn dead_letters_over_their_bound_make_room_by_dropping_the_oldest(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(kind, 1 << 30, WhenFull::DropOldest);
        c.dead_letters_max = 3;
        c.dead_letters_max_bytes = Bytes(4_000);
        let s = open(dir.path(), &c, &["a"]);
        for seq in 0..5 {
            s.add_dead_letters(vec![dead("a", seq, 10)]).unwrap();
        }
        assert_eq!(dead_ids(&s), [2, 3, 4], "the count bound keeps the newest");
        s.add_dead_letters(vec![dead("a", 5, 3_300)]).unwrap();
        assert_eq!(dead_ids(&s), [4, 5], "the byte bound keeps the newest");
        // One larger than the whole area is not kept, and takes nothing with it.
        s.add_dead_letters(vec![dead("a", 6, 5_000)]).unwrap();
        assert_eq!(dead_ids(&s), [4, 5]);
    }

    fn a_replayed_dead_letter_is_stored_again_for_its_sink_only_with_its_first_id(
        kind: BackendKind,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(kind, 1 << 30, WhenFull::DropOldest);
        let s = open(dir.path(), &c, &["a", "b"]);
        s.append(&[record(0, 0), record(1, 0)], &StateWrite::default())
            .unwrap();
        let refused = s.read(1, 1, usize::MAX).unwrap().records.remove(0);
        s.add_dead_letters(vec![NewDeadLetter {
            sink: "b".into(),
            seq: 1,
            record: refused.record.clone(),
            reason: "too_large".into(),
        }])
        .unwrap();
        s.advance("a", 2).unwrap();
        s.advance("b", 2).unwrap();
        let r = s.replay_dead_letters(None).unwrap();
        assert_eq!(r.replayed, [(0, 2)]);
        assert_eq!(s.dead_letter_count(), 0);
        let again = s.read(2, 10, usize::MAX).unwrap().records;
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].record.to, Some(vec!["b".to_string()]));
        let origin = again[0].record.origin.clone().unwrap();
        assert_eq!((origin.epoch.as_str(), origin.seq), (s.epoch(), 1));
        assert_eq!(again[0].record.data, refused.record.data);
        // Refused again: kept again, with the id it was first sent with.
        s.add_dead_letters(vec![NewDeadLetter {
            sink: "b".into(),
            seq: 2,
            record: again[0].record.clone(),
            reason: "HTTP 400".into(),
        }])
        .unwrap();
        assert_eq!(s.dead_letter(1).unwrap().unwrap().origin, origin);
        // A dead letter whose sink is gone stays; a missing one is reported.
        drop(s);
        let s = open(dir.path(), &c, &["a"]);
        let r = s.replay_dead_letters(Some(&[1, 7])).unwrap();
        assert_eq!((r.unknown_sink, r.missing), (vec![1], vec![7]));
        assert_eq!(s.dead_letter_count(), 1);
    }

    fn purge_removes_one_dead_letter_or_all_and_ids_are_never_reused(kind: BackendKind) {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(kind, 1 << 30, WhenFull::DropOldest);
        {
            let s = open(dir.path(), &c, &["a"]);
            s.add_dead_letters(vec![dead("a", 0, 0), dead("a", 1, 0), dead("a", 2, 0)])
                .unwrap();
            assert_eq!(s.purge_dead_letters(Some(&[1, 9])).unwrap(), 1);
            assert_eq!(dead_ids(&s), [0, 2]);
            assert_eq!(s.purge_dead_letters(None).unwrap(), 2);
            assert_eq!(s.dead_letter_count(), 0);
        }
        let s = open(dir.path(), &c, &["a"]);
        s.add_dead_letters(vec![dead("a", 3, 0)]).unwrap();
        assert_eq!(dead_ids(&s), [3]);
    }

    impl Record {
        fn clone_with_time(mut self, t: chrono::DateTime<Utc>) -> Self {
            self.time = t;
            self
        }
    }
}
