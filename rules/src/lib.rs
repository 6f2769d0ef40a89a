//! ferry's rule engine: parse, check and evaluate the rule files installers write.
//!
//! The crate does no I/O and has no clock: the agent reads the files and passes their
//! text in, and time arrives with each reading. That keeps every decision here unit
//! testable and lets `ferry rules test` replay recorded readings in virtual time.
//!
//! ```
//! use ferry_rules::{CheckOptions, Reading, RuleSet, SourceFile};
//!
//! let files = [SourceFile {
//!     name: "freezer.toml".into(),
//!     text: r#"
//!         [[rule]]
//!         id = "freezer-warm"
//!         match = { device = "freezer-*" }
//!         when = "temperature > -15"
//!         emit = { type = "com.acme.freezer.warm", severity = "critical" }
//!     "#
//!     .into(),
//! }];
//! let mut rules = RuleSet::compile(&files, &CheckOptions::default())
//!     .map_err(|diagnostics| diagnostics[0].to_string())?;
//!
//! let fields = serde_json::json!({ "temperature": -12.5 });
//! let fields = fields.as_object().ok_or("not an object")?;
//! let outcome = rules.evaluate(&Reading {
//!     source: "local",
//!     device: "freezer-2",
//!     time: chrono::Utc::now(),
//!     fields,
//! });
//! assert!(outcome.forward);
//! assert_eq!(outcome.alerts[0].event_type, "com.acme.freezer.warm");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The file format, the expression language and the limits are described for
//! installers in `docs/RULES.md`.
//!
//! # Layout
//!
//! - [`RuleSet::compile`] parses every file, compiles every expression and reports
//!   every mistake at once as [`Diagnostic`]s (`file:line:col: message`).
//! - [`RuleSet::evaluate`] runs one [`Reading`] through the rules and returns an
//!   [`Outcome`]: whether to forward the reading, the alerts to emit, and the
//!   per-rule evaluation errors (counted by the agent, never fatal).
//!
//! Inside, in the order a rule file travels:
//!
//! - `file`: the TOML model (`[[rule]]` tables, with the position of every value) and
//!   parsing that reports a schema error in each table rather than only the first.
//! - `toml_string`: maps an offset inside a decoded TOML string (a `when`
//!   expression, a glob) back to the file, through quotes and escapes.
//! - `check`: turns parsed tables into rules, collecting every mistake: empty or
//!   duplicate ids, bad globs, empty `emit` fields, unknown sinks, bad expressions.
//! - `expr`: CEL conditions: compiling (with length and depth limits that keep the
//!   parser and the interpreter inside their stacks), turning a reading's JSON into
//!   CEL values (every number a `double`), evaluating, and wording errors.
//! - `glob`: `*` and `?` globs for `match`.
//! - `rule`: one compiled rule, split into matcher, trigger and emit, so triggers
//!   with memory (sustained, hysteresis, windows) can grow in.
//! - `engine`: [`RuleSet`] and the types that cross the crate boundary.
//! - `diagnostic`: [`Diagnostic`], shared with the agent for its own config errors.

mod check;
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
pub use devices::MAX_DEVICES_PER_RULE;
pub use diagnostic::Diagnostic;
pub use duration::MAX_DURATION_DAYS;
pub use engine::{
    Action, Alert, EvalError, Outcome, Reading, Restored, RuleDescription, RuleSet, Transition,
    ALERT_STATE_VERSION,
};
pub use expr::{COMPILE_STACK_SIZE, MAX_DEPTH, MAX_EXPRESSION_LEN, MAX_NESTING, MAX_VALUE_DEPTH};
pub use kinds::MAX_COUNT;
