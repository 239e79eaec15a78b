//! Termination, grace, restore and purge, against MariaDB, Redis, Tansu and the registry.

mod common;

use std::time::Duration;

use blindstrader_tenancy::log::events::Event;
use blindstrader_tenancy::log::topics::Topic;
use blindstrader_tenancy::store::servers::Servers;
use common::*;
use serde_json::json;
use sqlx::MySqlPool;

const SETTLE: Duration = Duration::from_secs(120);

fn catalog_line(brand: &str, revision: i64, codes: &[&str]) -> String {
    let fabrics: Vec<_> = codes
        .iter()
        .map(|c| json!({"code": c, "name": format!("{c} r{revision}"), "collection": "Aurora",
            "colour": "White", "material": "Blackout", "width_mm": 2000, "price_minor": 1000 + revision,
            "currency": "GBP"}))
        .collect();
    json!({"type": "BrandCatalogUpdated", "brand_id": brand, "brand_slug": "b", "revision": revision,
        "fabrics_upserted": fabrics})
    .to_string()
}

fn grant_line(brand: &str, supplier: &str) -> String {
    json!({"type": "SupplierBrandAccessGranted", "brand_id": brand, "supplier_id": supplier,
        "permissions": ["catalog.read", "pricing.read"]})
    .to_string()
}

async fn key_exists(redis: &redis::aio::MultiplexedConnection, key: &str) -> i64 {
    let mut conn = redis.clone();
    redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

async fn wait_status(t: &TestNs, pool: &MySqlPool, org: &str, status: &str) {
    wait_for(&format!("{org} to be {status}"), SETTLE, || async {
        (status_of(pool, &t.ns, org).await.as_deref() == Some(status)).then_some(())
    })
    .await;
}

async fn wait_caught_up(t: &TestNs) {
    wait_for("every processor group to catch up", SETTLE, || async {
        t.all_caught_up().then_some(())
    })
    .await;
}

fn cli(t: &TestNs, args: &[&str]) -> std::process::Output {
    t.tenancy().args(args).output().unwrap()
}

/// A brand with a catalog and a supplier holding a copy of it, all applied.
async fn brand_with_supplier(t: &TestNs, pool: &MySqlPool, brand_slug: &str) -> (String, String) {
    let (brand, supplier) = (new_id(), new_id());
    t.emit_ok(&[
        created_line(&new_id(), &brand, "BRAND", brand_slug),
        created_line(
            &new_id(),
            &supplier,
            "SUPPLIER",
            &format!("{brand_slug}_supplier"),
        ),
        catalog_line(&brand, 1, &["A", "B", "C"]),
        grant_line(&brand, &supplier),
    ]);
    wait_status(t, pool, &brand, "active").await;
    wait_caught_up(t).await;
    (brand, supplier)
}

#[tokio::test(flavor = "multi_thread")]
async fn terminate_then_restore_brings_every_row_back_and_can_repeat() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let worker = t.spawn_run_with("restore", &["--grace", "1h", "--purge-check", "300ms"]);
    let (brand, supplier) = brand_with_supplier(&t, &pool, "restorable").await;
    let ns = t.ns.as_str();
    let live = format!("{ns}_brand_restorable");
    let archive = format!("{ns}_arc_{}", brand.replace('-', ""));
    let before = checksums(&pool, &live).await;
    assert!(
        before.iter().any(|(t, c)| t == "fabrics" && c.is_some()),
        "{before:?}"
    );

    let redis = redis::Client::open(t.config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{ns}:supplier:{supplier}:brand_access:{brand}");
    assert_eq!(
        key_exists(&redis, &key).await,
        1,
        "the grant cached the permissions"
    );

    // Without --yes nothing is sent.
    let sent_before = t.message_count(Topic::Organisations);
    let refused = cli(
        &t,
        &[
            "tenants",
            "terminate",
            &brand,
            "--reason",
            "test",
            "--by",
            "ops",
        ],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    assert_eq!(t.message_count(Topic::Organisations), sent_before);

    for round in 1..=2 {
        let out = cli(
            &t,
            &[
                "tenants",
                "terminate",
                "restorable",
                "--reason",
                "unpaid",
                "--by",
                "ops",
                "--yes",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_status(&t, &pool, &brand, "archived").await;
        wait_for("the archive to hold the tables", SETTLE, || async {
            (!database_exists(&pool, &live).await && checksums(&pool, &archive).await == before)
                .then_some(())
        })
        .await;
        wait_for("cache keys naming the tenant to go", SETTLE, || {
            let (redis, key) = (redis.clone(), key.clone());
            async move { (key_exists(&redis, &key).await == 0).then_some(()) }
        })
        .await;
        let due = cli(&t, &["tenants", "purge-due"]);
        assert!(
            !String::from_utf8_lossy(&due.stdout).contains(&brand),
            "not due within grace"
        );

        let out = cli(&t, &["tenants", "restore", &brand, "--by", "ops"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_status(&t, &pool, &brand, "active").await;
        assert_eq!(
            checksums(&pool, &live).await,
            before,
            "round {round}: every row is back"
        );
        assert!(!database_exists(&pool, &archive).await);
    }

    let outcomes = t.read_events(Topic::Tenancy, 6, SETTLE).await;
    let archived: Vec<_> = outcomes
        .iter()
        .filter_map(|e| match e {
            Event::Other {
                kind: blindstrader_tenancy::log::events::EventKind::TenantArchived,
                value,
            } => {
                apache_avro::from_value::<blindstrader_tenancy::log::events::TenantArchived>(value)
                    .ok()
            }
            _ => None,
        })
        .collect();
    assert_eq!(archived.len(), 2, "{}", worker.log_text());
    for a in &archived {
        // The grace counts from when the log had the termination, a few ms after it was sent.
        let from = a.purge_after - 3_600_000;
        assert!(
            (a.occurred_at..a.occurred_at + 60_000).contains(&from),
            "purge_after = the termination's log time + grace: {a:?}"
        );
        assert_eq!(a.archive_database, archive);
    }
    let restored = outcomes
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Other {
                    kind: blindstrader_tenancy::log::events::EventKind::TenantRestored,
                    ..
                }
            )
        })
        .count();
    assert_eq!(restored, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_grace_period_the_archive_is_purged_and_restore_is_refused() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run_with("purge", &["--grace", "2s", "--purge-check", "300ms"]);
    let (brand, _) = brand_with_supplier(&t, &pool, "doomed").await;
    let ns = t.ns.as_str();
    let out = cli(
        &t,
        &[
            "tenants",
            "terminate",
            &brand,
            "--reason",
            "closed",
            "--by",
            "ops",
            "--yes",
        ],
    );
    assert!(out.status.success());
    wait_status(&t, &pool, &brand, "purged").await;
    // The row is marked first (a restore arriving now is refused), then the archive dropped.
    let archive = format!("{ns}_arc_{}", brand.replace('-', ""));
    wait_for("the archive to be dropped", SETTLE, || async {
        (!database_exists(&pool, &archive).await).then_some(())
    })
    .await;
    // Every group, the purger's included: its last step (the index rows) is done.
    t.wait_caught_up().await;
    assert!(!database_exists(&pool, &format!("{ns}_brand_doomed")).await);
    let index: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM `{ns}_platform`.brand_access WHERE brand_id = ?"
    ))
    .bind(&brand)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(index, 0, "the access index forgets a purged brand");

    let out = cli(&t, &["tenants", "restore", &brand, "--by", "ops"]);
    assert!(out.status.success());
    let outcomes = wait_for("the refusal", SETTLE, || async {
        // Provisioned ×2, archived, purged, refused.
        let events = t
            .read_events(Topic::Tenancy, 5, Duration::from_secs(10))
            .await;
        events
            .iter()
            .any(|e| matches!(e, Event::TenantProvisioningFailed(f) if f.organisation_id == brand))
            .then_some(events)
    })
    .await;
    let refusal = outcomes
        .iter()
        .find_map(|e| match e {
            Event::TenantProvisioningFailed(f) if f.organisation_id == brand => {
                Some(f.reason.clone())
            }
            _ => None,
        })
        .unwrap();
    assert!(refusal.starts_with("restore refused"), "{refusal}");
    let purged = outcomes
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Other {
                    kind: blindstrader_tenancy::log::events::EventKind::TenantPurged,
                    ..
                }
            )
        })
        .count();
    assert!(purged >= 1);
    assert_eq!(
        status_of(&pool, &t.ns, &brand).await.as_deref(),
        Some("purged")
    );
    let due = cli(&t, &["tenants", "purge-due"]);
    assert!(String::from_utf8_lossy(&due.stdout).trim().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn events_for_a_terminated_tenant_are_skipped_and_its_archive_is_unchanged() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let worker = t.spawn_run_with("skip", &["--grace", "1h"]);
    let (brand, supplier) = brand_with_supplier(&t, &pool, "gone").await;
    let ns = t.ns.as_str();
    let archive = format!("{ns}_arc_{}", brand.replace('-', ""));
    let supplier_db = format!("{ns}_supplier_gone_supplier");
    assert!(cli(
        &t,
        &[
            "tenants",
            "terminate",
            &brand,
            "--reason",
            "r",
            "--by",
            "ops",
            "--yes"
        ]
    )
    .status
    .success());
    wait_status(&t, &pool, &brand, "archived").await;
    wait_caught_up(&t).await;
    let archived = checksums(&pool, &archive).await;
    let copy = checksums(&pool, &supplier_db).await;

    t.emit_ok(&[
        catalog_line(&brand, 2, &["D"]),
        catalog_line(&brand, 3, &["E"]),
        grant_line(&brand, &supplier),
    ]);
    wait_caught_up(&t).await;
    assert_eq!(
        checksums(&pool, &archive).await,
        archived,
        "archived data unchanged"
    );
    assert_eq!(
        checksums(&pool, &supplier_db).await,
        copy,
        "no copy of a terminated brand's changes"
    );
    let log = worker.log_text();
    let skips = log
        .matches("skipping events for a terminated tenant")
        .count();
    assert_eq!(skips, 1, "logged once per tenant, not per event:\n{log}");
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_archive_and_cache_removal_converges_after_restart() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let mut first = t.spawn_run_with("crash-first", &["--grace", "1h", "--fail-after", "archive"]);
    let (brand, supplier) = brand_with_supplier(&t, &pool, "crashy").await;
    let ns = t.ns.as_str();
    let key = format!("{ns}:supplier:{supplier}:brand_access:{brand}");
    let redis = redis::Client::open(t.config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    assert!(cli(
        &t,
        &[
            "tenants",
            "terminate",
            &brand,
            "--reason",
            "r",
            "--by",
            "ops",
            "--yes"
        ]
    )
    .status
    .success());
    let status = first.child.wait().unwrap();
    assert!(
        !status.success(),
        "the worker must have died at the fault point"
    );
    // Died after the archive, before the caches: the key is still there.
    assert_eq!(
        status_of(&pool, &t.ns, &brand).await.as_deref(),
        Some("archived")
    );
    assert_eq!(key_exists(&redis, &key).await, 1);

    let _second = t.spawn_run_with("crash-second", &["--grace", "1h"]);
    wait_for(
        "the redelivered termination to clear the cache",
        SETTLE,
        || async { (key_exists(&redis, &key).await == 0).then_some(()) },
    )
    .await;
    // Provisioned ×2, then the archive announced by the second worker.
    let events = t.read_events(Topic::Tenancy, 3, SETTLE).await;
    let announced = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Other {
                    kind: blindstrader_tenancy::log::events::EventKind::TenantArchived,
                    ..
                }
            )
        })
        .count();
    assert_eq!(announced, 1);
    assert!(!database_exists(&pool, &format!("{ns}_brand_crashy")).await);
    assert!(database_exists(&pool, &format!("{ns}_arc_{}", brand.replace('-', ""))).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_everything_and_replaying_every_topic_rebuilds_the_same_state() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let flags = ["--grace", "3s", "--purge-check", "300ms"];
    let mut live = t.spawn_run_with("replay-live", &flags);
    let (kept, doomed, supplier, retailer) = (new_id(), new_id(), new_id(), new_id());
    t.emit_ok(&[
        created_line(&new_id(), &kept, "BRAND", "kept"),
        created_line(&new_id(), &doomed, "BRAND", "doomed"),
        created_line(&new_id(), &supplier, "SUPPLIER", "copier"),
        created_line(&new_id(), &retailer, "RETAILER", "shop"),
        catalog_line(&kept, 1, &["A", "B", "C"]),
        catalog_line(&doomed, 1, &["X", "Y"]),
        grant_line(&kept, &supplier),
        grant_line(&doomed, &supplier),
    ]);
    for org in [&kept, &doomed, &supplier, &retailer] {
        wait_status(&t, &pool, org, "active").await;
    }
    wait_caught_up(&t).await;
    // kept: terminated and restored within grace, then changed again.
    assert!(cli(
        &t,
        &[
            "tenants",
            "terminate",
            &kept,
            "--reason",
            "oops",
            "--by",
            "ops",
            "--yes"
        ]
    )
    .status
    .success());
    wait_status(&t, &pool, &kept, "archived").await;
    assert!(cli(&t, &["tenants", "restore", &kept, "--by", "ops"])
        .status
        .success());
    wait_status(&t, &pool, &kept, "active").await;
    t.emit_ok(&[catalog_line(&kept, 2, &["B", "D"])]);
    // doomed and the retailer: terminated and purged.
    for org in [&doomed, &retailer] {
        assert!(cli(
            &t,
            &[
                "tenants",
                "terminate",
                org,
                "--reason",
                "closed",
                "--by",
                "ops",
                "--yes"
            ]
        )
        .status
        .success());
    }
    for org in [&doomed, &retailer] {
        wait_status(&t, &pool, org, "purged").await;
    }
    wait_caught_up(&t).await;
    let live_state = namespace_state(&t, &pool).await;
    assert!(live.terminate().success());
    assert!(
        live_state
            .iter()
            .any(|(k, rows)| k == "{ns}_supplier_copier.brand_fabrics" && rows.len() == 4),
        "the supplier holds kept's four fabrics: {live_state:#?}"
    );

    // Drop every database of the namespace and rewind every group.
    let dbs: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(SCHEMA_NAME AS CHAR) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE ?",
    )
    .bind(t.ns.database_like_pattern())
    .fetch_all(&pool)
    .await
    .unwrap();
    for db in dbs {
        sqlx::query(&format!("DROP DATABASE `{db}`"))
            .execute(&pool)
            .await
            .unwrap();
    }
    for processor in ["provisioner", "catalog", "purger"] {
        let out = cli(&t, &["topics", "rewind", processor]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The documented order: the lifecycle first, then every projection.
    let mut lifecycle = t.spawn_run_with(
        "replay-lifecycle",
        &[&flags[..], &["--processors", "provisioner,purger"]].concat(),
    );
    wait_for("the lifecycle replay", SETTLE, || async {
        let lag = cli(&t, &["topics", "lag", "provisioner", "purger"]);
        let caught_up = String::from_utf8_lossy(&lag.stdout)
            .lines()
            .all(|l| l.contains("\t0 event(s) behind"));
        let purged = status_of(&pool, &t.ns, &doomed).await.as_deref() == Some("purged")
            && status_of(&pool, &t.ns, &retailer).await.as_deref() == Some("purged");
        (caught_up && purged).then_some(())
    })
    .await;
    assert!(lifecycle.terminate().success());
    let _all = t.spawn_run_with("replay-all", &flags);
    wait_caught_up(&t).await;
    let replayed = namespace_state(&t, &pool).await;
    assert_eq!(
        live_state
            .iter()
            .map(|(k, _)| k.clone())
            .collect::<Vec<_>>(),
        replayed.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        "the same databases and tables"
    );
    for ((key, live_rows), (_, replay_rows)) in live_state.iter().zip(&replayed) {
        // Offsets are bookkeeping: the live run applied a grant for the doomed brand that the
        // replay rightly skips (purged), so their positions differ while the rows may not.
        if key.ends_with(".projection_offsets") {
            continue;
        }
        assert_eq!(live_rows, replay_rows, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restored_supplier_gets_the_catalog_changes_it_missed() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run_with("supplier-restore", &["--grace", "1h"]);
    let (brand, supplier) = brand_with_supplier(&t, &pool, "steady").await;
    let ns = t.ns.as_str();
    let codes = |db: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(&format!(
                "SELECT code FROM `{db}`.brand_fabrics ORDER BY code"
            ))
            .fetch_all(&pool)
            .await
            .unwrap_or_default()
        }
    };
    assert!(cli(
        &t,
        &[
            "tenants",
            "terminate",
            &supplier,
            "--reason",
            "r",
            "--by",
            "ops",
            "--yes"
        ]
    )
    .status
    .success());
    wait_status(&t, &pool, &supplier, "archived").await;
    // An archived supplier keeps no copy of others' catalogs (copies exist only between two
    // live tenants, so a replay ends with the same ones), and the brand changes meanwhile.
    t.emit_ok(&[catalog_line(&brand, 2, &["D"])]);
    wait_caught_up(&t).await;
    let archive = format!("{ns}_arc_{}", supplier.replace('-', ""));
    assert_eq!(codes(archive).await, Vec::<String>::new());

    assert!(cli(&t, &["tenants", "restore", &supplier, "--by", "ops"])
        .status
        .success());
    wait_status(&t, &pool, &supplier, "active").await;
    assert_eq!(
        codes(format!("{ns}_supplier_steady_supplier")).await,
        vec!["A", "B", "C", "D"],
        "restored copy rebuilt from the brand"
    );
}

/// A termination left marked under way (as one dead-lettered after its retries is: events for
/// the tenant wait) is listed by `tenancy status`, naming the tenant, the step and its event;
/// once the step is settled it is gone.
#[tokio::test(flavor = "multi_thread")]
async fn status_lists_a_lifecycle_step_left_under_way() {
    use blindstrader_tenancy::store::tenants::{Pending, Tenants};
    use blindstrader_tenancy::tenant::{OrganisationType, Slug};
    let t = TestNs::new();
    let pool = t.prepared_pool().await;
    blindstrader_tenancy::log::topics::ensure_topics(&t.config)
        .await
        .unwrap();
    let tenants = Tenants::on(Servers::single(pool.clone(), &t.config.database_url), &t.ns);
    let (org, event) = (new_id(), new_id());
    let db =
        t.ns.tenant_database(OrganisationType::Brand, &Slug::parse("stuck").unwrap())
            .unwrap();
    let now = chrono::Utc::now();
    tenants
        .claim(
            &org,
            OrganisationType::Brand,
            "stuck",
            "Stuck",
            &db,
            now,
            None,
        )
        .await
        .unwrap();
    assert_eq!(t.status()["lifecycle_under_way"], json!([]));
    let archive = t.ns.archive_database(&org).unwrap();
    assert!(tenants
        .mark_archived(
            &org,
            &event,
            &archive,
            now,
            now + chrono::Duration::days(30),
            "test"
        )
        .await
        .unwrap());
    let status = t.status();
    let steps = status["lifecycle_under_way"].as_array().expect("a list");
    assert_eq!(steps.len(), 1, "{status}");
    assert_eq!(steps[0]["organisation_id"], org.as_str());
    assert_eq!(steps[0]["slug"], "stuck");
    assert_eq!(steps[0]["step"], "terminate");
    assert_eq!(steps[0]["status"], "archived");
    assert_eq!(steps[0]["event_id"], event.as_str());
    let (code, text, _) = t.tenancy_output(&["status"]);
    assert_eq!(code, Some(0));
    assert!(
        text.contains(&org) && text.contains("tenancy dead-letter replay"),
        "{text}"
    );
    tenants
        .settle(&org, &Pending::Terminate(event.clone()))
        .await
        .unwrap();
    assert_eq!(t.status()["lifecycle_under_way"], json!([]));
}

/// A restore and a termination stamped in the same millisecond are read back in the order they
/// were applied, so the archived period the restore closed stays in the tenant's history
/// whatever their event ids. (The log was sorted by event time alone; a tie fell by chance,
/// and one chaos run applied, into suppliers' archives, access events from inside such a
/// period that its clean replay skipped.)
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_and_a_termination_in_the_same_millisecond_keep_their_order() {
    use blindstrader_tenancy::store::tenants::{Logged, Tenants};
    use blindstrader_tenancy::tenant::{OrganisationType, Slug};
    let t = TestNs::new();
    let pool = t.prepared_pool().await;
    let tenants = Tenants::on(Servers::single(pool.clone(), &t.config.database_url), &t.ns);
    let org = new_id();
    let db =
        t.ns.tenant_database(OrganisationType::Brand, &Slug::parse("ties").unwrap())
            .unwrap();
    let t0 = chrono::Utc::now() - chrono::Duration::seconds(60);
    tenants
        .claim(&org, OrganisationType::Brand, "ties", "Ties", &db, t0, None)
        .await
        .unwrap();
    let (t1, t2) = (
        t0 + chrono::Duration::seconds(10),
        t0 + chrono::Duration::seconds(20),
    );
    // Applied in the log's order: terminated at t1, restored at t2, terminated again at t2;
    // the ids are chosen so that an order by id puts the second termination first.
    tenants
        .log(&new_id(), &org, Logged::Terminated, t1, &Default::default())
        .await
        .unwrap();
    tenants
        .log(
            "ffffffff-ffff-4fff-bfff-ffffffffffff",
            &org,
            Logged::Restored,
            t2,
            &Default::default(),
        )
        .await
        .unwrap();
    tenants
        .log(
            "00000000-0000-4000-8000-000000000000",
            &org,
            Logged::Terminated,
            t2,
            &Default::default(),
        )
        .await
        .unwrap();
    let found = tenants.lookup(&[&org]).await.unwrap();
    let brand = &found[&org];
    assert_eq!(
        brand.past_archives,
        vec![(t1.timestamp_millis(), t2.timestamp_millis())]
    );
    assert!(brand.was_archived_at((t1 + chrono::Duration::seconds(5)).timestamp_millis()));
}
