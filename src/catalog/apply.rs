//! BrandCatalogUpdated into the brand's database, then into every supplier copy that may hold
//! it (the fan-out).
//!
//! One transaction per brand database per partition, multi-row statements, the applied offset in
//! the same transaction: events at or below it are skipped, which makes redelivery — and a
//! partition briefly owned by two workers — change nothing. Under the brand's named lock, so a
//! grant's backfill and a fan-out never interleave, whichever workers run them; the brand's
//! state is checked again once the lock is held, so a purge or restore that happened since the
//! event was gated is never written past.

use std::collections::{BTreeMap, HashMap};

use apache_avro::types::Value;

use super::change::NetChange;
use super::gate::Target;
use super::item::{Change, Item};
use super::store::{self, copy_projection};
use super::CatalogProcessor;
use crate::store::applied;
use crate::store::locks::NamedLock;
use crate::store::offsets;
use crate::store::servers::Server;
use crate::store::tenants::{Status, TenantRef};
use crate::stream::{Msg, StepError};
use crate::tenant::DatabaseName;

impl CatalogProcessor {
    /// Fails with a retry when `expected` no longer describes the tenant (archived, restored or
    /// purged since it was gated): the loop gates the event again.
    pub(super) async fn still(&self, expected: &TenantRef) -> Result<(), StepError> {
        let now = self.tenants.lookup(&[&expected.organisation_id]).await?;
        match now.get(&expected.organisation_id) {
            // (A move, `tenancy rebuild --to-server`, changes the server under the same lock.)
            Some(t)
                if t.status == expected.status && !t.changing && t.server == expected.server =>
            {
                Ok(())
            }
            _ => Err(StepError::retry(anyhow::anyhow!(
                "tenant {} changed since the event was gated",
                expected.organisation_id
            ))),
        }
    }

    /// Applies a run of catalog events of one brand (all or nothing).
    pub(super) async fn apply_catalog(
        &self,
        run: &[(&Msg<Item>, &Target)],
    ) -> Result<(), StepError> {
        let brand = &run[0].1.brand;
        let brand_db = brand
            .database
            .clone()
            .ok_or_else(|| StepError::reject("brand has no valid database"))?;
        let lock = NamedLock::brand(self.home(), &self.ns, &brand.organisation_id).await?;
        let result = async {
            self.still(brand).await?;
            let mut partitions: BTreeMap<(&str, i32), Vec<&Msg<Item>>> = BTreeMap::new();
            for (m, _) in run {
                partitions
                    .entry((m.origin.topic.as_str(), m.origin.partition))
                    .or_default()
                    .push(m);
            }
            for ((topic, partition), events) in partitions {
                self.apply_partition(brand, &brand_db, topic, partition, &events)
                    .await?;
            }
            Ok(())
        }
        .await;
        lock.release().await;
        self.catalog_changed(&brand.organisation_id).await;
        result
    }

    /// Tells `tenancy serve` that the brand's catalog may have changed, after every attempt at
    /// a run (whatever it committed, a redelivery included: that covers a worker killed between
    /// its commit and this call). Not a reason to fail the run: a page cached before the change
    /// is served for at most `tenancy serve --page-cache-ttl` then.
    async fn catalog_changed(&self, brand_id: &str) {
        if let Err(e) = self.redis.catalog_changed(brand_id).await {
            metrics::counter!("tenancy_catalog_version_failures_total").increment(1);
            tracing::warn!(processor = "catalog", brand = %brand_id, error = %e,
                "cannot move the brand's catalog version on: `tenancy serve` may answer from \
                 an older page until its --page-cache-ttl");
        }
    }

    async fn apply_partition(
        &self,
        brand: &TenantRef,
        brand_db: &DatabaseName,
        topic: &str,
        partition: i32,
        events: &[&Msg<Item>],
    ) -> Result<(), StepError> {
        let mut tx = brand.server.pool().begin().await?;
        let at = BrandRun {
            spec: &self.spec,
            dedupe: self.dedupe,
            brand_id: &brand.organisation_id,
            brand_db,
            topic,
            partition,
        };
        let (before, written) = write_brand_run(&mut tx, &at, events).await?;
        tx.commit().await?;
        let Some((last, change)) = written else {
            // Everything here was applied already (a redelivery, or another worker was first):
            // the fan-out below may still be behind and catches up from the brand.
            return self
                .fan_out(
                    brand,
                    brand_db,
                    topic,
                    partition,
                    before,
                    before,
                    &NetChange::default(),
                )
                .await;
        };
        self.fan_out(
            brand,
            brand_db,
            topic,
            partition,
            before,
            Some(last),
            &change,
        )
        .await
    }

    /// Copies a brand's change into every supplier copy that may hold it. A copy that is not
    /// exactly one step behind (it missed changes, or never had a backfill) is rebuilt whole
    /// from the brand's projection instead, so copies heal themselves.
    ///
    /// Copies exist only between two live tenants: an archived brand's catalog is in no copy,
    /// an archived supplier keeps no copy (termination removes them, restore rebuilds them from
    /// the brand; see `copies`). That keeps copies independent of the order in which a live run
    /// or a replay happened to apply catalog and lifecycle events.
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
    ) -> Result<(), StepError> {
        let Some(after) = after else { return Ok(()) };
        if brand.status != Status::Active {
            return Ok(());
        }
        let suppliers: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT supplier_id FROM {}.brand_access WHERE brand_id = ? ORDER BY supplier_id",
            self.platform().quoted()
        ))
        .bind(&brand.organisation_id)
        .fetch_all(self.home())
        .await?;
        if suppliers.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = suppliers.iter().map(String::as_str).collect();
        let known = self.tenants.lookup(&ids).await?;
        // Active, even while its restore finishes: its tables are back by then.
        let targets: Vec<(&str, &Server, DatabaseName)> = suppliers
            .iter()
            .filter_map(|s| {
                let t = known.get(s).filter(|t| t.status == Status::Active)?;
                Some((s.as_str(), &t.server, t.database.clone()?))
            })
            .collect();
        // One round per server the suppliers are on: each supplier's copy offset is in its own
        // database, so a round that committed is not redone by a retry after a later one failed.
        for server in self.tenants.servers().all() {
            let here: Vec<(&str, &DatabaseName)> = targets
                .iter()
                .filter(|(_, s, _)| *s == server)
                .map(|(id, _, db)| (*id, db))
                .collect();
            if !here.is_empty() {
                self.fan_out_on(
                    server, &here, brand, brand_db, topic, partition, before, after, change,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// [`CatalogProcessor::fan_out`] to the suppliers on one server.
    #[allow(clippy::too_many_arguments)]
    async fn fan_out_on(
        &self,
        into: &Server,
        targets: &[(&str, &DatabaseName)],
        brand: &TenantRef,
        brand_db: &DatabaseName,
        topic: &str,
        partition: i32,
        before: Option<i64>,
        after: i64,
        change: &NetChange,
    ) -> Result<(), StepError> {
        // A step from `before` to `after` carries `change`; no step (a redelivery) carries none.
        let stepped = after != before.unwrap_or(-1);
        let copy_projection = copy_projection(&brand.organisation_id);
        // What each copy may hold and where it stands, one query each for every supplier. Read
        // outside the write transaction: every writer of this brand's copies (fan-outs, grants,
        // revokes, archive and restore) holds the brand's lock, which we hold.
        let dbs: Vec<&DatabaseName> = targets.iter().map(|(_, db)| *db).collect();
        let permissions = store::permissions_of(into.pool(), &dbs, &brand.organisation_id).await?;
        let copied =
            store::offsets_of(into.pool(), &dbs, &copy_projection, topic, partition).await?;
        // One transaction for every copy of this step: one commit instead of one per supplier.
        let mut tx = into.pool().begin().await?;
        for (i, (supplier, supplier_db)) in targets.iter().enumerate() {
            let Some(permissions) = &permissions[i] else {
                continue;
            };
            if !permissions.contains(&self.spec.requires_permission) {
                continue;
            }
            let copied = copied[i];
            if copied.is_some_and(|c| c >= after) {
                continue;
            }
            let hidden = self.spec.hidden_columns(permissions);
            // Incremental when the copy is exactly one step behind; otherwise rebuilt.
            if stepped && copied == before {
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
                // The brand's rows are those of `after`: its writers hold the lock we hold.
                let source = store::BrandSource {
                    db: brand_db,
                    server: &brand.server,
                };
                let rows = store::rebuild_copy(
                    &mut tx,
                    into,
                    supplier_db,
                    source,
                    &self.spec,
                    &brand.organisation_id,
                    &hidden,
                )
                .await?;
                tracing::info!(processor = "catalog", tenant = %supplier, brand = %brand.organisation_id, rows,
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
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The supplier's permissions on `brand_id`, from its own `brand_access` row.
pub(super) async fn read_permissions(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
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

/// The BrandCatalogUpdated values among `events`, in order.
pub(crate) fn catalog_values<'m>(events: &[&'m Msg<Item>]) -> Vec<&'m Value> {
    events
        .iter()
        .filter_map(|m| match &m.item.change {
            Change::Catalog(v) => Some(v),
            _ => None,
        })
        .collect()
}

/// Drops from `fresh` the events whose ids `seen` says were applied before (each counted and
/// logged with where it was first applied).
pub(crate) async fn drop_seen<M: std::borrow::Borrow<Msg<Item>>>(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    spec: &super::spec::CatalogSpec,
    brand_db: &DatabaseName,
    fresh: &mut Vec<M>,
    seen: &std::collections::HashSet<String>,
) -> Result<(), sqlx::Error> {
    if seen.is_empty() {
        return Ok(());
    }
    for m in fresh.iter().map(|m| m.borrow()) {
        if seen.contains(&m.item.event_id) {
            let first =
                applied::first_applied(tx, brand_db, &spec.projection, &m.item.event_id).await?;
            applied::duplicate("catalog", &m.item.event_id, &m.origin, first.as_ref());
        }
    }
    fresh.retain(|m| !seen.contains(&m.borrow().item.event_id));
    Ok(())
}

/// Keeps only the first delivery of each event id in `fresh`: folded in twice, a redelivery of
/// an older change would win over the changes between.
pub(crate) fn first_deliveries<M: std::borrow::Borrow<Msg<Item>>>(fresh: &mut Vec<M>) {
    let mut first: HashMap<&str, &crate::stream::Origin> = HashMap::new();
    let keep: Vec<bool> = fresh
        .iter()
        .map(|m| {
            let m = m.borrow();
            match first.get(m.item.event_id.as_str()) {
                Some(at) => {
                    let at = (at.topic.clone(), at.partition, at.offset);
                    applied::duplicate("catalog", &m.item.event_id, &m.origin, Some(&at));
                    false
                }
                None => {
                    first.insert(&m.item.event_id, &m.origin);
                    true
                }
            }
        })
        .collect();
    let mut keep = keep.into_iter();
    fresh.retain(|_| keep.next().unwrap_or(true));
}

/// `change` without the codes whose stored revision is newer (counted and logged).
pub(crate) fn without_stale(
    spec: &super::spec::CatalogSpec,
    brand_id: &str,
    change: NetChange,
    stored: &HashMap<String, i64>,
) -> NetChange {
    let (change, stale) = change.without_stale(spec, stored);
    if stale > 0 {
        metrics::counter!("tenancy_catalog_stale_changes_total").increment(stale as u64);
        tracing::info!(processor = "catalog", tenant = %brand_id, stale,
            "fabric changes older than the stored revision: not applied");
    }
    change
}

/// A run of one partition's catalog events, checked against what the brand database holds:
/// what [`write_folded`] writes.
pub(crate) struct Folded {
    /// What to write: the change, and the removal markers it was judged against.
    pub change: NetChange,
    pub removed: store::Removed,
    /// The run's last offset (past duplicates too: they were handled).
    pub last: i64,
}

/// Where a run of one partition's catalog events is written: the brand's database (with the
/// event ids recorded when `dedupe`), and the partition the events were read from.
pub(crate) struct BrandRun<'a> {
    pub spec: &'a super::spec::CatalogSpec,
    pub dedupe: bool,
    pub brand_id: &'a str,
    pub brand_db: &'a DatabaseName,
    pub topic: &'a str,
    pub partition: i32,
}

/// Writes a folded run in `tx`: the rows, the event ids of `fresh` (with `dedupe`), the
/// partition's offset.
pub(crate) async fn write_folded(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    at: &BrandRun<'_>,
    fresh: &[&Msg<Item>],
    folded: &Folded,
) -> Result<(), sqlx::Error> {
    write_folded_rows(tx, at, folded).await?;
    write_folded_bookkeeping(tx, at, fresh, folded).await
}

/// The rows half of [`write_folded`]: the catalog's upserts and removals.
pub(crate) async fn write_folded_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    at: &BrandRun<'_>,
    folded: &Folded,
) -> Result<(), sqlx::Error> {
    store::write_brand(tx, at.brand_db, at.spec, &folded.change, &folded.removed).await
}

/// The bookkeeping half of [`write_folded`]: the event ids and the partition's offset.
pub(crate) async fn write_folded_bookkeeping(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    at: &BrandRun<'_>,
    fresh: &[&Msg<Item>],
    folded: &Folded,
) -> Result<(), sqlx::Error> {
    let (db, projection, change) = (at.brand_db, &at.spec.projection, &folded.change);
    if at.dedupe {
        let ids: Vec<(&str, &crate::stream::Origin)> = fresh
            .iter()
            .map(|m| (m.item.event_id.as_str(), &m.origin))
            .collect();
        applied::record(tx, db, projection, &ids).await?;
    }
    offsets::set(tx, db, projection, at.topic, at.partition, folded.last).await?;
    tracing::debug!(processor = "catalog", tenant = %at.brand_id, database = %db,
        events = fresh.len(), upserts = change.upserts.len(), removals = change.removals.len(),
        "catalog applied");
    Ok(())
}

/// The brand's side of a run of one partition's catalog events, in `tx`: what the database's
/// offset or event ids say was applied is skipped, changes older than the stored revisions are
/// dropped, the rest is written with the event ids and the partition's offset. Used by the live
/// processor; `tenancy rebuild` runs the same steps (`rebuild::replay`) with its lookups
/// answered from memory, so both fold events the same way. Returns the offset stored before,
/// and the last offset and the change written (`None` when everything here was applied
/// before).
pub(crate) async fn write_brand_run(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    at: &BrandRun<'_>,
    events: &[&Msg<Item>],
) -> Result<(Option<i64>, Option<(i64, NetChange)>), sqlx::Error> {
    let BrandRun {
        spec,
        dedupe,
        brand_id,
        brand_db,
        topic,
        partition,
    } = *at;
    let before = offsets::get(tx, brand_db, &spec.projection, topic, partition).await?;
    let mut fresh: Vec<&Msg<Item>> = events
        .iter()
        .copied()
        .filter(|m| before.is_none_or(|b| m.origin.offset > b))
        .collect();
    let Some(last) = fresh.last().map(|m| m.origin.offset) else {
        return Ok((before, None));
    };
    if dedupe {
        // Past the offset, but perhaps not new: the same event at another offset.
        let ids: Vec<&str> = fresh.iter().map(|m| m.item.event_id.as_str()).collect();
        let seen = applied::seen(tx, brand_db, &spec.projection, &ids).await?;
        drop_seen(tx, spec, brand_db, &mut fresh, &seen).await?;
        first_deliveries(&mut fresh);
    }
    let change = NetChange::of(spec, &catalog_values(&fresh));
    let (stored, removed) =
        store::stored_revisions(tx, brand_db, spec, &change.codes(spec)).await?;
    let folded = Folded {
        change: without_stale(spec, brand_id, change, &stored),
        removed,
        last,
    };
    write_folded(tx, at, &fresh, &folded).await?;
    Ok((before, Some((last, folded.change))))
}
