//! The store: a durable, bounded, ordered buffer between the rules and the sinks.
//!
//! Records get consecutive sequence numbers at commit. Each sink has a cursor (the
//! next sequence it has not had accepted upstream); a record is removed only when
//! every sink's cursor has passed it, or when the size bound forces the configured
//! policy, and every such drop is counted.
//!
//! The [`Store`] trait is deliberately narrow (append a batch, read from a cursor,
//! advance a cursor). It is implemented once, by the [`ledger`], on top of a small
//! key-value [`backend`]: [`redb`] (the default) or [`sled`], chosen by measured
//! figures (docs/BENCHMARKS.md). The decisions (does a batch fit, what to trim) are
//! pure functions in this file.

pub mod backend;
#[cfg(test)]
mod damage_test;
pub mod dead_letter;
mod fs;
pub mod ledger;
mod migrate;
#[cfg(test)]
mod model_test;
#[cfg(test)]
mod power_cut_test;
pub mod quarantine;
pub mod redb;
pub mod sled;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{problem, Bytes, Dur, Problem};
pub use dead_letter::{DeadLetter, EventOrigin, NewDeadLetter, Replayed};

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The key-value backend: `redb` (default) or `sled`. See ARCHITECTURE.md for
    /// what each guarantees at a power cut.
    #[serde(default)]
    pub backend: BackendKind,
    /// Upper bound on the bytes of stored records (payloads as stored, not the
    /// files on disk, which sled makes larger: see docs/BENCHMARKS.md). Default 256MiB.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: Bytes,
    /// What happens when a new batch would exceed `max_bytes`: `drop_oldest` removes
    /// the oldest records (counted as `store_full`); `reject_new` stops accepting
    /// input (and so stops acknowledging it) until sinks make room. Default `drop_oldest`.
    #[serde(default)]
    pub when_full: WhenFull,
    /// Memory the backend may use for its page cache. Default 1MiB: the store's
    /// hot pages are the two ends of the record tree (appends and the sinks'
    /// reads), and with a million events buffered the whole agent stays within
    /// 16 MiB (docs/BENCHMARKS.md); more buys a few percent of commit and drain
    /// rate at 1 to 2 MiB of memory per MiB.
    #[serde(default = "default_cache")]
    pub cache_capacity: Bytes,
    /// Dead letters kept (events an upstream refused for good); when more come,
    /// the oldest go (counted as `dead_letters_full`). 0 keeps none. Default 1000.
    #[serde(default = "default_dead_letters_max")]
    pub dead_letters_max: usize,
    /// Bytes of dead letters kept, on top of `max_bytes`. Default 16MiB.
    #[serde(default = "default_dead_letters_max_bytes")]
    pub dead_letters_max_bytes: Bytes,
    /// How long a commit waits after its first input for more to join it. Every
    /// commit is fsync'd and wakes the sinks, so a few milliseconds here turn a
    /// commit per handful of readings into one per a few dozen at everyday rates
    /// (docs/BENCHMARKS.md); it adds at most this much latency. A commit does not
    /// wait once an MQTT source has `broker_inflight` readings in it. `0s` commits
    /// whatever is queued at once. Default 10ms, at most 1s.
    #[serde(default = "default_commit_linger")]
    pub commit_linger: Dur,
}

fn default_commit_linger() -> Dur {
    Dur(std::time::Duration::from_millis(10))
}

fn default_dead_letters_max() -> usize {
    1000
}

fn default_dead_letters_max_bytes() -> Bytes {
    Bytes(16 * 1024 * 1024)
}

fn default_max_bytes() -> Bytes {
    Bytes(256 * 1024 * 1024)
}

/// The smallest `cache_capacity` accepted.
const MIN_CACHE: u64 = 64 * 1024;

fn default_cache() -> Bytes {
    Bytes(1024 * 1024)
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::default(),
            max_bytes: default_max_bytes(),
            when_full: WhenFull::default(),
            cache_capacity: default_cache(),
            dead_letters_max: default_dead_letters_max(),
            dead_letters_max_bytes: default_dead_letters_max_bytes(),
            commit_linger: default_commit_linger(),
        }
    }
}

impl StoreConfig {
    pub fn validate(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if self.max_bytes.0 < 1024 * 1024 {
            out.push(problem!(
                ["store", "max_bytes"],
                "store.max_bytes must be at least 1MiB"
            ));
        }
        // sled asserts a cache of at least 256 bytes (it splits it into 256 shards)
        // and panics otherwise; anything that small would be useless anyway.
        if self.cache_capacity.0 < MIN_CACHE {
            out.push(problem!(
                ["store", "cache_capacity"],
                "store.cache_capacity must be at least 64KiB"
            ));
        }
        if self.dead_letters_max > 1_000_000 {
            out.push(problem!(
                ["store", "dead_letters_max"],
                "store.dead_letters_max must be at most 1000000"
            ));
        }
        if self.dead_letters_max_bytes.0 > 1024 * 1024 * 1024 {
            out.push(problem!(
                ["store", "dead_letters_max_bytes"],
                "store.dead_letters_max_bytes must be at most 1GiB"
            ));
        }
        if self.commit_linger.0 > std::time::Duration::from_secs(1) {
            out.push(problem!(
                ["store", "commit_linger"],
                "store.commit_linger must be at most 1s: every reading waits up to this long"
            ));
        }
        out
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    #[default]
    Redb,
    Sled,
}

/// What [`open`] found.
pub struct Opened {
    pub ledger: ledger::Ledger,
    /// Set when the store's files were damaged and moved aside: `ledger` is then a
    /// fresh store, with a new epoch.
    pub quarantined: Option<Quarantined>,
}

/// A damaged store moved aside by [`open`].
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantined {
    /// The folder that now holds its files, `<data_dir>/quarantine/<UTC time>`.
    pub moved_to: PathBuf,
    /// Why it could not be opened.
    pub error: String,
}

/// Opens (or creates) the store in `dir` with the configured backend, for the
/// given sinks. A sled store left by an earlier release is moved into redb first
/// when redb is configured, so an upgrade keeps the buffered readings.
///
/// A store whose files are damaged or are not a store ([`StoreError::Damaged`], or
/// a panic inside the backend) is moved aside into `dir/quarantine/<UTC time>/`
/// and a fresh store is opened in its place: see [`quarantine`]. Any other failure
/// (in use by another process, permissions, a full disk) is returned as it is,
/// with the files left alone.
pub fn open(dir: &Path, cfg: &StoreConfig, sinks: &[String]) -> Result<Opened, StoreError> {
    match quarantine::guarded(|| open_files(dir, cfg, sinks)) {
        Err(StoreError::Damaged(error)) => {
            let moved_to = quarantine::move_aside(dir, Utc::now()).map_err(|e| {
                StoreError::Backend(format!(
                    "the store's files are damaged ({error}) and cannot be moved aside \
                     (nothing was deleted): {e}"
                ))
            })?;
            // Once: a fresh store that fails too is not retried.
            let ledger = quarantine::guarded(|| open_files(dir, cfg, sinks))?;
            Ok(Opened {
                ledger,
                quarantined: Some(Quarantined { moved_to, error }),
            })
        }
        opened => opened.map(|ledger| Opened {
            ledger,
            quarantined: None,
        }),
    }
}

/// Opens the store as [`open`] does, but leaves a damaged one where it is and
/// returns [`StoreError::Damaged`]: for tools that look into a stopped agent's
/// store (`ferry dead-letters`), which must not replace it behind the agent's back.
pub fn open_as_is(
    dir: &Path,
    cfg: &StoreConfig,
    sinks: &[String],
) -> Result<ledger::Ledger, StoreError> {
    quarantine::guarded(|| open_files(dir, cfg, sinks))
}

fn open_files(
    dir: &Path,
    cfg: &StoreConfig,
    sinks: &[String],
) -> Result<ledger::Ledger, StoreError> {
    let backend: Box<dyn backend::Backend> = match cfg.backend {
        BackendKind::Redb => {
            migrate::sled_to_redb(dir, cfg.cache_capacity.0)?;
            Box::new(redb::RedbBackend::open(dir, cfg.cache_capacity.0)?)
        }
        BackendKind::Sled => {
            if dir.join(redb::FILE).exists() {
                return Err(StoreError::Backend(format!(
                    "{} holds a redb store ({}); set store.backend = \"redb\" to use it",
                    dir.display(),
                    redb::FILE
                )));
            }
            Box::new(sled::SledBackend::open(dir, cfg.cache_capacity.0)?)
        }
    };
    ledger::Ledger::open(backend, cfg, sinks)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    #[default]
    DropOldest,
    RejectNew,
}

/// One stored event, everything a sink needs to build the CloudEvent except the id
/// and sequence, which come from the store position (so they are stable across
/// retries and restarts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// CloudEvents `source`.
    pub source: String,
    /// CloudEvents `type`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// CloudEvents `subject`: the device id.
    pub subject: String,
    /// CloudEvents `time`.
    pub time: DateTime<Utc>,
    /// CloudEvents `data` (JSON). Shared with the events built from it: a sink
    /// sends it as it is, and copying a reading's fields for every event was a
    /// few percent of the CPU a reading costs.
    pub data: Arc<Value>,
    /// Extra CloudEvents extensions (`rule`, `severity`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ext: BTreeMap<String, String>,
    /// Only these sinks get the record; `None` means every sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<String>>,
    /// Set on a replayed dead letter: the epoch and sequence of the record's
    /// first commit, which make its CloudEvents `id` and `sequence`, so the
    /// replay is the same event to the upstream. `None`: its own position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<EventOrigin>,
}

#[cfg(test)]
impl Record {
    /// A reading for tests: subject `d{i}`, data `{"i": i, "pad": "x" × pad}`.
    pub fn test_reading(i: u64, pad: usize) -> Record {
        Record {
            source: "/ferry/t/mqtt/m".into(),
            event_type: "io.ferry.reading".into(),
            subject: format!("d{i}"),
            time: Utc::now(),
            data: Arc::new(serde_json::json!({ "i": i, "pad": "x".repeat(pad) })),
            ext: Default::default(),
            to: None,
            origin: None,
        }
    }
}

impl Record {
    /// The record for a rule's alert: the rule and severity become extensions.
    pub fn alert(alert: ferry_rules::Alert, source: String) -> Self {
        let mut ext = BTreeMap::new();
        ext.insert("rule".to_string(), alert.rule);
        if let Some(s) = alert.severity {
            ext.insert("severity".to_string(), s);
        }
        Record {
            source,
            event_type: alert.event_type,
            subject: alert.device,
            time: alert.time,
            data: Arc::new(alert.data),
            ext,
            to: alert.to,
            origin: None,
        }
    }

    pub fn is_for(&self, sink: &str) -> bool {
        self.to
            .as_ref()
            .is_none_or(|to| to.iter().any(|s| s == sink))
    }
}

/// A record with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub seq: u64,
    pub record: Record,
    /// Its size as stored, for byte budgets.
    pub bytes: usize,
}

/// What one [`Store::read`] found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Read {
    /// The records, in order.
    pub records: Vec<Stored>,
    /// The sequence after the last one looked at, records that could not be
    /// decoded (and were quarantined) included: a sink that is done with `records`
    /// moves its cursor here, so an unreadable record never holds it. Equal to the
    /// `from` of the read when nothing was there.
    pub next: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store is full ({used} of {max} bytes) and store.when_full = reject_new")]
    Full { used: u64, max: u64 },
    /// A single batch larger than `max_bytes`: it cannot fit even in an empty store.
    #[error("a batch of {bytes} bytes cannot fit in a store of {max} bytes")]
    TooLarge { bytes: u64, max: u64 },
    /// The filesystem has no room left for a commit: input waits (is not
    /// acknowledged) until there is.
    #[error("no space left for the store: {0}")]
    NoSpace(String),
    /// Reading or writing the store's files failed.
    #[error("storage I/O error: {0}")]
    Io(String),
    #[error("storage error: {0}")]
    Backend(String),
    /// Another process (a running agent) has the store open. Not damage: the
    /// store is fine, it is only taken.
    #[error("{0}")]
    InUse(String),
    #[error("a stored record cannot be read: {0}")]
    Corrupt(String),
    /// The store's files are damaged or are not a store: [`open`] moves them aside.
    #[error("the store's files are damaged or not a store: {0}")]
    Damaged(String),
}

/// Changes to the rule engine's saved state, one entry per rule and device, so that
/// what a commit writes grows with what changed, not with how many alerts are open.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StateWrite {
    /// Remove every saved entry first (a new rule set, or the first save after a
    /// start): entries of rules that are gone do not linger.
    pub replace_all: bool,
    /// Key and new value; `None` removes the key.
    pub entries: Vec<(String, Option<Vec<u8>>)>,
    /// The delivery windows this commit replaces: MQTT source name and its encoded
    /// window (the deliveries the commit acknowledges, see `crate::redelivery`).
    /// They commit with the records they cover, so a window never names a delivery
    /// that is not stored, nor misses one that is.
    pub deliveries: Vec<(String, Vec<u8>)>,
}

impl StateWrite {
    pub fn is_empty(&self) -> bool {
        !self.replace_all && self.entries.is_empty() && self.deliveries.is_empty()
    }
}

/// The saved rule state, as [`Store::rules_state`] finds it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SavedState {
    /// The whole state as one value, as releases before per-entry keys saved it;
    /// the next `replace_all` removes it.
    pub legacy: Option<Vec<u8>>,
    /// Key and value of every entry, in key order.
    pub entries: Vec<(String, Vec<u8>)>,
}

/// What an append did besides storing the batch.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Appended {
    /// Sequence of the first record of the batch.
    pub first: u64,
    /// Records removed to make room (`drop_oldest`). The store counts them in
    /// `ferry_store_dropped_total{reason="store_full"}` itself, as they are lost:
    /// one a sink was still sending is counted only if it is never delivered.
    pub dropped: u64,
    /// Each record's size as stored, in order ([`Stored::bytes`]).
    pub sizes: Vec<usize>,
}

/// Size and position of what is stored.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Stats {
    pub records: u64,
    pub bytes: u64,
    /// Oldest stored sequence (== `next` when empty).
    pub head: u64,
    /// The sequence the next record will get.
    pub next: u64,
}

/// The store as the pipeline sees it. Calls block (the backends are synchronous):
/// call them from `spawn_blocking` or a blocking-tolerant context.
pub trait Store: Send + Sync + 'static {
    /// Commits a batch durably (fsync) and returns its first sequence. Under
    /// `drop_oldest` old records may be removed to make room; under `reject_new`
    /// returns [`StoreError::Full`] instead. A batch larger than the whole store is
    /// refused with [`StoreError::TooLarge`] under either policy. `state` holds the changes to the rule
    /// engine's saved state that this batch made; they commit in the same
    /// transaction, so an alert event and the state that says it was sent can never
    /// disagree.
    fn append(&self, records: &[Record], state: &StateWrite) -> Result<Appended, StoreError>;
    /// The rule state saved by every `append` so far.
    fn rules_state(&self) -> Result<SavedState, StoreError>;
    /// The delivery window last saved for MQTT source `source` (`StateWrite::deliveries`).
    fn delivery_window(&self, source: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Keeps `files` (an encoded rule set) as the last valid rule set, durably.
    fn save_rule_files(&self, files: &[u8]) -> Result<(), StoreError>;
    /// The last valid rule set saved, if any.
    fn rule_files(&self) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `max` records from sequence `from` on, in order, stopping after the
    /// record that reaches `max_bytes` (at least one record is returned, whatever
    /// its size). A record that cannot be decoded is moved out of the way
    /// (quarantined), counted and logged once, and read past.
    fn read(&self, from: u64, max: usize, max_bytes: usize) -> Result<Read, StoreError>;
    /// The sink's cursor: the next sequence it needs, never below the head.
    fn cursor(&self, sink: &str) -> Result<u64, StoreError>;
    /// Moves the sink's cursor to `to` and removes records every sink has passed.
    fn advance(&self, sink: &str, to: u64) -> Result<(), StoreError>;
    /// Current size and positions.
    fn stats(&self) -> Stats;
    /// A value fixed when the store was created; part of every event id so ids stay
    /// unique if the store is ever recreated.
    fn epoch(&self) -> &str;

    /// [`Store::read`] for `sink`, which holds what it gets until it advances past
    /// it: a record `drop_oldest` removes meanwhile is counted dropped only if the
    /// sink gives it up unsent (it reads again without advancing past it, as after
    /// a restart), never if it delivers it. A record removed between the scan and
    /// this call (already counted) is left out of what it returns.
    fn read_for(
        &self,
        sink: &str,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Read, StoreError>;

    /// For a sink that has the records `[from, to)` in memory, handed over by the
    /// commit that stored them ([`crate::sinks::handoff`]): registers them as read
    /// by `sink`, as [`Store::read_for`] does, without reading them. Returns the
    /// head: records before it were removed to make room (and counted then), and
    /// must not be sent. `None` if a commit holds the store just then: the sink
    /// reads instead, rather than wait for the disk on the async runtime. Does not
    /// block.
    fn take_handed(&self, sink: &str, from: u64, to: u64) -> Option<u64> {
        let _ = (sink, from, to);
        None
    }

    /// Keeps events an upstream refused for good, durably, before the sink moves
    /// its cursor past them. An event already kept for the same sink and sequence
    /// (resent after a crash) is not kept twice. Over the bound, the oldest dead
    /// letters go, counted as `dead_letters_full`.
    fn add_dead_letters(&self, letters: Vec<NewDeadLetter>) -> Result<(), StoreError>;
    /// Every dead letter, oldest first.
    fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError>;
    /// One dead letter by its id.
    fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, StoreError>;
    /// Appends the dead letters `ids` (all with `None`) again, each for its sink
    /// only and with the CloudEvents id it was first sent with, then removes them.
    fn replay_dead_letters(&self, ids: Option<&[u64]>) -> Result<Replayed, StoreError>;
    /// Removes the dead letters `ids` (all with `None`); returns how many went.
    fn purge_dead_letters(&self, ids: Option<&[u64]>) -> Result<u64, StoreError>;
    /// How many dead letters are kept.
    fn dead_letter_count(&self) -> u64;
}

/// How much must go for `incoming` bytes to fit: 0 when it fits.
pub fn overflow(used: u64, incoming: u64, max: u64) -> u64 {
    (used + incoming).saturating_sub(max)
}

/// Everything below the slowest cursor can go. Cursors below `head` (a sink that fell
/// behind a `drop_oldest`) count as `head`.
pub fn trim_point(cursors: impl IntoIterator<Item = u64>, head: u64, next: u64) -> u64 {
    cursors
        .into_iter()
        .map(|c| c.clamp(head, next))
        .min()
        .unwrap_or(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_that_fits_needs_no_room() {
        assert_eq!(overflow(10, 20, 100), 0);
        assert_eq!(overflow(80, 20, 100), 0);
    }

    #[test]
    fn a_batch_that_does_not_fit_needs_exactly_the_excess() {
        assert_eq!(overflow(90, 20, 100), 10);
    }

    #[test]
    fn the_slowest_sink_decides_what_is_trimmed() {
        assert_eq!(trim_point([7, 3, 9], 0, 10), 3);
    }

    #[test]
    fn without_sinks_nothing_is_kept() {
        assert_eq!(trim_point([], 4, 10), 10);
    }

    #[test]
    fn a_sink_behind_the_head_does_not_hold_back_trimming() {
        assert_eq!(trim_point([1, 8], 5, 10), 5);
    }

    #[test]
    fn a_record_with_a_target_list_is_only_for_those_sinks() {
        let mut r = Record {
            source: "/s".into(),
            event_type: "t".into(),
            subject: "d".into(),
            time: Utc::now(),
            data: Value::Null.into(),
            ext: BTreeMap::new(),
            to: None,
            origin: None,
        };
        assert!(r.is_for("cloud"));
        r.to = Some(vec!["phone".into()]);
        assert!(!r.is_for("cloud"));
        assert!(r.is_for("phone"));
    }
}
