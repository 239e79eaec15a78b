//! `tenancy serve` end to end: tenants, catalogs, grants and domains emitted with the real
//! binary and applied by `tenancy run`; requests over HTTP to the real `tenancy serve`.

mod common;

use std::time::{Duration, Instant};

use common::serve::*;
use common::*;
use serde_json::{json, Value};
use sqlx::MySqlPool;

fn catalog_line(brand: &str, slug: &str, fabrics: &[(&str, &str, &str)]) -> String {
    let upserts: Vec<Value> = fabrics
        .iter()
        .map(|(code, collection, colour)| {
            json!({"code": code, "name": format!("{slug} {code}"), "collection": collection,
                "colour": colour, "material": "Blackout", "width_mm": 2000,
                "price_minor": 1500, "currency": "GBP"})
        })
        .collect();
    json!({"type": "BrandCatalogUpdated", "brand_id": brand, "brand_slug": slug, "revision": 1,
        "fabrics_upserted": upserts, "fabrics_removed": []})
    .to_string()
}

async fn wait_fabrics(pool: &MySqlPool, db: &str, n: usize) {
    wait_for(
        &format!("{n} fabrics in {db}"),
        Duration::from_secs(60),
        || async { (fabric_rows(pool, db).await.len() == n).then_some(()) },
    )
    .await;
}

/// Waits until the supplier `slug`'s own `brand_access` is empty (its revoke applied).
async fn wait_no_grants(t: &TestNs, pool: &MySqlPool, slug: &str) {
    wait_for("the revoke to apply", Duration::from_secs(60), || async {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM `{}_supplier_{slug}`.brand_access",
            t.ns
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        (n == 0).then_some(())
    })
    .await;
}

fn codes(body: &Value) -> Vec<String> {
    body["fabrics"]
        .as_array()
        .unwrap_or_else(|| panic!("no fabrics in {body}"))
        .iter()
        .map(|f| f["code"].as_str().unwrap().to_owned())
        .collect()
}

/// A supplier and `n` brands `b0`, `b1`, … each with fabrics F1 and F2 (named after the brand)
/// and a catalog.read grant to the supplier, all applied.
async fn granted_brands(t: &TestNs, pool: &MySqlPool, n: usize) -> (String, Vec<(String, String)>) {
    let supplier = new_id();
    let brands: Vec<(String, String)> = (0..n).map(|i| (new_id(), format!("b{i}"))).collect();
    let mut orgs = vec![(supplier.as_str(), "SUPPLIER", "sup")];
    orgs.extend(
        brands
            .iter()
            .map(|(id, slug)| (id.as_str(), "BRAND", slug.as_str())),
    );
    t.provisioned(pool, &orgs).await;
    let mut events = Vec::new();
    for (id, slug) in &brands {
        events.push(catalog_line(
            id,
            slug,
            &[("F1", "Aurora", "White"), ("F2", "Aurora", "Grey")],
        ));
        events.push(lines::grant(&new_id(), id, &supplier, &["catalog.read"]));
    }
    t.emit_ok(&events);
    t.wait_caught_up().await;
    (supplier, brands)
}

/// A brand `slug` with a catalog of `codes` (revision 1) and one supplier per entry of
/// `readers` (slug, permissions) granted it, all applied: the brand's id, then the readers'.
async fn brand_with_readers(
    t: &TestNs,
    pool: &MySqlPool,
    slug: &str,
    codes: &[&str],
    readers: &[(&str, &[&str])],
) -> (String, Vec<String>) {
    let brand = new_id();
    let ids: Vec<String> = readers.iter().map(|_| new_id()).collect();
    let mut orgs = vec![(brand.as_str(), "BRAND", slug)];
    orgs.extend(
        ids.iter()
            .zip(readers)
            .map(|(id, (reader, _))| (id.as_str(), "SUPPLIER", *reader)),
    );
    t.provisioned(pool, &orgs).await;
    let mut events = vec![lines::catalog(&brand, 1, codes, &[])];
    events.extend(
        ids.iter()
            .zip(readers)
            .map(|(id, (_, permissions))| lines::grant(&new_id(), &brand, id, permissions)),
    );
    t.emit_ok(&events);
    t.wait_caught_up().await;
    (brand, ids)
}

/// Grants, prices, pagination, filters, the Host form, every refusal, and the lifecycle: a
/// revoke is seen by the next request, an archived brand is 410, a restored one 200 again.
#[tokio::test(flavor = "multi_thread")]
async fn suppliers_read_brand_catalogs_as_their_grants_allow() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let (brand, supplier, stranger, retailer) = (new_id(), new_id(), new_id(), new_id());
    t.provisioned(
        &pool,
        &[
            (&brand, "BRAND", "acme_blinds"),
            (&supplier, "SUPPLIER", "sup"),
            (&stranger, "SUPPLIER", "stranger"),
            (&retailer, "RETAILER", "shop"),
        ],
    )
    .await;
    t.emit_ok(&[
        catalog_line(
            &brand,
            "acme_blinds",
            &[
                ("A1", "Aurora", "White"),
                ("A2", "Aurora", "Grey"),
                ("B1", "Boreal", "White"),
            ],
        ),
        lines::grant(&new_id(), &brand, &supplier, &["catalog.read"]),
    ]);
    let brand_db = format!("{}_brand_acme_blinds", t.ns);
    wait_fabrics(&pool, &brand_db, 3).await;
    let server = spawn_serve(&t, &[]);
    let mine = token(&t, &supplier);
    let path = "/api/brands/acme_blinds/fabrics";

    let (status, body) = wait_for("the grant to apply", Duration::from_secs(60), || async {
        let (s, b) = server.get(path, Some(&mine), None).await;
        (s == 200).then_some((s, b))
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(codes(&body), ["A1", "A2", "B1"]);
    assert_eq!(body["brand"]["organisation_id"], json!(brand));
    assert_eq!(body["prices"], json!(false));
    assert!(
        body["fabrics"][0].get("price_minor").is_none(),
        "no prices without pricing.read: {body}"
    );

    // The brand named by Host instead of the path.
    let (status, by_host) = server
        .get(
            "/api/fabrics",
            Some(&mine),
            Some("acme-blinds.brand.blinds.test:8080"),
        )
        .await;
    assert_eq!((status, codes(&by_host)), (200, codes(&body)));

    // Keyset pagination and filters.
    let (_, first) = server
        .get(&format!("{path}?limit=2"), Some(&mine), None)
        .await;
    assert_eq!(codes(&first), ["A1", "A2"]);
    assert_eq!(first["next_after"], json!("A2"));
    let (_, rest) = server
        .get(&format!("{path}?limit=2&after=A2"), Some(&mine), None)
        .await;
    assert_eq!(
        (codes(&rest), &rest["next_after"]),
        (vec!["B1".to_owned()], &Value::Null)
    );
    let (_, white) = server
        .get(
            &format!("{path}?colour=White&collection=Aurora"),
            Some(&mine),
            None,
        )
        .await;
    assert_eq!(codes(&white), ["A1"]);
    let (status, bad) = server
        .get(&format!("{path}?limit=0"), Some(&mine), None)
        .await;
    assert_eq!(
        (status, &bad["error"]["code"]),
        (400, &json!("invalid_query"))
    );
    let (status, _) = server
        .get(&format!("{path}?colour_=x"), Some(&mine), None)
        .await;
    assert_eq!(status, 400, "an unknown filter is refused, not ignored");

    // Refusals.
    let (status, body) = server.get(path, None, None).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (401, &json!("invalid_token"))
    );
    let forged = mine.replacen(&supplier, &stranger, 1);
    assert_eq!(server.get(path, Some(&forged), None).await.0, 401);
    let (status, body) = server.get(path, Some(&token(&t, &stranger)), None).await;
    assert_eq!((status, &body["error"]["code"]), (403, &json!("no_access")));
    assert_eq!(
        server.get(path, Some(&token(&t, &retailer)), None).await.0,
        403
    );
    let (status, body) = server
        .get("/api/brands/nobody/fabrics", Some(&mine), None)
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("unknown_tenant"))
    );
    assert_eq!(
        server
            .get("/api/brands/sup/fabrics", Some(&mine), None)
            .await
            .0,
        404,
        "a supplier's slug names no brand"
    );

    // Pricing granted: prices appear at once (the grant stores the cache entry).
    t.emit_ok(&[lines::grant(
        &new_id(),
        &brand,
        &supplier,
        &["catalog.read", "pricing.read"],
    )]);
    let priced = wait_for("pricing.read to apply", Duration::from_secs(60), || async {
        let (_, b) = server.get(path, Some(&mine), None).await;
        (b["prices"] == json!(true)).then_some(b)
    })
    .await;
    assert_eq!(priced["fabrics"][0]["price_minor"], json!(1500));
    assert_eq!(priced["fabrics"][0]["currency"], json!("GBP"));

    // Revoke: the first request after it is applied is refused (no stale cache entry).
    t.emit_ok(&[lines::revoke(&brand, &supplier)]);
    wait_no_grants(&t, &pool, "sup").await;
    assert_eq!(server.get(path, Some(&mine), None).await.0, 403);
    t.emit_ok(&[lines::grant(
        &new_id(),
        &brand,
        &supplier,
        &["catalog.read"],
    )]);
    wait_for("the grant back", Duration::from_secs(60), || async {
        (server.get(path, Some(&mine), None).await.0 == 200).then_some(())
    })
    .await;

    // Archived brand → 410 (the cached resolution is invalidated), restored → 200.
    let terminated = new_id();
    t.emit_ok(&[lines::terminated(
        &terminated,
        &brand,
        "BRAND",
        "acme_blinds",
    )]);
    t.wait_status(&pool, &brand, "archived").await;
    let (status, body) = server.get(path, Some(&mine), None).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (410, &json!("tenant_archived"))
    );
    t.emit_ok(&[lines::restored(&new_id(), &brand, "BRAND", "acme_blinds")]);
    t.wait_status(&pool, &brand, "active").await;
    wait_for(
        "the restored brand to answer",
        Duration::from_secs(30),
        || async { (server.get(path, Some(&mine), None).await.0 == 200).then_some(()) },
    )
    .await;
}

/// Malformed slugs and hosts are answered 400 before any cache or database lookup.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_slugs_and_hosts_are_refused_before_any_lookup() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let supplier = new_id();
    t.provisioned(&pool, &[(&supplier, "SUPPLIER", "sup")])
        .await;
    let server = spawn_serve(&t, &[]);
    let mine = token(&t, &supplier);
    let long = "a".repeat(300);
    for slug in [
        "..%2F..%2Fetc",
        "a'b",
        "a%22b",
        "a%00b",
        "Acme",
        "b%C3%BCcher",
        "a-b",
        "a%20b",
        long.as_str(),
    ] {
        let (status, body) = server
            .get(&format!("/api/brands/{slug}/fabrics"), Some(&mine), None)
            .await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("invalid_slug")),
            "{slug}"
        );
    }
    let long_host = format!("{}.example", "a".repeat(300));
    for host in [
        "shop'.example",
        "shop%00.example",
        "../x.example",
        "127.0.0.1",
        "UPPER_case.blinds.test",
        long_host.as_str(),
    ] {
        let (status, body) = server.get("/api/retailer/profile", None, Some(host)).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("invalid_host")),
            "{host}"
        );
        let (status, _) = server.get("/api/fabrics", Some(&mine), Some(host)).await;
        assert_eq!(status, 400, "{host}");
    }
    assert_eq!(
        server.counter("tenancy_domain_cache_lookups_total").await,
        0.0,
        "no malformed request may reach the cache or MySQL"
    );
    // A well-formed one does: the counter can move.
    assert_eq!(
        server
            .get("/api/brands/nobody/fabrics", Some(&mine), None)
            .await
            .0,
        404
    );
    assert!(server.counter("tenancy_domain_cache_lookups_total").await >= 1.0);
}

/// Retailers by `{slug}.{base}` and custom domains: assign → resolves, remove → key gone and
/// 404, moved to another retailer → the new one answers at the next request; archive → 410.
#[tokio::test(flavor = "multi_thread")]
async fn retailers_are_resolved_by_host_and_custom_domain() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let (first, second) = (new_id(), new_id());
    t.emit_ok(&[
        lines::created(&first, "RETAILER", "shop_one"),
        lines::created(&second, "RETAILER", "shop_two"),
    ]);
    // Asked before it exists: "no such tenant" is cached briefly, and provisioning clears it.
    let server = spawn_serve(&t, &[]);
    for org in [&first, &second] {
        t.wait_status(&pool, org, "active").await;
    }
    let (status, body) = server
        .get("/api/retailer/profile", None, Some("shop-one.blinds.test"))
        .await;
    assert_eq!(
        (status, &body["organisation_id"]),
        (200, &json!(first)),
        "{body}"
    );

    let redis = redis::Client::open(t.config.redis_url.as_str()).unwrap();
    let mut redis = redis.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{}:domain:shop.example", t.ns);
    let index_owner = |host: &'static str| {
        let pool = pool.clone();
        let ns = t.ns.clone();
        async move {
            sqlx::query_scalar::<_, String>(&format!(
                "SELECT retailer_id FROM `{ns}_platform`.retailer_domains WHERE host = ?"
            ))
            .bind(host)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    };

    // Not assigned yet: 404 (and that answer is cached).
    let (status, _) = server
        .get("/api/retailer/profile", None, Some("shop.example"))
        .await;
    assert_eq!(status, 404);
    t.emit_ok(&[
        json!({"type": "RetailerDomainAssigned", "retailer_id": first,
        "domain": "Shop.Example."})
        .to_string(),
    ]);
    wait_for("the assignment", Duration::from_secs(60), || async {
        (index_owner("shop.example").await.as_deref() == Some(first.as_str())).then_some(())
    })
    .await;
    let (status, body) = server
        .get("/api/retailer/profile", None, Some("shop.example"))
        .await;
    assert_eq!(
        status, 200,
        "the cached 404 was invalidated by the assignment: {body}"
    );
    assert_eq!(body["organisation_id"], json!(first));
    assert_eq!(body["domains"], json!(["shop.example"]));
    let cached: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        cached.is_some_and(|v| v.contains(&first)),
        "resolution cached under {key}"
    );

    // Removed: the key goes with the commit, and the host no longer resolves.
    t.emit_ok(&[
        json!({"type": "RetailerDomainRemoved", "retailer_id": first,
        "domain": "shop.example"})
        .to_string(),
    ]);
    wait_for("the removal", Duration::from_secs(60), || async {
        index_owner("shop.example").await.is_none().then_some(())
    })
    .await;
    // The key is deleted just after the index row's commit (the worker's next Redis round
    // trips), so it may outlive the row by milliseconds; it must go without a lookup's help.
    wait_for(
        &format!("{key} deleted once the removal is applied"),
        Duration::from_secs(10),
        || {
            let mut redis = redis.clone();
            let key = key.clone();
            async move {
                let exists: i64 = redis::cmd("EXISTS")
                    .arg(&key)
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                (exists == 0).then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        server
            .get("/api/retailer/profile", None, Some("shop.example"))
            .await
            .0,
        404
    );

    // Moved to the second retailer: the next request answers with it.
    let (_, _) = server
        .get("/api/retailer/profile", None, Some("shop.example"))
        .await;
    t.emit_ok(&[
        json!({"type": "RetailerDomainAssigned", "retailer_id": second,
        "domain": "shop.example"})
        .to_string(),
    ]);
    wait_for("the move", Duration::from_secs(60), || async {
        (index_owner("shop.example").await.as_deref() == Some(second.as_str())).then_some(())
    })
    .await;
    let (status, body) = server
        .get("/api/retailer/profile", None, Some("shop.example"))
        .await;
    assert_eq!((status, &body["organisation_id"]), (200, &json!(second)));

    // Archived: 410 on its custom domain and its own host name (both cached before), restored:
    // 200.
    let (status, _) = server
        .get("/api/retailer/profile", None, Some("shop-two.blinds.test"))
        .await;
    assert_eq!(status, 200);
    t.emit_ok(&[lines::terminated(
        &new_id(),
        &second,
        "RETAILER",
        "shop_two",
    )]);
    t.wait_status(&pool, &second, "archived").await;
    for host in ["shop.example", "shop-two.blinds.test"] {
        let (status, body) = server.get("/api/retailer/profile", None, Some(host)).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (410, &json!("tenant_archived")),
            "{host}"
        );
    }
    t.emit_ok(&[lines::restored(&new_id(), &second, "RETAILER", "shop_two")]);
    t.wait_status(&pool, &second, "active").await;
    let (status, _) = server
        .get("/api/retailer/profile", None, Some("shop.example"))
        .await;
    assert_eq!(status, 200);
    // A brand's host is not a retailer.
    let (status, _) = server
        .get("/api/retailer/profile", None, Some("x.brand.blinds.test"))
        .await;
    assert_eq!(status, 404);
}

/// 200 brands, a pool of 2 connections, thousands of concurrent requests in random order:
/// every answer comes from the brand asked for (each brand's rows carry its slug).
#[tokio::test(flavor = "multi_thread")]
async fn interleaved_requests_are_answered_from_their_own_tenant() {
    const BRANDS: usize = 200;
    const REQUESTS: usize = 3000;
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let (supplier, brands) = granted_brands(&t, &pool, BRANDS).await;

    let mine = token(&t, &supplier);
    // Through the pool alone first, then with pages kept in memory: neither may mix tenants.
    for page_cache_ttl in ["0s", "1h"] {
        let server = spawn_serve(
            &t,
            &[
                "--pool-size",
                "2",
                "--tenant-concurrency",
                "2",
                "--request-timeout",
                "60s",
                "--page-cache-ttl",
                page_cache_ttl,
            ],
        );
        interleave(&server, &mine, &brands, REQUESTS).await;
        let hits = server
            .labelled("tenancy_page_cache_lookups_total", "hit")
            .await;
        if page_cache_ttl == "0s" {
            assert_eq!(hits, 0.0, "the page cache is off");
        } else {
            assert!(hits > REQUESTS as f64 / 3.0, "{hits} page cache hits");
        }
    }
}

/// `requests` requests over `brands` in a fixed shuffled order, 256 at a time: each answer is
/// the brand asked for, with its own rows.
async fn interleave(server: &Server, token: &str, brands: &[(String, String)], requests: usize) {
    use futures::StreamExt;
    // A fixed shuffle (no rand dependency): a stride coprime with the brand count.
    let order: Vec<usize> = (0..requests)
        .map(|i| (i * 7919 + 13) % brands.len())
        .collect();
    let answers: Vec<(usize, u16, Value)> = futures::stream::iter(order)
        .map(|i| {
            let slug = &brands[i].1;
            async move {
                let (s, b) = server
                    .get(&format!("/api/brands/{slug}/fabrics"), Some(token), None)
                    .await;
                (i, s, b)
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    assert_eq!(answers.len(), requests);
    for (i, status, body) in &answers {
        let (id, slug) = &brands[*i];
        assert_eq!(*status, 200, "{slug}: {body}");
        assert_eq!(body["brand"]["organisation_id"], json!(id), "{slug}");
        let names: Vec<&str> = body["fabrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [format!("{slug} F1"), format!("{slug} F2")],
            "{slug}"
        );
    }
}

/// A catalog page answered from memory (an hour's TTL here, so only its stamps can end it)
/// follows every change: an update is served once applied, a page with prices never goes to a
/// supplier without pricing.read, a revoke is refused at once, an archive is 410.
#[tokio::test(flavor = "multi_thread")]
async fn cached_catalog_pages_follow_every_change() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let (brand, readers) = brand_with_readers(
        &t,
        &pool,
        "pages",
        &["A1", "A2"],
        &[
            ("priced", &["catalog.read", "pricing.read"]),
            ("plain", &["catalog.read"]),
        ],
    )
    .await;
    let (priced, plain) = (&readers[0], &readers[1]);
    let server = spawn_serve(&t, &["--page-cache-ttl", "1h"]);
    let path = "/api/brands/pages/fabrics";
    let (with_prices, without) = (token(&t, priced), token(&t, plain));
    let read = |token: &str| {
        let token = token.to_owned();
        let server = &server;
        async move {
            let (status, body) = server.get(path, Some(&token), None).await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };
    // The first read learns the brand's id, the second keeps its page, the rest are hits.
    for _ in 0..4 {
        let body = read(&with_prices).await;
        assert_eq!(body["fabrics"][0]["price_minor"], json!(1500), "{body}");
        let body = read(&without).await;
        assert_eq!(body["prices"], json!(false), "{body}");
        assert!(body["fabrics"][0].get("price_minor").is_none(), "{body}");
        assert_eq!(codes(&body), ["A1", "A2"]);
    }
    let hits = server
        .labelled("tenancy_page_cache_lookups_total", "hit")
        .await;
    assert!(hits >= 4.0, "{hits} page cache hits");

    // An update: served as soon as it is applied (the version moves on right after the commit).
    t.emit_ok(&[lines::catalog(&brand, 2, &["A3"], &["A1"])]);
    let db = format!("{}_brand_pages", t.ns);
    wait_for("the update to apply", Duration::from_secs(60), || async {
        let rows = fabric_rows(&pool, &db).await;
        let codes: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        (codes == ["A2", "A3"]).then_some(())
    })
    .await;
    let updated = wait_for(
        "the update to be served",
        Duration::from_secs(5),
        || async {
            let body = read(&without).await;
            (codes(&body) == ["A2", "A3"]).then_some(body)
        },
    )
    .await;
    assert_eq!(updated["fabrics"][1]["name"], json!("A3 r2"));
    assert_eq!(codes(&read(&with_prices).await), ["A2", "A3"]);

    // A revoke: refused at once although the page is kept.
    t.emit_ok(&[lines::revoke(&brand, plain)]);
    wait_no_grants(&t, &pool, "plain").await;
    assert_eq!(server.get(path, Some(&without), None).await.0, 403);
    assert_eq!(codes(&read(&with_prices).await), ["A2", "A3"]);

    // An archive: 410, not the kept page.
    t.emit_ok(&[lines::terminated(&new_id(), &brand, "BRAND", "pages")]);
    t.wait_status(&pool, &brand, "archived").await;
    assert_eq!(server.get(path, Some(&with_prices), None).await.0, 410);
}

/// Readers racing a stream of catalog updates, pages kept for an hour: no reader ever sees a
/// revision older than one it saw before, and once the last update is applied every reader is
/// served it within a moment (its catalog version moved on; no page is left behind).
#[tokio::test(flavor = "multi_thread")]
async fn pages_never_go_back_and_end_at_the_last_update() {
    use std::sync::OnceLock;
    const LAST: i64 = 30;
    /// How soon after the last update is applied every reader must be served it.
    const WITHIN: Duration = Duration::from_secs(5);
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let (brand, readers) = brand_with_readers(
        &t,
        &pool,
        "racing",
        &["A"],
        &[("reader", &["catalog.read"])],
    )
    .await;
    let server = spawn_serve(&t, &["--page-cache-ttl", "1h"]);
    let mine = token(&t, &readers[0]);
    let path = "/api/brands/racing/fabrics";
    // The revision a page shows: its one fabric is named "A r{revision}".
    let revision = |body: &Value| -> i64 {
        let name = body["fabrics"][0]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{body}"));
        name.rsplit('r').next().unwrap().parse().unwrap()
    };
    // When the database first held the last update.
    let applied: OnceLock<Instant> = OnceLock::new();
    // Each reader reads until it is served the last update, which must come within WITHIN of
    // its being applied.
    let readers = futures::future::join_all((0..8).map(|reader| {
        let (applied, server, mine) = (&applied, &server, &mine);
        async move {
            let mut seen = Vec::new();
            loop {
                let (status, body) = server.get(path, Some(mine), None).await;
                assert_eq!(status, 200, "{body}");
                seen.push(revision(&body));
                if seen.last() == Some(&LAST) {
                    return seen;
                }
                if let Some(at) = applied.get() {
                    assert!(
                        at.elapsed() < WITHIN,
                        "reader {reader} not served the last update {WITHIN:?} after it was \
                         applied: {} reads, the last of revision {:?}",
                        seen.len(),
                        seen.last()
                    );
                }
            }
        }
    }));
    let updates = async {
        for first in (2..=LAST).step_by(4) {
            let batch: Vec<String> = (first..(first + 4).min(LAST + 1))
                .map(|r| lines::catalog(&brand, r, &["A"], &[]))
                .collect();
            t.emit_ok(&batch);
        }
        let db = format!("{}_brand_racing", t.ns);
        wait_for(
            "the last update to apply",
            Duration::from_secs(60),
            || async {
                let rows = fabric_rows(&pool, &db).await;
                (rows.first().map(|r| r.2) == Some(LAST)).then_some(())
            },
        )
        .await;
        applied.set(Instant::now()).expect("set once");
    };
    let (seen, ()) = tokio::join!(readers, updates);
    for (reader, revisions) in seen.iter().enumerate() {
        assert!(
            revisions.windows(2).all(|w| w[0] <= w[1]),
            "reader {reader} went back: {revisions:?}"
        );
    }
    let hits = server
        .labelled("tenancy_page_cache_lookups_total", "hit")
        .await;
    let served: usize = seen.iter().map(Vec::len).sum();
    assert!(
        hits > served as f64 / 2.0,
        "{hits} page cache hits of {served} requests"
    );
}

/// A rebuild never writes Redis, so a page kept from before its swap is the one thing no
/// catalog version ends: the page cache's TTL does. Live rows corrupted by hand (no event, so no
/// version moves) are served and kept; a rebuild repairs them; the repaired rows are served once
/// the kept page's TTL has run out, not later.
#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_swap_is_served_once_the_kept_page_expires() {
    const TTL: Duration = Duration::from_secs(2);
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let (brand, readers) = brand_with_readers(
        &t,
        &pool,
        "swapped",
        &["A1", "A2"],
        &[("reader", &["catalog.read"])],
    )
    .await;
    let db = format!("{}_brand_swapped", t.ns);
    sqlx::query(&format!(
        "UPDATE `{db}`.fabrics SET name = 'garbage' WHERE code = 'A1'"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let server = spawn_serve(&t, &["--page-cache-ttl", "2s"]);
    let mine = token(&t, &readers[0]);
    let path = "/api/brands/swapped/fabrics";
    let first_name = || async {
        let (status, body) = server.get(path, Some(&mine), None).await;
        assert_eq!(status, 200, "{body}");
        body["fabrics"][0]["name"].as_str().unwrap().to_owned()
    };
    for _ in 0..3 {
        assert_eq!(first_name().await, "garbage");
    }
    let hits = server
        .labelled("tenancy_page_cache_lookups_total", "hit")
        .await;
    assert!(hits >= 1.0, "the corrupted page is kept ({hits} hits)");

    let (code, out, err) = t.tenancy_output(&["rebuild", &brand, "--accept-differences"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("swapped in"), "{out}");
    let swapped = Instant::now();
    wait_for(
        "the repaired rows to be served",
        TTL + Duration::from_secs(3),
        || async { (first_name().await == "A1 r1").then_some(()) },
    )
    .await;
    assert!(
        swapped.elapsed() <= TTL + Duration::from_secs(1),
        "served {:?} after the swap",
        swapped.elapsed()
    );
}

/// A brand whose table is locked answers 503 within the timeout; the other brands' requests,
/// meanwhile, stay far below it.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_tenant_does_not_slow_the_others() {
    use futures::StreamExt;
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let (supplier, brands) = granted_brands(&t, &pool, 5).await;
    let timeout = Duration::from_secs(2);
    let server = spawn_serve(
        &t,
        &[
            "--pool-size",
            "4",
            "--tenant-concurrency",
            "1",
            "--request-timeout",
            "2s",
            // The other brands' pages must come from the pool, not from memory.
            "--page-cache-ttl",
            "0s",
        ],
    );
    let mine = token(&t, &supplier);
    for (_, slug) in &brands {
        let path = format!("/api/brands/{slug}/fabrics");
        assert_eq!(
            server.get(&path, Some(&mine), None).await.0,
            200,
            "{slug} warm"
        );
    }

    // Hold a write lock on the slow brand's table from another connection.
    let mut locker = pool.acquire().await.unwrap();
    sqlx::query(&format!("LOCK TABLES `{}_brand_b0`.fabrics WRITE", t.ns))
        .execute(&mut *locker)
        .await
        .unwrap();
    // Eight clients keep asking for the locked brand while the others are measured.
    let done = std::sync::atomic::AtomicBool::new(false);
    let slow = futures::stream::iter(0..8)
        .map(|_| async {
            let mut answers = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let (s, b) = server
                    .get("/api/brands/b0/fabrics", Some(&mine), None)
                    .await;
                answers.push((s, b, started.elapsed()));
            }
            answers
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>();
    let others = async {
        let mut latencies = Vec::new();
        let started = Instant::now();
        // Over two timeouts, so slow requests time out and come back while we measure.
        while started.elapsed() < 2 * timeout + Duration::from_millis(500) {
            let slug = &brands[1 + latencies.len() % 4].1;
            let asked = Instant::now();
            let (s, _) = server
                .get(&format!("/api/brands/{slug}/fabrics"), Some(&mine), None)
                .await;
            assert_eq!(s, 200, "{slug} while b0 is locked");
            latencies.push(asked.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        latencies
    };
    let (slow, latencies) = tokio::join!(slow, others);
    sqlx::query("UNLOCK TABLES")
        .execute(&mut *locker)
        .await
        .unwrap();
    let slow: Vec<_> = slow.into_iter().flatten().collect();
    assert!(slow.len() >= 8, "{} slow answers", slow.len());
    for (status, body, took) in &slow {
        assert_eq!(*status, 503, "the locked brand times out: {body}");
        assert_eq!(body["error"]["code"], json!("timeout"), "{body}");
        assert!(
            *took < timeout + Duration::from_secs(2),
            "answered in {took:?}"
        );
    }
    let worst = latencies.iter().max().unwrap();
    assert!(
        *worst < timeout / 2,
        "the other brands' slowest answer, {worst:?} of {}, stays well below the {timeout:?} \
         timeout",
        latencies.len()
    );
    // The slow brand answers again once the lock is gone.
    wait_for("b0 again", Duration::from_secs(10), || async {
        (server
            .get("/api/brands/b0/fabrics", Some(&mine), None)
            .await
            .0
            == 200)
            .then_some(())
    })
    .await;
}

/// The generation guard: a lookup that read the generation, then loaded its answer while a
/// change committed and moved the generation on, writes nothing; and an entry from before a
/// change is never served after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_lookup_in_flight_during_a_change_neither_writes_nor_serves_the_old_answer() {
    use blindstrader_tenancy::cache::{domain_key, Redis};
    use blindstrader_tenancy::domains::host::Host;
    use blindstrader_tenancy::serve::resolve::{Lookup, Resolver};
    use blindstrader_tenancy::tenant::Slug;
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let retailer = new_id();
    t.provisioned(&pool, &[(&retailer, "RETAILER", "shop")])
        .await;
    let redis = Redis::connect(&t.config.redis_url, &t.ns).await.unwrap();
    let resolver = Resolver::new(
        &t.ns,
        Host::parse(BASE).unwrap(),
        pool.clone(),
        redis.conn(),
    );
    let lookup = Lookup::Retailer(Slug::parse("shop").unwrap());
    let key = domain_key(&t.ns, &resolver.cache_host(&lookup));

    // In flight: the generation read, the answer loaded ...
    let (cached, generation) = resolver.cached(&key).await.unwrap();
    assert!(cached.is_none());
    let loaded = resolver.load(&lookup).await.unwrap();
    assert!(loaded.is_some());
    // ... a change commits and moves the generation on ...
    redis.domains_changed(&[]).await.unwrap();
    // ... so the late fill is refused.
    assert!(!resolver
        .fill(&key, &generation, loaded.as_ref())
        .await
        .unwrap());
    let mut conn = redis.conn();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "nothing written under {key}");

    // A current fill is written and served, until the next change.
    let (_, generation) = resolver.cached(&key).await.unwrap();
    assert!(resolver
        .fill(&key, &generation, loaded.as_ref())
        .await
        .unwrap());
    assert_eq!(resolver.cached(&key).await.unwrap().0, Some(loaded.clone()));
    redis.domains_changed(&[]).await.unwrap();
    assert_eq!(
        resolver.cached(&key).await.unwrap().0,
        None,
        "an entry from before the change is not served"
    );

    // The generation lost (flushed or evicted): nothing written before is served, and it
    // restarts above every earlier value.
    let (_, before) = resolver.cached(&key).await.unwrap();
    assert!(resolver.fill(&key, &before, loaded.as_ref()).await.unwrap());
    redis::cmd("DEL")
        .arg(blindstrader_tenancy::cache::domain_generation_key(&t.ns))
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let (entry, _) = resolver.cached(&key).await.unwrap();
    assert_eq!(entry, None, "not served while the generation is missing");
    let (entry, restarted) = resolver.cached(&key).await.unwrap();
    assert_eq!(entry, None, "nor under the restarted generation");
    assert!(restarted.parse::<i64>().unwrap() > before.parse::<i64>().unwrap());
}

/// Redis taken away: /readyz says so (503, naming it) and requests are answered 503 with
/// Retry-After, not hung or 500; Redis back: both recover by themselves.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_outage_is_a_503_and_readyz_says_so() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let (supplier, brands) = granted_brands(&t, &pool, 1).await;
    let upstream = t.config.redis_url.trim_start_matches("redis://").to_owned();
    let proxy = Proxy::start(&upstream).await;
    let url = format!("redis://{}", proxy.addr);
    let server = spawn_serve_env(&t, &[], &[("REDIS_URL", url.as_str())]);
    let mine = token(&t, &supplier);
    let path = format!("/api/brands/{}/fabrics", brands[0].1);
    assert_eq!(server.get(&path, Some(&mine), None).await.0, 200);
    let (status, body) = server.get("/readyz", None, None).await;
    assert_eq!((status, &body["redis"]), (200, &json!("up")), "{body}");

    proxy.down();
    let (status, body) = server.get("/readyz", None, None).await;
    assert_eq!(
        (status, &body["redis"], &body["mysql"]),
        (503, &json!("down"), &json!("up"))
    );
    let resp = server
        .client
        .get(format!("{}{path}", server.url))
        .bearer_auth(&mine)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["error"]["code"],
        json!("service_unavailable"),
        "{body}"
    );

    proxy.up();
    wait_for("Redis back", Duration::from_secs(30), || async {
        (server.get(&path, Some(&mine), None).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(server.get("/readyz", None, None).await.0, 200);
}
