//! Termination and restore: the seed's 30-day grace as stream processing (the purge is in
//! [`super::purge`]).
//!
//! - OrganisationTerminated: the tenant's row goes `archived` with the termination marked under
//!   way (projectors hold its events meanwhile), the tables move to `{ns}_arc_{id}` with one
//!   `RENAME TABLE` (metadata only, data intact), the live database is dropped, caches naming the
//!   tenant are deleted, the step is marked done, and TenantArchived is published.
//! - OrganisationRestored with `occurred_at <= purge_after`: the archive is claimed for the
//!   restore (a purge marks the row `purged` first, so only one of them proceeds), tables move
//!   back, a supplier's copies are brought up to date, `active`, TenantRestored. Later, or after
//!   a purge, it is refused with TenantProvisioningFailed.
//!
//! Every step holds the organisation's lifecycle lock and is idempotent, keyed to the event's
//! id, so a crash between any two steps is finished by the redelivery, and two workers racing on
//! one event apply it once and dead-letter nothing. An event placed before the latest
//! termination or restore applied — a stale copy, or a dead letter replayed late (it keeps its
//! original's log time) — is ignored with a log line, so it can never undo a later step.
//!
//! Times are the log's ([`super::clock`]): each event is placed at its `occurred_at` only when
//! that is within bounds of the message's log time, and the grace runs from no earlier than the
//! log time. A termination stamped in 1970 gets its full grace; one stamped a year ahead does
//! not hide the restore that follows. Who asked and why go to the audit trail.

use chrono::{DateTime, TimeZone, Utc};
use sqlx::MySqlPool;

use super::clock::EventTime;
use super::outcomes::derived_event_id;
use super::provisioning::Provisioner;
use super::tenants::{Audit, Logged, Pending, Status, TenantRecord};
use crate::db::tables;
use crate::events::{EventKind, OrganisationRestored, OrganisationTerminated};
use crate::stream::{error::kafka_outage, Origin, StepError};
use crate::tenant::{DatabaseName, Namespace, OrganisationType, Slug};

/// A step after which `tenancy run --fail-after` aborts the process, for crash tests.
pub const FAULT_AFTER_ARCHIVE: &str = "archive";
/// Aborts after a restore moved the tables back, before the tenant is active again.
pub const FAULT_AFTER_RESTORE_MOVE: &str = "restore-move";

pub(super) fn at(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or_default()
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
pub(super) fn databases(
    ns: &Namespace,
    row: &TenantRecord,
) -> Result<(DatabaseName, DatabaseName), StepError> {
    let slug = Slug::parse(&row.slug).map_err(|e| StepError::reject(e.to_string()))?;
    let live = ns
        .tenant_database(row.organisation_type, &slug)
        .map_err(|e| StepError::reject(e.to_string()))?;
    let archive = ns.archive_database(&row.organisation_id).ok_or_else(|| {
        StepError::reject(format!(
            "organisation id {} is not a uuid",
            row.organisation_id
        ))
    })?;
    Ok((live, archive))
}

/// Why a lifecycle event for `row` names the wrong kind of organisation, if it does.
fn kind_mismatch(row: &TenantRecord, named: OrganisationType, what: &str) -> Option<String> {
    (row.organisation_type != named).then(|| {
        format!(
            "{what} refused: it names organisation {} as a {named}, but it is a {}",
            row.organisation_id, row.organisation_type
        )
    })
}

/// Whether an event that happened at `occurred_at` is older than the latest termination or
/// restore applied to `row`.
fn is_stale(row: &TenantRecord, occurred_at: i64) -> bool {
    row.lifecycle_at
        .is_some_and(|latest| at(occurred_at) < latest)
}

impl Provisioner {
    pub(super) async fn terminate(
        &self,
        ev: &OrganisationTerminated,
        origin: &Origin,
        time: EventTime,
    ) -> Result<(), StepError> {
        let lock = self.lock(&ev.organisation_id).await?;
        let result = self.terminate_locked(ev, origin, time).await;
        lock.release().await;
        result
    }

    async fn terminate_locked(
        &self,
        ev: &OrganisationTerminated,
        origin: &Origin,
        time: EventTime,
    ) -> Result<(), StepError> {
        let org = &ev.organisation_id;
        let row = self.tenants.get(org).await?;
        let Some(row) = row.filter(|r| r.status != Status::Failed) else {
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
        if let Some(reason) = kind_mismatch(&row, ev.organisation_type, "termination") {
            return self
                .refuse_lifecycle(ev.organisation_type, org, &row.slug, &ev.event_id, reason)
                .await;
        }
        // Resuming means this termination is marked under way (a crash part-way): finish it.
        // Otherwise an event already logged is a duplicate (a redelivery after the tenant was
        // perhaps restored since), never applied twice.
        let mine = Pending::Terminate(ev.event_id.clone());
        let resuming = row.pending().as_ref() == Some(&mine);
        if !resuming && self.tenants.logged(&ev.event_id).await? {
            tracing::info!(tenant = %row.slug, organisation_id = %org, event_id = %ev.event_id,
                "OrganisationTerminated already applied: ignored");
            return Ok(());
        }
        match row.status {
            Status::Purged => {
                tracing::info!(tenant = %row.slug, organisation_id = %org, "OrganisationTerminated for a purged tenant: nothing left to archive");
                return Ok(());
            }
            Status::Archived if !resuming => {
                tracing::info!(tenant = %row.slug, organisation_id = %org, event_id = %ev.event_id,
                    "already archived by an earlier termination: ignored");
                return Ok(());
            }
            _ if !resuming && is_stale(&row, time.effective()) => {
                tracing::warn!(tenant = %row.slug, organisation_id = %org, event_id = %ev.event_id,
                    occurred_at = %at(time.effective()), latest = ?row.lifecycle_at,
                    "OrganisationTerminated older than the latest lifecycle event applied: ignored");
                return Ok(());
            }
            _ => {}
        }
        let (live, archive) = databases(&self.ns, &row)?;
        // The archive is on the tenant's own server: RENAME TABLE cannot cross servers.
        let server = self.tenants.server_of(&row)?;
        let archived_at = at(time.judged("provisioner", "OrganisationTerminated", org));
        // Never before the log had the termination: a past stamp cannot shorten the grace.
        let purge_after = at(time.counted_from()) + self.grace;
        // The row first: projectors gate on it, so nothing new is written under the live name,
        // and the step is marked under way so they hold the tenant's events until it is done.
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
            .map_err(|e| StepError::from(e).context("marking the tenant archived"))?;
        // A redelivery after a crash past the move finds the live database gone: nothing left
        // to clean up there (RENAME TABLE moved every table at once).
        let still_live = !tables(server.pool(), &live).await?.is_empty();
        if let (Some(hooks), true) = (&self.hooks, still_live) {
            hooks
                .before_archive(org, row.organisation_type, server, &live)
                .await
                .map_err(|e| StepError::retry(e.context("removing the tenant's copies")))?;
        }
        let moved = move_tables(server.pool(), &live, &archive)
            .await
            .map_err(|e| StepError::from(e).context(format!("archiving {live} into {archive}")))?;
        if self.fail_after.as_deref() == Some(FAULT_AFTER_ARCHIVE) {
            tracing::error!(tenant = %row.slug, "--fail-after archive: aborting as a crash would");
            std::process::abort();
        }
        let domains: Vec<String> = if row.organisation_type == OrganisationType::Retailer {
            sqlx::query_scalar(&format!("SELECT domain FROM {}.domains", archive.quoted()))
                .fetch_all(server.pool())
                .await
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let forgotten = self.redis.forget_tenant(org, &domains).await?;
        let audit = Audit {
            actor: Some(&ev.terminated_by),
            reason: Some(&ev.reason),
            claimed_at: (!time.trusted()).then(|| at(ev.occurred_at)),
        };
        self.tenants
            .log(&ev.event_id, org, Logged::Terminated, archived_at, &audit)
            .await
            .map_err(|e| StepError::from(e).context("logging the termination"))?;
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
            .map_err(kafka_outage)?;
        self.tenants.settle(org, &mine).await?;
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
        time: EventTime,
    ) -> Result<(), StepError> {
        let lock = self.lock(&ev.organisation_id).await?;
        let result = self.restore_locked(ev, origin, time).await;
        lock.release().await;
        result
    }

    async fn restore_locked(
        &self,
        ev: &OrganisationRestored,
        origin: &Origin,
        time: EventTime,
    ) -> Result<(), StepError> {
        let org = &ev.organisation_id;
        let row = self.tenants.get(org).await?;
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
        if let Some(reason) = kind_mismatch(&row, ev.organisation_type, "restore") {
            return self
                .refuse_lifecycle(ev.organisation_type, org, &row.slug, &ev.event_id, reason)
                .await;
        }
        let mine = Pending::Restore(ev.event_id.clone());
        // A restore that crashed half-way is finished by its redelivery, whatever else holds.
        if row.pending().as_ref() != Some(&mine) {
            if self.tenants.logged(&ev.event_id).await? {
                tracing::info!(tenant = %row.slug, organisation_id = %org, event_id = %ev.event_id,
                    "OrganisationRestored already applied: ignored");
                return Ok(());
            }
            if is_stale(&row, time.effective()) {
                tracing::warn!(tenant = %row.slug, organisation_id = %org, event_id = %ev.event_id,
                    occurred_at = %at(time.effective()), latest = ?row.lifecycle_at,
                    "OrganisationRestored older than the latest lifecycle event applied: ignored");
                return Ok(());
            }
            match row.status {
                Status::Archived => {
                    let purge_after = row.purge_after.unwrap_or_default();
                    if at(time.effective()) > purge_after {
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
                Status::Active => {
                    tracing::info!(tenant = %row.slug, organisation_id = %org, "OrganisationRestored for an active tenant: nothing to restore");
                    return Ok(());
                }
                Status::Purged => {
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
            let placed = at(time.judged("provisioner", "OrganisationRestored", org));
            if !self
                .tenants
                .claim_restore(org, &ev.event_id, placed)
                .await?
            {
                return self
                    .refuse_lifecycle(
                        ev.organisation_type,
                        org,
                        &row.slug,
                        &ev.event_id,
                        "restore refused: the archive is being purged or restored by another event"
                            .into(),
                    )
                    .await;
            }
        }
        let (live, archive) = databases(&self.ns, &row)?;
        let server = self.tenants.server_of(&row)?;
        let moved = move_tables(server.pool(), &archive, &live)
            .await
            .map_err(|e| StepError::from(e).context(format!("restoring {archive} into {live}")))?;
        // A migration shipped while the tenant was archived reaches it now.
        super::migrations::create_and_migrate(
            server.pool(),
            server.url(),
            &live,
            super::migrations::for_tenant(row.organisation_type),
        )
        .await
        .map_err(|e| StepError::from(e).context(format!("migrating restored {live}")))?;
        if self.fail_after.as_deref() == Some(FAULT_AFTER_RESTORE_MOVE) {
            tracing::error!(tenant = %row.slug, "--fail-after restore-move: aborting as a crash would");
            std::process::abort();
        }
        // Copies are refreshed before the status flips, so `active` means caught up.
        if let Some(hooks) = &self.hooks {
            hooks
                .before_reactivation(org, row.organisation_type, server, &live)
                .await
                .map_err(|e| {
                    StepError::retry(e.context("bringing the restored tenant's copies up to date"))
                })?;
        }
        let audit = Audit {
            actor: Some(&ev.restored_by),
            reason: None,
            claimed_at: (!time.trusted()).then(|| at(ev.occurred_at)),
        };
        self.tenants
            .log(
                &ev.event_id,
                org,
                Logged::Restored,
                at(time.effective()),
                &audit,
            )
            .await?;
        self.tenants
            .mark_restored(org, at(time.effective()))
            .await?;
        // Cached resolutions still say "archived" (410): refreshed from here on.
        self.redis.domains_changed(&[]).await?;
        if let Some(hooks) = &self.hooks {
            hooks
                .after_reactivation(org, row.organisation_type, server, &live)
                .await
                .map_err(|e| {
                    StepError::retry(e.context("caching the restored tenant's permissions"))
                })?;
        }
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
            .map_err(kafka_outage)?;
        self.tenants.settle(org, &mine).await?;
        metrics::counter!("tenancy_tenants_restored_total").increment(1);
        tracing::info!(tenant = %row.slug, organisation_id = %org, database = %live, tables = moved,
            offset = origin.offset, "tenant restored");
        Ok(())
    }
}
