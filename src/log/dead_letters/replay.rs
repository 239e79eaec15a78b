//! Reading and replaying the dead-letter topic. [`DeadLetterLog`] reads the topic up to the end
//! it had when opened and replays dead letters to the partition they came from, recording
//! progress as committed offsets of consumer groups that never join: `{ns}.dead-letter-replay`
//! for full replays and `{ns}.dead-letter-replay.{source topic}` for filtered ones. A dead letter
//! counts as replayed when either group's offset on its partition is past it.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::{
    HEADER_OFFSET, HEADER_PARTITION, HEADER_PAYLOAD_OMITTED, HEADER_PREFIX, HEADER_REASON,
    HEADER_REPLAYED_FROM, HEADER_TENANT, HEADER_TIMESTAMP, HEADER_TOPIC,
};
use crate::config::{Config, Reads};
use crate::log::topics::Topic;
use crate::tenant::Namespace;

// ---------------------------------------------------------------------------------------------
// Reading and replaying (`tenancy dead-letter list|replay`).
// ---------------------------------------------------------------------------------------------

/// How long reading the topic up to its end, or a broker round trip, may take.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The consumer group recording replay progress: `{ns}.dead-letter-replay`. Its committed offset
/// on a dead-letter partition is the first dead letter not yet replayed there.
pub fn replay_group(ns: &Namespace) -> String {
    format!("{ns}.{}-replay", Topic::DeadLetter.suffix())
}

/// Progress of `replay --source-topic T`: `{ns}.dead-letter-replay.{T}`. Its committed offset
/// on a dead-letter partition means every dead letter from `T` before it was replayed, so a
/// filtered replay never forces a later full replay to send those again.
pub fn topic_replay_group(ns: &Namespace, source_topic: &str) -> String {
    format!("{}.{source_topic}", replay_group(ns))
}

/// One message of the dead-letter topic, with what its `dlq.*` headers say.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// Partition and offset in the dead-letter topic.
    pub partition: i32,
    pub offset: i64,
    /// When it was dead-lettered (epoch milliseconds), if the broker says.
    pub timestamp_ms: Option<i64>,
    /// The message key as text (lossy for non-UTF-8 keys).
    pub key: Option<String>,
    pub source_topic: Option<String>,
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
    /// The original message's log timestamp, which a replayed copy keeps.
    pub source_timestamp_ms: Option<i64>,
    pub tenant: Option<String>,
    pub reason: Option<String>,
    /// Set when this dead letter is itself a replayed copy that failed again.
    pub replayed_from: Option<String>,
    pub payload_bytes: usize,
    /// The original payload's size, when it did not fit in the dead letter: a replay fetches
    /// the original from its source position.
    pub payload_omitted: Option<usize>,
    /// Whether replay progress (the replay groups) already covers it.
    pub replayed: bool,
    #[serde(skip)]
    pub key_bytes: Option<Vec<u8>>,
    #[serde(skip)]
    pub payload: Option<Vec<u8>>,
    /// Every header, in order, including the `dlq.*` ones.
    #[serde(skip)]
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl DeadLetter {
    fn from_message(msg: &BorrowedMessage<'_>) -> DeadLetter {
        let headers: Vec<(String, Option<Vec<u8>>)> = msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        // The last value wins: a re-dead-lettered replay carries only one set of `dlq.*` headers,
        // but a foreign producer might repeat one.
        let text = |name: &str| -> Option<String> {
            headers
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.as_deref())
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        DeadLetter {
            partition: msg.partition(),
            offset: msg.offset(),
            timestamp_ms: msg.timestamp().to_millis(),
            key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            source_topic: text(HEADER_TOPIC).filter(|t| !t.is_empty()),
            source_partition: text(HEADER_PARTITION).and_then(|p| p.parse().ok()),
            source_offset: text(HEADER_OFFSET).and_then(|o| o.parse().ok()),
            source_timestamp_ms: text(HEADER_TIMESTAMP).and_then(|t| t.parse().ok()),
            tenant: text(HEADER_TENANT).filter(|t| !t.is_empty()),
            reason: text(HEADER_REASON),
            replayed_from: text(HEADER_REPLAYED_FROM),
            payload_bytes: msg.payload().map_or(0, <[u8]>::len),
            payload_omitted: text(HEADER_PAYLOAD_OMITTED).and_then(|n| n.parse().ok()),
            replayed: false,
            key_bytes: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// `partition/offset` in the dead-letter topic.
    pub fn position(&self) -> String {
        format!("{}/{}", self.partition, self.offset)
    }

    /// `topic/partition/offset` it came from, `?` for what the headers do not say.
    pub fn source(&self) -> String {
        let or_q = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        format!(
            "{}/{}/{}",
            or_q(self.source_topic.clone()),
            or_q(self.source_partition.map(|p| p.to_string())),
            or_q(self.source_offset.map(|o| o.to_string()))
        )
    }

    /// Where a replay sends it, or why it cannot be replayed.
    fn target(&self) -> Result<(&str, i32), String> {
        match (self.source_topic.as_deref(), self.source_partition) {
            (Some(t), Some(p)) if p >= 0 => Ok((t, p)),
            (None, _) => Err(format!("no {HEADER_TOPIC} header")),
            _ => Err(format!("no valid {HEADER_PARTITION} header")),
        }
    }

    /// The original headers (everything not `dlq.*`) plus `dlq.replayed-from`.
    fn replay_headers(&self) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new();
        for (key, value) in &self.headers {
            if !key.starts_with(HEADER_PREFIX) {
                headers = headers.insert(Header {
                    key: key.as_str(),
                    value: value.as_deref(),
                });
            }
        }
        let from = self.position();
        headers.insert(Header {
            key: HEADER_REPLAYED_FROM,
            value: Some(from.as_str()),
        })
    }
}

/// What `replay` should do.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Only dead letters from this topic (full name).
    pub source_topic: Option<String>,
    /// Say what would be sent; send and commit nothing.
    pub dry_run: bool,
    /// Ignore recorded progress: replay every dead letter (progress still only moves forward).
    pub all: bool,
}

/// What happened to one dead letter during a replay, reported as it happens.
#[derive(Debug)]
pub enum ReplayStep<'a> {
    /// Sent back and acknowledged at `topic/partition/offset`.
    Sent {
        letter: &'a DeadLetter,
        topic: &'a str,
        partition: i32,
        offset: i64,
    },
    /// Dry run: would be sent to `topic/partition`.
    WouldSend {
        letter: &'a DeadLetter,
        topic: &'a str,
        partition: i32,
    },
    /// Cannot be replayed (its headers do not say where it came from).
    Unreplayable { letter: &'a DeadLetter, why: String },
}

/// Totals of a replay.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Sent (or, in a dry run, would be sent).
    pub sent: usize,
    /// Covered by recorded progress, so not sent again.
    pub already_replayed: usize,
    /// From another source topic than the one asked for.
    pub other_topics: usize,
    pub unreplayable: usize,
}

/// One partition of the dead-letter topic as it was when the command started.
#[derive(Debug, Clone, Copy)]
struct PartitionRange {
    partition: i32,
    low: i64,
    high: i64,
}

/// The dead-letter topic of a namespace, read up to the end it had when opened.
pub struct DeadLetterLog {
    config: Config,
    topic: String,
    /// Reads the topic and holds the `{ns}.dead-letter-replay` group's offsets (never joins it).
    main: BaseConsumer,
    partitions: Vec<PartitionRange>,
}

impl DeadLetterLog {
    /// Finds the topic and its current ends; fails naming the topic if it does not exist.
    pub fn open(config: &Config) -> anyhow::Result<DeadLetterLog> {
        let topic = Topic::DeadLetter.name(&config.namespace);
        let main = group_consumer(config, &replay_group(&config.namespace))?;
        let meta = main
            .fetch_metadata(Some(&topic), REQUEST_TIMEOUT)
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot read metadata of topic {topic} from {}: {e} (is the broker up? try scripts/stack up)",
                    config.kafka_bootstrap_servers
                )
            })?;
        let missing = || {
            anyhow::anyhow!(
                "topic {topic} does not exist at {} (namespace {}: `tenancy run` or `tenancy topics create` creates it)",
                config.kafka_bootstrap_servers,
                config.namespace
            )
        };
        let t = meta.topics().first().ok_or_else(missing)?;
        if t.error().is_some() || t.partitions().is_empty() {
            return Err(missing());
        }
        let mut partitions = Vec::new();
        for p in t.partitions() {
            let (low, high) = main
                .fetch_watermarks(&topic, p.id(), REQUEST_TIMEOUT)
                .map_err(|e| {
                    anyhow::anyhow!("cannot read the end offsets of {topic}/{}: {e}", p.id())
                })?;
            partitions.push(PartitionRange {
                partition: p.id(),
                low,
                high,
            });
        }
        partitions.sort_by_key(|p| p.partition);
        Ok(DeadLetterLog {
            config: config.clone(),
            topic,
            main,
            partitions,
        })
    }

    /// The dead-letter topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Every dead letter, in dead-letter order (partition, then offset), each marked with
    /// whether replay progress already covers it.
    pub fn list(&self) -> anyhow::Result<Vec<DeadLetter>> {
        let progress = Progress::fetch(&self.main, &self.topic, &self.partitions, &self.config)?;
        let starts: Vec<(i32, i64, i64)> = self
            .partitions
            .iter()
            .map(|p| (p.partition, p.low, p.high))
            .collect();
        let mut letters = self.read(&starts)?;
        let mut groups = TopicGroups::default();
        for l in &mut letters {
            l.replayed = progress.covers(l.partition, l.offset) || groups.covers(self, l)?;
        }
        Ok(letters)
    }

    /// Sends dead letters back to the topic partition they came from, in dead-letter order,
    /// committing progress after each acknowledged copy. `on_step` hears about each one as it
    /// happens. Stops at the first failure; what was acknowledged before it stays committed.
    pub fn replay(
        &self,
        options: &ReplayOptions,
        mut on_step: impl FnMut(ReplayStep<'_>),
    ) -> anyhow::Result<ReplaySummary> {
        let main_progress =
            Progress::fetch(&self.main, &self.topic, &self.partitions, &self.config)?;
        let starts: Vec<(i32, i64, i64)> = self
            .partitions
            .iter()
            .map(|p| {
                let from = if options.all {
                    p.low
                } else {
                    p.low.max(main_progress.next(p.partition))
                };
                (p.partition, from, p.high)
            })
            .collect();
        let mut letters = self.read(&starts)?;
        let mut groups = TopicGroups::default();
        for l in &mut letters {
            l.replayed = main_progress.covers(l.partition, l.offset) || groups.covers(self, l)?;
        }

        // Progress this run records: the main group, or the source topic's group when filtered.
        let (consumer, mut progress) = match &options.source_topic {
            None => (&self.main, main_progress),
            Some(t) => {
                groups.load(self, t)?;
                let (c, p) = groups.get(t).expect("just loaded");
                (c, p.clone())
            }
        };
        let wanted = |l: &DeadLetter| match &options.source_topic {
            None => true,
            Some(t) => l.source_topic.as_deref() == Some(t.as_str()),
        };
        let mut summary = ReplaySummary::default();
        let to_send: Vec<&DeadLetter> = letters
            .iter()
            .filter(|l| wanted(l) && (options.all || !l.replayed) && l.target().is_ok())
            .collect();
        // A dry run checks too: it should fail where the replay would.
        self.check_targets(&to_send)?;
        let producer = if options.dry_run || to_send.is_empty() {
            None
        } else {
            Some(crate::log::kafka::producer(&self.config)?)
        };

        for l in &letters {
            if !wanted(l) {
                summary.other_topics += 1;
                continue;
            }
            if l.replayed && !options.all {
                summary.already_replayed += 1;
                progress.advance(l.partition, l.offset + 1);
                continue;
            }
            let (topic, partition) = match l.target() {
                Ok(t) => t,
                Err(why) => {
                    summary.unreplayable += 1;
                    on_step(ReplayStep::Unreplayable { letter: l, why });
                    progress.advance(l.partition, l.offset + 1);
                    continue;
                }
            };
            let Some(producer) = &producer else {
                summary.sent += 1;
                on_step(ReplayStep::WouldSend {
                    letter: l,
                    topic,
                    partition,
                });
                continue;
            };
            let offset = self.send(producer, l, topic, partition)?;
            summary.sent += 1;
            progress.advance(l.partition, l.offset + 1);
            progress.commit(consumer, &self.topic)?;
            on_step(ReplayStep::Sent {
                letter: l,
                topic,
                partition,
                offset,
            });
        }
        if !options.dry_run {
            // Everything up to the ends read at the start has been handled.
            for p in &self.partitions {
                progress.advance(p.partition, p.high);
            }
            progress.commit(consumer, &self.topic)?;
        }
        Ok(summary)
    }

    /// Fails, naming the dead letter and topic, if a target topic or partition does not exist
    /// (producing there would only fail after the message timeout).
    fn check_targets(&self, letters: &[&DeadLetter]) -> anyhow::Result<()> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for l in letters {
            let (topic, partition) = l.target().expect("filtered to replayable");
            let count = match counts.get(topic) {
                Some(c) => *c,
                None => {
                    let meta = self
                        .main
                        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
                        .map_err(|e| {
                            anyhow::anyhow!("cannot read metadata of topic {topic}: {e}")
                        })?;
                    let c = meta
                        .topics()
                        .first()
                        .filter(|t| t.error().is_none())
                        .map_or(0, |t| t.partitions().len());
                    counts.insert(topic, c);
                    c
                }
            };
            anyhow::ensure!(
                count > 0,
                "dead letter {} came from topic {topic}, which does not exist at {}; nothing was replayed",
                l.position(),
                self.config.kafka_bootstrap_servers
            );
            anyhow::ensure!(
                (partition as usize) < count,
                "dead letter {} came from {topic}/{partition}, but {topic} has {count} partition(s); nothing was replayed",
                l.position()
            );
        }
        Ok(())
    }

    /// Produces the replayed copy and waits for the broker's acknowledgement. A dead letter
    /// written without its payload (it did not fit) sends the original, read from its source
    /// position.
    fn send(
        &self,
        producer: &FutureProducer,
        l: &DeadLetter,
        topic: &str,
        partition: i32,
    ) -> anyhow::Result<i64> {
        let original = match l.payload_omitted {
            Some(_) => Some(self.original(l, topic, partition)?),
            None => None,
        };
        let (key, payload, headers) = match &original {
            Some(o) => {
                let mut headers = l.replay_headers();
                for (k, v) in &o.headers {
                    headers = headers.insert(Header {
                        key: k.as_str(),
                        value: v.as_deref(),
                    });
                }
                (o.key.as_deref(), o.payload.as_deref(), headers)
            }
            None => (
                l.key_bytes.as_deref(),
                l.payload.as_deref(),
                l.replay_headers(),
            ),
        };
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .partition(partition)
            .headers(headers);
        // The original's place in time: a grant replayed after its revoke stays older than it.
        if let Some(ts) = original
            .as_ref()
            .map_or(l.source_timestamp_ms, |o| o.timestamp_ms)
        {
            record = record.timestamp(ts);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        let failed = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "cannot replay dead letter {} to {topic}/{partition}: {e}",
                l.position()
            )
        };
        let delivery = producer.send_result(record).map_err(|(e, _)| failed(&e))?;
        match futures::executor::block_on(delivery) {
            Ok(Ok(d)) => Ok(d.offset),
            Ok(Err((e, _))) => Err(failed(&e)),
            Err(_) => Err(failed(&"producer shut down before acknowledging")),
        }
    }

    /// The message a payload-less dead letter stands for, read from its source position.
    fn original(&self, l: &DeadLetter, topic: &str, partition: i32) -> anyhow::Result<Original> {
        let offset = l.source_offset.ok_or_else(|| {
            anyhow::anyhow!(
                "dead letter {} carries no payload and no {HEADER_OFFSET} header to fetch it from",
                l.position()
            )
        })?;
        let gone = |why: String| {
            anyhow::anyhow!(
                "dead letter {} carries no payload (it did not fit) and its original at \
                 {topic}/{partition}/{offset} cannot be read: {why}; nothing more was replayed",
                l.position()
            )
        };
        let reader = group_consumer(&self.config, &format!("{}-fetch", self.topic))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        reader.assign(&tpl)?;
        let deadline = Instant::now() + READ_TIMEOUT;
        while Instant::now() < deadline {
            match reader.poll(Duration::from_millis(200)) {
                Some(Ok(msg)) if msg.offset() == offset => {
                    let headers = msg
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .filter(|h| !h.key.starts_with(HEADER_PREFIX))
                                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default();
                    return Ok(Original {
                        key: msg.key().map(<[u8]>::to_vec),
                        payload: msg.payload().map(<[u8]>::to_vec),
                        headers,
                        timestamp_ms: msg.timestamp().to_millis(),
                    });
                }
                Some(Ok(msg)) => {
                    return Err(gone(format!("the log starts at {} there", msg.offset())))
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    return Err(gone("the log ends before it".to_owned()))
                }
                Some(Err(e)) => return Err(gone(e.to_string())),
                None => {}
            }
        }
        Err(gone(format!("no answer within {READ_TIMEOUT:?}")))
    }

    /// Reads `(partition, from, to)` ranges; returns the messages sorted by partition, offset.
    fn read(&self, ranges: &[(i32, i64, i64)]) -> anyhow::Result<Vec<DeadLetter>> {
        let mut tpl = TopicPartitionList::new();
        // Next offset still wanted per partition, and where to stop.
        let mut pending: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        for &(partition, from, to) in ranges {
            if from < to {
                tpl.add_partition_offset(&self.topic, partition, Offset::Offset(from))?;
                pending.insert(partition, (from, to));
            }
        }
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        self.main.assign(&tpl)?;
        let deadline = Instant::now() + READ_TIMEOUT;
        let mut out = Vec::new();
        while !pending.is_empty() {
            if Instant::now() >= deadline {
                let _ = self.main.unassign();
                let short: Vec<String> = pending
                    .iter()
                    .map(|(p, (next, end))| format!("{p} at {next} of {end}"))
                    .collect();
                anyhow::bail!(
                    "timed out after {READ_TIMEOUT:?} reading {} (partitions not read to their end: {})",
                    self.topic,
                    short.join(", ")
                );
            }
            match self.main.poll(Duration::from_millis(200)) {
                None => {}
                Some(Ok(msg)) => {
                    let p = msg.partition();
                    let Some((next, end)) = pending.get_mut(&p) else {
                        continue;
                    };
                    if msg.offset() < *end {
                        out.push(DeadLetter::from_message(&msg));
                    }
                    *next = msg.offset() + 1;
                    if *next >= *end {
                        pending.remove(&p);
                    }
                }
                // The end of the partition as the broker has it: past compacted gaps too.
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    pending.remove(&p);
                }
                Some(Err(e)) => {
                    let _ = self.main.unassign();
                    anyhow::bail!("cannot read {}: {e}", self.topic);
                }
            }
        }
        self.main.unassign()?;
        out.sort_by_key(|l| (l.partition, l.offset));
        Ok(out)
    }
}

/// A message fetched from its source position.
struct Original {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    timestamp_ms: Option<i64>,
}

/// A consumer that never joins its group: it reads assigned partitions and commits offsets.
fn group_consumer(config: &Config, group: &str) -> anyhow::Result<BaseConsumer> {
    Ok(config
        .kafka_reader_config(Reads::Live)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .create()?)
}

/// A replay group's committed offsets on the dead-letter topic.
#[derive(Debug, Clone, Default)]
struct Progress {
    committed: HashMap<i32, i64>,
    dirty: BTreeMap<i32, i64>,
}

impl Progress {
    fn fetch(
        consumer: &BaseConsumer,
        topic: &str,
        partitions: &[PartitionRange],
        config: &Config,
    ) -> anyhow::Result<Progress> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(topic, p.partition);
        }
        let committed = consumer
            .committed_offsets(tpl, REQUEST_TIMEOUT)
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot read replay progress on {topic} from {}: {e}",
                    config.kafka_bootstrap_servers
                )
            })?;
        let mut out = Progress::default();
        for e in committed.elements() {
            if let Offset::Offset(o) = e.offset() {
                out.committed.insert(e.partition(), o);
            }
        }
        Ok(out)
    }

    /// The first offset on `partition` not covered yet.
    fn next(&self, partition: i32) -> i64 {
        self.committed.get(&partition).copied().unwrap_or(0)
    }

    fn covers(&self, partition: i32, offset: i64) -> bool {
        offset < self.next(partition)
    }

    /// Moves forward only: a replay with `--all` never rewinds recorded progress.
    fn advance(&mut self, partition: i32, next: i64) {
        if next > self.next(partition) {
            self.committed.insert(partition, next);
            self.dirty.insert(partition, next);
        }
    }

    fn commit(&mut self, consumer: &BaseConsumer, topic: &str) -> anyhow::Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (&p, &o) in &self.dirty {
            tpl.add_partition_offset(topic, p, Offset::Offset(o))?;
        }
        consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| anyhow::anyhow!("cannot commit replay progress on {topic}: {e}"))?;
        self.dirty.clear();
        Ok(())
    }
}

/// The per-source-topic replay groups, loaded on first use.
#[derive(Default)]
struct TopicGroups {
    groups: HashMap<String, (BaseConsumer, Progress)>,
}

impl TopicGroups {
    fn load(&mut self, log: &DeadLetterLog, source_topic: &str) -> anyhow::Result<()> {
        if !self.groups.contains_key(source_topic) {
            let consumer = group_consumer(
                &log.config,
                &topic_replay_group(&log.config.namespace, source_topic),
            )?;
            let progress = Progress::fetch(&consumer, &log.topic, &log.partitions, &log.config)?;
            self.groups
                .insert(source_topic.to_owned(), (consumer, progress));
        }
        Ok(())
    }

    fn get(&self, source_topic: &str) -> Option<&(BaseConsumer, Progress)> {
        self.groups.get(source_topic)
    }

    fn covers(&mut self, log: &DeadLetterLog, l: &DeadLetter) -> anyhow::Result<bool> {
        let Some(t) = &l.source_topic else {
            return Ok(false);
        };
        self.load(log, t)?;
        Ok(self.groups[t.as_str()].1.covers(l.partition, l.offset))
    }
}
