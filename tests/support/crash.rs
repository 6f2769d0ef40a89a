//! A QoS 1 publisher that keeps going while the agent is killed and restarted, and
//! the crash battery built on it: SIGKILL after SIGKILL at random moments (while
//! committing, sending, reloading rules), then count what arrived upstream.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::json;

use super::{eventually, eventually_within, Agent, Mosquitto, Receiver, TestConfig};

/// A publisher that keeps publishing QoS 1 (one reading every `every`) until
/// finished; stops too when dropped (also while unwinding from a failed assertion).
pub struct Stream {
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Stream {
    pub fn start(broker: &Mosquitto, topic: &str, every: Duration) -> Stream {
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut publisher = broker.line_publisher(topic, 1);
        let thread = {
            let (sent, stop) = (sent.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    publisher.send(
                        &json!({"pressure": 1.0 + (i % 10) as f64 / 10.0, "seq": i}).to_string(),
                    );
                    i += 1;
                    sent.store(i, Ordering::Relaxed);
                    // Pacing, not synchronisation: a steady stream rather than a burst.
                    std::thread::sleep(every);
                }
                publisher.finish(); // waits for every PUBACK from the broker
                i
            })
        };
        Stream {
            sent,
            stop,
            thread: Some(thread),
        }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn is_publishing(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits until the publisher has published `more` readings beyond now.
    pub fn wait_for_more(&self, more: u64) {
        let from = self.sent();
        eventually(&format!("{more} more readings to be published"), || {
            let now = self.sent();
            if now >= from + more {
                Ok(())
            } else {
                Err(format!("{now} sent"))
            }
        });
    }

    /// Stops publishing; the number of readings the broker acknowledged.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("publisher thread")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a crash battery saw.
#[derive(Debug)]
pub struct Battery {
    pub seed: u64,
    pub kills: usize,
    /// Readings the broker acknowledged to the publisher.
    pub published: u64,
    /// Of those, how many never arrived upstream.
    pub lost: u64,
    /// Events that arrived more than once with the same `source` + `id` (resends a
    /// receiver drops).
    pub resends: usize,
    /// Readings that arrived under two or more different ids.
    pub two_ids: usize,
    /// `source` + `id` pairs that arrived with two different payloads (must be 0).
    pub id_reused: usize,
}

/// A small deterministic generator for the kill moments (xorshift64*), so a
/// failing run can be repeated with its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

const TOPIC: &str = "sensors/battery/telemetry";
const RULE: &str =
    "[[rule]]\nid = \"high\"\nwhen = \"pressure > 1.8\"\nemit = { type = \"com.example.high\" }\n";

/// Runs the agent (MQTT in, HTTP batch out, one alert rule) under a steady QoS 1
/// stream and kills it with SIGKILL `kills` times, each after a random 0 to 400 ms
/// of life, sometimes right after saving a rule file (so the kill may land in a
/// reload), restarting it each time on the same store. Then waits (up to
/// `settle`) for every published reading to arrive and counts.
pub fn run_battery(kills: usize, seed: u64, settle: Duration) -> Battery {
    run_battery_on(None, kills, seed, settle)
}

/// [`run_battery`] on the given store backend (`None`: the default).
pub fn run_battery_on(backend: Option<&str>, kills: usize, seed: u64, settle: Duration) -> Battery {
    // No cap on the broker's queue: a reading missing upstream is the agent's doing.
    let broker = Mosquitto::start_with("max_queued_messages 0");
    let receiver = Receiver::start();
    let config = TestConfig::new("gw-battery", &broker).http(&receiver.url(), "batch");
    let mut toml = config.toml();
    if let Some(backend) = backend {
        toml = toml.replace("[store]\n", &format!("[store]\nbackend = {backend:?}\n"));
    }
    let mut agent = Agent::start(&toml, &[("high.toml", RULE)]);
    broker.wait_for_subscription(&config.client_id(), "sensors/+/telemetry");
    let stream = Stream::start(&broker, TOPIC, Duration::from_millis(2));
    let mut rng = Rng(seed | 1);
    for k in 0..kills {
        if k % 5 == 4 {
            let rules = agent.dir().join("rules");
            let tmp = rules.join(".high.toml.swp");
            let text = RULE.replace("1.8", if k % 10 == 4 { "1.7" } else { "1.8" });
            std::fs::write(&tmp, text).expect("write a rule file");
            std::fs::rename(&tmp, rules.join("high.toml")).expect("save a rule file");
        }
        // Not synchronisation: the random moment of the crash is the point.
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        agent.kill();
        agent.start_again();
    }
    stream.wait_for_more(50);
    let published = stream.finish();

    let readings = eventually_within(settle, "every published reading upstream", || {
        let r = receiver.readings();
        let seqs: BTreeSet<u64> = r.iter().filter_map(|e| e.seq()).collect();
        if (0..published).all(|s| seqs.contains(&s)) {
            Ok(r)
        } else {
            Err(format!("{} of {published} arrived", seqs.len()))
        }
    });
    let seqs: BTreeSet<u64> = readings.iter().filter_map(|e| e.seq()).collect();
    let lost = (0..published).filter(|s| !seqs.contains(s)).count() as u64;
    let mut copies: HashMap<(String, String), Vec<serde_json::Value>> = HashMap::new();
    let mut ids_of: HashMap<u64, HashSet<(String, String)>> = HashMap::new();
    for e in &readings {
        let key = (e.source.clone(), e.id.clone());
        copies.entry(key.clone()).or_default().push(e.data.clone());
        if let Some(seq) = e.seq() {
            ids_of.entry(seq).or_default().insert(key);
        }
    }
    let resends = copies.values().map(|c| c.len() - 1).sum();
    let id_reused = copies
        .values()
        .filter(|c| c.iter().any(|d| d != &c[0]))
        .count();
    let two_ids = ids_of.values().filter(|ids| ids.len() > 1).count();
    assert!(agent.stop().success(), "ferry must exit 0 on SIGTERM");
    Battery {
        seed,
        kills,
        published,
        lost,
        resends,
        two_ids,
        id_reused,
    }
}
