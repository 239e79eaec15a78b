//! Publishing the provisioner's outcome events on `{ns}.tenancy`.
//!
//! Outcome ids are derived from the input event id (uuid v5), so re-running the same input — a
//! redelivery, a crash before the offset commit, two workers racing — publishes the same id and
//! consumers dedupe. That is what replaces Kafka transactions (the local broker has none).

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use uuid::Uuid;

use crate::log::events::{self, EventKind};
use crate::log::topics::Topic;
use crate::log::wire::Codec;
use crate::tenant::Namespace;

/// Fixed uuid-v5 namespace for ids derived from other events' ids.
const DERIVED_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6b1d_0c5e_8f2a_4e57_9a3c_51d2_7e0f_b1a4);

/// The id of the `outcome` event caused by input event `input_event_id`.
pub fn derived_event_id(input_event_id: &str, outcome: EventKind) -> String {
    Uuid::new_v5(
        &DERIVED_ID_NAMESPACE,
        format!("{input_event_id}/{}", outcome.name()).as_bytes(),
    )
    .to_string()
}

/// Where a published event landed.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    pub partition: i32,
    pub offset: i64,
}

pub struct OutcomePublisher {
    producer: FutureProducer,
    codec: std::sync::Arc<Codec>,
    topic: String,
}

impl OutcomePublisher {
    pub fn new(producer: FutureProducer, codec: std::sync::Arc<Codec>, ns: &Namespace) -> Self {
        OutcomePublisher {
            producer,
            codec,
            topic: Topic::Tenancy.name(ns),
        }
    }

    /// Encodes and produces `event`, keyed by `key`, and waits for the broker's ack.
    pub async fn publish<T: Serialize>(
        &self,
        kind: EventKind,
        key: &str,
        event: &T,
    ) -> anyhow::Result<Delivery> {
        let value = events::to_avro(kind, event)?;
        let payload = self
            .codec
            .encode(&self.topic, kind, value)
            .await
            .map_err(|e| anyhow::anyhow!("cannot encode {}: {e}", kind.name()))?;
        let delivery = self
            .producer
            .send(
                FutureRecord::to(&self.topic).key(key).payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| {
                anyhow::anyhow!("cannot produce {} to {}: {e}", kind.name(), self.topic)
            })?;
        Ok(Delivery {
            partition: delivery.partition,
            offset: delivery.offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let a = derived_event_id(
            "6f1c1a56-6d0e-4a47-9a43-2a4a8f1f7c11",
            EventKind::TenantProvisioned,
        );
        assert_eq!(
            a,
            derived_event_id(
                "6f1c1a56-6d0e-4a47-9a43-2a4a8f1f7c11",
                EventKind::TenantProvisioned
            )
        );
        assert_ne!(
            a,
            derived_event_id(
                "6f1c1a56-6d0e-4a47-9a43-2a4a8f1f7c11",
                EventKind::TenantProvisioningFailed
            )
        );
        assert_ne!(
            a,
            derived_event_id(
                "7f1c1a56-6d0e-4a47-9a43-2a4a8f1f7c11",
                EventKind::TenantProvisioned
            )
        );
    }
}
