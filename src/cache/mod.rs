//! The namespace's Redis caches: the connection, the key layout (docs/architecture.md, "Names"), and forgetting
//! every key that names a tenant (what a termination or purge leaves behind).
//!
//! - permission cache: `{ns}:supplier:{supplier_id}:brand_access:{brand_id}` (see
//!   `access::cache` for what the values mean and who writes them);
//! - domain cache: `{ns}:domain:{host}`, guarded by the generation `{ns}:domain-generation`
//!   (see `serve::resolve`): whatever changes what a host resolves to calls
//!   [`Redis::domains_changed`] after its commit;
//! - catalog version: `{ns}:catalog-version:{brand_id}`, moved on by the catalog processor after
//!   every commit to the brand's database ([`Redis::catalog_changed`]); `tenancy serve` keeps a
//!   page of a brand's catalog only while it holds (see `serve::pages`).

pub mod permissions;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::tenant::Namespace;

/// A uuid as canonical lower-case hyphenated text; other text unchanged.
fn canonical(id: &str) -> String {
    uuid::Uuid::parse_str(id.trim())
        .map(|u| u.hyphenated().to_string())
        .unwrap_or_else(|_| id.to_owned())
}

/// `{ns}:supplier:{supplier_id}:brand_access:{brand_id}`; ids that parse as uuids are written in
/// canonical form, so `ABC…` and `abc…` share a key.
pub fn permission_key(ns: &Namespace, supplier_id: &str, brand_id: &str) -> String {
    format!(
        "{ns}:supplier:{}:brand_access:{}",
        canonical(supplier_id),
        canonical(brand_id)
    )
}

/// `{ns}:domain:{host}`.
pub fn domain_key(ns: &Namespace, host: &str) -> String {
    format!("{ns}:domain:{host}")
}

/// `{ns}:domain-generation`: moved on by every change that can alter a resolution.
pub fn domain_generation_key(ns: &Namespace) -> String {
    format!("{ns}:domain-generation")
}

/// `{ns}:catalog-version:{brand_id}` (a uuid in canonical form): moved on after every commit
/// to the brand's catalog.
pub fn catalog_version_key(ns: &Namespace, brand_id: &str) -> String {
    format!("{ns}:catalog-version:{}", canonical(brand_id))
}

/// The microseconds since the epoch: where a missing generation or version restarts.
fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// Sets the domain generation, if it is missing (never set, flushed or evicted), to a value no
/// earlier generation had: the microseconds since the epoch. A generation that restarted at a
/// small number could match entries written under an earlier one and serve them again.
pub async fn start_generation(
    conn: &mut ConnectionManager,
    ns: &Namespace,
) -> redis::RedisResult<()> {
    start_counter(conn, &domain_generation_key(ns)).await
}

/// Sets a generation or version counter, if it is missing, to the microseconds since the
/// epoch (see [`start_generation`]).
pub async fn start_counter(conn: &mut ConnectionManager, key: &str) -> redis::RedisResult<()> {
    redis::cmd("SET")
        .arg(key)
        .arg(now_micros())
        .arg("NX")
        .query_async::<Option<String>>(conn)
        .await?;
    Ok(())
}

/// `redis://user:secret@host` → `redis://***@host`, for error messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// One multiplexed Redis connection for a namespace; cheap to clone, reconnects by itself.
#[derive(Clone)]
pub struct Redis {
    conn: ConnectionManager,
    ns: Namespace,
}

impl Redis {
    pub async fn connect(redis_url: &str, ns: &Namespace) -> anyhow::Result<Redis> {
        let client = redis::Client::open(redis_url)
            .map_err(|e| anyhow::anyhow!("invalid Redis URL {}: {e}", redact(redis_url)))?;
        // Few quick retries: an unreachable Redis is reported in about a second rather than
        // after the default six backed-off attempts; callers (the loop's outage wait, an
        // operator) decide whether to try again. Reconnection after a drop stays automatic.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(2)
            .set_max_delay(std::time::Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot connect to Redis at {}: {e}", redact(redis_url))
            })?;
        Ok(Redis {
            conn,
            ns: ns.clone(),
        })
    }

    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// Deletes every cached answer that names `organisation_id` (as supplier or as brand) and
    /// the given domain keys. SCAN, not an index, so keys written by any path are found.
    /// Returns how many keys went.
    pub async fn forget_tenant(
        &self,
        organisation_id: &str,
        domains: &[String],
    ) -> redis::RedisResult<usize> {
        let id = uuid::Uuid::parse_str(organisation_id).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::Client,
                "invalid organisation id",
                e.to_string(),
            ))
        })?;
        let id = id.hyphenated().to_string();
        let mut conn = self.conn.clone();
        let mut keys: Vec<String> = Vec::new();
        for pattern in [
            format!("{}:supplier:{id}:brand_access:*", self.ns),
            format!("{}:supplier:*:brand_access:{id}", self.ns),
        ] {
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await?;
                keys.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        let mut removed = 0;
        if !keys.is_empty() {
            removed = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
        }
        // Not counted: a brand's catalog version is bookkeeping, not a cached answer.
        redis::cmd("DEL")
            .arg(catalog_version_key(&self.ns, &id))
            .query_async::<()>(&mut conn)
            .await?;
        // The tenant's status changed: every cached resolution is stale, its own hosts and
        // `{slug}.{base domain}` names alike.
        Ok(removed + self.domains_changed(domains).await?)
    }

    /// After a commit that changes what hosts resolve to (a domain assigned or removed, a
    /// tenant archived, restored or purged): moves the domain generation on, so no entry loaded
    /// before it is served or written, then deletes the named hosts' keys. Returns how many keys
    /// went.
    pub async fn domains_changed(&self, hosts: &[String]) -> redis::RedisResult<usize> {
        let mut conn = self.conn.clone();
        start_generation(&mut conn, &self.ns).await?;
        redis::cmd("INCR")
            .arg(domain_generation_key(&self.ns))
            .query_async::<i64>(&mut conn)
            .await?;
        if hosts.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = hosts.iter().map(|h| domain_key(&self.ns, h)).collect();
        redis::cmd("DEL").arg(&keys).query_async(&mut conn).await
    }

    /// After a commit to a brand's catalog (or a redelivery that found it committed, which
    /// covers a worker killed between its commit and this call): moves the brand's catalog
    /// version on, so `tenancy serve` stops answering from pages read before it. A missing
    /// version restarts at the microseconds since the epoch, never at a value an earlier page
    /// could carry.
    pub async fn catalog_changed(&self, brand_id: &str) -> redis::RedisResult<()> {
        let key = catalog_version_key(&self.ns, brand_id);
        redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(now_micros())
            .arg("NX")
            .ignore()
            .cmd("INCR")
            .arg(&key)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_design() {
        let ns = Namespace::parse("blindstrader").unwrap();
        assert_eq!(
            permission_key(
                &ns,
                "6F1C4B1E-8A43-4C55-9B51-0D8E3F2A9C17",
                "0b6f3c1e-3e43-4c55-9d0b-1c1c1c1c1c1c"
            ),
            "blindstrader:supplier:6f1c4b1e-8a43-4c55-9b51-0d8e3f2a9c17:brand_access:0b6f3c1e-3e43-4c55-9d0b-1c1c1c1c1c1c"
        );
        assert_eq!(
            domain_key(&ns, "newblinds.example"),
            "blindstrader:domain:newblinds.example"
        );
        assert_eq!(
            catalog_version_key(&ns, "0B6F3C1E-3E43-4C55-9D0B-1C1C1C1C1C1C"),
            "blindstrader:catalog-version:0b6f3c1e-3e43-4c55-9d0b-1c1c1c1c1c1c"
        );
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("redis://u:secret@h:6379"), "redis://***@h:6379");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
