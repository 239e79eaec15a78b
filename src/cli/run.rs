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
    /// Most catalog/access messages applied in one batch.
    #[arg(long, default_value_t = 5000)]
    pub batch_max: usize,
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
    };
    let dead_letters = DeadLetters::new(producer.clone(), Topic::DeadLetter.name(&ns));
    let session = Duration::from_millis(args.session_timeout_ms);
    let group = format!("{ns}.provisioner");
    let consumer = kafka::consumer(&config, &group, session)?;
    let input = Topic::Organisations.name(&ns);
    consumer.subscribe(&[&input])?;
    tracing::info!(namespace = %ns, %group, topic = %input, "provisioner running");

    let catalog = CatalogProcessor {
        ns: ns.clone(),
        pool: pool.clone(),
        spec,
        tenants: Tenants::new(pool.clone(), &ns),
        cache,
        settings: CatalogSettings {
            max_held: args.max_held,
            batch_max: args.batch_max,
            ..CatalogSettings::default()
        },
    };
    let catalog_group = format!("{ns}.catalog");
    let catalog_consumer = kafka::consumer(&config, &catalog_group, session)?;
    let catalog_topics = [Topic::BrandCatalog.name(&ns), Topic::BrandAccess.name(&ns)];
    catalog_consumer.subscribe(&[&catalog_topics[0], &catalog_topics[1]])?;
    tracing::info!(namespace = %ns, group = %catalog_group, topics = %catalog_topics.join(","), "catalog processor running");

    // Both loops run on this task (their futures are not Send, see processor::Handler).
    tokio::try_join!(
        processor::run(
            "provisioner",
            consumer,
            &codec,
            &dead_letters,
            &provisioner,
            shutdown.clone()
        ),
        catalog.run(catalog_consumer, &codec, &dead_letters, shutdown),
    )?;
    producer
        .flush(Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("flushing produced events: {e}"))?;
    pool.close().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
