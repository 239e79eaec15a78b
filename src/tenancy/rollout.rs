//! Rolling migrations: every tenant database behind the latest migration of its kind brought up
//! to it, a few at a time per server, by `tenancy migrate` and by every worker in the
//! background (a worker consumes at once, whatever the fleet's size).
//!
//! The record is the tenants table: `migration_version` is where a tenant's database stands,
//! `migration_failure` why its last migration failed. A tenant behind, or failed, has its events
//! held by every projection ([`super::verdict`]) until it is brought up, so nothing is written
//! to tables of an older shape; the rest of the fleet goes on. A failed tenant is passed by
//! until someone asks for it again (`tenancy migrate --retry`), so one broken database does
//! not cost every worker start an attempt. Resumable by construction: a killed rollout leaves
//! the tenants it finished recorded, and the next one starts with what is still behind (a
//! migration interrupted half-way is re-run, every migration being safe to re-run).
//!
//! A rollout can start with a canary (tenants migrated one by one first, named or the first
//! behind; one failure halts it before the rest), go on in waves (each starts once the one
//! before ended well), and halts by itself once more than a set share of its tenants failed,
//! so a bad migration stops before it reaches the whole fleet.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;

use super::migrations;
use crate::store::locks::NamedLock;
use crate::store::schema::database_exists;
use crate::store::servers::Servers;
use crate::store::tenants::{Status, TenantRecord, Tenants};
use crate::tenant::{DatabaseName, OrganisationType, Slug};

/// What a rollout covers and how fast it goes.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only tenants of this kind.
    pub kind: Option<OrganisationType>,
    /// Tenant databases migrated at the same time on each MySQL server.
    pub parallel: usize,
    /// Only these organisations (ids), failed ones included: a retry after a fix.
    pub only: Option<Vec<String>>,
    /// Tenants migrated one at a time before the rest; any failure among them halts the
    /// rollout before the first wave.
    pub canary: usize,
    /// Organisation ids of the canaries, migrated first in this order (the first behind make up
    /// the rest of `canary`). Each must be behind: a canary with nothing to migrate proves
    /// nothing, so the rollout refuses to start.
    pub canary_named: Vec<String>,
    /// After the canary, the rest in waves of this many tenants: a wave starts once the one
    /// before has ended within `max_failures` (None: one wave).
    pub wave: Option<usize>,
    /// The share of the rollout's tenants (0 to 1) allowed to fail: one more halts it.
    pub max_failures: f64,
    /// List what would be migrated; change nothing.
    pub dry_run: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            kind: None,
            parallel: 2,
            only: None,
            canary: 1,
            canary_named: Vec::new(),
            wave: None,
            max_failures: 0.1,
            dry_run: false,
        }
    }
}

/// A tenant database the rollout will migrate.
#[derive(Debug, Clone)]
pub struct Behind {
    pub tenant: TenantRecord,
    /// The live database of an active tenant, the archive of an archived one.
    pub database: DatabaseName,
    /// The version this binary's migrations end at for its kind.
    pub latest: i64,
}

/// How one tenant's migration ended.
#[derive(Debug)]
pub enum Done {
    /// Now at this version.
    Migrated(i64),
    /// Nothing to do any more: another worker got there first, its status changed, or a
    /// lifecycle step holds it (the next rollout looks again).
    Skipped(String),
    /// Not tried to the end for a reason that passes (its server did not answer, a lock was
    /// held too long): nothing recorded on the tenant, tried again by a later pass.
    Later(String),
    /// Failed, with the reason recorded on the tenant.
    Failed(String),
}

/// What a rollout did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Tenants it set out to migrate.
    pub total: usize,
    pub migrated: usize,
    pub skipped: usize,
    /// Tenants left for a later pass ([`Done::Later`]).
    pub later: usize,
    /// Organisation id and reason, per tenant that failed.
    pub failed: Vec<(String, String)>,
    /// Why it stopped before the end, if it did.
    pub halted: Option<String>,
}

/// What a rollout tells its caller as it goes (a progress bar, log lines).
pub enum Progress<'a> {
    Started {
        total: usize,
    },
    /// A wave after the canary begins (1-based), of `tenants`.
    Wave {
        wave: usize,
        waves: usize,
        tenants: usize,
    },
    Finished {
        behind: &'a Behind,
        done: &'a Done,
    },
    Halted {
        reason: &'a str,
    },
}

/// Every tenant database `options` covers that is behind its kind's latest migration (failed
/// ones only when named in `options.only`), in the tenants table's order.
pub async fn behind(tenants: &Tenants, options: &Options) -> anyhow::Result<Vec<Behind>> {
    let mut rows = tenants.list(Some(Status::Active)).await?;
    rows.extend(tenants.list(Some(Status::Archived)).await?);
    let ns = tenants.namespace();
    let mut out = Vec::new();
    for t in rows {
        if options.kind.is_some_and(|k| k != t.organisation_type) {
            continue;
        }
        let named = options
            .only
            .as_ref()
            .map(|ids| ids.contains(&t.organisation_id));
        if named == Some(false) {
            continue;
        }
        let latest = migrations::latest_version(migrations::for_tenant(t.organisation_type));
        let is_behind = t.migration_version.is_none_or(|v| v < latest);
        let wanted = match named {
            Some(true) => is_behind || t.migration_failure.is_some(),
            _ => is_behind && t.migration_failure.is_none(),
        };
        if !wanted {
            continue;
        }
        let database = match t.status {
            Status::Active => Slug::parse(&t.slug)
                .ok()
                .and_then(|slug| ns.tenant_database(t.organisation_type, &slug).ok()),
            _ => ns.archive_database(&t.organisation_id),
        };
        // A row whose slug names no valid database was never provisioned into one.
        let Some(database) = database else { continue };
        out.push(Behind {
            tenant: t,
            database,
            latest,
        });
    }
    Ok(out)
}

/// Migrates one tenant's database under its lifecycle lock, if it is still as `b` found it,
/// and records the outcome on the tenant. `retry`: a failure recorded earlier does not stop it.
/// `ddl`: the DDL connections of every server ([`crate::store::servers::Servers::ddl`]).
pub async fn migrate_one(tenants: &Tenants, ddl: &Servers, b: &Behind, retry: bool) -> Done {
    let t = &b.tenant;
    let server = match tenants.server_of(t) {
        Ok(server) => server.clone(),
        Err(_) => {
            return Done::Skipped(format!(
                "on MySQL server {:?}, which this process was not given",
                t.server
            ))
        }
    };
    let home = tenants.servers().home().pool();
    let lock = match NamedLock::lifecycle(home, tenants.namespace(), &t.organisation_id).await {
        Ok(lock) => lock,
        Err(e) => return Done::Later(format!("its lifecycle lock: {e}")),
    };
    let result = async {
        let Some(now) = tenants.get(&t.organisation_id).await? else {
            return Ok(Done::Skipped("no longer in the tenants table".into()));
        };
        if now.status != t.status || now.lifecycle_pending.is_some() {
            return Ok(Done::Skipped("its lifecycle moved on".into()));
        }
        if now.migration_version.is_some_and(|v| v >= b.latest) && now.migration_failure.is_none()
        {
            return Ok(Done::Skipped("already at the latest version".into()));
        }
        if now.migration_failure.is_some() && !retry {
            return Ok(Done::Skipped("its migration failed: retry it by name".into()));
        }
        if !database_exists(server.pool(), &b.database).await? {
            return Ok(Done::Skipped(format!("database {} does not exist", b.database)));
        }
        let started = std::time::Instant::now();
        match migrations::migrate_on(
            ddl.get(server.name())?.pool(),
            server.url(),
            &b.database,
            migrations::for_tenant(t.organisation_type),
        )
        .await
        {
            Ok(version) => {
                tenants
                    .record_migrated(&t.organisation_id, version)
                    .await?;
                tracing::info!(tenant = %t.slug, organisation_id = %t.organisation_id,
                    database = %b.database, server = server.name(), from = ?t.migration_version,
                    version, elapsed_ms = started.elapsed().as_millis() as u64,
                    "tenant database migrated");
                Ok(Done::Migrated(version))
            }
            // A server that does not answer, a lock held too long: not the migration's fault,
            // and not worth marking the tenant failed (a retry by name would be needed).
            Err(e) if passing(&e) => Ok(Done::Later(format!("migrating {}: {e}", b.database))),
            Err(e) => {
                let reason = format!("migrating {} to version {}: {e}", b.database, b.latest);
                tenants
                    .record_migration_failure(&t.organisation_id, &reason)
                    .await?;
                tracing::error!(tenant = %t.slug, organisation_id = %t.organisation_id,
                    database = %b.database, server = server.name(), error = %e,
                    "tenant migration failed: its events wait; fix it, then `tenancy migrate --retry {}`",
                    t.organisation_id);
                Ok(Done::Failed(reason))
            }
        }
    }
    .await;
    lock.release().await;
    result.unwrap_or_else(|e: sqlx::Error| {
        // The platform's own bookkeeping failed: nothing is recorded, a later pass retries.
        Done::Later(format!("cannot read or record its state: {e}"))
    })
}

/// Whether a migration's error passes with time (the server unreachable or restarting, a lock
/// or statement waited out) rather than being the migration's or the database's own.
fn passing(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            // Lock wait timeout, deadlock, server shutting down, too many connections,
            // MariaDB's and MySQL's statement time limits.
            .is_some_and(|m| matches!(m.number(), 1205 | 1213 | 1053 | 1040 | 1969 | 3024)),
        _ => false,
    }
}

/// Runs a rollout: the canary one by one, then the rest `options.parallel` at a time per
/// server, halting once more than `options.max_failures` of the tenants failed.
pub async fn run(
    tenants: &Tenants,
    ddl: &Servers,
    options: &Options,
    mut progress: impl FnMut(Progress<'_>),
) -> anyhow::Result<Report> {
    let list = behind(tenants, options).await?;
    let total = list.len();
    let mut report = Report {
        total,
        ..Report::default()
    };
    let (first, rest) = canaries_first(list, options)?;
    progress(Progress::Started { total });
    if options.dry_run || total == 0 {
        return Ok(report);
    }
    let retry = options.only.is_some();
    // More failures than this halt the rollout.
    let allowed = (options.max_failures.clamp(0.0, 1.0) * total as f64).floor() as usize;
    let tally = |report: &mut Report, b: &Behind, done: &Done| match done {
        Done::Migrated(_) => report.migrated += 1,
        Done::Skipped(_) => report.skipped += 1,
        Done::Later(_) => report.later += 1,
        Done::Failed(reason) => report
            .failed
            .push((b.tenant.organisation_id.clone(), reason.clone())),
    };
    for b in &first {
        let done = migrate_one(tenants, ddl, b, retry).await;
        let failed = matches!(done, Done::Failed(_));
        tally(&mut report, b, &done);
        progress(Progress::Finished {
            behind: b,
            done: &done,
        });
        if failed {
            report.halted = Some(format!(
                "canary {} ({}) failed: nothing else was migrated",
                b.tenant.slug, b.tenant.organisation_id
            ));
            break;
        }
    }
    let waves: Vec<&[Behind]> = match options.wave {
        Some(n) => rest.chunks(n.max(1)).collect(),
        None => vec![&rest[..]],
    };
    for (i, wave) in waves.iter().enumerate() {
        if report.halted.is_some() || wave.is_empty() {
            break;
        }
        progress(Progress::Wave {
            wave: i + 1,
            waves: waves.len(),
            tenants: wave.len(),
        });
        // `parallel` at a time per server, all servers at once (a slow server slows its own
        // tenants' migrations only), in the list's order (the semaphores are fair).
        let mut limits: BTreeMap<&str, tokio::sync::Semaphore> = BTreeMap::new();
        for b in wave.iter() {
            limits
                .entry(b.tenant.server.as_str())
                .or_insert_with(|| tokio::sync::Semaphore::new(options.parallel.max(1)));
        }
        let halt = AtomicBool::new(false);
        let mut all = futures::stream::FuturesUnordered::new();
        for b in wave.iter() {
            let (limit, halt) = (&limits[b.tenant.server.as_str()], &halt);
            all.push(async move {
                let _turn = limit.acquire().await.expect("never closed");
                // Halted while this one waited for its turn: not started.
                if halt.load(Ordering::Relaxed) {
                    return (b, None);
                }
                (b, Some(migrate_one(tenants, ddl, b, retry).await))
            });
        }
        while let Some((b, done)) = all.next().await {
            let Some(done) = done else { continue };
            tally(&mut report, b, &done);
            progress(Progress::Finished {
                behind: b,
                done: &done,
            });
            if report.failed.len() > allowed && report.halted.is_none() {
                halt.store(true, Ordering::Relaxed);
                report.halted = Some(format!(
                    "{} of {} tenants failed, more than --max-failures allows ({allowed})",
                    report.failed.len(),
                    report.total
                ));
            }
        }
    }
    if let Some(reason) = &report.halted {
        progress(Progress::Halted { reason });
    }
    Ok(report)
}

/// The rollout's list split into its canaries (the named ones first, in the order given, then
/// the first behind up to `options.canary`) and the rest, in the list's order.
fn canaries_first(
    mut list: Vec<Behind>,
    options: &Options,
) -> anyhow::Result<(Vec<Behind>, Vec<Behind>)> {
    let mut first = Vec::new();
    for id in &options.canary_named {
        let Some(i) = list.iter().position(|b| b.tenant.organisation_id == *id) else {
            anyhow::bail!(
                "canary {id} is not behind its latest migration (or not covered by this rollout): it would prove nothing"
            );
        };
        first.push(list.remove(i));
    }
    let more = options.canary.saturating_sub(first.len()).min(list.len());
    let rest = list.split_off(more);
    first.extend(list);
    Ok((first, rest))
}

/// How long the background rollout waits before another pass over tenants left for later.
const LATER: std::time::Duration = std::time::Duration::from_secs(30);

/// The rollout a worker runs in the background after it starts consuming: logs what it does,
/// says so loudly when it halts (the tenants it did not reach keep waiting), and passes again
/// every 30 s while tenants were left for later (a server that did not answer), so a passing
/// outage does not leave them behind until the next start.
pub async fn in_background(tenants: Tenants, ddl: Servers, options: Options) {
    loop {
        let started = std::time::Instant::now();
        let result = run(&tenants, &ddl, &options, |p| {
            if let Progress::Started { total } = p {
                if total > 0 {
                    tracing::info!(
                        tenants = total,
                        parallel = options.parallel,
                        "tenant databases behind their latest migration: rolling them forward; \
                         their events wait until then"
                    );
                }
            }
        })
        .await;
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                tracing::error!(error = %e, "migration rollout could not start: tenants behind \
                    wait; trying again in 30 s (or run `tenancy migrate`)");
                tokio::time::sleep(LATER).await;
                continue;
            }
        };
        if report.total == 0 {
            return;
        }
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if let Some(reason) = &report.halted {
            tracing::error!(migrated = report.migrated, failed = report.failed.len(),
                skipped = report.skipped, later = report.later, elapsed_ms, reason = %reason,
                "migration rollout halted: the tenants it did not reach wait; see `tenancy \
                 status`, fix, then `tenancy migrate`");
            return;
        }
        tracing::info!(
            migrated = report.migrated,
            failed = report.failed.len(),
            skipped = report.skipped,
            later = report.later,
            elapsed_ms,
            "migration rollout pass finished"
        );
        if report.later == 0 {
            return;
        }
        tokio::time::sleep(LATER).await;
    }
}

/// How many tenants of each kind are at each migration version, and which failed, for
/// `tenancy status`.
#[derive(Debug, serde::Serialize)]
pub struct Versions {
    pub kind: OrganisationType,
    pub latest: i64,
    /// Version (None: never recorded) and how many tenants are at it.
    pub at: Vec<(Option<i64>, usize)>,
    /// Organisation id, slug and reason of each tenant whose migration failed.
    pub failed: Vec<(String, String, String)>,
}

pub async fn versions(tenants: &Tenants) -> anyhow::Result<Vec<Versions>> {
    let mut rows = tenants.list(Some(Status::Active)).await?;
    rows.extend(tenants.list(Some(Status::Archived)).await?);
    let mut out = Vec::new();
    for kind in [
        OrganisationType::Brand,
        OrganisationType::Supplier,
        OrganisationType::Retailer,
    ] {
        let mut at: BTreeMap<Option<i64>, usize> = BTreeMap::new();
        let mut failed = Vec::new();
        for t in rows.iter().filter(|t| t.organisation_type == kind) {
            *at.entry(t.migration_version).or_default() += 1;
            if let Some(reason) = &t.migration_failure {
                failed.push((t.organisation_id.clone(), t.slug.clone(), reason.clone()));
            }
        }
        out.push(Versions {
            kind,
            latest: migrations::latest_version(migrations::for_tenant(kind)),
            at: at.into_iter().collect(),
            failed,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_tried_again_and_a_bad_migration_is_marked() {
        let io = sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(passing(&io));
        assert!(passing(&sqlx::Error::PoolTimedOut));
        let changed =
            sqlx::Error::Migrate(Box::new(sqlx::migrate::MigrateError::VersionMismatch(1)));
        assert!(!passing(&changed));
        assert!(!passing(&sqlx::Error::RowNotFound));
    }
}
