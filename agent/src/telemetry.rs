//! Logs and metrics set-up.
//!
//! Logs go to stderr (stdout belongs to the console sink), as text or JSON lines,
//! filtered by `RUST_LOG` (default `info`, without tokio-modbus's own lines: it logs
//! every byte it skips on a noisy bus, and the Modbus source already counts those
//! failures and logs them once per change). The filter is a comma-separated list of
//! `level` and `target=level` directives ([`log_filter`]), read as tracing's
//! `EnvFilter` reads them; its span and field filters are not supported, which
//! keeps the regular-expression engine they need out of the binary. Metrics are Prometheus counters served on
//! the `[admin] listen` address; without it the counters cost next to nothing and no
//! port is opened.
//!
//! Log lines cannot be forged: device ids, topics, payload snippets and rule-file
//! text reach the logs from outside, so the text format escapes every control
//! character in every field and message ([`EscapedFields`]); a newline or an ANSI
//! escape in a device id shows as `\n` or `\u{1b}`, never as a new line or a colour.
//! The JSON format needs nothing more: JSON strings cannot hold a raw control
//! character.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tracing::debug;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The log filter without `RUST_LOG`, or with one that is not a filter.
const DEFAULT_LOG_FILTER: &str = "info,tokio_modbus=off";

pub fn init_logs(format: LogFormat) {
    let wanted = std::env::var_os("RUST_LOG");
    // The default is a constant list of directives, parsed by the tests too.
    let filter = wanted
        .as_ref()
        .and_then(|w| log_filter(w.to_str()?))
        .unwrap_or_else(|| log_filter(DEFAULT_LOG_FILTER).expect("the default parses"));
    // Err only if a logger is already installed, which `ferry run` never does twice.
    let _ = subscriber(
        format,
        filter,
        std::io::stderr,
        std::io::stderr().is_terminal(),
    )
    .try_init();
    if let Some(wanted) = wanted.filter(|w| w.to_str().and_then(log_filter).is_none()) {
        tracing::warn!(
            "RUST_LOG={:?} is not a log filter (a comma-separated list of `level` and \
             `target=level`); using {DEFAULT_LOG_FILTER:?}",
            wanted.to_string_lossy()
        );
    }
}

/// `RUST_LOG`'s filter: comma-separated directives, each a level (`info`, for every
/// target), a `target=level` (a module path and everything under it, e.g.
/// `ferry_agent::sinks=debug`), or a bare target (all its levels); the most specific
/// target wins. Levels are `off`, `error`, `warn`, `info`, `debug`, `trace` in any
/// case. Empty directives are skipped; an empty list logs nothing. This is the
/// syntax, and the meaning, of tracing's `EnvFilter` without its span and field
/// filters (`target[span{field=value}]=level`): those, like any other string that
/// is not such a list, give `None`.
fn log_filter(spec: &str) -> Option<Targets> {
    let mut filter = Targets::new();
    for directive in spec.split(',').filter(|d| !d.is_empty()) {
        // As `EnvFilter`: a directive starts with a character of a module path, and
        // `target=` is the bare target. `Targets` alone would read `target=` as
        // `target=error`, and `target[{field}]=level` as `target=level`.
        let first = directive.trim_start().chars().next()?;
        if !(first.is_alphanumeric() || ['-', ':', '_'].contains(&first))
            || directive.contains(['[', ']', '{', '}'])
        {
            return None;
        }
        let directive = match directive.strip_suffix('=') {
            Some(target) if !target.contains('=') => target,
            _ => directive,
        };
        let one: Targets = directive.parse().ok()?;
        for (target, level) in one.iter() {
            filter = filter.with_target(target, level);
        }
        if let Some(level) = one.default_level() {
            filter = filter.with_default(level);
        }
    }
    Some(filter)
}

/// The log subscriber for `format`, writing to `writer`.
fn subscriber<W>(
    format: LogFormat,
    filter: Targets,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_writer(writer)
        // When stderr cannot be written (its reader gone, a full disk), a log line is
        // lost, but the default would report that with eprintln!, which panics and
        // kills whichever task was logging: a signal handler, a source.
        .log_internal_errors(false)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => Box::new(builder.fmt_fields(EscapedFields).finish().with(filter)),
        LogFormat::Json => Box::new(builder.json().finish().with(filter)),
    }
}

/// Formats the fields of text log lines like tracing's default (`message`, then
/// `name=value` pairs), with every control character in names' values and in the
/// message escaped, so input can never start a line of its own or recolour one.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            ansi: writer.has_ansi_escapes(),
            writer,
            result: Ok(()),
            empty: true,
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'w> {
    writer: Writer<'w>,
    /// Whether field names may be styled (stderr is a terminal).
    ansi: bool,
    result: fmt::Result,
    /// Nothing written yet, so no separating space is due.
    empty: bool,
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_debug(field, &format_args!("{}", ErrorChain(value)));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        // Metadata of records from the `log` crate, already shown as the target.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = (|| {
            if !std::mem::take(&mut self.empty) {
                self.writer.write_char(' ')?;
            }
            if name != "message" {
                if self.ansi {
                    write!(self.writer, "\x1b[3m{name}\x1b[0m\x1b[2m=\x1b[0m")?;
                } else {
                    write!(self.writer, "{name}=")?;
                }
            }
            write!(Escaping(&mut self.writer), "{value:?}")
        })();
    }
}

/// An error and its sources, `outer: inner: root`.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// Passes text through with control characters (C0, DEL, C1) and the Unicode line
/// and paragraph separators written as escapes.
struct Escaping<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, c) in s.char_indices() {
            if !needs_escape(c) {
                continue;
            }
            self.0.write_str(&s[plain..i])?;
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            plain = i + c.len_utf8();
        }
        self.0.write_str(&s[plain..])
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}")]
pub struct MetricsError {
    addr: SocketAddr,
    reason: String,
}

/// Connections served at once; more are closed at once, so a flood of connections
/// costs the agent nothing but the accepts.
const MAX_CONNECTIONS: usize = 16;
/// The longest request head read; a scraper's is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `addr`, and the dead-letter endpoints of `api`
/// (see [`crate::dead_letters`]); other paths get 404, other methods 405. Must run
/// inside the tokio runtime.
pub fn serve_metrics(
    addr: SocketAddr,
    api: Arc<crate::dead_letters::Api>,
) -> Result<(), MetricsError> {
    let error = |reason: String| MetricsError { addr, reason };
    // Bound here, not in the task, so a port in use stops the start with its reason.
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| error(e.to_string()))?;
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| error(e.to_string()))?;
    describe();
    tokio::spawn(accept(listener, handle, api));
    Ok(())
}

async fn accept(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    api: Arc<crate::dead_letters::Api>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                // Out of file descriptors, most likely: wait instead of spinning.
                debug!(%error, "cannot accept a metrics connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "too many metrics connections; closing this one");
            continue;
        };
        let (handle, api) = (handle.clone(), Arc::clone(&api));
        tokio::spawn(async move {
            let _slot = slot;
            // A replay of many dead letters commits them all: give it longer.
            let limit = CLIENT_TIMEOUT * 6;
            if let Err(error) =
                tokio::time::timeout(limit, respond(stream, peer, &handle, &api)).await
            {
                debug!(%peer, %error, "admin client too slow; closed");
            }
        });
    }
}

/// Reads one request head and answers it, then closes the connection.
async fn respond(
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    handle: &PrometheusHandle,
    api: &crate::dead_letters::Api,
) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    // The head alone: `/metrics` and the dead-letter endpoints take no body.
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_REQUEST {
            let _ = stream.write_all(&answer(431, "", "")).await;
            return;
        }
    }
    let response = match route(&head) {
        Route::Metrics => {
            handle.run_upkeep();
            answer(200, "text/plain; version=0.0.4", &handle.render())
        }
        Route::DeadLetters { method, path } => {
            let req = crate::dead_letters::Request {
                method: &method,
                path: &path,
                peer,
                host: header(&head, "host"),
                marked: header(&head, crate::dead_letters::HEADER) == Some("1"),
            };
            let a = api.handle(&req).await;
            if a.status == 405 {
                answer_allowing(405, a.allow, "", "")
            } else {
                answer(a.status, "application/json", &a.body)
            }
        }
        Route::NotFound => answer(404, "", ""),
        Route::WrongMethod => answer(405, "", ""),
        Route::Bad => answer(400, "", ""),
    };
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
}

/// The value of the first header called `name` (lower case), trimmed.
fn header<'h>(head: &'h [u8], name: &str) -> Option<&'h str> {
    head.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let line = std::str::from_utf8(line).ok()?;
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    /// Anything under `/dead-letters`: [`crate::dead_letters::Api`] decides.
    DeadLetters {
        method: String,
        path: String,
    },
    NotFound,
    WrongMethod,
    Bad,
}

/// What a request head asks for. Only the request line matters.
fn route(head: &[u8]) -> Route {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::Bad;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::Bad;
    }
    // A scraper may add a query string; it changes nothing.
    let path = target.split('?').next().unwrap_or_default();
    if path == "/dead-letters" || path.starts_with("/dead-letters/") {
        return Route::DeadLetters {
            method: method.to_string(),
            path: path.to_string(),
        };
    }
    match (path, method) {
        ("/metrics", "GET") => Route::Metrics,
        ("/metrics", _) => Route::WrongMethod,
        _ => Route::NotFound,
    }
}

/// A complete HTTP/1.1 response that closes the connection.
fn answer(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    answer_allowing(status, "GET", content_type, body)
}

/// [`answer`], naming `allow` as the method a 405 wants.
fn answer_allowing(status: u16, allow: &str, content_type: &str, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    if status == 405 {
        out.push_str(&format!("Allow: {allow}\r\n"));
    }
    if !content_type.is_empty() {
        out.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    out.into_bytes()
}

/// Publishes how much the store holds (after a commit or a trim).
pub fn store_gauges(stats: &crate::store::Stats) {
    metrics::gauge!("ferry_store_records").set(stats.records as f64);
    metrics::gauge!("ferry_store_bytes").set(stats.bytes as f64);
}

/// Publishes the store gauges and every sink's lag. Called at start and after
/// each commit, so the lag grows while an upstream is down, when no sink
/// advances, which is when an alert on it matters.
pub fn backlog_gauges(store: &dyn crate::store::Store, lag: &SinkLag) {
    let stats = store.stats();
    store_gauges(&stats);
    lag.publish(&stats);
}

/// Each sink's lag (`ferry_sink_lag_records`: records committed but not yet
/// delivered), from where the sink is in memory. Its saved cursor trails that by
/// up to a quarter second of records: computed from the cursor after each commit
/// and from the position by the sink, the gauge jumped between the two.
#[derive(Debug)]
pub struct SinkLag(Vec<(String, AtomicU64)>);

impl SinkLag {
    /// Starts every sink at its saved cursor.
    pub fn new(store: &dyn crate::store::Store, sinks: &[String]) -> SinkLag {
        let at = |sink: &str| store.cursor(sink).unwrap_or(0);
        SinkLag(
            sinks
                .iter()
                .map(|s| (s.clone(), AtomicU64::new(at(s))))
                .collect(),
        )
    }

    /// `sink` has delivered (or settled) everything before `at`.
    pub fn delivered(&self, sink: &str, at: u64, stats: &crate::store::Stats) {
        if let Some((name, pos)) = self.0.iter().find(|(name, _)| name == sink) {
            pos.store(at, Ordering::Relaxed);
            Self::set(name, at, stats);
        }
    }

    /// Whether some sink has delivered everything before `seq` and no more: is
    /// caught up with a commit that starts there.
    pub fn any_at(&self, seq: u64) -> bool {
        self.0
            .iter()
            .any(|(_, pos)| pos.load(Ordering::Relaxed) == seq)
    }

    /// Publishes every sink's lag against `stats`.
    fn publish(&self, stats: &crate::store::Stats) {
        for (name, pos) in &self.0 {
            Self::set(name, pos.load(Ordering::Relaxed), stats);
        }
    }

    fn set(name: &str, at: u64, stats: &crate::store::Stats) {
        // Records before the head were dropped to make room: not owed any more.
        let lag = stats.next.saturating_sub(at.max(stats.head));
        metrics::gauge!("ferry_sink_lag_records", "sink" => name.to_string()).set(lag as f64);
    }
}

fn describe() {
    use metrics::describe_counter as d;
    d!("ferry_input_received_total", "Inputs received, by source.");
    d!(
        "ferry_input_rejected_total",
        "Inputs refused as bad, by source and reason."
    );
    d!(
        "ferry_input_redeliveries_total",
        "MQTT deliveries the broker sent again after they were committed, acknowledged without being stored twice, by source."
    );
    d!(
        "ferry_store_committed_total",
        "Records committed to the store."
    );
    d!(
        "ferry_store_dropped_total",
        "Records the store dropped, by reason: store_full (removed to make room before a sink that needed them had them), corrupt, too_large, dead_letters_full (the oldest dead letters, to keep the newest)."
    );
    d!(
        "ferry_store_quarantined_total",
        "Damaged stores moved aside into data_dir/quarantine at start (never deleted)."
    );
    d!(
        "ferry_sink_sent_total",
        "Events accepted upstream, by sink."
    );
    d!(
        "ferry_sink_errors_total",
        "Failed requests that will be retried, by sink and kind."
    );
    d!(
        "ferry_sink_dropped_total",
        "Events a sink gave up on, by sink and reason."
    );
    metrics::describe_gauge!(
        "ferry_dead_letters",
        "Dead letters kept: events an upstream refused for good, or too large for a sink."
    );
    d!(
        "ferry_rule_errors_total",
        "Rule evaluation errors, by rule."
    );
    d!(
        "ferry_source_disconnects_total",
        "MQTT connections lost and connection attempts failed, by source and reason."
    );
    d!(
        "ferry_modbus_polls_total",
        "Modbus polls sent, by source and slave."
    );
    d!(
        "ferry_modbus_errors_total",
        "Modbus polls that failed, reads refused with an exception and values left out, by source, slave and reason."
    );
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn escape_control(s: &str) -> String {
        let mut out = String::new();
        Escaping(&mut out).write_str(s).unwrap();
        out
    }

    /// A device id that, written raw, would end the line and start a fake one in red.
    const FORGED: &str =
        "dev\n2026-01-01T00:00:00Z  INFO fake line \u{1b}[31mred\r\u{7f}\u{85}\u{2028}end";

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl MakeWriter<'_> for Captured {
        type Writer = Captured;
        fn make_writer(&self) -> Captured {
            self.clone()
        }
    }

    fn log_forged(format: LogFormat, ansi: bool) -> String {
        let out = Captured::default();
        let sub = subscriber(format, log_filter("info").unwrap(), out.clone(), ansi);
        tracing::subscriber::with_default(sub, || {
            let error = std::io::Error::other(FORGED);
            let span = tracing::info_span!("source", name = %FORGED);
            let _in = span.enter();
            tracing::warn!(device = %FORGED, topic = FORGED, %error, "reading from {FORGED} refused");
        });
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn text_logs_escape_control_characters_in_fields_spans_and_the_message() {
        for ansi in [false, true] {
            let text = log_forged(LogFormat::Text, ansi);
            assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
            assert!(text.ends_with('\n'), "{text:?}");
            assert!(
                !text.contains("\u{1b}[31m"),
                "no colour from input: {text:?}"
            );
            for raw in ['\r', '\u{7f}', '\u{85}', '\u{2028}'] {
                assert!(!text.contains(raw), "{raw:?} written raw: {text:?}");
            }
            let escaped =
                r"dev\n2026-01-01T00:00:00Z  INFO fake line \u{1b}[31mred\r\u{7f}\u{85}\u{2028}end";
            // message, span field, device, topic (quoted) and error.
            assert_eq!(text.matches(escaped).count(), 5, "{text:?}");
            if !ansi {
                assert!(!text.contains('\u{1b}'), "{text:?}");
                assert!(text.contains(&format!("device={escaped}")), "{text:?}");
            }
        }
    }

    #[test]
    fn json_logs_stay_one_valid_json_object_per_line_with_the_value_intact() {
        let text = log_forged(LogFormat::Json, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text:?}");
        assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text:?}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(line["fields"]["device"], FORGED);
        assert_eq!(line["fields"]["topic"], FORGED);
    }

    /// Emits an event at every level for each of the targets, its message naming both.
    macro_rules! at_every_level {
        ($($target:literal),*) => {{
            $(
                tracing::error!(target: $target, concat!($target, " error"));
                tracing::warn!(target: $target, concat!($target, " warn"));
                tracing::info!(target: $target, concat!($target, " info"));
                tracing::debug!(target: $target, concat!($target, " debug"));
                tracing::trace!(target: $target, concat!($target, " trace"));
            )*
        }};
    }

    /// The events a filter lets through, one `target level` line each.
    fn passed<F>(filter: F) -> Vec<String>
    where
        F: tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync + 'static,
    {
        let out = Captured::default();
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(out.clone())
            .without_time()
            .with_level(false)
            .with_target(false)
            .with_ansi(false);
        let sub = tracing_subscriber::registry().with(filter.and_then(fmt));
        tracing::subscriber::with_default(sub, || {
            at_every_level!(
                "ferry",
                "ferry_agent",
                "ferry_agent::sinks::http",
                "ferry_agent::store",
                "ferry_rules",
                "tokio_modbus::service",
                "rustls::conn",
                "sled"
            );
        });
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn the_log_filter_reads_levels_and_targets_as_env_filter_did() {
        // The documented forms, their corner cases, and what is refused.
        let specs = [
            "info",
            "INFO",
            "3",
            "off",
            "warn,ferry_agent=debug",
            "ferry_agent=debug",
            "ferry_agent::sinks=trace,ferry_agent=warn",
            "ferry_agent=warn,ferry_agent::sinks=trace",
            "debug,tokio_modbus=off,sled=error",
            "info,tokio_modbus=off",
            "ferry_agent",
            "ferry_agent=",
            "trace,ferry_agent=off",
            "info,debug",
            "ferry_agent=info,ferry_agent=trace",
            ",info,",
            "",
            ",",
            "ferry_rules=4,warn",
        ];
        for spec in specs {
            let ours = log_filter(spec).unwrap_or_else(|| panic!("{spec:?} refused"));
            let theirs = tracing_subscriber::EnvFilter::try_new(spec).unwrap();
            assert_eq!(passed(ours), passed(theirs), "RUST_LOG={spec:?}");
        }
        // What EnvFilter refused is refused (`init_logs` then uses the default), and
        // so are its span and field filters.
        for spec in [
            "info,*",
            "ferry_agent=loud",
            "a=b=c",
            "*=debug",
            "=debug",
            " ",
            "ferry_agent=debug=",
            "ferry_agent[run]=debug",
            "[source]=debug",
            "ferry_agent[{device=x}]=debug",
            "ferry_agent[{device}]=debug",
        ] {
            assert!(log_filter(spec).is_none(), "{spec:?} accepted");
            let env_filter = tracing_subscriber::EnvFilter::try_new(spec);
            assert!(
                env_filter.is_err() || spec.contains('['),
                "EnvFilter took {spec:?}"
            );
        }
        // The default: everything at info but tokio-modbus, the README's example.
        let default = passed(log_filter(DEFAULT_LOG_FILTER).unwrap());
        assert!(default.contains(&"ferry_agent::store info".to_string()));
        assert!(!default.iter().any(|l| l.ends_with(" debug")));
        assert!(!default.iter().any(|l| l.starts_with("tokio_modbus")));
        let debug = passed(log_filter("ferry_agent=debug").unwrap());
        assert!(debug.contains(&"ferry_agent::sinks::http debug".to_string()));
        assert!(debug.iter().all(|l| l.starts_with("ferry_agent")));
    }

    #[test]
    fn only_get_metrics_is_served_other_paths_are_not_found_and_other_methods_not_allowed() {
        let cases: &[(&[u8], Route)] = &[
            (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", Route::Metrics),
            (b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n", Route::Metrics),
            (b"GET / HTTP/1.1\r\n\r\n", Route::NotFound),
            (
                b"POST /dead-letters/3/replay HTTP/1.1\r\n\r\n",
                Route::DeadLetters {
                    method: "POST".into(),
                    path: "/dead-letters/3/replay".into(),
                },
            ),
            (b"GET /dead-lettersx HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"GET /metrics/ HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"GET /../metrics HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"POST /metrics HTTP/1.1\r\n\r\n", Route::WrongMethod),
            (b"DELETE /metrics HTTP/1.1\r\n\r\n", Route::WrongMethod),
            (b"GET /metrics\r\n\r\n", Route::Bad),
            (b"GET /metrics SPDY/3\r\n\r\n", Route::Bad),
            (b"\xff\xfe /metrics HTTP/1.1\r\n\r\n", Route::Bad),
        ];
        for (head, expected) in cases {
            assert_eq!(
                route(head),
                *expected,
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
    }

    #[test]
    fn headers_are_found_by_name_whatever_their_case() {
        let head = b"GET /dead-letters HTTP/1.1\r\nHOST: 127.0.0.1:9\r\nX-Ferry-Admin:1\r\n\r\n";
        assert_eq!(header(head, "host"), Some("127.0.0.1:9"));
        assert_eq!(header(head, "x-ferry-admin"), Some("1"));
        assert_eq!(header(head, "cookie"), None);
    }

    #[test]
    fn a_405_names_the_method_allowed_and_every_answer_has_its_length() {
        let text = String::from_utf8(answer(405, "", "")).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nAllow: GET\r\n"), "{text}");
        let ok = String::from_utf8(answer(200, "text/plain", "a 1\n")).unwrap();
        assert!(ok.ends_with("Content-Length: 4\r\n\r\na 1\n"), "{ok}");
    }

    #[test]
    fn plain_text_passes_unchanged_and_controls_are_escaped() {
        assert_eq!(escape_control("sensors/oven-1 °C"), "sensors/oven-1 °C");
        assert_eq!(escape_control("a\nb\tc\u{0}"), r"a\nb\tc\u{0}");
    }

    #[test]
    fn a_sinks_lag_after_a_commit_counts_from_where_the_sink_is_not_its_saved_cursor() {
        use crate::store::{Store, StoreConfig};
        let dir = tempfile::tempdir().unwrap();
        let sinks = ["cloud".to_string()];
        let store = crate::store::open_as_is(dir.path(), &StoreConfig::default(), &sinks).unwrap();
        let records = vec![crate::store::Record::test_reading(0, 0); 10];
        store
            .append(&records, &crate::store::StateWrite::default())
            .unwrap();
        let lag = SinkLag::new(&store, &sinks);
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            backlog_gauges(&store, &lag);
            assert!(handle
                .render()
                .contains("ferry_sink_lag_records{sink=\"cloud\"} 10"));
            // Delivered all ten; the cursor is saved later (at most every 250 ms).
            lag.delivered("cloud", 10, &store.stats());
            store.append(&records[..2], &Default::default()).unwrap();
            backlog_gauges(&store, &lag);
        });
        let text = handle.render();
        assert!(
            text.contains("ferry_sink_lag_records{sink=\"cloud\"} 2"),
            "the two new records, not twelve: {text}"
        );
    }
}
