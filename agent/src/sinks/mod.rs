//! Sinks: where events go upstream. Each kind is one module (its config with
//! validation, its build, its CloudEvents binding, its tests) behind two small
//! traits: [`SinkConfig`] for checking and building a `[[sink.KIND]]` table, and
//! [`Sink`] for what the forwarding loop ([`forward`]) needs to move events from
//! the store to the upstream. The loop knows nothing of any kind: it reads events
//! from the sink's cursor, refuses those over [`Sink::max_message`], sends the rest
//! in requests the sink sizes, and moves the cursor on what the upstream answered.
//!
//! # Adding a kind
//! Write `sinks/KIND/` (or `KIND.rs`) with a config type implementing
//! [`SinkConfig`] and a sink implementing [`Sink`], then add one line to
//! [`sink_kinds!`] below: config checking, `ferry check`, the pipeline and the
//! metrics pick it up from there. ARCHITECTURE.md has the checklist.

pub mod console;
pub mod event;
pub mod forward;
pub mod handoff;
pub mod http;
pub mod mqtt;
pub mod nats;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{BackoffConfig, Problem};
pub use event::Event;
pub use forward::{blocking, run, Shared};

/// What the upstream said about one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// Accepted (HTTP 2xx, MQTT PUBACK, JetStream PubAck): the events may leave
    /// the store.
    Accepted,
    /// Worth trying again later: `kind` is the metrics label; `after` is the
    /// upstream's own `Retry-After`, if it sent one.
    Retry {
        kind: &'static str,
        detail: String,
        after: Option<Duration>,
    },
    /// Permanently refused: retrying the same events cannot help. A refused request
    /// of several events is resent one event at a time, so only the bad one goes.
    Rejected { detail: String },
}

impl Delivery {
    /// A retry without an upstream-given delay.
    pub fn retry(kind: &'static str, detail: impl Into<String>) -> Delivery {
        Delivery::Retry {
            kind,
            detail: detail.into(),
            after: None,
        }
    }
}

/// A running upstream: all the forwarding loop knows of it.
///
/// `send` returns only once the upstream has answered for every event it was given
/// (an HTTP status, a PUBACK for each publish, a JetStream ack for each message):
/// [`Delivery::Accepted`] moves the cursor past them, so "queued in a client
/// library" must never count as accepted. `send` is called with at most
/// [`Sink::per_request`] events and, beyond the first event, at most
/// [`Sink::bytes_per_request`] stored bytes; up to [`Sink::max_in_flight`] calls
/// run at once on the same `&self`.
///
/// Object-safe through `async_trait` so the pipeline holds every kind as a
/// `Box<dyn Sink>` and the loop is compiled once.
#[async_trait::async_trait]
pub trait Sink: Send + Sync {
    /// The configured name: the store cursor's key and the `sink` label of metrics.
    fn name(&self) -> &str;

    /// The config table's kind (`http`, `console`), for logs.
    fn kind(&self) -> &'static str;

    /// Sends one request's worth of events and says what the upstream answered.
    /// A sink that sends events one by one within a request (MQTT publishes) and
    /// has some accepted before a failure may answer `Retry`: the accepted ones
    /// are sent again with the same ids, which receivers deduplicate on.
    async fn send(&self, events: &[Event]) -> Delivery;

    /// Events per request (1 for single-event bindings).
    fn per_request(&self) -> usize;

    /// Stored bytes of events per request (at least one event goes, whatever its size).
    fn bytes_per_request(&self) -> usize;

    /// Requests in flight at once; 1 keeps store order upstream.
    fn max_in_flight(&self) -> usize;

    /// Backoff bounds between retries.
    fn retry(&self) -> BackoffConfig;

    /// The largest event the upstream takes, as measured by [`Sink::message_len`].
    /// An event over it is dropped before sending and counted as `too_large`, so it
    /// can never hold up (or, for MQTT, disconnect) the sink. `None`: no limit.
    fn max_message(&self) -> Option<usize> {
        None
    }

    /// The bytes `event` takes on this sink's wire, as compared with
    /// [`Sink::max_message`]. Only called when a limit is set.
    fn message_len(&self, event: &Event) -> usize {
        event.structured_len()
    }
}

/// A `[[sink.KIND]]` table: checked by `ferry check` and at start, then built.
pub trait SinkConfig: std::fmt::Debug + Send + Sync {
    /// The sink's name (unique across all kinds; checked by the config).
    fn name(&self) -> &str;

    /// Every problem with this table, each at `["sink", KIND, index, field]` so it
    /// is reported with its `file:line:col`. Only what the table alone decides:
    /// names and files are checked by the caller.
    fn validate(&self, index: usize) -> Vec<Problem>;

    /// The files the sink reads at start (secrets, certificates), so `ferry check`
    /// can say which one is missing without reading any secret into memory.
    fn files(&self) -> Vec<ConfigFile<'_>> {
        Vec::new()
    }

    /// Builds the running sink.
    fn build(&self, ctx: &BuildContext<'_>) -> Result<Box<dyn Sink>, BuildError>;
}

/// What building a sink may need from outside its table.
pub struct BuildContext<'a> {
    /// `[agent] id`: default client ids and the `{agent}` placeholder of topics
    /// and subjects.
    pub agent: &'a str,
    /// Turns a path from the config into one relative to the config file.
    pub resolve: &'a dyn Fn(&Path) -> PathBuf,
}

/// The checks every batching sink shares: events and bytes per request and the
/// time limit of one, each reported at `["sink", kind, index, field]`.
/// `batch_max_bytes` is `None` for a kind that has no such setting.
pub(crate) fn check_batching(
    kind: &'static str,
    index: usize,
    name: &str,
    batch_max: usize,
    batch_max_bytes: Option<u64>,
    timeout: std::time::Duration,
) -> Vec<Problem> {
    let mut out = Vec::new();
    if !(1..=10_000).contains(&batch_max) {
        out.push(crate::config::problem!(
            ["sink", kind, index, "batch_max"],
            "sink {name:?}: batch_max must be 1..=10000"
        ));
    }
    if batch_max_bytes.is_some_and(|b| !(1024..=64 * 1024 * 1024).contains(&b)) {
        out.push(crate::config::problem!(
            ["sink", kind, index, "batch_max_bytes"],
            "sink {name:?}: batch_max_bytes must be between 1KiB and 64MiB"
        ));
    }
    if timeout.is_zero() || timeout > crate::config::LONGEST {
        out.push(crate::config::problem!(
            ["sink", kind, index, "timeout"],
            "sink {name:?}: timeout must be more than 0 and at most 24h"
        ));
    }
    out
}

/// Percent-encodes what the CloudEvents HTTP binding says must be (space, `"`,
/// `%`, anything outside printable ASCII): the encoding of attribute values in
/// headers, which the NATS binding uses too, so no value can carry a line break.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A file a sink's config names.
#[derive(Debug)]
pub struct ConfigFile<'a> {
    /// The key the problem is reported at (`auth`, `tls`).
    pub field: &'static str,
    /// What it is, for the message (`bearer_file`, `tls ca_file`).
    pub what: String,
    pub path: &'a Path,
}

/// A sink that cannot be built; its message names the sink.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct BuildError(#[from] pub Box<dyn std::error::Error + Send + Sync>);

/// One entry of the config's sinks, with where it is in the file.
#[derive(Debug, Clone, Copy)]
pub struct Configured<'a> {
    /// The table kind: `[[sink.http]]` is `http`.
    pub kind: &'static str,
    /// Its index among the tables of its kind.
    pub index: usize,
    pub config: &'a dyn SinkConfig,
}

/// The registry: one line per sink kind, `table_name: ConfigType`. It makes the
/// `[sink]` table's shape (one list per kind) and the iteration everything else
/// uses, so config checking and the pipeline treat every kind alike.
macro_rules! sink_kinds {
    ($($kind:ident: $config:ty),+ $(,)?) => {
        /// `[[sink.KIND]]` tables, one list per kind.
        #[derive(Debug, Clone, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct SinksConfig {
            $(
                #[serde(default)]
                pub $kind: Vec<$config>,
            )+
        }

        impl SinksConfig {
            /// The kinds there are, as written in `[[sink.KIND]]`.
            pub const KINDS: &'static [&'static str] = &[$(stringify!($kind)),+];

            /// Every configured sink, kind by kind, in config order within a kind.
            pub fn iter(&self) -> impl Iterator<Item = Configured<'_>> {
                std::iter::empty()
                    $(.chain(self.$kind.iter().enumerate().map(|(index, config)| Configured {
                        kind: stringify!($kind),
                        index,
                        config: config as &dyn SinkConfig,
                    })))+
            }
        }
    };
}

sink_kinds! {
    http: http::HttpSinkConfig,
    mqtt: mqtt::MqttSinkConfig,
    nats: nats::NatsSinkConfig,
    console: console::ConsoleSinkConfig,
}

impl SinksConfig {
    /// Every sink's name, in the order of [`SinksConfig::iter`].
    pub fn names(&self) -> Vec<String> {
        self.iter().map(|c| c.config.name().to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_listed_once_in_the_order_of_its_registration_line() {
        assert_eq!(SinksConfig::KINDS, ["http", "mqtt", "nats", "console"]);
    }

    #[test]
    fn sinks_are_iterated_with_their_kind_and_index_within_it() {
        let cfg: SinksConfig = toml::from_str(
            r#"
            [[console]]
            name = "a"
            [[http]]
            name = "b"
            url = "https://example.com"
            [[console]]
            name = "c"
            "#,
        )
        .unwrap();
        let seen: Vec<(&str, usize, &str)> = cfg
            .iter()
            .map(|c| (c.kind, c.index, c.config.name()))
            .collect();
        assert_eq!(
            seen,
            [("http", 0, "b"), ("console", 0, "a"), ("console", 1, "c")]
        );
    }
}
