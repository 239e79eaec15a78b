//! Rebuilds in progress, in `{ns}_platform.rebuilds`, for `tenancy status`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::store::locks::NamedLock;
use crate::tenant::{Namespace, ServiceDatabase};

fn table(ns: &Namespace) -> String {
    format!(
        "{}.rebuilds",
        ns.service_database(ServiceDatabase::Platform).quoted()
    )
}

/// What a running rebuild reports; written every 2 s by [`Reporter`].
#[derive(Debug, Default)]
pub struct Progress {
    phase: Mutex<&'static str>,
    read: AtomicU64,
    applied: AtomicU64,
}

impl Progress {
    pub fn phase(&self, phase: &'static str) {
        tracing::debug!(phase, "rebuild phase");
        *self.phase.lock().expect("not poisoned") = phase;
    }

    pub fn counts(&self, read: u64, applied: u64) {
        self.read.store(read, Ordering::Relaxed);
        self.applied.store(applied, Ordering::Relaxed);
    }
}

/// Keeps one rebuild's row up to date until dropped, then removes it.
pub struct Reporter {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Reporter {
    pub fn start(
        pool: MySqlPool,
        ns: Namespace,
        organisation_id: String,
        progress: Arc<Progress>,
    ) -> Reporter {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let started = chrono::Utc::now();
            loop {
                let phase = *progress.phase.lock().expect("not poisoned");
                let written = sqlx::query(&format!(
                    "REPLACE INTO {} (organisation_id, host, pid, phase, events_read, events_applied, \
                     started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(3))",
                    table(&ns)
                ))
                .bind(&organisation_id)
                .bind(crate::status::host_name())
                .bind(std::process::id())
                .bind(phase)
                .bind(progress.read.load(Ordering::Relaxed) as i64)
                .bind(progress.applied.load(Ordering::Relaxed) as i64)
                .bind(started.naive_utc())
                .execute(&pool)
                .await;
                if let Err(e) = written {
                    // Reporting is for operators; the rebuild goes on without it.
                    tracing::debug!(error = %e, "cannot report the rebuild's progress");
                }
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
            let _ = sqlx::query(&format!(
                "DELETE FROM {} WHERE organisation_id = ? AND pid = ?",
                table(&ns)
            ))
            .bind(&organisation_id)
            .bind(std::process::id())
            .execute(&pool)
            .await;
        });
        Reporter { stop, task }
    }

    /// Removes the row.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// One rebuild as `tenancy status` shows it.
#[derive(Debug, serde::Serialize)]
pub struct RebuildRow {
    pub organisation_id: String,
    pub host: String,
    pub pid: i64,
    pub phase: String,
    pub events_read: i64,
    pub events_applied: i64,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub heartbeat_at: chrono::DateTime<chrono::Utc>,
    /// Whether its claim is still held: false for a rebuild that was killed (the next rebuild
    /// of that tenant starts afresh).
    pub running: bool,
}

/// Every rebuild row of the namespace.
pub async fn rebuilds(pool: &MySqlPool, ns: &Namespace) -> Result<Vec<RebuildRow>, sqlx::Error> {
    type Raw = (
        String,
        String,
        i64,
        String,
        i64,
        i64,
        chrono::NaiveDateTime,
        chrono::NaiveDateTime,
    );
    let rows: Vec<Raw> = sqlx::query_as(&format!(
        "SELECT organisation_id, host, pid, phase, events_read, events_applied, started_at, \
         heartbeat_at FROM {} ORDER BY started_at",
        table(ns)
    ))
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for (organisation_id, host, pid, phase, events_read, events_applied, started, beat) in rows {
        let held: Option<i64> = sqlx::query_scalar("SELECT IS_USED_LOCK(?)")
            .bind(NamedLock::rebuild_name(ns, &organisation_id))
            .fetch_one(pool)
            .await?;
        out.push(RebuildRow {
            organisation_id,
            host,
            pid,
            phase,
            events_read,
            events_applied,
            started_at: started.and_utc(),
            heartbeat_at: beat.and_utc(),
            running: held.is_some(),
        });
    }
    Ok(out)
}
