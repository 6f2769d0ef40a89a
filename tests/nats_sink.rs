//! The NATS JetStream sink's publisher against a real nats-server with JetStream:
//! a batch is accepted only once every message has its publish ack, a resend is
//! dropped by JetStream as a duplicate, a missing stream is retried with a hint
//! logged once, and the CloudEvents binding, authentication (token, password,
//! `.creds` files in operator mode) and TLS work on the wire.

mod support;

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use ferry_agent::sinks::nats::{
    Binding, CloudEvent, Failure, Message, NatsSinkConfig, Publisher, SubjectTemplate,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::{json, Value};
use support::NatsServer;

/// A CloudEvent as the agent builds it from a stored record.
struct Reading {
    seq: u64,
    id: String,
}

impl Reading {
    fn new(seq: u64) -> Reading {
        Reading {
            seq,
            id: format!("epoch1-{seq}"),
        }
    }
}

impl CloudEvent for Reading {
    fn id(&self) -> &str {
        &self.id
    }
    fn source(&self) -> &str {
        "/ferry/gw-1/mqtt/local"
    }
    fn ty(&self) -> &str {
        "io.ferry.reading"
    }
    fn subject(&self) -> &str {
        "freezer.1"
    }
    fn attributes(&self) -> Vec<(&str, Cow<'_, str>)> {
        vec![
            ("specversion", "1.0".into()),
            ("id", self.id.as_str().into()),
            ("source", self.source().into()),
            ("type", self.ty().into()),
            ("subject", self.subject().into()),
            ("time", "2026-01-02T03:04:05Z".into()),
            ("sequence", self.seq.to_string().into()),
        ]
    }
    fn datacontenttype(&self) -> &str {
        "application/json"
    }
    fn data_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({"temperature": self.seq})).unwrap()
    }
    fn structured(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "specversion": "1.0",
            "id": self.id,
            "source": self.source(),
            "type": self.ty(),
            "subject": self.subject(),
            "time": "2026-01-02T03:04:05Z",
            "datacontenttype": "application/json",
            "sequence": self.seq.to_string(),
            "data": {"temperature": self.seq},
        }))
        .unwrap()
    }
}

fn config(url: &str, extra: &str) -> NatsSinkConfig {
    let cfg: NatsSinkConfig =
        toml::from_str(&format!("name = \"js\"\nurl = {url:?}\n{extra}")).unwrap();
    let problems: Vec<String> = cfg.validate(0).into_iter().map(|p| p.message).collect();
    assert!(problems.is_empty(), "{problems:?}");
    cfg
}

fn publisher(cfg: &NatsSinkConfig) -> Publisher {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Publisher::new(cfg, |p: &Path| p.to_path_buf()).unwrap()
}

fn messages(cfg: &NatsSinkConfig, seqs: std::ops::RangeInclusive<u64>) -> Vec<Message> {
    let binding = Binding {
        mode: cfg.mode,
        template: SubjectTemplate::parse(&cfg.subject).unwrap(),
        agent: "gw-1".into(),
    };
    seqs.map(|seq| binding.message(&Reading::new(seq)))
        .collect()
}

async fn jetstream(url: &str) -> jetstream::Context {
    jetstream::new(async_nats::connect(url).await.unwrap())
}

/// The stream every test publishes into: `ferry.>`, a two-minute duplicate window.
async fn create_stream(js: &jetstream::Context) -> jetstream::stream::Stream {
    js.create_stream(jetstream::stream::Config {
        name: "FERRY".into(),
        subjects: vec!["ferry.>".into()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn stored(stream: &mut jetstream::stream::Stream) -> u64 {
    stream.info().await.unwrap().state.messages
}

#[tokio::test]
async fn every_event_is_stored_in_order_and_the_batch_returns_only_after_every_ack() {
    let server = NatsServer::start();
    let mut stream = create_stream(&jetstream(&server.url()).await).await;
    let cfg = config(&server.url(), "max_in_flight = 16");
    let p = publisher(&cfg);

    let batch = messages(&cfg, 1..=250);
    let acks = p.publish(&batch).await.unwrap();

    // Returned means acked: all 250 are in the stream now, without waiting.
    assert_eq!(stored(&mut stream).await, 250);
    let sequences: Vec<u64> = acks.iter().map(|a| a.sequence).collect();
    assert_eq!(sequences, (1..=250).collect::<Vec<u64>>());
    assert!(acks.iter().all(|a| a.stream == "FERRY" && !a.duplicate));
    for seq in [1, 2, 17, 128, 250] {
        let m = stream.get_raw_message(seq).await.unwrap();
        assert_eq!(
            m.headers.get("ce-id").map(|v| v.as_str()),
            Some(format!("epoch1-{seq}").as_str()),
            "stream sequence {seq} holds the event sent {seq}th"
        );
    }
}

#[tokio::test]
async fn a_resend_inside_the_duplicate_window_is_dropped_by_jetstream() {
    let server = NatsServer::start();
    let mut stream = create_stream(&jetstream(&server.url()).await).await;
    let cfg = config(&server.url(), "");
    let p = publisher(&cfg);
    let first = p.publish(&messages(&cfg, 1..=10)).await.unwrap();

    // The same events again, as after a lost ack or a restart; then a new one.
    let again = p.publish(&messages(&cfg, 1..=11)).await.unwrap();

    assert!(again[..10].iter().all(|a| a.duplicate));
    assert_eq!(
        again[..10].iter().map(|a| a.sequence).collect::<Vec<_>>(),
        first.iter().map(|a| a.sequence).collect::<Vec<_>>()
    );
    assert!(!again[10].duplicate);
    assert_eq!(stored(&mut stream).await, 11);
}

/// Log lines written while the publisher runs on this thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn without_a_stream_a_batch_is_retried_with_a_hint_logged_once_then_accepted_once_one_exists()
{
    let logs = Logs::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let server = NatsServer::start();
    let cfg = config(&server.url(), "");
    let p = publisher(&cfg);
    let batch = messages(&cfg, 1..=3);

    for _ in 0..3 {
        match p.publish(&batch).await {
            Err(Failure::Retry { kind, detail }) => {
                assert_eq!(kind, "no_stream");
                assert!(
                    detail.contains("ferry.gw-1.io_ferry_reading.freezer_1"),
                    "{detail}"
                );
            }
            other => panic!("expected a retry for want of a stream, got {other:?}"),
        }
    }
    let mut stream = create_stream(&jetstream(&server.url()).await).await;
    let acks = p.publish(&batch).await.unwrap();

    assert_eq!(acks.len(), 3);
    assert_eq!(stored(&mut stream).await, 3);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert_eq!(
        text.matches("no JetStream stream captures subject").count(),
        1,
        "{text}"
    );
    assert!(
        text.contains("nats stream add js --subjects 'ferry.>'"),
        "{text}"
    );
}

#[tokio::test]
async fn binary_mode_sends_ce_headers_and_structured_mode_a_cloudevents_json_body() {
    let server = NatsServer::start();
    let stream = create_stream(&jetstream(&server.url()).await).await;

    let binary = config(&server.url(), "mode = \"binary\"");
    publisher(&binary)
        .publish(&messages(&binary, 1..=1))
        .await
        .unwrap();
    let structured = config(
        &server.url(),
        "mode = \"structured\"\nsubject = \"ferry.{source_kind}.{source_name}.{subject}\"",
    );
    publisher(&structured)
        .publish(&messages(&structured, 2..=2))
        .await
        .unwrap();

    let m = stream.get_raw_message(1).await.unwrap();
    assert_eq!(m.subject.as_str(), "ferry.gw-1.io_ferry_reading.freezer_1");
    let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_string());
    assert_eq!(header("ce-specversion").as_deref(), Some("1.0"));
    assert_eq!(header("ce-id").as_deref(), Some("epoch1-1"));
    assert_eq!(
        header("ce-source").as_deref(),
        Some("/ferry/gw-1/mqtt/local")
    );
    assert_eq!(header("ce-type").as_deref(), Some("io.ferry.reading"));
    assert_eq!(header("ce-subject").as_deref(), Some("freezer.1"));
    assert_eq!(header("ce-time").as_deref(), Some("2026-01-02T03:04:05Z"));
    assert_eq!(header("ce-sequence").as_deref(), Some("1"));
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    assert_eq!(
        header("Nats-Msg-Id").as_deref(),
        Some("/ferry/gw-1/mqtt/local epoch1-1")
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&m.payload).unwrap(),
        json!({"temperature": 1})
    );

    let m = stream.get_raw_message(2).await.unwrap();
    assert_eq!(m.subject.as_str(), "ferry.mqtt.local.freezer_1");
    assert_eq!(
        m.headers.get("content-type").map(|v| v.as_str()),
        Some("application/cloudevents+json")
    );
    assert!(m.headers.get("ce-id").is_none());
    let event: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(event["id"], "epoch1-2");
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["data"], json!({"temperature": 2}));
}

fn secret(server: &NatsServer, name: &str, text: &str) -> PathBuf {
    let path = server.dir().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The `auth` table naming one secret file, e.g. `{ token_file = "..." }`.
fn file_auth(key: &str, path: &Path) -> String {
    format!("{{ {key} = {:?} }}", path.display().to_string())
}

/// Publishes `seqs` through a sink that signs in with `auth` (its `auth` table).
async fn publish_as(
    server: &NatsServer,
    auth: &str,
    seqs: std::ops::RangeInclusive<u64>,
) -> Result<(), Failure> {
    let cfg = config(&server.url(), &format!("timeout = \"1s\"\nauth = {auth}"));
    publisher(&cfg)
        .publish(&messages(&cfg, seqs))
        .await
        .map(drop)
}

/// A refused sign-in is retried (the server may learn the user later) and its
/// detail does not carry the secret.
fn assert_retried_without(refused: &Result<(), Failure>, secret: &str) {
    assert!(
        matches!(refused, Err(Failure::Retry { detail, .. }) if !detail.contains(secret)),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_token_from_a_file_signs_in_and_a_wrong_one_is_retried_not_accepted() {
    let server = NatsServer::start_with("authorization { token: \"s3cret-token\" }");
    let good = secret(&server, "token", "s3cret-token\n");
    let bad = secret(&server, "bad-token", "guess");
    let admin = async_nats::ConnectOptions::with_token("s3cret-token".into())
        .connect(server.url())
        .await
        .unwrap();
    let mut stream = create_stream(&jetstream::new(admin)).await;

    publish_as(&server, &file_auth("token_file", &good), 1..=2)
        .await
        .unwrap();
    assert_eq!(stored(&mut stream).await, 2);

    let refused = publish_as(&server, &file_auth("token_file", &bad), 3..=3).await;
    assert_retried_without(&refused, "guess");
    assert_eq!(stored(&mut stream).await, 2);
}

#[tokio::test]
async fn a_user_and_a_password_from_a_file_sign_in() {
    let server =
        NatsServer::start_with("authorization { user: \"ferry\", password: \"pa55 word\" }");
    let password = secret(&server, "password", "pa55 word\n");
    let admin =
        async_nats::ConnectOptions::with_user_and_password("ferry".into(), "pa55 word".into())
            .connect(server.url())
            .await
            .unwrap();
    let mut stream = create_stream(&jetstream::new(admin)).await;
    let auth = format!(
        "{{ user = \"ferry\", password_file = {:?} }}",
        password.display().to_string()
    );
    publish_as(&server, &auth, 1..=5).await.unwrap();
    assert_eq!(stored(&mut stream).await, 5);
}

/// A NATS JWT as `nsc` makes them: header and claims in unpadded base64url, signed
/// with the issuer's nkey (ed25519).
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, nats: Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": format!("ferry-test-{subject}"),
        "iat": chrono::Utc::now().timestamp(),
        "iss": issuer.public_key(),
        "name": "ferry-test",
        "sub": subject,
        "nats": nats,
    });
    let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// A `.creds` file in `nsc`'s layout.
fn creds_file(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

/// Decentralised auth as a NATS operator sets it up: an operator, an account with
/// JetStream, the system account, and a user of the first account. The server's config lines and the
/// user's `.creds` file.
fn operator_mode() -> (String, String) {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        json!({ "type": "operator", "version": 2 }),
    );
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        json!({ "type": "account", "version": 2, "limits": unlimited }),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        json!({ "type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1 }),
    );
    // JetStream needs the server's own system account too.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        json!({ "type": "account", "version": 2 }),
    );
    let conf = format!(
        "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{ {acc}: {account_jwt}, {sys}: {system_jwt} }}",
        acc = account.public_key(),
        sys = system.public_key(),
    );
    (conf, creds_file(&user_jwt, &user.seed().unwrap()))
}

#[tokio::test]
async fn a_creds_file_signs_in_with_its_jwt_and_a_seed_that_is_not_the_users_is_refused() {
    let (conf, creds) = operator_mode();
    let server = NatsServer::start_with(&conf);
    let path = secret(&server, "gw.creds", &creds);
    let admin = async_nats::ConnectOptions::new()
        .credentials(&creds)
        .unwrap()
        .connect(server.url())
        .await
        .unwrap();
    let mut stream = create_stream(&jetstream::new(admin)).await;

    publish_as(&server, &file_auth("creds_file", &path), 1..=3)
        .await
        .unwrap();
    assert_eq!(stored(&mut stream).await, 3);

    // The user's JWT with another user's seed: the server checks the nonce's
    // signature against the JWT's key and refuses it.
    let jwt = creds.lines().nth(1).unwrap();
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let forged = secret(&server, "forged.creds", &creds_file(jwt, &stranger));
    let refused = publish_as(&server, &file_auth("creds_file", &forged), 4..=4).await;
    assert_retried_without(&refused, &stranger);
    assert_eq!(stored(&mut stream).await, 3);
}

#[tokio::test]
async fn a_message_over_the_servers_max_payload_is_refused_for_good() {
    let server = NatsServer::start_with("max_payload: 2048");
    create_stream(&jetstream(&server.url()).await).await;
    let cfg = config(&server.url(), "");
    let p = publisher(&cfg);
    // The first batch connects: from then on the server's limit is known.
    p.publish(&messages(&cfg, 1..=1)).await.unwrap();
    assert_eq!(p.max_payload(), 2048);
    let mut batch = messages(&cfg, 2..=4);
    batch[1].payload = vec![b'x'; 4096];

    match p.publish(&batch).await {
        Err(Failure::Refused { index, reason, .. }) => {
            assert_eq!((index, reason), (1, "too_large"));
        }
        other => panic!("expected the large message refused, got {other:?}"),
    }
}

fn issuer(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

#[tokio::test]
async fn a_tls_server_with_a_private_ca_and_client_certificates_is_published_to() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let ca = issuer("ferry test CA");
    let other = issuer("some other CA");
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("other-ca.pem"), other.pem()).unwrap();
    for (name, sans) in [
        ("server", vec!["127.0.0.1".to_string()]),
        ("client", vec![]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(path(&format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    let server = NatsServer::start_with(&format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}",
        path("server.pem"),
        path("server.key"),
        path("ca.pem")
    ));
    let url = format!("tls://127.0.0.1:{}", server.port());
    let tls = |ca: &str| {
        format!(
            "tls = {{ ca_file = {:?}, cert_file = {:?}, key_file = {:?} }}",
            path(ca),
            path("client.pem"),
            path("client.key")
        )
    };

    let cfg = config(&url, &tls("ca.pem"));
    let p = publisher(&cfg);
    let admin = async_nats::ConnectOptions::new()
        .add_root_certificates(path("ca.pem").into())
        .add_client_certificate(path("client.pem").into(), path("client.key").into())
        .require_tls(true)
        .connect(url.as_str())
        .await
        .unwrap();
    let mut stream = create_stream(&jetstream::new(admin)).await;
    p.publish(&messages(&cfg, 1..=3)).await.unwrap();
    assert_eq!(stored(&mut stream).await, 3);

    // A server its CA did not sign is never trusted: nothing is accepted.
    let untrusting = config(&url, &format!("timeout = \"1s\"\n{}", tls("other-ca.pem")));
    let refused = publisher(&untrusting)
        .publish(&messages(&untrusting, 4..=4))
        .await;
    assert!(matches!(refused, Err(Failure::Retry { .. })), "{refused:?}");
    assert_eq!(stored(&mut stream).await, 3);
}

#[test]
fn the_shipped_example_is_a_valid_nats_sink_table() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/nats-jetstream.toml");
    let file: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let sinks = file["sink"]["nats"]
        .as_array()
        .expect("[[sink.nats]] tables");
    assert_eq!(sinks.len(), 1);
    for (i, table) in sinks.iter().enumerate() {
        let cfg: NatsSinkConfig = table.clone().try_into().unwrap();
        let problems: Vec<String> = cfg.validate(i).into_iter().map(|p| p.message).collect();
        assert!(problems.is_empty(), "{problems:?}");
    }
}

/// The agent itself, MQTT in and JetStream out, killed with SIGKILL mid-stream and
/// restarted on the same store: every reading reaches the stream, and a resend
/// after the restart carries its first `Nats-Msg-Id`, so the stream holds each
/// event once.
#[test]
fn readings_from_mosquitto_reach_a_jetstream_stream_once_each_across_an_agent_kill() {
    use support::{Agent, Mosquitto, TestConfig};
    const READINGS: u64 = 200;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = NatsServer::start();
    let mut stream = rt.block_on(async { create_stream(&jetstream(&server.url()).await).await });
    let broker = Mosquitto::start();
    let mut config = TestConfig::new("gw-nats", &broker);
    config.extra = format!(
        "\n[[sink.nats]]\nname = \"js\"\nurl = \"{}\"\nsubject = \"ferry.{{agent}}.{{subject}}\"\nretry = {{ min = \"50ms\", max = \"500ms\" }}\n",
        server.url()
    );
    let mut agent = Agent::start(&config.toml(), &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    let lines: Vec<String> = (0..READINGS)
        .map(|seq| json!({ "seq": seq }).to_string())
        .collect();
    let (first, rest) = lines.split_at(60);
    broker.publish_lines("sensors/dev/telemetry", first, 1);
    agent.wait_for_metric("ferry_store_committed_total", &[], 20.0);
    agent.kill();
    broker.publish_lines("sensors/dev/telemetry", rest, 1);
    agent.start_again();

    let messages = support::eventually("every reading in the stream", || {
        let n = rt.block_on(stored(&mut stream));
        let all: Vec<(String, u64)> = (1..=n)
            .map(|seq| {
                let m = rt.block_on(stream.get_raw_message(seq)).unwrap();
                let id = m
                    .headers
                    .get("ce-id")
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default();
                let data: Value = serde_json::from_slice(&m.payload).unwrap();
                (id, data["seq"].as_u64().unwrap())
            })
            .collect();
        let seen: std::collections::HashSet<u64> = all.iter().map(|(_, s)| *s).collect();
        if seen.len() as u64 == READINGS {
            Ok(all)
        } else {
            Err(format!(
                "{} of {READINGS} readings in {n} messages",
                seen.len()
            ))
        }
    });
    // JetStream stored each event (each id) once, whatever ferry resent.
    let ids: std::collections::HashSet<&str> = messages.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), messages.len(), "an id stored twice");
    // And no id stands for two different readings.
    let mut by_id = std::collections::HashMap::new();
    for (id, seq) in &messages {
        assert_eq!(*by_id.entry(id.clone()).or_insert(*seq), *seq, "id {id}");
    }
    assert!(agent.stop().success());
}
