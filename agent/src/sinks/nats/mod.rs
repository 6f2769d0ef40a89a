//! `[[sink.nats]]`: CloudEvents to NATS JetStream.
//!
//! # Layout
//! - [`config`]: the `[[sink.nats]]` table and its checks.
//! - [`creds`]: reading a `.creds` file (pure).
//! - [`subject`]: subject templates and how values are sanitised into them (pure).
//! - [`binding`]: the CloudEvents NATS binding, event to [`Message`] with its
//!   `Nats-Msg-Id` (pure).
//! - [`publisher`]: the connection, and [`Publisher::publish`], which returns only
//!   once JetStream has acked every message of a batch, or says why not
//!   ([`Failure`], decided by the pure [`classify`]).
//!
//! An event counts as delivered only on its JetStream publish ack: a plain NATS
//! publish is fire-and-forget and proves nothing. Resends (after a timeout, a lost
//! connection or a restart) carry the same `Nats-Msg-Id`, so within the stream's
//! duplicate window JetStream stores each event once.

pub mod binding;
pub mod config;
mod creds;
pub mod publisher;
mod sink;
pub mod subject;

pub use binding::{Binding, CloudEvent, Message, Mode};
pub use config::{NatsAuth, NatsSinkConfig};
pub use publisher::{classify, Ack, Failure, NatsSinkError, Publisher, Verdict};
pub use subject::{SubjectTemplate, TemplateError};
