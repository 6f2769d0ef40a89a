//! The HTTP sink: CloudEvents over the HTTP binding, in binary, structured or
//! batched mode, to any webhook, Knative broker or Event Grid style endpoint;
//! bodies optionally gzipped; credentials as a bearer token or a key header, each
//! read from a file.

pub mod binding;

use std::path::{Path, PathBuf};

use std::io::Write;

use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use serde::Deserialize;

use super::{BuildContext, BuildError, ConfigFile, Delivery, Event, Sink, SinkConfig};
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
    /// Optional credentials: `{ bearer_file = "..." }` or
    /// `{ header = "aeg-sas-key", value_file = "..." }`.
    #[serde(default)]
    pub auth: Option<HttpAuth>,
    /// `none` (the default) or `gzip`: gzip each request body and say so with
    /// `Content-Encoding: gzip`. Worth it on metered links for batches of JSON; the
    /// upstream must accept gzip request bodies.
    #[serde(default)]
    pub compression: Compression,
    /// The largest event this upstream takes, e.g. `"1MiB"` for Azure Event Grid:
    /// the data (binary mode) or the event's JSON object (structured mode, and its
    /// element of the array in batch mode), before compression. A larger event is
    /// never sent: it is dropped and counted in
    /// `ferry_sink_dropped_total{reason="too_large"}`, and the events after it go on.
    /// Default: no limit.
    #[serde(default)]
    pub max_message: Option<Bytes>,
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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    None,
    Gzip,
}

/// Credentials, each read from a file once at start. Secrets live in files (mode
/// 0600), never in the config, and are never logged. One of:
/// - `auth = { bearer_file = "/etc/ferry/token" }`: sent as `Authorization: Bearer ...`;
/// - `auth = { header = "aeg-sas-key", value_file = "/etc/ferry/key" }`: the file's
///   content (trimmed) sent as that header, for clouds that take a key header
///   (Azure Event Grid's `aeg-sas-key`, or `Authorization` with a SAS token).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAuth {
    #[serde(default)]
    pub bearer_file: Option<PathBuf>,
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub value_file: Option<PathBuf>,
}

/// Headers a key may not be sent as: the ones that describe the body or the
/// connection (which the client sets), and the hop-by-hop ones a proxy would strip.
/// The binding's `ce-*` headers are refused too.
const RESERVED_HEADERS: [&str; 13] = [
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "host",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

impl HttpAuth {
    /// What is wrong with the `auth` table, if anything.
    fn check(&self) -> Result<(), String> {
        match (&self.bearer_file, &self.header, &self.value_file) {
            (Some(_), None, None) => Ok(()),
            (None, Some(name), Some(_)) => check_header_name(name),
            _ => {
                Err("auth takes either bearer_file, or header and value_file together".to_string())
            }
        }
    }
}

fn check_header_name(name: &str) -> Result<(), String> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("auth header {name:?} is not a valid HTTP header name"))?;
    let lower = parsed.as_str();
    if RESERVED_HEADERS.contains(&lower) || lower.starts_with("ce-") {
        return Err(format!(
            "auth header {name:?} is set by ferry or by the connection; use another header"
        ));
    }
    Ok(())
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
            for (what, path) in [
                ("bearer_file", &a.bearer_file),
                ("value_file", &a.value_file),
            ] {
                if let Some(path) = path {
                    out.push(ConfigFile {
                        field: "auth",
                        what: what.into(),
                        path,
                    });
                }
            }
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

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Box<dyn Sink>, BuildError> {
        let resolve = ctx.resolve;
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
        out.extend(crate::sinks::check_batching(
            "http",
            i,
            &self.name,
            self.batch_max,
            Some(self.batch_max_bytes.0),
            self.timeout.0,
        ));
        if !(1..=64).contains(&self.max_in_flight) {
            out.push(problem!(
                ["sink", "http", i, "max_in_flight"],
                "sink {:?}: max_in_flight must be 1..=64",
                self.name
            ));
        }
        if let Some(Err(e)) = self.auth.as_ref().map(HttpAuth::check) {
            out.push(problem!(
                ["sink", "http", i, "auth"],
                "sink {:?}: {e}",
                self.name
            ));
        }
        if let Some(max) = self.max_message {
            if !(64..=64 * 1024 * 1024).contains(&max.0) {
                out.push(problem!(
                    ["sink", "http", i, "max_message"],
                    "sink {:?}: max_message must be between 64B and 64MiB",
                    self.name
                ));
            }
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
    #[error("sink {sink:?}: cannot read {what} {path}")]
    Secret {
        sink: String,
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("sink {sink:?}: the content of {what} is not a valid header value")]
    BadSecret { sink: String, what: &'static str },
    #[error("sink {sink:?}: {reason}")]
    Auth { sink: String, reason: String },
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
    #[error("sink {sink:?}: invalid url")]
    Url {
        sink: String,
        source: url::ParseError,
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
    /// Parsed once: parsing (and IDNA-mapping the host) on every request cost a
    /// little per commit at everyday rates.
    url: reqwest::Url,
    client: reqwest::Client,
    /// The credential header, its value marked sensitive so it never shows in
    /// debug output.
    auth: Option<(HeaderName, HeaderValue)>,
    compression: Compression,
    max_message: Option<usize>,
}

impl HttpSink {
    /// Builds the sink, reading its secrets now; `resolve` resolves the paths the
    /// config names.
    pub fn new(
        cfg: &HttpSinkConfig,
        resolve: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<Self, HttpSinkError> {
        let auth = cfg
            .auth
            .as_ref()
            .map(|a| auth_header(&cfg.name, a, resolve))
            .transpose()?;
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
            // reqwest uses a preconfigured TLS config as it is: offer HTTP/1.1 as its
            // own does (built without HTTP/2, it could not speak an `h2` the server
            // picked).
            rustls.alpn_protocols = vec![b"http/1.1".to_vec()];
            builder = builder.use_preconfigured_tls(rustls);
        }
        let client = builder.build().map_err(|source| HttpSinkError::Client {
            sink: cfg.name.clone(),
            source,
        })?;
        // Validation refuses a bad url first; this is the backstop.
        let url = reqwest::Url::parse(&cfg.url).map_err(|source| HttpSinkError::Url {
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
            url,
            client,
            auth,
            compression: cfg.compression,
            max_message: cfg
                .max_message
                .map(|m| usize::try_from(m.0).unwrap_or(usize::MAX)),
        })
    }
}

/// The credential header for `auth`, its secret read from its file now.
fn auth_header(
    sink: &str,
    auth: &HttpAuth,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<(HeaderName, HeaderValue), HttpSinkError> {
    let config_error = |reason: String| HttpSinkError::Auth {
        sink: sink.to_string(),
        reason,
    };
    auth.check().map_err(config_error)?;
    let (name, what, file, prefix) = match (&auth.bearer_file, &auth.header, &auth.value_file) {
        (Some(file), _, _) => (AUTHORIZATION, "bearer_file", file, "Bearer "),
        (None, Some(header), Some(file)) => {
            let name = HeaderName::from_bytes(header.as_bytes())
                .map_err(|e| config_error(e.to_string()))?;
            (name, "value_file", file, "")
        }
        // check() above accepts only the two forms matched.
        _ => return Err(config_error("auth is incomplete".to_string())),
    };
    let path = resolve(file);
    let secret = std::fs::read_to_string(&path).map_err(|source| HttpSinkError::Secret {
        sink: sink.to_string(),
        what,
        path: path.display().to_string(),
        source,
    })?;
    let mut value = HeaderValue::from_str(&format!("{prefix}{}", secret.trim())).map_err(|_| {
        HttpSinkError::BadSecret {
            sink: sink.to_string(),
            what,
        }
    })?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// gzip at the default level: a good ratio on JSON for little CPU. Writing into
/// memory cannot fail, so an error here would be the encoder's own.
fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::default(),
    );
    encoder.write_all(body)?;
    encoder.finish()
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

    fn max_message(&self) -> Option<usize> {
        self.max_message
    }

    fn message_len(&self, event: &Event) -> usize {
        binding::message_len(self.mode, event)
    }

    /// Sends one request's worth of events (one event unless in batch mode).
    async fn send(&self, events: &[Event]) -> Delivery {
        let (headers, body) = match (self.mode, events) {
            (HttpMode::Binary, [e]) => binding::binary(e),
            (HttpMode::Structured, [e]) => {
                (content_type(binding::STRUCTURED), binding::structured(e))
            }
            (HttpMode::Batch, evs) => (content_type(binding::BATCH), binding::batch(evs)),
            (_, evs) => {
                return Delivery::Rejected {
                    detail: format!("{} events for a single-event mode", evs.len()),
                }
            }
        };
        let mut req = self.client.post(self.url.clone()).headers(headers);
        if let Some((name, value)) = &self.auth {
            req = req.header(name.clone(), value.clone());
        }
        let req = match self.compression {
            Compression::None => req.body(body),
            Compression::Gzip => match gzip(&body) {
                Ok(zipped) => req
                    .header(CONTENT_ENCODING, HeaderValue::from_static("gzip"))
                    .body(zipped),
                Err(e) => return Delivery::retry("encode", format!("gzip: {e}")),
            },
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

fn content_type(value: &'static str) -> reqwest::header::HeaderMap {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(value));
    h
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

    fn config(extra: &str) -> HttpSinkConfig {
        toml::from_str(&format!(
            "name = \"cloud\"\nurl = \"https://example.com/events\"\n{extra}"
        ))
        .unwrap()
    }

    fn problems(extra: &str) -> Vec<String> {
        config(extra)
            .validate(0)
            .into_iter()
            .map(|p| p.message)
            .collect()
    }

    #[test]
    fn auth_takes_a_bearer_file_or_a_header_with_a_value_file_and_nothing_in_between() {
        assert!(problems(r#"auth = { bearer_file = "t" }"#).is_empty());
        assert!(problems(r#"auth = { header = "aeg-sas-key", value_file = "k" }"#).is_empty());
        for bad in [
            r#"auth = { header = "aeg-sas-key" }"#,
            r#"auth = { value_file = "k" }"#,
            r#"auth = { bearer_file = "t", header = "x-key", value_file = "k" }"#,
            "auth = {}",
        ] {
            let p = problems(bad);
            assert_eq!(p.len(), 1, "{bad}: {p:?}");
            assert!(
                p[0].contains("either bearer_file, or header and value_file"),
                "{p:?}"
            );
        }
    }

    #[test]
    fn a_key_header_may_not_be_invalid_nor_one_the_client_the_binding_or_a_proxy_owns() {
        assert!(problems(r#"auth = { header = "Authorization", value_file = "k" }"#).is_empty());
        for bad in [
            "Content-Type",
            "transfer-encoding",
            "Connection",
            "host",
            "ce-id",
            "bad header",
            "",
        ] {
            let p = problems(&format!(
                "auth = {{ header = {bad:?}, value_file = \"k\" }}"
            ));
            assert_eq!(p.len(), 1, "{bad:?}: {p:?}");
        }
    }

    #[test]
    fn max_message_and_compression_are_read_and_checked() {
        let c = config("compression = \"gzip\"\nmax_message = \"1MiB\"");
        assert_eq!(c.compression, Compression::Gzip);
        assert_eq!(c.max_message, Some(Bytes(1024 * 1024)));
        assert_eq!(config("").compression, Compression::None);
        assert_eq!(config("").max_message, None);
        assert_eq!(problems("max_message = 10").len(), 1);
        assert_eq!(problems("max_message = \"1GiB\"").len(), 1);
        assert!(toml::from_str::<HttpSinkConfig>(
            "name = \"c\"\nurl = \"https://e\"\ncompression = \"br\""
        )
        .is_err());
    }

    #[test]
    fn the_key_is_read_from_its_file_trimmed_and_marked_sensitive() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), "s3cr3t-key\n").unwrap();
        let auth = HttpAuth {
            bearer_file: None,
            header: Some("aeg-sas-key".into()),
            value_file: Some("key".into()),
        };
        let (name, value) = auth_header("cloud", &auth, &|p| dir.path().join(p)).unwrap();
        assert_eq!(name, "aeg-sas-key");
        assert_eq!(value, "s3cr3t-key");
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_missing_key_file_names_the_file_and_not_its_content() {
        let auth = HttpAuth {
            bearer_file: Some("/nonexistent/token".into()),
            header: None,
            value_file: None,
        };
        let e = auth_header("cloud", &auth, &|p| p.to_path_buf()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sink \"cloud\": cannot read bearer_file /nonexistent/token"
        );
    }

    #[test]
    fn a_gzipped_body_decodes_to_the_same_bytes() {
        let body = br#"[{"specversion":"1.0","data":{"t":1}}]"#.repeat(100);
        let zipped = gzip(&body).unwrap();
        assert!(zipped.len() < body.len() / 4, "{} bytes", zipped.len());
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&zipped[..]), &mut back)
            .unwrap();
        assert_eq!(back, body);
    }

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
