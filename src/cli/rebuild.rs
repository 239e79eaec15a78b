//! `tenancy rebuild`: rebuild a tenant's database from the topics, online.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;
use crate::rebuild::replay::Replayed;
use crate::rebuild::{resolve, Mode, Rebuilder};
use crate::store::tenants::Status;
use crate::tenant::OrganisationType;

#[derive(Debug, clap::Args)]
pub struct RebuildArgs {
    /// The tenant: organisation id, or `brand/SLUG`, `supplier/SLUG`, `retailer/SLUG`.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub tenant: Option<String>,
    /// Every active brand, a few at a time (--parallel), with one summary at the end.
    #[arg(long, conflicts_with_all = ["rollback", "drop_old"])]
    pub all: bool,
    /// With --all: tenants rebuilt at the same time (1 to 16; each takes up to 7 MySQL
    /// connections).
    #[arg(long, default_value_t = 2, requires = "all",
        value_parser = clap::value_parser!(u16).range(1..=16))]
    pub parallel: u16,
    /// Rebuild and compare with the live database; change nothing. Exit 1 if they differ.
    #[arg(long, conflicts_with_all = ["rollback", "drop_old", "accept_differences"])]
    pub dry_run: bool,
    /// Swap the rebuilt database in even when it differs from the live one (the differences
    /// are printed first). Without it, a rebuild that differs is not swapped in (exit 1).
    #[arg(long)]
    pub accept_differences: bool,
    /// Bring back the tables the last rebuild replaced (kept in {ns}_old_{id}), with the events
    /// applied since replayed into them.
    #[arg(long, conflicts_with_all = ["drop_old", "accept_differences"])]
    pub rollback: bool,
    /// How long the replaced tables are kept for --rollback after a swap; then a worker
    /// (`tenancy run`, with its purge timer) drops them. E.g. 7d, 12h.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub keep_old: std::time::Duration,
    /// After the swap (or --rollback), rebuild every active supplier's copy of the brand from
    /// the tables now live, as a grant's backfill does. Without it a rebuild touches no other
    /// tenant, and suppliers keep what the replaced tables fanned out to them.
    #[arg(long, conflicts_with_all = ["dry_run", "drop_old", "archived"])]
    pub refresh_copies: bool,
    /// Rebuild an archived tenant's archive ({ns}_arc_{id}) from the events before its
    /// termination, instead of an active tenant's live database (with --all: every archived
    /// tenant instead of every active one). A supplier's archive holds its grants and no
    /// copies.
    #[arg(long)]
    pub archived: bool,
    /// Move the tenant to this MySQL server (a name from TENANCY_SERVERS, or `home`): the
    /// rebuilt database is built there, compared with the live one, and swapped in there; the
    /// tenant's row then names it, and the replaced tables stay on the server it left (as
    /// {ns}_old_{id}, until --keep-old or --drop-old). Move back the same way.
    #[arg(long, value_name = "SERVER", conflicts_with_all = ["rollback", "drop_old", "archived", "all"])]
    pub to_server: Option<String>,
    /// Drop the tables the last rebuild replaced (there is no rollback after this).
    #[arg(long, conflicts_with = "accept_differences")]
    pub drop_old: bool,
    /// Fence tests: hold the tenant's writes this long just before the swap.
    #[arg(long, hide = true, value_parser = humantime::parse_duration)]
    pub pause_before_swap: Option<std::time::Duration>,
    /// Crash tests: abort right after this step (shadow, half-run, replay, locked, moved,
    /// switched). Only with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true, value_enum)]
    pub fail_after: Option<crate::fault::FailPoint>,
    /// Tests: a brand's events applied per transaction, so a few events span several batches.
    #[arg(long, hide = true, default_value_t = crate::rebuild::replay::BATCH as u32,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub replay_batch: u32,
}

/// `--drop-old` (of `tenancy rebuild` and `tenancy restore`): the replaced tables dropped.
pub(super) async fn drop_old(
    r: &Rebuilder,
    t: &crate::store::tenants::TenantRef,
) -> anyhow::Result<ExitCode> {
    let dropped = r.drop_old(t).await?;
    println!(
        "{}",
        match dropped {
            true => "old tables dropped",
            false => "no old tables to drop",
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Differences printed per rebuild before the rest are only counted.
const SHOWN_DIFFERENCES: usize = 50;

pub async fn run(config: Config, args: RebuildArgs) -> anyhow::Result<ExitCode> {
    let options = crate::rebuild::Options {
        keep_old: args.keep_old,
        refresh_copies: args.refresh_copies,
        archived: args.archived,
        to_server: args.to_server.clone(),
        parallel: args.parallel.into(),
        replay_batch: args.replay_batch as usize,
        pause_before_swap: args.pause_before_swap,
        #[cfg(feature = "fault-injection")]
        fail_after: args.fail_after,
        #[cfg(not(feature = "fault-injection"))]
        fail_after: None,
        access_from: Default::default(),
    };
    let r = Rebuilder::new(&config, options).await?;
    let mode = if args.dry_run {
        Mode::DryRun
    } else {
        Mode::Swap {
            accept_differences: args.accept_differences,
        }
    };
    let Some(name) = &args.tenant else {
        return all(&r, mode, args.parallel.into()).await;
    };
    let t = resolve(&r.tenants, name).await?;
    if args.drop_old {
        return drop_old(&r, &t).await;
    }
    if args.rollback {
        let replayed = r.rollback(&t).await?;
        println!(
            "rolled back {}: the tables before the last rebuild are live again ({} events applied since the swap replayed into them)",
            t.organisation_id, replayed.applied
        );
        return Ok(ExitCode::SUCCESS);
    }
    let bar = std::io::stderr().is_terminal().then(|| {
        ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("valid template"),
        )
    });
    let started = Instant::now();
    let tenant = t.organisation_id.clone();
    let report = |done: &Replayed, at: &HashMap<i32, i64>| {
        let rate = done.read as f64 / started.elapsed().as_secs_f64().max(0.001);
        let msg = format!(
            "{} messages read ({rate:.0}/s), {} of the tenant's events applied, {} skipped; at offsets {:?}",
            done.read, done.applied, done.skipped, at
        );
        match &bar {
            Some(bar) => bar.set_message(msg),
            None => tracing::info!(%tenant, "rebuilding: {msg}"),
        }
    };
    let outcome = r.rebuild(&t, mode, report).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let outcome = outcome?;
    for (table, (live, rebuilt)) in &outcome.comparison.counts {
        println!("{table}: {live} rows live, {rebuilt} rebuilt");
    }
    let differences = &outcome.comparison.differences;
    for d in differences.iter().take(SHOWN_DIFFERENCES) {
        println!("difference: {d}");
    }
    if differences.len() > SHOWN_DIFFERENCES {
        println!(
            "… and {} more differences",
            differences.len() - SHOWN_DIFFERENCES
        );
    }
    println!(
        "rebuilt {} from {} messages ({} of its events, {} skipped) in {:.1} s (the last comparison {:.1} s); {} difference(s)",
        outcome.database,
        outcome.replayed.read,
        outcome.replayed.applied,
        outcome.replayed.skipped,
        outcome.elapsed.as_secs_f64(),
        outcome.comparison.elapsed.as_secs_f64(),
        differences.len()
    );
    match (&outcome.swapped_to, mode) {
        (Some(old), _) => {
            if let Some(server) = &outcome.moved_to {
                println!(
                    "moved to server {server}; the tenant's row names it now; writes held {} ms; the replaced tables are kept in {old} on the server it left for {} (`--drop-old` drops them; move back with --to-server)",
                    outcome.pause.as_millis(),
                    humantime::format_duration(args.keep_old)
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "swapped in; writes held {} ms; the replaced tables are kept in {old} for {} (`--rollback` brings them back, `--drop-old` drops them)",
                outcome.pause.as_millis(),
                humantime::format_duration(args.keep_old)
            );
            if let Some(n) = outcome.copies_refreshed {
                println!(
                    "{n} supplier cop{} of the brand rebuilt from the swapped-in tables",
                    if n == 1 { "y" } else { "ies" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        (None, Mode::DryRun) => {
            println!("dry run: nothing changed");
            Ok(if differences.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        (None, Mode::Swap { .. }) => {
            println!(
                "not swapped in: the rebuilt database differs from the live one (--accept-differences to swap anyway)"
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `--all`: every active brand, then every active supplier (whose copies are taken from the
/// brands, rebuilt by then), then every active retailer; with --archived, every archived brand's archive. `parallel` at a
/// time, one line each and a summary. The tenants' states are the live lifecycle's, read from
/// the tenants table: what is archived stays archived, what is purged is left alone.
async fn all(r: &Rebuilder, mode: Mode, parallel: usize) -> anyhow::Result<ExitCode> {
    use futures::stream::{self, StreamExt};
    let status = if r.archived() {
        Status::Archived
    } else {
        Status::Active
    };
    let listed = r.tenants.list(Some(status)).await?;
    let of = |kind: OrganisationType| -> Vec<_> {
        listed
            .iter()
            .filter(|t| t.organisation_type == kind)
            .collect()
    };
    let brands = of(OrganisationType::Brand);
    let suppliers = of(OrganisationType::Supplier);
    let retailers = of(OrganisationType::Retailer);
    let elsewhere = r.tenants.counts().await?;
    let left: Vec<String> = elsewhere
        .iter()
        .filter(|(s, n)| *s != status.as_str() && *n > 0)
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    if !left.is_empty() {
        let hint = if !r.archived() && elsewhere.iter().any(|(s, n)| s == "archived" && *n > 0) {
            " (--archived rebuilds archived tenants' archives)"
        } else {
            ""
        };
        eprintln!("not rebuilt by this run: {} tenants{hint}", left.join(", "));
    }
    eprintln!(
        "rebuilding {} {status} brands, then {} suppliers and {} retailers, {parallel} at a time",
        brands.len(),
        suppliers.len(),
        retailers.len()
    );
    let mut results: Vec<(String, anyhow::Result<crate::rebuild::Outcome>)> = Vec::new();
    // Brands first: suppliers' copies are backfilled from them.
    for group in [&brands, &suppliers, &retailers] {
        let done: Vec<_> = stream::iter(group.iter())
            .map(|b| async move {
                let name = format!("{}/{}", b.organisation_type.db_word(), b.slug);
                let outcome = async {
                    let t = resolve(&r.tenants, &b.organisation_id).await?;
                    let tenant = name.clone();
                    r.rebuild(&t, mode, |done: &Replayed, _| {
                        tracing::info!(%tenant, read = done.read, applied = done.applied, "rebuilding");
                    })
                    .await
                }
                .await;
                (name, outcome)
            })
            .buffer_unordered(parallel)
            .collect()
            .await;
        results.extend(done);
    }
    let (mut swapped, mut equal, mut differ, mut failed) = (0, 0, 0, 0);
    for (name, result) in &results {
        match result {
            Ok(o) if o.swapped_to.is_some() => {
                swapped += 1;
                println!(
                    "{name}: swapped in ({} events, {} difference(s), writes held {} ms{})",
                    o.replayed.applied,
                    o.comparison.differences.len(),
                    o.pause.as_millis(),
                    o.copies_refreshed
                        .map(|n| format!(", {n} supplier copies rebuilt"))
                        .unwrap_or_default()
                );
            }
            Ok(o) if o.comparison.differences.is_empty() => {
                equal += 1;
                println!("{name}: equal ({} events; dry run)", o.replayed.applied);
            }
            Ok(o) => {
                differ += 1;
                println!(
                    "{name}: {} difference(s), not swapped in (first: {})",
                    o.comparison.differences.len(),
                    o.comparison.differences[0]
                );
            }
            Err(e) => {
                failed += 1;
                println!("{name}: failed: {e:#}");
            }
        }
    }
    println!(
        "{} tenant(s) ({} brand(s), {} supplier(s), {} retailer(s)): {swapped} swapped in, {equal} equal, {differ} differ, {failed} failed",
        results.len(),
        brands.len(),
        suppliers.len(),
        retailers.len()
    );
    Ok(if differ + failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
