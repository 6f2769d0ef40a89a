//! A full disk: commits fail, the agent stops acknowledging, keeps delivering, and
//! resumes by itself when space returns. The store lives on a small tmpfs the test
//! mounts (it needs root, as CI has).

mod support;

use serde_json::json;
use support::*;

const TOPIC: &str = "sensors/freezer-1/telemetry";

mod mount {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
    pub struct Tmpfs {
        pub dir: tempfile::TempDir,
    }

    impl Tmpfs {
        pub fn new(size: &str) -> Self {
            let dir = tempfile::tempdir().expect("a directory to mount on");
            let ok = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(
                ok,
                "mounting a tmpfs needs root (CI runs the tests as root)"
            );
            Tmpfs { dir }
        }

        pub fn path(&self) -> PathBuf {
            self.dir.path().to_path_buf()
        }

        /// Fills the filesystem with a file until less than `leave` bytes are free.
        pub fn fill(&self, leave: u64) -> PathBuf {
            let filler = self.dir.path().join("filler");
            let free = free_bytes(self.dir.path());
            let size = free.saturating_sub(leave);
            std::fs::write(&filler, vec![0u8; size as usize]).expect("write the filler");
            filler
        }
    }

    pub fn free_bytes(path: &Path) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(path)
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.dir.path()).status();
        }
    }
}

fn reading(seq: u64, pad: usize) -> String {
    json!({"temperature": -18.0, "seq": seq, "pad": "x".repeat(pad)}).to_string()
}

#[test]
fn on_a_full_disk_input_waits_unacknowledged_stored_events_keep_flowing_and_all_arrive_when_space_returns(
) {
    let disk = mount::Tmpfs::new("16m");
    let data = disk.path().join("data");
    let broker = Mosquitto::start();
    let upstream = DownPort::hold();
    let config = TestConfig::new("gw-disk-full", &broker).http(&upstream.url(), "batch");
    let toml = config.toml().replace(
        "data_dir = \"data\"",
        &format!("data_dir = \"{}\"", data.display()),
    );
    let mut agent = Agent::start(&toml, &[]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");

    // Stored while the upstream is down.
    let mut seq = 0;
    while seq < 20 {
        broker.publish(TOPIC, reading(seq, 100), 1);
        seq += 1;
    }
    agent.wait_for_metric("ferry_store_committed_total", &[], 20.0);

    // The disk fills up: readings keep coming until a commit finds no room.
    let filler = disk.fill(64 * 1024);
    let stuck = agent.eventually("a commit to fail for lack of space", |a| {
        if a.stderr_contains("disk full: holding input") {
            return Ok(seq);
        }
        broker.publish(TOPIC, reading(seq, 20_000), 1);
        seq += 1;
        Err(format!("{seq} published, no commit failed yet"))
    });
    let acked = broker.pubacks_from(&config.client_id());
    for _ in 0..5 {
        broker.publish(TOPIC, reading(seq, 100), 1);
        seq += 1;
    }
    let published = seq;

    // The upstream comes back while the disk is still full: what was stored flows.
    let receiver = Receiver::on(upstream);
    receiver.wait_for_readings("the readings stored before the disk filled", |r| {
        (0..20).all(|s| r.iter().any(|e| e.seq() == Some(s)))
    });
    assert_eq!(
        broker.pubacks_from(&config.client_id()),
        acked,
        "nothing is acknowledged while no commit can be made (reading {stuck} on)"
    );

    // Space returns: everything published arrives, without anyone stepping in.
    std::fs::remove_file(filler).expect("remove the filler");
    let readings = receiver.wait_for_readings("every reading published", |r| {
        (0..published).all(|s| r.iter().any(|e| e.seq() == Some(s)))
    });
    assert!(readings.len() as u64 >= published);
    assert_eq!(
        agent.stderr().matches("disk full: holding input").count(),
        1,
        "logged once"
    );
    assert!(agent.stop().success());
}
