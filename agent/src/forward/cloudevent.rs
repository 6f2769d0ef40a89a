//! Stored records to CloudEvents 1.0, and the HTTP binding's three content modes.
//!
//! The id is `{store epoch}-{sequence}`: fixed when the record was committed, so a
//! re-sent event carries the same `source` + `id` and receivers can drop duplicates.
//! Events are built with the cloudevents-sdk builder, which validates the required
//! attributes; the HTTP binding itself is small and written here because the SDK's
//! reqwest integration pins a reqwest we do not use.

use cloudevents::event::{AttributeValue, Data};
use cloudevents::{Event, EventBuilder, EventBuilderV10};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};

use crate::store::Stored;

pub const STRUCTURED: &str = "application/cloudevents+json";
pub const BATCH: &str = "application/cloudevents-batch+json";

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("record {seq} does not make a valid CloudEvent: {reason}")]
    Invalid { seq: u64, reason: String },
}

/// The CloudEvent for a stored record.
pub fn to_event(epoch: &str, stored: &Stored) -> Result<Event, EncodeError> {
    let r = &stored.record;
    let mut b = EventBuilderV10::new()
        .id(format!("{epoch}-{}", stored.seq))
        .source(r.source.as_str())
        .ty(r.event_type.as_str())
        .subject(r.subject.as_str())
        .time(r.time)
        .data("application/json", r.data.clone())
        .extension("sequence", stored.seq.to_string());
    for (k, v) in &r.ext {
        b = b.extension(k, v.as_str());
    }
    b.build().map_err(|e| EncodeError::Invalid {
        seq: stored.seq,
        reason: e.to_string(),
    })
}

/// Structured mode: the whole event as one JSON object.
pub fn structured(event: &Event) -> Vec<u8> {
    // Serialising an Event holding JSON data cannot fail: every part is a string,
    // a number or a serde_json::Value.
    serde_json::to_vec(event).unwrap_or_default()
}

/// Batched mode: a JSON array of structured events.
pub fn batch(events: &[Event]) -> Vec<u8> {
    serde_json::to_vec(events).unwrap_or_default()
}

/// Binary mode: attributes as `ce-*` headers, the data as the body.
pub fn binary(event: &Event) -> (HeaderMap, Vec<u8>) {
    let mut headers = HeaderMap::new();
    for (name, value) in event.iter() {
        if name == "datacontenttype" {
            continue;
        }
        let text = match value {
            AttributeValue::Time(t) => t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            other => other.to_string(),
        };
        // Names are lower-case alphanumeric (CloudEvents naming rule, checked by the
        // builder for ours) and values are ASCII except for user strings, which are
        // percent-encoded as the HTTP binding asks.
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(format!("ce-{name}").as_bytes()),
            HeaderValue::from_str(&percent_encode(&text)),
        ) {
            headers.insert(n, v);
        }
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = match event.data() {
        Some(Data::Json(v)) => serde_json::to_vec(v).unwrap_or_default(),
        Some(Data::String(s)) => s.clone().into_bytes(),
        Some(Data::Binary(b)) => b.clone(),
        None => Vec::new(),
    };
    (headers, body)
}

/// Percent-encodes what the CloudEvents HTTP binding says must be: space, `"`, `%`,
/// and anything outside printable ASCII.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Record;
    use chrono::{TimeZone, Utc};
    use cloudevents::AttributesReader;
    use serde_json::json;

    fn stored() -> Stored {
        Stored {
            seq: 42,
            record: Record {
                source: "/ferry/gw-1/mqtt/local".into(),
                event_type: "io.ferry.reading".into(),
                subject: "freezer-1".into(),
                time: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
                data: json!({"temperature": -12.5}),
                ext: [("rule".to_string(), "freezer warm".to_string())].into(),
                to: None,
            },
            bytes: 0,
        }
    }

    #[test]
    fn the_id_is_the_epoch_and_the_sequence() {
        let e = to_event("abc", &stored()).unwrap();
        assert_eq!(e.id(), "abc-42");
        assert_eq!(e.source().as_str(), "/ferry/gw-1/mqtt/local");
    }

    #[test]
    fn a_stored_record_makes_an_event_fixed_by_the_record_and_the_epoch_alone() {
        // Every resend builds the event again from the stored record: nothing in it
        // may come from the moment of sending. Extension order inside the SDK is not
        // fixed, so compare as JSON values.
        let v: serde_json::Value =
            serde_json::from_slice(&structured(&to_event("abc", &stored()).unwrap())).unwrap();
        assert_eq!(
            v,
            json!({
                "specversion": "1.0",
                "id": "abc-42",
                "source": "/ferry/gw-1/mqtt/local",
                "type": "io.ferry.reading",
                "subject": "freezer-1",
                "time": "2026-01-02T03:04:05Z",
                "datacontenttype": "application/json",
                "sequence": "42",
                "rule": "freezer warm",
                "data": {"temperature": -12.5},
            })
        );
    }

    #[test]
    fn structured_mode_is_a_valid_cloudevent_json_object() {
        let e = to_event("abc", &stored()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&structured(&e)).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "io.ferry.reading");
        assert_eq!(v["subject"], "freezer-1");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["data"], json!({"temperature": -12.5}));
        assert_eq!(v["sequence"], "42");
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn binary_mode_puts_attributes_in_headers_and_data_in_the_body() {
        let (h, body) = binary(&to_event("abc", &stored()).unwrap());
        assert_eq!(h["ce-id"], "abc-42");
        assert_eq!(h["ce-specversion"], "1.0");
        assert_eq!(h["ce-source"], "/ferry/gw-1/mqtt/local");
        assert_eq!(h["ce-time"], "2026-01-02T03:04:05Z");
        assert_eq!(h["ce-rule"], "freezer%20warm");
        assert_eq!(h["content-type"], "application/json");
        assert!(h.get("ce-datacontenttype").is_none());
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            json!({"temperature": -12.5})
        );
    }

    #[test]
    fn a_batch_is_an_array_of_structured_events() {
        let e = to_event("abc", &stored()).unwrap();
        let v: Vec<Event> = serde_json::from_slice(&batch(&[e.clone(), e.clone()])).unwrap();
        assert_eq!(v, vec![e.clone(), e]);
    }
}
