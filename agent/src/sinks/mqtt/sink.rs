//! The `[[sink.mqtt]]` table as a running [`Sink`]: events through the [`Binder`],
//! batches through the [`Publisher`], which answers only on every PUBACK.

use tokio_util::sync::CancellationToken;

use super::{Binder, CloudEventView, MqttSinkConfig, PublishError, Publisher, Settings};
use crate::config::{BackoffConfig, Problem};
use crate::sinks::event::{Event, DATACONTENTTYPE};
use crate::sinks::{BuildContext, BuildError, ConfigFile, Delivery, Sink, SinkConfig};

impl CloudEventView for Event {
    fn attributes(&self) -> Vec<(String, String)> {
        Event::attributes(self)
            .map(|(k, v)| (k.to_string(), v.into_owned()))
            .collect()
    }
    fn datacontenttype(&self) -> String {
        DATACONTENTTYPE.to_string()
    }
    fn data(&self) -> Vec<u8> {
        Event::data_bytes(self)
    }
    fn structured(&self) -> Vec<u8> {
        Event::structured(self)
    }
}

impl SinkConfig for MqttSinkConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, index: usize) -> Vec<Problem> {
        MqttSinkConfig::validate(self, index)
    }

    fn files(&self) -> Vec<ConfigFile<'_>> {
        MqttSinkConfig::files(self)
            .into_iter()
            .map(|(field, what, path)| ConfigFile { field, what, path })
            .collect()
    }

    /// Starts the publisher's task: call it inside the runtime.
    fn build(&self, ctx: &BuildContext<'_>) -> Result<Box<dyn Sink>, BuildError> {
        let settings = Settings::from_config(self, ctx.agent, ctx.resolve)
            .map_err(|e| BuildError(Box::new(e)))?;
        let binder = Binder::new(self, ctx.agent).map_err(|e| BuildError(Box::new(e)))?;
        let stop = CancellationToken::new();
        let (publisher, _task) = Publisher::start(settings, stop.clone());
        Ok(Box::new(MqttSink {
            name: self.name.clone(),
            binder,
            publisher,
            per_request: self.batch_max,
            retry: self.retry,
            stop,
        }))
    }
}

struct MqttSink {
    name: String,
    binder: Binder,
    publisher: Publisher,
    per_request: usize,
    retry: BackoffConfig,
    /// Ends the publisher's task (and its connection) with the sink.
    stop: CancellationToken,
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[async_trait::async_trait]
impl Sink for MqttSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "mqtt"
    }

    async fn send(&self, events: &[Event]) -> Delivery {
        let mut messages = Vec::with_capacity(events.len());
        for event in events {
            match self.binder.message(event) {
                Ok(m) => messages.push(m),
                Err(e) => {
                    return Delivery::Rejected {
                        detail: e.to_string(),
                    }
                }
            }
        }
        match self.publisher.publish(messages).await {
            Ok(()) => Delivery::Accepted,
            Err(e) if e.is_permanent() => Delivery::Rejected {
                detail: e.to_string(),
            },
            Err(e) => {
                let kind = match e {
                    PublishError::Timeout { .. } => "timeout",
                    PublishError::Stopped => "stopped",
                    PublishError::Refused { .. } | PublishError::TooLarge { .. } => "refused",
                };
                Delivery::retry(kind, e.to_string())
            }
        }
    }

    fn per_request(&self) -> usize {
        self.per_request
    }

    fn bytes_per_request(&self) -> usize {
        self.publisher.max_message().max(1024 * 1024)
    }

    /// One batch at a time keeps store order across retries; the publisher
    /// pipelines the messages of a batch (`max_in_flight` in the table).
    fn max_in_flight(&self) -> usize {
        1
    }

    fn retry(&self) -> BackoffConfig {
        self.retry
    }

    fn max_message(&self) -> Option<usize> {
        Some(self.publisher.max_message())
    }

    fn message_len(&self, event: &Event) -> usize {
        self.binder
            .message(event)
            .map_or(usize::MAX, |m| self.publisher.message_len(&m))
    }
}
