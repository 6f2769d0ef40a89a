//! Moving a sled store (what releases before redb wrote) into redb, so an upgrade
//! keeps every buffered reading, cursor and open alert.
//!
//! The copy goes into a temporary file that is renamed into place only once it is
//! complete and synced; the sled files are removed after that. A crash at any
//! point leaves either the sled store (the copy starts again) or the finished redb
//! file (the leftover sled files are removed).

use std::path::Path;

use tracing::info;

use super::backend::{Backend, Batch};
use super::fs::{io_error, remove_any, sync_dir};
use super::redb::{RedbBackend, FILE};
use super::sled::{is_sled_file, SledBackend};
use super::StoreError;

/// The folder the copy is made in, inside the data directory.
pub(super) const TMP: &str = "migrate.tmp";

/// Entries per commit while copying: bounds the memory of one transaction.
const CHUNK: usize = 1000;

pub fn sled_to_redb(dir: &Path, cache_capacity: u64) -> Result<(), StoreError> {
    if !dir.join("conf").exists() || !dir.join("db").exists() {
        return Ok(());
    }
    if dir.join(FILE).exists() {
        // A copy finished before a crash: only the sled files are left to go.
        return remove_sled_files(dir);
    }
    let tmp = dir.join(TMP);
    remove_any(&tmp)?;
    let copied = {
        let from = SledBackend::open(dir, cache_capacity)?;
        let to = RedbBackend::open(&tmp, cache_capacity)?;
        let mut batch = Batch::lazy();
        let mut copied = 0u64;
        let mut failed = None;
        from.scan(&[], &[u8::MAX; 16], &mut |k, v| {
            batch.put(k, v);
            copied += 1;
            if batch.ops.len() >= CHUNK {
                if let Err(e) = to.commit(std::mem::take(&mut batch)) {
                    failed = Some(e);
                    return false;
                }
            }
            true
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        batch.durable = true;
        to.commit(batch)?;
        copied
    };
    std::fs::rename(tmp.join(FILE), dir.join(FILE)).map_err(io_error)?;
    sync_dir(dir)?;
    remove_any(&tmp)?;
    remove_sled_files(dir)?;
    info!(entries = copied, "moved the store from sled to redb");
    Ok(())
}

fn remove_sled_files(dir: &Path) -> Result<(), StoreError> {
    for entry in std::fs::read_dir(dir).map_err(io_error)? {
        let name = entry.map_err(io_error)?.file_name();
        if is_sled_file(&name.to_string_lossy()) {
            remove_any(&dir.join(name))?;
        }
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use crate::config::Bytes;
    use crate::store::{open, BackendKind, Record, StateWrite, Store, StoreConfig};

    fn record(i: u64) -> Record {
        Record {
            source: "/ferry/t".into(),
            event_type: "io.ferry.reading".into(),
            subject: format!("d{i}"),
            time: chrono::Utc::now(),
            data: serde_json::json!({ "i": i }).into(),
            ext: Default::default(),
            to: None,
            origin: None,
        }
    }

    #[test]
    fn an_upgrade_to_redb_keeps_the_records_cursors_ids_rule_state_and_delivery_windows_of_a_sled_store(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let sinks = vec!["a".to_string()];
        let mut cfg = StoreConfig {
            backend: BackendKind::Sled,
            cache_capacity: Bytes(1 << 20),
            ..StoreConfig::default()
        };
        let epoch = {
            let s = open(dir.path(), &cfg, &sinks).unwrap().ledger;
            let records: Vec<Record> = (0..2500).map(record).collect();
            let state = StateWrite {
                replace_all: false,
                entries: vec![("alert".into(), Some(b"open".to_vec()))],
                deliveries: vec![("local".into(), b"window".to_vec())],
            };
            s.append(&records, &state).unwrap();
            s.advance("a", 10).unwrap();
            s.epoch().to_string()
        };

        cfg.backend = BackendKind::Redb;
        let s = open(dir.path(), &cfg, &sinks).unwrap().ledger;
        assert_eq!(s.epoch(), epoch, "ids stay what they were");
        assert_eq!(s.cursor("a").unwrap(), 10);
        assert_eq!(s.stats().records, 2490);
        assert_eq!(
            s.read(10, 1, usize::MAX).unwrap().records[0].record.subject,
            "d10"
        );
        assert_eq!(
            s.rules_state().unwrap().entries,
            vec![("alert".to_string(), b"open".to_vec())]
        );
        assert_eq!(
            s.delivery_window("local").unwrap().as_deref(),
            Some(&b"window"[..])
        );
        assert!(!dir.path().join("db").exists(), "the sled files are gone");
        assert!(!dir.path().join("migrate.tmp").exists());
    }

    #[test]
    fn a_sled_store_is_refused_a_redb_file_rather_than_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig::default();
        drop(open(dir.path(), &cfg, &[]).unwrap());
        let sled = StoreConfig {
            backend: BackendKind::Sled,
            ..StoreConfig::default()
        };
        let error = open(dir.path(), &sled, &[]).err().expect("refused");
        assert!(
            error.to_string().contains("store.backend = \"redb\""),
            "{error}"
        );
    }
}
