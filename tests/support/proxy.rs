//! A TCP proxy between the agent and the broker that reads the MQTT packets the
//! agent sends and can swallow its PUBACKs, or cut every connection: the broker then
//! never learns that a reading was committed, which is the moment a crash or a lost
//! connection between commit and PUBACK would leave behind, made on purpose.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// MQTT control packet type of PUBACK (the high nibble of the first byte).
const PUBACK: u8 = 4;

pub struct MqttProxy {
    port: u16,
    drop_pubacks: Arc<AtomicBool>,
    dropped: Arc<AtomicUsize>,
    /// Both ends of every connection, to cut them.
    streams: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl MqttProxy {
    /// Listens on a free loopback port and forwards each connection to
    /// `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> MqttProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let port = listener.local_addr().expect("bound").port();
        let proxy = MqttProxy {
            port,
            drop_pubacks: Arc::new(AtomicBool::new(false)),
            dropped: Arc::new(AtomicUsize::new(0)),
            streams: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (drop_pubacks, dropped, streams, stop) = (
            proxy.drop_pubacks.clone(),
            proxy.dropped.clone(),
            proxy.streams.clone(),
            proxy.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                let Ok(broker) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = broker.set_nodelay(true);
                {
                    let mut all = streams.lock().unwrap();
                    all.push(client.try_clone().expect("clone a stream"));
                    all.push(broker.try_clone().expect("clone a stream"));
                }
                let (to_broker, from_client) = (
                    broker.try_clone().expect("clone"),
                    client.try_clone().expect("clone"),
                );
                let (drop_pubacks, dropped) = (drop_pubacks.clone(), dropped.clone());
                std::thread::spawn(move || {
                    agent_to_broker(from_client, to_broker, &drop_pubacks, &dropped)
                });
                std::thread::spawn(move || copy(broker, client));
            }
        });
        proxy
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on, PUBACKs from the agent are swallowed (or, with `false`, passed).
    pub fn drop_pubacks(&self, on: bool) {
        self.drop_pubacks.store(on, Ordering::SeqCst);
    }

    /// PUBACKs swallowed so far.
    pub fn dropped_pubacks(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Closes every connection, as a network outage would; new ones are accepted.
    pub fn cut(&self) {
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for MqttProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Forwards whole MQTT packets, leaving out PUBACKs while `drop_pubacks` is set.
fn agent_to_broker(
    mut from: TcpStream,
    mut to: TcpStream,
    drop_pubacks: &AtomicBool,
    dropped: &AtomicUsize,
) {
    let mut forward = || -> std::io::Result<()> {
        loop {
            let mut packet = vec![0u8; 1];
            from.read_exact(&mut packet)?;
            // Remaining length: up to four bytes, seven bits each.
            let mut len = 0usize;
            for shift in 0..4 {
                let mut b = [0u8; 1];
                from.read_exact(&mut b)?;
                packet.push(b[0]);
                len |= usize::from(b[0] & 0x7f) << (7 * shift);
                if b[0] & 0x80 == 0 {
                    break;
                }
            }
            let start = packet.len();
            packet.resize(start + len, 0);
            from.read_exact(&mut packet[start..])?;
            if packet[0] >> 4 == PUBACK && drop_pubacks.load(Ordering::SeqCst) {
                dropped.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            to.write_all(&packet)?;
        }
    };
    let _ = forward();
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
