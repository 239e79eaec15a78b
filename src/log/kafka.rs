//! Kafka clients for producers and operator commands (the processors' consumer is
//! `stream::consumer`).

use std::time::Duration;

use rdkafka::producer::FutureProducer;
use rdkafka::topic_partition_list::TopicPartitionList;

use crate::config::Config;

/// An idempotent producer: retries never duplicate or reorder within a partition. It waits up
/// to 5 ms to fill a batch: for bulk senders (`tenancy emit`, benchmarks).
pub fn producer(config: &Config) -> anyhow::Result<FutureProducer> {
    producer_lingering(config, 5)
}

/// An idempotent producer that sends at once: for the processors, which await each outcome
/// before storing their offset, so a batching wait was paid per tenant (5 ms of the
/// provisioner's 24 ms per tenant). Messages sent while a request is in flight still go out
/// together.
pub fn producer_without_linger(config: &Config) -> anyhow::Result<FutureProducer> {
    producer_lingering(config, 0)
}

fn producer_lingering(config: &Config, linger_ms: u32) -> anyhow::Result<FutureProducer> {
    Ok(config
        .kafka_client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", linger_ms.to_string())
        .set("message.timeout.ms", "60000")
        // Connect to the brokers as soon as metadata names them: an idempotent producer needs a
        // producer id before its first send, and with sparse connections it only asked for one
        // on its state timer's second tick, about a second after start (every `tenancy emit`).
        .set("enable.sparse.connections", "false")
        .create()?)
}

/// Rewinds a consumer group to the start of `topics`, so its processor replays them.
///
/// It joins the group as its only member, waits until it holds every partition (members of
/// killed workers are evicted once their session expires), commits offset 0 for each as a
/// member of the current generation, reads the commit back, and leaves while the group is
/// stable. A partition still held by a live worker after `wait` is refused with the reason:
/// stop the workers first. (Committing from outside the group is refused by the broker while any
/// member, live or dead, remains.)
pub fn rewind_group(
    config: &Config,
    group: &str,
    topics: &[String],
    wait: Duration,
) -> anyhow::Result<usize> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let consumer: BaseConsumer = config
        .kafka_client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("session.timeout.ms", "6000")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()?;
    let mut all = TopicPartitionList::new();
    for topic in topics {
        let meta = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        for t in meta.topics() {
            for p in t.partitions() {
                // Offset 0, not "beginning": a commit needs a concrete offset. The log is kept
                // forever, so 0 is the start.
                all.add_partition_offset(t.name(), p.id(), rdkafka::Offset::Offset(0))?;
            }
        }
    }
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        // Polling serves the rebalance; messages fetched meanwhile are not consumed.
        let _ = consumer.poll(Duration::from_millis(200));
        let held = consumer.assignment()?.count();
        if held == all.count() {
            break;
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "cannot rewind group {group}: after {}s other members still hold {} of its {}                  partitions (stop every `tenancy run` worker running that processor, then retry)",
                wait.as_secs(),
                all.count() - held,
                all.count()
            );
        }
    }
    consumer
        .commit(&all, CommitMode::Sync)
        .map_err(|e| anyhow::anyhow!("cannot rewind group {group}: {e}"))?;
    let committed = consumer.committed(Duration::from_secs(10))?;
    let behind: Vec<String> = committed
        .elements()
        .iter()
        .filter(|e| e.offset() != rdkafka::Offset::Offset(0))
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect();
    anyhow::ensure!(
        behind.is_empty(),
        "cannot rewind group {group}: the broker kept other offsets for {}",
        behind.join(", ")
    );
    // Dropping the consumer leaves the group, which is stable now (its only member holds
    // everything): the safe moment to leave (see stream::consumer).
    Ok(all.count())
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

/// Drops a Kafka client on a thread of its own. librdkafka's close waits for the client's
/// threads to stop (about 100 ms here); where nothing after needs that finished (a consumer
/// that never joined a group and commits nothing), the caller need not wait for it.
pub fn close_in_background<C: Send + 'static>(client: C) {
    std::thread::spawn(move || drop(client));
}
