//! Any bytes as what a serial port delivers, cut into reads of varying size, through
//! every framing and then every format: nothing panics, memory stays within the
//! framer's bound at every step, and no frame is longer than the maximum.

#![no_main]

use ferry_agent::serial::{Format, FormatConfig, Framer, Framing, LengthBytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the settings; the rest is the byte stream.
    let Some((&knobs, stream)) = data.split_first() else {
        return;
    };
    let framing = match knobs % 3 {
        0 => Framing::Lines,
        1 => Framing::Cobs,
        _ => Framing::LengthPrefixed,
    };
    let length_bytes = if knobs & 0x04 == 0 {
        LengthBytes::Two
    } else {
        LengthBytes::One
    };
    let max = 16 + usize::from(knobs >> 3) * 8;
    let read_size = 1 + usize::from(knobs % 7) * 5;
    let formats: Vec<FormatConfig> = [
        (Format::Csv, vec!["a".to_string(), "b".to_string()]),
        (Format::Json, Vec::new()),
        (Format::Kv, Vec::new()),
        (Format::Nmea, Vec::new()),
        (Format::None, Vec::new()),
    ]
    .into_iter()
    .map(|(format, fields)| FormatConfig { format, fields })
    .collect();

    let mut framer = Framer::with_length_bytes(framing, length_bytes, max);
    let mut frames = Vec::new();
    for read in stream.chunks(read_size) {
        framer.push(read, &mut frames);
        assert!(framer.buffered() <= framer.buffer_limit());
        for frame in frames.drain(..) {
            let Ok(bytes) = frame else { continue };
            assert!(
                bytes.len() <= max,
                "a {} byte frame, max {max}",
                bytes.len()
            );
            for format in &formats {
                let _ = format.parse(&bytes);
            }
        }
    }
});
