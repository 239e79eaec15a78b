//! The dead-letter topic `{ns}.dead-letter`: poison events, byte for byte, with headers naming
//! why and where they came from, so they can be inspected and replayed.

use std::time::Duration;

use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::processor::Origin;

pub const HEADER_REASON: &str = "dlq.reason";
pub const HEADER_TOPIC: &str = "dlq.source.topic";
pub const HEADER_PARTITION: &str = "dlq.source.partition";
pub const HEADER_OFFSET: &str = "dlq.source.offset";
pub const HEADER_TENANT: &str = "dlq.tenant";

pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetters {
    pub fn new(producer: FutureProducer, topic: String) -> Self {
        DeadLetters { producer, topic }
    }

    /// Copies the message (key, payload, original headers) to the dead-letter topic.
    pub async fn send(
        &self,
        msg: &BorrowedMessage<'_>,
        origin: &Origin,
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
        for (key, value) in [
            (HEADER_REASON, reason),
            (HEADER_TOPIC, origin.topic.as_str()),
            (HEADER_PARTITION, partition.as_str()),
            (HEADER_OFFSET, offset.as_str()),
            (HEADER_TENANT, origin.key.as_deref().unwrap_or("")),
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
