//! `tenancy migrate`: the rolling migration of tenant databases ([`crate::tenancy::rollout`]),
//! run by hand, with a progress bar on a terminal and a line per tenant elsewhere.

use std::io::IsTerminal;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;
use crate::store::tenants::Tenants;
use crate::tenancy::provisioning::prepare_service_databases;
use crate::tenancy::rollout::{self, Done, Options, Progress};
use crate::tenant::OrganisationType;

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Only tenants of this kind (brand, supplier, retailer).
    #[arg(long, value_parser = super::tenants::parse_kind)]
    pub kind: Option<OrganisationType>,
    /// Tenant databases migrated at the same time on each MySQL server.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// List the tenant databases behind their latest migration; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Try again the tenants named (organisation id or slug), whose migration failed, once the
    /// cause is fixed. Only they are migrated. Repeatable.
    #[arg(long, value_name = "ORG")]
    pub retry: Vec<String>,
    /// Migrate this many tenants one at a time first: if one fails, stop before the rest.
    #[arg(long, default_value_t = 1)]
    pub canary: usize,
    /// A tenant to be a canary (organisation id or slug), migrated first, in the order given;
    /// repeatable. The first behind make up the rest of --canary. Refused if it is not behind.
    #[arg(long, value_name = "ORG")]
    pub canary_tenant: Vec<String>,
    /// After the canary, go on in waves of this many tenants: a wave starts only when the one
    /// before ended within --max-failures. Default: the rest in one wave.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub wave: Option<u32>,
    /// Halt once more than this share of the tenants failed (0 to 1; 0: at the first failure).
    #[arg(long, default_value_t = 0.1)]
    pub max_failures: f64,
}

/// Exit 0 when every tenant it set out to migrate is at its latest version (or, with
/// `--dry-run`, when none is behind), 1 otherwise.
pub async fn run(config: Config, args: MigrateArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..=1.0).contains(&args.max_failures) {
        anyhow::bail!(
            "--max-failures is a share of the tenants, 0 to 1, not {}",
            args.max_failures
        );
    }
    let servers =
        crate::store::servers::Servers::connect(&config, (2 * args.parallel.max(1) + 2) as u32)
            .await?;
    prepare_service_databases(
        servers.home().pool(),
        &config.database_url,
        &config.namespace,
    )
    .await?;
    let tenants = Tenants::on(servers, &config.namespace);
    let ddl = crate::store::servers::Servers::ddl(&config, args.parallel.max(1) as u32)?;
    let mut only = None;
    if !args.retry.is_empty() {
        let mut ids = Vec::new();
        for org in &args.retry {
            ids.push(one_tenant(&tenants, org).await?);
        }
        only = Some(ids);
    }
    let mut canary_named = Vec::new();
    for org in &args.canary_tenant {
        canary_named.push(one_tenant(&tenants, org).await?);
    }
    let options = Options {
        canary_named,
        wave: args.wave.map(|n| n as usize),
        kind: args.kind,
        parallel: args.parallel.max(1),
        only,
        canary: args.canary,
        max_failures: args.max_failures,
        dry_run: args.dry_run,
    };
    if args.dry_run {
        let list = rollout::behind(&tenants, &options).await?;
        for b in &list {
            println!(
                "{}\t{}\t{}\tversion {} -> {}\t{}",
                b.tenant.organisation_type.db_word(),
                b.tenant.slug,
                b.database,
                b.tenant
                    .migration_version
                    .map_or("unknown".to_owned(), |v| v.to_string()),
                b.latest,
                b.tenant.organisation_id
            );
        }
        eprintln!("{} tenant database(s) behind; nothing changed", list.len());
        return Ok(if list.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let terminal = std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    let report = rollout::run(&tenants, &ddl, &options, |p| match p {
        Progress::Started { total } => {
            eprintln!("{total} tenant database(s) behind their latest migration");
            if terminal && total > 0 {
                let b = ProgressBar::new(total as u64).with_style(
                    ProgressStyle::with_template(
                        "{bar:30} {pos}/{len} tenants, {elapsed} so far, about {eta} left {msg}",
                    )
                    .expect("valid template"),
                );
                bar = Some(b);
            }
        }
        Progress::Finished { behind, done } => {
            let line = match done {
                Done::Migrated(v) => format!("migrated to {v}"),
                Done::Skipped(why) => format!("skipped: {why}"),
                Done::Later(why) => format!("not done, try again: {why}"),
                Done::Failed(why) => format!("FAILED: {why}"),
            };
            let line = format!(
                "{} {} ({}): {line}",
                behind.tenant.organisation_type.db_word(),
                behind.tenant.slug,
                behind.tenant.organisation_id
            );
            match &bar {
                Some(b) => {
                    if matches!(done, Done::Failed(_)) {
                        b.println(&line);
                    }
                    b.inc(1);
                }
                None => eprintln!("{line}"),
            }
        }
        Progress::Wave {
            wave,
            waves,
            tenants,
        } => {
            if waves > 1 {
                let line = format!("wave {wave} of {waves}: {tenants} tenant(s)");
                match &bar {
                    Some(b) => b.println(&line),
                    None => eprintln!("{line}"),
                }
            }
        }
        Progress::Halted { reason } => {
            let line = format!("halted: {reason}");
            match &bar {
                Some(b) => b.println(&line),
                None => eprintln!("{line}"),
            }
        }
    })
    .await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    println!(
        "{} migrated, {} failed, {} skipped, {} to try again of {}{}",
        report.migrated,
        report.failed.len(),
        report.skipped,
        report.later,
        report.total,
        report
            .halted
            .as_deref()
            .map_or(String::new(), |r| format!("; halted: {r}"))
    );
    for (id, reason) in &report.failed {
        println!("failed\t{id}\t{reason}");
    }
    let clean = report.failed.is_empty()
        && report.halted.is_none()
        && report.skipped == 0
        && report.later == 0;
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The organisation id of the one tenant (not purged) `org` names: an id, a slug, or
/// `kind/slug`.
async fn one_tenant(tenants: &Tenants, org: &str) -> anyhow::Result<String> {
    let (kind, key) = match org.split_once('/') {
        Some((kind, slug)) => (
            Some(super::tenants::parse_kind(kind).map_err(anyhow::Error::msg)?),
            slug,
        ),
        None => (None, org),
    };
    let rows = tenants.find(key).await?;
    let live: Vec<_> = rows
        .iter()
        .filter(|r| r.status != crate::store::tenants::Status::Purged)
        .filter(|r| kind.is_none_or(|k| r.organisation_type == k))
        .collect();
    match live.as_slice() {
        [one] => Ok(one.organisation_id.clone()),
        [] => anyhow::bail!("no tenant {org:?} (organisation id or slug)"),
        _ => anyhow::bail!("{org:?} names several tenants: give the organisation id"),
    }
}
