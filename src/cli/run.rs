//! `tenancy run`: start the processors and run them until told to stop.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::producer::Producer;

use crate::access::cache::PermissionCache;
use crate::catalog::processor::{CatalogProcessor, CatalogSettings};
use crate::catalog::spec::CatalogSpec;
use crate::config::Config;
use crate::dead_letter::DeadLetters;
use crate::tenancy::lifecycle::{PurgeTimer, Purger};
use crate::tenancy::outcomes::OutcomePublisher;
use crate::tenancy::provisioning::{prepare_service_databases, Provisioner};
use crate::tenancy::tenants::Tenants;
use crate::topics::Topic;
use crate::wire::Codec;
use crate::{kafka, processor, topics};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Consumer-group session timeout: how long before a dead worker's partitions move.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub session_timeout_ms: u64,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Events held for tenants that are not active yet before their partitions are paused.
    #[arg(long, default_value_t = 10_000)]
    pub max_held: usize,
    /// Most catalog/access messages applied in one batch (memory grows with it: the catalog
    /// benchmark peaks at 78 MiB with 1000 and 221 MiB with 5000, for similar throughput).
    #[arg(long, default_value_t = 1000)]
    pub batch_max: usize,
    /// How long a terminated tenant stays archived (restorable) before it is purged, e.g. 30d,
    /// 12h, 90s. Must be the same for every worker and for replays.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub grace: std::time::Duration,
    /// How often the purge timer looks for archives past their grace period.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub purge_check: std::time::Duration,
    /// Which processors to run (comma-separated): provisioner (with the purge timer), catalog,
    /// purger. To rebuild by replay, run `provisioner,purger` until `tenancy topics lag` shows
    /// them caught up, then everything: projections are then gated by the full lifecycle.
    #[arg(long, value_delimiter = ',', default_value = "provisioner,catalog,purger",
        value_parser = ["provisioner", "catalog", "purger"])]
    pub processors: Vec<String>,
    /// Crash tests: abort the process right after this lifecycle step (archive).
    #[arg(long, hide = true)]
    pub fail_after: Option<String>,
}

pub async fn run(config: Config, args: RunArgs) -> anyhow::Result<ExitCode> {
    let shutdown = super::shutdown_on_signal();
    if let Some(addr) = args.metrics_addr {
        crate::telemetry::serve_metrics(addr)?;
    }
    let ns = config.namespace.clone();
    // The declared projections are checked against the schemas before anything is consumed.
    let spec = CatalogSpec::load()?;
    let pool = super::connect_pool(&config).await?;
    let cache = PermissionCache::connect(&config.redis_url, &ns).await?;
    topics::ensure_topics(&config).await?;
    prepare_service_databases(&pool, &config.database_url, &ns).await?;

    let codec = Arc::new(Codec::new(&config.schema_registry_url));
    let producer = kafka::producer(&config)?;
    let provisioner = Provisioner {
        ns: ns.clone(),
        pool: pool.clone(),
        database_url: config.database_url.clone(),
        tenants: Tenants::new(pool.clone(), &ns),
        outcomes: OutcomePublisher::new(producer.clone(), codec.clone(), &ns),
        cache: cache.clone(),
        grace: chrono::Duration::from_std(args.grace)
            .map_err(|_| anyhow::anyhow!("--grace {:?} is too long", args.grace))?,
        fail_after: args.fail_after.clone(),
    };
    let dead_letters = DeadLetters::new(producer.clone(), Topic::DeadLetter.name(&ns));
    let session = Duration::from_millis(args.session_timeout_ms);
    let group = format!("{ns}.provisioner");
    let consumer = kafka::consumer(&config, &group, session)?;
    let input = Topic::Organisations.name(&ns);
    // Only the enabled processors join their groups: an idle member would hold partitions.
    let enabled = |name: &str| args.processors.iter().any(|p| p == name);
    if enabled("provisioner") {
        consumer.subscribe(&[&input])?;
    }
    tracing::info!(namespace = %ns, %group, topic = %input, "provisioner running");

    let catalog = CatalogProcessor {
        ns: ns.clone(),
        pool: pool.clone(),
        spec,
        tenants: Tenants::new(pool.clone(), &ns),
        cache: cache.clone(),
        settings: CatalogSettings {
            max_held: args.max_held,
            batch_max: args.batch_max,
            ..CatalogSettings::default()
        },
    };
    let catalog_group = format!("{ns}.catalog");
    let catalog_consumer = kafka::consumer(&config, &catalog_group, session)?;
    let catalog_topics = [Topic::BrandCatalog.name(&ns), Topic::BrandAccess.name(&ns)];
    if enabled("catalog") {
        catalog_consumer.subscribe(&[&catalog_topics[0], &catalog_topics[1]])?;
    }
    tracing::info!(namespace = %ns, group = %catalog_group, topics = %catalog_topics.join(","), "catalog processor running");

    let purger = Purger {
        ns: ns.clone(),
        pool: pool.clone(),
        tenants: Tenants::new(pool.clone(), &ns),
        cache: cache.clone(),
        spec: CatalogSpec::load()?,
    };
    let purger_group = format!("{ns}.purger");
    let purger_consumer = kafka::consumer(&config, &purger_group, session)?;
    if enabled("purger") {
        purger_consumer.subscribe(&[&Topic::Tenancy.name(&ns)])?;
    }
    let timer = PurgeTimer {
        config: config.clone(),
        tenants: Tenants::new(pool.clone(), &ns),
        outcomes: OutcomePublisher::new(producer.clone(), codec.clone(), &ns),
        every: args.purge_check,
    };
    tracing::info!(namespace = %ns, group = %purger_group, grace = %humantime::format_duration(args.grace), "purger running");

    // The loops run on this task (their futures are not Send, see processor::Handler).
    tokio::try_join!(
        async {
            if enabled("provisioner") {
                tokio::try_join!(
                    processor::run(
                        "provisioner",
                        consumer,
                        &codec,
                        &dead_letters,
                        &provisioner,
                        shutdown.clone()
                    ),
                    timer.run(shutdown.clone()),
                )?;
            }
            anyhow::Ok(())
        },
        async {
            if enabled("catalog") {
                catalog
                    .run(catalog_consumer, &codec, &dead_letters, shutdown.clone())
                    .await?;
            }
            anyhow::Ok(())
        },
        async {
            if enabled("purger") {
                processor::run(
                    "purger",
                    purger_consumer,
                    &codec,
                    &dead_letters,
                    &purger,
                    shutdown.clone(),
                )
                .await?;
            }
            anyhow::Ok(())
        },
    )?;
    producer
        .flush(Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("flushing produced events: {e}"))?;
    pool.close().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
