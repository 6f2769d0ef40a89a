//! Sinks as components: one folder per kind.

pub mod nats;
