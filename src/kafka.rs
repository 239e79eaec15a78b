//! Kafka clients for producers and operator commands (the processors' consumer is
//! `stream::consumer`).

use std::time::Duration;

use rdkafka::producer::FutureProducer;
use rdkafka::topic_partition_list::TopicPartitionList;

use crate::config::Config;

/// An idempotent producer: retries never duplicate or reorder within a partition.
pub fn producer(config: &Config) -> anyhow::Result<FutureProducer> {
    Ok(config
        .kafka_client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()?)
}

/// Rewinds a consumer group to the start of `topics`, so its processor replays them.
///
/// The group must have no live members (stop the workers first): the broker refuses offset
/// commits from outside an active generation.
pub fn rewind_group(config: &Config, group: &str, topics: &[String]) -> anyhow::Result<usize> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let consumer: BaseConsumer = config
        .kafka_client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in meta.topics() {
            for p in t.partitions() {
                // Offset 0, not "beginning": a commit needs a concrete offset. The log is kept
                // forever, so 0 is the start.
                tpl.add_partition_offset(t.name(), p.id(), rdkafka::Offset::Offset(0))?;
            }
        }
    }
    consumer.commit(&tpl, CommitMode::Sync).map_err(|e| {
        anyhow::anyhow!("cannot rewind group {group} (are its workers stopped?): {e}")
    })?;
    Ok(tpl.count())
}

/// Where a consumer group stands on one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPosition {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset, if it has one.
    pub committed: Option<i64>,
    /// The partition's end (high watermark).
    pub end: i64,
}

impl GroupPosition {
    pub fn behind(&self) -> i64 {
        self.end - self.committed.unwrap_or(0)
    }
}

/// The group's position on every partition of `topics`.
pub fn group_lag(
    config: &Config,
    group: &str,
    topics: &[String],
) -> anyhow::Result<Vec<GroupPosition>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = config
        .kafka_client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        for t in consumer.fetch_metadata(Some(topic), timeout)?.topics() {
            for p in t.partitions() {
                tpl.add_partition(t.name(), p.id());
            }
        }
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    committed
        .elements()
        .iter()
        .map(|e| {
            let (_, high) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout)?;
            let offset = match e.offset() {
                rdkafka::Offset::Offset(o) => Some(o),
                _ => None,
            };
            Ok(GroupPosition {
                topic: e.topic().to_owned(),
                partition: e.partition(),
                committed: offset,
                end: high,
            })
        })
        .collect()
}
