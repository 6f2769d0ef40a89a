//! The redb backend: one table in one file, `store.redb`, a [`Batch`] applied in
//! one write transaction.
//!
//! What it guarantees: a durable batch commits with `Durability::Immediate`, which
//! writes the pages and the commit slot and then calls `fsync`; redb checksums every
//! page, and a commit whose checksum does not verify after a power cut is rolled
//! back to the previous one whole. A lazy batch (`Durability::None`) becomes durable
//! with the next durable one, or is lost whole at a crash. Its page cache is the
//! configured `cache_capacity`, and stored values are not otherwise held in memory.
//!
//! redb runs its integrity check (every page's checksum) on every open, not only
//! after a crash: a file changed by something else than redb then fails to open
//! with an error, which the store answers by quarantining it, instead of being
//! trusted and failing later.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use redb::{Database, Durability, ReadableDatabase, TableDefinition, TableError};

use super::backend::{Backend, Batch, Op};
use super::fs::create_private_dir;
use super::StoreError;

/// The file in the data directory.
pub const FILE: &str = "store.redb";

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ferry");

fn backend(e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    StoreError::Backend(e.to_string())
}

pub struct RedbBackend {
    /// Behind a lock only because compaction needs the database to itself.
    db: RwLock<Database>,
    path: PathBuf,
}

impl RedbBackend {
    /// Opens (or creates) `store.redb` in `dir`.
    pub fn open(dir: &Path, cache_capacity: u64) -> Result<Self, StoreError> {
        create_private_dir(dir)?;
        let path = dir.join(FILE);
        let db = Database::builder()
            .set_cache_size(usize::try_from(cache_capacity).unwrap_or(usize::MAX))
            .set_check_integrity_on_open(true)
            .create(&path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(format!(
                    "{} is in use by another ferry process (one agent per data_dir)",
                    dir.display()
                )),
                other => backend(other),
            })?;
        // The table exists from here on, so reads need not tell "no table" apart.
        let tx = db.begin_write().map_err(backend)?;
        tx.open_table(TABLE).map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(Self {
            db: RwLock::new(db),
            path,
        })
    }

    fn db(&self) -> std::sync::RwLockReadGuard<'_, Database> {
        // Poisoned only by a panic during compaction, which leaves the database as
        // redb left it: usable.
        self.db.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for RedbBackend {
    fn name(&self) -> &'static str {
        "redb"
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db().begin_read().map_err(backend)?;
        let table = match tx.open_table(TABLE) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(backend(e)),
        };
        let value = table.get(key).map_err(backend)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn scan(
        &self,
        from: &[u8],
        to: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let tx = self.db().begin_read().map_err(backend)?;
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
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let db = self.db();
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

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        std::fs::metadata(&self.path)
            .map(|m| m.len())
            .map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// redb reuses freed pages but keeps the file's length; compaction moves the
    /// pages in use to the front and shortens the file.
    fn reclaim(&self) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        db.compact().map_err(backend)?;
        Ok(())
    }
}
