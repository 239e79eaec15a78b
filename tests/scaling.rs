//! What operators do to a running platform: badly addressed events, tenants that never arrive,
//! lifecycle races, stale redeliveries, several workers. One test per finding of the scaling and
//! safety review; each fails on the code before it. Real MariaDB, Redis, broker and registry.

mod common;

use std::time::Duration;

use blindstrader_tenancy::catalog::gate::Target;
use blindstrader_tenancy::catalog::item::{Change, Item};
use blindstrader_tenancy::log::events::{
    self, Event, EventKind, OrganisationTerminated, TenantPurged,
};
use blindstrader_tenancy::log::topics::Topic;
use blindstrader_tenancy::log::wire::Codec;
use blindstrader_tenancy::stream::{Gate, Msg, Processor, StepError};
#[cfg(feature = "fault-injection")]
use blindstrader_tenancy::tenancy::purge::PurgeItem;
use blindstrader_tenancy::tenant::OrganisationType;
use common::lines;
use common::*;

const SETTLE: Duration = Duration::from_secs(120);

fn brand_db(t: &TestNs, slug: &str) -> String {
    format!("{}_brand_{slug}", t.ns)
}

fn archive_db(t: &TestNs, org: &str) -> String {
    format!("{}_arc_{}", t.ns, org.replace('-', ""))
}

fn names(rows: &[(String, String, i64)]) -> Vec<&str> {
    rows.iter().map(|(_, n, _)| n.as_str()).collect()
}

/// The dead letters whose `dlq.tenant` is `tenant`, waiting for at least `n` in all.
fn letters_for(t: &TestNs, n: usize, tenant: &str) -> Vec<RawMessage> {
    t.dead_letters(n, SETTLE)
        .into_iter()
        .filter(|m| m.header("dlq.tenant").as_deref() == Some(tenant))
        .collect()
}

fn reason(m: &RawMessage) -> String {
    m.header("dlq.reason").unwrap_or_default()
}

/// Finding 1: a catalog event naming a supplier or retailer as its brand, a grant naming a
/// brand as its supplier, and an event for an active tenant whose database is gone used to
/// retry forever and stall the worker. Now the first three are refused before any SQL, the last
/// after a bounded number of attempts, and the event behind them applies.
#[tokio::test(flavor = "multi_thread")]
async fn badly_addressed_events_are_dead_lettered_and_stall_nothing() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run_with("addressing", &["--max-attempts", "2"]);
    let (brand, other, supplier, retailer, gone) =
        (new_id(), new_id(), new_id(), new_id(), new_id());
    t.provisioned(
        &pool,
        &[
            (&brand, "BRAND", "good"),
            (&other, "BRAND", "other"),
            (&supplier, "SUPPLIER", "sup"),
            (&retailer, "RETAILER", "ret"),
            (&gone, "BRAND", "gone"),
        ],
    )
    .await;
    sqlx::query(&format!("DROP DATABASE `{}`", brand_db(&t, "gone")))
        .execute(&pool)
        .await
        .unwrap();
    t.emit_ok(&[
        lines::catalog(&supplier, 1, &["S1"], &[]),
        lines::catalog(&retailer, 1, &["R1"], &[]),
        lines::grant(&new_id(), &brand, &other, &["catalog.read"]),
        lines::catalog(&gone, 1, &["G1"], &[]),
        lines::catalog(&brand, 1, &["A"], &[]),
    ]);
    wait_for("the good brand's catalog", SETTLE, || async {
        (fabric_rows(&pool, &brand_db(&t, "good")).await.len() == 1).then_some(())
    })
    .await;
    let letters = t.dead_letters(4, SETTLE);
    assert_eq!(
        letters.len(),
        4,
        "{:?}",
        letters.iter().map(reason).collect::<Vec<_>>()
    );
    let by_tenant = |id: &str| -> Vec<String> {
        letters
            .iter()
            .filter(|m| m.header("dlq.tenant").as_deref() == Some(id))
            .map(reason)
            .collect()
    };
    assert_eq!(
        by_tenant(&supplier),
        [format!(
            "brand_id {supplier} names a SUPPLIER tenant, not a BRAND"
        )]
    );
    assert_eq!(
        by_tenant(&retailer),
        [format!(
            "brand_id {retailer} names a RETAILER tenant, not a BRAND"
        )]
    );
    assert_eq!(
        by_tenant(&brand),
        [format!(
            "supplier_id {other} names a BRAND tenant, not a SUPPLIER"
        )]
    );
    let gone_reasons = by_tenant(&gone);
    assert_eq!(gone_reasons.len(), 1);
    assert!(
        gone_reasons[0].starts_with("gave up after 2 attempts: "),
        "{gone_reasons:?}"
    );
    for m in &letters {
        assert_eq!(m.header("dlq.processor").as_deref(), Some("catalog"));
        assert!(m.header("dlq.source.offset").is_some());
    }
    // Nothing is left behind: every group commits the end of its topics.
    t.wait_caught_up().await;
}

/// Finding 2: a grant to a supplier that never arrives held its brand's catalog, and every event
/// behind it on the partition, for ever. Now it waits alone, `tenancy status` names the supplier
/// it waits for, and after --hold-for it is dead-lettered naming it.
#[tokio::test(flavor = "multi_thread")]
async fn a_grant_waiting_for_a_missing_supplier_holds_only_itself_then_expires() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let mut first = t.spawn_run("holds");
    let (brand, supplier, missing) = (new_id(), new_id(), new_id());
    t.provisioned(
        &pool,
        &[
            (&brand, "BRAND", "holder"),
            (&supplier, "SUPPLIER", "present"),
        ],
    )
    .await;
    t.emit_ok(&[
        lines::grant(&new_id(), &brand, &missing, &["catalog.read"]),
        lines::catalog(&brand, 1, &["A", "B"], &[]),
        lines::grant(&new_id(), &brand, &supplier, &["catalog.read"]),
        lines::catalog(&brand, 2, &["C"], &[]),
    ]);
    // The brand's catalog and its grant to a supplier that exists flow past the waiting grant.
    let copy = format!("{}_supplier_present", t.ns);
    wait_for("the present supplier's copy", SETTLE, || async {
        let n: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM `{copy}`.brand_fabrics WHERE brand_id = ?"
        ))
        .bind(&brand)
        .fetch_one(&pool)
        .await
        .ok();
        (n == Some(3)).then_some(())
    })
    .await;
    wait_for("status to name the missing supplier", SETTLE, || async {
        (t.holds("catalog") == [(missing.clone(), 1)]).then_some(())
    })
    .await;
    assert!(first.terminate().success());

    let _second = t.spawn_run_with("expire", &["--hold-for", "2s"]);
    let letters = wait_for("the expired grant's dead letter", SETTLE, || async {
        let l = letters_for(&t, 1, &missing);
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(letters.len(), 1);
    let why = reason(&letters[0]);
    assert!(
        why.contains(&format!(
            "waiting for tenant {missing}, which never became active"
        )),
        "{why}"
    );
    assert_eq!(
        letters[0].header("dlq.source.topic"),
        Some(t.topic(Topic::BrandAccess))
    );
    t.wait_caught_up().await;
    wait_for("no holds left", SETTLE, || async {
        t.holds("catalog").is_empty().then_some(())
    })
    .await;
}

/// Finding 3: the gate compared the tenants table *now* with the event's time, so an event sent
/// after a termination but consumed before it was applied landed in the archive, and one sent
/// just after a restore but consumed before it was applied was skipped for good. Here the
/// lifecycle processor is kept stopped while the catalog processor consumes, the worst case of
/// that race; the verdicts must be a replay's.
#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_order_is_log_order_not_consumption_order() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let brand = new_id();
    let mut setup = t.spawn_run("setup");
    t.provisioned(&pool, &[(&brand, "BRAND", "ordered")]).await;
    t.emit_ok(&[lines::catalog(&brand, 1, &["A"], &[])]);
    let live = brand_db(&t, "ordered");
    wait_for("revision 1", SETTLE, || async {
        (fabric_rows(&pool, &live).await.len() == 1).then_some(())
    })
    .await;
    assert!(setup.terminate().success());

    // Only the catalog processor runs: lifecycle events sit unapplied in the log.
    let _catalog = t.spawn_run_with("catalog-only", &["--processors", "catalog"]);
    t.emit_ok(&[lines::terminated(&new_id(), &brand, "BRAND", "ordered")]);
    t.emit_ok(&[lines::catalog(&brand, 2, &["B"], &[])]);
    wait_for(
        "the change after the termination to be held",
        SETTLE,
        || async { (t.holds("catalog") == [("(lifecycle)".to_owned(), 1)]).then_some(()) },
    )
    .await;
    assert_eq!(names(&fabric_rows(&pool, &live).await), ["A r1"]);

    let mut lifecycle = t.spawn_run_with(
        "lifecycle",
        &["--processors", "provisioner,purger", "--grace", "1h"],
    );
    t.wait_status(&pool, &brand, "archived").await;
    t.wait_caught_up().await;
    // Skipped, as a replay skips it: the archive holds what was there at the termination.
    assert_eq!(
        names(&fabric_rows(&pool, &archive_db(&t, &brand)).await),
        ["A r1"]
    );
    assert!(lifecycle.terminate().success());

    t.emit_ok(&[lines::restored(&new_id(), &brand, "BRAND", "ordered")]);
    t.emit_ok(&[lines::catalog(&brand, 3, &["C"], &[])]);
    wait_for(
        "the change after the restore to be held",
        SETTLE,
        || async { (t.holds("catalog") == [("(lifecycle)".to_owned(), 1)]).then_some(()) },
    )
    .await;
    let _lifecycle = t.spawn_run_with(
        "lifecycle-2",
        &["--processors", "provisioner,purger", "--grace", "1h"],
    );
    t.wait_status(&pool, &brand, "active").await;
    t.wait_caught_up().await;
    // Applied once the restore is, as a replay applies it.
    assert_eq!(names(&fabric_rows(&pool, &live).await), ["A r1", "C r3"]);
}

/// Finding 3: restore and purge did not exclude each other, so a purge could drop the database
/// a restore had just brought back. The restore here dies half-way (tables back, tenant not yet
/// active) and a purge of that archive is then applied: it must leave everything to the restore.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread")]
async fn a_purge_never_drops_what_a_restore_is_bringing_back() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let brand = new_id();
    let grace = ["--grace", "6s"];
    let mut first = t.spawn_run_with(
        "restore-crash",
        &[&grace[..], &["--fail-after", "restore-move"]].concat(),
    );
    t.provisioned(&pool, &[(&brand, "BRAND", "contested")])
        .await;
    t.emit_ok(&[lines::catalog(&brand, 1, &["A", "B"], &[])]);
    let live = brand_db(&t, "contested");
    wait_for("the catalog", SETTLE, || async {
        (fabric_rows(&pool, &live).await.len() == 2).then_some(())
    })
    .await;
    let termination = new_id();
    t.emit_ok(&[lines::terminated(
        &termination,
        &brand,
        "BRAND",
        "contested",
    )]);
    t.wait_status(&pool, &brand, "archived").await;
    t.emit_ok(&[lines::restored(&new_id(), &brand, "BRAND", "contested")]);
    let died = first.child.wait().unwrap();
    assert!(!died.success(), "the worker must die at the fault point");
    // Half-way: the tables are back, the tenant is still archived, the restore under way.
    assert_eq!(fabric_rows(&pool, &live).await.len(), 2);
    assert_eq!(
        status_of(&pool, &t.ns, &brand).await.as_deref(),
        Some("archived")
    );

    // The grace period ends; a purge of that archive arrives (as a racing timer's would).
    let purge_after: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(&format!(
        "SELECT purge_after FROM `{}_platform`.tenants WHERE organisation_id = ?",
        t.ns
    ))
    .bind(&brand)
    .fetch_one(&pool)
    .await
    .unwrap();
    let wait = (purge_after - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(200)).await;
    let p = t.processors().await;
    let purge = message(
        &t.topic(Topic::Tenancy),
        0,
        0,
        &brand,
        PurgeItem::Purge(purged(&t, &brand, "contested", &termination)),
    );
    p.purger
        .apply(&[(&purge, &())])
        .await
        .expect("a purge of an archive being restored is skipped, not an error");
    assert_eq!(
        fabric_rows(&pool, &live).await.len(),
        2,
        "the purge dropped the restore's tables"
    );
    assert_eq!(
        status_of(&pool, &t.ns, &brand).await.as_deref(),
        Some("archived")
    );

    // The restore's redelivery finishes it.
    let _second = t.spawn_run_with("restore-again", &grace);
    t.wait_status(&pool, &brand, "active").await;
    t.wait_caught_up().await;
    assert_eq!(fabric_rows(&pool, &live).await.len(), 2);
    // And the purge of the superseded archive, delivered again, changes nothing.
    p.purger.apply(&[(&purge, &())]).await.unwrap();
    assert_eq!(
        status_of(&pool, &t.ns, &brand).await.as_deref(),
        Some("active")
    );
    assert_eq!(fabric_rows(&pool, &live).await.len(), 2);
}

fn purged(t: &TestNs, org: &str, slug: &str, termination: &str) -> TenantPurged {
    TenantPurged {
        event_id: new_id(),
        occurred_at: chrono::Utc::now().timestamp_millis(),
        organisation_id: org.to_owned(),
        organisation_type: OrganisationType::Brand,
        slug: slug.to_owned(),
        database: brand_db(t, slug),
        reason: "forged".into(),
        caused_by: Some(termination.to_owned()),
        removes: Vec::new(),
    }
}

/// Outcome events are the processors' alone: `tenancy emit` refuses them, and a TenantPurged
/// produced by anyone else is re-checked: before the grace period ends it is refused and the
/// archive kept; naming a termination that never happened, it is refused.
#[tokio::test(flavor = "multi_thread")]
async fn forged_outcome_events_are_refused_and_the_archive_kept() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let refused = t.emit(
        &[
            serde_json::json!({"type": "TenantPurged", "organisation_id": new_id(),
            "organisation_type": "BRAND", "slug": "x", "database": "x", "reason": "r"})
            .to_string(),
        ],
        &[],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("TenantPurged is an outcome event"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let _worker = t.spawn_run_with("forged", &["--grace", "1h"]);
    let brand = new_id();
    t.provisioned(&pool, &[(&brand, "BRAND", "kept")]).await;
    t.emit_ok(&[lines::catalog(&brand, 1, &["A"], &[])]);
    wait_for("the catalog", SETTLE, || async {
        (fabric_rows(&pool, &brand_db(&t, "kept")).await.len() == 1).then_some(())
    })
    .await;
    let termination = new_id();
    t.emit_ok(&[lines::terminated(&termination, &brand, "BRAND", "kept")]);
    t.wait_status(&pool, &brand, "archived").await;

    let codec = Codec::new(&t.config.schema_registry_url);
    let topic = t.topic(Topic::Tenancy);
    for caused_by in [termination.clone(), new_id()] {
        let forged = purged(&t, &brand, "kept", &caused_by);
        let value = events::to_avro(EventKind::TenantPurged, &forged).unwrap();
        let payload = codec
            .encode(&topic, EventKind::TenantPurged, value)
            .await
            .unwrap();
        t.produce_raw(&topic, None, &brand, &payload, &[]).await;
    }
    let letters = wait_for("both forged purges refused", SETTLE, || async {
        let l = letters_for(&t, 2, &brand);
        (l.len() == 2).then_some(l)
    })
    .await;
    let reasons: Vec<String> = letters.iter().map(reason).collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("before its grace period ends")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("which was never applied")),
        "{reasons:?}"
    );
    assert_eq!(
        status_of(&pool, &t.ns, &brand).await.as_deref(),
        Some("archived")
    );
    assert_eq!(
        names(&fabric_rows(&pool, &archive_db(&t, &brand)).await),
        ["A r1"]
    );
}

/// Finding 3: a stale or replayed OrganisationRestored could undo a later termination.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_or_replayed_restore_cannot_undo_a_later_termination() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let worker = t.spawn_run_with("stale", &["--grace", "1h"]);
    let brand = new_id();
    t.provisioned(&pool, &[(&brand, "BRAND", "twice")]).await;
    let first_termination = lines::terminated(&new_id(), &brand, "BRAND", "twice");
    t.emit_ok(std::slice::from_ref(&first_termination));
    t.wait_status(&pool, &brand, "archived").await;
    let first_restore = lines::restored(&new_id(), &brand, "BRAND", "twice");
    t.emit_ok(std::slice::from_ref(&first_restore));
    t.wait_status(&pool, &brand, "active").await;
    // The first termination again (a redelivery after a crash, a replay): already applied.
    t.emit_ok(std::slice::from_ref(&first_termination));
    t.wait_caught_up().await;
    assert_eq!(
        status_of(&pool, &t.ns, &brand).await.as_deref(),
        Some("active")
    );
    assert!(database_exists(&pool, &brand_db(&t, "twice")).await);
    let before_second_termination = chrono::Utc::now().timestamp_millis() - 1;
    t.emit_ok(&[lines::terminated(&new_id(), &brand, "BRAND", "twice")]);
    t.wait_status(&pool, &brand, "archived").await;

    // The first restore again (a replay), and a new restore stamped before the termination.
    t.emit_ok(&[
        first_restore,
        lines::restored_at(
            &new_id(),
            &brand,
            "BRAND",
            "twice",
            before_second_termination,
        ),
    ]);
    t.wait_caught_up().await;
    assert_eq!(
        status_of(&pool, &t.ns, &brand).await.as_deref(),
        Some("archived")
    );
    assert!(!database_exists(&pool, &brand_db(&t, "twice")).await);
    assert!(database_exists(&pool, &archive_db(&t, &brand)).await);
    let log = worker.log_text();
    assert!(
        log.contains("OrganisationTerminated already applied: ignored"),
        "{log}"
    );
    assert!(
        log.contains("OrganisationRestored already applied: ignored"),
        "{log}"
    );
    assert!(
        log.contains("OrganisationRestored older than the latest lifecycle event applied: ignored"),
        "{log}"
    );
}

/// Finding 3: two workers racing on one termination dead-lettered the loser's event. Both apply
/// it here at the same moment: both succeed, the tenant is archived once, one outcome id.
#[tokio::test(flavor = "multi_thread")]
async fn two_workers_racing_on_one_termination_apply_it_once() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (a, b) = (t.processors().await, t.processors().await);
    let brand = new_id();
    let topic = t.topic(Topic::Organisations);
    let created = message(
        &topic,
        0,
        0,
        &brand,
        Event::OrganisationCreated(events::OrganisationCreated {
            event_id: new_id(),
            occurred_at: chrono::Utc::now().timestamp_millis(),
            organisation_id: brand.clone(),
            organisation_type: OrganisationType::Brand,
            slug: "raced".into(),
            name: "Raced".into(),
            region: None,
        }),
    );
    a.provisioner.apply(&[(&created, &())]).await.unwrap();
    let terminated = message(
        &topic,
        0,
        1,
        &brand,
        Event::OrganisationTerminated(OrganisationTerminated {
            event_id: new_id(),
            occurred_at: chrono::Utc::now().timestamp_millis(),
            organisation_id: brand.clone(),
            organisation_type: OrganisationType::Brand,
            slug: "raced".into(),
            reason: "race".into(),
            terminated_by: "ops".into(),
        }),
    );
    async fn apply(p: &blindstrader_tenancy::tenancy::provisioning::Provisioner, m: &Msg<Event>) {
        for _ in 0..20 {
            match p.apply(&[(m, &())]).await {
                Ok(()) => return,
                Err(f) if matches!(f.error, StepError::Retry(_)) => continue,
                Err(f) => panic!("the race made a worker fail: {}", f.error),
            }
        }
        panic!("still failing after 20 attempts");
    }
    tokio::join!(
        apply(&a.provisioner, &terminated),
        apply(&b.provisioner, &terminated)
    );
    assert_eq!(
        status_of(&pool, &t.ns, &brand).await.as_deref(),
        Some("archived")
    );
    assert!(!database_exists(&pool, &brand_db(&t, "raced")).await);
    assert!(database_exists(&pool, &archive_db(&t, &brand)).await);
    let archived: std::collections::HashSet<String> = t
        .read_events(Topic::Tenancy, 3, SETTLE)
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::Other {
                kind: EventKind::TenantArchived,
                value,
            } => Some(format!("{value:?}")),
            _ => None,
        })
        .collect();
    assert_eq!(archived.len(), 1, "one outcome, however often published");
}

/// Finding 4: the permission key was written from the event, so a grant delivered again after
/// its revoke (by a worker that still held the partition, or a dead-letter replay) cached access
/// the database no longer gave.
#[tokio::test(flavor = "multi_thread")]
async fn a_grant_delivered_again_after_its_revoke_leaves_no_access_cached() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _provisioner = t.spawn_run_with("provisioner-only", &["--processors", "provisioner"]);
    let (brand, supplier) = (new_id(), new_id());
    t.provisioned(
        &pool,
        &[
            (&brand, "BRAND", "granting"),
            (&supplier, "SUPPLIER", "granted"),
        ],
    )
    .await;
    let p = t.processors().await;
    let topic = t.topic(Topic::BrandAccess);
    let item = |change: Change| Item {
        event_id: new_id(),
        brand: brand.clone(),
        occurred_at: 0,
        change,
    };
    let grant = message(
        &topic,
        0,
        10,
        &brand,
        item(Change::Grant {
            supplier: supplier.clone(),
            permissions: vec!["catalog.read".into()],
        }),
    );
    let revoke = message(
        &topic,
        0,
        11,
        &brand,
        item(Change::Revoke {
            supplier: supplier.clone(),
        }),
    );
    async fn gate_and_apply(p: &blindstrader_tenancy::catalog::CatalogProcessor, m: &Msg<Item>) {
        let target: Target = match p.gate(&[m]).await.unwrap().pop().unwrap() {
            Gate::Ready(t) => t,
            other => panic!("not ready: {other:?}"),
        };
        p.apply(&[(m, &target)]).await.unwrap();
    }
    let key = format!("{}:supplier:{supplier}:brand_access:{brand}", t.ns);
    let mut redis = redis::Client::open(t.config.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let cached = |r: &mut redis::aio::MultiplexedConnection| {
        let mut r = r.clone();
        let key = key.clone();
        async move {
            redis::cmd("GET")
                .arg(&key)
                .query_async::<Option<String>>(&mut r)
                .await
                .unwrap()
        }
    };
    gate_and_apply(&p.catalog, &grant).await;
    assert_eq!(
        cached(&mut redis).await.as_deref(),
        Some(r#"["catalog.read"]"#)
    );
    gate_and_apply(&p.catalog, &revoke).await;
    assert_eq!(cached(&mut redis).await, None);
    // The grant again, as a stale owner or a replay delivers it.
    gate_and_apply(&p.catalog, &grant).await;
    assert_eq!(cached(&mut redis).await, None, "a revoked grant came back");
    let (code, out, _) = t.tenancy_output(&["access", "check", &supplier, &brand]);
    assert_eq!(code, Some(1), "{out}");
}

/// Finding 5: a dead-letter replay (or any late copy) of an old BrandCatalogUpdated overwrote
/// newer rows, and could bring a removed fabric back.
#[tokio::test(flavor = "multi_thread")]
async fn an_older_catalog_event_never_overwrites_a_newer_one() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("revisions");
    let brand = new_id();
    t.provisioned(&pool, &[(&brand, "BRAND", "revised")]).await;
    let db = brand_db(&t, "revised");
    t.emit_ok(&[
        lines::catalog(&brand, 5, &["A", "B"], &[]),
        lines::catalog(&brand, 6, &[], &["B"]),
    ]);
    wait_for("revisions 5 and 6", SETTLE, || async {
        (names(&fabric_rows(&pool, &db).await) == ["A r5"]).then_some(())
    })
    .await;
    t.emit_ok(&[
        lines::catalog(&brand, 3, &["A", "B"], &[]),
        lines::catalog(&brand, 4, &[], &["A"]),
        lines::catalog(&brand, 7, &["D"], &[]),
    ]);
    wait_for("revision 7", SETTLE, || async {
        (fabric_rows(&pool, &db).await.len() == 2).then_some(())
    })
    .await;
    t.wait_caught_up().await;
    assert_eq!(
        fabric_rows(&pool, &db).await,
        [
            ("A".to_owned(), "A r5".to_owned(), 5),
            ("D".to_owned(), "D r7".to_owned(), 7)
        ]
    );
    // D removed, then back, in separate batches: only the removal that still stands is kept,
    // as it would be had both come in one batch.
    t.emit_ok(&[lines::catalog(&brand, 8, &[], &["D"])]);
    wait_for("D removed", SETTLE, || async {
        (fabric_rows(&pool, &db).await.len() == 1).then_some(())
    })
    .await;
    t.emit_ok(&[lines::catalog(&brand, 9, &["D"], &[])]);
    wait_for("D back", SETTLE, || async {
        (fabric_rows(&pool, &db).await.len() == 2).then_some(())
    })
    .await;
    let removed: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT code, revision FROM `{db}`.removed_fabrics ORDER BY code"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(removed, [("B".to_owned(), 6)]);
}

/// Finding 5: held events of a revoked partition stayed in the old owner's memory (and were
/// applied there later), while the new owner fetched them again. Events waiting on every
/// partition, then two more workers: each held event is held once, by its partition's owner.
#[tokio::test(flavor = "multi_thread")]
async fn held_events_move_with_their_partition() {
    let t = TestNs::new();
    let _first = t.spawn_run("hold-1");
    // Grants for brands that do not exist yet, until every partition of the topic holds one.
    let mut held = 0;
    let mut partitions = std::collections::BTreeSet::new();
    while partitions.len() < t.config.partitions as usize {
        let out = t.emit_ok(&[lines::grant(
            &new_id(),
            &new_id(),
            &new_id(),
            &["catalog.read"],
        )]);
        partitions.extend(emitted(&out).into_iter().map(|(_, p, _)| p));
        held += 1;
    }
    let total = |t: &TestNs| -> u64 { t.holds("catalog").iter().map(|(_, n)| n).sum() };
    wait_for("one worker to hold them all", SETTLE, || async {
        (total(&t) == held).then_some(())
    })
    .await;
    let _second = t.spawn_run("hold-2");
    let _third = t.spawn_run("hold-3");
    // Every partition owned by one live worker, and every held event held once, by that owner.
    wait_for("the holds to follow their partitions", SETTLE, || async {
        let status = t.status();
        let parts = status["partitions"].as_array().unwrap();
        let catalog_owned_once = parts
            .iter()
            .filter(|p| p["processor"] == "catalog")
            .all(|p| p["owners"].as_array().unwrap().len() == 1);
        let workers_live = status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["live"] == true)
            .count();
        let owners_ok = status["workers"].as_array().unwrap().iter().all(|w| {
            w["report"]["processors"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| {
                    let assigned: Vec<&str> = p["assigned"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|a| a.as_str().unwrap())
                        .collect();
                    p["holds"].as_array().unwrap().iter().all(|h| {
                        let oldest = h["oldest"].as_str().unwrap();
                        let part = oldest.rsplit_once('/').unwrap().0;
                        assigned.contains(&part)
                    })
                })
        });
        (workers_live == 3 && catalog_owned_once && owners_ok && total(&t) == held).then_some(())
    })
    .await;
}

/// A shared service going away is waited out, never blamed on an event: readiness says which
/// service is missing, nothing is dead-lettered, and the event applies once it is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_mysql_outage_is_waited_out_and_readiness_says_so() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let proxy = Proxy::start("127.0.0.1:3306").await;
    let mut cmd = t.tenancy();
    let log = std::env::temp_dir().join(format!("{}-outage.log", t.ns));
    let child = cmd
        .env("DATABASE_URL", format!("mysql://root@{}", proxy.addr))
        .args([
            "run",
            "--session-timeout-ms",
            "6000",
            "--http",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _worker = Worker { child, log };
    let brand = new_id();
    t.provisioned(&pool, &[(&brand, "BRAND", "patient")]).await;
    let http = t.worker_http_addr(&pool, None).await;
    let client = reqwest::Client::new();
    let ready = |client: &reqwest::Client| {
        let url = format!("http://{http}/readyz");
        let client = client.clone();
        async move {
            let r = client.get(&url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    wait_for("ready", SETTLE, || async {
        (ready(&client).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(
        client
            .get(format!("http://{http}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    proxy.down();
    t.emit_ok(&[lines::catalog(&brand, 1, &["A"], &[])]);
    let body = wait_for("not ready, naming MySQL", SETTLE, || async {
        let (code, body) = ready(&client).await;
        (code == 503 && body.contains("waiting for mysql")).then_some(body)
    })
    .await;
    assert!(body.contains("mysql"), "{body}");
    // The catalog processor, holding the event, says so in the metrics too.
    wait_for(
        "the catalog processor waiting for MySQL in /metrics",
        SETTLE,
        || async {
            let metrics = client
                .get(format!("http://{http}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            metrics
                .contains("tenancy_waiting_for_service{processor=\"catalog\",service=\"mysql\"} 1")
                .then_some(())
        },
    )
    .await;

    proxy.up();
    wait_for("the catalog to apply after the outage", SETTLE, || async {
        (fabric_rows(&pool, &brand_db(&t, "patient")).await.len() == 1).then_some(())
    })
    .await;
    wait_for("ready again", SETTLE, || async {
        (ready(&client).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(t.message_count(Topic::DeadLetter), 0);
}

/// The loop's own check on assignment: a worker's status lists what it owns, and the partitions
/// of every group are covered.
#[tokio::test(flavor = "multi_thread")]
async fn status_shows_every_partition_owned_once() {
    let t = TestNs::new();
    let _a = t.spawn_run("owner-a");
    let _b = t.spawn_run("owner-b");
    wait_for("two workers sharing every partition", SETTLE, || async {
        let status = t.status();
        let parts = status["partitions"].as_array().unwrap().clone();
        let covered = !parts.is_empty()
            && parts
                .iter()
                .all(|p| p["owners"].as_array().unwrap().len() == 1);
        let live = status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["live"] == true && w["report"]["ready"] == true)
            .count();
        (covered && live == 2).then_some(())
    })
    .await;
    let (code, out, _) = t.tenancy_output(&["status"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("PROCESSOR") && out.contains("ready"), "{out}");
    assert!(
        !out.contains("(none)") && !out.contains("more than one"),
        "{out}"
    );
}

/// kill -9 right after a supplier's tables moved to its archive: the redelivered termination
/// finds the live database gone and finishes (before, its copy clean-up failed on the missing
/// tables until the event was dead-lettered, leaving the tenant marked "changing" for good).
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread")]
async fn a_supplier_terminated_by_a_worker_killed_mid_archive_settles_after_restart() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let mut first = t.spawn_run_with("mid-archive", &["--grace", "1h", "--fail-after", "archive"]);
    let (brand, supplier) = (new_id(), new_id());
    t.provisioned(
        &pool,
        &[
            (&brand, "BRAND", "source"),
            (&supplier, "SUPPLIER", "leaving"),
        ],
    )
    .await;
    t.emit_ok(&[
        lines::catalog(&brand, 1, &["A", "B"], &[]),
        lines::grant(&new_id(), &brand, &supplier, &["catalog.read"]),
    ]);
    let copy = format!("{}_supplier_leaving", t.ns);
    wait_for("the supplier's copy", SETTLE, || async {
        let n: Option<i64> =
            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM `{copy}`.brand_fabrics"))
                .fetch_one(&pool)
                .await
                .ok();
        (n == Some(2)).then_some(())
    })
    .await;
    t.emit_ok(&[lines::terminated(
        &new_id(),
        &supplier,
        "SUPPLIER",
        "leaving",
    )]);
    assert!(
        !first.child.wait().unwrap().success(),
        "died at the fault point"
    );
    assert!(!database_exists(&pool, &copy).await, "the tables had moved");

    let _second = t.spawn_run_with("mid-archive-2", &["--grace", "1h"]);
    wait_for("the termination to settle", SETTLE, || async {
        let pending: Option<Option<String>> = sqlx::query_scalar(&format!(
            "SELECT lifecycle_pending FROM `{}_platform`.tenants WHERE organisation_id = ?",
            t.ns
        ))
        .bind(&supplier)
        .fetch_optional(&pool)
        .await
        .unwrap();
        (pending == Some(None)).then_some(())
    })
    .await;
    t.wait_caught_up().await;
    assert_eq!(
        status_of(&pool, &t.ns, &supplier).await.as_deref(),
        Some("archived")
    );
    assert_eq!(t.message_count(Topic::DeadLetter), 0);
    // Its copy was removed before the move: an archive keeps no copy of another's catalog.
    let archived: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM `{}`.brand_fabrics",
        archive_db(&t, &supplier)
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(archived, 0);
}

/// A catalog batch stuck on MySQL (its brand's table locked by someone else) does not hold up
/// provisioning: each processor runs its own loop, on its own thread.
#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_catalog_batch_does_not_delay_provisioning() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let worker = t.spawn_run("w");
    let brand = new_id();
    t.emit_ok(&[lines::created(&brand, "BRAND", "stuck")]);
    t.wait_status(&pool, &brand, "active").await;
    let db = format!("{}_brand_stuck", t.ns);
    let mut blocker = pool.acquire().await.unwrap();
    sqlx::query(&format!("LOCK TABLES `{db}`.fabrics WRITE"))
        .execute(&mut *blocker)
        .await
        .unwrap();
    t.emit_ok(&[lines::catalog(&brand, 1, &["F1"], &[])]);
    let waiting = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE STATE = 'Waiting for table metadata lock' AND INFO LIKE ?",
        )
        .bind(format!("%{db}%"))
        .fetch_one(&pool)
        .await
        .unwrap();
        n
    };
    wait_for(
        "the catalog to wait on the locked table",
        Duration::from_secs(60),
        || async { (waiting().await > 0).then_some(()) },
    )
    .await;

    let supplier = new_id();
    let started = std::time::Instant::now();
    t.emit_ok(&[lines::created(&supplier, "SUPPLIER", "meanwhile")]);
    wait_for(
        "the supplier to be provisioned meanwhile",
        Duration::from_secs(30),
        || async {
            (status_of(&pool, &t.ns, &supplier).await.as_deref() == Some("active")).then_some(())
        },
    )
    .await;
    assert!(
        waiting().await > 0,
        "the catalog should still be stuck while the supplier was provisioned\n{}",
        worker.log_text()
    );
    eprintln!(
        "provisioned in {:?} while the catalog waited",
        started.elapsed()
    );

    sqlx::query("UNLOCK TABLES")
        .execute(&mut *blocker)
        .await
        .unwrap();
    drop(blocker);
    wait_for(
        "the catalog event to apply once unlocked",
        Duration::from_secs(60),
        || async { (!fabric_rows(&pool, &db).await.is_empty()).then_some(()) },
    )
    .await;
}

/// Each processor group's state and member count as the broker describes it.
fn groups_described(t: &TestNs) -> Vec<(String, String, usize)> {
    use blindstrader_tenancy::stream::consumer::described;
    let client: rdkafka::consumer::BaseConsumer = t.config.kafka_client_config().create().unwrap();
    ["provisioner", "catalog", "purger", "domains"]
        .iter()
        .map(|p| {
            let group = format!("{}.{p}", t.ns);
            // A group no worker has joined yet is unknown to the broker: no state, no members.
            let (state, members) =
                described(&client, &group, Duration::from_secs(10)).unwrap_or_default();
            (group, state, members)
        })
        .collect()
}

/// Every group counts `members` right after `worker` stopped, and each of its four processors
/// logged whether it left (`left`).
fn after_stop(t: &TestNs, worker: &Worker, members: usize, left: bool) {
    for (group, state, counted) in groups_described(t) {
        assert_eq!(
            counted, members,
            "{group} ({state}) right after a worker stopped"
        );
    }
    let log = worker.log_text();
    let (leaving, staying) = (
        log.matches("INFO leaving the group").count(),
        log.matches("not leaving the group").count(),
    );
    let expected = if left { (4, 0) } else { (0, 4) };
    assert_eq!((leaving, staying), expected, "{log}");
}

/// A worker stopped while it is its groups' only member leaves them, so a restarted worker is
/// let in at once instead of after the old member's session expires. One stopped beside another
/// worker does not leave (the local broker wedges a group whose leader leaves mid-rebalance):
/// the groups still count it until its session expires, and then move its partitions.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_worker_leaves_its_groups_only_when_alone() {
    let t = TestNs::new();
    let stable_with = |n: usize| {
        let t = &t;
        move || async move {
            let groups = groups_described(t);
            groups
                .iter()
                .all(|(_, state, members)| state.eq_ignore_ascii_case("stable") && *members == n)
                .then_some(groups)
        }
    };
    let mut alone = t.spawn_run("alone");
    wait_for("one worker in every group", SETTLE, stable_with(1)).await;
    assert!(alone.terminate().success());
    // At once: without the leave, each group would count the stopped member for 6 s.
    after_stop(&t, &alone, 0, true);

    let _stays = t.spawn_run("stays");
    let mut stops = t.spawn_run("stops");
    wait_for("two workers in every group", SETTLE, stable_with(2)).await;
    assert!(stops.terminate().success());
    // Beside another worker it does not leave: both still counted.
    after_stop(&t, &stops, 2, false);
    wait_for(
        "the stopped worker's session expiring",
        SETTLE,
        stable_with(1),
    )
    .await;
}
