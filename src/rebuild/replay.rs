//! Replaying a brand's catalog events from the topic into a database of our choosing, with the
//! live processor's own folding ([`crate::catalog::apply::write_brand_run`]).
//!
//! The target's `projection_offsets` say where it stands: a replay reads each partition from the
//! offset after it, up to the offsets the live database holds, so the two hold exactly the same
//! events when it returns. Events of other brands (the topic is keyed by brand) and events that
//! happened while the brand was archived (skipped live too) are passed over; for an archived
//! brand's archive, so is everything from after its termination.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::MySqlPool;

use crate::catalog::apply::write_brand_run;
use crate::catalog::item::{self, Change};
use crate::catalog::shadow::ShadowState;
use crate::catalog::spec::CatalogSpec;
use crate::config::Config;
use crate::offsets;
use crate::stream::{Msg, Origin};
use crate::tenancy::tenants::{Status, TenantRef};
use crate::tenant::DatabaseName;
use crate::wire::{decode_batch, Codec, DecodeError};

/// Events applied per transaction.
pub const BATCH: usize = 1000;

/// What a replay did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Replayed {
    /// Messages read from the topic (every brand's).
    pub read: u64,
    /// This brand's events handed to the projection.
    pub applied: u64,
    /// This brand's events passed over: inside an archived period, or undecodable (the live
    /// processor dead-lettered those).
    pub skipped: u64,
}

impl std::ops::AddAssign for Replayed {
    fn add_assign(&mut self, o: Replayed) {
        self.read += o.read;
        self.applied += o.applied;
        self.skipped += o.skipped;
    }
}

/// The catalog offsets a brand database holds, per partition of `topic`.
pub async fn held_offsets(
    pool: &MySqlPool,
    db: &DatabaseName,
    spec: &CatalogSpec,
    topic: &str,
) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let all = offsets::all(&mut tx, db, &spec.projection).await?;
    tx.commit().await?;
    Ok(all
        .into_iter()
        .filter(|(t, _, _)| t == topic)
        .map(|(_, p, o)| (p, o))
        .collect())
}

/// A consumer for a replay: it never joins a group or commits (partitions are assigned by
/// hand), and reads ahead little.
pub fn consumer(config: &Config) -> anyhow::Result<StreamConsumer> {
    Ok(config
        .kafka_client_config()
        .set("group.id", format!("{}.rebuild", config.namespace))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // librdkafka prefetches up to 64 MiB per partition by default; a replay consumes as
        // fast as MySQL applies, so a smaller read-ahead costs nothing and keeps the rebuild's
        // memory small.
        .set("queued.max.messages.kbytes", "8192")
        .create()?)
}

/// The messages of `topic`'s partitions from `from` to `upto` (both inclusive, per
/// partition), each once, in order within a partition: what a replay of one of the fenced
/// tenants reads.
pub struct Range {
    consumer: StreamConsumer,
    topic: String,
    upto: HashMap<i32, i64>,
    position: HashMap<i32, i64>,
}

impl Range {
    /// `None` when there is nothing to read.
    pub fn new(
        config: &Config,
        topic: &str,
        from: &HashMap<i32, i64>,
        upto: HashMap<i32, i64>,
    ) -> anyhow::Result<Option<Range>> {
        let mut assignment = TopicPartitionList::new();
        let mut position = HashMap::new();
        for (&p, &end) in &upto {
            let first = from.get(&p).copied().unwrap_or(0);
            if first <= end {
                // An explicit offset, never Beginning: it spares librdkafka an offset lookup
                // (half a second before the first fetch here).
                assignment.add_partition_offset(topic, p, Offset::Offset(first))?;
                position.insert(p, first - 1);
            }
        }
        if position.is_empty() {
            return Ok(None);
        }
        let consumer = consumer(config)?;
        consumer.assign(&assignment)?;
        Ok(Some(Range {
            consumer,
            topic: topic.to_owned(),
            upto,
            position,
        }))
    }

    /// The next message in range; `None` once every partition reached its end.
    pub async fn next(&mut self) -> anyhow::Result<Option<rdkafka::message::BorrowedMessage<'_>>> {
        loop {
            if !self.position.iter().any(|(p, at)| *at < self.upto[p]) {
                return Ok(None);
            }
            let m = tokio::time::timeout(Duration::from_secs(30), self.consumer.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!("no message from {} for 30 s while replaying", self.topic)
                })??;
            let p = m.partition();
            let in_range = self.position.get(&p).is_some_and(|at| m.offset() > *at)
                && m.offset() <= self.upto[&p];
            if in_range {
                self.position.insert(p, m.offset());
                return Ok(Some(m));
            }
        }
    }
}

/// A message decoded: the event, or why it is none (dead-lettered live). A registry outage is
/// an error: passing over those events would lose them.
pub async fn decode_event(
    codec: &Codec,
    topic: &str,
    payload: Option<&[u8]>,
) -> anyhow::Result<Result<crate::events::Event, String>> {
    match codec.decode(payload).await {
        Ok(event) => Ok(Ok(event)),
        Err(e) if e.is_transient() => anyhow::bail!("cannot replay {topic}: {e}"),
        Err(e) => Ok(Err(e.to_string())),
    }
}

pub struct Replay<'a> {
    pub config: &'a Config,
    pub pool: &'a MySqlPool,
    pub codec: &'a Codec,
    pub spec: &'a CatalogSpec,
    pub brand: &'a TenantRef,
    pub topic: &'a str,
    /// Events applied per transaction.
    pub batch: usize,
    /// What the target holds, between runs (see [`ShadowState`]); taken out for a run and put
    /// back only when it succeeded, so a failed write never leaves it ahead of the database.
    pub known: std::sync::Mutex<Option<(DatabaseName, ShadowState)>>,
}

impl Replay<'_> {
    /// Brings `target` up to `upto` (per partition, inclusive). `progress` is called every few
    /// seconds with what was done so far.
    pub async fn run(
        &self,
        target: &DatabaseName,
        upto: &HashMap<i32, i64>,
        mut progress: impl FnMut(&Replayed, &HashMap<i32, i64>),
    ) -> anyhow::Result<Replayed> {
        let held = held_offsets(self.pool, target, self.spec, self.topic).await?;
        let mut position: HashMap<i32, i64> = HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for (&p, &end) in upto {
            let from = held.get(&p).map_or(0, |o| o + 1);
            if from <= end {
                assignment.add_partition_offset(self.topic, p, Offset::Offset(from))?;
                position.insert(p, from - 1);
            }
        }
        let mut done = Replayed::default();
        if assignment.count() == 0 {
            return Ok(done);
        }
        let consumer = consumer(self.config)?;
        consumer.assign(&assignment)?;
        // Reading and decoding run ahead of applying (a batch or two), so the topic is read
        // while MySQL writes the previous batch.
        let (batches, ready) = tokio::sync::mpsc::channel::<(i32, Vec<Msg<item::Item>>)>(2);
        let applied = std::cell::Cell::new(0u64);
        let read = async {
            // This brand's messages as read, decoded a run at a time (one Avro reader per
            // writer schema, as the live loop does).
            let mut pending: HashMap<i32, Vec<OwnedMessage>> = HashMap::new();
            let mut last_report = Instant::now();
            while position.iter().any(|(p, at)| *at < upto[p]) {
                let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!("no message from {} for 30 s while replaying", self.topic)
                    })??;
                let p = m.partition();
                let Some(&end) = upto.get(&p) else { continue };
                if m.offset() > end || position.get(&p).is_some_and(|at| m.offset() <= *at) {
                    continue;
                }
                position.insert(p, m.offset());
                done.read += 1;
                if m.key() == Some(self.brand.organisation_id.as_bytes()) {
                    pending.entry(p).or_default().push(m.detach());
                }
                let full = pending.get(&p).is_some_and(|v| v.len() >= self.batch);
                if full || m.offset() == end {
                    if let Some(raw) = pending.remove(&p) {
                        let run = self.decode(raw, &mut done).await?;
                        // A closed channel means the applier failed; its error is returned.
                        if batches.send((p, run)).await.is_err() {
                            break;
                        }
                    }
                }
                if last_report.elapsed() >= Duration::from_secs(2) {
                    done.applied = applied.get();
                    progress(&done, &position);
                    last_report = Instant::now();
                }
            }
            for (p, raw) in std::mem::take(&mut pending) {
                let run = self.decode(raw, &mut done).await?;
                if batches.send((p, run)).await.is_err() {
                    break;
                }
            }
            drop(batches);
            anyhow::Ok(())
        };
        let apply = async {
            // Owned here: an applier that fails drops it, which ends the reader's sends.
            let mut ready = ready;
            // One connection for every batch: they are applied one after another anyway, and
            // the prepared multi-row statements are then cached on one connection only.
            let mut conn = self.pool.acquire().await?;
            let held = self.known.lock().expect("not poisoned").take();
            let mut known = match held {
                Some((db, state)) if db == *target => state,
                _ => ShadowState::load(&mut conn, target, self.spec).await?,
            };
            while let Some((p, run)) = ready.recv().await {
                let n = self.apply(&mut conn, target, p, run, &mut known).await?;
                applied.set(applied.get() + n);
            }
            *self.known.lock().expect("not poisoned") = Some((target.clone(), known));
            anyhow::Ok(())
        };
        let (read, apply) = tokio::join!(read, apply);
        apply?;
        read?;
        done.applied = applied.get();
        progress(&done, &position);
        Ok(done)
    }

    /// The brand's catalog events among `raw`, decoded; the rest (undecodable, dead-lettered
    /// live, or inside an archived period, skipped live too) are counted as skipped. A registry
    /// outage stops the replay: passing over those events would lose them.
    async fn decode(
        &self,
        raw: Vec<OwnedMessage>,
        done: &mut Replayed,
    ) -> anyhow::Result<Vec<Msg<item::Item>>> {
        let mut framed = Vec::with_capacity(raw.len());
        let mut kept = Vec::with_capacity(raw.len());
        for m in raw {
            match self.codec.writer_schema(m.payload()).await {
                Ok(schema) => {
                    framed.push((schema, m.payload().unwrap_or_default().to_vec()));
                    kept.push(m);
                }
                Err(e @ DecodeError::RegistryUnavailable { .. }) => {
                    anyhow::bail!("cannot replay {}: {e}", self.topic)
                }
                Err(_) => done.skipped += 1,
            }
        }
        // Off this task: it also drives the applier's statements, which would otherwise wait
        // for the decoding of the next batch before MySQL hears the next one.
        let decoded = tokio::task::spawn_blocking(move || decode_batch(&framed)).await?;
        let mut run = Vec::with_capacity(kept.len());
        for (m, decoded) in kept.into_iter().zip(decoded) {
            match decoded.map(item::parse) {
                Ok(Ok(it))
                    if it.brand == self.brand.organisation_id
                        && matches!(it.change, Change::Catalog(_))
                        && self.belongs(it.occurred_at) =>
                {
                    run.push(Msg::new(Origin::of(&m), it, m));
                }
                _ => done.skipped += 1,
            }
        }
        Ok(run)
    }

    /// Whether an event that happened at `occurred_at` was applied live, by the tenant's
    /// lifecycle (as `tenancy::verdict` judged it): not inside an earlier archived period, and
    /// for an archived tenant only from before its termination (what its archive holds).
    fn belongs(&self, occurred_at: i64) -> bool {
        if self.brand.was_archived_at(occurred_at) {
            return false;
        }
        match self.brand.status {
            Status::Archived => self.brand.archived_at.is_some_and(|a| occurred_at < a),
            _ => true,
        }
    }

    async fn apply(
        &self,
        conn: &mut sqlx::pool::PoolConnection<sqlx::MySql>,
        target: &DatabaseName,
        partition: i32,
        run: Vec<Msg<item::Item>>,
        known: &mut ShadowState,
    ) -> anyhow::Result<u64> {
        if run.is_empty() {
            return Ok(0);
        }
        let refs: Vec<&Msg<item::Item>> = run.iter().collect();
        let mut tx = sqlx::Connection::begin(&mut **conn).await?;
        write_brand_run(
            &mut tx,
            self.spec,
            true,
            &self.brand.organisation_id,
            target,
            self.topic,
            partition,
            &refs,
            Some(known),
        )
        .await?;
        tx.commit().await?;
        Ok(run.len() as u64)
    }
}
