//! Whole-copy operations on the local copies suppliers keep of brands: the backfill of a grant,
//! the refresh of a restored supplier, the removal of a purged brand. Wired into the lifecycle
//! through [`CatalogHooks`].

use futures::future::LocalBoxFuture;
use futures::FutureExt;
use sqlx::MySqlPool;

use super::apply::copy_projection;
use super::spec::CatalogSpec;
use super::store;
use crate::db::NamedLock;
use crate::offsets;
use crate::tenancy::provisioning::LifecycleHooks;
use crate::tenancy::tenants::{Status, TenantRef, Tenants};
use crate::tenant::{DatabaseName, Namespace, ServiceDatabase};

/// The supplier's copy of one brand becomes the brand's current projection (under the
/// supplier's permissions), recording the brand offsets it reflects so the fan-out continues
/// from exactly there.
pub(super) async fn backfill_copy(
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

/// The catalog's part of the tenant lifecycle.
pub struct CatalogHooks {
    pub ns: Namespace,
    pub pool: MySqlPool,
    pub tenants: Tenants,
    pub spec: CatalogSpec,
}

impl CatalogHooks {
    /// After a supplier is restored: every copy it keeps of an active brand is rebuilt from that
    /// brand's projection. While it was archived the fan-out passed it by, and a brand that
    /// never changes again would otherwise leave its copy stale for good.
    pub async fn refresh_supplier_copies(
        &self,
        supplier_id: &str,
        supplier_db: &DatabaseName,
    ) -> anyhow::Result<usize> {
        let grants: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT brand_id, CAST(permissions AS CHAR) FROM {}.brand_access",
            supplier_db.quoted()
        ))
        .fetch_all(&self.pool)
        .await?;
        let ids: Vec<&str> = grants.iter().map(|(b, _)| b.as_str()).collect();
        let brands = self.tenants.lookup(&ids).await?;
        let mut refreshed = 0;
        for (brand_id, json) in &grants {
            let permissions: Vec<String> = serde_json::from_str(json).unwrap_or_default();
            let Some(TenantRef {
                status: Status::Active,
                database: Some(brand_db),
                ..
            }) = brands.get(brand_id)
            else {
                continue;
            };
            if !permissions.contains(&self.spec.requires_permission) {
                continue;
            }
            let lock = NamedLock::brand(&self.pool, &self.ns, brand_id)
                .await
                .map_err(|e| anyhow::anyhow!("locking brand {brand_id}: {e}"))?;
            let result = async {
                let mut tx = self.pool.begin().await?;
                let rows = backfill_copy(
                    &mut tx,
                    &self.spec,
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

    /// A purged brand's catalog leaves the platform: every supplier copy of it goes too (so the
    /// end state does not depend on whether a replay copied it before the purge). Under the
    /// brand's lock, so no fan-out writes a copy after it.
    pub async fn drop_brand_copies(&self, brand_id: &str) -> anyhow::Result<usize> {
        let lock = NamedLock::brand(&self.pool, &self.ns, brand_id)
            .await
            .map_err(|e| anyhow::anyhow!("locking brand {brand_id}: {e}"))?;
        let result = self.drop_brand_copies_locked(brand_id).await;
        lock.release().await;
        Ok(result?)
    }

    async fn drop_brand_copies_locked(&self, brand_id: &str) -> Result<usize, sqlx::Error> {
        let platform = self.ns.service_database(ServiceDatabase::Platform);
        let suppliers: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT supplier_id FROM {}.brand_access WHERE brand_id = ?",
            platform.quoted()
        ))
        .bind(brand_id)
        .fetch_all(&self.pool)
        .await?;
        let ids: Vec<&str> = suppliers.iter().map(String::as_str).collect();
        let known = self.tenants.lookup(&ids).await?;
        let mut dropped = 0;
        for supplier in known.values() {
            let db = match supplier.status {
                Status::Active => supplier.database.clone(),
                Status::Archived => supplier.archive_database.clone(),
                _ => None,
            };
            let Some(db) = db else { continue };
            let mut tx = self.pool.begin().await?;
            dropped += store::drop_copy(&mut tx, &db, &self.spec, brand_id).await?;
            sqlx::query(&format!(
                "DELETE FROM {}.brand_access WHERE brand_id = ?",
                db.quoted()
            ))
            .bind(brand_id)
            .execute(&mut *tx)
            .await?;
            offsets::clear(&mut tx, &db, &copy_projection(brand_id)).await?;
            tx.commit().await?;
        }
        Ok(dropped as usize)
    }
}

impl LifecycleHooks for CatalogHooks {
    fn supplier_restored<'a>(
        &'a self,
        supplier_id: &'a str,
        database: &'a DatabaseName,
    ) -> LocalBoxFuture<'a, anyhow::Result<usize>> {
        self.refresh_supplier_copies(supplier_id, database)
            .boxed_local()
    }

    fn brand_purged<'a>(&'a self, brand_id: &'a str) -> LocalBoxFuture<'a, anyhow::Result<usize>> {
        self.drop_brand_copies(brand_id).boxed_local()
    }
}
