//! `tenancy bench catalog`: catalog events from Kafka into MySQL, measured against a raw
//! baseline in the same run.
//!
//! Set-up (not timed): a fresh namespace, brands and suppliers provisioned through the library,
//! each supplier granted two brands (one with pricing.read), all events produced up front.
//! Timed: the catalog processor from its first applied batch until every brand has applied its
//! last event (fabrics into brand DBs and every supplier copy). Baseline: the same rows written
//! again by plain multi-row `INSERT … ON DUPLICATE KEY UPDATE` statements, 500 rows each, into
//! the emptied tables. Figures only mean something from a `--release` build.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::access::cache::PermissionCache;
use crate::catalog::spec::CatalogSpec;
use crate::catalog::CatalogProcessor;
use crate::config::Config;
use crate::events::json::record_from_json;
use crate::events::EventKind;
use crate::stream::dead_letters::DeadLetters;
use crate::stream::health::Health;
use crate::stream::Settings;
use crate::tenancy::migrations;
use crate::tenancy::provisioning::prepare_service_databases;
use crate::tenancy::tenants::{Claim, Tenants};
use crate::tenancy::watermark::Watermark;
use crate::tenant::{DatabaseName, Namespace, OrganisationType, Slug};
use crate::topics::{ensure_topics, Topic};
use crate::wire::Codec;

use super::peak_rss_mib;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Fabrics in total, spread evenly over the brands.
    #[arg(long, default_value_t = 200_000)]
    pub fabrics: usize,
    #[arg(long, default_value_t = 50)]
    pub brands: usize,
    #[arg(long, default_value_t = 100)]
    pub suppliers: usize,
    /// Fabrics per BrandCatalogUpdated event.
    #[arg(long, default_value_t = 20)]
    pub per_event: usize,
    /// Most messages per processor batch (as `tenancy run --batch-max`).
    #[arg(long, default_value_t = Settings::default().batch_max)]
    pub batch_max: usize,
    /// Keep the benchmark's databases afterwards.
    #[arg(long)]
    pub keep: bool,
}

const COLOURS: [&str; 4] = ["White", "Ivory", "Sage", "Navy"];

struct Tenant {
    id: String,
    db: DatabaseName,
}

async fn provision(
    pool: &MySqlPool,
    tenants: &Tenants,
    config: &Config,
    kind: OrganisationType,
    index: usize,
) -> anyhow::Result<Tenant> {
    let id = uuid::Uuid::new_v4().to_string();
    let slug = Slug::parse(&format!("{}{index}", kind.db_word()))?;
    let db = config.namespace.tenant_database(kind, &slug)?;
    let claim = tenants
        .claim(
            &id,
            kind,
            slug.as_str(),
            slug.as_str(),
            &db,
            chrono::Utc::now(),
        )
        .await?;
    anyhow::ensure!(claim == Claim::Proceed, "cannot claim {db}: {claim:?}");
    let version = migrations::create_and_migrate(
        pool,
        &config.database_url,
        &db,
        migrations::for_tenant(kind),
    )
    .await?;
    tenants.activate(&id, version).await?;
    Ok(Tenant { id, db })
}

pub async fn run(mut config: Config, args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.brands > 0 && args.per_event > 0,
        "--brands and --per-event must be positive"
    );
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    config.namespace = Namespace::parse(&format!("bench{}", &suffix[..6]))?;
    let ns = config.namespace.clone();
    eprintln!(
        "namespace {ns}: setting up {} brands, {} suppliers",
        args.brands, args.suppliers
    );
    let pool = crate::db::connect_pool(&config).await?;
    ensure_topics(&config).await?;
    prepare_service_databases(&pool, &config.database_url, &ns).await?;
    let tenants = Tenants::new(pool.clone(), &ns);
    let mut brands = Vec::new();
    for i in 0..args.brands {
        brands.push(provision(&pool, &tenants, &config, OrganisationType::Brand, i).await?);
    }
    let mut suppliers = Vec::new();
    for i in 0..args.suppliers {
        suppliers.push(provision(&pool, &tenants, &config, OrganisationType::Supplier, i).await?);
    }
    // Grants written straight into the index and the supplier DBs: the benchmark is about
    // catalog throughput. Supplier s reads brand s with prices and brand s+1 without.
    let platform = ns.service_database(crate::tenant::ServiceDatabase::Platform);
    let mut grants: HashMap<usize, Vec<(usize, bool)>> = HashMap::new();
    for (s, supplier) in suppliers.iter().enumerate() {
        for (b, pricing) in [(s % args.brands, true), ((s + 1) % args.brands, false)] {
            let perms = if pricing {
                json!(["catalog.read", "pricing.read"])
            } else {
                json!(["catalog.read"])
            }
            .to_string();
            sqlx::query(&format!(
                "INSERT IGNORE INTO {}.brand_access (brand_id, supplier_id, permissions) VALUES (?, ?, ?)",
                platform.quoted()
            ))
            .bind(&brands[b].id)
            .bind(&supplier.id)
            .bind(&perms)
            .execute(&pool)
            .await?;
            sqlx::query(&format!(
                "INSERT IGNORE INTO {}.brand_access (brand_id, permissions, granted_at) VALUES (?, ?, UTC_TIMESTAMP(3))",
                supplier.db.quoted()
            ))
            .bind(&brands[b].id)
            .bind(&perms)
            .execute(&pool)
            .await?;
            grants.entry(b).or_default().push((s, pricing));
        }
    }

    // Events, encoded and produced before the clock starts.
    let per_brand = args.fabrics / args.brands;
    let codec = Arc::new(Codec::new(&config.schema_registry_url));
    let topic = Topic::BrandCatalog.name(&ns);
    let producer: FutureProducer = crate::kafka::producer(&config)?;
    let mut events = 0usize;
    let mut deliveries = Vec::new();
    for (b, brand) in brands.iter().enumerate() {
        for (n, chunk) in (0..per_brand)
            .collect::<Vec<_>>()
            .chunks(args.per_event)
            .enumerate()
        {
            let fabrics: Vec<serde_json::Value> = chunk
                .iter()
                .map(|i| {
                    let colour = COLOURS[i % 4];
                    json!({"code": format!("F{i:06}"), "name": format!("Fabric {i}"), "collection": format!("C{}", i % 40),
                        "colour": colour, "material": "Polyester",
                        "width_mm": 2000 + (i % 5) as i64 * 250, "price_minor": 1000 + (i % 997) as i64, "currency": "GBP"})
                })
                .collect();
            let line = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": 0,
                "brand_id": brand.id, "brand_slug": format!("brand{b}"), "revision": n as i64,
                "fabrics_upserted": fabrics, "fabrics_removed": []});
            let value = record_from_json(EventKind::BrandCatalogUpdated.schema(), &line, &[])
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let payload = codec
                .encode(&topic, EventKind::BrandCatalogUpdated, value)
                .await
                .map_err(|e| anyhow::anyhow!("encode: {e}"))?;
            loop {
                match producer
                    .send_result(FutureRecord::to(&topic).key(&brand.id).payload(&payload))
                {
                    Ok(d) => {
                        deliveries.push((b, d));
                        break;
                    }
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        _,
                    )) => {
                        producer.poll(Duration::from_millis(50));
                    }
                    Err((e, _)) => anyhow::bail!("produce: {e}"),
                }
            }
            events += 1;
        }
    }
    // Last offset per partition, to know when the processor is done.
    let mut last: HashMap<i32, i64> = HashMap::new();
    let mut placed: Vec<(usize, i32, i64)> = Vec::with_capacity(deliveries.len());
    for (b, d) in deliveries {
        let d = d
            .await?
            .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
        let e = last.entry(d.partition).or_insert(-1);
        *e = (*e).max(d.offset);
        placed.push((b, d.partition, d.offset));
    }
    producer.flush(Duration::from_secs(30))?;
    let copies: usize = grants.values().map(Vec::len).sum::<usize>() * per_brand;
    let rows_total = per_brand * args.brands + copies;
    eprintln!(
        "produced {events} events ({} fabrics); timing the catalog processor",
        per_brand * args.brands
    );
    let rss_before = peak_rss_mib();

    // The processor, in-process, until every brand has applied its last event.
    // Passes alternate without and with the event-id records, each from empty projections and a
    // fresh consumer group, so the cost of the records is measured against the same events.
    let brand_dbs: Vec<DatabaseName> = brands.iter().map(|b| b.db.clone()).collect();
    let supplier_dbs: Vec<DatabaseName> = suppliers.iter().map(|s| s.db.clone()).collect();
    let mut with_ids: Vec<(Duration, i64)> = Vec::new();
    let mut without_ids: Vec<(Duration, i64)> = Vec::new();
    for (pass, dedupe) in [false, true, false, true].into_iter().enumerate() {
        reset_projections(&pool, &brand_dbs, &supplier_dbs).await?;
        let measured = processor_pass(
            &config,
            &pool,
            &tenants,
            &codec,
            &topic,
            args.batch_max,
            dedupe,
            &format!("{ns}.catalog-{pass}"),
            &brand_dbs,
            &placed,
            &last,
            events,
        )
        .await?;
        eprintln!(
            "pass {}: {} id records: {} events in {:.2} s",
            pass + 1,
            if dedupe { "with" } else { "without" },
            measured.1,
            measured.0.as_secs_f64()
        );
        if dedupe {
            with_ids.push(measured);
        } else {
            without_ids.push(measured);
        }
    }
    let rate = |passes: &[(Duration, i64)]| -> f64 {
        let (time, n) = passes
            .iter()
            .fold((0.0, 0), |(t, n), (d, e)| (t + d.as_secs_f64(), n + e));
        n as f64 / time
    };
    let projector_eps = rate(&with_ids);
    let no_ids_eps = rate(&without_ids);
    let (elapsed, measured_events) = with_ids
        .iter()
        .fold((Duration::ZERO, 0), |(t, n), (d, e)| (t + *d, n + e));
    let rss_peak = peak_rss_mib();
    let written_share = measured_events as f64 / (events * with_ids.len()) as f64;

    // Raw baseline: the same rows, emptied tables, plain multi-row upserts.
    for b in &brands {
        sqlx::query(&format!("TRUNCATE TABLE {}.fabrics", b.db.quoted()))
            .execute(&pool)
            .await?;
    }
    for s in &suppliers {
        sqlx::query(&format!("TRUNCATE TABLE {}.brand_fabrics", s.db.quoted()))
            .execute(&pool)
            .await?;
    }
    let started = Instant::now();
    for (b, brand) in brands.iter().enumerate() {
        let rows: Vec<usize> = (0..per_brand).collect();
        for chunk in rows.chunks(500) {
            raw_upsert(&pool, &brand.db, "fabrics", None, chunk, true).await?;
        }
        for (s, pricing) in grants.get(&b).into_iter().flatten() {
            for chunk in rows.chunks(500) {
                raw_upsert(
                    &pool,
                    &suppliers[*s].db,
                    "brand_fabrics",
                    Some(&brand.id),
                    chunk,
                    *pricing,
                )
                .await?;
            }
        }
    }
    let raw_elapsed = started.elapsed();
    let raw_eps = events as f64 / raw_elapsed.as_secs_f64();

    println!(
        "catalog benchmark: {} fabrics in {events} events ({} per event), {} brands, {} suppliers, {} grants; {rows_total} rows (brand + supplier copies)",
        per_brand * args.brands,
        args.per_event,
        args.brands,
        args.suppliers,
        grants.values().map(Vec::len).sum::<usize>()
    );
    println!(
        "projector:    {measured_events} events over {} passes ({:.0}% of the stream, after each first batch) in {:.2} s = {projector_eps:.0} events/s, {:.0} rows/s",
        with_ids.len(),
        written_share * 100.0,
        elapsed.as_secs_f64(),
        projector_eps * rows_total as f64 / events as f64
    );
    println!(
        "without event-id records: {no_ids_eps:.0} events/s, {:.0} rows/s (2 passes); with them: {projector_eps:.0} events/s, {:.0} rows/s (2 passes)",
        no_ids_eps * rows_total as f64 / events as f64,
        projector_eps * rows_total as f64 / events as f64,
    );
    println!(
        "cost of the event-id records: {:.1}% slower",
        (1.0 - projector_eps / no_ids_eps) * 100.0
    );
    println!(
        "raw baseline: {rows_total} rows in {:.2} s = {raw_eps:.0} events/s equivalent, {:.0} rows/s",
        raw_elapsed.as_secs_f64(),
        rows_total as f64 / raw_elapsed.as_secs_f64()
    );
    println!(
        "ratio projector / raw baseline: {:.2} (target >= 0.5)",
        projector_eps / raw_eps
    );
    println!("peak RSS: {rss_peak:.0} MiB (before the processor started: {rss_before:.0} MiB)");

    if !args.keep {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT CAST(SCHEMA_NAME AS CHAR) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE ?",
        )
        .bind(ns.database_like_pattern())
        .fetch_all(&pool)
        .await?;
        for name in names {
            // Names come from the server and match our validated namespace pattern.
            sqlx::query(&format!("DROP DATABASE `{name}`"))
                .execute(&pool)
                .await?;
        }
    }
    Ok(())
}

/// Empties what the catalog projection wrote, so the next pass starts from nothing.
async fn reset_projections(
    pool: &MySqlPool,
    brands: &[DatabaseName],
    suppliers: &[DatabaseName],
) -> anyhow::Result<()> {
    for db in brands {
        for table in [
            "fabrics",
            "removed_fabrics",
            "applied_events",
            "projection_offsets",
        ] {
            sqlx::query(&format!("TRUNCATE TABLE {}.`{table}`", db.quoted()))
                .execute(pool)
                .await?;
        }
    }
    for db in suppliers {
        sqlx::query(&format!("TRUNCATE TABLE {}.brand_fabrics", db.quoted()))
            .execute(pool)
            .await?;
        sqlx::query(&format!(
            "DELETE FROM {}.projection_offsets WHERE projection LIKE 'copy:%'",
            db.quoted()
        ))
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// One run of the catalog processor over every produced event, in its own consumer group:
/// the time from its first applied batch to the last event, and the events in that time.
#[allow(clippy::too_many_arguments)]
async fn processor_pass(
    config: &Config,
    pool: &MySqlPool,
    tenants: &Tenants,
    codec: &Codec,
    topic: &str,
    batch_max: usize,
    dedupe: bool,
    group: &str,
    brand_dbs: &[DatabaseName],
    placed: &[(usize, i32, i64)],
    last: &HashMap<i32, i64>,
    events: usize,
) -> anyhow::Result<(Duration, i64)> {
    let ns = &config.namespace;
    let shutdown = CancellationToken::new();
    let processor = CatalogProcessor {
        ns: ns.clone(),
        pool: pool.clone(),
        spec: CatalogSpec::load()?,
        tenants: tenants.clone(),
        cache: PermissionCache::connect(&config.redis_url, ns).await?,
        // The benchmark's tenants are created directly, and its lifecycle log is empty.
        watermark: Watermark::new(config, pool.clone())?,
        dedupe,
    };
    let settings = Settings {
        batch_max,
        // Each pass's consumer is dropped, not kept alive (one group member at a time: leaving
        // is safe here), so its prefetch buffers do not add up in the RSS figure.
        leave_group_on_exit: true,
        ..Settings::default()
    };
    let consumer = crate::stream::consumer::join(
        config,
        "catalog",
        group,
        &[topic.to_owned()],
        &crate::stream::consumer::Membership {
            session_timeout: Duration::from_secs(10),
            assignor: crate::stream::consumer::Assignor::CooperativeSticky,
        },
    )?;
    let health = Health::default().processor("catalog", group);
    let dead_letters =
        DeadLetters::new(crate::kafka::producer(config)?, Topic::DeadLetter.name(ns));
    let monitor = async {
        let mut first: Option<(Instant, i64)> = None;
        loop {
            let applied = applied_events(pool, brand_dbs, placed).await?;
            if first.is_none() && applied > 0 {
                first = Some((Instant::now(), applied));
            }
            if done(pool, brand_dbs, last).await? {
                shutdown.cancel();
                let (t0, at_t0) = first.unwrap_or((Instant::now(), 0));
                return anyhow::Ok((t0.elapsed(), events as i64 - at_t0));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (run, measured) = tokio::join!(
        crate::stream::run(
            &processor,
            consumer,
            codec,
            &dead_letters,
            health,
            &settings,
            shutdown.clone()
        ),
        monitor
    );
    run?;
    measured
}

/// Events applied so far: those at or below their brand's stored offset on their partition.
async fn applied_events(
    pool: &MySqlPool,
    brands: &[DatabaseName],
    placed: &[(usize, i32, i64)],
) -> anyhow::Result<i64> {
    let mut stored: HashMap<(usize, i32), i64> = HashMap::new();
    for (b, db) in brands.iter().enumerate() {
        let rows: Vec<(i32, i64)> = sqlx::query_as(&format!(
            "SELECT `partition`, `offset` FROM {}.projection_offsets WHERE projection = 'catalog'",
            db.quoted()
        ))
        .fetch_all(pool)
        .await?;
        stored.extend(rows.into_iter().map(|(p, o)| ((b, p), o)));
    }
    Ok(placed
        .iter()
        .filter(|(b, p, o)| stored.get(&(*b, *p)).is_some_and(|s| s >= o))
        .count() as i64)
}

async fn done(
    pool: &MySqlPool,
    brands: &[DatabaseName],
    last: &HashMap<i32, i64>,
) -> anyhow::Result<bool> {
    // Every partition's last offset must be applied by the brand that owns it: the highest
    // catalog offset stored across brands per partition reaches the produced end.
    let mut reached: HashMap<i32, i64> = HashMap::new();
    for db in brands {
        let rows: Vec<(i32, i64)> = sqlx::query_as(&format!(
            "SELECT `partition`, `offset` FROM {}.projection_offsets WHERE projection = 'catalog'",
            db.quoted()
        ))
        .fetch_all(pool)
        .await?;
        for (p, o) in rows {
            let e = reached.entry(p).or_insert(-1);
            *e = (*e).max(o);
        }
    }
    Ok(last
        .iter()
        .all(|(p, o)| reached.get(p).is_some_and(|r| r >= o)))
}

async fn raw_upsert(
    pool: &MySqlPool,
    db: &DatabaseName,
    table: &str,
    brand: Option<&str>,
    indexes: &[usize],
    pricing: bool,
) -> anyhow::Result<()> {
    let mut columns = vec![
        "code",
        "name",
        "collection",
        "colour",
        "material",
        "width_mm",
        "price_minor",
        "currency",
        "discontinued",
    ];
    if brand.is_some() {
        columns.insert(0, "brand_id");
    } else {
        columns.push("revision");
    }
    let row = format!("({})", vec!["?"; columns.len()].join(","));
    let updates: Vec<String> = columns
        .iter()
        .filter(|c| **c != "code" && **c != "brand_id")
        .map(|c| format!("{c} = VALUES({c})"))
        .collect();
    let sql = format!(
        "INSERT INTO {}.{table} ({}) VALUES {} ON DUPLICATE KEY UPDATE {}",
        db.quoted(),
        columns.join(","),
        vec![row; indexes.len()].join(","),
        updates.join(",")
    );
    let mut q = sqlx::query(&sql);
    for i in indexes {
        if let Some(b) = brand {
            q = q.bind(b);
        }
        q = q
            .bind(format!("F{i:06}"))
            .bind(format!("Fabric {i}"))
            .bind(format!("C{}", i % 40))
            .bind(COLOURS[i % 4])
            .bind("Polyester")
            .bind(2000 + (i % 5) as i64 * 250)
            .bind(pricing.then_some(1000 + (i % 997) as i64))
            .bind(pricing.then_some("GBP"))
            .bind(false);
        if brand.is_none() {
            q = q.bind(0i64);
        }
    }
    q.execute(pool).await?;
    Ok(())
}
