//! The CloudEvent for a stored record, built once and transport-neutrally; each
//! sink's binding maps it to its wire form (HTTP headers, MQTT 5 user properties,
//! NATS headers, or the structured JSON below).
//!
//! The id is `{store epoch}-{sequence}`: fixed when the record was committed, so a
//! re-sent event carries the same `source` + `id` and receivers can drop duplicates.
//!
//! The event is our own small type rather than cloudevents-sdk's: the SDK keeps
//! extensions in a `HashMap`, so its JSON and its attribute iteration change order
//! from one build (or one run) to the next. Here every attribute has one place in a
//! fixed order, which makes the structured form byte-for-byte reproducible and the
//! header and user-property mappings a plain loop over [`Event::attributes`].

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use crate::store::Stored;

/// CloudEvents spec version of every event ferry sends.
pub const SPECVERSION: &str = "1.0";
/// The content type of every event's data: readings and alerts are JSON.
pub const DATACONTENTTYPE: &str = "application/json";

/// The attribute names an extension may not take.
const CONTEXT_ATTRIBUTES: [&str; 9] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
];

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("record {seq} does not make a valid CloudEvent: {reason}")]
    Invalid { seq: u64, reason: String },
}

/// One CloudEvent 1.0 with JSON data.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: String,
    pub source: String,
    pub ty: String,
    pub subject: String,
    pub time: DateTime<Utc>,
    /// Extensions in the order they are written: `sequence` first, then the
    /// record's own in name order. Names are checked by [`Event::from_stored`].
    pub extensions: Vec<(String, String)>,
    pub data: Arc<Value>,
}

impl Event {
    /// The event for a stored record.
    pub fn from_stored(epoch: &str, stored: &Stored) -> Result<Event, EventError> {
        let r = &stored.record;
        let invalid = |reason: String| EventError::Invalid {
            seq: stored.seq,
            reason,
        };
        for (what, value) in [("source", &r.source), ("type", &r.event_type)] {
            if value.is_empty() {
                return Err(invalid(format!("{what} is empty")));
            }
        }
        // A replayed dead letter is the event it was first sent as: same id, same
        // sequence, so an upstream that deduplicates on `source` + `id` keeps one.
        let (epoch, seq) = match &r.origin {
            Some(o) => (o.epoch.as_str(), o.seq),
            None => (epoch, stored.seq),
        };
        let mut extensions = Vec::with_capacity(r.ext.len() + 1);
        extensions.push(("sequence".to_string(), seq.to_string()));
        // `ext` is a BTreeMap: name order, the same on every resend.
        for (name, value) in &r.ext {
            if !valid_extension_name(name) {
                return Err(invalid(format!(
                    "extension name {name:?} is not 1-20 lower-case letters and digits"
                )));
            }
            if name == "sequence" || CONTEXT_ATTRIBUTES.contains(&name.as_str()) {
                return Err(invalid(format!(
                    "extension name {name:?} is taken by an attribute"
                )));
            }
            extensions.push((name.clone(), value.clone()));
        }
        Ok(Event {
            id: format!("{epoch}-{seq}"),
            source: r.source.clone(),
            ty: r.event_type.clone(),
            subject: r.subject.clone(),
            time: r.time,
            extensions,
            data: Arc::clone(&r.data),
        })
    }

    /// `time` as RFC 3339 in UTC with a `Z`, with as many fraction digits as it has.
    pub fn time_text(&self) -> String {
        self.time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }

    /// Every attribute except `datacontenttype` (which bindings carry as their
    /// content type), as text, in the fixed order: `specversion`, `id`, `source`,
    /// `type`, `subject`, `time`, then the extensions. Binary-mode bindings map
    /// these one to one: `ce-{name}` HTTP or NATS headers, MQTT 5 user properties.
    pub fn attributes(&self) -> impl Iterator<Item = (&str, Cow<'_, str>)> {
        [
            ("specversion", Cow::Borrowed(SPECVERSION)),
            ("id", Cow::Borrowed(self.id.as_str())),
            ("source", Cow::Borrowed(self.source.as_str())),
            ("type", Cow::Borrowed(self.ty.as_str())),
            ("subject", Cow::Borrowed(self.subject.as_str())),
            ("time", Cow::Owned(self.time_text())),
        ]
        .into_iter()
        .chain(
            self.extensions
                .iter()
                .map(|(k, v)| (k.as_str(), Cow::Borrowed(v.as_str()))),
        )
    }

    /// Structured mode: the whole event as one JSON object, keys in the order of
    /// [`Event::attributes`] with `datacontenttype` after `time` and `data` last.
    pub fn structured(&self) -> Vec<u8> {
        // Serialising strings and a serde_json::Value into memory cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The data alone: the body in binary mode.
    pub fn data_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.data).unwrap_or_default()
    }

    /// The length of [`Event::structured`], without building it.
    pub fn structured_len(&self) -> usize {
        encoded_len(self)
    }

    /// The length of [`Event::data_bytes`], without building it.
    pub fn data_len(&self) -> usize {
        encoded_len(&self.data)
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(8 + self.extensions.len()))?;
        let mut attributes = self.attributes();
        // specversion, id, source, type, subject, time: the first six.
        for (name, value) in attributes.by_ref().take(6) {
            map.serialize_entry(name, &value)?;
        }
        map.serialize_entry("datacontenttype", DATACONTENTTYPE)?;
        for (name, value) in attributes {
            map.serialize_entry(name, &value)?;
        }
        map.serialize_entry("data", &self.data)?;
        map.end()
    }
}

/// CloudEvents naming: lower-case ASCII letters and digits, at most 20 of them.
fn valid_extension_name(name: &str) -> bool {
    (1..=20).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Bytes `value` takes as compact JSON, counted rather than written.
fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail, and neither can serialising our types.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Record;
    use chrono::TimeZone;
    use serde_json::json;

    fn stored() -> Stored {
        Stored {
            seq: 42,
            record: Record {
                source: "/ferry/gw-1/mqtt/local".into(),
                event_type: "io.ferry.reading".into(),
                subject: "freezer-1".into(),
                time: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
                data: json!({"temperature": -12.5}).into(),
                ext: [
                    ("severity".to_string(), "high".to_string()),
                    ("rule".to_string(), "freezer warm".to_string()),
                ]
                .into(),
                to: None,
                origin: None,
            },
            bytes: 0,
        }
    }

    #[test]
    fn the_id_is_the_epoch_and_the_sequence() {
        let e = Event::from_stored("abc", &stored()).unwrap();
        assert_eq!(e.id, "abc-42");
        assert_eq!(e.source, "/ferry/gw-1/mqtt/local");
    }

    #[test]
    fn a_replayed_dead_letter_keeps_the_id_and_sequence_it_was_first_sent_with() {
        let mut replay = stored();
        replay.seq = 900;
        replay.record.origin = Some(crate::store::EventOrigin {
            epoch: "old".into(),
            seq: 42,
        });
        let e = Event::from_stored("new", &replay).unwrap();
        assert_eq!(e.id, "old-42");
        assert_eq!(e.extensions[0], ("sequence".to_string(), "42".to_string()));
    }

    #[test]
    fn a_stored_record_makes_the_same_structured_bytes_every_time_with_keys_in_a_fixed_order() {
        // Every resend builds the event again from the stored record: nothing in it
        // may come from the moment of sending, and the bytes themselves are fixed.
        let e = Event::from_stored("abc", &stored()).unwrap();
        assert_eq!(
            String::from_utf8(e.structured()).unwrap(),
            concat!(
                r#"{"specversion":"1.0","id":"abc-42","source":"/ferry/gw-1/mqtt/local","#,
                r#""type":"io.ferry.reading","subject":"freezer-1","time":"2026-01-02T03:04:05Z","#,
                r#""datacontenttype":"application/json","sequence":"42","rule":"freezer warm","#,
                r#""severity":"high","data":{"temperature":-12.5}}"#
            )
        );
    }

    #[test]
    fn attributes_come_in_a_fixed_order_with_sequence_the_first_extension() {
        let e = Event::from_stored("abc", &stored()).unwrap();
        let names: Vec<&str> = e.attributes().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "specversion",
                "id",
                "source",
                "type",
                "subject",
                "time",
                "sequence",
                "rule",
                "severity"
            ]
        );
    }

    #[test]
    fn the_structured_form_is_a_valid_cloudevent_for_the_reference_sdk() {
        let e = Event::from_stored("abc", &stored()).unwrap();
        let sdk: cloudevents::Event = serde_json::from_slice(&e.structured()).unwrap();
        use cloudevents::AttributesReader;
        assert_eq!(sdk.id(), "abc-42");
        assert_eq!(sdk.ty(), "io.ferry.reading");
        assert_eq!(sdk.subject(), Some("freezer-1"));
        assert_eq!(sdk.time(), Some(&e.time));
        assert_eq!(sdk.datacontenttype(), Some("application/json"));
        assert_eq!(
            sdk.extension("sequence").map(ToString::to_string),
            Some("42".to_string())
        );
    }

    #[test]
    fn counted_lengths_match_the_encoded_bytes() {
        let e = Event::from_stored("abc", &stored()).unwrap();
        assert_eq!(e.structured_len(), e.structured().len());
        assert_eq!(e.data_len(), e.data_bytes().len());
    }

    #[test]
    fn a_fraction_of_a_second_is_kept_in_the_time() {
        let mut s = stored();
        s.record.time = Utc.timestamp_millis_opt(1_767_322_800_250).unwrap();
        let e = Event::from_stored("abc", &s).unwrap();
        assert!(e.time_text().ends_with(".250Z"), "{}", e.time_text());
    }

    #[test]
    fn an_extension_named_like_an_attribute_or_not_lower_case_alphanumeric_is_refused() {
        for bad in [
            "id",
            "sequence",
            "Rule",
            "rule-name",
            "",
            "abcdefghijklmnopqrstu",
        ] {
            let mut s = stored();
            s.record.ext.insert(bad.to_string(), "x".into());
            assert!(Event::from_stored("abc", &s).is_err(), "{bad:?}");
        }
    }
}
