//! Provisioning end to end against MariaDB, Tansu and the schema registry: events emitted with
//! the real binary, processed by `tenancy run`, checked in MySQL and on the outcome topic.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use blindstrader_tenancy::log::events::{Event, EventKind, OrganisationCreated};
use blindstrader_tenancy::log::topics::Topic;
use blindstrader_tenancy::store::servers::Servers;
use blindstrader_tenancy::tenant::OrganisationType;
use common::*;
use sqlx::MySqlPool;

const SETTLE: Duration = Duration::from_secs(90);

async fn tables(pool: &MySqlPool, db: &str) -> Vec<String> {
    let mut names: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ?",
    )
    .bind(db)
    .fetch_all(pool)
    .await
    .unwrap();
    names.sort();
    names
}

async fn applied_migrations(pool: &MySqlPool, db: &str) -> Vec<(i64, bool)> {
    sqlx::query_as(&format!(
        "SELECT version, success FROM `{db}`._sqlx_migrations ORDER BY version"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Every migration shipped for the kind of database `db` (`..._brand_...`), all applied.
fn shipped(db: &str) -> Vec<(i64, bool)> {
    use blindstrader_tenancy::tenancy::migrations::for_tenant;
    let kind = [
        OrganisationType::Brand,
        OrganisationType::Supplier,
        OrganisationType::Retailer,
    ]
    .into_iter()
    .find(|k| db.contains(k.db_word()))
    .expect("a tenant database");
    for_tenant(kind).iter().map(|m| (m.version, true)).collect()
}

async fn wait_settled(
    t: &TestNs,
    pool: &MySqlPool,
    n: usize,
) -> Vec<(String, String, Option<String>)> {
    wait_for(&format!("{n} settled tenants"), SETTLE, || async {
        let rows = statuses(pool, &t.ns).await;
        (rows.len() >= n && rows.iter().all(|(_, s, _)| s != "provisioning")).then_some(rows)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn each_organisation_type_gets_a_migrated_database() {
    let t = TestNs::new();
    let (brand, supplier, retailer) = (new_id(), new_id(), new_id());
    let created_ids = [new_id(), new_id(), new_id()];
    let out = t.emit_ok(&[
        created_line(&created_ids[0], &brand, "BRAND", "louvolite"),
        created_line(&created_ids[1], &supplier, "SUPPLIER", "cassidy"),
        created_line(&created_ids[2], &retailer, "RETAILER", "newblinds"),
    ]);
    // One line per event: topic/partition/offset, type, key.
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with(&format!("{}/", t.topic(Topic::Organisations))),
        "{out}"
    );
    assert!(
        lines[0].ends_with(&format!("OrganisationCreated\t{brand}")),
        "{out}"
    );

    let mut worker = t.spawn_run("types");
    let pool = t.pool().await;
    let rows = wait_settled(&t, &pool, 3).await;
    assert!(
        rows.iter().all(|(_, s, _)| s == "active"),
        "{rows:?}\n{}",
        worker.log_text()
    );

    let ns = t.ns.as_str();
    let expect = [
        (
            format!("{ns}_brand_louvolite"),
            vec![
                "_sqlx_migrations",
                "applied_events",
                "fabrics",
                "projection_offsets",
                "removed_fabrics",
            ],
        ),
        (
            format!("{ns}_supplier_cassidy"),
            vec![
                "_sqlx_migrations",
                "access_changes",
                "applied_events",
                "brand_access",
                "brand_fabrics",
                "projection_offsets",
            ],
        ),
        (
            format!("{ns}_retailer_newblinds"),
            vec![
                "_sqlx_migrations",
                "applied_events",
                "domains",
                "projection_offsets",
            ],
        ),
    ];
    for (db, want) in &expect {
        assert_eq!(&tables(&pool, db).await, want, "tables of {db}");
        assert_eq!(applied_migrations(&pool, db).await, shipped(db), "{db}");
    }
    for service in [
        "identity",
        "supply_chain",
        "payment",
        "platform",
        "notification",
    ] {
        assert!(
            database_exists(&pool, &format!("{ns}_{service}")).await,
            "{service} db"
        );
    }

    let outcomes = t.read_events(Topic::Tenancy, 3, SETTLE).await;
    let provisioned: Vec<_> = outcomes
        .iter()
        .filter_map(|e| match e {
            Event::TenantProvisioned(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(provisioned.len(), 3, "{outcomes:?}");
    let by_org: HashMap<&str, _> = provisioned
        .iter()
        .map(|p| (p.organisation_id.as_str(), *p))
        .collect();
    assert_eq!(
        by_org[brand.as_str()].database,
        format!("{ns}_brand_louvolite")
    );
    assert_eq!(
        by_org[supplier.as_str()].organisation_type,
        OrganisationType::Supplier
    );
    assert_eq!(
        Some(by_org[retailer.as_str()].migration_version),
        shipped("retailer").last().map(|(v, _)| *v)
    );
    assert_eq!(
        by_org[brand.as_str()].caused_by.as_deref(),
        Some(created_ids[0].as_str())
    );

    // A clean shutdown on SIGTERM.
    assert!(worker.terminate().success(), "{}", worker.log_text());

    // `tenants list` and `show` see the same.
    let list = t
        .tenancy()
        .args(["tenants", "list", "--status", "active"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    for slug in ["louvolite", "cassidy", "newblinds"] {
        assert!(text.contains(slug), "{text}");
    }
    let show = t
        .tenancy()
        .args(["tenants", "show", "cassidy", "--json"])
        .output()
        .unwrap();
    assert!(show.status.success());
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(v["status"], "active");
    assert_eq!(v["database_name"], format!("{ns}_supplier_cassidy"));
    let missing = t
        .tenancy()
        .args(["tenants", "show", "nobody"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_event_provisions_once_with_one_outcome_id() {
    let t = TestNs::new();
    let org = new_id();
    let event_id = new_id();
    let line = created_line(&event_id, &org, "BRAND", "acmeblinds");
    // The same event twice, at two offsets (a producer retry, emit run again): applied once,
    // answered once. (A re-run of one delivery after a crash publishes the same derived id:
    // see the kill and race tests.)
    t.emit_ok(&[line.clone(), line]);
    let worker = t.spawn_run("redelivery");
    let pool = t.pool().await;
    let rows = wait_settled(&t, &pool, 1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, "active");
    t.wait_caught_up().await;

    let outcomes = t.read_events(Topic::Tenancy, 1, SETTLE).await;
    assert_eq!(kinds_of(&outcomes), vec![EventKind::TenantProvisioned]);
    assert!(worker
        .log_text()
        .contains("OrganisationCreated already applied: ignored"));
    assert_eq!(
        applied_migrations(&pool, &format!("{}_brand_acmeblinds", t.ns)).await,
        shipped("brand")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_end_as_failed_tenants_not_crash_loops() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (owner, squatter, bad) = (new_id(), new_id(), new_id());
    t.emit_ok(&[
        created_line(&new_id(), &owner, "SUPPLIER", "shadeco"),
        // Too long for a MySQL database name under any namespace: 48-char slug + prefix > 64.
        created_line(&new_id(), &bad, "RETAILER", &format!("a{}", "b".repeat(47))),
    ]);
    // `emit` refuses an invalid slug, so a foreign producer is simulated through the library.
    let invalid_org = new_id();
    produce_created(&t, &invalid_org, "Bad-Slug; DROP DATABASE mysql").await;
    let good_after = new_id();
    t.emit_ok(&[created_line(&new_id(), &good_after, "BRAND", "afterwards")]);

    let worker = t.spawn_run("refusals");
    // Different keys land on different partitions, so the squatter is only sent once the owner
    // holds the name.
    wait_settled(&t, &pool, 4).await;
    t.emit_ok(&[created_line(&new_id(), &squatter, "SUPPLIER", "shadeco")]);
    let rows = wait_settled(&t, &pool, 5).await;
    let status: HashMap<&str, (&str, Option<&str>)> = rows
        .iter()
        .map(|(o, s, d)| (o.as_str(), (s.as_str(), d.as_deref())))
        .collect();
    let ns = t.ns.as_str();
    let shadeco = format!("{ns}_supplier_shadeco");
    assert_eq!(
        status[owner.as_str()],
        ("active", Some(shadeco.as_str())),
        "{}",
        worker.log_text()
    );
    assert_eq!(status[squatter.as_str()], ("failed", None));
    assert_eq!(status[bad.as_str()], ("failed", None));
    assert_eq!(status[invalid_org.as_str()], ("failed", None));
    assert_eq!(
        status[good_after.as_str()].0,
        "active",
        "later events still flow"
    );

    let outcomes = t.read_events(Topic::Tenancy, 5, SETTLE).await;
    let reasons: HashMap<String, String> = outcomes
        .iter()
        .filter_map(|e| match e {
            Event::TenantProvisioningFailed(f) => {
                Some((f.organisation_id.clone(), f.reason.clone()))
            }
            _ => None,
        })
        .collect();
    assert!(
        reasons[&squatter].contains("already belongs to organisation"),
        "{reasons:?}"
    );
    assert!(
        reasons[&bad].contains("over the MySQL limit"),
        "{reasons:?}"
    );
    assert!(
        reasons[&invalid_org].contains("invalid slug"),
        "{reasons:?}"
    );
    // Nothing was created for the refused ones.
    let dbs: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(SCHEMA_NAME AS CHAR) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE ? ORDER BY 1",
    )
    .bind(format!("{}\\_%", ns.replace('_', "\\_")))
    .fetch_all(&pool)
    .await
    .unwrap();
    let tenant_dbs: Vec<&String> = dbs
        .iter()
        .filter(|d| d.contains("_brand_") || d.contains("_supplier_") || d.contains("_retailer_"))
        .collect();
    assert_eq!(
        tenant_dbs,
        vec![&format!("{ns}_brand_afterwards"), &shadeco]
    );
}

/// Produces an OrganisationCreated the way another Confluent client would, bypassing emit.
async fn produce_created(t: &TestNs, org: &str, slug: &str) {
    use blindstrader_tenancy::log::wire::Codec;
    use rdkafka::producer::FutureRecord;
    blindstrader_tenancy::log::topics::ensure_topics(&t.config)
        .await
        .unwrap();
    let event = OrganisationCreated {
        event_id: new_id(),
        occurred_at: 1_795_946_400_000,
        organisation_id: org.to_owned(),
        organisation_type: OrganisationType::Retailer,
        slug: slug.to_owned(),
        name: "Foreign".into(),
        region: None,
    };
    let value =
        blindstrader_tenancy::log::events::to_avro(EventKind::OrganisationCreated, &event).unwrap();
    let topic = t.topic(Topic::Organisations);
    let payload = Codec::new(&t.config.schema_registry_url)
        .encode(&topic, EventKind::OrganisationCreated, value)
        .await
        .unwrap();
    let producer = blindstrader_tenancy::log::kafka::producer(&t.config).unwrap();
    producer
        .send(
            FutureRecord::to(&topic).key(org).payload(&payload),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_provisioning_converges_after_restart() {
    let t = TestNs::new();
    let n = 100;
    let orgs: Vec<String> = (0..n).map(|_| new_id()).collect();
    let lines: Vec<String> = orgs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            created_line(
                &new_id(),
                o,
                ["BRAND", "SUPPLIER", "RETAILER"][i % 3],
                &format!("kill{i}"),
            )
        })
        .collect();
    t.emit_ok(&lines);
    let pool = t.pool().await;

    let mut first = t.spawn_run("kill-first");
    // Kill it once some tenants' databases exist: a batch of new tenants is claimed at once and
    // activated at once, so this is mid-way through creating them.
    wait_for("first tenant databases created", SETTLE, || async {
        let created: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE ?",
        )
        .bind(format!("{}\\_%\\_kill%", t.ns))
        .fetch_one(&pool)
        .await
        .unwrap();
        (created >= 1).then_some(())
    })
    .await;
    first.kill9();
    let after_kill = statuses(&pool, &t.ns).await;
    let active_at_kill = after_kill.iter().filter(|(_, s, _)| s == "active").count();
    assert!(active_at_kill < n, "kill came too late to test anything");

    let _second = t.spawn_run("kill-second");
    let rows = wait_settled(&t, &pool, n).await;
    assert_eq!(rows.len(), n);
    assert!(rows.iter().all(|(_, s, _)| s == "active"), "{rows:?}");
    for (_, _, db) in &rows {
        let db = db.as_deref().unwrap();
        assert_eq!(applied_migrations(&pool, db).await, shipped(db), "{db}");
    }
    // Exactly one TenantProvisioned id per organisation, however often it was published.
    let outcomes = t.read_events(Topic::Tenancy, n, SETTLE).await;
    let mut ids_per_org: HashMap<String, HashSet<String>> = HashMap::new();
    for e in &outcomes {
        if let Event::TenantProvisioned(p) = e {
            ids_per_org
                .entry(p.organisation_id.clone())
                .or_default()
                .insert(p.event_id.clone());
        }
    }
    assert_eq!(ids_per_org.len(), n);
    assert!(
        ids_per_org.values().all(|ids| ids.len() == 1),
        "{ids_per_org:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn events_from_another_confluent_client_with_an_evolved_schema_are_consumed() {
    use apache_avro::types::Value;
    use rdkafka::producer::FutureRecord;
    use schema_registry_converter::async_impl::avro::AvroEncoder;
    use schema_registry_converter::async_impl::schema_registry::SrSettings;
    use schema_registry_converter::schema_registry_common::{
        SchemaType, SubjectNameStrategy, SuppliedSchema,
    };

    let t = TestNs::new();
    blindstrader_tenancy::log::topics::ensure_topics(&t.config)
        .await
        .unwrap();
    let topic = t.topic(Topic::Organisations);
    // A producer on a later schema version: plain strings instead of logical types, and a new
    // field with a default (BACKWARD compatible), as a Python or PHP client might send.
    let evolved = r#"{"type":"record","name":"OrganisationCreated","namespace":"blindstrader.events","fields":[
        {"name":"event_id","type":"string"},
        {"name":"occurred_at","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"organisation_id","type":"string"},
        {"name":"organisation_type","type":{"type":"enum","name":"OrganisationType","symbols":["BRAND","SUPPLIER","RETAILER"]}},
        {"name":"slug","type":"string"},
        {"name":"name","type":"string"},
        {"name":"tier","type":"string","default":"standard"}]}"#;
    let encoder = AvroEncoder::new(SrSettings::new(t.config.schema_registry_url.clone()));
    let strategy = SubjectNameStrategy::TopicRecordNameStrategyWithSchema(
        topic.clone(),
        SuppliedSchema::new(
            Some("blindstrader.events.OrganisationCreated".into()),
            SchemaType::Avro,
            evolved.into(),
        ),
    );
    let org = new_id();
    let event_id = new_id();
    let payload = encoder
        .encode(
            vec![
                ("event_id", Value::String(event_id.clone())),
                ("occurred_at", Value::TimestampMillis(1_795_946_400_000)),
                ("organisation_id", Value::String(org.clone())),
                ("organisation_type", Value::Enum(1, "SUPPLIER".into())),
                ("slug", Value::String("foreigner".into())),
                ("name", Value::String("Foreign Client Ltd".into())),
                ("tier", Value::String("gold".into())),
            ],
            strategy,
        )
        .await
        .unwrap();
    let producer = blindstrader_tenancy::log::kafka::producer(&t.config).unwrap();
    producer
        .send(
            FutureRecord::to(&topic).key(&org).payload(&payload),
            Duration::from_secs(30),
        )
        .await
        .unwrap();

    let _worker = t.spawn_run("foreign");
    let pool = t.pool().await;
    let rows = wait_settled(&t, &pool, 1).await;
    assert_eq!(
        rows,
        vec![(
            org.clone(),
            "active".to_string(),
            Some(format!("{}_supplier_foreigner", t.ns))
        )]
    );
    let outcomes = t.read_events(Topic::Tenancy, 1, SETTLE).await;
    match &outcomes[..] {
        [Event::TenantProvisioned(p)] => {
            assert_eq!(p.caused_by.as_deref(), Some(event_id.as_str()))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_racing_on_one_event_end_with_one_database_and_one_outcome_id() {
    let t = TestNs::new();
    let pool = t.pool().await;
    // Two workers' processors, sharing nothing but the servers.
    let (first, second) = (t.processors().await, t.processors().await);
    let org = new_id();
    let event = OrganisationCreated {
        event_id: new_id(),
        occurred_at: 1_795_946_400_000,
        organisation_id: org.clone(),
        organisation_type: OrganisationType::Brand,
        slug: "contested".into(),
        name: "Contested".into(),
        region: None,
    };
    let msg = message(
        &t.topic(Topic::Organisations),
        0,
        0,
        &org,
        Event::OrganisationCreated(event),
    );
    // Both apply the same delivery at once, as two workers would across a rebalance, retrying
    // what the loop retries (a deadlock between their claims is one).
    tokio::join!(
        apply_retrying(&first.provisioner, &msg),
        apply_retrying(&second.provisioner, &msg)
    );
    let rows = statuses(&pool, &t.ns).await;
    assert_eq!(
        rows,
        vec![(
            org.clone(),
            "active".to_string(),
            Some(format!("{}_brand_contested", t.ns))
        )]
    );
    assert_eq!(
        applied_migrations(&pool, &format!("{}_brand_contested", t.ns)).await,
        shipped("brand")
    );
    // The loser of the race finds the creation applied (under the organisation's lock) and
    // publishes nothing.
    let outcomes = t.read_events(Topic::Tenancy, 1, SETTLE).await;
    assert_eq!(kinds_of(&outcomes), vec![EventKind::TenantProvisioned]);
}

/// As the provisioner creates tenant databases.
const CHARSET: &str = "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci";

/// Every table's definition in `db`, by name (AUTO_INCREMENT counters left out).
async fn definitions(pool: &MySqlPool, db: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for table in tables(pool, db).await {
        let (_, ddl): (String, String) =
            sqlx::query_as(&format!("SHOW CREATE TABLE `{db}`.`{table}`"))
                .fetch_one(pool)
                .await
                .unwrap();
        let ddl = without_auto_increment(&ddl);
        out.push((table, ddl));
    }
    out
}

fn without_auto_increment(ddl: &str) -> String {
    ddl.split(' ')
        .filter(|w| !w.starts_with("AUTO_INCREMENT="))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A database made by the one-script path for fresh databases ends like one migrated step by
/// step by sqlx, with bookkeeping sqlx accepts; and a fresh database left half-migrated (a
/// worker killed mid-script) is completed by the next attempt.
#[tokio::test(flavor = "multi_thread")]
async fn fresh_databases_migrate_in_one_script_like_sqlx_step_by_step() {
    use blindstrader_tenancy::tenancy::migrations::{
        create_and_migrate, create_and_migrate_tenant, for_tenant, migrate,
    };
    use blindstrader_tenancy::tenant::Slug;
    let t = TestNs::new();
    let pool = t.pool().await;
    let url = &t.config.database_url;
    let ddl = blindstrader_tenancy::store::pools::ddl_pool(&t.config, 1).unwrap();
    for kind in [
        OrganisationType::Brand,
        OrganisationType::Supplier,
        OrganisationType::Retailer,
    ] {
        let migrator = for_tenant(kind);
        let named = |slug: &str| {
            t.ns.tenant_database(kind, &Slug::parse(slug).unwrap())
                .unwrap()
        };
        let (fresh, stepwise, torn) = (named("fresh"), named("stepwise"), named("torn"));
        create_and_migrate(&pool, url, &fresh, migrator)
            .await
            .unwrap();
        // The stepwise path: the database exists before the call, so sqlx applies each file.
        sqlx::query(&format!("CREATE DATABASE {} {CHARSET}", stepwise.quoted()))
            .execute(&pool)
            .await
            .unwrap();
        create_and_migrate(&pool, url, &stepwise, migrator)
            .await
            .unwrap();
        let a = definitions(&pool, fresh.as_str()).await;
        let b = definitions(&pool, stepwise.as_str()).await;
        assert!(!a.is_empty());
        assert_eq!(a, b, "{kind:?}: fresh and stepwise schemas differ");
        let bookkeeping = |db: String| {
            let pool = pool.clone();
            async move {
                sqlx::query_as::<_, (i64, String, bool, Vec<u8>)>(&format!(
                    "SELECT version, description, success, checksum FROM `{db}`._sqlx_migrations ORDER BY version"
                ))
                .fetch_all(&pool)
                .await
                .unwrap()
            }
        };
        assert_eq!(
            bookkeeping(fresh.to_string()).await,
            bookkeeping(stepwise.to_string()).await
        );
        // sqlx's own run checks every recorded checksum and finds nothing to do.
        migrate(url, &fresh, migrator).await.unwrap();

        // Killed after the first migration's DDL, before anything was recorded.
        sqlx::query(&format!("CREATE DATABASE {} {CHARSET}", torn.quoted()))
            .execute(&pool)
            .await
            .unwrap();
        let first = migrator.iter().next().unwrap();
        let mut conn = pool.acquire().await.unwrap();
        sqlx::raw_sql(&format!("USE {}; {}", torn.quoted(), first.sql))
            .execute(&mut *conn)
            .await
            .unwrap();
        conn.detach();
        create_and_migrate(&pool, url, &torn, migrator)
            .await
            .unwrap();
        assert_eq!(definitions(&pool, torn.as_str()).await, a, "{kind:?}: torn");

        // The provisioner's path: one script on a reused DDL connection; a database that
        // exists already (the torn one) is finished the ordinary way, and the connection that
        // met the error serves the next one.
        let (direct, torn_again) = (named("direct"), named("tornagain"));
        sqlx::query(&format!(
            "CREATE DATABASE {} {CHARSET}",
            torn_again.quoted()
        ))
        .execute(&pool)
        .await
        .unwrap();
        for db in [&torn_again, &direct] {
            create_and_migrate_tenant(&ddl, url, db, migrator)
                .await
                .unwrap();
            assert_eq!(definitions(&pool, db.as_str()).await, a, "{kind:?}: {db}");
            assert_eq!(
                bookkeeping(db.to_string()).await,
                bookkeeping(fresh.to_string()).await,
                "{kind:?}: {db}"
            );
        }
    }
}

/// Many new organisations claimed at once, and pairs of them racing for one database name:
/// every claim answers (no deadlock surfaces as an error: the locking read's gap locks made
/// neighbouring new rows deadlock, 12 times per 300 tenants provisioned 4 at a time), and of
/// each pair exactly one proceeds while the other is told whose database it is.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_claims_never_deadlock_and_one_name_goes_to_one_organisation() {
    use blindstrader_tenancy::store::tenants::{Claim, Tenants};
    use blindstrader_tenancy::tenant::Slug;
    let t = TestNs::new();
    let pool = t.prepared_pool().await;
    let tenants = Tenants::on(Servers::single(pool.clone(), &t.config.database_url), &t.ns);
    let now = chrono::Utc::now();
    let mut claims = tokio::task::JoinSet::new();
    // 120 slugs, each claimed by two organisations at once: 240 claims, 16 at a time.
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    for n in 0..120 {
        let slug = Slug::parse(&format!("race{n}")).unwrap();
        let db =
            t.ns.tenant_database(OrganisationType::Brand, &slug)
                .unwrap();
        for _ in 0..2 {
            let (tenants, db, slug, limit) =
                (tenants.clone(), db.clone(), slug.clone(), limit.clone());
            claims.spawn(async move {
                let _slot = limit.acquire().await.unwrap();
                let org = new_id();
                let claim = tenants
                    .claim(
                        &org,
                        OrganisationType::Brand,
                        slug.as_str(),
                        "Race",
                        &db,
                        now,
                        None,
                    )
                    .await;
                (slug.to_string(), org, claim)
            });
        }
    }
    let mut by_slug: std::collections::HashMap<String, Vec<(String, Claim)>> = Default::default();
    while let Some(done) = claims.join_next().await {
        let (slug, org, claim) = done.unwrap();
        let claim = claim.unwrap_or_else(|e| panic!("claim of {slug} by {org} failed: {e}"));
        by_slug.entry(slug).or_default().push((org, claim));
    }
    assert_eq!(by_slug.len(), 120);
    for (slug, claims) in &by_slug {
        let winners: Vec<&String> = claims
            .iter()
            .filter(|(_, c)| matches!(c, Claim::Proceed(_)))
            .map(|(org, _)| org)
            .collect();
        assert_eq!(winners.len(), 1, "{slug}: {claims:?}");
        let loser = claims.iter().find(|(o, _)| o != winners[0]).unwrap();
        match &loser.1 {
            Claim::Conflict(reason) => assert!(
                reason.contains(&format!("already belongs to organisation {}", winners[0])),
                "{slug}: {reason}"
            ),
            other => panic!("{slug}: the second claim got {other:?}"),
        }
        let owner: String = sqlx::query_scalar(&format!(
            "SELECT organisation_id FROM `{}_platform`.tenants WHERE database_name = ?",
            t.ns
        ))
        .bind(format!("{}_brand_{slug}", t.ns))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(&owner, winners[0]);
    }
}

/// Applies one event as the loop's per-key path does: retrying what it retries (a busy lock, a
/// deadlock between claims), up to 20 times; anything else fails the test.
async fn apply_retrying(
    p: &blindstrader_tenancy::tenancy::provisioning::Provisioner,
    msg: &blindstrader_tenancy::stream::Msg<Event>,
) {
    use blindstrader_tenancy::stream::{Processor, StepError};
    for _ in 0..20 {
        match p.apply(&[(msg, &())]).await {
            Ok(()) => return,
            Err(f) if matches!(f.error, StepError::Retry(_)) => continue,
            Err(f) => panic!("{}", f.error),
        }
    }
    panic!("still failing after 20 attempts");
}

/// An OrganisationCreated as a message on the lifecycle topic.
fn created_msg(
    t: &TestNs,
    offset: i64,
    org: &str,
    kind: OrganisationType,
    slug: &str,
) -> blindstrader_tenancy::stream::Msg<Event> {
    let event = OrganisationCreated {
        event_id: new_id(),
        occurred_at: 1_795_946_400_000 + offset,
        organisation_id: org.to_owned(),
        organisation_type: kind,
        slug: slug.into(),
        name: format!("Org {slug}"),
        region: None,
    };
    message(
        &t.topic(Topic::Organisations),
        0,
        offset,
        org,
        Event::OrganisationCreated(event),
    )
}

fn created(m: &blindstrader_tenancy::stream::Msg<Event>) -> &OrganisationCreated {
    match &m.item {
        Event::OrganisationCreated(ev) => ev,
        _ => unreachable!(),
    }
}

/// Onboarding (many new organisations as one unit) takes what is plainly new and leaves every
/// odd case to the ordinary path, which refuses or finishes it: the end state and the outcomes
/// are those of one-at-a-time provisioning.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_new_organisations_is_provisioned_as_one_unit_and_the_odd_ones_one_by_one() {
    use blindstrader_tenancy::store::tenants::Tenants;
    use blindstrader_tenancy::stream::Processor;
    use blindstrader_tenancy::tenant::Slug;
    use OrganisationType::{Brand, Retailer, Supplier};

    let t = TestNs::new();
    let pool = t.pool().await;
    let p = t.processors().await.provisioner;
    let ns = t.ns.as_str();
    let org = |_: usize| new_id();
    let plain: Vec<(String, OrganisationType, String)> = (0..6)
        .map(|i| {
            (
                org(i),
                [Brand, Supplier, Retailer][i % 3],
                format!("plain{i}"),
            )
        })
        .collect();
    let mut msgs: Vec<_> = plain
        .iter()
        .enumerate()
        .map(|(i, (o, k, s))| created_msg(&t, i as i64, o, *k, s))
        .collect();
    // Odd ones, each for the ordinary path:
    // an event already applied (a redelivery),
    let (applied, twin_a, twin_b, invalid, squatted, torn, busy) = (
        new_id(),
        new_id(),
        new_id(),
        new_id(),
        new_id(),
        new_id(),
        new_id(),
    );
    let earlier = created_msg(&t, 100, &applied, Brand, "earlier");
    p.apply(&[(&earlier, &())]).await.expect("provisioned");
    msgs.push(message(
        &t.topic(Topic::Organisations),
        0,
        100,
        &applied,
        earlier.item.clone(),
    ));
    // two organisations naming one database in the same batch,
    msgs.push(created_msg(&t, 101, &twin_a, Supplier, "twin"));
    msgs.push(created_msg(&t, 102, &twin_b, Supplier, "twin"));
    // a slug no database may be named after (a foreign producer's),
    msgs.push(created_msg(
        &t,
        103,
        &invalid,
        Brand,
        "Bad-Slug; DROP DATABASE mysql",
    ));
    // a database that exists but nobody registered,
    let squat = format!("{ns}_retailer_squatted");
    sqlx::query(&format!("CREATE DATABASE `{squat}`"))
        .execute(&pool)
        .await
        .unwrap();
    msgs.push(created_msg(&t, 104, &squatted, Retailer, "squatted"));
    // a tenant a killed worker left claimed with half a database,
    let torn_db =
        t.ns.tenant_database(Brand, &Slug::parse("torn").unwrap())
            .unwrap();
    Tenants::on(Servers::single(pool.clone(), &t.config.database_url), &t.ns)
        .claim(
            &torn,
            Brand,
            "torn",
            "Torn",
            &torn_db,
            chrono::Utc::now(),
            None,
        )
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {}", torn_db.quoted()))
        .execute(&pool)
        .await
        .unwrap();
    msgs.push(created_msg(&t, 105, &torn, Brand, "torn"));
    // and one whose lifecycle lock another worker holds for a moment.
    msgs.push(created_msg(&t, 106, &busy, Retailer, "busy"));
    let mut holder = pool.acquire().await.unwrap();
    let lock = format!("{ns}:l:{}", busy.replace('-', ""));
    sqlx::query("SELECT GET_LOCK(?, 0)")
        .bind(&lock)
        .execute(&mut *holder)
        .await
        .unwrap();

    let evs: Vec<&OrganisationCreated> = msgs.iter().map(created).collect();
    let done = p.onboard(&evs, 4).await;
    let expected: Vec<bool> = (0..msgs.len()).map(|i| i < 6 || i == 7).collect();
    assert_eq!(
        done, expected,
        "the plain ones and the first twin as one unit, the rest left"
    );
    sqlx::query("SELECT RELEASE_LOCK(?)")
        .bind(&lock)
        .execute(&mut *holder)
        .await
        .unwrap();
    // The loop's per-key path for what was left, retrying as it does.
    for (m, done) in msgs.iter().zip(&done) {
        if *done {
            continue;
        }
        apply_retrying(&p, m).await;
    }

    let status: HashMap<String, (String, Option<String>)> = statuses(&pool, &t.ns)
        .await
        .into_iter()
        .map(|(o, s, d)| (o, (s, d)))
        .collect();
    let active = |o: &str, db: String| {
        assert_eq!(status[o], ("active".into(), Some(db)), "{o}");
    };
    for (o, k, s) in &plain {
        active(o, format!("{ns}_{}_{s}", k.db_word()));
    }
    active(&applied, format!("{ns}_brand_earlier"));
    active(&twin_a, format!("{ns}_supplier_twin"));
    active(&torn, format!("{ns}_brand_torn"));
    active(&busy, format!("{ns}_retailer_busy"));
    for refused in [&twin_b, &invalid, &squatted] {
        assert_eq!(
            status[refused.as_str()],
            ("failed".into(), None),
            "{refused}"
        );
    }
    for (_, db) in status.values().filter(|(s, _)| s == "active") {
        let db = db.as_deref().unwrap();
        assert_eq!(applied_migrations(&pool, db).await, shipped(db), "{db}");
    }
    assert!(
        tables(&pool, &squat).await.is_empty(),
        "the squatter's database untouched"
    );

    // One outcome per organisation, the earlier one's not repeated.
    let outcomes = t.read_events(Topic::Tenancy, 13, SETTLE).await;
    let mut per_org: HashMap<String, Vec<EventKind>> = HashMap::new();
    for e in &outcomes {
        let (o, k) = match e {
            Event::TenantProvisioned(p) => (p.organisation_id.clone(), e.kind()),
            Event::TenantProvisioningFailed(f) => (f.organisation_id.clone(), e.kind()),
            other => panic!("unexpected {other:?}"),
        };
        per_org.entry(o).or_default().push(k);
    }
    assert_eq!(per_org.len(), 13, "{per_org:?}");
    for (o, kinds) in &per_org {
        let want = if [&twin_b, &invalid, &squatted].contains(&o) {
            EventKind::TenantProvisioningFailed
        } else {
            EventKind::TenantProvisioned
        };
        assert_eq!(kinds, &vec![want], "{o}");
    }
    assert_eq!(t.message_count(Topic::Tenancy), 13);
    // Every event in the lifecycle log once.
    let logged: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(DISTINCT event_id) FROM `{ns}_platform`.lifecycle_log"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(logged, 13);
}

/// Two workers onboarding the same batch at once (a partition briefly owned by both): each
/// organisation is provisioned once, with one outcome, whoever took which.
#[tokio::test(flavor = "multi_thread")]
async fn two_workers_onboarding_one_batch_provision_each_organisation_once() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let (a, b) = (t.processors().await, t.processors().await);
    let kinds = [
        OrganisationType::Brand,
        OrganisationType::Supplier,
        OrganisationType::Retailer,
    ];
    let msgs: Vec<_> = (0..24)
        .map(|i| created_msg(&t, i, &new_id(), kinds[i as usize % 3], &format!("both{i}")))
        .collect();
    let evs: Vec<&OrganisationCreated> = msgs.iter().map(created).collect();
    let (done_a, done_b) = tokio::join!(
        a.provisioner.onboard(&evs, 4),
        b.provisioner.onboard(&evs, 4)
    );
    for (i, m) in msgs.iter().enumerate() {
        assert!(!(done_a[i] && done_b[i]), "both provisioned {i}");
        if done_a[i] || done_b[i] {
            continue;
        }
        for p in [&a.provisioner, &b.provisioner] {
            apply_retrying(p, m).await;
        }
    }
    assert!(
        done_a.iter().chain(&done_b).filter(|d| **d).count() >= 2,
        "onboarding did some of the work: {done_a:?} {done_b:?}"
    );
    let rows = statuses(&pool, &t.ns).await;
    assert_eq!(rows.len(), 24);
    assert!(rows.iter().all(|(_, s, _)| s == "active"), "{rows:?}");
    let outcomes = t.read_events(Topic::Tenancy, 24, SETTLE).await;
    let orgs: HashSet<String> = outcomes
        .iter()
        .map(|e| match e {
            Event::TenantProvisioned(p) => p.organisation_id.clone(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!((orgs.len(), t.message_count(Topic::Tenancy)), (24, 24));
}

/// The platform migrations that used MariaDB-only syntax were rewritten for MySQL too. A
/// platform database migrated by their first form (its `_sqlx_migrations` holding their old
/// checksums) still starts: its checksums are moved on, nothing is re-run or refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_platform_migrated_by_the_first_forms_of_rewritten_migrations_still_starts() {
    use blindstrader_tenancy::tenancy::migrations::{for_service, REWRITTEN};
    use blindstrader_tenancy::tenancy::provisioning::prepare_service_databases;
    use blindstrader_tenancy::tenant::ServiceDatabase;
    let t = TestNs::new();
    let pool = t.prepared_pool().await;
    let platform = format!("{}_platform", t.ns);
    for (version, old) in REWRITTEN {
        sqlx::query(&format!(
            "UPDATE `{platform}`._sqlx_migrations SET checksum = UNHEX(?) WHERE version = ?"
        ))
        .bind(old)
        .bind(version)
        .execute(&pool)
        .await
        .unwrap();
    }
    prepare_service_databases(&pool, &t.config.database_url, &t.ns)
        .await
        .expect("a platform of the first forms starts");
    let migrator = for_service(ServiceDatabase::Platform);
    for (version, _) in REWRITTEN {
        let now: Vec<u8> = sqlx::query_scalar(&format!(
            "SELECT checksum FROM `{platform}`._sqlx_migrations WHERE version = ?"
        ))
        .bind(version)
        .fetch_one(&pool)
        .await
        .unwrap();
        let shipped = migrator.iter().find(|m| m.version == *version).unwrap();
        assert_eq!(now, shipped.checksum.as_ref(), "migration {version}");
    }
}

/// `tenancy tenants top` ranks tenants by the events applied to their databases and by size.
#[tokio::test(flavor = "multi_thread")]
async fn tenants_top_ranks_the_busiest_first() {
    let t = TestNs::new();
    let pool = t.pool().await;
    let _worker = t.spawn_run("top");
    let (busy, quiet) = (new_id(), new_id());
    t.provisioned(
        &pool,
        &[(&busy, "BRAND", "busy"), (&quiet, "BRAND", "quiet")],
    )
    .await;
    let codes: Vec<String> = (1..=12).map(|r| format!("B{r:02}")).collect();
    let mut updates: Vec<String> = codes
        .iter()
        .enumerate()
        .map(|(i, c)| lines::catalog(&busy, i as i64 + 1, &[c.as_str()], &[]))
        .collect();
    updates.push(lines::catalog(&quiet, 1, &["Q1"], &[]));
    t.emit_ok(&updates);
    wait_for("both brands' updates", SETTLE, || async {
        let busy_rows = fabric_rows(&pool, &format!("{}_brand_busy", t.ns))
            .await
            .len();
        let quiet_rows = fabric_rows(&pool, &format!("{}_brand_quiet", t.ns))
            .await
            .len();
        (busy_rows == 12 && quiet_rows == 1).then_some(())
    })
    .await;
    let (code, out, err) = t.tenancy_output(&["tenants", "top", "--by", "events", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ranked: Vec<(&str, u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["slug"].as_str().unwrap(),
                r["events_last_day"].as_u64().unwrap(),
                r["events_last_week"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ranked, vec![("busy", 12, 12), ("quiet", 1, 1)]);
    assert!(
        rows.iter().all(|r| r["bytes"].as_u64().unwrap() > 0),
        "{out}"
    );
    let (code, out, _) = t.tenancy_output(&["tenants", "top", "--limit", "1"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), 2, "a header and one tenant: {out}");
}
