//! The sled backend of the [`Store`].
//!
//! One sled tree holds everything, so a batch of records and the next sequence number
//! commit atomically in one `apply_batch`:
//! - `e` + sequence (big-endian u64): a record, as JSON;
//! - `m:next`: the next sequence; `m:epoch`: the store's epoch; `m:rules`: the rule
//!   engine's alert state, committed with the batch that changed it;
//! - `c:` + sink name: that sink's cursor.
//!
//! sled flushes in the background every 500 ms; an append calls `flush` itself before
//! returning, because callers acknowledge input to producers on its return. Cursor
//! moves are not flushed: after a crash a sink re-sends a little, with the same ids.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use super::{
    overflow, trim_point, Appended, Record, Stats, Store, StoreConfig, StoreError, Stored, WhenFull,
};

const NEXT: &[u8] = b"m:next";
const EPOCH: &[u8] = b"m:epoch";
const RULES_STATE: &[u8] = b"m:rules";

fn event_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'e';
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(key: &[u8]) -> Option<u64> {
    key.get(1..9)?.try_into().ok().map(u64::from_be_bytes)
}

fn cursor_key(sink: &str) -> Vec<u8> {
    [b"c:".as_slice(), sink.as_bytes()].concat()
}

fn u64_of(v: &[u8]) -> Option<u64> {
    v.try_into().ok().map(u64::from_be_bytes)
}

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

pub struct SledStore {
    db: sled::Db,
    epoch: String,
    when_full: WhenFull,
    max_bytes: u64,
    state: Mutex<State>,
}

/// In-memory bookkeeping mirrored from the tree, guarded by one lock so appends and
/// trims never interleave.
#[derive(Debug)]
struct State {
    stats: Stats,
    cursors: HashMap<String, u64>,
}

impl SledStore {
    /// Opens (or creates) the store in `dir` for the given sinks. Cursors of sinks no
    /// longer configured are removed so they cannot pin records forever; a new sink
    /// starts at the oldest stored record.
    pub fn open(dir: &Path, cfg: &StoreConfig, sinks: &[String]) -> Result<Self, StoreError> {
        create_private_dir(dir)?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cfg.cache_capacity.0)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| match e {
                // sled reports a held lock as a plain message.
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Backend(format!(
                        "{} is in use by another ferry process (one agent per data_dir)",
                        dir.display()
                    ))
                }
                other => backend(other),
            })?;

        let epoch = match db.get(EPOCH).map_err(backend)? {
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            None => {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default();
                let e = format!("{:x}", nanos as u64);
                db.insert(EPOCH, e.as_bytes()).map_err(backend)?;
                e
            }
        };

        let mut stats = Stats::default();
        for item in db.range(event_key(0)..=event_key(u64::MAX)) {
            let (k, v) = item.map_err(backend)?;
            let Some(seq) = seq_of(&k) else { continue };
            if stats.records == 0 {
                stats.head = seq;
            }
            stats.records += 1;
            stats.bytes += v.len() as u64;
            stats.next = seq + 1;
        }
        let stored_next = db
            .get(NEXT)
            .map_err(backend)?
            .and_then(|v| u64_of(&v))
            .unwrap_or(0);
        stats.next = stats.next.max(stored_next);
        if stats.records == 0 {
            stats.head = stats.next;
        }

        let mut cursors = HashMap::new();
        for item in db.scan_prefix(b"c:") {
            let (k, v) = item.map_err(backend)?;
            let name = String::from_utf8_lossy(&k[2..]).into_owned();
            if sinks.contains(&name) {
                cursors.insert(name, u64_of(&v).unwrap_or(stats.head));
            } else {
                info!(sink = %name, "forgetting the cursor of a sink that is no longer configured");
                db.remove(&k).map_err(backend)?;
            }
        }
        for s in sinks {
            cursors.entry(s.clone()).or_insert(stats.head);
        }
        info!(
            dir = %dir.display(),
            records = stats.records,
            bytes = stats.bytes,
            head = stats.head,
            next = stats.next,
            "store opened"
        );
        let store = Self {
            db,
            epoch,
            when_full: cfg.when_full,
            max_bytes: cfg.max_bytes.0,
            state: Mutex::new(State { stats, cursors }),
        };
        store.trim(&mut store.lock())?;
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic while holding it; the state is still the
        // last consistent one we wrote (every mutation happens after its I/O), so
        // carry on rather than take the agent down.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes records every sink has passed.
    fn trim(&self, st: &mut State) -> Result<(), StoreError> {
        let to = trim_point(st.cursors.values().copied(), st.stats.head, st.stats.next);
        self.remove_head(st, to, u64::MAX).map(|_| ())
    }

    /// Removes records from the head up to sequence `to` (exclusive), stopping early
    /// once `enough` bytes are freed. Returns (records, bytes) removed.
    fn remove_head(&self, st: &mut State, to: u64, enough: u64) -> Result<(u64, u64), StoreError> {
        if to <= st.stats.head {
            return Ok((0, 0));
        }
        let mut batch = sled::Batch::default();
        let (mut n, mut freed, mut new_head) = (0u64, 0u64, st.stats.head);
        for item in self.db.range(event_key(st.stats.head)..event_key(to)) {
            if freed >= enough {
                break;
            }
            let (k, v) = item.map_err(backend)?;
            batch.remove(k.clone());
            n += 1;
            freed += v.len() as u64;
            new_head = seq_of(&k).map_or(new_head, |s| s + 1);
        }
        if freed < enough {
            new_head = to;
        }
        self.db.apply_batch(batch).map_err(backend)?;
        st.stats.head = new_head.min(st.stats.next);
        st.stats.records -= n;
        st.stats.bytes -= freed;
        Ok((n, freed))
    }
}

/// Creates the store directory readable by its owner only: readings can be private.
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| StoreError::Backend(format!("cannot create {}: {e}", dir.display())))
}

impl Store for SledStore {
    fn append(
        &self,
        records: &[Record],
        rules_state: Option<&[u8]>,
    ) -> Result<Appended, StoreError> {
        let mut st = self.lock();
        let encoded: Vec<Vec<u8>> = records
            .iter()
            .map(|r| serde_json::to_vec(r).map_err(|e| StoreError::Backend(e.to_string())))
            .collect::<Result<_, _>>()?;
        let incoming: u64 = encoded.iter().map(|e| e.len() as u64).sum();

        let mut dropped = 0;
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
                    let next = st.stats.next;
                    dropped = self.remove_head(&mut st, next, excess)?.0;
                }
            }
        }

        let first = st.stats.next;
        let mut batch = sled::Batch::default();
        for (i, bytes) in encoded.into_iter().enumerate() {
            batch.insert(&event_key(first + i as u64), bytes);
        }
        let next = first + records.len() as u64;
        batch.insert(NEXT, &next.to_be_bytes());
        if let Some(state) = rules_state {
            batch.insert(RULES_STATE, state);
        }
        self.db.apply_batch(batch).map_err(backend)?;
        // Producers are acknowledged when this returns: it must be on disk.
        self.db.flush().map_err(backend)?;

        if st.stats.records == 0 {
            st.stats.head = first;
        }
        st.stats.records += records.len() as u64;
        st.stats.bytes += incoming;
        st.stats.next = next;
        Ok(Appended { first, dropped })
    }

    fn read(&self, from: u64, max: usize) -> Result<Vec<Stored>, StoreError> {
        let mut out = Vec::with_capacity(max.min(1024));
        for item in self
            .db
            .range(event_key(from)..=event_key(u64::MAX))
            .take(max)
        {
            let (k, v) = item.map_err(backend)?;
            let Some(seq) = seq_of(&k) else { continue };
            match serde_json::from_slice(&v) {
                Ok(record) => out.push(Stored { seq, record }),
                Err(error) => {
                    // Never let one unreadable record block a sink forever.
                    warn!(seq, %error, "skipping a stored record that cannot be decoded");
                    metrics::counter!("ferry_store_dropped_total", "reason" => "corrupt")
                        .increment(1);
                }
            }
        }
        Ok(out)
    }

    fn rules_state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db
            .get(RULES_STATE)
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn cursor(&self, sink: &str) -> Result<u64, StoreError> {
        let st = self.lock();
        Ok(st.cursors.get(sink).copied().unwrap_or(st.stats.head))
    }

    fn advance(&self, sink: &str, to: u64) -> Result<(), StoreError> {
        let mut st = self.lock();
        self.db
            .insert(cursor_key(sink), &to.to_be_bytes())
            .map_err(backend)?;
        st.cursors.insert(sink.to_string(), to);
        self.trim(&mut st)
    }

    fn stats(&self) -> Stats {
        self.lock().stats
    }

    fn epoch(&self) -> &str {
        &self.epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Bytes;
    use chrono::Utc;
    use serde_json::json;

    fn record(i: u64, pad: usize) -> Record {
        Record {
            source: "/ferry/t/mqtt/m".into(),
            event_type: "io.ferry.reading".into(),
            subject: format!("d{i}"),
            time: Utc::now(),
            data: json!({ "i": i, "pad": "x".repeat(pad) }),
            ext: Default::default(),
            to: None,
        }
    }

    fn cfg(max: u64, when_full: WhenFull) -> StoreConfig {
        StoreConfig {
            max_bytes: Bytes(max),
            when_full,
            cache_capacity: Bytes(1 << 20),
        }
    }

    fn sinks(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn appended_records_read_back_in_order_with_consecutive_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(
            dir.path(),
            &cfg(1 << 30, WhenFull::DropOldest),
            &sinks(&["a"]),
        )
        .unwrap();
        s.append(&[record(0, 0), record(1, 0)], None).unwrap();
        let a = s.append(&[record(2, 0)], None).unwrap();
        assert_eq!(a.first, 2);
        let got = s.read(0, 10).unwrap();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(
            got[2].record,
            record(2, 0).clone_with_time(got[2].record.time)
        );
    }

    #[test]
    fn records_stay_until_every_sink_has_passed_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(
            dir.path(),
            &cfg(1 << 30, WhenFull::DropOldest),
            &sinks(&["a", "b"]),
        )
        .unwrap();
        s.append(&[record(0, 0), record(1, 0), record(2, 0)], None)
            .unwrap();
        s.advance("a", 3).unwrap();
        assert_eq!(s.stats().records, 3);
        s.advance("b", 2).unwrap();
        assert_eq!(s.stats().records, 1);
        assert_eq!(s.read(0, 10).unwrap()[0].seq, 2);
    }

    #[test]
    fn everything_survives_a_reopen_including_cursors_and_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(1 << 30, WhenFull::DropOldest);
        let epoch;
        {
            let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
            s.append(&[record(0, 0), record(1, 0), record(2, 0)], None)
                .unwrap();
            s.advance("a", 3).unwrap();
            epoch = s.epoch().to_string();
        }
        let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
        assert_eq!(s.epoch(), epoch);
        assert_eq!(s.cursor("a").unwrap(), 3);
        assert_eq!(s.stats().records, 0);
        // Sequences are never reused, so ids stay unique after the store empties.
        assert_eq!(s.append(&[record(3, 0)], None).unwrap().first, 3);
    }

    #[test]
    fn a_full_store_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(
            dir.path(),
            &cfg(10_000, WhenFull::DropOldest),
            &sinks(&["a"]),
        )
        .unwrap();
        let mut dropped = 0;
        for i in 0..30 {
            dropped += s.append(&[record(i, 1000)], None).unwrap().dropped;
        }
        let st = s.stats();
        assert!(st.bytes <= 10_000, "{st:?}");
        assert_eq!(st.records + dropped, 30);
        assert_eq!(s.read(0, 100).unwrap()[0].seq, st.head);
        assert_eq!(s.read(0, 100).unwrap().last().unwrap().seq, 29);
    }

    #[test]
    fn a_full_store_rejects_new_records_when_so_configured() {
        let dir = tempfile::tempdir().unwrap();
        let s =
            SledStore::open(dir.path(), &cfg(5_000, WhenFull::RejectNew), &sinks(&["a"])).unwrap();
        let mut accepted = 0;
        for i in 0..10 {
            match s.append(&[record(i, 1000)], None) {
                Ok(_) => accepted += 1,
                Err(StoreError::Full { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!((3..10).contains(&accepted), "{accepted}");
        // Once the sink catches up there is room again.
        s.advance("a", accepted).unwrap();
        s.append(&[record(99, 1000)], None).unwrap();
    }

    #[test]
    fn the_rule_state_commits_with_its_batch_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(1 << 30, WhenFull::DropOldest);
        {
            let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
            assert_eq!(s.rules_state().unwrap(), None);
            s.append(&[record(0, 0)], Some(b"v1")).unwrap();
            s.append(&[record(1, 0)], None).unwrap();
        }
        let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
        assert_eq!(s.rules_state().unwrap().as_deref(), Some(b"v1".as_slice()));
    }

    #[test]
    fn a_removed_sink_no_longer_holds_records() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(1 << 30, WhenFull::DropOldest);
        {
            let s = SledStore::open(dir.path(), &c, &sinks(&["a", "old"])).unwrap();
            s.append(&[record(0, 0), record(1, 0)], None).unwrap();
            s.advance("a", 2).unwrap();
            assert_eq!(s.stats().records, 2);
        }
        let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
        assert_eq!(s.stats().records, 0);
    }

    #[test]
    fn a_batch_larger_than_the_whole_store_is_refused_and_leaves_the_store_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(
            dir.path(),
            &cfg(10_000, WhenFull::DropOldest),
            &sinks(&["a"]),
        )
        .unwrap();
        s.append(&[record(0, 1000), record(1, 1000)], None).unwrap();
        let before = s.stats();

        let huge: Vec<Record> = (2..14).map(|i| record(i, 1000)).collect();
        match s.append(&huge, None) {
            Err(StoreError::TooLarge { bytes, max }) => {
                assert!(bytes > 10_000, "{bytes}");
                assert_eq!(max, 10_000);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(s.stats(), before, "nothing was dropped or stored");
        let kept: Vec<u64> = s.read(0, 100).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(kept, vec![0, 1]);
        // A batch that fits still goes in, after the refused one, with the next sequence.
        assert_eq!(s.append(&[record(2, 1000)], None).unwrap().first, 2);
    }

    impl Record {
        fn clone_with_time(mut self, t: chrono::DateTime<Utc>) -> Self {
            self.time = t;
            self
        }
    }
}
