//! The consumer-group member every processor reads through.
//!
//! librdkafka calls rebalance callbacks on the thread that polls, i.e. inside
//! `StreamConsumer::recv`, which the loop only calls between batches. The callback does not act:
//! it records a typed [`Rebalance`] that the loop takes before its next step, so a revoke can
//! never land in the middle of a batch, and the loop drops the revoked partitions' held events
//! before anything else is applied.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::ClientContext;

use crate::config::{Config, Reads};

/// A topic partition.
pub type Partition = (String, i32);

/// An assignment change, as the loop sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebalance {
    Assigned(Vec<Partition>),
    Revoked(Vec<Partition>),
    /// The group could not be joined or the assignment failed.
    Error(String),
}

/// Context of a processor's consumer: names the group in logs and queues rebalances.
pub struct StreamContext {
    pub group: String,
    pub processor: &'static str,
    rebalances: Mutex<Vec<Rebalance>>,
}

impl StreamContext {
    /// Rebalances since the last call, in order.
    pub fn take_rebalances(&self) -> Vec<Rebalance> {
        std::mem::take(&mut *self.rebalances.lock().expect("not poisoned"))
    }

    fn push(&self, r: Rebalance) {
        // A std Mutex: held for a push or a take, never across an await.
        self.rebalances.lock().expect("not poisoned").push(r);
    }
}

impl ClientContext for StreamContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                // librdkafka reports -1 for partitions it does not consume, and its internal
                // UA partition (-1); neither is lag.
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!("tenancy_consumer_lag", "processor" => self.processor,
                    "topic" => topic.clone(), "partition" => partition.to_string())
                .set(p.consumer_lag as f64);
            }
        }
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<Partition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

pub fn describe(parts: &[Partition]) -> String {
    let mut sorted: Vec<&Partition> = parts.iter().collect();
    sorted.sort();
    sorted
        .iter()
        .map(|(t, p)| format!("{t}/{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl ConsumerContext for StreamContext {
    fn pre_rebalance(
        &self,
        _consumer: &BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        if let rdkafka::consumer::Rebalance::Revoke(tpl) = rebalance {
            let parts = partitions(tpl);
            tracing::info!(processor = self.processor, group = %self.group,
                partitions = %describe(&parts), "partitions revoked");
            self.push(Rebalance::Revoked(parts));
        }
    }

    fn post_rebalance(
        &self,
        _consumer: &BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        match rebalance {
            rdkafka::consumer::Rebalance::Assign(tpl) => {
                let parts = partitions(tpl);
                tracing::info!(processor = self.processor, group = %self.group,
                    partitions = %describe(&parts), "partitions assigned");
                self.push(Rebalance::Assigned(parts));
            }
            rdkafka::consumer::Rebalance::Revoke(_) => {}
            rdkafka::consumer::Rebalance::Error(e) => {
                tracing::warn!(processor = self.processor, group = %self.group, error = %e, "rebalance error");
                self.push(Rebalance::Error(e.to_string()));
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(processor = self.processor, group = %self.group, error = %e,
                "offset commit failed; the next commit carries the same offsets");
        }
    }
}

/// A processor's consumer.
pub type GroupConsumer = StreamConsumer<StreamContext>;

/// Ends membership: the final offsets are committed by the caller first. With `leave` the
/// consumer sends LeaveGroup and its partitions move at once; otherwise it is dropped the way a
/// crash drops it, and the broker moves its partitions once its session expires.
///
/// Why not always leave: nisshi 0.7.0-pre.2 (and Tansu) do not clear the group's leader when the
/// leader leaves during a rebalance (`nisshi-broker` src/coordinator/group/administrator.rs,
/// Forming's `leave`; its test `forming_leader_leaves_group` is `#[ignore]`d). Every later member
/// then waits on a leader that is gone and the group never assigns again. Stopping several
/// workers at once triggered it in our chaos runs; a member that simply stops heartbeating is
/// evicted correctly. The caller leaves only when [`alone_in_stable_group`] says no rebalance
/// can be under way, or when told to (`--leave-group-on-exit`, for brokers without the bug).
pub fn depart(consumer: GroupConsumer, leave: bool) {
    if leave {
        drop(consumer);
    } else {
        std::mem::forget(consumer);
    }
}

/// Whether this member may leave its group without risking the wedge described at [`depart`]:
/// the broker describes the group as Stable with a single member, which, while this consumer is
/// still in the group, is this one. Then no rebalance is under way for the leave to land in and
/// no other member is left waiting on this one as leader, and a worker restarted alone is let
/// back in at once instead of after the old member's session expires (18.8 s against 5.4 s at
/// a 10 s session, docs/benchmarks.md). A group of several, or one rebalancing, is left the
/// crash's way. What remains is a member joining in the milliseconds between the description
/// and the leave: a second worker started at the instant the only one stops.
///
/// Blocks for up to two seconds (one DescribeGroups request); any error answers no.
pub fn alone_in_stable_group(consumer: &GroupConsumer) -> bool {
    use rdkafka::consumer::Consumer;
    described(consumer, &consumer.context().group, Duration::from_secs(2))
        .is_some_and(|(state, members)| state.eq_ignore_ascii_case("stable") && members == 1)
}

/// `group`'s state and member count as the broker describes it (DescribeGroups), through any
/// client; `None` if the broker does not answer or does not know the group.
pub fn described<X: ConsumerContext, C: rdkafka::consumer::Consumer<X>>(
    client: &C,
    group: &str,
    timeout: Duration,
) -> Option<(String, usize)> {
    let list = client.fetch_group_list(Some(group), timeout).ok()?;
    list.groups()
        .iter()
        .find(|g| g.name() == group)
        .map(|g| (g.state().to_owned(), g.members().len()))
}

/// `tenancy run --session-timeout-ms`'s default.
pub const DEFAULT_SESSION_TIMEOUT_MS: u64 = 6_000;

/// How a worker takes part in its consumer groups.
#[derive(Debug, Clone)]
pub struct Membership {
    /// How long before a dead worker's partitions move.
    pub session_timeout: Duration,
    pub assignor: Assignor,
}

/// The partition assignment protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Assignor {
    /// Incremental: adding or removing a worker moves only the partitions that change hands;
    /// the others keep flowing.
    CooperativeSticky,
    /// Eager: every rebalance stops every partition of the group until it completes.
    Range,
}

impl Assignor {
    pub fn as_str(self) -> &'static str {
        match self {
            Assignor::CooperativeSticky => "cooperative-sticky",
            Assignor::Range => "range",
        }
    }
}

/// Joins `group` for `topics`.
///
/// Offsets are stored only by the loop (`enable.auto.offset.store=false`), after the events
/// before them were applied; the background auto-commit only ever commits those, so a crash
/// redelivers and never skips.
pub fn join(
    config: &Config,
    processor: &'static str,
    group: &str,
    topics: &[String],
    membership: &Membership,
) -> anyhow::Result<GroupConsumer> {
    let session_timeout = membership.session_timeout;
    use rdkafka::consumer::Consumer;
    let consumer: GroupConsumer = config
        .kafka_reader_config(Reads::Live)
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // librdkafka prefetches up to 64 MiB per partition by default; 4 MiB per partition still
        // keeps a batch of thousands of messages ready and keeps the worker's memory flat.
        .set("queued.max.messages.kbytes", "4096")
        .set(
            "partition.assignment.strategy",
            membership.assignor.as_str(),
        )
        .set(
            "session.timeout.ms",
            session_timeout.as_millis().to_string(),
        )
        // The loop polls between batches; a batch waiting out an outage does not poll. Past this
        // librdkafka would leave the group, which the broker mishandles (see `depart`): an
        // outage of up to half an hour is waited out inside the group.
        .set("max.poll.interval.ms", "1800000")
        .set(
            "heartbeat.interval.ms",
            (session_timeout.as_millis() / 4).max(100).to_string(),
        )
        // Per-partition consumer lag for /metrics.
        .set("statistics.interval.ms", "5000")
        .create_with_context(StreamContext {
            group: group.to_owned(),
            processor,
            rebalances: Mutex::new(Vec::new()),
        })?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    Ok(consumer)
}

/// The current assignment as librdkafka has it.
pub fn assignment(consumer: &GroupConsumer) -> BTreeSet<Partition> {
    use rdkafka::consumer::Consumer;
    consumer
        .assignment()
        .map(|tpl| partitions(&tpl).into_iter().collect())
        .unwrap_or_default()
}
