//! `tenancy bench catalog`: catalog events from Kafka into brand databases and supplier copies,
//! measured against a raw baseline doing the same writes in the same run.
//!
//! Set-up (not timed): a fresh namespace, brands and suppliers provisioned through the library,
//! grants written directly, every event produced up front. Timed: the catalog processor, in
//! process, from its first applied batch until every brand has applied its last event; four
//! passes, alternately without and with the event-id records. Baseline: the same events' net
//! changes, batch by batch as the processor takes them, written by plain multi-row upserts, one
//! transaction per database per batch, `--write-concurrency` databases at once — the best plain
//! client path for the same work, with no Kafka, decoding, gating, locks or bookkeeping. The
//! line before its row is `ratio projector/raw: X.XX`. Figures only mean something from a `--release`
//! build.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::cache::permissions::PermissionCache;
use crate::catalog::spec::CatalogSpec;
use crate::catalog::CatalogProcessor;
use crate::config::Config;
use crate::log::dead_letters::DeadLetters;
use crate::log::events::json::record_from_json;
use crate::log::events::EventKind;
use crate::log::topics::{ensure_topics, Topic};
use crate::log::wire::Codec;
use crate::store::tenants::{Claim, Tenants};
use crate::stream::health::Health;
use crate::stream::Settings;
use crate::tenancy::migrations;
use crate::tenancy::provisioning::prepare_service_databases;
use crate::tenancy::watermark::Watermark;
use crate::tenant::{DatabaseName, Namespace, OrganisationType, Slug};

use super::peak_rss_mib;

/// A workload shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// 50 brands of 4,000 fabrics, 100 suppliers each reading 2 brands; 10,000 events of 20
    /// new fabrics each.
    Narrow,
    /// The fan-out this system is for: 20 brands of 50 fabrics, 400 suppliers each reading 10
    /// brands (4,000 grants, 200 copies of each brand); 10,000 events each re-publishing a
    /// brand's 50 fabrics.
    Wide,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "narrow")]
    pub scenario: Scenario,
    /// BrandCatalogUpdated events in all.
    #[arg(long, default_value_t = 10_000)]
    pub events: usize,
    /// Most messages per processor batch (as `tenancy run --batch-max`).
    #[arg(long, default_value_t = Settings::default().batch_max)]
    pub batch_max: usize,
    /// Tenant databases written at once, by the processor and by the raw baseline alike.
    #[arg(long, default_value_t = Settings::default().write_concurrency)]
    pub write_concurrency: usize,
    /// Keep the benchmark's databases afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// What a scenario sets up.
#[derive(Debug, Clone, Copy)]
struct Shape {
    brands: usize,
    suppliers: usize,
    grants_per_supplier: usize,
    per_event: usize,
    /// Distinct fabric codes per brand; events cycle through them.
    catalog: usize,
}

impl Scenario {
    fn shape(self) -> Shape {
        match self {
            Scenario::Narrow => Shape {
                brands: 50,
                suppliers: 100,
                grants_per_supplier: 2,
                per_event: 20,
                catalog: 4000,
            },
            Scenario::Wide => Shape {
                brands: 20,
                suppliers: 400,
                grants_per_supplier: 10,
                per_event: 50,
                catalog: 50,
            },
        }
    }
}

/// Event `k` of the stream: brand `k % brands` (interleaved, as live traffic is), its
/// `k / brands`-th event, upserting the next `per_event` codes of its catalog.
fn event_of(shape: &Shape, k: usize) -> (usize, i64, Vec<usize>) {
    let brand = k % shape.brands;
    let n = k / shape.brands;
    let codes = (0..shape.per_event)
        .map(|j| (n * shape.per_event + j) % shape.catalog)
        .collect();
    (brand, n as i64, codes)
}

/// Column values of fabric `i` at `revision` (prices move with the revision, so an upsert
/// really changes the row).
pub(super) fn fabric_json(i: usize, revision: i64) -> serde_json::Value {
    json!({"code": format!("F{i:06}"), "name": format!("Fabric {i}"), "collection": format!("C{}", i % 40),
        "colour": COLOURS[i % 4], "material": "Polyester",
        "width_mm": 2000 + (i % 5) as i64 * 250, "price_minor": price(i, revision), "currency": "GBP"})
}

fn price(i: usize, revision: i64) -> i64 {
    1000 + ((i as i64 * 7 + revision) % 997)
}

const COLOURS: [&str; 4] = ["White", "Ivory", "Sage", "Navy"];

pub(super) struct Tenant {
    pub(super) id: String,
    pub(super) db: DatabaseName,
}

pub(super) async fn provision(
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
            None,
        )
        .await?;
    anyhow::ensure!(
        matches!(claim, Claim::Proceed(_)),
        "cannot claim {db}: {claim:?}"
    );
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
    let shape = args.scenario.shape();
    anyhow::ensure!(args.events > 0, "--events must be positive");
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    config.namespace = Namespace::parse(&format!("bench{}", &suffix[..6]))?;
    let ns = config.namespace.clone();
    let concurrency = args.write_concurrency.max(1);
    eprintln!(
        "namespace {ns}: setting up {} brands, {} suppliers, {} grants",
        shape.brands,
        shape.suppliers,
        shape.suppliers * shape.grants_per_supplier
    );
    let pool =
        crate::store::pools::connect_pool_sized(&config, (2 * concurrency + 4) as u32).await?;
    ensure_topics(&config).await?;
    prepare_service_databases(&pool, &config.database_url, &ns).await?;
    let tenants = Tenants::on(
        crate::store::servers::Servers::single(pool.clone(), &config.database_url),
        &ns,
    );
    let mut brands = Vec::new();
    for i in 0..shape.brands {
        brands.push(provision(&pool, &tenants, &config, OrganisationType::Brand, i).await?);
    }
    let mut suppliers = Vec::new();
    for i in 0..shape.suppliers {
        suppliers.push(provision(&pool, &tenants, &config, OrganisationType::Supplier, i).await?);
    }
    // Grants written straight into the index and the supplier DBs: the benchmark is about
    // catalog throughput. Supplier s reads brands s, s+1, … with prices on the first only.
    let platform = ns.service_database(crate::tenant::ServiceDatabase::Platform);
    let mut grants: Vec<Vec<(usize, bool)>> = vec![Vec::new(); shape.suppliers];
    for (s, supplier) in suppliers.iter().enumerate() {
        for g in 0..shape.grants_per_supplier {
            let (b, pricing) = ((s + g) % shape.brands, g == 0);
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
            grants[s].push((b, pricing));
        }
    }

    // Events, encoded and produced before the clock starts.
    let codec = Arc::new(Codec::new(&config.schema_registry_url));
    let topic = Topic::BrandCatalog.name(&ns);
    let producer: FutureProducer = crate::log::kafka::producer(&config)?;
    let events = args.events;
    let mut deliveries = Vec::with_capacity(events);
    for k in 0..events {
        let (b, revision, codes) = event_of(&shape, k);
        let fabrics: Vec<serde_json::Value> =
            codes.iter().map(|i| fabric_json(*i, revision)).collect();
        let line = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": 0,
            "brand_id": brands[b].id, "brand_slug": format!("brand{b}"), "revision": revision,
            "fabrics_upserted": fabrics, "fabrics_removed": []});
        let value = record_from_json(EventKind::BrandCatalogUpdated.schema(), &line, &[])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let payload = codec
            .encode(&topic, EventKind::BrandCatalogUpdated, value)
            .await
            .map_err(|e| anyhow::anyhow!("encode: {e}"))?;
        loop {
            match producer.send_result(
                FutureRecord::to(&topic)
                    .key(&brands[b].id)
                    .payload(&payload),
            ) {
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
    let final_rows = shape.brands * shape.catalog.min(events / shape.brands * shape.per_event)
        + grants.iter().map(Vec::len).sum::<usize>()
            * shape.catalog.min(events / shape.brands * shape.per_event);
    eprintln!("produced {events} events; timing the catalog processor");
    let rss_before = peak_rss_mib();

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
            &args,
            dedupe,
            &format!("{ns}.catalog-{pass}"),
            &brand_dbs,
            &placed,
            &last,
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
    let rss_peak = peak_rss_mib();

    // The raw baseline: the same events' net changes, batch by batch as the processor takes
    // them, written by plain multi-row upserts, one transaction per database per batch, with the
    // same number of connections at once.
    reset_projections(&pool, &brand_dbs, &supplier_dbs).await?;
    let started = Instant::now();
    let written = raw_baseline(
        &pool,
        &shape,
        &args,
        &brand_dbs,
        &supplier_dbs,
        &brands,
        &grants,
    )
    .await?;
    let raw_elapsed = started.elapsed();
    let raw_eps = events as f64 / raw_elapsed.as_secs_f64();
    let per_event_rows = written as f64 / events as f64;

    println!(
        "catalog benchmark, {:?} scenario: {} brands, {} suppliers, {} grants, {events} events of {} fabrics; {final_rows} final rows; {written} row writes in the raw baseline's batches of {}",
        args.scenario,
        shape.brands,
        shape.suppliers,
        grants.iter().map(Vec::len).sum::<usize>(),
        shape.per_event,
        args.batch_max,
    );
    println!(
        "raw baseline (net change per database per batch, one transaction each, {concurrency} at once): {:.2} s = {raw_eps:.0} events/s, {:.0} rows/s",
        raw_elapsed.as_secs_f64(),
        raw_eps * per_event_rows
    );
    println!(
        "projector without event-id records: {no_ids_eps:.0} events/s, {:.0} rows/s; with them: {projector_eps:.0} events/s, {:.0} rows/s (2 passes each, after each first batch)",
        no_ids_eps * per_event_rows,
        projector_eps * per_event_rows,
    );
    println!(
        "cost of the event-id records: {:.1}% slower",
        (1.0 - projector_eps / no_ids_eps) * 100.0
    );
    println!("peak RSS: {rss_peak:.0} MiB (before the processor started: {rss_before:.0} MiB)");
    println!("ratio projector/raw: {:.2}", projector_eps / raw_eps);
    let ratio = projector_eps / raw_eps;
    super::Row {
        benchmark: format!(
            "tenancy bench catalog --scenario {}",
            format!("{:?}", args.scenario).to_lowercase()
        ),
        figure: format!("{:.0} rows/s", projector_eps * per_event_rows),
        baseline: format!("{:.0} rows/s", raw_eps * per_event_rows),
        ratio: Some(ratio),
        goal: "≥ 0.8".into(),
        met: ratio >= 0.8,
        peak_rss_mib: Some(rss_peak),
    }
    .print();

    if !args.keep {
        super::drop_namespace(&config, &pool).await?;
    }
    Ok(())
}

/// Writes, batch by batch, what the processor writes: each brand's net change into its
/// database and into every copy of it, one transaction per database per batch, `concurrency`
/// databases at once. Returns the rows written.
async fn raw_baseline(
    pool: &MySqlPool,
    shape: &Shape,
    args: &BenchArgs,
    brand_dbs: &[DatabaseName],
    supplier_dbs: &[DatabaseName],
    brands: &[Tenant],
    grants: &[Vec<(usize, bool)>],
) -> anyhow::Result<u64> {
    use futures::stream::{self, TryStreamExt};
    let mut written = 0u64;
    let mut k = 0;
    while k < args.events {
        let end = (k + args.batch_max).min(args.events);
        // Net change per brand: the latest revision per code.
        let mut net: Vec<std::collections::BTreeMap<usize, i64>> =
            vec![Default::default(); shape.brands];
        for e in k..end {
            let (b, revision, codes) = event_of(shape, e);
            for c in codes {
                net[b].insert(c, revision);
            }
        }
        k = end;
        let mut jobs: Vec<(&DatabaseName, Vec<RawRow>)> = Vec::new();
        for (b, changes) in net.iter().enumerate() {
            if !changes.is_empty() {
                let rows = changes
                    .iter()
                    .map(|(c, r)| RawRow {
                        brand: None,
                        code: *c,
                        revision: *r,
                        pricing: true,
                    })
                    .collect();
                jobs.push((&brand_dbs[b], rows));
            }
        }
        for (s, held) in grants.iter().enumerate() {
            let rows: Vec<RawRow> = held
                .iter()
                .flat_map(|(b, pricing)| {
                    net[*b].iter().map(move |(c, r)| RawRow {
                        brand: Some(brands[*b].id.clone()),
                        code: *c,
                        revision: *r,
                        pricing: *pricing,
                    })
                })
                .collect();
            if !rows.is_empty() {
                jobs.push((&supplier_dbs[s], rows));
            }
        }
        written += jobs.iter().map(|(_, rows)| rows.len() as u64).sum::<u64>();
        stream::iter(jobs.into_iter().map(Ok::<_, anyhow::Error>))
            .try_for_each_concurrent(args.write_concurrency.max(1), |(db, rows)| async move {
                let mut tx = pool.begin().await?;
                for chunk in rows.chunks(500) {
                    raw_upsert(&mut tx, db, chunk).await?;
                }
                tx.commit().await?;
                Ok(())
            })
            .await?;
    }
    Ok(written)
}

/// One row the raw baseline writes: a brand's fabric (`brand` None) or a supplier's copy of it.
pub(super) struct RawRow {
    pub(super) brand: Option<String>,
    pub(super) code: usize,
    pub(super) revision: i64,
    pub(super) pricing: bool,
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
    args: &BenchArgs,
    dedupe: bool,
    group: &str,
    brand_dbs: &[DatabaseName],
    placed: &[(usize, i32, i64)],
    last: &HashMap<i32, i64>,
) -> anyhow::Result<(Duration, i64)> {
    let events = args.events;
    let ns = &config.namespace;
    let shutdown = CancellationToken::new();
    let redis = crate::cache::Redis::connect(&config.redis_url, ns).await?;
    let processor = CatalogProcessor {
        ns: ns.clone(),
        spec: CatalogSpec::load()?,
        tenants: tenants.clone(),
        cache: PermissionCache::on(&redis),
        redis,
        // The benchmark's tenants are created directly, and its lifecycle log is empty.
        watermark: Watermark::new(config, pool.clone())?,
        dedupe,
    };
    let settings = Settings {
        batch_max: args.batch_max,
        write_concurrency: args.write_concurrency.max(1),
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
    let dead_letters = DeadLetters::new(
        crate::log::kafka::producer(config)?,
        Topic::DeadLetter.name(ns),
    );
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

pub(super) async fn done(
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

pub(super) async fn raw_upsert(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    db: &DatabaseName,
    rows: &[RawRow],
) -> anyhow::Result<()> {
    let copy = rows[0].brand.is_some();
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
    if copy {
        columns.insert(0, "brand_id");
    } else {
        columns.push("revision");
    }
    let table = if copy { "brand_fabrics" } else { "fabrics" };
    let row = format!("({})", crate::store::schema::placeholders(columns.len()));
    let updates: Vec<String> = columns
        .iter()
        .filter(|c| **c != "code" && **c != "brand_id")
        .map(|c| format!("{c} = VALUES({c})"))
        .collect();
    let sql = format!(
        "INSERT INTO {}.{table} ({}) VALUES {} ON DUPLICATE KEY UPDATE {}",
        db.quoted(),
        columns.join(","),
        vec![row; rows.len()].join(","),
        updates.join(",")
    );
    let mut q = sqlx::query(&sql);
    for r in rows {
        let i = r.code;
        if let Some(b) = &r.brand {
            q = q.bind(b.clone());
        }
        q = q
            .bind(format!("F{i:06}"))
            .bind(format!("Fabric {i}"))
            .bind(format!("C{}", i % 40))
            .bind(COLOURS[i % 4])
            .bind("Polyester")
            .bind(2000 + (i % 5) as i64 * 250)
            .bind(r.pricing.then_some(price(i, r.revision)))
            .bind(r.pricing.then_some("GBP"))
            .bind(false);
        if !copy {
            q = q.bind(r.revision);
        }
    }
    q.execute(&mut **tx).await?;
    Ok(())
}
