//! The log: the events (their Avro schemas and typed views), their Confluent wire format over
//! the schema registry, the namespace's topics, the Kafka clients that produce and read them,
//! `tenancy emit`, and the dead-letter topic.
//!
//! - [`events`]: the Avro events (schemas embedded from `schemas/`), typed views, JSON → Avro.
//! - [`wire`]: Confluent wire format over the schema registry.
//! - [`topics`]: topic names and creation; [`kafka`]: producers and operator-side clients.
//! - [`emit`]: JSON lines → events (`tenancy emit`).
//! - [`dead_letters`]: writing poison events aside, and replaying them.

pub mod dead_letters;
pub mod emit;
pub mod events;
pub mod kafka;
pub mod topics;
pub mod wire;

use rdkafka::message::Message;

/// When the log has a message: the broker's timestamp (epoch ms), or now if it gives none.
pub fn logged_at(msg: &impl Message) -> i64 {
    msg.timestamp()
        .to_millis()
        .filter(|t| *t > 0)
        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis())
}

/// Where a message came from; named in logs and dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The message key as text (the tenant's organisation id), if any.
    pub key: Option<String>,
}

impl Origin {
    pub fn of(msg: &impl Message) -> Origin {
        Origin {
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        }
    }
}
