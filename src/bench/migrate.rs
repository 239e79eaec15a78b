//! `tenancy bench migrate`: the rolling migration of a fleet of tenant databases, against the
//! same DDL sent by plain clients at the same parallelism; and how long a worker takes to its
//! first applied event with that fleet.
//!
//! Setup: `--tenants` brand databases, each put one migration back (the latest brand migration's
//! table dropped and its bookkeeping row deleted, the tenants table saying the version before).
//! The raw baseline runs that migration's SQL and writes its bookkeeping row in each database,
//! `--parallel` connections at once, each kept open for the whole run (a client's least cost).
//! The fleet is put back and the rollout ([`crate::tenancy::rollout`]) brings it up with the
//! same parallelism: a lock per tenant, a check of its row, sqlx's migrator on a connection of
//! its own, the version recorded. Then one catalog event is emitted for one brand and
//! `tenancy run` started: the time from its start to that event's row is the worker's start-up
//! with that fleet, which no longer waits for the fleet's migrations.

use std::time::{Duration, Instant};

use futures::StreamExt;
use sqlx::MySqlPool;

use crate::config::Config;
use crate::log::topics::ensure_topics;
use crate::store::tenants::Tenants;
use crate::tenancy::migrations;
use crate::tenancy::provisioning::prepare_service_databases;
use crate::tenancy::rollout;
use crate::tenant::{DatabaseName, Namespace, OrganisationType};

#[derive(Debug, clap::Args)]
pub struct MigrateBenchArgs {
    /// Brand databases in the fleet.
    #[arg(long, default_value_t = 2000)]
    pub tenants: usize,
    /// Databases migrated at once, by the rollout and by the baseline alike.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Keep the namespace (its databases) afterwards.
    #[arg(long)]
    pub keep: bool,
}

pub async fn run(mut config: Config, args: MigrateBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.tenants > 0, "--tenants must be positive");
    let parallel = args.parallel.max(1);
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    config.namespace = Namespace::parse(&format!("bench{}", &suffix[..6]))?;
    let ns = config.namespace.clone();
    let pool = crate::store::pools::connect_pool_sized(&config, (2 * parallel + 4) as u32).await?;
    ensure_topics(&config).await?;
    prepare_service_databases(&pool, &config.database_url, &ns).await?;
    let tenants = Tenants::on(
        crate::store::servers::Servers::single(pool.clone(), &config.database_url),
        &ns,
    );
    let result = measure(&config, &pool, &tenants, &args, parallel).await;
    if !args.keep {
        super::drop_namespace(&config, &pool).await?;
    }
    result
}

async fn measure(
    config: &Config,
    pool: &MySqlPool,
    tenants: &Tenants,
    args: &MigrateBenchArgs,
    parallel: usize,
) -> anyhow::Result<()> {
    let migrator = migrations::for_tenant(OrganisationType::Brand);
    let latest = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .max_by_key(|m| m.version)
        .expect("brand migrations");
    eprintln!(
        "namespace {}: provisioning {} brands ({} at a time)",
        config.namespace, args.tenants, parallel
    );
    let started = Instant::now();
    let fleet: Vec<super::catalog::Tenant> = futures::stream::iter(0..args.tenants)
        .map(|i| super::catalog::provision(pool, tenants, config, OrganisationType::Brand, i))
        .buffered(parallel)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    eprintln!("  provisioned in {:.1} s", started.elapsed().as_secs_f64());
    let dbs: Vec<&DatabaseName> = fleet.iter().map(|t| &t.db).collect();

    // The table the latest brand migration creates, to drop and have it made again.
    let table = "applied_events";
    anyhow::ensure!(
        latest.sql.contains(table),
        "the latest brand migration ({}) no longer creates {table}: update this benchmark",
        latest.version
    );
    one_behind(pool, tenants, &dbs, latest.version, table, parallel).await?;
    let checksum: String = latest.checksum.iter().map(|b| format!("{b:02x}")).collect();
    let description = latest.description.replace('\'', "''");
    let script = |db: &DatabaseName| {
        format!(
            "USE {};\n{};\nINSERT INTO _sqlx_migrations \
             (version, description, success, checksum, execution_time) \
             VALUES ({}, '{description}', TRUE, X'{checksum}', -1)",
            db.quoted(),
            latest.sql.trim_end().trim_end_matches(';'),
            latest.version
        )
    };
    // The baseline: the same DDL and bookkeeping from `parallel` connections kept open.
    let raw_pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(parallel as u32)
        .min_connections(parallel as u32)
        .connect(&config.database_url)
        .await?;
    eprintln!("raw baseline: the migration's SQL in each database, {parallel} clients at once");
    let started = Instant::now();
    let raw: Vec<anyhow::Result<()>> = futures::stream::iter(dbs.iter())
        .map(|db| {
            let (raw_pool, sql) = (&raw_pool, script(db));
            async move {
                sqlx::raw_sql(&sql).execute(raw_pool).await?;
                Ok(())
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    let raw_secs = started.elapsed().as_secs_f64();
    raw.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    raw_pool.close().await;
    eprintln!(
        "  {raw_secs:.2} s = {:.1} ms per database",
        1000.0 * raw_secs / dbs.len() as f64
    );

    one_behind(pool, tenants, &dbs, latest.version, table, parallel).await?;
    eprintln!("tenancy migrate's rollout, {parallel} at a time");
    let options = rollout::Options {
        parallel,
        canary: 0,
        max_failures: 0.0,
        ..Default::default()
    };
    let started = Instant::now();
    let ddl = crate::store::servers::Servers::ddl(config, parallel as u32)?;
    let report = rollout::run(tenants, &ddl, &options, |_| {}).await?;
    let ours_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        report.migrated == dbs.len() && report.failed.is_empty(),
        "the rollout migrated {} of {} ({} failed, {} skipped, halted: {:?})",
        report.migrated,
        dbs.len(),
        report.failed.len(),
        report.skipped,
        report.halted
    );
    eprintln!(
        "  {ours_secs:.2} s = {:.1} ms per database",
        1000.0 * ours_secs / dbs.len() as f64
    );
    let ratio = raw_secs / ours_secs;
    println!("ratio rollout/raw (speed): {ratio:.2}");

    let first = first_applied_event(config, pool, &fleet[0]).await?;
    println!(
        "tenancy run with {} tenant databases: first event applied {:.2} s after it started",
        dbs.len(),
        first.as_secs_f64()
    );
    super::Row {
        benchmark: format!("tenancy bench migrate ({} tenants)", dbs.len()),
        figure: format!(
            "rollout {ours_secs:.1} s; a worker's first event applied {:.1} s after its start",
            first.as_secs_f64()
        ),
        baseline: format!("{raw_secs:.1} s, the same SQL from {parallel} clients"),
        ratio: Some(ratio),
        goal: "≥ 0.8, first event < 5 s".into(),
        met: ratio >= 0.8 && first < Duration::from_secs(5),
        peak_rss_mib: Some(super::peak_rss_mib()),
    }
    .print();
    Ok(())
}

/// Puts every database of `dbs` one migration back: `table` (what migration `version` makes)
/// dropped, its bookkeeping row deleted, the tenants table saying the version before.
async fn one_behind(
    pool: &MySqlPool,
    tenants: &Tenants,
    dbs: &[&DatabaseName],
    version: i64,
    table: &str,
    parallel: usize,
) -> anyhow::Result<()> {
    let done: Vec<Result<(), sqlx::Error>> = futures::stream::iter(dbs.iter())
        .map(|db| async move {
            sqlx::raw_sql(&format!(
                "DROP TABLE IF EXISTS {db}.{table}; \
                 DELETE FROM {db}._sqlx_migrations WHERE version = {version}",
                db = db.quoted()
            ))
            .execute(pool)
            .await
            .map(|_| ())
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    done.into_iter().collect::<Result<Vec<_>, _>>()?;
    let platform = tenants
        .namespace()
        .service_database(crate::tenant::ServiceDatabase::Platform);
    sqlx::query(&format!(
        "UPDATE {}.tenants SET migration_version = ?",
        platform.quoted()
    ))
    .bind(version - 1)
    .execute(pool)
    .await?;
    Ok(())
}

/// Emits one catalog event for `brand`, starts `tenancy run`, and returns how long after its
/// start the event's row was in the brand's database.
async fn first_applied_event(
    config: &Config,
    pool: &MySqlPool,
    brand: &super::catalog::Tenant,
) -> anyhow::Result<Duration> {
    let line = serde_json::json!({"type": "BrandCatalogUpdated", "brand_id": brand.id,
        "brand_slug": "brand0", "revision": 1, "fabrics_removed": [],
        "fabrics_upserted": [{"code": "FIRST", "name": "First", "collection": "Aurora",
            "colour": "White", "material": "Blackout", "width_mm": 2000, "price_minor": 1500,
            "currency": "GBP"}]});
    crate::log::emit::send_line(config, &line).await?;
    eprintln!("tenancy run: its start to the event's row");
    let started = Instant::now();
    let mut worker = super::tenancy_command(config)?
        .args(["run", "--http", "off"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let deadline = started + Duration::from_secs(120);
    let sql = format!("SELECT COUNT(*) FROM {}.fabrics", brand.db.quoted());
    let applied = loop {
        let rows: i64 = sqlx::query_scalar(&sql).fetch_one(pool).await?;
        if rows > 0 {
            break started.elapsed();
        }
        if let Some(status) = worker.try_wait()? {
            anyhow::bail!("tenancy run exited ({status}) before applying the event");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the event was not applied within 120 s of the worker's start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    worker.kill().await.ok();
    Ok(applied)
}
