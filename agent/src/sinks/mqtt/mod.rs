//! The MQTT sink: CloudEvents published at QoS 1 to an upstream broker (any MQTT
//! 3.1.1 or 5 broker, AWS IoT Core, Azure IoT Hub), where an event counts as
//! delivered only once its PUBACK has arrived.
//!
//! # Layout
//! - [`config`]: `[[sink.mqtt]]`, its defaults and validation.
//! - [`binding`]: the CloudEvents MQTT binding (binary mode on MQTT 5, structured
//!   mode on both) and the topic template; [`Binder`] applies a sink's settings.
//! - [`azure`]: Azure IoT Hub names and SAS tokens.
//! - [`state`]: which messages have their PUBACK (pure, no I/O).
//! - [`publisher`]: the task that owns the connection, and the [`Publisher`]
//!   handle whose `publish` returns once every message of a batch is acknowledged.
//!
//! The forwarding loop sees the sink through a small adapter: it turns each event
//! into a [`Message`] with [`Binder::message`], refuses those over
//! [`Publisher::max_message`] (as measured by [`Publisher::message_len`]), and
//! hands the rest to [`Publisher::publish`].

pub mod azure;
pub mod binding;
pub mod config;
pub mod publisher;
mod sink;
pub mod state;

pub use binding::{
    BindingError, CloudEventView, Message, Mode, Properties, Protocol, TopicTemplate, TopicVars,
};
pub use config::MqttSinkConfig;
pub use publisher::{BuildError, Credentials, PublishError, Publisher, Settings};

/// Turns events into messages with one sink's mode and topic template.
#[derive(Debug, Clone)]
pub struct Binder {
    agent: String,
    mode: Mode,
    topic: TopicTemplate,
}

impl Binder {
    /// The binder for a validated config; `agent` is the agent's id.
    pub fn new(cfg: &MqttSinkConfig, agent: &str) -> Result<Binder, BuildError> {
        let topic = cfg.topic_template().map_err(|message| BuildError::Config {
            sink: cfg.name.clone(),
            message,
        })?;
        Ok(Binder {
            agent: agent.to_string(),
            mode: cfg.mode(),
            topic,
        })
    }

    /// The message for one event: its topic from the template, its payload and
    /// properties from the binding. An error refuses the event for good.
    pub fn message(&self, event: &impl CloudEventView) -> Result<Message, BindingError> {
        let attributes = event.attributes();
        let get = |name: &str| {
            attributes
                .iter()
                .find(|(k, _)| k == name)
                .map_or("", |(_, v)| v.as_str())
        };
        let topic = self.topic.render(TopicVars {
            agent: &self.agent,
            source: get("source"),
            subject: get("subject"),
            ty: get("type"),
        })?;
        Ok(binding::message(event, self.mode, topic))
    }
}
