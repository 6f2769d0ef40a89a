//! The redb backend: one table in one file, `store.redb`, a [`Batch`] applied in
//! one write transaction.
//!
//! What it guarantees: a durable batch commits with `Durability::Immediate`, which
//! writes the pages and the commit slot and then calls `fsync`; redb checksums every
//! page, and a commit whose checksum does not verify after a power cut is rolled
//! back to the previous one whole. A lazy batch (`Durability::None`) becomes durable
//! with the next durable one, or is lost whole at a crash. Its page cache is the
//! configured `cache_capacity`, and stored values are not otherwise held in memory.
//! A new file's directory entry is synced before its first commit returns. The
//! power-cut simulation (`power_cut_test.rs`) checks, on redb's own writes and
//! syncs, that a commit survives a power cut once it has returned.
//!
//! redb runs its integrity check (every page's checksum) on every open, not only
//! after a crash: a file changed by something else than redb then fails to open
//! with an error, which the store answers by quarantining it, instead of being
//! trusted and failing later.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use redb::{
    BackendError, Builder, Database, Durability, ReadableDatabase, StorageBackend, TableDefinition,
    TableError,
};

use super::backend::{Backend, Batch, Op};
use super::fs::{create_private_dir, sync_dir};
use super::StoreError;

/// The file in the data directory.
pub const FILE: &str = "store.redb";

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ferry");

fn backend(e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    match &e {
        // Damage first: "not a redb database" and a file cut short are I/O errors.
        _ if super::quarantine::redb_means_damage(&e) => StoreError::Damaged(e.to_string()),
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            StoreError::NoSpace(e.to_string())
        }
        redb::Error::Io(_) | redb::Error::PreviousIo => StoreError::Io(e.to_string()),
        _ => StoreError::Backend(e.to_string()),
    }
}

pub struct RedbBackend {
    /// Behind a lock because compaction needs the database to itself, and a
    /// failed write closes it to open it again (`None` in between, or while the
    /// disk is too full to open it).
    db: RwLock<Option<Database>>,
    /// Where the database lives, to open it again and for its size on disk.
    location: Location,
    cache_capacity: u64,
}

enum Location {
    File(PathBuf),
    Storage(Arc<dyn StorageBackend>),
}

/// The settings every store is opened with, whatever holds its bytes.
fn builder(cache_capacity: u64) -> Builder {
    let mut builder = Database::builder();
    builder
        .set_cache_size(usize::try_from(cache_capacity).unwrap_or(usize::MAX))
        .set_check_integrity_on_open(true);
    builder
}

impl RedbBackend {
    /// Opens (or creates) `store.redb` in `dir`.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Self, StoreError> {
        create_private_dir(dir)?;
        let path = dir.join(FILE);
        // redb would take an empty file for a new store. But a store is never empty
        // once created (its header is written first), and an empty file is what a
        // file system can leave of one after a power cut: say so, by quarantining
        // it, rather than start afresh without a word.
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == 0) {
            return Err(StoreError::Damaged(format!(
                "{FILE} is empty (zero length)"
            )));
        }
        let new = !path.exists();
        let location = Location::File(path);
        let db = open_database(&location, cache_capacity)?;
        if new {
            // redb syncs the file's data, not the directory entry that names it: a
            // power cut could otherwise take the whole new file, acknowledged
            // readings included, on a file system that does not sync it with them.
            sync_dir(dir)?;
        }
        Ok(Self {
            db: RwLock::new(Some(db)),
            location,
            cache_capacity,
        })
    }

    /// Opens (or creates) the store held by `storage` instead of a file, with the
    /// same settings as [`RedbBackend::open`]: what the power-cut simulation runs
    /// the real store on, recording every write and sync it makes.
    pub fn on_storage(
        storage: impl StorageBackend,
        cache_capacity: u64,
    ) -> Result<Self, StoreError> {
        let location = Location::Storage(Arc::new(storage));
        let db = open_database(&location, cache_capacity)?;
        Ok(Self {
            db: RwLock::new(Some(db)),
            location,
            cache_capacity,
        })
    }

    /// Runs `f` on the open database. After a failed write redb refuses every
    /// later call ("previous I/O error") until the database is opened again: an
    /// I/O error closes it, and the next call opens it again (so the store works
    /// again once, say, space is back).
    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        {
            // Poisoned only by a panic while reopening or compacting; the value is
            // then a closed or whole database, both of which are handled here.
            let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
            if let Some(db) = guard.as_ref() {
                let result = f(db);
                if !matches!(result, Err(StoreError::Io(_) | StoreError::NoSpace(_))) {
                    return result;
                }
                drop(guard);
                // Close it: the file is locked while it is open.
                drop(self.db.write().unwrap_or_else(|p| p.into_inner()).take());
                return result;
            }
        }
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(open_database(&self.location, self.cache_capacity)?);
        }
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(StoreError::Io("the store could not be opened again".into())),
        }
    }
}

fn open_database(location: &Location, cache_capacity: u64) -> Result<Database, StoreError> {
    let db = match location {
        Location::File(path) => builder(cache_capacity).create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(format!(
                "{} is in use by another ferry process (one agent per data_dir)",
                path.parent().unwrap_or(Path::new(".")).display()
            )),
            other => backend(other),
        })?,
        Location::Storage(storage) => builder(cache_capacity)
            .create_with_backend(Shared(Arc::clone(storage)))
            .map_err(backend)?,
    };
    // The table exists from here on, so reads need not tell "no table" apart.
    let tx = db.begin_write().map_err(backend)?;
    tx.open_table(TABLE).map_err(backend)?;
    tx.commit().map_err(backend)?;
    Ok(db)
}

impl Backend for RedbBackend {
    fn name(&self) -> &'static str {
        "redb"
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(backend)?;
            let table = match tx.open_table(TABLE) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(backend(e)),
            };
            let value = table.get(key).map_err(backend)?;
            Ok(value.map(|v| v.value().to_vec()))
        })
    }

    fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.with_db(|db| {
            let tx = db.begin_read().map_err(backend)?;
            let table = match tx.open_table(TABLE) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(()),
                Err(e) => return Err(backend(e)),
            };
            for item in table.range(from..to).map_err(backend)? {
                let (k, v) = item.map_err(backend)?;
                if !visit(k.value(), v.value()) {
                    break;
                }
            }
            Ok(())
        })
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.with_db(|db| write(db, &batch))
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        match &self.location {
            Location::File(path) => std::fs::metadata(path).map(|m| m.len()),
            Location::Storage(storage) => storage.len(),
        }
        .map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// redb reuses freed pages but keeps the file's length; compaction moves the
    /// pages in use to the front and shortens the file.
    fn reclaim(&self) -> Result<(), StoreError> {
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = guard.as_mut() {
            db.compact().map_err(backend)?;
        }
        Ok(())
    }
}

/// Applies `batch` in one write transaction.
fn write(db: &Database, batch: &Batch) -> Result<(), StoreError> {
    let mut tx = db.begin_write().map_err(backend)?;
    tx.set_durability(if batch.durable {
        Durability::Immediate
    } else {
        Durability::None
    })
    .map_err(|e| StoreError::Backend(e.to_string()))?;
    {
        let mut table = tx.open_table(TABLE).map_err(backend)?;
        for op in &batch.ops {
            match op {
                Op::Put(k, v) => {
                    table.insert(k.as_slice(), v.as_slice()).map_err(backend)?;
                }
                Op::Delete(k) => {
                    table.remove(k.as_slice()).map_err(backend)?;
                }
                Op::DeleteRange(from, to) => {
                    table
                        .retain_in(from.as_slice()..to.as_slice(), |_, _| false)
                        .map_err(backend)?;
                }
            }
        }
    }
    tx.commit().map_err(backend)
}

/// A storage redb owns while the backend still asks it for its length.
#[derive(Debug)]
struct Shared(Arc<dyn StorageBackend>);

impl StorageBackend for Shared {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }

    fn close(&self) -> std::io::Result<()> {
        self.0.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.0.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.query_lock_range(start, end)
    }
}
