//! Framing: the byte chunks a serial port delivers, cut into frames.
//!
//! A read from a port returns whatever has arrived: part of a frame, several frames,
//! or the end of one and the start of the next. A [`Framer`] is fed those chunks in
//! order and yields every complete frame. It is a pure state machine: no I/O, no clock.
//!
//! Memory is bounded by the maximum frame length: a frame that grows past it is
//! reported once as [`FrameError::TooLong`] as soon as the limit is crossed, and its
//! remaining bytes are dropped without being buffered (up to the next delimiter, or
//! for length-prefixed frames the declared length). The internal buffer never holds
//! more than [`Framer::buffer_limit`] bytes, which is the maximum plus a small
//! framing overhead (one `\r` for lines, the COBS code bytes for COBS).
//!
//! Empty frames (blank lines, two `0x00` in a row, a zero length prefix) are skipped:
//! senders use them as keep-alives or to resynchronise.

use serde::Deserialize;

/// How frames are delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// Text lines ended by `\n`; a `\r` just before it is dropped, so `\r\n` works too.
    /// Blank lines are skipped.
    #[default]
    Lines,
    /// COBS-encoded frames, each ended by a `0x00` byte; frames are decoded before use.
    Cobs,
    /// A big-endian length (1 or 2 bytes, see `length_bytes`) followed by that many
    /// bytes. A length over the maximum frame size is reported and that many bytes are
    /// skipped, which keeps a well-behaved sender in step. A zero length is skipped.
    #[serde(alias = "length-prefixed")]
    LengthPrefixed,
}

/// The width of the length prefix of [`Framing::LengthPrefixed`]: 1 or 2 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "u8")]
pub enum LengthBytes {
    /// One byte: frames of up to 255 bytes.
    One,
    /// Two bytes, big-endian: frames of up to 65535 bytes.
    #[default]
    Two,
}

impl LengthBytes {
    fn width(self) -> usize {
        match self {
            LengthBytes::One => 1,
            LengthBytes::Two => 2,
        }
    }
}

impl TryFrom<u8> for LengthBytes {
    type Error = String;

    fn try_from(n: u8) -> Result<Self, String> {
        match n {
            1 => Ok(LengthBytes::One),
            2 => Ok(LengthBytes::Two),
            n => Err(format!("length_bytes must be 1 or 2, got {n}")),
        }
    }
}

/// A way the byte stream failed to form a usable frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// For delimited framings `len_seen` is the number of bytes seen when the frame
    /// was given up on; for length-prefixed framing it is the declared length.
    #[error("frame over the {max} byte limit ({len_seen} bytes seen), discarded")]
    TooLong { len_seen: usize, max: usize },
    #[error("frame is not valid COBS")]
    BadCobs,
}

impl FrameError {
    /// The metrics label for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::TooLong { .. } => "too_long",
            FrameError::BadCobs => "bad_cobs",
        }
    }
}

/// One complete frame, or why the bytes where one should have been were dropped.
pub type Frame = Result<Vec<u8>, FrameError>;

/// An incremental frame decoder for one byte stream (one open port).
#[derive(Debug, Clone)]
pub struct Framer {
    mode: Mode,
    max_len: usize,
    buf: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Lines or COBS: collect up to `delim`, or drop bytes up to it after an over-long
    /// frame was reported.
    Delimited { cobs: bool, discarding: bool },
    /// Length-prefixed framing.
    Prefixed { width: LengthBytes, stage: Stage },
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Reading the length prefix into `buf`.
    Prefix,
    /// Reading a body of `len` bytes into `buf`.
    Body { len: usize },
    /// Skipping the body of an over-long frame.
    Skip { remaining: usize },
}

impl Framer {
    /// A framer yielding frames of at most `max_len` bytes (after COBS decoding).
    /// Length-prefixed framing uses a 2 byte prefix; see [`Framer::with_length_bytes`].
    pub fn new(framing: Framing, max_len: usize) -> Self {
        Self::with_length_bytes(framing, LengthBytes::default(), max_len)
    }

    /// Like [`Framer::new`], with the width of the length prefix (used only by
    /// [`Framing::LengthPrefixed`]).
    pub fn with_length_bytes(framing: Framing, length_bytes: LengthBytes, max_len: usize) -> Self {
        let mode = match framing {
            Framing::Lines => Mode::Delimited {
                cobs: false,
                discarding: false,
            },
            Framing::Cobs => Mode::Delimited {
                cobs: true,
                discarding: false,
            },
            Framing::LengthPrefixed => Mode::Prefixed {
                width: length_bytes,
                stage: Stage::Prefix,
            },
        };
        Self {
            mode,
            max_len,
            buf: Vec::new(),
        }
    }

    /// Feeds the next chunk read from the port; complete frames (and errors) are
    /// appended to `out` in stream order.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Frame>) {
        match self.mode {
            Mode::Delimited { cobs, .. } => {
                self.push_delimited(chunk, if cobs { 0 } else { b'\n' }, out)
            }
            Mode::Prefixed { .. } => self.push_prefixed(chunk, out),
        }
    }

    /// Drops any partial frame, e.g. when the port was closed and is opened again.
    pub fn reset(&mut self) {
        self.buf.clear();
        match &mut self.mode {
            Mode::Delimited { discarding, .. } => *discarding = false,
            Mode::Prefixed { stage, .. } => *stage = Stage::Prefix,
        }
    }

    /// Bytes of a partial frame currently held.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The most bytes the framer ever holds: the maximum frame length plus the
    /// framing overhead (a trailing `\r` for lines, COBS code bytes for COBS).
    pub fn buffer_limit(&self) -> usize {
        match self.mode {
            Mode::Delimited { cobs: false, .. } => self.max_len.saturating_add(1),
            // COBS adds one code byte per 254 data bytes, plus one; +1 for encoders
            // that end a full 254 byte block with an extra code byte.
            Mode::Delimited { cobs: true, .. } => self
                .max_len
                .saturating_add(self.max_len / 254)
                .saturating_add(2),
            Mode::Prefixed { width, .. } => self.max_len.max(width.width()),
        }
    }

    fn push_delimited(&mut self, mut chunk: &[u8], delim: u8, out: &mut Vec<Frame>) {
        while !chunk.is_empty() {
            match chunk.iter().position(|&b| b == delim) {
                Some(i) => {
                    self.take_segment(&chunk[..i], true, out);
                    chunk = &chunk[i + 1..];
                }
                None => {
                    self.take_segment(chunk, false, out);
                    break;
                }
            }
        }
    }

    /// Takes bytes of the current frame; `complete` when the delimiter followed them.
    fn take_segment(&mut self, seg: &[u8], complete: bool, out: &mut Vec<Frame>) {
        let Mode::Delimited { cobs, discarding } = self.mode else {
            return;
        };
        if discarding {
            if complete {
                self.mode = Mode::Delimited {
                    cobs,
                    discarding: false,
                };
            }
            return;
        }
        let limit = self.buffer_limit();
        let total = self.buf.len() + seg.len();
        if total > limit {
            out.push(Err(FrameError::TooLong {
                len_seen: total,
                max: self.max_len,
            }));
            self.buf.clear();
            self.mode = Mode::Delimited {
                cobs,
                discarding: !complete,
            };
            return;
        }
        self.extend_bounded(seg, limit);
        if !complete {
            return;
        }
        let frame = if cobs {
            self.finish_cobs()
        } else {
            self.finish_line()
        };
        self.buf.clear();
        if let Some(frame) = frame {
            out.push(frame);
        }
    }

    fn finish_line(&self) -> Option<Frame> {
        let line = self.buf.strip_suffix(b"\r").unwrap_or(&self.buf);
        self.checked(line.to_vec())
    }

    fn finish_cobs(&self) -> Option<Frame> {
        if self.buf.is_empty() {
            return None;
        }
        match cobs_decode(&self.buf) {
            Some(data) => self.checked(data),
            None => Some(Err(FrameError::BadCobs)),
        }
    }

    fn checked(&self, frame: Vec<u8>) -> Option<Frame> {
        if frame.is_empty() {
            None
        } else if frame.len() > self.max_len {
            Some(Err(FrameError::TooLong {
                len_seen: frame.len(),
                max: self.max_len,
            }))
        } else {
            Some(Ok(frame))
        }
    }

    fn push_prefixed(&mut self, mut chunk: &[u8], out: &mut Vec<Frame>) {
        let Mode::Prefixed { width, mut stage } = self.mode else {
            return;
        };
        let limit = self.buffer_limit();
        while !chunk.is_empty() {
            stage = match stage {
                Stage::Prefix => {
                    let take = (width.width() - self.buf.len()).min(chunk.len());
                    self.extend_bounded(&chunk[..take], limit);
                    chunk = &chunk[take..];
                    if self.buf.len() < width.width() {
                        Stage::Prefix
                    } else {
                        let len = self
                            .buf
                            .iter()
                            .fold(0usize, |n, &b| n << 8 | usize::from(b));
                        self.buf.clear();
                        if len == 0 {
                            Stage::Prefix
                        } else if len > self.max_len {
                            out.push(Err(FrameError::TooLong {
                                len_seen: len,
                                max: self.max_len,
                            }));
                            Stage::Skip { remaining: len }
                        } else {
                            Stage::Body { len }
                        }
                    }
                }
                Stage::Body { len } => {
                    let take = (len - self.buf.len()).min(chunk.len());
                    self.extend_bounded(&chunk[..take], limit);
                    chunk = &chunk[take..];
                    if self.buf.len() < len {
                        Stage::Body { len }
                    } else {
                        out.push(Ok(self.buf.clone()));
                        self.buf.clear();
                        Stage::Prefix
                    }
                }
                Stage::Skip { remaining } => {
                    let take = remaining.min(chunk.len());
                    chunk = &chunk[take..];
                    if remaining > take {
                        Stage::Skip {
                            remaining: remaining - take,
                        }
                    } else {
                        Stage::Prefix
                    }
                }
            };
        }
        self.mode = Mode::Prefixed { width, stage };
    }

    /// Appends to `buf`, growing its allocation no further than `limit` (callers have
    /// checked that `buf.len() + bytes.len() <= limit`).
    fn extend_bounded(&mut self, bytes: &[u8], limit: usize) {
        let total = self.buf.len() + bytes.len();
        if total > self.buf.capacity() {
            let want = self
                .buf
                .capacity()
                .saturating_mul(2)
                .clamp(total, limit.max(total));
            self.buf.reserve_exact(want - self.buf.len());
        }
        self.buf.extend_from_slice(bytes);
    }
}

/// Decodes one COBS frame (without its `0x00` delimiter); `None` if it is not valid.
pub fn cobs_decode(src: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(src.len());
    let mut i = 0;
    while i < src.len() {
        let code = usize::from(src[i]);
        if code == 0 {
            return None;
        }
        let end = i + code;
        let data = src.get(i + 1..end)?;
        if data.contains(&0) {
            return None;
        }
        out.extend_from_slice(data);
        i = end;
        if code < 0xFF && i < src.len() {
            out.push(0);
        }
    }
    Some(out)
}

/// COBS-encodes `data` and appends the `0x00` delimiter: the inverse of the
/// [`Framing::Cobs`] framer, for writing frames to a port.
pub fn cobs_encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 254 + 2);
    let mut code_at = out.len();
    out.push(0);
    let mut code = 1u8;
    for &b in data {
        if b == 0 {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        } else {
            out.push(b);
            code += 1;
            if code == 0xFF {
                out[code_at] = code;
                code_at = out.len();
                out.push(0);
                code = 1;
            }
        }
    }
    out[code_at] = code;
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(framer: &mut Framer, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut out = Vec::new();
        for c in chunks {
            framer.push(c, &mut out);
        }
        out
    }

    fn ok(s: &[u8]) -> Frame {
        Ok(s.to_vec())
    }

    /// Feeds `stream` split at every byte boundary (and byte by byte) and checks the
    /// frames are always the same as when it comes in one chunk.
    fn assert_split_invariant(make: impl Fn() -> Framer, stream: &[u8], expected: &[Frame]) {
        assert_eq!(frames(&mut make(), &[stream]), expected, "whole");
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(frames(&mut make(), &[a, b]), expected, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(frames(&mut make(), &bytes), expected, "byte by byte");
    }

    #[test]
    fn a_line_split_across_reads_at_every_byte_is_reassembled() {
        assert_split_invariant(
            || Framer::new(Framing::Lines, 64),
            b"21.5,open\n22.0,closed\n",
            &[ok(b"21.5,open"), ok(b"22.0,closed")],
        );
    }

    #[test]
    fn several_lines_in_one_read_each_become_a_frame() {
        let out = frames(&mut Framer::new(Framing::Lines, 64), &[b"a\nb\nc\nd"]);
        assert_eq!(out, [ok(b"a"), ok(b"b"), ok(b"c")]);
    }

    #[test]
    fn crlf_line_endings_lose_their_carriage_return_and_blank_lines_are_skipped() {
        let out = frames(
            &mut Framer::new(Framing::Lines, 64),
            &[b"a\r\n\r\n\nb\r", b"\n"],
        );
        assert_eq!(out, [ok(b"a"), ok(b"b")]);
    }

    #[test]
    fn a_line_of_exactly_the_maximum_is_kept_with_or_without_cr() {
        let out = frames(&mut Framer::new(Framing::Lines, 4), &[b"abcd\r\nefgh\n"]);
        assert_eq!(out, [ok(b"abcd"), ok(b"efgh")]);
    }

    #[test]
    fn an_over_long_line_is_discarded_once_and_the_next_line_is_intact() {
        let mut f = Framer::new(Framing::Lines, 8);
        let out = frames(&mut f, &[b"0123456789", b"0123456789", b"xx\nnext\n"]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].as_ref().unwrap_err().reason(), "too_long");
        assert_eq!(out[1], ok(b"next"));
        let out = frames(&mut f, &[b"123456789\nok\n"]);
        assert_eq!(
            out,
            [
                Err(FrameError::TooLong {
                    len_seen: 9,
                    max: 8
                }),
                ok(b"ok")
            ]
        );
    }

    #[test]
    fn an_endless_line_keeps_memory_bounded_by_the_maximum() {
        for framing in [Framing::Lines, Framing::Cobs, Framing::LengthPrefixed] {
            let mut f = Framer::new(framing, 100);
            let mut out = Vec::new();
            let chunk = [0x41u8; 37];
            for _ in 0..1000 {
                f.push(&chunk, &mut out);
                assert!(f.buffered() <= f.buffer_limit(), "{framing:?}");
                assert!(f.buf.capacity() <= f.buffer_limit(), "{framing:?}");
                assert!(f.buffer_limit() <= 100 + 2, "{framing:?}");
            }
        }
    }

    #[test]
    fn an_endless_line_is_reported_once() {
        let mut f = Framer::new(Framing::Lines, 10);
        let mut out = Vec::new();
        for _ in 0..100 {
            f.push(b"xxxxxxx", &mut out);
        }
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn reset_drops_a_partial_frame() {
        let mut f = Framer::new(Framing::Lines, 10);
        let mut out = Vec::new();
        f.push(b"half", &mut out);
        f.reset();
        f.push(b"whole\n", &mut out);
        assert_eq!(out, [ok(b"whole")]);
    }

    #[test]
    fn cobs_known_vectors_encode_and_decode() {
        let vectors: [(&[u8], &[u8]); 6] = [
            (&[0x00], &[0x01, 0x01, 0x00]),
            (&[0x00, 0x00], &[0x01, 0x01, 0x01, 0x00]),
            (
                &[0x11, 0x22, 0x00, 0x33],
                &[0x03, 0x11, 0x22, 0x02, 0x33, 0x00],
            ),
            (
                &[0x11, 0x22, 0x33, 0x44],
                &[0x05, 0x11, 0x22, 0x33, 0x44, 0x00],
            ),
            (
                &[0x11, 0x00, 0x00, 0x00],
                &[0x02, 0x11, 0x01, 0x01, 0x01, 0x00],
            ),
            (b"", &[0x01, 0x00]),
        ];
        for (data, encoded) in vectors {
            assert_eq!(cobs_encode(data), encoded, "{data:02x?}");
            let body = &encoded[..encoded.len() - 1];
            assert_eq!(cobs_decode(body).as_deref(), Some(data), "{encoded:02x?}");
        }
    }

    #[test]
    fn cobs_round_trips_long_frames_across_the_254_byte_block() {
        for n in [253usize, 254, 255, 300, 508, 600] {
            let data: Vec<u8> = (0..n).map(|i| (i % 255 + 1) as u8).collect();
            let mut with_zero = data.clone();
            with_zero[n / 2] = 0;
            for d in [data, with_zero] {
                let enc = cobs_encode(&d);
                let mut f = Framer::new(Framing::Cobs, n);
                assert_eq!(frames(&mut f, &[&enc]), [Ok(d.clone())], "n={n}");
                assert!(enc.len() <= f.buffer_limit() + 1, "n={n}");
            }
        }
    }

    #[test]
    fn cobs_frames_split_at_every_byte_are_decoded() {
        let mut stream = cobs_encode(&[1, 0, 2]);
        stream.extend(cobs_encode(b"hello\0"));
        stream.push(0); // an empty frame between is skipped
        stream.extend(cobs_encode(&[0]));
        assert_split_invariant(
            || Framer::new(Framing::Cobs, 16),
            &stream,
            &[ok(&[1, 0, 2]), ok(b"hello\0"), ok(&[0])],
        );
    }

    #[test]
    fn bad_cobs_is_an_error_and_the_next_frame_is_intact() {
        // A code byte pointing past the end of the frame.
        let mut stream = vec![0x05, 0x11, 0x00];
        stream.extend(cobs_encode(b"ok"));
        let out = frames(&mut Framer::new(Framing::Cobs, 16), &[&stream]);
        assert_eq!(out, [Err(FrameError::BadCobs), ok(b"ok")]);
        assert_eq!(FrameError::BadCobs.reason(), "bad_cobs");
    }

    #[test]
    fn an_over_long_cobs_frame_is_discarded_and_the_next_is_intact() {
        let mut stream = cobs_encode(&[7u8; 40]);
        stream.extend(cobs_encode(b"ok"));
        let out = frames(&mut Framer::new(Framing::Cobs, 16), &[&stream]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].as_ref().unwrap_err().reason(), "too_long");
        assert_eq!(out[1], ok(b"ok"));
    }

    #[test]
    fn length_prefixed_frames_with_a_two_byte_prefix_split_at_every_byte() {
        let stream = [
            &[0, 3][..],
            b"abc",
            &[0, 0],
            &[1, 0],
            &[9; 256],
            &[0, 1],
            b"z",
        ]
        .concat();
        assert_split_invariant(
            || Framer::new(Framing::LengthPrefixed, 300),
            &stream,
            &[ok(b"abc"), Ok(vec![9; 256]), ok(b"z")],
        );
    }

    #[test]
    fn length_prefixed_frames_with_a_one_byte_prefix_split_at_every_byte() {
        let stream = [&[3][..], b"abc", &[0], &[2], &[0, 0]].concat();
        assert_split_invariant(
            || Framer::with_length_bytes(Framing::LengthPrefixed, LengthBytes::One, 255),
            &stream,
            &[ok(b"abc"), ok(&[0, 0])],
        );
    }

    #[test]
    fn a_length_over_the_maximum_is_reported_and_that_many_bytes_are_skipped() {
        let stream = [&[0, 20][..], &[b'x'; 20], &[0, 2], b"ok"].concat();
        assert_split_invariant(
            || Framer::new(Framing::LengthPrefixed, 10),
            &stream,
            &[
                Err(FrameError::TooLong {
                    len_seen: 20,
                    max: 10,
                }),
                ok(b"ok"),
            ],
        );
    }

    #[test]
    fn length_bytes_deserialize_from_one_or_two_only() {
        #[derive(Deserialize)]
        struct C {
            framing: Framing,
            length_bytes: LengthBytes,
        }
        let c: C = toml::from_str("framing = \"length_prefixed\"\nlength_bytes = 1").unwrap();
        assert_eq!(
            (c.framing, c.length_bytes),
            (Framing::LengthPrefixed, LengthBytes::One)
        );
        let c: C = toml::from_str("framing = \"length-prefixed\"\nlength_bytes = 2").unwrap();
        assert_eq!(
            (c.framing, c.length_bytes),
            (Framing::LengthPrefixed, LengthBytes::Two)
        );
        assert!(toml::from_str::<C>("framing = \"cobs\"\nlength_bytes = 3").is_err());
        assert!(toml::from_str::<C>("framing = \"slip\"\nlength_bytes = 1").is_err());
    }

    #[test]
    fn random_bytes_in_random_chunks_never_panic_and_stay_bounded() {
        let mut rng = crate::serial::XorShift(0x9E37_79B9_7F4A_7C15);
        for round in 0..300 {
            let framing = [Framing::Lines, Framing::Cobs, Framing::LengthPrefixed][round % 3];
            let width = [LengthBytes::One, LengthBytes::Two][round % 2];
            let max = (rng.next() % 64) as usize;
            let mut f = Framer::with_length_bytes(framing, width, max);
            let mut out = Vec::new();
            for _ in 0..50 {
                let n = (rng.next() % 40) as usize;
                // Mostly a small alphabet so delimiters and small lengths are common.
                let chunk: Vec<u8> = (0..n)
                    .map(|_| match rng.next() % 4 {
                        0 => 0,
                        1 => b'\n',
                        _ => rng.next() as u8,
                    })
                    .collect();
                f.push(&chunk, &mut out);
                assert!(f.buffered() <= f.buffer_limit());
            }
            for frame in out.iter().flatten() {
                assert!(!frame.is_empty() && frame.len() <= max, "{framing:?} {max}");
            }
        }
    }
}
