//! Access events of the catalog processor: SupplierBrandAccessGranted/Revoked into the
//! supplier DB (`brand_access`, its copy of the brand), the platform's fan-out index and the
//! Redis permission cache.

use super::processor::{
    copy_projection, is_new, ApplyError, BrandLock, CatalogProcessor, Item, Pending, NAME,
};
use super::spec::CatalogSpec;
use super::store;
use crate::offsets;
use crate::processor::Origin;
use crate::tenancy::tenants::TenantRef;
use crate::tenant::DatabaseName;

// Offsets of access events are kept per brand, like the copies: one partition carries many
// brands, and a brand whose events are held (not provisioned yet) is applied after later
// offsets of other brands, so a per-partition position would wrongly skip it.
fn access_projection(brand_id: &str) -> String {
    format!("access:{brand_id}")
}

fn access_index_projection(brand_id: &str) -> String {
    format!("access_index:{brand_id}")
}

/// The supplier's copy of one brand becomes the brand's current projection (under the
/// supplier's permissions), recording the brand offsets it reflects so the fan-out continues
/// from exactly there.
async fn backfill_copy(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    spec: &CatalogSpec,
    supplier_db: &DatabaseName,
    brand_db: &DatabaseName,
    brand_id: &str,
    permissions: &[String],
) -> Result<u64, sqlx::Error> {
    let copy = copy_projection(brand_id);
    offsets::clear(tx, supplier_db, &copy).await?;
    let hidden = spec.hidden_columns(permissions);
    let rows = store::rebuild_copy(tx, supplier_db, brand_db, spec, brand_id, &hidden).await?;
    for (topic, partition, offset) in offsets::all(tx, brand_db, &spec.projection).await? {
        offsets::set(tx, supplier_db, &copy, &topic, partition, offset).await?;
    }
    Ok(rows)
}

/// After a supplier is restored: every copy it keeps of an active brand is rebuilt from that
/// brand's projection. While it was archived the fan-out passed it by, and a brand that never
/// changes again would otherwise leave its copy stale for good.
pub async fn refresh_supplier_copies(
    pool: &sqlx::MySqlPool,
    ns: &crate::tenant::Namespace,
    tenants: &crate::tenancy::tenants::Tenants,
    supplier_id: &str,
    supplier_db: &DatabaseName,
) -> anyhow::Result<usize> {
    let spec = CatalogSpec::load()?;
    let grants: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT brand_id, CAST(permissions AS CHAR) FROM {}.brand_access",
        supplier_db.quoted()
    ))
    .fetch_all(pool)
    .await?;
    let ids: Vec<&str> = grants.iter().map(|(b, _)| b.as_str()).collect();
    let brands = tenants.lookup(&ids).await?;
    let mut refreshed = 0;
    for (brand_id, json) in &grants {
        let permissions: Vec<String> = serde_json::from_str(json).unwrap_or_default();
        let Some(TenantRef {
            status: crate::tenancy::tenants::Status::Active,
            database: Some(brand_db),
            ..
        }) = brands.get(brand_id)
        else {
            continue;
        };
        if !permissions.contains(&spec.requires_permission) {
            continue;
        }
        let lock = BrandLock::acquire(pool, ns, brand_id)
            .await
            .map_err(|e| anyhow::anyhow!("locking brand {brand_id}: {e:?}"))?;
        let result = async {
            let mut tx = pool.begin().await?;
            let rows = backfill_copy(
                &mut tx,
                &spec,
                supplier_db,
                brand_db,
                brand_id,
                &permissions,
            )
            .await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(rows)
        }
        .await;
        lock.release().await;
        let rows = result?;
        tracing::info!(tenant = %supplier_id, brand = %brand_id, rows, "restored supplier: copy rebuilt");
        refreshed += 1;
    }
    Ok(refreshed)
}

impl CatalogProcessor {
    pub(super) async fn apply_access(
        &self,
        brand: &TenantRef,
        supplier: &TenantRef,
        p: &Pending<'_>,
    ) -> Result<(), ApplyError> {
        let supplier_id = supplier.organisation_id.as_str();
        let supplier_db = supplier.database.clone().ok_or_else(|| {
            ApplyError::Permanent(format!("supplier {supplier_id} has no valid database"))
        })?;
        let brand_db = brand
            .database
            .clone()
            .ok_or_else(|| ApplyError::Permanent("brand has no valid database".into()))?;
        let lock = BrandLock::acquire(&self.pool, &self.ns, &brand.organisation_id).await?;
        let result = match &p.item {
            Item::Grant {
                permissions,
                occurred_at,
                ..
            } => {
                self.grant(
                    brand,
                    &brand_db,
                    supplier_id,
                    &supplier_db,
                    permissions,
                    *occurred_at,
                    &p.origin,
                )
                .await
            }
            Item::Revoke { .. } => {
                self.revoke(brand, supplier_id, &supplier_db, &p.origin)
                    .await
            }
            Item::Catalog(_) => unreachable!("access item"),
        };
        lock.release().await;
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn grant(
        &self,
        brand: &TenantRef,
        brand_db: &DatabaseName,
        supplier_id: &str,
        supplier_db: &DatabaseName,
        permissions: &[String],
        occurred_at: i64,
        origin: &Origin,
    ) -> Result<(), ApplyError> {
        let brand_id = &brand.organisation_id;
        let json = serde_json::to_string(permissions).expect("strings serialise");
        // Index first: if we die after it, the supplier's own row (checked by the fan-out)
        // still says no access, and the redelivered grant completes the rest.
        self.index_access(origin, brand_id, supplier_id, Some(&json))
            .await?;

        let mut tx = self.pool.begin().await?;
        if is_new(&mut tx, supplier_db, &access_projection(brand_id), origin).await? {
            sqlx::query(&format!(
                "INSERT INTO {}.brand_access (brand_id, permissions, granted_at) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE permissions = VALUES(permissions), granted_at = VALUES(granted_at)",
                supplier_db.quoted()
            ))
            .bind(brand_id)
            .bind(&json)
            .bind(chrono::DateTime::from_timestamp_millis(occurred_at).unwrap_or_default())
            .execute(&mut *tx)
            .await?;
            // Backfill: the supplier's copy becomes the brand's current projection, and records
            // the brand offsets it reflects so the fan-out continues from exactly there.
            if permissions.contains(&self.spec.requires_permission) {
                let rows = backfill_copy(
                    &mut tx,
                    &self.spec,
                    supplier_db,
                    brand_db,
                    brand_id,
                    permissions,
                )
                .await?;
                tracing::info!(processor = NAME, tenant = %supplier_id, brand = %brand_id, rows,
                    permissions = %json, "access granted: supplier copy backfilled");
            } else {
                offsets::clear(&mut tx, supplier_db, &copy_projection(brand_id)).await?;
                store::drop_copy(&mut tx, supplier_db, &self.spec, brand_id).await?;
                tracing::info!(processor = NAME, tenant = %supplier_id, brand = %brand_id,
                    permissions = %json, "access granted without catalog.read: no copy kept");
            }
            offsets::set(
                &mut tx,
                supplier_db,
                &access_projection(brand_id),
                &origin.topic,
                origin.partition,
                origin.offset,
            )
            .await?;
        }
        tx.commit().await?;
        // After the commit (and again on a redelivery): readers never see a grant the database
        // does not hold, and stale cached permissions are replaced.
        self.cache.store(supplier_id, brand_id, permissions).await?;
        Ok(())
    }

    async fn revoke(
        &self,
        brand: &TenantRef,
        supplier_id: &str,
        supplier_db: &DatabaseName,
        origin: &Origin,
    ) -> Result<(), ApplyError> {
        let brand_id = &brand.organisation_id;
        // Supplier first: once its row is gone the fan-out skips it, whatever the index says.
        let mut tx = self.pool.begin().await?;
        if is_new(&mut tx, supplier_db, &access_projection(brand_id), origin).await? {
            sqlx::query(&format!(
                "DELETE FROM {}.brand_access WHERE brand_id = ?",
                supplier_db.quoted()
            ))
            .bind(brand_id)
            .execute(&mut *tx)
            .await?;
            let rows = store::drop_copy(&mut tx, supplier_db, &self.spec, brand_id).await?;
            offsets::clear(&mut tx, supplier_db, &copy_projection(brand_id)).await?;
            offsets::set(
                &mut tx,
                supplier_db,
                &access_projection(brand_id),
                &origin.topic,
                origin.partition,
                origin.offset,
            )
            .await?;
            tracing::info!(processor = NAME, tenant = %supplier_id, brand = %brand_id, rows,
                "access revoked: supplier copy removed");
        }
        tx.commit().await?;
        self.index_access(origin, brand_id, supplier_id, None)
            .await?;
        self.cache.invalidate(supplier_id, brand_id).await?;
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
        let projection = access_index_projection(brand_id);
        let mut tx = self.pool.begin().await?;
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
