//! Power cuts, simulated: does an acknowledged reading survive losing everything
//! the drive had not been told to make stable?
//!
//! In the spirit of ALICE (OSDI '14) and SQLite's crash tests. The real ledger on
//! the real redb backend runs a workload like the agent's (appends of batches with
//! their rule state, as the commit task makes them; sinks reading and moving their
//! cursors; `drop_oldest` fills in a small store; rule-file saves; restarts), on a
//! storage that keeps its file in memory and records every write, length change
//! and sync it is asked for. Each append notes where in that record it returned:
//! from there on the agent would have sent its PUBACKs.
//!
//! Then, for many cut points (just before and just after every sync, and points in
//! between), the file is rebuilt from what had been synced before the cut plus a
//! choice of the writes that had not: none, all, a random subset, or a subset and
//! one write torn at a 512-byte sector (each of its sectors kept or not). The image
//! is opened as the agent would open it after the power came back, and must either
//! refuse to open with an error, or hold every acknowledged record with its exact
//! content and sequence, never reuse a sequence that was handed out, agree with its
//! own statistics, and hold a rule state and rule files some commit really left.
//! A panic is a failure. The same harness on a storage that acknowledges before it
//! syncs is shown to catch the loss, so the check can fail.
//!
//! `FERRY_POWER_CUT_POINTS` sets how many cut points (default [`DEFAULT_POINTS`])
//! and `FERRY_POWER_CUT_SEED` the seed; the counts are printed
//! (`cargo test -p ferry-agent --lib power_cut -- --nocapture`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use chrono::{TimeZone, Utc};
use redb::StorageBackend;

use super::ledger::Ledger;
use super::redb::RedbBackend;
use super::{BackendKind, Record, SavedState, StateWrite, Store, StoreConfig, WhenFull};
use crate::config::Bytes;

/// Cut points checked by default: a few seconds in a debug build.
const DEFAULT_POINTS: usize = 400;
const DEFAULT_SEED: u64 = 0x00f0_e77e;
/// The unit a drive writes whole or not at all.
const SECTOR: u64 = 512;
const SINKS: [&str; 2] = ["cloud", "archive"];
/// Small, so that `drop_oldest` fills happen.
const MAX_BYTES: u64 = 24_000;
const CACHE: u64 = 256 * 1024;
/// An emptied store whose file is larger than this is compacted (at most once per
/// start), so cuts land in compactions too.
const COMPACT_ABOVE: u64 = 64 * 1024;

/// One call the store made to its storage.
#[derive(Debug, Clone, PartialEq)]
enum Io {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
    Sync,
}

/// When a sync reaches the drive.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Syncs {
    /// When it is asked for, before `sync_data` returns.
    Honest,
    /// Only when the next write comes: a storage that acknowledges before it syncs.
    Late,
}

#[derive(Debug)]
struct Disk {
    /// The file as the process sees it (the page cache).
    file: Vec<u8>,
    log: Vec<Io>,
    syncs: Syncs,
    sync_owed: bool,
}

impl Disk {
    fn pay_owed_sync(&mut self) {
        if self.sync_owed {
            self.sync_owed = false;
            self.log.push(Io::Sync);
        }
    }
}

/// An in-memory file that records what is done to it.
#[derive(Debug, Clone)]
struct Recording(Arc<Mutex<Disk>>);

impl Recording {
    fn new(syncs: Syncs) -> Self {
        Self::holding(Vec::new(), syncs)
    }

    fn holding(file: Vec<u8>, syncs: Syncs) -> Self {
        Recording(Arc::new(Mutex::new(Disk {
            file,
            log: Vec::new(),
            syncs,
            sync_owed: false,
        })))
    }

    fn disk(&self) -> std::sync::MutexGuard<'_, Disk> {
        // Poisoned only by a panic in another test thread's check, which is reported.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the log is now: what an operation that returns here has seen done.
    fn mark(&self) -> usize {
        self.disk().log.len()
    }
}

impl StorageBackend for Recording {
    fn len(&self) -> io::Result<u64> {
        Ok(self.disk().file.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let disk = self.disk();
        let from = usize::try_from(offset).map_err(io::Error::other)?;
        let src = from
            .checked_add(out.len())
            .and_then(|to| disk.file.get(from..to))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut disk = self.disk();
        disk.pay_owed_sync();
        apply(&mut disk.file, &Io::SetLen(len));
        disk.log.push(Io::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut disk = self.disk();
        match disk.syncs {
            Syncs::Honest => disk.log.push(Io::Sync),
            Syncs::Late => disk.sync_owed = true,
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut disk = self.disk();
        disk.pay_owed_sync();
        let op = Io::Write {
            offset,
            bytes: data.to_vec(),
        };
        apply(&mut disk.file, &op);
        disk.log.push(op);
        Ok(())
    }
}

fn apply(file: &mut Vec<u8>, op: &Io) {
    match op {
        Io::Write { offset, bytes } => write_at(file, *offset, bytes),
        Io::SetLen(len) => file.resize(*len as usize, 0),
        Io::Sync => {}
    }
}

fn write_at(file: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let from = offset as usize;
    let to = from + bytes.len();
    if file.len() < to {
        file.resize(to, 0);
    }
    file[from..to].copy_from_slice(bytes);
}

/// splitmix64: small, seeded, so every image can be rebuilt from its numbers.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

fn cfg() -> StoreConfig {
    StoreConfig {
        backend: BackendKind::Redb,
        max_bytes: Bytes(MAX_BYTES),
        when_full: WhenFull::DropOldest,
        cache_capacity: Bytes(CACHE),
        ..StoreConfig::default()
    }
}

fn sinks() -> Vec<String> {
    SINKS.iter().map(|s| s.to_string()).collect()
}

fn open(storage: Recording) -> Result<Ledger, String> {
    let backend = RedbBackend::on_storage(storage, CACHE).map_err(|e| e.to_string())?;
    Ledger::open(Box::new(backend), &cfg(), &sinks())
        .map(|l| l.with_compact_above(COMPACT_ABOVE))
        .map_err(|e| e.to_string())
}

fn reading(n: u64, pad: usize) -> Record {
    Record {
        source: "/ferry/gw-1/mqtt/plant".into(),
        event_type: "io.ferry.reading".into(),
        subject: format!("sensor-{}", n % 7),
        time: Utc
            .timestamp_opt(1_700_000_000 + n as i64, 0)
            .single()
            .expect("a valid time"),
        data: serde_json::json!({ "n": n, "celsius": 20.5, "pad": "x".repeat(pad) }).into(),
        ext: Default::default(),
        to: None,
        origin: None,
    }
}

/// A record as appended: what must come back, and when it was acknowledged.
struct Appended {
    record: Record,
    /// Log position when its append was called and when it returned.
    start: usize,
    ack: usize,
    /// Log position when an operation that removed it began (a trim or a fill).
    removed_at: Option<usize>,
}

/// Something durable that the store holds one version of (rule state, rule files):
/// each version with where its commit began and returned.
struct Version<T> {
    start: usize,
    ack: usize,
    value: T,
}

/// Everything the workload did, positioned in the storage's log.
struct History {
    log: Vec<Io>,
    /// By sequence.
    records: BTreeMap<u64, Appended>,
    states: Vec<Version<SavedState>>,
    rule_files: Vec<Version<Option<Vec<u8>>>>,
    /// Per sink: (where the move began, to).
    advances: HashMap<String, Vec<(usize, u64)>>,
    epoch: String,
    /// Where the first open returned: the epoch is durable from there.
    created: usize,
    fills: u64,
    restarts: u64,
    /// Times the file was made shorter (a compaction, or redb trimming free space at its end).
    shrinks: usize,
}

/// Runs the agent-like workload until the log offers `points` cut points.
fn workload(seed: u64, points: usize, syncs: Syncs) -> History {
    let mut rng = Rng::new(seed);
    let storage = Recording::new(syncs);
    let mut store = Some(open(storage.clone()).expect("a new store opens"));
    let mut h = History {
        log: Vec::new(),
        records: BTreeMap::new(),
        states: vec![Version {
            start: 0,
            ack: 0,
            value: SavedState::default(),
        }],
        rule_files: vec![Version {
            start: 0,
            ack: 0,
            value: None,
        }],
        advances: HashMap::new(),
        epoch: store
            .as_ref()
            .map(|s| s.epoch().to_string())
            .unwrap_or_default(),
        created: storage.mark(),
        fills: 0,
        restarts: 0,
        shrinks: 0,
    };
    let mut present: Vec<u64> = Vec::new();
    let mut n = 0u64;
    let mut batches = 0u64;
    // Each sync gives about three cut points (before, after, one in between).
    let syncs_wanted = points.div_ceil(3);
    let synced = |s: &Recording| s.disk().log.iter().filter(|op| **op == Io::Sync).count();
    while synced(&storage) < syncs_wanted || store.is_none() {
        let s = store.get_or_insert_with(|| {
            open(storage.clone()).expect("the store reopens after a clean stop")
        });
        let start = storage.mark();
        let roll = rng.below(100);
        if roll < 50 {
            // A batch as the commit task makes it: readings, and the rule state
            // entries they changed.
            batches += 1;
            let count = 1 + rng.below(4);
            let records: Vec<Record> = (0..count)
                .map(|_| {
                    n += 1;
                    let pad = if rng.percent(15) {
                        1_500 + rng.below(4_000)
                    } else {
                        rng.below(300)
                    };
                    reading(n, pad as usize)
                })
                .collect();
            let mut state = StateWrite {
                replace_all: rng.percent(5),
                ..StateWrite::default()
            };
            for _ in 0..rng.below(3) {
                let key = format!("overheat/sensor-{}", rng.below(7));
                let value =
                    (!rng.percent(20)).then(|| format!("open since {batches}").into_bytes());
                state.entries.push((key, value));
            }
            let appended = s.append(&records, &state).expect("an append commits");
            let ack = storage.mark();
            if appended.dropped > 0 {
                h.fills += 1;
            }
            for (i, record) in records.into_iter().enumerate() {
                h.records.insert(
                    appended.first + i as u64,
                    Appended {
                        record,
                        start,
                        ack,
                        removed_at: None,
                    },
                );
            }
            h.states.push(Version {
                start,
                ack,
                value: s.rules_state().expect("the rule state reads back"),
            });
        } else if roll < 53 {
            // Both sinks catch up after an outage: the store empties, and its file
            // is compacted.
            for sink in SINKS {
                let to = s.stats().next;
                s.advance(sink, to).expect("a cursor moves");
                h.advances
                    .entry(sink.to_string())
                    .or_default()
                    .push((start, to));
            }
        } else if roll < 85 {
            // A sink delivers what it reads and moves past it (a lazy commit).
            let sink = SINKS[usize::from(roll >= 72)];
            let from = s.cursor(sink).expect("a cursor");
            let max = 1 + rng.below(8) as usize;
            let read = s.read(from, max, usize::MAX).expect("a read");
            s.advance(sink, read.next).expect("a cursor moves");
            h.advances
                .entry(sink.to_string())
                .or_default()
                .push((start, read.next));
        } else if roll < 95 {
            let files = vec![b'0' + rng.below(10) as u8; 100 + rng.below(3_000) as usize];
            s.save_rule_files(&files).expect("rule files save");
            h.rule_files.push(Version {
                start,
                ack: storage.mark(),
                value: Some(files),
            });
        } else {
            // A clean stop; the next step starts the agent again.
            store = None;
            h.restarts += 1;
            continue;
        }
        // What that step removed (a fill or a trim), and from where.
        let now: Vec<u64> = s
            .read(0, usize::MAX, usize::MAX)
            .expect("a read")
            .records
            .iter()
            .map(|r| r.seq)
            .collect();
        for seq in present.iter().filter(|seq| !now.contains(seq)) {
            if let Some(a) = h.records.get_mut(seq) {
                a.removed_at.get_or_insert(start);
            }
        }
        present = now;
    }
    drop(store);
    h.log = std::mem::take(&mut storage.disk().log);
    let mut len = 0;
    for op in &h.log {
        if let Io::SetLen(to) = op {
            h.shrinks += usize::from(*to < len);
            len = *to;
        }
    }
    h
}

/// What happened to the writes not yet synced at the cut.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// None reached the disk.
    Dropped,
    /// All did (what a process crash leaves).
    Applied,
    /// Each did or did not.
    Subset,
    /// Each before one write did or did not; that write reached the disk in some
    /// of its sectors only; none after it did.
    Torn,
}

const FATES: [Fate; 4] = [Fate::Dropped, Fate::Applied, Fate::Subset, Fate::Torn];

/// The file after the power came back, given the synced file and the writes since.
fn rebuild(synced: &[u8], unsynced: &[Io], fate: Fate, rng: &mut Rng) -> Vec<u8> {
    let mut file = synced.to_vec();
    match fate {
        Fate::Dropped => {}
        Fate::Applied => unsynced.iter().for_each(|op| apply(&mut file, op)),
        Fate::Subset => {
            for op in unsynced {
                if rng.percent(50) {
                    apply(&mut file, op);
                }
            }
        }
        Fate::Torn => {
            let writes: Vec<usize> = (0..unsynced.len())
                .filter(|&i| matches!(unsynced[i], Io::Write { .. }))
                .collect();
            // Prefer a write that spans sectors: one that does not cannot tear.
            let spanning: Vec<usize> = writes
                .iter()
                .copied()
                .filter(|&i| match &unsynced[i] {
                    Io::Write { offset, bytes } => {
                        offset / SECTOR != (offset + bytes.len() as u64 - 1) / SECTOR
                    }
                    _ => false,
                })
                .collect();
            let pool = if spanning.is_empty() {
                &writes
            } else {
                &spanning
            };
            let Some(&torn) = pool.get(rng.below(pool.len() as u64) as usize) else {
                return file;
            };
            for op in &unsynced[..torn] {
                if rng.percent(50) {
                    apply(&mut file, op);
                }
            }
            if let Io::Write { offset, bytes } = &unsynced[torn] {
                let mut at = *offset;
                let end = offset + bytes.len() as u64;
                while at < end {
                    let next = ((at / SECTOR) + 1) * SECTOR;
                    let upto = next.min(end);
                    if rng.percent(50) {
                        let from = (at - offset) as usize;
                        let to = (upto - offset) as usize;
                        write_at(&mut file, at, &bytes[from..to]);
                    }
                    at = upto;
                }
            }
        }
    }
    file
}

/// What opening one image showed.
enum Verdict {
    /// Opened, and everything acknowledged was there: how many records that was.
    Kept(usize),
    /// Refused to open (or to be read) with an error the agent reports.
    Refused(String),
    /// Opened, but lost or changed something it had acknowledged.
    Wrong(String),
}

/// Opens an image as the agent would after the power came back, and checks it
/// against everything acknowledged before log position `cut`.
fn check(image: Vec<u8>, h: &History, cut: usize) -> Verdict {
    let store = match open(Recording::holding(image, Syncs::Honest)) {
        Ok(s) => s,
        Err(e) => return Verdict::Refused(e),
    };
    let read = match store.read(0, usize::MAX, usize::MAX) {
        Ok(r) => r,
        Err(e) => return Verdict::Refused(format!("opened, then a read failed: {e}")),
    };
    let mut wrong = Vec::new();
    let found: BTreeMap<u64, _> = read.records.iter().map(|s| (s.seq, s)).collect();

    // Never wrong data: what is there was appended, under this sequence.
    for (seq, stored) in &found {
        match h.records.get(seq) {
            None => wrong.push(format!("seq {seq} was never appended")),
            Some(a) if a.start >= cut => wrong.push(format!(
                "seq {seq} is there but its append began after the cut"
            )),
            Some(a) if a.record != stored.record => wrong.push(format!(
                "seq {seq} holds {:?}, not what was appended",
                stored.record.data
            )),
            Some(_) => {}
        }
    }
    // Every acknowledged record that nothing had begun to remove is there.
    let mut kept = 0;
    let mut lost = Vec::new();
    for (seq, a) in &h.records {
        let owed = a.ack <= cut && a.removed_at.is_none_or(|at| at >= cut);
        if owed {
            if found.contains_key(seq) {
                kept += 1;
            } else {
                lost.push(*seq);
            }
        }
    }
    if !lost.is_empty() {
        wrong.push(format!(
            "lost {} acknowledged record(s): seq {:?}",
            lost.len(),
            lost
        ));
    }

    // The statistics agree with what a read finds.
    let st = store.stats();
    let bytes: u64 = read.records.iter().map(|s| s.bytes as u64).sum();
    let head = found.keys().next().copied().unwrap_or(st.next);
    let last_next = found.keys().next_back().map_or(0, |s| s + 1);
    if st.records != found.len() as u64 || st.bytes != bytes || st.head != head {
        wrong.push(format!(
            "stats {st:?} but a read finds {} records, {bytes} bytes, head {head}",
            found.len()
        ));
    }
    if st.next < last_next {
        wrong.push(format!(
            "next {} is below a stored seq {}",
            st.next,
            last_next - 1
        ));
    }

    // Rule state and rule files: exactly what one commit left, not older than the
    // last acknowledged one.
    match store.rules_state() {
        Ok(state) => {
            if !one_of(&h.states, cut, &state) {
                wrong.push(format!("rule state {state:?} was never committed there"));
            }
        }
        Err(e) => return Verdict::Refused(format!("opened, then the rule state failed: {e}")),
    }
    match store.rule_files() {
        Ok(files) => {
            if !one_of(&h.rule_files, cut, &files) {
                wrong.push(format!(
                    "rule files of {:?} bytes were never committed there",
                    files.map(|f| f.len())
                ));
            }
        }
        Err(e) => return Verdict::Refused(format!("opened, then the rule files failed: {e}")),
    }

    // A cursor is never ahead of where its sink had moved it (that would skip
    // records the sink never delivered).
    for sink in SINKS {
        let moved = h
            .advances
            .get(sink)
            .and_then(|moves| moves.iter().filter(|(at, _)| *at < cut).map(|m| m.1).max())
            .unwrap_or(0);
        match store.cursor(sink) {
            Ok(c) if c > moved.max(st.head) => wrong.push(format!(
                "cursor of {sink} at {c}, but it was never moved past {moved}"
            )),
            Ok(_) => {}
            Err(e) => wrong.push(format!("cursor of {sink}: {e}")),
        }
    }
    if cut >= h.created && store.epoch() != h.epoch {
        wrong.push(format!("epoch {} is not {}", store.epoch(), h.epoch));
    }

    // Sequences are never reused: the next reading gets a new one.
    let acked_next = h
        .records
        .iter()
        .filter(|(_, a)| a.ack <= cut)
        .map(|(seq, _)| seq + 1)
        .max()
        .unwrap_or(0);
    match store.append(&[reading(0, 0)], &StateWrite::default()) {
        Ok(a) if a.first < acked_next => wrong.push(format!(
            "the next append got seq {}, but {} was acknowledged",
            a.first,
            acked_next - 1
        )),
        Ok(_) => {}
        Err(e) => return Verdict::Refused(format!("opened, then an append failed: {e}")),
    }

    if wrong.is_empty() {
        Verdict::Kept(kept)
    } else {
        Verdict::Wrong(wrong.join("; "))
    }
}

/// Whether `value` is what one of the commits that may have reached the disk left:
/// the last acknowledged before the cut, or one begun after it and before the cut.
fn one_of<T: PartialEq>(versions: &[Version<T>], cut: usize, value: &T) -> bool {
    let last_acked = versions.iter().rposition(|v| v.ack <= cut).unwrap_or(0);
    versions[last_acked..]
        .iter()
        .take_while(|v| v.start < cut || v.ack <= cut)
        .any(|v| v.value == *value)
}

/// What a run found.
#[derive(Default)]
struct Report {
    log_ops: usize,
    syncs: usize,
    cut_points: usize,
    images: usize,
    opened: usize,
    refused: usize,
    /// Acknowledged records found intact, summed over the opened images.
    acknowledged_checked: usize,
    records: usize,
    fills: u64,
    restarts: u64,
    shrinks: usize,
    refusals: BTreeMap<String, usize>,
    /// Refusals of images cut after the store's creation was acknowledged: the
    /// agent could not start again on a store that held acknowledged readings.
    refused_after_first_ack: Vec<String>,
    wrong: Vec<String>,
    panics: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} storage calls ({} syncs), {} records appended, {} fills, {} restarts, \
             the file shrank {} times",
            self.log_ops, self.syncs, self.records, self.fills, self.restarts, self.shrinks
        )?;
        writeln!(
            f,
            "{} cut points, {} images: {} opened, {} refused, {} wrong, {} panicked; \
             {} acknowledged records checked",
            self.cut_points,
            self.images,
            self.opened,
            self.refused,
            self.wrong.len(),
            self.panics.len(),
            self.acknowledged_checked
        )?;
        for (e, n) in &self.refusals {
            writeln!(f, "  refused {n}x: {e}")?;
        }
        for r in self.refused_after_first_ack.iter().take(5) {
            writeln!(f, "  refused after the first acknowledgement: {r}")?;
        }
        for w in self.wrong.iter().take(5) {
            writeln!(f, "  wrong: {w}")?;
        }
        for p in self.panics.iter().take(5) {
            writeln!(f, "  panic: {p}")?;
        }
        Ok(())
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The cut points: just before and just after every sync, and one in between.
fn cut_points(log: &[Io], rng: &mut Rng) -> Vec<usize> {
    let mut points = vec![0, log.len()];
    let mut after_last_sync = 0;
    for (i, op) in log.iter().enumerate() {
        if *op == Io::Sync {
            if i > after_last_sync + 1 {
                points.push(
                    after_last_sync + 1 + rng.below((i - after_last_sync - 1) as u64) as usize,
                );
            }
            points.push(i);
            points.push(i + 1);
            after_last_sync = i + 1;
        }
    }
    points.sort_unstable();
    points.dedup();
    points
}

fn simulate(syncs: Syncs, points: usize) -> Report {
    let seed = env_or("FERRY_POWER_CUT_SEED", DEFAULT_SEED);
    let h = workload(seed, points, syncs);
    let mut rng = Rng::new(seed ^ 0x00c0_ffee);
    let cuts = cut_points(&h.log, &mut rng);
    let mut report = Report {
        log_ops: h.log.len(),
        syncs: h.log.iter().filter(|op| **op == Io::Sync).count(),
        cut_points: cuts.len(),
        records: h.records.len(),
        fills: h.fills,
        restarts: h.restarts,
        shrinks: h.shrinks,
        ..Report::default()
    };

    // The file as of the last sync before the cut, built up as the cuts move on.
    let mut synced = Vec::new();
    let mut synced_upto = 0;
    for &cut in &cuts {
        let last_sync_end = h.log[..cut]
            .iter()
            .rposition(|op| *op == Io::Sync)
            .map_or(0, |i| i + 1);
        for op in &h.log[synced_upto..last_sync_end] {
            apply(&mut synced, op);
        }
        synced_upto = last_sync_end;
        let unsynced = &h.log[last_sync_end..cut];
        let fates: &[Fate] = if unsynced.is_empty() {
            &FATES[..1]
        } else {
            &FATES
        };
        for &fate in fates {
            let image_seed = seed ^ ((cut as u64) << 8) ^ fate as u64;
            let image = rebuild(&synced, unsynced, fate, &mut Rng::new(image_seed));
            report.images += 1;
            let at = format!(
                "cut {cut} of {} ({fate:?}, image seed {image_seed:#x})",
                h.log.len()
            );
            match catch_unwind(AssertUnwindSafe(|| check(image, &h, cut))) {
                Ok(Verdict::Kept(n)) => {
                    report.opened += 1;
                    report.acknowledged_checked += n;
                }
                Ok(Verdict::Refused(e)) => {
                    report.refused += 1;
                    if cut >= h.created {
                        report.refused_after_first_ack.push(format!("{at}: {e}"));
                    }
                    *report.refusals.entry(format!("{fate:?}: {e}")).or_default() += 1;
                }
                Ok(Verdict::Wrong(w)) => {
                    report.opened += 1;
                    report.wrong.push(format!("{at}: {w}"));
                }
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    report.panics.push(format!("{at}: {msg}"));
                }
            }
        }
    }
    report
}

#[test]
fn every_reading_acknowledged_before_a_power_cut_is_there_after_it() {
    let report = simulate(
        Syncs::Honest,
        env_or("FERRY_POWER_CUT_POINTS", DEFAULT_POINTS),
    );
    println!("power cut, redb:\n{report}");
    assert!(
        report.fills > 0 && report.restarts > 0 && report.shrinks > 0,
        "{report}"
    );
    assert!(report.acknowledged_checked > 0, "{report}");
    // Only a cut while the store's file is first created may leave a file redb
    // refuses ("not a redb database"): nothing was acknowledged yet.
    assert!(
        report.wrong.is_empty()
            && report.panics.is_empty()
            && report.refused_after_first_ack.is_empty(),
        "{report}"
    );
}

#[test]
fn a_store_that_acknowledges_before_syncing_is_caught_losing_readings() {
    // Fewer cut points: one lost acknowledgement is enough to show it.
    let report = simulate(Syncs::Late, 100);
    println!("power cut, syncs after the acknowledgement:\n{report}");
    assert!(
        report.wrong.iter().any(|w| w.contains("lost")),
        "the harness did not notice acknowledged readings lost:\n{report}"
    );
}
