//! The CloudEvents NATS binding (pure): one event to one [`Message`].
//!
//! - **binary** mode: every attribute as a `ce-{name}` header (`ce-specversion`,
//!   `ce-id`, `ce-source`, `ce-type`, `ce-subject`, `ce-time`, then the extensions),
//!   `datacontenttype` as `content-type`, the data as the payload.
//! - **structured** mode: the whole event as JSON in the payload,
//!   `content-type: application/cloudevents+json`.
//!
//! Header values are percent-encoded as in the HTTP binding (space, `"`, `%` and
//! anything outside printable ASCII), so no value can carry the CR/LF that would
//! end a NATS header.
//!
//! Both modes set `Nats-Msg-Id` to `{source} {id}`, each percent-encoded the same
//! way: JetStream drops a message whose `Nats-Msg-Id` it has seen within the
//! stream's duplicate window, and answers it with `duplicate: true`. The pair is
//! unique, since `id` is unique within a `source` (CloudEvents' own rule; ours is
//! `{store epoch}-{sequence}`) and the encoded source holds no space, so the first
//! space tells where it ends. It is stable, since both are fixed when the record is
//! committed: every retry and every resend after a restart carries the same one.
//! It is kept readable rather than hashed so `nats stream view` shows which event
//! a message is.

use std::borrow::Cow;

use super::subject::{SubjectTemplate, Values};
use crate::sinks::percent_encode;

/// The header JetStream deduplicates on.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// The content type of a structured-mode message.
pub const STRUCTURED: &str = "application/cloudevents+json";

/// What the binding needs of a CloudEvent. The transport-neutral event type
/// implements it by delegation; nothing here depends on how it is stored.
pub trait CloudEvent {
    fn id(&self) -> &str;
    fn source(&self) -> &str;
    fn ty(&self) -> &str;
    /// The `subject` attribute: the device id.
    fn subject(&self) -> &str;
    /// Every attribute except `datacontenttype`, in a fixed order: `specversion`,
    /// `id`, `source`, `type`, `subject`, `time`, then the extensions.
    fn attributes(&self) -> Vec<(&str, Cow<'_, str>)>;
    /// `datacontenttype`.
    fn datacontenttype(&self) -> &str;
    /// The data alone: the binary-mode payload.
    fn data_bytes(&self) -> Vec<u8>;
    /// The structured JSON event: the structured-mode payload.
    fn structured(&self) -> Vec<u8>;
}

/// `mode = "binary" | "structured"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Binary,
    Structured,
}

/// One event as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub subject: String,
    /// Header names and values, in order; values already percent-encoded.
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl Message {
    /// The bytes the server counts against its `max_payload`: the header block
    /// (`NATS/1.0\r\n`, `name: value\r\n` each, `\r\n`) plus the payload.
    pub fn wire_len(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.len() + 2 + v.len() + 2)
            .sum();
        "NATS/1.0\r\n".len() + headers + 2 + self.payload.len()
    }

    /// The value of header `name`, if set.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How a sink turns events into messages.
#[derive(Debug, Clone)]
pub struct Binding {
    pub mode: Mode,
    pub template: SubjectTemplate,
    /// The agent's id, for `{agent}`.
    pub agent: String,
}

impl Binding {
    /// The message for one event.
    pub fn message(&self, event: &dyn CloudEvent) -> Message {
        let subject = self.template.render(&Values {
            agent: &self.agent,
            source: event.source(),
            subject: event.subject(),
            ty: event.ty(),
        });
        let mut headers = vec![(
            MSG_ID.to_string(),
            format!(
                "{} {}",
                percent_encode(event.source()),
                percent_encode(event.id())
            ),
        )];
        let payload = match self.mode {
            Mode::Binary => {
                for (name, value) in event.attributes() {
                    // Attribute names are lower-case letters and digits (the
                    // CloudEvents naming rule); anything else would not be a valid
                    // header name and is left out rather than sent malformed.
                    if !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                    {
                        headers.push((format!("ce-{name}"), percent_encode(&value)));
                    }
                }
                headers.push((
                    "content-type".to_string(),
                    percent_encode(event.datacontenttype()),
                ));
                event.data_bytes()
            }
            Mode::Structured => {
                headers.push(("content-type".to_string(), STRUCTURED.to_string()));
                event.structured()
            }
        };
        Message {
            subject,
            headers,
            payload,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A CloudEvent as the transport-neutral event gives it.
    #[derive(Debug, Clone)]
    pub struct TestEvent {
        pub id: String,
        pub source: String,
        pub ty: String,
        pub subject: String,
        pub time: String,
        pub extensions: Vec<(String, String)>,
        pub data: Value,
    }

    impl TestEvent {
        pub fn reading(seq: u64) -> TestEvent {
            TestEvent {
                id: format!("abc-{seq}"),
                source: "/ferry/gw-1/mqtt/local".into(),
                ty: "io.ferry.reading".into(),
                subject: "freezer-1".into(),
                time: "2026-01-02T03:04:05Z".into(),
                extensions: vec![
                    ("sequence".into(), seq.to_string()),
                    ("rule".into(), "freezer warm".into()),
                ],
                data: json!({"temperature": -12.5}),
            }
        }
    }

    impl CloudEvent for TestEvent {
        fn id(&self) -> &str {
            &self.id
        }
        fn source(&self) -> &str {
            &self.source
        }
        fn ty(&self) -> &str {
            &self.ty
        }
        fn subject(&self) -> &str {
            &self.subject
        }
        fn attributes(&self) -> Vec<(&str, Cow<'_, str>)> {
            let mut out: Vec<(&str, Cow<'_, str>)> = vec![
                ("specversion", "1.0".into()),
                ("id", self.id.as_str().into()),
                ("source", self.source.as_str().into()),
                ("type", self.ty.as_str().into()),
                ("subject", self.subject.as_str().into()),
                ("time", self.time.as_str().into()),
            ];
            out.extend(
                self.extensions
                    .iter()
                    .map(|(k, v)| (k.as_str(), Cow::from(v.as_str()))),
            );
            out
        }
        fn datacontenttype(&self) -> &str {
            "application/json"
        }
        fn data_bytes(&self) -> Vec<u8> {
            serde_json::to_vec(&self.data).unwrap()
        }
        fn structured(&self) -> Vec<u8> {
            let mut v = json!({
                "specversion": "1.0",
                "id": self.id,
                "source": self.source,
                "type": self.ty,
                "subject": self.subject,
                "time": self.time,
                "datacontenttype": "application/json",
                "data": self.data,
            });
            for (k, x) in &self.extensions {
                v[k] = json!(x);
            }
            serde_json::to_vec(&v).unwrap()
        }
    }

    fn binding(mode: Mode) -> Binding {
        Binding {
            mode,
            template: SubjectTemplate::parse("ferry.{agent}.{type}.{subject}").unwrap(),
            agent: "gw-1".into(),
        }
    }

    #[test]
    fn binary_mode_puts_attributes_in_ce_headers_and_the_data_in_the_payload() {
        let m = binding(Mode::Binary).message(&TestEvent::reading(42));
        assert_eq!(m.subject, "ferry.gw-1.io_ferry_reading.freezer-1");
        let names: Vec<&str> = m.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "Nats-Msg-Id",
                "ce-specversion",
                "ce-id",
                "ce-source",
                "ce-type",
                "ce-subject",
                "ce-time",
                "ce-sequence",
                "ce-rule",
                "content-type"
            ]
        );
        assert_eq!(m.header("ce-id"), Some("abc-42"));
        assert_eq!(m.header("ce-time"), Some("2026-01-02T03:04:05Z"));
        assert_eq!(m.header("ce-rule"), Some("freezer%20warm"));
        assert_eq!(m.header("content-type"), Some("application/json"));
        assert_eq!(
            serde_json::from_slice::<Value>(&m.payload).unwrap(),
            json!({"temperature": -12.5})
        );
    }

    #[test]
    fn structured_mode_sends_the_whole_event_as_cloudevents_json() {
        let m = binding(Mode::Structured).message(&TestEvent::reading(42));
        assert_eq!(m.header("content-type"), Some(STRUCTURED));
        assert_eq!(m.header("ce-id"), None);
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["id"], "abc-42");
        assert_eq!(v["data"], json!({"temperature": -12.5}));
    }

    #[test]
    fn the_message_id_is_the_source_and_the_id_and_the_same_on_every_resend() {
        let b = binding(Mode::Binary);
        let first = b.message(&TestEvent::reading(7));
        assert_eq!(first.header(MSG_ID), Some("/ferry/gw-1/mqtt/local abc-7"));
        assert_eq!(b.message(&TestEvent::reading(7)), first);
        assert_ne!(
            b.message(&TestEvent::reading(8)).header(MSG_ID),
            first.header(MSG_ID)
        );
        // A source with a space cannot be mistaken for another source and id.
        let spaced = TestEvent {
            source: "/ferry/gw 1".into(),
            ..TestEvent::reading(7)
        };
        assert_eq!(
            b.message(&spaced).header(MSG_ID),
            Some("/ferry/gw%201 abc-7")
        );
    }

    #[test]
    fn no_header_value_can_carry_a_line_break() {
        let hostile = TestEvent {
            subject: "x\r\nNats-Msg-Id: forged".into(),
            ..TestEvent::reading(1)
        };
        let m = binding(Mode::Binary).message(&hostile);
        assert!(m
            .headers
            .iter()
            .all(|(n, v)| !n.contains(['\r', '\n']) && !v.contains(['\r', '\n'])));
        assert_eq!(m.header("ce-subject"), Some("x%0D%0ANats-Msg-Id:%20forged"));
    }

    #[test]
    fn the_wire_length_counts_the_header_block_and_the_payload() {
        let m = Message {
            subject: "s".into(),
            headers: vec![("a".into(), "b".into())],
            payload: vec![0; 10],
        };
        assert_eq!(m.wire_len(), "NATS/1.0\r\na: b\r\n\r\n".len() + 10);
    }
}
