//! Damaged store files, hundreds of ways: one byte flipped at many offsets, files
//! cut short at many lengths, empty files, random bytes, a file of another format.
//! Whatever the damage, [`super::open`] returns a store (the damaged one, or a
//! fresh one with the damaged files under `quarantine/<time>/`), never panics and
//! never hangs; and a damaged store that still opens never returns a record other
//! than the one written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{open, quarantine, BackendKind, Opened, Record, StateWrite, Store, StoreConfig};
use crate::config::Bytes;

/// Records in the store that gets damaged.
const RECORDS: u64 = 300;
/// Records every sink has passed (removed before the damage).
const DELIVERED: u64 = 20;
/// One case taking longer than this is a hang.
const CASE_DEADLINE: Duration = Duration::from_secs(60);

fn cfg(backend: BackendKind) -> StoreConfig {
    StoreConfig {
        backend,
        max_bytes: Bytes(1 << 30),
        cache_capacity: Bytes(1 << 20),
        ..StoreConfig::default()
    }
}

fn sinks() -> Vec<String> {
    vec!["a".to_string()]
}

fn record(i: u64) -> Record {
    Record {
        source: "/ferry/gw/mqtt/m".into(),
        event_type: "io.ferry.reading".into(),
        subject: format!("d{}", i % 7),
        time: chrono::Utc::now(),
        data: serde_json::json!({ "i": i, "pad": "x".repeat((i % 40) as usize * 10) }).into(),
        ext: Default::default(),
        to: None,
        origin: None,
    }
}

/// A store as a gateway leaves it: records in many commits, some delivered, rule
/// state. Returns the records still stored, by sequence, and the epoch.
fn fill(dir: &Path, backend: BackendKind, records: u64) -> (BTreeMap<u64, Record>, String) {
    let s = open(dir, &cfg(backend), &sinks()).unwrap().ledger;
    let mut written = BTreeMap::new();
    for chunk in (0..records).collect::<Vec<_>>().chunks(10) {
        let batch: Vec<Record> = chunk.iter().map(|i| record(*i)).collect();
        let state = StateWrite {
            entries: vec![(
                format!("rule\u{0}d{}", chunk[0] % 7),
                Some(b"open".to_vec()),
            )],
            ..StateWrite::default()
        };
        let first = s.append(&batch, &state).unwrap().first;
        for (i, r) in batch.into_iter().enumerate() {
            written.insert(first + i as u64, r);
        }
    }
    s.advance("a", DELIVERED).unwrap();
    written.retain(|seq, _| *seq >= DELIVERED);
    (written, s.epoch().to_string())
}

/// A store's files: path in the data directory, bytes.
type Files = Vec<(PathBuf, Vec<u8>)>;

/// What one case came to.
#[derive(Debug, Default)]
struct Tally {
    cases: usize,
    quarantined: usize,
    opened: usize,
    /// Cases that opened with fewer records than were stored (redb rolling back to
    /// an earlier commit, sled cutting its log): lost without an error.
    opened_short: usize,
    records_lost: u64,
    /// Quarantined files that the backend had written to before it gave up.
    changed_before_move: usize,
    /// Why stores were quarantined (the start of the error), and how often.
    reasons: BTreeMap<String, usize>,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} cases: {} quarantined ({} files changed before the move), \
             {} opened ({} of them with {} records missing)",
            self.cases,
            self.quarantined,
            self.changed_before_move,
            self.opened,
            self.opened_short,
            self.records_lost
        )?;
        for (reason, n) in &self.reasons {
            write!(f, "\n  {n:4} × {reason}")?;
        }
        Ok(())
    }
}

/// Opens the damaged store in `dir` on a thread of its own, failing on a hang.
fn open_within_deadline(dir: &Path, backend: BackendKind, case: &str) -> Opened {
    let (tx, rx) = mpsc::channel();
    let d = dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(open(&d, &cfg(backend), &sinks()));
    });
    match rx.recv_timeout(CASE_DEADLINE) {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => panic!("{case}: the store neither opened nor was quarantined: {e}"),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{case}: open hung"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{case}: open panicked"),
    }
}

/// Opens a damaged store and checks the outcome. `damaged`: the files as they were
/// damaged (name, bytes), which a quarantine must have moved.
/// `strict`: records that come back must be the ones written (redb's checksums);
/// otherwise (sled) only that reading them does not fail or panic.
#[allow(clippy::too_many_arguments)]
fn check(
    dir: &Path,
    damaged: &[(PathBuf, Vec<u8>)],
    backend: BackendKind,
    case: &str,
    written: &BTreeMap<u64, Record>,
    epoch: &str,
    strict: bool,
    tally: &mut Tally,
) {
    tally.cases += 1;
    let opened = open_within_deadline(dir, backend, case);
    let s = opened.ledger;
    match opened.quarantined {
        Some(q) => {
            tally.quarantined += 1;
            let reason: String = q.error.chars().take(45).collect();
            *tally.reasons.entry(reason).or_default() += 1;
            assert!(
                q.moved_to.starts_with(dir.join(quarantine::DIR)),
                "{case}: {q:?}"
            );
            // Every damaged file is there, none left behind, none deleted.
            for (name, bytes) in damaged {
                let moved = std::fs::read(q.moved_to.join(name))
                    .unwrap_or_else(|e| panic!("{case}: {} not moved: {e}", name.display()));
                if &moved != bytes {
                    tally.changed_before_move += 1;
                }
            }
            // A fresh store, and one whose ids cannot be taken for the old one's.
            assert_eq!(s.stats().records, 0, "{case}");
            assert_ne!(s.epoch(), epoch, "{case}");
            s.append(&[record(0)], &StateWrite::default())
                .unwrap_or_else(|e| panic!("{case}: the fresh store refuses input: {e}"));
        }
        None => {
            tally.opened += 1;
            let mut from = 0;
            let mut got = 0u64;
            loop {
                let read = match s.read(from, 100, usize::MAX) {
                    Ok(r) => r,
                    Err(e) if !strict => {
                        let _ = e;
                        break;
                    }
                    Err(e) => panic!("{case}: opened, then a read failed: {e}"),
                };
                if read.next == from {
                    break;
                }
                for r in &read.records {
                    if strict {
                        assert_eq!(
                            Some(&r.record),
                            written.get(&r.seq),
                            "{case}: record {} came back other than written",
                            r.seq
                        );
                    }
                    got += 1;
                }
                from = read.next;
            }
            if got < written.len() as u64 {
                tally.opened_short += 1;
                tally.records_lost += written.len() as u64 - got;
            }
        }
    }
}

/// `bytes` as `name` in a fresh directory.
fn damaged_dir(files: &[(PathBuf, Vec<u8>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, bytes).unwrap();
    }
    dir
}

/// Every file under `dir`, relative, with its bytes.
fn files_of(dir: &Path) -> Files {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), bytes));
            }
        }
    }
    out.sort();
    out
}

/// A small deterministic generator (xorshift64*), so a failing offset can be rerun.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A redb store of [`RECORDS`] records: its file, what it holds, its epoch.
fn redb_store() -> (Vec<u8>, BTreeMap<u64, Record>, String) {
    let dir = tempfile::tempdir().unwrap();
    let (written, epoch) = fill(dir.path(), BackendKind::Redb, RECORDS);
    let bytes = std::fs::read(dir.path().join(super::redb::FILE)).unwrap();
    (bytes, written, epoch)
}

/// The offsets a flip is tried at: every 8th byte of the first 512 (the header and
/// its commit slots), every 64th of the rest of the first page, a stride over the
/// whole file, and random ones.
fn flip_offsets(len: usize) -> Vec<usize> {
    let mut offsets: Vec<usize> = (0..512.min(len)).step_by(8).collect();
    offsets.extend((512..4096.min(len)).step_by(64));
    offsets.extend((0..len).step_by(len / 100 + 1));
    let mut rng = Rng(0x5eed_f00d);
    offsets.extend((0..120).map(|_| rng.below(len)));
    offsets.sort_unstable();
    offsets.dedup();
    offsets
}

#[test]
fn a_redb_store_with_one_byte_flipped_at_any_of_hundreds_of_offsets_opens_or_is_quarantined_and_never_returns_a_wrong_record(
) {
    let started = Instant::now();
    let (pristine, written, epoch) = redb_store();
    let mut tally = Tally::default();
    let offsets = flip_offsets(pristine.len());
    assert!(offsets.len() >= 300, "{} offsets", offsets.len());
    for offset in offsets {
        let mut bytes = pristine.clone();
        bytes[offset] ^= 0x5a;
        let files = [(super::redb::FILE.into(), bytes)];
        let dir = damaged_dir(&files);
        let case = format!("byte {offset} of {} flipped", pristine.len());
        check(
            dir.path(),
            &files,
            BackendKind::Redb,
            &case,
            &written,
            &epoch,
            true,
            &mut tally,
        );
    }
    eprintln!(
        "redb, one byte flipped: {tally}; file {} bytes; {:?}",
        pristine.len(),
        started.elapsed()
    );
}

#[test]
fn a_redb_store_cut_short_at_any_of_many_lengths_opens_or_is_quarantined_and_never_returns_a_wrong_record(
) {
    let started = Instant::now();
    let (pristine, written, epoch) = redb_store();
    let mut tally = Tally::default();
    let len = pristine.len();
    let mut lengths: Vec<usize> = [1, 8, 64, 511, 512, 513, 4095, 4096, 4097]
        .into_iter()
        .chain((0..len).step_by(len / 60 + 1))
        .chain([len - 1])
        .filter(|l| *l > 0 && *l < len)
        .collect();
    lengths.sort_unstable();
    lengths.dedup();
    for cut in lengths {
        let files = [(super::redb::FILE.into(), pristine[..cut].to_vec())];
        let dir = damaged_dir(&files);
        let case = format!("cut to {cut} of {len} bytes");
        check(
            dir.path(),
            &files,
            BackendKind::Redb,
            &case,
            &written,
            &epoch,
            true,
            &mut tally,
        );
    }
    eprintln!("redb, cut short: {tally}; {:?}", started.elapsed());
}

#[test]
fn a_zero_length_random_or_foreign_file_in_place_of_the_redb_store_is_quarantined() {
    let (_, written, epoch) = redb_store();
    let mut tally = Tally::default();
    let mut rng = Rng(42);
    let random: Vec<u8> = (0..100_000).map(|_| rng.next() as u8).collect();
    let sled_dir = tempfile::tempdir().unwrap();
    fill(sled_dir.path(), BackendKind::Sled, 50);
    let sled_db = std::fs::read(sled_dir.path().join("db")).unwrap();
    let cases: [(&str, Vec<u8>); 5] = [
        ("a zero-length file", Vec::new()),
        ("random bytes", random.clone()),
        ("one random byte", random[..1].to_vec()),
        ("a sled log", sled_db),
        (
            "text",
            b"SQLite format 3\0 not a redb file at all\n".repeat(200),
        ),
    ];
    for (what, bytes) in cases {
        let files = [(super::redb::FILE.into(), bytes)];
        let dir = damaged_dir(&files);
        let before = tally.quarantined;
        check(
            dir.path(),
            &files,
            BackendKind::Redb,
            what,
            &written,
            &epoch,
            true,
            &mut tally,
        );
        assert_eq!(tally.quarantined, before + 1, "{what} was not quarantined");
    }
    eprintln!("redb, foreign files: {tally}");
}

#[test]
fn a_quarantined_store_is_moved_whole_and_untouched_and_a_fresh_one_takes_its_place() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(super::redb::FILE), b"not a store").unwrap();
    std::fs::write(dir.path().join("ferry.toml"), b"# not the store's").unwrap();
    let opened = open(dir.path(), &cfg(BackendKind::Redb), &sinks()).unwrap();
    let q = opened.quarantined.expect("quarantined");
    assert!(
        q.error.to_lowercase().contains("not a redb database"),
        "{}",
        q.error
    );
    assert_eq!(
        std::fs::read(q.moved_to.join(super::redb::FILE)).unwrap(),
        b"not a store"
    );
    assert!(dir.path().join("ferry.toml").exists());
    let fresh = opened.ledger;
    fresh.append(&[record(1)], &StateWrite::default()).unwrap();
    drop(fresh);
    // The next start opens the fresh store as any other.
    let again = open(dir.path(), &cfg(BackendKind::Redb), &sinks()).unwrap();
    assert!(again.quarantined.is_none());
    assert_eq!(again.ledger.stats().records, 1);
}

#[test]
fn a_store_in_use_by_another_process_fails_to_open_and_is_not_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let held = open(dir.path(), &cfg(BackendKind::Redb), &sinks()).unwrap();
    let error = open(dir.path(), &cfg(BackendKind::Redb), &sinks())
        .err()
        .expect("refused");
    assert!(error.to_string().contains("in use"), "{error}");
    assert!(!dir.path().join(quarantine::DIR).exists());
    drop(held);
}

#[test]
fn a_store_that_cannot_be_read_fails_to_open_and_is_not_moved_aside() {
    // A directory where the file should be: the file system refuses the read, as
    // with missing permissions (which a test running as root would not see).
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(super::redb::FILE)).unwrap();
    assert!(open(dir.path(), &cfg(BackendKind::Redb), &sinks()).is_err());
    assert!(!dir.path().join(quarantine::DIR).exists());
    assert!(dir.path().join(super::redb::FILE).is_dir());
}

#[test]
fn when_the_quarantine_folder_cannot_be_made_the_start_fails_and_nothing_is_moved_or_deleted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(super::redb::FILE), b"not a store").unwrap();
    std::fs::write(dir.path().join(quarantine::DIR), b"").unwrap();
    let error = open(dir.path(), &cfg(BackendKind::Redb), &sinks())
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("cannot be moved aside"),
        "{error}"
    );
    assert_eq!(
        std::fs::read(dir.path().join(super::redb::FILE)).unwrap(),
        b"not a store"
    );
}

/// sled cuts a damaged log short without an error (ARCHITECTURE.md, Known limits),
/// so all that is asked of it: no crash, no hang, and a store to run on.
#[test]
fn a_damaged_sled_store_opens_or_is_quarantined_without_a_crash_or_a_hang() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (written, epoch) = fill(dir.path(), BackendKind::Sled, 100);
    let pristine = files_of(dir.path());
    let db = pristine
        .iter()
        .position(|(name, _)| name == Path::new("db"))
        .expect("sled's db file");
    let conf = pristine
        .iter()
        .position(|(name, _)| name == Path::new("conf"))
        .expect("sled's conf file");
    let mut tally = Tally::default();
    let mut rng = Rng(7);
    let mut cases: Vec<(String, Files)> = Vec::new();
    let len = pristine[db].1.len();
    for offset in (0..len)
        .step_by(len / 40 + 1)
        .chain((0..20).map(|_| rng.below(len)))
    {
        let mut files = pristine.clone();
        files[db].1[offset] ^= 0x5a;
        cases.push((format!("db byte {offset} of {len} flipped"), files));
    }
    for cut in (0..len).step_by(len / 10 + 1) {
        let mut files = pristine.clone();
        files[db].1.truncate(cut);
        cases.push((format!("db cut to {cut} of {len} bytes"), files));
    }
    let garbage: Vec<u8> = (0..len.max(1000)).map(|_| rng.next() as u8).collect();
    for (file, name) in [(db, "db"), (conf, "conf")] {
        let mut empty = pristine.clone();
        empty[file].1.clear();
        cases.push((format!("a zero-length {name}"), empty));
        let mut random = pristine.clone();
        random[file].1 = garbage.clone();
        cases.push((format!("random bytes as {name}"), random));
    }
    let conf_len = pristine[conf].1.len();
    for offset in 0..conf_len {
        let mut files = pristine.clone();
        files[conf].1[offset] ^= 0x5a;
        cases.push((format!("conf byte {offset} flipped"), files));
    }
    for (case, files) in cases {
        let dir = damaged_dir(&files);
        check(
            dir.path(),
            &files,
            BackendKind::Sled,
            &case,
            &written,
            &epoch,
            false,
            &mut tally,
        );
    }
    eprintln!("sled, damaged: {tally}; {:?}", started.elapsed());
}

#[test]
fn damaged_sled_files_found_at_an_upgrade_to_redb_are_moved_into_redb_or_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let (written, epoch) = fill(dir.path(), BackendKind::Sled, 50);
    let pristine = files_of(dir.path());
    let mut tally = Tally::default();
    let mut rng = Rng(99);
    let garbage: Vec<u8> = (0..5000).map(|_| rng.next() as u8).collect();
    for name in ["db", "conf"] {
        for (what, bytes) in [("empty", Vec::new()), ("random", garbage.clone())] {
            let mut files = pristine.clone();
            for (n, b) in files.iter_mut() {
                if n == Path::new(name) {
                    *b = bytes.clone();
                }
            }
            let dir = damaged_dir(&files);
            check(
                dir.path(),
                &files,
                BackendKind::Redb,
                &format!("{what} {name} at an upgrade"),
                &written,
                &epoch,
                false,
                &mut tally,
            );
        }
    }
    eprintln!("sled to redb, damaged: {tally}");
}

#[test]
fn a_tool_that_opens_a_damaged_store_as_it_is_gets_an_error_and_the_files_stay() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(super::redb::FILE), b"not a store").unwrap();
    match super::open_as_is(dir.path(), &cfg(BackendKind::Redb), &sinks()) {
        Err(super::StoreError::Damaged(_)) => {}
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("opened"),
    }
    assert_eq!(
        std::fs::read(dir.path().join(super::redb::FILE)).unwrap(),
        b"not a store"
    );
    assert!(!dir.path().join(quarantine::DIR).exists());
}
