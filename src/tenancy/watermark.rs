//! The lifecycle watermark: how far the provisioner has applied `{ns}.organisations`.
//!
//! Whether a catalog or access event applies to a tenant that is being terminated or restored
//! must be decided by the lifecycle as a replay would see it, not by whatever the tenants table
//! says at the moment the event happens to be consumed. A replay applies every lifecycle event
//! first. A live worker gets the same answer by waiting, before it judges an event, until the
//! provisioner has applied every lifecycle event that was already in the log when the event
//! arrived: the end offsets of `{ns}.organisations` are read once per batch ([`LogEnds`]), and
//! the provisioner records what it has applied in `{ns}_platform.projection_offsets` (projection
//! `lifecycle`) after every batch. A lifecycle event sent later than the catalog event happened
//! later (producers stamp `occurred_at` honestly), so it cannot change the verdict.
//!
//! In steady state the provisioner is caught up and nothing waits; during a mass onboarding or a
//! replay, projectors wait for the lifecycle, which is what makes live and replay agree.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::MySqlPool;

use crate::config::Config;
use crate::log::topics::Topic;
use crate::stream::{error::kafka_outage, Position, StepError};
use crate::tenant::{DatabaseName, ServiceDatabase};

/// The `projection_offsets` name the provisioner's progress is kept under.
pub const PROJECTION: &str = "lifecycle";

/// How long after an event happened a lifecycle event that happened before it may still be
/// appended to the log.
pub const SKEW: std::time::Duration = std::time::Duration::from_secs(1);

/// End offsets of `{ns}.organisations` (per partition, the next offset to be written) at one
/// moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogEnds {
    pub ends: Vec<(i32, i64)>,
    /// When they were read (epoch ms), after which events they may judge.
    pub read_at_ms: i64,
}

impl LogEnds {
    /// Whether these ends were read late enough to judge an event that happened at
    /// `occurred_at` and arrived at `received_at` (epoch ms).
    pub fn late_enough_for(&self, occurred_at: i64, received_at: i64) -> bool {
        self.read_at_ms >= occurred_at.min(received_at) + SKEW.as_millis() as i64
    }
}

/// Reads the log's ends and the provisioner's progress; records that progress.
#[derive(Clone)]
pub struct Watermark {
    pool: MySqlPool,
    platform: DatabaseName,
    topic: String,
    reader: Arc<BaseConsumer>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl Watermark {
    pub fn new(config: &Config, pool: MySqlPool) -> anyhow::Result<Watermark> {
        let reader: BaseConsumer = config
            .kafka_client_config()
            .set("group.id", format!("{}.watermark", config.namespace))
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(Watermark {
            pool,
            platform: config.namespace.service_database(ServiceDatabase::Platform),
            topic: Topic::Organisations.name(&config.namespace),
            reader: Arc::new(reader),
        })
    }

    /// The log's end offsets now: one ListOffsets request for every partition.
    pub async fn ends(&self) -> Result<Arc<LogEnds>, StepError> {
        let reader = self.reader.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            let read_at_ms = chrono::Utc::now().timestamp_millis();
            let meta = reader.fetch_metadata(Some(&topic), TIMEOUT)?;
            let mut tpl = TopicPartitionList::new();
            for t in meta.topics() {
                for p in t.partitions() {
                    // A timestamp of -1 asks for the latest offset of each partition.
                    tpl.add_partition_offset(&topic, p.id(), Offset::End)?;
                }
            }
            let found = reader.offsets_for_times(tpl, TIMEOUT)?;
            let mut ends = Vec::new();
            for e in found.elements() {
                match e.offset() {
                    Offset::Offset(o) => ends.push((e.partition(), o)),
                    // An empty partition has no latest offset.
                    _ => ends.push((e.partition(), 0)),
                }
            }
            ends.sort_unstable();
            Ok::<_, rdkafka::error::KafkaError>(Arc::new(LogEnds { ends, read_at_ms }))
        })
        .await
        .expect("reading offsets does not panic")
        .map_err(|e| {
            kafka_outage(
                anyhow::Error::new(e).context(format!("reading the end offsets of {}", self.topic)),
            )
        })
    }

    /// What the provisioner has applied: per partition, the last offset handled.
    pub async fn applied(&self) -> Result<HashMap<i32, i64>, StepError> {
        let rows: Vec<(i32, i64)> = sqlx::query_as(&format!(
            "SELECT `partition`, `offset` FROM {}.projection_offsets WHERE projection = ? AND topic = ?",
            self.platform.quoted()
        ))
        .bind(PROJECTION)
        .bind(&self.topic)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Records the provisioner's progress (called by its loop after each batch).
    pub async fn record(&self, positions: &[Position]) -> Result<(), StepError> {
        for p in positions.iter().filter(|p| p.topic == self.topic) {
            sqlx::query(&format!(
                "INSERT INTO {}.projection_offsets (projection, topic, `partition`, `offset`) \
                 VALUES (?, ?, ?, ?) ON DUPLICATE KEY UPDATE `offset` = GREATEST(`offset`, VALUES(`offset`))",
                self.platform.quoted()
            ))
            .bind(PROJECTION)
            .bind(&p.topic)
            .bind(p.partition)
            .bind(p.next - 1)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }
}

/// Whether everything in the log at `ends` has been applied.
pub fn settled(applied: &HashMap<i32, i64>, ends: &LogEnds) -> bool {
    ends.ends
        .iter()
        .all(|(p, end)| *end == 0 || applied.get(p).is_some_and(|a| a + 1 >= *end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_ends(ends: Vec<(i32, i64)>) -> LogEnds {
        LogEnds {
            ends,
            read_at_ms: 0,
        }
    }

    #[test]
    fn settled_only_when_every_partition_reached_its_end() {
        let ends = log_ends(vec![(0, 5), (1, 0), (2, 3)]);
        let mut applied = HashMap::from([(0, 4)]);
        assert!(!settled(&applied, &ends), "partition 2 not started");
        applied.insert(2, 1);
        assert!(!settled(&applied, &ends), "partition 2 behind");
        applied.insert(2, 2);
        assert!(settled(&applied, &ends));
        assert!(
            settled(&HashMap::new(), &log_ends(vec![(0, 0)])),
            "empty log"
        );
    }

    #[test]
    fn ends_judge_only_events_older_than_the_skew() {
        let skew = SKEW.as_millis() as i64;
        let read = LogEnds {
            ends: vec![],
            read_at_ms: 10_000,
        };
        assert!(read.late_enough_for(10_000 - skew, 20_000));
        assert!(!read.late_enough_for(10_000 - skew + 1, 20_000));
        // A producer clock running ahead: the arrival time bounds the wait.
        assert!(read.late_enough_for(99_000, 10_000 - skew));
    }
}
