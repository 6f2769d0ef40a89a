//! A serial cable the tests can pull out: a pty pair made by socat, whose links
//! disappear when it is unplugged and come back when it is replugged.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::eventually;

/// A pty pair made by socat: the agent opens `port`, the test writes to (or serves)
/// `sensor`.
pub struct Cable {
    dir: PathBuf,
    name: String,
    child: Option<Child>,
}

impl Cable {
    pub fn plug(dir: &Path, name: &str) -> Cable {
        let mut c = Cable {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            child: None,
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

    pub fn replug(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", self.port().display()))
            .arg(format!("pty,raw,echo=0,link={}", self.sensor().display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn socat (apt-get install -y socat)");
        self.child = Some(child);
        let (port, sensor) = (self.port(), self.sensor());
        eventually("socat to create the pty links", || {
            if port.exists() && sensor.exists() {
                Ok(())
            } else {
                Err("links not there yet".to_string())
            }
        });
    }

    pub fn unplug(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let port = self.port();
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
}

impl Drop for Cable {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
