//! ferry: an edge/IoT gateway agent.
//!
//! Readings come in from MQTT brokers and other sources, are decoded, run through the
//! installer's rules, committed to a durable bounded store, and forwarded upstream as
//! CloudEvents by one task per sink, each with its own cursor into the store.
//!
//! # Layout
//! - [`config`]: the config file, its defaults and its validation.
//! - [`ingest`]: sources (`mqtt`, `serial`, `modbus`, `simulator`); each produces
//!   [`ingest::Input`]s that carry an acknowledgement to run once the input is
//!   committed.
//! - [`decode`]: payload bytes to a [`decode::Reading`] (pure).
//! - [`redelivery`]: which MQTT deliveries are ones already committed, sent again
//!   by the broker after a crash or a lost connection (pure).
//! - [`serial`]: serial framing and frame formats, the pure parts of serial ingest.
//! - [`modbus`]: Modbus register maps, read plans and the polling schedule, the pure
//!   parts of Modbus ingest.
//! - [`rules`]: loads rule files into a `ferry_rules::RuleSet` and reloads them on
//!   change or SIGHUP (evaluation is pure); [`replay`] is `ferry rules test`.
//! - [`store`]: the durable, bounded, ordered buffer behind the [`store::Store`] trait.
//! - [`sinks`]: the `Sink` trait and the registry of kinds (`http`, `mqtt`, `nats`, `console`), each
//!   with its config, build and CloudEvents binding; the transport-neutral event;
//!   the forwarding loop with its retries.
//! - [`group_commit`]: how long a commit waits for more input (pure).
//! - [`pipeline`]: wires the stages together with bounded channels and owns shutdown.
//! - [`backoff`], [`ratelimit`], [`telemetry`]: small shared pieces.
//!
//! The invariants the stages keep between them are written in `ARCHITECTURE.md`.

pub mod backoff;
pub mod config;
pub mod dead_letters;
pub mod decode;
pub mod group_commit;
pub mod ingest;
pub mod modbus;
pub mod pipeline;
pub mod ratelimit;
pub mod redelivery;
pub mod replay;
pub mod rules;
pub mod serial;
pub mod sinks;
pub mod store;
pub mod telemetry;
pub mod tls;
