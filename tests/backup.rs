//! `tenancy backup` and `tenancy restore` against a running worker: the real broker, MariaDB
//! and registry.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use sqlx::MySqlPool;

/// A fresh directory for one test's backups.
fn backups_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tenancy-backups-{}", new_id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `tenancy backup tenant --to dir`; returns the one backup directory it wrote.
fn backup(t: &TestNs, tenant: &str, dir: &Path) -> PathBuf {
    let before: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let (code, out, err) = t.tenancy_output(&["backup", tenant, "--to", dir.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let new: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(new.len(), 1, "one new backup: {new:?}");
    assert!(new[0].join("manifest.json").exists());
    new[0].clone()
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

async fn drop_database(pool: &MySqlPool, db: &str) {
    sqlx::query(&format!("DROP DATABASE `{db}`"))
        .execute(pool)
        .await
        .unwrap();
}

/// A brand backed up, more events applied, its database dropped by hand: restored from the
/// backup and the log since, it holds what it held before the drop, equals a rebuild from the
/// whole log, and the worker writes into it again. A damaged backup and another tenant's are
/// refused, leaving the live database alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_brand_is_restored_from_its_backup_and_the_log_since() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let dir = backups_dir();
    let (worker, brand, db) = brand_with_catalog(&t, &pool, "kept", 3).await;
    let taken = backup(&t, "brand/kept", &dir);
    let m = manifest(&taken);
    assert_eq!(m["organisation_id"], brand.as_str());
    assert_eq!(m["kind"], "brand");
    let fabrics = m["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "fabrics")
        .unwrap();
    assert_eq!(fabrics["rows"], 5, "A, B, R1..R3: {m}");
    assert_eq!(m["log"].as_array().unwrap().len(), 1, "one partition: {m}");
    let lines = std::fs::read_to_string(taken.join("tables/fabrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 5);

    emit_revisions(&t, &pool, &brand, "kept", 4..=5).await;
    t.wait_caught_up().await;
    let before = checksums(&pool, &db).await;
    let rows = fabric_rows(&pool, &db).await;
    assert_eq!(rows.len(), 7);

    // A damaged copy of the backup: one row changed, the checksum no longer matches.
    let damaged = dir.join("damaged");
    std::fs::create_dir_all(damaged.join("tables")).unwrap();
    for f in std::fs::read_dir(taken.join("tables")).unwrap().flatten() {
        std::fs::copy(f.path(), damaged.join("tables").join(f.file_name())).unwrap();
    }
    std::fs::copy(taken.join("manifest.json"), damaged.join("manifest.json")).unwrap();
    let text = std::fs::read_to_string(damaged.join("tables/fabrics.jsonl")).unwrap();
    std::fs::write(
        damaged.join("tables/fabrics.jsonl"),
        text.replacen("\"R1\"", "\"R9\"", 1),
    )
    .unwrap();
    let (code, out, err) =
        t.tenancy_output(&["restore", &brand, "--from", damaged.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(err.contains("the backup is damaged"), "{err}");
    assert_eq!(
        checksums(&pool, &db).await,
        before,
        "the live database is untouched"
    );

    // Another tenant's backup.
    let other = new_id();
    t.emit_ok(&[lines::created(&other, "BRAND", "other")]);
    t.wait_status(&pool, &other, "active").await;
    let (code, _, err) = t.tenancy_output(&["restore", &other, "--from", taken.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not of brand"), "{err}");

    drop_database(&pool, &db).await;
    // A tenant marked behind and failed (its events held) is served again once the restored
    // tables, made by this binary's migrations, are in.
    sqlx::query(&format!(
        "UPDATE `{}_platform`.tenants SET migration_version = 1, migration_failure = 'broken' \
         WHERE organisation_id = ?",
        t.ns
    ))
    .bind(&brand)
    .execute(&pool)
    .await
    .unwrap();
    let (code, out, err) =
        t.tenancy_output(&["restore", "brand/kept", "--from", taken.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}\n{err}\n{}", worker.log_text());
    assert!(out.contains("the live database was missing"), "{out}");
    assert!(out.contains("2 of its events from the log"), "{out}");
    assert_eq!(fabric_rows(&pool, &db).await, rows, "as before the drop");

    let (code, out, err) = t.tenancy_output(&["rebuild", "brand/kept", "--dry-run"]);
    assert_eq!(code, Some(0), "equal to a rebuild: {out}\n{err}");
    assert!(out.contains("0 difference(s)"), "{out}");

    let state: (Option<i64>, Option<String>) = sqlx::query_as(&format!(
        "SELECT migration_version, migration_failure FROM `{}_platform`.tenants WHERE organisation_id = ?",
        t.ns
    ))
    .bind(&brand)
    .fetch_one(&pool)
    .await
    .unwrap();
    let latest = blindstrader_tenancy::tenancy::migrations::latest_version(
        blindstrader_tenancy::tenancy::migrations::for_tenant(
            blindstrader_tenancy::tenant::OrganisationType::Brand,
        ),
    );
    assert_eq!(state, (Some(latest), None));
    emit_revisions(&t, &pool, &brand, "kept", 6..=6).await;
    assert_eq!(fabric_rows(&pool, &db).await.len(), 8);
    let (code, out, err) = t.tenancy_output(&["restore", "brand/kept", "--drop-old"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("old tables dropped"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `--until` a moment between two events: the brand as it was then, with the live database
/// still there (the difference is reported, and the restore swaps in all the same).
#[tokio::test(flavor = "multi_thread")]
async fn restore_until_a_moment_gives_the_state_at_that_moment() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let dir = backups_dir();
    let (_worker, brand, db) = brand_with_catalog(&t, &pool, "past", 1).await;
    let taken = backup(&t, &brand, &dir);
    emit_revisions(&t, &pool, &brand, "past", 2..=2).await;
    let then = fabric_rows(&pool, &db).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let moment = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    emit_revisions(&t, &pool, &brand, "past", 3..=3).await;
    t.wait_caught_up().await;
    assert_eq!(fabric_rows(&pool, &db).await.len(), then.len() + 1);

    let restore = |extra: &[&str]| {
        let mut args = vec![
            "restore",
            &brand,
            "--from",
            taken.to_str().unwrap(),
            "--until",
            &moment,
        ];
        args.extend(extra);
        t.tenancy_output(&args)
    };
    let (code, out, err) = restore(&["--dry-run"]);
    assert_eq!(
        code,
        Some(1),
        "it differs from the live database: {out}\n{err}"
    );
    assert!(
        out.contains("fabrics [R3]: only in the live database"),
        "{out}"
    );
    assert!(out.contains("dry run: nothing changed"), "{out}");
    assert_eq!(fabric_rows(&pool, &db).await.len(), then.len() + 1);

    let (code, out, err) = restore(&[]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("1 of its events from the log"), "{out}");
    assert!(out.contains("not compared with the live database"), "{out}");
    assert_eq!(fabric_rows(&pool, &db).await, then, "the state at {moment}");

    // Changed one's mind: the tables the restore replaced come back, R3 included.
    let (code, out, err) = t.tenancy_output(&["restore", &brand, "--rollback"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(fabric_rows(&pool, &db).await.len(), then.len() + 1);
    let (code, out, _) = t.tenancy_output(&["restore", &brand, "--drop-old"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("no old tables to drop"), "{out}");

    let (code, _, err) = t.tenancy_output(&["restore", &brand, "--from", "/nonexistent"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("manifest.json"), "{err}");
    let (code, _, err) = t.tenancy_output(&[
        "restore",
        &brand,
        "--from",
        taken.to_str().unwrap(),
        "--until",
        "yesterday",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("RFC 3339"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

async fn access_rows(pool: &MySqlPool, db: &str) -> Vec<(String, String)> {
    sqlx::query_as(&format!(
        "SELECT brand_id, CAST(permissions AS CHAR) FROM `{db}`.brand_access ORDER BY brand_id"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A supplier backed up, then granted a new brand and revoked from another; its database
/// dropped: the restore replays its grants from the backup's offsets and backfills its copies,
/// equal to a rebuild.
#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_supplier_is_restored_with_the_grants_since_its_backup() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let dir = backups_dir();
    let worker = t.spawn_run("w");
    let supplier = new_id();
    let brands: Vec<String> = (0..3).map(|_| new_id()).collect();
    t.provisioned(
        &pool,
        &[
            (&supplier, "SUPPLIER", "buyer"),
            (&brands[0], "BRAND", "one"),
            (&brands[1], "BRAND", "two"),
            (&brands[2], "BRAND", "three"),
        ],
    )
    .await;
    let mut events: Vec<String> = brands
        .iter()
        .enumerate()
        .map(|(i, b)| lines::catalog(b, 1, &["A", &format!("X{i}")], &[]))
        .collect();
    events.push(lines::grant(
        &new_id(),
        &brands[0],
        &supplier,
        &["catalog.read"],
    ));
    events.push(lines::grant(
        &new_id(),
        &brands[1],
        &supplier,
        &["catalog.read", "pricing.read"],
    ));
    t.emit_ok(&events);
    t.wait_caught_up().await;
    let db = format!("{}_supplier_buyer", t.ns);
    assert_eq!(access_rows(&pool, &db).await.len(), 2);
    let taken = backup(&t, "supplier/buyer", &dir);
    assert!(
        !manifest(&taken)["log"].as_array().unwrap().is_empty(),
        "a supplier's backup names where its grants are read from"
    );

    t.emit_ok(&[
        lines::grant(&new_id(), &brands[2], &supplier, &["catalog.read"]),
        lines::revoke(&brands[0], &supplier),
    ]);
    t.wait_caught_up().await;
    let access = access_rows(&pool, &db).await;
    let brand_ids: Vec<&str> = access.iter().map(|(b, _)| b.as_str()).collect();
    let mut want = vec![brands[1].as_str(), brands[2].as_str()];
    want.sort();
    assert_eq!(brand_ids, want, "{access:?}");
    let copies = copy_rows(&pool, &db).await;
    assert_eq!(copies.len(), 4, "two, priced, and three: {copies:?}");

    drop_database(&pool, &db).await;
    let (code, out, err) =
        t.tenancy_output(&["restore", &supplier, "--from", taken.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}\n{err}\n{}", worker.log_text());
    assert_eq!(
        access_rows(&pool, &db).await,
        access,
        "the grants as before the drop"
    );
    let (code, out, err) = t.tenancy_output(&["rebuild", &supplier, "--dry-run"]);
    assert_eq!(code, Some(0), "equal to a rebuild: {out}\n{err}");
    assert!(out.contains("0 difference(s)"), "{out}");
    assert_eq!(
        copy_rows(&pool, &db).await,
        copies,
        "copies as before the drop"
    );

    // Again with the live database there: the grants since the backup are replayed up to
    // what it holds, and it is swapped out.
    let (code, out, err) = t.tenancy_output(&["restore", &supplier, "--drop-old"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let (code, out, err) =
        t.tenancy_output(&["restore", &supplier, "--from", taken.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("swapped in"), "{out}");
    assert_eq!(access_rows(&pool, &db).await, access);
    assert_eq!(copy_rows(&pool, &db).await, copies);
    std::fs::remove_dir_all(&dir).ok();
}
