//! The wiring: sources -> commit task (decode, rules, store) -> one task per sink.
//!
//! ```text
//!  sources ──(bounded channel)──> commit task ──> store ──(watch: next seq)──> sinks
//!     ^                               │
//!     └──────── acks, in order ───────┘  (after the batch is durable)
//! ```
//!
//! Decode and rule evaluation are pure and cheap, so they run inline in the commit
//! task: one task owns the input order, which keeps acknowledgements in arrival order
//! and makes group commit natural (everything that queued during one fsync is the
//! next batch).
//!
//! # Shutdown
//! On the shutdown token: sources stop taking input and drop their senders; the
//! commit task drains the channel, commits and acks what was taken, and ends when the
//! channel closes; MQTT sources wait (bounded) for those acks to go out and
//! disconnect; only then are sinks stopped. Nothing taken is lost: what was not
//! committed was not acked, and the broker redelivers it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_rules::{Action, Diagnostic, RuleSet, StateChange};
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::{BackoffConfig, Loaded};
use crate::decode::{self, Clock, DecodeConfig, DecodeError, DeviceTemplate, Reading};
use crate::group_commit::{self, Gathering};
use crate::ingest::serial::{SerialSource, WriteQueue};
use crate::ingest::{
    modbus::ModbusSource, mqtt::MqttSource, simulator, Admitted, Inlet, Input, Origin, Payload,
};
use crate::ratelimit::RateLimit;
use crate::redelivery::{Acknowledged, Delivery, Feed, Window, Windows};
use crate::sinks;
use crate::sinks::handoff;
use crate::store::{Quarantined, Record, SavedState, StateWrite, Store, StoreError};

/// Inputs waiting for the commit task. Bounded: a full channel stops the sources.
const CHANNEL: usize = 4096;
/// Most inputs committed in one store transaction.
const BATCH: usize = 1024;
/// Payload bytes waiting for the commit task, at most (about): with `CHANNEL`, it
/// bounds the memory input can take, whatever the payloads' sizes.
const INPUT_BYTES: usize = 8 * 1024 * 1024;
/// Rule actions waiting for the MQTT connection that carries them.
const ACTIONS: usize = 1024;
/// How often time-driven rules (stale sensors, aggregate windows) are evaluated.
const TICK: Duration = Duration::from_secs(1);
/// How often rule bookkeeping that is not an alert transition is saved.
const SAVE_PROGRESS_EVERY: Duration = Duration::from_secs(10);
pub const READING_TYPE: &str = "io.ferry.reading";
/// The event the agent sends upstream when it had to move a damaged store aside.
pub const STORE_QUARANTINED_TYPE: &str = "io.ferry.agent.store_quarantined";
/// The most bytes one rule may save for one device (a backstop: the rules' own caps
/// keep entries far smaller).
const MAX_STATE_ENTRY: usize = 64 * 1024;
/// Devices whose wrong clock is logged by name; past that, at the shared rate limit.
const CLOCK_LOGGED_DEVICES: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    // `source` fields are printed by the error chain (`{:#}`), not repeated here.
    #[error("cannot open the store in {dir}")]
    Store { dir: PathBuf, source: StoreError },
    #[error("the rule files have errors:\n{}", join(.0))]
    Rules(Vec<Diagnostic>),
    #[error("cannot read {what}")]
    Secret {
        what: String,
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("source {source_name:?}: {message}")]
    Source {
        source_name: String,
        message: String,
    },
    #[error(transparent)]
    Sink(#[from] sinks::BuildError),
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::MetricsError),
}

fn join(d: &[Diagnostic]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the agent until `shutdown` is cancelled, then stops in order.
pub async fn run(
    loaded: Loaded,
    data_dir: PathBuf,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let cfg = &loaded.config;
    let agent_id = cfg.agent.id.clone();
    let sink_names = cfg.sink.names();

    let admin_api =
        crate::dead_letters::Api::new(cfg.admin.as_ref().is_some_and(|a| a.remote_dead_letters));
    if let Some(admin) = &cfg.admin {
        crate::telemetry::serve_metrics(admin.listen, Arc::clone(&admin_api))?;
        info!(listen = %admin.listen, "metrics at /metrics, dead letters at /dead-letters");
    }

    let store: Arc<dyn Store> = {
        let (dir, scfg, sinks) = (data_dir.clone(), cfg.store.clone(), sink_names.clone());
        let opened = tokio::task::spawn_blocking(move || crate::store::open(&dir, &scfg, &sinks))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))
            .and_then(|r| r)
            .map_err(|source| StartError::Store {
                dir: data_dir.clone(),
                source,
            })?;
        let store: Arc<dyn Store> = Arc::new(opened.ledger);
        if let Some(q) = opened.quarantined {
            store_quarantined(&store, &q, &agent_id).await;
        }
        store
    };

    let rules = match loaded.rules_dir() {
        Some(dir) => start_rules(dir, cfg.check_options(), &store).await?,
        None => RuleSet::empty(),
    };

    // The gauges from the start: a backlog left by the last run shows before any input.
    let lag = Arc::new(crate::telemetry::SinkLag::new(store.as_ref(), &sink_names));
    crate::telemetry::backlog_gauges(store.as_ref(), &lag);

    let mut rules = rules;
    match store.rules_state() {
        Ok(saved) => restore_rule_state(&mut rules, saved),
        Err(error) => warn!(%error, "cannot read saved rule state; open alerts start closed"),
    }

    let mut sinks = Vec::new();
    for c in cfg.sink.iter() {
        let resolve = |p: &std::path::Path| loaded.resolve(p);
        let ctx = crate::sinks::BuildContext {
            agent: &agent_id,
            resolve: &resolve,
        };
        sinks.push(c.config.build(&ctx)?);
    }

    let (tx, rx) = Inlet::channel(CHANNEL, INPUT_BYTES);
    let window_full = tx.window_full();
    // Rule actions (MQTT publishes) go out through one MQTT source's connection.
    let actuator_name = cfg
        .rules
        .mqtt_actions
        .clone()
        .or_else(|| cfg.source.mqtt.first().map(|s| s.name.clone()));
    let (actions_tx, actions_rx) = mpsc::channel::<Action>(ACTIONS);
    let mut actions_rx = Some(actions_rx);
    let (head_tx, head_rx) = watch::channel(store.stats().next);
    let handoff = Arc::new(handoff::Handoff::default());
    admin_api.attach(Arc::clone(&store), head_tx.clone());
    let stop_sources = CancellationToken::new();
    let sources = TaskTracker::new();
    let mut feeds = HashMap::new();
    let mut windows = Windows::default();

    for s in &cfg.source.mqtt {
        let password = match &s.password_file {
            Some(p) => Some(
                std::fs::read_to_string(loaded.resolve(p))
                    .map_err(|source| StartError::Secret {
                        what: format!(
                            "password_file {} of source {:?}",
                            loaded.resolve(p).display(),
                            s.name
                        ),
                        source,
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            None => None,
        };
        let decode = DecodeConfig {
            device: DeviceTemplate::parse(&s.device).map_err(|message| StartError::Source {
                source_name: s.name.clone(),
                message,
            })?,
            max_payload: s.max_payload.0 as usize,
            time_field: s.time_field.clone(),
        };
        let tls =
            crate::tls::client_config(s.tls.as_ref(), |p| loaded.resolve(p)).map_err(|e| {
                StartError::Source {
                    source_name: s.name.clone(),
                    message: format!("tls: {e}"),
                }
            })?;
        let feed = Arc::new(Feed::default());
        feeds.insert(s.name.clone(), Arc::clone(&feed));
        windows.load(&s.name, saved_window(store.as_ref(), &s.name));
        let source = MqttSource {
            feed,
            tls,
            client_id: s
                .client_id
                .clone()
                .unwrap_or_else(|| format!("ferry-{agent_id}-{}", s.name)),
            password,
            origin: Origin::windowed(&agent_id, "mqtt", &s.name, Some(decode), s.broker_inflight),
            cfg: s.clone(),
        };
        let actions = if actuator_name.as_deref() == Some(s.name.as_str()) {
            actions_rx.take()
        } else {
            None
        };
        sources.spawn(source.run(tx.clone(), actions, stop_sources.clone()));
    }
    let mut serial_writes = HashMap::new();
    for s in &cfg.source.serial {
        let writes = WriteQueue::new(&s.name, &s.write);
        serial_writes.insert(s.name.clone(), Arc::clone(&writes));
        let source = SerialSource {
            origin: Origin::new(&agent_id, "serial", &s.name, None),
            cfg: s.clone(),
        };
        sources.spawn(source.run(tx.clone(), writes, stop_sources.clone()));
    }
    for s in &cfg.source.modbus {
        let source = ModbusSource {
            origin: Origin::new(&agent_id, "modbus", &s.name, None),
            cfg: s.clone(),
        };
        sources.spawn(source.run(tx.clone(), stop_sources.clone()));
    }
    for s in &cfg.source.simulator {
        let origin = Origin::new(&agent_id, "simulator", &s.name, None);
        sources.spawn(simulator::run(
            s.clone(),
            origin,
            tx.clone(),
            stop_sources.clone(),
        ));
    }
    drop(tx);
    sources.close();

    let (reload_tx, reload_rx) = mpsc::channel::<crate::rules::Reloaded>(1);
    let stop_watch = CancellationToken::new();
    tokio::spawn(crate::rules::watch(
        loaded.rules_dir(),
        cfg.rules.reload,
        cfg.check_options(),
        reload_tx,
        stop_watch.clone(),
    ));
    let commit = Committer {
        group: group_commit::Policy {
            linger: cfg.store.commit_linger.0,
            max_inputs: BATCH,
        },
        window_full,
        rules,
        store: Arc::clone(&store),
        head: head_tx,
        handoff: Arc::clone(&handoff),
        log_limit: RateLimit::new(10, Duration::from_secs(60)),
        origins: source_uris(cfg, &agent_id),
        lag: Arc::clone(&lag),
        actuators: Actuators {
            // Without an MQTT source to publish through, publishes are counted and dropped.
            mqtt: actions_rx.is_none().then_some(actions_tx),
            serial: serial_writes,
        },
        progress_unsaved: false,
        last_state_save: Instant::now(),
        changed: HashSet::new(),
        rewrite_state: true,
        windows,
        feeds,
        clock: ClockCheck {
            ahead: time_delta(cfg.agent.max_time_ahead.0),
            behind: cfg
                .agent
                .max_time_behind
                .as_ref()
                .map_or(chrono::TimeDelta::MAX, |d| time_delta(d.0)),
            logged: Default::default(),
        },
    };
    let commit_task = tokio::spawn(commit.run(rx, reload_rx, shutdown.clone()));

    let stop_sinks = CancellationToken::new();
    let sink_tasks = TaskTracker::new();
    for sink in sinks {
        let shared = sinks::Shared {
            store: Arc::clone(&store),
            head: head_rx.clone(),
            handoff: Arc::clone(&handoff),
            lag: Arc::clone(&lag),
        };
        sink_tasks.spawn(sinks::run(sink, shared, stop_sinks.clone()));
    }
    sink_tasks.close();
    info!(agent = %agent_id, "ferry running");

    shutdown.cancelled().await;
    info!("shutting down: no new input; committing what was taken");
    stop_watch.cancel();
    stop_sources.cancel();
    sources.wait().await;
    if let Err(e) = commit_task.await {
        error!(error = %e, "commit task failed");
    }
    stop_sinks.cancel();
    sink_tasks.wait().await;
    let stats = store.stats();
    info!(
        records = stats.records,
        bytes = stats.bytes,
        "stopped; buffered records are kept for the next start"
    );
    Ok(())
}

/// A damaged store was moved aside and the agent runs on a fresh one: counted,
/// logged, and told upstream with an event in the fresh store, so whoever watches
/// the fleet learns that what the old store held was not sent.
async fn store_quarantined(store: &Arc<dyn Store>, q: &Quarantined, agent_id: &str) {
    metrics::counter!("ferry_store_quarantined_total").increment(1);
    error!(
        moved_to = %q.moved_to.display(),
        error = %q.error,
        "the store's files are damaged: moved them aside (never deleted) and started on a fresh store"
    );
    let record = quarantine_record(q, agent_id, chrono::Utc::now());
    let appended = sinks::blocking(store, move |s| {
        s.append(std::slice::from_ref(&record), &StateWrite::default())
    })
    .await;
    match appended {
        Ok(_) => metrics::counter!("ferry_store_committed_total").increment(1),
        Err(error) => {
            error!(%error, "cannot store the event that reports the quarantined store")
        }
    }
}

/// The `io.ferry.agent.store_quarantined` event: from the agent itself
/// (`/ferry/{agent}/agent/store`), about the agent.
fn quarantine_record(q: &Quarantined, agent_id: &str, at: chrono::DateTime<chrono::Utc>) -> Record {
    Record {
        source: format!("/ferry/{agent_id}/agent/store"),
        event_type: STORE_QUARANTINED_TYPE.to_string(),
        subject: agent_id.to_string(),
        time: at,
        data: Arc::new(serde_json::json!({
            "moved_to": q.moved_to.display().to_string(),
            "error": q.error,
            "at": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        })),
        ext: BTreeMap::new(),
        to: None,
        origin: None,
    }
}

/// The rule set to start with: the rule files if they compile (saved in the store
/// as the last valid set), else the last valid set the store has, so a gateway
/// whose rule files broke (a bad copy, a power cut mid-write) still starts and
/// keeps forwarding; the errors are logged with `file:line:col` and counted, and
/// `ferry check` still fails on them. With no saved set, the start is refused.
async fn start_rules(
    dir: PathBuf,
    known: ferry_rules::CheckOptions,
    store: &Arc<dyn Store>,
) -> Result<RuleSet, StartError> {
    let k = known.clone();
    let loaded = tokio::task::spawn_blocking(move || crate::rules::load_dir_files(&dir, &k))
        .await
        .map_err(|e| StartError::Internal(format!("rule loading failed: {e}")))?;
    match loaded {
        Ok((set, files)) => {
            info!(rules = set.len(), "rules loaded");
            let files = crate::rules::encode_files(&files);
            if let Err(error) = save_rule_files(store, files).await {
                warn!(%error, "cannot save the rule set as the last valid one");
            }
            Ok(set)
        }
        Err(problems) => {
            let saved = match store.rule_files() {
                Ok(saved) => saved,
                Err(error) => {
                    warn!(%error, "cannot read the last valid rule set");
                    None
                }
            };
            let Some(saved) = saved else {
                return Err(StartError::Rules(problems));
            };
            let compiled =
                tokio::task::spawn_blocking(move || crate::rules::compile_saved(&saved, &known))
                    .await
                    .map_err(|e| StartError::Internal(format!("rule loading failed: {e}")))?;
            match compiled {
                Ok(set) => {
                    crate::rules::log_problems(&problems);
                    metrics::counter!("ferry_rules_reloads_total", "result" => "failed")
                        .increment(1);
                    error!(
                        errors = problems.len(),
                        rules = set.len(),
                        "the rule files have errors: running the last valid rule set until they are fixed (`ferry check` lists them)"
                    );
                    Ok(set)
                }
                Err(why) => {
                    warn!(%why, "the last valid rule set cannot be used either");
                    Err(StartError::Rules(problems))
                }
            }
        }
    }
}

async fn save_rule_files(store: &Arc<dyn Store>, files: Vec<u8>) -> Result<(), StoreError> {
    crate::sinks::blocking(store, move |s| s.save_rule_files(&files)).await
}

/// Restores open alerts (and rule bookkeeping) saved by the last run. Entries that
/// cannot be read are skipped: the worst case is an alert that starts closed.
fn restore_rule_state(rules: &mut RuleSet, saved: SavedState) {
    if let Some(bytes) = saved.legacy {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(state) => {
                rules.restore_alert_state(&state);
            }
            Err(error) => warn!(%error, "ignoring unreadable saved rule state"),
        }
    }
    let mut unreadable = 0;
    let entries: Vec<(String, String, Value)> = saved
        .entries
        .into_iter()
        .filter_map(|(key, value)| {
            let parsed = serde_json::from_str::<(String, String)>(&key)
                .ok()
                .zip(serde_json::from_slice::<Value>(&value).ok());
            if parsed.is_none() {
                unreadable += 1;
            }
            parsed.map(|((rule, device), value)| (rule, device, value))
        })
        .collect();
    if unreadable > 0 {
        warn!(
            entries = unreadable,
            "ignoring unreadable saved rule state entries"
        );
    }
    let restored = rules.restore_entries(entries);
    let devices: usize = restored.rules.iter().map(|(_, n)| n).sum();
    if devices > 0 {
        info!(
            rules = restored.rules.len(),
            devices, "restored open alerts from the store"
        );
    }
}

/// The delivery window the last run saved for MQTT source `name`; empty if there is
/// none or it cannot be read (the worst case is a reading stored a second time).
fn saved_window(store: &dyn Store, name: &str) -> Window {
    match store.delivery_window(name) {
        Ok(None) => Window::default(),
        Ok(Some(bytes)) => Window::decode(&bytes).unwrap_or_else(|| {
            warn!(source = %name, "ignoring an unreadable saved delivery window");
            Window::default()
        }),
        Err(error) => {
            warn!(source = %name, %error, "cannot read the saved delivery window");
            Window::default()
        }
    }
}

/// The store key of one rule's state for one device: both names, unambiguously.
fn state_key(rule: &str, device: &str) -> String {
    serde_json::Value::from(vec![rule, device]).to_string()
}

/// A config duration as a chrono one; one too long for chrono means "no bound".
fn time_delta(d: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
}

/// `source name -> CloudEvents source URI`, for events that time-driven rules raise
/// about a device with no reading at hand.
fn source_uris(cfg: &crate::config::Config, agent: &str) -> HashMap<String, String> {
    let mqtt = cfg.source.mqtt.iter().map(|s| ("mqtt", &s.name));
    let serial = cfg.source.serial.iter().map(|s| ("serial", &s.name));
    let modbus = cfg.source.modbus.iter().map(|s| ("modbus", &s.name));
    let sim = cfg.source.simulator.iter().map(|s| ("simulator", &s.name));
    mqtt.chain(serial)
        .chain(modbus)
        .chain(sim)
        .map(|(kind, name)| (name.clone(), format!("/ferry/{agent}/{kind}/{name}")))
        .collect()
}

/// Where rule actions go: the MQTT connection that carries publishes, and each serial
/// port's write queue. Handing over never waits, so an actuator that is away cannot
/// stall the commit task; what does not fit is dropped and counted by `reason`.
struct Actuators {
    /// `None` when no MQTT source carries publishes.
    mqtt: Option<mpsc::Sender<Action>>,
    /// By serial source name.
    serial: HashMap<String, Arc<WriteQueue>>,
}

impl Actuators {
    /// Hands `action` to its actuator. `Err` is why it was dropped instead.
    fn send(&self, action: Action) -> Result<(), &'static str> {
        match action {
            Action::MqttPublish { .. } => match &self.mqtt {
                None => Err("no_mqtt_source"),
                Some(tx) => tx.try_send(action).map_err(|_| "queue_full"),
            },
            Action::SerialWrite { rule, port, line } => match self.serial.get(&port) {
                // The rule check knows the serial sources: not reached.
                None => Err("no_serial_port"),
                // Never refused: a full queue drops its oldest line (and counts it).
                Some(queue) => {
                    queue.push(rule, line);
                    Ok(())
                }
            },
        }
    }
}

/// Decodes, evaluates and commits inputs in arrival order, then runs their acks.
struct Committer {
    /// How long a batch gathers before it is committed.
    group: group_commit::Policy,
    /// A source's window is full: stop gathering ([`Inlet::window_full`]).
    window_full: Arc<tokio::sync::Notify>,
    rules: RuleSet,
    store: Arc<dyn Store>,
    head: watch::Sender<u64>,
    /// The last commit's records, for sinks that are caught up.
    handoff: Arc<handoff::Handoff>,
    log_limit: RateLimit,
    origins: HashMap<String, String>,
    /// Where rule actions go.
    actuators: Actuators,
    /// The sinks' lag gauges.
    lag: Arc<crate::telemetry::SinkLag>,
    /// Rule bookkeeping changed since the state was last saved.
    progress_unsaved: bool,
    last_state_save: Instant,
    /// `(rule, device)` pairs whose saved state changed since the last save.
    changed: HashSet<(String, String)>,
    /// Save every entry at the next save (after a start or a reload), not only the
    /// changed ones, so that entries of rules that are gone do not linger.
    rewrite_state: bool,
    /// What each MQTT source acknowledged last (`crate::redelivery`).
    windows: Windows,
    /// By MQTT source name: the PUBACKs it wrote and the sessions it lost.
    feeds: HashMap<String, Arc<Feed>>,
    clock: ClockCheck,
}

/// How far readings' own times are trusted, and the devices already logged for it.
struct ClockCheck {
    ahead: chrono::TimeDelta,
    behind: chrono::TimeDelta,
    logged: std::collections::HashSet<String>,
}

impl Committer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Admitted>,
        mut reloads: mpsc::Receiver<crate::rules::Reloaded>,
        shutdown: CancellationToken,
    ) {
        let mut inputs = Vec::with_capacity(BATCH);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let mut batch = Batch::default();
            tokio::select! {
                n = rx.recv_many(&mut inputs, BATCH) => {
                    if n == 0 {
                        self.save_progress_at_exit().await;
                        return;
                    }
                    self.gather(&mut rx, &mut inputs, &shutdown).await;
                    // Most inputs are one record each; a record is large, and
                    // growing the list a doubling at a time showed in profiles.
                    batch.records.reserve(inputs.len());
                    for Admitted { input, .. } in inputs.drain(..) {
                        self.take(input, &mut batch);
                    }
                }
                Some(crate::rules::Reloaded { mut set, files }) = reloads.recv() => {
                    set.adopt_state(std::mem::replace(&mut self.rules, RuleSet::empty()));
                    self.rules = set;
                    if let Err(error) = save_rule_files(&self.store, files).await {
                        warn!(%error, "cannot save the reloaded rule set as the last valid one");
                    }
                    // Rules that changed start afresh: the saved state must say so.
                    self.rewrite_state = true;
                    self.progress_unsaved = true;
                    continue;
                }
                _ = tick.tick() => {
                    let outcome = self.rules.tick(chrono::Utc::now());
                    self.outcome(outcome, None, None, &mut batch);
                }
            }
            if !self.settle(batch, &shutdown).await {
                return;
            }
        }
    }

    /// Lets more input join a batch whose first inputs are in `inputs`, until the
    /// linger is over or waiting cannot bring more ([`crate::group_commit`]). A
    /// closed channel ends it too: what came is committed, and the next receive
    /// sees the end.
    async fn gather(
        &self,
        rx: &mut mpsc::Receiver<Admitted>,
        inputs: &mut Vec<Admitted>,
        shutdown: &CancellationToken,
    ) {
        if self.group.linger.is_zero() {
            return;
        }
        let mut gathering = Gathering::new(&self.group);
        let add = |g: &mut Gathering, a: &Admitted| {
            let origin = &a.input.origin;
            g.add(&origin.name, a.input.ack.as_ref().and(origin.window));
        };
        for a in inputs.iter() {
            add(&mut gathering, a);
        }
        let deadline = tokio::time::Instant::now() + self.group.linger;
        // Not woken by every arrival (at a few thousand a second that is most of
        // the cost): it sleeps until the linger is over or a source's window is
        // full, then takes what queued meanwhile.
        let mut over = false;
        loop {
            while gathering.room() > 0 {
                match rx.try_recv() {
                    Ok(a) => {
                        add(&mut gathering, &a);
                        inputs.push(a);
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            // Once the linger is over, what queued until now still joins.
            if over || gathering.complete() {
                return;
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = self.window_full.notified() => {}
                _ = tokio::time::sleep_until(deadline) => over = true,
            }
        }
    }

    /// Adds one input to the batch: its records, or nothing if the broker sent it
    /// again after it was committed; its acknowledgement either way.
    fn take(&mut self, input: Input, batch: &mut Batch) {
        let Input {
            origin,
            payload,
            received,
            ack,
            delivery,
        } = input;
        batch.acks.extend(ack);
        match delivery {
            Some(d)
                if self
                    .windows
                    .is_redelivery(&origin.name, &d, &batch.delivered) =>
            {
                self.redelivered(&origin, &d);
                batch.delivered.push(&origin.name, d);
            }
            Some(d) => {
                if self.process(&origin, payload, received, batch) {
                    batch.delivered.push(&origin.name, d);
                }
            }
            None => {
                self.process(&origin, payload, received, batch);
            }
        }
    }

    fn redelivered(&self, origin: &Origin, d: &Delivery) {
        metrics::counter!("ferry_input_redeliveries_total", "source" => origin.name.clone())
            .increment(1);
        debug!(source = %origin.name, packet_id = d.key.packet_id, connection = d.connection,
            "the broker sent a committed reading again; acknowledged without storing it twice");
    }

    /// Takes what the MQTT sources reported about their PUBACKs and sessions.
    fn take_ack_events(&mut self) {
        for (source, feed) in &self.feeds {
            let events = feed.take();
            if !events.is_empty() {
                self.windows.apply(source, events);
            }
        }
    }

    /// Saves rule bookkeeping not yet saved, so a clean stop loses none of it.
    async fn save_progress_at_exit(&mut self) {
        if !self.progress_unsaved && self.changed.is_empty() {
            return;
        }
        let state = self.state_write();
        let store = Arc::clone(&self.store);
        let saved = sinks::blocking(&store, move |s| s.append(&[], &state)).await;
        if let Err(error) = saved {
            warn!(%error, "could not save rule state at shutdown");
        }
    }

    /// The rule state to save now: the entries of the `(rule, device)` pairs that
    /// changed since the last save, or every entry after a start or a reload.
    fn state_write(&mut self) -> StateWrite {
        let replace_all = std::mem::take(&mut self.rewrite_state);
        let entries = if replace_all {
            self.changed.clear();
            self.rules.state_entries()
        } else {
            let changed: Vec<(String, String)> = self.changed.drain().collect();
            self.rules.changed_entries(&changed)
        };
        let mut write = StateWrite {
            replace_all,
            entries: Vec::with_capacity(entries.len()),
            deliveries: Vec::new(),
        };
        for entry in entries {
            let value = match entry.value.map(|v| serde_json::to_vec(&v)) {
                Some(Ok(bytes)) if bytes.len() > MAX_STATE_ENTRY => {
                    // Bounded by the rules' own caps; this is the backstop.
                    warn!(rule = %entry.rule, device = %entry.device, bytes = bytes.len(), "rule state of one device is too large to save; keeping the last saved one");
                    continue;
                }
                Some(Ok(bytes)) => Some(bytes),
                Some(Err(_)) => continue,
                None => None,
            };
            write
                .entries
                .push((state_key(&entry.rule, &entry.device), value));
        }
        write
    }

    /// Commits a batch (with the rule state if alerts changed it), then acks its
    /// inputs and hands its actions on. `false` if shutdown stopped the commit.
    async fn settle(&mut self, batch: Batch, shutdown: &CancellationToken) -> bool {
        self.take_ack_events();
        // Transitions are saved with their batch; bookkeeping (for-timers, stale
        // sensors' last-seen times) now and then, since losing a little costs little.
        let save = batch.transition
            || (self.progress_unsaved && self.last_state_save.elapsed() >= SAVE_PROGRESS_EVERY);
        let mut state = if save {
            self.progress_unsaved = false;
            self.last_state_save = Instant::now();
            self.state_write()
        } else {
            StateWrite::default()
        };
        // The windows of the sources this batch acknowledges go with its records;
        // a batch that stores nothing leaves them as they are (what it acknowledged
        // needs no protection from being stored twice).
        let commits = !batch.records.is_empty() || !state.is_empty();
        let plan = commits.then(|| self.windows.plan(&batch.delivered));
        if let Some(plan) = &plan {
            state.deliveries = plan.encoded();
        }
        if commits && !self.commit(batch.records, state, shutdown).await {
            // Shutting down with a batch that could not be stored: its inputs stay
            // unacknowledged, so the producers still have them.
            warn!(
                inputs = batch.acks.len(),
                "stopped before this batch could be committed; it was not acknowledged"
            );
            return false;
        }
        match plan {
            Some(plan) => self.windows.adopt(plan),
            None => self.windows.without_commit(&batch.delivered),
        }
        for ack in batch.acks {
            ack();
        }
        for action in batch.actions {
            let rule = action.rule().to_owned();
            if let Err(reason) = self.actuators.send(action) {
                metrics::counter!("ferry_actions_dropped_total", "reason" => reason).increment(1);
                if let Some(suppressed) = self.log_limit.check(Instant::now()) {
                    warn!(%rule, reason, suppressed, "rule action dropped");
                }
            }
        }
        true
    }

    /// Decodes, checks and evaluates one input into `batch`; `false` if it was
    /// rejected.
    fn process(
        &mut self,
        origin: &Origin,
        payload: Payload,
        received: chrono::DateTime<chrono::Utc>,
        batch: &mut Batch,
    ) -> bool {
        let mut reading = match payload {
            Payload::Fields { device, fields } => {
                let reading = Reading {
                    device,
                    time: received,
                    fields,
                };
                if let Err(e) = decode::check_reading(&reading) {
                    self.rejected(origin, "", &e);
                    return false;
                }
                reading
            }
            Payload::Raw { topic, bytes } => {
                let decoded = match &origin.decode {
                    Some(cfg) => decode::decode_json(cfg, &topic, &bytes, received),
                    None => Err(DecodeError::Undecodable),
                };
                match decoded {
                    Ok(r) => r,
                    Err(e) => {
                        self.rejected(origin, &topic, &e);
                        return false;
                    }
                }
            }
        };
        let clock = decode::bound_time(&mut reading, received, self.clock.ahead, self.clock.behind);
        if clock != Clock::Trusted {
            self.clock_skew(origin, &reading, clock);
        }
        let outcome = self.rules.evaluate(&ferry_rules::Reading {
            source: &origin.name,
            device: &reading.device,
            time: reading.time,
            fields: &reading.fields,
        });
        let forward = outcome.forward;
        // The reading goes first, then what it triggered.
        let reading_at = batch.records.len();
        self.outcome(outcome, Some(&origin.uri), Some(&reading.device), batch);
        if forward {
            batch.records.insert(
                reading_at,
                Record {
                    source: origin.uri.clone(),
                    event_type: READING_TYPE.to_string(),
                    subject: reading.device,
                    time: reading.time,
                    data: Arc::new(Value::Object(reading.fields)),
                    ext: BTreeMap::new(),
                    to: None,
                    origin: None,
                },
            );
        }
        true
    }

    /// Turns what the rules decided into records and actions. `device`: the device
    /// of the reading evaluated, for the logs (none for a tick).
    fn outcome(
        &mut self,
        outcome: ferry_rules::Outcome,
        uri: Option<&str>,
        device: Option<&str>,
        batch: &mut Batch,
    ) {
        for e in &outcome.errors {
            metrics::counter!("ferry_rule_errors_total", "rule" => e.rule.clone()).increment(1);
            if let Some(suppressed) = self.log_limit.check(Instant::now()) {
                match device {
                    Some(device) => {
                        warn!(rule = %e.rule, %device, error = %e.message, suppressed, "rule evaluation failed")
                    }
                    None => {
                        warn!(rule = %e.rule, error = %e.message, suppressed, "rule evaluation failed")
                    }
                }
            }
        }
        self.changed.extend(outcome.changed);
        match outcome.state {
            StateChange::Transition => batch.transition = true,
            StateChange::Progress => self.progress_unsaved = true,
            StateChange::Unchanged => {}
        }
        for a in outcome.alerts {
            let source = uri
                .map(str::to_string)
                .or_else(|| self.origins.get(&a.source).cloned())
                .unwrap_or_else(|| format!("/ferry/rules/{}", a.source));
            batch.records.push(Record::alert(a, source));
        }
        batch.actions.extend(outcome.actions);
    }

    /// Counts a distrusted reading time; logs it once per device (for the first
    /// [`CLOCK_LOGGED_DEVICES`] devices, then at the shared rate limit).
    fn clock_skew(&mut self, origin: &Origin, reading: &Reading, clock: Clock) {
        metrics::counter!("ferry_input_clock_skew_total", "source" => origin.name.clone(), "direction" => clock.direction()).increment(1);
        let first_time = self.clock.logged.len() < CLOCK_LOGGED_DEVICES
            && self.clock.logged.insert(reading.device.clone());
        let suppressed = if first_time {
            Some(0)
        } else if self.clock.logged.contains(&reading.device) {
            None
        } else {
            self.log_limit.check(Instant::now())
        };
        if let Some(suppressed) = suppressed {
            let reported = reading
                .fields
                .get(decode::REPORTED_TIME_FIELD)
                .and_then(Value::as_str)
                .unwrap_or_default();
            warn!(source = %origin.name, device = %reading.device, %reported, direction = clock.direction(), suppressed,
                "reading time is too far from the agent's clock; using the receive time (logged once per device)");
        }
    }

    fn rejected(&mut self, origin: &Origin, topic: &str, e: &DecodeError) {
        metrics::counter!("ferry_input_rejected_total", "source" => origin.name.clone(), "reason" => e.reason()).increment(1);
        if let Some(suppressed) = self.log_limit.check(Instant::now()) {
            warn!(source = %origin.name, %topic, reason = e.reason(), error = %e, suppressed, "input rejected");
        }
    }

    /// Commits until it works; `false` only if shutdown came first. A batch larger
    /// than the whole store (a group commit of large readings into a small store)
    /// is committed in parts, in order, the rule state with the last; a single
    /// record larger than the store can never fit, so it is dropped and counted
    /// (`too_large`), like input rejected at the door.
    async fn commit(
        &mut self,
        records: Vec<Record>,
        state: StateWrite,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut parts = std::collections::VecDeque::from([records]);
        let mut state = Some(state);
        while let Some(part) = parts.pop_front() {
            let last = parts.is_empty();
            let this_state = if last { state.take() } else { None };
            match self
                .commit_part(part, this_state.unwrap_or_default(), shutdown)
                .await
            {
                Committed::Yes => {}
                Committed::Stopped => return false,
                Committed::TooLarge(mut part, part_state) => {
                    if last {
                        state = Some(part_state);
                    }
                    if part.len() > 1 {
                        let second = part.split_off(part.len() / 2);
                        parts.push_front(second);
                        parts.push_front(part);
                    } else {
                        let subject = part.first().map(|r| r.subject.clone()).unwrap_or_default();
                        metrics::counter!("ferry_store_dropped_total", "reason" => "too_large")
                            .increment(part.len() as u64);
                        if let Some(suppressed) = self.log_limit.check(Instant::now()) {
                            warn!(device = %subject, suppressed, "a record larger than store.max_bytes can never be stored; dropped it");
                        }
                        if last {
                            // The rule state still has to go in.
                            parts.push_front(Vec::new());
                        }
                    }
                }
            }
        }
        true
    }

    async fn commit_part(
        &mut self,
        records: Vec<Record>,
        state: StateWrite,
        shutdown: &CancellationToken,
    ) -> Committed {
        if records.is_empty() && state.is_empty() {
            return Committed::Yes;
        }
        let records = Arc::new(records);
        let state = Arc::new(state);
        let mut backoff = Backoff::new(BackoffConfig::new(
            Duration::from_millis(50),
            Duration::from_secs(5),
        ));
        let mut reported = false;
        loop {
            let (batch, batch_state) = (Arc::clone(&records), Arc::clone(&state));
            match sinks::blocking(&self.store, move |s| s.append(&batch, &batch_state)).await {
                Ok(appended) => {
                    metrics::counter!("ferry_store_committed_total")
                        .increment(records.len() as u64);
                    // What open alerts cost the flash: it grows with what changed.
                    let state_bytes: usize = state
                        .entries
                        .iter()
                        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                        .sum();
                    if state_bytes > 0 {
                        metrics::counter!("ferry_store_state_bytes_total")
                            .increment(state_bytes as u64);
                    }
                    // The store counts them (`store_full`), exactly: a record a sink
                    // is still sending when it goes is counted only if never delivered.
                    if appended.dropped > 0 {
                        if let Some(suppressed) = self.log_limit.check(Instant::now()) {
                            warn!(
                                dropped = appended.dropped,
                                suppressed, "store full: dropped the oldest records"
                            );
                        }
                    }
                    if reported {
                        info!("store accepting input again");
                    }
                    let next = appended.first + records.len() as u64;
                    // Only for a sink that will take them: while every sink is
                    // behind (an outage), the records would only take memory.
                    // The store's task has returned, and its copy with it.
                    match Arc::try_unwrap(records) {
                        Ok(records) if self.lag.any_at(appended.first) => {
                            self.handoff.offer(appended.first, records, &appended.sizes);
                        }
                        _ => self.handoff.clear(),
                    }
                    self.head.send_replace(next);
                    crate::telemetry::backlog_gauges(self.store.as_ref(), &self.lag);
                    return Committed::Yes;
                }
                Err(StoreError::TooLarge { .. }) => {
                    // The store took none of it: hand it back whole to be split.
                    let records = Arc::try_unwrap(records).unwrap_or_else(|r| (*r).clone());
                    let state = Arc::try_unwrap(state).unwrap_or_else(|s| (*s).clone());
                    return Committed::TooLarge(records, state);
                }
                Err(error) => {
                    if !reported {
                        match &error {
                            StoreError::Full { .. } => {
                                warn!(%error, "store full: holding input (not acknowledging) until sinks catch up")
                            }
                            StoreError::NoSpace(_) => {
                                warn!(%error, "disk full: holding input (not acknowledging) until space returns; sinks keep delivering")
                            }
                            _ => {
                                error!(%error, "cannot commit to the store; holding input and retrying")
                            }
                        }
                        reported = true;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Committed::Stopped,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }
}

/// How one [`Committer::commit_part`] ended.
enum Committed {
    Yes,
    /// Shutdown came before the store took it.
    Stopped,
    /// Larger than the whole store: the records and state, untouched.
    TooLarge(Vec<Record>, StateWrite),
}

/// What one turn of the commit task produced.
#[derive(Default)]
struct Batch {
    records: Vec<Record>,
    acks: Vec<crate::ingest::Ack>,
    actions: Vec<Action>,
    /// An alert opened or closed: persist the rule state with this batch.
    transition: bool,
    /// The MQTT deliveries the batch acknowledges, rejected ones left out.
    delivered: Acknowledged,
}

#[cfg(test)]
mod tests {
    //! The commit task's decisions, on a store that records what it is given:
    //! what is committed, in which order with the acknowledgements, and how much
    //! rule state each commit carries.

    use super::*;
    use crate::redelivery;
    use crate::store::{Appended, DeadLetter, NewDeadLetter, Read, Replayed, SavedState, Stats};
    use ferry_rules::{CheckOptions, SourceFile};
    use std::sync::Mutex;

    /// An in-memory store that keeps every append and writes to a shared log.
    #[derive(Default)]
    struct Recorder {
        appends: Mutex<Vec<(Vec<Record>, StateWrite)>>,
        log: Arc<Mutex<Vec<String>>>,
        /// Refuse batches of more records than this, as a store refuses a batch
        /// larger than itself; a record whose subject is "huge" never fits.
        max_records: Option<usize>,
    }

    impl Store for Recorder {
        fn append(&self, records: &[Record], state: &StateWrite) -> Result<Appended, StoreError> {
            let huge = records.iter().any(|r| r.subject == "huge");
            if huge || self.max_records.is_some_and(|max| records.len() > max) {
                return Err(StoreError::TooLarge { bytes: 2, max: 1 });
            }
            self.log.lock().unwrap().push("commit".into());
            let mut appends = self.appends.lock().unwrap();
            let first = appends.iter().map(|(r, _)| r.len() as u64).sum();
            appends.push((records.to_vec(), state.clone()));
            let sizes = vec![1; records.len()];
            Ok(Appended {
                first,
                dropped: 0,
                sizes,
            })
        }
        fn rules_state(&self) -> Result<SavedState, StoreError> {
            Ok(SavedState::default())
        }
        fn delivery_window(&self, _: &str) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(None)
        }
        fn save_rule_files(&self, _: &[u8]) -> Result<(), StoreError> {
            Ok(())
        }
        fn rule_files(&self) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(None)
        }
        fn read(&self, from: u64, _: usize, _: usize) -> Result<Read, StoreError> {
            Ok(Read {
                records: Vec::new(),
                next: from,
            })
        }
        fn cursor(&self, _: &str) -> Result<u64, StoreError> {
            Ok(0)
        }
        fn advance(&self, _: &str, _: u64) -> Result<(), StoreError> {
            Ok(())
        }
        fn stats(&self) -> Stats {
            Stats::default()
        }
        fn epoch(&self) -> &str {
            "test"
        }
        fn read_for(&self, _: &str, from: u64, max: usize, b: usize) -> Result<Read, StoreError> {
            self.read(from, max, b)
        }
        fn add_dead_letters(&self, _: Vec<NewDeadLetter>) -> Result<(), StoreError> {
            Ok(())
        }
        fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
            Ok(Vec::new())
        }
        fn dead_letter(&self, _: u64) -> Result<Option<DeadLetter>, StoreError> {
            Ok(None)
        }
        fn replay_dead_letters(&self, _: Option<&[u64]>) -> Result<Replayed, StoreError> {
            Ok(Replayed::default())
        }
        fn purge_dead_letters(&self, _: Option<&[u64]>) -> Result<u64, StoreError> {
            Ok(0)
        }
        fn dead_letter_count(&self) -> u64 {
            0
        }
    }

    const HOT: &str = r#"
[[rule]]
id = "hot"
when = "t > 30.0"
clear_when = "t < 0.0"
emit = { type = "com.example.hot" }
"#;

    fn committer(store: &Arc<Recorder>) -> Committer {
        committer_on(Arc::clone(store) as Arc<dyn Store>, &[])
    }

    fn committer_on(store: Arc<dyn Store>, sinks: &[String]) -> Committer {
        let files = [SourceFile {
            name: "hot.toml".into(),
            text: HOT.into(),
        }];
        let rules = RuleSet::compile(&files, &CheckOptions::default()).unwrap();
        Committer {
            group: group_commit::Policy {
                linger: Duration::ZERO,
                max_inputs: BATCH,
            },
            window_full: Default::default(),
            rules,
            lag: Arc::new(crate::telemetry::SinkLag::new(store.as_ref(), sinks)),
            store,
            head: watch::channel(0).0,
            handoff: Default::default(),
            log_limit: RateLimit::new(10, Duration::from_secs(60)),
            origins: HashMap::new(),
            actuators: Actuators {
                mqtt: None,
                serial: HashMap::new(),
            },
            progress_unsaved: false,
            last_state_save: Instant::now(),
            changed: HashSet::new(),
            rewrite_state: true,
            windows: Windows::default(),
            feeds: HashMap::new(),
            clock: ClockCheck {
                ahead: chrono::TimeDelta::days(1),
                behind: chrono::TimeDelta::MAX,
                logged: HashSet::new(),
            },
        }
    }

    #[tokio::test]
    async fn a_commit_is_handed_to_a_caught_up_sink_and_not_kept_while_every_sink_is_behind() {
        let dir = tempfile::tempdir().unwrap();
        let sinks = ["cloud".to_string()];
        let cfg = crate::store::StoreConfig::default();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::open_as_is(dir.path(), &cfg, &sinks).unwrap());
        let mut c = committer_on(Arc::clone(&store), &sinks);
        let stop = CancellationToken::new();
        let reading = |i| Record::test_reading(i, 0);
        let handed = |c: &Committer, from| {
            c.handoff
                .take(store.as_ref(), "cloud", from, 100, usize::MAX)
                .map(|(records, next)| (records.len(), next))
        };

        assert!(
            c.commit(vec![reading(0), reading(1)], StateWrite::default(), &stop)
                .await
        );
        assert_eq!(handed(&c, 0), Some((2, 2)), "the sink is at 0: caught up");
        // The sink took them but has not delivered them (an outage): it is behind.
        assert!(
            c.commit(vec![reading(2)], StateWrite::default(), &stop)
                .await
        );
        assert_eq!(handed(&c, 2), None, "no sink is at 2: nothing kept for one");
    }

    fn origin() -> Arc<Origin> {
        let decode = DecodeConfig {
            device: DeviceTemplate::parse("{topic.1}").unwrap(),
            max_payload: 1 << 20,
            time_field: Some("time".into()),
        };
        Origin::new("gw", "mqtt", "local", Some(decode))
    }

    fn raw(device: &str, payload: &str) -> Payload {
        Payload::Raw {
            topic: format!("sensors/{device}/telemetry"),
            bytes: payload.as_bytes().to_vec(),
        }
    }

    /// One turn of the commit task on `inputs`, each acknowledged into the log.
    async fn turn(c: &mut Committer, log: &Arc<Mutex<Vec<String>>>, inputs: Vec<(&str, &str)>) {
        let origin = origin();
        let mut batch = Batch::default();
        for (device, payload) in inputs {
            c.process(
                &origin,
                raw(device, payload),
                chrono::Utc::now(),
                &mut batch,
            );
            let (log, device) = (Arc::clone(log), device.to_string());
            batch.acks.push(Box::new(move || {
                log.lock().unwrap().push(format!("ack {device}"))
            }));
        }
        assert!(c.settle(batch, &CancellationToken::new()).await);
    }

    /// One turn of the commit task on MQTT deliveries `(device, payload, packet id,
    /// dup)`, each acknowledged into the log.
    async fn deliveries(
        c: &mut Committer,
        log: &Arc<Mutex<Vec<String>>>,
        inputs: &[(&str, &str, u16, bool)],
    ) {
        let origin = origin();
        let mut batch = Batch::default();
        for &(device, payload, packet_id, dup) in inputs {
            let raw = raw(device, payload);
            let Payload::Raw { topic, bytes } = &raw else {
                unreachable!("raw() makes raw payloads")
            };
            let delivery = Delivery {
                key: redelivery::Key::new(packet_id, topic, bytes),
                dup,
                connection: 1,
            };
            let (log, device) = (Arc::clone(log), device.to_string());
            c.take(
                Input {
                    origin: Arc::clone(&origin),
                    payload: raw,
                    received: chrono::Utc::now(),
                    ack: Some(Box::new(move || {
                        log.lock().unwrap().push(format!("ack {device}"))
                    })),
                    delivery: Some(delivery),
                },
                &mut batch,
            );
        }
        assert!(c.settle(batch, &CancellationToken::new()).await);
    }

    fn stored(store: &Recorder) -> Vec<String> {
        store
            .appends
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(records, _)| records.iter().map(|r| r.subject.clone()))
            .collect()
    }

    #[tokio::test]
    async fn a_delivery_the_broker_sends_again_after_its_commit_is_acknowledged_and_not_stored_again(
    ) {
        let store = Arc::new(Recorder::default());
        let log = Arc::clone(&store.log);
        let mut c = committer(&store);
        deliveries(&mut c, &log, &[("a", r#"{"t":1}"#, 7, false)]).await;
        // The PUBACK never reached the broker: it sends the reading again, with DUP.
        deliveries(
            &mut c,
            &log,
            &[("a", r#"{"t":1}"#, 7, true), ("b", r#"{"t":2}"#, 8, false)],
        )
        .await;
        assert_eq!(stored(&store), ["a", "b"]);
        assert_eq!(
            *log.lock().unwrap(),
            ["commit", "ack a", "commit", "ack a", "ack b"]
        );
    }

    #[tokio::test]
    async fn a_delivery_without_the_dup_flag_is_stored_even_if_it_matches() {
        let store = Arc::new(Recorder::default());
        let log = Arc::clone(&store.log);
        let mut c = committer(&store);
        deliveries(&mut c, &log, &[("a", r#"{"t":1}"#, 7, false)]).await;
        deliveries(&mut c, &log, &[("a", r#"{"t":1}"#, 7, false)]).await;
        assert_eq!(stored(&store), ["a", "a"]);
    }

    #[tokio::test]
    async fn the_window_commits_in_the_same_append_as_the_records_it_covers() {
        let store = Arc::new(Recorder::default());
        let log = Arc::clone(&store.log);
        let mut c = committer(&store);
        deliveries(
            &mut c,
            &log,
            &[("a", r#"{"t":1}"#, 7, false), ("b", r#"{"t":2}"#, 8, false)],
        )
        .await;
        let appends = store.appends.lock().unwrap();
        assert_eq!(appends.len(), 1);
        let (records, state) = &appends[0];
        assert_eq!(records.len(), 2);
        assert_eq!(state.deliveries.len(), 1);
        let (source, bytes) = &state.deliveries[0];
        assert_eq!(source, "local");
        assert_eq!(Window::decode(bytes).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_batch_of_only_redeliveries_or_rejected_input_writes_nothing() {
        let store = Arc::new(Recorder::default());
        let log = Arc::clone(&store.log);
        let mut c = committer(&store);
        deliveries(&mut c, &log, &[("a", r#"{"t":1}"#, 7, false)]).await;
        deliveries(
            &mut c,
            &log,
            &[("a", r#"{"t":1}"#, 7, true), ("bad", "not json", 9, false)],
        )
        .await;
        assert_eq!(store.appends.lock().unwrap().len(), 1);
        assert_eq!(
            *log.lock().unwrap(),
            ["commit", "ack a", "ack a", "ack bad"]
        );
        // The window still holds the committed delivery.
        let window = c.windows.window("local").unwrap();
        assert_eq!(window.len(), 1);
    }

    #[test]
    fn the_quarantine_event_comes_from_the_agent_about_the_agent_and_says_where_the_files_went() {
        let q = Quarantined {
            moved_to: PathBuf::from("/var/lib/ferry/quarantine/20261130T081500Z"),
            error: "DB corrupted: checksum mismatch".into(),
        };
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-30T08:15:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let r = quarantine_record(&q, "gw-0042", at);
        assert_eq!(r.source, "/ferry/gw-0042/agent/store");
        assert_eq!(r.event_type, "io.ferry.agent.store_quarantined");
        assert_eq!(r.subject, "gw-0042");
        assert_eq!(r.time, at);
        assert_eq!(
            *r.data,
            serde_json::json!({
                "moved_to": "/var/lib/ferry/quarantine/20261130T081500Z",
                "error": "DB corrupted: checksum mismatch",
                "at": "2026-11-30T08:15:00.000Z",
            })
        );
        assert!(r.is_for("any sink"));
    }

    /// An input of `origin` that waits for an acknowledgement (`acked`) or not.
    fn input(origin: &Arc<Origin>, n: usize, acked: bool) -> Input {
        Input {
            origin: Arc::clone(origin),
            payload: raw("d1", &format!(r#"{{"n":{n}}}"#)),
            received: chrono::Utc::now(),
            ack: acked.then(|| Box::new(|| {}) as crate::ingest::Ack),
            delivery: None,
        }
    }

    /// Sends `inputs` `gap` apart, the first at once, and gathers a batch from the
    /// first on: what was gathered and how long it took.
    async fn gather_from(
        c: &mut Committer,
        inputs: Vec<Input>,
        gap: Duration,
    ) -> (usize, Duration) {
        let (inlet, mut rx) = Inlet::channel(64, 1 << 20);
        c.window_full = inlet.window_full();
        let sender = tokio::spawn(async move {
            for (i, input) in inputs.into_iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(gap).await;
                }
                if inlet.send(input).await.is_err() {
                    return;
                }
            }
            // Keep the channel open: its end would end the gathering too.
            std::future::pending::<()>().await;
        });
        let mut batch = Vec::new();
        rx.recv_many(&mut batch, BATCH).await;
        let start = tokio::time::Instant::now();
        c.gather(&mut rx, &mut batch, &CancellationToken::new())
            .await;
        sender.abort();
        (batch.len(), start.elapsed())
    }

    fn lingering(store: &Arc<Recorder>, linger: Duration) -> Committer {
        let mut c = committer(store);
        c.group = group_commit::Policy {
            linger,
            max_inputs: BATCH,
        };
        c
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_takes_in_what_arrives_within_the_linger_and_no_later() {
        let mut c = lingering(&Arc::new(Recorder::default()), Duration::from_millis(5));
        let local = origin();
        let inputs = (0..4).map(|n| input(&local, n, true)).collect();
        // Arrivals at 0, 2, 4 and 6 ms: the last comes after the linger.
        let (gathered, took) = gather_from(&mut c, inputs, Duration::from_millis(2)).await;
        assert_eq!(gathered, 3);
        assert_eq!(took, Duration::from_millis(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_holding_a_brokers_whole_window_is_committed_without_waiting() {
        let mut c = lingering(&Arc::new(Recorder::default()), Duration::from_millis(50));
        let broker = Origin::windowed("gw", "mqtt", "local", None, 3);
        let inputs = (0..5).map(|n| input(&broker, n, true)).collect();
        let (gathered, took) = gather_from(&mut c, inputs, Duration::from_millis(1)).await;
        assert_eq!(
            gathered, 3,
            "the broker sends no more until these are acknowledged"
        );
        assert_eq!(took, Duration::from_millis(2));
    }

    #[tokio::test(start_paused = true)]
    async fn inputs_that_wait_for_no_acknowledgement_do_not_fill_a_window() {
        let mut c = lingering(&Arc::new(Recorder::default()), Duration::from_millis(10));
        let broker = Origin::windowed("gw", "mqtt", "local", None, 2);
        let inputs = (0..5).map(|n| input(&broker, n, false)).collect();
        let (gathered, took) = gather_from(&mut c, inputs, Duration::from_millis(1)).await;
        assert_eq!(gathered, 5);
        assert_eq!(took, Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_linger_a_batch_is_what_was_queued() {
        let mut c = lingering(&Arc::new(Recorder::default()), Duration::ZERO);
        let local = origin();
        let inputs = (0..3).map(|n| input(&local, n, true)).collect();
        let (gathered, took) = gather_from(&mut c, inputs, Duration::from_millis(1)).await;
        assert_eq!((gathered, took), (1, Duration::ZERO));
    }

    #[tokio::test]
    async fn inputs_are_acknowledged_after_their_batch_is_committed_in_arrival_order() {
        let store = Arc::new(Recorder::default());
        let log = Arc::clone(&store.log);
        let mut c = committer(&store);
        turn(&mut c, &log, vec![("a", r#"{"t":1}"#), ("b", r#"{"t":2}"#)]).await;
        assert_eq!(*log.lock().unwrap(), ["commit", "ack a", "ack b"]);
    }

    #[tokio::test]
    async fn a_rejected_input_is_acknowledged_and_not_stored() {
        let store = Arc::new(Recorder::default());
        let log = Arc::clone(&store.log);
        let mut c = committer(&store);
        let deep = format!("{}1{}", r#"{"a":"#.repeat(100), "}".repeat(100));
        turn(&mut c, &log, vec![("deep", &deep), ("ok", r#"{"t":1}"#)]).await;
        assert_eq!(*log.lock().unwrap(), ["commit", "ack deep", "ack ok"]);
        let appends = store.appends.lock().unwrap();
        let subjects: Vec<&str> = appends[0].0.iter().map(|r| r.subject.as_str()).collect();
        assert_eq!(subjects, ["ok"]);
    }

    #[tokio::test]
    async fn an_alert_commits_with_its_state_and_later_commits_carry_only_what_changed() {
        let store = Arc::new(Recorder::default());
        let log = Arc::clone(&store.log);
        let mut c = committer(&store);
        let hot: Vec<String> = (0..1000).map(|i| format!("open-{i}")).collect();
        turn(
            &mut c,
            &log,
            hot.iter().map(|d| (d.as_str(), r#"{"t":40}"#)).collect(),
        )
        .await;
        // The first save after a start rewrites everything, once.
        {
            let appends = store.appends.lock().unwrap();
            let (records, state) = &appends[0];
            assert_eq!(records.len(), 2000, "each reading and its alert");
            assert!(state.replace_all);
            assert_eq!(state.entries.len(), 1000);
        }
        // One more alert among the 1,000 open: one entry, not 1,001.
        turn(&mut c, &log, vec![("new", r#"{"t":40}"#)]).await;
        {
            let appends = store.appends.lock().unwrap();
            let (records, state) = &appends[1];
            assert_eq!(records.len(), 2);
            assert!(!state.replace_all);
            assert_eq!(state.entries.len(), 1);
            assert_eq!(state.entries[0].0, r#"["hot","new"]"#);
            assert!(state.entries[0].1.is_some());
        }
        // Resolving it removes its entry, still alone.
        turn(&mut c, &log, vec![("new", r#"{"t":-5}"#)]).await;
        let appends = store.appends.lock().unwrap();
        assert_eq!(
            appends[2].1.entries,
            [(r#"["hot","new"]"#.to_string(), None)]
        );
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_store_is_committed_in_parts_in_order_before_the_acks() {
        let store = Arc::new(Recorder {
            max_records: Some(2),
            ..Recorder::default()
        });
        let log = Arc::clone(&store.log);
        let mut c = committer(&store);
        let devices = ["d1", "d2", "d3", "d4", "d5"];
        turn(
            &mut c,
            &log,
            devices.iter().map(|d| (*d, r#"{"t":1}"#)).collect(),
        )
        .await;
        let appends = store.appends.lock().unwrap();
        let stored: Vec<&str> = appends
            .iter()
            .flat_map(|(records, _)| records.iter().map(|r| r.subject.as_str()))
            .collect();
        assert_eq!(stored, devices);
        assert!(appends.iter().all(|(records, _)| records.len() <= 2));
        let log = log.lock().unwrap();
        let first_ack = log.iter().position(|l| l.starts_with("ack")).unwrap();
        assert_eq!(
            first_ack,
            appends.len(),
            "every part is committed before any ack"
        );
    }

    #[tokio::test]
    async fn a_record_larger_than_the_store_is_dropped_and_its_alert_state_still_saved() {
        let store = Arc::new(Recorder::default());
        let log = Arc::clone(&store.log);
        let mut c = committer(&store);
        turn(
            &mut c,
            &log,
            vec![("ok", r#"{"t":1}"#), ("huge", r#"{"t":40}"#)],
        )
        .await;
        let appends = store.appends.lock().unwrap();
        let stored: Vec<&str> = appends
            .iter()
            .flat_map(|(records, _)| records.iter().map(|r| r.subject.as_str()))
            .collect();
        assert_eq!(stored, ["ok"]);
        // The alert on "huge" opened: its state is saved although its records were not.
        let saved: Vec<&str> = appends
            .iter()
            .flat_map(|(_, state)| state.entries.iter().map(|(k, _)| k.as_str()))
            .collect();
        assert_eq!(saved, [r#"["hot","huge"]"#]);
        assert_eq!(
            log.lock()
                .unwrap()
                .iter()
                .filter(|l| l.starts_with("ack"))
                .count(),
            2
        );
    }

    #[tokio::test]
    async fn a_reading_that_changes_no_alert_commits_no_rule_state() {
        let store = Arc::new(Recorder::default());
        let log = Arc::clone(&store.log);
        let mut c = committer(&store);
        turn(&mut c, &log, vec![("cool", r#"{"t":10}"#)]).await;
        let appends = store.appends.lock().unwrap();
        assert!(appends[0].1.is_empty());
    }

    #[tokio::test]
    async fn a_reading_from_a_clock_far_ahead_is_stored_with_the_receive_time() {
        let store = Arc::new(Recorder::default());
        let log = Arc::clone(&store.log);
        let mut c = committer(&store);
        let before = chrono::Utc::now();
        turn(
            &mut c,
            &log,
            vec![("liar", r#"{"t":1,"time":"9999-12-31T23:59:59Z"}"#)],
        )
        .await;
        let appends = store.appends.lock().unwrap();
        let record = &appends[0].0[0];
        assert!(record.time >= before && record.time <= chrono::Utc::now());
        assert_eq!(record.data["reported_time"], "9999-12-31T23:59:59Z");
    }
}
