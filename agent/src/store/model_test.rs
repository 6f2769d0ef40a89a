//! The store checked against a model: random appends, reads, cursor moves, reopens
//! and fills, on every backend, compared after each step with a plain in-memory
//! model of what the ledger promises. proptest shrinks a disagreement to the
//! shortest sequence of operations that shows it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;

use super::{BackendKind, Record, StateWrite, Store, StoreConfig, StoreError, WhenFull};
use crate::config::Bytes;

const SINKS: [&str; 2] = ["a", "b"];
/// Small, so that fills happen often.
const MAX_BYTES: u64 = 4_000;

#[derive(Debug, Clone)]
enum Op {
    /// Records with these padding sizes.
    Append(Vec<usize>),
    /// A sink reads up to `max` records from its cursor and moves past what it got.
    Deliver {
        sink: usize,
        max: usize,
    },
    /// A sink moves its cursor without reading (for example back to the head).
    Seek {
        sink: usize,
        back: u64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(0usize..700, 0..6).prop_map(Op::Append),
        3 => (0..SINKS.len(), 1usize..8).prop_map(|(sink, max)| Op::Deliver { sink, max }),
        1 => (0..SINKS.len(), 0u64..4).prop_map(|(sink, back)| Op::Seek { sink, back }),
        1 => Just(Op::Reopen),
    ]
}

fn record(n: u64, pad: usize) -> Record {
    Record {
        source: "/ferry/model".into(),
        event_type: "io.ferry.reading".into(),
        subject: format!("d{n}"),
        // Fixed, so the encoded size is the same in the model and the store.
        time: Utc
            .timestamp_opt(1_700_000_000, 0)
            .single()
            .expect("a valid time"),
        data: serde_json::json!({ "n": n, "pad": "x".repeat(pad) }).into(),
        ext: Default::default(),
        to: None,
        origin: None,
    }
}

fn size(r: &Record) -> u64 {
    serde_json::to_vec(r).expect("a record encodes").len() as u64
}

/// What the ledger promises, without any storage.
#[derive(Debug, Default)]
struct Model {
    records: BTreeMap<u64, Record>,
    next: u64,
    cursors: HashMap<&'static str, u64>,
}

impl Model {
    fn bytes(&self) -> u64 {
        self.records.values().map(size).sum()
    }

    fn head(&self) -> u64 {
        self.records.keys().next().copied().unwrap_or(self.next)
    }

    fn append(&mut self, batch: &[Record], when_full: WhenFull) -> Result<u64, &'static str> {
        let incoming: u64 = batch.iter().map(size).sum();
        if self.bytes() + incoming > MAX_BYTES {
            if incoming > MAX_BYTES {
                return Err("too large");
            }
            if when_full == WhenFull::RejectNew {
                return Err("full");
            }
            while self.bytes() + incoming > MAX_BYTES {
                self.records.pop_first();
            }
        }
        let first = self.next;
        for r in batch {
            self.records.insert(self.next, r.clone());
            self.next += 1;
        }
        Ok(first)
    }

    fn cursor(&self, sink: &str) -> u64 {
        self.cursors
            .get(sink)
            .copied()
            .unwrap_or(0)
            .max(self.head())
    }

    fn advance(&mut self, sink: &'static str, to: u64) {
        self.cursors.insert(sink, to);
        let (head, next) = (self.head(), self.next);
        let trim = SINKS
            .iter()
            .map(|s| self.cursors.get(s).copied().unwrap_or(0).clamp(head, next))
            .min()
            .unwrap_or(next);
        self.records.retain(|seq, _| *seq >= trim);
    }

    fn read(&self, from: u64, max: usize) -> Vec<(u64, Record)> {
        self.records
            .range(from..)
            .take(max)
            .map(|(s, r)| (*s, r.clone()))
            .collect()
    }
}

fn open(kind: BackendKind, dir: &Path, when_full: WhenFull) -> impl Store {
    let cfg = StoreConfig {
        backend: kind,
        max_bytes: Bytes(MAX_BYTES),
        when_full,
        cache_capacity: Bytes(1 << 20),
        ..StoreConfig::default()
    };
    let sinks: Vec<String> = SINKS.iter().map(|s| s.to_string()).collect();
    super::open(dir, &cfg, &sinks)
        .expect("the store opens")
        .ledger
}

fn run(kind: BackendKind, when_full: WhenFull, ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut store = open(kind, dir.path(), when_full);
    let mut model = Model::default();
    let mut n = 0;
    for op in ops {
        match op {
            Op::Append(pads) => {
                let batch: Vec<Record> = pads
                    .iter()
                    .map(|p| {
                        n += 1;
                        record(n, *p)
                    })
                    .collect();
                let expected = model.append(&batch, when_full);
                match (store.append(&batch, &StateWrite::default()), expected) {
                    (Ok(a), Ok(first)) => prop_assert_eq!(a.first, first),
                    (Err(StoreError::Full { .. }), Err("full")) => {}
                    (Err(StoreError::TooLarge { .. }), Err("too large")) => {}
                    (got, want) => {
                        prop_assert!(false, "append: store {:?}, model {:?}", got, want)
                    }
                }
            }
            Op::Deliver { sink, max } => {
                let name = SINKS[*sink];
                let from = store.cursor(name).expect("a cursor");
                prop_assert_eq!(from, model.cursor(name), "cursor of {}", name);
                let got = store.read(from, *max, usize::MAX).expect("a read");
                let want = model.read(from, *max);
                let got_pairs: Vec<(u64, Record)> =
                    got.records.into_iter().map(|s| (s.seq, s.record)).collect();
                prop_assert_eq!(&got_pairs, &want);
                let to = want.last().map_or(from, |(s, _)| s + 1);
                prop_assert_eq!(got.next, to);
                store.advance(name, to).expect("an advance");
                model.advance(name, to);
            }
            Op::Seek { sink, back } => {
                let name = SINKS[*sink];
                let to = model.cursor(name).saturating_sub(*back).max(model.head());
                store.advance(name, to).expect("an advance");
                model.advance(name, to);
            }
            Op::Reopen => {
                drop(store);
                store = open(kind, dir.path(), when_full);
            }
        }
        let stats = store.stats();
        prop_assert_eq!(
            (stats.records, stats.bytes, stats.head, stats.next),
            (
                model.records.len() as u64,
                model.bytes(),
                model.head(),
                model.next
            ),
            "after {:?}",
            op
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn redb_behaves_like_the_model_when_dropping_the_oldest(ops in prop::collection::vec(op(), 1..40)) {
        run(BackendKind::Redb, WhenFull::DropOldest, &ops)?;
    }

    #[test]
    fn redb_behaves_like_the_model_when_rejecting_new(ops in prop::collection::vec(op(), 1..40)) {
        run(BackendKind::Redb, WhenFull::RejectNew, &ops)?;
    }

    #[test]
    fn sled_behaves_like_the_model_when_dropping_the_oldest(ops in prop::collection::vec(op(), 1..40)) {
        run(BackendKind::Sled, WhenFull::DropOldest, &ops)?;
    }

    #[test]
    fn sled_behaves_like_the_model_when_rejecting_new(ops in prop::collection::vec(op(), 1..40)) {
        run(BackendKind::Sled, WhenFull::RejectNew, &ops)?;
    }
}
