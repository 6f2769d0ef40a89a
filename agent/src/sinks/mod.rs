//! Sinks built as components: one folder per kind, each with its config, its
//! build, its CloudEvents binding and its tests.

pub mod mqtt;
