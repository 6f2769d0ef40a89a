//! The sled backend of the [`Store`].
//!
//! One sled tree holds everything, so a batch of records and the next sequence number
//! commit atomically in one `apply_batch`:
//! - `e` + sequence (big-endian u64): a record, as JSON;
//! - `m:next`: the next sequence; `m:epoch`: the store's epoch;
//! - `r:` + key: one rule's saved state for one device, committed with the batch
//!   that changed it (`m:rules`, the whole state in one value, is what earlier
//!   releases wrote; it is read once and removed by the next full rewrite);
//! - `c:` + sink name: that sink's cursor;
//! - `m:rule_files`: the files of the last rule set that compiled, to start with
//!   when the rule files are broken after a reboot.
//!
//! sled flushes in the background every 500 ms; an append calls `flush` itself before
//! returning, because callers acknowledge input to producers on its return. Cursor
//! moves are not flushed: after a crash a sink re-sends a little, with the same ids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{error, info};

use super::{
    overflow, trim_point, Appended, Read, Record, SavedState, StateWrite, Stats, Store,
    StoreConfig, StoreError, Stored, WhenFull,
};

const NEXT: &[u8] = b"m:next";
const EPOCH: &[u8] = b"m:epoch";
/// How long opening waits for another holder of the store's lock to let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
const LEGACY_RULES_STATE: &[u8] = b"m:rules";
const STATE_PREFIX: &[u8] = b"r:";
const RULE_FILES: &[u8] = b"m:rule_files";

fn state_key(key: &str) -> Vec<u8> {
    [STATE_PREFIX, key.as_bytes()].concat()
}

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
    /// Behind a lock only so [`SledStore::compact`] can swap it for a fresh copy.
    db: RwLock<sled::Db>,
    dir: PathBuf,
    cache_capacity: u64,
    /// [`COMPACT_ABOVE`], but for tests.
    compact_above: u64,
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
    /// When the files were last rebuilt to give space back.
    compacted_at: Option<std::time::Instant>,
    /// Bytes appended since the files' size was last looked at: it costs a stat
    /// and a directory read, too much for every advance that empties the store,
    /// and the files only grow by appending.
    appended_since_size_check: u64,
}

impl SledStore {
    /// Opens (or creates) the store in `dir` for the given sinks. Cursors of sinks no
    /// longer configured are removed so they cannot pin records forever; a new sink
    /// starts at the oldest stored record.
    pub fn open(dir: &Path, cfg: &StoreConfig, sinks: &[String]) -> Result<Self, StoreError> {
        create_private_dir(dir)?;
        finish_compaction(dir)?;
        let db = open_db(dir, cfg.cache_capacity.0)?;

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
            db: RwLock::new(db),
            dir: dir.to_path_buf(),
            cache_capacity: cfg.cache_capacity.0,
            compact_above: COMPACT_ABOVE,
            epoch,
            when_full: cfg.when_full,
            max_bytes: cfg.max_bytes.0,
            state: Mutex::new(State {
                stats,
                cursors,
                compacted_at: None,
                appended_since_size_check: u64::MAX,
            }),
        };
        store.trim(&mut store.lock())?;
        Ok(store)
    }

    fn db(&self) -> std::sync::RwLockReadGuard<'_, sled::Db> {
        // Poisoned only by a panic during a swap, which replaces the value whole.
        self.db.read().unwrap_or_else(|p| p.into_inner())
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
        self.remove_head(st, to, u64::MAX)?;
        if st.stats.records == 0
            && st.appended_since_size_check >= self.compact_above / 4
            && st
                .compacted_at
                .is_none_or(|at| at.elapsed() >= COMPACT_AT_MOST_EVERY)
        {
            st.appended_since_size_check = 0;
            let size = self.db().size_on_disk().map_err(backend)?;
            if size > self.compact_above {
                st.compacted_at = Some(std::time::Instant::now());
                self.compact(size)?;
            }
        }
        Ok(())
    }

    /// Gives disk space back: sled never shrinks its files, so a store that once
    /// held a large backlog would keep its size for good. Called with no records
    /// stored (and the state lock held), it copies what is left (sequence, epoch,
    /// cursors, rule state, quarantine) into fresh files and swaps them in. A crash
    /// part-way is finished or undone by the next open ([`finish_compaction`]).
    fn compact(&self, size_before: u64) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        let fresh_dir = self.dir.join(COMPACT_DIR);
        remove_any(&fresh_dir)?;
        {
            let fresh = open_db(&fresh_dir, self.cache_capacity)?;
            for name in db.tree_names() {
                let (from, to) = (
                    db.open_tree(&name).map_err(backend)?,
                    fresh.open_tree(&name).map_err(backend)?,
                );
                for item in from.iter() {
                    let (k, v) = item.map_err(backend)?;
                    to.insert(k, v).map_err(backend)?;
                }
            }
            fresh.flush().map_err(backend)?;
        }
        let names: Vec<String> = std::fs::read_dir(&fresh_dir)
            .and_then(|dir| {
                dir.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .map_err(io_error)?;
        write_synced(
            &self.dir.join(COMPACT_MANIFEST),
            names.join("\n").as_bytes(),
        )?;
        // Close the old files (a temporary stands in for the moment), move the new
        // ones in, and open them.
        let stand_in = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(backend)?;
        drop(std::mem::replace(&mut *db, stand_in));
        finish_compaction(&self.dir)?;
        *db = open_db(&self.dir, self.cache_capacity)?;
        let size_after = db.size_on_disk().map_err(backend)?;
        info!(
            size_before,
            size_after, "store empty: rebuilt its files to give disk space back"
        );
        Ok(())
    }

    /// Removes records from the head up to sequence `to` (exclusive), stopping early
    /// once `enough` bytes are freed. Returns (records, bytes) removed.
    fn remove_head(&self, st: &mut State, to: u64, enough: u64) -> Result<(u64, u64), StoreError> {
        if to <= st.stats.head {
            return Ok((0, 0));
        }
        let mut batch = sled::Batch::default();
        let (mut n, mut freed, mut new_head) = (0u64, 0u64, st.stats.head);
        for item in self.db().range(event_key(st.stats.head)..event_key(to)) {
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
        self.db().apply_batch(batch).map_err(backend)?;
        st.stats.head = new_head.min(st.stats.next);
        st.stats.records -= n;
        st.stats.bytes -= freed;
        Ok((n, freed))
    }
}

/// The sled tree that keeps records that could not be decoded, by sequence.
const QUARANTINE: &str = "quarantine";
/// Quarantined records kept; older ones go first. Enough to look into what went
/// wrong, never enough to fill the disk.
const QUARANTINE_KEEP: usize = 100;

impl SledStore {
    /// Moves records that cannot be decoded out of the event range, so they are
    /// counted and logged once, and no sink reads them again (nor after a restart).
    /// They are kept in the quarantine tree for inspection, the newest
    /// [`QUARANTINE_KEEP`] of them.
    fn quarantine(
        &self,
        records: Vec<(u64, sled::IVec, serde_json::Error)>,
    ) -> Result<(), StoreError> {
        let mut st = self.lock();
        let tree = self.db().open_tree(QUARANTINE).map_err(backend)?;
        let mut batch = sled::Batch::default();
        let mut moved = Vec::new();
        for (seq, bytes, error) in records {
            // Another sink may have moved it already.
            if self.db().get(event_key(seq)).map_err(backend)?.is_none() {
                continue;
            }
            error!(seq, bytes = bytes.len(), %error, "a stored record cannot be decoded; quarantined it and moving on");
            tree.insert(event_key(seq), bytes.clone())
                .map_err(backend)?;
            batch.remove(&event_key(seq));
            moved.push((seq, bytes.len() as u64));
        }
        self.db().apply_batch(batch).map_err(backend)?;
        while tree.len() > QUARANTINE_KEEP {
            if tree.pop_min().map_err(backend)?.is_none() {
                break;
            }
        }
        self.db().flush().map_err(backend)?;
        for (seq, size) in &moved {
            st.stats.records -= 1;
            st.stats.bytes -= size;
            if *seq == st.stats.head {
                st.stats.head += 1;
            }
        }
        if st.stats.records == 0 {
            st.stats.head = st.stats.next;
        }
        metrics::counter!("ferry_store_dropped_total", "reason" => "corrupt")
            .increment(moved.len() as u64);
        Ok(())
    }
}

/// Where [`SledStore::compact`] builds the fresh files, inside the data directory.
const COMPACT_DIR: &str = "compact.new";
/// Written (synced) once the fresh files are complete: their names, one a line.
const COMPACT_MANIFEST: &str = "compact.manifest";
/// Rebuild the files when the store is empty and they take more than this.
const COMPACT_ABOVE: u64 = 64 * 1024 * 1024;
/// And not more often than this, whatever the size.
const COMPACT_AT_MOST_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

fn open_db(dir: &Path, cache_capacity: u64) -> Result<sled::Db, StoreError> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_capacity)
        .flush_every_ms(Some(500));
    // sled lets go of its lock file from a background thread, a moment after the
    // last handle is gone: a restart that follows at once (systemd's, or a
    // reopen in the same process) waits for that moment instead of failing.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    return Err(StoreError::Backend(format!(
                        "{} is in use by another ferry process (one agent per data_dir)",
                        dir.display()
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(other) => return Err(backend(other)),
        }
    }
}

fn io_error(e: std::io::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn remove_any(path: &Path) -> Result<(), StoreError> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    removed.map_err(io_error)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io_error)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_error)?;
    std::fs::rename(&tmp, path).map_err(io_error)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error)
}

/// Completes a compaction that got as far as its manifest (the fresh files are
/// whole: move them in, in place of sled's old files), or drops one that did not
/// (the old files are untouched). Safe to run again after a crash at any point:
/// a name in the manifest is either still in the fresh directory or already moved.
fn finish_compaction(dir: &Path) -> Result<(), StoreError> {
    let fresh = dir.join(COMPACT_DIR);
    let manifest = dir.join(COMPACT_MANIFEST);
    let names: Vec<String> = match std::fs::read_to_string(&manifest) {
        Ok(text) => text.lines().map(str::to_string).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return remove_any(&fresh),
        Err(e) => return Err(io_error(e)),
    };
    // sled's own files in the data directory that the fresh set does not replace.
    for entry in std::fs::read_dir(dir).map_err(io_error)? {
        let name = entry
            .map_err(io_error)?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let sleds = name == "conf" || name == "db" || name == "blobs" || name.starts_with("snap.");
        if sleds && !names.contains(&name) {
            remove_any(&dir.join(&name))?;
        }
    }
    for name in &names {
        let from = fresh.join(name);
        if from.exists() {
            let to = dir.join(name);
            if to.is_dir() {
                remove_any(&to)?;
            }
            std::fs::rename(&from, &to).map_err(io_error)?;
        }
    }
    sync_dir(dir)?;
    remove_any(&manifest)?;
    remove_any(&fresh)?;
    sync_dir(dir)
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
    fn append(&self, records: &[Record], state: &StateWrite) -> Result<Appended, StoreError> {
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
        if state.replace_all {
            batch.remove(LEGACY_RULES_STATE);
            for key in self.db().scan_prefix(STATE_PREFIX).keys() {
                batch.remove(key.map_err(backend)?);
            }
        }
        for (key, value) in &state.entries {
            match value {
                Some(v) => batch.insert(state_key(key), v.as_slice()),
                None => batch.remove(state_key(key)),
            }
        }
        self.db().apply_batch(batch).map_err(backend)?;
        // Producers are acknowledged when this returns: it must be on disk.
        self.db().flush().map_err(backend)?;

        if st.stats.records == 0 {
            st.stats.head = first;
        }
        st.stats.records += records.len() as u64;
        st.stats.bytes += incoming;
        st.stats.next = next;
        st.appended_since_size_check = st.appended_since_size_check.saturating_add(incoming);
        Ok(Appended { first, dropped })
    }

    fn read(&self, from: u64, max: usize, max_bytes: usize) -> Result<Read, StoreError> {
        let mut out = Read {
            records: Vec::with_capacity(max.min(1024)),
            next: from,
        };
        let mut bytes = 0;
        let mut unreadable = Vec::new();
        // The read guard ends with the loop: quarantining takes the state lock,
        // which compaction holds while it waits for the write guard.
        for item in self.db().range(event_key(from)..=event_key(u64::MAX)) {
            if out.records.len() >= max || bytes >= max_bytes {
                break;
            }
            let (k, v) = item.map_err(backend)?;
            let Some(seq) = seq_of(&k) else { continue };
            out.next = seq + 1;
            match serde_json::from_slice(&v) {
                Ok(record) => {
                    bytes += v.len();
                    out.records.push(Stored {
                        seq,
                        record,
                        bytes: v.len(),
                    })
                }
                Err(error) => unreadable.push((seq, v, error)),
            }
        }
        if !unreadable.is_empty() {
            self.quarantine(unreadable)?;
        }
        Ok(out)
    }

    fn save_rule_files(&self, files: &[u8]) -> Result<(), StoreError> {
        let db = self.db();
        db.insert(RULE_FILES, files).map_err(backend)?;
        db.flush().map_err(backend)?;
        Ok(())
    }

    fn rule_files(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db()
            .get(RULE_FILES)
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn rules_state(&self) -> Result<SavedState, StoreError> {
        let legacy = self
            .db()
            .get(LEGACY_RULES_STATE)
            .map_err(backend)?
            .map(|v| v.to_vec());
        let mut entries = Vec::new();
        for item in self.db().scan_prefix(STATE_PREFIX) {
            let (k, v) = item.map_err(backend)?;
            let key = String::from_utf8_lossy(&k[STATE_PREFIX.len()..]).into_owned();
            entries.push((key, v.to_vec()));
        }
        Ok(SavedState { legacy, entries })
    }

    fn cursor(&self, sink: &str) -> Result<u64, StoreError> {
        let st = self.lock();
        Ok(st.cursors.get(sink).copied().unwrap_or(st.stats.head))
    }

    fn advance(&self, sink: &str, to: u64) -> Result<(), StoreError> {
        let mut st = self.lock();
        self.db()
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

    /// A store with room to spare and one sink, `a`.
    fn roomy(dir: &Path) -> SledStore {
        SledStore::open(dir, &cfg(1 << 30, WhenFull::DropOldest), &sinks(&["a"])).unwrap()
    }

    #[test]
    fn appended_records_read_back_in_order_with_consecutive_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let s = roomy(dir.path());
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

    #[test]
    fn records_stay_until_every_sink_has_passed_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(
            dir.path(),
            &cfg(1 << 30, WhenFull::DropOldest),
            &sinks(&["a", "b"]),
        )
        .unwrap();
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

    #[test]
    fn everything_survives_a_reopen_including_cursors_and_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(1 << 30, WhenFull::DropOldest);
        let epoch;
        {
            let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
            s.append(
                &[record(0, 0), record(1, 0), record(2, 0)],
                &StateWrite::default(),
            )
            .unwrap();
            s.advance("a", 3).unwrap();
            epoch = s.epoch().to_string();
        }
        let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
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

    #[test]
    fn a_full_store_rejects_new_records_when_so_configured() {
        let dir = tempfile::tempdir().unwrap();
        let s =
            SledStore::open(dir.path(), &cfg(5_000, WhenFull::RejectNew), &sinks(&["a"])).unwrap();
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
        }
    }

    fn saved(s: &SledStore) -> Vec<(String, String)> {
        s.rules_state()
            .unwrap()
            .entries
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn rule_state_entries_commit_with_their_batch_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(1 << 30, WhenFull::DropOldest);
        {
            let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
            assert_eq!(s.rules_state().unwrap(), SavedState::default());
            s.append(&[record(0, 0)], &put(&[("a", Some("1")), ("b", Some("2"))]))
                .unwrap();
            s.append(&[record(1, 0)], &put(&[("a", None), ("c", Some("3"))]))
                .unwrap();
            s.append(&[record(2, 0)], &StateWrite::default()).unwrap();
        }
        let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
        assert_eq!(
            saved(&s),
            [
                ("b".to_string(), "2".to_string()),
                ("c".to_string(), "3".to_string())
            ]
        );
    }

    #[test]
    fn a_full_rewrite_removes_every_entry_and_the_legacy_state_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = roomy(dir.path());
        s.db().insert(LEGACY_RULES_STATE, b"{}".as_slice()).unwrap();
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

    #[test]
    fn bytes_written_for_one_changed_entry_do_not_grow_with_the_entries_kept() {
        // The write amplification that wore out flash: every commit rewrote every
        // open alert. Now a commit writes only its own entries, measured as the
        // growth of the store's files for the same single-entry commits.
        let dir = tempfile::tempdir().unwrap();
        let s = roomy(dir.path());
        let many: Vec<(String, Option<Vec<u8>>)> = (0..10_000)
            .map(|i| (format!("open-{i}"), Some(vec![b'x'; 100])))
            .collect();
        s.append(
            &[],
            &StateWrite {
                replace_all: false,
                entries: many,
            },
        )
        .unwrap();
        let size = || s.db().size_on_disk().unwrap();
        let before = size();
        for i in 0..50 {
            s.append(&[record(i, 10)], &put(&[("changed", Some("y"))]))
                .unwrap();
        }
        let grown = size() - before;
        // 10,000 entries of 100 bytes are 1 MB; 50 rewrites of them would be 50 MB.
        assert!(grown < 1_000_000, "{grown} bytes for 50 small commits");
    }

    #[test]
    fn a_removed_sink_no_longer_holds_records() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(1 << 30, WhenFull::DropOldest);
        {
            let s = SledStore::open(dir.path(), &c, &sinks(&["a", "old"])).unwrap();
            s.append(&[record(0, 0), record(1, 0)], &StateWrite::default())
                .unwrap();
            s.advance("a", 2).unwrap();
            assert_eq!(s.stats().records, 2);
        }
        let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
        assert_eq!(s.stats().records, 0);
    }

    #[test]
    fn a_read_stops_at_its_byte_budget_but_always_returns_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = roomy(dir.path());
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

    #[test]
    fn an_undecodable_record_is_quarantined_once_and_read_past() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(1 << 30, WhenFull::DropOldest);
        let s = SledStore::open(dir.path(), &c, &sinks(&["a", "b"])).unwrap();
        s.append(
            &[record(0, 0), record(1, 0), record(2, 0)],
            &StateWrite::default(),
        )
        .unwrap();
        // A record that no longer decodes (a bit flip, or an older bug's output).
        s.db()
            .insert(event_key(1), b"{not json".as_slice())
            .unwrap();
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
        let kept = s.db().open_tree(QUARANTINE).unwrap();
        assert_eq!(
            kept.get(event_key(1)).unwrap().as_deref(),
            Some(b"{not json".as_slice())
        );
        drop(kept);

        // A read that meets only undecodable records still moves past them.
        s.db().insert(event_key(2), b"\xff".as_slice()).unwrap();
        let only_bad = s.read(2, 10, usize::MAX).unwrap();
        assert!(only_bad.records.is_empty());
        assert_eq!(only_bad.next, 3);
        drop(s);
        let reopened = SledStore::open(dir.path(), &c, &sinks(&["a", "b"])).unwrap();
        assert_eq!(reopened.stats().records, 1);
    }

    fn disk_use(dir: &Path) -> u64 {
        let mut total = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            total += if m.is_dir() {
                disk_use(&e.path())
            } else {
                m.len()
            };
        }
        total
    }

    #[test]
    fn an_emptied_store_gives_its_disk_space_back_and_keeps_ids_cursors_and_rule_state() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(1 << 30, WhenFull::DropOldest);
        let mut s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
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

        let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
        assert_eq!(s.epoch(), epoch);
        assert_eq!(s.cursor("a").unwrap(), 400);
        assert_eq!(s.read(0, 10, usize::MAX).unwrap().records[0].seq, 400);
        assert_eq!(saved(&s), [("open-alert".to_string(), "1".to_string())]);
        assert!(!dir.path().join(COMPACT_DIR).exists());
    }

    #[test]
    fn a_compaction_cut_short_before_its_manifest_leaves_the_old_files_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(1 << 30, WhenFull::DropOldest);
        {
            let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
            s.append(&[record(0, 0)], &StateWrite::default()).unwrap();
        }
        // A crash while the fresh files were being written.
        std::fs::create_dir_all(dir.path().join(COMPACT_DIR)).unwrap();
        std::fs::write(dir.path().join(COMPACT_DIR).join("db"), b"half").unwrap();
        let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
        assert_eq!(s.stats().records, 1);
        assert!(!dir.path().join(COMPACT_DIR).exists());
    }

    #[test]
    fn a_compaction_cut_short_after_its_manifest_is_finished_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(1 << 30, WhenFull::DropOldest);
        let fresh = dir.path().join(COMPACT_DIR);
        {
            let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
            s.append(&[record(0, 0)], &StateWrite::default()).unwrap();
        }
        {
            // The fresh files: a store with one cursor at 7.
            let s = SledStore::open(&fresh, &c, &sinks(&["a"])).unwrap();
            s.advance("a", 7).unwrap();
        }
        let names: Vec<String> = std::fs::read_dir(&fresh)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        std::fs::write(dir.path().join(COMPACT_MANIFEST), names.join("\n")).unwrap();
        // Cut after moving one of the fresh files in.
        std::fs::rename(fresh.join("conf"), dir.path().join("conf")).unwrap();

        let s = SledStore::open(dir.path(), &c, &sinks(&["a"])).unwrap();
        assert_eq!(s.cursor("a").unwrap(), 7);
        assert!(!fresh.exists());
        assert!(!dir.path().join(COMPACT_MANIFEST).exists());
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

    impl Record {
        fn clone_with_time(mut self, t: chrono::DateTime<Utc>) -> Self {
            self.time = t;
            self
        }
    }
}
