//! Writing poison events to `{ns}.dead-letter`: the message byte for byte (key, payload, its
//! own headers) plus `dlq.*` headers naming why, where it came from and which tenant it was
//! about. Reading and replaying them is `crate::dead_letter`.

use std::time::Duration;

use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::Origin;

pub const HEADER_REASON: &str = "dlq.reason";
pub const HEADER_TOPIC: &str = "dlq.source.topic";
pub const HEADER_PARTITION: &str = "dlq.source.partition";
pub const HEADER_OFFSET: &str = "dlq.source.offset";
pub const HEADER_TENANT: &str = "dlq.tenant";
/// The processor that gave up on it.
pub const HEADER_PROCESSOR: &str = "dlq.processor";

pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetters {
    pub fn new(producer: FutureProducer, topic: String) -> Self {
        DeadLetters { producer, topic }
    }

    /// Copies `msg` to the dead-letter topic and waits for the broker's acknowledgement.
    /// `tenant` overrides the message key as the tenant named (e.g. the supplier a grant
    /// waited for).
    pub async fn send(
        &self,
        msg: &impl Message,
        origin: &Origin,
        processor: &str,
        tenant: Option<&str>,
        reason: &str,
    ) -> anyhow::Result<()> {
        let partition = origin.partition.to_string();
        let offset = origin.offset.to_string();
        let mut headers = OwnedHeaders::new();
        if let Some(original) = msg.headers() {
            for h in original.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let tenant = tenant.or(origin.key.as_deref()).unwrap_or("");
        for (key, value) in [
            (HEADER_REASON, reason),
            (HEADER_TOPIC, origin.topic.as_str()),
            (HEADER_PARTITION, partition.as_str()),
            (HEADER_OFFSET, offset.as_str()),
            (HEADER_TENANT, tenant),
            (HEADER_PROCESSOR, processor),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        if let Some(p) = msg.payload() {
            record = record.payload(p);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("cannot produce to {}: {e}", self.topic))?;
        Ok(())
    }
}
