//! Retailer domains end to end: events emitted with the real binary, applied by `tenancy run`,
//! checked in the retailer's database and the platform index.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use sqlx::MySqlPool;

use lines::{domain_assigned as assigned, domain_removed as removed};

async fn index(pool: &MySqlPool, t: &TestNs) -> Vec<(String, String)> {
    sqlx::query_as(&format!(
        "SELECT host, retailer_id FROM `{}_platform`.retailer_domains ORDER BY host",
        t.ns
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Assign (normalised), a second retailer refused the same host, a supplier's id refused, bad
/// hosts refused, remove; the retailer's table and the platform index agree throughout.
#[tokio::test(flavor = "multi_thread")]
async fn retailer_domains_are_assigned_once_normalised_and_removed() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("w");
    let (first, second, supplier) = (new_id(), new_id(), new_id());
    t.emit_ok(&[
        lines::created(&first, "RETAILER", "first"),
        lines::created(&second, "RETAILER", "second"),
        lines::created(&supplier, "SUPPLIER", "sup"),
    ]);
    for org in [&first, &second, &supplier] {
        t.wait_status(&pool, org, "active").await;
    }
    let first_db = format!("{}_retailer_first", t.ns);
    t.emit_ok(&[
        assigned(&first, "Shop.Example.COM."),
        assigned(&first, "bücher.example"),
    ]);
    wait_for(
        "the first retailer's domains",
        Duration::from_secs(60),
        || async { (domains_of(&pool, &first_db).await.len() == 2).then_some(()) },
    )
    .await;
    // Retailers are different keys, with no order between them: the competing claim is sent
    // once the first retailer holds the host.
    t.emit_ok(&[
        assigned(&second, "shop.example.com"),
        assigned(&supplier, "sup.example.com"),
    ]);
    let letters = t.dead_letters(2, Duration::from_secs(60));
    let reasons: Vec<String> = letters
        .iter()
        .map(|l| l.header("dlq.reason").unwrap_or_default())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("already assigned to retailer")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains(&format!("retailer_id {supplier} names a SUPPLIER"))),
        "{reasons:?}"
    );
    assert_eq!(
        domains_of(&pool, &first_db).await,
        ["shop.example.com", "xn--bcher-kva.example"]
    );
    assert_eq!(
        index(&pool, &t).await,
        [
            ("shop.example.com".to_owned(), first.clone()),
            ("xn--bcher-kva.example".to_owned(), first.clone())
        ]
    );

    // `tenancy emit` checks the schema only: the processor refuses a bad host, naming it.
    t.emit_ok(&[assigned(&first, "../etc/passwd")]);
    let letters = t.dead_letters(3, Duration::from_secs(60));
    assert!(
        letters.iter().any(|l| l
            .header("dlq.reason")
            .unwrap_or_default()
            .contains("../etc/passwd")),
        "the bad host is named"
    );

    // Removed by its owner; the second retailer can then take it.
    t.emit_ok(&[removed(&first, "shop.example.com")]);
    wait_for(
        "the host to be released",
        Duration::from_secs(60),
        || async { (index(&pool, &t).await.len() == 1).then_some(()) },
    )
    .await;
    t.emit_ok(&[assigned(&second, "shop.example.com")]);
    let second_db = format!("{}_retailer_second", t.ns);
    wait_for("the host to move", Duration::from_secs(60), || async {
        (domains_of(&pool, &second_db).await == ["shop.example.com"]).then_some(())
    })
    .await;
    assert_eq!(
        domains_of(&pool, &first_db).await,
        ["xn--bcher-kva.example"]
    );
    assert!(index(&pool, &t)
        .await
        .contains(&("shop.example.com".to_owned(), second.clone())));
}

/// A replayed assignment (the same event id again, e.g. a dead-letter replay or a producer
/// retry after the removal) does not bring a removed domain back, and a second worker applying
/// the same partition changes nothing: each event applies once.
#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_assignment_does_not_undo_a_removal() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _a = t.spawn_run("a");
    let _b = t.spawn_run("b");
    let retailer = new_id();
    t.emit_ok(&[lines::created(&retailer, "RETAILER", "replayed")]);
    t.wait_status(&pool, &retailer, "active").await;
    let db = format!("{}_retailer_replayed", t.ns);
    let assign = json!({"type": "RetailerDomainAssigned", "event_id": new_id(),
        "retailer_id": retailer, "domain": "shop.replayed.example"})
    .to_string();
    t.emit_ok(std::slice::from_ref(&assign));
    wait_for("the domain", Duration::from_secs(60), || async {
        (domains_of(&pool, &db).await.len() == 1).then_some(())
    })
    .await;
    t.emit_ok(&[removed(&retailer, "shop.replayed.example")]);
    wait_for("the removal", Duration::from_secs(60), || async {
        domains_of(&pool, &db).await.is_empty().then_some(())
    })
    .await;
    t.emit_ok(std::slice::from_ref(&assign));
    t.wait_caught_up().await;
    assert!(
        domains_of(&pool, &db).await.is_empty(),
        "the replay re-assigned it"
    );
    assert!(index(&pool, &t).await.is_empty());
}

/// Many new hosts claimed at once in the platform index, each by two retailers: every claim
/// answers (a locking read of a missing host took gap locks, and two claims of neighbouring new
/// hosts deadlocked, as the tenants claim did) and each host ends with exactly one holder, the
/// one the other claim was told about.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_host_claims_never_deadlock_and_one_retailer_holds_each_host() {
    use blindstrader_tenancy::domains::{claim_host, host::Host};
    let t = TestNs::new();
    let pool = t.prepared_pool().await;
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut claims = tokio::task::JoinSet::new();
    for n in 0..120 {
        let host = Host::parse(&format!("shop{n}.example")).unwrap();
        for _ in 0..2 {
            let (pool, ns, host, limit) = (pool.clone(), t.ns.clone(), host.clone(), limit.clone());
            claims.spawn(async move {
                let _slot = limit.acquire().await.unwrap();
                let retailer = new_id();
                let mut tx = pool.begin().await.unwrap();
                let taken = claim_host(&mut tx, &ns, &host, &retailer, chrono::Utc::now()).await;
                if let Ok(None) = taken {
                    tx.commit().await.unwrap();
                }
                (host.as_str().to_owned(), retailer, taken)
            });
        }
    }
    let mut by_host: std::collections::HashMap<String, Vec<(String, Option<String>)>> =
        Default::default();
    while let Some(done) = claims.join_next().await {
        let (host, retailer, taken) = done.unwrap();
        let taken = taken.unwrap_or_else(|e| panic!("claim of {host} by {retailer} failed: {e}"));
        by_host.entry(host).or_default().push((retailer, taken));
    }
    let held: std::collections::HashMap<String, String> =
        index(&pool, &t).await.into_iter().collect();
    assert_eq!(by_host.len(), 120);
    for (host, claims) in &by_host {
        let winners: Vec<&String> = claims
            .iter()
            .filter(|(_, o)| o.is_none())
            .map(|(r, _)| r)
            .collect();
        assert_eq!(winners.len(), 1, "{host}: {claims:?}");
        let (_, told) = claims.iter().find(|(r, _)| r != winners[0]).unwrap();
        assert_eq!(told.as_ref(), Some(winners[0]), "{host}");
        assert_eq!(held.get(host), Some(winners[0]), "{host}");
    }
}
