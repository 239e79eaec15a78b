//! Writing poison events to `{ns}.dead-letter`: the message byte for byte (key, payload, its
//! own headers) plus `dlq.*` headers naming why, where it came from and which tenant it was
//! about.
//!
//! A dead letter always fits: one too large for the producer's or the broker's message limit
//! (its payload near the limit, plus the `dlq.*` headers) is written without its payload and
//! the original's headers, saying so in [`HEADER_PAYLOAD_OMITTED`]; its source topic, partition
//! and offset are enough for a replay to fetch the original. Producing it is a step about one
//! event: only the broker not answering is an outage.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use super::*;
use crate::log::Origin;

/// Why a dead letter could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The broker does not answer: wait and try again.
    #[error("cannot produce to {topic}: {error}")]
    Unavailable { topic: String, error: KafkaError },
    /// Refused even without its payload (the broker's limits or a bad header): nothing more to
    /// try; the event stays at its source position, named in the log.
    #[error("{topic} refused the dead letter even without its payload: {error}")]
    Refused { topic: String, error: KafkaError },
}

/// Whether the broker or the producer refused a message for its size.
fn too_large(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidMessage
        )
    )
}

/// Whether a produce error says the broker is not there (rather than refusing this message).
fn is_unavailable(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::QueueFull
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotEnoughReplicas
                | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
                | RDKafkaErrorCode::Fail
        )
    ) || matches!(e, KafkaError::Canceled)
}

pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetters {
    pub fn new(producer: FutureProducer, topic: String) -> Self {
        DeadLetters { producer, topic }
    }

    /// Copies `msg` to the dead-letter topic and waits for the broker's acknowledgement; one
    /// that does not fit goes without its payload. `tenant` overrides the message key as the
    /// tenant named (e.g. the supplier a grant waited for).
    pub async fn send(
        &self,
        msg: &impl Message,
        origin: &Origin,
        processor: &str,
        tenant: Option<&str>,
        reason: &str,
    ) -> Result<(), SendError> {
        let unavailable = |error| SendError::Unavailable {
            topic: self.topic.clone(),
            error,
        };
        let refused = match self
            .produce(msg, origin, processor, tenant, reason, true)
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if is_unavailable(&e) => return Err(unavailable(e)),
            Err(e) => e,
        };
        if too_large(&refused) {
            tracing::warn!(processor, topic = %origin.topic, partition = origin.partition,
                offset = origin.offset, error = %refused,
                "dead letter too large: writing it without its payload (replay fetches the original)");
            metrics::counter!("tenancy_dead_letters_without_payload_total").increment(1);
        }
        // Refused whole (its size, or a header the broker will not take): once more with the
        // `dlq.*` headers only.
        match self
            .produce(msg, origin, processor, tenant, reason, false)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_unavailable(&e) => Err(unavailable(e)),
            Err(error) => Err(SendError::Refused {
                topic: self.topic.clone(),
                error,
            }),
        }
    }

    /// One attempt: the whole message, or (`whole` false) its key and the `dlq.*` headers only.
    async fn produce(
        &self,
        msg: &impl Message,
        origin: &Origin,
        processor: &str,
        tenant: Option<&str>,
        reason: &str,
        whole: bool,
    ) -> Result<(), KafkaError> {
        let partition = origin.partition.to_string();
        let offset = origin.offset.to_string();
        let mut headers = OwnedHeaders::new();
        if let (true, Some(original)) = (whole, msg.headers()) {
            for h in original.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let tenant = tenant.or(origin.key.as_deref()).unwrap_or("");
        let omitted = msg.payload().map_or(0, <[u8]>::len).to_string();
        let timestamp = crate::log::logged_at(msg).to_string();
        for (key, value) in [
            (HEADER_REASON, reason),
            (HEADER_TOPIC, origin.topic.as_str()),
            (HEADER_PARTITION, partition.as_str()),
            (HEADER_OFFSET, offset.as_str()),
            (HEADER_TIMESTAMP, timestamp.as_str()),
            (HEADER_TENANT, tenant),
            (HEADER_PROCESSOR, processor),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        if !whole {
            headers = headers.insert(Header {
                key: HEADER_PAYLOAD_OMITTED,
                value: Some(omitted.as_str()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        if let (true, Some(p)) = (whole, msg.payload()) {
            record = record.payload(p);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_refusals_are_about_the_message_and_timeouts_about_the_broker() {
        let size = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(too_large(&size) && !is_unavailable(&size));
        let gone = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(is_unavailable(&gone) && !too_large(&gone));
    }
}
