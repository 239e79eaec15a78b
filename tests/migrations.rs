//! Rolling migrations of tenant databases: a tenant behind the latest migration of its kind is
//! brought up by the worker's background rollout or by `tenancy migrate`, its events waiting
//! meanwhile; one whose migration fails waits alone, marked with the reason, until a retry
//! after the fix; a rollout halts on a failed canary and past --max-failures, and the next one
//! resumes with what is still behind.

mod common;

use std::time::Duration;

use blindstrader_tenancy::tenancy::migrations;
use blindstrader_tenancy::tenant::OrganisationType;
use common::*;
use sqlx::MySqlPool;

const SETTLE: Duration = Duration::from_secs(90);

fn latest_brand() -> i64 {
    migrations::latest_version(migrations::for_tenant(OrganisationType::Brand))
}

/// Puts a brand's database one migration back, as a binary with a new migration finds it: the
/// latest migration's bookkeeping row gone (it re-runs, every migration being safe to re-run)
/// and the tenants table saying the version before.
async fn one_behind(t: &TestNs, pool: &MySqlPool, org: &str, slug: &str) {
    let db = format!("{}_brand_{slug}", t.ns);
    sqlx::query(&format!(
        "DELETE FROM `{db}`._sqlx_migrations WHERE version = ?"
    ))
    .bind(latest_brand())
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "UPDATE `{}_platform`.tenants SET migration_version = ? WHERE organisation_id = ?",
        t.ns
    ))
    .bind(latest_brand() - 1)
    .bind(org)
    .execute(pool)
    .await
    .unwrap();
}

/// Brands of these slugs provisioned by a worker (stopped again), each then put one migration
/// back ([`one_behind`]); their organisation ids, in the same order.
async fn brands_one_behind(t: &TestNs, pool: &MySqlPool, slugs: &[&str]) -> Vec<String> {
    let ids: Vec<String> = slugs.iter().map(|_| new_id()).collect();
    {
        let _worker = t.spawn_run("provision");
        let orgs: Vec<(&str, &str, &str)> = ids
            .iter()
            .zip(slugs)
            .map(|(id, slug)| (id.as_str(), "BRAND", *slug))
            .collect();
        t.provisioned(pool, &orgs).await;
    }
    for (id, slug) in ids.iter().zip(slugs) {
        one_behind(t, pool, id, slug).await;
    }
    ids
}

/// Makes a brand's next migration fail: its first migration's recorded checksum no longer
/// matches the file's, which sqlx refuses (as it would a migration edited after it shipped).
async fn break_migrations(t: &TestNs, pool: &MySqlPool, slug: &str) {
    sqlx::query(&format!(
        "UPDATE `{}_brand_{slug}`._sqlx_migrations SET checksum = X'00' WHERE version = 1",
        t.ns
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// The fix: the recorded checksum put back, copied from a healthy brand of the same namespace.
async fn fix_migrations(t: &TestNs, pool: &MySqlPool, slug: &str, healthy: &str) {
    sqlx::query(&format!(
        "UPDATE `{ns}_brand_{slug}`._sqlx_migrations SET checksum = \
         (SELECT checksum FROM `{ns}_brand_{healthy}`._sqlx_migrations WHERE version = 1) \
         WHERE version = 1",
        ns = t.ns
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// (migration_version, migration_failure) of a tenant.
async fn migration_state(t: &TestNs, pool: &MySqlPool, org: &str) -> (Option<i64>, Option<String>) {
    sqlx::query_as(&format!(
        "SELECT migration_version, migration_failure FROM `{}_platform`.tenants \
         WHERE organisation_id = ?",
        t.ns
    ))
    .bind(org)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn fabrics(t: &TestNs, pool: &MySqlPool, slug: &str) -> usize {
    fabric_rows(pool, &format!("{}_brand_{slug}", t.ns))
        .await
        .len()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_whose_migration_fails_waits_alone_and_applies_after_a_retry() {
    // One partition: the sick brand's events share the consumer and its batches with the rest.
    let mut t = TestNs::new();
    t.config.partitions = 1;
    let pool = t.pool().await;
    let (sick, behind, well) = (new_id(), new_id(), new_id());
    {
        let _first = t.spawn_run("first");
        t.provisioned(
            &pool,
            &[
                (&sick, "BRAND", "sick"),
                (&behind, "BRAND", "behind"),
                (&well, "BRAND", "well"),
            ],
        )
        .await;
    }
    // A new binary's migration reaches two of them: one migrates, one fails.
    one_behind(&t, &pool, &sick, "sick").await;
    break_migrations(&t, &pool, "sick").await;
    one_behind(&t, &pool, &behind, "behind").await;
    t.emit_ok(&[
        lines::catalog(&sick, 1, &["S1"], &[]),
        lines::catalog(&behind, 1, &["B1"], &[]),
        lines::catalog(&well, 1, &["W1"], &[]),
    ]);

    let mut worker = t.spawn_run("rollout");
    wait_for("the healthy brands' updates", SETTLE, || async {
        (fabrics(&t, &pool, "behind").await == 1 && fabrics(&t, &pool, "well").await == 1)
            .then_some(())
    })
    .await;
    let (version, failure) = wait_for("the failure to be recorded", SETTLE, || async {
        let state = migration_state(&t, &pool, &sick).await;
        state.1.is_some().then_some(state)
    })
    .await;
    assert_eq!(version, Some(latest_brand() - 1), "left where it was");
    assert!(
        failure
            .as_deref()
            .unwrap()
            .contains("previously applied but has been modified"),
        "the reason is sqlx's: {failure:?}"
    );
    assert_eq!(
        migration_state(&t, &pool, &behind).await,
        (Some(latest_brand()), None),
        "the healthy one behind was brought up"
    );
    // The failed tenant's event waits (it is not dead-lettered), and the worker goes on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fabrics(&t, &pool, "sick").await,
        0,
        "applied to a database behind"
    );
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "the worker stopped"
    );
    assert_eq!(
        t.message_count(blindstrader_tenancy::log::topics::Topic::DeadLetter),
        0
    );
    let status = t.status();
    let failed: Vec<String> = status["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|k| k["failed"].as_array().unwrap().clone())
        .map(|f| f[0].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(failed, vec![sick.clone()], "status lists the failed tenant");

    // A retry before the fix fails again and says so.
    let (code, out, _) = t.tenancy_output(&["migrate", "--retry", "sick"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("1 failed"), "{out}");

    fix_migrations(&t, &pool, "sick", "well").await;
    let (code, out, err) = t.tenancy_output(&["migrate", "--retry", "sick"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("1 migrated, 0 failed"), "{out}");
    assert_eq!(
        migration_state(&t, &pool, &sick).await,
        (Some(latest_brand()), None)
    );
    // The running worker's held event applies now.
    wait_for("the retried brand's update", SETTLE, || async {
        (fabrics(&t, &pool, "sick").await == 1).then_some(())
    })
    .await;
    worker.terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_halts_on_its_canary_and_past_max_failures_then_resumes() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let slugs = ["m1", "m2", "m3", "m4"];
    let ids = brands_one_behind(&t, &pool, &slugs).await;
    // The rollout goes in slug order: the canary (m1) and the next (m2) are broken.
    break_migrations(&t, &pool, "m1").await;
    break_migrations(&t, &pool, "m2").await;
    let at = |v: i64| Some(v);

    let (code, out, _) = t.tenancy_output(&["migrate", "--dry-run", "--kind", "brand"]);
    assert_eq!(code, Some(1), "tenants are behind: {out}");
    assert_eq!(out.lines().count(), 4, "{out}");
    for (id, _) in ids.iter().zip(slugs) {
        assert!(out.contains(id.as_str()), "{out}");
        assert_eq!(
            migration_state(&t, &pool, id).await.0,
            at(latest_brand() - 1)
        );
    }

    // The canary fails: nothing else is touched.
    let (code, out, _) = t.tenancy_output(&["migrate", "--canary", "1"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("halted: canary m1"), "{out}");
    assert!(migration_state(&t, &pool, &ids[0]).await.1.is_some());
    for id in &ids[1..] {
        assert_eq!(
            migration_state(&t, &pool, id).await,
            (at(latest_brand() - 1), None),
            "migrated after a failed canary"
        );
    }

    // No canary, no failure allowed, one at a time: m2 fails and the rollout stops there.
    let (code, out, _) = t.tenancy_output(&[
        "migrate",
        "--canary",
        "0",
        "--max-failures",
        "0",
        "--parallel",
        "1",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("halted: 1 of 3 tenants failed"), "{out}");
    assert!(migration_state(&t, &pool, &ids[1]).await.1.is_some());
    for id in &ids[2..] {
        assert_eq!(
            migration_state(&t, &pool, id).await,
            (at(latest_brand() - 1), None),
            "migrated past --max-failures"
        );
    }

    // The next rollout resumes with what is still behind, passing the failed ones by.
    let (code, out, err) = t.tenancy_output(&["migrate"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("2 migrated, 0 failed, 0 skipped, 0 to try again of 2"),
        "{out}"
    );
    for id in &ids[2..] {
        assert_eq!(
            migration_state(&t, &pool, id).await,
            (at(latest_brand()), None)
        );
    }
    for id in &ids[..2] {
        assert!(
            migration_state(&t, &pool, id).await.1.is_some(),
            "still failed"
        );
    }
}

/// A migration a killed sqlx run left half-applied (its row recorded with success = FALSE, its
/// table missing) is run again by the rollout, and the tenant ends at the latest version.
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_left_half_applied_is_run_again() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let org = new_id();
    {
        let _worker = t.spawn_run("provision");
        t.provisioned(&pool, &[(&org, "BRAND", "torn")]).await;
    }
    let db = format!("{}_brand_torn", t.ns);
    sqlx::raw_sql(&format!(
        "DROP TABLE `{db}`.applied_events; \
         UPDATE `{db}`._sqlx_migrations SET success = FALSE WHERE version = {v}; \
         UPDATE `{ns}_platform`.tenants SET migration_version = {b} WHERE organisation_id = '{org}'",
        v = latest_brand(),
        b = latest_brand() - 1,
        ns = t.ns
    ))
    .execute(&pool)
    .await
    .unwrap();
    let (code, out, err) = t.tenancy_output(&["migrate"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("1 migrated, 0 failed"), "{out}");
    assert_eq!(
        migration_state(&t, &pool, &org).await,
        (Some(latest_brand()), None)
    );
    let recorded: Vec<(i64, bool)> = sqlx::query_as(&format!(
        "SELECT version, success FROM `{db}`._sqlx_migrations ORDER BY version"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        recorded,
        (1..=latest_brand()).map(|v| (v, true)).collect::<Vec<_>>()
    );
    assert_eq!(
        row_count(&pool, &db, "applied_events").await,
        0,
        "the table is back"
    );
}

/// Named canaries go first; the rest goes in waves, and a wave that fails past --max-failures
/// stops the rollout before the next wave starts (with --parallel 4 and no waves, the whole rest
/// would have been started at once). A named canary that is not behind is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_goes_canary_first_then_in_waves_and_stops_after_a_failed_wave() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let slugs = ["w1", "w2", "w3", "w4", "w5"];
    let ids = brands_one_behind(&t, &pool, &slugs).await;
    break_migrations(&t, &pool, "w2").await;
    let behind = (Some(latest_brand() - 1), None);

    let (code, out, err) = t.tenancy_output(&[
        "migrate",
        "--canary-tenant",
        "w5",
        "--wave",
        "2",
        "--parallel",
        "4",
        "--max-failures",
        "0",
    ]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(err.contains("wave 1 of 2: 2 tenant(s)"), "{err}");
    assert!(!err.contains("wave 2 of 2"), "{err}");
    assert!(out.contains("halted: 1 of 5 tenants failed"), "{out}");
    let canary = err.find("brand w5").expect("the canary is reported");
    let first_wave = err.find("brand w1").expect("the first wave is reported");
    assert!(canary < first_wave, "the named canary went first: {err}");
    assert_eq!(
        migration_state(&t, &pool, &ids[4]).await,
        (Some(latest_brand()), None)
    );
    assert_eq!(
        migration_state(&t, &pool, &ids[0]).await,
        (Some(latest_brand()), None)
    );
    assert!(migration_state(&t, &pool, &ids[1]).await.1.is_some());
    for id in &ids[2..4] {
        assert_eq!(
            migration_state(&t, &pool, id).await,
            behind,
            "the second wave never started"
        );
    }

    let (code, out, err) = t.tenancy_output(&["migrate", "--canary-tenant", "w1"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(err.contains("is not behind its latest migration"), "{err}");
    assert_eq!(
        migration_state(&t, &pool, &ids[2]).await,
        behind,
        "nothing migrated"
    );
}

/// Old and new workers side by side during an upgrade: a tenant a newer binary has already
/// brought to a later migration (an expand: a column added, nullable) is served by this
/// binary as before, which neither holds its events nor tries to migrate it back or mark it
/// failed.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_a_newer_binary_has_expanded_is_still_served_by_this_one() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let org = new_id();
    let _worker = t.spawn_run("old");
    t.provisioned(&pool, &[(&org, "BRAND", "ahead")]).await;
    let db = format!("{}_brand_ahead", t.ns);
    let newer = latest_brand() + 1;
    sqlx::raw_sql(&format!(
        "ALTER TABLE `{db}`.fabrics ADD COLUMN pattern_repeat_mm INT NULL; \
         INSERT INTO `{db}`._sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ({newer}, 'fabric pattern repeat', TRUE, X'00', 1); \
         UPDATE `{ns}_platform`.tenants SET migration_version = {newer} WHERE organisation_id = '{org}'",
        ns = t.ns
    ))
    .execute(&pool)
    .await
    .unwrap();
    t.emit_ok(&[lines::catalog(&org, 1, &["A", "B"], &[])]);
    wait_for("the catalog to apply", SETTLE, || async {
        (fabrics(&t, &pool, "ahead").await == 2).then_some(())
    })
    .await;
    // A worker of this binary starting now (its background rollout) and `tenancy migrate`
    // leave it alone.
    let _second = t.spawn_run("old-again");
    let (code, out, err) = t.tenancy_output(&["migrate"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("0 migrated, 0 failed, 0 skipped, 0 to try again of 0"),
        "{out}"
    );
    t.emit_ok(&[lines::catalog(&org, 2, &["C"], &[])]);
    wait_for("the second event to apply", SETTLE, || async {
        (fabrics(&t, &pool, "ahead").await == 3).then_some(())
    })
    .await;
    assert_eq!(migration_state(&t, &pool, &org).await, (Some(newer), None));
}
