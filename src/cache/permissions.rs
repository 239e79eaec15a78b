//! The Redis permission cache in front of each supplier's `brand_access` table.
//!
//! Key `{ns}:supplier:{supplier_id}:brand_access:{brand_id}` (ids as canonical lower-case
//! hyphenated uuids), value the supplier's permissions on the brand as JSON — an array such as
//! `["catalog.read","pricing.read"]`, or `null` for "no access" — with a TTL of
//! [`PERMISSION_TTL_SECS`].
//!
//! The supplier database is the truth (itself a projection of `{ns}.brand-access`); the cache
//! is a projection of it that can be flushed at any time:
//!
//! - the access projector calls [`PermissionCache::store`] after committing a grant (SET EX)
//!   and [`PermissionCache::invalidate`] after committing a revoke or archiving the supplier
//!   (DEL);
//! - readers call [`PermissionCache::permissions`]: GET, and on a miss load from MySQL and
//!   `SET NX EX`, so a reader that loaded before a concurrent grant never overwrites the value
//!   the grant stored.
//!
//! # The race with revoke, and how it is closed
//!
//! A reader can load the old permissions, then a revoke commits and DELetes the key, then the
//! reader's `SET NX` succeeds (the key is gone) and would serve the revoked permissions until
//! the TTL ends. To close that window the reader loads a second time *after* its `SET NX`
//! succeeded and DELetes the key if the answer changed. A revoke's DEL follows its commit, so
//! if the reader's SET came after the DEL, its second load came after the commit and sees it;
//! if the SET came before the DEL, the DEL removed it. What remains: a reader that dies (or
//! loses its Redis/MySQL connection) between its SET and the check leaves a possibly stale value
//! for at most [`PERMISSION_TTL_SECS`]. A DEL is always safe here: the next reader reloads.

use crate::store::servers::Servers;
use redis::aio::ConnectionManager;
use uuid::Uuid;

use crate::cache::Redis;
use crate::store::tenants::{Status, TenantRecord, Tenants};
use crate::tenant::{DatabaseName, Namespace, OrganisationType, ServiceDatabase, Slug};

/// Lifetime of a cached answer; bounds how long a missed invalidation can be served.
pub const PERMISSION_TTL_SECS: u64 = 300;

/// The permission needed to read a brand's catalog (fabrics without prices).
pub const CATALOG_READ: &str = "catalog.read";
/// The permission needed to see a brand's prices.
pub const PRICING_READ: &str = "pricing.read";

/// What a supplier may do with a brand's data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Access {
    /// The granted permissions; `None` when the supplier has no access at all (no grant, or the
    /// supplier is not active).
    pub permissions: Option<Vec<String>>,
    /// Whether the answer came from Redis rather than MySQL.
    pub from_cache: bool,
}

impl Access {
    fn has(&self, permission: &str) -> bool {
        self.permissions
            .as_deref()
            .is_some_and(|ps| ps.iter().any(|p| p == permission))
    }

    /// Holds `catalog.read`.
    pub fn may_read_catalog(&self) -> bool {
        self.has(CATALOG_READ)
    }

    /// Holds `pricing.read`.
    pub fn may_read_pricing(&self) -> bool {
        self.has(PRICING_READ)
    }
}

/// Why a permission lookup failed. Each message names the supplier/brand it was about.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidId {
        /// `supplier id` or `brand id`.
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "unknown supplier {supplier_id}: no tenant with that organisation id in {tenants_table}"
    )]
    UnknownSupplier {
        supplier_id: String,
        tenants_table: String,
    },
    #[error("organisation {supplier_id} is a {organisation_type} tenant, not a supplier")]
    NotASupplier {
        supplier_id: String,
        organisation_type: String,
    },
    #[error("tenants row of supplier {supplier_id} is inconsistent: {detail}")]
    InconsistentTenant { supplier_id: String, detail: String },
    #[error("Redis failed on {key} (supplier {supplier_id}, brand {brand_id}): {cause}")]
    Redis {
        supplier_id: String,
        brand_id: String,
        key: String,
        cause: redis::RedisError,
    },
    #[error("MySQL failed {doing} (supplier {supplier_id}, brand {brand_id}): {cause}")]
    Database {
        supplier_id: String,
        brand_id: String,
        /// What was being read, e.g. `reading ns_platform.tenants`.
        doing: String,
        cause: sqlx::Error,
    },
    #[error(
        "brand_access.permissions of brand {brand_id} in {database} (supplier {supplier_id}) \
         is not a JSON array of strings: {detail}"
    )]
    CorruptPermissions {
        supplier_id: String,
        brand_id: String,
        database: String,
        detail: String,
    },
}

/// Why `raw` is not a uuid, or its canonical text (lower-case, hyphenated).
pub fn parse_id(raw: &str) -> Result<String, String> {
    Uuid::parse_str(raw.trim())
        .map(|u| u.hyphenated().to_string())
        .map_err(|e| {
            format!("not a uuid ({e}); expected e.g. 6f1c4b1e-8a43-4c55-9b51-0d8e3f2a9c17")
        })
}

/// The canonical text of an id, or [`AccessError::InvalidId`] naming it as `what`.
pub fn canonical_id(what: &'static str, raw: &str) -> Result<String, AccessError> {
    parse_id(raw).map_err(|reason| AccessError::InvalidId {
        what,
        value: raw.to_owned(),
        reason,
    })
}

/// What the supplier database says, read by [`PermissionCache::load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// The supplier is active: its `brand_access` row's permissions, `None` without a row.
    /// Cacheable.
    Active(Option<Vec<String>>),
    /// The supplier exists but is not active (provisioning, archived, purged, failed): no
    /// access. Not cached, so a restored supplier is answered correctly at once.
    Inactive(Status),
}

impl Loaded {
    pub fn permissions(&self) -> Option<&[String]> {
        match self {
            Loaded::Active(p) => p.as_deref(),
            Loaded::Inactive(_) => None,
        }
    }
}

/// The value stored in Redis: a JSON array of strings, or `null` for no access.
fn encode(permissions: Option<&[String]>) -> String {
    serde_json::to_string(&permissions).expect("strings always serialise")
}

fn decode(raw: &str) -> Result<Option<Vec<String>>, serde_json::Error> {
    serde_json::from_str(raw)
}

/// The supplier's database, re-derived from the validated type and slug and required to match
/// what the tenants table recorded: nothing read from a row is ever interpolated into SQL.
pub fn supplier_database(
    ns: &Namespace,
    record: &TenantRecord,
) -> Result<DatabaseName, AccessError> {
    let inconsistent = |detail: String| AccessError::InconsistentTenant {
        supplier_id: record.organisation_id.clone(),
        detail,
    };
    let slug = Slug::parse(&record.slug).map_err(|e| inconsistent(e.to_string()))?;
    let db = ns
        .tenant_database(OrganisationType::Supplier, &slug)
        .map_err(|e| inconsistent(e.to_string()))?;
    if record.database_name.as_deref() != Some(db.as_str()) {
        return Err(inconsistent(format!(
            "database_name is {:?}, expected {:?} for slug {:?}",
            record.database_name,
            db.as_str(),
            record.slug
        )));
    }
    Ok(db)
}

/// `{ns}:supplier:{supplier_id}:brand_access:{brand_id}`, see [`PermissionCache::key`].
pub fn permission_key(ns: &Namespace, supplier_id: &str, brand_id: &str) -> String {
    crate::cache::permission_key(ns, supplier_id, brand_id)
}

/// A permission key's value, read from Redis by the caller along with other keys.
#[derive(Debug, Clone)]
pub struct Prefetched {
    pub key: String,
    pub value: Option<String>,
}

/// Redis permission cache for one namespace. Cheap to clone (one multiplexed connection that
/// reconnects by itself).
#[derive(Clone)]
pub struct PermissionCache {
    conn: ConnectionManager,
    ns: Namespace,
}

impl PermissionCache {
    pub async fn connect(redis_url: &str, ns: &Namespace) -> anyhow::Result<Self> {
        Ok(Self::on(&Redis::connect(redis_url, ns).await?))
    }

    /// The permission cache on an open connection.
    pub fn on(redis: &Redis) -> Self {
        PermissionCache {
            conn: redis.conn(),
            ns: redis.namespace().clone(),
        }
    }

    /// `{ns}:supplier:{supplier_id}:brand_access:{brand_id}`. Ids that parse as uuids are
    /// written in canonical form (so `ABC…` and `abc…` share a key); the fallible methods refuse
    /// anything else before building a key.
    pub fn key(&self, supplier_id: &str, brand_id: &str) -> String {
        permission_key(&self.ns, supplier_id, brand_id)
    }

    /// The key for two ids that must be uuids; a client-side Redis error otherwise.
    fn checked_key(&self, supplier_id: &str, brand_id: &str) -> redis::RedisResult<String> {
        for (what, id) in [("supplier id", supplier_id), ("brand id", brand_id)] {
            if let Err(reason) = parse_id(id) {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "invalid id for the permission cache",
                    format!("{what} {id:?}: {reason}"),
                )));
            }
        }
        Ok(self.key(supplier_id, brand_id))
    }

    /// After the MySQL commit of a grant: the key now holds `permissions` (SET EX), whatever
    /// it held before.
    pub async fn store(
        &self,
        supplier_id: &str,
        brand_id: &str,
        permissions: &[String],
    ) -> redis::RedisResult<()> {
        let key = self.checked_key(supplier_id, brand_id)?;
        redis::cmd("SET")
            .arg(&key)
            .arg(encode(Some(permissions)))
            .arg("EX")
            .arg(PERMISSION_TTL_SECS)
            .query_async::<()>(&mut self.conn.clone())
            .await
    }

    /// After the MySQL commit of a revoke, or when the supplier is archived: DEL.
    pub async fn invalidate(&self, supplier_id: &str, brand_id: &str) -> redis::RedisResult<()> {
        self.remove(supplier_id, brand_id).await.map(|_| ())
    }

    /// DEL, telling whether a key was there (for the operator's `tenancy access invalidate`).
    pub async fn remove(&self, supplier_id: &str, brand_id: &str) -> redis::RedisResult<bool> {
        let key = self.checked_key(supplier_id, brand_id)?;
        let removed: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(removed > 0)
    }

    /// SET NX EX: caches a loaded answer unless the key already holds one (a grant's fresh
    /// value, or another reader's). True when this call set it.
    pub async fn fill(
        &self,
        supplier_id: &str,
        brand_id: &str,
        permissions: Option<&[String]>,
    ) -> redis::RedisResult<bool> {
        let key = self.checked_key(supplier_id, brand_id)?;
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(encode(permissions))
            .arg("NX")
            .arg("EX")
            .arg(PERMISSION_TTL_SECS)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(set.is_some())
    }

    /// Reads the answer from MySQL: the tenants table (`{ns}_platform.tenants`), then, for an active
    /// supplier, its database's `brand_access` row. No Redis involved.
    pub async fn load(
        &self,
        servers: &Servers,
        supplier_id: &str,
        brand_id: &str,
    ) -> Result<Loaded, AccessError> {
        let supplier = canonical_id("supplier id", supplier_id)?;
        let brand = canonical_id("brand id", brand_id)?;
        let tenants_table = format!(
            "{}.tenants",
            self.ns.service_database(ServiceDatabase::Platform)
        );
        let records = Tenants::on(servers.clone(), &self.ns)
            .find(&supplier)
            .await
            .map_err(|cause| AccessError::Database {
                supplier_id: supplier.clone(),
                brand_id: brand.clone(),
                doing: format!("reading {tenants_table}"),
                cause,
            })?;
        // `find` also matches slugs; only the organisation id counts here.
        let Some(record) = records
            .into_iter()
            .find(|r| r.organisation_id.eq_ignore_ascii_case(&supplier))
        else {
            return Err(AccessError::UnknownSupplier {
                supplier_id: supplier,
                tenants_table,
            });
        };
        if record.organisation_type != OrganisationType::Supplier {
            return Err(AccessError::NotASupplier {
                supplier_id: supplier,
                organisation_type: record.organisation_type.to_string(),
            });
        }
        if record.status != Status::Active {
            return Ok(Loaded::Inactive(record.status));
        }
        let db = supplier_database(&self.ns, &record)?;
        let read = async {
            sqlx::query_scalar(&format!(
                "SELECT CAST(permissions AS CHAR) FROM {}.brand_access WHERE brand_id = ?",
                db.quoted()
            ))
            .bind(&brand)
            .fetch_optional(servers.get(&record.server)?.pool())
            .await
        };
        let raw: Option<String> = read.await.map_err(|cause| AccessError::Database {
            supplier_id: supplier.clone(),
            brand_id: brand.clone(),
            doing: format!("reading {db}.brand_access"),
            cause,
        })?;
        match raw {
            None => Ok(Loaded::Active(None)),
            Some(json) => serde_json::from_str::<Vec<String>>(&json)
                .map(|p| Loaded::Active(Some(p)))
                .map_err(|e| AccessError::CorruptPermissions {
                    supplier_id: supplier,
                    brand_id: brand,
                    database: db.to_string(),
                    detail: format!("{e} in {json:?}"),
                }),
        }
    }

    /// Read-through: the cached answer, else MySQL's (then cached for
    /// [`PERMISSION_TTL_SECS`], "no access" included as `null`). An unknown supplier is an
    /// error and is not cached; an inactive supplier has no access and is not cached either.
    pub async fn permissions(
        &self,
        servers: &Servers,
        supplier_id: &str,
        brand_id: &str,
    ) -> Result<Access, AccessError> {
        self.permissions_read(servers, supplier_id, brand_id, None)
            .await
    }

    /// The key [`permissions`](Self::permissions) reads for these ids, if both are uuids: a
    /// caller may read it along with other keys in one round trip ([`Prefetched`]).
    pub fn key_of(&self, supplier_id: &str, brand_id: &str) -> Option<String> {
        let supplier = parse_id(supplier_id).ok()?;
        let brand = parse_id(brand_id).ok()?;
        Some(self.key(&supplier, &brand))
    }

    /// [`permissions`](Self::permissions), using a value already read from Redis when it was
    /// read under the very key this lookup needs (else it reads as usual).
    pub async fn permissions_read(
        &self,
        servers: &Servers,
        supplier_id: &str,
        brand_id: &str,
        prefetched: Option<Prefetched>,
    ) -> Result<Access, AccessError> {
        let supplier = canonical_id("supplier id", supplier_id)?;
        let brand = canonical_id("brand id", brand_id)?;
        let key = self.key(&supplier, &brand);
        let redis_err = |cause| AccessError::Redis {
            supplier_id: supplier.clone(),
            brand_id: brand.clone(),
            key: key.clone(),
            cause,
        };
        let mut conn = self.conn.clone();

        let cached: Option<String> = match prefetched.filter(|p| p.key == key) {
            Some(p) => p.value,
            None => redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?,
        };
        if let Some(raw) = cached {
            match decode(&raw) {
                Ok(permissions) => {
                    metrics::counter!("tenancy_permission_cache_lookups_total", "result" => "hit")
                        .increment(1);
                    return Ok(Access {
                        permissions,
                        from_cache: true,
                    });
                }
                Err(e) => {
                    tracing::warn!(%key, value = %raw, error = %e, "unreadable permission cache entry; reloading");
                    redis::cmd("DEL")
                        .arg(&key)
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(redis_err)?;
                }
            }
        }
        metrics::counter!("tenancy_permission_cache_lookups_total", "result" => "miss")
            .increment(1);

        let loaded = self.load(servers, &supplier, &brand).await?;
        let Loaded::Active(permissions) = &loaded else {
            return Ok(Access {
                permissions: None,
                from_cache: false,
            });
        };
        let set = self
            .fill(&supplier, &brand, permissions.as_deref())
            .await
            .map_err(redis_err)?;
        if !set {
            // A grant (or another reader) wrote meanwhile; a grant's value is newer than ours.
            let current: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            if let Some(Ok(permissions)) = current.as_deref().map(decode) {
                return Ok(Access {
                    permissions,
                    from_cache: true,
                });
            }
            return Ok(Access {
                permissions: permissions.clone(),
                from_cache: false,
            });
        }

        // Close the race with revoke (module docs): if the answer changed while we were
        // caching it, drop what we cached and answer with the newer state.
        let again = match self.load(servers, &supplier, &brand).await {
            Ok(again) => again,
            Err(e) => {
                // Unverified: do not leave it behind.
                let _ = redis::cmd("DEL")
                    .arg(&key)
                    .query_async::<()>(&mut conn)
                    .await;
                return Err(e);
            }
        };
        if again != loaded {
            tracing::debug!(%key, "permissions changed while caching them; dropping the entry");
            redis::cmd("DEL")
                .arg(&key)
                .query_async::<()>(&mut conn)
                .await
                .map_err(redis_err)?;
            return Ok(Access {
                permissions: again.permissions().map(<[String]>::to_vec),
                from_cache: false,
            });
        }
        Ok(Access {
            permissions: permissions.clone(),
            from_cache: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(p: Option<&[&str]>) -> Access {
        Access {
            permissions: p.map(|ps| ps.iter().map(|s| s.to_string()).collect()),
            from_cache: false,
        }
    }

    #[test]
    fn ids_are_canonical_lowercase_hyphenated() {
        let canonical = "6f1c4b1e-8a43-4c55-9b51-0d8e3f2a9c17";
        for raw in [
            canonical,
            "6F1C4B1E-8A43-4C55-9B51-0D8E3F2A9C17",
            "6f1c4b1e8a434c559b510d8e3f2a9c17",
            " 6f1c4b1e-8a43-4c55-9b51-0d8e3f2a9c17\n",
        ] {
            assert_eq!(canonical_id("brand id", raw).unwrap(), canonical, "{raw:?}");
        }
    }

    #[test]
    fn non_uuids_are_refused_with_the_value_named() {
        for bad in [
            "",
            "acme",
            "6f1c4b1e-8a43-4c55-9b51",
            "x'; DROP DATABASE y; --",
            "6f1c4b1e-8a43-4c55-9b51-0d8e3f2a9c17:*",
        ] {
            let err = canonical_id("supplier id", bad).unwrap_err();
            assert!(
                matches!(&err, AccessError::InvalidId { what: "supplier id", value, .. } if value == bad),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(msg.starts_with("invalid supplier id"), "{msg}");
            assert!(msg.contains("not a uuid"), "{msg}");
        }
    }

    #[test]
    fn cache_values_are_json_arrays_or_null() {
        let both = vec![CATALOG_READ.to_owned(), PRICING_READ.to_owned()];
        assert_eq!(encode(Some(&both)), r#"["catalog.read","pricing.read"]"#);
        assert_eq!(encode(Some(&[])), "[]");
        assert_eq!(encode(None), "null");
        assert_eq!(decode("null").unwrap(), None);
        assert_eq!(decode(&encode(Some(&both))).unwrap(), Some(both));
        assert!(decode(r#"{"catalog.read":true}"#).is_err());
        assert!(decode("[1]").is_err());
    }

    #[test]
    fn permissions_decide_catalog_and_pricing() {
        assert!(!access(None).may_read_catalog());
        assert!(!access(None).may_read_pricing());
        assert!(!access(Some(&[])).may_read_catalog());
        let catalog = access(Some(&["catalog.read"]));
        assert!(catalog.may_read_catalog());
        assert!(!catalog.may_read_pricing());
        let pricing = access(Some(&["pricing.read"]));
        assert!(!pricing.may_read_catalog());
        assert!(pricing.may_read_pricing());
        assert!(!access(Some(&["catalog.readx", "CATALOG.READ"])).may_read_catalog());
    }

    fn record(slug: &str, database_name: Option<&str>) -> TenantRecord {
        TenantRecord {
            organisation_id: "6f1c4b1e-8a43-4c55-9b51-0d8e3f2a9c17".into(),
            organisation_type: OrganisationType::Supplier,
            slug: slug.into(),
            name: String::new(),
            database_name: database_name.map(str::to_owned),
            status: Status::Active,
            migration_version: None,
            migration_failure: None,
            failure_reason: None,
            created_at: chrono::Utc::now(),
            provisioned_at: None,
            archived_at: None,
            purge_after: None,
            archive_database: None,
            terminated_by_event: None,
            termination_reason: None,
            restored_at: None,
            purged_at: None,
            lifecycle_pending: None,
            lifecycle_at: None,
            server: "home".into(),
            region: None,
        }
    }

    #[test]
    fn supplier_database_is_rederived_not_taken_from_the_row() {
        let ns = Namespace::parse("blindstrader").unwrap();
        let ok = supplier_database(&ns, &record("acme", Some("blindstrader_supplier_acme")));
        assert_eq!(ok.unwrap().quoted(), "`blindstrader_supplier_acme`");
        for (slug, db) in [
            ("acme", Some("mysql")),
            ("acme", None),
            ("acme", Some("blindstrader_brand_acme")),
            ("ac`me", Some("blindstrader_supplier_ac`me")),
        ] {
            let err = supplier_database(&ns, &record(slug, db)).unwrap_err();
            assert!(
                matches!(err, AccessError::InconsistentTenant { .. }),
                "{err:?}"
            );
        }
    }
}
