//! The catalog processor: `{ns}.brand-catalog` and `{ns}.brand-access` into brand databases,
//! supplier copies, the platform's access index and the Redis permission cache.
//!
//! Messages are taken in batches, grouped by brand (the message key) and written with one
//! transaction per tenant database and multi-row statements. Each database keeps the offsets it
//! has applied (`projection_offsets`) in the same transaction, so redelivery changes nothing.
//!
//! Events for a tenant that is not active yet are held in memory (per brand, in order) and
//! applied once the registry says it is; later events of the same brand queue behind them so
//! order is kept, while other brands on the partition flow on. The offset stored for the
//! auto-commit never passes a held event. Past `max_held` held events, the partitions holding
//! them are paused until the backlog drains.
//!
//! Catalog changes and access changes of one brand may be processed by different workers (two
//! topics), so both take a MySQL named lock per brand: a grant's backfill and a catalog fan-out
//! never interleave.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use schema_registry_converter::avro_common::AvroSchema;
use sqlx::pool::PoolConnection;
use sqlx::{MySql, MySqlPool};
use tokio_util::sync::CancellationToken;

use super::change::NetChange;
use super::spec::{field, CatalogSpec, Cell};
use super::store;
use crate::access::cache::PermissionCache;
use crate::dead_letter::DeadLetters;
use crate::events::{Event, EventKind};
use crate::kafka::GroupContext;
use crate::offsets;
use crate::processor::Origin;
use crate::tenancy::tenants::{Status, TenantRef, Tenants};
use crate::tenant::{DatabaseName, Namespace, ServiceDatabase};
use crate::wire::{decode_batch, Codec};

pub(super) const NAME: &str = "catalog";

/// Tunables of the batch loop.
#[derive(Debug, Clone)]
pub struct CatalogSettings {
    /// Most messages taken into one batch.
    pub batch_max: usize,
    /// How long to wait for more messages once a batch has started.
    pub linger: Duration,
    /// Held events (tenants not active yet) before their partitions are paused.
    pub max_held: usize,
    /// How often the registry is asked whether held tenants became active.
    pub recheck_every: Duration,
}

impl Default for CatalogSettings {
    fn default() -> Self {
        CatalogSettings {
            batch_max: 1000,
            linger: Duration::from_millis(20),
            max_held: 10_000,
            recheck_every: Duration::from_millis(300),
        }
    }
}

/// What an event asks of the projection.
#[derive(Debug, Clone)]
pub(super) enum Item {
    Catalog(Value),
    Grant {
        supplier: String,
        permissions: Vec<String>,
        occurred_at: i64,
    },
    Revoke {
        supplier: String,
    },
}

impl Item {
    pub(super) fn supplier(&self) -> Option<&str> {
        match self {
            Item::Grant { supplier, .. } | Item::Revoke { supplier } => Some(supplier),
            Item::Catalog(_) => None,
        }
    }
}

pub(super) struct Pending<'c> {
    msg: BorrowedMessage<'c>,
    pub(super) origin: Origin,
    brand: String,
    /// The event's occurred_at (epoch ms): decides whether it predates a termination.
    occurred_at: i64,
    pub(super) item: Item,
}

/// Why applying failed.
#[derive(Debug)]
pub(super) enum ApplyError {
    Transient(anyhow::Error),
    Permanent(String),
}

impl From<sqlx::Error> for ApplyError {
    fn from(e: sqlx::Error) -> Self {
        // Unknown database or table: the tenant is being archived or restored right now; the
        // retry gates the event again on the registry's new status.
        let moving = matches!(&e, sqlx::Error::Database(d)
            if d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().is_some_and(|m| matches!(m.number(), 1049 | 1146)));
        if moving || crate::tenancy::is_transient(&e) {
            ApplyError::Transient(e.into())
        } else {
            ApplyError::Permanent(format!("SQL failed: {e}"))
        }
    }
}

impl From<redis::RedisError> for ApplyError {
    fn from(e: redis::RedisError) -> Self {
        // The database commit is done; the retry finds its offsets applied and redoes only this.
        ApplyError::Transient(anyhow::Error::new(e).context("updating the permission cache"))
    }
}

/// What the registry says about an event's tenants.
// One short-lived value per event while gating: boxing the refs would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Gate {
    /// The brand, and for access events the supplier, each addressed where the event belongs
    /// (live, or the archive for an event that predates a termination).
    Ready(TenantRef, Option<TenantRef>),
    Hold,
    Skip(String, Status),
    DeadLetter(String),
}

pub struct CatalogProcessor {
    pub ns: Namespace,
    pub pool: MySqlPool,
    pub spec: CatalogSpec,
    pub tenants: Tenants,
    pub cache: PermissionCache,
    pub settings: CatalogSettings,
}

/// Mutable state of one run of the loop.
#[derive(Default)]
struct LoopState<'c> {
    held: BTreeMap<String, VecDeque<Pending<'c>>>,
    held_count: usize,
    /// Highest offset seen + 1, per partition.
    seen: HashMap<(String, i32), i64>,
    stored: HashMap<(String, i32), i64>,
    paused: HashSet<(String, i32)>,
    skip_logged: HashSet<String>,
    last_recheck: Option<Instant>,
}

impl CatalogProcessor {
    pub(super) fn platform(&self) -> DatabaseName {
        self.ns.service_database(ServiceDatabase::Platform)
    }

    /// Runs until `shutdown`; stored offsets are committed on the way out.
    pub async fn run(
        &self,
        consumer: StreamConsumer<GroupContext>,
        codec: &Codec,
        dead_letters: &DeadLetters,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut state = LoopState::default();
        loop {
            let batch = tokio::select! {
                _ = shutdown.cancelled() => break,
                b = self.next_batch(&consumer) => b,
            };
            // Writer schemas first (registry, async, cached per id), then the bulk Avro
            // decoding on a blocking thread so the runtime keeps serving the other loops.
            let mut schemas = Vec::with_capacity(batch.len());
            for msg in &batch {
                let origin = Origin::of(msg);
                let next = state
                    .seen
                    .entry((origin.topic.clone(), origin.partition))
                    .or_insert(0);
                *next = (*next).max(origin.offset + 1);
                match self.writer_schema(codec, msg, &shutdown).await {
                    Some(schema) => schemas.push((origin, schema)),
                    None => return self.finish(&consumer, &state),
                }
            }
            let owned: Vec<_> = batch
                .iter()
                .zip(&schemas)
                .filter_map(|(msg, (_, schema))| {
                    let schema = schema.as_ref().ok()?.clone();
                    Some((schema, msg.payload().unwrap_or_default().to_vec()))
                })
                .collect();
            let mut decoded = tokio::task::spawn_blocking(move || decode_batch(&owned))
                .await?
                .into_iter();
            let mut fresh = Vec::with_capacity(batch.len());
            for (msg, (origin, schema)) in batch.into_iter().zip(schemas) {
                let classified = match schema {
                    Ok(_) => match decoded.next().expect("one result per decodable message") {
                        Ok(event) => classify(event),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(reason) => Err(reason),
                };
                match classified {
                    Ok((brand, occurred_at, item)) => fresh.push(Pending {
                        msg,
                        origin,
                        brand,
                        occurred_at,
                        item,
                    }),
                    Err(reason) => {
                        if !self
                            .dead_letter(dead_letters, &msg, &origin, &reason, &shutdown)
                            .await
                        {
                            return self.finish(&consumer, &state);
                        }
                    }
                }
            }
            if !self.route(fresh, &mut state, dead_letters, &shutdown).await {
                return self.finish(&consumer, &state);
            }
            let recheck_due = state
                .last_recheck
                .is_none_or(|t| t.elapsed() >= self.settings.recheck_every);
            if state.held_count > 0 && recheck_due {
                state.last_recheck = Some(Instant::now());
                let queues: Vec<Pending<'_>> = std::mem::take(&mut state.held)
                    .into_values()
                    .flatten()
                    .collect();
                state.held_count = 0;
                if !self
                    .route(queues, &mut state, dead_letters, &shutdown)
                    .await
                {
                    return self.finish(&consumer, &state);
                }
            }
            self.store_offsets(&consumer, &mut state);
            self.apply_backpressure(&consumer, &mut state);
            metrics::gauge!("tenancy_events_held", "processor" => NAME)
                .set(state.held_count as f64);
        }
        self.finish(&consumer, &state)
    }

    fn finish(
        &self,
        consumer: &StreamConsumer<GroupContext>,
        state: &LoopState<'_>,
    ) -> anyhow::Result<()> {
        tracing::info!(
            processor = NAME,
            held = state.held_count,
            "stopping: committing stored offsets"
        );
        if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
            tracing::debug!(processor = NAME, error = %e, "final commit");
        }
        Ok(())
    }

    /// Up to `batch_max` messages: waits for the first (bounded, so held events get rechecked),
    /// then takes what arrives within `linger`.
    async fn next_batch<'c>(
        &self,
        consumer: &'c StreamConsumer<GroupContext>,
    ) -> Vec<BorrowedMessage<'c>> {
        let mut batch = Vec::new();
        let first_wait = self.settings.recheck_every;
        match tokio::time::timeout(first_wait, consumer.recv()).await {
            Ok(Ok(m)) => batch.push(m),
            Ok(Err(e)) => {
                tracing::warn!(processor = NAME, error = %e, "consumer error; continuing");
                return batch;
            }
            Err(_) => return batch,
        }
        let deadline = tokio::time::Instant::now() + self.settings.linger;
        while batch.len() < self.settings.batch_max {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m),
                Ok(Err(e)) => {
                    tracing::warn!(processor = NAME, error = %e, "consumer error; continuing");
                    break;
                }
                Err(_) => break,
            }
        }
        batch
    }

    /// The writer schema of a message: `Some(Err(reason))` to dead-letter, `None` on shutdown.
    /// Registry outages are retried, never dead-lettered.
    async fn writer_schema(
        &self,
        codec: &Codec,
        msg: &BorrowedMessage<'_>,
        shutdown: &CancellationToken,
    ) -> Option<Result<Arc<AvroSchema>, String>> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match codec.writer_schema(msg.payload()).await {
                Ok(schema) => return Some(Ok(schema)),
                Err(e) if e.is_transient() => {
                    tracing::warn!(processor = NAME, error = %e, "schema registry unavailable; retrying");
                    if !sleep_or_shutdown(&mut backoff, shutdown).await {
                        return None;
                    }
                }
                Err(e) => return Some(Err(e.to_string())),
            }
        }
    }

    async fn dead_letter(
        &self,
        dead_letters: &DeadLetters,
        msg: &BorrowedMessage<'_>,
        origin: &Origin,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        tracing::error!(processor = NAME, topic = %origin.topic, partition = origin.partition,
            offset = origin.offset, tenant = origin.key.as_deref().unwrap_or("-"), %reason,
            "poison event: sending to dead letters");
        metrics::counter!("tenancy_dead_letters_total", "processor" => NAME).increment(1);
        let mut backoff = Duration::from_millis(100);
        loop {
            match dead_letters.send(msg, origin, reason).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(processor = NAME, error = %e, "dead-letter produce failed; retrying");
                    if !sleep_or_shutdown(&mut backoff, shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Gates each event on its tenants' status and applies what is ready, per brand, in order.
    /// Returns false on shutdown.
    async fn route<'c>(
        &self,
        items: Vec<Pending<'c>>,
        state: &mut LoopState<'c>,
        dead_letters: &DeadLetters,
        shutdown: &CancellationToken,
    ) -> bool {
        if items.is_empty() {
            return true;
        }
        let mut ids: Vec<&str> = Vec::new();
        for p in &items {
            ids.push(&p.brand);
            if let Some(s) = p.item.supplier() {
                ids.push(s);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        let registry = loop {
            match self.tenants.lookup(&ids).await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(processor = NAME, error = %e, "cannot read the tenant registry; retrying");
                    let mut backoff = Duration::from_secs(1);
                    if !sleep_or_shutdown(&mut backoff, shutdown).await {
                        return false;
                    }
                }
            }
        };
        // Per brand, in arrival order (which is log order within a partition).
        let mut by_brand: BTreeMap<String, Vec<Pending<'c>>> = BTreeMap::new();
        for p in items {
            by_brand.entry(p.brand.clone()).or_default().push(p);
        }
        for (brand, list) in by_brand {
            let mut ready: Vec<(Pending<'c>, TenantRef, Option<TenantRef>)> = Vec::new();
            for p in list {
                if state.held.contains_key(&brand) {
                    state.held.get_mut(&brand).expect("present").push_back(p);
                    state.held_count += 1;
                    continue;
                }
                match gate(&p, &registry) {
                    Gate::Ready(b, s) => ready.push((p, b, s)),
                    Gate::Hold => {
                        tracing::debug!(processor = NAME, tenant = %brand, offset = p.origin.offset, "tenant not active yet: holding");
                        state.held.entry(brand.clone()).or_default().push_back(p);
                        state.held_count += 1;
                    }
                    Gate::Skip(tenant, status) => {
                        metrics::counter!("tenancy_events_skipped_terminated_total", "processor" => NAME).increment(1);
                        if state.skip_logged.insert(tenant.clone()) {
                            tracing::info!(processor = NAME, %tenant, status = status.as_str(),
                                "skipping events for a terminated tenant (logged once per tenant)");
                        }
                    }
                    Gate::DeadLetter(reason) => {
                        if !self
                            .dead_letter(dead_letters, &p.msg, &p.origin, &reason, shutdown)
                            .await
                        {
                            return false;
                        }
                    }
                }
            }
            if !self.apply_in_order(ready, dead_letters, shutdown).await {
                return false;
            }
        }
        true
    }

    /// Applies one brand's ready events: runs of catalog events together, access events one by
    /// one, retrying transient failures and dead-lettering permanent ones.
    async fn apply_in_order(
        &self,
        ready: Vec<(Pending<'_>, TenantRef, Option<TenantRef>)>,
        dead_letters: &DeadLetters,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut i = 0;
        while i < ready.len() {
            let mut j = i + 1;
            if matches!(ready[i].0.item, Item::Catalog(_)) {
                while j < ready.len() && matches!(ready[j].0.item, Item::Catalog(_)) {
                    j += 1;
                }
            }
            let segment: Vec<&Pending<'_>> = ready[i..j].iter().map(|(p, _, _)| p).collect();
            let (brand, supplier) = (&ready[i].1, ready[i].2.as_ref());
            match self
                .apply_with_retry(brand, supplier, &segment, shutdown)
                .await
            {
                Ok(()) => {}
                Err(None) => return false,
                Err(Some(reason)) if segment.len() > 1 => {
                    // Find the poison event: apply one at a time.
                    for p in &segment {
                        match self
                            .apply_with_retry(brand, supplier, &[*p], shutdown)
                            .await
                        {
                            Ok(()) => {}
                            Err(None) => return false,
                            Err(Some(reason)) => {
                                if !self
                                    .dead_letter(dead_letters, &p.msg, &p.origin, &reason, shutdown)
                                    .await
                                {
                                    return false;
                                }
                            }
                        }
                    }
                    tracing::debug!(processor = NAME, %reason, "batch split after a permanent failure");
                }
                Err(Some(reason)) => {
                    let p = segment[0];
                    if !self
                        .dead_letter(dead_letters, &p.msg, &p.origin, &reason, shutdown)
                        .await
                    {
                        return false;
                    }
                }
            }
            i = j;
        }
        true
    }

    /// `Err(None)`: shut down; `Err(Some(reason))`: permanent failure.
    async fn apply_with_retry(
        &self,
        brand: &TenantRef,
        supplier: Option<&TenantRef>,
        segment: &[&Pending<'_>],
        shutdown: &CancellationToken,
    ) -> Result<(), Option<String>> {
        let mut backoff = Duration::from_millis(100);
        let (mut brand, mut supplier) = (brand.clone(), supplier.cloned());
        loop {
            let result = match &segment[0].item {
                Item::Catalog(_) => self.apply_catalog(&brand, segment).await,
                Item::Grant { .. } | Item::Revoke { .. } => match &supplier {
                    Some(s) => self.apply_access(&brand, s, segment[0]).await,
                    None => Err(ApplyError::Permanent(
                        "access event without a supplier".into(),
                    )),
                },
            };
            match result {
                Ok(()) => {
                    metrics::counter!("tenancy_events_applied_total", "processor" => NAME)
                        .increment(segment.len() as u64);
                    return Ok(());
                }
                Err(ApplyError::Permanent(reason)) => return Err(Some(reason)),
                Err(ApplyError::Transient(e)) => {
                    tracing::warn!(processor = NAME, tenant = %brand.organisation_id, error = %format!("{e:#}"),
                        retry_in_ms = backoff.as_millis() as u64, "transient failure; retrying");
                    metrics::counter!("tenancy_retries_total", "processor" => NAME).increment(1);
                    if !sleep_or_shutdown(&mut backoff, shutdown).await {
                        return Err(None);
                    }
                    // The tenant may have been archived or restored meanwhile: gate again.
                    let first = segment[0];
                    let mut ids = vec![first.brand.as_str()];
                    ids.extend(first.item.supplier());
                    if let Ok(registry) = self.tenants.lookup(&ids).await {
                        match gate(first, &registry) {
                            Gate::Ready(b, s) => (brand, supplier) = (b, s),
                            Gate::Skip(tenant, status) => {
                                tracing::info!(processor = NAME, %tenant, status = status.as_str(),
                                    "tenant terminated while applying: skipped");
                                return Ok(());
                            }
                            Gate::Hold | Gate::DeadLetter(_) => {}
                        }
                    }
                }
            }
        }
    }

    async fn apply_catalog(
        &self,
        brand: &TenantRef,
        segment: &[&Pending<'_>],
    ) -> Result<(), ApplyError> {
        let brand_db = brand
            .database
            .clone()
            .ok_or_else(|| ApplyError::Permanent("brand has no valid database".into()))?;
        let lock = BrandLock::acquire(&self.pool, &self.ns, &brand.organisation_id).await?;
        let result = async {
            let mut partitions: BTreeMap<(&str, i32), Vec<&Pending<'_>>> = BTreeMap::new();
            for p in segment {
                partitions
                    .entry((p.origin.topic.as_str(), p.origin.partition))
                    .or_default()
                    .push(p);
            }
            for ((topic, partition), events) in partitions {
                let mut tx = self.pool.begin().await?;
                let before =
                    offsets::get(&mut tx, &brand_db, &self.spec.projection, topic, partition).await?;
                let fresh: Vec<&Pending<'_>> = events
                    .into_iter()
                    .filter(|p| before.is_none_or(|b| p.origin.offset > b))
                    .collect();
                let values: Vec<&Value> = fresh
                    .iter()
                    .filter_map(|p| match &p.item {
                        Item::Catalog(v) => Some(v),
                        _ => None,
                    })
                    .collect();
                let change = NetChange::of(&self.spec, &values);
                let after = match fresh.last() {
                    Some(last) => {
                        store::write_brand(&mut tx, &brand_db, &self.spec, &change).await?;
                        offsets::set(&mut tx, &brand_db, &self.spec.projection, topic, partition, last.origin.offset)
                            .await?;
                        Some(last.origin.offset)
                    }
                    None => before,
                };
                tx.commit().await?;
                if !fresh.is_empty() {
                    tracing::debug!(processor = NAME, tenant = %brand.organisation_id, database = %brand_db,
                        events = fresh.len(), upserts = change.upserts.len(), removals = change.removals.len(),
                        "catalog applied");
                }
                self.fan_out(brand, &brand_db, topic, partition, before, after, &change, &fresh)
                    .await?;
            }
            Ok(())
        }
        .await;
        lock.release().await;
        result
    }

    /// Copies a brand's change into every supplier copy that may hold it. A copy that is not
    /// exactly one step behind (it missed changes, or never had a backfill) is rebuilt whole
    /// from the brand's projection instead, so copies heal themselves.
    #[allow(clippy::too_many_arguments)]
    async fn fan_out(
        &self,
        brand: &TenantRef,
        brand_db: &DatabaseName,
        topic: &str,
        partition: i32,
        before: Option<i64>,
        after: Option<i64>,
        change: &NetChange,
        fresh: &[&Pending<'_>],
    ) -> Result<(), ApplyError> {
        let Some(after) = after else { return Ok(()) };
        let suppliers: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT supplier_id FROM {}.brand_access WHERE brand_id = ? ORDER BY supplier_id",
            self.platform().quoted()
        ))
        .bind(&brand.organisation_id)
        .fetch_all(&self.pool)
        .await?;
        if suppliers.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = suppliers.iter().map(String::as_str).collect();
        let registry = self.tenants.lookup(&ids).await?;
        let copy_projection = copy_projection(&brand.organisation_id);
        for supplier in &suppliers {
            let Some(target) = registry.get(supplier) else {
                continue;
            };
            // An archived supplier's copy gets only what happened before its termination (a
            // replay can deliver those late); its copy is never rebuilt from a later brand state.
            let (supplier_db, archived_change) = match target.status {
                Status::Active => match &target.database {
                    Some(db) => (db.clone(), None),
                    None => continue,
                },
                Status::Archived => {
                    let (Some(cutoff), Some(archive)) =
                        (target.archived_at, target.archive_database.clone())
                    else {
                        continue;
                    };
                    let values: Vec<&Value> = fresh
                        .iter()
                        .filter(|p| p.occurred_at < cutoff)
                        .filter_map(|p| match &p.item {
                            Item::Catalog(v) => Some(v),
                            _ => None,
                        })
                        .collect();
                    if values.is_empty() {
                        continue;
                    }
                    (archive, Some(NetChange::of(&self.spec, &values)))
                }
                _ => continue,
            };
            let supplier_db = &supplier_db;
            let mut tx = self.pool.begin().await?;
            let Some(permissions) =
                read_permissions(&mut tx, supplier_db, &brand.organisation_id).await?
            else {
                continue;
            };
            if !permissions.contains(&self.spec.requires_permission) {
                continue;
            }
            let copied =
                offsets::get(&mut tx, supplier_db, &copy_projection, topic, partition).await?;
            if copied == Some(after) {
                continue;
            }
            let hidden = self.spec.hidden_columns(&permissions);
            // Incremental when the copy is exactly one step behind (or archived: its share of
            // the step); otherwise rebuilt.
            let incremental = archived_change
                .as_ref()
                .or((copied == before).then_some(change));
            if let Some(change) = incremental {
                store::write_copy(
                    &mut tx,
                    supplier_db,
                    &self.spec,
                    &brand.organisation_id,
                    change,
                    &hidden,
                )
                .await?;
            } else {
                let rows = store::rebuild_copy(
                    &mut tx,
                    supplier_db,
                    brand_db,
                    &self.spec,
                    &brand.organisation_id,
                    &hidden,
                )
                .await?;
                tracing::info!(processor = NAME, tenant = %supplier, brand = %brand.organisation_id, rows,
                    "supplier copy was behind: rebuilt from the brand projection");
            }
            offsets::set(
                &mut tx,
                supplier_db,
                &copy_projection,
                topic,
                partition,
                after,
            )
            .await?;
            tx.commit().await?;
        }
        Ok(())
    }

    /// Stores, per partition, the offset the auto-commit may commit: past everything seen,
    /// but never past a held event.
    fn store_offsets(&self, consumer: &StreamConsumer<GroupContext>, state: &mut LoopState<'_>) {
        let mut lowest_held: HashMap<(String, i32), i64> = HashMap::new();
        for p in state.held.values().flatten() {
            let key = (p.origin.topic.clone(), p.origin.partition);
            let entry = lowest_held.entry(key).or_insert(i64::MAX);
            *entry = (*entry).min(p.origin.offset);
        }
        let mut tpl = TopicPartitionList::new();
        for (key, seen) in &state.seen {
            let next = lowest_held.get(key).copied().unwrap_or(*seen).min(*seen);
            if state.stored.get(key).is_some_and(|s| *s >= next) {
                continue;
            }
            if tpl
                .add_partition_offset(&key.0, key.1, Offset::Offset(next))
                .is_ok()
            {
                state.stored.insert(key.clone(), next);
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.store_offsets(&tpl) {
                // A partition revoked meanwhile: its new owner resumes from the last commit.
                tracing::debug!(processor = NAME, error = %e, "could not store some offsets");
            }
        }
    }

    /// Pauses partitions holding events once too many are held; resumes below half.
    fn apply_backpressure(
        &self,
        consumer: &StreamConsumer<GroupContext>,
        state: &mut LoopState<'_>,
    ) {
        let holding: HashSet<(String, i32)> = state
            .held
            .values()
            .flatten()
            .map(|p| (p.origin.topic.clone(), p.origin.partition))
            .collect();
        if state.held_count > self.settings.max_held {
            let mut tpl = TopicPartitionList::new();
            for key in holding.difference(&state.paused) {
                tpl.add_partition(&key.0, key.1);
            }
            if tpl.count() > 0 && consumer.pause(&tpl).is_ok() {
                tracing::warn!(
                    processor = NAME,
                    held = state.held_count,
                    max = self.settings.max_held,
                    "too many events waiting for tenants: pausing their partitions"
                );
                state.paused.extend(holding);
            }
        } else if !state.paused.is_empty() && state.held_count <= self.settings.max_held / 2 {
            let mut tpl = TopicPartitionList::new();
            for key in &state.paused {
                tpl.add_partition(&key.0, key.1);
            }
            if consumer.resume(&tpl).is_ok() {
                tracing::info!(
                    processor = NAME,
                    held = state.held_count,
                    "resuming paused partitions"
                );
                state.paused.clear();
            }
        }
    }
}

pub(super) fn copy_projection(brand_id: &str) -> String {
    format!("copy:{brand_id}")
}

/// Whether `origin` is past what `projection` has applied in `db` (locks the offset row).
pub(super) async fn is_new(
    tx: &mut sqlx::Transaction<'_, MySql>,
    db: &DatabaseName,
    projection: &str,
    origin: &Origin,
) -> Result<bool, sqlx::Error> {
    let applied = offsets::get(tx, db, projection, &origin.topic, origin.partition).await?;
    Ok(applied.is_none_or(|a| origin.offset > a))
}

async fn read_permissions(
    tx: &mut sqlx::Transaction<'_, MySql>,
    supplier_db: &DatabaseName,
    brand_id: &str,
) -> Result<Option<Vec<String>>, sqlx::Error> {
    let json: Option<String> = sqlx::query_scalar(&format!(
        "SELECT CAST(permissions AS CHAR) FROM {}.brand_access WHERE brand_id = ?",
        supplier_db.quoted()
    ))
    .bind(brand_id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
}

/// Reads what the projection needs from a decoded event.
fn classify(event: Event) -> Result<(String, i64, Item), String> {
    let Event::Other { kind, value } = event else {
        return Err(format!(
            "{} does not belong on the catalog topics",
            event.kind().name()
        ));
    };
    let text = |name: &str| match field(&value, name).map(Cell::from_avro) {
        Some(Cell::Text(s)) => Ok(s),
        _ => Err(format!("{} has no text field {name}", kind.name())),
    };
    // Ids key the registry and Redis: a foreign producer's malformed id is refused here rather
    // than held forever waiting for a tenant that cannot exist.
    let id = |name: &str| {
        let raw = text(name)?;
        uuid::Uuid::parse_str(&raw)
            .map(|u| u.hyphenated().to_string())
            .map_err(|e| format!("{} field {name}: {raw:?} is not a uuid: {e}", kind.name()))
    };
    let brand = id("brand_id")?;
    let occurred_at = match field(&value, "occurred_at").map(Cell::from_avro) {
        Some(Cell::Int(t)) => t,
        _ => 0,
    };
    let item = match kind {
        EventKind::BrandCatalogUpdated => Item::Catalog(value),
        EventKind::SupplierBrandAccessGranted => {
            let permissions = match field(&value, "permissions") {
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(|v| match v {
                        Value::String(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            Item::Grant {
                supplier: id("supplier_id")?,
                permissions,
                occurred_at,
            }
        }
        EventKind::SupplierBrandAccessRevoked => Item::Revoke {
            supplier: id("supplier_id")?,
        },
        other => {
            return Err(format!(
                "{} does not belong on the catalog topics",
                other.name()
            ))
        }
    };
    Ok((brand, occurred_at, item))
}

#[allow(clippy::result_large_err)] // the Err is the Gate itself, see above
fn gate(p: &Pending<'_>, registry: &HashMap<String, TenantRef>) -> Gate {
    let check = |id: &str| -> Result<TenantRef, Gate> {
        match registry.get(id) {
            None => Err(Gate::Hold),
            Some(t) if t.was_archived_at(p.occurred_at) => {
                Err(Gate::Skip(id.to_owned(), Status::Archived))
            }
            Some(t) => match t.status {
                Status::Active => Ok(t.clone()),
                Status::Provisioning => Err(Gate::Hold),
                // Before the termination it still belongs in the (archived) data: a replay, or
                // a late delivery, must end as the live run did.
                Status::Archived if t.archived_at.is_some_and(|a| p.occurred_at < a) => {
                    t.at_archive().ok_or_else(|| {
                        Gate::DeadLetter(format!("tenant {id} has no archive database"))
                    })
                }
                Status::Archived | Status::Purged => Err(Gate::Skip(id.to_owned(), t.status)),
                Status::Failed => Err(Gate::DeadLetter(format!(
                    "tenant {id} failed provisioning; replay once it is fixed"
                ))),
            },
        }
    };
    let brand = match check(&p.brand) {
        Ok(b) => b,
        Err(g) => return g,
    };
    let supplier = match p.item.supplier().map(check) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(g)) => return g,
    };
    Gate::Ready(brand, supplier)
}

async fn sleep_or_shutdown(backoff: &mut Duration, shutdown: &CancellationToken) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(10));
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

/// A MySQL named lock per brand, held on its own pooled connection.
pub(super) struct BrandLock {
    conn: PoolConnection<MySql>,
    name: String,
}

impl BrandLock {
    pub(super) async fn acquire(
        pool: &MySqlPool,
        ns: &Namespace,
        brand_id: &str,
    ) -> Result<BrandLock, ApplyError> {
        // Lock names are limited to 64 characters: namespace (≤24) + uuid without dashes (32).
        let name = format!("{ns}:b:{}", brand_id.replace('-', ""));
        let mut conn = pool.acquire().await?;
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 60)")
            .bind(&name)
            .fetch_one(&mut *conn)
            .await?;
        if got == Some(1) {
            Ok(BrandLock { conn, name })
        } else {
            Err(ApplyError::Transient(anyhow::anyhow!(
                "timed out waiting for the lock of brand {brand_id}"
            )))
        }
    }

    /// Must be called on every path: a pooled connection keeps its named locks.
    pub(super) async fn release(mut self) {
        let released = sqlx::query("SELECT RELEASE_LOCK(?)")
            .bind(&self.name)
            .execute(&mut *self.conn)
            .await;
        if released.is_err() {
            // Closing the session releases the lock for certain.
            let _ = self.conn.close().await;
        }
    }
}
