//! Tenants placed over two MySQL servers (`home`, and the stack's second MariaDB, `east`):
//! every projection writes a tenant where its row says it is, copies cross servers, the
//! lifecycle and rebuilds stay on the tenant's server, and `tenancy serve` reads each tenant
//! from its own server's pool.

mod common;

use std::time::Duration;

use common::serve::*;
use common::*;
use sqlx::MySqlPool;

const SERVERS: [&str; 2] = ["home", "east"];
const SETTLE: Duration = Duration::from_secs(120);

/// A RetailerDomainAssigned with an event id of its own (without one, `tenancy emit` derives
/// the id from the content, and the same assignment twice is one event).
fn assigned_as_new(retailer: &str, domain: &str) -> String {
    serde_json::json!({"type": "RetailerDomainAssigned", "event_id": new_id(),
        "retailer_id": retailer, "domain": domain})
    .to_string()
}

async fn east_pool() -> MySqlPool {
    MySqlPool::connect(&east_url())
        .await
        .expect("the second MariaDB server (east) answers: `scripts/stack up` starts it")
}

/// A namespace over both servers with one tenant of `kind`, placed on east and provisioned by
/// a worker that is gone again: (namespace, home pool, east pool, organisation id).
async fn provisioned_on_east(kind: &str, slug: &str) -> (TestNs, MySqlPool, MySqlPool, String) {
    let t = TestNs::with_east();
    let home = t.prepared_pool().await;
    let east = east_pool().await;
    let mut setup = t.spawn_run("setup");
    let org = placed(&t, &home, &[("east", kind, slug)]).await.remove(0);
    setup.kill9();
    (t, home, east, org)
}

/// Provisions one tenant per `(server, type, slug)`, with an organisation id placement puts on
/// that server (a worker must be running); returns the ids, in order.
async fn placed(t: &TestNs, home: &MySqlPool, orgs: &[(&str, &str, &str)]) -> Vec<String> {
    let ids: Vec<String> = orgs
        .iter()
        .map(|(server, _, _)| id_placed_on(server, &SERVERS))
        .collect();
    let with_ids: Vec<(&str, &str, &str)> = ids
        .iter()
        .zip(orgs)
        .map(|(id, (_, kind, slug))| (id.as_str(), *kind, *slug))
        .collect();
    t.provisioned(home, &with_ids).await;
    ids
}

async fn server_of(pool: &MySqlPool, t: &TestNs, org: &str) -> String {
    sqlx::query_scalar(&format!(
        "SELECT server FROM `{}_platform`.tenants WHERE organisation_id = ?",
        t.ns
    ))
    .bind(org)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A supplier's copy of one brand: (code, name, price).
async fn copy_of(pool: &MySqlPool, db: &str, brand: &str) -> Vec<(String, String, Option<i64>)> {
    sqlx::query_as(&format!(
        "SELECT code, name, price_minor FROM `{db}`.brand_fabrics WHERE brand_id = ? ORDER BY code"
    ))
    .bind(brand)
    .fetch_all(pool)
    .await
    .unwrap_or_default()
}

type CopyRow = (
    String,
    String,
    String,
    String,
    String,
    i32,
    Option<i64>,
    Option<String>,
    bool,
);

/// Every column of a supplier's copy of one brand but the time it was written.
async fn full_copy(pool: &MySqlPool, db: &str, brand: &str) -> Vec<CopyRow> {
    let rows: Vec<CopyRow> = sqlx::query_as(&format!(
        "SELECT code, name, collection, colour, material, width_mm, price_minor, currency, \
         discontinued FROM `{db}`.brand_fabrics WHERE brand_id = ? ORDER BY code"
    ))
    .bind(brand)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(!rows.is_empty(), "a copy of {brand} in {db}");
    rows
}

/// A brand's catalog as a copy with (`prices`) or without pricing.read holds it.
async fn as_copied(pool: &MySqlPool, db: &str, prices: bool) -> Vec<(String, String, Option<i64>)> {
    fabric_rows(pool, db)
        .await
        .into_iter()
        .map(|(code, name, _)| (code, name, prices.then_some(1500)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_on_two_servers_get_catalogs_copies_lifecycle_and_rebuilds_where_they_are() {
    let t = TestNs::with_east();
    let home = t.prepared_pool().await;
    let east = east_pool().await;
    let _worker = t.spawn_run("w");
    let ids = placed(
        &t,
        &home,
        &[
            ("home", "BRAND", "ba"),
            ("east", "BRAND", "bb"),
            ("home", "SUPPLIER", "st"),
            ("east", "SUPPLIER", "ss"),
        ],
    )
    .await;
    let (brand_home, brand_east, sup_home, sup_east) = (
        ids[0].clone(),
        ids[1].clone(),
        ids[2].clone(),
        ids[3].clone(),
    );
    let ns = t.ns.as_str();
    let db = |kind: &str, slug: &str| format!("{ns}_{kind}_{slug}");
    // Each database on its server, and only there; the row says which.
    for (org, name, on_east) in [
        (&brand_home, db("brand", "ba"), false),
        (&brand_east, db("brand", "bb"), true),
        (&sup_home, db("supplier", "st"), false),
        (&sup_east, db("supplier", "ss"), true),
    ] {
        assert_eq!(
            database_exists(&east, &name).await,
            on_east,
            "{name} on east"
        );
        assert_eq!(
            database_exists(&home, &name).await,
            !on_east,
            "{name} on home"
        );
        let want = if on_east { "east" } else { "home" };
        assert_eq!(server_of(&home, &t, org).await, want);
    }

    // Catalogs, then grants every way across the servers, then changes that fan out.
    t.emit_ok(&[
        lines::catalog(&brand_home, 1, &["A1", "A2", "A3"], &[]),
        lines::catalog(&brand_east, 1, &["B1", "B2"], &[]),
        lines::grant(&new_id(), &brand_home, &sup_east, &["catalog.read"]),
        lines::grant(
            &new_id(),
            &brand_east,
            &sup_home,
            &["catalog.read", "pricing.read"],
        ),
        lines::grant(
            &new_id(),
            &brand_east,
            &sup_east,
            &["catalog.read", "pricing.read"],
        ),
    ]);
    t.wait_caught_up().await;
    t.emit_ok(&[
        lines::catalog(&brand_home, 2, &["A4"], &["A1"]),
        lines::catalog(&brand_east, 2, &["B3", "B1"], &[]),
    ]);
    t.wait_caught_up().await;
    let (ba, bb, st, ss) = (
        db("brand", "ba"),
        db("brand", "bb"),
        db("supplier", "st"),
        db("supplier", "ss"),
    );
    assert_eq!(fabric_rows(&home, &ba).await.len(), 3, "A2 A3 A4");
    assert_eq!(fabric_rows(&east, &bb).await.len(), 3, "B1 B2 B3");
    let expect = |pool: &MySqlPool, brand_db: &str, prices: bool| {
        let (pool, brand_db) = (pool.clone(), brand_db.to_owned());
        async move { as_copied(&pool, &brand_db, prices).await }
    };
    let a_unpriced = expect(&home, &ba, false).await;
    let b_priced = expect(&east, &bb, true).await;
    assert_eq!(
        copy_of(&east, &ss, &brand_home).await,
        a_unpriced,
        "home brand → east supplier"
    );
    assert_eq!(
        copy_of(&east, &ss, &brand_east).await,
        b_priced,
        "east brand → east supplier"
    );
    assert_eq!(
        copy_of(&home, &st, &brand_east).await,
        b_priced,
        "east brand → home supplier"
    );
    // Every column of a copy made across servers (rows passed through the worker as text)
    // equals the one MariaDB made with INSERT … SELECT on one server.
    assert_eq!(
        full_copy(&home, &st, &brand_east).await,
        full_copy(&east, &ss, &brand_east).await
    );

    // The supplier on east is archived there (its archive beside it), loses its copies, and
    // gets them back on restore, read across from the home brand.
    let terminated = new_id();
    t.emit_ok(&[lines::terminated(&terminated, &sup_east, "SUPPLIER", "ss")]);
    t.wait_status(&home, &sup_east, "archived").await;
    let archive = t.ns.archive_database(&sup_east).unwrap();
    assert!(
        database_exists(&east, archive.as_str()).await,
        "archive on east"
    );
    assert!(
        !database_exists(&home, archive.as_str()).await,
        "no archive on home"
    );
    assert!(
        !database_exists(&east, &ss).await,
        "live database moved away"
    );
    assert!(copy_of(&east, archive.as_str(), &brand_home)
        .await
        .is_empty());
    t.emit_ok(&[lines::restored(&new_id(), &sup_east, "SUPPLIER", "ss")]);
    t.wait_status(&home, &sup_east, "active").await;
    t.wait_caught_up().await;
    assert_eq!(
        copy_of(&east, &ss, &brand_home).await,
        a_unpriced,
        "restored: copy refilled across"
    );
    assert_eq!(copy_of(&east, &ss, &brand_east).await, b_priced);

    // Rebuilds: the shadow beside the live database, on its server, compared there, swapped
    // there; the supplier's copies read across from the home brand equal the live ones.
    for (org, on) in [(&sup_east, &east), (&brand_east, &east), (&sup_home, &home)] {
        let (code, out, err) = t.tenancy_output(&["rebuild", org, "--dry-run"]);
        assert_eq!(code, Some(0), "dry run of {org}: {out}{err}");
        assert!(out.contains("; 0 difference(s)"), "dry run of {org}: {out}");
        let (code, out, err) = t.tenancy_output(&["rebuild", org]);
        assert_eq!(code, Some(0), "rebuild of {org}: {out}{err}");
        let old = t.ns.old_database(org).unwrap();
        assert!(
            database_exists(on, old.as_str()).await,
            "{old} kept beside the live one"
        );
        let (code, out, err) = t.tenancy_output(&["rebuild", org, "--drop-old"]);
        assert_eq!(code, Some(0), "drop-old of {org}: {out}{err}");
    }
    assert_eq!(
        copy_of(&east, &ss, &brand_home).await,
        a_unpriced,
        "after the rebuild"
    );
    let shadow = t.ns.shadow_database(&sup_east).unwrap();
    assert!(
        !database_exists(&east, shadow.as_str()).await,
        "no shadow left"
    );

    // The API reads each tenant from its own server: a home supplier reads the east brand.
    t.wait_caught_up().await;
    let api = spawn_serve(&t, &[]);
    let (status, body) = api
        .get("/api/brands/bb/fabrics", Some(&token(&t, &sup_home)), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let codes: Vec<&str> = body["fabrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["B1", "B2", "B3"]);
    let (status, body) = api.get("/readyz", None, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["mysql_servers"]["east"], "up", "{body}");
    // `tenancy status` counts each server's tenants.
    let servers = t.status()["servers"].clone();
    let count = |name: &str| {
        servers
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["server"] == name)
            .map(|s| (s["up"].clone(), s["tenants"].clone()))
    };
    assert_eq!(count("home"), Some((true.into(), 2.into())), "{servers}");
    assert_eq!(count("east"), Some((true.into(), 2.into())), "{servers}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retailer_on_another_server_keeps_its_domains_and_the_index_in_step() {
    let t = TestNs::with_east();
    let home = t.prepared_pool().await;
    let east = east_pool().await;
    let mut worker = t.spawn_run("w");
    let ids = placed(
        &t,
        &home,
        &[("east", "RETAILER", "far"), ("home", "RETAILER", "near")],
    )
    .await;
    let (far, near) = (ids[0].clone(), ids[1].clone());
    let (far_db, near_db) = (
        format!("{}_retailer_far", t.ns),
        format!("{}_retailer_near", t.ns),
    );
    assert!(database_exists(&east, &far_db).await);
    let index = || async {
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT host, retailer_id FROM `{}_platform`.retailer_domains ORDER BY host",
            t.ns
        ))
        .fetch_all(&home)
        .await
        .unwrap();
        rows
    };

    // Assigned on east; the same host refused for the home retailer (dead-lettered, nothing
    // written anywhere); removed; then free for the other.
    // (Two retailers' events are on different partitions, in no order between them: the
    // conflicting one goes after the first are applied.)
    t.emit_ok(&[
        lines::domain_assigned(&far, "shop.far.example"),
        lines::domain_assigned(&far, "www.far.example"),
    ]);
    t.wait_caught_up().await;
    t.emit_ok(&[
        assigned_as_new(&near, "shop.far.example"),
        assigned_as_new(&near, "www.far.example"),
    ]);
    t.wait_caught_up().await;
    assert_eq!(
        index().await,
        [
            ("shop.far.example".to_owned(), far.clone()),
            ("www.far.example".to_owned(), far.clone())
        ]
    );
    assert_eq!(
        domains_of(&east, &far_db).await,
        ["shop.far.example", "www.far.example"]
    );
    assert!(domains_of(&home, &near_db).await.is_empty());
    let dead = t.dead_letters(2, Duration::from_secs(30));
    assert!(
        dead.iter().any(|m| m
            .header("dlq.reason")
            .is_some_and(|r| r.contains("already assigned to retailer"))),
        "the refused assignment is dead-lettered with its reason"
    );
    t.emit_ok(&[lines::domain_removed(&far, "shop.far.example")]);
    t.wait_caught_up().await;
    t.emit_ok(&[assigned_as_new(&near, "shop.far.example")]);
    t.wait_caught_up().await;
    assert_eq!(
        index().await,
        [
            ("shop.far.example".to_owned(), near.clone()),
            ("www.far.example".to_owned(), far.clone())
        ]
    );
    assert_eq!(domains_of(&east, &far_db).await, ["www.far.example"]);
    assert_eq!(domains_of(&home, &near_db).await, ["shop.far.example"]);
    // Rebuilds replay the domains into a shadow beside each retailer and find what the live
    // projector made: far's assignment of the host it gave up to near, and near's refused
    // (dead-lettered) assignments, are judged as they were live, not by who holds the host
    // today.
    for org in [&far, &near] {
        let (code, out, err) = t.tenancy_output(&["rebuild", org, "--dry-run"]);
        assert_eq!(code, Some(0), "{out}{err}");
        assert!(out.contains("; 0 difference(s)"), "{out}");
    }

    // A full replay of the domains topic changes nothing on either server (each step's own
    // offset says it is done).
    let before = (index().await, domains_of(&east, &far_db).await);
    assert!(worker.terminate().success());
    let (code, out, err) = t.tenancy_output(&["topics", "rewind", "domains"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(!t.all_caught_up(), "the rewind took effect");
    let _replayer = t.spawn_run("replay");
    t.wait_caught_up().await;
    assert_eq!((index().await, domains_of(&east, &far_db).await), before);

    // The API resolves the east retailer by its custom domain and reads its own server.
    let api = spawn_serve(&t, &[]);
    let (status, body) = api
        .get("/api/retailer/profile", None, Some("www.far.example"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["organisation_id"], far.as_str());
    assert_eq!(body["domains"], serde_json::json!(["www.far.example"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_not_given_a_server_its_tenants_are_on_refuses_to_start_and_nothing_is_lost() {
    // A worker started without east while a tenant's row says east stops at once, naming the
    // tenant and the server to add; the tenant's events wait on the topic, are not
    // dead-lettered, and apply once a worker that knows east runs.
    let (t, _home, east, brand) = provisioned_on_east("BRAND", "bx").await;
    let mut home_only = t.config.clone();
    home_only.home_only();
    let blind = TestNs::attach(t.ns.clone(), home_only);
    t.emit_ok(&[lines::catalog(&brand, 1, &["X1"], &[])]);
    let mut worker = blind.spawn_run("blind");
    let status = wait_for("the worker to stop", Duration::from_secs(60), || {
        let s = worker.child.try_wait().unwrap();
        async move { s }
    })
    .await;
    let log = worker.log_text();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "tenant {brand} (brand bx) is on MySQL server \"east\""
        )) && log.contains("add it to TENANCY_SERVERS"),
        "{log}"
    );
    assert!(
        t.dead_letters(0, Duration::from_secs(2)).is_empty(),
        "nothing dead-lettered"
    );
    let _again = t.spawn_run("again");
    t.wait_caught_up().await;
    assert_eq!(
        fabric_rows(&east, &format!("{}_brand_bx", t.ns))
            .await
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_worker_meeting_a_tenant_on_a_server_it_was_not_given_parks_it_and_says_so() {
    // A worker given home only is running when an operator (given both servers) moves a brand
    // to east. The brand's next event cannot be written by that worker: it waits, as its
    // tenants do for a server that is down (the worker stays ready for everyone else; its
    // readiness body and /metrics name the server, and so does its log), dead-letters nothing,
    // and a worker given east applies the event.
    let t = TestNs::with_east();
    let home = t.prepared_pool().await;
    let east = east_pool().await;
    let mut home_only = t.config.clone();
    home_only.home_only();
    let blind = TestNs::attach(t.ns.clone(), home_only);
    let mut worker = blind.spawn_run("blind");
    let brand = new_id();
    t.provisioned(&home, &[(&brand, "BRAND", "bm")]).await;
    assert_eq!(server_of(&home, &t, &brand).await, "home");
    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--to-server", "east"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(server_of(&home, &t, &brand).await, "east");

    let http = t.worker_http_addr(&home, Some(worker.child.id())).await;
    let client = reqwest::Client::new();
    let get = |path: &str| {
        let (client, url) = (client.clone(), format!("http://{http}{path}"));
        async move {
            let r = client.get(&url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    t.emit_ok(&[lines::catalog(&brand, 1, &["E1"], &[])]);
    let (code, body) = wait_for("readiness naming east", SETTLE, || async {
        let (code, body) = get("/readyz").await;
        body.contains("server east").then_some((code, body))
    })
    .await;
    assert_eq!(code, 200, "ready for every other tenant: {body}");
    assert!(body.contains("not configured here"), "{body}");
    let (_, metrics) = get("/metrics").await;
    assert!(
        metrics.contains("tenancy_mysql_server_down{processor=\"catalog\",server=\"east\"} 1"),
        "{metrics}"
    );
    let log = worker.log_text();
    assert!(
        log.contains("not configured here") && log.contains("east"),
        "{log}"
    );
    assert!(
        t.dead_letters(0, Duration::from_secs(2)).is_empty(),
        "nothing dead-lettered"
    );
    assert!(fabric_rows(&east, &format!("{}_brand_bm", t.ns))
        .await
        .is_empty());

    worker.kill9();
    let _given_east = t.spawn_run("given-east");
    t.wait_caught_up().await;
    assert_eq!(
        fabric_rows(&east, &format!("{}_brand_bm", t.ns))
            .await
            .len(),
        1
    );
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_between_the_index_and_the_retailer_row_is_finished_by_the_next() {
    // A retailer on east: its domain events take two steps (index on home, row on east). A
    // worker aborts right after the first; the next worker finishes the second, once.
    let (t, home, east, far) = provisioned_on_east("RETAILER", "far").await;
    let far_db = format!("{}_retailer_far", t.ns);
    let index = || async {
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT host, retailer_id FROM `{}_platform`.retailer_domains ORDER BY host",
            t.ns
        ))
        .fetch_all(&home)
        .await
        .unwrap();
        rows
    };
    let crash_once = |tag: &'static str| {
        let mut w = t.spawn_run_with(tag, &["--fail-after", "domain-index"]);
        async move {
            let status = wait_for("the worker to abort", Duration::from_secs(90), || {
                let s = w.child.try_wait().unwrap();
                async move { s }
            })
            .await;
            assert!(!status.success(), "aborted: {}", w.log_text());
            assert!(w.log_text().contains("--fail-after domain-index"));
        }
    };

    t.emit_ok(&[lines::domain_assigned(&far, "crash.far.example")]);
    crash_once("crash-assign").await;
    // The index holds it, the retailer's row does not yet.
    assert_eq!(
        index().await,
        [("crash.far.example".to_owned(), far.clone())]
    );
    assert!(domains_of(&east, &far_db).await.is_empty());
    let mut next = t.spawn_run("next");
    t.wait_caught_up().await;
    assert_eq!(domains_of(&east, &far_db).await, ["crash.far.example"]);
    next.kill9();

    t.emit_ok(&[lines::domain_removed(&far, "crash.far.example")]);
    crash_once("crash-remove").await;
    assert!(
        index().await.is_empty(),
        "the index step of the removal committed"
    );
    assert_eq!(domains_of(&east, &far_db).await, ["crash.far.example"]);
    let _last = t.spawn_run("last");
    t.wait_caught_up().await;
    assert!(domains_of(&east, &far_db).await.is_empty());
    assert!(index().await.is_empty());
    // Each event applied once: two ids in the retailer's record, and its rebuild agrees.
    let applied: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM `{far_db}`.applied_events WHERE projection = 'domains'"
    ))
    .fetch_one(&east)
    .await
    .unwrap();
    assert_eq!(applied, 2);
    let (code, out, err) = t.tenancy_output(&["rebuild", &far, "--dry-run"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("; 0 difference(s)"), "{out}");
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread")]
async fn tenants_move_between_servers_online_and_everything_follows_them() {
    let t = TestNs::with_east();
    let home = t.prepared_pool().await;
    let east = east_pool().await;
    let _worker = t.spawn_run("w");
    let ids = placed(
        &t,
        &home,
        &[
            ("home", "BRAND", "mb"),
            ("home", "SUPPLIER", "mn"),
            ("east", "SUPPLIER", "mf"),
        ],
    )
    .await;
    let (brand, near, far) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
    let ns = t.ns.as_str();
    let (mb, mn, mf) = (
        format!("{ns}_brand_mb"),
        format!("{ns}_supplier_mn"),
        format!("{ns}_supplier_mf"),
    );
    t.emit_ok(&[
        lines::catalog(&brand, 1, &["M1", "M2", "M3"], &[]),
        lines::grant(&new_id(), &brand, &near, &["catalog.read", "pricing.read"]),
        lines::grant(&new_id(), &brand, &far, &["catalog.read", "pricing.read"]),
    ]);
    t.wait_caught_up().await;
    let api = spawn_serve(&t, &[]);
    let reader = token(&t, &near);
    let read = || async {
        let (status, body) = api.get("/api/brands/mb/fabrics", Some(&reader), None).await;
        assert_eq!(status, 200, "{body}");
        body["fabrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["code"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        read().await,
        ["M1", "M2", "M3"],
        "cached: the brand is on home"
    );

    // The brand moves to east while its events keep arriving.
    let during: Vec<String> = (2..40)
        .map(|r| lines::catalog(&brand, r, &[&format!("N{r:02}")], &[]))
        .collect();
    t.emit_ok(&during);
    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--to-server", "east"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("moved to server east"), "{out}");
    t.emit_ok(&[lines::catalog(&brand, 40, &["Z9"], &["M1"])]);
    t.wait_caught_up().await;
    assert_eq!(server_of(&home, &t, &brand).await, "east");
    assert!(database_exists(&east, &mb).await, "live on east");
    assert!(
        !database_exists(&home, &mb).await,
        "not live on home any more"
    );
    let old = t.ns.old_database(&brand).unwrap();
    assert!(
        database_exists(&home, old.as_str()).await,
        "replaced tables kept on home"
    );
    let rows = fabric_rows(&east, &mb).await;
    assert_eq!(rows.len(), 2 + 38 + 1, "M2 M3, N02..N39, Z9: {rows:?}");
    // Copies follow from its new server, to a supplier on each.
    let priced = as_copied(&east, &mb, true).await;
    assert_eq!(copy_of(&home, &mn, &brand).await, priced);
    assert_eq!(copy_of(&east, &mf, &brand).await, priced);
    // `tenancy serve` reads it there at once (its cached resolution named home).
    let codes = read().await;
    assert!(
        codes.contains(&"Z9".to_owned()) && !codes.contains(&"M1".to_owned()),
        "{codes:?}"
    );
    // A request sent where the tables just left (the instant before a resolution is
    // refreshed; here the table is taken away by hand) is told to retry, not that MySQL is down.
    sqlx::query(&format!(
        "RENAME TABLE `{mb}`.fabrics TO `{mb}`.fabrics_away"
    ))
    .execute(&east)
    .await
    .unwrap();
    let (status, body) = api
        .get("/api/brands/mb/fabrics?limit=3", Some(&reader), None)
        .await;
    sqlx::query(&format!(
        "RENAME TABLE `{mb}`.fabrics_away TO `{mb}`.fabrics"
    ))
    .execute(&east)
    .await
    .unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "tenant_changing", "{body}");
    // No rollback across servers; moving back is a move.
    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--rollback"]);
    assert_ne!(code, Some(0), "{out}");
    assert!(err.contains("was moved from server home"), "{err}");
    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--drop-old"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(!database_exists(&home, old.as_str()).await);

    // A supplier moves from east to home; the brand's next change reaches it there.
    let (code, out, err) = t.tenancy_output(&["rebuild", &far, "--to-server", "home"]);
    assert_eq!(code, Some(0), "{out}{err}");
    t.emit_ok(&[lines::catalog(&brand, 41, &["Z8"], &[])]);
    t.wait_caught_up().await;
    assert_eq!(server_of(&home, &t, &far).await, "home");
    assert!(!database_exists(&east, &mf).await);
    assert_eq!(
        copy_of(&home, &mf, &brand).await,
        as_copied(&east, &mb, true).await
    );

    // Killed after its first step (the copy is live-named on the target, the row unchanged):
    // nothing moved, writes go on where they were; the next move refuses the leftover until
    // `--drop-old` clears it.
    let (code, _, _) = t.tenancy_output(&[
        "rebuild",
        &near,
        "--to-server",
        "east",
        "--fail-after",
        "moved",
    ]);
    assert_ne!(code, Some(0));
    assert_eq!(server_of(&home, &t, &near).await, "home");
    t.emit_ok(&[lines::catalog(&brand, 42, &["Z7"], &[])]);
    t.wait_caught_up().await;
    assert_eq!(
        copy_of(&home, &mn, &brand).await,
        as_copied(&east, &mb, true).await
    );
    let (code, _, err) = t.tenancy_output(&["rebuild", &near, "--to-server", "east"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("already exists on server east"), "{err}");
    let (code, out, err) = t.tenancy_output(&["rebuild", &near, "--drop-old"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(!database_exists(&east, &mn).await, "the leftover is gone");
    let (code, out, err) = t.tenancy_output(&["rebuild", &near, "--to-server", "east"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(server_of(&home, &t, &near).await, "east");
    assert_eq!(
        copy_of(&east, &mn, &brand).await,
        as_copied(&east, &mb, true).await
    );

    // Killed after the row changed: the move stands; the copy left on the old server is
    // stale and `--drop-old` removes it.
    let (code, _, _) = t.tenancy_output(&["rebuild", &near, "--drop-old"]);
    assert_eq!(code, Some(0));
    let (code, _, _) = t.tenancy_output(&[
        "rebuild",
        &near,
        "--to-server",
        "home",
        "--fail-after",
        "switched",
    ]);
    assert_ne!(code, Some(0));
    assert_eq!(server_of(&home, &t, &near).await, "home");
    assert!(database_exists(&east, &mn).await, "the stale copy on east");
    t.emit_ok(&[lines::catalog(&brand, 43, &["Z6"], &[])]);
    t.wait_caught_up().await;
    assert_eq!(
        copy_of(&home, &mn, &brand).await,
        as_copied(&east, &mb, true).await
    );
    let (code, out, err) = t.tenancy_output(&["rebuild", &near, "--drop-old"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(!database_exists(&east, &mn).await, "the stale copy is gone");
    assert!(database_exists(&home, &mn).await);
}

/// Residency: with `home` in region eu and `east` in us, an organisation that asks for a region
/// is placed only on its servers (whichever path provisions it: these arrive together, as one
/// batch), one asking for a region no server is in fails provisioning with that reason, one
/// asking for none goes anywhere, and `rebuild --to-server` refuses to move a tenant out of its
/// region while moving within it is allowed.
#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_stays_in_its_region_and_one_with_no_server_there_is_refused() {
    let mut t = TestNs::with_east();
    t.config.regions = vec![
        ("home".to_owned(), "eu".to_owned()),
        ("east".to_owned(), "us".to_owned()),
    ];
    let home = t.prepared_pool().await;
    let created = |org: &str, slug: &str, region: Option<&str>| {
        let mut line: serde_json::Value =
            serde_json::from_str(&lines::created(org, "BRAND", slug)).unwrap();
        if let Some(r) = region {
            line["region"] = serde_json::json!(r);
        }
        line.to_string()
    };
    // Ids whose hash alone would put them on the other server.
    let us: Vec<String> = (0..3).map(|_| id_placed_on("home", &SERVERS)).collect();
    let eu: Vec<String> = (0..3).map(|_| id_placed_on("east", &SERVERS)).collect();
    let (nowhere, any) = (new_id(), new_id());
    let mut events: Vec<String> = Vec::new();
    for (i, org) in us.iter().enumerate() {
        events.push(created(org, &format!("us{i}"), Some("us")));
    }
    for (i, org) in eu.iter().enumerate() {
        events.push(created(org, &format!("eu{i}"), Some("eu")));
    }
    events.push(created(&nowhere, "nowhere", Some("ap")));
    events.push(created(&any, "any", None));
    let _worker = t.spawn_run("regions");
    t.emit_ok(&events);

    let row = |org: String| {
        let (home, t) = (&home, &t);
        async move {
            sqlx::query_as::<_, (String, String, Option<String>, Option<String>)>(&format!(
                "SELECT CAST(status AS CHAR), server, region, failure_reason \
                 FROM `{}_platform`.tenants WHERE organisation_id = ?",
                t.ns
            ))
            .bind(org)
            .fetch_optional(home)
            .await
            .unwrap()
        }
    };
    for org in us.iter().chain(&eu).chain([&any]) {
        t.wait_status(&home, org, "active").await;
    }
    for org in &us {
        let (_, server, region, _) = row(org.clone()).await.unwrap();
        assert_eq!((server.as_str(), region.as_deref()), ("east", Some("us")));
    }
    for org in &eu {
        let (_, server, region, _) = row(org.clone()).await.unwrap();
        assert_eq!((server.as_str(), region.as_deref()), ("home", Some("eu")));
    }
    let (status, _, _, reason) = wait_for("the refusal", SETTLE, || async {
        row(nowhere.clone()).await.filter(|r| r.0 == "failed")
    })
    .await;
    assert_eq!(status, "failed");
    let reason = reason.unwrap();
    assert!(
        reason.contains("no MySQL server of region \"ap\"") && reason.contains("home=eu, east=us"),
        "{reason}"
    );
    assert_eq!(row(any.clone()).await.unwrap().2, None, "no region asked");
    assert!(
        !database_exists(&home, &format!("{}_brand_nowhere", t.ns)).await
            && !database_exists(&east_pool().await, &format!("{}_brand_nowhere", t.ns)).await,
        "a database was created for the refused organisation"
    );

    let (code, out, _) = t.tenancy_output(&["tenants", "list"]);
    assert_eq!(code, Some(0));
    let us0 = out.lines().find(|l| l.contains(" us0 ")).unwrap();
    assert!(us0.contains(" east ") && us0.contains(" us "), "{us0}");

    // Out of its region: refused, nothing moved. Within (a tenant with no region): allowed.
    let (code, out, err) = t.tenancy_output(&["rebuild", &us[0], "--to-server", "home"]);
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(
        err.contains("--to-server home refused") && err.contains("must stay in region us"),
        "{err}"
    );
    assert_eq!(row(us[0].clone()).await.unwrap().1, "east");
    let to = if row(any.clone()).await.unwrap().1 == "home" {
        "east"
    } else {
        "home"
    };
    let (code, out, err) = t.tenancy_output(&["rebuild", &any, "--to-server", to]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(row(any.clone()).await.unwrap().1, to);
}
