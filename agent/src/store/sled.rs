//! The sled backend: one sled tree, a [`Batch`] applied with `apply_batch`.
//!
//! What it guarantees: a durable batch is flushed with sled's `flush`, which on
//! Linux makes the log stable with `sync_file_range`. That survives a crash of the
//! process, but not a power cut: it neither flushes the drive's volatile write cache
//! nor the file's metadata. sled also keeps stored values in memory beyond its
//! cache, and cuts a damaged log short without an error. See ARCHITECTURE.md.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use super::backend::{Backend, Batch, Op};
use super::fs::{create_private_dir, io_error, remove_any, sync_dir, write_synced};
use super::StoreError;

/// How long opening waits for another holder of the store's lock to let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn backend(e: sled::Error) -> StoreError {
    if super::quarantine::sled_means_damage(&e) {
        StoreError::Damaged(e.to_string())
    } else {
        StoreError::Backend(e.to_string())
    }
}

pub struct SledBackend {
    /// Behind a lock only so [`SledBackend::reclaim`] can swap it for a fresh copy.
    db: RwLock<sled::Db>,
    dir: PathBuf,
    cache_capacity: u64,
}

impl SledBackend {
    /// Opens (or creates) the sled files in `dir`, finishing or undoing a
    /// rebuild a crash cut short.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Self, StoreError> {
        create_private_dir(dir)?;
        finish_compaction(dir)?;
        let db = open_db(dir, cache_capacity)?;
        Ok(Self {
            db: RwLock::new(db),
            dir: dir.to_path_buf(),
            cache_capacity,
        })
    }

    fn db(&self) -> std::sync::RwLockReadGuard<'_, sled::Db> {
        // Poisoned only by a panic during a swap, which replaces the value whole.
        self.db.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for SledBackend {
    fn name(&self) -> &'static str {
        "sled"
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db().get(key).map_err(backend)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        for item in self.db().range(from..to) {
            let (k, v) = item.map_err(backend)?;
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let db = self.db();
        let mut b = sled::Batch::default();
        for op in batch.ops {
            match op {
                Op::Put(k, v) => b.insert(k, v),
                Op::Delete(k) => b.remove(k),
                Op::DeleteRange(from, to) => {
                    for key in db.range(from..to).keys() {
                        b.remove(key.map_err(backend)?);
                    }
                }
            }
        }
        db.apply_batch(b).map_err(backend)?;
        if batch.durable {
            db.flush().map_err(backend)?;
        }
        Ok(())
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db().size_on_disk().map_err(backend)
    }

    /// sled never shrinks its files, so a store that once held a large backlog
    /// would keep its size for good. This copies what is left (sequence, epoch,
    /// cursors, rule state, quarantine) into fresh files and swaps them in. A crash
    /// part-way is finished or undone by the next open ([`finish_compaction`]).
    fn reclaim(&self) -> Result<(), StoreError> {
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
        Ok(())
    }
}

/// Where [`SledBackend::reclaim`] builds the fresh files, inside the data directory.
pub(super) const COMPACT_DIR: &str = "compact.new";
/// Written (synced) once the fresh files are complete: their names, one a line.
pub(super) const COMPACT_MANIFEST: &str = "compact.manifest";

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
                    return Err(StoreError::InUse(format!(
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

/// sled's own files in a data directory.
pub fn is_sled_file(name: &str) -> bool {
    name == "conf" || name == "db" || name == "blobs" || name.starts_with("snap.")
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
        if is_sled_file(&name) && !names.contains(&name) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Bytes;
    use crate::store::{BackendKind, Record, StateWrite, Store, StoreConfig};

    fn cfg() -> StoreConfig {
        StoreConfig {
            backend: BackendKind::Sled,
            max_bytes: Bytes(1 << 30),
            cache_capacity: Bytes(1 << 20),
            ..StoreConfig::default()
        }
    }

    fn sinks() -> Vec<String> {
        vec!["a".to_string()]
    }

    fn record() -> Record {
        Record {
            source: "/ferry/t/mqtt/m".into(),
            event_type: "io.ferry.reading".into(),
            subject: "d".into(),
            time: chrono::Utc::now(),
            data: serde_json::json!({ "i": 0 }).into(),
            ext: Default::default(),
            to: None,
            origin: None,
        }
    }

    #[test]
    fn a_compaction_cut_short_before_its_manifest_leaves_the_old_files_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg();
        {
            let s = crate::store::open(dir.path(), &c, &sinks()).unwrap().ledger;
            s.append(&[record()], &StateWrite::default()).unwrap();
        }
        // A crash while the fresh files were being written.
        std::fs::create_dir_all(dir.path().join(COMPACT_DIR)).unwrap();
        std::fs::write(dir.path().join(COMPACT_DIR).join("db"), b"half").unwrap();
        let s = crate::store::open(dir.path(), &c, &sinks()).unwrap().ledger;
        assert_eq!(s.stats().records, 1);
        assert!(!dir.path().join(COMPACT_DIR).exists());
    }

    #[test]
    fn a_compaction_cut_short_after_its_manifest_is_finished_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg();
        let fresh = dir.path().join(COMPACT_DIR);
        {
            let s = crate::store::open(dir.path(), &c, &sinks()).unwrap().ledger;
            s.append(&[record()], &StateWrite::default()).unwrap();
        }
        {
            // The fresh files: a store with one cursor at 7.
            let s = crate::store::open(&fresh, &c, &sinks()).unwrap().ledger;
            s.advance("a", 7).unwrap();
        }
        let names: Vec<String> = std::fs::read_dir(&fresh)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        std::fs::write(dir.path().join(COMPACT_MANIFEST), names.join("\n")).unwrap();
        // Cut after moving one of the fresh files in.
        std::fs::rename(fresh.join("conf"), dir.path().join("conf")).unwrap();

        let s = crate::store::open(dir.path(), &c, &sinks()).unwrap().ledger;
        assert_eq!(s.cursor("a").unwrap(), 7);
        assert!(!fresh.exists());
        assert!(!dir.path().join(COMPACT_MANIFEST).exists());
    }
}
