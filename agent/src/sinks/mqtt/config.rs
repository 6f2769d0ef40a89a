//! `[[sink.mqtt]]`: its settings, their defaults and their validation.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::azure::AzureIotHub;
use super::binding::{Mode, Protocol, TopicTemplate};
use crate::config::{problem, BackoffConfig, Bytes, Dur, Problem};
use crate::tls::TlsConfig;

/// `[[sink.mqtt]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkConfig {
    /// The sink's name (rules address sinks by name; metrics and logs carry it).
    pub name: String,
    /// Broker URL: `mqtt://host:port` (default port 1883) or `mqtts://host:port`
    /// (TLS, default port 8883). Optional with `azure_iot_hub`, which gives
    /// `mqtts://{hub}.azure-devices.net:8883`.
    #[serde(default)]
    pub url: Option<String>,
    /// `"5"` or `"3.1.1"`. Default `"5"`, or `"3.1.1"` with `azure_iot_hub`
    /// (IoT Hub speaks only 3.1.1).
    #[serde(default)]
    pub protocol: Option<Protocol>,
    /// CloudEvents content mode: `binary` (MQTT 5 only: attributes as user
    /// properties, `datacontenttype` as the Content Type property, data as the
    /// payload) or `structured` (the whole event as `application/cloudevents+json`).
    /// Default `binary` on MQTT 5, `structured` on 3.1.1.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Topic template: `{agent}`, `{source_kind}`, `{source_name}`, `{subject}`
    /// (the device id), `{type}`, mixed with literal text. Values have `/`, `+`,
    /// `#` replaced by `_`. Default `ferry/{agent}/{source_name}/{subject}`; not
    /// allowed with `azure_iot_hub`, whose topic is fixed.
    #[serde(default)]
    pub topic: Option<String>,
    /// MQTT client id; must be stable for the broker to keep the session (and, on
    /// AWS IoT Core, allowed by the thing's policy). Default `ferry-{agent.id}-{name}`;
    /// the device id with `azure_iot_hub`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Username, if the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (trailing newline ignored). Needs `username`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// For `mqtts://`: a private CA to trust and a client certificate to present
    /// (mutual TLS: AWS IoT Core device certificates, Azure IoT Hub X.509 devices).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Azure IoT Hub: `{ hub = "myhub", device_id = "gw-0042", key_file = "..." }`.
    /// Sets the host, client id, username, topic and protocol the hub expects, and
    /// signs SAS tokens with the device key (renewed before they expire).
    #[serde(default)]
    pub azure_iot_hub: Option<AzureIotHub>,
    /// How long a SAS token is valid (`azure_iot_hub` with `key_file`); the
    /// connection is renewed with a new token after four fifths of it. Default 1h.
    #[serde(default = "default_token_ttl")]
    pub token_ttl: Dur,
    /// The largest message (the whole PUBLISH packet: topic, properties and
    /// payload) the upstream takes. A larger event is refused for good and counted
    /// (`ferry_sink_dropped_total{reason="too_large"}`), never sent: a broker
    /// disconnects a client that sends more than its limit. AWS IoT Core: 128KiB;
    /// Azure IoT Hub: 256KiB. Default 256KiB.
    #[serde(default = "default_max_message")]
    pub max_message: Bytes,
    /// Messages published and not yet acknowledged (PUBACK) at once. Default 16.
    /// The broker's own limit (MQTT 5 Receive Maximum) lowers it.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Events handed to the publisher at once; the sink's cursor moves when all of
    /// them are acknowledged. Default 100.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// Time for a batch to be acknowledged, waiting for a connection included;
    /// then it is retried with backoff. Default 30s.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// MQTT keep-alive interval. Default 30s.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: Dur,
    /// Reconnect backoff bounds. Default `{ min = "500ms", max = "30s" }`.
    #[serde(default = "default_reconnect")]
    pub reconnect: BackoffConfig,
    /// Retry backoff bounds for batches that were not acknowledged in time.
    /// Default `{ min = "200ms", max = "30s" }`.
    #[serde(default = "default_retry")]
    pub retry: BackoffConfig,
}

fn default_token_ttl() -> Dur {
    Dur(Duration::from_secs(3600))
}
fn default_max_message() -> Bytes {
    Bytes(256 * 1024)
}
fn default_max_in_flight() -> usize {
    16
}
fn default_batch_max() -> usize {
    100
}
fn default_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_keep_alive() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_reconnect() -> BackoffConfig {
    BackoffConfig::new(Duration::from_millis(500), Duration::from_secs(30))
}
fn default_retry() -> BackoffConfig {
    BackoffConfig::new(Duration::from_millis(200), Duration::from_secs(30))
}

/// The default topic template.
pub const DEFAULT_TOPIC: &str = "ferry/{agent}/{source_name}/{subject}";

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl MqttSinkConfig {
    pub fn protocol(&self) -> Protocol {
        self.protocol.unwrap_or(if self.azure_iot_hub.is_some() {
            Protocol::V311
        } else {
            Protocol::V5
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode.unwrap_or(match self.protocol() {
            Protocol::V5 => Mode::Binary,
            Protocol::V311 => Mode::Structured,
        })
    }

    /// The topic template in force (Azure's fixed topic with `azure_iot_hub`).
    pub fn topic_template(&self) -> Result<TopicTemplate, String> {
        match &self.azure_iot_hub {
            Some(hub) => Ok(TopicTemplate::literal(&hub.topic())),
            None => TopicTemplate::parse(self.topic.as_deref().unwrap_or(DEFAULT_TOPIC)),
        }
    }

    /// The client id in force for an agent with id `agent`.
    pub fn client_id(&self, agent: &str) -> String {
        match (&self.client_id, &self.azure_iot_hub) {
            (Some(id), _) => id.clone(),
            (None, Some(hub)) => hub.device_id.clone(),
            (None, None) => format!("ferry-{agent}-{}", self.name),
        }
    }

    /// The username in force (the hub's with `azure_iot_hub`).
    pub fn username(&self) -> Option<String> {
        match &self.azure_iot_hub {
            Some(hub) => Some(hub.username()),
            None => self.username.clone(),
        }
    }

    pub fn broker(&self) -> Result<Broker, String> {
        let url = match (&self.url, &self.azure_iot_hub) {
            (Some(url), _) => url.clone(),
            (None, Some(hub)) => format!("mqtts://{}:8883", hub.host()),
            (None, None) => return Err("url is missing".to_string()),
        };
        let u = url::Url::parse(&url).map_err(|e| format!("invalid url {url:?}: {e}"))?;
        let tls = match u.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            s => return Err(format!("url scheme must be mqtt or mqtts, not {s:?}")),
        };
        if !u.username().is_empty() || u.password().is_some() {
            return Err(
                "credentials do not belong in the url (they would be logged); use username and password_file"
                    .to_string(),
            );
        }
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("url {url:?} has no host"))?
            .to_string();
        Ok(Broker {
            host,
            port: u.port().unwrap_or(if tls { 8883 } else { 1883 }),
            tls,
        })
    }

    /// Every problem with this table, each at its `file:line:col`.
    pub fn validate(&self, i: usize) -> Vec<Problem> {
        let mut out = Vec::new();
        let n = &self.name;
        match self.broker() {
            Err(e) => out.push(problem!(["sink", "mqtt", i, "url"], "sink {n:?}: {e}")),
            Ok(b) if self.azure_iot_hub.is_some() && !b.tls => out.push(problem!(
                ["sink", "mqtt", i, "url"],
                "sink {n:?}: Azure IoT Hub needs mqtts://"
            )),
            Ok(_) => {}
        }
        if self.mode == Some(Mode::Binary) && self.protocol() == Protocol::V311 {
            out.push(problem!(
                ["sink", "mqtt", i, "mode"],
                "sink {n:?}: binary mode needs MQTT 5 (protocol = \"5\"): MQTT 3.1.1 has no user properties"
            ));
        }
        if let Err(e) = self.topic_template() {
            out.push(problem!(["sink", "mqtt", i, "topic"], "sink {n:?}: {e}"));
        }
        if self.client_id.as_deref() == Some("") {
            out.push(problem!(
                ["sink", "mqtt", i, "client_id"],
                "sink {n:?}: client_id must not be empty"
            ));
        }
        if self.password_file.is_some() && self.username.is_none() {
            out.push(problem!(
                ["sink", "mqtt", i, "password_file"],
                "sink {n:?}: password_file needs a username"
            ));
        }
        if let Some(tls) = &self.tls {
            if self.broker().is_ok_and(|b| !b.tls) {
                out.push(problem!(
                    ["sink", "mqtt", i, "tls"],
                    "sink {n:?}: tls settings need an mqtts:// url"
                ));
            }
            if let Err(e) = tls.check() {
                out.push(problem!(["sink", "mqtt", i, "tls"], "sink {n:?}: {e}"));
            }
        }
        if let Some(hub) = &self.azure_iot_hub {
            for e in hub.check() {
                out.push(problem!(
                    ["sink", "mqtt", i, "azure_iot_hub"],
                    "sink {n:?}: azure_iot_hub: {e}"
                ));
            }
            if self.protocol() != Protocol::V311 {
                out.push(problem!(
                    ["sink", "mqtt", i, "protocol"],
                    "sink {n:?}: Azure IoT Hub speaks MQTT 3.1.1 only"
                ));
            }
            let clashes = [
                ("topic", self.topic.is_some()),
                ("username", self.username.is_some()),
                ("password_file", self.password_file.is_some()),
            ];
            for (field, given) in clashes {
                if given {
                    out.push(problem!(
                        ["sink", "mqtt", i, field],
                        "sink {n:?}: {field} is set by azure_iot_hub; leave it out"
                    ));
                }
            }
            if self.client_id.as_ref().is_some_and(|c| *c != hub.device_id) {
                out.push(problem!(
                    ["sink", "mqtt", i, "client_id"],
                    "sink {n:?}: Azure IoT Hub needs the device id as client_id"
                ));
            }
            let has_cert = self.tls.as_ref().is_some_and(|t| t.cert_file.is_some());
            match (&hub.key_file, has_cert) {
                (None, false) => out.push(problem!(
                    ["sink", "mqtt", i, "azure_iot_hub"],
                    "sink {n:?}: azure_iot_hub needs key_file, or a device certificate in tls"
                )),
                (Some(_), true) => out.push(problem!(
                    ["sink", "mqtt", i, "azure_iot_hub", "key_file"],
                    "sink {n:?}: give key_file or a device certificate in tls, not both"
                )),
                _ => {}
            }
            let ttl = self.token_ttl.0;
            if !(Duration::from_secs(60)..=crate::config::LONGEST).contains(&ttl) {
                out.push(problem!(
                    ["sink", "mqtt", i, "token_ttl"],
                    "sink {n:?}: token_ttl must be between 1m and 24h"
                ));
            }
        }
        if !(64..=256 * 1024 * 1024).contains(&self.max_message.0) {
            out.push(problem!(
                ["sink", "mqtt", i, "max_message"],
                "sink {n:?}: max_message must be between 64B and 256MiB"
            ));
        }
        if !(1..=1024).contains(&self.max_in_flight) {
            out.push(problem!(
                ["sink", "mqtt", i, "max_in_flight"],
                "sink {n:?}: max_in_flight must be 1..=1024"
            ));
        }
        out.extend(crate::sinks::check_batching(
            "mqtt",
            i,
            n,
            self.batch_max,
            None,
            self.timeout.0,
        ));
        // MQTT carries keep-alive as whole seconds in 16 bits.
        let keep_alive = self.keep_alive.0;
        if !(Duration::from_secs(1)..=Duration::from_secs(u64::from(u16::MAX)))
            .contains(&keep_alive)
            || keep_alive.subsec_nanos() != 0
        {
            out.push(problem!(
                ["sink", "mqtt", i, "keep_alive"],
                "sink {n:?}: keep_alive must be whole seconds from 1s to 65535s"
            ));
        }
        out.extend(self.reconnect.validate(&[
            "sink".into(),
            "mqtt".into(),
            i.into(),
            "reconnect".into(),
        ]));
        out.extend(
            self.retry
                .validate(&["sink".into(), "mqtt".into(), i.into(), "retry".into()]),
        );
        out
    }

    /// Every file the sink reads at start, for `ferry check`: the key a problem is
    /// reported at (`password_file`, `azure_iot_hub`, `tls`), what the file is, and
    /// its path as written.
    pub fn files(&self) -> Vec<(&'static str, String, &std::path::Path)> {
        let mut out: Vec<(&'static str, String, &std::path::Path)> = Vec::new();
        if let Some(p) = &self.password_file {
            out.push(("password_file", "password_file".into(), p));
        }
        if let Some(p) = self
            .azure_iot_hub
            .as_ref()
            .and_then(|h| h.key_file.as_ref())
        {
            out.push(("azure_iot_hub", "azure_iot_hub key_file".into(), p));
        }
        for (what, p) in self.tls.iter().flat_map(|t| t.files()) {
            out.push(("tls", format!("tls {what}"), p));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> MqttSinkConfig {
        toml::from_str(text).unwrap()
    }

    fn messages(text: &str) -> Vec<String> {
        cfg(text)
            .validate(0)
            .into_iter()
            .map(|p| p.message)
            .collect()
    }

    #[test]
    fn defaults_are_mqtt5_binary_mode_and_a_topic_per_device() {
        let c = cfg("name = 'up'\nurl = 'mqtt://b'");
        assert_eq!(c.protocol(), Protocol::V5);
        assert_eq!(c.mode(), Mode::Binary);
        assert_eq!(c.client_id("gw"), "ferry-gw-up");
        assert_eq!(c.max_message, Bytes(256 * 1024));
        assert_eq!(
            c.broker().unwrap(),
            Broker {
                host: "b".into(),
                port: 1883,
                tls: false
            }
        );
        assert!(c.validate(0).is_empty());
    }

    #[test]
    fn mqtt_3_1_1_defaults_to_structured_mode_and_refuses_binary() {
        let c = cfg("name = 'up'\nurl = 'mqtt://b'\nprotocol = '3.1.1'");
        assert_eq!(c.mode(), Mode::Structured);
        let msgs = messages("name = 'up'\nurl = 'mqtt://b'\nprotocol = '3.1.1'\nmode = 'binary'");
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(msgs[0].contains("MQTT 5"), "{msgs:?}");
    }

    #[test]
    fn azure_iot_hub_sets_host_client_id_username_topic_and_protocol() {
        let c = cfg(
            "name = 'hub'\nazure_iot_hub = { hub = 'myhub', device_id = 'gw-1', key_file = 'k' }",
        );
        assert!(c.validate(0).is_empty(), "{:?}", c.validate(0));
        assert_eq!(c.protocol(), Protocol::V311);
        assert_eq!(c.mode(), Mode::Structured);
        assert_eq!(c.client_id("agent"), "gw-1");
        assert_eq!(c.broker().unwrap().host, "myhub.azure-devices.net");
        assert_eq!(c.broker().unwrap().port, 8883);
        assert!(c
            .username()
            .unwrap()
            .starts_with("myhub.azure-devices.net/gw-1/?api-version="));
        let topic = c
            .topic_template()
            .unwrap()
            .render(super::super::binding::TopicVars {
                agent: "a",
                source: "/ferry/a/mqtt/m",
                subject: "d",
                ty: "t",
            })
            .unwrap();
        assert!(
            topic.starts_with("devices/gw-1/messages/events/$.ct="),
            "{topic}"
        );
    }

    #[test]
    fn azure_iot_hub_refuses_what_it_sets_itself_and_mqtt5() {
        let msgs = messages(
            "name = 'hub'\nazure_iot_hub = { hub = 'h', device_id = 'd', key_file = 'k' }\n\
             topic = 'x'\nusername = 'u'\nprotocol = '5'\nclient_id = 'other'",
        );
        assert_eq!(msgs.len(), 4, "{msgs:#?}");
    }

    #[test]
    fn azure_iot_hub_needs_a_key_or_a_certificate_but_not_both() {
        let none = messages("name = 'hub'\nazure_iot_hub = { hub = 'h', device_id = 'd' }");
        assert_eq!(none.len(), 1, "{none:?}");
        let cert = messages(
            "name = 'hub'\nazure_iot_hub = { hub = 'h', device_id = 'd' }\n\
             tls = { cert_file = 'c.pem', key_file = 'c.key' }",
        );
        assert!(cert.is_empty(), "{cert:?}");
        let both = messages(
            "name = 'hub'\nazure_iot_hub = { hub = 'h', device_id = 'd', key_file = 'k' }\n\
             tls = { cert_file = 'c.pem', key_file = 'c.key' }",
        );
        assert_eq!(both.len(), 1, "{both:?}");
    }

    #[test]
    fn invalid_settings_are_all_reported() {
        let msgs = messages(
            "name = 'up'\nurl = 'http://b'\ntopic = 'a/{nope}'\npassword_file = 'p'\n\
             max_message = 10\nmax_in_flight = 0\nbatch_max = 0\ntimeout = '0s'\n\
             keep_alive = '1500ms'\nclient_id = ''",
        );
        assert_eq!(msgs.len(), 9, "{msgs:#?}");
    }

    #[test]
    fn the_shipped_aws_and_azure_examples_are_valid_sink_tables() {
        #[derive(serde::Deserialize)]
        struct Example {
            sink: Sinks,
        }
        #[derive(serde::Deserialize)]
        struct Sinks {
            mqtt: Vec<MqttSinkConfig>,
        }
        for file in ["aws-iot-core.toml", "azure-iot-hub.toml"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/examples")
                .join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            let example: Example = toml::from_str(&text).unwrap();
            assert_eq!(example.sink.mqtt.len(), 1, "{file}");
            let sink = &example.sink.mqtt[0];
            let msgs: Vec<String> = sink.validate(0).into_iter().map(|p| p.message).collect();
            assert!(msgs.is_empty(), "{file}: {msgs:?}");
            assert!(sink.broker().unwrap().tls, "{file}");
        }
    }

    #[test]
    fn every_file_the_sink_reads_is_listed_for_ferry_check() {
        let c = cfg(
            "name = 'hub'\nazure_iot_hub = { hub = 'h', device_id = 'd', key_file = 'k' }\n\
             tls = { ca_file = 'ca.pem' }",
        );
        let files: Vec<(&str, String)> = c
            .files()
            .into_iter()
            .map(|(field, what, _)| (field, what))
            .collect();
        assert_eq!(
            files,
            [
                ("azure_iot_hub", "azure_iot_hub key_file".to_string()),
                ("tls", "tls ca_file".to_string())
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<MqttSinkConfig>("name = 'a'\nurl = 'mqtt://b'\nqos = 1").is_err());
        assert!(
            toml::from_str::<MqttSinkConfig>("name = 'a'\nurl = 'mqtt://b'\nprotocol = '4'")
                .is_err()
        );
    }
}
