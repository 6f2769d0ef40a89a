//! `ferry dead-letters list | show | replay | purge`, on a stopped agent's store or
//! through a running agent's admin endpoint.
//!
//! A running agent holds its store exclusively (redb locks the file), so the
//! command first asks the agent at its `[admin] listen` address; if nothing
//! answers there, it opens the store itself. Both ways run the same [`perform`],
//! so they answer alike.
//!
//! The endpoints (`GET /dead-letters`, `GET /dead-letters/{id}`,
//! `POST /dead-letters[/{id}]/replay`, `POST /dead-letters[/{id}]/purge`) show
//! readings and change the store, so they are stricter than `/metrics`: they answer
//! only clients on loopback (unless `[admin] remote_dead_letters = true`), only
//! requests carrying `X-Ferry-Admin: 1` (a browser cannot send it to another site
//! without a CORS preflight, which the endpoint never grants) and only a `Host`
//! that is an IP address or `localhost` (so a DNS name rebound to the gateway
//! cannot reach them from a web page).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::{DeadLetter, Replayed, Store, StoreError};

/// The header every dead-letter request must carry.
pub const HEADER: &str = "x-ferry-admin";

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    List,
    Show(u64),
    /// One dead letter, or all with `None`.
    Replay(Option<u64>),
    Purge(Option<u64>),
}

/// One line of `list`: everything but the record's data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub id: u64,
    pub sink: String,
    pub seq: u64,
    pub event_id: String,
    pub reason: String,
    pub at: DateTime<Utc>,
    #[serde(rename = "type")]
    pub event_type: String,
    pub subject: String,
}

impl From<&DeadLetter> for Summary {
    fn from(d: &DeadLetter) -> Self {
        Summary {
            id: d.id,
            sink: d.sink.clone(),
            seq: d.seq,
            event_id: d.origin.event_id(),
            reason: d.reason.clone(),
            at: d.at,
            event_type: d.record.event_type.clone(),
            subject: d.record.subject.clone(),
        }
    }
}

/// What an action found or did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    List(Vec<Summary>),
    Show(Box<DeadLetter>),
    Replayed(Replayed),
    Purged(u64),
    NotFound(u64),
}

/// Runs `action` on an open store.
pub fn perform(store: &dyn Store, action: Action) -> Result<Outcome, StoreError> {
    Ok(match action {
        Action::List => Outcome::List(store.dead_letters()?.iter().map(Summary::from).collect()),
        Action::Show(id) => match store.dead_letter(id)? {
            Some(d) => Outcome::Show(Box::new(d)),
            None => Outcome::NotFound(id),
        },
        Action::Replay(Some(id)) => {
            let r = store.replay_dead_letters(Some(&[id]))?;
            if r.missing.contains(&id) {
                Outcome::NotFound(id)
            } else {
                Outcome::Replayed(r)
            }
        }
        Action::Replay(None) => Outcome::Replayed(store.replay_dead_letters(None)?),
        Action::Purge(Some(id)) => match store.purge_dead_letters(Some(&[id]))? {
            0 => Outcome::NotFound(id),
            n => Outcome::Purged(n),
        },
        Action::Purge(None) => Outcome::Purged(store.purge_dead_letters(None)?),
    })
}

/// The text the command prints.
pub fn render(outcome: &Outcome) -> String {
    match outcome {
        Outcome::List(list) if list.is_empty() => "no dead letters\n".to_string(),
        Outcome::List(list) => {
            let mut out = format!(
                "{:>6}  {:<16}  {:<24}  {:<12}  {:<20}  {:<24}  {}\n",
                "ID", "SINK", "EVENT ID", "REASON", "AT", "TYPE", "SUBJECT"
            );
            for s in list {
                out.push_str(&format!(
                    "{:>6}  {:<16}  {:<24}  {:<12}  {:<20}  {:<24}  {}\n",
                    s.id,
                    s.sink,
                    s.event_id,
                    s.reason,
                    s.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    s.event_type,
                    s.subject.escape_debug()
                ));
            }
            out
        }
        Outcome::Show(d) => {
            // Serialising our own types cannot fail.
            let mut text = serde_json::to_string_pretty(d).unwrap_or_default();
            text.push('\n');
            text
        }
        Outcome::Replayed(r) => {
            let mut out = String::new();
            for (id, seq) in &r.replayed {
                out.push_str(&format!(
                    "replayed dead letter {id} (stored again as {seq})\n"
                ));
            }
            for id in &r.unknown_sink {
                out.push_str(&format!(
                    "kept dead letter {id}: its sink is no longer configured\n"
                ));
            }
            out.push_str(&format!("{} replayed\n", r.replayed.len()));
            out
        }
        Outcome::Purged(n) => format!("{n} purged\n"),
        Outcome::NotFound(id) => format!("no dead letter {id}\n"),
    }
}

// ---------------------------------------------------------------------------------
// The endpoints, served by the admin listener (`telemetry`).
// ---------------------------------------------------------------------------------

/// The running agent's side: the store and the sinks' wake-up, once the store is
/// open (the listener starts before it).
pub struct Api {
    remote: bool,
    inner: OnceLock<(Arc<dyn Store>, watch::Sender<u64>)>,
}

/// One answer: status, content type, body.
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    /// For a 405: the methods the path takes.
    pub allow: &'static str,
}

impl Answer {
    fn error(status: u16, message: &str) -> Answer {
        Answer {
            status,
            body: serde_json::json!({ "error": message }).to_string(),
            allow: "",
        }
    }
}

/// The request as far as the endpoints look at it.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub peer: SocketAddr,
    /// The `Host` header.
    pub host: Option<&'a str>,
    /// Whether `X-Ferry-Admin: 1` came with it.
    pub marked: bool,
}

impl Api {
    /// `remote`: answer clients that are not on loopback too.
    pub fn new(remote: bool) -> Arc<Api> {
        Arc::new(Api {
            remote,
            inner: OnceLock::new(),
        })
    }

    /// Serves the store from now on; `head` wakes the sinks after a replay.
    pub fn attach(&self, store: Arc<dyn Store>, head: watch::Sender<u64>) {
        // Set once, at start; a second call would be a wiring mistake, and
        // keeping the first is harmless.
        let _ = self.inner.set((store, head));
    }

    pub async fn handle(&self, req: &Request<'_>) -> Answer {
        if !self.remote && !req.peer.ip().to_canonical().is_loopback() {
            return Answer::error(
                403,
                "dead letters are served to loopback clients only ([admin] remote_dead_letters)",
            );
        }
        if !req.marked {
            return Answer::error(403, "dead-letter requests need the header X-Ferry-Admin: 1");
        }
        if !req.host.is_some_and(host_is_address) {
            return Answer::error(
                403,
                "dead-letter requests need a Host that is an IP address or localhost",
            );
        }
        let action = match parse(req.method, req.path) {
            Ok(a) => a,
            Err(answer) => return answer,
        };
        let Some((store, head)) = self.inner.get() else {
            return Answer::error(503, "the store is not open yet");
        };
        let outcome = crate::sinks::blocking(store, move |s| perform(s, action)).await;
        match outcome {
            Ok(outcome) => {
                if let Outcome::Replayed(r) = &outcome {
                    if !r.replayed.is_empty() {
                        head.send_replace(store.stats().next);
                    }
                }
                let status = if matches!(outcome, Outcome::NotFound(_)) {
                    404
                } else {
                    200
                };
                Answer {
                    status,
                    // Serialising our own types cannot fail.
                    body: serde_json::to_string(&outcome).unwrap_or_default(),
                    allow: "",
                }
            }
            Err(error) => Answer::error(500, &error.to_string()),
        }
    }
}

/// `localhost`, an IPv4 address or a bracketed IPv6 one, with or without a port.
fn host_is_address(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        return rest
            .split_once(']')
            .is_some_and(|(ip, _)| ip.parse::<Ipv6Addr>().is_ok());
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<Ipv4Addr>().is_ok()
}

/// The action a method and path ask for, or the answer that refuses them.
pub fn parse(method: &str, path: &str) -> Result<Action, Answer> {
    let rest = path.strip_prefix("/dead-letters").unwrap_or("-");
    let parts: Vec<&str> = rest.split('/').skip(1).collect();
    let id = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| Answer::error(404, "no such dead letter"))
    };
    let (action, allow) = match (rest, parts.as_slice()) {
        ("", _) => (Ok(Action::List), "GET"),
        (_, ["replay"]) => (Ok(Action::Replay(None)), "POST"),
        (_, ["purge"]) => (Ok(Action::Purge(None)), "POST"),
        (_, [n]) => (id(n).map(Action::Show), "GET"),
        (_, [n, "replay"]) => (id(n).map(|i| Action::Replay(Some(i))), "POST"),
        (_, [n, "purge"]) => (id(n).map(|i| Action::Purge(Some(i))), "POST"),
        _ => return Err(Answer::error(404, "not found")),
    };
    if method != allow {
        return Err(Answer {
            status: 405,
            body: String::new(),
            allow,
        });
    }
    action
}

// ---------------------------------------------------------------------------------
// The command's side of the endpoints.
// ---------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there: the agent is not running (or has no admin listener).
    #[error("nothing answers at {addr}: {source}")]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the agent at {addr}: {message}")]
    Failed { addr: SocketAddr, message: String },
}

/// Where to reach the agent listening on `listen`: a wildcard address is reached
/// on loopback.
pub fn admin_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Asks the running agent at `addr` to do `action`.
pub fn via_admin(addr: SocketAddr, action: Action) -> Result<Outcome, ClientError> {
    let (method, path) = match action {
        Action::List => ("GET", "/dead-letters".to_string()),
        Action::Show(id) => ("GET", format!("/dead-letters/{id}")),
        Action::Replay(None) => ("POST", "/dead-letters/replay".to_string()),
        Action::Replay(Some(id)) => ("POST", format!("/dead-letters/{id}/replay")),
        Action::Purge(None) => ("POST", "/dead-letters/purge".to_string()),
        Action::Purge(Some(id)) => ("POST", format!("/dead-letters/{id}/purge")),
    };
    let unreachable = |source| ClientError::Unreachable { addr, source };
    let failed = |message: String| ClientError::Failed { addr, message };
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(unreachable)?;
    // A replay of every dead letter commits them all: give it time.
    let io = |e: std::io::Error| failed(e.to_string());
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io)?;
    let host = match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.0\r\nHost: {host}\r\nX-Ferry-Admin: 1\r\nContent-Length: 0\r\n\r\n"
            )
            .as_bytes(),
        )
        .map_err(io)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(io)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| failed("an answer that is not HTTP".into()))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| failed("an answer that is not HTTP".into()))?;
    if status == 200 || status == 404 {
        if let Ok(outcome) = serde_json::from_str::<Outcome>(body) {
            return Ok(outcome);
        }
    }
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_string))
        .unwrap_or_else(|| match body.trim() {
            "" if status == 404 => "no dead-letter endpoint here (an older release?)".to_string(),
            text => text.to_string(),
        });
    Err(failed(format!("HTTP {status}: {message}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_actions_and_the_wrong_method_is_refused() {
        assert_eq!(parse("GET", "/dead-letters"), Ok(Action::List));
        assert_eq!(parse("GET", "/dead-letters/7"), Ok(Action::Show(7)));
        assert_eq!(
            parse("POST", "/dead-letters/7/replay"),
            Ok(Action::Replay(Some(7)))
        );
        assert_eq!(
            parse("POST", "/dead-letters/replay"),
            Ok(Action::Replay(None))
        );
        assert_eq!(
            parse("POST", "/dead-letters/7/purge"),
            Ok(Action::Purge(Some(7)))
        );
        assert_eq!(
            parse("POST", "/dead-letters/purge"),
            Ok(Action::Purge(None))
        );
        assert_eq!(parse("POST", "/dead-letters").unwrap_err().status, 405);
        assert_eq!(parse("GET", "/dead-letters/purge").unwrap_err().status, 405);
        assert_eq!(parse("GET", "/dead-letters/x").unwrap_err().status, 404);
        assert_eq!(parse("GET", "/dead-letters/1/2/3").unwrap_err().status, 404);
        assert_eq!(parse("GET", "/dead-lettersx").unwrap_err().status, 404);
    }

    #[test]
    fn only_an_address_or_localhost_is_taken_as_host() {
        for ok in [
            "127.0.0.1:9464",
            "localhost",
            "LOCALHOST:1",
            "[::1]:9464",
            "10.0.0.2",
        ] {
            assert!(host_is_address(ok), "{ok}");
        }
        for bad in ["evil.example:9464", "evil.example", "[evil]:1", ""] {
            assert!(!host_is_address(bad), "{bad}");
        }
    }

    #[test]
    fn a_wildcard_listen_address_is_reached_on_loopback() {
        let a: SocketAddr = "0.0.0.0:9464".parse().unwrap();
        assert_eq!(admin_addr(a), "127.0.0.1:9464".parse().unwrap());
        let b: SocketAddr = "[::]:9464".parse().unwrap();
        assert_eq!(admin_addr(b), "[::1]:9464".parse().unwrap());
    }

    #[tokio::test]
    async fn a_client_off_loopback_or_without_the_header_is_refused() {
        let api = Api::new(false);
        let req = |peer: &str, marked, host| Request {
            method: "GET",
            path: "/dead-letters",
            peer: peer.parse().unwrap(),
            host,
            marked,
        };
        let far = api
            .handle(&req("10.0.0.9:5000", true, Some("10.0.0.1")))
            .await;
        assert_eq!(far.status, 403);
        let unmarked = api
            .handle(&req("127.0.0.1:5000", false, Some("127.0.0.1")))
            .await;
        assert_eq!(unmarked.status, 403);
        let rebound = api
            .handle(&req("127.0.0.1:5000", true, Some("evil.example")))
            .await;
        assert_eq!(rebound.status, 403);
        // Allowed through, but no store yet.
        let early = api
            .handle(&req("127.0.0.1:5000", true, Some("127.0.0.1:1")))
            .await;
        assert_eq!(early.status, 503);
        let remote = Api::new(true);
        let far = remote
            .handle(&req("10.0.0.9:5000", true, Some("10.0.0.1")))
            .await;
        assert_eq!(far.status, 503);
    }
}
