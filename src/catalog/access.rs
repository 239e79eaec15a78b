//! SupplierBrandAccessGranted/Revoked into the supplier's database (`brand_access`, its copy of
//! the brand), the platform's fan-out index and the Redis permission cache.
//!
//! Offsets are kept per (brand, supplier): events of one pair apply in log order, while a pair
//! whose supplier does not exist yet waits without holding up the others, so a position shared
//! by the brand's pairs would wrongly skip the one that waited.
//!
//! The permission cache is written from the supplier's `brand_access` row, read under the brand
//! lock after the commit, never from the event: a grant delivered again after a revoke (a stale
//! owner of a partition, a dead-letter replay) finds the revoke applied and leaves no access
//! behind in Redis.
//!
//! Per (brand, supplier) pair the latest change by occurrence wins, whatever offset it arrives
//! at: each grant or revoke applied is recorded in the supplier's `access_changes` (a revoke
//! stays there as its tombstone), and one placed before it (by [`crate::tenancy::clock`]; ties
//! broken by event id) changes nothing but its bookkeeping. A revoke for a pair whose either
//! side is archived is applied too, to the archive ([`crate::tenancy::verdict::revoke_verdict`]),
//! so the restore finds it revoked.

use super::apply::read_permissions;
use super::copies::backfill_copy;
use super::gate::Target;
use super::item::{Change, Item};
use super::store;
use super::store::BrandSource;
use super::store::{access_projection, copy_projection};
use super::CatalogProcessor;
use crate::cache::permissions::PermissionCache;
use crate::store::applied;
use crate::store::locks::NamedLock;
use crate::store::offsets;
use crate::store::servers::Server;
use crate::store::tenants::Status;
use crate::stream::{Msg, Origin, StepError};
use crate::tenancy::clock::{change_order, EventTime};
use crate::tenant::DatabaseName;

fn access_index_projection(brand_id: &str, supplier_id: &str) -> String {
    format!("access_index:{brand_id}:{supplier_id}")
}

/// Whether `origin` is past what `projection` has applied in `db` (locks the offset row).
async fn is_new(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    db: &DatabaseName,
    projection: &str,
    origin: &Origin,
) -> Result<bool, sqlx::Error> {
    let applied = offsets::get(tx, db, projection, &origin.topic, origin.partition).await?;
    Ok(applied.is_none_or(|a| origin.offset > a))
}

/// Whether a later change of the pair than `item` (placed at `at`) is already applied in
/// `supplier_db`: then `item` changes nothing. Shared with `tenancy rebuild`.
pub(crate) async fn superseded(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    supplier_db: &DatabaseName,
    item: &Item,
    at: i64,
) -> Result<bool, sqlx::Error> {
    let latest: Option<(i64, String, bool)> = sqlx::query_as(&format!(
        "SELECT changed_at, event_id, granted FROM {}.access_changes WHERE brand_id = ?",
        supplier_db.quoted()
    ))
    .bind(&item.brand)
    .fetch_optional(&mut **tx)
    .await?;
    let revoke = matches!(item.change, Change::Revoke { .. });
    Ok(latest.is_some_and(|(changed_at, event_id, granted)| {
        change_order(changed_at, !granted, &event_id) > change_order(at, revoke, &item.event_id)
    }))
}

/// A grant's or revoke's row in the supplier's `brand_access`, as the live projector writes it,
/// and the pair's latest change (`at`) in `access_changes` (the copy, the index and the cache
/// are separate steps). Shared with `tenancy rebuild`.
pub(crate) async fn write_access_row(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    supplier_db: &DatabaseName,
    item: &Item,
    at: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO {}.access_changes (brand_id, changed_at, event_id, granted) VALUES (?, ?, ?, ?) \
         ON DUPLICATE KEY UPDATE changed_at = VALUES(changed_at), event_id = VALUES(event_id), \
         granted = VALUES(granted)",
        supplier_db.quoted()
    ))
    .bind(&item.brand)
    .bind(at)
    .bind(&item.event_id)
    .bind(matches!(item.change, Change::Grant { .. }))
    .execute(&mut **tx)
    .await?;
    match &item.change {
        Change::Grant { permissions, .. } => {
            sqlx::query(&format!(
                "INSERT INTO {}.brand_access (brand_id, permissions, granted_at) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE permissions = VALUES(permissions), granted_at = VALUES(granted_at)",
                supplier_db.quoted()
            ))
            .bind(&item.brand)
            .bind(serde_json::to_string(permissions).expect("strings serialise"))
            .bind(chrono::DateTime::from_timestamp_millis(item.occurred_at).unwrap_or_default())
            .execute(&mut **tx)
            .await?;
        }
        Change::Revoke { .. } => {
            sqlx::query(&format!(
                "DELETE FROM {}.brand_access WHERE brand_id = ?",
                supplier_db.quoted()
            ))
            .bind(&item.brand)
            .execute(&mut **tx)
            .await?;
        }
        Change::Catalog(_) => {}
    }
    Ok(())
}

/// Records, in the supplier's transaction, that an access event is applied: its offset and
/// (with `dedupe`) its id. Shared with `tenancy rebuild`.
pub(crate) async fn mark_access_applied(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    supplier_db: &DatabaseName,
    brand_id: &str,
    m: &Msg<Item>,
    dedupe: bool,
) -> Result<(), sqlx::Error> {
    let projection = access_projection(brand_id);
    let o = &m.origin;
    offsets::set(
        tx,
        supplier_db,
        &projection,
        &o.topic,
        o.partition,
        o.offset,
    )
    .await?;
    if dedupe {
        applied::record(tx, supplier_db, &projection, &[(&m.item.event_id, o)]).await?;
    }
    Ok(())
}

impl CatalogProcessor {
    pub(super) async fn apply_access(
        &self,
        m: &Msg<Item>,
        target: &Target,
    ) -> Result<(), StepError> {
        let brand = &target.brand;
        let supplier = target
            .supplier
            .as_ref()
            .ok_or_else(|| StepError::reject("access event without a supplier"))?;
        let supplier_db = supplier.database.clone().ok_or_else(|| {
            StepError::reject(format!(
                "supplier {} has no valid database",
                supplier.organisation_id
            ))
        })?;
        let brand_db = brand
            .database
            .clone()
            .ok_or_else(|| StepError::reject("brand has no valid database"))?;
        // The brand's lock, then the supplier's writes lock, which fences this supplier's
        // database for a rebuild's swap (the swap holds the supplier's lock and those of the
        // brands it reads, see `rebuild::supplier`). Both on one connection: a write in flight
        // holds at most two of the pool's (this and its transaction), which is what the
        // worker's pools are sized for; a second lock connection per access change starved
        // the pool when every lane had a backlog (the two-server kill test, after a restart).
        let lock = NamedLock::all(
            self.home(),
            vec![
                NamedLock::brand_name(&self.ns, &brand.organisation_id),
                NamedLock::writes_name(&self.ns, &supplier.organisation_id),
            ],
        )
        .await?;
        let result = async {
            self.still(brand).await?;
            self.still(supplier).await?;
            let into = &supplier.server;
            if self.duplicate(into, &supplier_db, m).await? {
                // Applied before at another offset: no database, index or cache write at all.
                return Ok(());
            }
            let at = EventTime::new(m.item.occurred_at, m.logged_at_ms()).effective();
            let mut tx = into.pool().begin().await?;
            let older = superseded(&mut tx, &supplier_db, &m.item, at).await?;
            if older {
                // A later grant or revoke of the pair is applied: this one only counts as done.
                let brand_id = &m.item.brand;
                if is_new(
                    &mut tx,
                    &supplier_db,
                    &access_projection(brand_id),
                    &m.origin,
                )
                .await?
                {
                    self.mark_applied(&mut tx, &supplier_db, brand_id, m)
                        .await?;
                }
                tx.commit().await?;
                metrics::counter!("tenancy_access_changes_superseded_total").increment(1);
                tracing::info!(processor = "catalog", tenant = %supplier.organisation_id,
                    brand = %brand.organisation_id, event_id = %m.item.event_id,
                    "access change older than the pair's latest applied: changes nothing");
                return Ok(());
            }
            tx.commit().await?;
            match &m.item.change {
                Change::Grant { permissions, .. } => {
                    let brand = BrandSource {
                        db: &brand_db,
                        server: &brand.server,
                    };
                    self.grant(target, brand, into, &supplier_db, permissions, m, at)
                        .await?
                }
                Change::Revoke { .. } => self.revoke(target, into, &supplier_db, m, at).await?,
                Change::Catalog(_) => unreachable!("an access key holds access events only"),
            }
            // The cache follows the database, and holds access only between two live tenants
            // (termination deletes the keys, restore writes them again: see CatalogHooks).
            if supplier.status == Status::Active && brand.status == Status::Active {
                self.cache_from_database(
                    &supplier.organisation_id,
                    &brand.organisation_id,
                    into,
                    &supplier_db,
                )
                .await?;
            } else {
                self.cache
                    .invalidate(&supplier.organisation_id, &brand.organisation_id)
                    .await?;
            }
            Ok(())
        }
        .await;
        lock.release().await;
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn grant(
        &self,
        target: &Target,
        brand: BrandSource<'_>,
        into: &Server,
        supplier_db: &DatabaseName,
        permissions: &[String],
        m: &Msg<Item>,
        at: i64,
    ) -> Result<(), StepError> {
        let brand_id = &target.brand.organisation_id;
        let supplier_id = &target.supplier.as_ref().expect("checked").organisation_id;
        let origin = &m.origin;
        let json = serde_json::to_string(permissions).expect("strings serialise");
        // Index first: if we die after it, the supplier's own row (checked by the fan-out)
        // still says no access, and the redelivered grant completes the rest.
        self.index_access(origin, brand_id, supplier_id, Some(&json))
            .await?;

        let mut tx = into.pool().begin().await?;
        if is_new(&mut tx, supplier_db, &access_projection(brand_id), origin).await? {
            write_access_row(&mut tx, supplier_db, &m.item, at).await?;
            // Backfill: the supplier's copy becomes the brand's current projection, and records
            // the brand offsets it reflects so the fan-out continues from exactly there. Only
            // between two live tenants (see apply::fan_out); restore backfills the others.
            let live = target.brand.status == Status::Active
                && target
                    .supplier
                    .as_ref()
                    .is_some_and(|s| s.status == Status::Active);
            if live && permissions.contains(&self.spec.requires_permission) {
                let rows = backfill_copy(
                    &mut tx,
                    into,
                    &self.spec,
                    supplier_db,
                    brand,
                    brand_id,
                    permissions,
                )
                .await?;
                tracing::info!(processor = "catalog", tenant = %supplier_id, brand = %brand_id, rows,
                    permissions = %json, "access granted: supplier copy backfilled");
            } else {
                offsets::clear(&mut tx, supplier_db, &copy_projection(brand_id)).await?;
                store::drop_copy(&mut tx, supplier_db, &self.spec, brand_id).await?;
                tracing::info!(processor = "catalog", tenant = %supplier_id, brand = %brand_id,
                    permissions = %json, live, "access granted; no copy kept (no catalog.read, or a side archived)");
            }
            self.mark_applied(&mut tx, supplier_db, brand_id, m).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn revoke(
        &self,
        target: &Target,
        into: &Server,
        supplier_db: &DatabaseName,
        m: &Msg<Item>,
        at: i64,
    ) -> Result<(), StepError> {
        let origin = &m.origin;
        let brand_id = &target.brand.organisation_id;
        let supplier_id = &target.supplier.as_ref().expect("checked").organisation_id;
        // Supplier first: once its row is gone the fan-out skips it, whatever the index says.
        let mut tx = into.pool().begin().await?;
        if is_new(&mut tx, supplier_db, &access_projection(brand_id), origin).await? {
            write_access_row(&mut tx, supplier_db, &m.item, at).await?;
            let rows = store::drop_copy(&mut tx, supplier_db, &self.spec, brand_id).await?;
            offsets::clear(&mut tx, supplier_db, &copy_projection(brand_id)).await?;
            self.mark_applied(&mut tx, supplier_db, brand_id, m).await?;
            tracing::info!(processor = "catalog", tenant = %supplier_id, brand = %brand_id, rows,
                "access revoked: supplier copy removed");
        }
        tx.commit().await?;
        self.index_access(origin, brand_id, supplier_id, None)
            .await?;
        Ok(())
    }

    /// Records, in the supplier's transaction, that this access event is applied.
    async fn mark_applied(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
        supplier_db: &DatabaseName,
        brand_id: &str,
        m: &Msg<Item>,
    ) -> Result<(), sqlx::Error> {
        mark_access_applied(tx, supplier_db, brand_id, m, self.dedupe).await
    }

    /// Whether the supplier's database already applied this event at another offset (the same
    /// offset is a redelivery: it goes through, and changes nothing by the offsets).
    async fn duplicate(
        &self,
        into: &Server,
        supplier_db: &DatabaseName,
        m: &Msg<Item>,
    ) -> Result<bool, StepError> {
        if !self.dedupe {
            return Ok(false);
        }
        let mut tx = into.pool().begin().await?;
        let first = applied::first_applied(
            &mut tx,
            supplier_db,
            &access_projection(&m.item.brand),
            &m.item.event_id,
        )
        .await?;
        tx.commit().await?;
        match first {
            Some((topic, partition, offset))
                if (topic.as_str(), partition, offset)
                    != (m.origin.topic.as_str(), m.origin.partition, m.origin.offset) =>
            {
                applied::duplicate(
                    "catalog",
                    &m.item.event_id,
                    &m.origin,
                    Some(&(topic, partition, offset)),
                );
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Sets the Redis permission key to what the supplier's `brand_access` row now says (or
    /// deletes it when there is none). Called under the brand lock, after the commit, and again
    /// on every redelivery, so the key converges on the database whatever was cached before.
    async fn cache_from_database(
        &self,
        supplier_id: &str,
        brand_id: &str,
        supplier: &Server,
        supplier_db: &DatabaseName,
    ) -> Result<(), StepError> {
        let mut tx = supplier.pool().begin().await?;
        let permissions = read_permissions(&mut tx, supplier_db, brand_id).await?;
        tx.commit().await?;
        let cache: &PermissionCache = &self.cache;
        match permissions {
            Some(p) => cache.store(supplier_id, brand_id, &p).await?,
            None => cache.invalidate(supplier_id, brand_id).await?,
        }
        Ok(())
    }

    /// The platform's fan-out index: `permissions` set (grant) or the row removed (revoke),
    /// with its offset in the same transaction.
    async fn index_access(
        &self,
        origin: &Origin,
        brand_id: &str,
        supplier_id: &str,
        permissions: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        let platform = self.platform();
        let projection = access_index_projection(brand_id, supplier_id);
        let mut tx = self.home().begin().await?;
        if is_new(&mut tx, &platform, &projection, origin).await? {
            let sql = match permissions {
                Some(_) => format!(
                    "INSERT INTO {}.brand_access (brand_id, supplier_id, permissions) VALUES (?, ?, ?) \
                     ON DUPLICATE KEY UPDATE permissions = VALUES(permissions)",
                    platform.quoted()
                ),
                None => format!(
                    "DELETE FROM {}.brand_access WHERE brand_id = ? AND supplier_id = ?",
                    platform.quoted()
                ),
            };
            let mut query = sqlx::query(&sql).bind(brand_id).bind(supplier_id);
            if let Some(json) = permissions {
                query = query.bind(json);
            }
            query.execute(&mut *tx).await?;
            offsets::set(
                &mut tx,
                &platform,
                &projection,
                &origin.topic,
                origin.partition,
                origin.offset,
            )
            .await?;
        }
        tx.commit().await
    }
}
