//! `tenancy status`: per processor and partition, where the group stands and who owns it; per
//! worker, whether it is ready; what every worker holds, for whom, since when; and the
//! rebuilds in progress.

use std::collections::BTreeMap;
use std::process::ExitCode;

use crate::config::Config;
use crate::status::WorkerRow;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// One JSON object instead of tables: {"partitions": [...], "workers": [...],
    /// "rebuilds": [...]}.
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
    let pool = crate::db::connect_pool(&config).await?;
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
                    crate::kafka::group_lag(&lag_config, &group, &topics)?,
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
    if args.json {
        println!(
            "{}",
            serde_json::json!({"partitions": partitions, "workers": workers, "rebuilds": rebuilds})
        );
        return Ok(ExitCode::SUCCESS);
    }
    print_partitions(&partitions);
    print_workers(&workers);
    print_rebuilds(&rebuilds);
    Ok(ExitCode::SUCCESS)
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
        } else if w.report.ready {
            "ready".to_owned()
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
        "{:<28} {:<12} {:<38} {:>7} {:>10}  OLDEST",
        "WORKER", "PROCESSOR", "WAITING FOR", "EVENTS", "AGE"
    );
    for (w, p, h) in held {
        println!(
            "{:<28} {:<12} {:<38} {:>7} {:>10}  {}",
            format!("{}:{}", w.host, w.pid),
            p.processor,
            h.waiting_for,
            h.events,
            humantime::format_duration(std::time::Duration::from_secs(h.oldest_age_secs))
                .to_string(),
            h.oldest
        );
    }
}
