//! The agent's configuration file: its shape, its defaults, and its validation.
//!
//! Every field here is user-facing: the `///` comments are the reference, and
//! `docs/CONFIGURATION.md` repeats them with examples. Each stage owns its own config
//! struct (in its module); this file assembles them and checks what spans stages
//! (unique names, sinks referenced by rules, paths).
//!
//! Loading reports every semantic error at once, each with `file:line:col` found
//! by walking the TOML document's spans, so an installer fixes a file in one pass.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ferry_rules::Diagnostic;
use serde::{Deserialize, Deserializer};

use crate::ingest::modbus::ModbusSourceConfig;
use crate::ingest::mqtt::MqttSourceConfig;
use crate::ingest::serial::SerialSourceConfig;
use crate::ingest::simulator::SimulatorConfig;
use crate::sinks::SinksConfig;
use crate::store::StoreConfig;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Who this agent is and where it keeps its state.
    pub agent: AgentConfig,
    /// The optional admin endpoint (Prometheus metrics). Off unless configured.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Inputs, by kind.
    #[serde(default)]
    pub source: SourcesConfig,
    /// Where the rule files live.
    #[serde(default)]
    pub rules: RulesConfig,
    /// The durable buffer between rules and sinks.
    #[serde(default)]
    pub store: StoreConfig,
    /// Upstreams, by kind.
    #[serde(default)]
    pub sink: SinksConfig,
}

/// `[agent]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent's id: part of every CloudEvent `source` (`/ferry/{id}/...`) and id.
    /// Letters, digits, `.`, `_` and `-`.
    pub id: String,
    /// Directory for the store. Relative paths are relative to the config file.
    /// Default: `$STATE_DIRECTORY` when set (systemd `StateDirectory=`), else
    /// `/var/lib/ferry`.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// How far ahead of the agent's clock a reading's own time may be before it is
    /// distrusted: such a reading gets its receive time, and the time it carried is
    /// kept in its `reported_time` field. Default 1d.
    #[serde(default = "default_max_time_ahead")]
    pub max_time_ahead: Dur,
    /// Likewise for a reading time behind the agent's clock (a device whose clock
    /// was never set says 1970). Default: no bound, so readings a device buffered
    /// through an outage, or replayed history, keep their own times.
    #[serde(default)]
    pub max_time_behind: Option<Dur>,
}

fn default_max_time_ahead() -> Dur {
    Dur(Duration::from_secs(24 * 3600))
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address for the Prometheus endpoint (`GET /metrics`) and the dead-letter
    /// endpoints `ferry dead-letters` uses, e.g. `127.0.0.1:9464`. Keep it on
    /// loopback unless the port is firewalled.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: std::net::SocketAddr,
    /// Answer dead-letter requests from clients that are not on loopback too.
    /// They show readings and change the store. Default false.
    #[serde(default)]
    pub remote_dead_letters: bool,
}

/// `[[source.mqtt]]`, `[[source.serial]]`, `[[source.modbus]]`, `[[source.simulator]]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    #[serde(default)]
    pub mqtt: Vec<MqttSourceConfig>,
    #[serde(default)]
    pub serial: Vec<SerialSourceConfig>,
    #[serde(default)]
    pub modbus: Vec<ModbusSourceConfig>,
    #[serde(default)]
    pub simulator: Vec<SimulatorConfig>,
}

impl Config {
    /// The names rule files may refer to (sinks in `emit.to`, serial sources in
    /// `action.serial_write.port`), for checking them.
    pub fn check_options(&self) -> ferry_rules::CheckOptions {
        ferry_rules::CheckOptions {
            known_sinks: Some(self.sink.names()),
            known_serial_ports: Some(self.source.serial.iter().map(|s| s.name.clone()).collect()),
        }
    }
}

/// `[rules]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Directory of `*.toml` rule files. Relative paths are relative to the config
    /// file. Without it, every reading is forwarded and no alerts are raised.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Reload the rules when a file in `dir` changes (SIGHUP always reloads).
    /// Default true.
    #[serde(default = "default_true")]
    pub reload: bool,
    /// The MQTT source whose broker connection carries `mqtt_publish` actions.
    /// Default: the first `[[source.mqtt]]`.
    #[serde(default)]
    pub mqtt_actions: Option<String>,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            dir: None,
            reload: true,
            mqtt_actions: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// `message` with a hint for the mistake behind it, if it is a common one. `at` is
/// the text from the error's place on.
fn with_hint(message: &str, at: &str) -> String {
    // `[source.mqtt]` where `[[source.mqtt]]` was meant: serde sees a table where it
    // wants a list, and says only that.
    let header = at.lines().next().unwrap_or_default().trim_end();
    if message.starts_with("invalid type: map, expected a sequence")
        && header.starts_with('[')
        && !header.starts_with("[[")
    {
        if let Some(name) = header
            .strip_prefix('[')
            .and_then(|h| h.split(']').next())
            .map(str::trim)
        {
            return format!(
                "`[{name}]` is a single table, but there can be several of these: write \
                 `[[{name}]]`"
            );
        }
    }
    message.to_string()
}

/// Deserializes the config, reporting every unknown key and wrong type, not only
/// the first: serde stops at its first error, so each `key = value` line that fails
/// is blanked out (its bytes turned to spaces, so every other position stays put)
/// and the text is read again. `Err` holds `(byte offset, message)` per problem.
fn parse(text: &str) -> Result<Config, Vec<(usize, String)>> {
    // Each round removes one line; the bound only guards against a loop.
    const MOST: usize = 100;
    let mut text = text.to_string();
    let mut errors = Vec::new();
    let mut blanked = Vec::new();
    for _ in 0..MOST {
        let e = match toml::from_str::<Config>(&text) {
            Ok(config) if errors.is_empty() => return Ok(config),
            Ok(_) => break,
            Err(e) => e,
        };
        // A required key blanked for its wrong type is now missing: said already.
        if blanked
            .iter()
            .any(|k| e.message() == format!("missing field `{k}`"))
        {
            break;
        }
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        errors.push((offset, e.message().to_string()));
        match entry_at(&text, offset) {
            Some((key, range)) if blank(&mut text, range.clone()) => blanked.push(key),
            _ => break,
        }
    }
    errors.sort_by_key(|(offset, _)| *offset);
    Err(errors)
}

/// The `key = value` line of a table (a `[table]`, a `[[list]]` element or the top
/// level) whose key or value holds `offset`: its key and its byte range, from the
/// start of its line to the end of its value. `None` for anything else (a table
/// header, a syntax error), which cannot be taken out without changing the meaning
/// of the lines after it.
fn entry_at(text: &str, offset: usize) -> Option<(String, std::ops::Range<usize>)> {
    fn in_table(
        text: &str,
        t: &toml_edit::Table,
        offset: usize,
    ) -> Option<(String, std::ops::Range<usize>)> {
        let holds = |r: Option<std::ops::Range<usize>>| r.is_some_and(|r| r.contains(&offset));
        t.iter().find_map(|(k, item)| match item {
            toml_edit::Item::Value(v) => {
                let key = t.key(k)?.span()?;
                let value = v.span()?;
                if !(holds(Some(key.clone())) || holds(Some(value.clone()))) {
                    return None;
                }
                let start = text.get(..key.start)?.rfind('\n').map_or(0, |i| i + 1);
                // Only whitespace and the dotted part of the key may precede it.
                let before = text.get(start..key.start)?;
                if before.contains(['=', '{', '[', '"', '\'']) {
                    return None;
                }
                Some((k.to_string(), start..value.end))
            }
            toml_edit::Item::Table(t) => in_table(text, t, offset),
            toml_edit::Item::ArrayOfTables(a) => a.iter().find_map(|t| in_table(text, t, offset)),
            toml_edit::Item::None => None,
        })
    }
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    in_table(text, doc.as_table(), offset)
}

/// Turns the bytes of `range` into spaces, keeping line breaks (and so every line
/// number and every other byte offset). `false` if `range` is not within `text`.
fn blank(text: &mut String, range: std::ops::Range<usize>) -> bool {
    let Some(old) = text.get(range.clone()) else {
        return false;
    };
    let kept: String = old
        .chars()
        .flat_map(|c| {
            let n = if c == '\n' { 0 } else { c.len_utf8() };
            std::iter::repeat_n(' ', n).chain((c == '\n').then_some('\n'))
        })
        .collect();
    text.replace_range(range, &kept);
    true
}

/// A loaded config plus where it came from (for resolving relative paths).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub path: PathBuf,
}

impl Loaded {
    /// Reads, parses and validates the file. `Err` holds every problem found.
    pub fn from_file(path: &Path) -> Result<Self, Vec<Diagnostic>> {
        match Self::check_file(path) {
            (Some(loaded), problems) if problems.is_empty() => Ok(loaded),
            (_, problems) => Err(problems),
        }
    }

    /// Reads, parses and validates the file, returning the config whenever it could
    /// be parsed (even with semantic problems, so `ferry check` can go on to check the
    /// rule files) together with every problem found.
    pub fn check_file(path: &Path) -> (Option<Self>, Vec<Diagnostic>) {
        let name = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::check_str(&name, &text, path),
            Err(e) => (
                None,
                vec![Diagnostic {
                    file: name,
                    line: 0,
                    col: 0,
                    message: format!("cannot read config file: {e}"),
                    snippet: String::new(),
                }],
            ),
        }
    }

    /// Parses and validates config text; `path` anchors relative paths.
    pub fn from_str(name: &str, text: &str, path: &Path) -> Result<Self, Vec<Diagnostic>> {
        match Self::check_str(name, text, path) {
            (Some(loaded), problems) if problems.is_empty() => Ok(loaded),
            (_, problems) => Err(problems),
        }
    }

    fn check_str(name: &str, text: &str, path: &Path) -> (Option<Self>, Vec<Diagnostic>) {
        let config: Config = match parse(text) {
            Ok(c) => c,
            Err(errors) => {
                let diagnostics = errors
                    .into_iter()
                    .map(|(offset, message)| {
                        let message = with_hint(&message, text.get(offset..).unwrap_or_default());
                        Diagnostic::at(name, text, offset, message)
                    })
                    .collect();
                return (None, diagnostics);
            }
        };
        let mut problems = validate(&config);
        problems.extend(validate_files(&config, path));
        let doc = if problems.is_empty() {
            None
        } else {
            text.parse::<toml_edit::ImDocument<String>>().ok()
        };
        let diagnostics = problems
            .into_iter()
            .map(|p| {
                let offset = doc.as_ref().and_then(|d| locate(d, &p.path)).unwrap_or(0);
                Diagnostic::at(name, text, offset, p.message)
            })
            .collect();
        let loaded = Self {
            config,
            path: path.to_path_buf(),
        };
        (Some(loaded), diagnostics)
    }

    /// Resolves a path from the config against the config file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            return p.to_path_buf();
        }
        self.path
            .parent()
            .map(|dir| dir.join(p))
            .unwrap_or_else(|| p.to_path_buf())
    }

    /// The store directory, after defaults.
    pub fn data_dir(&self) -> PathBuf {
        match &self.config.agent.data_dir {
            Some(p) => self.resolve(p),
            None => std::env::var_os("STATE_DIRECTORY")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/lib/ferry")),
        }
    }

    /// The rules directory, if configured.
    pub fn rules_dir(&self) -> Option<PathBuf> {
        self.config.rules.dir.as_ref().map(|p| self.resolve(p))
    }
}

/// One semantic problem, located by its path in the TOML document
/// (e.g. `["source", "mqtt", 0, "url"]`).
#[derive(Debug)]
pub struct Problem {
    pub path: Vec<PathSeg>,
    pub message: String,
}

#[derive(Debug, Clone)]
pub enum PathSeg {
    Key(&'static str),
    Index(usize),
}

impl From<&'static str> for PathSeg {
    fn from(k: &'static str) -> Self {
        PathSeg::Key(k)
    }
}

impl From<usize> for PathSeg {
    fn from(i: usize) -> Self {
        PathSeg::Index(i)
    }
}

/// Builds a [`Problem`]: `problem!(["source", "mqtt", i, "url"], "bad url: {e}")`.
macro_rules! problem {
    ([$($seg:expr),*], $($fmt:tt)+) => {
        $crate::config::Problem {
            path: vec![$($crate::config::PathSeg::from($seg)),*],
            message: format!($($fmt)+),
        }
    };
}
pub(crate) use problem;

/// Finds the byte offset of the deepest item of `path` that exists in the document.
fn locate(doc: &toml_edit::ImDocument<String>, path: &[PathSeg]) -> Option<usize> {
    let mut item: &toml_edit::Item = doc.as_item();
    let mut best = None;
    for seg in path {
        let next = match seg {
            PathSeg::Key(k) => item.get(*k),
            PathSeg::Index(i) => item.get(*i),
        };
        match next {
            Some(n) => {
                item = n;
                if let Some(span) = span_of(item) {
                    best = Some(span.start);
                }
            }
            None => break,
        }
    }
    best
}

fn span_of(item: &toml_edit::Item) -> Option<std::ops::Range<usize>> {
    match item {
        toml_edit::Item::Value(v) => v.span(),
        toml_edit::Item::Table(t) => t.span(),
        toml_edit::Item::ArrayOfTables(a) => a.span(),
        toml_edit::Item::None => None,
    }
}

/// Whether `s` is a usable component name (appears in URIs, metrics and logs).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn validate(config: &Config) -> Vec<Problem> {
    let mut out = Vec::new();
    if !valid_name(&config.agent.id) {
        out.push(problem!(
            ["agent", "id"],
            "agent id must be 1-64 letters, digits, '.', '_' or '-'"
        ));
    }
    if config.admin.as_ref().is_some_and(|a| a.listen.port() == 0) {
        // Port 0 would bind a random port nobody knows to scrape.
        out.push(problem!(
            ["admin", "listen"],
            "admin.listen needs a port other than 0"
        ));
    }

    let mut sources = HashSet::new();
    for (i, s) in config.source.mqtt.iter().enumerate() {
        check_name(&mut out, &mut sources, "source", "mqtt", i, &s.name);
        out.extend(s.validate(i));
    }
    for (i, s) in config.source.serial.iter().enumerate() {
        check_name(&mut out, &mut sources, "source", "serial", i, &s.name);
        out.extend(s.validate(i));
    }
    for (i, s) in config.source.modbus.iter().enumerate() {
        check_name(&mut out, &mut sources, "source", "modbus", i, &s.name);
        out.extend(s.validate(i));
    }
    // Two sources on one port: the second open fails at run time (the first holds
    // an exclusive lock), and the log would not say who holds it.
    let mut ports: HashMap<&Path, &str> = HashMap::new();
    let serial = config
        .source
        .serial
        .iter()
        .map(|s| ("serial", &s.name, &s.path));
    let modbus = config
        .source
        .modbus
        .iter()
        .map(|s| ("modbus", &s.name, &s.path));
    for (kind, i, name, path) in serial
        .enumerate()
        .chain(modbus.enumerate())
        .map(|(i, (kind, name, path))| (kind, i, name, path))
    {
        match ports.entry(path.as_path()) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(name);
            }
            std::collections::hash_map::Entry::Occupied(e) => out.push(problem!(
                ["source", kind, i, "path"],
                "source {name:?}: port {} is already used by source {:?}; one port, one source",
                path.display(),
                e.get()
            )),
        }
    }
    for (i, s) in config.source.simulator.iter().enumerate() {
        check_name(&mut out, &mut sources, "source", "simulator", i, &s.name);
        out.extend(s.validate(i));
    }
    if sources.is_empty() {
        out.push(problem!(
            ["source"],
            "no sources configured: add a [[source.mqtt]], [[source.serial]], [[source.modbus]] or [[source.simulator]]"
        ));
    }

    let mut sinks = HashSet::new();
    for c in config.sink.iter() {
        check_name(
            &mut out,
            &mut sinks,
            "sink",
            c.kind,
            c.index,
            c.config.name(),
        );
        out.extend(c.config.validate(c.index));
    }
    if sinks.is_empty() {
        let tables: Vec<String> = SinksConfig::KINDS
            .iter()
            .map(|k| format!("[[sink.{k}]]"))
            .collect();
        out.push(problem!(
            ["sink"],
            "no sinks configured: add one of {}",
            tables.join(", ")
        ));
    }
    out.extend(config.store.validate());
    if let Some(name) = &config.rules.mqtt_actions {
        if !config.source.mqtt.iter().any(|s| &s.name == name) {
            out.push(problem!(
                ["rules", "mqtt_actions"],
                "rules.mqtt_actions names {name:?}, which is not a [[source.mqtt]]"
            ));
        }
    }
    out
}

/// Checks that the files the config names can be read, without reading secrets
/// into memory: a missing token file should fail `ferry check`, not the first start.
fn validate_files(config: &Config, config_path: &Path) -> Vec<Problem> {
    let base = config_path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let mut out = Vec::new();
    let mut readable = |p: &Path, at: Problem| {
        if let Err(e) = std::fs::File::open(resolve(p)) {
            out.push(Problem {
                message: format!("{}{}: {e}", at.message, resolve(p).display()),
                ..at
            });
        }
    };
    for (i, s) in config.source.mqtt.iter().enumerate() {
        if let Some(p) = &s.password_file {
            readable(
                p,
                problem!(
                    ["source", "mqtt", i, "password_file"],
                    "cannot read password_file "
                ),
            );
        }
    }
    for (i, s) in config.source.mqtt.iter().enumerate() {
        for (what, p) in s.tls.iter().flat_map(|t| t.files()) {
            readable(
                p,
                problem!(["source", "mqtt", i, "tls"], "cannot read tls {what} "),
            );
        }
    }
    for c in config.sink.iter() {
        for f in c.config.files() {
            readable(
                f.path,
                problem!(
                    ["sink", c.kind, c.index, f.field],
                    "cannot read {} ",
                    f.what
                ),
            );
        }
    }
    if let Some(dir) = &config.rules.dir {
        let dir = resolve(dir);
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => out.push(problem!(
                ["rules", "dir"],
                "rules.dir {} is not a directory",
                dir.display()
            )),
            Err(e) => out.push(problem!(
                ["rules", "dir"],
                "rules.dir {}: {e}",
                dir.display()
            )),
        }
    }
    out
}

fn check_name(
    out: &mut Vec<Problem>,
    seen: &mut HashSet<String>,
    table: &'static str,
    kind: &'static str,
    i: usize,
    name: &str,
) {
    if !valid_name(name) {
        out.push(problem!(
            [table, kind, i, "name"],
            "{table} name {name:?} must be 1-64 letters, digits, '.', '_' or '-'"
        ));
    } else if !seen.insert(name.to_string()) {
        out.push(problem!(
            [table, kind, i, "name"],
            "duplicate {table} name {name:?}: names must be unique across all {table}s"
        ));
    }
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<std::net::SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "invalid address {s:?}: write an IP address and a port, like \"127.0.0.1:9464\" (host names are not resolved)"
        ))
    })
}

/// The longest duration a setting may take. Timers and `Instant` arithmetic
/// overflow (and panic) far beyond it, and no setting needs more.
pub const LONGEST: Duration = Duration::from_secs(24 * 3600);

/// A duration written the human way: `"500ms"`, `"10s"`, `"5m"`, `"7d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?}: {e} (write e.g. \"500ms\", \"10s\", \"5m\")"
            ))
        })
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A size written the human way: `"256KiB"`, `"64MiB"`, `"1GB"`, or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"256KiB\" or \"64MiB\", or a whole number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Bytes, E> {
                Ok(Bytes(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Bytes, E> {
                u64::try_from(n)
                    .map(Bytes)
                    .map_err(|_| E::custom(format!("invalid size {n}: a size cannot be negative")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Bytes, E> {
                bytesize::ByteSize::from_str(s)
                    .map(|b| Bytes(b.as_u64()))
                    .map_err(|e| {
                        E::custom(format!(
                            "invalid size {s:?}: {e} (write e.g. \"256KiB\", \"64MiB\")"
                        ))
                    })
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize::b(self.0).display().iec())
    }
}

/// Jittered exponential backoff bounds, shared by every component that retries.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// First delay after a failure.
    pub min: Dur,
    /// Longest delay between attempts.
    pub max: Dur,
}

impl BackoffConfig {
    pub const fn new(min: Duration, max: Duration) -> Self {
        Self {
            min: Dur(min),
            max: Dur(max),
        }
    }

    pub fn validate(&self, path: &[PathSeg]) -> Option<Problem> {
        (self.min.0.is_zero() || self.min > self.max || self.max.0 > LONGEST).then(|| Problem {
            path: path.to_vec(),
            message: "backoff needs 0 < min <= max <= 24h".to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_sources_on_one_port_and_a_topic_in_a_serial_device_id_are_refused() {
        let text = r#"
[agent]
id = "a"

[[source.serial]]
name = "gps"
path = "/dev/ttyUSB0"
format = "nmea"
device = "{topic.1}"

[[source.modbus]]
name = "meters"
path = "/dev/ttyUSB0"
[[source.modbus.slave]]
id = 1
[[source.modbus.slave.register]]
field = "v"
address = 0

[[sink.console]]
name = "out"
"#;
        let problems = match Loaded::from_str("f.toml", text, Path::new("f.toml")) {
            Err(p) => p,
            Ok(_) => panic!("accepted"),
        };
        let found: Vec<(usize, &str)> = problems
            .iter()
            .map(|p| (p.line, p.message.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    9,
                    "source \"gps\": a serial frame has no topic: use literal text or {payload.field}"
                ),
                (
                    13,
                    "source \"meters\": port /dev/ttyUSB0 is already used by source \"gps\"; one port, one source"
                ),
            ]
        );
    }

    #[test]
    fn a_single_bracket_source_or_sink_header_gets_a_hint_to_double_it() {
        for header in ["[source.mqtt]", "[sink.http]", "[source.serial]"] {
            let text = format!("[agent]\nid = \"a\"\n\n{header}\nname = \"x\"\n");
            let problems = match Loaded::from_str("f.toml", &text, Path::new("f.toml")) {
                Err(p) => p,
                Ok(_) => panic!("{header} was accepted"),
            };
            let name = header.trim_matches(['[', ']']);
            assert_eq!(
                (problems[0].line, problems[0].message.as_str()),
                (
                    4,
                    format!("`{header}` is a single table, but there can be several of these: write `[[{name}]]`").as_str()
                )
            );
        }
    }

    fn load(text: &str) -> Result<Loaded, Vec<Diagnostic>> {
        Loaded::from_str("ferry.toml", text, Path::new("/etc/ferry/ferry.toml"))
    }

    const MINIMAL: &str = r#"
[agent]
id = "gw-1"

[[source.simulator]]
name = "sim"

[[sink.console]]
name = "out"
"#;

    #[test]
    fn a_minimal_config_loads_with_defaults() {
        let l = load(MINIMAL).expect("minimal config is valid");
        assert_eq!(l.config.agent.id, "gw-1");
        assert!(l.config.admin.is_none());
        assert_eq!(l.config.sink.names(), vec!["out".to_string()]);
    }

    #[test]
    fn an_unknown_field_is_reported_with_line_and_column() {
        let text = "[agent]\nid = \"x\"\ncolour = \"red\"\n";
        let errs = load(text).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!((errs[0].line, errs[0].col), (3, 1));
        assert!(errs[0].message.contains("colour"), "{}", errs[0]);
    }

    #[test]
    fn every_semantic_error_is_reported_at_once_with_its_position() {
        let text = r#"[agent]
id = "gw 1"

[[source.simulator]]
name = "a"

[[source.simulator]]
name = "a"

[[sink.http]]
name = "cloud"
url = "not a url"
"#;
        let errs = load(text).unwrap_err();
        let at: Vec<(usize, String)> = errs.iter().map(|e| (e.line, e.message.clone())).collect();
        assert_eq!(errs.len(), 3, "{at:?}");
        assert_eq!(errs[0].line, 2);
        assert_eq!(errs[1].line, 8);
        assert!(errs[1].message.contains("duplicate"));
        assert_eq!(errs[2].line, 12);
    }

    #[test]
    fn a_modbus_register_mistake_is_reported_at_its_own_line() {
        let text = r#"[agent]
id = "gw-1"

[[source.modbus]]
name = "plant"
path = "/dev/ttyUSB0"

[[source.modbus.slave]]
id = 1

[[source.modbus.slave.register]]
field = "t"
address = 0

[[source.modbus.slave]]
id = 2

[[source.modbus.slave.register]]
field = "energy"
address = 65535
type = "u32"

[[sink.console]]
name = "out"
"#;
        let errs = load(text).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!((errs[0].line, errs[0].col), (20, 11), "{}", errs[0]);
        assert!(errs[0].message.contains("two registers"), "{}", errs[0]);
    }

    #[test]
    fn unknown_keys_and_wrong_types_in_different_tables_are_all_reported_in_one_run() {
        let text = r#"[agent]
id = "gw-1"
colour = "red"

[[source.simulator]]
name = "sim"

[store]
max_bytes = "64MiB"
cache_capacity = true

[[sink.http]]
name = "cloud"
url = "https://example.com/events"
retries = 3
"#;
        let errs = load(text).unwrap_err();
        let found: Vec<(usize, usize)> = errs.iter().map(|e| (e.line, e.col)).collect();
        assert_eq!(found, [(3, 1), (10, 18), (15, 1)], "{errs:#?}");
        assert!(errs[0].message.contains("colour"), "{}", errs[0]);
        assert!(errs[1].message.contains("invalid type"), "{}", errs[1]);
        assert!(errs[2].message.contains("retries"), "{}", errs[2]);
    }

    #[test]
    fn several_mistakes_in_one_table_are_each_reported_once() {
        let text = r#"[agent]
id = "gw-1"

[[source.mqtt]]
name = "m"
url = 5
topics = ["a/#"]
reconnect = { min = "1s", maxx = "2s" }
qos = "one"
nme = "typo"

[[sink.console]]
name = "out"
"#;
        let errs = load(text).unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        // `url` is required: taking it out for its wrong type does not add a
        // "missing field" error on top.
        assert_eq!(lines, [6, 8, 9, 10], "{errs:#?}");
    }

    #[test]
    fn a_syntax_error_is_reported_alone() {
        let errs = load("[agent]\nid = \"x\"\ncolour = \n").unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].line, 3);
    }

    #[test]
    fn settings_their_consumers_cannot_honour_are_refused() {
        let mqtt = "[[source.mqtt]]\nname = \"m\"\nurl = \"mqtt://b\"\ntopics = [\"a/#\"]\n";
        let serial = "[[source.serial]]\nname = \"s\"\npath = \"/dev/ttyS9\"\nformat = \"json\"\n";
        let http = "[[sink.http]]\nname = \"h\"\nurl = \"https://example.com\"\n";
        let cases: &[(&str, &str, &str)] = &[
            (
                mqtt,
                "keep_alive = \"65536s\"",
                "keep_alive must be whole seconds",
            ),
            (
                mqtt,
                "keep_alive = \"1500ms\"",
                "keep_alive must be whole seconds",
            ),
            (
                mqtt,
                "keep_alive = \"500ms\"",
                "keep_alive must be whole seconds",
            ),
            (
                mqtt,
                "reconnect = { min = \"1s\", max = \"400d\" }",
                "backoff needs",
            ),
            (
                serial,
                "write = { timeout = \"400d\" }",
                "write.timeout must be more than 0 and at most 24h",
            ),
            (
                serial,
                "write = { max_age = \"0s\" }",
                "write.max_age must be more than 0",
            ),
            (
                serial,
                "write = { queue = 0 }",
                "write.queue must be between 1",
            ),
            (
                serial,
                "reopen = { min = \"0s\", max = \"1s\" }",
                "backoff needs",
            ),
            (
                http,
                "timeout = \"30d\"",
                "timeout must be more than 0 and at most 24h",
            ),
            (http, "timeout = \"0s\"", "timeout must be more than 0"),
            (
                http,
                "retry = { min = \"2s\", max = \"1s\" }",
                "backoff needs",
            ),
            (http, "max_in_flight = 0", "max_in_flight must be 1..=64"),
            (
                http,
                "auth = { header = \"Content-Type\", value_file = \"/dev/null\" }",
                "is set by ferry or by the connection",
            ),
            (
                http,
                "auth = { header = \"x-key\", value_file = \"/nonexistent/key\" }",
                "cannot read value_file /nonexistent/key",
            ),
            (
                http,
                "max_message = 10",
                "max_message must be between 64B and 64MiB",
            ),
            (
                "[[source.simulator]]\nname = \"x\"\n",
                "interval = \"1000d\"",
                "interval must be at least 1ms and at most 24h",
            ),
            (
                "[store]\n",
                "cache_capacity = 0",
                "cache_capacity must be at least 64KiB",
            ),
            (
                "[store]\n",
                "cache_capacity = \"1KiB\"",
                "cache_capacity must be at least 64KiB",
            ),
            ("[admin]\n", "listen = \"127.0.0.1:0\"", "port other than 0"),
        ];
        for (table, line, expected) in cases {
            let text = format!("{MINIMAL}\n{table}{line}\n");
            let errs = match load(&text) {
                Err(e) => e,
                Ok(_) => panic!("`{line}` was accepted"),
            };
            assert_eq!(errs.len(), 1, "`{line}`: {errs:#?}");
            assert!(errs[0].message.contains(expected), "`{line}`: {}", errs[0]);
            let at = text.lines().nth(errs[0].line - 1).unwrap_or_default();
            assert_eq!(at, *line, "`{line}` is pointed at");
        }
    }

    #[test]
    fn the_largest_settings_their_consumers_honour_are_accepted() {
        let text = format!(
            "{MINIMAL}\n[[source.mqtt]]\nname = \"m\"\nurl = \"mqtt://b\"\ntopics = [\"a/#\"]\n\
             keep_alive = \"65535s\"\nreconnect = {{ min = \"1s\", max = \"24h\" }}\n\
             \n[store]\ncache_capacity = \"64KiB\"\n"
        );
        if let Err(e) = load(&text) {
            panic!("{e:#?}");
        }
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let l = load(MINIMAL).unwrap();
        assert_eq!(
            l.resolve(Path::new("rules")),
            PathBuf::from("/etc/ferry/rules")
        );
        assert_eq!(l.resolve(Path::new("/abs")), PathBuf::from("/abs"));
    }

    #[test]
    fn sizes_and_durations_read_the_human_way() {
        let b: Bytes = toml::Value::String("256KiB".into()).try_into().unwrap();
        assert_eq!(b, Bytes(256 * 1024));
        let n: Bytes = toml::Value::Integer(1000).try_into().unwrap();
        assert_eq!(n, Bytes(1000));
        let neg = toml::Value::Integer(-5).try_into::<Bytes>().unwrap_err();
        assert!(neg.to_string().contains("negative"), "{neg}");
        let float = toml::Value::Float(1.5).try_into::<Bytes>().unwrap_err();
        assert!(float.to_string().contains("256KiB"), "{float}");
        let d: Dur = toml::Value::String("1m 30s".into()).try_into().unwrap();
        assert_eq!(d.0, Duration::from_secs(90));
        assert!(toml::Value::String("soon".into())
            .try_into::<Dur>()
            .is_err());
    }
}
