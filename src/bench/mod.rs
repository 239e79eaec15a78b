//! Benchmarks (`tenancy bench …`): each measures a path of ours next to a raw baseline in the
//! same run and prints both. Figures only mean something from a `--release` build.
//!
//! - [`backup`]: `tenancy backup` and `tenancy restore` of a large brand, against
//!   `mariadb-dump` and loading its dump; `tenancy rebuild` of the same tenant.
//! - [`catalog`]: the catalog processor against plain multi-row upserts.
//! - [`broker`]: the broker's own produce and consume rates, the ceiling every processor sits
//!   under.
//! - [`e2e`]: `tenancy emit` to the last event applied, against the broker's consume rate.
//! - [`isolation`]: the healthy brands' catalog throughput and latency with one brand's table
//!   locked, against every brand healthy.
//! - [`migrate`]: the rolling migration of a fleet, against the same SQL from plain clients;
//!   a worker's start-up with that fleet.
//! - [`rebuild`]: `tenancy rebuild` of a large brand, against plain upserts of the same rows.
//! - [`serve`]: `tenancy serve`'s brand catalog API, against the same query sent straight to
//!   MariaDB.
//!
//! Each ends with one [`Row`] line (`bench-row {json}`) that `scripts/bench` gathers into
//! `docs/benchmarks.md`; the lines before it are for the reader.

pub mod backup;
pub mod broker;
pub mod catalog;
pub mod e2e;
pub mod isolation;
pub mod migrate;
pub mod rebuild;
pub mod serve;

use std::time::{Duration, Instant};

/// One benchmark's result as the table in `docs/benchmarks.md` shows it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Row {
    /// The command that measured it, e.g. `tenancy bench catalog --scenario narrow`.
    pub benchmark: String,
    /// Ours, with its unit.
    pub figure: String,
    /// The raw baseline measured in the same run, with its unit.
    pub baseline: String,
    /// Ours against the baseline, as the benchmark's goal reads it (none without a baseline).
    pub ratio: Option<f64>,
    pub goal: String,
    /// Whether the ratio meets the goal.
    pub met: bool,
    /// Peak resident memory of ours, in MiB.
    pub peak_rss_mib: Option<f64>,
}

impl Row {
    /// Prints the row as the last line of the benchmark's output, for `scripts/bench`.
    pub(crate) fn print(&self) {
        match serde_json::to_string(self) {
            Ok(json) => println!("bench-row {json}"),
            Err(e) => eprintln!("cannot print the benchmark's row: {e}"),
        }
    }
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
pub(crate) fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Removes what a benchmark's namespace made in MySQL and Redis: its databases and its keys.
/// Its topics stay: the local broker (nisshi 0.7.0-pre.2) deletes every topic of the cluster
/// when asked to delete one (its `topic_delete_by.sql` selects by cluster, and the records
/// follow by cascade), so a benchmark that deleted its own topics wiped every namespace's.
/// For figures from a small broker file, start from a fresh one (README, "Known limits").
pub(crate) async fn drop_namespace(
    config: &crate::config::Config,
    pool: &sqlx::MySqlPool,
) -> anyhow::Result<()> {
    let ns = &config.namespace;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(SCHEMA_NAME AS CHAR) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE ?",
    )
    .bind(ns.database_like_pattern())
    .fetch_all(pool)
    .await?;
    for name in names {
        // Names come from the server and match our validated namespace pattern.
        sqlx::query(&format!("DROP DATABASE `{name}`"))
            .execute(pool)
            .await?;
    }
    // A namespace is an identifier: no glob characters in the pattern.
    let mut redis = redis::Client::open(config.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let keys: Vec<String> = {
        use futures::TryStreamExt;
        let iter: redis::AsyncIter<String> =
            redis::AsyncCommands::scan_match(&mut redis, format!("{ns}:*")).await?;
        iter.try_collect().await?
    };
    for chunk in keys.chunks(500) {
        redis::cmd("DEL")
            .arg(chunk)
            .query_async::<()>(&mut redis)
            .await?;
    }
    Ok(())
}

/// This binary, run for `config`'s namespace and services (a child of a benchmark).
pub(crate) fn tenancy_command(
    config: &crate::config::Config,
) -> anyhow::Result<tokio::process::Command> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command
        .env("TENANCY_NAMESPACE", config.namespace.to_string())
        .env("KAFKA_BOOTSTRAP_SERVERS", &config.kafka_bootstrap_servers)
        .env("SCHEMA_REGISTRY_URL", &config.schema_registry_url)
        .env("DATABASE_URL", &config.database_url)
        .envs(config.servers_env())
        .env("REDIS_URL", &config.redis_url);
    if !config.kafka_options.is_empty() {
        command.env(
            "KAFKA_OPTIONS",
            config
                .kafka_options
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    Ok(command)
}

/// Watches a child process's peak resident memory (its VmHWM, read every 50 ms until it
/// exits), in MiB. Not getrusage's children figure: that also counts the parent's memory the
/// child had for the moment between fork and exec, so a benchmark holding its input in memory
/// made its children look as big as itself.
pub(crate) fn watch_peak_rss(pid: Option<u32>) -> tokio::task::JoinHandle<f64> {
    tokio::spawn(async move {
        let Some(pid) = pid else { return f64::NAN };
        let path = format!("/proc/{pid}/status");
        let mut peak = f64::NAN;
        loop {
            let hwm = std::fs::read_to_string(&path).ok().and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            });
            // Gone, or a zombie (no memory lines): it has exited.
            let Some(kib) = hwm else { return peak };
            peak = peak.max(kib / 1024.0);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
}

/// A benchmark's own namespace (`benchXXXXXX`): its topics and service databases made, a pool
/// of `connections` on the home server and the tenants table there.
pub(crate) struct Fresh {
    pub config: crate::config::Config,
    pub pool: sqlx::MySqlPool,
    pub tenants: crate::store::tenants::Tenants,
}

pub(crate) async fn fresh_namespace(
    config: &crate::config::Config,
    connections: u32,
) -> anyhow::Result<Fresh> {
    let mut config = config.clone();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    config.namespace = crate::tenant::Namespace::parse(&format!("bench{}", &suffix[..6]))?;
    let pool = crate::store::pools::connect_pool_sized(&config, connections).await?;
    crate::log::topics::ensure_topics(&config).await?;
    crate::tenancy::provisioning::prepare_service_databases(
        &pool,
        &config.database_url,
        &config.namespace,
    )
    .await?;
    let tenants = crate::store::tenants::Tenants::on(
        crate::store::servers::Servers::single(pool.clone(), &config.database_url),
        &config.namespace,
    );
    Ok(Fresh {
        config,
        pool,
        tenants,
    })
}

/// Runs the catalog processor of `config`'s namespace (group `{ns}.catalog`) in this process,
/// its connections as `options` say, until `work` ends; returns what `work` returned.
pub(crate) async fn with_catalog_processor<T>(
    config: &crate::config::Config,
    options: &crate::worker::WorkerOptions,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    use crate::log::topics::Topic;
    use crate::stream::consumer::{join, Assignor, Membership};
    let ns = &config.namespace;
    let processors = crate::worker::Processors::build(config, options).await?;
    let group = format!("{ns}.catalog");
    let consumer = join(
        config,
        "catalog",
        &group,
        &[Topic::BrandCatalog.name(ns), Topic::BrandAccess.name(ns)],
        &Membership {
            session_timeout: std::time::Duration::from_secs(10),
            assignor: Assignor::CooperativeSticky,
        },
    )?;
    let health = crate::stream::health::Health::default().processor("catalog", &group);
    let settings = crate::stream::Settings {
        leave_group_on_exit: true,
        ..Default::default()
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (run, result) = tokio::join!(
        crate::stream::run(
            &processors.catalog,
            consumer,
            &processors.codec,
            &processors.dead_letters,
            health,
            &settings,
            shutdown.clone()
        ),
        async {
            let r = work.await;
            shutdown.cancel();
            r
        }
    );
    run?;
    for server in processors.tenants.servers().all() {
        server.pool().close().await;
    }
    result
}

/// Waits until the brands' databases hold every partition's `last` catalog offset.
pub(crate) async fn wait_applied(
    pool: &sqlx::MySqlPool,
    brands: &[crate::tenant::DatabaseName],
    last: &std::collections::HashMap<i32, i64>,
) -> anyhow::Result<()> {
    while !catalog::done(pool, brands, last).await? {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Waits (up to 30 s) until the machine's CPUs are mostly idle, so that a timed phase does not
/// share them with the tail of the one before (the broker, MariaDB's purge). Says how long.
///
/// Waiting for MariaDB's dirty pages as well was tried and dropped: on this VM some hundreds
/// stay dirty at rest, and two minutes of waiting did not change the figures that followed.
pub(crate) async fn settle() {
    let started = Instant::now();
    let mut busy = 0.0;
    while started.elapsed() < Duration::from_secs(30) {
        busy = cpu_busy(Duration::from_millis(500)).await.unwrap_or(0.0);
        if busy < 0.25 {
            break;
        }
    }
    eprintln!(
        "  settled in {:.1} s (CPUs {:.0}% busy)",
        started.elapsed().as_secs_f64(),
        busy * 100.0
    );
}

/// The share of all CPUs' time spent busy over `over` (Linux /proc/stat); `None` elsewhere.
async fn cpu_busy(over: Duration) -> Option<f64> {
    fn sample() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait …: idle and iowait are the idle time.
        let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
        Some((fields.iter().sum(), idle))
    }
    let (t0, i0) = sample()?;
    tokio::time::sleep(over).await;
    let (t1, i1) = sample()?;
    let total = t1.checked_sub(t0)?.max(1);
    Some(1.0 - i1.saturating_sub(i0) as f64 / total as f64)
}
