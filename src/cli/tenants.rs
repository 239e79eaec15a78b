//! `tenancy tenants`: every tenant as `{ns}_platform.tenants` has it, and lifecycle requests.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;

use crate::config::Config;
use crate::store::tenants::{Status, TenantRecord, Tenants};
use crate::tenancy::migrations;
use crate::tenant::OrganisationType;

#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// One line per tenant: type, slug, status, database, server, region, organisation id.
    List {
        /// Only tenants with this status (provisioning, active, archived, purged, failed).
        #[arg(long, value_parser = parse_status)]
        status: Option<Status>,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The biggest or busiest tenants first, to choose which to give a server of their own
    /// (`tenancy rebuild ORG --to-server S`): each active tenant's database (and archived
    /// one's archive) with its size and rows (InnoDB's estimates, from information_schema) and
    /// the events applied to it in the last day and week (from its applied_events).
    Top {
        /// Rank by database size, or by events applied in the last 7 days.
        #[arg(long, value_enum, default_value = "size")]
        by: crate::store::usage::By,
        /// Show this many (0: all).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Every field of one tenant, by organisation id or slug. Exit 1 if unknown.
    Show {
        id_or_slug: String,
        #[arg(long)]
        json: bool,
    },
    /// Terminate an organisation: emits OrganisationTerminated (a person's action is an event).
    /// Its database is archived and purged after the grace period unless restored.
    Terminate {
        /// Organisation id, or slug if it names exactly one tenant.
        org: String,
        /// Why (kept in the event and the tenants table).
        #[arg(long)]
        reason: String,
        /// Who asked for it.
        #[arg(long = "by", value_name = "WHO")]
        terminated_by: String,
        /// Confirm: without it nothing is sent.
        #[arg(long)]
        yes: bool,
    },
    /// Restore a terminated organisation within its grace period: emits OrganisationRestored.
    Restore {
        /// Organisation id, or slug if it names exactly one tenant.
        org: String,
        #[arg(long = "by", value_name = "WHO")]
        restored_by: String,
    },
    /// Archived tenants whose grace period is over (the purge timer publishes TenantPurged).
    PurgeDue {
        #[arg(long)]
        json: bool,
    },
    /// Wait until at least N tenants have settled (no longer `provisioning`); exit 1 on timeout.
    Wait {
        /// Number of settled tenants to wait for.
        #[arg(long)]
        expect: usize,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Print the SQL a new tenant database of one kind gets: every migration and its
    /// bookkeeping in `_sqlx_migrations`, as the one script the provisioner sends after
    /// CREATE DATABASE. For review, and for the provisioning benchmark's raw baseline. Needs
    /// no service.
    Ddl {
        /// brand, supplier or retailer
        #[arg(value_parser = parse_kind)]
        kind: OrganisationType,
    },
}

pub(super) fn parse_kind(s: &str) -> Result<OrganisationType, String> {
    OrganisationType::parse(s).map_err(|e| e.to_string())
}

fn parse_status(s: &str) -> Result<Status, String> {
    Status::parse(s).ok_or_else(|| {
        format!("unknown status {s:?}; expected provisioning, active, archived, purged or failed")
    })
}

pub async fn run(config: Config, command: TenantsCommand) -> anyhow::Result<ExitCode> {
    if let TenantsCommand::Ddl { kind } = command {
        println!(
            "{};",
            migrations::fresh_script(migrations::for_tenant(kind))
        );
        return Ok(ExitCode::SUCCESS);
    }
    let servers = crate::store::servers::Servers::connect(&config, 4).await?;
    let tenants = Tenants::on(servers, &config.namespace);
    let platform_missing = |e: sqlx::Error| {
        anyhow::anyhow!(
            "cannot read {}_platform.tenants: {e} (has `tenancy run` started for namespace {}?)",
            config.namespace,
            config.namespace
        )
    };
    match command {
        TenantsCommand::List { status, json } => {
            let rows = tenants.list(status).await.map_err(platform_missing)?;
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                print_table(&rows);
            }
            Ok(ExitCode::SUCCESS)
        }
        TenantsCommand::Top { by, limit, json } => {
            let mut rows = crate::store::usage::ranked(&tenants, by)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "cannot rank the tenants of {}: {e} (has `tenancy run` started for \
                         namespace {}?)",
                        config.namespace,
                        config.namespace
                    )
                })?;
            let total = rows.len();
            if limit > 0 {
                rows.truncate(limit);
            }
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                print_top(&rows);
                eprintln!("{} of {total} tenant database(s)", rows.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        TenantsCommand::Show { id_or_slug, json } => {
            let rows = tenants.find(&id_or_slug).await.map_err(platform_missing)?;
            if rows.is_empty() {
                eprintln!("no tenant with organisation id or slug {id_or_slug:?}");
                return Ok(ExitCode::FAILURE);
            }
            for r in &rows {
                // The record with its audit trail: who terminated, restored or purged it, why,
                // and when (kept after the purge).
                let history = tenants
                    .history(&r.organisation_id)
                    .await
                    .map_err(platform_missing)?;
                let mut shown = serde_json::to_value(r)?;
                shown["history"] = serde_json::to_value(&history)?;
                if json {
                    println!("{shown}");
                } else {
                    println!("{}", serde_json::to_string_pretty(r)?);
                    print_history(&history);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TenantsCommand::Terminate {
            org,
            reason,
            terminated_by,
            yes,
        } => {
            let record = resolve(&tenants, &org).await.map_err(platform_missing)?;
            let Some(record) = record else {
                eprintln!("no single tenant with organisation id or slug {org:?}");
                return Ok(ExitCode::FAILURE);
            };
            if !yes {
                eprintln!(
                    "this terminates {} {} ({}): its database is archived and purged after the grace period; \
                     pass --yes to confirm",
                    record.organisation_type, record.slug, record.organisation_id
                );
                return Ok(ExitCode::FAILURE);
            }
            let line = serde_json::json!({"type": "OrganisationTerminated",
                "organisation_id": record.organisation_id, "organisation_type": record.organisation_type,
                "slug": record.slug, "reason": reason, "terminated_by": terminated_by});
            send_one(&config, &line).await
        }
        TenantsCommand::Restore { org, restored_by } => {
            let record = resolve(&tenants, &org).await.map_err(platform_missing)?;
            let Some(record) = record else {
                eprintln!("no single tenant with organisation id or slug {org:?}");
                return Ok(ExitCode::FAILURE);
            };
            let line = serde_json::json!({"type": "OrganisationRestored",
                "organisation_id": record.organisation_id, "organisation_type": record.organisation_type,
                "slug": record.slug, "restored_by": restored_by});
            send_one(&config, &line).await
        }
        TenantsCommand::PurgeDue { json } => {
            let rows = tenants
                .purge_due(chrono::Utc::now())
                .await
                .map_err(platform_missing)?;
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r)?);
                }
            } else {
                for r in &rows {
                    println!(
                        "{}\t{}\t{}\tpurge after {}",
                        r.organisation_type,
                        r.slug,
                        r.organisation_id,
                        r.purge_after.map(|t| t.to_rfc3339()).unwrap_or_default()
                    );
                }
                eprintln!("{} tenant(s) due for purge", rows.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        TenantsCommand::Wait { expect, timeout } => {
            let deadline = Instant::now() + Duration::from_secs(timeout);
            loop {
                let counts = tenants.counts().await.unwrap_or_default();
                let settled: i64 = counts
                    .iter()
                    .filter(|(s, _)| Status::parse(s) != Some(Status::Provisioning))
                    .map(|(_, n)| n)
                    .sum();
                let summary = counts
                    .iter()
                    .map(|(s, n)| format!("{s}={n}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                if settled as usize >= expect {
                    eprintln!("{settled} tenant(s) settled: {summary}");
                    return Ok(ExitCode::SUCCESS);
                }
                if Instant::now() >= deadline {
                    eprintln!("timed out after {timeout}s: {settled}/{expect} settled ({summary})");
                    return Ok(ExitCode::FAILURE);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        TenantsCommand::Ddl { .. } => unreachable!("answered before connecting"),
    }
}

fn print_table(rows: &[TenantRecord]) {
    println!(
        "{:<9} {:<24} {:<12} {:<40} {:<10} {:<8} ORGANISATION",
        "TYPE", "SLUG", "STATUS", "DATABASE", "SERVER", "REGION"
    );
    for r in rows {
        println!(
            "{:<9} {:<24} {:<12} {:<40} {:<10} {:<8} {}",
            r.organisation_type,
            r.slug,
            r.status,
            r.database_name.as_deref().unwrap_or("-"),
            r.server,
            r.region.as_deref().unwrap_or("-"),
            r.organisation_id
        );
    }
    eprintln!("{} tenant(s)", rows.len());
}

fn print_top(rows: &[crate::store::usage::Usage]) {
    println!(
        "{:<9} {:<24} {:>10} {:>10} {:>10} {:>10} {:<10} {:<8} ORGANISATION",
        "TYPE", "SLUG", "SIZE MiB", "ROWS", "EVENTS/1D", "EVENTS/7D", "SERVER", "REGION"
    );
    let count = |n: Option<u64>| n.map_or("-".to_owned(), |n| n.to_string());
    for r in rows {
        println!(
            "{:<9} {:<24} {:>10.1} {:>10} {:>10} {:>10} {:<10} {:<8} {}",
            r.kind,
            r.slug,
            r.bytes as f64 / (1024.0 * 1024.0),
            r.rows,
            count(r.events_last_day),
            count(r.events_last_week),
            r.server,
            r.region.as_deref().unwrap_or("-"),
            r.organisation_id
        );
    }
}

/// An audit trail as lines: when, what, by whom, why.
fn print_history(history: &[crate::store::tenants::LogEntry]) {
    if history.is_empty() {
        return;
    }
    println!("history:");
    for h in history {
        let mut line = format!(
            "  {}  {:<10} by {}",
            h.occurred_at.to_rfc3339(),
            h.kind,
            h.actor.as_deref().unwrap_or("-")
        );
        if let Some(reason) = &h.reason {
            line.push_str(&format!(": {reason}"));
        }
        if let Some(applied) = h.applied_at {
            line.push_str(&format!(" (applied {})", applied.to_rfc3339()));
        }
        if let Some(claimed) = h.claimed_at {
            line.push_str(&format!(
                " [its event claimed {}, not believed]",
                claimed.to_rfc3339()
            ));
        }
        println!("{line}");
    }
}

/// The one tenant an operator named, by organisation id or unambiguous slug (a purged
/// tenant's slug may be another organisation's now: the one not purged is meant).
async fn resolve(tenants: &Tenants, org: &str) -> Result<Option<TenantRecord>, sqlx::Error> {
    let mut rows = tenants.find(org).await?;
    if rows.len() > 1 {
        rows.retain(|r| r.status != Status::Purged);
    }
    Ok(if rows.len() == 1 { rows.pop() } else { None })
}

/// Validates and produces one lifecycle event, printing where it landed.
async fn send_one(config: &Config, line: &serde_json::Value) -> anyhow::Result<ExitCode> {
    let sent = crate::log::emit::send_line(config, line).await?;
    println!(
        "{}/{}/{}\t{}\t{}",
        sent.topic,
        sent.partition,
        sent.offset,
        sent.kind.name(),
        sent.key
    );
    Ok(ExitCode::SUCCESS)
}
