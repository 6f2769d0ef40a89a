//! Damage never stops the gateway.
//!
//! A store whose files are damaged, or are not a store at all (a torn write on a
//! card, a file from something else), cannot be trusted and cannot be repaired by
//! ferry. Rather than refuse to start, [`super::open`] moves the store's files aside,
//! whole and untouched, into `<data_dir>/quarantine/<UTC time>/`, and starts on a
//! fresh store with a new epoch (so the new store's event ids cannot collide with
//! the old one's). ferry never deletes a quarantined store; the operator may.
//!
//! Only damage moves a store aside. A store in use by another process, a directory
//! that cannot be read, a full disk: those fail the start loudly, with the files
//! left where they are, because a fresh store would hide a problem that is not in
//! the files. The decision is [`io_means_damage`], [`redb_means_damage`] and
//! [`sled_means_damage`]; a panic inside a backend's open (a backend reading
//! garbage) counts as damage too ([`guarded`]).
//!
//! A single record that cannot be decoded is a smaller matter: the ledger moves it
//! to its own quarantine keys, with the time ([`entry`]), and reads past it.

use std::any::Any;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::fs::{create_private_dir, io_error, sync_dir};
use super::StoreError;

/// The folder in the data directory that holds quarantined stores.
pub const DIR: &str = "quarantine";

/// An I/O error that says the bytes are not what a store wrote (a file cut short,
/// or one that is not a store), as opposed to the file system refusing or failing
/// (permissions, a full disk, a lock held by another process).
pub fn io_means_damage(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
    )
}

/// Whether redb's error says its file is damaged or not a ferry store.
pub fn redb_means_damage(e: &redb::Error) -> bool {
    use redb::Error as E;
    match e {
        // A checksum or structure check failed (the integrity check at open
        // included), or the file is in a format this redb cannot read.
        E::Corrupted(_) | E::UpgradeRequired(_) => true,
        // A redb file, but not ferry's: its table has other types.
        E::TableTypeMismatch { .. }
        | E::TypeDefinitionChanged { .. }
        | E::TableIsMultimap(_)
        | E::TableIsNotMultimap(_) => true,
        // "Not a redb database" is an InvalidData I/O error.
        E::Io(io) => io_means_damage(io),
        // In use by another process, a lock of another redb, earlier I/O
        // failures, our own misuse: nothing wrong with the file.
        _ => false,
    }
}

/// Whether sled's error says its files are damaged or are not a sled store.
pub fn sled_means_damage(e: &sled::Error) -> bool {
    match e {
        sled::Error::Corruption { .. } | sled::Error::Unsupported(_) => true,
        sled::Error::Io(io) => io_means_damage(io),
        _ => false,
    }
}

/// Runs a backend's open, turning a panic inside it (a backend that asserts on
/// garbage instead of returning an error) into [`StoreError::Damaged`].
pub fn guarded<T>(open: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    catch_unwind(AssertUnwindSafe(open)).unwrap_or_else(|panic| {
        Err(StoreError::Damaged(format!(
            "the backend panicked reading it: {}",
            panic_message(panic.as_ref())
        )))
    })
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// The files and folders of a data directory that belong to the store, of either
/// backend, leftovers of an interrupted migration or rebuild included: everything
/// a fresh store must not find.
pub fn is_store_file(name: &str) -> bool {
    name == super::redb::FILE
        || super::sled::is_sled_file(name)
        || name == super::sled::COMPACT_DIR
        || name == super::sled::COMPACT_MANIFEST
        || name == super::migrate::TMP
}

/// The folder name for a quarantine made at `at`: `20261130T081500Z`.
pub fn folder_name(at: DateTime<Utc>) -> String {
    at.format("%Y%m%dT%H%M%SZ").to_string()
}

/// Moves the store's files in `dir` into a new `quarantine/<UTC time>/` folder in
/// it (a rename: same file system, nothing copied or deleted) and makes the moves
/// durable. Returns the folder. Fails without moving anything when the folder
/// cannot be made (a full disk, a read-only file system).
pub fn move_aside(dir: &Path, at: DateTime<Utc>) -> Result<PathBuf, StoreError> {
    let root = dir.join(DIR);
    create_private_dir(&root)?;
    let to = new_folder(&root, &folder_name(at))?;
    sync_dir(&root)?;
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(io_error)?
        .filter_map(|entry| entry.ok().map(|e| e.file_name()))
        .filter(|name| is_store_file(&name.to_string_lossy()))
        .collect();
    names.sort();
    for name in &names {
        std::fs::rename(dir.join(name), to.join(name)).map_err(|e| {
            StoreError::Backend(format!(
                "cannot move {} to {}: {e}",
                dir.join(name).display(),
                to.display()
            ))
        })?;
    }
    sync_dir(&to)?;
    sync_dir(dir)?;
    Ok(to)
}

/// `root/name`, or `root/name-2`, `-3`... if a quarantine in the same second made
/// it already.
fn new_folder(root: &Path, name: &str) -> Result<PathBuf, StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    for n in 1..=100 {
        let path = match n {
            1 => root.join(name),
            n => root.join(format!("{name}-{n}")),
        };
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(StoreError::Backend(format!(
                    "cannot create {}: {e}",
                    path.display()
                )))
            }
        }
    }
    Err(StoreError::Backend(format!(
        "cannot create a quarantine folder in {}: 100 already exist for {name}",
        root.display()
    )))
}

/// One quarantined record as the ledger keeps it: when it was moved aside, and its
/// stored bytes (base64), as JSON.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub at: String,
    pub bytes: String,
}

/// The value the ledger keeps for a record it quarantined at `at`.
pub fn entry(at: DateTime<Utc>, bytes: &[u8]) -> Vec<u8> {
    let e = Entry {
        at: at.to_rfc3339_opts(SecondsFormat::Millis, true),
        bytes: STANDARD.encode(bytes),
    };
    // Two strings: serializing cannot fail.
    serde_json::to_vec(&e).unwrap_or_default()
}

/// The time and bytes of an [`entry`]; `None` for anything else (entries of
/// releases before the time was kept held the bytes alone).
pub fn read_entry(value: &[u8]) -> Option<(String, Vec<u8>)> {
    let e: Entry = serde_json::from_slice(value).ok()?;
    Some((e.at, STANDARD.decode(e.bytes).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: io::ErrorKind) -> io::Error {
        io::Error::new(kind, "x")
    }

    #[test]
    fn a_file_that_is_cut_short_or_not_a_store_is_damage() {
        assert!(io_means_damage(&io(io::ErrorKind::InvalidData)));
        assert!(io_means_damage(&io(io::ErrorKind::UnexpectedEof)));
    }

    #[test]
    fn permissions_a_full_disk_and_a_held_lock_are_not_damage() {
        for kind in [
            io::ErrorKind::PermissionDenied,
            io::ErrorKind::StorageFull,
            io::ErrorKind::ReadOnlyFilesystem,
            io::ErrorKind::WouldBlock,
            io::ErrorKind::NotFound,
            io::ErrorKind::Other,
        ] {
            assert!(!io_means_damage(&io(kind)), "{kind:?}");
        }
    }

    #[test]
    fn redb_corruption_an_old_format_and_a_foreign_table_are_damage() {
        assert!(redb_means_damage(&redb::Error::Corrupted("x".into())));
        assert!(redb_means_damage(&redb::Error::UpgradeRequired(1)));
        assert!(redb_means_damage(&redb::Error::TableIsMultimap("t".into())));
        assert!(redb_means_damage(&redb::Error::Io(io(
            io::ErrorKind::InvalidData
        ))));
    }

    #[test]
    fn redb_in_use_failed_io_and_a_full_disk_are_not_damage() {
        for e in [
            redb::Error::DatabaseAlreadyOpen,
            redb::Error::LockProtocolMismatch,
            redb::Error::PreviousIo,
            redb::Error::Io(io(io::ErrorKind::StorageFull)),
            redb::Error::Io(io(io::ErrorKind::PermissionDenied)),
            redb::Error::ValueTooLarge(1),
        ] {
            assert!(!redb_means_damage(&e), "{e}");
        }
    }

    #[test]
    fn sled_corruption_and_an_unsupported_file_are_damage_and_io_failures_are_not() {
        assert!(sled_means_damage(&sled::Error::Corruption {
            at: None,
            bt: ()
        }));
        assert!(sled_means_damage(&sled::Error::Unsupported("x".into())));
        assert!(sled_means_damage(&sled::Error::Io(io(
            io::ErrorKind::UnexpectedEof
        ))));
        assert!(!sled_means_damage(&sled::Error::Io(io(
            io::ErrorKind::PermissionDenied
        ))));
        assert!(!sled_means_damage(&sled::Error::Io(io(
            io::ErrorKind::StorageFull
        ))));
    }

    #[test]
    fn a_panic_inside_an_open_is_damage_with_its_message() {
        let r: Result<(), _> = guarded(|| panic!("index out of bounds"));
        match r {
            Err(StoreError::Damaged(m)) => assert!(m.contains("index out of bounds"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_store_files_of_both_backends_move_and_nothing_else_does() {
        for name in [
            "store.redb",
            "conf",
            "db",
            "blobs",
            "snap.0000000000001234",
            "compact.new",
            "compact.manifest",
            "migrate.tmp",
        ] {
            assert!(is_store_file(name), "{name}");
        }
        for name in ["quarantine", "ferry.toml", "rules", "store.redb.bak"] {
            assert!(!is_store_file(name), "{name}");
        }
    }

    #[test]
    fn a_quarantine_folder_is_named_by_its_utc_time() {
        let at = DateTime::parse_from_rfc3339("2026-11-30T08:15:00.9+01:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(folder_name(at), "20261130T071500Z");
    }

    #[test]
    fn moving_aside_renames_the_store_files_into_a_new_folder_and_leaves_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("store.redb"), b"damaged").unwrap();
        std::fs::write(dir.path().join("other"), b"not ours").unwrap();
        let at = Utc::now();
        let first = move_aside(dir.path(), at).unwrap();
        assert_eq!(
            first,
            dir.path().join(DIR).join(folder_name(at)),
            "quarantine/<time>"
        );
        assert_eq!(std::fs::read(first.join("store.redb")).unwrap(), b"damaged");
        assert!(!dir.path().join("store.redb").exists());
        assert!(dir.path().join("other").exists());

        // A second one in the same second gets its own folder.
        std::fs::write(dir.path().join("store.redb"), b"again").unwrap();
        let second = move_aside(dir.path(), at).unwrap();
        assert_ne!(first, second);
        assert_eq!(std::fs::read(second.join("store.redb")).unwrap(), b"again");
        assert_eq!(std::fs::read(first.join("store.redb")).unwrap(), b"damaged");
    }

    #[test]
    fn when_the_quarantine_folder_cannot_be_made_nothing_is_moved() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("store.redb"), b"damaged").unwrap();
        // A file where the folder would go: creating it fails, as on a full disk.
        std::fs::write(dir.path().join(DIR), b"").unwrap();
        assert!(move_aside(dir.path(), Utc::now()).is_err());
        assert_eq!(
            std::fs::read(dir.path().join("store.redb")).unwrap(),
            b"damaged"
        );
    }

    #[test]
    fn a_quarantined_record_keeps_its_bytes_and_the_time_it_was_moved() {
        let at = DateTime::parse_from_rfc3339("2026-11-30T08:15:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let value = entry(at, b"{not json\xff");
        let (when, bytes) = read_entry(&value).unwrap();
        assert_eq!(when, "2026-11-30T08:15:00.000Z");
        assert_eq!(bytes, b"{not json\xff");
        assert_eq!(read_entry(b"{not json"), None);
    }
}
