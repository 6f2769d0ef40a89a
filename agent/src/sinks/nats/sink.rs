//! The `[[sink.nats]]` table as a running [`Sink`]: events through the binding,
//! batches through the [`Publisher`].

use std::borrow::Cow;

use super::{Binding, Failure, Message, NatsSinkConfig, Publisher, SubjectTemplate};
use crate::config::{BackoffConfig, Problem};
use crate::sinks::event::{Event, DATACONTENTTYPE};
use crate::sinks::{BuildContext, BuildError, ConfigFile, Delivery, Sink, SinkConfig};

impl super::CloudEvent for Event {
    fn id(&self) -> &str {
        &self.id
    }
    fn source(&self) -> &str {
        &self.source
    }
    fn ty(&self) -> &str {
        &self.ty
    }
    fn subject(&self) -> &str {
        &self.subject
    }
    fn attributes(&self) -> Vec<(&str, Cow<'_, str>)> {
        Event::attributes(self).collect()
    }
    fn datacontenttype(&self) -> &str {
        DATACONTENTTYPE
    }
    fn data_bytes(&self) -> Vec<u8> {
        Event::data_bytes(self)
    }
    fn structured(&self) -> Vec<u8> {
        Event::structured(self)
    }
}

impl SinkConfig for NatsSinkConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, index: usize) -> Vec<Problem> {
        NatsSinkConfig::validate(self, index)
    }

    fn files(&self) -> Vec<ConfigFile<'_>> {
        let auth = self
            .auth
            .iter()
            .flat_map(|a| a.files())
            .map(|(what, path)| ConfigFile {
                field: "auth",
                what: what.into(),
                path,
            });
        let tls = self
            .tls
            .iter()
            .flat_map(|t| t.files())
            .map(|(what, path)| ConfigFile {
                field: "tls",
                what: format!("tls {what}"),
                path,
            });
        auth.chain(tls).collect()
    }

    fn build(&self, ctx: &BuildContext<'_>) -> Result<Box<dyn Sink>, BuildError> {
        let template = SubjectTemplate::parse(&self.subject)
            .map_err(|e| BuildError(format!("sink {:?}: {e}", self.name).into()))?;
        let publisher = Publisher::new(self, ctx.resolve)
            .map_err(|e| BuildError(format!("sink {:?}: {e}", self.name).into()))?;
        Ok(Box::new(NatsSink {
            name: self.name.clone(),
            binding: Binding {
                mode: self.mode,
                template,
                agent: ctx.agent.to_string(),
            },
            publisher,
            per_request: self.batch_max,
            bytes_per_request: usize::try_from(self.batch_max_bytes.0).unwrap_or(usize::MAX),
            retry: self.retry,
        }))
    }
}

struct NatsSink {
    name: String,
    binding: Binding,
    publisher: Publisher,
    per_request: usize,
    bytes_per_request: usize,
    retry: BackoffConfig,
}

#[async_trait::async_trait]
impl Sink for NatsSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "nats"
    }

    async fn send(&self, events: &[Event]) -> Delivery {
        let messages: Vec<Message> = events.iter().map(|e| self.binding.message(e)).collect();
        match self.publisher.publish(&messages).await {
            Ok(_) => Delivery::Accepted,
            Err(Failure::Retry { kind, detail }) => Delivery::retry(kind, detail),
            // Messages before the refused one may be stored already; the split
            // that follows resends them with the same Nats-Msg-Id, which
            // JetStream drops as duplicates.
            Err(Failure::Refused { detail, .. }) => Delivery::Rejected { detail },
        }
    }

    fn per_request(&self) -> usize {
        self.per_request
    }

    fn bytes_per_request(&self) -> usize {
        self.bytes_per_request
    }

    /// One batch at a time keeps store order; the publisher pipelines the
    /// messages of a batch itself (`max_in_flight` in the table).
    fn max_in_flight(&self) -> usize {
        1
    }

    fn retry(&self) -> BackoffConfig {
        self.retry
    }

    fn max_message(&self) -> Option<usize> {
        Some(self.publisher.max_payload())
    }

    fn message_len(&self, event: &Event) -> usize {
        self.binding.message(event).wire_len()
    }
}
