//! Serial ingest: the pure building blocks (no I/O).
//!
//! Bytes read from a serial port go through two steps before they are a reading:
//! - [`framing`]: a [`Framer`] cuts the stream of read chunks into frames (lines,
//!   COBS or length-prefixed), with memory bounded by the maximum frame length.
//! - [`format`]: a [`FormatConfig`] turns one frame into fields (CSV, JSON, `key=value`
//!   or NMEA 0183).
//!
//! Both report bad input as errors with a short `reason()` for the metrics label, and
//! neither panics on any input.
//!
//! The other way, [`queue`] holds the lines rule actions write to a port until it
//! can take them. The port handling (open, reopen on unplug, reads)
//! lives apart from them.

pub mod format;
pub mod framing;
pub mod queue;

pub use format::{Format, FormatConfig, FormatError};
pub use framing::{Frame, FrameError, Framer, Framing, LengthBytes};
pub use queue::{LineQueue, QueuedLine};

/// A fixed-seed pseudo-random generator for the no-panic tests, so a failure is
/// reproducible.
#[cfg(test)]
pub(crate) struct XorShift(pub(crate) u64);

#[cfg(test)]
impl XorShift {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
