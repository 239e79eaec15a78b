//! Tenant resolution: a brand named by its slug (path) or by `{slug}.brand.{base domain}`, a
//! retailer by `{slug}.{base domain}` or by a custom domain from the domains projection; each
//! answered from the Redis domain cache `{ns}:domain:{host}` or, on a miss, from the platform
//! tables.
//!
//! Slugs may hold `_`, host names may not: in a host label a slug's `_` is written `-` (slugs
//! never hold `-`, so the mapping goes both ways).
//!
//! # The generation guard
//!
//! Every cached entry records the value of `{ns}:domain-generation` read *before* its answer
//! was loaded, and counts only while the generation is still that value. Whatever changes an
//! answer (a domain assigned or removed, a tenant archived, restored or purged) commits first,
//! then increments the generation (and deletes the keys it knows). So a lookup that was in
//! flight during the change either read the generation after the increment (and so loaded
//! after the commit), or its entry carries the old generation and is never served; the fill
//! itself is a compare-and-set on the generation, so such an entry is not even written. A
//! missing generation (flushed, evicted) restarts at the current microsecond, never at a value
//! an earlier entry could carry. The
//! price: any such change refreshes every entry of the namespace, which is cheap at the rate
//! tenants and domains change.

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sqlx::{MySqlPool, Row};

use crate::cache::permissions::Prefetched;
use crate::cache::{domain_generation_key, domain_key, start_generation};
use crate::domains::host::Host;
use crate::store::tenants::Status;
use crate::tenant::{DatabaseName, Namespace, OrganisationType, ServiceDatabase, Slug};

use super::error::ApiError;

/// How long an answer is cached (an entry also ends when the generation moves).
pub const DOMAIN_TTL_SECS: u64 = 300;
/// How long "no such tenant" is cached: short, so a tenant created meanwhile answers soon.
pub const NEGATIVE_TTL_SECS: u64 = 5;

/// SET the entry only if the generation is still the one read before loading it.
const FILL_IF_GENERATION: &str = r"
local current = redis.call('GET', KEYS[2])
if current and current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0";

/// What a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Brand(Slug),
    Retailer(Slug),
    /// A custom domain, looked up in `{ns}_platform.retailer_domains`.
    Domain(Host),
}

/// A resolved tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub organisation_id: String,
    pub organisation_type: OrganisationType,
    pub slug: String,
    pub name: String,
    pub status: Status,
    /// A termination or restore is under way.
    #[serde(default)]
    pub changing: bool,
    /// The MySQL server its database is on (entries cached before placement existed were all
    /// on the home server).
    #[serde(default = "home_server")]
    pub server: String,
}

fn home_server() -> String {
    crate::store::servers::HOME.to_owned()
}

impl Tenant {
    /// The live database, re-derived from the validated type and slug.
    pub fn database(&self, ns: &Namespace) -> Result<DatabaseName, ApiError> {
        Slug::parse(&self.slug)
            .and_then(|s| ns.tenant_database(self.organisation_type, &s))
            .map_err(|e| ApiError::service("the tenants table", e))
    }

    /// The tenant if requests may be answered from it: 410 when archived or purged, 503 while
    /// a termination or restore moves its tables, 404 while it is not provisioned.
    pub fn usable(self) -> Result<Tenant, ApiError> {
        let who = format!(
            "{} {:?} ({})",
            self.organisation_type.db_word(),
            self.slug,
            self.organisation_id
        );
        if self.changing {
            return Err(ApiError::unavailable(
                "tenant_changing",
                format!("{who} is being archived or restored; try again shortly"),
            ));
        }
        match self.status {
            Status::Active => Ok(self),
            Status::Archived | Status::Purged => Err(ApiError::gone(format!(
                "{who} was terminated and is {}",
                self.status
            ))),
            Status::Provisioning | Status::Failed => Err(ApiError::not_found(format!(
                "{who} is not provisioned ({})",
                self.status
            ))),
        }
    }

    /// Only settled states are cached; a tenant mid-change or mid-provisioning is re-read.
    fn cacheable(&self) -> bool {
        !self.changing
            && matches!(
                self.status,
                Status::Active | Status::Archived | Status::Purged
            )
    }
}

/// What [`Resolver::resolve_with`] read.
pub struct Resolved {
    /// The tenant, `None` when there is none.
    pub tenant: Option<Tenant>,
    /// The domain generation read before the answer was (loaded or) cached; empty when it was
    /// missing and had to be started.
    pub generation: String,
    /// The extra keys asked for, in their order.
    pub also: Vec<Prefetched>,
}

/// A cache entry: the answer (`None` for "no such tenant") and the generation it was loaded at.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    generation: String,
    tenant: Option<Tenant>,
}

/// The host name in a slug's form (`_` → `-`).
pub fn host_label(slug: &Slug) -> String {
    slug.as_str().replace('_', "-")
}

/// The slug a host label stands for, or why it stands for none.
fn slug_of_label(label: &str) -> Result<Slug, ApiError> {
    Slug::parse(&label.replace('-', "_")).map_err(|_| {
        ApiError::bad_request(
            "invalid_host",
            format!("host label {label:?} is not a tenant slug (a-z first, then a-z, 0-9, '-')"),
        )
    })
}

/// A slug from a path segment, or a 400 saying why it is not one.
pub fn slug_of_path(raw: &str) -> Result<Slug, ApiError> {
    Slug::parse(raw).map_err(|_| {
        ApiError::bad_request(
            "invalid_slug",
            format!(
                "{:?} is not a tenant slug (a-z first, then a-z, 0-9 and '_', at most 48)",
                raw.chars().take(80).collect::<String>()
            ),
        )
    })
}

/// What a `Host` header names. The port is ignored; anything that is not a valid host
/// name is a 400 before it reaches Redis or SQL.
pub fn lookup_of_host(base: &Host, raw: &str) -> Result<Lookup, ApiError> {
    let without_port = match raw.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => raw,
    };
    let host = Host::parse(without_port)
        .map_err(|e| ApiError::bad_request("invalid_host", e.to_string()))?;
    let base = base.as_str();
    let under = |suffix: &str| {
        host.as_str()
            .strip_suffix(suffix)
            .and_then(|rest| rest.strip_suffix('.'))
            .filter(|label| !label.contains('.'))
            .map(str::to_owned)
    };
    if let Some(label) = under(&format!("brand.{base}")) {
        return Ok(Lookup::Brand(slug_of_label(&label)?));
    }
    if let Some(label) = under(base) {
        return Ok(Lookup::Retailer(slug_of_label(&label)?));
    }
    Ok(Lookup::Domain(host))
}

/// The organisation id each brand slug last resolved to in this process. Only a guess, to read
/// the supplier's permission in the same Redis round trip as the brand's resolution: that read
/// is used only when it was made under the key of the id the resolution returns
/// (`PermissionCache::permissions_read`), so a stale guess costs the second round trip, never
/// a wrong answer.
#[derive(Default)]
pub struct RecentIds(std::sync::Mutex<std::collections::HashMap<String, String>>);

impl RecentIds {
    /// Slugs remembered at most; past that the map starts again (a guess is only a guess).
    const MAX: usize = 100_000;

    pub fn get(&self, slug: &Slug) -> Option<String> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(slug.as_str()).cloned()
    }

    pub fn remember(&self, slug: &Slug, organisation_id: &str) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(slug.as_str()).map(String::as_str) == Some(organisation_id) {
            return;
        }
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(slug.as_str().to_owned(), organisation_id.to_owned());
    }
}

#[derive(Clone)]
pub struct Resolver {
    ns: Namespace,
    base: Host,
    pool: MySqlPool,
    redis: ConnectionManager,
    platform: DatabaseName,
}

impl Resolver {
    pub fn new(ns: &Namespace, base: Host, pool: MySqlPool, redis: ConnectionManager) -> Self {
        Resolver {
            platform: ns.service_database(ServiceDatabase::Platform),
            ns: ns.clone(),
            base,
            pool,
            redis,
        }
    }

    pub fn base(&self) -> &Host {
        &self.base
    }

    /// The host a lookup is cached under.
    pub fn cache_host(&self, lookup: &Lookup) -> String {
        match lookup {
            Lookup::Brand(slug) => format!("{}.brand.{}", host_label(slug), self.base),
            Lookup::Retailer(slug) => format!("{}.{}", host_label(slug), self.base),
            Lookup::Domain(host) => host.as_str().to_owned(),
        }
    }

    /// The tenant a lookup names, `None` when there is none; from the cache when it holds a
    /// current answer.
    pub async fn resolve(&self, lookup: &Lookup) -> Result<Option<Tenant>, ApiError> {
        Ok(self.resolve_with(lookup, &[]).await?.tenant)
    }

    /// [`resolve`](Self::resolve), also reading the Redis keys `also` in the same round trip
    /// (the request's next lookups, e.g. a permission and a catalog version).
    pub async fn resolve_with(
        &self,
        lookup: &Lookup,
        also: &[String],
    ) -> Result<Resolved, ApiError> {
        let key = domain_key(&self.ns, &self.cache_host(lookup));
        let (cached, generation, also) = self
            .cached_with(&key, also)
            .await
            .map_err(|e| ApiError::service("Redis", e))?;
        if let Some(tenant) = cached {
            metrics::counter!("tenancy_domain_cache_lookups_total", "result" => "hit").increment(1);
            return Ok(Resolved {
                tenant,
                generation,
                also,
            });
        }
        metrics::counter!("tenancy_domain_cache_lookups_total", "result" => "miss").increment(1);
        let tenant = self.load(lookup).await?;
        // The answer stands whether or not it could be cached.
        if let Err(e) = self.fill(&key, &generation, tenant.as_ref()).await {
            tracing::warn!(%key, error = %e, "cannot fill the domain cache");
        }
        Ok(Resolved {
            tenant,
            generation,
            also,
        })
    }

    /// The entry under `key` if it is current (`Some(None)` caches "no such tenant"), and the
    /// generation now, read in one round trip. A missing generation is started (nothing is
    /// current then, and nothing is filled under it: the fill finds it changed).
    pub async fn cached(&self, key: &str) -> redis::RedisResult<(Option<Option<Tenant>>, String)> {
        let (cached, generation, _) = self.cached_with(key, &[]).await?;
        Ok((cached, generation))
    }

    /// [`cached`](Self::cached), with the values of the keys `also` read by the same MGET.
    async fn cached_with(
        &self,
        key: &str,
        also: &[String],
    ) -> redis::RedisResult<(Option<Option<Tenant>>, String, Vec<Prefetched>)> {
        let mut conn = self.redis.clone();
        let mut mget = redis::cmd("MGET");
        mget.arg(key).arg(domain_generation_key(&self.ns)).arg(also);
        let values: Vec<Option<String>> = mget.query_async(&mut conn).await?;
        let mut values = values.into_iter();
        let (cached, generation) = (values.next().flatten(), values.next().flatten());
        let also = also
            .iter()
            .map(|key| Prefetched {
                key: key.clone(),
                value: values.next().flatten(),
            })
            .collect();
        let Some(generation) = generation else {
            start_generation(&mut conn, &self.ns).await?;
            return Ok((None, String::new(), also));
        };
        let current = cached
            .and_then(|raw| serde_json::from_str::<Entry>(&raw).ok())
            .filter(|entry| entry.generation == generation)
            .map(|entry| entry.tenant);
        Ok((current, generation, also))
    }

    /// Caches an answer loaded after reading `generation`, unless the generation has moved
    /// since (then the answer may predate a change, and is not written). Settled states only.
    /// True when it was written.
    pub async fn fill(
        &self,
        key: &str,
        generation: &str,
        tenant: Option<&Tenant>,
    ) -> redis::RedisResult<bool> {
        if tenant.is_some_and(|t| !t.cacheable()) {
            return Ok(false);
        }
        let ttl = if tenant.is_some() {
            DOMAIN_TTL_SECS
        } else {
            NEGATIVE_TTL_SECS
        };
        let entry = Entry {
            generation: generation.to_owned(),
            tenant: tenant.cloned(),
        };
        let written: i64 = redis::cmd("EVAL")
            .arg(FILL_IF_GENERATION)
            .arg(2)
            .arg(key)
            .arg(domain_generation_key(&self.ns))
            .arg(generation)
            .arg(serde_json::to_string(&entry).expect("entries serialise"))
            .arg(ttl)
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(written == 1)
    }

    /// The answer from MySQL: the tenants row whose database is the one its type and slug
    /// name (so a refused or failed row with the same slug never answers).
    pub async fn load(&self, lookup: &Lookup) -> Result<Option<Tenant>, ApiError> {
        let tenants = format!("{}.tenants", self.platform.quoted());
        let columns = "t.organisation_id, CAST(t.organisation_type AS CHAR) AS organisation_type, \
                       t.slug, t.name, CAST(t.status AS CHAR) AS status, t.database_name, \
                       t.lifecycle_pending, t.server";
        let row = match lookup {
            Lookup::Brand(slug) | Lookup::Retailer(slug) => {
                let kind = match lookup {
                    Lookup::Brand(_) => OrganisationType::Brand,
                    _ => OrganisationType::Retailer,
                };
                let db = self
                    .ns
                    .tenant_database(kind, slug)
                    .map_err(|e| ApiError::bad_request("invalid_slug", e.to_string()))?;
                sqlx::query(&format!(
                    "SELECT {columns} FROM {tenants} t WHERE t.database_name = ? \
                     AND t.organisation_type = ?"
                ))
                .bind(db.as_str())
                .bind(kind.symbol())
                .fetch_optional(&self.pool)
                .await?
            }
            Lookup::Domain(host) => {
                sqlx::query(&format!(
                    "SELECT {columns} FROM {}.retailer_domains d \
                     JOIN {tenants} t ON t.organisation_id = d.retailer_id \
                     WHERE d.host = ? AND t.organisation_type = 'RETAILER'",
                    self.platform.quoted()
                ))
                .bind(host.as_str())
                .fetch_optional(&self.pool)
                .await?
            }
        };
        let Some(row) = row else {
            return Ok(None);
        };
        let kind_text: String = row.try_get("organisation_type")?;
        let status_text: String = row.try_get("status")?;
        let tenant = Tenant {
            organisation_id: row.try_get("organisation_id")?,
            organisation_type: OrganisationType::parse(&kind_text)
                .map_err(|e| ApiError::service("the tenants table", e))?,
            slug: row.try_get("slug")?,
            name: row.try_get("name")?,
            status: Status::parse(&status_text).unwrap_or(Status::Failed),
            changing: row
                .try_get::<Option<String>, _>("lifecycle_pending")?
                .is_some(),
            server: row.try_get("server")?,
        };
        // A row whose database is not the one its type and slug derive never answers.
        let stored: Option<String> = row.try_get("database_name")?;
        if stored.as_deref() != tenant.database(&self.ns).ok().as_ref().map(|d| d.as_str()) {
            return Ok(None);
        }
        Ok(Some(tenant))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_and_host_labels_map_both_ways() {
        let slug = Slug::parse("new_blinds2").unwrap();
        assert_eq!(host_label(&slug), "new-blinds2");
        assert_eq!(slug_of_label("new-blinds2").unwrap(), slug);
        assert_eq!(slug_of_label("2blinds").unwrap_err().code, "invalid_host");
    }

    #[test]
    fn hosts_name_brands_retailers_or_custom_domains() {
        let base = Host::parse("blinds.test").unwrap();
        let slug = |s: &str| Slug::parse(s).unwrap();
        let of = |raw: &str| lookup_of_host(&base, raw);
        assert_eq!(
            of("louvolite.brand.blinds.test:8080").unwrap(),
            Lookup::Brand(slug("louvolite"))
        );
        assert_eq!(
            of("New-Blinds.Blinds.Test.").unwrap(),
            Lookup::Retailer(slug("new_blinds"))
        );
        assert_eq!(
            of("shop.example.com").unwrap(),
            Lookup::Domain(Host::parse("shop.example.com").unwrap())
        );
        // Deeper names under the base are not slugs: looked up as custom domains.
        assert!(matches!(of("a.b.blinds.test").unwrap(), Lookup::Domain(_)));
        for bad in [
            "",
            "127.0.0.1",
            "../x.test",
            "a'b.test",
            "x%00.test",
            "9x.blinds.test",
            &format!("{}.test", "a".repeat(300)),
        ] {
            let e = of(bad).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn path_slugs_are_validated_before_anything_else() {
        for bad in [
            "../etc",
            "a'b",
            "a%00",
            "A",
            "bücher",
            "a-b",
            "",
            &"a".repeat(49),
        ] {
            let e = slug_of_path(bad).unwrap_err();
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST, "{bad:?}");
        }
        assert!(slug_of_path("louvolite").is_ok());
    }

    #[test]
    fn only_settled_states_are_cached() {
        let t = |status, changing| Tenant {
            organisation_id: "x".into(),
            organisation_type: OrganisationType::Retailer,
            slug: "s".into(),
            name: String::new(),
            status,
            changing,
            server: "home".into(),
        };
        assert!(t(Status::Active, false).cacheable());
        assert!(t(Status::Archived, false).cacheable());
        assert!(!t(Status::Active, true).cacheable());
        assert!(!t(Status::Provisioning, false).cacheable());
        assert_eq!(
            t(Status::Archived, false).usable().unwrap_err().status,
            axum::http::StatusCode::GONE
        );
        assert_eq!(
            t(Status::Active, true).usable().unwrap_err().status,
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
