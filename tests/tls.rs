//! TLS with a private certificate authority and client certificates (mutual TLS),
//! against a real mosquitto TLS listener and a real HTTPS receiver (rustls), with
//! certificates made for the test: readings flow when the agent trusts the CA and
//! presents its certificate, and nothing flows to a server it cannot verify.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use support::*;

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files;
/// and a second CA that signed none of them.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = issuer("ferry test CA");
        let other = issuer("some other CA");
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca.pem());
        write("other-ca.pem", other.pem());
        for (name, sans) in [
            ("server", vec!["127.0.0.1".to_string()]),
            ("client", vec![]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The agent's `tls` table, trusting `ca` and presenting the client certificate.
    fn agent_tls(&self, ca: &str) -> String {
        format!(
            "tls = {{ ca_file = {:?}, cert_file = {:?}, key_file = {:?} }}",
            self.path(ca).display().to_string(),
            self.path("client.pem").display().to_string(),
            self.path("client.key").display().to_string()
        )
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

fn mqtts_config(broker: &Mosquitto, receiver: &Receiver, tls: &str) -> String {
    format!(
        r#"[agent]
id = "gw-tls"
data_dir = "data"

[[source.mqtt]]
name = "local"
url = "mqtts://127.0.0.1:{port}"
topics = ["sensors/+/telemetry"]
device = "{{topic.1}}"
reconnect = {{ min = "100ms", max = "1s" }}
{tls}

[[sink.http]]
name = "cloud"
url = "{url}"
retry = {{ min = "100ms", max = "1s" }}
"#,
        port = broker.port(),
        url = receiver.url()
    )
}

#[test]
fn an_mqtts_broker_with_a_private_ca_and_client_certificates_delivers_readings() {
    let pki = Pki::new();
    let broker = Mosquitto::start_with(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        pki.path("ca.pem").display(),
        pki.path("server.pem").display(),
        pki.path("server.key").display()
    ));
    let receiver = Receiver::start();
    let mut agent = Agent::start(
        &mqtts_config(&broker, &receiver, &pki.agent_tls("ca.pem")),
        &[],
    );
    broker.wait_for_subscription("ferry-gw-tls-local", "sensors/+/telemetry");
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .args(["-t", "sensors/kiln-1/telemetry", "-q", "1"])
        .args(["-m", r#"{"seq": 1, "t": 880}"#])
        .arg("--cafile")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path("client.pem"))
        .arg("--key")
        .arg(pki.path("client.key"))
        .stdout(Stdio::null())
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success());
    let readings = receiver.wait_for_reading("kiln-1", 1);
    assert_eq!(readings[0].data["t"], 880);
    assert!(agent.stop().success());

    // Trusting another CA, the agent refuses the broker's certificate.
    let mut doubting = Agent::start(
        &mqtts_config(&broker, &receiver, &pki.agent_tls("other-ca.pem")),
        &[],
    );
    doubting.eventually("the broker's certificate to be refused", |a| {
        if a.stderr_contains("UnknownIssuer") {
            Ok(())
        } else {
            Err("no certificate error yet".to_string())
        }
    });
    assert!(doubting.stop().success());
}

/// An HTTPS server (rustls) that requires a client certificate from `ca.pem` and
/// answers every request 200, keeping the bodies; failed handshakes are kept too.
struct HttpsReceiver {
    port: u16,
    bodies: Arc<Mutex<Vec<String>>>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl HttpsReceiver {
    fn start(pki: &Pki) -> HttpsReceiver {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pem = |name: &str| std::fs::read(pki.path(name)).unwrap();
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem("ca.pem")) {
            roots.add(cert.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .unwrap();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(&pem("server.pem"))
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_slice(&pem("server.key")).unwrap();
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        // As cloud endpoints do: HTTP/2 preferred, HTTP/1.1 taken. ferry speaks only
        // HTTP/1.1 and must not offer `h2` (see `serve`).
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (bodies, failures) = (Arc::default(), Arc::default());
        let r = HttpsReceiver {
            port,
            bodies: Arc::clone(&bodies),
            failures: Arc::clone(&failures),
        };
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (config, bodies, failures) = (
                    Arc::clone(&config),
                    Arc::clone(&bodies),
                    Arc::clone(&failures),
                );
                std::thread::spawn(move || {
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, stream);
                    if let Err(e) = serve(&mut tls, &bodies) {
                        failures.lock().unwrap().push(e.to_string());
                    }
                });
            }
        });
        r
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/events", self.port)
    }

    fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }
}

/// Answers HTTP/1.1 requests on one connection until the client closes it; a
/// connection that negotiated another protocol (ALPN) fails.
fn serve(
    tls: &mut rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream>,
    bodies: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(tls);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let alpn = reader.get_ref().conn.alpn_protocol();
        if alpn != Some(b"http/1.1") {
            return Err(std::io::Error::other(format!(
                "negotiated {:?}, not http/1.1",
                alpn.map(String::from_utf8_lossy)
            )));
        }
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        bodies
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(&body).into_owned());
        let tls = reader.get_mut();
        tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")?;
        tls.flush()?;
    }
}

fn https_config(receiver: &HttpsReceiver, tls: &str) -> String {
    format!(
        r#"[agent]
id = "gw-tls"
data_dir = "data"

[[source.simulator]]
name = "demo"
devices = 1
interval = "200ms"

[[sink.http]]
name = "cloud"
url = "{url}"
mode = "batch"
retry = {{ min = "100ms", max = "1s" }}
{tls}
"#,
        url = receiver.url()
    )
}

#[test]
fn an_https_sink_with_a_private_ca_and_a_client_certificate_delivers_and_a_stranger_is_refused() {
    let pki = Pki::new();
    let receiver = HttpsReceiver::start(&pki);

    // With the public roots only, the agent cannot verify the receiver: nothing goes.
    let mut stranger = Agent::start(&https_config(&receiver, ""), &[]);
    stranger.eventually(
        "the receiver's certificate to be refused",
        |_| match receiver.failures().len() {
            0 => Err("no failed handshake yet".to_string()),
            _ => Ok(()),
        },
    );
    assert!(stranger.stop().success());
    assert!(receiver.bodies().is_empty());

    let mut agent = Agent::start(&https_config(&receiver, &pki.agent_tls("ca.pem")), &[]);
    agent.eventually("events over mutual TLS", |_| {
        // Batch mode: a JSON array of CloudEvents per request.
        let bodies = receiver.bodies();
        if bodies
            .iter()
            .any(|b| b.contains("\"type\":\"io.ferry.reading\""))
        {
            Ok(())
        } else {
            Err(format!("{} bodies: {:?}", bodies.len(), bodies.first()))
        }
    });
    assert!(agent.stop().success());
    // Offered HTTP/2 by the server, the agent kept to HTTP/1.1, the one it speaks.
    let failures = receiver.failures();
    assert!(
        !failures.iter().any(|f| f.starts_with("negotiated")),
        "{failures:?}"
    );
}

#[test]
fn ferry_check_names_a_missing_tls_file_and_a_certificate_without_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        r#"[agent]
id = "gw"

[[source.simulator]]
name = "demo"

[[sink.http]]
name = "cloud"
url = "https://ingest.example/events"
tls = { ca_file = "missing-ca.pem", cert_file = "client.pem" }

[[sink.http]]
name = "plain"
url = "http://ingest.example/events"
tls = { ca_file = "missing-ca.pem" }
"#,
    )
    .unwrap();
    let out = ferry()
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for expected in [
        "ferry.toml:10:7: sink \"cloud\": cert_file and key_file go together",
        "ferry.toml:15:7: sink \"plain\": tls settings need an https:// url",
        "cannot read tls ca_file",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
}
