//! Replaying a brand's catalog events from the topic into a database of our choosing, with the
//! live processor's own folding ([`crate::catalog::apply::write_brand_run`]).
//!
//! The target's `projection_offsets` say where it stands: a replay reads each partition from the
//! offset after it, up to the offsets the live database holds, so the two hold exactly the same
//! events when it returns. Events of other brands (the topic is keyed by brand) and events that
//! happened while the brand was archived (skipped live too) are passed over.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::MySqlPool;

use crate::catalog::apply::write_brand_run;
use crate::catalog::item::{self, Change};
use crate::catalog::spec::CatalogSpec;
use crate::config::Config;
use crate::offsets;
use crate::stream::{Msg, Origin};
use crate::tenancy::tenants::TenantRef;
use crate::tenant::DatabaseName;
use crate::wire::Codec;

/// Events applied per transaction.
const BATCH: usize = 1000;

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

pub struct Replay<'a> {
    pub config: &'a Config,
    pub pool: &'a MySqlPool,
    pub codec: &'a Codec,
    pub spec: &'a CatalogSpec,
    pub brand: &'a TenantRef,
    pub topic: &'a str,
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
        let consumer: StreamConsumer = self
            .config
            .kafka_client_config()
            // Never joins or commits: partitions are assigned by hand.
            .set("group.id", format!("{}.rebuild", self.config.namespace))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()?;
        consumer.assign(&assignment)?;
        let mut pending: HashMap<i32, Vec<Msg<item::Item>>> = HashMap::new();
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
            let ours = m.key() == Some(self.brand.organisation_id.as_bytes());
            if ours {
                match self.codec.decode(m.payload()).await.map(item::parse) {
                    Ok(Ok(it))
                        if it.brand == self.brand.organisation_id
                            && matches!(it.change, Change::Catalog(_))
                            && !self.brand.was_archived_at(it.occurred_at) =>
                    {
                        let origin = Origin::of(&m);
                        pending
                            .entry(p)
                            .or_default()
                            .push(Msg::new(origin, it, m.detach()));
                    }
                    _ => done.skipped += 1,
                }
            }
            let full = pending.get(&p).is_some_and(|v| v.len() >= BATCH);
            if full || m.offset() == end {
                done.applied += self.apply(target, p, pending.remove(&p)).await?;
            }
            if last_report.elapsed() >= Duration::from_secs(2) {
                progress(&done, &position);
                last_report = Instant::now();
            }
        }
        for (p, run) in pending.drain() {
            done.applied += self.apply(target, p, Some(run)).await?;
        }
        progress(&done, &position);
        Ok(done)
    }

    async fn apply(
        &self,
        target: &DatabaseName,
        partition: i32,
        run: Option<Vec<Msg<item::Item>>>,
    ) -> anyhow::Result<u64> {
        let Some(run) = run.filter(|r| !r.is_empty()) else {
            return Ok(0);
        };
        let refs: Vec<&Msg<item::Item>> = run.iter().collect();
        let mut tx = self.pool.begin().await?;
        write_brand_run(
            &mut tx,
            self.spec,
            true,
            &self.brand.organisation_id,
            target,
            self.topic,
            partition,
            &refs,
        )
        .await?;
        tx.commit().await?;
        Ok(run.len() as u64)
    }
}
