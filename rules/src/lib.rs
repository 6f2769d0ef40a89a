//! ferry's rule engine: parse, check and evaluate the rule files installers write.
//!
//! The crate does no I/O and has no clock: the agent reads the files and passes their
//! text in, time arrives with each reading and with [`RuleSet::tick`]. That keeps
//! every decision here unit testable and lets `ferry rules test` replay recorded
//! readings in virtual time.
//!
//! ```
//! use ferry_rules::{CheckOptions, Reading, RuleSet, SourceFile, Transition};
//!
//! let files = [SourceFile {
//!     name: "freezer.toml".into(),
//!     text: r#"
//!         [[rule]]
//!         id = "freezer-warm"
//!         match = { device = "freezer-*" }
//!         when = "temperature > -15"
//!         clear_when = "temperature < -18"
//!         emit = { type = "com.acme.freezer.warm", severity = "critical" }
//!     "#
//!     .into(),
//! }];
//! let mut rules = RuleSet::compile(&files, &CheckOptions::default())
//!     .map_err(|diagnostics| diagnostics[0].to_string())?;
//!
//! let mut reading = |temperature: f64| {
//!     let fields = serde_json::json!({ "temperature": temperature });
//!     let fields = fields.as_object().cloned().unwrap_or_default();
//!     rules.evaluate(&Reading {
//!         source: "local",
//!         device: "freezer-2",
//!         time: chrono::Utc::now(),
//!         fields: &fields,
//!     })
//! };
//! let warm = reading(-12.5);
//! assert!(warm.forward);
//! assert_eq!(warm.alerts[0].event_type, "com.acme.freezer.warm");
//! assert_eq!(warm.alerts[0].transition, Transition::Fired);
//! assert!(reading(-16.0).alerts.is_empty()); // still open: one event per transition
//! assert_eq!(reading(-19.0).alerts[0].transition, Transition::Resolved);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The file format, the triggers, the events and the limits are described for
//! installers in `docs/RULES.md`.
//!
//! # Layout
//!
//! - [`RuleSet::compile`] parses every file, compiles every expression and reports
//!   every mistake at once as [`Diagnostic`]s (`file:line:col: message`).
//! - [`RuleSet::evaluate`] runs one [`Reading`] through the rules and returns an
//!   [`Outcome`]: whether to forward the reading, the events ([`Alert`]) and local
//!   [`Action`]s, the per-rule evaluation errors (counted by the agent, never fatal),
//!   and whether the state to save changed ([`StateChange`]).
//! - [`RuleSet::tick`] lets time pass: stale sensors, count windows, aggregate
//!   windows.
//! - [`RuleSet::adopt_state`] moves the state of unchanged rules to a reloaded set;
//!   [`RuleSet::alert_state`] and [`RuleSet::restore_alert_state`] carry alert state
//!   across a restart.
//!
//! Inside, in the order a rule file travels:
//!
//! - `file`: the TOML model (`[[rule]]` tables, with the position of every value) and
//!   parsing that reports a schema error in each table rather than only the first.
//! - `toml_string`: maps an offset inside a decoded TOML string (an expression, a
//!   glob, a duration, a topic) back to the file, through quotes and escapes.
//! - `check`: turns parsed tables into rules, collecting every mistake (which keys go
//!   together, durations, trigger settings, topics, sinks, expressions), and computes
//!   each rule's fingerprint (its canonical definition, hashed).
//! - `expr`: CEL conditions: compiling (with length and depth limits that keep the
//!   parser and the interpreter inside their stacks, and literal type checks),
//!   turning a reading's JSON into CEL values (every number a `double`), evaluating,
//!   and wording errors.
//! - `cost`: the most work one evaluation of a condition can take, as a polynomial in
//!   the size of the reading, checked against [`MAX_EVAL_STEPS`] before it runs.
//! - `duration`, `glob`: the small languages of durations (`1h30m`) and `match` globs.
//! - `rule`: one compiled rule: matcher, filter, kind, `emit` and `action`, and how a
//!   transition becomes an event and an action.
//! - `kinds`: what each kind of rule watches for, with its per-device state
//!   (condition/sustained/hysteresis, every reading, rate, stale, count, aggregate,
//!   deadband, drop), reload and restart included.
//! - `devices`: a rule's per-device state, capped at [`MAX_DEVICES_PER_RULE`].
//! - `engine`: [`RuleSet`] and the types that cross the crate boundary.
//! - `diagnostic`: [`Diagnostic`], shared with the agent for its own config errors.

mod check;
mod cost;
mod devices;
mod diagnostic;
mod duration;
mod engine;
mod expr;
mod file;
mod glob;
mod kinds;
mod rule;
mod toml_string;

pub use check::{CheckOptions, SourceFile, MAX_FIELDS};
pub use cost::MAX_EVAL_STEPS;
pub use devices::MAX_DEVICES_PER_RULE;
pub use diagnostic::Diagnostic;
pub use duration::MAX_DURATION_DAYS;
pub use engine::{
    Action, Alert, EvalError, Outcome, Reading, Restored, RuleDescription, RuleSet, StateChange,
    StateEntry, Transition, ALERT_STATE_VERSION,
};
pub use expr::{COMPILE_STACK_SIZE, MAX_DEPTH, MAX_EXPRESSION_LEN, MAX_NESTING, MAX_VALUE_DEPTH};
pub use kinds::MAX_COUNT;
