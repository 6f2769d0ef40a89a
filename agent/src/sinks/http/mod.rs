//! The HTTP sink: CloudEvents over the HTTP binding, in binary, structured or
//! batched mode, to any webhook, Knative broker or Event Grid style endpoint.

pub mod binding;

use std::path::{Path, PathBuf};

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;

use super::{BuildError, ConfigFile, Delivery, Event, Sink, SinkConfig};
use crate::config::{problem, BackoffConfig, Bytes, Dur, Problem};
use crate::tls::TlsConfig;

/// `[[sink.http]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// The sink's name (rules address sinks by name; metrics and logs carry it).
    pub name: String,
    /// Where to POST events: `http://` or `https://` (TLS verified with the
    /// Mozilla root store built into the binary).
    pub url: String,
    /// `binary` (one event per request, attributes as `ce-*` headers), `structured`
    /// (one event per request as `application/cloudevents+json`) or `batch`
    /// (`application/cloudevents-batch+json` arrays of up to `batch_max`). Default `binary`.
    #[serde(default)]
    pub mode: HttpMode,
    /// Events per request in `batch` mode. Default 100.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// Stored bytes of events per request in `batch` mode: a request closes at
    /// `batch_max` events or at this many bytes, whichever comes first (an event
    /// larger than it goes alone). With `max_in_flight` it bounds the memory a sink
    /// holds, whatever the readings' sizes. Default 1MiB.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: Bytes,
    /// Requests in flight at once. 1 (the default) delivers in store order; more
    /// is faster over slow links but a retried request may land after a later one
    /// (the `sequence` extension lets a receiver reorder).
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Time limit for one request, connect included. Default 10s.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Optional credentials.
    #[serde(default)]
    pub auth: Option<HttpAuth>,
    /// For `https://`: a private CA to trust and a client certificate to present.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Retry backoff bounds. Default `{ min = "200ms", max = "30s" }`.
    #[serde(default = "default_retry")]
    pub retry: BackoffConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpMode {
    #[default]
    Binary,
    Structured,
    Batch,
}

/// `auth = { bearer_file = "/etc/ferry/token" }`: sent as `Authorization: Bearer ...`.
/// Secrets live in files (mode 0600), never in the config, and are never logged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAuth {
    pub bearer_file: PathBuf,
}

fn default_batch_max() -> usize {
    100
}
fn default_batch_max_bytes() -> Bytes {
    Bytes(1024 * 1024)
}
fn default_in_flight() -> usize {
    1
}
fn default_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}
fn default_retry() -> BackoffConfig {
    BackoffConfig::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(30),
    )
}

impl SinkConfig for HttpSinkConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn files(&self) -> Vec<ConfigFile<'_>> {
        let mut out = Vec::new();
        if let Some(a) = &self.auth {
            out.push(ConfigFile {
                field: "auth",
                what: "bearer_file".into(),
                path: &a.bearer_file,
            });
        }
        for (what, path) in self.tls.iter().flat_map(|t| t.files()) {
            out.push(ConfigFile {
                field: "tls",
                what: format!("tls {what}"),
                path,
            });
        }
        out
    }

    fn build(&self, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<Box<dyn Sink>, BuildError> {
        let sink = HttpSink::new(self, resolve).map_err(|e| BuildError(Box::new(e)))?;
        Ok(Box::new(sink))
    }

    fn validate(&self, i: usize) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Some(tls) = &self.tls {
            if url::Url::parse(&self.url).is_ok_and(|u| u.scheme() != "https") {
                out.push(problem!(
                    ["sink", "http", i, "tls"],
                    "sink {:?}: tls settings need an https:// url",
                    self.name
                ));
            }
            if let Err(e) = tls.check() {
                out.push(problem!(
                    ["sink", "http", i, "tls"],
                    "sink {:?}: {e}",
                    self.name
                ));
            }
        }
        match url::Url::parse(&self.url) {
            Ok(u) if !u.username().is_empty() || u.password().is_some() => out.push(problem!(
                ["sink", "http", i, "url"],
                "sink {:?}: credentials do not belong in the url (they would be logged); use auth = {{ bearer_file = \"...\" }}",
                self.name
            )),
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            Ok(u) => out.push(problem!(
                ["sink", "http", i, "url"],
                "sink {:?}: url scheme must be http or https, not {:?}",
                self.name,
                u.scheme()
            )),
            Err(e) => out.push(problem!(
                ["sink", "http", i, "url"],
                "sink {:?}: invalid url {:?}: {e}",
                self.name,
                self.url
            )),
        }
        if !(1..=10_000).contains(&self.batch_max) {
            out.push(problem!(
                ["sink", "http", i, "batch_max"],
                "sink {:?}: batch_max must be 1..=10000",
                self.name
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.batch_max_bytes.0) {
            out.push(problem!(
                ["sink", "http", i, "batch_max_bytes"],
                "sink {:?}: batch_max_bytes must be between 1KiB and 64MiB",
                self.name
            ));
        }
        if !(1..=64).contains(&self.max_in_flight) {
            out.push(problem!(
                ["sink", "http", i, "max_in_flight"],
                "sink {:?}: max_in_flight must be 1..=64",
                self.name
            ));
        }
        if self.timeout.0.is_zero() || self.timeout.0 > crate::config::LONGEST {
            out.push(problem!(
                ["sink", "http", i, "timeout"],
                "sink {:?}: timeout must be more than 0 and at most 24h",
                self.name
            ));
        }
        out.extend(
            self.retry
                .validate(&["sink".into(), "http".into(), i.into(), "retry".into()]),
        );
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpSinkError {
    #[error("sink {sink:?}: cannot read bearer_file {path}")]
    Token {
        sink: String,
        path: String,
        source: std::io::Error,
    },
    #[error("sink {sink:?}: the token in bearer_file is not a valid header value")]
    BadToken { sink: String },
    #[error("sink {sink:?}: cannot build the HTTP client")]
    Client {
        sink: String,
        source: reqwest::Error,
    },
    #[error("sink {sink:?}: tls")]
    Tls {
        sink: String,
        source: crate::tls::TlsError,
    },
}

pub struct HttpSink {
    name: String,
    max_in_flight: usize,
    retry: BackoffConfig,
    mode: HttpMode,
    batch_max: usize,
    /// Stored bytes per request; see [`HttpSinkConfig::batch_max_bytes`].
    batch_max_bytes: usize,
    url: String,
    client: reqwest::Client,
    auth: Option<HeaderValue>,
}

impl HttpSink {
    /// Builds the sink, reading its secrets now; `resolve` resolves the paths the
    /// config names.
    pub fn new(
        cfg: &HttpSinkConfig,
        resolve: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<Self, HttpSinkError> {
        let auth =
            match &cfg.auth {
                None => None,
                Some(a) => {
                    let path = resolve(&a.bearer_file);
                    let token =
                        std::fs::read_to_string(&path).map_err(|source| HttpSinkError::Token {
                            sink: cfg.name.clone(),
                            path: path.display().to_string(),
                            source,
                        })?;
                    let mut v = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                        .map_err(|_| HttpSinkError::BadToken {
                            sink: cfg.name.clone(),
                        })?;
                    v.set_sensitive(true);
                    Some(v)
                }
            };
        let mut builder = reqwest::Client::builder()
            .timeout(cfg.timeout.0)
            .connect_timeout(cfg.timeout.0)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")));
        if let Some(tls) = &cfg.tls {
            let mut rustls = tls
                .client_config(resolve)
                .map_err(|source| HttpSinkError::Tls {
                    sink: cfg.name.clone(),
                    source,
                })?;
            // reqwest uses a preconfigured TLS config as it is: offer HTTP/2 as its
            // own would.
            rustls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            builder = builder.use_preconfigured_tls(rustls);
        }
        let client = builder.build().map_err(|source| HttpSinkError::Client {
            sink: cfg.name.clone(),
            source,
        })?;
        Ok(Self {
            name: cfg.name.clone(),
            max_in_flight: cfg.max_in_flight,
            retry: cfg.retry,
            mode: cfg.mode,
            batch_max: cfg.batch_max,
            batch_max_bytes: usize::try_from(cfg.batch_max_bytes.0).unwrap_or(usize::MAX),
            url: cfg.url.clone(),
            client,
            auth,
        })
    }
}

#[async_trait::async_trait]
impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "http"
    }

    fn per_request(&self) -> usize {
        match self.mode {
            HttpMode::Batch => self.batch_max,
            HttpMode::Binary | HttpMode::Structured => 1,
        }
    }

    fn bytes_per_request(&self) -> usize {
        self.batch_max_bytes
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    fn retry(&self) -> BackoffConfig {
        self.retry
    }

    /// Sends one request's worth of events (one event unless in batch mode).
    async fn send(&self, events: &[Event]) -> Delivery {
        let req = match (self.mode, events) {
            (HttpMode::Binary, [e]) => {
                let (headers, body) = binding::binary(e);
                self.client.post(&self.url).headers(headers).body(body)
            }
            (HttpMode::Structured, [e]) => self
                .client
                .post(&self.url)
                .header(CONTENT_TYPE, binding::STRUCTURED)
                .body(binding::structured(e)),
            (HttpMode::Batch, evs) => self
                .client
                .post(&self.url)
                .header(CONTENT_TYPE, binding::BATCH)
                .body(binding::batch(evs)),
            (_, evs) => {
                return Delivery::Rejected {
                    detail: format!("{} events for a single-event mode", evs.len()),
                }
            }
        };
        let req = match &self.auth {
            Some(a) => req.header(AUTHORIZATION, a.clone()),
            None => req,
        };
        match req.send().await.map_err(reqwest::Error::without_url) {
            Ok(resp) => match classify_status(resp.status().as_u16()) {
                Delivery::Retry { kind, detail, .. } => Delivery::Retry {
                    kind,
                    detail,
                    after: retry_after(resp.headers()),
                },
                other => other,
            },
            Err(e) => Delivery::retry(
                if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "transport"
                },
                error_chain(&e),
            ),
        }
    }
}

/// How an HTTP status is treated.
///
/// Only statuses that say "this request's content is wrong" refuse events for good;
/// everything that says "the endpoint, the credentials or the server are wrong right
/// now" (401, 403, 404, 3xx, 5xx, ...) is retried, because dropping a whole backlog
/// over an expired token or a typo in the URL would lose data an operator can still
/// save by fixing the config.
pub fn classify_status(status: u16) -> Delivery {
    match status {
        200..=299 => Delivery::Accepted,
        400 | 413 | 415 | 422 => Delivery::Rejected {
            detail: format!("HTTP {status}"),
        },
        401 | 403 | 407 => Delivery::retry(
            "auth",
            format!("HTTP {status}: check the sink's credentials"),
        ),
        404 | 405 | 410 | 300..=399 => {
            Delivery::retry("endpoint", format!("HTTP {status}: check the sink's url"))
        }
        500..=599 => Delivery::retry("server_error", format!("HTTP {status}")),
        _ => Delivery::retry("retryable_status", format!("HTTP {status}")),
    }
}

/// An error with its causes ("error sending request: connection refused"), since
/// reqwest's own message leaves the cause out. URLs are not included: they may
/// carry tokens.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// `Retry-After` in its delay-seconds form (the HTTP-date form is rare from APIs and
/// is ignored: our own backoff applies).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<std::time::Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse().ok().map(std::time::Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_statuses_are_accepted() {
        assert_eq!(classify_status(200), Delivery::Accepted);
        assert_eq!(classify_status(202), Delivery::Accepted);
    }

    #[test]
    fn overload_and_server_errors_are_retried() {
        for s in [408, 429, 500, 502, 503, 504, 307] {
            assert!(matches!(classify_status(s), Delivery::Retry { .. }), "{s}");
        }
    }

    #[test]
    fn auth_and_endpoint_errors_are_retried_so_a_config_fix_saves_the_backlog() {
        for s in [401, 403, 404, 405, 407] {
            assert!(matches!(classify_status(s), Delivery::Retry { .. }), "{s}");
        }
    }

    #[test]
    fn errors_about_the_content_refuse_the_events_for_good() {
        for s in [400, 413, 415, 422] {
            assert!(
                matches!(classify_status(s), Delivery::Rejected { .. }),
                "{s}"
            );
        }
    }
}
