//! Rebuilding a supplier's database: its grants and revokes replayed from `{ns}.brand-access`
//! with the live projector's own writes, then its copies backfilled from the brands' live
//! projections as a grant does (a copy is by design the brand's current projection under the
//! supplier's permissions), compared with the live database and swapped in.
//!
//! # Holding the supplier's writes
//!
//! Every writer of a supplier database holds a brand's lock (the fan-out, grants, revokes, a
//! brand's archive, restore and purge) or the supplier's lifecycle lock; the access projector
//! also takes the supplier's writes lock after the brand's. The swap holds the lifecycle lock,
//! the locks of every brand the live database names (sorted, on one connection), then the
//! writes lock: a grant of a brand it did not name yet waits on the last. If the live database
//! names a brand outside the set once they are held, they are released and taken again.
//!
//! Whether anything was written meanwhile is read from the live `projection_offsets`: every
//! writer moves a row of it in the same transaction as its rows.

use std::collections::{BTreeSet, HashMap};

use rdkafka::message::Message;
use sqlx::MySqlPool;

use super::compare;
use super::Rebuilder;
use crate::catalog::access::{mark_access_applied, superseded, write_access_row};
use crate::catalog::copies::fill_copy;
use crate::catalog::item::{self, Item};
use crate::catalog::store::access_projection;
use crate::catalog::store::BrandSource;
use crate::log::topics::Topic;
use crate::store::locks::NamedLock;
use crate::store::servers::Server;
use crate::store::tenants::{Status, TenantRef};
use crate::stream::{Gate, Msg, Origin};
use crate::tenancy::clock::EventTime;
use crate::tenant::DatabaseName;

use super::fenced::{access_bounds, fingerprint};
use super::replay::{decode_event, Range, Replayed};

/// Brands copied into a rebuilt supplier database at once. The copying is MariaDB's work; on
/// two cores two statements at once took 129–138 ms for 24,000 rows against 179–180 ms one
/// after another, four no better (mysql clients, 2026-12-01); in `tenancy rebuild` of a
/// supplier reading 20 brands of 1,000 fabrics, 107–121 ms against 123–133 ms.
const COPIES_AT_ONCE: usize = 2;

/// The brands a supplier database names: its grants, its copies and its bookkeeping.
async fn brands_named(
    pool: &MySqlPool,
    db: &DatabaseName,
) -> Result<BTreeSet<String>, sqlx::Error> {
    let mut brands: BTreeSet<String> = sqlx::query_scalar(&format!(
        "SELECT brand_id FROM {db}.brand_access UNION SELECT DISTINCT brand_id FROM {db}.brand_fabrics",
        db = db.quoted()
    ))
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    for (projection, ..) in fingerprint(pool, db).await? {
        if let Some(b) = projection
            .strip_prefix("access:")
            .or_else(|| projection.strip_prefix("copy:"))
        {
            brands.insert(b.to_owned());
        }
    }
    Ok(brands)
}

impl Rebuilder {
    pub(super) fn access_topic(&self) -> String {
        Topic::BrandAccess.name(&self.config.namespace)
    }

    /// Brings `target`'s grants up to `bounds`: every access event naming the supplier that
    /// the live database applied (at or below its brand's offset, and applied by the tenants'
    /// lifecycles as `tenancy::verdict` judges), in log order, with the live writes.
    pub(super) async fn replay_access(
        &self,
        t: &TenantRef,
        into: &Server,
        target: &DatabaseName,
        bounds: &HashMap<(String, i32), i64>,
    ) -> anyhow::Result<Replayed> {
        let topic = self.access_topic();
        let mut upto: HashMap<i32, i64> = HashMap::new();
        for ((_, p), o) in bounds {
            let e = upto.entry(*p).or_insert(*o);
            *e = (*e).max(*o);
        }
        let mut done = Replayed::default();
        if upto.is_empty() {
            return Ok(done);
        }
        let held = access_bounds(&fingerprint(into.pool(), target).await?, &topic);
        let mut brands: Vec<&str> = bounds.keys().map(|(b, _)| b.as_str()).collect();
        brands.push(&t.organisation_id);
        brands.sort_unstable();
        brands.dedup();
        let tenants = self.tenants.lookup(&brands).await?;
        // What the live projector dead-lettered it did not apply (a grant whose supplier came
        // too late, say); a replayed copy of it comes later in the log and is judged there.
        let dead = self.dead_lettered(&topic).await?;
        // From 0 (or a restored backup's offsets): a partition holds every brand's events,
        // each applied up to its own offset.
        let Some(mut range) = Range::new(&self.config, &topic, &self.options.access_from, upto)?
        else {
            return Ok(done);
        };
        let codec = self.codec.get().await;
        while let Some(m) = range.next().await? {
            let p = m.partition();
            done.read += 1;
            let item = decode_event(&codec, &topic, m.payload())
                .await?
                .and_then(item::parse);
            let Ok(item) = item else { continue };
            if item.supplier() != Some(t.organisation_id.as_str()) {
                continue;
            }
            let key = (item.brand.clone(), p);
            let live_bound = bounds.get(&key).copied();
            let applied_here = held.get(&key).is_some_and(|h| m.offset() <= *h);
            if live_bound.is_none_or(|b| m.offset() > b)
                || applied_here
                || dead.contains(&(p, m.offset()))
            {
                continue;
            }
            let msg = Msg::new(Origin::of(&m), item, m.detach());
            let at = EventTime::new(msg.item.occurred_at, msg.logged_at_ms()).effective();
            if !applied_live(&tenants, &msg.item, at) {
                done.skipped += 1;
                continue;
            }
            let mut tx = into.pool().begin().await?;
            let projection = access_projection(&msg.item.brand);
            let first = crate::store::applied::first_applied(
                &mut tx,
                target,
                &projection,
                &msg.item.event_id,
            )
            .await?;
            // Applied before at another offset: the live projector wrote nothing for it. One
            // older than the pair's latest change changes nothing either, but counts as done.
            if first.is_some() {
                done.skipped += 1;
            } else if superseded(&mut tx, target, &msg.item, at).await? {
                mark_access_applied(&mut tx, target, &msg.item.brand, &msg, true).await?;
                done.skipped += 1;
            } else {
                write_access_row(&mut tx, target, &msg.item, at).await?;
                mark_access_applied(&mut tx, target, &msg.item.brand, &msg, true).await?;
                done.applied += 1;
            }
            tx.commit().await?;
        }
        Ok(done)
    }

    /// `target`'s copies, all rebuilt: the brand's live projection for every grant holding
    /// the catalog permission of a brand that is active (copies exist only between two live
    /// tenants), with the brand offsets they reflect.
    ///
    /// `target` is never the live database (a shadow, or the replaced tables a rollback brings
    /// back), so no reader sees it half-filled: the copies are cleared, then each brand's is
    /// filled in a transaction of its own, [`COPIES_AT_ONCE`] at a time. Its own transaction
    /// also reads each brand's offsets right after its rows, so they always describe them.
    pub(super) async fn backfill_copies(
        &self,
        into: &Server,
        target: &DatabaseName,
    ) -> anyhow::Result<usize> {
        use futures::{StreamExt, TryStreamExt};
        let grants: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT brand_id, CAST(permissions AS CHAR) FROM {}.brand_access ORDER BY brand_id",
            target.quoted()
        ))
        .fetch_all(into.pool())
        .await?;
        let ids: Vec<&str> = grants.iter().map(|(b, _)| b.as_str()).collect();
        let brands = self.tenants.lookup(&ids).await?;
        let mut tx = into.pool().begin().await?;
        sqlx::query(&format!(
            "DELETE FROM {}.`{}`",
            target.quoted(),
            compare::identifier(&self.spec.supplier_table)?
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM {}.projection_offsets WHERE projection LIKE 'copy:%'",
            target.quoted()
        ))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let copied: Vec<(&str, Vec<String>, BrandSource)> = grants
            .iter()
            .filter_map(|(brand_id, json)| {
                let permissions: Vec<String> = serde_json::from_str(json).unwrap_or_default();
                let brand = brands.get(brand_id)?;
                let (Status::Active, Some(brand_db)) = (brand.status, &brand.database) else {
                    return None;
                };
                let source = BrandSource {
                    db: brand_db,
                    server: &brand.server,
                };
                permissions
                    .contains(&self.spec.requires_permission)
                    .then_some((brand_id.as_str(), permissions, source))
            })
            .collect();
        let copies = copied.len();
        futures::stream::iter(copied)
            .map(|(brand_id, permissions, brand)| async move {
                let mut tx = into.pool().begin().await?;
                fill_copy(
                    &mut tx,
                    into,
                    &self.spec,
                    target,
                    brand,
                    brand_id,
                    &permissions,
                )
                .await?;
                tx.commit().await?;
                anyhow::Ok(())
            })
            .buffer_unordered(COPIES_AT_ONCE)
            .try_collect::<()>()
            .await?;
        Ok(copies)
    }

    /// Holds every writer of `live` off (module docs); `None` if the live database named a
    /// brand outside the set once the locks were held (the caller tries again).
    pub(super) async fn hold_supplier_writes(
        &self,
        t: &TenantRef,
        live: &DatabaseName,
        on: &Server,
        shadow: &DatabaseName,
    ) -> anyhow::Result<Option<(NamedLock, NamedLock)>> {
        let ns = &self.config.namespace;
        let lifecycle = NamedLock::lifecycle(&self.home, ns, &t.organisation_id)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let db = t.server.pool();
        let mut brands = brands_named(db, live).await?;
        brands.extend(brands_named(on.pool(), shadow).await?);
        let mut names: Vec<String> = brands
            .iter()
            .map(|b| NamedLock::brand_name(ns, b))
            .collect();
        names.push(NamedLock::writes_name(ns, &t.organisation_id));
        let writes = match NamedLock::all(&self.home, names).await {
            Ok(l) => l,
            Err(e) => {
                lifecycle.release().await;
                anyhow::bail!("{e}");
            }
        };
        let now = super::resolve(&self.tenants, &t.organisation_id).await?;
        let checked = super::refuse_unless_rebuildable(&now, self.options.archived);
        let named = brands_named(db, live).await?;
        if checked.is_err() || !named.is_subset(&brands) {
            writes.release().await;
            lifecycle.release().await;
            checked?;
            return Ok(None);
        }
        Ok(Some((lifecycle, writes)))
    }
}

/// Whether the live projector applied an access event to the supplier's database: both
/// tenants ready by their lifecycles, as the catalog gate judges them (a refusal or a skip of
/// either side means no write).
fn applied_live(tenants: &HashMap<String, TenantRef>, item: &Item, at: i64) -> bool {
    let (brand, supplier) = crate::catalog::gate::verdicts(item, at, tenants);
    matches!((brand, supplier), (Gate::Ready(_), Some(Gate::Ready(_))))
}
