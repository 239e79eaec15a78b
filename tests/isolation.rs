//! Isolation on the write path: one tenant, one MySQL server or one flood of events never
//! holds up the other tenants on the same partitions. Each test puts everyone on one partition
//! (so they share a consumer and its batches) and makes one tenant sick while the others'
//! events keep arriving; before lanes per tenant, each of them stalled the whole partition.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use blindstrader_tenancy::log::topics::Topic;
use common::*;
use sqlx::MySqlPool;

const SETTLE: Duration = Duration::from_secs(90);

/// A namespace whose topics have one partition: every tenant shares it.
fn one_partition(mut t: TestNs) -> TestNs {
    t.config.partitions = 1;
    t
}

async fn rows(pool: &MySqlPool, db: &str) -> usize {
    fabric_rows(pool, db).await.len()
}

/// `/readyz` of a worker: (status, body).
async fn readyz(http: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{http}/readyz")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_locked_tenant_table_holds_up_that_tenant_only() {
    // One brand's fabrics table is locked by another session (LOCK TABLES … WRITE, held) while
    // its catalog update is being applied; the other brands' updates arrive after it on the
    // same partition and must apply while the lock is still held. Then the lock goes and the
    // locked brand gets its update too, nothing dead-lettered.
    let t = one_partition(TestNs::new());
    let pool = t.prepared_pool().await;
    let _worker = t.spawn_run_with("w", &["--lock-wait-timeout", "1s", "--max-attempts", "30"]);
    let brands: Vec<(String, String)> = (0..6).map(|i| (new_id(), format!("lk{i}"))).collect();
    let orgs: Vec<(&str, &str, &str)> = brands
        .iter()
        .map(|(id, slug)| (id.as_str(), "BRAND", slug.as_str()))
        .collect();
    t.provisioned(&pool, &orgs).await;
    let db = |slug: &str| format!("{}_brand_{slug}", t.ns);

    let mut locker = pool.acquire().await.unwrap();
    sqlx::query(&format!("LOCK TABLES `{}`.fabrics WRITE", db("lk0")))
        .execute(&mut *locker)
        .await
        .unwrap();
    t.emit_ok(&[lines::catalog(&brands[0].0, 1, &["L1"], &[])]);
    // The worker is at the locked table: its statement waits there.
    wait_for(
        "the locked brand's write to wait for the table lock",
        SETTLE,
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
                 WHERE INFO LIKE ? AND STATE LIKE '%metadata lock%'",
            )
            .bind(format!("%{}%", db("lk0")))
            .fetch_one(&pool)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;
    let others: Vec<String> = brands[1..]
        .iter()
        .map(|(id, _)| lines::catalog(id, 1, &["A1", "A2"], &[]))
        .collect();
    t.emit_ok(&others);
    for (_, slug) in &brands[1..] {
        let db = db(slug);
        wait_for(
            &format!("{slug}'s update while another brand's table is locked"),
            SETTLE,
            || async { (rows(&pool, &db).await == 2).then_some(()) },
        )
        .await;
    }
    // Still locked: the locked brand waits in its own lane, reported (between its attempts)
    // as parked for a retry.
    wait_for("the locked brand reported as waiting", SETTLE, || async {
        let held = t.holds("catalog");
        held.iter()
            .any(|(who, n)| who == &brands[0].0 && *n >= 1)
            .then_some(())
    })
    .await;
    sqlx::query("UNLOCK TABLES")
        .execute(&mut *locker)
        .await
        .unwrap();
    drop(locker);
    wait_for(
        "the locked brand's update once unlocked",
        SETTLE,
        || async { (rows(&pool, &db("lk0")).await == 1).then_some(()) },
    )
    .await;
    assert!(
        t.dead_letters(0, Duration::from_secs(2)).is_empty(),
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_tenants_backlog_waits_in_the_log_not_in_memory() {
    // A brand whose table is locked gets 30 updates with --max-held 5: at most 5 wait in
    // memory, the rest stay in the log (reported), and once the lock goes every one of them is
    // read again and applied, in order; another brand behind them on the partition is not held
    // up meanwhile.
    let t = one_partition(TestNs::new());
    let pool = t.prepared_pool().await;
    let _worker = t.spawn_run_with(
        "w",
        &[
            "--lock-wait-timeout",
            "1s",
            "--max-attempts",
            "50",
            "--max-held",
            "5",
        ],
    );
    let (stuck, free) = (new_id(), new_id());
    t.provisioned(&pool, &[(&stuck, "BRAND", "sp"), (&free, "BRAND", "sf")])
        .await;
    let (stuck_db, free_db) = (format!("{}_brand_sp", t.ns), format!("{}_brand_sf", t.ns));
    let mut locker = pool.acquire().await.unwrap();
    sqlx::query(&format!("LOCK TABLES `{stuck_db}`.fabrics WRITE"))
        .execute(&mut *locker)
        .await
        .unwrap();
    let codes: Vec<String> = (1..=30).map(|r| format!("S{r:02}")).collect();
    let updates: Vec<String> = codes
        .iter()
        .enumerate()
        .map(|(i, c)| lines::catalog(&stuck, i as i64 + 1, &[c.as_str()], &[]))
        .collect();
    t.emit_ok(&updates);
    t.emit_ok(&[lines::catalog(&free, 1, &["F1"], &[])]);
    wait_for("the free brand's update", SETTLE, || async {
        (rows(&pool, &free_db).await == 1).then_some(())
    })
    .await;
    let left = wait_for(
        "the stuck brand's backlog reported as left in the log",
        SETTLE,
        || async {
            let status = t.status();
            let left: Vec<String> = status["workers"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|w| {
                    w["report"]["processors"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .flat_map(|p| p["left_in_log"].as_array().cloned().unwrap_or_default())
                .filter_map(|l| l.as_str().map(str::to_owned))
                .collect();
            left.iter().any(|l| l.starts_with(&stuck)).then_some(left)
        },
    )
    .await;
    assert!(left[0].contains(".brand-catalog/0/"), "{left:?}");
    // Holds are reported per wait: every key waiting for the lifecycle log shares one line,
    // so the two brands' keys may add up there (5 and 1 was seen). Per key at most 5.
    let held = t.holds("catalog");
    let total: u64 = held.iter().map(|(_, n)| n).sum();
    assert!(
        total <= 2 * 5,
        "at most 5 events per key in memory, not the backlog of 30: {held:?}"
    );
    assert!(
        held.iter().all(|(w, n)| w != &stuck || *n <= 5),
        "at most 5 of its events in memory: {held:?}"
    );
    sqlx::query("UNLOCK TABLES")
        .execute(&mut *locker)
        .await
        .unwrap();
    drop(locker);
    wait_for("every update of the stuck brand", SETTLE, || async {
        (rows(&pool, &stuck_db).await == 30).then_some(())
    })
    .await;
    let names: Vec<String> = fabric_rows(&pool, &stuck_db)
        .await
        .into_iter()
        .map(|(code, name, _)| format!("{code}:{name}"))
        .collect();
    let expected: Vec<String> = codes
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c}:{c} r{}", i + 1))
        .collect();
    assert_eq!(names, expected);
    t.wait_caught_up().await;
    assert!(t.dead_letters(0, Duration::from_secs(2)).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_server_holds_up_its_own_tenants_only() {
    // Brands on home and on east; east stops answering (a frozen proxy in front of it: the
    // connections stay open, nothing comes back, as from a SIGSTOPped server). An east brand's
    // update arrives first, then the home brands': they apply while east hangs, the worker
    // stays ready and names east as degraded, and east's brands catch up once it answers.
    let t = one_partition(TestNs::with_east());
    let home = t.prepared_pool().await;
    let proxy = Proxy::start(&east_url().replace("mysql://root@", "")).await;
    let mut via = t.config.clone();
    via.servers[1].1 = format!("mysql://root@{}", proxy.addr);
    let w = TestNs::attach(t.ns.clone(), via);
    let worker = w.spawn_run_with("w", &["--apply-timeout", "3s"]);
    let servers = ["home", "east"];
    let on_home: Vec<String> = (0..3).map(|_| id_placed_on("home", &servers)).collect();
    let on_east: Vec<String> = (0..3).map(|_| id_placed_on("east", &servers)).collect();
    let mut orgs = Vec::new();
    for (i, id) in on_home.iter().enumerate() {
        orgs.push((id.clone(), format!("hh{i}")));
    }
    for (i, id) in on_east.iter().enumerate() {
        orgs.push((id.clone(), format!("he{i}")));
    }
    let created: Vec<(&str, &str, &str)> = orgs
        .iter()
        .map(|(id, slug)| (id.as_str(), "BRAND", slug.as_str()))
        .collect();
    t.provisioned(&home, &created).await;
    let east = MySqlPool::connect(&east_url()).await.unwrap();
    let db = |slug: &str| format!("{}_brand_{slug}", t.ns);

    proxy.freeze();
    t.emit_ok(&[lines::catalog(&on_east[0], 1, &["E1"], &[])]);
    let rest: Vec<String> = on_east[1..]
        .iter()
        .chain(&on_home)
        .map(|id| lines::catalog(id, 1, &["H1"], &[]))
        .collect();
    t.emit_ok(&rest);
    for i in 0..3 {
        let db = db(&format!("hh{i}"));
        wait_for(
            &format!("home brand hh{i}'s update while east hangs"),
            SETTLE,
            || async { (rows(&home, &db).await == 1).then_some(()) },
        )
        .await;
    }
    let http = t.worker_http_addr(&home, Some(worker.child.id())).await;
    let (code, body) = wait_for("readiness to name east", SETTLE, || async {
        let (code, body) = readyz(&http).await;
        body.contains("server east").then_some((code, body))
    })
    .await;
    assert_eq!(code, 200, "ready for the servers that answer: {body}");
    for i in 0..3 {
        assert_eq!(
            rows(&east, &db(&format!("he{i}"))).await,
            0,
            "east is frozen"
        );
    }
    // `tenancy serve` too: ready for home's tenants, east named as degraded.
    let api = common::serve::spawn_serve(&w, &[]);
    let (code, body) = api.get("/readyz", None, None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["mysql_servers"]["east"], "down", "{body}");
    assert!(
        body["degraded"][0]
            .as_str()
            .is_some_and(|d| d.contains("server east")),
        "{body}"
    );

    proxy.thaw();
    for i in 0..3 {
        let db = db(&format!("he{i}"));
        wait_for(
            &format!("east brand he{i}'s update once east answers"),
            SETTLE,
            || async { (rows(&east, &db).await == 1).then_some(()) },
        )
        .await;
    }
    wait_for("readiness to stop naming east", SETTLE, || async {
        let (_, body) = readyz(&http).await;
        (!body.contains("server east")).then_some(())
    })
    .await;
    assert!(
        t.dead_letters(0, Duration::from_secs(2)).is_empty(),
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_for_a_missing_tenant_is_a_quota_not_a_brake() {
    // 150 grants to a supplier that does not exist, with --max-held 100, then a revoke for a
    // live pair on the same (only) partition: the revoke applies at once; the flood's excess is
    // dead-lettered naming the tenant and the quota; the first 100 still wait.
    let t = one_partition(TestNs::new());
    let pool = t.prepared_pool().await;
    let _worker = t.spawn_run_with("w", &["--max-held", "100"]);
    let (brand, supplier) = (new_id(), new_id());
    t.provisioned(
        &pool,
        &[(&brand, "BRAND", "fb"), (&supplier, "SUPPLIER", "fs")],
    )
    .await;
    t.emit_ok(&[lines::grant(
        &new_id(),
        &brand,
        &supplier,
        &["catalog.read"],
    )]);
    let access =
        |pool: MySqlPool, db: String| async move { row_count(&pool, &db, "brand_access").await };
    let supplier_db = format!("{}_supplier_fs", t.ns);
    wait_for("the grant", SETTLE, || {
        let f = access(pool.clone(), supplier_db.clone());
        async move { (f.await == 1).then_some(()) }
    })
    .await;

    // On the access topic's only partition, as the revoke below: grants from the live brand to
    // a supplier that does not exist.
    let missing = new_id();
    let flood: Vec<String> = (0..150)
        .map(|_| lines::grant(&new_id(), &brand, &missing, &["catalog.read"]))
        .collect();
    t.emit_ok(&flood);
    // The flood is held (as much of it as the quota allows) before the revoke is sent, so the
    // revoke comes in a later fetch than the flood.
    wait_for("the flood held", SETTLE, || async {
        let h = t.holds("catalog");
        h.iter()
            .any(|(who, n)| who == &missing && *n >= 100)
            .then_some(())
    })
    .await;
    t.emit_ok(&[lines::revoke(&brand, &supplier)]);
    wait_for("the revoke behind the flood", SETTLE, || {
        let f = access(pool.clone(), supplier_db.clone());
        async move { (f.await == 0).then_some(()) }
    })
    .await;
    let letters = t.dead_letters(50, SETTLE);
    assert_eq!(letters.len(), 50, "the excess over the quota");
    for l in &letters {
        let reason = l.header("dlq.reason").unwrap();
        assert!(
            reason.contains("more than 100 events wait for tenant") && reason.contains(&missing),
            "{reason}"
        );
        assert_eq!(l.header("dlq.tenant").as_deref(), Some(missing.as_str()));
    }
    wait_for("the flood's first 100 still held", SETTLE, || async {
        let h = t.holds("catalog");
        h.iter()
            .any(|(who, n)| who == &missing && *n == 100)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_archived_tenant_on_a_server_not_given_holds_up_nobody() {
    // A brand on east is archived; a worker given home only runs (it starts: no active tenant
    // is on east). An event for the archived brand comes first on the partition, then one for
    // a home brand: the first is skipped without touching east, the second applies.
    let t = one_partition(TestNs::with_east());
    let home = t.prepared_pool().await;
    let servers = ["home", "east"];
    let (far, near) = (
        id_placed_on("east", &servers),
        id_placed_on("home", &servers),
    );
    {
        let _worker = t.spawn_run("both");
        t.provisioned(&home, &[(&far, "BRAND", "uf"), (&near, "BRAND", "un")])
            .await;
        t.emit_ok(&[lines::terminated(&new_id(), &far, "BRAND", "uf")]);
        t.wait_status(&home, &far, "archived").await;
    }
    let mut home_only = t.config.clone();
    home_only.home_only();
    let blind = TestNs::attach(t.ns.clone(), home_only);
    let _worker = blind.spawn_run("home-only");
    t.emit_ok(&[lines::catalog(&far, 1, &["U1"], &[])]);
    t.emit_ok(&[lines::catalog(&near, 1, &["U1"], &[])]);
    let near_db = format!("{}_brand_un", t.ns);
    wait_for("the home brand's update", SETTLE, || async {
        (rows(&home, &near_db).await == 1).then_some(())
    })
    .await;
    t.wait_caught_up().await;
    assert!(
        t.dead_letters(0, Duration::from_secs(2)).is_empty(),
        "the archived brand's event is skipped, not dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_poison_message_is_dead_lettered_without_its_payload_and_replayed_whole() {
    // A poison message near the 1 MB limit: its copy plus the dlq.* headers does not fit, so
    // the dead letter goes without its payload, saying so; the partition goes on (a live
    // brand's update behind it applies); a replay fetches the original, byte for byte.
    let t = one_partition(TestNs::new());
    let pool = t.prepared_pool().await;
    let _worker = t.spawn_run("w");
    let brand = new_id();
    t.provisioned(&pool, &[(&brand, "BRAND", "ob")]).await;
    let topic = t.topic(Topic::BrandCatalog);
    // Not Confluent-framed (magic byte 1): undecodable.
    let mut poison = vec![1u8; 999_800];
    poison[1..9].copy_from_slice(b"poison!!");
    let (partition, offset) = {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = t
            .config
            .kafka_client_config()
            .set("message.max.bytes", "2000000")
            .create()
            .unwrap();
        let d = producer
            .send(
                FutureRecord::to(&topic).key(&brand).payload(&poison),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing the poison: {e}"));
        (d.partition, d.offset)
    };
    t.emit_ok(&[lines::catalog(&brand, 1, &["O1"], &[])]);
    let db = format!("{}_brand_ob", t.ns);
    wait_for("the update behind the poison", SETTLE, || async {
        (rows(&pool, &db).await == 1).then_some(())
    })
    .await;
    let letters = t.dead_letters(1, SETTLE);
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(
        l.header("dlq.payload-omitted").as_deref(),
        Some("999800"),
        "{:?}",
        l.headers
    );
    assert!(l.payload.as_deref().unwrap_or_default().is_empty());
    assert_eq!(
        l.header("dlq.source.offset"),
        Some(offset.to_string()),
        "{:?}",
        l.headers
    );
    assert!(l
        .header("dlq.reason")
        .unwrap()
        .contains("not Confluent wire format"));

    let (code, out, err) = t.tenancy_output(&["dead-letter", "replay"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let copies = wait_for("the replayed copy on the source topic", SETTLE, || async {
        let copies: Vec<RawMessage> = t
            .read_messages(Topic::BrandCatalog, 3, Duration::from_secs(5))
            .into_iter()
            .filter(|m| m.header("dlq.replayed-from").is_some())
            .collect();
        (!copies.is_empty()).then_some(copies)
    })
    .await;
    assert_eq!(copies[0].partition, partition);
    assert!(
        copies[0].payload.as_deref() == Some(poison.as_slice()),
        "the original, byte for byte ({:?} bytes)",
        copies[0].payload.as_ref().map(Vec::len)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_restarted_empty_is_waited_for_not_a_flood_of_dead_letters() {
    // The registry is restarted on an empty data directory (as on the wrong path) and a worker
    // starts: the events in the log carry ids this registry does not know. The worker does not
    // dead-letter them (the registry holds none of the project's subjects: it is unavailable,
    // not the events wrong); it reports the registry and waits. The registry comes back on its
    // own data: the events apply, nothing was dead-lettered. (Before, every event went to the
    // dead-letter topic, and each id stayed "not found" for the life of the worker.)
    let mut t = one_partition(TestNs::new());
    let kept = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    t.config.schema_registry_url = url.clone();
    let registry = PrivateRegistry::start(port, kept.path()).await;
    let pool = t.prepared_pool().await;
    let mut first = t.spawn_run("first");
    let brand = new_id();
    t.provisioned(&pool, &[(&brand, "BRAND", "rb")]).await;
    t.emit_ok(&[lines::catalog(&brand, 1, &["R1"], &[])]);
    let db = format!("{}_brand_rb", t.ns);
    wait_for("the first update", SETTLE, || async {
        (rows(&pool, &db).await == 1).then_some(())
    })
    .await;
    t.wait_caught_up().await;
    first.terminate();
    t.emit_ok(&[lines::catalog(&brand, 2, &["R1", "R2"], &[])]);

    registry.stop().await;
    let wrong = PrivateRegistry::start(port, empty.path()).await;
    let worker = t.spawn_run("second");
    let http = t.worker_http_addr(&pool, Some(worker.child.id())).await;
    let body = wait_for("readiness to wait for the registry", SETTLE, || async {
        let (code, body) = readyz(&http).await;
        (code == 503 && body.contains("waiting for registry")).then_some(body)
    })
    .await;
    assert!(
        body.contains("holds none of this project's subjects"),
        "{body}"
    );
    assert!(
        t.dead_letters(0, Duration::from_secs(2)).is_empty(),
        "nothing dead-lettered while the registry is wrong"
    );
    assert_eq!(rows(&pool, &db).await, 1);

    wrong.stop().await;
    let _back = PrivateRegistry::start(port, kept.path()).await;
    wait_for(
        "the update once the registry has its data back",
        SETTLE,
        || async { (rows(&pool, &db).await == 2).then_some(()) },
    )
    .await;
    assert!(t.dead_letters(0, Duration::from_secs(2)).is_empty());
}

/// A schema registry of this test's own, on a chosen port and data directory.
struct PrivateRegistry {
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl PrivateRegistry {
    async fn start(port: u16, dir: &std::path::Path) -> PrivateRegistry {
        let listener = wait_for("the registry's port", SETTLE, || async {
            tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .ok()
        })
        .await;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(blindstrader_registry::serve(
            listener,
            PathBuf::from(dir),
            shutdown.clone(),
        ));
        PrivateRegistry { shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}
