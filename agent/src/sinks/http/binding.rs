//! The CloudEvents HTTP protocol binding: binary, structured and batched content
//! modes, mapped from our transport-neutral [`Event`] (binary mode is a loop over
//! [`Event::attributes`]).

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};

use super::HttpMode;
use crate::sinks::event::{Event, DATACONTENTTYPE};
use crate::sinks::percent_encode;

pub const STRUCTURED: &str = "application/cloudevents+json";
pub const BATCH: &str = "application/cloudevents-batch+json";

/// Structured mode: the whole event as one JSON object.
pub fn structured(event: &Event) -> Vec<u8> {
    event.structured()
}

/// Batched mode: a JSON array of structured events.
pub fn batch(events: &[Event]) -> Vec<u8> {
    // Serialising our events into memory cannot fail.
    serde_json::to_vec(events).unwrap_or_default()
}

/// Binary mode: attributes as `ce-*` headers, the data as the body.
pub fn binary(event: &Event) -> (HeaderMap, Vec<u8>) {
    let mut headers = HeaderMap::new();
    for (name, value) in event.attributes() {
        // Names are lower-case alphanumeric (checked when the event is built) and
        // values are ASCII except for user strings, which are percent-encoded as the
        // HTTP binding asks.
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(format!("ce-{name}").as_bytes()),
            HeaderValue::from_str(&percent_encode(&value)),
        ) {
            headers.insert(n, v);
        }
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(DATACONTENTTYPE));
    (headers, event.data_bytes())
}

/// The bytes one event takes in a request body in `mode`, before compression: the
/// data in binary mode (the `ce-*` headers are not counted), its JSON object in
/// structured mode and its element of the array in batch mode. This is what
/// `max_message` is compared with.
pub fn message_len(mode: HttpMode, event: &Event) -> usize {
    match mode {
        HttpMode::Binary => event.data_len(),
        HttpMode::Structured | HttpMode::Batch => event.structured_len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Record, Stored};
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    fn event() -> Event {
        let stored = Stored {
            seq: 42,
            record: Record {
                source: "/ferry/gw-1/mqtt/local".into(),
                event_type: "io.ferry.reading".into(),
                subject: "freezer-1".into(),
                time: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
                data: json!({"temperature": -12.5}).into(),
                ext: [("rule".to_string(), "freezer warm".to_string())].into(),
                to: None,
                origin: None,
            },
            bytes: 0,
        };
        Event::from_stored("abc", &stored).unwrap()
    }

    #[test]
    fn binary_mode_puts_attributes_in_headers_and_data_in_the_body() {
        let (h, body) = binary(&event());
        assert_eq!(h["ce-id"], "abc-42");
        assert_eq!(h["ce-specversion"], "1.0");
        assert_eq!(h["ce-source"], "/ferry/gw-1/mqtt/local");
        assert_eq!(h["ce-time"], "2026-01-02T03:04:05Z");
        assert_eq!(h["ce-sequence"], "42");
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
        let e = event();
        let body = batch(&[e.clone(), e.clone()]);
        let one = String::from_utf8(structured(&e)).unwrap();
        assert_eq!(String::from_utf8(body).unwrap(), format!("[{one},{one}]"));
    }

    #[test]
    fn the_size_checked_against_max_message_is_the_body_in_binary_mode_and_the_object_otherwise() {
        let e = event();
        assert_eq!(message_len(HttpMode::Binary, &e), binary(&e).1.len());
        assert_eq!(message_len(HttpMode::Structured, &e), structured(&e).len());
        assert_eq!(message_len(HttpMode::Batch, &e), structured(&e).len());
    }
}
