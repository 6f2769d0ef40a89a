//! A real `nats-server` with JetStream on a free loopback port (Debian's
//! `nats-server` package), its log captured, killed on drop.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{capture, eventually, free_port, kill_and_reap, tail};

/// A real nats-server with JetStream, storing in its own temp dir.
pub struct NatsServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl NatsServer {
    /// Starts a server with JetStream and no authentication.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// [`NatsServer::start`] with extra lines for its config file
    /// (`authorization { token: "..." }`, `tls { ... }`, `max_payload: 1024`).
    pub fn start_with(extra_conf: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for nats-server");
        let port = free_port();
        let conf = dir.path().join("nats-server.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?} }}\n{extra_conf}\n",
                dir.path().join("js").display().to_string()
            ),
        )
        .unwrap();
        let bin = nats_server();
        // The port may have been taken since it was found free: retry the spawn.
        let (child, log) = eventually(&format!("nats-server listening on port {port}"), || {
            let log = Arc::new(Mutex::new(String::new()));
            let mut child = Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn nats-server");
            capture(child.stdout.take().unwrap(), log.clone());
            capture(child.stderr.take().unwrap(), log.clone());
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Some(status) = child.try_wait().unwrap() {
                    return Err(format!(
                        "nats-server exited with {status}: {}",
                        log.lock().unwrap()
                    ));
                }
                if log.lock().unwrap().contains("Server is ready")
                    && TcpStream::connect(("127.0.0.1", port)).is_ok()
                {
                    return Ok((child, log));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            kill_and_reap(&mut child);
            Err(format!(
                "nats-server not ready after 10s: {}",
                log.lock().unwrap()
            ))
        });
        NatsServer {
            port,
            dir,
            child: Some(child),
            log,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A directory for the test's own files (secrets, certificates).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
        if std::thread::panicking() {
            eprintln!(
                "---- nats-server log (last 40 lines) ----\n{}\n",
                tail(&self.log(), 40)
            );
        }
    }
}

/// `nats-server` from PATH or Debian's /usr/sbin.
fn nats_server() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("nats-server"))
            .find(|f| f.is_file())
    });
    let bin = on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"));
    assert!(
        bin.is_file(),
        "`nats-server` is not installed: the NATS tests need Debian's `nats-server` \
         package (apt-get install -y nats-server)"
    );
    bin
}
