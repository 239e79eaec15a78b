//! Whole-copy operations on the local copies suppliers keep of brands: the backfill of a grant,
//! and the lifecycle's part, wired in through [`CatalogHooks`]. Copies exist only between two
//! live tenants: archiving either side removes them, restoring it rebuilds them from the brand's
//! projection, purging a brand removes its grants too. What a copy holds then never depends on
//! the order in which catalog and lifecycle events happened to be applied, so a replay ends
//! with the copies a live run has.

use futures::future::LocalBoxFuture;
use futures::FutureExt;
use sqlx::MySqlPool;

use super::apply::read_permissions;
use super::spec::CatalogSpec;
use super::store::copy_projection;
use super::store::{self, BrandSource};
use crate::cache::permissions::PermissionCache;
use crate::store::applied;
use crate::store::locks::NamedLock;
use crate::store::offsets;
use crate::store::servers::Server;
use crate::store::tenants::{Status, TenantRef, Tenants};
use crate::tenancy::provisioning::LifecycleHooks;
use crate::tenant::{DatabaseName, Namespace, OrganisationType, ServiceDatabase};

/// The supplier's copy of one brand becomes the brand's current projection (under the
/// supplier's permissions), recording the brand offsets it reflects so the fan-out continues
/// from exactly there.
/// `tx` is on the supplier's server, `into`.
pub(crate) async fn backfill_copy(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    into: &Server,
    spec: &CatalogSpec,
    supplier_db: &DatabaseName,
    brand: BrandSource<'_>,
    brand_id: &str,
    permissions: &[String],
) -> Result<u64, sqlx::Error> {
    offsets::clear(tx, supplier_db, &copy_projection(brand_id)).await?;
    store::drop_copy(tx, supplier_db, spec, brand_id).await?;
    fill_copy(tx, into, spec, supplier_db, brand, brand_id, permissions).await
}

/// [`backfill_copy`] into a supplier database that holds no copy of the brand (rows nor
/// offsets): no DELETE, so copies of several brands can be filled at once without their gap
/// locks deadlocking each other.
///
/// The brand's offsets come from the snapshot its rows were read in ([`store::insert_copy`]).
pub(crate) async fn fill_copy(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    into: &Server,
    spec: &CatalogSpec,
    supplier_db: &DatabaseName,
    brand: BrandSource<'_>,
    brand_id: &str,
    permissions: &[String],
) -> Result<u64, sqlx::Error> {
    let copy = copy_projection(brand_id);
    let hidden = spec.hidden_columns(permissions);
    let (rows, brand_offsets) =
        store::insert_copy(tx, into, supplier_db, brand, spec, brand_id, &hidden).await?;
    for (topic, partition, offset) in brand_offsets {
        offsets::set(tx, supplier_db, &copy, &topic, partition, offset).await?;
    }
    Ok(rows)
}

/// The catalog's part of the tenant lifecycle.
pub struct CatalogHooks {
    pub ns: Namespace,
    /// Also the router: `tenants.servers()`.
    pub tenants: Tenants,
    pub spec: CatalogSpec,
    pub cache: PermissionCache,
}

impl CatalogHooks {
    /// The home server's pool: locks and `{ns}_platform`.
    fn home(&self) -> &MySqlPool {
        self.tenants.servers().home().pool()
    }

    /// Removes one brand's copy from one supplier database (rows and offsets), under the
    /// brand's lock so no fan-out writes it again behind us.
    async fn clear_copy(
        &self,
        supplier: &Server,
        supplier_db: &DatabaseName,
        brand_id: &str,
    ) -> anyhow::Result<u64> {
        let lock = NamedLock::brand(self.home(), &self.ns, brand_id)
            .await
            .map_err(|e| anyhow::anyhow!("locking brand {brand_id}: {e}"))?;
        let result = async {
            let mut tx = supplier.pool().begin().await?;
            let rows = store::drop_copy(&mut tx, supplier_db, &self.spec, brand_id).await?;
            offsets::clear(&mut tx, supplier_db, &copy_projection(brand_id)).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(rows)
        }
        .await;
        lock.release().await;
        Ok(result?)
    }

    /// The suppliers that hold a grant for `brand_id`, with their state.
    async fn grantees(&self, brand_id: &str) -> anyhow::Result<Vec<TenantRef>> {
        let platform = self.ns.service_database(ServiceDatabase::Platform);
        let suppliers: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT supplier_id FROM {}.brand_access WHERE brand_id = ? ORDER BY supplier_id",
            platform.quoted()
        ))
        .bind(brand_id)
        .fetch_all(self.home())
        .await?;
        let ids: Vec<&str> = suppliers.iter().map(String::as_str).collect();
        Ok(self.tenants.lookup(&ids).await?.into_values().collect())
    }

    /// A tenant is being archived: every copy it takes part in goes.
    pub async fn remove_copies(
        &self,
        organisation_id: &str,
        kind: OrganisationType,
        server: &Server,
        database: &DatabaseName,
    ) -> anyhow::Result<u64> {
        let mut removed = 0;
        match kind {
            OrganisationType::Supplier => {
                let brands: Vec<String> = sqlx::query_scalar(&format!(
                    "SELECT brand_id FROM {db}.brand_access UNION SELECT DISTINCT `{col}` FROM {db}.`{table}`",
                    db = database.quoted(),
                    col = self.spec.supplier_brand_column,
                    table = self.spec.supplier_table,
                ))
                .fetch_all(server.pool())
                .await?;
                for brand_id in &brands {
                    removed += self.clear_copy(server, database, brand_id).await?;
                }
            }
            OrganisationType::Brand => {
                for supplier in self.grantees(organisation_id).await? {
                    if let (Status::Active, Some(db)) = (supplier.status, &supplier.database) {
                        removed += self
                            .clear_copy(&supplier.server, db, organisation_id)
                            .await?;
                    }
                }
            }
            OrganisationType::Retailer => {}
        }
        Ok(removed)
    }

    /// A restored tenant's copies, rebuilt from the brands' projections: a supplier's of every
    /// active brand it may read, a brand's in every active supplier that may read it.
    async fn rebuild_copies(
        &self,
        organisation_id: &str,
        kind: OrganisationType,
        server: &Server,
        database: &DatabaseName,
    ) -> anyhow::Result<()> {
        match kind {
            OrganisationType::Supplier => {
                self.refresh_supplier_copies(organisation_id, server, database)
                    .await?;
            }
            OrganisationType::Brand => {
                let brand = BrandSource {
                    db: database,
                    server,
                };
                let n = self.rebuild_brand_copies(organisation_id, brand).await?;
                tracing::info!(tenant = %organisation_id, copies = n, "restored brand: supplier copies rebuilt");
            }
            OrganisationType::Retailer => {}
        }
        Ok(())
    }

    /// A brand is back: every live supplier holding `catalog.read` gets its copy again.
    pub async fn rebuild_brand_copies(
        &self,
        brand_id: &str,
        brand: BrandSource<'_>,
    ) -> anyhow::Result<usize> {
        let mut rebuilt = 0;
        for supplier in self.grantees(brand_id).await? {
            let (Status::Active, Some(supplier_db)) = (supplier.status, &supplier.database) else {
                continue;
            };
            let lock = NamedLock::brand(self.home(), &self.ns, brand_id)
                .await
                .map_err(|e| anyhow::anyhow!("locking brand {brand_id}: {e}"))?;
            let result = async {
                let into = &supplier.server;
                let mut tx = into.pool().begin().await?;
                let permissions = read_permissions(&mut tx, supplier_db, brand_id).await?;
                let copied = match permissions {
                    Some(p) if p.contains(&self.spec.requires_permission) => {
                        backfill_copy(&mut tx, into, &self.spec, supplier_db, brand, brand_id, &p)
                            .await?;
                        1
                    }
                    _ => 0,
                };
                tx.commit().await?;
                Ok::<_, sqlx::Error>(copied)
            }
            .await;
            lock.release().await;
            rebuilt += result?;
        }
        Ok(rebuilt)
    }

    /// After a supplier is restored: every copy it keeps of an active brand is rebuilt from that
    /// brand's projection. While it was archived the fan-out passed it by, and a brand that
    /// never changes again would otherwise leave its copy stale for good.
    pub async fn refresh_supplier_copies(
        &self,
        supplier_id: &str,
        into: &Server,
        supplier_db: &DatabaseName,
    ) -> anyhow::Result<usize> {
        let grants: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT brand_id, CAST(permissions AS CHAR) FROM {}.brand_access",
            supplier_db.quoted()
        ))
        .fetch_all(into.pool())
        .await?;
        let ids: Vec<&str> = grants.iter().map(|(b, _)| b.as_str()).collect();
        let brands = self.tenants.lookup(&ids).await?;
        let mut refreshed = 0;
        for (brand_id, json) in &grants {
            let permissions: Vec<String> = serde_json::from_str(json).unwrap_or_default();
            let Some(TenantRef {
                status: Status::Active,
                database: Some(brand_db),
                server: brand_server,
                ..
            }) = brands.get(brand_id)
            else {
                continue;
            };
            if !permissions.contains(&self.spec.requires_permission) {
                continue;
            }
            let lock = NamedLock::brand(self.home(), &self.ns, brand_id)
                .await
                .map_err(|e| anyhow::anyhow!("locking brand {brand_id}: {e}"))?;
            let result = async {
                let mut tx = into.pool().begin().await?;
                let brand = BrandSource {
                    db: brand_db,
                    server: brand_server,
                };
                let rows = backfill_copy(
                    &mut tx,
                    into,
                    &self.spec,
                    supplier_db,
                    brand,
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

    /// A restored tenant's permission keys, as a grant applied now would write them: for every
    /// pair it is part of whose other side is active, the supplier's `brand_access` row (read
    /// under the brand's lock, as grants write it). Termination deleted them; without this a
    /// live run and a replay of the same topics would end with different keys.
    pub async fn recache(
        &self,
        organisation_id: &str,
        kind: OrganisationType,
    ) -> anyhow::Result<usize> {
        let platform = self.ns.service_database(ServiceDatabase::Platform);
        let column = match kind {
            OrganisationType::Brand => "brand_id",
            OrganisationType::Supplier => "supplier_id",
            OrganisationType::Retailer => return Ok(0),
        };
        let pairs: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT brand_id, supplier_id FROM {}.brand_access WHERE {column} = ?",
            platform.quoted()
        ))
        .bind(organisation_id)
        .fetch_all(self.home())
        .await?;
        let mut ids: Vec<&str> = pairs
            .iter()
            .flat_map(|(b, s)| [b.as_str(), s.as_str()])
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let known = self.tenants.lookup(&ids).await?;
        let active = |id: &str| {
            known
                .get(id)
                .filter(|t| t.status == Status::Active)
                .and_then(|t| Some((t.server.clone(), t.database.clone()?)))
        };
        let mut cached = 0;
        for (brand_id, supplier_id) in &pairs {
            let (Some(_), Some((supplier_server, supplier_db))) =
                (active(brand_id), active(supplier_id))
            else {
                continue;
            };
            let lock = NamedLock::brand(self.home(), &self.ns, brand_id)
                .await
                .map_err(|e| anyhow::anyhow!("locking brand {brand_id}: {e}"))?;
            let result = async {
                let mut tx = supplier_server.pool().begin().await?;
                let permissions = read_permissions(&mut tx, &supplier_db, brand_id).await?;
                tx.commit().await?;
                match permissions {
                    Some(p) => {
                        self.cache.store(supplier_id, brand_id, &p).await?;
                        Ok::<_, anyhow::Error>(1)
                    }
                    None => Ok(0),
                }
            }
            .await;
            lock.release().await;
            cached += result?;
        }
        Ok(cached)
    }

    /// A purged brand's catalog leaves the platform: every supplier copy of it goes too (so the
    /// end state does not depend on whether a replay copied it before the purge). Under the
    /// brand's lock, so no fan-out writes a copy after it.
    pub async fn drop_brand_copies(&self, brand_id: &str) -> anyhow::Result<usize> {
        let lock = NamedLock::brand(self.home(), &self.ns, brand_id)
            .await
            .map_err(|e| anyhow::anyhow!("locking brand {brand_id}: {e}"))?;
        let result = self.drop_brand_copies_locked(brand_id).await;
        lock.release().await;
        result
    }

    async fn drop_brand_copies_locked(&self, brand_id: &str) -> anyhow::Result<usize> {
        let mut dropped = 0;
        // Every supplier, not only the brand's grantees in the index: a revoke whose worker
        // died between the supplier's commit and the index update leaves the index naming a
        // supplier it should not, and whether the purge then reaches that supplier's access
        // bookkeeping depended on timing (a chaos run found it). A purge is rare; one small
        // transaction per supplier database makes its end state independent of the index.
        let suppliers: Vec<String> = self
            .tenants
            .list(None)
            .await?
            .into_iter()
            .filter(|t| t.organisation_type == OrganisationType::Supplier)
            .map(|t| t.organisation_id)
            .collect();
        let ids: Vec<&str> = suppliers.iter().map(String::as_str).collect();
        for supplier in self.tenants.lookup(&ids).await?.values() {
            let db = match supplier.status {
                Status::Active => supplier.database.clone(),
                Status::Archived => supplier.archive_database.clone(),
                _ => None,
            };
            let Some(db) = db else { continue };
            let mut tx = supplier.server.pool().begin().await?;
            dropped += store::drop_copy(&mut tx, &db, &self.spec, brand_id).await?;
            for table in ["brand_access", "access_changes"] {
                sqlx::query(&format!(
                    "DELETE FROM {}.{table} WHERE brand_id = ?",
                    db.quoted()
                ))
                .bind(brand_id)
                .execute(&mut *tx)
                .await?;
            }
            // The grants' bookkeeping goes with them: a replay, which skips a purged brand's
            // grants, ends the same.
            let access = super::store::access_projection(brand_id);
            offsets::clear(&mut tx, &db, &copy_projection(brand_id)).await?;
            offsets::clear(&mut tx, &db, &access).await?;
            applied::forget(&mut tx, &db, &access).await?;
            tx.commit().await?;
        }
        Ok(dropped as usize)
    }
}

impl LifecycleHooks for CatalogHooks {
    fn before_archive<'a>(
        &'a self,
        organisation_id: &'a str,
        kind: OrganisationType,
        server: &'a Server,
        database: &'a DatabaseName,
    ) -> LocalBoxFuture<'a, anyhow::Result<()>> {
        async move {
            let rows = self
                .remove_copies(organisation_id, kind, server, database)
                .await?;
            tracing::info!(tenant = %organisation_id, rows, "archiving: copies removed");
            Ok(())
        }
        .boxed_local()
    }

    fn before_reactivation<'a>(
        &'a self,
        organisation_id: &'a str,
        kind: OrganisationType,
        server: &'a Server,
        database: &'a DatabaseName,
    ) -> LocalBoxFuture<'a, anyhow::Result<()>> {
        self.rebuild_copies(organisation_id, kind, server, database)
            .boxed_local()
    }

    fn after_reactivation<'a>(
        &'a self,
        organisation_id: &'a str,
        kind: OrganisationType,
        server: &'a Server,
        database: &'a DatabaseName,
    ) -> LocalBoxFuture<'a, anyhow::Result<()>> {
        async move {
            // Again, now that the tenant is active: a brand and a supplier restored at the same
            // moment each saw the other still archived before its own flip; after the flips, at
            // least one of them sees the other active.
            self.rebuild_copies(organisation_id, kind, server, database)
                .await?;
            let keys = self.recache(organisation_id, kind).await?;
            tracing::info!(tenant = %organisation_id, keys, "restored tenant: permission keys cached again");
            Ok(())
        }
        .boxed_local()
    }

    fn brand_purged<'a>(&'a self, brand_id: &'a str) -> LocalBoxFuture<'a, anyhow::Result<usize>> {
        self.drop_brand_copies(brand_id).boxed_local()
    }
}
