//! Termination and restore: the seed's 30-day grace as stream processing (the purge is in
//! `tenancy::purge`).
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

use sqlx::MySqlPool;

use super::clock::{at, EventTime};
use super::outcomes::derived_event_id;
use super::provisioning::Provisioner;
use crate::fault::{crash_after, FailPoint};
use crate::log::events::{EventKind, OrganisationRestored, OrganisationTerminated};
use crate::store::schema::tables;
use crate::store::servers::Server;
use crate::store::tenants::{Audit, Logged, Pending, Status, TenantRecord};
use crate::stream::{error::kafka_outage, Origin, StepError};
use crate::tenant::{DatabaseName, Namespace, OrganisationType, Slug};

/// Moves every table of `from` into `to` with one atomic `RENAME TABLE`, then drops `from`.
/// Re-running after a crash finds fewer (or no) tables left and finishes the job.
async fn move_tables(
    pool: &MySqlPool,
    from: &DatabaseName,
    to: &DatabaseName,
) -> Result<usize, sqlx::Error> {
    sqlx::query(&crate::store::schema::create_database(to, true))
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

    /// The termination's phases: is it due; the row first (projectors gate on it); the tables
    /// into the archive; the caches; the audit trail; the outcome; done.
    async fn terminate_locked(
        &self,
        ev: &OrganisationTerminated,
        origin: &Origin,
        time: EventTime,
    ) -> Result<(), StepError> {
        let org = &ev.organisation_id;
        let asked = Asked::of(ev.organisation_type, org, &ev.slug, &ev.event_id);
        let Some(row) = self.known_tenant(&asked, "termination", true).await? else {
            return Ok(());
        };
        let mine = Pending::Terminate(ev.event_id.clone());
        let resuming = row.pending().as_ref() == Some(&mine);
        if !self.termination_due(&row, &asked, resuming, time).await? {
            return Ok(());
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
        let moved = self.archive_tables(&row, server, &live, &archive).await?;
        crash_after(self.fail_after, FailPoint::Archive);
        let forgotten = self.forget_archived(&row, server, &archive).await?;
        let audit = Audit {
            actor: Some(&ev.terminated_by),
            reason: Some(&ev.reason),
            claimed_at: (!time.trusted()).then(|| at(ev.occurred_at)),
        };
        self.tenants
            .log(&ev.event_id, org, Logged::Terminated, archived_at, &audit)
            .await
            .map_err(|e| StepError::from(e).context("logging the termination"))?;
        let outcome = crate::log::events::TenantArchived {
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

    /// The tenant a lifecycle event names, or `None` after refusing it (with the reason, as
    /// TenantProvisioningFailed): no tenant (a `failed` one counts as none when
    /// `failed_is_none`), or a tenant of another kind than the event says.
    async fn known_tenant(
        &self,
        asked: &Asked<'_>,
        what: &str,
        failed_is_none: bool,
    ) -> Result<Option<TenantRecord>, StepError> {
        let row = self.tenants.get(asked.org).await?;
        let Some(row) = row.filter(|r| !(failed_is_none && r.status == Status::Failed)) else {
            self.refuse_asked(
                asked,
                asked.slug,
                format!("{what} refused: the organisation has no tenant"),
            )
            .await?;
            return Ok(None);
        };
        if let Some(reason) = kind_mismatch(&row, asked.kind, what) {
            self.refuse_asked(asked, &row.slug, reason).await?;
            return Ok(None);
        }
        Ok(Some(row))
    }

    /// Refuses a lifecycle request (logged, and announced as TenantProvisioningFailed).
    async fn refuse_asked(
        &self,
        asked: &Asked<'_>,
        slug: &str,
        reason: String,
    ) -> Result<(), StepError> {
        self.refuse_lifecycle(asked.kind, asked.org, slug, asked.event_id, reason)
            .await
    }

    /// Whether this termination is still to apply: resumed after a crash part-way (finish it),
    /// not applied before, the tenant not purged or archived already, and not placed before the
    /// latest lifecycle step applied.
    async fn termination_due(
        &self,
        row: &TenantRecord,
        asked: &Asked<'_>,
        resuming: bool,
        time: EventTime,
    ) -> Result<bool, StepError> {
        if resuming {
            return Ok(true);
        }
        let (org, event_id) = (asked.org, asked.event_id);
        if self.tenants.logged(event_id).await? {
            tracing::info!(tenant = %row.slug, organisation_id = %org, event_id,
                "OrganisationTerminated already applied: ignored");
            return Ok(false);
        }
        match row.status {
            Status::Purged => {
                tracing::info!(tenant = %row.slug, organisation_id = %org,
                    "OrganisationTerminated for a purged tenant: nothing left to archive");
                Ok(false)
            }
            Status::Archived => {
                tracing::info!(tenant = %row.slug, organisation_id = %org, event_id,
                    "already archived by an earlier termination: ignored");
                Ok(false)
            }
            _ if is_stale(row, time.effective()) => {
                tracing::warn!(tenant = %row.slug, organisation_id = %org, event_id,
                    occurred_at = %at(time.effective()), latest = ?row.lifecycle_at,
                    "OrganisationTerminated older than the latest lifecycle event applied: ignored");
                Ok(false)
            }
            _ => Ok(true),
        }
    }

    /// The tenant's copies removed, then its tables moved into the archive; returns how many
    /// moved. A redelivery after a crash past the move finds the live database gone: nothing
    /// left to clean up there (RENAME TABLE moved every table at once).
    async fn archive_tables(
        &self,
        row: &TenantRecord,
        server: &Server,
        live: &DatabaseName,
        archive: &DatabaseName,
    ) -> Result<usize, StepError> {
        let still_live = !tables(server.pool(), live).await?.is_empty();
        if let (Some(hooks), true) = (&self.hooks, still_live) {
            hooks
                .before_archive(&row.organisation_id, row.organisation_type, server, live)
                .await
                .map_err(|e| StepError::retry(e.context("removing the tenant's copies")))?;
        }
        move_tables(server.pool(), live, archive)
            .await
            .map_err(|e| StepError::from(e).context(format!("archiving {live} into {archive}")))
    }

    /// Every cached answer naming the archived tenant (its retailer hosts too) deleted; how
    /// many keys went.
    async fn forget_archived(
        &self,
        row: &TenantRecord,
        server: &Server,
        archive: &DatabaseName,
    ) -> Result<usize, StepError> {
        let domains: Vec<String> = if row.organisation_type == OrganisationType::Retailer {
            sqlx::query_scalar(&format!("SELECT domain FROM {}.domains", archive.quoted()))
                .fetch_all(server.pool())
                .await
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        Ok(self
            .redis
            .forget_tenant(&row.organisation_id, &domains)
            .await?)
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

    /// The restore's phases: may it proceed (and the archive claimed for it); the tables back
    /// and migrated; copies brought up to date before `active`; the audit trail and the row;
    /// caches; the outcome; done.
    async fn restore_locked(
        &self,
        ev: &OrganisationRestored,
        origin: &Origin,
        time: EventTime,
    ) -> Result<(), StepError> {
        let org = &ev.organisation_id;
        let asked = Asked::of(ev.organisation_type, org, &ev.slug, &ev.event_id);
        let Some(row) = self.known_tenant(&asked, "restore", false).await? else {
            return Ok(());
        };
        let mine = Pending::Restore(ev.event_id.clone());
        // A restore that crashed half-way is finished by its redelivery, whatever else holds.
        if row.pending().as_ref() != Some(&mine)
            && !self.restore_claimed(&row, &asked, time).await?
        {
            return Ok(());
        }
        let (live, archive) = databases(&self.ns, &row)?;
        let server = self.tenants.server_of(&row)?;
        let moved = self.restore_tables(&row, server, &live, &archive).await?;
        crash_after(self.fail_after, FailPoint::RestoreMove);
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
        let outcome = crate::log::events::TenantRestored {
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

    /// Whether a new restore may proceed, the archive claimed for it if so: not applied before,
    /// not placed before the latest lifecycle step, within the grace period, the tenant archived
    /// and not being purged or restored by another event. Anything else is ignored or refused.
    async fn restore_claimed(
        &self,
        row: &TenantRecord,
        asked: &Asked<'_>,
        time: EventTime,
    ) -> Result<bool, StepError> {
        let (org, event_id) = (asked.org, asked.event_id);
        if self.tenants.logged(event_id).await? {
            tracing::info!(tenant = %row.slug, organisation_id = %org, event_id,
                "OrganisationRestored already applied: ignored");
            return Ok(false);
        }
        if is_stale(row, time.effective()) {
            tracing::warn!(tenant = %row.slug, organisation_id = %org, event_id,
                occurred_at = %at(time.effective()), latest = ?row.lifecycle_at,
                "OrganisationRestored older than the latest lifecycle event applied: ignored");
            return Ok(false);
        }
        let refusal = match row.status {
            Status::Archived => {
                let purge_after = row.purge_after.unwrap_or_default();
                (at(time.effective()) > purge_after).then(|| {
                    format!(
                        "restore refused: the grace period ended at {}",
                        purge_after.to_rfc3339()
                    )
                })
            }
            Status::Active => {
                tracing::info!(tenant = %row.slug, organisation_id = %org,
                    "OrganisationRestored for an active tenant: nothing to restore");
                return Ok(false);
            }
            Status::Purged => {
                let when = row.purged_at.map(|t| t.to_rfc3339()).unwrap_or_default();
                Some(format!("restore refused: the tenant was purged at {when}"))
            }
            other => Some(format!(
                "restore refused: the tenant is {other}, not archived"
            )),
        };
        if let Some(reason) = refusal {
            self.refuse_asked(asked, &row.slug, reason).await?;
            return Ok(false);
        }
        let placed = at(time.judged("provisioner", "OrganisationRestored", org));
        if !self.tenants.claim_restore(org, event_id, placed).await? {
            let reason =
                "restore refused: the archive is being purged or restored by another event";
            self.refuse_asked(asked, &row.slug, reason.into()).await?;
            return Ok(false);
        }
        Ok(true)
    }

    /// The archive's tables back under the live name, and any migration shipped while it was
    /// archived applied; returns how many tables moved.
    async fn restore_tables(
        &self,
        row: &TenantRecord,
        server: &Server,
        live: &DatabaseName,
        archive: &DatabaseName,
    ) -> Result<usize, StepError> {
        let moved = move_tables(server.pool(), archive, live)
            .await
            .map_err(|e| StepError::from(e).context(format!("restoring {archive} into {live}")))?;
        super::migrations::create_and_migrate(
            server.pool(),
            server.url(),
            live,
            super::migrations::for_tenant(row.organisation_type),
        )
        .await
        .map_err(|e| StepError::from(e).context(format!("migrating restored {live}")))?;
        Ok(moved)
    }
}

/// What a lifecycle event asks about, for its refusals.
struct Asked<'a> {
    kind: OrganisationType,
    org: &'a str,
    slug: &'a str,
    event_id: &'a str,
}

impl<'a> Asked<'a> {
    fn of(kind: OrganisationType, org: &'a str, slug: &'a str, event_id: &'a str) -> Asked<'a> {
        Asked {
            kind,
            org,
            slug,
            event_id,
        }
    }
}
