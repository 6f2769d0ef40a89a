//! The MQTT source: subscribes to topic filters on a broker and turns each publish
//! into an [`Input`].
//!
//! QoS 1 readings are acknowledged late: manual acks are on, and the PUBACK is sent
//! only when the pipeline runs the input's [`Ack`] after the store commit. With
//! `clean_session = false` the broker keeps everything unacknowledged (and anything
//! published while the agent is away) and delivers it again on reconnect.
//!
//! Three rules from rumqttc's behaviour shape this file:
//! - acks go through a separate task (`acker`): awaiting `client.ack()` from the task
//!   that polls the event loop can deadlock; acks are sent in arrival order because
//!   the pipeline runs them in that order;
//! - an ack goes out only on the connection its publish came on ([`AckGate`]):
//!   rumqttc keeps requests queued across a reconnect, and a PUBACK for a packet id
//!   of the old connection, sent on the new one, would acknowledge whatever the
//!   broker now sends under that id (after a lost session, ids start again at 1).
//!   The broker sends those publishes again with DUP set, and the commit task
//!   recognises them ([`crate::redelivery`]); to let it, every delivery carries its
//!   packet id, a digest of topic and payload, its DUP flag and its connection,
//!   and the source reports each PUBACK written and each session the broker lost;
//! - `poll()` after an error reconnects at once, so every error is followed by a
//!   jittered backoff sleep;
//! - subscriptions are (re)sent on every ConnAck, since a restarted broker may have
//!   lost the session.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_rules::Action;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Outgoing, Packet, Publish,
    QoS, StateError, SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Ack, Inlet, Input, Origin, Payload};
use crate::backoff::Backoff;
use crate::config::{problem, BackoffConfig, Bytes, Dur, Problem};
use crate::decode::DeviceTemplate;
use crate::ratelimit::RateLimit;
use crate::redelivery::{Delivery, Event as AckEvent, Feed, Key};
use crate::tls::TlsConfig;

/// `[[source.mqtt]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// The source's name (in CloudEvents `source`: `/ferry/{agent}/mqtt/{name}`).
    pub name: String,
    /// Broker URL: `mqtt://host:port` (default port 1883) or `mqtts://host:port`
    /// (TLS, default port 8883, verified with the Mozilla root store).
    pub url: String,
    /// Topic filters to subscribe to; `+` and `#` wildcards work.
    pub topics: Vec<String>,
    /// 0 (at most once) or 1 (at least once: acknowledged after the store commit,
    /// persistent session). Default 1.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// MQTT client id; must be stable for the broker to keep the session.
    /// Default `ferry-{agent.id}-{name}`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Username, if the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (trailing newline ignored). Needs `username`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// For `mqtts://`: a private CA to trust and a client certificate to present.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Where the device id comes from: `{topic.N}` (N-th topic segment, from 0),
    /// `{payload.field}` (a field of the JSON payload, dots for nesting), mixed with
    /// literal text. Default `{topic.1}` (`sensors/<device>/...`).
    #[serde(default = "default_device")]
    pub device: String,
    /// Top-level payload field holding the reading's time (RFC 3339). Taken out of
    /// the fields when it parses; otherwise the receive time is used. Default `time`.
    #[serde(default = "default_time_field")]
    pub time_field: Option<String>,
    /// Largest payload accepted; larger ones are counted (`oversize`), logged and
    /// acknowledged so they are not redelivered forever. Default 256KiB. Packets
    /// over max(4 x this, 1MiB) are refused by the MQTT client itself, which drops
    /// the connection: keep the broker's own limit (mosquitto `message_size_limit`) below that.
    #[serde(default = "default_max_payload")]
    pub max_payload: Bytes,
    /// How many QoS 1 publishes the broker sends this client before it waits for
    /// their PUBACKs (mosquitto `max_inflight_messages`, 20 by default; EMQX 32;
    /// HiveMQ 10). A commit starts as soon as this many readings of the source
    /// wait for it, instead of lingering (`store.commit_linger`) while the broker
    /// waits too. Lower than the broker's only costs a few more commits; higher
    /// stalls a busy source for the linger on every commit. Default 10.
    #[serde(default = "default_broker_inflight")]
    pub broker_inflight: usize,
    /// MQTT keep-alive interval. Default 30s.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: Dur,
    /// Reconnect backoff bounds. Default `{ min = "500ms", max = "30s" }`.
    #[serde(default = "default_reconnect")]
    pub reconnect: BackoffConfig,
}

fn default_qos() -> u8 {
    1
}
fn default_device() -> String {
    "{topic.1}".to_string()
}
fn default_time_field() -> Option<String> {
    Some("time".to_string())
}
fn default_max_payload() -> Bytes {
    Bytes(256 * 1024)
}
fn default_broker_inflight() -> usize {
    10
}

fn default_keep_alive() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_reconnect() -> BackoffConfig {
    BackoffConfig::new(Duration::from_millis(500), Duration::from_secs(30))
}

/// Where to connect, parsed from `url`.
#[derive(Debug, Clone, PartialEq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl MqttSourceConfig {
    pub fn broker(&self) -> Result<Broker, String> {
        let u =
            url::Url::parse(&self.url).map_err(|e| format!("invalid url {:?}: {e}", self.url))?;
        let tls = match u.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            s => return Err(format!("url scheme must be mqtt or mqtts, not {s:?}")),
        };
        if !u.username().is_empty() || u.password().is_some() {
            return Err(
                "credentials do not belong in the url (they would be logged); use username and password_file"
                    .to_string(),
            );
        }
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("url {:?} has no host", self.url))?
            .to_string();
        Ok(Broker {
            host,
            port: u.port().unwrap_or(if tls { 8883 } else { 1883 }),
            tls,
        })
    }

    pub fn validate(&self, i: usize) -> Vec<Problem> {
        let mut out = Vec::new();
        let n = &self.name;
        if let Err(e) = self.broker() {
            out.push(problem!(["source", "mqtt", i, "url"], "source {n:?}: {e}"));
        }
        if self.topics.is_empty() {
            out.push(problem!(
                ["source", "mqtt", i, "topics"],
                "source {n:?}: topics is empty"
            ));
        }
        for (t, topic) in self.topics.iter().enumerate() {
            if !rumqttc::valid_filter(topic) {
                out.push(problem!(
                    ["source", "mqtt", i, "topics", t],
                    "source {n:?}: {topic:?} is not a valid topic filter"
                ));
            }
        }
        if self.qos > 1 {
            out.push(problem!(
                ["source", "mqtt", i, "qos"],
                "source {n:?}: qos must be 0 or 1"
            ));
        }
        if let Some(tls) = &self.tls {
            if self.broker().is_ok_and(|b| !b.tls) {
                out.push(problem!(
                    ["source", "mqtt", i, "tls"],
                    "source {n:?}: tls settings need an mqtts:// url"
                ));
            }
            if let Err(e) = tls.check() {
                out.push(problem!(["source", "mqtt", i, "tls"], "source {n:?}: {e}"));
            }
        }
        if let Err(e) = DeviceTemplate::parse(&self.device) {
            out.push(problem!(
                ["source", "mqtt", i, "device"],
                "source {n:?}: {e}"
            ));
        }
        if !(1..=16 * 1024 * 1024).contains(&self.max_payload.0) {
            out.push(problem!(
                ["source", "mqtt", i, "max_payload"],
                "source {n:?}: max_payload must be between 1 byte and 16MiB"
            ));
        }
        if self.client_id.as_deref() == Some("") {
            out.push(problem!(
                ["source", "mqtt", i, "client_id"],
                "source {n:?}: client_id must not be empty"
            ));
        }
        if self.password_file.is_some() && self.username.is_none() {
            out.push(problem!(
                ["source", "mqtt", i, "password_file"],
                "source {n:?}: password_file needs a username"
            ));
        }
        // MQTT carries keep-alive as whole seconds in 16 bits: a fraction would be
        // cut off on the wire and 65536s would wrap to 0 (no keep-alive at all).
        let keep_alive = self.keep_alive.0;
        if !(Duration::from_secs(1)..=Duration::from_secs(u64::from(u16::MAX)))
            .contains(&keep_alive)
            || keep_alive.subsec_nanos() != 0
        {
            out.push(problem!(
                ["source", "mqtt", i, "keep_alive"],
                "source {n:?}: keep_alive must be whole seconds from 1s to 65535s"
            ));
        }
        // MQTT packet ids are 16 bits: no broker has more in flight to one client.
        if !(1..=usize::from(u16::MAX)).contains(&self.broker_inflight) {
            out.push(problem!(
                ["source", "mqtt", i, "broker_inflight"],
                "source {n:?}: broker_inflight must be from 1 to 65535"
            ));
        }
        out.extend(self.reconnect.validate(&[
            "source".into(),
            "mqtt".into(),
            i.into(),
            "reconnect".into(),
        ]));
        out
    }

    fn qos(&self) -> QoS {
        if self.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        }
    }

    /// The hard packet limit of the MQTT client (see `max_payload`).
    fn max_packet(&self) -> usize {
        (self.max_payload.0 as usize)
            .saturating_mul(4)
            .max(1024 * 1024)
    }
}

/// Everything the source task needs, resolved at start-up.
pub struct MqttSource {
    pub cfg: MqttSourceConfig,
    pub client_id: String,
    pub password: Option<String>,
    /// Used for `mqtts://`: built at start from `cfg.tls` (files read then).
    pub tls: Arc<rustls::ClientConfig>,
    pub origin: Arc<Origin>,
    /// Where PUBACKs written and sessions lost are reported to the commit task.
    pub feed: Arc<Feed>,
}

impl MqttSource {
    fn options(&self) -> Result<MqttOptions, String> {
        let broker = self.cfg.broker()?;
        let mut o = MqttOptions::new(&self.client_id, &broker.host, broker.port);
        o.set_keep_alive(self.cfg.keep_alive.0)
            // QoS 1 needs the broker to keep the session while we are away; an empty
            // client id would make rumqttc panic here, which config validation prevents.
            .set_clean_session(self.cfg.qos == 0)
            .set_manual_acks(true)
            .set_max_packet_size(self.cfg.max_packet(), 64 * 1024);
        if let Some(user) = &self.cfg.username {
            o.set_credentials(user, self.password.clone().unwrap_or_default());
        }
        if broker.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::clone(&self.tls),
            )));
        }
        Ok(o)
    }

    /// Runs until `cancel`, then waits (bounded) for the PUBACKs of what the pipeline
    /// committed, and disconnects. `actions`, when given, are rule actions to publish
    /// through this connection (local actuation: it needs no uplink).
    pub async fn run(
        self,
        tx: Inlet,
        mut actions: Option<mpsc::Receiver<Action>>,
        cancel: CancellationToken,
    ) {
        let name = self.cfg.name.clone();
        let opts = match self.options() {
            Ok(o) => o,
            Err(error) => {
                // Validation catches this first; never take the other sources down.
                warn!(source = %name, %error, "cannot start MQTT source");
                return;
            }
        };
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        // Unbounded in type, bounded by the protocol: an entry is a committed
        // reading whose PUBACK is not queued to rumqttc yet, and a broker has at
        // most 65535 packet ids unacknowledged to a client (in practice its window,
        // `broker_inflight`), so this holds at most that many 16-byte entries.
        // An ack is run from a synchronous closure after the commit and must not
        // be dropped (the broker would not send that id again on this connection).
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<Pending>();
        let gate = Arc::new(AckGate::default());
        let mut acker = tokio::spawn(acker(client.clone(), Arc::clone(&gate), ack_rx));
        // Connections are counted from 1; publishes carry the count of theirs.
        let mut connection = 0u64;
        let mut backoff = Backoff::new(self.cfg.reconnect);
        let filters: Vec<SubscribeFilter> = self
            .cfg
            .topics
            .iter()
            .map(|t| SubscribeFilter::new(t.clone(), self.cfg.qos()))
            .collect();
        info!(source = %name, url = %loggable_url(&self.cfg.url), client_id = %self.client_id, "MQTT source starting");

        // `Some` while running; taken at shutdown so the pipeline and the acker can end.
        let mut running = Some((tx, ack_tx));
        let mut acks_done = false;
        let mut connected = false;
        // Whether the current outage was logged at warn: once per outage, not per retry.
        let mut outage_reported = false;
        // Connections that drop right after they are made (a packet over the client's
        // limit, redelivered on every reconnect) would otherwise warn every second.
        let mut log_limit = RateLimit::new(3, Duration::from_secs(60));
        let grace = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(grace);
        // Looked up once: a lookup by name and label allocates and hashes, per reading.
        let received = metrics::counter!("ferry_input_received_total", "source" => name.clone());

        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled(), if running.is_some() => {
                    running = None;
                    info!(source = %name, "stopping; acknowledging what was committed");
                    grace.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(5));
                }
                _ = &mut acker, if running.is_none() && !acks_done => {
                    acks_done = true;
                    if client.try_disconnect().is_err() || !connected {
                        break;
                    }
                }
                Some(action) = async { match actions.as_mut() { Some(rx) => rx.recv().await, None => None } }, if running.is_some() => {
                    publish_action(&client, &name, action);
                }
                _ = &mut grace, if running.is_none() => {
                    warn!(source = %name, "gave up waiting for acknowledgements; the broker will redeliver");
                    break;
                }
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        connected = true;
                        outage_reported = false;
                        backoff.reset();
                        connection += 1;
                        gate.open(connection);
                        if !ack.session_present {
                            self.feed.push(AckEvent::SessionLost { connection });
                        }
                        info!(source = %name, session_present = ack.session_present, "connected to broker");
                        if ack.code == ConnectReturnCode::Success && running.is_some() {
                            if let Err(error) = client.try_subscribe_many(filters.clone()) {
                                warn!(source = %name, %error, "cannot queue subscription");
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        for (code, topic) in ack.return_codes.iter().zip(&self.cfg.topics) {
                            if matches!(code, SubscribeReasonCode::Failure) {
                                warn!(source = %name, %topic, "broker refused the subscription");
                            } else {
                                debug!(source = %name, %topic, "subscribed");
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        // While stopping, leave new publishes unacknowledged: the
                        // broker keeps them for the next session.
                        let Some((tx, ack_tx)) = &running else { continue };
                        received.increment(1);
                        let qos1 = p.qos != QoS::AtMostOnce;
                        let ack: Option<Ack> = qos1.then(|| {
                            let ack_tx = ack_tx.clone();
                            let pending = Pending { connection, packet_id: p.pkid, qos: p.qos };
                            Box::new(move || {
                                // The acker ends only after every sender is gone,
                                // so this send fails only at the very end of shutdown.
                                let _ = ack_tx.send(pending);
                            }) as Ack
                        });
                        let delivery = qos1.then(|| Delivery {
                            key: Key::new(p.pkid, &p.topic, &p.payload),
                            dup: p.dup,
                            connection,
                        });
                        let input = Input {
                            origin: Arc::clone(&self.origin),
                            payload: Payload::Raw { topic: p.topic.clone(), bytes: p.payload.to_vec() },
                            received: chrono::Utc::now(),
                            ack,
                            delivery,
                        };
                        // Waiting here is the backpressure: we stop reading the socket.
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            r = tx.send(input) => if r.is_err() { running = None },
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::PubAck(packet_id))) => {
                        self.feed.push(AckEvent::Written { connection, packet_id });
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                        debug!(source = %name, "disconnect sent");
                    }
                    Ok(_) => {}
                    Err(error) => {
                        // rumqttc dropped the PUBACKs it had queued; drop any the
                        // acker queued since, and let no more of this connection's in.
                        gate.close(|| eventloop.clean());
                        if running.is_none() {
                            break;
                        }
                        let reason = disconnect_reason(&error);
                        metrics::counter!("ferry_source_disconnects_total", "source" => name.clone(), "reason" => reason).increment(1);
                        let loud = connected || !outage_reported;
                        match log_limit.check(std::time::Instant::now()).filter(|_| loud) {
                            Some(suppressed) if connected => {
                                warn!(source = %name, reason, %error, suppressed, "lost the broker; reconnecting with backoff");
                            }
                            // Also the place a wrong password or an unreachable broker
                            // shows up first: say it loudly, once.
                            Some(suppressed) => {
                                warn!(source = %name, reason, %error, suppressed, "cannot connect to the broker; retrying with backoff");
                            }
                            None => debug!(source = %name, reason, %error, "still cannot connect to the broker"),
                        }
                        outage_reported = true;
                        connected = false;
                        let delay = backoff.next_delay();
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                },
            }
        }
        // The acker may still hold acks: with the event loop gone they can only be dropped.
        gate.close(|| {});
        info!(source = %name, "MQTT source stopped");
    }
}

/// Which connection PUBACKs may go out on: the current one, or none between
/// connections. An ack is queued to rumqttc under the gate's lock, and closing the
/// gate clears rumqttc's queue of PUBACKs under the same lock, so no PUBACK of one
/// connection can be written on the next.
#[derive(Debug, Default)]
struct AckGate(Mutex<u64>);

/// What [`AckGate::offer`] did with an ack.
#[derive(Debug, PartialEq, Eq)]
enum Offered {
    Queued,
    /// Its connection is gone: the broker sends the publish again.
    Stale,
    /// rumqttc's request queue is full: offer it again shortly.
    Busy,
}

impl AckGate {
    /// PUBACKs of `connection` may go out (0 is no connection).
    fn open(&self, connection: u64) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = connection;
    }

    /// No PUBACK may go out until the next [`AckGate::open`]; `clear` runs under
    /// the lock to remove what is already queued.
    fn close(&self, clear: impl FnOnce()) {
        let mut current = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *current = 0;
        clear();
    }

    /// Queues an ack of `connection` with `queue` if that connection is current.
    fn offer<E>(&self, connection: u64, queue: impl FnOnce() -> Result<(), E>) -> Offered {
        let current = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if *current != connection || connection == 0 {
            return Offered::Stale;
        }
        match queue() {
            Ok(()) => Offered::Queued,
            Err(_) => Offered::Busy,
        }
    }
}

/// The `reason` label of `ferry_source_disconnects_total` for an event-loop error.
fn disconnect_reason(error: &ConnectionError) -> &'static str {
    match error {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_),
        )) => "packet_too_large",
        ConnectionError::MqttState(StateError::Io(_) | StateError::ConnectionAborted)
        | ConnectionError::Io(_) => "io",
        ConnectionError::NetworkTimeout
        | ConnectionError::FlushTimeout
        | ConnectionError::MqttState(StateError::AwaitPingResp) => "timeout",
        ConnectionError::Tls(_) => "tls",
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
        ) => "auth",
        ConnectionError::ConnectionRefused(_) => "refused",
        ConnectionError::RequestsDone => "closed",
        ConnectionError::MqttState(_) | ConnectionError::NotConnAck(_) => "protocol",
    }
}

/// The broker URL as it may be logged: without credentials, query or fragment,
/// which could carry secrets.
fn loggable_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            // Both fail only for URLs that cannot have credentials; nothing to strip.
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "(invalid url)".to_string(),
    }
}

/// Queues a rule action's publish. Non-blocking (`try_publish`): this runs in the
/// task that polls the event loop, which must never wait on the request channel.
fn publish_action(client: &AsyncClient, source: &str, action: Action) {
    let Action::MqttPublish {
        rule,
        topic,
        payload,
        qos,
        retain,
    } = action
    else {
        // The pipeline routes only publishes here.
        debug!(%source, rule = %action.rule(), "not a publish; ignored");
        return;
    };
    let qos = if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    match client.try_publish(&topic, qos, retain, payload) {
        Ok(()) => {
            metrics::counter!("ferry_actions_sent_total", "rule" => rule.clone()).increment(1);
            debug!(%source, %rule, %topic, "rule action published");
        }
        Err(error) => {
            metrics::counter!("ferry_actions_dropped_total", "reason" => "queue_full").increment(1);
            warn!(%source, %rule, %topic, %error, "rule action could not be queued");
        }
    }
}

/// A PUBACK the pipeline released and the acker has yet to queue: what it takes
/// and no more. Holding the publish itself would keep its payload, and the read
/// buffer the payload is a slice of, alive until the PUBACK is written.
#[derive(Debug, Clone, Copy)]
struct Pending {
    connection: u64,
    packet_id: u16,
    qos: QoS,
}

/// Sends PUBACKs in the order the pipeline committed the readings, each only on
/// the connection its publish came on.
async fn acker(client: AsyncClient, gate: Arc<AckGate>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    while let Some(Pending {
        connection,
        packet_id,
        qos,
    }) = rx.recv().await
    {
        // rumqttc acknowledges a publish by its packet id and QoS.
        let mut p = Publish::new("", qos, Vec::<u8>::new());
        p.pkid = packet_id;
        loop {
            match gate.offer(connection, || client.try_ack(&p)) {
                Offered::Queued => break,
                Offered::Stale => {
                    debug!(
                        packet_id = p.pkid,
                        "connection gone before the PUBACK; the broker will redeliver"
                    );
                    break;
                }
                // Not waiting on the queue under the lock: the event loop drains
                // it, and closing the gate needs the lock.
                Offered::Busy => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> MqttSourceConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn the_broker_port_defaults_by_scheme() {
        let c = cfg("name='a'\nurl='mqtt://broker'\ntopics=['x']");
        assert_eq!(
            c.broker().unwrap(),
            Broker {
                host: "broker".into(),
                port: 1883,
                tls: false
            }
        );
        let c = cfg("name='a'\nurl='mqtts://broker'\ntopics=['x']");
        assert_eq!(c.broker().unwrap().port, 8883);
    }

    #[test]
    fn credentials_in_the_url_are_refused_so_they_are_never_logged() {
        let c = cfg("name='a'\nurl='mqtt://u:secret@broker'\ntopics=['x']");
        let err = c.broker().unwrap_err();
        assert!(err.contains("password_file"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn defaults_are_qos1_and_device_from_the_second_topic_segment() {
        let c = cfg("name='a'\nurl='mqtt://b:1'\ntopics=['x']");
        assert_eq!(c.qos, 1);
        assert_eq!(c.device, "{topic.1}");
        assert!(c.validate(0).is_empty());
    }

    #[test]
    fn a_packet_over_the_client_limit_is_told_apart_from_other_disconnects() {
        use rumqttc::mqttbytes::Error as Bytes;
        let io = || std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let cases = [
            (
                ConnectionError::MqttState(StateError::Deserialization(
                    Bytes::PayloadSizeLimitExceeded(2 << 20),
                )),
                "packet_too_large",
            ),
            (
                ConnectionError::MqttState(StateError::Deserialization(Bytes::InvalidQoS(3))),
                "protocol",
            ),
            (ConnectionError::Io(io()), "io"),
            (ConnectionError::MqttState(StateError::Io(io())), "io"),
            (
                ConnectionError::MqttState(StateError::ConnectionAborted),
                "io",
            ),
            (ConnectionError::NetworkTimeout, "timeout"),
            (
                ConnectionError::MqttState(StateError::AwaitPingResp),
                "timeout",
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
                "auth",
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable),
                "refused",
            ),
            (
                ConnectionError::MqttState(StateError::WrongPacket),
                "protocol",
            ),
        ];
        for (error, reason) in cases {
            assert_eq!(disconnect_reason(&error), reason, "{error}");
        }
    }

    #[test]
    fn the_logged_url_has_no_query_fragment_or_credentials() {
        assert_eq!(
            loggable_url("mqtts://u:pw@broker.example:8883/?token=secret#frag"),
            "mqtts://broker.example:8883/"
        );
        assert_eq!(
            loggable_url("mqtt://127.0.0.1:1883"),
            "mqtt://127.0.0.1:1883"
        );
    }

    #[test]
    fn an_ack_goes_out_on_the_connection_its_publish_came_on() {
        let gate = AckGate::default();
        gate.open(3);
        assert_eq!(gate.offer(3, || Ok::<(), ()>(())), Offered::Queued);
    }

    #[test]
    fn an_ack_of_a_previous_connection_is_dropped_on_the_next() {
        let gate = AckGate::default();
        gate.open(1);
        gate.close(|| {});
        gate.open(2);
        let mut queued = false;
        let offered = gate.offer(1, || {
            queued = true;
            Ok::<(), ()>(())
        });
        assert_eq!(offered, Offered::Stale);
        assert!(!queued, "nothing may reach the client's queue");
    }

    #[test]
    fn no_ack_goes_out_between_connections() {
        let gate = AckGate::default();
        gate.open(1);
        let mut cleared = false;
        gate.close(|| cleared = true);
        assert!(cleared, "closing clears what is queued");
        assert_eq!(gate.offer(1, || Ok::<(), ()>(())), Offered::Stale);
        assert_eq!(gate.offer(0, || Ok::<(), ()>(())), Offered::Stale);
    }

    #[test]
    fn an_ack_that_finds_the_client_queue_full_is_offered_again() {
        let gate = AckGate::default();
        gate.open(1);
        assert_eq!(gate.offer(1, || Err(())), Offered::Busy);
    }

    #[test]
    fn invalid_settings_are_all_reported() {
        let c = cfg(
            "name='a'\nurl='http://b'\ntopics=['a/#/b']\nqos=2\ndevice='{x}'\npassword_file='p'",
        );
        let msgs: Vec<String> = c.validate(0).into_iter().map(|p| p.message).collect();
        assert_eq!(msgs.len(), 5, "{msgs:#?}");
    }
}
