//! A commit's records, handed to the sinks in memory.
//!
//! At everyday rates a sink is caught up: each commit wakes it, and it sends what
//! that commit stored. Reading those records back cost, per commit, a trip to the
//! blocking pool and back and a decode of every record, to get what the commit
//! task had in memory a moment before. So the commit task leaves its last batch
//! here, and a sink whose cursor is where that batch starts takes it from here. A
//! sink that is behind (after an outage, at start, after a replay) reads the store
//! as before.
//!
//! The store still learns what the sink holds ([`Store::take_handed`]), so that
//! `drop_oldest` counts stay exact; if a commit holds the store's lock just then
//! (it holds it through its fsync), the sink reads instead of waiting for the disk
//! on the async runtime.

use std::ops::{Deref, Range};
use std::sync::{Arc, Mutex};

use crate::store::{Record, Store, Stored};

/// The largest commit handed over, in records and in stored bytes. Everyday rates
/// commit a broker's window at a time (tens of readings); a larger batch means a
/// burst or a backlog, when the sink reads at its own pace anyway, and holding the
/// batch in memory as well raised the peak at full speed.
const MAX_RECORDS: usize = 256;
const MAX_BYTES: usize = 256 * 1024;

/// The records one commit stored, in order from sequence `first`.
#[derive(Debug)]
pub struct Committed {
    first: u64,
    records: Vec<Stored>,
}

/// The last commit's records, for the sinks.
#[derive(Debug, Default)]
pub struct Handoff(Mutex<Option<Arc<Committed>>>);

impl Handoff {
    /// Leaves the records of a commit from sequence `first` for the sinks, in
    /// place of the commit before; `sizes` are their stored sizes, in order
    /// (`Appended::sizes`). An empty commit, or one over [`MAX_RECORDS`] or
    /// [`MAX_BYTES`], leaves nothing.
    pub fn offer(&self, first: u64, records: Vec<Record>, sizes: &[usize]) {
        let bytes: usize = sizes.iter().sum();
        if records.is_empty() || records.len() > MAX_RECORDS || bytes > MAX_BYTES {
            return self.clear();
        }
        let records = records
            .into_iter()
            .zip(sizes)
            .zip(first..)
            .map(|((record, &bytes), seq)| Stored { seq, record, bytes })
            .collect();
        self.set(Some(Arc::new(Committed { first, records })));
    }

    /// Leaves nothing: no sink is caught up with the last commit.
    pub fn clear(&self) {
        self.set(None);
    }

    fn set(&self, last: Option<Arc<Committed>>) {
        // Held only to swap or clone an `Arc`: a poisoned lock still holds a whole one.
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = last;
    }

    /// The last commit's records, if they start at `from`.
    fn starting_at(&self, from: u64) -> Option<Arc<Committed>> {
        let last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref().filter(|c| c.first == from).cloned()
    }

    /// What `sink`, whose cursor is `from`, reads next if it is the last commit's
    /// records: at most `max` of them, stopping after the one that reaches
    /// `max_bytes` (at least one), as [`Store::read`] counts. Returns them with the
    /// sequence after them; `None` to read the store instead.
    pub fn take(
        &self,
        store: &dyn Store,
        sink: &str,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Option<(Records, u64)> {
        let committed = self.starting_at(from)?;
        let n = within(&committed.records, max, max_bytes);
        let next = from + n as u64;
        let head = store.take_handed(sink, from, next)?;
        // Removed to make room since they were committed (and counted then).
        let kept = usize::try_from(head.saturating_sub(from)).map_or(n, |gone| gone.min(n));
        Some((Records::Handed(committed, kept..n), next))
    }
}

/// How many of `records` one read takes: at most `max`, stopping after the record
/// that reaches `max_bytes`, and at least one.
fn within(records: &[Stored], max: usize, max_bytes: usize) -> usize {
    let mut bytes = 0usize;
    let mut n = 0;
    for r in records {
        if n >= max.max(1) || (n > 0 && bytes >= max_bytes) {
            break;
        }
        bytes = bytes.saturating_add(r.bytes);
        n += 1;
    }
    n
}

/// Records a sink sends: read from the store, or handed over by their commit.
#[derive(Debug)]
pub enum Records {
    Read(Vec<Stored>),
    Handed(Arc<Committed>, Range<usize>),
}

impl Deref for Records {
    type Target = [Stored];

    fn deref(&self) -> &[Stored] {
        match self {
            Records::Read(records) => records,
            // In range by construction (`Handoff::take`); empty rather than panic.
            Records::Handed(committed, range) => {
                committed.records.get(range.clone()).unwrap_or_default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Bytes;
    use crate::store::{ledger::Ledger, StateWrite, StoreConfig, WhenFull};

    fn record(i: u64, pad: usize) -> Record {
        Record::test_reading(i, pad)
    }

    fn store(dir: &std::path::Path, max_bytes: u64) -> Ledger {
        let cfg = StoreConfig {
            max_bytes: Bytes(max_bytes),
            when_full: WhenFull::DropOldest,
            ..StoreConfig::default()
        };
        crate::store::open_as_is(dir, &cfg, &["a".to_string()]).unwrap()
    }

    /// Appends `records` and hands them over, as the commit task does.
    fn commit(store: &Ledger, handoff: &Handoff, records: Vec<Record>) -> u64 {
        let appended = store.append(&records, &StateWrite::default()).unwrap();
        handoff.offer(appended.first, records, &appended.sizes);
        appended.first
    }

    fn seqs(records: &Records) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn a_sink_whose_cursor_is_where_the_last_commit_starts_takes_its_records_as_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (store, handoff) = (store(dir.path(), 1 << 30), Handoff::default());
        commit(&store, &handoff, vec![record(0, 0)]);
        let first = commit(&store, &handoff, (1..4).map(|i| record(i, 0)).collect());

        let (handed, next) = handoff.take(&store, "a", first, 100, usize::MAX).unwrap();
        let read = store.read(first, 100, usize::MAX).unwrap();
        assert_eq!(seqs(&handed), [1, 2, 3]);
        assert_eq!(next, read.next);
        assert_eq!(
            &*handed,
            &read.records[..],
            "the same records, sequences and sizes"
        );
    }

    #[test]
    fn a_sink_behind_the_last_commit_reads_the_store_instead() {
        let dir = tempfile::tempdir().unwrap();
        let (store, handoff) = (store(dir.path(), 1 << 30), Handoff::default());
        commit(&store, &handoff, vec![record(0, 0)]);
        let first = commit(&store, &handoff, vec![record(1, 0)]);
        assert!(handoff
            .take(&store, "a", first - 1, 100, usize::MAX)
            .is_none());
        assert!(handoff
            .take(&store, "a", first + 1, 100, usize::MAX)
            .is_none());
    }

    #[test]
    fn a_handed_batch_stops_where_a_read_would_by_count_and_by_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, handoff) = (store(dir.path(), 1 << 30), Handoff::default());
        let first = commit(&store, &handoff, (0..5).map(|i| record(i, 100)).collect());
        let one = handoff.take(&store, "a", first, 5, usize::MAX).unwrap().0[0].bytes;
        for (max, max_bytes) in [(2, usize::MAX), (5, one + 1), (5, 1), (5, 3 * one)] {
            let (handed, next) = handoff.take(&store, "a", first, max, max_bytes).unwrap();
            let read = store.read(first, max, max_bytes).unwrap();
            assert_eq!(
                seqs(&handed),
                seqs(&Records::Read(read.records)),
                "{max} {max_bytes}"
            );
            assert_eq!(next, read.next);
        }
    }

    #[test]
    fn a_commit_over_the_bound_is_not_kept_for_the_sinks() {
        let dir = tempfile::tempdir().unwrap();
        let (store, handoff) = (store(dir.path(), 1 << 30), Handoff::default());
        let first = commit(&store, &handoff, (0..257).map(|i| record(i, 0)).collect());
        assert!(handoff.take(&store, "a", first, 1000, usize::MAX).is_none());
    }

    #[test]
    fn records_removed_to_make_room_since_their_commit_are_not_handed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, handoff) = (store(dir.path(), 10_000), Handoff::default());
        let first = commit(&store, &handoff, (0..3).map(|i| record(i, 1000)).collect());
        let kept = Handoff::default();
        kept.offer(first, (0..3).map(|i| record(i, 1000)).collect(), &[1000; 3]);
        let mut dropped = 0;
        for i in 3..20 {
            dropped += store
                .append(&[record(i, 1000)], &StateWrite::default())
                .unwrap()
                .dropped;
        }
        assert!(dropped >= 3, "the store never dropped the first batch");

        let (handed, next) = kept.take(&store, "a", first, 100, usize::MAX).unwrap();
        assert!(handed.is_empty(), "dropped and counted: not sent as well");
        assert_eq!(next, first + 3, "the sink moves past them");
    }

    #[test]
    fn a_handed_record_drop_oldest_removes_is_counted_only_if_the_sink_never_sends_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, handoff) = (store(dir.path(), 10_000), Handoff::default());
        let first = commit(&store, &handoff, vec![record(0, 1000)]);
        // The sink takes record 0 and is sending it (an outage: it retries).
        let (handed, next) = handoff.take(&store, "a", first, 100, usize::MAX).unwrap();
        assert_eq!(handed.len(), 1);
        let mut removed = 0;
        for i in 1..30 {
            removed += store
                .append(&[record(i, 1000)], &StateWrite::default())
                .unwrap()
                .dropped;
        }
        assert!(removed > 1, "the store never filled");
        assert_eq!(
            store.counted_store_full(),
            removed - 1,
            "the held one is not counted"
        );
        store.advance("a", next).unwrap();
        assert_eq!(
            store.counted_store_full(),
            removed - 1,
            "delivered: never counted"
        );
    }
}
