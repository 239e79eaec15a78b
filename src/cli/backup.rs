//! `tenancy backup` and `tenancy restore`: per-tenant snapshots that know their place in the
//! log ([`crate::backup`]), and restores from them ([`crate::rebuild::restore`]).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::backup::{take, Backup};
use crate::config::Config;
use crate::rebuild::replay::Replayed;
use crate::rebuild::{resolve, Mode, Rebuilder};
use crate::store::tenants::{Status, Tenants};

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// The tenant: organisation id, or `brand/SLUG`, `supplier/SLUG`, `retailer/SLUG`.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub tenant: Option<String>,
    /// Every active tenant, --parallel at a time.
    #[arg(long)]
    pub all: bool,
    /// The directory backups are written under, one directory each
    /// (`{kind}_{slug}_{UTC time}`).
    #[arg(long, default_value = "backups")]
    pub to: PathBuf,
    /// With --all: tenants backed up at the same time.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub parallel: u16,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The tenant: organisation id, or `brand/SLUG`, `supplier/SLUG`, `retailer/SLUG`.
    pub tenant: String,
    /// The backup directory (the one holding manifest.json).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["rollback", "drop_old"])]
    pub from: Option<PathBuf>,
    /// Replay only the tenant's events logged at or before this moment (RFC 3339, e.g.
    /// 2026-12-07T10:15:00Z): the tenant as it was then. Events after it stay in the log; a
    /// later `tenancy rebuild` would apply them again.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<i64>,
    /// Restore beside the live database and compare; change nothing. Exit 1 if they differ.
    #[arg(long)]
    pub dry_run: bool,
    /// How long the replaced tables are kept for --rollback after the swap; then a worker's
    /// purge timer drops them (--drop-old drops them sooner). E.g. 7d, 12h.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub keep_old: std::time::Duration,
    /// Bring back the tables the last restore (or rebuild) replaced, with the events applied
    /// since replayed into them: `tenancy rebuild ORG --rollback`.
    #[arg(long, conflicts_with_all = ["from", "drop_old", "dry_run", "until"])]
    pub rollback: bool,
    /// Drop the tables the last restore (or rebuild) replaced: `tenancy rebuild ORG --drop-old`.
    #[arg(long, conflicts_with_all = ["from", "dry_run", "until"])]
    pub drop_old: bool,
}

/// An RFC 3339 time as epoch milliseconds.
fn parse_time(raw: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(raw)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("{raw:?} is not an RFC 3339 time such as 2026-12-07T10:15:00Z ({e})"))
}

fn spinner() -> Option<ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("valid template"),
        )
    })
}

pub async fn backup(config: Config, args: BackupArgs) -> anyhow::Result<ExitCode> {
    use futures::stream::{self, StreamExt};
    let parallel = usize::from(args.parallel);
    let servers = crate::store::servers::Servers::connect(&config, (parallel + 2) as u32).await?;
    let tenants = Tenants::on(servers, &config.namespace);
    std::fs::create_dir_all(&args.to)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", args.to.display()))?;
    let names: Vec<String> = match &args.tenant {
        Some(name) => vec![name.clone()],
        None => tenants
            .list(Some(Status::Active))
            .await?
            .into_iter()
            .map(|r| r.organisation_id)
            .collect(),
    };
    let bar = spinner();
    if let (Some(bar), true) = (&bar, args.all) {
        bar.set_length(names.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} tenants {elapsed} (ETA {eta}) {msg}",
            )
            .expect("valid template"),
        );
    }
    let started = Instant::now();
    let results: Vec<(String, anyhow::Result<take::Taken>)> = stream::iter(names)
        .map(|name| {
            let (config, tenants, to, bar) = (&config, &tenants, &args.to, &bar);
            async move {
                let result = async {
                    let t = resolve(tenants, &name).await?;
                    let slug = tenants
                        .find(&t.organisation_id)
                        .await?
                        .into_iter()
                        .next()
                        .map(|r| r.slug)
                        .unwrap_or_default();
                    let label = format!("{}/{slug}", t.kind.db_word());
                    let rows = |n: u64| match bar {
                        Some(bar) if bar.length().is_none() => {
                            bar.set_message(format!("{label}: {n} rows"))
                        }
                        _ => {}
                    };
                    let taken = take::take(config, &t, &slug, to, &rows).await;
                    taken.map(|taken| (label, taken))
                }
                .await;
                if let Some(bar) = bar {
                    bar.inc(1);
                }
                match result {
                    Ok((label, taken)) => (label, Ok(taken)),
                    Err(e) => (name, Err(e)),
                }
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let (mut rows, mut failed) = (0u64, 0usize);
    for (name, result) in &results {
        match result {
            Ok(taken) => {
                let m = &taken.manifest;
                rows += m.rows();
                println!(
                    "{name}: {} rows of {} tables at migration {} in {:.1} s -> {}",
                    m.rows(),
                    m.tables.len(),
                    m.migration_version,
                    taken.elapsed.as_secs_f64(),
                    taken.dir.display()
                );
            }
            Err(e) => {
                failed += 1;
                println!("{name}: failed: {e:#}");
            }
        }
    }
    if results.len() > 1 {
        println!(
            "{} tenant(s) backed up, {failed} failed: {rows} rows in {:.1} s",
            results.len() - failed,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn restore(config: Config, args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let Some(from) = &args.from else {
        // --rollback or --drop-old: the rebuild's, on the same replaced tables.
        let r = Rebuilder::new(&config, Default::default()).await?;
        let t = resolve(&r.tenants, &args.tenant).await?;
        if args.drop_old {
            return super::rebuild::drop_old(&r, &t).await;
        }
        let replayed = r.rollback(&t).await?;
        println!(
            "rolled back {}: the tables before the restore are live again ({} events applied since replayed into them)",
            t.organisation_id, replayed.applied
        );
        return Ok(ExitCode::SUCCESS);
    };
    let backup = Backup::open(from)?;
    let access = crate::log::topics::Topic::BrandAccess.name(&config.namespace);
    let options = crate::rebuild::Options {
        keep_old: args.keep_old,
        access_from: backup
            .manifest
            .log
            .iter()
            .filter(|s| s.topic == access)
            .map(|s| (s.partition, s.from))
            .collect(),
        ..Default::default()
    };
    let r = Rebuilder::new(&config, options).await?;
    let t = resolve(&r.tenants, &args.tenant).await?;
    let mode = match args.dry_run {
        true => Mode::DryRun,
        false => Mode::Swap {
            accept_differences: true,
        },
    };
    let bar = spinner();
    let total = backup.manifest.rows();
    let started = Instant::now();
    let loaded = |n: u64| match &bar {
        Some(bar) => bar.set_message(format!("loading the backup: {n} of {total} rows")),
        None if n == total => {
            tracing::info!(tenant = %t.organisation_id, rows = n, "backup loaded")
        }
        None => {}
    };
    let tenant = t.organisation_id.clone();
    let report = |done: &Replayed, at: &HashMap<i32, i64>| {
        let rate = done.read as f64 / started.elapsed().as_secs_f64().max(0.001);
        let msg = format!(
            "catching up from the log: {} messages read ({rate:.0}/s), {} of the tenant's events applied; at offsets {at:?}",
            done.read, done.applied
        );
        match &bar {
            Some(bar) => bar.set_message(msg),
            None => tracing::info!(%tenant, "restoring: {msg}"),
        }
    };
    let restored = r
        .restore(&t, &backup, args.until, mode, &loaded, report)
        .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let restored = restored?;
    let outcome = &restored.outcome;
    for (table, (live, rebuilt)) in &outcome.comparison.counts {
        println!("{table}: {live} rows live, {rebuilt} restored");
    }
    let differences = &outcome.comparison.differences;
    for d in differences.iter().take(50) {
        println!("difference: {d}");
    }
    if differences.len() > 50 {
        println!("… and {} more differences", differences.len() - 50);
    }
    println!(
        "restored {} from {} ({} rows, taken {}, loaded in {:.1} s), then {} of its events from the log ({} messages read) in {:.1} s{}; {}",
        outcome.database,
        backup.dir.display(),
        restored.rows_loaded,
        backup.manifest.taken_at,
        restored.load_elapsed.as_secs_f64(),
        outcome.replayed.applied,
        outcome.replayed.read,
        outcome.elapsed.as_secs_f64(),
        match restored.compared {
            true => format!(" (the comparison {:.1} s)", outcome.comparison.elapsed.as_secs_f64()),
            false => String::new(),
        },
        match (restored.live_was_missing, restored.compared) {
            (true, _) => "the live database was missing".to_owned(),
            (false, true) => format!("{} difference(s) from the live database", differences.len()),
            (false, false) => "not compared with the live database (--dry-run compares)".to_owned(),
        }
    );
    match &outcome.swapped_to {
        Some(old) => {
            println!(
                "swapped in; writes held {} ms; the replaced tables are kept in {old} for {} (`tenancy restore {} --rollback` brings them back, `--drop-old` drops them)",
                outcome.pause.as_millis(),
                humantime::format_duration(args.keep_old),
                t.organisation_id
            );
            Ok(ExitCode::SUCCESS)
        }
        None => {
            println!("dry run: nothing changed");
            Ok(match differences.is_empty() {
                true => ExitCode::SUCCESS,
                false => ExitCode::FAILURE,
            })
        }
    }
}
