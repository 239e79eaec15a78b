//! An event applies at most once by its `event_id`, whatever offset it arrives at: a producer
//! retrying without idempotence, `tenancy emit` run again on a file, a dead-letter replay. For
//! each input event type: send it, send something that changes the same state, send the first
//! again with its original id; the state must be what the first two made.

mod common;

use std::time::Duration;

use blindstrader_tenancy::log::events::Event;
use blindstrader_tenancy::log::topics::Topic;
use common::lines;
use common::*;
use serde_json::json;
use sqlx::MySqlPool;

const SETTLE: Duration = Duration::from_secs(120);

/// A BrandCatalogUpdated naming fabric `code` `name`, at `revision`, with a given event id.
fn catalog(event_id: &str, brand: &str, revision: i64, code: &str, name: &str) -> String {
    json!({"type": "BrandCatalogUpdated", "event_id": event_id, "brand_id": brand, "brand_slug": "b",
        "revision": revision, "fabrics_upserted": [lines::fabric(code, name)], "fabrics_removed": []})
    .to_string()
}

fn revoke(event_id: &str, brand: &str, supplier: &str) -> String {
    json!({"type": "SupplierBrandAccessRevoked", "event_id": event_id, "brand_id": brand,
        "supplier_id": supplier})
    .to_string()
}

async fn access_row(pool: &MySqlPool, db: &str, brand: &str) -> Option<String> {
    sqlx::query_scalar(&format!(
        "SELECT CAST(permissions AS CHAR) FROM `{db}`.brand_access WHERE brand_id = ?"
    ))
    .bind(brand)
    .fetch_optional(pool)
    .await
    .unwrap()
}

async fn cached(t: &TestNs, supplier: &str, brand: &str) -> Option<String> {
    let mut conn = redis::Client::open(t.config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("GET")
        .arg(format!("{}:supplier:{supplier}:brand_access:{brand}", t.ns))
        .query_async(&mut conn)
        .await
        .unwrap()
}

fn access_check(t: &TestNs, supplier: &str, brand: &str) -> Option<i32> {
    t.tenancy_output(&["access", "check", supplier, brand]).0
}

#[tokio::test(flavor = "multi_thread")]
async fn catalog_and_access_events_apply_once_by_their_id() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let worker = t.spawn_run("identity");
    let (brand, supplier) = (new_id(), new_id());
    t.provisioned(
        &pool,
        &[(&brand, "BRAND", "ided"), (&supplier, "SUPPLIER", "idsup")],
    )
    .await;
    let brand_db = format!("{}_brand_ided", t.ns);
    let supplier_db = format!("{}_supplier_idsup", t.ns);

    // BrandCatalogUpdated: the same revision twice, so only the id tells the copy from the
    // change that came after it.
    let first = new_id();
    t.emit_ok(&[
        catalog(&first, &brand, 5, "A", "first"),
        catalog(&new_id(), &brand, 5, "A", "second"),
    ]);
    wait_for("the second change", SETTLE, || async {
        (fabric_rows(&pool, &brand_db).await == [("A".into(), "second".into(), 5)]).then_some(())
    })
    .await;
    t.emit_ok(&[catalog(&first, &brand, 5, "A", "first")]);
    t.wait_caught_up().await;
    assert_eq!(
        fabric_rows(&pool, &brand_db).await,
        [("A".into(), "second".into(), 5)],
        "the first event, sent again, came back"
    );

    // SupplierBrandAccessGranted: grant, revoke, the grant again.
    let grant = new_id();
    t.emit_ok(&[lines::grant(&grant, &brand, &supplier, &["catalog.read"])]);
    wait_for("the grant", SETTLE, || async {
        access_row(&pool, &supplier_db, &brand).await.map(|_| ())
    })
    .await;
    t.emit_ok(&[revoke(&new_id(), &brand, &supplier)]);
    wait_for("the revoke", SETTLE, || async {
        access_row(&pool, &supplier_db, &brand)
            .await
            .is_none()
            .then_some(())
    })
    .await;
    t.emit_ok(&[lines::grant(&grant, &brand, &supplier, &["catalog.read"])]);
    t.wait_caught_up().await;
    assert_eq!(access_row(&pool, &supplier_db, &brand).await, None);
    assert_eq!(cached(&t, &supplier, &brand).await, None);
    assert_eq!(
        access_check(&t, &supplier, &brand),
        Some(1),
        "access came back"
    );

    // SupplierBrandAccessRevoked: revoke, a new grant, the revoke again.
    let revocation = new_id();
    t.emit_ok(&[lines::grant(
        &new_id(),
        &brand,
        &supplier,
        &["catalog.read"],
    )]);
    wait_for("the second grant", SETTLE, || async {
        access_row(&pool, &supplier_db, &brand).await.map(|_| ())
    })
    .await;
    t.emit_ok(&[revoke(&revocation, &brand, &supplier)]);
    wait_for("the second revoke", SETTLE, || async {
        access_row(&pool, &supplier_db, &brand)
            .await
            .is_none()
            .then_some(())
    })
    .await;
    t.emit_ok(&[lines::grant(
        &new_id(),
        &brand,
        &supplier,
        &["catalog.read", "pricing.read"],
    )]);
    wait_for("the third grant", SETTLE, || async {
        access_row(&pool, &supplier_db, &brand).await.map(|_| ())
    })
    .await;
    t.emit_ok(&[revoke(&revocation, &brand, &supplier)]);
    t.wait_caught_up().await;
    assert_eq!(
        access_row(&pool, &supplier_db, &brand).await.as_deref(),
        Some(r#"["catalog.read","pricing.read"]"#),
        "a revoke sent again took the later grant away"
    );
    assert_eq!(
        cached(&t, &supplier, &brand).await.as_deref(),
        Some(r#"["catalog.read","pricing.read"]"#)
    );
    assert_eq!(access_check(&t, &supplier, &brand), Some(0));
    let copied: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM `{supplier_db}`.brand_fabrics WHERE price_minor IS NOT NULL"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(copied, 1, "the copy follows the last grant");

    // Each duplicate was counted.
    let http = t.worker_http_addr(&pool, None).await;
    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tenancy_events_duplicate_total{processor=\"catalog\"} 3"),
        "{metrics}"
    );
    drop(worker);
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_events_apply_once_by_their_id() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let worker = t.spawn_run_with("identity-lifecycle", &["--grace", "1h"]);
    let brand = new_id();
    let created = lines::created(&brand, "BRAND", "onceonly");
    t.emit_ok(std::slice::from_ref(&created));
    t.wait_status(&pool, &brand, "active").await;
    // OrganisationCreated again while active: nothing re-runs, nothing is published again.
    t.emit_ok(std::slice::from_ref(&created));
    t.wait_caught_up().await;
    let provisioned = t
        .read_events(Topic::Tenancy, 1, SETTLE)
        .await
        .into_iter()
        .filter(|e| matches!(e, Event::TenantProvisioned(_)))
        .count();
    assert_eq!(
        provisioned, 1,
        "a duplicate OrganisationCreated published again"
    );

    // Terminated, Restored, the termination again: still active.
    let terminated = lines::terminated(&new_id(), &brand, "BRAND", "onceonly");
    t.emit_ok(std::slice::from_ref(&terminated));
    t.wait_status(&pool, &brand, "archived").await;
    let restored = lines::restored(&new_id(), &brand, "BRAND", "onceonly");
    t.emit_ok(std::slice::from_ref(&restored));
    t.wait_status(&pool, &brand, "active").await;
    t.emit_ok(std::slice::from_ref(&terminated));
    t.wait_caught_up().await;
    assert_eq!(
        status_of(&pool, &t.ns, &brand).await.as_deref(),
        Some("active")
    );

    // A second termination, the restore again: still archived. Then the creation again.
    t.emit_ok(&[lines::terminated(&new_id(), &brand, "BRAND", "onceonly")]);
    t.wait_status(&pool, &brand, "archived").await;
    t.emit_ok(&[restored, created]);
    t.wait_caught_up().await;
    assert_eq!(
        status_of(&pool, &t.ns, &brand).await.as_deref(),
        Some("archived")
    );
    assert!(!database_exists(&pool, &format!("{}_brand_onceonly", t.ns)).await);
    let log = worker.log_text();
    for line in [
        "OrganisationCreated already applied: ignored",
        "OrganisationTerminated already applied: ignored",
        "OrganisationRestored already applied: ignored",
    ] {
        assert!(log.contains(line), "{line}\n{log}");
    }
}
