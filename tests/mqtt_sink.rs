//! The MQTT sink's publisher against real brokers: a mosquitto on a free loopback
//! port (MQTT 5 and 3.1.1, TLS with client certificates, passwords) and a small
//! fake broker that holds back PUBACKs or drops the connection mid-batch.
//!
//! `Publisher::publish` must return only when every message of its batch has its
//! PUBACK: that is what lets the sink's cursor move past an event.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use ferry_agent::config::BackoffConfig;
use ferry_agent::sinks::mqtt::config::Broker;
use ferry_agent::sinks::mqtt::{
    Binder, CloudEventView, Credentials, Message, MqttSinkConfig, Properties, Protocol,
    PublishError, Publisher, Settings,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rumqttc::v5;
use support::{eventually, Mosquitto};
use tokio_util::sync::CancellationToken;

/// A reading as the forwarding loop would hand it over.
struct Reading {
    seq: u64,
    device: String,
    data: serde_json::Value,
}

impl CloudEventView for Reading {
    fn attributes(&self) -> Vec<(String, String)> {
        [
            ("specversion", "1.0".to_string()),
            ("id", format!("ep-{}", self.seq)),
            ("source", "/ferry/gw-9/mqtt/local".to_string()),
            ("type", "io.ferry.reading".to_string()),
            ("subject", self.device.clone()),
            ("time", "2026-01-02T03:04:05Z".to_string()),
            ("sequence", self.seq.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
    fn datacontenttype(&self) -> String {
        "application/json".to_string()
    }
    fn data(&self) -> Vec<u8> {
        serde_json::to_vec(&self.data).unwrap()
    }
    fn structured(&self) -> Vec<u8> {
        let mut v: serde_json::Map<String, serde_json::Value> = self
            .attributes()
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        v.insert("datacontenttype".into(), "application/json".into());
        v.insert("data".into(), self.data.clone());
        serde_json::to_vec(&v).unwrap()
    }
}

fn reading(seq: u64) -> Reading {
    Reading {
        seq,
        device: format!("dev-{}", seq % 3),
        data: serde_json::json!({ "seq": seq, "t": 20.5 }),
    }
}

fn config(text: &str) -> MqttSinkConfig {
    toml::from_str(text).unwrap()
}

fn start(cfg: &MqttSinkConfig) -> (Publisher, Binder, CancellationToken) {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    assert!(cfg.validate(0).is_empty(), "{:?}", cfg.validate(0));
    let settings = Settings::from_config(cfg, "gw-9", &|p: &Path| p.to_path_buf()).unwrap();
    let cancel = CancellationToken::new();
    let (publisher, _task) = Publisher::start(settings, cancel.clone());
    (publisher, Binder::new(cfg, "gw-9").unwrap(), cancel)
}

fn messages(binder: &Binder, seqs: std::ops::Range<u64>) -> Vec<Message> {
    seqs.map(|s| binder.message(&reading(s)).unwrap()).collect()
}

/// An MQTT 5 client reading everything published on the broker, with properties.
struct Upstream {
    received: Arc<Mutex<Vec<v5::mqttbytes::v5::Publish>>>,
    cancel: CancellationToken,
}

impl Upstream {
    async fn subscribe(broker: &Mosquitto) -> Upstream {
        let opts = v5::MqttOptions::new("upstream-reader", "127.0.0.1", broker.port());
        let (client, mut eventloop) = v5::AsyncClient::new(opts, 16);
        client
            .subscribe("#", v5::mqttbytes::QoS::AtLeastOnce)
            .await
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let sink = received.clone();
        let stop = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    ev = eventloop.poll() => match ev {
                        Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::SubAck(_))) => {
                            if let Some(tx) = subscribed_tx.take() { let _ = tx.send(()); }
                        }
                        Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::Publish(p))) => {
                            sink.lock().unwrap().push(p);
                        }
                        Ok(_) => {}
                        Err(e) => panic!("upstream reader lost the broker: {e}"),
                    },
                }
            }
        });
        subscribed.await.unwrap();
        Upstream { received, cancel }
    }

    async fn wait_for(&self, n: usize) -> Vec<v5::mqttbytes::v5::Publish> {
        for _ in 0..1000 {
            let got = self.received.lock().unwrap().clone();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "only {} of {n} messages arrived",
            self.received.lock().unwrap().len()
        );
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn user_property<'a>(p: &'a v5::mqttbytes::v5::Publish, name: &str) -> Option<&'a str> {
    p.properties
        .as_ref()?
        .user_properties
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The topics of the PUBLISHes the broker received from `client`, in order, once
/// its log shows `n` of them (the log is read from its pipe by another thread).
fn received_topics(broker: &Mosquitto, client: &str, n: usize) -> Vec<String> {
    let needle = format!("Received PUBLISH from {client} (");
    eventually(&format!("{n} publishes in the broker's log"), || {
        let topics: Vec<String> = broker
            .log()
            .lines()
            .filter(|l| l.contains(&needle))
            .filter_map(|l| l.split('\'').nth(1).map(str::to_string))
            .collect();
        if topics.len() >= n {
            Ok(topics)
        } else {
            Err(format!("{} so far", topics.len()))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_the_upstream_broker_in_order_with_binary_mode_properties_on_mqtt5() {
    let broker = Mosquitto::start();
    let upstream = Upstream::subscribe(&broker).await;
    let cfg = config(&format!(
        "name = 'up'\nurl = '{}'\ntopic = 'ferry/{{agent}}/{{source_kind}}/{{subject}}'\nmax_in_flight = 4",
        broker.url()
    ));
    let (publisher, binder, cancel) = start(&cfg);
    publisher
        .publish(messages(&binder, 1..51))
        .await
        .expect("every message acknowledged");
    publisher
        .publish(messages(&binder, 51..61))
        .await
        .expect("every message acknowledged");

    let got = upstream.wait_for(60).await;
    let seqs: Vec<String> = got
        .iter()
        .map(|p| user_property(p, "sequence").unwrap().to_string())
        .collect();
    let expected: Vec<String> = (1..61).map(|s| s.to_string()).collect();
    assert_eq!(seqs, expected, "in store order, each once");
    let first = &got[0];
    assert_eq!(&first.topic[..], b"ferry/gw-9/mqtt/dev-1");
    let props = first.properties.as_ref().unwrap();
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    for (name, value) in [
        ("specversion", "1.0"),
        ("id", "ep-1"),
        ("source", "/ferry/gw-9/mqtt/local"),
        ("type", "io.ferry.reading"),
        ("subject", "dev-1"),
        ("time", "2026-01-02T03:04:05Z"),
    ] {
        assert_eq!(user_property(first, name), Some(value), "{name}");
    }
    assert_eq!(user_property(first, "datacontenttype"), None);
    let data: serde_json::Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(data, serde_json::json!({"seq": 1, "t": 20.5}));
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_sends_the_whole_event_in_structured_mode() {
    let broker = Mosquitto::start();
    let upstream = Upstream::subscribe(&broker).await;
    let cfg = config(&format!(
        "name = 'up'\nurl = '{}'\nprotocol = '3.1.1'\ntopic = 'events/{{type}}'",
        broker.url()
    ));
    let (publisher, binder, cancel) = start(&cfg);
    publisher.publish(messages(&binder, 7..8)).await.unwrap();
    let got = upstream.wait_for(1).await;
    assert_eq!(&got[0].topic[..], b"events/io.ferry.reading");
    let event: serde_json::Value = serde_json::from_slice(&got[0].payload).unwrap();
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["id"], "ep-7");
    assert_eq!(event["subject"], "dev-1");
    assert_eq!(event["datacontenttype"], "application/json");
    assert_eq!(event["data"], serde_json::json!({"seq": 7, "t": 20.5}));
    // MQTT 3.1.1 carries no properties at all.
    assert!(got[0]
        .properties
        .as_ref()
        .is_none_or(|p| p.user_properties.is_empty() && p.content_type.is_none()));
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_on_mqtt5_says_so_in_the_content_type() {
    let broker = Mosquitto::start();
    let upstream = Upstream::subscribe(&broker).await;
    let cfg = config(&format!(
        "name = 'up'\nurl = '{}'\nmode = 'structured'",
        broker.url()
    ));
    let (publisher, binder, cancel) = start(&cfg);
    publisher.publish(messages(&binder, 1..2)).await.unwrap();
    let got = upstream.wait_for(1).await;
    let props = got[0].properties.as_ref().unwrap();
    assert_eq!(
        props.content_type.as_deref(),
        Some("application/cloudevents+json")
    );
    assert!(props.user_properties.is_empty());
    let event: serde_json::Value = serde_json::from_slice(&got[0].payload).unwrap();
    assert_eq!(event["id"], "ep-1");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_is_refused_for_good_and_the_next_ones_arrive() {
    // The broker would disconnect on anything over 2000 bytes; the sink never sends it.
    let broker = Mosquitto::start_with("message_size_limit 2000");
    let upstream = Upstream::subscribe(&broker).await;
    let cfg = config(&format!(
        "name = 'up'\nurl = '{}'\nmax_message = '1KiB'",
        broker.url()
    ));
    let (publisher, binder, cancel) = start(&cfg);
    let big = Reading {
        seq: 1,
        device: "dev-1".into(),
        data: serde_json::json!({ "blob": "x".repeat(4000) }),
    };
    let big = binder.message(&big).unwrap();
    assert!(publisher.message_len(&big) > publisher.max_message());
    let err = publisher.publish(vec![big]).await.unwrap_err();
    assert!(
        matches!(err, PublishError::TooLarge { index: 0, .. }),
        "{err}"
    );
    assert!(err.is_permanent());
    publisher.publish(messages(&binder, 2..5)).await.unwrap();
    let got = upstream.wait_for(3).await;
    let seqs: Vec<&str> = got
        .iter()
        .map(|p| user_property(p, "sequence").unwrap())
        .collect();
    assert_eq!(seqs, ["2", "3", "4"]);
    assert_eq!(received_topics(&broker, "ferry-gw-9-up", 3).len(), 3);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_mqtt5_brokers_own_packet_limit_is_refused_before_it_is_sent() {
    // max_message is left at 256KiB; the broker announces 2000 bytes in its CONNACK.
    let broker = Mosquitto::start_with("max_packet_size 2000");
    let upstream = Upstream::subscribe(&broker).await;
    let cfg = config(&format!("name = 'up'\nurl = '{}'", broker.url()));
    let (publisher, binder, cancel) = start(&cfg);
    publisher.publish(messages(&binder, 1..2)).await.unwrap();
    let big = Reading {
        seq: 2,
        device: "dev-2".into(),
        data: serde_json::json!({ "blob": "x".repeat(4000) }),
    };
    let err = publisher
        .publish(vec![binder.message(&big).unwrap()])
        .await
        .unwrap_err();
    assert!(
        matches!(err, PublishError::TooLarge { max: 2000, .. }),
        "{err}"
    );
    publisher.publish(messages(&binder, 3..5)).await.unwrap();
    let got = upstream.wait_for(3).await;
    let seqs: Vec<&str> = got
        .iter()
        .map(|p| user_property(p, "sequence").unwrap())
        .collect();
    assert_eq!(seqs, ["1", "3", "4"]);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_published_while_the_broker_is_down_arrives_in_order_once_it_is_back() {
    let mut broker = Mosquitto::start();
    let cfg = config(&format!(
        "name = 'up'\nurl = '{}'\nprotocol = '3.1.1'\ntopic = 'seq/{{subject}}'\n\
         reconnect = {{ min = '50ms', max = '200ms' }}\ntimeout = '60s'",
        broker.url()
    ));
    let (publisher, binder, cancel) = start(&cfg);
    // Connected once, then the broker goes away.
    publisher.publish(messages(&binder, 0..1)).await.unwrap();
    broker.kill();
    let batch: Vec<Message> = (1..21)
        .map(|s| {
            let mut m = binder.message(&reading(s)).unwrap();
            m.topic = format!("seq/{s}");
            m
        })
        .collect();
    let pending = tokio::spawn({
        let publisher = publisher.clone();
        async move { publisher.publish(batch).await }
    });
    broker.restart();
    pending
        .await
        .unwrap()
        .expect("every message acknowledged by the new broker");
    let topics = received_topics(&broker, "ferry-gw-9-up", 20);
    let expected: Vec<String> = (1..21).map(|s| format!("seq/{s}")).collect();
    assert_eq!(topics, expected);
    cancel.cancel();
}

// ---------------------------------------------------------------------------------
// A fake MQTT 3.1.1 broker: acknowledges only what the test allows, and can drop
// the first connection after some publishes.
// ---------------------------------------------------------------------------------

struct FakeBroker {
    port: u16,
    /// (connection number from 0, packet id, topic) of every PUBLISH received.
    publishes: Arc<Mutex<Vec<(usize, u16, String)>>>,
    /// (username, password) of every CONNECT from our client.
    logins: Arc<Mutex<Vec<(String, String)>>>,
    /// PUBACKs the broker may send in all (in the order the publishes came).
    allowed_acks: Arc<AtomicUsize>,
    acks_sent: Arc<AtomicUsize>,
}

/// How the fake broker behaves.
#[derive(Clone, Copy)]
struct Behaviour {
    /// Only this client is served: a stray client of another test that finds the
    /// port (a recycled one) is turned away.
    client_id: &'static str,
    /// Close the first connection once it has received this many publishes
    /// (before acknowledging the last of them).
    drop_first_after: Option<usize>,
    /// Wait this long before answering a CONNECT (a slow handshake).
    connack_delay: Duration,
}

impl Behaviour {
    fn new(client_id: &'static str) -> Behaviour {
        Behaviour {
            client_id,
            drop_first_after: None,
            connack_delay: Duration::ZERO,
        }
    }
}

impl FakeBroker {
    fn start(behaviour: Behaviour) -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let fake = FakeBroker {
            port,
            publishes: Arc::new(Mutex::new(Vec::new())),
            logins: Arc::new(Mutex::new(Vec::new())),
            allowed_acks: Arc::new(AtomicUsize::new(0)),
            acks_sent: Arc::new(AtomicUsize::new(0)),
        };
        let shared = fake.clone_handles();
        std::thread::spawn(move || {
            let mut connections = 0;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                if serve(stream, behaviour, connections, &shared) {
                    connections += 1;
                }
            }
        });
        fake
    }

    fn clone_handles(&self) -> FakeBroker {
        FakeBroker {
            port: self.port,
            publishes: self.publishes.clone(),
            logins: self.logins.clone(),
            allowed_acks: self.allowed_acks.clone(),
            acks_sent: self.acks_sent.clone(),
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn publishes(&self) -> Vec<(usize, u16, String)> {
        self.publishes.lock().unwrap().clone()
    }

    fn logins(&self) -> Vec<(String, String)> {
        self.logins.lock().unwrap().clone()
    }

    fn allow_acks(&self, n: usize) {
        self.allowed_acks.store(n, Ordering::SeqCst);
    }
}

/// Serves one connection; true if it was our client's.
fn serve(mut stream: TcpStream, behaviour: Behaviour, conn: usize, fake: &FakeBroker) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let drop_after = if conn == 0 {
        behaviour.drop_first_after
    } else {
        None
    };
    let (allowed, sent) = (&fake.allowed_acks, &fake.acks_sent);
    let mut ours = false;
    let mut buf = BytesMut::new();
    let mut held: Vec<u16> = Vec::new();
    let mut on_this_conn = 0;
    let mut chunk = [0u8; 4096];
    loop {
        // Release what the test allows, in arrival order.
        while !held.is_empty() && sent.load(Ordering::SeqCst) < allowed.load(Ordering::SeqCst) {
            let pkid = held.remove(0);
            let mut out = BytesMut::new();
            rumqttc::PubAck::new(pkid).write(&mut out).unwrap();
            if stream.write_all(&out).is_err() {
                return ours;
            }
            sent.fetch_add(1, Ordering::SeqCst);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return ours,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return ours,
        }
        loop {
            let packet = match rumqttc::Packet::read(&mut buf, 1 << 20) {
                Ok(p) => p,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => panic!("fake broker cannot parse: {e}"),
            };
            let mut out = BytesMut::new();
            match packet {
                rumqttc::Packet::Connect(c) => {
                    if c.client_id != behaviour.client_id {
                        return false;
                    }
                    ours = true;
                    if let Some(login) = c.login {
                        fake.logins
                            .lock()
                            .unwrap()
                            .push((login.username, login.password));
                    }
                    std::thread::sleep(behaviour.connack_delay);
                    rumqttc::ConnAck::new(rumqttc::ConnectReturnCode::Success, false)
                        .write(&mut out)
                        .unwrap();
                }
                rumqttc::Packet::PingReq => {
                    rumqttc::PingResp.write(&mut out).unwrap();
                }
                rumqttc::Packet::Publish(p) => {
                    fake.publishes
                        .lock()
                        .unwrap()
                        .push((conn, p.pkid, p.topic.clone()));
                    on_this_conn += 1;
                    if drop_after == Some(on_this_conn) {
                        return ours;
                    }
                    held.push(p.pkid);
                }
                _ => {}
            }
            if !out.is_empty() && stream.write_all(&out).is_err() {
                return ours;
            }
        }
    }
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn numbered(binder: &Binder, seqs: std::ops::Range<u64>) -> Vec<Message> {
    seqs.map(|s| {
        let mut m = binder.message(&reading(s)).unwrap();
        m.topic = format!("seq/{s}");
        m
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_returns_only_when_every_message_of_the_batch_has_its_puback() {
    let fake = FakeBroker::start(Behaviour::new("fake-every-puback"));
    let cfg = config(&format!(
        "name = 'up'\nurl = '{}'\nprotocol = '3.1.1'\ntimeout = '60s'\nclient_id = 'fake-every-puback'",
        fake.url()
    ));
    let (publisher, binder, cancel) = start(&cfg);
    let pending = tokio::spawn({
        let publisher = publisher.clone();
        let batch = numbered(&binder, 1..4);
        async move { publisher.publish(batch).await }
    });
    until("three publishes at the broker", || {
        fake.publishes().len() == 3
    })
    .await;
    assert!(!pending.is_finished(), "returned before any PUBACK");
    fake.allow_acks(2);
    until("two PUBACKs sent", || {
        fake.acks_sent.load(Ordering::SeqCst) == 2
    })
    .await;
    assert!(!pending.is_finished(), "returned with one PUBACK missing");
    fake.allow_acks(3);
    pending
        .await
        .unwrap()
        .expect("accepted after the last PUBACK");
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_unacknowledged_when_the_broker_goes_away_mid_batch_are_sent_again_in_order() {
    // The first connection acknowledges seq/1 and drops after receiving seq/3.
    let fake = FakeBroker::start(Behaviour {
        drop_first_after: Some(3),
        ..Behaviour::new("fake-mid-batch")
    });
    fake.allow_acks(1);
    let cfg = config(&format!(
        "name = 'up'\nurl = '{}'\nprotocol = '3.1.1'\ntimeout = '60s'\nclient_id = 'fake-mid-batch'\n\
         reconnect = {{ min = '20ms', max = '100ms' }}",
        fake.url()
    ));
    let (publisher, binder, cancel) = start(&cfg);
    let pending = tokio::spawn({
        let publisher = publisher.clone();
        let batch = numbered(&binder, 1..6);
        async move { publisher.publish(batch).await }
    });
    until("the second connection's publishes", || {
        fake.publishes().iter().filter(|p| p.0 == 1).count() >= 4
    })
    .await;
    assert!(!pending.is_finished());
    fake.allow_acks(100);
    pending
        .await
        .unwrap()
        .expect("accepted once all are acknowledged");

    let publishes = fake.publishes();
    let first: Vec<&str> = publishes
        .iter()
        .filter(|p| p.0 == 0)
        .map(|p| p.2.as_str())
        .collect();
    let second: Vec<&str> = publishes
        .iter()
        .filter(|p| p.0 == 1)
        .map(|p| p.2.as_str())
        .collect();
    assert_eq!(first, ["seq/1", "seq/2", "seq/3"]);
    // seq/2 and seq/3 never had a PUBACK: they are sent again, in order, before
    // seq/4 and seq/5. seq/1 was acknowledged, but its PUBACK can be lost with the
    // connection (a reset discards it): then it is sent again too, first.
    let resent: &[&str] = if second.first() == Some(&"seq/1") {
        &["seq/1", "seq/2", "seq/3", "seq/4", "seq/5"]
    } else {
        &["seq/2", "seq/3", "seq/4", "seq/5"]
    };
    assert_eq!(second, resent);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_without_pubacks_times_out_and_says_how_many_were_acknowledged() {
    let fake = FakeBroker::start(Behaviour::new("fake-timeout"));
    fake.allow_acks(2);
    let cfg = config(&format!(
        "name = 'up'\nurl = '{}'\nprotocol = '3.1.1'\ntimeout = '1s'\nclient_id = 'fake-timeout'",
        fake.url()
    ));
    let (publisher, binder, cancel) = start(&cfg);
    let err = publisher
        .publish(numbered(&binder, 1..5))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PublishError::Timeout {
                accepted: 2,
                total: 4,
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.is_permanent());
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_arriving_during_a_slow_handshake_do_not_keep_the_connection_from_coming_up() {
    let fake = FakeBroker::start(Behaviour {
        connack_delay: Duration::from_millis(300),
        ..Behaviour::new("fake-slow-handshake")
    });
    fake.allow_acks(usize::MAX);
    let cfg = config(&format!(
        "name = 'up'\nurl = '{}'\nprotocol = '3.1.1'\ntimeout = '60s'\n\
         client_id = 'fake-slow-handshake'\nusername = 'u'",
        fake.url()
    ));
    let (publisher, binder, cancel) = start(&cfg);
    until("the CONNECT at the broker", || fake.logins().len() == 1).await;
    // Thirty callers while the broker has not answered the CONNECT yet.
    let calls: Vec<_> = (1..31)
        .map(|s| {
            let publisher = publisher.clone();
            let batch = numbered(&binder, s..s + 1);
            tokio::spawn(async move { publisher.publish(batch).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().expect("acknowledged");
    }
    assert_eq!(fake.logins().len(), 1, "the handshake was started over");
    assert!(fake.publishes().iter().all(|p| p.0 == 0));
    assert_eq!(fake.publishes().len(), 30);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_sas_token_is_renewed_by_a_reconnect_that_loses_and_repeats_nothing() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let fake = FakeBroker::start(Behaviour::new("azure-device"));
    fake.allow_acks(usize::MAX);
    let settings = Settings {
        name: "azure".into(),
        protocol: Protocol::V311,
        broker: Broker {
            host: "127.0.0.1".into(),
            port: fake.port,
            tls: false,
        },
        client_id: "azure-device".into(),
        credentials: Credentials::AzureSas {
            username: "h.azure-devices.net/azure-device/?api-version=2021-04-12".into(),
            resource: "h.azure-devices.net/devices/azure-device".into(),
            key: "+XLy+MVZ+aTeOnVzN2kLeB16O+kSxmz6g3rS6fAf6rw=".into(),
            // Renewed after four fifths of it.
            ttl: Duration::from_secs(2),
        },
        tls: None,
        keep_alive: Duration::from_secs(30),
        max_in_flight: 4,
        max_message: 64 * 1024,
        timeout: Duration::from_secs(30),
        reconnect: BackoffConfig::new(Duration::from_millis(50), Duration::from_millis(200)),
    };
    let cancel = CancellationToken::new();
    let (publisher, _task) = Publisher::start(settings, cancel.clone());
    let message = |seq: u64| Message {
        topic: format!("devices/azure-device/messages/events/seq={seq}"),
        payload: b"{}".to_vec(),
        properties: Properties::default(),
    };
    // Publish without pause, across the renewal, and a few more after it.
    let mut seq = 0;
    while fake.logins().len() < 2 {
        seq += 1;
        publisher
            .publish(vec![message(seq), message(seq + 1)])
            .await
            .expect("acknowledged");
        seq += 1;
    }
    for _ in 0..5 {
        seq += 1;
        publisher.publish(vec![message(seq)]).await.unwrap();
    }
    let topics: Vec<String> = fake.publishes().into_iter().map(|p| p.2).collect();
    let expected: Vec<String> = (1..=seq).map(|s| message(s).topic).collect();
    assert_eq!(topics, expected, "each message once, in order");
    let logins = fake.logins();
    assert_eq!(logins.len(), 2);
    for (username, password) in &logins {
        assert_eq!(
            username,
            "h.azure-devices.net/azure-device/?api-version=2021-04-12"
        );
        assert!(
            password.starts_with(
                "SharedAccessSignature sr=h.azure-devices.net%2Fdevices%2Fazure-device&sig="
            ),
            "{password}"
        );
    }
    assert_ne!(logins[0].1, logins[1].1, "a fresh token");
    cancel.cancel();
}

// ---------------------------------------------------------------------------------
// Authentication: mutual TLS and passwords.
// ---------------------------------------------------------------------------------

fn issuer(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A CA, a broker certificate for 127.0.0.1 and a client certificate, as PEM files.
fn pki(dir: &Path) -> impl Fn(&str) -> PathBuf + '_ {
    let ca = issuer("ferry test CA");
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, sans) in [
        ("server", vec!["127.0.0.1".to_string()]),
        ("client", vec![]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    move |name: &str| dir.join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_requires_a_client_certificate_acknowledges_the_sinks_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let path = pki(dir.path());
    let broker = Mosquitto::start_with(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        path("ca.pem").display(),
        path("server.pem").display(),
        path("server.key").display()
    ));
    let cfg = config(&format!(
        "name = 'up'\nurl = 'mqtts://127.0.0.1:{}'\n\
         tls = {{ ca_file = {:?}, cert_file = {:?}, key_file = {:?} }}",
        broker.port(),
        path("ca.pem").display().to_string(),
        path("client.pem").display().to_string(),
        path("client.key").display().to_string()
    ));
    let (publisher, binder, cancel) = start(&cfg);
    publisher.publish(messages(&binder, 1..4)).await.unwrap();
    assert_eq!(received_topics(&broker, "ferry-gw-9-up", 3).len(), 3);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_username_and_password_file_log_in_and_a_wrong_password_delivers_nothing() {
    let broker = Mosquitto::start_with_password("gateway", "s3cret");
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    std::fs::write(&good, "s3cret\n").unwrap();
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "guess\n").unwrap();
    let url = broker.url();
    let with = |file: &Path, name: &str, timeout: &str| {
        config(&format!(
            "name = '{name}'\nurl = '{url}'\nusername = 'gateway'\npassword_file = {:?}\ntimeout = '{timeout}'",
            file.display().to_string()
        ))
    };
    let (publisher, binder, cancel) = start(&with(&good, "good", "30s"));
    publisher.publish(messages(&binder, 1..3)).await.unwrap();
    assert_eq!(received_topics(&broker, "ferry-gw-9-good", 2).len(), 2);
    cancel.cancel();

    let (publisher, binder, cancel) = start(&with(&bad, "bad", "1s"));
    let err = publisher
        .publish(messages(&binder, 1..2))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PublishError::Timeout { accepted: 0, .. }),
        "{err}"
    );
    cancel.cancel();
}

/// The agent itself, MQTT in and MQTT 5 out: readings arrive upstream in order with
/// the binding's user properties, and one over `max_message` is counted as
/// `too_large` and never sent while the ones after it arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_forwards_readings_upstream_in_order_and_refuses_one_over_max_message() {
    let local = Mosquitto::start();
    let upstream_broker = Mosquitto::start();
    let upstream = Upstream::subscribe(&upstream_broker).await;
    let mut config = support::TestConfig::new("gw-up", &local);
    config.max_payload = Some("64KiB".into());
    config.extra = format!(
        "\n[[sink.mqtt]]\nname = \"iot\"\nurl = \"mqtt://127.0.0.1:{}\"\nmax_message = \"4KiB\"\n",
        upstream_broker.port()
    );
    let mut agent = support::Agent::start(&config.toml(), &[]);
    local.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    for seq in 0..6u64 {
        let pad = if seq == 2 {
            "x".repeat(8000)
        } else {
            String::new()
        };
        let payload = serde_json::json!({ "seq": seq, "pad": pad }).to_string();
        local.publish("sensors/dev/telemetry", payload, 1);
    }
    let got = upstream.wait_for(5).await;
    let seqs: Vec<u64> = got
        .iter()
        .map(|p| {
            serde_json::from_slice::<serde_json::Value>(&p.payload).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, [0, 1, 3, 4, 5]);
    for p in &got {
        assert_eq!(user_property(p, "type"), Some("io.ferry.reading"));
        assert_eq!(user_property(p, "subject"), Some("dev"));
        assert_eq!(user_property(p, "source"), Some("/ferry/gw-up/mqtt/local"));
        assert_eq!(
            std::str::from_utf8(&p.topic).unwrap(),
            "ferry/gw-up/local/dev"
        );
    }
    let m = agent.wait_for_metric(
        "ferry_sink_dropped_total",
        &[("sink", "iot"), ("reason", "too_large")],
        1.0,
    );
    assert_eq!(
        m.value(
            "ferry_sink_dropped_total",
            &[("sink", "iot"), ("reason", "too_large")]
        ),
        1.0
    );
    assert!(agent.stop().success());
}
