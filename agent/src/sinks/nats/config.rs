//! `[[sink.nats]]`: the table, its defaults and its checks.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::binding::Mode;
use super::subject::SubjectTemplate;
use crate::config::{problem, BackoffConfig, Bytes, Dur, Problem};
use crate::tls::TlsConfig;

/// `[[sink.nats]]`: CloudEvents published to NATS JetStream. An event leaves the
/// store only once JetStream has acknowledged storing it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSinkConfig {
    /// The sink's name (rules address sinks by name; metrics and logs carry it).
    pub name: String,
    /// The server: `nats://host:4222`, or `tls://host:4222` for TLS. Other servers of
    /// a cluster are learnt from it. No credentials here: use `auth`.
    pub url: String,
    /// The subject of each event's message. Placeholders: `{agent}`,
    /// `{source_kind}`, `{source_name}`, `{subject}` (the device id), `{type}`; their
    /// values have every character other than letters, digits, `-` and `_` replaced
    /// by `_`, so they never add a token or a wildcard. A JetStream stream must
    /// capture these subjects. Default `ferry.{agent}.{type}.{subject}`.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// `binary` (attributes as `ce-*` headers, the data as the payload) or
    /// `structured` (the whole event as `application/cloudevents+json`). Default
    /// `binary`.
    #[serde(default)]
    pub mode: Mode,
    /// Events per batch. Default 100.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// Stored bytes of events per batch: a batch closes at `batch_max` events or at
    /// this many bytes, whichever comes first. Default 1MiB.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: Bytes,
    /// Publishes awaiting their JetStream ack at once. They travel on one
    /// connection, so the stream stores them in store order whatever this is.
    /// Default 100.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Time limit for connecting and for each publish's ack. Default 10s.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Credentials: exactly one of `user` with `password_file`, `token_file`, or
    /// `creds_file`. Optional.
    #[serde(default)]
    pub auth: Option<NatsAuth>,
    /// A private CA to trust and a client certificate to present. Turns TLS on.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Retry backoff bounds. Default `{ min = "200ms", max = "30s" }`.
    #[serde(default = "default_retry")]
    pub retry: BackoffConfig,
}

/// `auth = { user = "ferry", password_file = "..." }`, `{ token_file = "..." }` or
/// `{ creds_file = "..." }`. Secrets live in files (mode 0600), never in the config,
/// and are never logged.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsAuth {
    /// User name, with `password_file`.
    #[serde(default)]
    pub user: Option<String>,
    /// File holding the user's password (surrounding whitespace is trimmed).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// File holding a token (surrounding whitespace is trimmed).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// A `.creds` file (a user JWT and its nkey seed, as `nsc` writes them).
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
}

impl NatsAuth {
    /// Every file it names, with its key, for `ferry check`.
    pub fn files(&self) -> impl Iterator<Item = (&'static str, &Path)> {
        [
            ("password_file", self.password_file.as_deref()),
            ("token_file", self.token_file.as_deref()),
            ("creds_file", self.creds_file.as_deref()),
        ]
        .into_iter()
        .filter_map(|(what, path)| Some((what, path?)))
    }
}

fn default_subject() -> String {
    "ferry.{agent}.{type}.{subject}".to_string()
}
fn default_batch_max() -> usize {
    100
}
fn default_batch_max_bytes() -> Bytes {
    Bytes(1024 * 1024)
}
fn default_in_flight() -> usize {
    100
}
fn default_timeout() -> Dur {
    Dur(std::time::Duration::from_secs(10))
}
fn default_retry() -> BackoffConfig {
    BackoffConfig::new(
        std::time::Duration::from_millis(200),
        std::time::Duration::from_secs(30),
    )
}

impl NatsSinkConfig {
    /// Whether the connection uses TLS: a `tls://` url or a `tls` table.
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some() || self.url.starts_with("tls://")
    }

    /// Every problem with the table, each at its key.
    pub fn validate(&self, i: usize) -> Vec<Problem> {
        let mut out = Vec::new();
        match url::Url::parse(&self.url) {
            Ok(u) if !u.username().is_empty() || u.password().is_some() => out.push(problem!(
                ["sink", "nats", i, "url"],
                "sink {:?}: credentials do not belong in the url (they would be logged); use auth",
                self.name
            )),
            Ok(u) if !matches!(u.scheme(), "nats" | "tls") => out.push(problem!(
                ["sink", "nats", i, "url"],
                "sink {:?}: url scheme must be nats or tls, not {:?}",
                self.name,
                u.scheme()
            )),
            Ok(u) if u.host_str().is_none_or(str::is_empty) => out.push(problem!(
                ["sink", "nats", i, "url"],
                "sink {:?}: the url names no host",
                self.name
            )),
            Ok(_) => {}
            Err(e) => out.push(problem!(
                ["sink", "nats", i, "url"],
                "sink {:?}: invalid url {:?}: {e}",
                self.name,
                self.url
            )),
        }
        if let Err(e) = SubjectTemplate::parse(&self.subject) {
            out.push(problem!(
                ["sink", "nats", i, "subject"],
                "sink {:?}: subject {:?}: {e}",
                self.name,
                self.subject
            ));
        }
        out.extend(crate::sinks::check_batching(
            "nats",
            i,
            &self.name,
            self.batch_max,
            Some(self.batch_max_bytes.0),
            self.timeout.0,
        ));
        if !(1..=1024).contains(&self.max_in_flight) {
            out.push(problem!(
                ["sink", "nats", i, "max_in_flight"],
                "sink {:?}: max_in_flight must be 1..=1024",
                self.name
            ));
        }
        if let Some(auth) = &self.auth {
            let password = auth.user.is_some() || auth.password_file.is_some();
            let ways = [
                password,
                auth.token_file.is_some(),
                auth.creds_file.is_some(),
            ];
            if ways.iter().filter(|w| **w).count() != 1 {
                out.push(problem!(
                    ["sink", "nats", i, "auth"],
                    "sink {:?}: auth takes exactly one of user + password_file, token_file or creds_file",
                    self.name
                ));
            } else if password && (auth.user.is_none() || auth.password_file.is_none()) {
                out.push(problem!(
                    ["sink", "nats", i, "auth"],
                    "sink {:?}: user and password_file go together",
                    self.name
                ));
            }
        }
        if let Some(tls) = &self.tls {
            if self.url.starts_with("nats://") {
                out.push(problem!(
                    ["sink", "nats", i, "tls"],
                    "sink {:?}: tls settings need a tls:// url",
                    self.name
                ));
            }
            if let Err(e) = tls.check() {
                out.push(problem!(
                    ["sink", "nats", i, "tls"],
                    "sink {:?}: {e}",
                    self.name
                ));
            }
        }
        out.extend(
            self.retry
                .validate(&["sink".into(), "nats".into(), i.into(), "retry".into()]),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> NatsSinkConfig {
        toml::from_str(&format!(
            "name = \"js\"\nurl = \"nats://127.0.0.1:4222\"\n{extra}"
        ))
        .unwrap()
    }

    fn messages(cfg: &NatsSinkConfig) -> Vec<String> {
        cfg.validate(0).into_iter().map(|p| p.message).collect()
    }

    #[test]
    fn a_table_with_only_a_name_and_a_url_is_valid_with_its_defaults() {
        let cfg = parse("");
        assert!(messages(&cfg).is_empty(), "{:?}", messages(&cfg));
        assert_eq!(cfg.subject, "ferry.{agent}.{type}.{subject}");
        assert_eq!(cfg.mode, Mode::Binary);
        assert_eq!(cfg.max_in_flight, 100);
        assert!(!cfg.uses_tls());
    }

    #[test]
    fn credentials_in_the_url_and_other_schemes_are_refused() {
        let mut cfg = parse("");
        cfg.url = "nats://me:secret@host:4222".into();
        assert!(messages(&cfg)[0].contains("credentials do not belong in the url"));
        cfg.url = "http://host:4222".into();
        assert!(messages(&cfg)[0].contains("scheme must be nats or tls"));
    }

    #[test]
    fn a_wildcard_subject_template_is_refused_at_its_key() {
        let cfg = parse("subject = \"ferry.>\"");
        let problems = cfg.validate(3);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].message.contains("wildcard"));
        assert_eq!(
            format!("{:?}", problems[0].path),
            format!(
                "{:?}",
                vec![
                    crate::config::PathSeg::from("sink"),
                    "nats".into(),
                    3.into(),
                    "subject".into()
                ]
            )
        );
    }

    #[test]
    fn auth_takes_exactly_one_way_to_sign_in() {
        for (auth, ok) in [
            ("{ user = \"u\", password_file = \"p\" }", true),
            ("{ token_file = \"t\" }", true),
            ("{ creds_file = \"c\" }", true),
            ("{ user = \"u\" }", false),
            ("{ password_file = \"p\" }", false),
            ("{ token_file = \"t\", creds_file = \"c\" }", false),
            (
                "{ user = \"u\", password_file = \"p\", token_file = \"t\" }",
                false,
            ),
            ("{ }", false),
        ] {
            let cfg = parse(&format!("auth = {auth}"));
            assert_eq!(messages(&cfg).is_empty(), ok, "auth {auth}");
        }
    }

    #[test]
    fn tls_settings_need_a_tls_url() {
        let cfg = parse("tls = { ca_file = \"ca.pem\" }");
        assert!(messages(&cfg)[0].contains("need a tls:// url"));
        let mut cfg = cfg;
        cfg.url = "tls://host:4222".into();
        assert!(messages(&cfg).is_empty());
        assert!(cfg.uses_tls());
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let r: Result<NatsSinkConfig, _> =
            toml::from_str("name = \"js\"\nurl = \"nats://h:4222\"\nstream = \"x\"\n");
        assert!(r.is_err());
    }
}
