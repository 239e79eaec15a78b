//! The Redis permission cache and `tenancy access` against real MariaDB and Redis (no Kafka):
//! each test migrates its own `{ns}_platform` and supplier database, registers the supplier and
//! writes `brand_access` rows directly, then reads through the cache and the real binary.

mod common;

use std::time::{Duration, Instant};

use blindstrader_tenancy::cache::permissions::{
    AccessError, Loaded, PermissionCache, PERMISSION_TTL_SECS,
};
use blindstrader_tenancy::store::servers::Servers;
use blindstrader_tenancy::store::tenants::Status;
use blindstrader_tenancy::tenancy::migrations;
use blindstrader_tenancy::tenant::{DatabaseName, OrganisationType, ServiceDatabase, Slug};
use common::*;
use sqlx::MySqlPool;
use tokio::sync::RwLock;

/// Tests take it shared; the one that pauses Redis writes takes it exclusively, so the blocked
/// SET it waits for can only be its own reader's.
static REDIS_PAUSE: RwLock<()> = RwLock::const_new(());

const BOTH: &str = r#"["catalog.read","pricing.read"]"#;
const CATALOG: &str = r#"["catalog.read"]"#;

struct Fixture {
    t: TestNs,
    pool: MySqlPool,
    servers: Servers,
    cache: PermissionCache,
    redis: redis::aio::MultiplexedConnection,
    supplier: String,
    supplier_db: DatabaseName,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // TestNs drops the databases afterwards; the Redis keys are ours to remove.
        let _ = delete_redis_keys(&self.t.config.redis_url, &self.t.ns);
    }
}

async fn fixture() -> Fixture {
    let t = TestNs::new();
    let pool = t.pool().await;
    migrations::create_and_migrate(
        &pool,
        &t.config.database_url,
        &t.ns.service_database(ServiceDatabase::Platform),
        migrations::for_service(ServiceDatabase::Platform),
    )
    .await
    .unwrap();
    let cache = PermissionCache::connect(&t.config.redis_url, &t.ns)
        .await
        .unwrap();
    let redis = redis::Client::open(t.config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let supplier = new_id();
    let supplier_db = add_tenant(
        &t,
        &pool,
        &supplier,
        OrganisationType::Supplier,
        "acme",
        "active",
    )
    .await;
    Fixture {
        servers: Servers::single(pool.clone(), &t.config.database_url),
        t,
        pool,
        cache,
        redis,
        supplier,
        supplier_db,
    }
}

/// Creates and migrates the tenant's database and registers it with `status`.
async fn add_tenant(
    t: &TestNs,
    pool: &MySqlPool,
    id: &str,
    kind: OrganisationType,
    slug: &str,
    status: &str,
) -> DatabaseName {
    let db =
        t.ns.tenant_database(kind, &Slug::parse(slug).unwrap())
            .unwrap();
    migrations::create_and_migrate(
        pool,
        &t.config.database_url,
        &db,
        migrations::for_tenant(kind),
    )
    .await
    .unwrap();
    sqlx::query(&format!(
        "INSERT INTO `{}_platform`.tenants (organisation_id, organisation_type, slug, name, \
         database_name, status, created_at) VALUES (?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(3))",
        t.ns
    ))
    .bind(id)
    .bind(kind.symbol())
    .bind(slug)
    .bind(format!("{slug} Ltd"))
    .bind(db.as_str())
    .bind(status)
    .execute(pool)
    .await
    .unwrap();
    db
}

impl Fixture {
    async fn set_supplier(&self, column: &str, value: &str) {
        assert!(["status", "database_name"].contains(&column));
        sqlx::query(&format!(
            "UPDATE `{}_platform`.tenants SET {column} = ? WHERE organisation_id = ?",
            self.t.ns
        ))
        .bind(value)
        .bind(&self.supplier)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// Writes the supplier's brand_access row directly (what the access projector commits).
    async fn grant(&self, brand: &str, permissions_json: &str) {
        sqlx::query(&format!(
            "INSERT INTO {}.brand_access (brand_id, permissions, granted_at) \
             VALUES (?, ?, UTC_TIMESTAMP(3)) ON DUPLICATE KEY UPDATE permissions = VALUES(permissions)",
            self.supplier_db.quoted()
        ))
        .bind(brand)
        .bind(permissions_json)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    async fn revoke(&self, brand: &str) {
        sqlx::query(&format!(
            "DELETE FROM {}.brand_access WHERE brand_id = ?",
            self.supplier_db.quoted()
        ))
        .bind(brand)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    fn key(&self, brand: &str) -> String {
        format!(
            "{}:supplier:{}:brand_access:{brand}",
            self.t.ns, self.supplier
        )
    }

    async fn raw(&self, key: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.redis.clone())
            .await
            .unwrap()
    }

    async fn ttl(&self, key: &str) -> i64 {
        redis::cmd("TTL")
            .arg(key)
            .query_async(&mut self.redis.clone())
            .await
            .unwrap()
    }

    async fn assert_fresh_ttl(&self, key: &str) {
        let ttl = self.ttl(key).await;
        assert!(
            (1..=PERMISSION_TTL_SECS as i64).contains(&ttl) && ttl >= 290,
            "TTL of {key} is {ttl}, expected about {PERMISSION_TTL_SECS}"
        );
    }

    /// `tenancy access ARGS…`: exit code, stdout, stderr.
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = self
            .t
            .tenancy()
            .arg("access")
            .args(args)
            .output()
            .expect("run tenancy access");
        (
            out.status.code().expect("exit code"),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }
}

fn perms(json: &str) -> Option<Vec<String>> {
    serde_json::from_str(json).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_miss_loads_from_mysql_and_caches_with_the_ttl() {
    let _shared = REDIS_PAUSE.read().await;
    let f = fixture().await;
    let brand = new_id();
    f.grant(&brand, BOTH).await;
    let key = f.key(&brand);
    assert_eq!(f.cache.key(&f.supplier, &brand), key);
    assert_eq!(f.raw(&key).await, None, "nothing cached yet");

    let first = f
        .cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();
    assert_eq!(first.permissions, perms(BOTH));
    assert!(!first.from_cache, "a miss is answered from MySQL");
    assert!(first.may_read_catalog() && first.may_read_pricing());
    assert_eq!(f.raw(&key).await.as_deref(), Some(BOTH));
    f.assert_fresh_ttl(&key).await;

    let second = f
        .cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();
    assert_eq!(second.permissions, perms(BOTH));
    assert!(second.from_cache, "the second read is a hit");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hit_is_served_from_redis_even_after_mysql_changed() {
    let _shared = REDIS_PAUSE.read().await;
    let f = fixture().await;
    let brand = new_id();
    f.grant(&brand, BOTH).await;
    f.cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();

    // Changed behind the cache's back (no store/invalidate): the cache still answers.
    f.grant(&brand, r#"["pricing.read"]"#).await;
    let cached = f
        .cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();
    assert!(cached.from_cache);
    assert_eq!(cached.permissions, perms(BOTH));

    // Once invalidated, the next read sees MySQL's current row.
    f.cache.invalidate(&f.supplier, &brand).await.unwrap();
    let fresh = f
        .cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();
    assert!(!fresh.from_cache);
    assert_eq!(fresh.permissions, perms(r#"["pricing.read"]"#));
    assert!(!fresh.may_read_catalog() && fresh.may_read_pricing());
}

#[tokio::test(flavor = "multi_thread")]
async fn store_rewrites_the_key_with_a_fresh_ttl() {
    let _shared = REDIS_PAUSE.read().await;
    let f = fixture().await;
    let brand = new_id();
    f.grant(&brand, CATALOG).await;
    f.cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();
    let key = f.key(&brand);
    assert_eq!(f.raw(&key).await.as_deref(), Some(CATALOG));
    redis::cmd("EXPIRE")
        .arg(&key)
        .arg(10)
        .query_async::<()>(&mut f.redis.clone())
        .await
        .unwrap();

    // Upper-case ids (as a foreign producer might send them) land on the canonical key.
    let both: Vec<String> = perms(BOTH).unwrap();
    f.cache
        .store(&f.supplier.to_uppercase(), &brand.to_uppercase(), &both)
        .await
        .unwrap();
    assert_eq!(f.raw(&key).await.as_deref(), Some(BOTH));
    f.assert_fresh_ttl(&key).await;
    let read = f
        .cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();
    assert!(read.from_cache);
    assert_eq!(read.permissions, Some(both));

    // store on a key that does not exist creates it.
    let other = new_id();
    f.cache
        .store(&f.supplier, &other, &["catalog.read".to_owned()])
        .await
        .unwrap();
    assert_eq!(f.raw(&f.key(&other)).await.as_deref(), Some(CATALOG));
}

#[tokio::test(flavor = "multi_thread")]
async fn invalidate_removes_the_key() {
    let _shared = REDIS_PAUSE.read().await;
    let f = fixture().await;
    let brand = new_id();
    f.grant(&brand, CATALOG).await;
    f.cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();
    let key = f.key(&brand);
    assert!(f.raw(&key).await.is_some());

    f.cache.invalidate(&f.supplier, &brand).await.unwrap();
    assert_eq!(f.raw(&key).await, None);
    // Idempotent: a second DEL of a missing key is fine.
    f.cache.invalidate(&f.supplier, &brand).await.unwrap();
    assert!(!f.cache.remove(&f.supplier, &brand).await.unwrap());
    // And a revoked grant then reads as no access.
    f.revoke(&brand).await;
    let after = f
        .cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();
    assert_eq!(after.permissions, None);
    assert!(!after.from_cache);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_that_loaded_before_a_grant_does_not_overwrite_it() {
    let _shared = REDIS_PAUSE.read().await;
    let f = fixture().await;
    let brand = new_id();
    // The reader's step 1: load "no access" from MySQL.
    let loaded = f.cache.load(&f.servers, &f.supplier, &brand).await.unwrap();
    assert_eq!(loaded, Loaded::Active(None));
    // Meanwhile the projector commits a grant and stores it.
    f.grant(&brand, BOTH).await;
    let both: Vec<String> = perms(BOTH).unwrap();
    f.cache.store(&f.supplier, &brand, &both).await.unwrap();
    // The reader's step 2: its SET NX must lose.
    let set = f
        .cache
        .fill(&f.supplier, &brand, loaded.permissions())
        .await
        .unwrap();
    assert!(!set, "SET NX reported success over the grant's value");
    assert_eq!(f.raw(&f.key(&brand)).await.as_deref(), Some(BOTH));
    let read = f
        .cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();
    assert_eq!((read.permissions, read.from_cache), (Some(both), true));

    // Without a value there, fill does set (with the TTL).
    let other = new_id();
    assert!(f.cache.fill(&f.supplier, &other, None).await.unwrap());
    assert_eq!(f.raw(&f.key(&other)).await.as_deref(), Some("null"));
    f.assert_fresh_ttl(&f.key(&other)).await;
}

/// The race the module docs describe: the reader loads the grant, the revoke commits (and its
/// DEL finds nothing), then the reader's SET NX lands. The reader must not leave the revoked
/// permissions behind. Redis writes are paused (CLIENT PAUSE WRITE) to hold the reader between
/// its load and its SET.
#[tokio::test(flavor = "multi_thread")]
async fn a_revoke_between_a_readers_load_and_its_set_is_not_served_stale() {
    let _exclusive = REDIS_PAUSE.write().await;
    let f = fixture().await;
    let mut admin = f.redis.clone();
    for attempt in 1..=5 {
        let brand = new_id();
        f.grant(&brand, CATALOG).await;
        let key = f.key(&brand);

        let paused_at = Instant::now();
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(450)
            .arg("WRITE")
            .query_async::<()>(&mut admin)
            .await
            .unwrap();
        let reader = {
            let (cache, servers, supplier, brand) = (
                f.cache.clone(),
                f.servers.clone(),
                f.supplier.clone(),
                brand.clone(),
            );
            tokio::spawn(async move { cache.permissions(&servers, &supplier, &brand).await })
        };
        // Wait until the reader has loaded and is blocked on its SET.
        let mut blocked = false;
        while paused_at.elapsed() < Duration::from_millis(250) {
            let clients: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut admin)
                .await
                .unwrap();
            if clients.lines().any(|l| {
                l.contains(" cmd=set ")
                    && l.split(' ')
                        .any(|kv| kv.starts_with("flags=") && kv.contains('b'))
            }) {
                blocked = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if blocked {
            // The revoke commits; its DEL would find no key (the reader has not set it yet).
            f.revoke(&brand).await;
        }
        let in_time = paused_at.elapsed() < Duration::from_millis(400);
        redis::cmd("CLIENT")
            .arg("UNPAUSE")
            .query_async::<()>(&mut admin)
            .await
            .unwrap();
        let answer = reader.await.unwrap();
        if !(blocked && in_time) {
            eprintln!("attempt {attempt}: timing missed (blocked={blocked}); retrying");
            continue;
        }
        let answer = answer.expect("reader's answer");
        assert_eq!(
            answer.permissions, None,
            "reader answered with revoked permissions"
        );
        let cached = f.raw(&key).await;
        assert!(
            cached.is_none() || cached.as_deref() == Some("null"),
            "revoked permissions left in the cache: {cached:?}"
        );
        let next = f
            .cache
            .permissions(&f.servers, &f.supplier, &brand)
            .await
            .unwrap();
        assert_eq!(next.permissions, None);
        return;
    }
    panic!("could not stage the race in 5 attempts");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_access_is_cached_as_null_and_the_cli_exits_1() {
    let _shared = REDIS_PAUSE.read().await;
    let f = fixture().await;
    let brand = new_id();
    let first = f
        .cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();
    assert_eq!((first.permissions.clone(), first.from_cache), (None, false));
    assert!(!first.may_read_catalog());
    let key = f.key(&brand);
    assert_eq!(f.raw(&key).await.as_deref(), Some("null"));
    f.assert_fresh_ttl(&key).await;
    let second = f
        .cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();
    assert_eq!((second.permissions, second.from_cache), (None, true));

    let (code, out, err) = f.cli(&["check", &f.supplier, &brand]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert_eq!(out, "none\nsource: cache\n");
    assert!(err.contains("not allowed"), "{err}");

    // A grant without catalog.read is not enough either.
    let pricing_only = new_id();
    f.grant(&pricing_only, r#"["pricing.read"]"#).await;
    let (code, out, err) = f.cli(&["check", &f.supplier, &pricing_only]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert_eq!(out, "[\"pricing.read\"]\nsource: database\n");
    assert!(err.contains("catalog.read"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_allows_a_granted_pair_and_reports_the_source() {
    let _shared = REDIS_PAUSE.read().await;
    let f = fixture().await;
    let brand = new_id();
    f.grant(&brand, BOTH).await;

    let (code, out, err) = f.cli(&["check", &f.supplier, &brand]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert_eq!(out, format!("{BOTH}\nsource: database\n"));
    assert!(err.contains("allowed"), "{err}");
    assert_eq!(f.raw(&f.key(&brand)).await.as_deref(), Some(BOTH));

    // Upper-case ids are the same pair; now a hit.
    let (code, out, _) = f.cli(&["check", &f.supplier.to_uppercase(), &brand.to_uppercase()]);
    assert_eq!(code, 0);
    assert_eq!(out, format!("{BOTH}\nsource: cache\n"));

    let (code, out, _) = f.cli(&["check", "--json", &f.supplier, &brand]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["permissions"],
        serde_json::json!(["catalog.read", "pricing.read"])
    );
    assert_eq!(v["from_cache"], true);
    assert_eq!(v["catalog_read"], true);
    assert_eq!(v["pricing_read"], true);
    assert_eq!(v["key"], f.key(&brand));

    // `tenancy access invalidate` drops exactly that key.
    let (code, out, err) = f.cli(&["invalidate", &f.supplier, &brand]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("removed {}\n", f.key(&brand)));
    assert_eq!(f.raw(&f.key(&brand)).await, None);
    let (code, out, _) = f.cli(&["invalidate", &f.supplier, &brand]);
    assert_eq!(code, 0);
    assert_eq!(out, format!("not cached: {}\n", f.key(&brand)));
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_and_non_supplier_organisations_are_refused_and_not_cached() {
    let _shared = REDIS_PAUSE.read().await;
    let f = fixture().await;
    let brand = new_id();
    let stranger = new_id();
    let err = f
        .cache
        .permissions(&f.servers, &stranger, &brand)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AccessError::UnknownSupplier { supplier_id, .. } if *supplier_id == stranger),
        "{err:?}"
    );
    assert!(err.to_string().contains(&stranger), "{err}");
    let stranger_key = format!("{}:supplier:{stranger}:brand_access:{brand}", f.t.ns);
    assert_eq!(
        f.raw(&stranger_key).await,
        None,
        "an unknown supplier is not cached"
    );

    let (code, out, err) = f.cli(&["check", &stranger, &brand]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert_eq!(out, "none\nsource: database\n");
    assert!(
        err.contains("unknown supplier") && err.contains(&stranger),
        "{err}"
    );

    // A brand's id is not a supplier.
    let brand_org = new_id();
    add_tenant(
        &f.t,
        &f.pool,
        &brand_org,
        OrganisationType::Brand,
        "louvolite",
        "active",
    )
    .await;
    let err = f
        .cache
        .permissions(&f.servers, &brand_org, &brand)
        .await
        .unwrap_err();
    assert!(matches!(err, AccessError::NotASupplier { .. }), "{err:?}");
    assert!(err.to_string().contains("BRAND"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inactive_supplier_has_no_access_and_is_not_cached() {
    let _shared = REDIS_PAUSE.read().await;
    let f = fixture().await;
    let brand = new_id();
    f.grant(&brand, BOTH).await;
    f.set_supplier("status", "archived").await;

    assert_eq!(
        f.cache.load(&f.servers, &f.supplier, &brand).await.unwrap(),
        Loaded::Inactive(Status::Archived)
    );
    let read = f
        .cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();
    assert_eq!((read.permissions, read.from_cache), (None, false));
    assert_eq!(f.raw(&f.key(&brand)).await, None);
    let (code, _, err) = f.cli(&["check", &f.supplier, &brand]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("archived"), "{err}");

    // Restored: answered at once, nothing stale in the way.
    f.set_supplier("status", "active").await;
    let read = f
        .cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap();
    assert_eq!(read.permissions, perms(BOTH));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_database_name_that_does_not_match_is_refused() {
    let _shared = REDIS_PAUSE.read().await;
    let f = fixture().await;
    let brand = new_id();
    f.grant(&brand, BOTH).await;
    // Never query a database name read from a row: `mysql` is not what the slug derives.
    f.set_supplier("database_name", "mysql").await;
    let err = f
        .cache
        .permissions(&f.servers, &f.supplier, &brand)
        .await
        .unwrap_err();
    assert!(
        matches!(err, AccessError::InconsistentTenant { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("mysql"), "{err}");
    assert_eq!(f.raw(&f.key(&brand)).await, None);
    let (code, _, err) = f.cli(&["check", &f.supplier, &brand]);
    assert_eq!(
        code, 3,
        "an inconsistent registry is undecided, not 'no': {err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_ids_are_refused_with_exit_2() {
    let _shared = REDIS_PAUSE.read().await;
    let f = fixture().await;
    let brand = new_id();
    let err = f
        .cache
        .permissions(&f.servers, "acme", &brand)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AccessError::InvalidId { what: "supplier id", value, .. } if value == "acme"),
        "{err:?}"
    );
    let err = f
        .cache
        .permissions(&f.servers, &f.supplier, "1234")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AccessError::InvalidId {
                what: "brand id",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(f.cache.store(&f.supplier, "x*", &[]).await.is_err());
    assert!(f.cache.invalidate("", &brand).await.is_err());

    for (args, bad, arg) in [
        (vec!["check", "acme", brand.as_str()], "acme", "SUPPLIER_ID"),
        (
            vec!["check", f.supplier.as_str(), "not-a-uuid"],
            "not-a-uuid",
            "BRAND_ID",
        ),
        (vec!["invalidate", "*", brand.as_str()], "*", "SUPPLIER_ID"),
    ] {
        let (code, out, err) = f.cli(&args);
        assert_eq!(code, 2, "{args:?}: stdout {out} stderr {err}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains(bad) && err.contains(arg) && err.contains("not a uuid"),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn check_help_explains_the_exit_status() {
    let t = TestNs::new();
    let help = |sub: &str| {
        let out = t
            .tenancy()
            .args(["access", sub, "--help"])
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8(out.stdout).unwrap(),
        )
    };
    let (code, out) = help("check");
    assert_eq!(code, 0);
    for needle in [
        "SUPPLIER_ID",
        "BRAND_ID",
        "catalog.read",
        "Exit status",
        "--json",
    ] {
        assert!(out.contains(needle), "{needle} missing from:\n{out}");
    }
    let (code, out) = help("invalidate");
    assert_eq!(code, 0);
    assert!(out.contains("brand_access"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_redis_is_undecided_not_a_no() {
    let t = TestNs::new();
    let started = Instant::now();
    let out = t
        .tenancy()
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .args(["access", "check", &new_id(), &new_id()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("cannot connect to Redis at redis://127.0.0.1:1"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?} to give up",
        started.elapsed()
    );
}

/// A value read ahead (with the brand's resolution, in one round trip) is used only when it
/// was read under the key the lookup needs: under another brand's key it is ignored and the
/// lookup reads its own, so a stale guess can never grant access.
#[tokio::test(flavor = "multi_thread")]
async fn a_prefetched_value_counts_only_under_its_own_key() {
    use blindstrader_tenancy::cache::permissions::Prefetched;
    let _shared = REDIS_PAUSE.read().await;
    let f = fixture().await;
    let (granted, other) = (new_id(), new_id());
    f.grant(&granted, BOTH).await;
    let key = f.cache.key_of(&f.supplier, &granted).unwrap();
    assert_eq!(key, f.key(&granted));

    // Under another brand's key: ignored, and the lookup for `other` finds no grant.
    let stale = Prefetched {
        key: key.clone(),
        value: Some(BOTH.to_owned()),
    };
    let access = f
        .cache
        .permissions_read(&f.servers, &f.supplier, &other, Some(stale))
        .await
        .unwrap();
    assert_eq!(
        access.permissions, None,
        "another key's value must not count"
    );
    assert!(!access.may_read_catalog());

    // Under its own key: used as the cached answer, without reading Redis again (the key does
    // not even exist there yet).
    assert_eq!(f.raw(&key).await, None);
    let ahead = Prefetched {
        key: key.clone(),
        value: Some(r#"["catalog.read"]"#.to_owned()),
    };
    let access = f
        .cache
        .permissions_read(&f.servers, &f.supplier, &granted, Some(ahead))
        .await
        .unwrap();
    assert!(access.from_cache);
    assert!(access.may_read_catalog() && !access.may_read_pricing());

    // Read ahead as absent: a miss, loaded from MySQL and cached as usual.
    let absent = Prefetched {
        key: key.clone(),
        value: None,
    };
    let access = f
        .cache
        .permissions_read(&f.servers, &f.supplier, &granted, Some(absent))
        .await
        .unwrap();
    assert!(!access.from_cache);
    assert_eq!(access.permissions, perms(BOTH));
    assert_eq!(f.raw(&key).await.as_deref(), Some(BOTH));
}
