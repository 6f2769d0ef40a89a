//! The publisher: one task owns the MQTT connection (rumqttc's event loop) and
//! publishes batches of [`Message`]s at QoS 1; [`Publisher::publish`] returns only
//! when every message of its batch has its PUBACK, or says why not.
//!
//! rumqttc traps this file is shaped by:
//! - `publish` returns once a message is queued: acknowledgement is followed by
//!   packet id (`Outgoing::Publish(pkid)` in order, then `Incoming::PubAck`), in
//!   the pure [`Tracker`];
//! - `poll()` after an error reconnects at once: every error is followed by a
//!   jittered backoff wait (during which callers are still answered);
//! - `poll()` is not cancel-safe while it connects: dropping it mid-handshake
//!   drops the socket. While connecting, nothing else is selected, so a busy
//!   caller can never keep the connection from coming up;
//! - after an error rumqttc keeps unacknowledged publishes to resend, and drops
//!   them silently if the broker lost the session. We drop its resend list and
//!   resend ourselves, in order, after every reconnect, so a lost session never
//!   loses a message and every message is tracked by the pkid it was last sent with;
//! - a packet over rumqttc's outgoing limit (or the broker's Maximum Packet Size)
//!   breaks the connection, and a resend would break it again: messages over
//!   `max_message` (or the broker's limit) are refused before they are queued.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::v5;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::azure;
use super::binding::{message_len, Message, Protocol};
use super::config::{Broker, MqttSinkConfig};
use super::state::{Acked, BatchId, Tracker};
use crate::backoff::Backoff;
use crate::config::BackoffConfig;

/// Why a batch was not accepted. `accepted()` messages from its start had PUBACKs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Refused before anything of the batch was sent.
    #[error("message {index} is {len} bytes, over the limit of {max}")]
    TooLarge {
        index: usize,
        len: usize,
        max: usize,
    },
    /// The broker's PUBACK refused message `index` (MQTT 5 reason code).
    #[error("the broker refused message {index}: {reason}")]
    Refused {
        index: usize,
        accepted: usize,
        reason: String,
        /// False for reasons that may pass later (quota exceeded, not authorized).
        permanent: bool,
    },
    /// Not every message had its PUBACK within the timeout (no connection, or a
    /// broker that does not answer).
    #[error("{accepted} of {total} messages acknowledged within {timeout:?}")]
    Timeout {
        accepted: usize,
        total: usize,
        timeout: Duration,
    },
    /// The publisher task has ended (shutdown).
    #[error("the publisher has stopped")]
    Stopped,
}

impl PublishError {
    /// Messages from the start of the batch that had their PUBACK.
    pub fn accepted(&self) -> usize {
        match self {
            PublishError::Refused { accepted, .. } | PublishError::Timeout { accepted, .. } => {
                *accepted
            }
            PublishError::TooLarge { .. } | PublishError::Stopped => 0,
        }
    }

    /// Whether sending the same messages again can never succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            PublishError::TooLarge { .. } => true,
            PublishError::Refused { permanent, .. } => *permanent,
            PublishError::Timeout { .. } | PublishError::Stopped => false,
        }
    }
}

/// A sink that cannot be started; the message names the sink and never a secret.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("sink {sink:?}: {message}")]
    Config { sink: String, message: String },
    #[error("sink {sink:?}: cannot read {what} {path}: {source}")]
    Read {
        sink: String,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sink {sink:?}: {what} {path}: {source}")]
    Key {
        sink: String,
        what: &'static str,
        path: PathBuf,
        source: azure::SasError,
    },
    #[error("sink {sink:?}: tls: {source}")]
    Tls {
        sink: String,
        source: crate::tls::TlsError,
    },
}

/// How the publisher logs in.
#[derive(Clone)]
pub enum Credentials {
    None,
    /// A username, with a password when given.
    Password {
        username: String,
        password: Option<String>,
    },
    /// Azure IoT Hub: a SAS token signed with the device key, made at each
    /// connect, valid for `ttl` and renewed after four fifths of it.
    AzureSas {
        username: String,
        resource: String,
        key: String,
        ttl: Duration,
    },
}

// Secrets stay out of logs, `{:?}` included.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Password { username, .. } => write!(f, "Password({username:?}, ***)"),
            Credentials::AzureSas { username, ttl, .. } => {
                write!(f, "AzureSas({username:?}, ttl {ttl:?}, ***)")
            }
        }
    }
}

/// Everything the publisher needs, resolved at start-up (files read then).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The sink's name, for logs and metrics.
    pub name: String,
    pub protocol: Protocol,
    pub broker: Broker,
    pub client_id: String,
    pub credentials: Credentials,
    /// Used for `mqtts://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub keep_alive: Duration,
    pub max_in_flight: usize,
    pub max_message: usize,
    pub timeout: Duration,
    pub reconnect: BackoffConfig,
}

impl Settings {
    /// Resolves a config: reads `password_file`, the Azure device key and the TLS
    /// files (relative paths through `resolve`). `agent` is the agent's id.
    pub fn from_config(
        cfg: &MqttSinkConfig,
        agent: &str,
        resolve: &dyn Fn(&Path) -> PathBuf,
    ) -> Result<Settings, BuildError> {
        let sink = cfg.name.clone();
        let config_error = |message: String| BuildError::Config {
            sink: sink.clone(),
            message,
        };
        let broker = cfg.broker().map_err(config_error)?;
        let read = |what: &'static str, path: &Path| {
            let path = resolve(path);
            std::fs::read_to_string(&path)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|source| BuildError::Read {
                    sink: sink.clone(),
                    what,
                    path,
                    source,
                })
        };
        let credentials = match (&cfg.azure_iot_hub, cfg.username()) {
            (Some(hub), Some(username)) => match &hub.key_file {
                Some(key_file) => {
                    let key = read("key_file", key_file)?;
                    // Sign once now, so a bad key stops the start with a clear error.
                    azure::sas_token(&hub.resource(), &key, 0).map_err(|source| {
                        BuildError::Key {
                            sink: sink.clone(),
                            what: "key_file",
                            path: resolve(key_file),
                            source,
                        }
                    })?;
                    Credentials::AzureSas {
                        username,
                        resource: hub.resource(),
                        key,
                        ttl: cfg.token_ttl.0,
                    }
                }
                // An X.509 device: the certificate in `tls` authenticates it.
                None => Credentials::Password {
                    username,
                    password: None,
                },
            },
            (_, Some(username)) => Credentials::Password {
                username,
                password: match &cfg.password_file {
                    Some(p) => Some(read("password_file", p)?),
                    None => None,
                },
            },
            (_, None) => Credentials::None,
        };
        let tls = if broker.tls {
            Some(
                crate::tls::client_config(cfg.tls.as_ref(), resolve).map_err(|source| {
                    BuildError::Tls {
                        sink: sink.clone(),
                        source,
                    }
                })?,
            )
        } else {
            None
        };
        Ok(Settings {
            name: cfg.name.clone(),
            protocol: cfg.protocol(),
            broker,
            client_id: cfg.client_id(agent),
            credentials,
            tls,
            keep_alive: cfg.keep_alive.0,
            max_in_flight: cfg.max_in_flight.max(1),
            max_message: usize::try_from(cfg.max_message.0).unwrap_or(usize::MAX),
            timeout: cfg.timeout.0,
            reconnect: cfg.reconnect,
        })
    }
}

enum Command {
    Publish {
        id: BatchId,
        messages: Vec<Message>,
        reply: oneshot::Sender<Result<(), PublishError>>,
    },
    /// The caller gave up on (or dropped) this batch; the task answers with how
    /// many of its messages, from the start, had PUBACKs.
    Withdraw(BatchId, Option<oneshot::Sender<usize>>),
}

/// A handle on the publisher task; cheap to clone, usable from many tasks at once.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<Command>,
    next_id: Arc<AtomicU64>,
    protocol: Protocol,
    max_message: usize,
    timeout: Duration,
}

impl Publisher {
    /// Starts the task that owns the connection; it runs until `cancel`.
    pub fn start(settings: Settings, cancel: CancellationToken) -> (Publisher, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let publisher = Publisher {
            tx,
            next_id: Arc::new(AtomicU64::new(1)),
            protocol: settings.protocol,
            max_message: settings.max_message,
            timeout: settings.timeout,
        };
        let task = tokio::spawn(run(settings, rx, cancel));
        (publisher, task)
    }

    /// Publishes `messages` at QoS 1, in order, and returns when every one has its
    /// PUBACK. On an error, [`PublishError::accepted`] says how many from the start
    /// were acknowledged; later ones may or may not have reached the broker.
    /// A batch with a message over the limit is refused whole, before any is sent.
    pub async fn publish(&self, messages: Vec<Message>) -> Result<(), PublishError> {
        let total = messages.len();
        for (index, m) in messages.iter().enumerate() {
            let len = self.message_len(m);
            if len > self.max_message {
                return Err(PublishError::TooLarge {
                    index,
                    len,
                    max: self.max_message,
                });
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Publish {
                id,
                messages,
                reply,
            })
            .map_err(|_| PublishError::Stopped)?;
        // Withdraws the batch if this future is dropped before the answer.
        let mut guard = Withdraw {
            tx: &self.tx,
            id: Some(id),
        };
        let mut answer = answer;
        match tokio::time::timeout(self.timeout, &mut answer).await {
            Ok(Ok(result)) => {
                guard.id = None;
                result
            }
            Ok(Err(_)) => Err(PublishError::Stopped),
            Err(_) => {
                guard.id = None;
                let (counted, count) = oneshot::channel();
                if self.tx.send(Command::Withdraw(id, Some(counted))).is_err() {
                    return Err(PublishError::Stopped);
                }
                // The task answers a withdraw at once; if the batch was done just
                // before it, its answer is already waiting.
                let accepted = count.await.unwrap_or(0);
                match answer.try_recv() {
                    Ok(result) => result,
                    Err(_) => Err(PublishError::Timeout {
                        accepted,
                        total,
                        timeout: self.timeout,
                    }),
                }
            }
        }
    }

    /// The bytes `message` takes on the wire, as compared with [`Publisher::max_message`].
    pub fn message_len(&self, message: &Message) -> usize {
        message_len(message, self.protocol)
    }

    /// The largest message this publisher sends.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }
}

struct Withdraw<'a> {
    tx: &'a mpsc::UnboundedSender<Command>,
    id: Option<BatchId>,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let _ = self.tx.send(Command::Withdraw(id, None));
        }
    }
}

/// What happened on the connection, the same for MQTT 3.1.1 and 5.
#[derive(Debug)]
enum Wire {
    Connected {
        receive_max: Option<u16>,
        max_packet: Option<u32>,
    },
    Sent(u16),
    Acked {
        pkid: u16,
        refusal: Option<(String, bool)>,
    },
    Other,
}

/// A connection error: `reason` is the metrics label.
#[derive(Debug)]
struct WireError {
    reason: &'static str,
    detail: String,
}

/// Headroom over `max_message` for rumqttc's own outgoing limit, which must never
/// be what stops a packet.
const PACKET_HEADROOM: usize = 1024;

enum Conn {
    V4(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
    V5(v5::AsyncClient, Box<v5::EventLoop>),
}

impl Conn {
    fn new(s: &Settings) -> Conn {
        // Room for every message that may be handed out before the event loop reads
        // them, so `try_publish` never finds the channel full.
        let cap = s.max_in_flight + 8;
        let transport = s.tls.as_ref().map(|tls| {
            rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::clone(tls)))
        });
        let inflight = u16::try_from(s.max_in_flight).unwrap_or(u16::MAX).max(1);
        match s.protocol {
            Protocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(&s.client_id, &s.broker.host, s.broker.port);
                o.set_keep_alive(s.keep_alive)
                    // A persistent session; config validation keeps the client id
                    // non-empty, without which rumqttc would panic here.
                    .set_clean_session(false)
                    .set_inflight(inflight)
                    .set_max_packet_size(64 * 1024, s.max_message + PACKET_HEADROOM);
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                let (client, eventloop) = rumqttc::AsyncClient::new(o, cap);
                Conn::V4(client, Box::new(eventloop))
            }
            Protocol::V5 => {
                let mut o = v5::MqttOptions::new(&s.client_id, &s.broker.host, s.broker.port);
                o.set_keep_alive(s.keep_alive)
                    .set_clean_start(false)
                    .set_session_expiry_interval(Some(24 * 3600))
                    .set_outgoing_inflight_upper_limit(inflight)
                    .set_max_packet_size(Some(64 * 1024));
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                let (client, eventloop) = v5::AsyncClient::new(o, cap);
                Conn::V5(client, Box::new(eventloop))
            }
        }
    }

    fn set_credentials(&mut self, username: &str, password: &str) {
        match self {
            Conn::V4(_, el) => {
                el.mqtt_options.set_credentials(username, password);
            }
            Conn::V5(_, el) => {
                el.options.set_credentials(username, password);
            }
        }
    }

    /// Forgets rumqttc's resend list (we resend ourselves) after an error, or
    /// drops the connection first when `drop_network`.
    fn reset(&mut self, drop_network: bool) {
        match self {
            Conn::V4(_, el) => {
                if drop_network {
                    el.clean();
                }
                el.pending.clear();
                el.state.collision = None;
            }
            Conn::V5(_, el) => {
                if drop_network {
                    el.clean();
                }
                el.pending.clear();
                el.state.collision = None;
            }
        }
    }

    fn try_publish(&self, m: &Message) -> Result<(), String> {
        match self {
            Conn::V4(client, _) => client
                .try_publish(
                    m.topic.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    m.payload.clone(),
                )
                .map_err(|e| e.to_string()),
            Conn::V5(client, _) => {
                let props = v5::mqttbytes::v5::PublishProperties {
                    content_type: m.properties.content_type.clone(),
                    user_properties: m.properties.user.clone(),
                    ..Default::default()
                };
                client
                    .try_publish_with_properties(
                        m.topic.clone(),
                        v5::mqttbytes::QoS::AtLeastOnce,
                        false,
                        m.payload.clone(),
                        props,
                    )
                    .map_err(|e| e.to_string())
            }
        }
    }

    async fn poll(&mut self) -> Result<Wire, WireError> {
        match self {
            Conn::V4(_, el) => match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => Ok(Wire::Connected {
                    receive_max: None,
                    max_packet: None,
                }),
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                    Ok(Wire::Sent(pkid))
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(ack))) => Ok(Wire::Acked {
                    pkid: ack.pkid,
                    refusal: None,
                }),
                Ok(_) => Ok(Wire::Other),
                Err(e) => Err(WireError {
                    reason: v4_reason(&e),
                    detail: e.to_string(),
                }),
            },
            Conn::V5(_, el) => match el.poll().await {
                Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::ConnAck(ack))) => {
                    let props = ack.properties.as_ref();
                    Ok(Wire::Connected {
                        receive_max: props.and_then(|p| p.receive_max),
                        max_packet: props.and_then(|p| p.max_packet_size),
                    })
                }
                Ok(v5::Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => Ok(Wire::Sent(pkid)),
                Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::PubAck(ack))) => {
                    Ok(Wire::Acked {
                        pkid: ack.pkid,
                        refusal: v5_refusal(ack.reason),
                    })
                }
                Ok(_) => Ok(Wire::Other),
                Err(e) => Err(WireError {
                    reason: v5_reason(&e),
                    detail: e.to_string(),
                }),
            },
        }
    }
}

/// A PUBACK reason code that is not a success: its text, and whether it is final.
fn v5_refusal(reason: v5::mqttbytes::v5::PubAckReason) -> Option<(String, bool)> {
    use v5::mqttbytes::v5::PubAckReason as R;
    match reason {
        R::Success | R::NoMatchingSubscribers => None,
        // The message itself is wrong: sending it again cannot help.
        R::TopicNameInvalid | R::PayloadFormatInvalid => Some((format!("{reason:?}"), true)),
        // A quota, an ACL being fixed, a broker hiccup: worth retrying.
        R::UnspecifiedError
        | R::ImplementationSpecificError
        | R::NotAuthorized
        | R::PacketIdentifierInUse
        | R::QuotaExceeded => Some((format!("{reason:?}"), false)),
    }
}

fn v4_reason(error: &rumqttc::ConnectionError) -> &'static str {
    use rumqttc::{ConnectReturnCode as C, ConnectionError as E, StateError as S};
    match error {
        E::MqttState(S::Io(_) | S::ConnectionAborted) | E::Io(_) => "io",
        E::NetworkTimeout | E::FlushTimeout | E::MqttState(S::AwaitPingResp) => "timeout",
        E::Tls(_) => "tls",
        E::ConnectionRefused(C::BadUserNamePassword | C::NotAuthorized) => "auth",
        E::ConnectionRefused(_) => "refused",
        E::RequestsDone => "closed",
        E::MqttState(_) | E::NotConnAck(_) => "protocol",
    }
}

fn v5_reason(error: &v5::ConnectionError) -> &'static str {
    use v5::mqttbytes::v5::ConnectReturnCode as C;
    use v5::{ConnectionError as E, StateError as S};
    match error {
        E::MqttState(S::Io(_) | S::ConnectionAborted) | E::Io(_) => "io",
        E::Timeout(_) | E::MqttState(S::AwaitPingResp) => "timeout",
        E::Tls(_) => "tls",
        E::ConnectionRefused(C::BadUserNamePassword | C::NotAuthorized) => "auth",
        E::ConnectionRefused(_) => "refused",
        E::RequestsDone => "closed",
        _ => "protocol",
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The batches waiting for PUBACKs, with their messages and whom to answer.
type Waiting = HashMap<BatchId, (Vec<Message>, oneshot::Sender<Result<(), PublishError>>)>;

async fn run(s: Settings, mut rx: mpsc::UnboundedReceiver<Command>, cancel: CancellationToken) {
    let name = s.name.clone();
    let mut conn = Conn::new(&s);
    let mut tracker = Tracker::new(s.max_in_flight);
    let mut waiting: Waiting = HashMap::new();
    let mut backoff = Backoff::new(s.reconnect);
    // The broker's Maximum Packet Size (MQTT 5), when it announced one.
    let mut broker_max: Option<usize> = None;
    // When the Azure SAS token in use should be replaced (planned reconnect).
    let mut renew_at: Option<Instant> = None;
    // Draining before a renewal: nothing new is sent; reconnect once idle or at
    // the deadline.
    let mut drain_deadline: Option<Instant> = None;
    let mut connected = false;
    // Set after an error: no connection attempt before then.
    let mut retry_at: Option<Instant> = None;
    let mut outage_reported = false;
    let far = Duration::from_secs(365 * 24 * 3600);
    set_credentials(&mut conn, &s.credentials, &name);
    info!(sink = %name, host = %s.broker.host, port = s.broker.port, tls = s.broker.tls, protocol = %s.protocol, client_id = %s.client_id, "MQTT sink starting");

    loop {
        // Hand the client what may go now.
        while let Some(slot) = tracker.next_to_send() {
            let Some(message) = waiting
                .get(&slot.batch)
                .and_then(|(messages, _)| messages.get(slot.index))
            else {
                // Every queued slot belongs to a waiting batch: they leave together.
                continue;
            };
            if let Err(error) = conn.try_publish(message) {
                // The channel holds more than the in-flight bound, so this means the
                // event loop is gone; start the connection over.
                warn!(sink = %name, %error, "cannot queue a publish; reconnecting");
                conn.reset(true);
                tracker.disconnected();
                connected = false;
                break;
            }
        }
        if drain_deadline.is_some_and(|d| tracker.idle() || Instant::now() >= d) {
            info!(sink = %name, in_flight = tracker.outstanding(), "renewing the SAS token: reconnecting");
            drain_deadline = None;
            renew_at = None;
            conn.reset(true);
            tracker.disconnected();
            tracker.pause(false);
            connected = false;
            set_credentials(&mut conn, &s.credentials, &name);
            continue;
        }
        let renew = renew_at.filter(|_| drain_deadline.is_none());
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            // Not while connecting: see the note on cancel safety at the top.
            cmd = rx.recv(), if connected || retry_at.is_some() => match cmd {
                None => break,
                Some(Command::Withdraw(id, counted)) => {
                    let accepted = tracker.withdraw(id);
                    waiting.remove(&id);
                    if let Some(counted) = counted {
                        let _ = counted.send(accepted);
                    }
                }
                Some(Command::Publish { id, messages, reply }) => {
                    let limit = broker_max.map_or(s.max_message, |b| b.min(s.max_message));
                    let over = messages.iter().enumerate().find_map(|(index, m)| {
                        let len = message_len(m, s.protocol);
                        (len > limit).then_some(PublishError::TooLarge { index, len, max: limit })
                    });
                    if let Some(e) = over {
                        let _ = reply.send(Err(e));
                    } else if tracker.submit(id, messages.len()) {
                        waiting.insert(id, (messages, reply));
                    } else {
                        let _ = reply.send(Ok(()));
                    }
                }
            },
            _ = tokio::time::sleep_until(renew.unwrap_or_else(|| Instant::now() + far)), if renew.is_some() => {
                debug!(sink = %name, "SAS token due for renewal; letting in-flight messages drain");
                tracker.pause(true);
                drain_deadline = Some(Instant::now() + s.timeout.min(Duration::from_secs(30)));
            }
            _ = tokio::time::sleep_until(drain_deadline.unwrap_or_else(|| Instant::now() + far)), if drain_deadline.is_some() => {}
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(|| Instant::now() + far)), if retry_at.is_some() => {
                retry_at = None;
            }
            ev = conn.poll(), if retry_at.is_none() => match ev {
                Ok(Wire::Connected { receive_max, max_packet }) => {
                    connected = true;
                    outage_reported = false;
                    backoff.reset();
                    broker_max = max_packet.map(|m| m as usize);
                    // A batch queued before the broker announced a smaller packet limit
                    // would break every connection: refuse it now, before it is sent.
                    if let Some(limit) = broker_max.filter(|b| *b < s.max_message) {
                        let over: Vec<(BatchId, PublishError)> = waiting
                            .iter()
                            .filter_map(|(id, (messages, _))| {
                                messages.iter().enumerate().find_map(|(index, m)| {
                                    let len = message_len(m, s.protocol);
                                    (len > limit).then_some((*id, PublishError::TooLarge { index, len, max: limit }))
                                })
                            })
                            .collect();
                        for (id, error) in over {
                            tracker.withdraw(id);
                            if let Some((_, reply)) = waiting.remove(&id) {
                                let _ = reply.send(Err(error));
                            }
                        }
                    }
                    tracker.connected(receive_max, s.max_in_flight);
                    if let Credentials::AzureSas { ttl, .. } = &s.credentials {
                        renew_at = Some(Instant::now() + *ttl * 4 / 5);
                    }
                    info!(sink = %name, ?receive_max, ?max_packet, "connected to the upstream broker");
                }
                Ok(Wire::Sent(pkid)) => {
                    if !tracker.sent(pkid) {
                        debug!(sink = %name, pkid, "a publish nobody handed out");
                    }
                }
                Ok(Wire::Acked { pkid, refusal }) => {
                    let ok = refusal.is_none();
                    match tracker.acked(pkid, ok) {
                        Acked::BatchDone(id) => {
                            if let Some((_, reply)) = waiting.remove(&id) {
                                let _ = reply.send(Ok(()));
                            }
                        }
                        Acked::Refused { slot, accepted } => {
                            let (reason, permanent) = refusal.unwrap_or_default();
                            warn!(sink = %name, pkid, %reason, permanent, "the broker refused a message");
                            if let Some((_, reply)) = waiting.remove(&slot.batch) {
                                let _ = reply.send(Err(PublishError::Refused { index: slot.index, accepted, reason, permanent }));
                            }
                        }
                        Acked::Progress | Acked::Orphan => {}
                        Acked::Unknown => debug!(sink = %name, pkid, "PUBACK for no message in flight"),
                    }
                }
                Ok(Wire::Other) => {}
                Err(WireError { reason, detail }) => {
                    tracker.disconnected();
                    conn.reset(false);
                    metrics::counter!("ferry_sink_disconnects_total", "sink" => name.clone(), "reason" => reason).increment(1);
                    if connected {
                        warn!(sink = %name, reason, error = %detail, waiting = tracker.batches(), "lost the upstream broker; reconnecting with backoff");
                    } else if !outage_reported {
                        warn!(sink = %name, reason, error = %detail, "cannot connect to the upstream broker; retrying with backoff");
                    } else {
                        debug!(sink = %name, reason, error = %detail, "still cannot connect to the upstream broker");
                    }
                    outage_reported = true;
                    connected = false;
                    drain_deadline = None;
                    renew_at = None;
                    tracker.pause(false);
                    set_credentials(&mut conn, &s.credentials, &name);
                    retry_at = Some(Instant::now() + backoff.next_delay());
                }
            },
        }
    }
    info!(sink = %name, waiting = waiting.len(), "MQTT sink stopped");
}

/// Puts the credentials for the next connect in place (a fresh SAS token for Azure).
fn set_credentials(conn: &mut Conn, credentials: &Credentials, name: &str) {
    match credentials {
        Credentials::None => {}
        Credentials::Password { username, password } => {
            conn.set_credentials(username, password.as_deref().unwrap_or(""));
        }
        Credentials::AzureSas {
            username,
            resource,
            key,
            ttl,
        } => match azure::sas_token(resource, key, unix_now() + ttl.as_secs()) {
            Ok(token) => conn.set_credentials(username, &token),
            // Checked at start; the key cannot have changed since.
            Err(error) => warn!(sink = %name, %error, "cannot sign a SAS token"),
        },
    }
}
