//! What an operator relies on around the data path: the admin endpoint serves
//! `GET /metrics` and nothing else, the data directory is private, and an MQTT
//! connection that keeps dropping is counted by reason without flooding the log or
//! logging the URL's query string.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use support::*;

const SIMULATED: &str = r#"[agent]
id = "gw-ops"
data_dir = "data"

[admin]
listen = "127.0.0.1:ADMIN"

[[source.simulator]]
name = "sim"
devices = 2
interval = "20ms"

[[sink.console]]
name = "out"
"#;

/// Sends `request` as is and returns the response's status line.
fn status_of(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the admin port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    raw.lines().next().unwrap_or_default().to_string()
}

#[test]
fn the_admin_endpoint_answers_only_get_metrics() {
    let port = free_port();
    let mut agent = Agent::start(&SIMULATED.replace("ADMIN", &port.to_string()), &[]);
    agent.wait_for_metric("ferry_store_committed_total", &[], 1.0);

    let cases = [
        (
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            "HTTP/1.1 200 OK",
        ),
        (
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "HTTP/1.1 404 Not Found",
        ),
        (
            "GET /debug/pprof HTTP/1.1\r\n\r\n",
            "HTTP/1.1 404 Not Found",
        ),
        (
            "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (
            "PUT /metrics HTTP/1.0\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed",
        ),
        ("hello\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ];
    for (request, expected) in cases {
        assert_eq!(status_of(port, request), expected, "{request:?}");
    }
    agent.assert_running();
    assert!(agent.stop().success());
}

/// Every directory and file under `dir`, with its permission bits.
fn modes(dir: &Path, out: &mut Vec<(String, bool, u32)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        let mode = meta.permissions().mode() & 0o777;
        out.push((entry.path().display().to_string(), meta.is_dir(), mode));
        if meta.is_dir() {
            modes(&entry.path(), out);
        }
    }
}

#[test]
fn a_fresh_data_dir_and_every_file_in_it_are_private() {
    let mut agent = Agent::start(&SIMULATED.replace("ADMIN", &free_port().to_string()), &[]);
    agent.wait_for_metric("ferry_store_committed_total", &[], 10.0);
    assert!(agent.stop().success());

    let data = agent.dir().join("data");
    let dir_mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700, "{}", data.display());
    let mut found = Vec::new();
    modes(&data, &mut found);
    assert!(
        found.iter().any(|(_, dir, _)| !dir),
        "no files in {found:?}"
    );
    for (path, dir, mode) in found {
        let expected = if dir { 0o700 } else { 0o600 };
        assert_eq!(mode, expected, "{path} is {mode:o}");
    }
}

#[test]
fn a_message_over_the_client_packet_limit_is_counted_as_a_disconnect_and_logged_at_a_limited_rate()
{
    let broker = Mosquitto::start();
    let mut config = TestConfig::new("gw-big", &broker);
    // The client refuses packets over max(4 x max_payload, 1MiB) = 1MiB.
    config.max_payload = Some("2KiB".to_string());
    let config = config.toml().replace(
        &format!("url = \"{}\"", broker.url()),
        &format!("url = \"{}/?token=hunter2\"", broker.url()),
    );
    assert!(config.contains("hunter2"), "{config}");
    let mut agent = Agent::start(&config, &[]);
    broker.wait_for_subscription("ferry-gw-big-local", "sensors/+/telemetry");

    // QoS 1 with a persistent session: the broker delivers it again on every
    // reconnect, and the client drops the connection every time.
    broker.publish("sensors/big/telemetry", vec![b'x'; 1200 * 1024], 1);
    let labels = [("source", "local"), ("reason", "packet_too_large")];
    let m = agent.wait_for_metric("ferry_source_disconnects_total", &labels, 8.0);
    let counted = m.value("ferry_source_disconnects_total", &labels);
    let warned = agent.stderr().matches("lost the broker").count();
    assert!(
        warned >= 1,
        "the first disconnect is logged:\n{}",
        agent.stderr()
    );
    assert!(
        (warned as f64) < counted,
        "{warned} warnings for {counted} disconnects:\n{}",
        agent.stderr()
    );
    let stderr = agent.stderr();
    assert!(stderr.contains("MQTT source starting"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the query string was logged:\n{stderr}"
    );
    assert!(agent.stop().success());
}
