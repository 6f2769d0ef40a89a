//! The CloudEvents MQTT binding (spec v1.0) and the topic template: a CloudEvent
//! to the [`Message`] the publisher sends.
//!
//! - Binary mode, MQTT 5 only: every context attribute except `datacontenttype`
//!   becomes a user property named exactly like the attribute (`specversion`, `id`,
//!   `source`, `type`, `subject`, `time`, then extensions), `datacontenttype`
//!   becomes the Content Type property, and the data is the payload.
//! - Structured mode, MQTT 3.1.1 and 5: the whole event as JSON
//!   (`application/cloudevents+json`) is the payload; on MQTT 5 the Content Type
//!   property says so.

use std::fmt;

/// The content type of structured mode.
pub const STRUCTURED: &str = "application/cloudevents+json";

/// One MQTT PUBLISH: what the publisher sends for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 properties; ignored on MQTT 3.1.1.
    pub properties: Properties,
}

/// The MQTT 5 PUBLISH properties the binding uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub content_type: Option<String>,
    /// In order; names may repeat in MQTT, ours do not.
    pub user: Vec<(String, String)>,
}

/// The MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Protocol {
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        })
    }
}

/// The CloudEvents content mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Binary,
    Structured,
}

/// What the binding needs of a CloudEvent, whatever type holds it.
pub trait CloudEventView {
    /// Every context attribute except `datacontenttype`, as text, in a fixed order:
    /// `specversion`, `id`, `source`, `type`, `subject`, `time`, then extensions.
    fn attributes(&self) -> Vec<(String, String)>;
    /// `datacontenttype` (`application/json` for ferry's events).
    fn datacontenttype(&self) -> String;
    /// The data alone: the payload in binary mode.
    fn data(&self) -> Vec<u8>;
    /// The whole event as `application/cloudevents+json`: the payload in structured mode.
    fn structured(&self) -> Vec<u8>;
}

/// Why an event cannot become a message; it is refused for good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    #[error("the topic for this event is {0} bytes, over MQTT's 65535")]
    TopicTooLong(usize),
}

/// The event as a message in `mode` on `topic`. Binary mode on MQTT 3.1.1 is
/// refused by config validation; [`Mode::Binary`] here always means MQTT 5.
pub fn message(event: &impl CloudEventView, mode: Mode, topic: String) -> Message {
    match mode {
        Mode::Binary => Message {
            topic,
            payload: event.data(),
            properties: Properties {
                content_type: Some(event.datacontenttype()),
                user: event.attributes(),
            },
        },
        Mode::Structured => Message {
            topic,
            payload: event.structured(),
            properties: Properties {
                content_type: Some(STRUCTURED.to_string()),
                user: Vec::new(),
            },
        },
    }
}

/// The bytes `message` takes as a QoS 1 PUBLISH packet on `protocol`: fixed
/// header, topic, packet id, properties (MQTT 5) and payload. This is what
/// `max_message` is compared with.
pub fn message_len(message: &Message, protocol: Protocol) -> usize {
    let mut remaining = 2 + message.topic.len() + 2 + message.payload.len();
    if protocol == Protocol::V5 {
        let p = &message.properties;
        let props: usize = p.content_type.as_ref().map_or(0, |c| 1 + 2 + c.len())
            + p.user
                .iter()
                .map(|(k, v)| 1 + 2 + k.len() + 2 + v.len())
                .sum::<usize>();
        remaining += varint_len(props) + props;
    }
    1 + varint_len(remaining) + remaining
}

/// Bytes of an MQTT variable byte integer.
fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A topic with placeholders: `{agent}`, `{source_kind}`, `{source_name}`,
/// `{subject}`, `{type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Agent,
    SourceKind,
    SourceName,
    Subject,
    Type,
}

/// What fills a topic template for one event.
#[derive(Debug, Clone, Copy)]
pub struct TopicVars<'a> {
    pub agent: &'a str,
    /// The event's `source`: `/ferry/{agent}/{kind}/{name}` gives `source_kind` and
    /// `source_name`.
    pub source: &'a str,
    pub subject: &'a str,
    pub ty: &'a str,
}

impl TopicTemplate {
    /// A fixed topic, taken as it is (Azure IoT Hub's, with its property bag).
    pub fn literal(topic: &str) -> TopicTemplate {
        TopicTemplate {
            parts: vec![Part::Text(topic.to_string())],
        }
    }

    pub fn parse(text: &str) -> Result<TopicTemplate, String> {
        if text.is_empty() {
            return Err("the topic is empty".to_string());
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| format!("unclosed {{ in topic {text:?}"))?;
            parts.push(match &rest[open + 1..close] {
                "agent" => Part::Agent,
                "source_kind" => Part::SourceKind,
                "source_name" => Part::SourceName,
                "subject" => Part::Subject,
                "type" => Part::Type,
                other => {
                    return Err(format!(
                        "unknown placeholder {{{other}}} in topic {text:?} (use {{agent}}, {{source_kind}}, {{source_name}}, {{subject}}, {{type}})"
                    ))
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        for part in &parts {
            if let Part::Text(t) = part {
                if t.contains(['+', '#', '\0', '}']) {
                    return Err(format!(
                        "topic {text:?} has a wildcard (+, #), a NUL or a stray }}: a publish topic cannot"
                    ));
                }
            }
        }
        Ok(TopicTemplate { parts })
    }

    /// The topic for one event. Values are made safe for a topic level: `/`, `+`,
    /// `#` and NUL become `_`, so a device id can never add levels or wildcards.
    pub fn render(&self, vars: TopicVars<'_>) -> Result<String, BindingError> {
        let (kind, name) = source_parts(vars.source);
        let mut out = String::new();
        for part in &self.parts {
            let value = match part {
                Part::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Part::Agent => vars.agent,
                Part::SourceKind => kind,
                Part::SourceName => name,
                Part::Subject => vars.subject,
                Part::Type => vars.ty,
            };
            out.extend(value.chars().map(|c| match c {
                '/' | '+' | '#' | '\0' => '_',
                c => c,
            }));
        }
        if out.len() > usize::from(u16::MAX) {
            return Err(BindingError::TopicTooLong(out.len()));
        }
        Ok(out)
    }
}

/// `(kind, name)` of a source URI: its last two path segments
/// (`/ferry/gw-1/mqtt/local` gives `mqtt`, `local`; `/ferry/rules/r` gives `rules`, `r`).
fn source_parts(source: &str) -> (&str, &str) {
    let mut segments = source.rsplit('/').filter(|s| !s.is_empty());
    let name = segments.next().unwrap_or("");
    let kind = segments.next().unwrap_or("");
    (kind, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture;

    impl CloudEventView for Fixture {
        fn attributes(&self) -> Vec<(String, String)> {
            [
                ("specversion", "1.0"),
                ("id", "e-42"),
                ("source", "/ferry/gw-1/mqtt/local"),
                ("type", "io.ferry.reading"),
                ("subject", "freezer-1"),
                ("time", "2026-01-02T03:04:05Z"),
                ("sequence", "42"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
        }
        fn datacontenttype(&self) -> String {
            "application/json".to_string()
        }
        fn data(&self) -> Vec<u8> {
            br#"{"t":-12.5}"#.to_vec()
        }
        fn structured(&self) -> Vec<u8> {
            br#"{"specversion":"1.0","id":"e-42","data":{"t":-12.5}}"#.to_vec()
        }
    }

    fn vars<'a>(subject: &'a str) -> TopicVars<'a> {
        TopicVars {
            agent: "gw-1",
            source: "/ferry/gw-1/mqtt/local",
            subject,
            ty: "io.ferry.reading",
        }
    }

    #[test]
    fn binary_mode_maps_each_attribute_to_a_user_property_of_the_same_name() {
        let m = message(&Fixture, Mode::Binary, "t".into());
        assert_eq!(m.payload, br#"{"t":-12.5}"#);
        assert_eq!(
            m.properties.content_type.as_deref(),
            Some("application/json")
        );
        let names: Vec<&str> = m.properties.user.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "specversion",
                "id",
                "source",
                "type",
                "subject",
                "time",
                "sequence"
            ]
        );
        assert!(!names.contains(&"datacontenttype"));
    }

    #[test]
    fn structured_mode_sends_the_whole_event_as_cloudevents_json() {
        let m = message(&Fixture, Mode::Structured, "t".into());
        assert_eq!(m.payload, Fixture.structured());
        assert_eq!(m.properties.content_type.as_deref(), Some(STRUCTURED));
        assert!(m.properties.user.is_empty());
    }

    #[test]
    fn the_template_fills_every_placeholder() {
        let t =
            TopicTemplate::parse("x/{agent}/{source_kind}/{source_name}/{subject}/{type}").unwrap();
        assert_eq!(
            t.render(vars("freezer-1")).unwrap(),
            "x/gw-1/mqtt/local/freezer-1/io.ferry.reading"
        );
    }

    #[test]
    fn a_device_id_cannot_add_topic_levels_or_wildcards() {
        let t = TopicTemplate::parse("d/{subject}").unwrap();
        assert_eq!(t.render(vars("a/b+#c")).unwrap(), "d/a_b__c");
    }

    #[test]
    fn unknown_placeholders_wildcards_and_empty_templates_are_refused() {
        assert!(TopicTemplate::parse("a/{device}").is_err());
        assert!(TopicTemplate::parse("a/+/b").is_err());
        assert!(TopicTemplate::parse("a/#").is_err());
        assert!(TopicTemplate::parse("a/{subject").is_err());
        assert!(TopicTemplate::parse("").is_err());
        assert!(TopicTemplate::parse("devices/d1/messages/events/$.ct=a%2Fb&$.ce=utf-8").is_ok());
    }

    #[test]
    fn an_alert_source_gives_its_kind_and_name() {
        assert_eq!(source_parts("/ferry/rules/overheat"), ("rules", "overheat"));
        assert_eq!(source_parts("/ferry/gw/serial/gps"), ("serial", "gps"));
        assert_eq!(source_parts("x"), ("", "x"));
    }

    #[test]
    fn the_counted_length_is_the_packet_rumqttc_writes() {
        use bytes::BytesMut;
        let m = message(&Fixture, Mode::Binary, "ferry/gw-1/freezer-1".into());
        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
            content_type: m.properties.content_type.clone(),
            user_properties: m.properties.user.clone(),
            ..Default::default()
        };
        let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(
            m.topic.clone(),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            m.payload.clone(),
            Some(props),
        );
        p.pkid = 1;
        let mut buf = BytesMut::new();
        p.write(&mut buf).unwrap();
        assert_eq!(message_len(&m, Protocol::V5), buf.len());

        let mut p = rumqttc::Publish::new(
            m.topic.clone(),
            rumqttc::QoS::AtLeastOnce,
            m.payload.clone(),
        );
        p.pkid = 1;
        let mut buf = BytesMut::new();
        p.write(&mut buf).unwrap();
        assert_eq!(message_len(&m, Protocol::V311), buf.len());
    }
}
