//! Brand catalogs, supplier copies and the permission cache, end to end against MariaDB, Redis,
//! Tansu and the registry.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value as Json};
use sqlx::MySqlPool;

use blindstrader_tenancy::log::topics::Topic;

const SETTLE: Duration = Duration::from_secs(120);

fn fabric(code: &str, name: &str, price: i64) -> Json {
    json!({"code": code, "name": name, "collection": "Aurora", "colour": "White",
        "material": "Blackout", "width_mm": 2000, "price_minor": price, "currency": "GBP"})
}

fn catalog_line(brand: &str, revision: i64, upserts: Vec<Json>, removed: &[&str]) -> String {
    json!({"type": "BrandCatalogUpdated", "brand_id": brand, "brand_slug": "b", "revision": revision,
        "fabrics_upserted": upserts, "fabrics_removed": removed})
    .to_string()
}

fn grant_line(brand: &str, supplier: &str, permissions: &[&str]) -> String {
    json!({"type": "SupplierBrandAccessGranted", "brand_id": brand, "supplier_id": supplier,
        "permissions": permissions})
    .to_string()
}

fn revoke_line(brand: &str, supplier: &str) -> String {
    json!({"type": "SupplierBrandAccessRevoked", "brand_id": brand, "supplier_id": supplier})
        .to_string()
}

/// Fabric rows of a brand DB, in code order, without timestamps.
async fn brand_rows(pool: &MySqlPool, db: &str) -> Vec<(String, String, i64, bool, i64)> {
    sqlx::query_as(&format!(
        "SELECT code, name, price_minor, discontinued, revision FROM `{db}`.fabrics ORDER BY code"
    ))
    .fetch_all(pool)
    .await
    .unwrap_or_default()
}

/// A supplier's copy: (brand, code, name, price, currency).
async fn copy_rows(
    pool: &MySqlPool,
    db: &str,
) -> Vec<(String, String, String, Option<i64>, Option<String>)> {
    sqlx::query_as(&format!(
        "SELECT brand_id, code, name, price_minor, currency FROM `{db}`.brand_fabrics ORDER BY brand_id, code"
    ))
    .fetch_all(pool)
    .await
    .unwrap_or_default()
}

/// Every row of every table of the databases: what "the same state" means. With `timestamps`,
/// `updated_at` too, so a replay that rewrote rows (even to the same values in the end) shows.
/// Keys drop the namespace so two namespaces can be compared.
async fn digest(
    pool: &MySqlPool,
    ns: &str,
    dbs: &[String],
    timestamps: bool,
) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for db in dbs {
        for (table, order) in [
            ("fabrics", "code"),
            ("brand_fabrics", "brand_id, code"),
            ("brand_access", "brand_id"),
            ("projection_offsets", "projection, topic, `partition`"),
        ] {
            let cols: Vec<String> = sqlx::query_scalar(
                "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? \
                 AND TABLE_NAME = ? AND (? OR COLUMN_NAME NOT IN ('updated_at', 'granted_at')) ORDER BY ORDINAL_POSITION",
            )
            .bind(db)
            .bind(table)
            .bind(timestamps)
            .fetch_all(pool)
            .await
            .unwrap();
            if cols.is_empty() {
                continue;
            }
            let concat = cols
                .iter()
                .map(|c| format!("COALESCE(CAST(`{c}` AS CHAR), '∅')"))
                .collect::<Vec<_>>()
                .join(", '|', ");
            let rows: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT CONCAT({concat}) FROM `{db}`.`{table}` ORDER BY {order}"
            ))
            .fetch_all(pool)
            .await
            .unwrap();
            let rows = rows.into_iter().map(|r| r.replace(ns, "{ns}")).collect();
            out.insert(format!("{}.{table}", db.replacen(ns, "{ns}", 1)), rows);
        }
    }
    out
}

/// Whether `group` has committed the end of every partition of `topics`.
fn caught_up(t: &TestNs, group: &str, topics: &[Topic]) -> bool {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &t.config.kafka_bootstrap_servers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        for p in 0..t.config.partitions {
            tpl.add_partition(&t.topic(*topic), p);
        }
    }
    let Ok(committed) = consumer.committed_offsets(tpl, Duration::from_secs(10)) else {
        return false;
    };
    committed.elements().iter().all(|e| {
        let (_, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10))
            .unwrap();
        match e.offset() {
            Offset::Offset(o) => o >= high,
            _ => high == 0,
        }
    })
}

fn catalog_group(t: &TestNs) -> String {
    format!("{}.catalog", t.ns)
}

async fn wait_caught_up(t: &TestNs) {
    let group = catalog_group(t);
    wait_for(
        "the catalog group to commit the end of its topics",
        SETTLE,
        || async { caught_up(t, &group, &[Topic::BrandCatalog, Topic::BrandAccess]).then_some(()) },
    )
    .await;
}

async fn wait_active(t: &TestNs, pool: &MySqlPool, n: usize) {
    wait_for(&format!("{n} active tenants"), SETTLE, || async {
        let rows = statuses(pool, &t.ns).await;
        (rows.iter().filter(|(_, s, _)| s == "active").count() >= n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn catalogs_and_copies_land_and_a_full_replay_changes_nothing() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (brand, pricing_supplier, plain_supplier) = (new_id(), new_id(), new_id());
    t.emit_ok(&[
        created_line(&new_id(), &brand, "BRAND", "louvolite"),
        created_line(&new_id(), &pricing_supplier, "SUPPLIER", "cassidy"),
        created_line(&new_id(), &plain_supplier, "SUPPLIER", "northern"),
    ]);
    let mut worker = t.spawn_run("catalog");
    wait_active(&t, &pool, 3).await;
    t.emit_ok(&[
        catalog_line(
            &brand,
            1,
            vec![
                fabric("A", "Aurora", 100),
                fabric("B", "Belmont", 200),
                fabric("C", "Carnival", 300),
            ],
            &[],
        ),
        grant_line(&brand, &pricing_supplier, &["catalog.read", "pricing.read"]),
        grant_line(&brand, &plain_supplier, &["catalog.read"]),
    ]);
    wait_caught_up(&t).await;
    t.emit_ok(&[catalog_line(
        &brand,
        2,
        vec![fabric("B", "Belmont II", 250)],
        &["A"],
    )]);
    wait_caught_up(&t).await;

    let ns = t.ns.as_str();
    let brand_db = format!("{ns}_brand_louvolite");
    let (cassidy, northern) = (
        format!("{ns}_supplier_cassidy"),
        format!("{ns}_supplier_northern"),
    );
    assert_eq!(
        brand_rows(&pool, &brand_db).await,
        vec![
            ("B".into(), "Belmont II".into(), 250, false, 2),
            ("C".into(), "Carnival".into(), 300, false, 1)
        ],
        "{}",
        worker.log_text()
    );
    assert_eq!(
        copy_rows(&pool, &cassidy).await,
        vec![
            (
                brand.clone(),
                "B".into(),
                "Belmont II".into(),
                Some(250),
                Some("GBP".into())
            ),
            (
                brand.clone(),
                "C".into(),
                "Carnival".into(),
                Some(300),
                Some("GBP".into())
            ),
        ]
    );
    assert_eq!(
        copy_rows(&pool, &northern).await,
        vec![
            (brand.clone(), "B".into(), "Belmont II".into(), None, None),
            (brand.clone(), "C".into(), "Carnival".into(), None, None),
        ],
        "prices are hidden without pricing.read"
    );

    // Redeliver both topics from the start: nothing may change.
    let dbs = vec![
        brand_db.clone(),
        cassidy.clone(),
        northern.clone(),
        format!("{ns}_platform"),
    ];
    // Mark rows the replayed events would write: re-applying an applied event restores them,
    // skipping it leaves the marks.
    for sql in [
        format!("UPDATE `{brand_db}`.fabrics SET name = 'mark' WHERE code = 'C'"),
        format!("UPDATE `{cassidy}`.brand_fabrics SET name = 'mark' WHERE code = 'C'"),
    ] {
        sqlx::query(&sql).execute(&pool).await.unwrap();
    }
    let before = digest(&pool, ns, &dbs, true).await;
    assert!(worker.terminate().success());
    let rewind = t
        .tenancy()
        .args(["topics", "rewind", "catalog"])
        .output()
        .unwrap();
    assert!(
        rewind.status.success(),
        "{}",
        String::from_utf8_lossy(&rewind.stderr)
    );
    assert!(
        !caught_up(
            &t,
            &catalog_group(&t),
            &[Topic::BrandCatalog, Topic::BrandAccess]
        ),
        "rewind took effect"
    );
    let _replayer = t.spawn_run("catalog-replay");
    wait_caught_up(&t).await;
    assert_eq!(
        digest(&pool, ns, &dbs, true).await,
        before,
        "a replay must not rewrite anything"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grants_backfill_revokes_remove_and_the_cache_follows() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (brand, supplier) = (new_id(), new_id());
    t.emit_ok(&[
        created_line(&new_id(), &brand, "BRAND", "decora"),
        created_line(&new_id(), &supplier, "SUPPLIER", "shadeworks"),
        catalog_line(
            &brand,
            1,
            vec![fabric("A", "Aurora", 100), fabric("B", "Belmont", 200)],
            &[],
        ),
    ]);
    let _worker = t.spawn_run("access");
    wait_active(&t, &pool, 2).await;
    wait_caught_up(&t).await;
    let ns = t.ns.as_str();
    let supplier_db = format!("{ns}_supplier_shadeworks");
    assert!(
        copy_rows(&pool, &supplier_db).await.is_empty(),
        "no access, no copy"
    );

    let mut redis = redis::Client::open(t.config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{ns}:supplier:{supplier}:brand_access:{brand}");

    // Grant without pricing: the existing catalog is backfilled, prices hidden.
    t.emit_ok(&[grant_line(&brand, &supplier, &["catalog.read"])]);
    wait_caught_up(&t).await;
    let copy = copy_rows(&pool, &supplier_db).await;
    assert_eq!(copy.len(), 2);
    assert!(
        copy.iter().all(|r| r.3.is_none() && r.4.is_none()),
        "{copy:?}"
    );
    let cached: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(cached.as_deref(), Some(r#"["catalog.read"]"#));
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!((1..=300).contains(&ttl), "ttl {ttl}");

    // Gaining pricing.read shows prices.
    t.emit_ok(&[grant_line(
        &brand,
        &supplier,
        &["catalog.read", "pricing.read"],
    )]);
    wait_caught_up(&t).await;
    let copy = copy_rows(&pool, &supplier_db).await;
    assert_eq!(
        copy.iter().map(|r| r.3).collect::<Vec<_>>(),
        vec![Some(100), Some(200)]
    );
    let check = t
        .tenancy()
        .args(["access", "check", &supplier, &brand])
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("pricing.read"));

    // Revoke: rows, access row, index row and cache key all go; later catalog changes stay out.
    t.emit_ok(&[
        revoke_line(&brand, &supplier),
        catalog_line(&brand, 2, vec![fabric("C", "Carnival", 300)], &[]),
    ]);
    wait_caught_up(&t).await;
    assert!(copy_rows(&pool, &supplier_db).await.is_empty());
    let access: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM `{supplier_db}`.brand_access"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(access, 0);
    let index: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM `{ns}_platform`.brand_access"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(index, 0);
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(exists, 0, "revoke removes the cache key");
    assert_eq!(
        brand_rows(&pool, &format!("{ns}_brand_decora")).await.len(),
        3
    );
    let check = t
        .tenancy()
        .args(["access", "check", &supplier, &brand])
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(1));
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn events_before_provisioning_wait_without_blocking_others() {
    use blindstrader_tenancy::log::events::{json::record_from_json, EventKind};
    use blindstrader_tenancy::log::wire::Codec;
    use rdkafka::producer::FutureRecord;

    let t = TestNs::new();
    let pool = t.pool().await;
    blindstrader_tenancy::log::topics::ensure_topics(&t.config)
        .await
        .unwrap();
    let (early, ready) = (new_id(), new_id());
    let supplier = new_id();
    t.emit_ok(&[
        created_line(&new_id(), &ready, "BRAND", "ready"),
        created_line(&new_id(), &supplier, "SUPPLIER", "waiting"),
    ]);
    let _worker = t.spawn_run("early");
    wait_active(&t, &pool, 2).await;

    // Both brands' events on one partition: the early brand's first.
    let topic = t.topic(Topic::BrandCatalog);
    let codec = Codec::new(&t.config.schema_registry_url);
    let producer = blindstrader_tenancy::log::kafka::producer(&t.config).unwrap();
    let mut offsets = Vec::new();
    for (brand, code) in [(&early, "E1"), (&ready, "R1"), (&early, "E2")] {
        let line: Json =
            serde_json::from_str(&catalog_line(brand, 1, vec![fabric(code, code, 1)], &[]))
                .unwrap();
        let mut line = line;
        line["event_id"] = json!(new_id());
        line["occurred_at"] = json!(1);
        let value =
            record_from_json(EventKind::BrandCatalogUpdated.schema(), &line, &["type"]).unwrap();
        let payload = codec
            .encode(&topic, EventKind::BrandCatalogUpdated, value)
            .await
            .unwrap();
        let d = producer
            .send(
                FutureRecord::to(&topic)
                    .key(brand.as_str())
                    .payload(&payload)
                    .partition(0),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        offsets.push(d.offset);
    }
    // Grants of both brands to one supplier, on one partition, the early brand's first: the
    // later offset is applied first, and must not make the held one look applied.
    let access_topic = t.topic(Topic::BrandAccess);
    for brand in [&early, &ready] {
        let mut line: Json =
            serde_json::from_str(&grant_line(brand, &supplier, &["catalog.read"])).unwrap();
        line["event_id"] = json!(new_id());
        line["occurred_at"] = json!(1);
        let value = record_from_json(
            EventKind::SupplierBrandAccessGranted.schema(),
            &line,
            &["type"],
        )
        .unwrap();
        let payload = codec
            .encode(&access_topic, EventKind::SupplierBrandAccessGranted, value)
            .await
            .unwrap();
        producer
            .send(
                FutureRecord::to(&access_topic)
                    .key(brand.as_str())
                    .payload(&payload)
                    .partition(0),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
    }
    let ns = t.ns.as_str();
    wait_for("the ready brand's fabric", SETTLE, || async {
        (brand_rows(&pool, &format!("{ns}_brand_ready")).await.len() == 1).then_some(())
    })
    .await;
    // The committed offset of partition 0 stops at the held event, not past it.
    let group = catalog_group(&t);
    let committed = wait_for("a commit on partition 0", SETTLE, || async {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &t.config.kafka_bootstrap_servers)
            .set("group.id", &group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, 0);
        let c = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .ok()?;
        match c.elements()[0].offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    })
    .await;
    assert_eq!(committed, offsets[0], "commit must not pass the held event");

    // The early brand is created: its held events apply, in order.
    t.emit_ok(&[created_line(&new_id(), &early, "BRAND", "early")]);
    wait_for("the early brand's fabrics", SETTLE, || async {
        (brand_rows(&pool, &format!("{ns}_brand_early")).await.len() == 2).then_some(())
    })
    .await;
    wait_caught_up(&t).await;
    let copy = copy_rows(&pool, &format!("{ns}_supplier_waiting")).await;
    let mut codes: Vec<&str> = copy.iter().map(|r| r.1.as_str()).collect();
    codes.sort();
    assert_eq!(
        codes,
        vec!["E1", "E2", "R1"],
        "both grants applied, whatever their order"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_on_the_catalog_topic_is_dead_lettered_and_the_next_event_applies() {
    use rdkafka::message::{Headers, Message};
    use rdkafka::producer::FutureRecord;

    let t = TestNs::new();
    let pool = t.pool().await;
    let brand = new_id();
    t.emit_ok(&[created_line(&new_id(), &brand, "BRAND", "poisoned")]);
    let _worker = t.spawn_run("poison");
    wait_active(&t, &pool, 1).await;
    let topic = t.topic(Topic::BrandCatalog);
    let producer = blindstrader_tenancy::log::kafka::producer(&t.config).unwrap();
    let mut unknown_id = vec![0u8];
    unknown_id.extend_from_slice(&999_999u32.to_be_bytes());
    unknown_id.extend_from_slice(&[2, 4, 6]);
    for payload in [
        b"not avro at all".to_vec(),
        vec![1, 0, 0, 0, 1, 2, 3],
        unknown_id,
    ] {
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(brand.as_str())
                    .payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
    }
    t.emit_ok(&[catalog_line(&brand, 1, vec![fabric("OK", "Fine", 1)], &[])]);
    wait_for("the good event after the poison", SETTLE, || async {
        (brand_rows(&pool, &format!("{}_brand_poisoned", t.ns))
            .await
            .len()
            == 1)
            .then_some(())
    })
    .await;

    // Read the dead letters with their headers.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &t.config.kafka_bootstrap_servers)
        .set("group.id", format!("{}-dlq-reader", t.ns))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..t.config.partitions {
        tpl.add_partition_offset(&t.topic(Topic::DeadLetter), p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut reasons = Vec::new();
    let deadline = std::time::Instant::now() + SETTLE;
    while reasons.len() < 3 && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers = m.headers().unwrap();
            let get = |k: &str| {
                headers
                    .iter()
                    .find(|h| h.key == k)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            assert_eq!(get("dlq.source.topic"), topic);
            assert_eq!(get("dlq.tenant"), brand);
            reasons.push(get("dlq.reason"));
        }
    }
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("magic byte is 0x6e")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("magic byte is 0x01")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("schema id 999999")),
        "{reasons:?}"
    );
}

/// 20k catalog events, four brands, four suppliers with copies.
fn stream(brands: &[String], suppliers: &[String], n: usize) -> Vec<String> {
    let mut lines = Vec::with_capacity(n + 8);
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = |m: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % m
    };
    for k in 0..n {
        let b = k % brands.len();
        let upserts = (0..2)
            .map(|_| {
                let code = format!("F{:03}", next(150));
                fabric(&code, &format!("{code} rev {k}"), 100 + next(900) as i64)
            })
            .collect();
        let removal = format!("F{:03}", next(150));
        let removed: Vec<&str> = if next(4) == 0 { vec![&removal] } else { vec![] };
        lines.push(catalog_line(&brands[b], k as i64, upserts, &removed));
        if k == n / 3 {
            for (i, s) in suppliers.iter().enumerate() {
                lines.push(grant_line(&brands[i], s, &["catalog.read", "pricing.read"]));
                lines.push(grant_line(
                    &brands[(i + 1) % brands.len()],
                    s,
                    &["catalog.read"],
                ));
            }
        }
    }
    lines
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_stream_ends_with_the_rows_of_a_clean_run() {
    killed_mid_stream(TestNs::new()).await;
}

/// The same with the killed run's tenants placed over two servers (the clean run keeps all of
/// them on one): the copies made across servers, killed part-way, end with the rows of copies
/// made by INSERT … SELECT on one server.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_stream_over_two_servers_ends_with_the_rows_of_a_clean_run() {
    killed_mid_stream(TestNs::with_east()).await;
}

/// The pool of the server `db` (a tenant database of `t`) is on.
async fn pool_of<'p>(
    t: &TestNs,
    home: &'p MySqlPool,
    east: &'p MySqlPool,
    db: &str,
) -> &'p MySqlPool {
    let server: Option<String> = sqlx::query_scalar(&format!(
        "SELECT server FROM `{}_platform`.tenants WHERE database_name = ?",
        t.ns
    ))
    .bind(db)
    .fetch_optional(home)
    .await
    .unwrap_or(None); // (the worker may not have created the platform yet)
    if server.as_deref() == Some("east") {
        east
    } else {
        home
    }
}

async fn killed_mid_stream(killed: TestNs) {
    let n = 20_000;
    let clean = TestNs::new();
    let pool = killed.pool().await;
    // Without a second server configured, "east" is never named and this pool is never used.
    let east = match killed.config.servers.len() {
        1 => pool.clone(),
        _ => MySqlPool::connect(&east_url()).await.unwrap(),
    };
    // Over two servers, half the brands and half the suppliers go to each (random ids put all
    // eight on one server once in 128 runs, and the test would not test what it says).
    let id = |i: usize| match killed.config.servers.len() {
        1 => new_id(),
        _ => id_placed_on(["home", "east"][i % 2], &["home", "east"]),
    };
    let brands: Vec<String> = (0..4).map(id).collect();
    let suppliers: Vec<String> = (0..4).map(id).collect();
    let mut orgs: Vec<String> = brands
        .iter()
        .enumerate()
        .map(|(i, b)| created_line(&new_id(), b, "BRAND", &format!("brand{i}")))
        .collect();
    orgs.extend(
        suppliers
            .iter()
            .enumerate()
            .map(|(i, s)| created_line(&new_id(), s, "SUPPLIER", &format!("supplier{i}"))),
    );
    let events = stream(&brands, &suppliers, n);
    for t in [&killed, &clean] {
        t.emit_ok(&orgs);
        t.emit_ok(&events);
    }

    let mut first = killed.spawn_run("stream-first");
    let ns = killed.ns.to_string();
    let progress = || async {
        let mut applied = 0i64;
        for i in 0..4 {
            let db = format!("{ns}_brand_brand{i}");
            let sum: Option<i64> = sqlx::query_scalar(&format!(
                "SELECT CAST(SUM(`offset`) AS SIGNED) FROM `{db}`.projection_offsets"
            ))
            .fetch_one(pool_of(&killed, &pool, &east, &db).await)
            .await
            .unwrap_or(None);
            applied += sum.unwrap_or(0);
        }
        applied
    };
    wait_for("the stream to be under way", SETTLE, || async {
        (progress().await > 2000).then_some(())
    })
    .await;
    first.kill9();
    assert!(
        !caught_up(&killed, &catalog_group(&killed), &[Topic::BrandCatalog]),
        "killed too late"
    );
    let _second = killed.spawn_run("stream-second");
    wait_caught_up(&killed).await;

    let _clean_worker = clean.spawn_run("stream-clean");
    wait_caught_up(&clean).await;

    let dbs = |t: &TestNs| -> Vec<String> {
        (0..4)
            .map(|i| format!("{}_brand_brand{i}", t.ns))
            .chain((0..4).map(|i| format!("{}_supplier_supplier{i}", t.ns)))
            .collect()
    };
    let mut a = BTreeMap::new();
    let mut servers = std::collections::BTreeSet::new();
    for db in dbs(&killed) {
        let on = pool_of(&killed, &pool, &east, &db).await;
        servers.insert(std::ptr::eq(on, &east));
        a.extend(digest(on, killed.ns.as_str(), &[db], false).await);
    }
    if killed.config.servers.len() > 1 {
        assert_eq!(servers.len(), 2, "tenants on both servers");
    }
    let b = digest(&pool, clean.ns.as_str(), &dbs(&clean), false).await;
    let fabrics: usize = a
        .iter()
        .filter(|(k, _)| k.ends_with(".fabrics"))
        .map(|(_, v)| v.len())
        .sum();
    let copies: usize = a
        .iter()
        .filter(|(k, _)| k.ends_with(".brand_fabrics"))
        .map(|(_, v)| v.len())
        .sum();
    assert!(
        fabrics > 300 && copies > 2 * 300,
        "a meaningful state: {fabrics} fabrics, {copies} copied"
    );
    for (key, rows) in &a {
        assert_eq!(Some(rows), b.get(key), "{key} differs from the clean run");
    }
    assert_eq!(a.len(), b.len());
}
