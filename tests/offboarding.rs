//! Offboarding that keeps its word: the grace runs by the log's clock, a purge leaves nothing of
//! the tenant anywhere and frees its slug and hosts, access changes apply in the order they
//! happened wherever they arrive, a revoke made while either side is archived survives the
//! restore, and a rebuild of the same topics ends the same.

mod common;

use std::time::Duration;

#[cfg(feature = "fault-injection")]
use blindstrader_tenancy::log::events::{Event, EventKind};
#[cfg(feature = "fault-injection")]
use blindstrader_tenancy::log::topics::Topic;
use common::*;
use serde_json::json;
use sqlx::MySqlPool;

const SETTLE: Duration = Duration::from_secs(120);

/// An OrganisationTerminated line with an explicit occurred_at (epoch ms).
fn terminated_at(org: &str, kind: &str, slug: &str, at: i64) -> String {
    json!({"type": "OrganisationTerminated", "organisation_id": org, "organisation_type": kind,
        "slug": slug, "reason": "contract ended", "terminated_by": "ops@blindstrader",
        "occurred_at": at})
    .to_string()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The tenant row's purge_after, in epoch ms.
async fn purge_after(t: &TestNs, pool: &MySqlPool, org: &str) -> i64 {
    let at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(&format!(
        "SELECT purge_after FROM `{}_platform`.tenants WHERE organisation_id = ?",
        t.ns
    ))
    .bind(org)
    .fetch_one(pool)
    .await
    .unwrap();
    at.timestamp_millis()
}

/// `tenancy tenants show ORG --json`, parsed.
fn shown(t: &TestNs, org: &str) -> serde_json::Value {
    let (code, out, err) = t.tenancy_output(&["tenants", "show", org, "--json"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    serde_json::from_str(out.lines().next().unwrap()).unwrap()
}

/// Whether the tenant's purge finished: its row purged and its database name let go.
async fn wait_purged(t: &TestNs, pool: &MySqlPool, org: &str) {
    wait_for(&format!("{org} purged completely"), SETTLE, || async {
        let row: Option<(String, Option<String>)> = sqlx::query_as(&format!(
            "SELECT CAST(status AS CHAR), database_name FROM `{}_platform`.tenants \
             WHERE organisation_id = ?",
            t.ns
        ))
        .bind(org)
        .fetch_optional(pool)
        .await
        .unwrap();
        matches!(row, Some((s, None)) if s == "purged").then_some(())
    })
    .await;
}

async fn count(pool: &MySqlPool, sql: &str, id: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn redis_keys(t: &TestNs, pattern: &str) -> Vec<String> {
    let mut conn = redis::Client::open(t.config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_termination_stamped_in_1970_keeps_its_full_grace_and_its_restore() {
    // A producer sent seconds for milliseconds: occurred_at 1767225600 is 1970-01-21. The
    // termination is placed at the log's time: archived, purge due an hour (the grace) after it
    // was applied, restorable; the audit trail keeps the claimed time and who asked.
    let t = TestNs::new();
    let pool = t.prepared_pool().await;
    let _worker = t.spawn_run_with("w", &["--grace", "1h", "--purge-check", "300ms"]);
    let brand = new_id();
    t.provisioned(&pool, &[(&brand, "BRAND", "early")]).await;
    t.emit_ok(&[lines::catalog(&brand, 1, &["E1"], &[])]);
    let db = format!("{}_brand_early", t.ns);
    wait_for("the catalog", SETTLE, || async {
        (fabric_rows(&pool, &db).await.len() == 1).then_some(())
    })
    .await;
    let sent = now_ms();
    t.emit_ok(&[terminated_at(&brand, "BRAND", "early", 1_767_225_600)]);
    t.wait_status(&pool, &brand, "archived").await;
    let due = purge_after(&t, &pool, &brand).await;
    assert!(
        due >= sent + 3_600_000 - 1_000,
        "purge due {due}, an hour after {sent}"
    );
    let history = shown(&t, &brand)["history"].clone();
    let termination = history
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["kind"] == "terminated")
        .unwrap_or_else(|| panic!("{history}"));
    assert_eq!(termination["actor"], "ops@blindstrader");
    assert_eq!(termination["reason"], "contract ended");
    assert!(
        termination["claimed_at"]
            .as_str()
            .is_some_and(|c| c.starts_with("1970-01-21")),
        "{termination}"
    );
    t.emit_ok(&[lines::restored(&new_id(), &brand, "BRAND", "early")]);
    t.wait_status(&pool, &brand, "active").await;
    assert_eq!(fabric_rows(&pool, &db).await.len(), 1, "restored whole");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_termination_stamped_a_year_ahead_does_not_hide_the_restore_after_it() {
    let t = TestNs::new();
    let pool = t.prepared_pool().await;
    let _worker = t.spawn_run_with("w", &["--grace", "1h"]);
    let brand = new_id();
    t.provisioned(&pool, &[(&brand, "BRAND", "ahead")]).await;
    let sent = now_ms();
    let a_year = 365 * 24 * 3_600_000;
    t.emit_ok(&[terminated_at(&brand, "BRAND", "ahead", sent + a_year)]);
    t.wait_status(&pool, &brand, "archived").await;
    let due = purge_after(&t, &pool, &brand).await;
    assert!(
        due < sent + 2 * 3_600_000,
        "the grace runs from the log's time, not a year ahead: due {due}"
    );
    t.emit_ok(&[lines::restored(&new_id(), &brand, "BRAND", "ahead")]);
    t.wait_status(&pool, &brand, "active").await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread")]
async fn a_purge_leaves_nothing_of_the_tenant_on_any_server() {
    // A brand rebuilt (its replaced tables kept), a rebuild killed after making its shadow, a
    // killed move's copy left on the other server, a supplier's copy of it: the purge removes
    // every database of it on every server, the copies and grants, its index rows and keys, and
    // says so in TenantPurged; its row stays as the audit trail.
    let t = TestNs::with_east();
    let home = t.prepared_pool().await;
    let east = MySqlPool::connect(&east_url()).await.unwrap();
    let servers = ["home", "east"];
    let brand = id_placed_on("home", &servers);
    let supplier = id_placed_on("east", &servers);
    let _worker = t.spawn_run_with("w", &["--grace", "3s", "--purge-check", "300ms"]);
    t.provisioned(
        &home,
        &[(&brand, "BRAND", "gone"), (&supplier, "SUPPLIER", "stays")],
    )
    .await;
    t.emit_ok(&[
        lines::catalog(&brand, 1, &["G1", "G2"], &[]),
        lines::grant(&new_id(), &brand, &supplier, &["catalog.read"]),
    ]);
    let supplier_db = format!("{}_supplier_stays", t.ns);
    wait_for("the supplier's copy", SETTLE, || async {
        (row_count(&east, &supplier_db, "brand_fabrics").await == 2).then_some(())
    })
    .await;
    t.wait_caught_up().await;
    let (code, out, err) = t.tenancy_output(&["rebuild", &brand]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let (code, _, err) =
        t.tenancy_output(&["rebuild", &brand, "--dry-run", "--fail-after", "shadow"]);
    assert!(
        code != Some(0) && err.contains("aborting after shadow"),
        "{err}"
    );
    let compact = brand.replace('-', "");
    let live = format!("{}_brand_gone", t.ns);
    // What a move killed half-way leaves on the server it was copying to.
    sqlx::query(&format!("CREATE DATABASE `{live}`"))
        .execute(&east)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE TABLE `{live}`.fabrics (code VARCHAR(64))"))
        .execute(&east)
        .await
        .unwrap();
    let of_the_brand = |pool: MySqlPool| {
        let (compact, live) = (compact.clone(), live.clone());
        async move {
            let names: Vec<String> = sqlx::query_scalar(
                "SELECT CAST(SCHEMA_NAME AS CHAR) FROM information_schema.SCHEMATA \
                 WHERE SCHEMA_NAME LIKE ? OR SCHEMA_NAME = ?",
            )
            .bind(format!("%{compact}%"))
            .bind(&live)
            .fetch_all(&pool)
            .await
            .unwrap();
            names
        }
    };
    let before = of_the_brand(home.clone()).await;
    assert_eq!(before.len(), 3, "live, old and shadow on home: {before:?}");

    t.emit_ok(&[lines::terminated(&new_id(), &brand, "BRAND", "gone")]);
    wait_purged(&t, &home, &brand).await;
    assert_eq!(of_the_brand(home.clone()).await, Vec::<String>::new());
    assert_eq!(of_the_brand(east.clone()).await, Vec::<String>::new());
    let platform = format!("`{}_platform`", t.ns);
    for table in [
        "brand_access WHERE brand_id = ?",
        "kept_copies WHERE organisation_id = ?",
    ] {
        assert_eq!(
            count(
                &home,
                &format!("SELECT COUNT(*) FROM {platform}.{table}"),
                &brand
            )
            .await,
            0,
            "{table}"
        );
    }
    for table in ["brand_fabrics", "brand_access", "access_changes"] {
        assert_eq!(
            count(
                &east,
                &format!("SELECT COUNT(*) FROM `{supplier_db}`.{table} WHERE brand_id = ?"),
                &brand
            )
            .await,
            0,
            "the supplier's {table}"
        );
    }
    assert_eq!(
        redis_keys(&t, &format!("{}:*{brand}*", t.ns)).await,
        Vec::<String>::new()
    );
    // The decision named what it removes, and the row is the audit trail.
    let purged = t
        .read_events(Topic::Tenancy, 1, Duration::from_secs(10))
        .await
        .into_iter()
        .find_map(|e| match e {
            Event::Other {
                kind: EventKind::TenantPurged,
                value,
            } => Some(format!("{value:?}")),
            _ => None,
        })
        .expect("a TenantPurged");
    for name in [
        format!("home/{}_arc_{compact}", t.ns),
        format!("home/{}_old_{compact}", t.ns),
        format!("home/{}_shadow_{compact}", t.ns),
        format!("east/{live}"),
    ] {
        assert!(purged.contains(&name), "{name} in {purged}");
    }
    let history = shown(&t, &brand)["history"].to_string();
    assert!(
        history.contains("terminated") && history.contains("purged"),
        "{history}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_purged_retailers_hosts_and_slug_are_free_again() {
    let t = TestNs::new();
    let pool = t.prepared_pool().await;
    let _worker = t.spawn_run_with("w", &["--grace", "2s", "--purge-check", "300ms"]);
    let (first, second) = (new_id(), new_id());
    t.provisioned(
        &pool,
        &[(&first, "RETAILER", "shop"), (&second, "RETAILER", "other")],
    )
    .await;
    t.emit_ok(&[lines::domain_assigned(&first, "shop.example")]);
    let owner = || async {
        sqlx::query_scalar::<_, String>(&format!(
            "SELECT retailer_id FROM `{}_platform`.retailer_domains WHERE host = 'shop.example'",
            t.ns
        ))
        .fetch_optional(&pool)
        .await
        .unwrap()
    };
    wait_for("the first retailer's host", SETTLE, || async {
        (owner().await.as_deref() == Some(first.as_str())).then_some(())
    })
    .await;
    t.emit_ok(&[lines::terminated(&new_id(), &first, "RETAILER", "shop")]);
    wait_purged(&t, &pool, &first).await;
    assert_eq!(owner().await, None, "the purge freed the host");

    t.emit_ok(&[lines::domain_assigned(&second, "shop.example")]);
    wait_for("the host taken by another retailer", SETTLE, || async {
        (owner().await.as_deref() == Some(second.as_str())).then_some(())
    })
    .await;
    let server = common::serve::spawn_serve(&t, &[]);
    let (status, body) = server
        .get("/api/retailer/profile", None, Some("shop.example"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.to_string().contains("other"), "{body}");

    // The slug is free too: a new organisation gets a fresh database under it.
    let third = new_id();
    t.provisioned(&pool, &[(&third, "RETAILER", "shop")]).await;
    let db = format!("{}_retailer_shop", t.ns);
    assert_eq!(
        row_count(&pool, &db, "domains").await,
        0,
        "a fresh database"
    );
    assert!(
        t.dead_letters(0, Duration::from_secs(2)).is_empty(),
        "nothing refused"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_replayed_after_its_revoke_leaves_no_access_anywhere() {
    // The grant waited for a supplier that came too late (dead-lettered after --hold-for); the
    // supplier arrived, a revoke was applied; then the grant is replayed from the dead letters.
    // The revoke happened after the grant: it wins. No row, no index entry, no cache key, no
    // access; a rebuild of the supplier from the topics ends the same.
    let t = TestNs::new();
    let pool = t.prepared_pool().await;
    let _worker = t.spawn_run_with("w", &["--hold-for", "2s"]);
    let (brand, supplier) = (new_id(), new_id());
    t.provisioned(&pool, &[(&brand, "BRAND", "rb")]).await;
    t.emit_ok(&[
        lines::catalog(&brand, 1, &["R1"], &[]),
        lines::grant(&new_id(), &brand, &supplier, &["catalog.read"]),
    ]);
    let letters = t.dead_letters(1, SETTLE);
    assert!(
        letters[0]
            .header("dlq.reason")
            .unwrap()
            .contains("never became active"),
        "{:?}",
        letters[0].header("dlq.reason")
    );
    t.provisioned(&pool, &[(&supplier, "SUPPLIER", "rs")]).await;
    t.emit_ok(&[lines::revoke(&brand, &supplier)]);
    let db = format!("{}_supplier_rs", t.ns);
    t.wait_caught_up().await;
    let (code, out, err) = t.tenancy_output(&["dead-letter", "replay"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    t.wait_caught_up().await;

    no_access(&t, &pool, &brand, &supplier, &db).await;
    let revoke: (i64, bool) = sqlx::query_as(&format!(
        "SELECT COUNT(*), MAX(granted) = 0 FROM `{db}`.access_changes WHERE brand_id = ?"
    ))
    .bind(&brand)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(revoke, (1, true), "the revoke is the pair's latest change");
    let (code, out, err) = t.tenancy_output(&["rebuild", &supplier, "--dry-run"]);
    assert_eq!(
        code,
        Some(0),
        "the rebuilt supplier equals the live one: {out}\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoke_and_a_grant_of_the_same_millisecond_end_revoked() {
    // Two changes of one pair stamped the same millisecond cannot be ordered by time: taking
    // away wins the tie. The grant's event id sorts after the revoke's, so ordering by id alone
    // would let it through. The same for a host removed and assigned in one millisecond.
    let t = TestNs::new();
    let pool = t.prepared_pool().await;
    let _worker = t.spawn_run("w");
    let (brand, supplier, retailer) = (new_id(), new_id(), new_id());
    t.provisioned(
        &pool,
        &[
            (&brand, "BRAND", "tb"),
            (&supplier, "SUPPLIER", "ts"),
            (&retailer, "RETAILER", "tr"),
        ],
    )
    .await;
    let at = now_ms();
    let stamped = |line: String, id: &str| {
        let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["event_id"] = json!(id);
        v["occurred_at"] = json!(at);
        v.to_string()
    };
    t.emit_ok(&[
        lines::catalog(&brand, 1, &["T1"], &[]),
        stamped(
            lines::revoke(&brand, &supplier),
            "00000000-0000-4000-8000-000000000001",
        ),
        stamped(
            lines::grant("", &brand, &supplier, &["catalog.read"]),
            "ffffffff-ffff-4fff-bfff-ffffffffffff",
        ),
        stamped(
            lines::domain_removed(&retailer, "tie.example"),
            "00000000-0000-4000-8000-000000000002",
        ),
        stamped(
            lines::domain_assigned(&retailer, "tie.example"),
            "ffffffff-ffff-4fff-bfff-fffffffffffe",
        ),
    ]);
    t.wait_caught_up().await;
    let db = format!("{}_supplier_ts", t.ns);
    no_access(&t, &pool, &brand, &supplier, &db).await;
    let indexed = count(
        &pool,
        &format!(
            "SELECT COUNT(*) FROM `{}_platform`.retailer_domains WHERE retailer_id = ?",
            t.ns
        ),
        &retailer,
    )
    .await;
    assert_eq!(
        indexed, 0,
        "the removal wins the tie: the host is not assigned"
    );
    let (code, out, err) = t.tenancy_output(&["rebuild", &supplier, "--dry-run"]);
    assert_eq!(code, Some(0), "a rebuild ends the same: {out}\n{err}");
    let (code, out, err) = t.tenancy_output(&["rebuild", &retailer, "--dry-run"]);
    assert_eq!(code, Some(0), "a rebuild ends the same: {out}\n{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_assignment_replayed_after_its_removal_assigns_nothing() {
    // The same for a custom host: the assignment waited for a retailer that came too late, the
    // removal came after; the assignment replayed from the dead letters changes nothing, live
    // and in a rebuild of the retailer.
    let t = TestNs::new();
    let pool = t.prepared_pool().await;
    let _worker = t.spawn_run_with("w", &["--hold-for", "2s"]);
    let retailer = new_id();
    t.emit_ok(&[lines::domain_assigned(&retailer, "late.example")]);
    t.dead_letters(1, SETTLE);
    t.provisioned(&pool, &[(&retailer, "RETAILER", "late")])
        .await;
    t.emit_ok(&[lines::domain_removed(&retailer, "late.example")]);
    t.wait_caught_up().await;
    let (code, out, err) = t.tenancy_output(&["dead-letter", "replay"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    t.wait_caught_up().await;
    let indexed = count(
        &pool,
        &format!(
            "SELECT COUNT(*) FROM `{}_platform`.retailer_domains WHERE retailer_id = ?",
            t.ns
        ),
        &retailer,
    )
    .await;
    assert_eq!(indexed, 0, "the removal, later, wins");
    let db = format!("{}_retailer_late", t.ns);
    assert_eq!(row_count(&pool, &db, "domains").await, 0);
    let (code, out, err) = t.tenancy_output(&["rebuild", &retailer, "--dry-run"]);
    assert_eq!(
        code,
        Some(0),
        "the rebuilt retailer equals the live one: {out}\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoke_while_either_side_is_archived_holds_after_the_restore() {
    let t = TestNs::new();
    let pool = t.prepared_pool().await;
    let _worker = t.spawn_run_with("w", &["--grace", "1h"]);
    let (brand, supplier, brand2, supplier2) = (new_id(), new_id(), new_id(), new_id());
    t.provisioned(
        &pool,
        &[
            (&brand, "BRAND", "ab"),
            (&supplier, "SUPPLIER", "as"),
            (&brand2, "BRAND", "ab2"),
            (&supplier2, "SUPPLIER", "as2"),
        ],
    )
    .await;
    t.emit_ok(&[
        lines::catalog(&brand, 1, &["A1"], &[]),
        lines::catalog(&brand2, 1, &["B1"], &[]),
        lines::grant(&new_id(), &brand, &supplier, &["catalog.read"]),
        lines::grant(&new_id(), &brand2, &supplier2, &["catalog.read"]),
    ]);
    let (db, db2) = (
        format!("{}_supplier_as", t.ns),
        format!("{}_supplier_as2", t.ns),
    );
    wait_for("both copies", SETTLE, || async {
        (row_count(&pool, &db, "brand_fabrics").await == 1
            && row_count(&pool, &db2, "brand_fabrics").await == 1)
            .then_some(())
    })
    .await;

    // The supplier archived, the revoke, the restore.
    t.emit_ok(&[lines::terminated(&new_id(), &supplier, "SUPPLIER", "as")]);
    t.wait_status(&pool, &supplier, "archived").await;
    t.emit_ok(&[lines::revoke(&brand, &supplier)]);
    t.wait_caught_up().await;
    t.emit_ok(&[lines::restored(&new_id(), &supplier, "SUPPLIER", "as")]);
    t.wait_status(&pool, &supplier, "active").await;
    no_access(&t, &pool, &brand, &supplier, &db).await;

    // The brand archived, the revoke, the brand restored.
    t.emit_ok(&[lines::terminated(&new_id(), &brand2, "BRAND", "ab2")]);
    t.wait_status(&pool, &brand2, "archived").await;
    t.emit_ok(&[lines::revoke(&brand2, &supplier2)]);
    t.wait_caught_up().await;
    t.emit_ok(&[lines::restored(&new_id(), &brand2, "BRAND", "ab2")]);
    t.wait_status(&pool, &brand2, "active").await;
    t.wait_caught_up().await;
    no_access(&t, &pool, &brand2, &supplier2, &db2).await;

    for s in [&supplier, &supplier2] {
        let (code, out, err) = t.tenancy_output(&["rebuild", s, "--dry-run"]);
        assert_eq!(
            code,
            Some(0),
            "the rebuilt supplier equals the live one: {out}\n{err}"
        );
    }
    assert!(t.dead_letters(0, Duration::from_secs(2)).is_empty());
}

/// The supplier holds no access to the brand anywhere: its row, its copy, the platform's index,
/// the cache, and `tenancy access check`.
async fn no_access(t: &TestNs, pool: &MySqlPool, brand: &str, supplier: &str, db: &str) {
    let in_db = |table: &'static str| {
        let sql = format!("SELECT COUNT(*) FROM `{db}`.{table} WHERE brand_id = ?");
        async move { count(pool, &sql, brand).await }
    };
    assert_eq!(in_db("brand_access").await, 0, "the supplier's grant row");
    assert_eq!(in_db("brand_fabrics").await, 0, "the supplier's copy");
    let index = format!(
        "SELECT COUNT(*) FROM `{}_platform`.brand_access WHERE brand_id = ?",
        t.ns
    );
    assert_eq!(count(pool, &index, brand).await, 0, "the platform's index");
    assert_eq!(
        redis_keys(
            t,
            &format!("{}:supplier:{supplier}:brand_access:{brand}", t.ns)
        )
        .await,
        Vec::<String>::new(),
        "the cache"
    );
    let (code, out, err) = t.tenancy_output(&["access", "check", supplier, brand]);
    assert_eq!(code, Some(1), "no access: {out}\n{err}");
}
