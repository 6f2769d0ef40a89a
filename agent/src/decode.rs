//! Decode: payload bytes to a [`Reading`].
//!
//! Pure functions: no I/O, no clock (the receive time is passed in). Every way a
//! payload can be bad is a [`DecodeError`] variant with a short `reason` used as the
//! metrics label, so bad input is counted, never fatal.
//!
//! # Limits checked once, here
//! A reading accepted here is acknowledged to its producer, so everything later on
//! (the store's encoding, rule values, every sink's encoding) must be able to take
//! it. [`check_reading`] is the one place that says what "can take" means:
//! [`MAX_DEPTH`] levels of nesting and a device id of at most [`MAX_DEVICE_BYTES`].

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// The deepest nesting a reading's fields may have (the fields object itself is
/// level 1). Stored records wrap the fields in two more levels (an alert's
/// `data.values`, the record itself) and a batch of CloudEvents in two more, so
/// this leaves a wide margin below serde_json's fixed limit of 128 on reading any
/// of them back. A reading is checked against it before it is acknowledged.
pub const MAX_DEPTH: usize = 64;

/// The longest device id, in bytes. Device ids are keys of rule state and part of
/// every event; an unbounded one would let one reading grow every alert's state.
pub const MAX_DEVICE_BYTES: usize = 256;

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
    #[error("payload is nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("device id of {0} bytes is over the {MAX_DEVICE_BYTES} byte limit")]
    DeviceTooLong(usize),
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
            // Valid JSON that later stages could not read back is malformed for us.
            DecodeError::TooDeep => "malformed",
            DecodeError::DeviceTooLong(_) => "bad_device",
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
    let reading = Reading {
        device,
        time,
        fields,
    };
    check_reading(&reading)?;
    Ok(reading)
}

/// Whether a reading, from any source, is within the limits every later stage can
/// take ([`MAX_DEPTH`], [`MAX_DEVICE_BYTES`]). Run before a reading is committed.
pub fn check_reading(reading: &Reading) -> Result<(), DecodeError> {
    if reading.device.len() > MAX_DEVICE_BYTES {
        return Err(DecodeError::DeviceTooLong(reading.device.len()));
    }
    if reading
        .fields
        .values()
        .any(|v| !within_depth(v, MAX_DEPTH - 1))
    {
        return Err(DecodeError::TooDeep);
    }
    Ok(())
}

/// Whether `value` nests at most `levels` levels (a scalar is 0, `[]` is 1). An
/// explicit stack, so a value nested far too deep cannot overflow ours.
fn within_depth(value: &Value, levels: usize) -> bool {
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        if depth + 1 > levels {
            return false;
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    true
}

/// What happened to a reading's time against the agent's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Within the tolerance: kept.
    Trusted,
    /// Too far ahead of the agent's clock: replaced by the receive time.
    Ahead,
    /// Too far behind it: replaced by the receive time.
    Behind,
}

impl Clock {
    /// The metrics label.
    pub fn direction(self) -> &'static str {
        match self {
            Clock::Trusted => "trusted",
            Clock::Ahead => "ahead",
            Clock::Behind => "behind",
        }
    }
}

/// The field that keeps a distrusted reading time, as the device sent it.
pub const REPORTED_TIME_FIELD: &str = "reported_time";

/// Keeps a reading's own time only if it is at most `ahead` after and `behind`
/// before `received` (the agent's clock). One reading from a device with a wrong
/// clock would otherwise make every later reading of that device late for its
/// windows and timers. A distrusted time is replaced by `received`, and the time
/// the device sent is kept in the [`REPORTED_TIME_FIELD`] field.
pub fn bound_time(
    reading: &mut Reading,
    received: DateTime<Utc>,
    ahead: chrono::TimeDelta,
    behind: chrono::TimeDelta,
) -> Clock {
    let clock = if reading.time
        > received
            .checked_add_signed(ahead)
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    {
        Clock::Ahead
    } else if reading.time
        < received
            .checked_sub_signed(behind)
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    {
        Clock::Behind
    } else {
        return Clock::Trusted;
    };
    reading.fields.insert(
        REPORTED_TIME_FIELD.to_string(),
        Value::String(
            reading
                .time
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        ),
    );
    reading.time = received;
    clock
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

    fn nested(levels: usize) -> String {
        // `{"a":` levels-1 times around 1: the payload object is level 1.
        format!("{}1{}", "{\"a\":".repeat(levels), "}".repeat(levels))
    }

    #[test]
    fn a_payload_at_the_depth_limit_is_accepted_and_one_level_more_is_malformed() {
        let at = decode_json(&cfg("{topic.0}"), "d", nested(MAX_DEPTH).as_bytes(), now());
        assert!(at.is_ok(), "{at:?}");
        let over = decode_json(
            &cfg("{topic.0}"),
            "d",
            nested(MAX_DEPTH + 1).as_bytes(),
            now(),
        )
        .unwrap_err();
        assert_eq!(over, DecodeError::TooDeep);
        assert_eq!(over.reason(), "malformed");
    }

    #[test]
    fn arrays_count_as_levels_like_objects() {
        let mut c = cfg("{topic.0}");
        c.max_payload = 1 << 20;
        let deep = format!(
            "{{\"a\":{}1{}}}",
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        let e = decode_json(&c, "d", deep.as_bytes(), now()).unwrap_err();
        assert_eq!(e, DecodeError::TooDeep);
        let fits = format!(
            "{{\"a\":{}1{}}}",
            "[".repeat(MAX_DEPTH - 1),
            "]".repeat(MAX_DEPTH - 1)
        );
        assert!(decode_json(&c, "d", fits.as_bytes(), now()).is_ok());
    }

    #[test]
    fn the_deepest_accepted_reading_reads_back_as_a_stored_alert() {
        // What the store and sinks do to a reading: wrap it as an alert's
        // `data.values` inside a record, inside a batch; serde_json must read it back.
        let r = decode_json(&cfg("{topic.0}"), "d", nested(MAX_DEPTH).as_bytes(), now()).unwrap();
        let wrapped = json!([{"data": {"values": Value::Object(r.fields.clone())}}]);
        let text = serde_json::to_string(&wrapped).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, wrapped);
    }

    #[test]
    fn a_number_with_many_digits_reads_back_from_the_store_bit_for_bit() {
        // Found by fuzzing: without exact float parsing, what was stored came back
        // one ulp off what the device sent.
        let payload = format!(r#"{{"t":16{}e91}}"#, "5".repeat(40));
        let r = decode_json(&cfg("{topic.0}"), "d", payload.as_bytes(), now()).unwrap();
        let stored = serde_json::to_string(&Value::Object(r.fields.clone())).unwrap();
        let back: Value = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, Value::Object(r.fields));
    }

    #[test]
    fn a_device_id_over_256_bytes_is_a_bad_device() {
        let long = "d".repeat(MAX_DEVICE_BYTES + 1);
        let e = decode_json(
            &cfg("{payload.id}"),
            "t",
            format!(r#"{{"id":"{long}"}}"#).as_bytes(),
            now(),
        )
        .unwrap_err();
        assert_eq!(e.reason(), "bad_device");
        let fits = "d".repeat(MAX_DEVICE_BYTES);
        let r = decode_json(
            &cfg("{payload.id}"),
            "t",
            format!(r#"{{"id":"{fits}"}}"#).as_bytes(),
            now(),
        )
        .unwrap();
        assert_eq!(r.device, fits);
    }

    fn at(t: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_reading_time_far_ahead_of_the_agent_clock_is_replaced_and_kept_as_a_field() {
        let mut r = decode_json(
            &cfg("{topic.0}"),
            "d",
            br#"{"time":"9999-12-31T23:59:59Z","t":1}"#,
            now(),
        )
        .unwrap();
        let clock = bound_time(
            &mut r,
            now(),
            chrono::TimeDelta::days(1),
            chrono::TimeDelta::days(30),
        );
        assert_eq!(clock, Clock::Ahead);
        assert_eq!(r.time, now());
        assert_eq!(r.fields[REPORTED_TIME_FIELD], json!("9999-12-31T23:59:59Z"));
    }

    #[test]
    fn a_reading_time_far_behind_is_replaced_and_one_within_the_bounds_is_kept() {
        let day = chrono::TimeDelta::days(1);
        let mut old = Reading {
            device: "d".into(),
            time: at("1970-01-01T00:00:00Z"),
            fields: Map::new(),
        };
        assert_eq!(bound_time(&mut old, now(), day, day * 30), Clock::Behind);
        assert_eq!(old.time, now());
        assert_eq!(
            old.fields[REPORTED_TIME_FIELD],
            json!("1970-01-01T00:00:00Z")
        );

        let mut fine = Reading {
            device: "d".into(),
            time: at("2026-01-01T12:00:00Z"),
            fields: Map::new(),
        };
        assert_eq!(bound_time(&mut fine, now(), day, day * 30), Clock::Trusted);
        assert_eq!(fine.time, at("2026-01-01T12:00:00Z"));
        assert!(fine.fields.is_empty());
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
