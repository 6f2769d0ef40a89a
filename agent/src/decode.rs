//! Decode: payload bytes to a [`Reading`].
//!
//! Pure functions: no I/O, no clock (the receive time is passed in). Every way a
//! payload can be bad is a [`DecodeError`] variant with a short `reason` used as the
//! metrics label, so bad input is counted, never fatal.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// A decoded reading, ready for the rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device: String,
    pub time: DateTime<Utc>,
    pub fields: Map<String, Value>,
}

/// How a source's payloads are decoded.
#[derive(Debug, Clone)]
pub struct DecodeConfig {
    pub device: DeviceTemplate,
    pub max_payload: usize,
    /// A top-level field holding the reading's time (RFC 3339); taken out of the fields.
    pub time_field: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("payload of {size} bytes is over the {max} byte limit")]
    Oversize { size: usize, max: usize },
    #[error("payload is not valid JSON: {0}")]
    Malformed(String),
    #[error("payload is JSON but not an object")]
    NotAnObject,
    #[error("no device id: {0}")]
    NoDevice(String),
    #[error("this source sends no payloads to decode")]
    Undecodable,
}

impl DecodeError {
    /// The metrics label for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Oversize { .. } => "oversize",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::NotAnObject => "not_an_object",
            DecodeError::NoDevice(_) => "no_device",
            DecodeError::Undecodable => "undecodable",
        }
    }
}

/// Decodes a JSON object payload received on `topic`.
pub fn decode_json(
    cfg: &DecodeConfig,
    topic: &str,
    bytes: &[u8],
    received: DateTime<Utc>,
) -> Result<Reading, DecodeError> {
    if bytes.len() > cfg.max_payload {
        return Err(DecodeError::Oversize {
            size: bytes.len(),
            max: cfg.max_payload,
        });
    }
    // serde_json refuses nesting deeper than 128 levels, so deep JSON is an error,
    // not a stack overflow.
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let Value::Object(mut fields) = value else {
        return Err(DecodeError::NotAnObject);
    };
    let device = cfg.device.render(topic, &fields)?;
    let time = take_time(cfg.time_field.as_deref(), &mut fields).unwrap_or(received);
    Ok(Reading {
        device,
        time,
        fields,
    })
}

/// Removes and parses the time field, if present and valid. An unparseable time stays
/// a field and the receive time is used, so a sensor with a skewed format still counts.
pub fn take_time(field: Option<&str>, fields: &mut Map<String, Value>) -> Option<DateTime<Utc>> {
    let name = field?;
    let parsed = fields
        .get(name)
        .and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())?;
    fields.remove(name);
    Some(parsed.with_timezone(&Utc))
}

/// Where the device id comes from: literal text mixed with `{topic.N}` (N-th topic
/// segment, from 0) and `{payload.a.b}` (a string or number field of the payload).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Topic(usize),
    Payload(Vec<String>),
}

impl DeviceTemplate {
    /// Whether it takes part of the id from an MQTT topic (`{topic.N}`), which only
    /// MQTT readings have.
    pub fn uses_topic(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Topic(_)))
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in device template {s:?}"))?
                + open;
            let inner = &rest[open + 1..close];
            parts.push(if let Some(n) = inner.strip_prefix("topic.") {
                Part::Topic(
                    n.parse().map_err(|_| {
                        format!("{{topic.N}} needs a segment number, got {{{inner}}}")
                    })?,
                )
            } else if let Some(path) = inner.strip_prefix("payload.") {
                if path.is_empty() || path.split('.').any(str::is_empty) {
                    return Err(format!("empty field name in {{{inner}}}"));
                }
                Part::Payload(path.split('.').map(String::from).collect())
            } else {
                return Err(format!(
                    "unknown placeholder {{{inner}}}: use {{topic.N}} or {{payload.field}}"
                ));
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        if parts.is_empty() {
            return Err("device template is empty".to_string());
        }
        Ok(Self { parts })
    }

    pub fn render(&self, topic: &str, fields: &Map<String, Value>) -> Result<String, DecodeError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Topic(n) => out.push_str(topic.split('/').nth(*n).ok_or_else(|| {
                    DecodeError::NoDevice(format!("topic {topic:?} has no segment {n}"))
                })?),
                Part::Payload(path) => {
                    let mut v = fields.get(&path[0]);
                    for key in &path[1..] {
                        v = v.and_then(|v| v.get(key));
                    }
                    match v {
                        Some(Value::String(s)) => out.push_str(s),
                        Some(Value::Number(n)) => out.push_str(&n.to_string()),
                        _ => {
                            return Err(DecodeError::NoDevice(format!(
                                "payload has no string field {}",
                                path.join(".")
                            )))
                        }
                    }
                }
            }
        }
        if out.is_empty() {
            return Err(DecodeError::NoDevice("device id is empty".to_string()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(device: &str) -> DecodeConfig {
        DecodeConfig {
            device: DeviceTemplate::parse(device).unwrap(),
            max_payload: 1024,
            time_field: Some("time".to_string()),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn the_device_comes_from_a_topic_segment() {
        let r = decode_json(
            &cfg("{topic.1}"),
            "sensors/freezer-1/telemetry",
            br#"{"t":1}"#,
            now(),
        )
        .unwrap();
        assert_eq!(r.device, "freezer-1");
    }

    #[test]
    fn the_device_comes_from_a_nested_payload_field_with_literal_text() {
        let r = decode_json(
            &cfg("site-{payload.meta.id}"),
            "x",
            br#"{"meta":{"id":7}}"#,
            now(),
        )
        .unwrap();
        assert_eq!(r.device, "site-7");
    }

    #[test]
    fn numbers_strings_booleans_and_nested_objects_are_kept() {
        let p =
            br#"{"temperature":21.5,"count":3,"door":"open","alarm":true,"bp":{"systolic":150}}"#;
        let r = decode_json(&cfg("{topic.0}"), "dev", p, now()).unwrap();
        assert_eq!(
            Value::Object(r.fields),
            json!({"temperature":21.5,"count":3,"door":"open","alarm":true,"bp":{"systolic":150}})
        );
    }

    #[test]
    fn a_time_field_sets_the_reading_time_and_leaves_the_fields() {
        let r = decode_json(
            &cfg("{topic.0}"),
            "d",
            br#"{"time":"2025-05-01T10:00:00+02:00","t":1}"#,
            now(),
        )
        .unwrap();
        assert_eq!(r.time.to_rfc3339(), "2025-05-01T08:00:00+00:00");
        assert!(!r.fields.contains_key("time"));
    }

    #[test]
    fn a_reading_without_time_gets_the_receive_time() {
        let r = decode_json(&cfg("{topic.0}"), "d", br#"{"t":1}"#, now()).unwrap();
        assert_eq!(r.time, now());
    }

    #[test]
    fn bad_payloads_are_errors_with_reasons() {
        let c = cfg("{topic.5}");
        let cases: [(&[u8], &str); 4] = [
            (b"{not json", "malformed"),
            (b"[1,2]", "not_an_object"),
            (&[b' '; 2000], "oversize"),
            (br#"{"t":1}"#, "no_device"),
        ];
        for (payload, reason) in cases {
            let e = decode_json(&c, "a/b", payload, now()).unwrap_err();
            assert_eq!(e.reason(), reason, "{e}");
        }
    }

    #[test]
    fn deeply_nested_json_is_rejected_not_a_crash() {
        let mut c = cfg("{topic.0}");
        c.max_payload = 1 << 20;
        let deep = format!("{}{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
        let e = decode_json(&c, "d", deep.as_bytes(), now()).unwrap_err();
        assert_eq!(e.reason(), "malformed");
    }

    #[test]
    fn templates_with_unknown_placeholders_are_refused() {
        assert!(DeviceTemplate::parse("{host}").is_err());
        assert!(DeviceTemplate::parse("{topic.x}").is_err());
        assert!(DeviceTemplate::parse("{topic.1").is_err());
        assert!(DeviceTemplate::parse("").is_err());
        assert!(DeviceTemplate::parse("fixed").is_ok());
    }
}
