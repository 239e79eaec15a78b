//! The `tenancy` command line: one subcommand per job, each with its own `--help`.

mod access;
mod backup;
mod dead_letter;
mod emit;
mod migrate;
mod rebuild;
mod run;
mod serve;
mod status;
mod tenants;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConnectionArgs};

/// Blindstrader tenancy: Avro events in Kafka become one MySQL database per tenant.
///
/// Connection settings come from flags, else the environment (KAFKA_BOOTSTRAP_SERVERS,
/// SCHEMA_REGISTRY_URL, DATABASE_URL, REDIS_URL, TENANCY_NAMESPACE), else local defaults.
#[derive(Debug, Parser)]
#[command(name = "tenancy", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the stream processors until SIGTERM or ctrl-c.
    ///
    /// Joins the consumer groups {ns}.provisioner, {ns}.catalog, {ns}.purger and {ns}.domains;
    /// start more
    /// copies (on any host) to scale out, stop or kill them at will: partitions move to the
    /// others and nothing is lost or applied twice. Creates the namespace's topics and service
    /// databases first if missing, and brings tenant databases behind the latest migration up
    /// to it in the background (their events wait meanwhile; see `tenancy migrate`).
    /// On shutdown the batch in progress is finished and its offsets committed.
    Run(run::RunArgs),
    /// Where each processor's group stands per partition and who owns it, which workers are
    /// alive and ready, and what they hold for which tenant.
    Status(status::StatusArgs),
    /// Bring every tenant database behind the latest migration of its kind up to it.
    ///
    /// Workers do the same in the background when they start; this is the rollout by hand:
    /// --parallel tenants at a time per MySQL server, a --canary first, halting past
    /// --max-failures, with progress and an estimate of the time left. Resumable: run it again
    /// after a crash. A tenant whose migration fails is marked with the reason (`tenancy
    /// status` lists it), its events wait, the rest go on; --retry ORG after the fix.
    Migrate(migrate::MigrateArgs),
    /// Validate JSON lines and produce them as Avro events.
    ///
    /// Each line is {"type": "OrganisationCreated", ...fields}; event_id and occurred_at may be
    /// left out. The whole input is checked first; if any line is bad, every error is printed
    /// (line and field) and nothing is sent. Prints topic/partition/offset per event.
    Emit(emit::EmitArgs),
    /// Serve the Confluent-compatible schema registry (the subset clients use).
    Registry(RegistryArgs),
    /// Manage the namespace's Kafka topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Inspect and change tenants ({ns}_platform.tenants).
    Tenants {
        #[command(subcommand)]
        command: tenants::TenantsCommand,
    },
    /// Supplier → brand permissions, through the Redis permission cache.
    Access {
        #[command(subcommand)]
        command: access::AccessCommand,
    },
    /// Benchmarks (figures only mean something from a --release build).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Rebuild a tenant's database from the topics beside the live one, compare, and swap it
    /// in atomically while the workers keep running.
    ///
    /// Replays every event of the tenant from offset 0 into {ns}_shadow_{id} with the live
    /// projection code, catches up with the live database under the tenant's locks, compares
    /// every table (rows by primary key, write-time columns ignored) and prints the
    /// differences, then swaps with one RENAME TABLE. The replaced tables stay in
    /// {ns}_old_{id} for --rollback until --drop-old. Publishes nothing, writes no Redis key,
    /// touches no other tenant. Brands, suppliers (grants replayed from {ns}.brand-access,
    /// copies backfilled from the brands' live projections) and retailers (domain events
    /// replayed from {ns}.retailer-domains).
    Rebuild(rebuild::RebuildArgs),
    /// Write a consistent snapshot of a tenant database (or of every active one) that knows
    /// its place in the log.
    ///
    /// One transaction per tenant (its writers are not blocked; a migration of it waits): every
    /// table as JSON lines, and a manifest.json with the tenant, its server, the migration
    /// version, the offsets the log must be read from to bring it up to date, row counts and
    /// SHA-256 checksums. Written as DIR/{kind}_{slug}_{time}.partial, renamed when complete.
    /// Backups are files outside the platform: a purge cannot reach them (delete a purged
    /// tenant's backups by your retention rules).
    Backup(backup::BackupArgs),
    /// Restore a tenant from a backup and the log since it, beside the live database, and swap
    /// it in as a rebuild does.
    ///
    /// Loads the backup into {ns}_shadow_{id} at its migration version, migrates it, replays
    /// the tenant's events from the backup's offsets up to what the live database holds (or to
    /// the log's end if the live database was dropped; --until: to a moment), and swaps with
    /// one RENAME TABLE (--dry-run compares with the live database instead). Works when the log's start was trimmed, as long as it
    /// still holds the backup's offsets (otherwise refused, naming the offsets gone). The
    /// replaced tables stay in {ns}_old_{id} for --rollback, until --drop-old.
    Restore(backup::RestoreArgs),
    /// Serve the tenant API: brand catalogs for suppliers (bearer tokens), retailers by host.
    ///
    /// GET /api/brands/{slug}/fabrics (or /api/fabrics on SLUG.brand.BASE) answers a supplier
    /// holding catalog.read on the brand, with prices only for pricing.read; GET
    /// /api/retailer/profile answers on SLUG.BASE or a retailer's custom domain. Errors are
    /// JSON: 400 bad slug or host, 401 bad token, 403 no access, 404 unknown tenant, 410
    /// archived, 503 (Retry-After) while a tenant is archived or restored, or when busy.
    /// /metrics, /healthz and /readyz (MySQL and Redis answer) on the same address. A catalog
    /// page read once is answered from memory until the brand's catalog changes (see
    /// --page-cache-ttl). Needs TENANCY_TOKEN_KEY.
    Serve(serve::ServeArgs),
    /// Bearer tokens for `tenancy serve`.
    Tokens {
        #[command(subcommand)]
        command: serve::TokensCommand,
    },
    /// Inspect and replay events in {ns}.dead-letter.
    DeadLetter {
        #[command(subcommand)]
        command: dead_letter::DeadLetterCommand,
    },
}

impl Command {
    /// Whether the command prints its answer and ends (everything but the servers).
    pub fn is_one_shot(&self) -> bool {
        !matches!(
            self,
            Command::Run(_) | Command::Registry(_) | Command::Serve(_)
        )
    }
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create every topic of the namespace that is missing (partitions from --partitions).
    Create,
    /// How far each processor's consumer group is behind the end of its topics.
    Lag {
        /// Only these processors (default: all).
        #[arg(value_parser = run::PROCESSORS)]
        processors: Vec<String>,
        /// Wait (up to this many seconds) until every group has caught up; exit 1 if not.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Rewind a processor's consumer group to the start of its topics, to rebuild its
    /// projections by replay. Stop that processor's workers first.
    Rewind {
        /// provisioner, catalog, purger or domains
        #[arg(value_parser = run::PROCESSORS)]
        processor: String,
        /// How long to wait for the group's members to go (a killed worker's session lasts
        /// --session-timeout-ms) before refusing.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Catalog events from Kafka into brand DBs and supplier copies (--scenario narrow or
    /// wide), without and with the event-id records, against the best plain client path for the
    /// same writes in the same run. Uses a fresh namespace (benchXXXXXX) and drops its
    /// databases afterwards unless --keep.
    Catalog(crate::bench::catalog::BenchArgs),
    /// The broker's own produce and consume rates for plain messages (no processing): the
    /// ceiling the processors sit under.
    Broker(crate::bench::broker::BrokerArgs),
    /// From emitting N catalog events to the last one applied, next to a plain consumer's rate
    /// for the same messages.
    E2e(crate::bench::e2e::E2eArgs),
    /// One brand with many catalog events rebuilt online by `tenancy rebuild`, next to plain
    /// upserts of the same rows.
    Rebuild(crate::bench::rebuild::RebuildBenchArgs),
    /// `tenancy serve`'s GET /api/brands/{slug}/fabrics over many brands with warm caches,
    /// next to the same SELECT sent straight to MariaDB with as many clients and connections;
    /// prints requests/s, p50 and p99 of both and their ratio.
    Serve(crate::bench::serve::ServeBenchArgs),
    /// The catalog workload over N brands twice: every brand healthy, then one brand's table
    /// locked for the whole run; prints the other brands' throughput and p99 apply latency in
    /// both, and `ratio isolated/healthy`. Fresh namespaces, dropped afterwards unless --keep.
    Isolation(crate::bench::isolation::IsolationArgs),
    /// A fleet of brand databases one migration behind: the rolling migration's wall time next
    /// to the same SQL from as many plain clients, then `tenancy run`'s time from its start to
    /// its first applied event with that fleet. Fresh namespace, dropped unless --keep.
    Migrate(crate::bench::migrate::MigrateBenchArgs),
    /// One brand of many events: `tenancy backup` next to `mariadb-dump --single-transaction`,
    /// then (after more events) `tenancy restore` next to loading that dump with `mariadb`, and
    /// `tenancy rebuild` of the same tenant. Fresh namespace, dropped unless --keep.
    Backup(crate::bench::backup::BackupBenchArgs),
}

#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// Directory holding the registry's state (created if missing).
    #[arg(
        long,
        env = "SCHEMA_REGISTRY_DATA_DIR",
        default_value = ".stack/registry"
    )]
    pub data_dir: PathBuf,
}

/// Runs the parsed command; the exit code says success, or "not found"/"not allowed" answers.
pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut config = Config::resolve(&cli.connection)?;
    if matches!(cli.command, Command::Bench { .. }) {
        // The benchmarks write their raw baselines straight into the home server's databases
        // and compare against them: every tenant of theirs is placed there.
        config.home_only();
    }
    match cli.command {
        Command::Run(args) => run::run(config, args).await,
        Command::Status(args) => status::run(config, args).await,
        Command::Migrate(args) => migrate::run(config, args).await,
        Command::Backup(args) => backup::backup(config, args).await,
        Command::Restore(args) => backup::restore(config, args).await,
        Command::Emit(args) => emit::emit(config, args).await,
        Command::Registry(args) => {
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
            tracing::info!(addr = %args.listen, data_dir = %args.data_dir.display(), "schema registry listening");
            let shutdown = shutdown_on_signal();
            blindstrader_registry::serve(listener, args.data_dir, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topics {
            command: TopicsCommand::Create,
        } => {
            crate::log::topics::ensure_topics(&config).await?;
            for t in crate::log::topics::Topic::ALL {
                println!("{}", t.name(&config.namespace));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Topics {
            command: TopicsCommand::Lag { processors, wait },
        } => lag(&config, &processors, wait).await,
        Command::Topics {
            command: TopicsCommand::Rewind { processor, wait },
        } => {
            let (_, group, topics) = processor_topics(&config.namespace)
                .into_iter()
                .find(|(p, _, _)| *p == processor)
                .expect("processor names are checked by clap");
            eprintln!("group {group}: joining to take every partition (waits for stopped workers' sessions to expire)");
            let n = tokio::task::spawn_blocking({
                let config = config.clone();
                let group = group.clone();
                let topics = topics.clone();
                move || crate::log::kafka::rewind_group(&config, &group, &topics, wait)
            })
            .await??;
            eprintln!(
                "group {group}: {n} partition(s) of {} rewound to offset 0",
                topics.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Tenants { command } => tenants::run(config, command).await,
        Command::Bench {
            command: BenchCommand::Catalog(args),
        } => {
            crate::bench::catalog::run(config, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Broker(args),
        } => {
            crate::bench::broker::run(config, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::E2e(args),
        } => {
            crate::bench::e2e::run(config, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Rebuild(args),
        } => {
            crate::bench::rebuild::run(config, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Serve(args),
        } => {
            crate::bench::serve::run(config, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Migrate(args),
        } => {
            crate::bench::migrate::run(config, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Backup(args),
        } => {
            crate::bench::backup::run(config, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Isolation(args),
        } => {
            crate::bench::isolation::run(config, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Access { command } => access::run(config, command).await,
        Command::DeadLetter { command } => dead_letter::run(config, command).await,
        Command::Rebuild(args) => rebuild::run(config, args).await,
        Command::Serve(args) => serve::serve(config, args).await,
        Command::Tokens { command } => serve::tokens(command),
    }
}

/// Each processor, its group and the topics it consumes.
fn processor_topics(ns: &crate::tenant::Namespace) -> Vec<(&'static str, String, Vec<String>)> {
    run::PROCESSORS
        .iter()
        .map(|p| {
            (
                *p,
                format!("{ns}.{p}"),
                run::topics_of(p).iter().map(|t| t.name(ns)).collect(),
            )
        })
        .collect()
}

async fn lag(config: &Config, only: &[String], wait: Option<u64>) -> anyhow::Result<ExitCode> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait.unwrap_or(0));
    loop {
        let config = config.clone();
        let only = only.to_vec();
        let report = tokio::task::spawn_blocking(move || {
            processor_topics(&config.namespace)
                .into_iter()
                .filter(|(p, _, _)| only.is_empty() || only.iter().any(|o| o == p))
                .map(|(_, group, topics)| {
                    let rows = crate::log::kafka::group_lag(&config, &group, &topics)?;
                    let behind: i64 = rows
                        .iter()
                        .map(crate::log::kafka::GroupPosition::behind)
                        .sum();
                    anyhow::Ok((group, behind))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await??;
        let total: i64 = report.iter().map(|(_, b)| b).sum();
        if wait.is_none() || total == 0 || std::time::Instant::now() >= deadline {
            for (group, behind) in &report {
                println!("{group}\t{behind} event(s) behind");
            }
            return Ok(if wait.is_some() && total > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// A token cancelled on SIGTERM or ctrl-c.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        ctrl_c.await.ok();
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("tenancy").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn run_parses_with_defaults_and_with_every_flag() {
        let Command::Run(args) = parse(&["run"]).command else {
            panic!("not run")
        };
        assert_eq!(
            args.http,
            run::Listen(Some("127.0.0.1:9464".parse().unwrap()))
        );
        assert_eq!(
            args.processors,
            ["provisioner", "catalog", "purger", "domains"]
        );
        let Command::Run(args) = parse(&[
            "run",
            "--http",
            "off",
            "--processors",
            "catalog",
            "--hold-for",
            "2s",
            "--max-attempts",
            "3",
            "--max-held",
            "5",
            "--max-held-mib",
            "1",
            "--grace",
            "1h",
        ])
        .command
        else {
            panic!("not run")
        };
        assert_eq!(args.http, run::Listen(None));
        assert_eq!(args.hold_for, std::time::Duration::from_secs(2));
        assert!(Cli::try_parse_from(["tenancy", "run", "--http", "nowhere"]).is_err());
        assert!(Cli::try_parse_from(["tenancy", "run", "--processors", "nope"]).is_err());
    }

    #[test]
    fn every_subcommand_parses() {
        for args in [
            &["status", "--json"][..],
            &["topics", "lag", "catalog", "--wait", "3"],
            &["topics", "rewind", "purger"],
            &["tenants", "list"],
            &["dead-letter", "list"],
        ] {
            parse(args);
        }
    }
}
