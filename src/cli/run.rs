//! `tenancy run`: start the processors and run them until told to stop.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use rdkafka::producer::Producer;

use crate::config::Config;
use crate::log::topics::Topic;
use crate::store::tenants::Tenants;
use crate::stream::health::Health;
use crate::stream::{self, consumer, Settings};
use crate::tenancy::provisioning::{check_servers, prepare_service_databases};
use crate::worker::{Processors, WorkerOptions};

/// The processors `tenancy run` can run, each its own consumer group `{ns}.{name}`.
pub const PROCESSORS: [&str; 4] = ["provisioner", "catalog", "purger", "domains"];

/// The topics each processor consumes.
pub fn topics_of(processor: &str) -> Vec<Topic> {
    match processor {
        "provisioner" => vec![Topic::Organisations],
        "catalog" => vec![Topic::BrandCatalog, Topic::BrandAccess],
        "purger" => vec![Topic::Tenancy],
        "domains" => vec![Topic::RetailerDomains],
        _ => Vec::new(),
    }
}

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
    /// purger, domains. Every worker of a namespace may run all of them; start more workers to
    /// scale out.
    #[arg(long, value_delimiter = ',', default_value = "provisioner,catalog,purger,domains",
        value_parser = PROCESSORS)]
    pub processors: Vec<String>,
    /// Serve /healthz, /readyz and /metrics here (`off` to serve nothing). Each worker on one
    /// host needs its own port (port 0 picks a free one and logs it).
    #[arg(long, default_value = "127.0.0.1:9464", value_name = "ADDR|off", value_parser = http_addr)]
    pub http: Listen,
    /// Consumer-group session timeout: how long before a dead worker's partitions move. The
    /// local broker also holds every JoinGroup for half of it, so it sets how soon a worker
    /// starts: 6 s gives a start in about 3.7 s.
    #[arg(long, default_value_t = consumer::DEFAULT_SESSION_TIMEOUT_MS, value_name = "MS")]
    pub session_timeout_ms: u64,
    /// Partition assignment protocol (every worker of a group must use the same).
    #[arg(long, value_enum, default_value = "cooperative-sticky")]
    pub assignor: consumer::Assignor,
    /// Always leave the consumer groups when stopping, so partitions move at once. Without it a
    /// worker leaves a group only when it is the group's one member and no rebalance is under
    /// way: the local broker (nisshi, Tansu) can wedge a group whose leader leaves
    /// mid-rebalance, so among several workers a stopped one's partitions move after the
    /// session timeout instead. Safe with Kafka.
    #[arg(long)]
    pub leave_group_on_exit: bool,
    /// Tenants written at the same time per MySQL server, per processor: each tenant's events
    /// are applied in its own lane, so a tenant that is slow or failing holds one of these and
    /// nobody else. The worker's pool per server is sized from it (two connections per write
    /// in flight on any server, per processor, plus four).
    #[arg(long, default_value_t = 4)]
    pub write_concurrency: usize,
    /// Tenant databases created and migrated at the same time (new organisations arriving
    /// together are provisioned as one unit, their DDL this many at a time; other lifecycle
    /// events this many organisations at a time). MariaDB's DDL is the bound: 500 new
    /// organisations (`scripts/bench-provisioning`) took 3.0–3.3 s at 4, 3.4 s at 8, 3.8 s at 2.
    #[arg(long, default_value_t = 4)]
    pub provision_concurrency: usize,
    /// Tenant databases migrated at once per MySQL server by the worker's background rollout
    /// (those behind the latest migration of their kind, found at start-up; their events wait
    /// until theirs is done). The rollout starts with one canary and halts past 10 % failures:
    /// `tenancy migrate` for more control.
    #[arg(long, default_value_t = 2)]
    pub migrate_parallel: usize,
    /// Most messages applied in one batch (memory grows with it: the catalog benchmark peaks at
    /// 78 MiB with 1000 and 221 MiB with 5000, for similar throughput).
    #[arg(long, default_value_t = 1000)]
    pub batch_max: usize,
    /// Events kept in memory per tenant (and per order key) while they wait. Past it, events
    /// for a tenant that does not exist yet go to the dead-letter topic with the reason
    /// (replay them once it exists); events of a tenant being retried, or waiting for its
    /// server, stay in the log and are read again when it is released. No partition is ever
    /// paused for one tenant.
    #[arg(long, default_value_t = 10_000)]
    pub max_held: usize,
    /// Held events' size in MiB in all: past it, further events stay in the log and are read
    /// again when their tenant is released.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub max_held_mib: usize,
    /// How long an event may wait for a tenant that does not exist or is not active; then it
    /// goes to the dead-letter topic naming that tenant (replay it once the tenant exists).
    #[arg(long, default_value = "3d", value_parser = humantime::parse_duration)]
    pub hold_for: Duration,
    /// Attempts at an event whose failure belongs to its tenant (a lock wait, a statement over
    /// its time limit, a missing table) before it is dead-lettered; between attempts the tenant
    /// is parked and every other tenant goes on. A MySQL server that does not answer is waited
    /// out for its own tenants (nothing dead-lettered); the home server, Redis, the broker and
    /// the schema registry are waited out by the whole worker.
    #[arg(long, default_value_t = 8)]
    pub max_attempts: u32,
    /// Longest one attempt at a tenant's events may take; past it the tenant's server is probed
    /// (no answer: its tenants wait for it; an answer: the attempt counts as failed).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub apply_timeout: Duration,
    /// Longest a statement of the processors may run (MariaDB's max_statement_time; MySQL's
    /// max_execution_time, which bounds SELECTs only).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub statement_timeout: Duration,
    /// Longest a statement waits for a lock another session holds (innodb_lock_wait_timeout
    /// and lock_wait_timeout): a tenant's locked table costs that tenant an attempt, no more.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub lock_wait_timeout: Duration,
    /// How long a terminated tenant stays archived (restorable) before it is purged, e.g. 30d,
    /// 12h, 90s. Must be the same for every worker and for replays.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// How often the purge timer looks for archives past their grace period.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub purge_check: Duration,
    /// Crash tests: abort the process right after this step (archive, restore-move,
    /// domain-index). Only with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true, value_enum)]
    pub fail_after: Option<crate::fault::FailPoint>,
}

pub async fn run(config: Config, args: RunArgs) -> anyhow::Result<ExitCode> {
    let shutdown = super::shutdown_on_signal();
    let health = Health::default();
    let ns = config.namespace.clone();
    let enabled = |name: &str| args.processors.iter().any(|p| p == name);
    // Registered before /readyz is served, so a starting worker is not ready until every
    // processor has joined its group.
    let mut processors = Vec::new();
    for name in PROCESSORS {
        let topics = topics_of(name);
        if enabled(name) {
            let group = format!("{ns}.{name}");
            let reporting = health.processor(name, &group);
            processors.push((name, topics, group, reporting));
        }
    }
    let http = match args.http.0 {
        Some(addr) => Some(stream::health::serve(addr, health.clone(), shutdown.clone()).await?),
        None => None,
    };
    // The worker's own work (topics, service databases, the status reporter) on a
    // small pool; each processor brings its own.
    let servers = crate::store::servers::Servers::connect(&config, 4).await?;
    let pool = servers.home().pool().clone();
    crate::log::topics::ensure_topics(&config).await?;
    prepare_service_databases(&pool, &config.database_url, &ns).await?;
    let tenants = Tenants::on(servers, &ns);
    check_servers(&tenants).await?;
    // Tenant databases behind the latest migration are brought up in the background, on
    // connections of their own: the worker consumes at once, and their events wait.
    let rollout = crate::tenancy::rollout::Options {
        parallel: args.migrate_parallel.max(1),
        ..Default::default()
    };
    let rollout_servers =
        crate::store::servers::Servers::connect(&config, (2 * rollout.parallel + 2) as u32).await?;
    let rollout_tenants = Tenants::on(rollout_servers, &ns);
    let rollout_ddl = crate::store::servers::Servers::ddl(&config, rollout.parallel as u32)?;
    let handle = tokio::runtime::Handle::current();
    // A thread of its own, driving the runtime's I/O (the rollout's future borrows across its
    // awaits in ways a spawned task's `Send` bound does not accept).
    std::thread::Builder::new()
        .name("rollout".into())
        .spawn(move || {
            handle.block_on(crate::tenancy::rollout::in_background(
                rollout_tenants,
                rollout_ddl,
                rollout,
            ))
        })
        .map_err(|e| anyhow::anyhow!("cannot start the migration rollout's thread: {e}"))?;
    let settings = Settings {
        batch_max: args.batch_max,
        max_held: args.max_held,
        max_held_bytes: args.max_held_mib << 20,
        hold_for: args.hold_for,
        max_attempts: args.max_attempts.max(1),
        leave_group_on_exit: args.leave_group_on_exit,
        write_concurrency: args.write_concurrency.max(1),
        apply_timeout: args.apply_timeout.max(Duration::from_secs(1)),
        ..Settings::default()
    };
    let membership = consumer::Membership {
        session_timeout: Duration::from_millis(args.session_timeout_ms),
        assignor: args.assignor,
    };
    // Lanes are per server, so a processor has `concurrency` writes in flight on each server
    // at once, and any of them may touch any server (a brand's copies on another one) and
    // takes its locks on home.
    let lanes = config.servers.len().max(1);
    let options = |concurrency: usize| WorkerOptions {
        // Each write in flight holds two connections (its named locks, on one connection, and
        // its transaction): fewer than twice the writes could starve the pool, every write
        // holding one and waiting for another. A few more for gating and the watermark.
        db_connections: (2 * concurrency * lanes + 4) as u32,
        grace: args.grace,
        purge_check: args.purge_check,
        #[cfg(feature = "fault-injection")]
        fail_after: args.fail_after,
        #[cfg(not(feature = "fault-injection"))]
        fail_after: None,
        // Done once above, not again by each processor's thread.
        prepare: false,
        limits: crate::store::pools::StatementLimits {
            statement: args.statement_timeout,
            lock_wait: args.lock_wait_timeout,
        },
    };
    let mut threads = Vec::new();
    // Only the enabled processors join their groups: an idle member would hold partitions.
    for (name, topics, group, reporting) in processors {
        let names: Vec<String> = topics.iter().map(|t| t.name(&ns)).collect();
        tracing::info!(namespace = %ns, processor = name, %group, topics = %names.join(","), "processor starting");
        let concurrency = if name == "provisioner" {
            args.provision_concurrency.max(1)
        } else {
            settings.write_concurrency
        };
        let job = ProcessorJob {
            name,
            config: config.clone(),
            options: options(concurrency),
            settings: Settings {
                write_concurrency: concurrency,
                ..settings.clone()
            },
            membership: membership.clone(),
            health: reporting,
            group,
            topics: names,
            shutdown: shutdown.clone(),
        };
        threads.push((name, on_own_thread(job)?));
    }
    tracing::info!(namespace = %ns, grace = %humantime::format_duration(args.grace),
        hold_for = %humantime::format_duration(args.hold_for), "worker started");

    let reporter = tokio::spawn(crate::status::report(
        pool.clone(),
        ns.clone(),
        health.clone(),
        http.map(|a| a.to_string()),
        shutdown.clone(),
    ));
    let results = tokio::task::spawn_blocking(move || {
        threads
            .into_iter()
            .map(|(name, t)| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the {name} thread panicked")))
                    .map_err(|e| e.context(format!("processor {name}")))
            })
            .collect::<Vec<_>>()
    })
    .await?;
    shutdown.cancel();
    let _ = reporter.await;
    pool.close().await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// What one processor's thread needs.
struct ProcessorJob {
    name: &'static str,
    config: Config,
    options: WorkerOptions,
    settings: Settings,
    membership: consumer::Membership,
    health: stream::health::ProcessorHealth,
    group: String,
    topics: Vec<String>,
    shutdown: tokio_util::sync::CancellationToken,
}

/// Runs one processor on a thread of its own, on its own single-threaded runtime with its own
/// clients (MySQL pool, producer, Redis): a slow catalog batch, waiting on MySQL or busy
/// building statements, never delays provisioning, and on two cores the processors really run
/// side by side. (The loop's futures are not `Send`, so they cannot be tokio tasks of one
/// runtime.) A processor that fails stops the others through `shutdown`, as one failing
/// worker should.
fn on_own_thread(job: ProcessorJob) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let name = job.name;
    let shutdown = job.shutdown.clone();
    Ok(std::thread::Builder::new()
        .name(format!("tenancy-{name}"))
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(run_processor(job)));
            if let Err(e) = &result {
                tracing::error!(processor = name, error = %format!("{e:#}"), "processor stopped: stopping the worker");
                shutdown.cancel();
            }
            result
        })?)
}

async fn run_processor(job: ProcessorJob) -> anyhow::Result<()> {
    let p = Processors::build(&job.config, &job.options).await?;
    let consumer = consumer::join(
        &job.config,
        job.name,
        &job.group,
        &job.topics,
        &job.membership,
    )?;
    let purge_check = job.options.purge_check;
    let ProcessorJob {
        name,
        health,
        settings,
        shutdown,
        ..
    } = job;
    let result = match name {
        "provisioner" => tokio::try_join!(
            run_loop(&p.provisioner, consumer, &p, health, &settings, &shutdown),
            p.timer.run(shutdown.clone()),
            async {
                // Old copies of rebuilt tenants expire on the purge timer's beat.
                crate::rebuild::kept::expire_every(
                    p.tenants.clone(),
                    purge_check,
                    shutdown.clone(),
                )
                .await;
                anyhow::Ok(())
            },
        )
        .map(|_| ()),
        "catalog" => run_loop(&p.catalog, consumer, &p, health, &settings, &shutdown).await,
        "purger" => run_loop(&p.purger, consumer, &p, health, &settings, &shutdown).await,
        "domains" => run_loop(&p.domains, consumer, &p, health, &settings, &shutdown).await,
        other => Err(anyhow::anyhow!("no processor named {other}")),
    };
    // What was published (outcomes, dead letters) leaves before the thread does.
    p.producer
        .flush(Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("flushing produced events: {e}"))?;
    for server in p.tenants.servers().all() {
        server.pool().close().await;
    }
    result
}

/// One processor's loop with the worker's codec and dead-letter topic.
async fn run_loop<P: stream::Processor>(
    processor: &P,
    consumer: consumer::GroupConsumer,
    p: &Processors,
    health: stream::health::ProcessorHealth,
    settings: &Settings,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    stream::run(
        processor,
        consumer,
        &p.codec,
        &p.dead_letters,
        health,
        settings,
        shutdown.clone(),
    )
    .await
}
