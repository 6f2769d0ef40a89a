//! Modbus RTU polling: the pure building blocks (no I/O).
//!
//! A Modbus source polls the slaves on one serial bus. What it asks and what the
//! answers mean is decided here, apart from the port:
//! - [`registers`]: the register map of a slave and how raw words or bits become
//!   field values (types, word order, scale and offset).
//! - [`plan`]: which reads fetch a register map, merging touching ranges of one
//!   function into as few requests as the Modbus limits allow.
//! - [`schedule`]: which slave is due next on the half-duplex bus, how a slave that
//!   keeps timing out is polled less often until it answers again, and the silent
//!   interval between frames.
//! - [`gaps`]: which reads a slave refuses and which of its fields are left out right
//!   now, so each is logged when it starts and ends rather than on every poll.
//!
//! The bus task (open, reopen on unplug, requests with timeouts) is
//! `crate::ingest::modbus`.

pub mod gaps;
pub mod plan;
pub mod registers;
pub mod schedule;

pub use gaps::{Gaps, Turn};
pub use plan::{Answer, Plan, Read};
pub use registers::{DecodeError, Function, Register, RegisterConfig, RegisterProblem};
pub use schedule::{frame_gap, outcome, Change, Failure, Schedule};
