//! One worker's processors, built one way for `tenancy run`, the benchmarks and in-process tests.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::FutureProducer;
use sqlx::MySqlPool;

use crate::cache::permissions::PermissionCache;
use crate::cache::Redis;
use crate::catalog::spec::CatalogSpec;
use crate::catalog::{CatalogHooks, CatalogProcessor};
use crate::config::Config;
use crate::domains::DomainProcessor;
use crate::log::dead_letters::DeadLetters;
use crate::log::topics::{self, Topic};
use crate::log::wire::Codec;
use crate::store::tenants::Tenants;
use crate::tenancy::outcomes::OutcomePublisher;
use crate::tenancy::provisioning::{prepare_service_databases, LifecycleHooks, Provisioner};
use crate::tenancy::purge::{PurgeTimer, Purger};
use crate::tenancy::watermark::Watermark;

/// Settings of one worker (the lifecycle ones must be the same for every worker of a namespace).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Most MySQL connections of the worker's pool.
    pub db_connections: u32,
    /// How long a terminated tenant stays restorable.
    pub grace: Duration,
    /// How often the purge timer looks for archives past their grace period.
    pub purge_check: Duration,
    /// Crash tests only: abort after this lifecycle step.
    pub fail_after: crate::fault::FailAfter,
    /// Create missing topics and migrate the service databases while building (off when the
    /// caller already did, as `tenancy run` does once for all its processors).
    pub prepare: bool,
    /// What every statement of the processors' connections runs under.
    pub limits: crate::store::pools::StatementLimits,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            db_connections: 10,
            grace: Duration::from_secs(30 * 24 * 3600),
            purge_check: Duration::from_secs(10),
            fail_after: None,
            prepare: true,
            limits: crate::store::pools::StatementLimits::default(),
        }
    }
}

pub struct Processors {
    pub pool: MySqlPool,
    pub tenants: Tenants,
    pub codec: Arc<Codec>,
    pub producer: FutureProducer,
    pub dead_letters: DeadLetters,
    pub provisioner: Provisioner,
    pub catalog: CatalogProcessor,
    pub purger: Purger,
    pub domains: DomainProcessor,
    pub timer: PurgeTimer,
}

impl Processors {
    /// Connects to MySQL and Redis, creates the namespace's topics and service databases if
    /// missing, and builds every processor.
    pub async fn build(config: &Config, options: &WorkerOptions) -> anyhow::Result<Processors> {
        let ns = config.namespace.clone();
        // The declared projection is checked against the schemas before anything is consumed.
        let spec = CatalogSpec::load()?;
        let servers = crate::store::servers::Servers::connect_with(config, || {
            crate::store::pools::bounded_pool_options(options.db_connections, options.limits)
        })
        .await?;
        let pool = servers.home().pool().clone();
        let redis = Redis::connect(&config.redis_url, &ns).await?;
        if options.prepare {
            topics::ensure_topics(config).await?;
            prepare_service_databases(&pool, &config.database_url, &ns).await?;
        }
        let tenants = Tenants::on(servers, &ns);
        let codec = Arc::new(Codec::new(&config.schema_registry_url));
        let producer = crate::log::kafka::producer_without_linger(config)?;
        let watermark = Watermark::new(config, pool.clone())?;
        let hooks: Arc<dyn LifecycleHooks> = Arc::new(CatalogHooks {
            ns: ns.clone(),
            tenants: tenants.clone(),
            spec: spec.clone(),
            cache: PermissionCache::on(&redis),
        });
        let grace = chrono::Duration::from_std(options.grace)
            .map_err(|_| anyhow::anyhow!("--grace {:?} is too long", options.grace))?;
        Ok(Processors {
            dead_letters: DeadLetters::new(producer.clone(), Topic::DeadLetter.name(&ns)),
            provisioner: Provisioner {
                ns: ns.clone(),
                ddl: crate::store::servers::Servers::ddl(config, options.db_connections)?,
                tenants: tenants.clone(),
                outcomes: OutcomePublisher::new(producer.clone(), codec.clone(), &ns),
                redis: redis.clone(),
                grace,
                watermark: watermark.clone(),
                hooks: Some(hooks.clone()),
                fail_after: options.fail_after,
            },
            catalog: CatalogProcessor {
                ns: ns.clone(),
                spec,
                tenants: tenants.clone(),
                cache: PermissionCache::on(&redis),
                redis: redis.clone(),
                watermark: watermark.clone(),
                dedupe: true,
            },
            purger: Purger {
                ns: ns.clone(),
                tenants: tenants.clone(),
                redis: redis.clone(),
                watermark: watermark.clone(),
                hooks: Some(hooks),
            },
            domains: DomainProcessor {
                ns: ns.clone(),
                tenants: tenants.clone(),
                watermark: watermark.clone(),
                redis: redis.clone(),
                fail_after: options.fail_after,
            },
            timer: PurgeTimer {
                tenants: tenants.clone(),
                outcomes: OutcomePublisher::new(producer.clone(), codec.clone(), &ns),
                watermark,
                every: options.purge_check,
            },
            pool,
            tenants,
            codec,
            producer,
        })
    }
}
