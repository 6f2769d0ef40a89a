//! Any payload the ingest accepts reads back from the store and encodes for every
//! sink: what ferry acknowledges it can always deliver. The payload (and an alert
//! carrying it as `data.values`, which nests it deeper) is stored as the store
//! stores it, read back, and encoded as a CloudEvent in binary, structured and
//! batch mode; each must succeed and parse again as the same data.

#![no_main]

use std::collections::BTreeMap;

use chrono::{TimeZone, Utc};
use ferry_agent::decode::{decode_json, DecodeConfig, DeviceTemplate};
use ferry_agent::sinks::http::binding;
use ferry_agent::sinks::Event;
use ferry_agent::store::{Record, Stored};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

fuzz_target!(|data: &[u8]| {
    let cfg = DecodeConfig {
        device: DeviceTemplate::parse("{topic.1}").expect("a valid template"),
        max_payload: 1 << 20,
        time_field: Some("time".to_string()),
    };
    let received = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let Ok(reading) = decode_json(&cfg, "sensors/dev/telemetry", data, received) else {
        return;
    };
    let fields = Value::Object(reading.fields.clone());
    let record = Record {
        source: "/ferry/gw/mqtt/local".into(),
        event_type: "io.ferry.reading".into(),
        subject: reading.device.clone(),
        time: reading.time,
        data: fields.clone().into(),
        ext: BTreeMap::new(),
        to: None,
        origin: None,
    };
    let mut alert = record.clone();
    alert.event_type = "com.example.alert".into();
    alert.data =
        json!({"rule": "r", "device": reading.device, "transition": "fired", "values": fields})
            .into();
    alert.ext.insert("rule".into(), "r".into());

    let mut events = Vec::new();
    for (seq, r) in [(1u64, record), (2, alert)] {
        // The store's encoding.
        let bytes = serde_json::to_vec(&r).expect("a record always encodes");
        let back: Record = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("an accepted reading does not read back: {e}"));
        assert_eq!(back, r);
        let stored = Stored {
            seq,
            record: back,
            bytes: bytes.len(),
        };
        let event = Event::from_stored("epoch", &stored).expect("a stored record is an event");
        // Structured mode: the whole event as JSON.
        let structured: Value = serde_json::from_slice(&binding::structured(&event))
            .unwrap_or_else(|e| panic!("structured encoding does not parse: {e}"));
        assert_eq!(structured["data"], *r.data);
        // Binary mode: the body is the data.
        let (_, body) = binding::binary(&event);
        let body: Value = serde_json::from_slice(&body).expect("binary body parses");
        assert_eq!(body, *r.data);
        events.push(event);
    }
    let batch: Value = serde_json::from_slice(&binding::batch(&events))
        .unwrap_or_else(|e| panic!("batch encoding does not parse: {e}"));
    assert_eq!(batch.as_array().map(Vec::len), Some(2));
});
