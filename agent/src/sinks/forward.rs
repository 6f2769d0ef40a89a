//! The forwarding loop: one task per sink moves records from the store upstream.
//!
//! Each sink reads from its own cursor (or, caught up, takes the records of the
//! commit that woke it from memory: [`super::handoff`]), sends CloudEvents, and
//! advances the cursor only past what the upstream accepted (2xx, PUBACK, ...) or
//! permanently refused (counted as dropped with reason `rejected`), and past events
//! it will never send
//! (over the sink's `max_message`: `too_large`; not a valid CloudEvent: `invalid`).
//! A refused or too large event is kept as a dead letter first, durably, so an
//! operator can replay it (`ferry dead-letters`). Anything else — refused connections, timeouts,
//! 5xx, 429 — is retried with jittered backoff, with the same ids, for as long as it
//! takes: the store is what absorbs the outage.
//!
//! The cursor moves in memory with every settled request, but is written to the
//! store (which also trims what every sink has passed) at most every
//! [`SAVE_CURSOR_EVERY`], when the sink falls idle, and when it stops: a store
//! write per request cost as much as the request at everyday rates. A crash
//! resends, with the same ids, at most what was settled since the last write.
//!
//! Up to `max_in_flight` requests run at once. With more than one, a later request
//! may land before an earlier one that is being retried; with one (the default),
//! the upstream sees events in store order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::handoff::{Handoff, Records};
use super::{Delivery, Event, Sink};
use crate::backoff::Backoff;
use crate::ratelimit::RateLimit;
use crate::store::{NewDeadLetter, Store, StoreError};
use crate::telemetry::SinkLag;

/// How often a moving cursor is written to the store.
pub const SAVE_CURSOR_EVERY: Duration = Duration::from_millis(250);

/// Where a sink is, and what of it the store has (pure bookkeeping).
#[derive(Debug)]
struct Position {
    /// Past everything settled.
    at: u64,
    /// What the store was last told.
    saved: u64,
    saved_when: Instant,
}

impl Position {
    fn new(at: u64, now: Instant) -> Self {
        Position {
            at,
            saved: at,
            saved_when: now,
        }
    }

    /// When the position should next be written, if it has moved since.
    fn save_due(&self) -> Option<Instant> {
        (self.at > self.saved).then(|| self.saved_when + SAVE_CURSOR_EVERY)
    }
}

/// What the sink tasks share with the rest of the pipeline.
pub struct Shared {
    pub store: Arc<dyn Store>,
    /// The sequence after the last commit.
    pub head: watch::Receiver<u64>,
    /// The last commit's records.
    pub handoff: Arc<Handoff>,
    /// The sinks' lag gauges.
    pub lag: Arc<SinkLag>,
}

/// Runs one sink until cancelled. A store error (a failing disk) does not end it:
/// the sink logs, waits, and starts again from its durable cursor.
pub async fn run(sink: Box<dyn Sink>, shared: Shared, cancel: CancellationToken) {
    loop {
        match run_sink(sink.as_ref(), &shared, shared.head.clone(), &cancel).await {
            Ok(()) => return,
            Err(error) => {
                error!(sink = %sink.name(), kind = sink.kind(), %error, "store error; restarting the sink in 5s");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    }
}

async fn run_sink(
    sink: &dyn Sink,
    shared: &Shared,
    mut head: watch::Receiver<u64>,
    cancel: &CancellationToken,
) -> Result<(), StoreError> {
    let name = sink.name().to_string();
    let cursor = blocking(&shared.store, {
        let name = name.clone();
        move |s| s.cursor(&name)
    })
    .await?;
    let mut pos = Position::new(cursor, Instant::now());
    // After a restart the sink starts over from its saved cursor.
    shared.lag.delivered(&name, cursor, &shared.store.stats());
    let result = forward(sink, shared, &mut head, cancel, &mut pos).await;
    // Stopping, or a store error: write down how far the sink got, if it can.
    if pos.save_due().is_some() {
        if let Err(error) = save(shared, &name, &mut pos, Instant::now()).await {
            warn!(sink = %name, %error, "cannot save the sink's position; it resends from the last one saved");
        }
    }
    result
}

/// Writes the position to the store if it is due.
async fn save_if_due(
    shared: &Shared,
    name: &str,
    pos: &mut Position,
    now: Instant,
) -> Result<(), StoreError> {
    if pos.save_due().is_some_and(|due| due <= now) {
        save(shared, name, pos, now).await?;
    }
    Ok(())
}

async fn save(
    shared: &Shared,
    name: &str,
    pos: &mut Position,
    now: Instant,
) -> Result<(), StoreError> {
    advance(shared, name, pos.at).await?;
    pos.saved = pos.at;
    pos.saved_when = now;
    Ok(())
}

/// The sink's loop; `pos` is how far it got, whatever the outcome.
async fn forward(
    sink: &dyn Sink,
    shared: &Shared,
    head: &mut watch::Receiver<u64>,
    cancel: &CancellationToken,
    pos: &mut Position,
) -> Result<(), StoreError> {
    let store = &shared.store;
    let name = sink.name().to_string();
    let mut backoff = Backoff::new(sink.retry());
    let per_request = sink.per_request().max(1);
    let in_flight = sink.max_in_flight().max(1);
    let window = per_request * in_flight;
    // Memory for one window is bounded by bytes too, whatever the events' sizes.
    let bytes_per_request = sink.bytes_per_request().max(1);
    let window_bytes = bytes_per_request.saturating_mul(in_flight);
    let mut failing = false;
    // One bad producer can make every event refused: keep the journal readable.
    let mut refusal_log = RateLimit::new(10, Duration::from_secs(60));
    let max_message = sink.max_message();
    // An oversize producer would otherwise fill the journal, one line per event.
    let mut too_large_log = RateLimit::new(10, Duration::from_secs(60));
    info!(sink = %name, kind = sink.kind(), cursor = pos.at, ?max_message, "sink started");

    loop {
        save_if_due(shared, &name, pos, Instant::now()).await?;
        // Sent everything committed so far: wait for the next commit instead of
        // reading the store on the blocking pool only to find nothing, which cost
        // a read per commit at everyday rates.
        if pos.at >= *head.borrow_and_update() {
            if !wait_for_commit(shared, &name, head, cancel, pos).await? {
                return Ok(());
            }
            continue;
        }
        let cursor = pos.at;
        // Caught up: the commit that woke the sink has its records in memory.
        let handed = shared
            .handoff
            .take(store.as_ref(), &name, cursor, window, window_bytes);
        let (batch, next) = match handed {
            Some(taken) => taken,
            None => {
                let read = blocking(store, {
                    let name = name.clone();
                    move |s| s.read_for(&name, cursor, window, window_bytes)
                })
                .await?;
                (Records::Read(read.records), read.next)
            }
        };
        if batch.is_empty() {
            if next > cursor {
                // Only records that could not be decoded (the store quarantined
                // them), or that were removed to make room since their commit.
                pos.at = next;
                shared.lag.delivered(&name, pos.at, &store.stats());
                continue;
            }
            // Committed but not yet readable here: yield rather than spin.
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            continue;
        }
        if let Some(first) = batch.first().filter(|f| f.seq > cursor) {
            debug!(sink = %name, from = cursor, to = first.seq, "records were dropped before this sink sent them");
        }

        let epoch = store.epoch().to_string();
        // Parallel lists, so a request is a plain slice of events; `at` is each
        // event's place in `batch`, whose record a refusal keeps as a dead letter.
        let mut seqs: Vec<u64> = Vec::with_capacity(batch.len());
        let mut events: Vec<Event> = Vec::with_capacity(batch.len());
        let mut sizes: Vec<usize> = Vec::with_capacity(batch.len());
        let mut at: Vec<usize> = Vec::with_capacity(batch.len());
        let mut too_large = Vec::new();
        for (i, stored) in batch.iter().enumerate() {
            if !stored.record.is_for(&name) {
                continue;
            }
            let event = match Event::from_stored(&epoch, stored) {
                Ok(e) => e,
                Err(error) => {
                    warn!(sink = %name, %error, "dropping a record that is not a valid CloudEvent");
                    metrics::counter!("ferry_sink_dropped_total", "sink" => name.clone(), "reason" => "invalid").increment(1);
                    continue;
                }
            };
            if let Some(max) = max_message {
                let len = sink.message_len(&event);
                if len > max {
                    // Refused here, for good: sending it would only earn a refusal
                    // (or, on MQTT, a disconnect) and hold up the events behind it.
                    if let Some(suppressed) = too_large_log.check(Instant::now()) {
                        warn!(sink = %name, seq = stored.seq, bytes = len, max_message = max, suppressed, "not sending an event larger than the sink's max_message; keeping it as a dead letter");
                    }
                    metrics::counter!("ferry_sink_dropped_total", "sink" => name.clone(), "reason" => "too_large").increment(1);
                    too_large.push(dead_letter(&name, stored, "too_large".to_string()));
                    continue;
                }
            }
            seqs.push(stored.seq);
            events.push(event);
            sizes.push(stored.bytes);
            at.push(i);
        }
        // Kept before anything moves the cursor past them (a retry advances past
        // what went through, which may be beyond them).
        keep_dead_letters(store, too_large).await?;

        // Send the window, then resend from the first failed request until all of it
        // is accepted or refused. A refused batch is resent one event at a time, so
        // one bad event costs only itself.
        let mut done = 0;
        let mut chunk_size = per_request;
        while done < events.len() {
            let mut chunks: Vec<(usize, &[Event])> = Vec::with_capacity(in_flight);
            let mut from = done;
            for len in requests(&sizes[done..], chunk_size, bytes_per_request, in_flight) {
                chunks.push((from, &events[from..from + len]));
                from += len;
            }
            let sends = chunks.iter().map(|(_, c)| sink.send(c));
            let results = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = join_all(sends) => r,
            };
            let round = settle(
                &chunks.iter().map(|(_, c)| c.len()).collect::<Vec<_>>(),
                results,
            );
            if round.accepted > 0 {
                metrics::counter!("ferry_sink_sent_total", "sink" => name.clone())
                    .increment(round.accepted as u64);
            }
            let mut refused = Vec::new();
            for (i, detail) in &round.refused {
                let (first, chunk) = chunks[*i];
                if let Some(suppressed) = refusal_log.check(Instant::now()) {
                    warn!(sink = %name, events = chunk.len(), first_seq = seqs[first], %detail, suppressed, "upstream refused events permanently; keeping them as dead letters");
                }
                metrics::counter!("ferry_sink_dropped_total", "sink" => name.clone(), "reason" => "rejected").increment(chunk.len() as u64);
                for j in first..first + chunk.len() {
                    refused.push(dead_letter(&name, &batch[at[j]], detail.clone()));
                }
            }
            // Durable before the cursor can move past them.
            keep_dead_letters(store, refused).await?;
            done += round.handled;
            match round.next {
                Next::Continue => {}
                Next::SplitBatch { events, detail } => {
                    info!(sink = %name, events, %detail, "upstream refused a batch; resending its events one by one");
                    chunk_size = 1;
                    continue;
                }
                Next::Retry {
                    kind,
                    detail,
                    after,
                } => {
                    metrics::counter!("ferry_sink_errors_total", "sink" => name.clone(), "kind" => kind).increment(1);
                    // Keep what went through, so a restart does not resend it.
                    if let Some(&seq) = seqs.get(done) {
                        if seq > pos.at {
                            pos.at = seq;
                            save(shared, &name, pos, Instant::now()).await?;
                        }
                    }
                    let delay = retry_delay(backoff.next_delay(), after);
                    if !failing {
                        warn!(sink = %name, error = %detail, "upstream unavailable; buffering and retrying");
                        failing = true;
                    } else {
                        debug!(sink = %name, error = %detail, ?delay, "upstream still unavailable");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            }
            if failing {
                info!(sink = %name, "upstream available again");
                failing = false;
            }
        }
        backoff.reset();
        pos.at = next;
        shared.lag.delivered(&name, pos.at, &store.stats());
    }
}

/// Waits, idle, for the pipeline to commit past what the sink has sent, writing
/// the position once it is due rather than leaving it behind. `false` when
/// stopping.
async fn wait_for_commit(
    shared: &Shared,
    name: &str,
    head: &mut watch::Receiver<u64>,
    cancel: &CancellationToken,
    pos: &mut Position,
) -> Result<bool, StoreError> {
    let due = pos.save_due().map(tokio::time::Instant::from_std);
    tokio::select! {
        _ = cancel.cancelled() => Ok(false),
        changed = head.changed() => Ok(changed.is_ok()),
        _ = sleep_until_some(due) => {
            save(shared, name, pos, Instant::now()).await?;
            Ok(true)
        }
    }
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How many events go in each of the next requests: at most `max_events` and
/// `max_bytes` (by stored size) per request, and at least one, so an event larger
/// than `max_bytes` goes alone; at most `max_requests` requests.
pub fn requests(
    sizes: &[usize],
    max_events: usize,
    max_bytes: usize,
    max_requests: usize,
) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = sizes;
    while !rest.is_empty() && out.len() < max_requests {
        let mut len = 0;
        let mut bytes = 0usize;
        for &size in rest.iter().take(max_events.max(1)) {
            if len > 0 && bytes.saturating_add(size) > max_bytes {
                break;
            }
            len += 1;
            bytes = bytes.saturating_add(size);
        }
        out.push(len);
        rest = &rest[len..];
    }
    out
}

/// The outcome of one round of requests, read in order: the leading chunks that
/// were accepted or refused for good are done (`handled` events); the first chunk
/// that was not decides what happens next.
#[derive(Debug, PartialEq)]
pub struct Round {
    /// Events of the leading chunks that are done with.
    pub handled: usize,
    /// Of those, accepted upstream.
    pub accepted: usize,
    /// Chunks refused for good (index, reason); their events are dropped.
    pub refused: Vec<(usize, String)>,
    pub next: Next,
}

#[derive(Debug, PartialEq)]
pub enum Next {
    /// Everything sent was settled.
    Continue,
    /// A multi-event request was refused: resend its events one at a time to find
    /// the bad one(s), before anything after it.
    SplitBatch { events: usize, detail: String },
    /// Try again from the first unsettled chunk after a backoff.
    Retry {
        kind: &'static str,
        detail: String,
        after: Option<Duration>,
    },
}

/// Settles a round of requests with `chunk_lens` events each. Results after the
/// first unsettled chunk are ignored: those chunks are resent (same ids) so that
/// the cursor only ever covers a settled prefix.
pub fn settle(chunk_lens: &[usize], results: Vec<Delivery>) -> Round {
    let mut round = Round {
        handled: 0,
        accepted: 0,
        refused: Vec::new(),
        next: Next::Continue,
    };
    for (i, (len, result)) in chunk_lens.iter().zip(results).enumerate() {
        match result {
            Delivery::Accepted => round.accepted += len,
            Delivery::Rejected { detail } if *len > 1 => {
                round.next = Next::SplitBatch {
                    events: *len,
                    detail,
                };
                return round;
            }
            Delivery::Rejected { detail } => round.refused.push((i, detail)),
            Delivery::Retry {
                kind,
                detail,
                after,
            } => {
                round.next = Next::Retry {
                    kind,
                    detail,
                    after,
                };
                return round;
            }
        }
        round.handled += len;
    }
    round
}

/// The wait before a retry: our backoff, or longer if the upstream asked for it with
/// `Retry-After` (capped, so a wrong header cannot park a sink for hours).
pub fn retry_delay(backoff: Duration, retry_after: Option<Duration>) -> Duration {
    const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
    retry_after.map_or(backoff, |a| backoff.max(a.min(MAX_RETRY_AFTER)))
}

fn dead_letter(sink: &str, stored: &crate::store::Stored, reason: String) -> NewDeadLetter {
    NewDeadLetter {
        sink: sink.to_string(),
        seq: stored.seq,
        record: stored.record.clone(),
        reason,
    }
}

async fn keep_dead_letters(
    store: &Arc<dyn Store>,
    letters: Vec<NewDeadLetter>,
) -> Result<(), StoreError> {
    if letters.is_empty() {
        return Ok(());
    }
    blocking(store, move |s| s.add_dead_letters(letters)).await
}

async fn advance(shared: &Shared, name: &str, to: u64) -> Result<(), StoreError> {
    let sink = name.to_string();
    blocking(&shared.store, move |s| s.advance(&sink, to)).await?;
    let stats = shared.store.stats();
    shared.lag.delivered(name, to, &stats);
    crate::telemetry::store_gauges(&stats);
    Ok(())
}

/// Runs a store call off the async threads.
pub async fn blocking<T: Send + 'static>(
    store: &Arc<dyn Store>,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || f(store.as_ref()))
        .await
        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_that_has_not_moved_is_never_due_for_saving() {
        let now = Instant::now();
        let pos = Position::new(7, now);
        assert_eq!(pos.save_due(), None);
    }

    #[test]
    fn a_moved_position_is_saved_at_most_every_interval_after_the_last_save() {
        let now = Instant::now();
        let mut pos = Position::new(7, now);
        pos.at = 9;
        assert_eq!(pos.save_due(), Some(now + SAVE_CURSOR_EVERY));
        pos.saved = 9;
        pos.saved_when = now + Duration::from_secs(1);
        assert_eq!(pos.save_due(), None);
        pos.at = 12;
        assert_eq!(
            pos.save_due(),
            Some(now + Duration::from_secs(1) + SAVE_CURSOR_EVERY)
        );
    }

    fn retry() -> Delivery {
        Delivery::Retry {
            kind: "connect",
            detail: "refused".into(),
            after: None,
        }
    }

    fn refused() -> Delivery {
        Delivery::Rejected {
            detail: "HTTP 400".into(),
        }
    }

    #[test]
    fn a_round_that_is_all_accepted_settles_every_event() {
        let r = settle(&[3, 3], vec![Delivery::Accepted, Delivery::Accepted]);
        assert_eq!((r.handled, r.accepted, r.next), (6, 6, Next::Continue));
    }

    #[test]
    fn a_failure_settles_only_the_chunks_before_it_even_if_later_ones_were_accepted() {
        let r = settle(
            &[1, 1, 1],
            vec![Delivery::Accepted, retry(), Delivery::Accepted],
        );
        assert_eq!((r.handled, r.accepted), (1, 1));
        assert!(matches!(r.next, Next::Retry { .. }));
    }

    #[test]
    fn a_refused_single_event_is_dropped_and_the_round_goes_on() {
        let r = settle(
            &[1, 1, 1],
            vec![Delivery::Accepted, refused(), Delivery::Accepted],
        );
        assert_eq!((r.handled, r.accepted), (3, 2));
        assert_eq!(r.refused, vec![(1, "HTTP 400".to_string())]);
        assert_eq!(r.next, Next::Continue);
    }

    #[test]
    fn a_refused_batch_is_split_rather_than_dropped() {
        let r = settle(&[5, 5], vec![Delivery::Accepted, refused()]);
        assert_eq!((r.handled, r.accepted), (5, 5));
        assert!(r.refused.is_empty());
        assert!(matches!(r.next, Next::SplitBatch { events: 5, .. }));
    }

    #[test]
    fn requests_hold_at_most_the_event_count_and_bytes_and_a_big_event_goes_alone() {
        assert_eq!(requests(&[10; 7], 3, 1000, 8), vec![3, 3, 1]);
        assert_eq!(requests(&[400, 400, 400, 400], 10, 1000, 8), vec![2, 2]);
        assert_eq!(requests(&[10, 5000, 10], 10, 1000, 8), vec![1, 1, 1]);
        assert_eq!(requests(&[10; 9], 2, 1000, 2), vec![2, 2]);
        assert!(requests(&[], 2, 1000, 2).is_empty());
    }

    #[test]
    fn retry_after_lengthens_the_wait_but_never_past_five_minutes() {
        let s = Duration::from_secs;
        assert_eq!(retry_delay(s(1), None), s(1));
        assert_eq!(retry_delay(s(1), Some(s(30))), s(30));
        assert_eq!(retry_delay(s(60), Some(s(30))), s(60));
        assert_eq!(retry_delay(s(1), Some(s(86_400))), s(300));
    }
}
