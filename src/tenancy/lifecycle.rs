//! Termination, restore and purge: the seed's 30-day grace as stream processing.
//!
//! - OrganisationTerminated: the registry row goes `archived` (so projectors stop writing to
//!   the live name), the tables move to `{ns}_arc_{id}` with `RENAME TABLE` (metadata only, data
//!   intact), the live database is dropped, caches naming the tenant are deleted, and
//!   TenantArchived is published.
//! - OrganisationRestored with `occurred_at <= purge_after`: tables move back, `active`,
//!   TenantRestored. Later, or after a purge, it is refused with TenantProvisioningFailed.
//! - The purge timer ([`PurgeTimer`]) publishes TenantPurged for archives past `purge_after`;
//!   the purger ([`Purger`]) drops the archive when it consumes it. The decision is an event, so a
//!   replay purges exactly what the live run purged, and never an archive that was restored.
//!
//! Every step is idempotent and keyed to the terminating event's id (the archive "epoch"), so a
//! crash between any two steps converges on redelivery, and terminate → restore → terminate
//! works.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use super::outcomes::{derived_event_id, OutcomePublisher};
use super::provisioning::Provisioner;
use super::tenants::{TenantRecord, Tenants};
use super::{db_error, transient};
use crate::config::Config;
use crate::events::{
    Event, EventKind, OrganisationRestored, OrganisationTerminated, TenantProvisioningFailed,
};
use crate::processor::{HandleError, Handler, Origin};
use crate::tenant::{DatabaseName, Namespace, OrganisationType, Slug};
use crate::topics::Topic;

/// A step after which `tenancy run --fail-after` aborts the process, for crash tests.
pub const FAULT_AFTER_ARCHIVE: &str = "archive";

fn at(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or_default()
}

/// Tables of a database, in name order (empty if it does not exist).
async fn tables(pool: &MySqlPool, db: &DatabaseName) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? ORDER BY TABLE_NAME",
    )
    .bind(db.as_str())
    .fetch_all(pool)
    .await
}

/// Moves every table of `from` into `to` with one atomic `RENAME TABLE`, then drops `from`.
/// Re-running after a crash finds fewer (or no) tables left and finishes the job.
async fn move_tables(
    pool: &MySqlPool,
    from: &DatabaseName,
    to: &DatabaseName,
) -> Result<usize, sqlx::Error> {
    sqlx::query(&format!(
        "CREATE DATABASE IF NOT EXISTS {} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
        to.quoted()
    ))
    .execute(pool)
    .await?;
    let names = tables(pool, from).await?;
    // Table names come from information_schema, not from input; quoted as identifiers.
    if !names.is_empty() {
        let pairs: Vec<String> = names
            .iter()
            .map(|t| {
                let t = t.replace('`', "``");
                format!("{}.`{t}` TO {}.`{t}`", from.quoted(), to.quoted())
            })
            .collect();
        sqlx::query(&format!("RENAME TABLE {}", pairs.join(", ")))
            .execute(pool)
            .await?;
    }
    sqlx::query(&format!("DROP DATABASE IF EXISTS {}", from.quoted()))
        .execute(pool)
        .await?;
    Ok(names.len())
}

/// The tenant's live and archive database names, re-derived from validated parts.
fn databases(ns: &Namespace, row: &TenantRecord) -> Result<(DatabaseName, DatabaseName), String> {
    let kind = OrganisationType::parse(&row.organisation_type).map_err(|e| e.to_string())?;
    let slug = Slug::parse(&row.slug).map_err(|e| e.to_string())?;
    let live = ns.tenant_database(kind, &slug).map_err(|e| e.to_string())?;
    let archive = ns
        .archive_database(&row.organisation_id)
        .ok_or_else(|| format!("organisation id {} is not a uuid", row.organisation_id))?;
    Ok((live, archive))
}

impl Provisioner {
    pub(super) async fn terminate(
        &self,
        ev: &OrganisationTerminated,
        origin: &Origin,
    ) -> Result<(), HandleError> {
        let org = &ev.organisation_id;
        let row = self
            .tenants
            .get(org)
            .await
            .map_err(|e| db_error("reading the tenant registry", e))?;
        let Some(row) = row.filter(|r| r.status != "failed") else {
            return self
                .refuse_lifecycle(
                    ev.organisation_type,
                    org,
                    &ev.slug,
                    &ev.event_id,
                    "termination refused: the organisation has no tenant".into(),
                )
                .await;
        };
        match row.status.as_str() {
            "purged" => {
                tracing::info!(tenant = %row.slug, organisation_id = %org, "OrganisationTerminated for a purged tenant: nothing left to archive");
                return Ok(());
            }
            "archived" if row.terminated_by_event.as_deref() != Some(ev.event_id.as_str()) => {
                tracing::info!(tenant = %row.slug, organisation_id = %org, "already archived by an earlier termination: skipped");
                return Ok(());
            }
            _ => {}
        }
        let (live, archive) = databases(&self.ns, &row).map_err(HandleError::Permanent)?;
        let archived_at = at(ev.occurred_at);
        let purge_after = archived_at + self.grace;
        // Registry first: projectors gate on it, so nothing new is written under the live name.
        self.tenants
            .mark_archived(
                org,
                &ev.event_id,
                &archive,
                archived_at,
                purge_after,
                &ev.reason,
            )
            .await
            .map_err(|e| db_error("marking the tenant archived", e))?;
        let moved = move_tables(&self.pool, &live, &archive)
            .await
            .map_err(|e| db_error(&format!("archiving {live} into {archive}"), e))?;
        if self.fail_after.as_deref() == Some(FAULT_AFTER_ARCHIVE) {
            tracing::error!(tenant = %row.slug, "--fail-after archive: aborting as a crash would");
            std::process::abort();
        }
        let domains: Vec<String> = if row.organisation_type == "RETAILER" {
            sqlx::query_scalar(&format!("SELECT domain FROM {}.domains", archive.quoted()))
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let forgotten = self
            .cache
            .forget_tenant(org, &domains)
            .await
            .map_err(transient)?;
        self.tenants
            .log(&ev.event_id, org, "terminated", "archived", archived_at)
            .await
            .map_err(|e| db_error("logging the termination", e))?;
        let outcome = crate::events::TenantArchived {
            event_id: derived_event_id(&ev.event_id, EventKind::TenantArchived),
            occurred_at: ev.occurred_at,
            organisation_id: org.clone(),
            organisation_type: ev.organisation_type,
            slug: row.slug.clone(),
            database: live.to_string(),
            archive_database: archive.to_string(),
            purge_after: purge_after.timestamp_millis(),
            reason: ev.reason.clone(),
            caused_by: Some(ev.event_id.clone()),
        };
        self.outcomes
            .publish(EventKind::TenantArchived, org, &outcome)
            .await
            .map_err(transient)?;
        metrics::counter!("tenancy_tenants_archived_total").increment(1);
        tracing::info!(tenant = %row.slug, organisation_id = %org, database = %live, archive = %archive,
            tables = moved, cache_keys = forgotten, purge_after = %purge_after, offset = origin.offset,
            "tenant archived");
        Ok(())
    }

    pub(super) async fn restore(
        &self,
        ev: &OrganisationRestored,
        origin: &Origin,
    ) -> Result<(), HandleError> {
        let org = &ev.organisation_id;
        let row = self
            .tenants
            .get(org)
            .await
            .map_err(|e| db_error("reading the tenant registry", e))?;
        let Some(row) = row else {
            return self
                .refuse_lifecycle(
                    ev.organisation_type,
                    org,
                    &ev.slug,
                    &ev.event_id,
                    "restore refused: the organisation has no tenant".into(),
                )
                .await;
        };
        let (live, archive) = databases(&self.ns, &row).map_err(HandleError::Permanent)?;
        match row.status.as_str() {
            "archived" => {
                let purge_after = row.purge_after.unwrap_or_default();
                if at(ev.occurred_at) > purge_after {
                    return self
                        .refuse_lifecycle(
                            ev.organisation_type,
                            org,
                            &row.slug,
                            &ev.event_id,
                            format!(
                                "restore refused: the grace period ended at {}",
                                purge_after.to_rfc3339()
                            ),
                        )
                        .await;
                }
            }
            // Redelivered after the registry step, or restored already: finish and re-announce.
            "active"
                if !tables(&self.pool, &archive)
                    .await
                    .map_err(|e| db_error("listing archive tables", e))?
                    .is_empty() => {}
            "active" => {
                if !self
                    .tenants
                    .logged(&ev.event_id)
                    .await
                    .map_err(|e| db_error("reading the lifecycle log", e))?
                {
                    tracing::info!(tenant = %row.slug, organisation_id = %org, "OrganisationRestored for an active tenant: nothing to restore");
                    return Ok(());
                }
            }
            "purged" => {
                let when = row.purged_at.map(|t| t.to_rfc3339()).unwrap_or_default();
                return self
                    .refuse_lifecycle(
                        ev.organisation_type,
                        org,
                        &row.slug,
                        &ev.event_id,
                        format!("restore refused: the tenant was purged at {when}"),
                    )
                    .await;
            }
            other => {
                return self
                    .refuse_lifecycle(
                        ev.organisation_type,
                        org,
                        &row.slug,
                        &ev.event_id,
                        format!("restore refused: the tenant is {other}, not archived"),
                    )
                    .await;
            }
        }
        let moved = move_tables(&self.pool, &archive, &live)
            .await
            .map_err(|e| db_error(&format!("restoring {archive} into {live}"), e))?;
        // Logged before the status flips: a crash in between leaves the row `archived`, and the
        // redelivery finishes; a crash after it finds the log and re-announces.
        self.tenants
            .log(
                &ev.event_id,
                org,
                "restored",
                "restored",
                at(ev.occurred_at),
            )
            .await
            .map_err(|e| db_error("logging the restore", e))?;
        // Copies are refreshed before the status flips, so `active` means caught up.
        if row.organisation_type == "SUPPLIER" {
            crate::catalog::refresh_supplier_copies(
                &self.pool,
                &self.ns,
                &self.tenants,
                org,
                &live,
            )
            .await
            .map_err(transient)?;
        }
        self.tenants
            .mark_restored(org, at(ev.occurred_at))
            .await
            .map_err(|e| db_error("marking the tenant active", e))?;
        let outcome = crate::events::TenantRestored {
            event_id: derived_event_id(&ev.event_id, EventKind::TenantRestored),
            occurred_at: ev.occurred_at,
            organisation_id: org.clone(),
            organisation_type: ev.organisation_type,
            slug: row.slug.clone(),
            database: live.to_string(),
            caused_by: Some(ev.event_id.clone()),
        };
        self.outcomes
            .publish(EventKind::TenantRestored, org, &outcome)
            .await
            .map_err(transient)?;
        metrics::counter!("tenancy_tenants_restored_total").increment(1);
        tracing::info!(tenant = %row.slug, organisation_id = %org, database = %live, tables = moved,
            offset = origin.offset, "tenant restored");
        Ok(())
    }

    /// A refused lifecycle request: logged, and announced as TenantProvisioningFailed.
    async fn refuse_lifecycle(
        &self,
        kind: OrganisationType,
        org: &str,
        slug: &str,
        event_id: &str,
        reason: String,
    ) -> Result<(), HandleError> {
        tracing::warn!(tenant = %slug, organisation_id = %org, %reason, "lifecycle request refused");
        self.tenants
            .log(event_id, org, "refused", "refused", Utc::now())
            .await
            .map_err(|e| db_error("logging the refusal", e))?;
        let outcome = TenantProvisioningFailed {
            event_id: derived_event_id(event_id, EventKind::TenantProvisioningFailed),
            occurred_at: Utc::now().timestamp_millis(),
            organisation_id: org.to_owned(),
            organisation_type: kind,
            slug: slug.to_owned(),
            database: None,
            reason,
            caused_by: Some(event_id.to_owned()),
        };
        self.outcomes
            .publish(EventKind::TenantProvisioningFailed, org, &outcome)
            .await
            .map_err(transient)?;
        Ok(())
    }
}

/// Consumes `{ns}.tenancy` and carries out TenantPurged: drops the archive of the termination it
/// names, and marks the tenant `purged`.
pub struct Purger {
    pub ns: Namespace,
    pub pool: MySqlPool,
    pub tenants: Tenants,
    pub cache: crate::access::cache::PermissionCache,
    pub spec: crate::catalog::spec::CatalogSpec,
}

impl Purger {
    /// A purged brand's catalog leaves the platform: every supplier copy of it goes too. (So
    /// the end state does not depend on whether a replay copied it before the purge.)
    async fn drop_supplier_copies(&self, brand_id: &str) -> Result<usize, sqlx::Error> {
        let platform = self
            .ns
            .service_database(crate::tenant::ServiceDatabase::Platform);
        let suppliers: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT supplier_id FROM {}.brand_access WHERE brand_id = ?",
            platform.quoted()
        ))
        .bind(brand_id)
        .fetch_all(&self.pool)
        .await?;
        let ids: Vec<&str> = suppliers.iter().map(String::as_str).collect();
        let registry = self.tenants.lookup(&ids).await?;
        let mut dropped = 0;
        for supplier in registry.values() {
            let db = match supplier.status {
                super::tenants::Status::Active => supplier.database.clone(),
                super::tenants::Status::Archived => supplier.archive_database.clone(),
                _ => None,
            };
            let Some(db) = db else { continue };
            let mut tx = self.pool.begin().await?;
            dropped += crate::catalog::store::drop_copy(&mut tx, &db, &self.spec, brand_id).await?;
            sqlx::query(&format!(
                "DELETE FROM {}.brand_access WHERE brand_id = ?",
                db.quoted()
            ))
            .bind(brand_id)
            .execute(&mut *tx)
            .await?;
            crate::offsets::clear(&mut tx, &db, &format!("copy:{brand_id}")).await?;
            tx.commit().await?;
        }
        Ok(dropped as usize)
    }
}

impl Handler for Purger {
    async fn handle(&self, event: Event, origin: &Origin) -> Result<(), HandleError> {
        let Event::Other {
            kind: EventKind::TenantPurged,
            value,
        } = event
        else {
            return Ok(()); // the other outcome events are for other services
        };
        let purged: crate::events::TenantPurged = apache_avro::from_value(&value)
            .map_err(|e| HandleError::Permanent(format!("TenantPurged does not map: {e}")))?;
        let org = &purged.organisation_id;
        let Some(epoch) = purged.caused_by.clone() else {
            return Err(HandleError::Permanent(
                "TenantPurged without caused_by".into(),
            ));
        };
        let row = self
            .tenants
            .get(org)
            .await
            .map_err(|e| db_error("reading the tenant registry", e))?;
        let current = row
            .as_ref()
            .is_some_and(|r| r.terminated_by_event.as_deref() == Some(epoch.as_str()));
        match row.as_ref().map(|r| r.status.as_str()) {
            Some("purged") if current => return Ok(()),
            Some("archived") if current => {}
            _ => {
                // Not this archive: either a replay has not reached the termination yet (wait
                // for it), or a restore or a later termination superseded it (skip).
                if self
                    .tenants
                    .logged(&epoch)
                    .await
                    .map_err(|e| db_error("reading the lifecycle log", e))?
                {
                    tracing::info!(organisation_id = %org, termination = %epoch, "purge of a superseded archive: skipped");
                    return Ok(());
                }
                return Err(HandleError::Transient(anyhow::anyhow!(
                    "termination {epoch} of {org} is not applied yet; waiting before purging"
                )));
            }
        }
        let row = row.expect("matched above");
        let (live, archive) = databases(&self.ns, &row).map_err(HandleError::Permanent)?;
        for db in [&archive, &live] {
            sqlx::query(&format!("DROP DATABASE IF EXISTS {}", db.quoted()))
                .execute(&self.pool)
                .await
                .map_err(|e| db_error(&format!("dropping {db}"), e))?;
        }
        let copies = if row.organisation_type == "BRAND" {
            self.drop_supplier_copies(org)
                .await
                .map_err(|e| db_error("removing supplier copies of the brand", e))?
        } else {
            0
        };
        let platform = self
            .ns
            .service_database(crate::tenant::ServiceDatabase::Platform);
        sqlx::query(&format!(
            "DELETE FROM {}.brand_access WHERE brand_id = ? OR supplier_id = ?",
            platform.quoted()
        ))
        .bind(org)
        .bind(org)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("removing access index rows", e))?;
        self.cache
            .forget_tenant(org, &[])
            .await
            .map_err(transient)?;
        self.tenants
            .mark_purged(org, &epoch, at(purged.occurred_at))
            .await
            .map_err(|e| db_error("marking the tenant purged", e))?;
        self.tenants
            .log(
                &purged.event_id,
                org,
                "purged",
                "purged",
                at(purged.occurred_at),
            )
            .await
            .map_err(|e| db_error("logging the purge", e))?;
        metrics::counter!("tenancy_tenants_purged_total").increment(1);
        tracing::info!(tenant = %row.slug, organisation_id = %org, archive = %archive, offset = origin.offset,
            supplier_copy_rows = copies, "tenant purged: archive dropped");
        Ok(())
    }
}

/// A due archive and the end offsets of `{ns}.organisations` when it was first seen due.
struct Noted {
    epoch: String,
    ends: Vec<crate::kafka::GroupPosition>,
}

/// Finds archives past their grace period and publishes TenantPurged for them.
///
/// Two phases, so a restore that was sent in time is never beaten by the timer: a due archive is
/// first noted with the current end offsets of `{ns}.organisations`; it is purged on a later
/// tick only once the provisioner group has committed past those offsets (every lifecycle event
/// sent before the decision has been applied) and the archive is still the same.
pub struct PurgeTimer {
    pub config: Config,
    pub tenants: Tenants,
    pub outcomes: OutcomePublisher,
    pub every: Duration,
}

impl PurgeTimer {
    pub async fn run(&self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut noted: HashMap<String, Noted> = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.every) => {}
            }
            if let Err(e) = self.tick(&mut noted).await {
                tracing::warn!(error = %format!("{e:#}"), "purge timer: will retry");
            }
        }
    }

    async fn tick(&self, noted: &mut HashMap<String, Noted>) -> anyhow::Result<()> {
        let due = self.tenants.purge_due(Utc::now()).await?;
        noted.retain(|org, _| due.iter().any(|r| &r.organisation_id == org));
        if due.is_empty() {
            return Ok(());
        }
        let config = self.config.clone();
        let group = format!("{}.provisioner", config.namespace);
        let topics = vec![Topic::Organisations.name(&config.namespace)];
        let positions =
            tokio::task::spawn_blocking(move || crate::kafka::group_lag(&config, &group, &topics))
                .await??;
        for row in due {
            let Some(epoch) = row.terminated_by_event.clone() else {
                continue;
            };
            match noted.get(&row.organisation_id) {
                Some(Noted {
                    epoch: noted_epoch,
                    ends,
                }) if *noted_epoch == epoch => {
                    let caught_up = ends.iter().all(|end| {
                        positions.iter().any(|now| {
                            now.topic == end.topic
                                && now.partition == end.partition
                                && now.committed.unwrap_or(0) >= end.end
                        })
                    });
                    if caught_up {
                        self.publish(&row, &epoch).await?;
                        noted.remove(&row.organisation_id);
                    }
                }
                _ => {
                    let ends = positions.clone();
                    noted.insert(row.organisation_id.clone(), Noted { epoch, ends });
                }
            }
        }
        Ok(())
    }

    async fn publish(&self, row: &TenantRecord, epoch: &str) -> anyhow::Result<()> {
        let kind = OrganisationType::parse(&row.organisation_type)?;
        let purge_after = row.purge_after.unwrap_or_default();
        let event = crate::events::TenantPurged {
            // One id per archive, whichever worker's timer decides: duplicates dedupe.
            event_id: derived_event_id(epoch, EventKind::TenantPurged),
            occurred_at: purge_after.timestamp_millis(),
            organisation_id: row.organisation_id.clone(),
            organisation_type: kind,
            slug: row.slug.clone(),
            database: row.database_name.clone().unwrap_or_default(),
            reason: format!("grace period ended at {}", purge_after.to_rfc3339()),
            caused_by: Some(epoch.to_owned()),
        };
        self.outcomes
            .publish(EventKind::TenantPurged, &row.organisation_id, &event)
            .await?;
        tracing::info!(tenant = %row.slug, organisation_id = %row.organisation_id, "grace period over: TenantPurged published");
        Ok(())
    }
}
