//! `tenancy rebuild` against a running worker: the real broker, MariaDB and registry.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blindstrader_tenancy::log::topics::Topic;
use common::*;
use sqlx::MySqlPool;

/// `tenancy rebuild tenant` while a reader and a producer run (stopped through `stop` when it
/// ends): it swaps in with no difference, the reader read throughout, and once the workers have
/// caught up a fresh dry run finds the live database equal.
async fn rebuild_under_load(
    t: &TestNs,
    tenant: &str,
    stop: &AtomicBool,
    reads: &AtomicU64,
    reader: tokio::task::JoinHandle<()>,
    producer: tokio::task::JoinHandle<()>,
) {
    let (code, out, err) = t.tenancy_output(&["rebuild", tenant]);
    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    producer.await.unwrap();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("0 difference(s)"), "{out}");
    assert!(reads.load(Ordering::Relaxed) > 10);

    t.wait_caught_up().await;
    let (code, out, err) = t.tenancy_output(&["rebuild", tenant, "--drop-old"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let (code, out, err) = t.tenancy_output(&["rebuild", tenant, "--dry-run"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("0 difference(s)"), "{out}");
}

/// A projection bug simulated by corrupting the live rows: a dry run reports each difference
/// and changes nothing, a rebuild without --accept-differences refuses, with it repairs them
/// (the worker keeps applying into the swapped-in tables), and --rollback brings the corrupted
/// copy back with the events applied since.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_repairs_corrupted_rows_and_rollback_restores_them() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (worker, brand, db) = brand_with_catalog(&t, &pool, "corrupt", 3).await;
    let good = fabric_rows(&pool, &db).await;
    sqlx::query(&format!(
        "UPDATE `{db}`.fabrics SET name = 'garbage' WHERE code = 'A'"
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(&format!("DELETE FROM `{db}`.fabrics WHERE code = 'R2'"))
        .execute(&pool)
        .await
        .unwrap();
    let corrupted = fabric_rows(&pool, &db).await;

    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--dry-run"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("fabrics [A]: differs"), "{out}");
    assert!(
        out.contains("fabrics [R2]: only in the rebuilt database"),
        "{out}"
    );
    assert!(out.contains("2 difference(s)"), "{out}");
    assert_eq!(
        fabric_rows(&pool, &db).await,
        corrupted,
        "a dry run changes nothing"
    );

    let (code, out, _) = t.tenancy_output(&["rebuild", "brand/corrupt"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not swapped in"), "{out}");
    assert_eq!(fabric_rows(&pool, &db).await, corrupted);

    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--accept-differences"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("swapped in"), "{out}");
    assert_eq!(fabric_rows(&pool, &db).await, good, "repaired");
    let old = format!("{}_old_{}", t.ns, brand.replace('-', ""));
    assert!(database_exists(&pool, &old).await);

    // The live worker writes into the swapped-in tables.
    t.emit_ok(&[lines::catalog(&brand, 4, &["C"], &[])]);
    wait_for("revision 4 to apply", Duration::from_secs(60), || async {
        fabric_rows(&pool, &db)
            .await
            .iter()
            .any(|(c, _, _)| c == "C")
            .then_some(())
    })
    .await;
    // A second rebuild is refused while the old tables are kept.
    let (code, _, err) = t.tenancy_output(&["rebuild", &brand]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--drop-old"), "{err}");

    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--rollback"]);
    assert_eq!(code, Some(0), "{out}\n{err}\n{}", worker.log_text());
    let rows = fabric_rows(&pool, &db).await;
    assert!(
        rows.iter().any(|(c, n, _)| c == "A" && n == "garbage"),
        "the corrupted copy is back: {rows:?}"
    );
    assert!(
        rows.iter().any(|(c, _, _)| c == "C"),
        "with the event applied since the swap: {rows:?}"
    );
    assert!(!database_exists(&pool, &old).await);
    let (code, out, _) = t.tenancy_output(&["rebuild", &brand, "--drop-old"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("no old tables"), "{out}");
}

/// One value changed in place, nothing added or removed (every count equal): the checksums
/// still tell, and the row is named; so is one event id changed in the bookkeeping.
#[tokio::test(flavor = "multi_thread")]
async fn a_value_changed_in_place_is_a_difference() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (_worker, brand, db) = brand_with_catalog(&t, &pool, "inplace", 3).await;
    sqlx::query(&format!(
        "UPDATE `{db}`.fabrics SET colour = CONCAT(colour, 'x') WHERE code = 'B'"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--dry-run"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("fabrics [B]: differs"), "{out}");
    assert!(out.contains("1 difference(s)"), "{out}");

    sqlx::query(&format!(
        "UPDATE `{db}`.fabrics SET colour = LEFT(colour, CHAR_LENGTH(colour) - 1) WHERE code = 'B'"
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "UPDATE `{db}`.applied_events SET `offset` = `offset` + 1000 ORDER BY `offset` DESC LIMIT 1"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--dry-run"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("applied_events ["), "{out}");
    assert!(out.contains("]: differs"), "{out}");
    assert!(out.contains("1 difference(s)"), "{out}");
}

/// Rebuilt and swapped in while a producer keeps emitting for the brand and a reader keeps
/// querying it: the reader never fails nor sees fewer rows than before, and once the producer
/// stops the live database equals a fresh rebuild.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_under_load_is_invisible_to_readers_and_ends_equal() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (_worker, brand, db) = brand_with_catalog(&t, &pool, "busy", 50).await;

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (pool, db, stop, reads) = (pool.clone(), db.clone(), stop.clone(), reads.clone());
        tokio::spawn(async move {
            let mut seen = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM `{db}`.fabrics"))
                    .fetch_one(&pool)
                    .await
                    .expect("the live table is always there");
                assert!(n >= seen, "rows went from {seen} to {n}");
                seen = n;
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let producer = {
        let t2 = TestNs::attach(t.ns.clone(), t.config.clone());
        let (brand, stop) = (brand.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let mut r = 100;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<String> = (0..20)
                    .map(|i| lines::catalog(&brand, r + i, &[&format!("L{}", r + i)], &[]))
                    .collect();
                t2.emit_ok(&batch);
                r += 20;
            }
        })
    };
    // The rebuild starts once the producer's events are being applied live.
    let before = fabric_rows(&pool, &db).await.len();
    wait_for(
        "the producer's first events to apply",
        Duration::from_secs(60),
        || async { (fabric_rows(&pool, &db).await.len() > before).then_some(()) },
    )
    .await;
    rebuild_under_load(&t, &brand, &stop, &reads, reader, producer).await;
}

/// A rebuild killed at each step leaves the live database as it was and the next rebuild
/// works (its claim died with it).
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_rebuild_leaves_the_live_database_alone() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (_worker, brand, db) = brand_with_catalog(&t, &pool, "killed", 5).await;
    let before = checksums(&pool, &db).await;
    let shadow = format!("{}_shadow_{}", t.ns, brand.replace('-', ""));
    for step in ["shadow", "half-run", "replay", "locked"] {
        let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--fail-after", step]);
        assert_ne!(code, Some(0), "{step}: {out}\n{err}");
        assert!(err.contains(&format!("aborting after {step}")), "{err}");
        assert_eq!(
            checksums(&pool, &db).await,
            before,
            "after a kill at {step}"
        );
        if step == "half-run" {
            // The shadow's run is half written: its event ids and offset, not its rows. A
            // rebuild that resumed this shadow would skip those rows for good.
            let count = |table: &str| {
                let sql = format!("SELECT COUNT(*) FROM `{shadow}`.{table}");
                let pool = pool.clone();
                async move {
                    sqlx::query_scalar::<_, i64>(&sql)
                        .fetch_one(&pool)
                        .await
                        .unwrap()
                }
            };
            assert!(count("applied_events").await > 0);
            assert_eq!(count("fabrics").await, 0);
        }
        // `tenancy status` shows the killed rebuild as such (its claim died with it).
        let status = t.status();
        let rebuilds = status["rebuilds"].as_array().expect("rebuilds");
        assert_eq!(rebuilds.len(), 1, "{status}");
        assert_eq!(rebuilds[0]["organisation_id"], brand.as_str());
        assert_eq!(rebuilds[0]["running"], false, "{status}");
    }
    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--dry-run"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("0 difference(s)"), "{out}");
    assert!(!database_exists(&pool, &shadow).await);
    let status = t.status();
    assert_eq!(status["rebuilds"], serde_json::json!([]), "{status}");
}

/// Refusals name the reason: an unknown tenant, a retailer's or a supplier's archive.
#[tokio::test(flavor = "multi_thread")]
async fn rebuild_refuses_what_it_cannot_rebuild() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let (supplier, retailer) = (new_id(), new_id());
    t.provisioned(
        &pool,
        &[
            (&supplier, "SUPPLIER", "sup"),
            (&retailer, "RETAILER", "shop"),
        ],
    )
    .await;
    let (code, _, err) = t.tenancy_output(&["rebuild", "brand/nosuch"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown tenant"), "{err}");
    let (code, _, err) = t.tenancy_output(&["rebuild", &retailer, "--archived"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not archived"), "{err}");
    let (code, _, err) = t.tenancy_output(&["rebuild", &supplier, "--archived"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not archived"), "{err}");

    // A log whose start is gone (retention): refused before anything is replayed, the
    // partition and the lost offsets named, nothing left behind, the claim released. The
    // local broker cannot delete records, so the supplier's topic is read from librdkafka's
    // mock broker, which keeps 5 MiB a partition and drops the oldest messages beyond it.
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let access = t.topic(Topic::BrandAccess);
    cluster
        .create_topic(&access, t.config.partitions, 1)
        .unwrap();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .create()
        .unwrap();
    for _ in 0..8 {
        // One at a time, each a message set of its own: the mock keeps the last 5.
        let payload = vec![b'x'; 900 * 1024];
        let record = FutureRecord::to(&access)
            .partition(1)
            .key("k")
            .payload(&payload);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let grants_before = row_count(&pool, &format!("{}_supplier_sup", t.ns), "brand_access").await;
    let out = t
        .tenancy()
        .env("KAFKA_BOOTSTRAP_SERVERS", cluster.bootstrap_servers())
        .args(["rebuild", &supplier])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{access} no longer holds its whole history (partition 1 lost offsets 0..2)"
        )),
        "{err}"
    );
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA \
         WHERE SCHEMA_NAME LIKE CONCAT(?, '\\_shadow\\_%') OR SCHEMA_NAME LIKE CONCAT(?, '\\_old\\_%')",
    )
    .bind(t.ns.as_str())
    .bind(t.ns.as_str())
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(
        row_count(&pool, &format!("{}_supplier_sup", t.ns), "brand_access").await,
        grants_before
    );
    let (code, out, err) = t.tenancy_output(&["rebuild", &supplier, "--dry-run"]);
    assert_eq!(code, Some(0), "the claim was released: {out}\n{err}");
}

/// An archived supplier's archive is rebuilt with --archived from its grants made before the
/// termination (one made after it was skipped live and stays out), with no copies (an archive
/// keeps none); restored, the supplier reads the brand again from a copy rebuilt then.
#[tokio::test(flavor = "multi_thread")]
async fn an_archived_supplier_is_rebuilt_into_its_archive_with_archived() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let (brand, later, supplier) = (new_id(), new_id(), new_id());
    t.provisioned(
        &pool,
        &[
            (&brand, "BRAND", "early"),
            (&later, "BRAND", "late"),
            (&supplier, "SUPPLIER", "resting"),
        ],
    )
    .await;
    t.emit_ok(&[
        lines::catalog(&brand, 1, &["A", "B"], &[]),
        lines::grant(&new_id(), &brand, &supplier, &["catalog.read"]),
    ]);
    t.wait_caught_up().await;
    t.emit_ok(&[lines::terminated(
        &new_id(),
        &supplier,
        "SUPPLIER",
        "resting",
    )]);
    t.wait_status(&pool, &supplier, "archived").await;
    t.emit_ok(&[lines::grant(
        &new_id(),
        &later,
        &supplier,
        &["catalog.read"],
    )]);
    t.wait_caught_up().await;
    let archive = format!("{}_arc_{}", t.ns, supplier.replace('-', ""));
    assert_eq!(
        (
            row_count(&pool, &archive, "brand_access").await,
            row_count(&pool, &archive, "brand_fabrics").await
        ),
        (1, 0)
    );
    // Lost from the archive: the rebuild brings it back.
    sqlx::query(&format!("DELETE FROM `{archive}`.brand_access"))
        .execute(&pool)
        .await
        .unwrap();

    let (code, _, err) = t.tenancy_output(&["rebuild", &supplier]);
    assert_eq!(code, Some(1));
    assert!(err.contains("only with --archived"), "{err}");
    let (code, out, err) = t.tenancy_output(&["rebuild", &supplier, "--archived", "--dry-run"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "brand_access [{brand}]: only in the rebuilt database"
        )),
        "{out}"
    );
    assert!(
        out.contains("1 difference(s)"),
        "the later grant stays out: {out}"
    );

    let (code, out, err) =
        t.tenancy_output(&["rebuild", "--all", "--archived", "--accept-differences"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("1 tenant(s) (0 brand(s), 1 supplier(s), 0 retailer(s)): 1 swapped in"),
        "{out}"
    );
    let brands: Vec<String> =
        sqlx::query_scalar(&format!("SELECT brand_id FROM `{archive}`.brand_access"))
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(brands, std::slice::from_ref(&brand), "archive repaired");
    assert_eq!(
        row_count(&pool, &archive, "brand_fabrics").await,
        0,
        "an archive keeps no copies"
    );
    let (code, _, _) = t.tenancy_output(&["rebuild", &supplier, "--drop-old"]);
    assert_eq!(code, Some(0));

    t.emit_ok(&[lines::restored(&new_id(), &supplier, "SUPPLIER", "resting")]);
    t.wait_status(&pool, &supplier, "active").await;
    t.wait_caught_up().await;
    let live = format!("{}_supplier_resting", t.ns);
    assert_eq!(
        row_count(&pool, &live, "brand_fabrics").await,
        2,
        "the copy is rebuilt from the brand at the restore"
    );
    let (code, out, _) = t.tenancy_output(&["access", "check", &supplier, &brand]);
    assert_eq!(code, Some(0), "{out}");
}

/// `--all` rebuilds every active brand with one summary: a dry run names the brand that
/// differs, and with --accept-differences every brand is swapped in and equal afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn rebuild_all_covers_every_active_brand() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (_worker, first, first_db) = brand_with_catalog(&t, &pool, "one", 3).await;
    let second = new_id();
    t.emit_ok(&[
        lines::created(&second, "BRAND", "two"),
        lines::catalog(&second, 1, &["X"], &[]),
    ]);
    let second_db = format!("{}_brand_two", t.ns);
    wait_for(
        "the second brand's catalog",
        Duration::from_secs(60),
        || async { (!fabric_rows(&pool, &second_db).await.is_empty()).then_some(()) },
    )
    .await;
    sqlx::query(&format!(
        "DELETE FROM `{first_db}`.fabrics WHERE code = 'B'"
    ))
    .execute(&pool)
    .await
    .unwrap();

    let (code, out, err) = t.tenancy_output(&["rebuild", "--all", "--dry-run"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("brand/one: 1 difference(s)"), "{out}");
    assert!(out.contains("brand/two: equal"), "{out}");
    assert!(
        out.contains(
            "2 tenant(s) (2 brand(s), 0 supplier(s), 0 retailer(s)): 0 swapped in, 1 equal, 1 differ, 0 failed"
        ),
        "{out}"
    );

    let (code, out, err) = t.tenancy_output(&["rebuild", "--all", "--accept-differences"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("2 tenant(s) (2 brand(s), 0 supplier(s), 0 retailer(s)): 2 swapped in"),
        "{out}"
    );
    assert!(
        fabric_rows(&pool, &first_db)
            .await
            .iter()
            .any(|(c, _, _)| c == "B"),
        "repaired"
    );
    for brand in [&first, &second] {
        let (code, _, _) = t.tenancy_output(&["rebuild", brand, "--drop-old"]);
        assert_eq!(code, Some(0));
    }
    let (code, out, err) = t.tenancy_output(&["rebuild", "--all", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
}

/// The replaced tables are kept for `--keep-old`, then a worker's purge timer drops them.
#[tokio::test(flavor = "multi_thread")]
async fn kept_old_tables_expire_on_the_purge_timer() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run_with("w", &["--purge-check", "1s"]);
    let brand = new_id();
    t.emit_ok(&[
        lines::created(&brand, "BRAND", "kept"),
        lines::catalog(&brand, 1, &["A"], &[]),
    ]);
    let db = format!("{}_brand_kept", t.ns);
    wait_for("the catalog", Duration::from_secs(60), || async {
        (!fabric_rows(&pool, &db).await.is_empty()).then_some(())
    })
    .await;
    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--keep-old", "3s"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("kept in"), "{out}");
    let old = format!("{}_old_{}", t.ns, brand.replace('-', ""));
    assert!(database_exists(&pool, &old).await, "kept at first");
    wait_for(
        "the old tables to expire",
        Duration::from_secs(60),
        || async { (!database_exists(&pool, &old).await).then_some(()) },
    )
    .await;
    let left: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM `{}_platform`.kept_copies",
        t.ns
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
    assert!(
        !fabric_rows(&pool, &db).await.is_empty(),
        "the live tables stay"
    );
}

/// A rebuild touches no other tenant unless asked: suppliers' copies keep what the replaced
/// tables fanned out; with --refresh-copies they are rebuilt from the swapped-in tables.
#[tokio::test(flavor = "multi_thread")]
async fn refresh_copies_pushes_the_repaired_rows_to_supplier_copies() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (_worker, brand, db) = brand_with_catalog(&t, &pool, "copied", 2).await;
    let supplier = new_id();
    t.provisioned(&pool, &[(&supplier, "SUPPLIER", "reader")])
        .await;
    t.emit_ok(&[lines::grant(
        &new_id(),
        &brand,
        &supplier,
        &["catalog.read"],
    )]);
    let copy = format!("{}_supplier_reader", t.ns);
    let copy_name = |code: &'static str| {
        let (pool, copy) = (pool.clone(), copy.clone());
        async move {
            sqlx::query_scalar::<_, String>(&format!(
                "SELECT name FROM `{copy}`.brand_fabrics WHERE code = ?"
            ))
            .bind(code)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    };
    wait_for("the grant's backfill", Duration::from_secs(60), || async {
        copy_name("A").await
    })
    .await;
    let good = copy_name("A").await;
    let corrupt = || async {
        for table in [format!("`{db}`.fabrics"), format!("`{copy}`.brand_fabrics")] {
            sqlx::query(&format!(
                "UPDATE {table} SET name = 'garbage' WHERE code = 'A'"
            ))
            .execute(&pool)
            .await
            .unwrap();
        }
    };

    corrupt().await;
    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--accept-differences"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_ne!(
        fabric_rows(&pool, &db).await[0].1,
        "garbage",
        "brand repaired"
    );
    assert_eq!(
        copy_name("A").await.as_deref(),
        Some("garbage"),
        "without --refresh-copies no supplier database is touched"
    );
    let (code, _, _) = t.tenancy_output(&["rebuild", &brand, "--drop-old"]);
    assert_eq!(code, Some(0));

    corrupt().await;
    let (code, out, err) = t.tenancy_output(&[
        "rebuild",
        &brand,
        "--accept-differences",
        "--refresh-copies",
    ]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("1 supplier copy of the brand rebuilt"),
        "{out}"
    );
    assert_ne!(fabric_rows(&pool, &db).await[0].1, "garbage");
    assert_eq!(
        copy_name("A").await,
        good,
        "the copy follows the repaired brand"
    );
}

/// An archived brand's archive is rebuilt only with --archived, from the events before its
/// termination (one emitted after it, skipped live, stays out of the rebuild too);
/// `--all --archived` takes the archived brands and leaves the active one; a restore then
/// brings the repaired rows back live.
#[tokio::test(flavor = "multi_thread")]
async fn an_archived_brand_is_rebuilt_into_its_archive_with_archived() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (_worker, brand, db) = brand_with_catalog(&t, &pool, "gone", 2).await;
    let other = new_id();
    t.provisioned(&pool, &[(&other, "BRAND", "stays")]).await;
    t.emit_ok(&[lines::terminated(&new_id(), &brand, "BRAND", "gone")]);
    t.wait_status(&pool, &brand, "archived").await;
    // Happened after the termination: skipped live, and by the rebuild. Then one from before
    // it, delivered late: applied to the archive live, so the archive's offsets pass the first.
    let mut early: serde_json::Value =
        serde_json::from_str(&lines::catalog(&brand, 4, &["EARLY"], &[])).unwrap();
    early["occurred_at"] = serde_json::json!(chrono::Utc::now().timestamp_millis() - 3_600_000);
    t.emit_ok(&[lines::catalog(&brand, 3, &["LATE"], &[]), early.to_string()]);
    t.wait_caught_up().await;
    let archive = format!("{}_arc_{}", t.ns, brand.replace('-', ""));
    let good = fabric_rows(&pool, &archive).await;
    let codes: Vec<&str> = good.iter().map(|(c, _, _)| c.as_str()).collect();
    assert_eq!(codes, ["A", "B", "EARLY", "R1", "R2"], "live");
    sqlx::query(&format!(
        "UPDATE `{archive}`.fabrics SET name = 'garbage' WHERE code = 'A'"
    ))
    .execute(&pool)
    .await
    .unwrap();

    let (code, _, err) = t.tenancy_output(&["rebuild", &brand]);
    assert_eq!(code, Some(1));
    assert!(err.contains("only with --archived"), "{err}");
    let (code, _, err) = t.tenancy_output(&["rebuild", &other, "--archived"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not archived"), "{err}");

    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--archived", "--dry-run"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("fabrics [A]: differs"), "{out}");
    assert!(
        out.contains("1 difference(s)"),
        "the late event stays out: {out}"
    );

    let (code, out, err) =
        t.tenancy_output(&["rebuild", "--all", "--archived", "--accept-differences"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("1 tenant(s) (1 brand(s), 0 supplier(s), 0 retailer(s)): 1 swapped in"),
        "{out}"
    );
    assert!(err.contains("not rebuilt by this run: 1 active"), "{err}");
    assert_eq!(fabric_rows(&pool, &archive).await, good, "archive repaired");
    let (code, _, _) = t.tenancy_output(&["rebuild", &brand, "--drop-old"]);
    assert_eq!(code, Some(0));

    t.emit_ok(&[lines::restored(&new_id(), &brand, "BRAND", "gone")]);
    t.wait_status(&pool, &brand, "active").await;
    assert_eq!(
        fabric_rows(&pool, &db).await,
        good,
        "the repaired rows are live again"
    );
}

/// A supplier reading three brands, with a history of grants (a revoke and a re-grant, pricing
/// on one brand, one brand archived since).
async fn supplier_with_history(t: &TestNs, pool: &MySqlPool) -> (Worker, String, Vec<String>) {
    let worker = t.spawn_run("w");
    let supplier = new_id();
    let brands: Vec<String> = (0..3).map(|_| new_id()).collect();
    t.provisioned(
        pool,
        &[
            (&supplier, "SUPPLIER", "reader"),
            (&brands[0], "BRAND", "first"),
            (&brands[1], "BRAND", "second"),
            (&brands[2], "BRAND", "third"),
        ],
    )
    .await;
    let mut events = Vec::new();
    for (i, b) in brands.iter().enumerate() {
        events.push(lines::catalog(b, 1, &["A", "B", &format!("X{i}")], &[]));
    }
    events.push(lines::grant(
        &new_id(),
        &brands[0],
        &supplier,
        &["catalog.read", "pricing.read"],
    ));
    events.push(lines::grant(
        &new_id(),
        &brands[1],
        &supplier,
        &["catalog.read"],
    ));
    events.push(lines::revoke(&brands[1], &supplier));
    events.push(lines::grant(
        &new_id(),
        &brands[1],
        &supplier,
        &["catalog.read"],
    ));
    events.push(lines::grant(
        &new_id(),
        &brands[2],
        &supplier,
        &["catalog.read"],
    ));
    events.push(lines::catalog(&brands[0], 2, &["C"], &["B"]));
    t.emit_ok(&events);
    t.wait_caught_up().await;
    t.emit_ok(&[lines::terminated(&new_id(), &brands[2], "BRAND", "third")]);
    t.wait_status(pool, &brands[2], "archived").await;
    t.wait_caught_up().await;
    (worker, supplier, brands)
}

/// A supplier rebuilt from its grants and the brands' projections equals the live one; a
/// corrupted copy and a lost grant are reported by the dry run, repaired by the rebuild (the
/// worker keeps writing into the swapped-in tables) and brought back by --rollback.
#[tokio::test(flavor = "multi_thread")]
async fn a_supplier_rebuild_repairs_its_grants_and_copies() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (worker, supplier, brands) = supplier_with_history(&t, &pool).await;
    let db = format!("{}_supplier_reader", t.ns);
    let good = copy_rows(&pool, &db).await;
    assert_eq!(
        good.len(),
        3 + 3,
        "first (A, C, X0) and second (A, B, X1): {good:?}"
    );
    assert!(
        good.iter()
            .all(|(b, _, _, price)| (b == &brands[0]) == price.is_some()),
        "prices only from the brand granted pricing.read: {good:?}"
    );

    let (code, out, err) = t.tenancy_output(&["rebuild", "supplier/reader", "--dry-run"]);
    assert_eq!(
        code,
        Some(0),
        "the rebuild equals the live supplier: {out}\n{err}"
    );
    assert!(out.contains("0 difference(s)"), "{out}");

    sqlx::query(&format!(
        "UPDATE `{db}`.brand_fabrics SET name = 'garbage' WHERE code = 'A'"
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "DELETE FROM `{db}`.brand_access WHERE brand_id = ?"
    ))
    .bind(&brands[2])
    .execute(&pool)
    .await
    .unwrap();
    let corrupted = checksums(&pool, &db).await;
    let (code, out, err) = t.tenancy_output(&["rebuild", &supplier, "--dry-run"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("brand_access"), "{out}");
    assert!(out.contains("brand_fabrics"), "{out}");
    assert!(out.contains("3 difference(s)"), "{out}");
    assert_eq!(
        checksums(&pool, &db).await,
        corrupted,
        "a dry run changes nothing"
    );

    let (code, out, err) = t.tenancy_output(&["rebuild", &supplier, "--accept-differences"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(copy_rows(&pool, &db).await, good, "copies repaired");
    let access: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM `{db}`.brand_access"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(access, 3, "the lost grant is back");

    // The worker fans out into the swapped-in tables.
    t.emit_ok(&[lines::catalog(&brands[1], 2, &["D"], &[])]);
    wait_for(
        "the fan-out after the swap",
        Duration::from_secs(60),
        || async {
            copy_rows(&pool, &db)
                .await
                .iter()
                .any(|(_, c, _, _)| c == "D")
                .then_some(())
        },
    )
    .await;
    let (code, out, err) = t.tenancy_output(&["rebuild", &supplier, "--rollback"]);
    assert_eq!(code, Some(0), "{out}\n{err}\n{}", worker.log_text());
    // The grants as they were before the rebuild (the lost one lost again), with the copies
    // rebuilt from the brands as they are now (the change since the swap included).
    let access: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM `{db}`.brand_access"))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(access, 2, "the rolled-back grants");
    let rows = copy_rows(&pool, &db).await;
    assert!(rows.iter().any(|(_, c, _, _)| c == "D"), "{rows:?}");
    assert!(rows.iter().all(|(_, _, n, _)| n != "garbage"), "{rows:?}");
    assert_eq!(rows.len(), good.len() + 1, "{rows:?}");
}

/// A supplier rebuilt and swapped in while its brands keep changing (fan-outs into its
/// copies) and its grants keep changing (pricing toggled): a reader of its copy never fails
/// nor finds it empty, the swap reports no difference, and afterwards it equals a rebuild.
#[tokio::test(flavor = "multi_thread")]
async fn a_supplier_rebuild_under_load_is_invisible_and_ends_equal() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (_worker, supplier, brands) = supplier_with_history(&t, &pool).await;
    let db = format!("{}_supplier_reader", t.ns);

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (pool, db, stop, reads) = (pool.clone(), db.clone(), stop.clone(), reads.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n: i64 =
                    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM `{db}`.brand_fabrics"))
                        .fetch_one(&pool)
                        .await
                        .expect("the live table is always there");
                assert!(n > 0, "the copy was empty");
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let producer = {
        let t2 = TestNs::attach(t.ns.clone(), t.config.clone());
        let (brands, supplier, stop) = (brands.clone(), supplier.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let mut r = 10;
            while !stop.load(Ordering::Relaxed) {
                let perms: &[&str] = if r % 20 == 0 {
                    &["catalog.read", "pricing.read"]
                } else {
                    &["catalog.read"]
                };
                let mut batch = vec![lines::grant(&new_id(), &brands[1], &supplier, perms)];
                for b in &brands[..2] {
                    batch.push(lines::catalog(b, r, &[&format!("L{r}")], &[]));
                }
                t2.emit_ok(&batch);
                r += 10;
            }
        })
    };
    let before = copy_rows(&pool, &db).await.len();
    wait_for(
        "the producer's events to reach the copy",
        Duration::from_secs(60),
        || async { (copy_rows(&pool, &db).await.len() >= before + 6).then_some(()) },
    )
    .await;
    rebuild_under_load(&t, &supplier, &stop, &reads, reader, producer).await;
}

/// Writes that arrive while a supplier rebuild holds the supplier's writes for its swap wait,
/// and land in the swapped-in tables: a grant of a brand the supplier did not read yet, a
/// revoke, and a catalog change fanned out to its copy.
#[tokio::test(flavor = "multi_thread")]
async fn writes_during_a_supplier_swap_wait_and_land_in_the_new_tables() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (_worker, supplier, brands) = supplier_with_history(&t, &pool).await;
    let fourth = new_id();
    t.provisioned(&pool, &[(&fourth, "BRAND", "fourth")]).await;
    t.emit_ok(&[lines::catalog(&fourth, 1, &["F"], &[])]);
    t.wait_caught_up().await;
    let db = format!("{}_supplier_reader", t.ns);

    while_the_swap_is_held(&t, &supplier, || {
        t.emit_ok(&[
            lines::grant(&new_id(), &fourth, &supplier, &["catalog.read"]),
            lines::revoke(&brands[1], &supplier),
            lines::catalog(&brands[0], 5, &["LATE"], &[]),
        ]);
    })
    .await;
    t.wait_caught_up().await;
    let access: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT brand_id FROM `{db}`.brand_access ORDER BY brand_id"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut want = vec![brands[0].clone(), brands[2].clone(), fourth.clone()];
    want.sort();
    assert_eq!(
        access, want,
        "the grant and the revoke are in the live tables"
    );
    let rows = copy_rows(&pool, &db).await;
    assert!(
        rows.iter().any(|(b, c, _, _)| b == &fourth && c == "F"),
        "{rows:?}"
    );
    assert!(rows.iter().any(|(_, c, _, _)| c == "LATE"), "{rows:?}");
    assert!(rows.iter().all(|(b, _, _, _)| b != &brands[1]), "{rows:?}");
    let (code, out, err) = t.tenancy_output(&["rebuild", &supplier, "--drop-old"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let (code, out, err) = t.tenancy_output(&["rebuild", &supplier, "--dry-run"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
}

/// `tenancy rebuild tenant`, with `during` run while it holds the tenant's writes just before
/// its swap; the rebuild must succeed.
async fn while_the_swap_is_held(t: &TestNs, tenant: &str, during: impl FnOnce()) {
    let rebuild = t
        .tenancy()
        .args(["rebuild", tenant, "--pause-before-swap", "4s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(
        "the rebuild to hold writes",
        Duration::from_secs(60),
        || async { (t.status()["rebuilds"][0]["phase"] == "holding writes").then_some(()) },
    )
    .await;
    during();
    let out = rebuild.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A supplier rebuild killed at each step leaves the live database as it was, and the next
/// one works.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_supplier_rebuild_leaves_the_live_database_alone() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (_worker, supplier, _) = supplier_with_history(&t, &pool).await;
    let db = format!("{}_supplier_reader", t.ns);
    let before = checksums(&pool, &db).await;
    for step in ["shadow", "replay", "locked"] {
        let (code, out, err) = t.tenancy_output(&["rebuild", &supplier, "--fail-after", step]);
        assert_ne!(code, Some(0), "{step}: {out}\n{err}");
        assert!(err.contains(&format!("aborting after {step}")), "{err}");
        assert_eq!(
            checksums(&pool, &db).await,
            before,
            "after a kill at {step}"
        );
    }
    let (code, out, err) = t.tenancy_output(&["rebuild", &supplier]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("0 difference(s)"), "{out}");
}

/// Event ids older than the 35-day window, pruned live (or expired and not pruned yet), are no
/// difference; an unexpired id missing live is one.
#[tokio::test(flavor = "multi_thread")]
async fn expired_event_ids_are_no_difference_but_recent_ones_are() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (_worker, brand, db) = brand_with_catalog(&t, &pool, "aged", 6).await;
    let ids: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT event_id, `offset` FROM `{db}`.applied_events ORDER BY `offset`"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(ids.len(), 6);
    // The first four applied 40 days ago: two pruned already, two waiting for the pruning.
    for (id, _) in &ids[..4] {
        sqlx::query(&format!(
            "UPDATE `{db}`.applied_events SET applied_at = UTC_TIMESTAMP(3) - INTERVAL 40 DAY WHERE event_id = ?"
        ))
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    }
    for (id, _) in &ids[..2] {
        sqlx::query(&format!(
            "DELETE FROM `{db}`.applied_events WHERE event_id = ?"
        ))
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    }
    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--dry-run"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("0 difference(s)"), "{out}");

    // A recent id the live database lost is a difference.
    sqlx::query(&format!(
        "DELETE FROM `{db}`.applied_events WHERE event_id = ?"
    ))
    .bind(&ids[5].0)
    .execute(&pool)
    .await
    .unwrap();
    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--dry-run"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "applied_events [{}|catalog]: only in the rebuilt database",
            ids[5].0
        )),
        "{out}"
    );
}

/// Two retailers with a history of domains: assigned, removed, and one refused live because
/// the other holds it.
async fn retailers_with_domains(t: &TestNs, pool: &MySqlPool) -> (Worker, String, String) {
    let worker = t.spawn_run("w");
    let (shop, other) = (new_id(), new_id());
    t.provisioned(
        pool,
        &[(&shop, "RETAILER", "shop"), (&other, "RETAILER", "other")],
    )
    .await;
    t.emit_ok(&[
        lines::domain_assigned(&shop, "a.example"),
        lines::domain_assigned(&shop, "b.example"),
        lines::domain_assigned(&other, "taken.example"),
    ]);
    t.wait_caught_up().await;
    t.emit_ok(&[
        lines::domain_removed(&shop, "b.example"),
        lines::domain_assigned(&shop, "c.example"),
        lines::domain_assigned(&shop, "taken.example"),
    ]);
    t.wait_caught_up().await;
    (worker, shop, other)
}

/// A retailer rebuilt from its domain events equals the live one (the assignment refused live
/// stays out); corrupted rows are reported and repaired, the worker writes into the swapped-in
/// tables, and `--all` takes retailers too.
#[tokio::test(flavor = "multi_thread")]
async fn a_retailer_rebuild_repairs_its_domains() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (_worker, shop, _) = retailers_with_domains(&t, &pool).await;
    let db = format!("{}_retailer_shop", t.ns);
    assert_eq!(domains_of(&pool, &db).await, ["a.example", "c.example"]);

    let (code, out, err) = t.tenancy_output(&["rebuild", "retailer/shop", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("0 difference(s)"), "{out}");
    let (code, out, err) = t.tenancy_output(&["rebuild", "--all", "--dry-run"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("(0 brand(s), 0 supplier(s), 2 retailer(s)): 0 swapped in, 2 equal"),
        "{out}"
    );

    sqlx::query(&format!(
        "DELETE FROM `{db}`.domains WHERE domain = 'a.example'"
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "INSERT INTO `{db}`.domains (domain, assigned_at) VALUES ('bogus.example', NOW())"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let (code, out, err) = t.tenancy_output(&["rebuild", &shop, "--dry-run"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        out.contains("domains [a.example]: only in the rebuilt database"),
        "{out}"
    );
    assert!(
        out.contains("domains [bogus.example]: only in the live database"),
        "{out}"
    );
    let (code, out, err) = t.tenancy_output(&["rebuild", &shop, "--accept-differences"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(domains_of(&pool, &db).await, ["a.example", "c.example"]);

    t.emit_ok(&[lines::domain_assigned(&shop, "d.example")]);
    wait_for(
        "the assignment after the swap",
        Duration::from_secs(60),
        || async { (domains_of(&pool, &db).await.len() == 3).then_some(()) },
    )
    .await;
}

/// An assignment sent while a retailer rebuild holds its writes for the swap waits, and lands
/// in the swapped-in tables.
#[tokio::test(flavor = "multi_thread")]
async fn writes_during_a_retailer_swap_wait_and_land_in_the_new_tables() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (_worker, shop, _) = retailers_with_domains(&t, &pool).await;
    let db = format!("{}_retailer_shop", t.ns);
    while_the_swap_is_held(&t, &shop, || {
        t.emit_ok(&[lines::domain_assigned(&shop, "late.example")]);
    })
    .await;
    t.wait_caught_up().await;
    assert_eq!(
        domains_of(&pool, &db).await,
        ["a.example", "c.example", "late.example"]
    );
}

/// A replay answers the projection's lookups (stored revisions, removal markers, event ids
/// seen) from what it wrote to the shadow, not from MySQL (`catalog::shadow`). One event per
/// transaction here, so each lookup is answered that way: a removal, a stale upsert below it, a
/// code coming back, a stale upsert below a newer row, two events at one revision and a
/// redelivery of the first (the live processor skipped it by its event id), and last a code
/// with a space, which turns that state off. The rebuilt database equals what the live
/// processor made.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_applying_one_event_at_a_time_folds_as_the_live_processor_did() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let brand = new_id();
    t.emit_ok(&[lines::created(&brand, "BRAND", "folds")]);
    t.wait_status(&pool, &brand, "active").await;
    let named = |revision: i64, code: &str, name: &str, event_id: &str| {
        serde_json::json!({"type": "BrandCatalogUpdated", "event_id": event_id,
            "brand_id": &brand, "brand_slug": "folds", "revision": revision,
            "fabrics_upserted": [lines::fabric(code, name)], "fabrics_removed": []})
        .to_string()
    };
    let first = new_id();
    let events = [
        lines::catalog(&brand, 1, &["A", "B", "C"], &[]),
        lines::catalog(&brand, 3, &[], &["A"]),
        lines::catalog(&brand, 2, &["A"], &[]),
        lines::catalog(&brand, 5, &["B"], &[]),
        lines::catalog(&brand, 4, &["B"], &[]),
        lines::catalog(&brand, 6, &["A"], &[]),
        named(8, "E", "first", &first),
        named(8, "E", "second", &new_id()),
        named(8, "E", "first", &first),
        lines::catalog(&brand, 9, &["D 1", "C"], &[]),
    ];
    t.emit_ok(&events);
    let db = format!("{}_brand_folds", t.ns);
    t.wait_caught_up().await;
    // What the live processor made of it, so the comparison below has something to hold to.
    let live: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT code, name FROM `{db}`.fabrics ORDER BY code"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    let want: Vec<(String, String)> = [
        ("A", "A r6"),
        ("B", "B r5"),
        ("C", "C r9"),
        ("D 1", "D 1 r9"),
        ("E", "second"),
    ]
    .iter()
    .map(|(c, n)| (c.to_string(), n.to_string()))
    .collect();
    assert_eq!(live, want);

    let (code, out, err) =
        t.tenancy_output(&["rebuild", &brand, "--dry-run", "--replay-batch", "1"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("0 difference(s)"), "{out}");
    assert!(out.contains("(10 of its events, 0 skipped)"), "{out}");
}

/// An archived retailer's archive is rebuilt with --archived from its domain events before the
/// termination (the assignment refused live stays out, as in a live rebuild); a lost row comes
/// back, and the restore brings the repaired domains live.
#[tokio::test(flavor = "multi_thread")]
async fn an_archived_retailer_is_rebuilt_into_its_archive_with_archived() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (_worker, shop, _) = retailers_with_domains(&t, &pool).await;
    t.emit_ok(&[lines::terminated(&new_id(), &shop, "RETAILER", "shop")]);
    t.wait_status(&pool, &shop, "archived").await;
    let archive = format!("{}_arc_{}", t.ns, shop.replace('-', ""));
    assert_eq!(
        domains_of(&pool, &archive).await,
        ["a.example", "c.example"]
    );
    sqlx::query(&format!(
        "DELETE FROM `{archive}`.domains WHERE domain = 'c.example'"
    ))
    .execute(&pool)
    .await
    .unwrap();

    let (code, out, err) =
        t.tenancy_output(&["rebuild", "retailer/shop", "--archived", "--dry-run"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("1 difference(s)"), "{out}");
    assert!(out.contains("c.example"), "{out}");
    let (code, out, err) = t.tenancy_output(&[
        "rebuild",
        "retailer/shop",
        "--archived",
        "--accept-differences",
    ]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(
        domains_of(&pool, &archive).await,
        ["a.example", "c.example"]
    );
    let (code, _, _) = t.tenancy_output(&["rebuild", &shop, "--drop-old"]);
    assert_eq!(code, Some(0));

    t.emit_ok(&[lines::restored(&new_id(), &shop, "RETAILER", "shop")]);
    t.wait_status(&pool, &shop, "active").await;
    let live = format!("{}_retailer_shop", t.ns);
    assert_eq!(domains_of(&pool, &live).await, ["a.example", "c.example"]);
}
