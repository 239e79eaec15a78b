//! Replaying a brand's catalog events from the topic into a database of our choosing, with the
//! live processor's own folding ([`crate::catalog::apply::write_brand_run`]).
//!
//! The target's `projection_offsets` say where it stands: a replay reads each partition from the
//! offset after it, up to the offsets the live database holds, so the two hold exactly the same
//! events when it returns. Events of other brands (the topic is keyed by brand) and events that
//! happened while the brand was archived (skipped live too) are passed over; for an archived
//! brand's archive, so is everything from after its termination.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::MySqlPool;

use crate::catalog::apply::{
    catalog_values, drop_seen, first_deliveries, without_stale, write_folded,
    write_folded_bookkeeping, write_folded_rows, BrandRun, Folded,
};
use crate::catalog::change::NetChange;
use crate::catalog::item::{self, Change};
use crate::catalog::shadow::ShadowState;
use crate::catalog::spec::CatalogSpec;
use crate::catalog::store;
use crate::config::{Config, Reads};
use crate::log::wire::{decode_batch, Codec, DecodeError, PendingCodec};
use crate::store::applied;
use crate::store::offsets;
use crate::store::tenants::{Status, TenantRef};
use crate::stream::{Msg, Origin};
use crate::tenancy::clock::EventTime;
use crate::tenant::DatabaseName;

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
        .kafka_reader_config(Reads::Replay)
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
    /// `None` only once dropped.
    consumer: Option<StreamConsumer>,
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
            consumer: Some(consumer),
            topic: topic.to_owned(),
            upto,
            position,
        }))
    }

    /// The last offset read of each partition.
    pub fn position(&self) -> &HashMap<i32, i64> {
        &self.position
    }

    /// Whether `offset` is the last of partition `p`'s range.
    pub fn is_end(&self, p: i32, offset: i64) -> bool {
        self.upto.get(&p) == Some(&offset)
    }

    /// The next message in range; `None` once every partition reached its end.
    pub async fn next(&mut self) -> anyhow::Result<Option<rdkafka::message::BorrowedMessage<'_>>> {
        loop {
            if !self.position.iter().any(|(p, at)| *at < self.upto[p]) {
                return Ok(None);
            }
            let consumer = self.consumer.as_ref().expect("open until dropped");
            let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
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

impl Drop for Range {
    fn drop(&mut self) {
        // It never joined a group nor committed: nothing waits for its close (a supplier's
        // rebuild waited 100 ms here between its grants and its copies).
        if let Some(consumer) = self.consumer.take() {
            crate::log::kafka::close_in_background(consumer);
        }
    }
}

/// A message decoded: the event, or why it is none (dead-lettered live). A registry outage is
/// an error: passing over those events would lose them.
pub async fn decode_event(
    codec: &Codec,
    topic: &str,
    payload: Option<&[u8]>,
) -> anyhow::Result<Result<crate::log::events::Event, String>> {
    match codec.decode(payload).await {
        Ok(event) => Ok(Ok(event)),
        Err(e) if e.is_transient() => anyhow::bail!("cannot replay {topic}: {e}"),
        Err(e) => Ok(Err(e.to_string())),
    }
}

pub struct Replay<'a> {
    pub config: &'a Config,
    pub pool: &'a MySqlPool,
    pub codec: &'a PendingCodec,
    pub spec: &'a CatalogSpec,
    pub brand: &'a TenantRef,
    pub topic: &'a str,
    /// Events applied per transaction.
    pub batch: usize,
    /// Write each run's rows and its bookkeeping (event ids, offset) in two transactions on two
    /// connections at once: MariaDB then works on both with two threads, and the replay's
    /// critical path is the longer of the two instead of their sum. Only for a shadow: a run
    /// half written by a failed replay is dropped with it (`rebuild` drops the shadow on any
    /// error, and the next one starts a fresh shadow), whereas a database that goes live again
    /// (`--rollback`'s) must hold rows and ids of a run together or neither.
    pub split_writes: bool,
    /// Crash tests: `half-run` aborts a split write with only the bookkeeping of its run
    /// committed (the half that would make a reused shadow skip the run's rows).
    pub fail_after: &'a super::FailAfter,
    /// What the target holds, between runs (see [`ShadowState`]); taken out for a run and put
    /// back only when it succeeded, so a failed write never leaves it ahead of the database.
    pub known: std::sync::Mutex<Option<(DatabaseName, ShadowState)>>,
}

/// What the reader hands the applier.
enum Feed {
    /// A partition's run planned against the target: the events to record (duplicates
    /// dropped), what to write, and how many events the run had.
    Write {
        partition: i32,
        fresh: Vec<Msg<item::Item>>,
        folded: Folded,
        events: u64,
    },
    /// Answered once everything sent before is committed: the reader is about to ask MySQL.
    Barrier(tokio::sync::oneshot::Sender<()>),
    /// How far the reader has read (for the progress report).
    Progress(Replayed, HashMap<i32, i64>),
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
        let from: HashMap<i32, i64> = held.iter().map(|(&p, &o)| (p, o + 1)).collect();
        let Some(range) = Range::new(self.config, self.topic, &from, upto.clone())? else {
            return Ok(Replayed::default());
        };
        // One connection for every write (a shadow's bookkeeping has a second, see
        // `split_writes`): runs are applied one after another anyway, and the prepared
        // multi-row statements are then cached on one connection only.
        let mut conn = self.pool.acquire().await?;
        let mut second = match self.split_writes {
            true => Some(self.pool.acquire().await?),
            false => None,
        };
        let kept = self.known.lock().expect("not poisoned").take();
        let known = match kept {
            Some((db, state)) if db == *target => state,
            _ => ShadowState::load(&mut conn, target, self.spec).await?,
        };
        // Reading, decoding and planning each run (the lookups answered from `known`) happen
        // ahead of applying, on a task of their own: on the applier's task they were time in
        // which MySQL waited for the next statement (it was busy 70% of the replay, against 90%
        // for plain inserts). The applier only sends the planned statements.
        let (feed, mut ready) = tokio::sync::mpsc::channel::<Feed>(2);
        let reader = Reader {
            range,
            codec: self.codec.get().await,
            topic: self.topic.to_owned(),
            brand: self.brand.clone(),
            spec: self.spec.clone(),
            batch: self.batch,
            pool: self.pool.clone(),
            target: target.clone(),
            known,
        };
        let reading = tokio::spawn(reader.run(feed));
        let mut applied = 0u64;
        // Where the writer's time went: waiting for the reader (the broker and decoding are
        // the limit) or writing (MySQL is).
        let (mut waited, mut wrote) = (Duration::ZERO, Duration::ZERO);
        let mut first_wait = None;
        let apply = async {
            loop {
                let asked = Instant::now();
                let Some(feed) = ready.recv().await else {
                    break;
                };
                waited += asked.elapsed();
                first_wait.get_or_insert(waited);
                match feed {
                    Feed::Write {
                        partition,
                        fresh,
                        folded,
                        events,
                    } => {
                        let writing = Instant::now();
                        self.apply(
                            &mut conn,
                            second.as_mut(),
                            target,
                            partition,
                            &fresh,
                            &folded,
                        )
                        .await?;
                        wrote += writing.elapsed();
                        applied += events;
                        // Freeing a run's thousands of decoded values took a tenth of this
                        // task's time, during which MySQL waited: done on another thread.
                        tokio::task::spawn_blocking(move || drop((fresh, folded)));
                    }
                    // Sequential: everything sent before it is committed by now.
                    Feed::Barrier(answer) => {
                        let _ = answer.send(());
                    }
                    Feed::Progress(mut done, at) => {
                        done.applied = applied;
                        progress(&done, &at);
                    }
                }
            }
            anyhow::Ok(())
        }
        .await;
        // A failed applier drops the receiver, which ends the reader's sends; its error wins.
        drop(ready);
        let read = reading.await?;
        apply?;
        let (mut done, at, known) = read?;
        // Only now: the reader's state is ahead of the target until every write is committed.
        *self.known.lock().expect("not poisoned") = Some((target.clone(), known));
        done.applied = applied;
        tracing::debug!(tenant = %self.brand.organisation_id, database = %target,
            events = applied, writing_s = wrote.as_secs_f64(), waiting_s = waited.as_secs_f64(),
            first_wait_s = first_wait.unwrap_or_default().as_secs_f64(),
            "replay: the writer's time");
        progress(&done, &at);
        Ok(done)
    }

    async fn apply(
        &self,
        conn: &mut sqlx::pool::PoolConnection<sqlx::MySql>,
        second: Option<&mut sqlx::pool::PoolConnection<sqlx::MySql>>,
        target: &DatabaseName,
        partition: i32,
        fresh: &[Msg<item::Item>],
        folded: &Folded,
    ) -> anyhow::Result<()> {
        let refs: Vec<&Msg<item::Item>> = fresh.iter().collect();
        let at = BrandRun {
            spec: self.spec,
            dedupe: true,
            brand_id: &self.brand.organisation_id,
            brand_db: target,
            topic: self.topic,
            partition,
        };
        let Some(second) = second else {
            let mut tx = sqlx::Connection::begin(&mut **conn).await?;
            write_folded(&mut tx, &at, &refs, folded).await?;
            tx.commit().await?;
            return Ok(());
        };
        let rows = async {
            let mut tx = sqlx::Connection::begin(&mut **conn).await?;
            write_folded_rows(&mut tx, &at, folded).await?;
            tx.commit().await
        };
        let bookkeeping = async {
            let mut tx = sqlx::Connection::begin(&mut **second).await?;
            write_folded_bookkeeping(&mut tx, &at, &refs, folded).await?;
            tx.commit().await
        };
        if *self.fail_after == Some(crate::fault::FailPoint::HalfRun) {
            bookkeeping.await?;
            crate::fault::crash_after(*self.fail_after, crate::fault::FailPoint::HalfRun);
            unreachable!("--fail-after half-run aborts");
        }
        tokio::try_join!(rows, bookkeeping)?;
        Ok(())
    }
}

/// The reading half of a replay: the topic's messages in range, the brand's decoded in runs of
/// up to `batch` per partition.
struct Reader {
    range: Range,
    codec: Arc<Codec>,
    topic: String,
    brand: TenantRef,
    spec: CatalogSpec,
    batch: usize,
    /// For the lookups `known` cannot answer, made once the applier has caught up.
    pool: MySqlPool,
    target: DatabaseName,
    /// What the target will hold once every run planned so far is written.
    known: ShadowState,
}

impl Reader {
    /// Reads to the end of the range, sending every run planned and a progress report every
    /// few seconds; a closed channel (the applier failed) ends it early. Returns what it read,
    /// where it stopped and the target's state.
    async fn run(
        mut self,
        feed: tokio::sync::mpsc::Sender<Feed>,
    ) -> anyhow::Result<(Replayed, HashMap<i32, i64>, ShadowState)> {
        let mut done = Replayed::default();
        let mut pending: HashMap<i32, Vec<OwnedMessage>> = HashMap::new();
        let mut last_report = Instant::now();
        let brand = self.brand.organisation_id.clone().into_bytes();
        while let Some(m) = self.range.next().await? {
            done.read += 1;
            let (p, offset) = (m.partition(), m.offset());
            if m.key() == Some(brand.as_slice()) {
                pending.entry(p).or_default().push(m.detach());
            }
            let full = pending.get(&p).is_some_and(|v| v.len() >= self.batch);
            if full || self.range.is_end(p, offset) {
                if let Some(raw) = pending.remove(&p) {
                    let run = self.decode(raw, &mut done).await?;
                    if !self.plan_and_send(&feed, p, run).await? {
                        break;
                    }
                }
            }
            if last_report.elapsed() >= Duration::from_secs(2) {
                let report = Feed::Progress(done, self.range.position().clone());
                if feed.send(report).await.is_err() {
                    break;
                }
                last_report = Instant::now();
            }
        }
        for (p, raw) in std::mem::take(&mut pending) {
            let run = self.decode(raw, &mut done).await?;
            if !self.plan_and_send(&feed, p, run).await? {
                break;
            }
        }
        Ok((done, self.range.position().clone(), self.known))
    }

    /// Plans `run` against the target, as the live processor's `write_brand_run` would, and
    /// sends it; false once the applier is gone.
    async fn plan_and_send(
        &mut self,
        feed: &tokio::sync::mpsc::Sender<Feed>,
        partition: i32,
        mut run: Vec<Msg<item::Item>>,
    ) -> anyhow::Result<bool> {
        let Some(last) = run.last().map(|m| m.origin.offset) else {
            return Ok(true);
        };
        let events = run.len();
        // Past the offset (the range starts after it), but perhaps not new: an id whose hash
        // the state holds is looked up in MySQL, once everything planned before is there.
        let ids: Vec<&str> = run.iter().map(|m| m.item.event_id.as_str()).collect();
        let hits: Vec<String> = self
            .known
            .maybe_seen(&ids)
            .into_iter()
            .map(str::to_owned)
            .collect();
        if !hits.is_empty() {
            if !barrier(feed).await {
                return Ok(false);
            }
            let hits: Vec<&str> = hits.iter().map(String::as_str).collect();
            let mut tx = self.pool.begin().await?;
            let seen = applied::seen(&mut tx, &self.target, &self.spec.projection, &hits).await?;
            drop_seen(&mut tx, &self.spec, &self.target, &mut run, &seen).await?;
            tx.commit().await?;
        }
        first_deliveries(&mut run);
        let change = NetChange::of(&self.spec, &catalog_values(&run.iter().collect::<Vec<_>>()));
        let codes = change.codes(&self.spec);
        let (stored, removed) = match self.known.stored_revisions(&codes) {
            Some(known) => known,
            None => {
                if !barrier(feed).await {
                    return Ok(false);
                }
                let mut tx = self.pool.begin().await?;
                let stored =
                    store::stored_revisions(&mut tx, &self.target, &self.spec, &codes).await?;
                tx.commit().await?;
                stored
            }
        };
        let change = without_stale(&self.spec, &self.brand.organisation_id, change, &stored);
        self.known.written(
            &self.spec,
            &change,
            &removed,
            run.iter().map(|m| m.item.event_id.as_str()),
        );
        let write = Feed::Write {
            partition,
            fresh: run,
            folded: Folded {
                change,
                removed,
                last,
            },
            events: events as u64,
        };
        Ok(feed.send(write).await.is_ok())
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
        // Off this task: decoding a run would hold up reading the next.
        let decoded = tokio::task::spawn_blocking(move || decode_batch(&framed)).await?;
        let mut run = Vec::with_capacity(kept.len());
        for (m, decoded) in kept.into_iter().zip(decoded) {
            let logged_at = crate::stream::logged_at(&m);
            match decoded.map(item::parse) {
                Ok(Ok(it))
                    if it.brand == self.brand.organisation_id
                        && matches!(it.change, Change::Catalog(_))
                        && self.belongs(EventTime::new(it.occurred_at, logged_at).effective()) =>
                {
                    run.push(Msg::new(Origin::of(&m), it, m));
                }
                _ => done.skipped += 1,
            }
        }
        Ok(run)
    }

    /// Whether an event placed at `occurred_at` (by `tenancy::clock`) was applied live, by the
    /// tenant's
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
}

/// Waits until the applier has committed everything sent before; false once it is gone.
async fn barrier(feed: &tokio::sync::mpsc::Sender<Feed>) -> bool {
    let (answer, answered) = tokio::sync::oneshot::channel();
    feed.send(Feed::Barrier(answer)).await.is_ok() && answered.await.is_ok()
}
