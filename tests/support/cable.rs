//! A serial cable the tests can pull out: a pty pair made by socat, whose links
//! disappear when it is unplugged and come back when it is replugged.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use super::eventually;

/// A pty pair made by socat: the agent opens `port`, the test writes to (or serves)
/// `sensor`.
pub struct Cable {
    dir: PathBuf,
    name: String,
    child: Option<Child>,
    /// The device end, held open while plugged in (see [`Cable::replug`]).
    device: Option<std::fs::File>,
}

impl Cable {
    pub fn plug(dir: &Path, name: &str) -> Cable {
        let mut c = Cable {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            child: None,
            device: None,
        };
        c.replug();
        c
    }

    pub fn port(&self) -> PathBuf {
        self.dir.join(format!("{}-port", self.name))
    }

    pub fn sensor(&self) -> PathBuf {
        self.dir.join(format!("{}-sensor", self.name))
    }

    /// Where socat makes the port link before it is moved to [`Cable::port`].
    fn staged(&self) -> PathBuf {
        self.dir.join(format!("{}-port.staged", self.name))
    }

    pub fn replug(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", self.staged().display()))
            .arg(format!("pty,raw,echo=0,link={}", self.sensor().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn socat (apt-get install -y socat)");
        self.child = Some(child);
        let (staged, sensor) = (self.staged(), self.sensor());
        eventually("socat to create the pty links", || {
            if staged.exists() && sensor.exists() {
                Ok(())
            } else {
                Err("links not there yet".to_string())
            }
        });
        // As with a real adapter, the device is connected before the port appears:
        // a tty forgets what was written to it while nobody had it open, so a port
        // the agent could open first would lose the agent's first writes.
        self.device = Some(std::fs::File::open(&sensor).expect("open the device end"));
        std::fs::rename(&staged, self.port()).expect("move the port link into place");
    }

    pub fn unplug(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.device = None;
        let port = self.port();
        // socat was killed without a chance to remove its links.
        let _ = std::fs::remove_file(&port);
        eventually("socat to remove the pty links", || {
            if port.exists() {
                Err("still there".to_string())
            } else {
                Ok(())
            }
        });
    }

    pub fn send(&self, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.sensor())
            .expect("open the sensor end");
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
    }

    /// Starts collecting what the agent writes to the port, as the device would.
    pub fn listen(&self) -> Heard {
        let mut f = std::fs::File::open(self.sensor()).expect("open the sensor end");
        let heard = Heard(Arc::new(Mutex::new(Vec::new())));
        let into = Arc::clone(&heard.0);
        // Ends when the cable is unplugged (the read fails or returns 0).
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n @ 1..) = f.read(&mut buf) {
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        heard
    }
}

/// The bytes a device end received.
pub struct Heard(Arc<Mutex<Vec<u8>>>);

impl Heard {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Drop for Cable {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
