//! `tenancy status`: per processor and partition, where the group stands and who owns it; per
//! worker, whether it is ready; what every worker holds, for whom, since when; the rebuilds in
//! progress; and the tenants with a lifecycle step under way.

use std::collections::BTreeMap;
use std::process::ExitCode;

use crate::config::Config;
use crate::status::WorkerRow;
use crate::store::tenants::{Pending, TenantRecord, Tenants};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// One JSON object instead of tables: {"partitions": [...], "workers": [...],
    /// "rebuilds": [...], "lifecycle_under_way": [...], "servers": [...], "migrations": [...]}.
    #[arg(long)]
    pub json: bool,
}

/// One partition of one processor's group.
#[derive(Debug, serde::Serialize)]
struct PartitionRow {
    processor: String,
    topic: String,
    partition: i32,
    committed: Option<i64>,
    end: i64,
    lag: i64,
    /// `host:pid` of every live worker that reports owning it (none, or two, is a problem).
    owners: Vec<String>,
}

pub async fn run(config: Config, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let servers = crate::store::servers::Servers::connect(&config, 4).await?;
    let pool = servers.home().pool().clone();
    let workers = crate::status::workers(&pool, &config.namespace)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read the workers of namespace {}: {e}",
                config.namespace
            )
        })?;
    let mut owners: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for w in workers.iter().filter(|w| w.live) {
        for p in &w.report.processors {
            for part in &p.assigned {
                owners
                    .entry((p.processor.clone(), part.clone()))
                    .or_default()
                    .push(format!("{}:{}", w.host, w.pid));
            }
        }
    }
    let groups = super::processor_topics(&config.namespace);
    let lag_config = config.clone();
    let positions = tokio::task::spawn_blocking(move || {
        groups
            .into_iter()
            .map(|(processor, group, topics)| {
                Ok((
                    processor,
                    crate::log::kafka::group_lag(&lag_config, &group, &topics)?,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    let mut partitions = Vec::new();
    for (processor, rows) in positions {
        for r in rows {
            let key = (processor.to_owned(), format!("{}/{}", r.topic, r.partition));
            partitions.push(PartitionRow {
                processor: processor.to_owned(),
                lag: r.behind(),
                topic: r.topic,
                partition: r.partition,
                committed: r.committed,
                end: r.end,
                owners: owners.remove(&key).unwrap_or_default(),
            });
        }
    }
    // A namespace whose workers predate the rebuilds table has none to show.
    let rebuilds = crate::rebuild::report::rebuilds(&pool, &config.namespace)
        .await
        .unwrap_or_default();
    let tenants = Tenants::on(servers.clone(), &config.namespace);
    let under_way = tenants
        .under_way()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the tenants of {}: {e}", config.namespace))?;
    let placed = tenants.per_server().await.unwrap_or_default();
    let mut server_rows = Vec::new();
    for server in servers.all() {
        let up = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(server.pool()),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        server_rows.push(ServerRow {
            server: server.name().to_owned(),
            up,
            tenants: placed.get(server.name()).copied().unwrap_or(0),
            takes_new_tenants: servers.takes_new(server),
        });
    }
    let under_way: Vec<StepRow> = under_way.iter().filter_map(StepRow::of).collect();
    let migrations = crate::tenancy::rollout::versions(&tenants)
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the tenants of {}: {e}", config.namespace))?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"partitions": partitions, "workers": workers, "rebuilds": rebuilds,
                "lifecycle_under_way": under_way, "servers": server_rows,
                "migrations": migrations})
        );
        return Ok(ExitCode::SUCCESS);
    }
    print_partitions(&partitions);
    print_workers(&workers);
    print_rebuilds(&rebuilds);
    print_under_way(&under_way);
    print_servers(&server_rows);
    print_migrations(&migrations);
    Ok(ExitCode::SUCCESS)
}

/// Per kind, how many tenant databases (active, and archives) are at which migration version,
/// and every tenant whose migration failed.
fn print_migrations(rows: &[crate::tenancy::rollout::Versions]) {
    println!("\nTenant migrations (version: tenants):");
    for r in rows {
        if r.at.is_empty() {
            continue;
        }
        let at: Vec<String> =
            r.at.iter()
                .map(|(v, n)| {
                    let v = v.map_or("unknown".to_owned(), |v| v.to_string());
                    format!("{v}: {n}")
                })
                .collect();
        println!(
            "  {:<9} latest {:<4} {}",
            r.kind.db_word(),
            r.latest,
            at.join(", ")
        );
        for (id, slug, reason) in &r.failed {
            println!("    FAILED {slug} ({id}): {reason} -- `tenancy migrate --retry {id}` after the fix");
        }
    }
}

/// One MySQL server of the servers list, as `tenancy status` shows it.
#[derive(Debug, serde::Serialize)]
struct ServerRow {
    server: String,
    up: bool,
    /// Tenants placed on it (not purged).
    tenants: i64,
    takes_new_tenants: bool,
}

fn print_servers(rows: &[ServerRow]) {
    println!("\nMySQL servers:");
    for r in rows {
        println!(
            "  {:<12} {:<5} {:>6} tenant(s){}",
            r.server,
            if r.up { "up" } else { "DOWN" },
            r.tenants,
            if r.takes_new_tenants {
                ""
            } else {
                "  (no new tenants)"
            }
        );
    }
}

/// A tenant whose termination or restore is marked under way.
#[derive(Debug, serde::Serialize)]
struct StepRow {
    organisation_id: String,
    organisation_type: String,
    slug: String,
    status: String,
    /// `terminate` or `restore`.
    step: &'static str,
    event_id: String,
    /// When the event happened.
    event_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl StepRow {
    fn of(t: &TenantRecord) -> Option<StepRow> {
        let (step, event_id) = match t.pending()? {
            Pending::Terminate(id) => ("terminate", id),
            Pending::Restore(id) => ("restore", id),
        };
        Some(StepRow {
            organisation_id: t.organisation_id.clone(),
            organisation_type: t.organisation_type.db_word().to_owned(),
            slug: t.slug.clone(),
            status: t.status.to_string(),
            step,
            event_id,
            event_at: t.lifecycle_at,
        })
    }
}

fn print_under_way(rows: &[StepRow]) {
    println!();
    if rows.is_empty() {
        println!("no lifecycle step under way");
        return;
    }
    println!(
        "{:<38} {:<28} {:<9} {:<10} {:<38}  EVENT AT",
        "LIFECYCLE STEP UNDER WAY", "TENANT", "STEP", "STATUS", "EVENT"
    );
    for r in rows {
        println!(
            "{:<38} {:<28} {:<9} {:<10} {:<38}  {}",
            r.organisation_id,
            format!("{}/{}", r.organisation_type, r.slug),
            r.step,
            r.status,
            r.event_id,
            r.event_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default(),
        );
    }
    // A step takes seconds; one that stays was dead-lettered after its retries, and events for
    // the tenant wait until it is finished.
    println!(
        "(a step still listed after a minute was given up: `tenancy dead-letter list`, then \
         `tenancy dead-letter replay` once its cause is fixed finishes it)"
    );
}

fn print_rebuilds(rows: &[crate::rebuild::report::RebuildRow]) {
    println!();
    if rows.is_empty() {
        println!("no rebuilds in progress");
        return;
    }
    println!(
        "{:<38} {:<28} {:<16} {:>10} {:>10}  STARTED",
        "REBUILDING", "BY", "PHASE", "READ", "APPLIED"
    );
    for r in rows {
        let phase = if r.running {
            r.phase.clone()
        } else {
            format!("killed in {}", r.phase)
        };
        println!(
            "{:<38} {:<28} {:<16} {:>10} {:>10}  {}",
            r.organisation_id,
            format!("{}:{}", r.host, r.pid),
            phase,
            r.events_read,
            r.events_applied,
            r.started_at.format("%Y-%m-%d %H:%M:%S"),
        );
    }
}

fn print_partitions(rows: &[PartitionRow]) {
    println!(
        "{:<12} {:<40} {:>10} {:>10} {:>8}  OWNER",
        "PROCESSOR", "PARTITION", "COMMITTED", "END", "LAG"
    );
    for r in rows {
        let owner = match r.owners.len() {
            0 => "(none)".to_owned(),
            1 => r.owners[0].clone(),
            _ => format!("{} (more than one!)", r.owners.join(", ")),
        };
        println!(
            "{:<12} {:<40} {:>10} {:>10} {:>8}  {owner}",
            r.processor,
            format!("{}/{}", r.topic, r.partition),
            r.committed.map_or("-".to_owned(), |c| c.to_string()),
            r.end,
            r.lag,
        );
    }
}

fn print_workers(workers: &[WorkerRow]) {
    println!();
    if workers.is_empty() {
        println!("no worker has reported in the last day (start one with `tenancy run`)");
        return;
    }
    println!(
        "{:<28} {:<22} {:<10} {:<24} STATE",
        "WORKER", "HTTP", "LAST SEEN", "STARTED"
    );
    for w in workers {
        let state = if !w.live {
            "gone".to_owned()
        } else if w.report.ready && w.report.degraded.is_empty() {
            "ready".to_owned()
        } else if w.report.ready {
            format!(
                "ready, degraded (their tenants wait): {}",
                w.report.degraded.join("; ")
            )
        } else {
            format!("not ready: {}", w.report.not_ready.join("; "))
        };
        let seen = (chrono::Utc::now() - w.heartbeat_at).num_seconds().max(0);
        println!(
            "{:<28} {:<22} {:<10} {:<24} {state}",
            format!("{}:{}", w.host, w.pid),
            w.http_addr.as_deref().unwrap_or("-"),
            format!("{seen}s ago"),
            w.started_at.format("%Y-%m-%d %H:%M:%S"),
        );
    }
    let held: Vec<_> = workers
        .iter()
        .filter(|w| w.live)
        .flat_map(|w| {
            w.report
                .processors
                .iter()
                .flat_map(move |p| p.holds.iter().map(move |h| (w, p, h)))
        })
        .collect();
    println!();
    if held.is_empty() {
        println!("no events held");
        return;
    }
    println!(
        "{:<28} {:<12} {:<38} {:>7} {:>10} {:>10}  {:<40} WHY",
        "WORKER", "PROCESSOR", "WAITING FOR", "EVENTS", "AGE", "DEADLINE", "OLDEST"
    );
    let secs = |s: u64| humantime::format_duration(std::time::Duration::from_secs(s)).to_string();
    for (w, p, h) in held {
        println!(
            "{:<28} {:<12} {:<38} {:>7} {:>10} {:>10}  {:<40} {}",
            format!("{}:{}", w.host, w.pid),
            p.processor,
            h.waiting_for,
            h.events,
            secs(h.oldest_age_secs),
            h.deadline_secs.map_or("-".to_owned(), secs),
            h.oldest,
            h.why,
        );
    }
    for w in workers.iter().filter(|w| w.live) {
        for p in &w.report.processors {
            for left in &p.left_in_log {
                println!(
                    "{:<28} {:<12} left in the log (read again once released): {left}",
                    format!("{}:{}", w.host, w.pid),
                    p.processor
                );
            }
        }
    }
}
