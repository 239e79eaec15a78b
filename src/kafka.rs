//! Kafka clients configured the way every processor and producer here needs them.

use std::time::Duration;

use rdkafka::consumer::{ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::producer::FutureProducer;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::ClientContext;

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

/// Logs partition assignment changes, naming the group.
pub struct GroupContext {
    pub group: String,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(group = %self.group, partitions = %describe(tpl), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(group = %self.group, partitions = %describe(tpl), "partitions revoked")
            }
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "rebalance error")
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(group = %self.group, error = %e, "offset commit failed; will retry on next commit");
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

/// A consumer-group member that stores offsets only when told to.
///
/// `enable.auto.offset.store=false`: the background auto-commit only ever commits offsets the
/// processor stored after applying a message, so a crash re-delivers, never skips.
pub fn consumer(
    config: &Config,
    group: &str,
    session_timeout: Duration,
) -> anyhow::Result<StreamConsumer<GroupContext>> {
    Ok(config
        .kafka_client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // librdkafka prefetches up to 64 MiB per partition by default; 4 MiB per partition still
        // keeps a batch of thousands of messages ready and keeps the worker's memory flat.
        .set("queued.max.messages.kbytes", "4096")
        // Incremental rebalances: adding a worker does not stop the others. Tansu 0.6 gap (seen
        // in the kill -9 tests, with range too): a member that joins while a killed member's
        // session is still alive gets an empty assignment, and the dead member's partitions are
        // not handed over when it expires. Start the replacement after the session timeout.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set(
            "session.timeout.ms",
            session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (session_timeout.as_millis() / 4).max(100).to_string(),
        )
        .create_with_context(GroupContext {
            group: group.to_owned(),
        })?)
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
