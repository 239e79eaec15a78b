//! `tenancy run`: start the processors and run them until told to stop.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use rdkafka::producer::Producer;

use crate::config::Config;
use crate::stream::dead_letters::DeadLetters;
use crate::stream::health::Health;
use crate::stream::{self, consumer, Processor, Settings};
use crate::tenancy::provisioning::upgrade_tenant_databases;
use crate::topics::Topic;
use crate::wire::Codec;
use crate::worker::{Processors, WorkerOptions};

/// The processors `tenancy run` can run, each its own consumer group `{ns}.{name}`.
pub const PROCESSORS: [&str; 3] = ["provisioner", "catalog", "purger"];

/// `--http`: an address, or `off` (a newtype: clap reads an `Option` field as "may be absent").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

fn http_addr(raw: &str) -> Result<Listen, String> {
    if raw == "off" {
        return Ok(Listen(None));
    }
    raw.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|e| format!("expected ADDR:PORT or `off`: {e}"))
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Which processors to run (comma-separated): provisioner (with the purge timer), catalog,
    /// purger. Every worker of a namespace may run all three; start more workers to scale out.
    #[arg(long, value_delimiter = ',', default_value = "provisioner,catalog,purger",
        value_parser = PROCESSORS)]
    pub processors: Vec<String>,
    /// Serve /healthz, /readyz and /metrics here (`off` to serve nothing). Each worker on one
    /// host needs its own port (port 0 picks a free one and logs it).
    #[arg(long, default_value = "127.0.0.1:9464", value_name = "ADDR|off", value_parser = http_addr)]
    pub http: Listen,
    /// Consumer-group session timeout: how long before a dead worker's partitions move.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub session_timeout_ms: u64,
    /// Partition assignment protocol (every worker of a group must use the same).
    #[arg(long, value_enum, default_value = "cooperative-sticky")]
    pub assignor: consumer::Assignor,
    /// Leave the consumer groups when stopping, so partitions move at once. Off by default: the
    /// local broker (nisshi, Tansu) can wedge a group when its leader leaves mid-rebalance, so a
    /// stopped worker's partitions move after the session timeout instead. Safe with Kafka.
    #[arg(long)]
    pub leave_group_on_exit: bool,
    /// Tenants written at the same time within a batch, per processor. The worker's MySQL pool
    /// is sized from it (two connections per write in flight, per processor, plus four).
    #[arg(long, default_value_t = 4)]
    pub write_concurrency: usize,
    /// Organisations provisioned at the same time (each creates and migrates a database on a
    /// connection of its own, plus two pooled ones). More than 4 did not go faster here: 8 and
    /// 16 doubled the time per tenant (the server is the bound).
    #[arg(long, default_value_t = 4)]
    pub provision_concurrency: usize,
    /// Most messages applied in one batch (memory grows with it: the catalog benchmark peaks at
    /// 78 MiB with 1000 and 221 MiB with 5000, for similar throughput).
    #[arg(long, default_value_t = 1000)]
    pub batch_max: usize,
    /// Held events (waiting for a tenant or the lifecycle) before the partitions holding them
    /// are paused.
    #[arg(long, default_value_t = 10_000)]
    pub max_held: usize,
    /// Held events' size in MiB before the partitions holding them are paused.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub max_held_mib: usize,
    /// How long an event may wait for a tenant that does not exist or is not active; then it
    /// goes to the dead-letter topic naming that tenant (replay it once the tenant exists).
    #[arg(long, default_value = "3d", value_parser = humantime::parse_duration)]
    pub hold_for: Duration,
    /// Attempts at an event whose failure may heal (deadlock, missing table) before it is
    /// dead-lettered. Outages of MySQL, Redis, the broker or the schema registry are waited out instead.
    #[arg(long, default_value_t = 8)]
    pub max_attempts: u32,
    /// How long a terminated tenant stays archived (restorable) before it is purged, e.g. 30d,
    /// 12h, 90s. Must be the same for every worker and for replays.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// How often the purge timer looks for archives past their grace period.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub purge_check: Duration,
    /// Crash tests: abort the process right after this lifecycle step (archive, restore-move).
    #[arg(long, hide = true)]
    pub fail_after: Option<String>,
}

pub async fn run(config: Config, args: RunArgs) -> anyhow::Result<ExitCode> {
    let shutdown = super::shutdown_on_signal();
    let health = Health::default();
    let http = match args.http.0 {
        Some(addr) => Some(stream::health::serve(addr, health.clone(), shutdown.clone()).await?),
        None => None,
    };
    let ns = config.namespace.clone();
    let lifecycle = WorkerOptions {
        // Each write in flight holds two connections (a tenant's named lock and its
        // transaction): a pool of less than twice the writes of all three processors could
        // starve itself. A few more for gating and status.
        db_connections: (2
            * (2 * args.write_concurrency.max(1) + args.provision_concurrency.max(1))
            + 4) as u32,
        grace: args.grace,
        purge_check: args.purge_check,
        fail_after: args.fail_after.clone(),
    };
    let Processors {
        pool,
        tenants,
        codec,
        producer,
        dead_letters,
        provisioner,
        catalog,
        purger,
        timer,
    } = Processors::build(&config, &lifecycle).await?;
    upgrade_tenant_databases(&pool, &config.database_url, &tenants).await?;
    let settings = Settings {
        batch_max: args.batch_max,
        max_held: args.max_held,
        max_held_bytes: args.max_held_mib << 20,
        hold_for: args.hold_for,
        max_attempts: args.max_attempts.max(1),
        leave_group_on_exit: args.leave_group_on_exit,
        write_concurrency: args.write_concurrency.max(1),
        ..Settings::default()
    };
    let membership = consumer::Membership {
        session_timeout: Duration::from_millis(args.session_timeout_ms),
        assignor: args.assignor,
    };
    let enabled = |name: &str| args.processors.iter().any(|p| p == name);
    // Only the enabled processors join their groups: an idle member would hold partitions.
    let loop_of = |p: &'static str, topics: Vec<Topic>| -> anyhow::Result<Option<_>> {
        if !enabled(p) {
            return Ok(None);
        }
        let group = format!("{ns}.{p}");
        let names: Vec<String> = topics.iter().map(|t| t.name(&ns)).collect();
        let consumer = consumer::join(&config, p, &group, &names, &membership)?;
        tracing::info!(namespace = %ns, processor = p, %group, topics = %names.join(","), "processor running");
        Ok(Some((consumer, health.processor(p, &group))))
    };
    let provisioner_loop = loop_of("provisioner", vec![Topic::Organisations])?;
    let catalog_loop = loop_of("catalog", vec![Topic::BrandCatalog, Topic::BrandAccess])?;
    let purger_loop = loop_of("purger", vec![Topic::Tenancy])?;
    tracing::info!(namespace = %ns, grace = %humantime::format_duration(args.grace),
        hold_for = %humantime::format_duration(args.hold_for), "worker started");

    let reporter = tokio::spawn(crate::status::report(
        pool.clone(),
        ns.clone(),
        health.clone(),
        http.map(|a| a.to_string()),
        shutdown.clone(),
    ));
    // The loops run on this task (their futures are not Send, see stream::Processor).
    let provisioning = Settings {
        write_concurrency: args.provision_concurrency.max(1),
        ..settings.clone()
    };
    tokio::try_join!(
        run_loop(
            &provisioner,
            provisioner_loop,
            &codec,
            &dead_letters,
            &provisioning,
            &shutdown
        ),
        async {
            if enabled("provisioner") {
                timer.run(shutdown.clone()).await?;
            }
            anyhow::Ok(())
        },
        run_loop(
            &catalog,
            catalog_loop,
            &codec,
            &dead_letters,
            &settings,
            &shutdown
        ),
        run_loop(
            &purger,
            purger_loop,
            &codec,
            &dead_letters,
            &settings,
            &shutdown
        ),
    )?;
    producer
        .flush(Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("flushing produced events: {e}"))?;
    shutdown.cancel();
    let _ = reporter.await;
    pool.close().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

async fn run_loop<P: Processor>(
    processor: &P,
    joined: Option<(consumer::GroupConsumer, stream::health::ProcessorHealth)>,
    codec: &Codec,
    dead_letters: &DeadLetters,
    settings: &Settings,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let Some((consumer, health)) = joined else {
        return Ok(());
    };
    stream::run(
        processor,
        consumer,
        codec,
        dead_letters,
        health,
        settings,
        shutdown.clone(),
    )
    .await
}
