//! Shared harness for ferry's end-to-end tests: real processes only.
//!
//! - [`Mosquitto`]: a real `mosquitto` broker on a free loopback port, with its log
//!   captured (subscriptions are read from it), publishing through `mosquitto_pub`.
//! - [`Receiver`]: a real HTTP server (tiny_http on a thread) that records every
//!   request and can answer 503 for a while. A down upstream is a [`DownPort`]: bound
//!   but not listening, so connections are refused and no other test takes the port.
//! - [`Agent`]: the real `ferry` binary as a child process, its config and rule files
//!   in a temp dir, stopped with a real SIGTERM or killed with SIGKILL.
//! - [`Metrics`]: a scrape of the agent's Prometheus endpoint.
//! - [`Cable`]: a serial cable (a socat pty pair) that can be unplugged and replugged.
//! - [`NatsServer`]: a real `nats-server` with JetStream on a free loopback port.
//! - [`MqttProxy`]: a TCP proxy between the agent and mosquitto that can swallow the
//!   agent's PUBACKs or cut its connection.
//! - [`Stream`] and [`run_battery`]: a QoS 1 publisher that keeps going across agent
//!   kills, and the crash battery built on it.
//!
//! Every wait is a poll loop with a generous deadline that fails the test with a
//! message saying what was awaited and what was seen. Every helper kills its child
//! processes on drop, and prints the child's log when the test is failing.

#![allow(dead_code)]

mod cable;
// Only the serial-port tests use it; the others compile this module too.
#[allow(unused_imports)]
pub use cable::{Cable, Heard};
mod crash;
#[allow(unused_imports)]
pub use crash::{run_battery, run_battery_on, Battery, Stream};
mod nats;
#[allow(unused_imports)]
pub use nats::NatsServer;
mod proxy;
#[allow(unused_imports)]
pub use proxy::MqttProxy;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cloudevents::event::ExtensionValue;
use cloudevents::AttributesReader;
use serde_json::Value;

/// How long any single wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// How often waits poll.
const POLL: Duration = Duration::from_millis(50);

/// A port that was free a moment ago (bind 127.0.0.1:0, read it, release it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().unwrap().port()
}

/// A loopback port held bound but not listening: connections to it are refused (an
/// upstream that is down), and nobody else can take the port meanwhile, unlike a
/// port released after reading it. [`Receiver::on`] brings the upstream up on the
/// very same socket.
pub struct DownPort {
    listener: TcpListener,
    port: u16,
}

impl DownPort {
    pub fn hold() -> DownPort {
        use std::os::fd::FromRawFd;
        // std binds and listens in one call; a socket that is only bound is refused
        // by the kernel like a closed port, so bind it by hand.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket(): {}", std::io::Error::last_os_error());
        // Owned from here on: closed on drop, also if an assertion below fails.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = unsafe {
            libc::bind(
                fd,
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "bind(): {}", std::io::Error::last_os_error());
        let port = listener
            .local_addr()
            .expect("a bound socket has an address")
            .port();
        DownPort { listener, port }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT/events`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/events", self.port)
    }

    /// Starts listening on the held socket.
    fn listen(self) -> TcpListener {
        use std::os::fd::AsRawFd;
        let rc = unsafe { libc::listen(self.listener.as_raw_fd(), 128) };
        assert_eq!(rc, 0, "listen(): {}", std::io::Error::last_os_error());
        self.listener
    }
}

/// Polls `cond` until it holds, failing the test after [`DEADLINE`] with `what` and
/// the last value `cond` reported.
pub fn eventually<T>(what: &str, mut cond: impl FnMut() -> Result<T, String>) -> T {
    eventually_within(DEADLINE, what, &mut cond)
}

/// [`eventually`] with an explicit deadline.
pub fn eventually_within<T>(
    deadline: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match cond() {
            Ok(v) => return v,
            Err(last) => {
                if start.elapsed() > deadline {
                    panic!("timed out after {deadline:?} waiting for {what}; last seen: {last}");
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Sends SIGTERM (or another signal) to a child process.
pub fn signal(child: &Child, sig: libc::c_int) {
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({}, {sig}) failed", child.id());
}

/// Waits for a child to exit within `deadline`; `None` if it is still running.
pub fn wait_with_deadline(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if start.elapsed() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills (SIGKILL) and reaps a child, ignoring errors: for Drop.
fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Reads a child's pipe into a shared buffer, line by line, on a thread.
fn capture(pipe: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(pipe);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => into.lock().unwrap().push_str(&line),
            }
        }
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not on PATH: the end-to-end tests need Debian's `mosquitto` and \
         `mosquitto-clients` packages (apt-get install -y mosquitto mosquitto-clients)"
    );
    Command::new(name)
}

// ---------------------------------------------------------------------------------
// Mosquitto
// ---------------------------------------------------------------------------------

/// A real mosquitto broker on a free loopback port, without persistence.
pub struct Mosquitto {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Appended to the generated mosquitto.conf.
    extra_conf: String,
    /// When set, anonymous clients are refused and this user/password is required
    /// (and used by the publishing helpers).
    credentials: Option<(String, String)>,
    /// The current run's log (stdout + stderr); replaced on restart.
    log: Arc<Mutex<String>>,
    /// Logs of earlier runs, for failure reports.
    old_logs: String,
}

impl Mosquitto {
    /// Starts a broker on a free port and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// A broker that refuses anonymous clients and knows one `user` with `password`.
    pub fn start_with_password(user: &str, password: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for mosquitto");
        let pwfile = dir.path().join("passwd");
        let status = tool("mosquitto_passwd")
            .arg("-b")
            .arg("-c")
            .arg(&pwfile)
            .args([user, password])
            .status()
            .expect("run mosquitto_passwd");
        assert!(status.success(), "mosquitto_passwd failed: {status}");
        let mut m = Mosquitto {
            port: free_port(),
            extra_conf: format!("password_file {}", pwfile.display()),
            dir,
            credentials: Some((user.to_string(), password.to_string())),
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            old_logs: String::new(),
        };
        m.spawn();
        m
    }

    /// [`Mosquitto::start`] with extra lines for mosquitto.conf.
    pub fn start_with(extra_conf: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for mosquitto");
        let mut m = Mosquitto {
            port: free_port(),
            dir,
            extra_conf: extra_conf.to_string(),
            credentials: None,
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            old_logs: String::new(),
        };
        m.spawn();
        m
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous {}\npersistence false\n\
                 log_dest stderr\nlog_type all\n{}\n",
                self.port,
                self.credentials.is_none(),
                self.extra_conf
            ),
        )
        .unwrap();
        // The port may still be held for a moment after a kill: retry the spawn.
        let port = self.port;
        let child = eventually(&format!("mosquitto listening on port {port}"), || {
            let log = Arc::new(Mutex::new(String::new()));
            let mut child = tool("mosquitto")
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn mosquitto");
            capture(child.stdout.take().unwrap(), log.clone());
            capture(child.stderr.take().unwrap(), log.clone());
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Some(status) = child.try_wait().unwrap() {
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(200));
                    return Err(format!(
                        "mosquitto exited with {status}: {}",
                        log.lock().unwrap()
                    ));
                }
                if log.lock().unwrap().contains("running")
                    && TcpStream::connect(("127.0.0.1", port)).is_ok()
                {
                    self.log = log;
                    return Ok(child);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            kill_and_reap(&mut child);
            Err(format!(
                "mosquitto not listening after 5s: {}",
                log.lock().unwrap()
            ))
        });
        self.child = Some(child);
    }

    /// Kills the broker with SIGKILL (it keeps nothing: persistence is off).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
        let log = std::mem::take(&mut *self.log.lock().unwrap());
        self.old_logs.push_str(&log);
        self.old_logs.push_str("---- killed ----\n");
    }

    /// Kills the broker and starts a fresh one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The current run's log.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// How many PUBACKs the broker has received from `client_id` on this run: the
    /// QoS 1 messages that client acknowledged.
    pub fn pubacks_from(&self, client_id: &str) -> usize {
        let needle = format!("Received PUBACK from {client_id} ");
        self.log().matches(&needle).count()
    }

    /// How many PUBLISHes the broker has sent to `client_id` on this run, resends
    /// included.
    pub fn publishes_to(&self, client_id: &str) -> usize {
        let needle = format!("Sending PUBLISH to {client_id} ");
        self.log().matches(&needle).count()
    }

    /// Waits until `client_id` has subscribed to `topic` on the current broker run.
    /// mosquitto logs each granted subscription as `{client_id} {qos} {topic}`.
    pub fn wait_for_subscription(&self, client_id: &str, topic: &str) {
        let needle = format!(" {client_id} ");
        eventually(
            &format!("{client_id} to subscribe to {topic} on the broker"),
            || {
                let log = self.log();
                let subscribed = log.lines().any(|l| {
                    l.contains(&needle)
                        && l.ends_with(&format!(" {topic}"))
                        && !l.contains("Received")
                });
                if subscribed {
                    Ok(())
                } else {
                    Err(tail(&log, 10))
                }
            },
        );
    }

    fn pub_command(&self, topic: &str, qos: u8) -> Command {
        let mut cmd = tool("mosquitto_pub");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-t", topic, "-q", &qos.to_string()]);
        if let Some((user, password)) = &self.credentials {
            cmd.args(["-u", user, "-P", password]);
        }
        cmd
    }

    /// Publishes one message and waits for `mosquitto_pub` to finish (for QoS 1:
    /// after the broker's PUBACK). The payload goes through stdin (`-s`), so it may
    /// be any size and any bytes.
    pub fn publish(&self, topic: &str, payload: impl AsRef<[u8]>, qos: u8) {
        let mut child = self
            .pub_command(topic, qos)
            .arg("-s")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mosquitto_pub");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(payload.as_ref())
            .expect("write payload to mosquitto_pub");
        finish_publisher(child, topic);
    }

    /// Publishes each line as one message (`mosquitto_pub -l`), in order, and waits
    /// until all are acknowledged by the broker.
    pub fn publish_lines(&self, topic: &str, lines: &[String], qos: u8) {
        let mut p = self.line_publisher(topic, qos);
        for l in lines {
            p.send(l);
        }
        p.finish();
    }

    /// Starts `mosquitto_sub` on `filter` with client id [`SUBSCRIBER_ID`]; its output
    /// lines are `topic payload`.
    pub fn subscribe(&self, filter: &str) -> Subscriber {
        let mut cmd = tool("mosquitto_sub");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-t", filter, "-v", "-q", "1", "-i", SUBSCRIBER_ID]);
        if let Some((user, password)) = &self.credentials {
            cmd.args(["-u", user, "-P", password]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto_sub");
        let lines = Arc::new(Mutex::new(String::new()));
        capture(child.stdout.take().unwrap(), lines.clone());
        Subscriber {
            child: Some(child),
            lines,
        }
    }

    /// A running `mosquitto_pub -l`: each [`LinePublisher::send`] publishes one message.
    pub fn line_publisher(&self, topic: &str, qos: u8) -> LinePublisher {
        let mut child = self
            .pub_command(topic, qos)
            .arg("-l")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mosquitto_pub -l");
        let stdin = child.stdin.take();
        LinePublisher {
            topic: topic.to_string(),
            child: Some(child),
            stdin,
        }
    }
}

fn finish_publisher(mut child: Child, topic: &str) {
    drop(child.stdin.take());
    let status = wait_with_deadline(&mut child, DEADLINE);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    match status {
        Some(s) if s.success() => {}
        Some(s) => panic!("mosquitto_pub to {topic} failed with {s}: {err}"),
        None => {
            kill_and_reap(&mut child);
            panic!("mosquitto_pub to {topic} did not finish within {DEADLINE:?}: {err}");
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
        if std::thread::panicking() {
            eprintln!(
                "---- mosquitto log (last 40 lines) ----\n{}\n",
                tail(&format!("{}{}", self.old_logs, self.log()), 40)
            );
        }
    }
}

/// A `mosquitto_pub -l` process fed line by line.
/// The client id of [`Mosquitto::subscribe`]'s `mosquitto_sub`.
pub const SUBSCRIBER_ID: &str = "ferry-test-subscriber";

/// A running `mosquitto_sub -v`.
pub struct Subscriber {
    child: Option<Child>,
    lines: Arc<Mutex<String>>,
}

impl Subscriber {
    /// Every `topic payload` line received so far.
    pub fn messages(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

pub struct LinePublisher {
    topic: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
}

impl LinePublisher {
    /// Publishes one message (one line; it must not contain a newline).
    pub fn send(&mut self, line: &str) {
        assert!(!line.contains('\n'), "a line message cannot hold a newline");
        let stdin = self.stdin.as_mut().expect("publisher already finished");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .expect("write to mosquitto_pub");
    }

    /// Closes stdin and waits until every message is acknowledged and the
    /// publisher exits successfully.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let child = self.child.take().expect("publisher already finished");
        finish_publisher(child, &self.topic);
    }
}

impl Drop for LinePublisher {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

// ---------------------------------------------------------------------------------
// Receiver
// ---------------------------------------------------------------------------------

/// One HTTP request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub url: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body as the upstream reads it: decoded if it came gzipped
    /// (`Content-Encoding: gzip`); `wire_len` is what came over the wire.
    pub body: Vec<u8>,
    pub wire_len: usize,
    /// The status the receiver answered.
    pub status: u16,
    /// When the receiver had read the whole request (latency benchmarks).
    pub at: std::time::SystemTime,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn content_type(&self) -> &str {
        self.header("content-type").unwrap_or("")
    }

    /// The CloudEvents this request carries, in order, by its content type
    /// (binary, structured or batch mode). Panics, failing the test, if any is not a
    /// valid CloudEvent.
    pub fn events(&self) -> Vec<Event> {
        let ct = self.content_type().to_ascii_lowercase();
        let what = || {
            format!(
                "{} {} content-type {ct:?} body {}",
                self.method,
                self.url,
                String::from_utf8_lossy(&self.body)
            )
        };
        if ct.starts_with("application/cloudevents-batch+json") {
            let v: Value = serde_json::from_slice(&self.body)
                .unwrap_or_else(|e| panic!("batch body is not JSON ({e}): {}", what()));
            let items = v
                .as_array()
                .unwrap_or_else(|| panic!("batch body is not a JSON array: {}", what()));
            items
                .iter()
                .map(|item| Event::from_json(item.clone(), self))
                .collect()
        } else if ct.starts_with("application/cloudevents+json") {
            let v: Value = serde_json::from_slice(&self.body)
                .unwrap_or_else(|e| panic!("structured body is not JSON ({e}): {}", what()));
            vec![Event::from_json(v, self)]
        } else {
            vec![Event::from_binary(self)]
        }
    }
}

#[derive(Default)]
struct ReceiverState {
    failing: Option<u16>,
    /// Requests whose body contains the text get the status.
    refuse: Option<(String, u16)>,
    requests: Vec<Request>,
}

/// A real HTTP server that records every request. It answers 200, or the status
/// set with [`Receiver::set_failing`].
pub struct Receiver {
    port: u16,
    state: Arc<Mutex<ReceiverState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Listens on a port of its own, answering 200.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the HTTP receiver");
        let port = listener
            .local_addr()
            .expect("a bound socket has an address")
            .port();
        let server = tiny_http::Server::from_listener(listener, None)
            .unwrap_or_else(|e| panic!("HTTP receiver on port {port}: {e}"));
        Self::serve(port, server, None)
    }

    /// Brings a down upstream up: listens on the held port, answering 200.
    pub fn on(port: DownPort) -> Self {
        Self::serve_on(port, None)
    }

    /// Brings a down upstream up answering `status` from the very first request.
    pub fn on_failing(port: DownPort, status: u16) -> Self {
        Self::serve_on(port, Some(status))
    }

    fn serve_on(port: DownPort, failing: Option<u16>) -> Self {
        let p = port.port();
        let server = tiny_http::Server::from_listener(port.listen(), None)
            .unwrap_or_else(|e| panic!("HTTP receiver on held port {p}: {e}"));
        Self::serve(p, server, failing)
    }

    /// Listens on `port`, e.g. one read from [`free_port`] earlier (the benchmark's
    /// offline upstream); tests use [`DownPort`], which nobody else can take.
    pub fn on_port(port: u16) -> Self {
        let server = eventually(&format!("HTTP receiver bound to port {port}"), || {
            tiny_http::Server::http(("127.0.0.1", port)).map_err(|e| e.to_string())
        });
        Self::serve(port, server, None)
    }

    fn serve(port: u16, server: tiny_http::Server, failing: Option<u16>) -> Self {
        let state = Arc::new(Mutex::new(ReceiverState {
            failing,
            refuse: None,
            requests: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let mut req = match server.recv_timeout(Duration::from_millis(50)) {
                        Ok(Some(r)) => r,
                        Ok(None) => continue,
                        Err(_) => break,
                    };
                    let mut body = Vec::new();
                    let _ = req.as_reader().read_to_end(&mut body);
                    let at = std::time::SystemTime::now();
                    let headers: Vec<(String, String)> = req
                        .headers()
                        .iter()
                        .map(|h| {
                            (
                                h.field.as_str().as_str().to_ascii_lowercase(),
                                h.value.as_str().to_string(),
                            )
                        })
                        .collect();
                    let wire_len = body.len();
                    let gzipped = headers
                        .iter()
                        .any(|(k, v)| k == "content-encoding" && v.eq_ignore_ascii_case("gzip"));
                    if gzipped {
                        let mut plain = Vec::new();
                        flate2::read::GzDecoder::new(&body[..])
                            .read_to_end(&mut plain)
                            .unwrap_or_else(|e| panic!("a gzip body that does not decode: {e}"));
                        body = plain;
                    }
                    let status = {
                        let mut st = state.lock().unwrap();
                        let refused = st.refuse.as_ref().and_then(|(needle, status)| {
                            let hit = body.windows(needle.len()).any(|w| w == needle.as_bytes());
                            hit.then_some(*status)
                        });
                        let status = st.failing.or(refused).unwrap_or(200);
                        st.requests.push(Request {
                            method: req.method().as_str().to_string(),
                            url: req.url().to_string(),
                            headers,
                            body,
                            wire_len,
                            status,
                            at,
                        });
                        status
                    };
                    let _ = req.respond(tiny_http::Response::empty(status));
                }
            })
        };
        Receiver {
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT/events`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/events", self.port)
    }

    /// From now on answer `status` (e.g. `Some(503)`), or 200 again with `None`.
    pub fn set_failing(&self, status: Option<u16>) {
        self.state.lock().unwrap().failing = status;
    }

    /// From now on answer `status` to every request whose body contains `needle`
    /// (a permanently bad event), 200 to the others.
    pub fn refuse_containing(&self, needle: &str, status: u16) {
        self.state.lock().unwrap().refuse = Some((needle.to_string(), status));
    }

    /// From now on refuse nothing by content (a fixed upstream).
    pub fn stop_refusing(&self) {
        self.state.lock().unwrap().refuse = None;
    }

    /// Every request so far, accepted or not.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Requests answered 2xx.
    /// The requests from the `from`th on, in arrival order (a benchmark reads only
    /// what is new).
    pub fn requests_from(&self, from: usize) -> Vec<Request> {
        let st = self.state.lock().unwrap();
        st.requests.get(from..).unwrap_or_default().to_vec()
    }

    pub fn accepted(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    /// Requests answered with an error status.
    pub fn rejected(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| !(200..300).contains(&r.status))
            .collect()
    }

    /// Every accepted event, in arrival order.
    pub fn events(&self) -> Vec<Event> {
        self.accepted().iter().flat_map(|r| r.events()).collect()
    }

    /// Accepted events of type `io.ferry.reading`, in arrival order.
    pub fn readings(&self) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| e.ty == READING)
            .collect()
    }

    /// Waits until the accepted readings satisfy `done`, returning them.
    pub fn wait_for_readings(&self, what: &str, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        eventually(what, || {
            let r = self.readings();
            if done(&r) {
                Ok(r)
            } else {
                Err(format!(
                    "{} readings accepted, {} requests rejected; last seqs: {:?}",
                    r.len(),
                    self.rejected().len(),
                    r.iter().rev().take(10).map(|e| e.seq()).collect::<Vec<_>>()
                ))
            }
        })
    }

    /// Waits until a reading with `data.seq == seq` from `device` was accepted.
    pub fn wait_for_reading(&self, device: &str, seq: u64) -> Vec<Event> {
        self.wait_for_readings(
            &format!("the reading seq={seq} from {device} to arrive"),
            |r| {
                r.iter()
                    .any(|e| e.subject.as_deref() == Some(device) && e.seq() == Some(seq))
            },
        )
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------

/// The CloudEvent type of forwarded readings.
pub const READING: &str = "io.ferry.reading";

/// A CloudEvent as received, validated by `cloudevents-sdk`.
#[derive(Debug, Clone)]
pub struct Event {
    pub specversion: String,
    pub id: String,
    pub source: String,
    pub ty: String,
    pub subject: Option<String>,
    /// `time`, normalised by the SDK (validated as RFC 3339).
    pub time: Option<chrono::DateTime<chrono::Utc>>,
    pub datacontenttype: Option<String>,
    /// The `sequence` extension as a number, if it parses as one.
    pub sequence: Option<u64>,
    /// Every extension, as text.
    pub extensions: BTreeMap<String, String>,
    /// Whether `sequence` was carried as a string (the contract says decimal string).
    pub sequence_is_string: bool,
    pub data: Value,
    /// The request that carried it.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Event {
    /// The `seq` field the tests put in every payload.
    pub fn seq(&self) -> Option<u64> {
        self.data.get("seq").and_then(Value::as_u64).or_else(|| {
            // Alerts carry the reading's fields under data.values.
            self.data
                .get("values")
                .and_then(|v| v.get("seq"))
                .and_then(Value::as_u64)
        })
    }

    pub fn ext(&self, name: &str) -> Option<&str> {
        self.extensions.get(name).map(String::as_str)
    }

    /// Parses a structured-mode event (JSON object) through the SDK.
    fn from_json(v: Value, req: &Request) -> Event {
        let text = v.to_string();
        let ev: cloudevents::Event = serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("not a valid CloudEvent per cloudevents-sdk ({e}): {text}"));
        let obj = v.as_object().expect("event is an object");
        let spec = obj.get("specversion").and_then(Value::as_str).unwrap_or("");
        assert_eq!(spec, "1.0", "specversion must be \"1.0\": {text}");
        Self::from_sdk(ev, spec, req, &text)
    }

    /// Parses a binary-mode request: attributes from `ce-*` headers, data from the
    /// body. The attributes are mapped onto the JSON format and run through the SDK,
    /// so the same validation applies to every mode.
    fn from_binary(req: &Request) -> Event {
        let mut obj = serde_json::Map::new();
        for (k, v) in &req.headers {
            if let Some(attr) = k.strip_prefix("ce-") {
                assert!(
                    !obj.contains_key(attr),
                    "header {k} appears twice: {:?}",
                    req.headers
                );
                obj.insert(attr.to_string(), Value::String(percent_decode(v)));
            }
        }
        let ct = req.content_type().to_string();
        let data: Value = serde_json::from_slice(&req.body).unwrap_or_else(|e| {
            panic!(
                "binary-mode body is not JSON ({e}); content-type {ct:?}, headers {:?}, body {}",
                req.headers,
                String::from_utf8_lossy(&req.body)
            )
        });
        if !ct.is_empty() {
            obj.insert("datacontenttype".into(), Value::String(ct));
        }
        obj.insert("data".into(), data);
        let v = Value::Object(obj);
        let text = format!(
            "headers {:?} body {}",
            req.headers,
            String::from_utf8_lossy(&req.body)
        );
        let ev: cloudevents::Event = serde_json::from_value(v.clone()).unwrap_or_else(|e| {
            panic!(
                "binary-mode request is not a valid CloudEvent per cloudevents-sdk ({e}): {text}"
            )
        });
        let spec = req.header("ce-specversion").unwrap_or("").to_string();
        assert_eq!(spec, "1.0", "ce-specversion must be \"1.0\": {text}");
        Self::from_sdk(ev, &spec, req, &text)
    }

    fn from_sdk(ev: cloudevents::Event, spec: &str, req: &Request, text: &str) -> Event {
        let mut extensions = BTreeMap::new();
        let mut sequence_is_string = false;
        for (name, value) in ev.iter_extensions() {
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
                "extension name {name:?} must be lower-case alphanumeric: {text}"
            );
            let s = match value {
                ExtensionValue::String(s) => {
                    if name == "sequence" {
                        sequence_is_string = true;
                    }
                    s.clone()
                }
                ExtensionValue::Integer(i) => i.to_string(),
                ExtensionValue::Boolean(b) => b.to_string(),
            };
            extensions.insert(name.to_string(), s);
        }
        assert!(!ev.id().is_empty(), "id must not be empty: {text}");
        assert!(!ev.source().is_empty(), "source must not be empty: {text}");
        assert!(!ev.ty().is_empty(), "type must not be empty: {text}");
        let data = match ev.data() {
            Some(cloudevents::Data::Json(v)) => v.clone(),
            Some(cloudevents::Data::String(s)) => {
                serde_json::from_str(s).unwrap_or(Value::String(s.clone()))
            }
            Some(cloudevents::Data::Binary(b)) => serde_json::from_slice(b)
                .unwrap_or_else(|_| panic!("binary data is not JSON: {text}")),
            None => Value::Null,
        };
        Event {
            specversion: spec.to_string(),
            id: ev.id().to_string(),
            source: ev.source().to_string(),
            ty: ev.ty().to_string(),
            subject: ev.subject().map(str::to_string),
            time: ev.time().cloned(),
            datacontenttype: ev.datacontenttype().map(str::to_string),
            sequence: extensions.get("sequence").and_then(|s| s.parse().ok()),
            extensions,
            sequence_is_string,
            data,
            headers: req.headers.clone(),
            body: req.body.clone(),
        }
    }
}

/// Decodes `%XX` escapes (CloudEvents HTTP binding, binary-mode header values).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(x) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------------

/// A config for the common case: one MQTT source, optional HTTP sink, admin endpoint.
/// Tests tweak the fields, then render with [`TestConfig::toml`]. `data_dir` and the
/// rules directory are relative, so they resolve inside the agent's temp dir.
#[derive(Debug, Clone)]
pub struct TestConfig {
    pub agent_id: String,
    pub broker_port: u16,
    pub topics: Vec<String>,
    pub qos: u8,
    pub max_payload: Option<String>,
    /// `(url, mode)` of the HTTP sink.
    pub http: Option<(String, String)>,
    pub batch_max: usize,
    pub admin_port: u16,
    pub console: bool,
    /// `[store] max_bytes`.
    pub store_max_bytes: String,
    /// `[store] when_full`: `drop_oldest` or `reject_new`.
    pub when_full: String,
    /// Appended verbatim.
    pub extra: String,
}

impl TestConfig {
    pub fn new(agent_id: &str, broker: &Mosquitto) -> Self {
        TestConfig {
            agent_id: agent_id.to_string(),
            broker_port: broker.port(),
            topics: vec!["sensors/+/telemetry".to_string()],
            qos: 1,
            max_payload: None,
            http: None,
            batch_max: 100,
            admin_port: free_port(),
            console: false,
            store_max_bytes: "64MiB".to_string(),
            when_full: "drop_oldest".to_string(),
            extra: String::new(),
        }
    }

    /// Adds an HTTP sink named `cloud` posting to `url` in `mode`.
    pub fn http(mut self, url: &str, mode: &str) -> Self {
        self.http = Some((url.to_string(), mode.to_string()));
        self
    }

    /// The MQTT client id the agent uses by default.
    pub fn client_id(&self) -> String {
        format!("ferry-{}-local", self.agent_id)
    }

    /// `/ferry/{agent.id}/mqtt/local`
    pub fn source(&self) -> String {
        format!("/ferry/{}/mqtt/local", self.agent_id)
    }

    pub fn toml(&self) -> String {
        let topics = self
            .topics
            .iter()
            .map(|t| format!("{t:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut s = format!(
            r#"[agent]
id = "{id}"
data_dir = "data"

[admin]
listen = "127.0.0.1:{admin}"

[[source.mqtt]]
name = "local"
url = "mqtt://127.0.0.1:{broker}"
topics = [{topics}]
qos = {qos}
device = "{{topic.1}}"
reconnect = {{ min = "100ms", max = "1s" }}
"#,
            id = self.agent_id,
            admin = self.admin_port,
            broker = self.broker_port,
            qos = self.qos,
        );
        if let Some(mp) = &self.max_payload {
            s.push_str(&format!("max_payload = {mp:?}\n"));
        }
        s.push_str(&format!(
            "\n[rules]\ndir = \"rules\"\n\n[store]\nmax_bytes = {:?}\nwhen_full = {:?}\n",
            self.store_max_bytes, self.when_full
        ));
        if let Some((url, mode)) = &self.http {
            s.push_str(&format!(
                r#"
[[sink.http]]
name = "cloud"
url = "{url}"
mode = "{mode}"
batch_max = {batch_max}
max_in_flight = 1
timeout = "5s"
retry = {{ min = "100ms", max = "1s" }}
"#,
                batch_max = self.batch_max
            ));
        }
        if self.console || self.http.is_none() {
            s.push_str("\n[[sink.console]]\nname = \"stdout\"\n");
        }
        s.push_str(&self.extra);
        s
    }
}

/// The real `ferry` binary: the one cargo built, or the one `FERRY_BIN` names (so a
/// benchmark can measure another build, e.g. a static musl binary, with the same
/// harness).
pub fn ferry() -> Command {
    match std::env::var_os("FERRY_BIN") {
        Some(bin) if !bin.is_empty() => Command::new(bin),
        _ => Command::new(env!("CARGO_BIN_EXE_ferry")),
    }
}

/// A running `ferry run`, with its config, rules and data in a temp dir.
pub struct Agent {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    admin_port: Option<u16>,
    child: Option<Child>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    runs: usize,
}

impl Agent {
    /// Writes `config` as `ferry.toml` and each `(file name, text)` of `rules` into
    /// `rules/`, then starts `ferry run --config ferry.toml`.
    pub fn start(config: &str, rules: &[(&str, &str)]) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir for the agent");
        let config_path = dir.path().join("ferry.toml");
        std::fs::write(&config_path, config).unwrap();
        let rules_dir = dir.path().join("rules");
        std::fs::create_dir_all(&rules_dir).unwrap();
        for (name, text) in rules {
            std::fs::write(rules_dir.join(name), text).unwrap();
        }
        let admin_port = toml::from_str::<toml::Table>(config).ok().and_then(|t| {
            t.get("admin")?
                .get("listen")?
                .as_str()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        });
        let mut agent = Agent {
            dir,
            config_path,
            admin_port,
            child: None,
            stdout: Arc::new(Mutex::new(String::new())),
            stderr: Arc::new(Mutex::new(String::new())),
            runs: 0,
        };
        agent.start_again();
        agent
    }

    /// Starts the agent again on the same config and data dir (after [`Agent::stop`]).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the agent is already running");
        self.runs += 1;
        let banner = format!("==== ferry run #{} ====\n", self.runs);
        self.stderr.lock().unwrap().push_str(&banner);
        let mut child = ferry()
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry run");
        capture(child.stdout.take().unwrap(), self.stdout.clone());
        capture(child.stderr.take().unwrap(), self.stderr.clone());
        self.child = Some(child);
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Sends SIGTERM and waits for the exit (failing the test if it takes longer
    /// than [`DEADLINE`]).
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the agent is not running");
        signal(&child, libc::SIGTERM);
        match wait_with_deadline(&mut child, DEADLINE) {
            Some(status) => status,
            None => {
                kill_and_reap(&mut child);
                panic!(
                    "ferry did not exit within {DEADLINE:?} of SIGTERM; stderr:\n{}",
                    tail(&self.stderr(), 40)
                );
            }
        }
    }

    /// Kills the agent with SIGKILL, as a power cut or the OOM killer would: no
    /// shutdown code runs, so only what was already committed survives.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("the agent is not running");
        signal(&child, libc::SIGKILL);
        let status = child.wait().expect("reap the killed agent");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "the agent exited before it was killed ({status}); stderr:\n{}",
            tail(&self.stderr(), 40)
        );
        self.stderr
            .lock()
            .unwrap()
            .push_str("---- killed (SIGKILL) ----\n");
    }

    /// Waits for the agent to exit by itself (failing the test after
    /// [`DEADLINE`]) and returns how it exited.
    pub fn wait_for_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the agent is not running");
        match wait_with_deadline(&mut child, DEADLINE) {
            Some(status) => status,
            None => {
                kill_and_reap(&mut child);
                panic!(
                    "ferry did not exit within {DEADLINE:?}; stderr:\n{}",
                    tail(&self.stderr(), 40)
                );
            }
        }
    }

    /// Fails the test (with the agent's log) if the agent has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "ferry exited unexpectedly with {status}; stderr:\n{}",
                    tail(&self.stderr(), 60)
                );
            }
        } else {
            panic!("the agent is not running");
        }
    }

    /// Like [`eventually`], but fails at once if the agent dies meanwhile.
    pub fn eventually<T>(
        &mut self,
        what: &str,
        mut cond: impl FnMut(&mut Agent) -> Result<T, String>,
    ) -> T {
        let start = Instant::now();
        loop {
            self.assert_running();
            match cond(self) {
                Ok(v) => return v,
                Err(last) => {
                    if start.elapsed() > DEADLINE {
                        panic!(
                            "timed out after {DEADLINE:?} waiting for {what}; last seen: {last}"
                        );
                    }
                }
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends SIGHUP (reload the rules).
    pub fn hup(&self) {
        signal(
            self.child.as_ref().expect("the agent is running"),
            libc::SIGHUP,
        );
    }

    /// The running agent's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr_contains(&self, needle: &str) -> bool {
        self.stderr().contains(needle)
    }

    /// Scrapes `GET /metrics` once; `Err` if the endpoint does not answer.
    pub fn try_metrics(&self) -> Result<Metrics, String> {
        let port = self.admin_port.expect("the config has no [admin] listen");
        scrape(port)
    }

    /// Scrapes `GET /metrics`, waiting for the endpoint to come up.
    pub fn metrics(&mut self) -> Metrics {
        self.eventually("the admin endpoint to serve /metrics", |a| a.try_metrics())
    }

    /// Waits until metric `name` (summed over series matching `labels`) reaches
    /// `at_least`.
    pub fn wait_for_metric(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        at_least: f64,
    ) -> Metrics {
        self.eventually(&format!("{name}{labels:?} >= {at_least}"), |a| {
            let m = a.try_metrics()?;
            if m.value(name, labels) >= at_least {
                Ok(m)
            } else {
                Err(format!(
                    "{name}{labels:?} = {}; ferry_* series: {}",
                    m.value(name, labels),
                    m.ferry_lines()
                ))
            }
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
        if std::thread::panicking() {
            eprintln!(
                "---- ferry stderr (last 60 lines) ----\n{}\n",
                tail(&self.stderr(), 60)
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------

/// One scrape of the Prometheus text endpoint.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub text: String,
    /// `(name, labels, value)` per sample line.
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, labels, rest) = match line.find('{') {
                Some(open) => {
                    let close = line.rfind('}').unwrap_or(line.len());
                    (
                        &line[..open],
                        parse_labels(&line[open + 1..close]),
                        line[close + 1..].trim(),
                    )
                }
                None => {
                    let mut it = line.splitn(2, char::is_whitespace);
                    (
                        it.next().unwrap(),
                        BTreeMap::new(),
                        it.next().unwrap_or("").trim(),
                    )
                }
            };
            let value = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok());
            if let Some(v) = value {
                samples.push((name.to_string(), labels, v));
            }
        }
        Metrics {
            text: text.to_string(),
            samples,
        }
    }

    /// The sum of every series of `name` whose labels include all of `labels`
    /// (0 if there is none).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Whether any series of `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }

    /// The `ferry_*` sample lines, for failure messages.
    pub fn ferry_lines(&self) -> String {
        self.text
            .lines()
            .filter(|l| l.starts_with("ferry_"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(',') | Some(' ')) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next() != Some('=') || chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key.trim().to_string(), value);
    }
    out
}

/// `GET /metrics` over a raw TCP connection (HTTP/1.0: no chunked encoding).
pub fn scrape(port: u16) -> Result<Metrics, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header end in {raw:?}"))?;
    let status_line = head.lines().next().unwrap_or("");
    if !status_line.contains(" 200") {
        return Err(format!("/metrics answered {status_line:?}"));
    }
    Ok(Metrics::parse(body))
}

// ---------------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------------

/// The threshold rule most tests use.
pub const TOO_HOT_RULE: &str = r#"[[rule]]
id = "too-hot"
when = "temperature > 30"
emit = { type = "com.example.too-hot", severity = "warning" }
"#;
