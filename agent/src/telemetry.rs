//! Logs and metrics set-up.
//!
//! Logs go to stderr (stdout belongs to the console sink), as text or JSON lines,
//! filtered by `RUST_LOG` (default `info`, without tokio-modbus's own lines: it logs
//! every byte it skips on a noisy bus, and the Modbus source already counts those
//! failures and logs them once per change). Metrics are Prometheus counters served on
//! the `[admin] listen` address; without it the counters cost next to nothing and no
//! port is opened.

use std::io::IsTerminal;
use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

pub fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_modbus=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // When stderr cannot be written (its reader gone, a full disk), a log line is
        // lost, but the default would report that with eprintln!, which panics and
        // kills whichever task was logging: a signal handler, a source.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}")]
pub struct MetricsError {
    addr: SocketAddr,
    reason: String,
}

/// Serves `GET /metrics` on `addr`. Must run inside the tokio runtime.
pub fn serve_metrics(addr: SocketAddr) -> Result<(), MetricsError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| MetricsError {
            addr,
            reason: e.to_string(),
        })?;
    describe();
    Ok(())
}

/// Publishes how much the store holds (after a commit or a trim).
pub fn store_gauges(stats: &crate::store::Stats) {
    metrics::gauge!("ferry_store_records").set(stats.records as f64);
    metrics::gauge!("ferry_store_bytes").set(stats.bytes as f64);
}

/// Publishes the store gauges and every sink's lag (records committed but not yet
/// delivered). Called at start and after each commit, so the lag grows while an
/// upstream is down, when no sink advances, which is when an alert on it matters.
pub fn backlog_gauges(store: &dyn crate::store::Store, sinks: &[String]) {
    let stats = store.stats();
    store_gauges(&stats);
    for sink in sinks {
        if let Ok(cursor) = store.cursor(sink) {
            metrics::gauge!("ferry_sink_lag_records", "sink" => sink.clone())
                .set(stats.next.saturating_sub(cursor) as f64);
        }
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
        "ferry_store_committed_total",
        "Records committed to the store."
    );
    d!(
        "ferry_store_dropped_total",
        "Records the store dropped, by reason."
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
    d!(
        "ferry_rule_errors_total",
        "Rule evaluation errors, by rule."
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
