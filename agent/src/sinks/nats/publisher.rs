//! Publishing to JetStream: a batch is accepted only when every message in it has
//! its publish ack.
//!
//! A batch is pipelined: up to `max_in_flight` publishes go out before the oldest
//! ack is awaited, and acks are awaited in order. All travel on one connection, so
//! the stream stores them in the order given. The first failure ends the batch and
//! says why ([`Failure`]); messages already stored are sent again with the retry,
//! carry the same `Nats-Msg-Id`, and JetStream drops them as duplicates (within the
//! stream's duplicate window).
//!
//! The client connects on the first publish and reconnects by itself for as long as
//! the sink runs; while it is away, publishes time out and the batch is retried.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{ConnectOptions, HeaderMap, HeaderName, HeaderValue};
use tokio::sync::OnceCell;
use tracing::{info, warn};

use super::binding::Message;
use super::config::NatsSinkConfig;
use super::subject::SubjectTemplate;
use crate::ratelimit::RateLimit;

/// JetStream's acknowledgement of one stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The stream that stored it.
    pub stream: String,
    /// Its sequence in that stream.
    pub sequence: u64,
    /// JetStream had already stored a message with this `Nats-Msg-Id` within the
    /// duplicate window, and dropped this one.
    pub duplicate: bool,
}

/// Why a batch was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth trying the whole batch again later; `kind` is the metrics label.
    Retry { kind: &'static str, detail: String },
    /// The message at `index` can never be accepted; `reason` is the metrics label
    /// (`too_large`, `invalid`). Messages before it may have been stored.
    Refused {
        index: usize,
        reason: &'static str,
        detail: String,
    },
}

/// What a publish error means for the batch (see [`classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No stream captures the subject (nobody answered the publish): retried, and
    /// the first time logged with a hint to create one.
    NoStream,
    /// Retried; the metrics label.
    Retry(&'static str),
    /// Refused for good; the metrics label.
    Refused(&'static str),
}

/// How a JetStream publish error is treated. `code` is the JetStream API error
/// code when the server answered with one.
///
/// Only a message too large for the server or the stream is refused for good:
/// nothing about it will change on a retry. Everything else (no stream yet,
/// JetStream off, a full stream, timeouts, a lost connection) is what an operator
/// can fix, so it is retried and the store keeps the events meanwhile.
pub fn classify(kind: PublishErrorKind, code: Option<u64>) -> Verdict {
    match (kind, code) {
        (PublishErrorKind::MaxPayloadExceeded, _) => Verdict::Refused("too_large"),
        (_, Some(c)) if c == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM.0 => {
            Verdict::Refused("too_large")
        }
        (PublishErrorKind::StreamNotFound, _) => Verdict::NoStream,
        (_, Some(c)) if c == ErrorCode::STREAM_NOT_FOUND.0 => Verdict::NoStream,
        (_, Some(c))
            if c == ErrorCode::JETSTREAM_NOT_ENABLED.0
                || c == ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT.0 =>
        {
            Verdict::Retry("no_jetstream")
        }
        (_, Some(c))
            if c == ErrorCode::STORAGE_RESOURCES_EXCEEDED.0
                || c == ErrorCode::ACCOUNT_RESOURCES_EXCEEDED.0
                || c == ErrorCode::STREAM_LIMITS.0
                || c == ErrorCode::INSUFFICIENT_RESOURCES.0 =>
        {
            Verdict::Retry("stream_full")
        }
        (PublishErrorKind::TimedOut, _) => Verdict::Retry("timeout"),
        (PublishErrorKind::BrokenPipe, _) => Verdict::Retry("disconnected"),
        (PublishErrorKind::MaxAckPending, _) => Verdict::Retry("busy"),
        _ => Verdict::Retry("server_error"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NatsSinkError {
    #[error("sink {sink:?}: cannot read {what} {path}")]
    Secret {
        sink: String,
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("sink {sink:?}: {what} {path} is empty")]
    EmptySecret {
        sink: String,
        what: &'static str,
        path: String,
    },
    #[error("sink {sink:?}: creds_file {path} is not a NATS credentials file")]
    Creds {
        sink: String,
        path: String,
        source: super::creds::CredsError,
    },
    #[error("sink {sink:?}: tls")]
    Tls {
        sink: String,
        source: crate::tls::TlsError,
    },
}

/// Publishes batches of messages to JetStream for one sink.
pub struct Publisher {
    name: String,
    url: String,
    options: ConnectOptions,
    timeout: Duration,
    max_in_flight: usize,
    /// The subjects a stream would need to capture, for the hint.
    capture: String,
    connection: OnceCell<(async_nats::Client, jetstream::Context)>,
    /// Subjects already logged as captured by no stream: logged once each, until a
    /// publish to them is acked. Bounded so hostile device ids cannot grow it.
    hinted: Mutex<HashSet<String>>,
}

/// At most this many subjects are remembered as hinted.
const HINTED_MAX: usize = 256;

impl Publisher {
    /// Reads the credentials and TLS files now, so a missing or unreadable one stops
    /// the agent at start with a clear error. `resolve` turns a path from the config
    /// into one relative to the config file. Connects on the first publish.
    pub fn new(
        cfg: &NatsSinkConfig,
        resolve: impl Fn(&Path) -> PathBuf,
    ) -> Result<Publisher, NatsSinkError> {
        let sink = cfg.name.clone();
        let mut options = ConnectOptions::new()
            .name(format!("ferry {}", cfg.name))
            .connection_timeout(cfg.timeout.0)
            .request_timeout(Some(cfg.timeout.0))
            .retry_on_initial_connect();
        if let Some(auth) = &cfg.auth {
            let secret = |what: &'static str, path: &Path| {
                let path = resolve(path);
                let text =
                    std::fs::read_to_string(&path).map_err(|source| NatsSinkError::Secret {
                        sink: sink.clone(),
                        what,
                        path: path.display().to_string(),
                        source,
                    })?;
                let text = text.trim().to_string();
                if text.is_empty() {
                    return Err(NatsSinkError::EmptySecret {
                        sink: sink.clone(),
                        what,
                        path: path.display().to_string(),
                    });
                }
                Ok((path, text))
            };
            if let (Some(user), Some(file)) = (&auth.user, &auth.password_file) {
                let (_, password) = secret("password_file", file)?;
                options = options.user_and_password(user.clone(), password);
            } else if let Some(file) = &auth.token_file {
                let (_, token) = secret("token_file", file)?;
                options = options.token(token);
            } else if let Some(file) = &auth.creds_file {
                let (path, text) = secret("creds_file", file)?;
                let creds = super::creds::parse(&text).map_err(|source| NatsSinkError::Creds {
                    sink: sink.clone(),
                    path: path.display().to_string(),
                    source,
                })?;
                // What async-nats' `credentials` does, without its regex: sign the
                // server's nonce with the seed.
                let key = std::sync::Arc::new(creds.key);
                options = options.jwt(creds.jwt, move |nonce| {
                    let key = std::sync::Arc::clone(&key);
                    async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
                });
            }
        }
        // Always our own rustls config (ring, the public roots or `ca_file`), also
        // for a nats:// server that asks for TLS itself, so the trust is what the
        // config says and never the client library's own choice.
        let tls = crate::tls::client_config(cfg.tls.as_ref(), &resolve).map_err(|source| {
            NatsSinkError::Tls {
                sink: sink.clone(),
                source,
            }
        })?;
        options = options
            .tls_client_config((*tls).clone())
            .require_tls(cfg.uses_tls());
        let events_sink = sink.clone();
        let limit = std::sync::Arc::new(Mutex::new(RateLimit::new(5, Duration::from_secs(60))));
        options = options.event_callback(move |event| {
            let sink = events_sink.clone();
            let limit = limit.clone();
            async move { log_event(&sink, &limit, event) }
        });
        let capture = SubjectTemplate::parse(&cfg.subject)
            .map(|t| t.capture_all())
            .unwrap_or_else(|_| ">".to_string());
        Ok(Publisher {
            name: sink,
            url: cfg.url.clone(),
            options,
            timeout: cfg.timeout.0,
            max_in_flight: cfg.max_in_flight.max(1),
            capture,
            connection: OnceCell::new(),
            hinted: Mutex::new(HashSet::new()),
        })
    }

    /// The largest message the server takes (header block and payload, as
    /// [`Message::wire_len`] counts), as it announced when connecting; the NATS
    /// default of 1MiB until then.
    pub fn max_payload(&self) -> usize {
        match self.connection.get() {
            Some((client, _)) => client.max_payload(),
            None => 1024 * 1024,
        }
    }

    /// Publishes `batch` in order and returns once JetStream has acknowledged every
    /// message (one [`Ack`] each, in order), or says why not.
    pub async fn publish(&self, batch: &[Message]) -> Result<Vec<Ack>, Failure> {
        let (client, js) = self.connect().await?;
        let mut pending: VecDeque<(usize, PublishAckFuture)> = VecDeque::new();
        let mut acks = Vec::with_capacity(batch.len());
        for (index, message) in batch.iter().enumerate() {
            if pending.len() >= self.max_in_flight {
                if let Some((i, ack)) = pending.pop_front() {
                    acks.push(self.ack(client, &batch[i], i, ack).await?);
                }
            }
            let headers = headers(message).map_err(|detail| Failure::Refused {
                index,
                reason: "invalid",
                detail,
            })?;
            let sent = js
                .publish_with_headers(
                    message.subject.clone(),
                    headers,
                    message.payload.clone().into(),
                )
                .await;
            match sent {
                Ok(ack) => pending.push_back((index, ack)),
                // Publishes still awaiting their ack are dropped with `pending`: the
                // client library awaits them in the background.
                Err(e) => return Err(self.failure(client, message, index, &e)),
            }
        }
        while let Some((i, ack)) = pending.pop_front() {
            acks.push(self.ack(client, &batch[i], i, ack).await?);
        }
        Ok(acks)
    }

    async fn connect(&self) -> Result<&(async_nats::Client, jetstream::Context), Failure> {
        self.connection
            .get_or_try_init(|| async {
                let client = self
                    .options
                    .clone()
                    .connect(self.url.as_str())
                    .await
                    .map_err(|e| Failure::Retry {
                        kind: "connect",
                        detail: e.to_string(),
                    })?;
                let js = jetstream::ContextBuilder::new()
                    .timeout(self.timeout)
                    .ack_timeout(self.timeout)
                    .max_ack_inflight(self.max_in_flight)
                    .backpressure_on_inflight(true)
                    .build(client.clone());
                Ok((client, js))
            })
            .await
    }

    async fn ack(
        &self,
        client: &async_nats::Client,
        message: &Message,
        index: usize,
        ack: PublishAckFuture,
    ) -> Result<Ack, Failure> {
        match ack.await {
            Ok(a) => {
                self.hint_resolved(&message.subject);
                Ok(Ack {
                    stream: a.stream,
                    sequence: a.sequence,
                    duplicate: a.duplicate,
                })
            }
            Err(e) => Err(self.failure(client, message, index, &e)),
        }
    }

    fn failure(
        &self,
        client: &async_nats::Client,
        message: &Message,
        index: usize,
        error: &PublishError,
    ) -> Failure {
        let code = api_code(error);
        let mut detail = error_chain(error);
        match classify(error.kind(), code) {
            Verdict::Refused(reason) => Failure::Refused {
                index,
                reason,
                detail: format!(
                    "{detail} ({} bytes; the server takes {})",
                    message.wire_len(),
                    client.max_payload()
                ),
            },
            Verdict::NoStream => {
                detail = format!(
                    "no JetStream stream captures subject {}: create one, e.g. `nats stream add {} --subjects '{}' --dupe-window 2m`",
                    message.subject,
                    stream_name(&self.name),
                    self.capture
                );
                self.hint_once(&message.subject, &detail);
                Failure::Retry {
                    kind: "no_stream",
                    detail,
                }
            }
            Verdict::Retry(kind) => {
                if client.connection_state() != async_nats::connection::State::Connected {
                    detail = format!("{detail} (not connected to the server)");
                }
                Failure::Retry { kind, detail }
            }
        }
    }

    fn hint_once(&self, subject: &str, hint: &str) {
        // Past HINTED_MAX subjects, nothing more is logged here: the forwarding
        // loop still logs the retry itself at its own rate.
        let first = match self.hinted.lock() {
            Ok(mut hinted) if hinted.len() < HINTED_MAX => hinted.insert(subject.to_string()),
            _ => false,
        };
        if first {
            warn!(sink = %self.name, subject, "{hint}");
        }
    }

    fn hint_resolved(&self, subject: &str) {
        if let Ok(mut hinted) = self.hinted.lock() {
            if !hinted.is_empty() && hinted.remove(subject) {
                info!(sink = %self.name, subject, "a JetStream stream now captures the subject");
            }
        }
    }
}

/// A stream name suggestion from the sink's name: letters, digits, `-` and `_`.
fn stream_name(sink: &str) -> String {
    let s: String = sink
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "ferry".to_string()
    } else {
        s
    }
}

fn headers(message: &Message) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, value) in &message.headers {
        let n = HeaderName::from_str(name).map_err(|_| format!("invalid header name {name:?}"))?;
        let v = HeaderValue::from_str(value)
            .map_err(|_| format!("invalid value for header {name:?}"))?;
        map.insert(n, v);
    }
    Ok(map)
}

/// The JetStream API error code inside a publish error, if the server sent one.
fn api_code(error: &PublishError) -> Option<u64> {
    let source = std::error::Error::source(error)?;
    source
        .downcast_ref::<jetstream::Error>()
        .map(|e| e.error_code().0)
}

/// An error with its causes.
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

fn log_event(sink: &str, limit: &Mutex<RateLimit>, event: async_nats::Event) {
    match event {
        async_nats::Event::Connected => info!(sink, "connected to the NATS server"),
        other => {
            let allowed = limit.lock().ok().and_then(|mut l| l.check(Instant::now()));
            if let Some(suppressed) = allowed {
                warn!(sink, event = %other, suppressed, "NATS connection");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_too_large_for_the_server_or_the_stream_is_refused_for_good() {
        assert_eq!(
            classify(PublishErrorKind::MaxPayloadExceeded, None),
            Verdict::Refused("too_large")
        );
        assert_eq!(
            classify(PublishErrorKind::Other, Some(10054)),
            Verdict::Refused("too_large")
        );
    }

    #[test]
    fn no_stream_for_the_subject_is_retried_with_a_hint() {
        assert_eq!(
            classify(PublishErrorKind::StreamNotFound, None),
            Verdict::NoStream
        );
        assert_eq!(
            classify(PublishErrorKind::Other, Some(10059)),
            Verdict::NoStream
        );
    }

    #[test]
    fn timeouts_lost_connections_and_full_streams_are_retried() {
        for (kind, code, label) in [
            (PublishErrorKind::TimedOut, None, "timeout"),
            (PublishErrorKind::BrokenPipe, None, "disconnected"),
            (PublishErrorKind::MaxAckPending, None, "busy"),
            (PublishErrorKind::Other, Some(10047), "stream_full"),
            (PublishErrorKind::Other, Some(10076), "no_jetstream"),
            (PublishErrorKind::Other, None, "server_error"),
            (
                PublishErrorKind::WrongLastSequence,
                Some(10071),
                "server_error",
            ),
        ] {
            assert_eq!(
                classify(kind, code),
                Verdict::Retry(label),
                "{kind:?} {code:?}"
            );
        }
    }

    #[test]
    fn a_stream_name_suggestion_is_a_valid_stream_name() {
        assert_eq!(stream_name("js cloud.1"), "js_cloud_1");
        assert_eq!(stream_name(""), "ferry");
    }
}
