//! `tenancy bench rebuild`: one brand with many catalog events, applied live, then rebuilt
//! online by `tenancy rebuild` (a child process, so its memory is its own), next to a raw
//! baseline in the same run, once before the rebuild and once after: the same final rows
//! (fabrics, and the event ids the projection keeps), batch by batch as the replay folds them,
//! written by plain multi-row inserts into an empty brand database, one transaction per batch.
//!
//! Then one supplier reading `--supplier-brands` brands of `--supplier-catalog` fabrics each
//! (grants applied live through the topic, copies backfilled), rebuilt online the same way,
//! next to plain inserts of its final rows (grants and copies) into an empty supplier database.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use rdkafka::producer::FutureRecord;
use serde_json::json;

use super::catalog::{fabric_json, provision, raw_upsert, RawRow, Tenant};
use crate::config::Config;
use crate::log::events::json::record_from_json;
use crate::log::events::EventKind;
use crate::log::topics::Topic;
use crate::log::wire::Codec;
use crate::store::tenants::Tenants;
use crate::tenant::OrganisationType;

#[derive(Debug, Clone, clap::Args)]
pub struct RebuildBenchArgs {
    /// BrandCatalogUpdated events of the one brand.
    #[arg(long, default_value_t = 500_000)]
    pub events: usize,
    /// Fabrics per event.
    #[arg(long, default_value_t = 5)]
    pub per_event: usize,
    /// Distinct fabric codes (the brand's catalog size); events cycle through them.
    #[arg(long, default_value_t = 20_000)]
    pub catalog: usize,
    /// Brands the benchmark's supplier reads (0: no supplier part).
    #[arg(long, default_value_t = 20)]
    pub supplier_brands: usize,
    /// Fabrics in each of those brands; several, comma separated, run the supplier part once
    /// for each. A small catalog shows the fixed costs of a rebuild (process start,
    /// connections, the shadow's tables, the comparison); a brand-sized one its throughput.
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 20_000])]
    pub supplier_catalog: Vec<usize>,
    /// Keep the benchmark's databases afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// The replay folds this many events per transaction (as `rebuild::replay`).
const BATCH: usize = 1000;
/// Rows per statement in the raw baseline (as the projector's store).
const ROWS_PER_STATEMENT: usize = 500;

/// The fabric codes (indexes) revision `n` upserts: `per_event` of them, cycling over
/// `catalog`.
fn codes(n: usize, per_event: usize, catalog: usize) -> impl Iterator<Item = usize> {
    (0..per_event).map(move |j| (n * per_event + j) % catalog)
}

fn codes_of(args: &RebuildBenchArgs, n: usize) -> impl Iterator<Item = usize> + '_ {
    codes(n, args.per_event, args.catalog)
}

pub async fn run(config: Config, args: RebuildBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.events > 0 && args.per_event > 0 && args.catalog > 0,
        "--events, --per-event and --catalog must be positive"
    );
    let super::Fresh {
        config,
        pool,
        tenants,
    } = super::fresh_namespace(&config, 8).await?;
    let ns = config.namespace.clone();
    let brand = provision(&pool, &tenants, &config, OrganisationType::Brand, 0).await?;

    eprintln!("namespace {ns}");
    let codec = Codec::new(&config.schema_registry_url);
    let topic = Topic::BrandCatalog.name(&ns);
    let (ids, live) = produce_and_apply(
        &config,
        &pool,
        &codec,
        &brand,
        0..args.events,
        args.per_event,
        args.catalog,
    )
    .await?;

    // The raw baseline runs once before the rebuild and once after, and the ratio is against
    // their mean: on this VM the same baseline differs by up to 45% within one run (before
    // and after: 38.5/28.9, 42.9/30.1 with two minutes of rest before each phase, 56.3/31.8,
    // 42.7/38.2 s), so one side only would lend the drift to the ratio.
    super::settle().await;
    eprintln!("raw baseline, first of two (before the rebuild)");
    let raw = Baseline {
        pool: &pool,
        tenants: &tenants,
        config: &config,
        args: &args,
        ids: &ids,
        topic: &topic,
    };
    let (before, rows_written) = raw.run(1).await?;
    super::settle().await;
    eprintln!("rebuilding the brand online (tenancy rebuild)");
    let (rebuilt, pause_ms, rebuild_rss) = timed_rebuild(&config, &brand.id).await?;
    super::settle().await;
    eprintln!("raw baseline, second of two (after the rebuild)");
    let (after, _) = raw.run(2).await?;
    let raw_elapsed = (before + after) / 2;

    let rebuild_rows = rows_written as f64 / rebuilt.as_secs_f64();
    let raw_rows = rows_written as f64 / raw_elapsed.as_secs_f64();
    println!(
        "rebuild benchmark: one brand, {} events of {} fabrics over {} codes ({rows_written} row writes in batches of {BATCH} events); applied live in {:.1} s",
        args.events,
        args.per_event,
        args.catalog,
        live.as_secs_f64()
    );
    println!(
        "tenancy rebuild (replay, compare, swap, as a child process): {:.1} s = {:.0} events/s, {rebuild_rows:.0} rows/s; swap pause {pause_ms:.0} ms; peak RSS {rebuild_rss:.0} MiB",
        rebuilt.as_secs_f64(),
        args.events as f64 / rebuilt.as_secs_f64()
    );
    println!(
        "raw baseline (the same net rows and event ids, multi-row inserts, one transaction per batch): {:.1} s before the rebuild, {:.1} s after; their mean {:.1} s = {raw_rows:.0} rows/s",
        before.as_secs_f64(),
        after.as_secs_f64(),
        raw_elapsed.as_secs_f64()
    );
    if args.supplier_brands > 0 {
        for (run, &k) in args.supplier_catalog.iter().enumerate() {
            supplier_part(&config, &args, k, run, &pool, &tenants, &codec).await?;
        }
    }
    let ratio = rebuild_rows / raw_rows;
    println!("ratio rebuild/raw: {ratio:.2}");
    super::Row {
        benchmark: format!("tenancy bench rebuild (one brand, {} events)", args.events),
        figure: format!("{rebuild_rows:.0} rows/s"),
        baseline: format!("{raw_rows:.0} rows/s"),
        ratio: Some(ratio),
        goal: "≥ 0.7".into(),
        met: ratio >= 0.7,
        peak_rss_mib: Some(rebuild_rss),
    }
    .print();
    if !args.keep {
        super::drop_namespace(&config, &pool).await?;
    }
    Ok(())
}

/// One brand's catalog events for `revisions` ([`produce_catalog`]), then applied live by the
/// catalog processor in this process until the brand's database holds them all. Returns the
/// events' ids, in order, and how long applying them took.
pub(super) async fn produce_and_apply(
    config: &Config,
    pool: &sqlx::MySqlPool,
    codec: &Codec,
    brand: &Tenant,
    revisions: std::ops::Range<usize>,
    per_event: usize,
    catalog: usize,
) -> anyhow::Result<(Vec<String>, std::time::Duration)> {
    eprintln!("producing {} events for one brand", revisions.len());
    let (last, ids) =
        produce_catalog(config, codec, &brand.id, revisions, per_event, catalog).await?;
    eprintln!("applying them live with the catalog processor");
    let started = Instant::now();
    super::with_catalog_processor(
        config,
        &Default::default(),
        super::wait_applied(pool, std::slice::from_ref(&brand.db), &last),
    )
    .await?;
    Ok((ids, started.elapsed()))
}

/// Produces one BrandCatalogUpdated event of `brand` for each revision in `revisions`, each
/// upserting the fabrics [`codes`] names. Returns
/// the last offset written per partition and the events' ids, in order.
async fn produce_catalog(
    config: &Config,
    codec: &Codec,
    brand: &str,
    revisions: std::ops::Range<usize>,
    per_event: usize,
    catalog: usize,
) -> anyhow::Result<(HashMap<i32, i64>, Vec<String>)> {
    let topic = Topic::BrandCatalog.name(&config.namespace);
    let producer = crate::log::kafka::producer(config)?;
    let mut last: HashMap<i32, i64> = HashMap::new();
    let mut in_flight = std::collections::VecDeque::new();
    // Every event's id, for the raw baseline's bookkeeping rows (about 18 MiB at 500,000).
    let mut ids: Vec<String> = Vec::with_capacity(revisions.len());
    let (first, count) = (revisions.start, revisions.len());
    for n in revisions {
        let fabrics: Vec<serde_json::Value> = codes(n, per_event, catalog)
            .map(|i| fabric_json(i, n as i64))
            .collect();
        let event_id = uuid::Uuid::new_v4().to_string();
        let line = json!({"event_id": &event_id, "occurred_at": 0,
            "brand_id": brand, "brand_slug": "brand0", "revision": n as i64,
            "fabrics_upserted": fabrics, "fabrics_removed": []});
        ids.push(event_id);
        let value = record_from_json(EventKind::BrandCatalogUpdated.schema(), &line, &[])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let payload = codec
            .encode(&topic, EventKind::BrandCatalogUpdated, value)
            .await
            .map_err(|e| anyhow::anyhow!("encode: {e}"))?;
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(brand).payload(&payload)) {
                Ok(d) => {
                    in_flight.push_back(d);
                    break;
                }
                Err((rdkafka::error::KafkaError::MessageProduction(_), _)) => {
                    // The queue is full: settle the oldest.
                    let d = in_flight.pop_front().expect("something in flight");
                    let d = d
                        .await?
                        .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
                    let e = last.entry(d.partition).or_insert(-1);
                    *e = (*e).max(d.offset);
                }
                Err((e, _)) => anyhow::bail!("produce: {e}"),
            }
        }
        if (n + 1 - first) % 100_000 == 0 {
            eprintln!("  {} of {count} produced", n + 1 - first);
        }
    }
    for d in in_flight {
        let d = d
            .await?
            .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
        let e = last.entry(d.partition).or_insert(-1);
        *e = (*e).max(d.offset);
    }
    Ok((last, ids))
}

/// The brand's raw baseline: the rebuild's final rows written straight into an empty brand
/// database of the same schema, batch by batch as the replay folds them.
struct Baseline<'a> {
    pool: &'a sqlx::MySqlPool,
    tenants: &'a Tenants,
    config: &'a Config,
    args: &'a RebuildBenchArgs,
    /// Every event's id, in order: the bookkeeping rows the projection keeps.
    ids: &'a [String],
    topic: &'a str,
}

impl Baseline<'_> {
    /// Writes into a new brand database (`ordinal` names it); how long it took and the rows.
    async fn run(&self, ordinal: usize) -> anyhow::Result<(std::time::Duration, usize)> {
        let (args, ids) = (self.args, self.ids);
        let raw = provision(
            self.pool,
            self.tenants,
            self.config,
            OrganisationType::Brand,
            ordinal,
        )
        .await?;
        let started = Instant::now();
        let mut rows_written = 0usize;
        for first in (0..args.events).step_by(BATCH) {
            let mut net: BTreeMap<usize, i64> = BTreeMap::new();
            for n in first..(first + BATCH).min(args.events) {
                for code in codes_of(args, n) {
                    net.insert(code, n as i64);
                }
            }
            let rows: Vec<RawRow> = net
                .into_iter()
                .map(|(code, revision)| RawRow {
                    brand: None,
                    code,
                    revision,
                    pricing: true,
                })
                .collect();
            let mut tx = self.pool.begin().await?;
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                raw_upsert(&mut tx, &raw.db, chunk).await?;
            }
            // The same final rows include the event ids the projection keeps (applied_events).
            let batch_ids = &ids[first..(first + BATCH).min(args.events)];
            for (c, chunk) in batch_ids.chunks(ROWS_PER_STATEMENT).enumerate() {
                let sql = format!(
                    "INSERT INTO {}.applied_events (event_id, projection, topic, `partition`, `offset`) VALUES {}",
                    raw.db.quoted(),
                    vec!["(?, 'catalog', ?, 0, ?)"; chunk.len()].join(",")
                );
                let mut q = sqlx::query(&sql);
                for (i, id) in chunk.iter().enumerate() {
                    q = q
                        .bind(id)
                        .bind(self.topic)
                        .bind((first + c * ROWS_PER_STATEMENT + i) as i64);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            rows_written += rows.len();
        }
        Ok((started.elapsed(), rows_written))
    }
}

/// The supplier part, with brands of `catalog` fabrics (the `run`th, which names its tenants):
/// its grants produced and applied live, then `tenancy rebuild` of it, then the raw baseline.
/// Prints its own figures and ratio.
async fn supplier_part(
    config: &Config,
    args: &RebuildBenchArgs,
    catalog: usize,
    run: usize,
    pool: &sqlx::MySqlPool,
    tenants: &Tenants,
    codec: &Codec,
) -> anyhow::Result<()> {
    let (n, k) = (args.supplier_brands, catalog.max(1));
    // Tenants of this run: brands from 100 + 1000 × run, suppliers 2 × run and 2 × run + 1.
    let (first_brand, first_supplier) = (100 + 1000 * run, 2 * run);
    eprintln!("supplier part: {n} brands of {k} fabrics, one supplier granted them all");
    let rows_of = |brand: Option<String>| -> Vec<RawRow> {
        (0..k)
            .map(|code| RawRow {
                brand: brand.clone(),
                code,
                revision: 1,
                pricing: true,
            })
            .collect()
    };
    let mut brands = Vec::new();
    for b in 0..n {
        let brand = provision(
            pool,
            tenants,
            config,
            OrganisationType::Brand,
            first_brand + b,
        )
        .await?;
        let mut tx = pool.begin().await?;
        for chunk in rows_of(None).chunks(ROWS_PER_STATEMENT) {
            raw_upsert(&mut tx, &brand.db, chunk).await?;
        }
        tx.commit().await?;
        brands.push(brand);
    }
    let supplier = provision(
        pool,
        tenants,
        config,
        OrganisationType::Supplier,
        first_supplier,
    )
    .await?;
    let topic = Topic::BrandAccess.name(&config.namespace);
    let producer = crate::log::kafka::producer(config)?;
    for brand in &brands {
        let line = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": 0,
            "brand_id": brand.id, "supplier_id": supplier.id,
            "permissions": ["catalog.read", "pricing.read"]});
        let value = record_from_json(EventKind::SupplierBrandAccessGranted.schema(), &line, &[])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let payload = codec
            .encode(&topic, EventKind::SupplierBrandAccessGranted, value)
            .await
            .map_err(|e| anyhow::anyhow!("encode: {e}"))?;
        producer
            .send(
                FutureRecord::to(&topic).key(&brand.id).payload(&payload),
                std::time::Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    }
    drop(producer);
    let copies = (n * k) as i64;
    super::with_catalog_processor(config, &Default::default(), async {
        loop {
            let have: i64 = sqlx::query_scalar(&format!(
                "SELECT COUNT(*) FROM {}.brand_fabrics",
                supplier.db.quoted()
            ))
            .fetch_one(pool)
            .await?;
            if have == copies {
                return anyhow::Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await?;

    super::settle().await;
    let (rebuilt, pause_ms, _) = timed_rebuild(config, &supplier.id).await?;

    // Raw: the same grants and copy rows into an empty supplier database, one transaction per
    // brand.
    let raw = provision(
        pool,
        tenants,
        config,
        OrganisationType::Supplier,
        first_supplier + 1,
    )
    .await?;
    super::settle().await;
    let started = Instant::now();
    for brand in &brands {
        let mut tx = pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO {}.brand_access (brand_id, permissions, granted_at) VALUES (?, ?, UTC_TIMESTAMP(3))",
            raw.db.quoted()
        ))
        .bind(&brand.id)
        .bind(r#"["catalog.read","pricing.read"]"#)
        .execute(&mut *tx)
        .await?;
        for chunk in rows_of(Some(brand.id.clone())).chunks(ROWS_PER_STATEMENT) {
            raw_upsert(&mut tx, &raw.db, chunk).await?;
        }
        tx.commit().await?;
    }
    let raw_elapsed = started.elapsed();
    let rows = (copies + n as i64) as f64;
    let (ours, theirs) = (
        rows / rebuilt.as_secs_f64(),
        rows / raw_elapsed.as_secs_f64(),
    );
    println!(
        "supplier rebuild, brands of {k} fabrics: {n} grants and {copies} copy rows (child process): {:.2} s = {ours:.0} rows/s; swap pause {pause_ms:.0} ms; raw inserts of the same rows: {:.2} s = {theirs:.0} rows/s; ratio supplier rebuild/raw: {:.2}",
        rebuilt.as_secs_f64(),
        raw_elapsed.as_secs_f64(),
        ours / theirs
    );
    super::Row {
        benchmark: format!("tenancy bench rebuild, supplier reading {n} brands of {k} fabrics"),
        figure: format!("{ours:.0} rows/s"),
        baseline: format!("{theirs:.0} rows/s"),
        ratio: Some(ours / theirs),
        goal: "≥ 0.7".into(),
        met: ours / theirs >= 0.7,
        peak_rss_mib: None,
    }
    .print();
    Ok(())
}

/// `tenancy rebuild ORG` as a child process (its memory its own): how long it took, the swap
/// pause it reported in ms, and its peak RSS in MiB.
async fn timed_rebuild(
    config: &Config,
    organisation_id: &str,
) -> anyhow::Result<(std::time::Duration, f64, f64)> {
    let started = Instant::now();
    let child = super::tenancy_command(config)?
        .arg("rebuild")
        .arg(organisation_id)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let rss = super::watch_peak_rss(child.id());
    let out = child.wait_with_output().await?;
    let elapsed = started.elapsed();
    let rss = rss.await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "tenancy rebuild {organisation_id} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its own summary: where the time went (the replay, the last comparison).
    for line in stdout.lines().filter(|l| l.starts_with("rebuilt ")) {
        eprintln!("  tenancy rebuild: {line}");
    }
    let pause_ms: f64 = stdout
        .split("writes held ")
        .nth(1)
        .and_then(|s| s.split(" ms").next())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no swap pause in the rebuild's output: {stdout}"))?;
    Ok((elapsed, pause_ms, rss))
}
