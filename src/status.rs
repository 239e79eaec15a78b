//! What every running worker reports, for `tenancy status`.
//!
//! Each `tenancy run` rewrites its row of `{ns}_platform.workers` every few seconds with its
//! [`Snapshot`] (assignment, held events and what they wait for, outages, retry loops) and
//! deletes it on a clean exit. Held events live in a worker's memory; this is how an operator
//! on another host sees them. A row whose heartbeat is older than [`LIVE_WITHIN`] is a worker
//! that died (`kill -9`, host lost); such rows are kept a day for the post-mortem.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::stream::health::{Health, Snapshot};
use crate::tenant::{DatabaseName, Namespace, ServiceDatabase};

/// How often a worker rewrites its row.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);
/// A worker whose last report is older than this is considered gone.
pub const LIVE_WITHIN: Duration = Duration::from_secs(15);

/// One worker's row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerRow {
    pub worker_id: String,
    pub host: String,
    pub pid: i32,
    pub http_addr: Option<String>,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// Whether it reported within [`LIVE_WITHIN`].
    pub live: bool,
    pub report: Snapshot,
}

fn table(ns: &Namespace) -> String {
    format!("{}.workers", platform(ns).quoted())
}

fn platform(ns: &Namespace) -> DatabaseName {
    ns.service_database(ServiceDatabase::Platform)
}

/// This host's name, for the report.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

/// Reports one worker until `shutdown`, then removes its row.
pub async fn report(
    pool: MySqlPool,
    ns: Namespace,
    health: Health,
    http_addr: Option<String>,
    shutdown: CancellationToken,
) {
    let worker_id = uuid::Uuid::new_v4().to_string();
    let host = host_name();
    let pid = std::process::id() as i32;
    let table = table(&ns);
    tracing::info!(worker_id = %worker_id, %host, pid, "worker reporting to {table}");
    loop {
        let snapshot = serde_json::to_string(&health.snapshot()).expect("snapshots serialise");
        let written = sqlx::query(&format!(
            "INSERT INTO {table} (worker_id, host, pid, http_addr, started_at, heartbeat_at, report) \
             VALUES (?, ?, ?, ?, UTC_TIMESTAMP(3), UTC_TIMESTAMP(3), ?) \
             ON DUPLICATE KEY UPDATE heartbeat_at = UTC_TIMESTAMP(3), report = VALUES(report)"
        ))
        .bind(&worker_id)
        .bind(&host)
        .bind(pid)
        .bind(&http_addr)
        .bind(&snapshot)
        .execute(&pool)
        .await;
        if let Err(e) = written {
            tracing::debug!(error = %e, "could not write the worker report; next time");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(REPORT_EVERY) => {}
        }
    }
    let _ = sqlx::query(&format!("DELETE FROM {table} WHERE worker_id = ?"))
        .bind(&worker_id)
        .execute(&pool)
        .await;
}

/// A `workers` row as read: id, host, pid, http address, started, heartbeat, live, report JSON.
type RawRow = (
    String,
    String,
    i32,
    Option<String>,
    DateTime<Utc>,
    DateTime<Utc>,
    bool,
    String,
);

/// Every worker of the namespace that reported within a day, live ones first.
pub async fn workers(pool: &MySqlPool, ns: &Namespace) -> anyhow::Result<Vec<WorkerRow>> {
    let rows: Result<Vec<RawRow>, sqlx::Error> = sqlx::query_as(&format!(
        "SELECT worker_id, host, pid, http_addr, started_at, heartbeat_at, \
             heartbeat_at > UTC_TIMESTAMP(3) - INTERVAL ? SECOND AS live, CAST(report AS CHAR) \
             FROM {} WHERE heartbeat_at > UTC_TIMESTAMP(3) - INTERVAL 1 DAY \
             ORDER BY live DESC, host, pid",
        table(ns)
    ))
    .bind(LIVE_WITHIN.as_secs())
    .fetch_all(pool)
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        // No worker has ever started in this namespace: nothing to report, not an error.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42S02") => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    rows.into_iter()
        .map(
            |(worker_id, host, pid, http_addr, started_at, heartbeat_at, live, report)| {
                Ok(WorkerRow {
                    report: serde_json::from_str(&report).map_err(|e| {
                        anyhow::anyhow!("worker {worker_id} report unreadable: {e}")
                    })?,
                    worker_id,
                    host,
                    pid,
                    http_addr,
                    started_at,
                    heartbeat_at,
                    live,
                })
            },
        )
        .collect()
}
