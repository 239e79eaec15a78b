//! The purge: archives past their grace period are dropped, as events.
//!
//! The purge timer ([`PurgeTimer`]) publishes TenantPurged for archives past `purge_after`; the
//! purger ([`Purger`], group `{ns}.purger`) drops the archive when it consumes it. The decision is
//! an event, so a replay purges exactly what the live run purged, and never an archive that was
//! restored.
//!
//! Outcome events are the processors' alone, and the purger re-checks what it acts on: it drops
//! nothing before the tenant's `purge_after` whatever the event says, skips an archive a restore
//! superseded or is restoring, and dead-letters a TenantPurged naming a termination that was
//! never applied (once the lifecycle log is caught up, so a replay still in progress waits).
//!
//! A purge leaves nothing of the tenant ([`Purger::remove_everything`]): its databases on every
//! server (live, archive, a rebuild's shadow and kept old tables, what a killed move left), the
//! supplier copies of a brand, its rows in the platform's indexes (grants, custom hosts and
//! their tombstones, kept copies, rebuilds, bookkeeping), its Redis keys. Last, the tenant row
//! lets go of its database name: its slug and hosts are free for a new organisation. The row
//! and the lifecycle log stay as the audit trail (who, when, why), holding no tenant data.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::clock::at;
use super::lifecycle::databases;
use super::outcomes::{derived_event_id, OutcomePublisher};
use super::provisioning::LifecycleHooks;
use super::watermark::{settled, LogEnds, Watermark};
use crate::cache::Redis;
use crate::failure::kafka_outage;
use crate::log::events::{Event, EventKind, TenantPurged};
use crate::store::locks::NamedLock;
use crate::store::tenants::{Audit, Logged, Pending, Status, TenantRecord, Tenants};
use crate::stream::{Failed, Gate, Msg, Origin, Processor, SkipReason, StepError, Wait};
use crate::tenant::{Namespace, OrganisationType, ServiceDatabase};

/// Consumes `{ns}.tenancy` and carries out TenantPurged.
pub struct Purger {
    pub ns: Namespace,
    /// Also the router: `tenants.servers()`.
    pub tenants: Tenants,
    pub redis: Redis,
    pub watermark: Watermark,
    pub hooks: Option<Arc<dyn LifecycleHooks>>,
}

/// What the purger reads from `{ns}.tenancy`.
pub enum PurgeItem {
    Purge(TenantPurged),
    /// The other outcome events are for other services.
    Other {
        organisation_id: String,
    },
}

impl Processor for Purger {
    type Item = PurgeItem;
    type Target = ();

    fn name(&self) -> &'static str {
        "purger"
    }

    fn parse(&self, event: Event, origin: &Origin) -> Result<PurgeItem, String> {
        match event {
            Event::Other {
                kind: EventKind::TenantPurged,
                value,
            } => {
                let event: TenantPurged = apache_avro::from_value(&value)
                    .map_err(|e| format!("TenantPurged does not map: {e}"))?;
                Ok(PurgeItem::Purge(event))
            }
            other => Ok(PurgeItem::Other {
                organisation_id: origin
                    .key
                    .clone()
                    .unwrap_or_else(|| other.kind().name().to_owned()),
            }),
        }
    }

    /// A purge drops databases on its tenant's server: a server that does not answer parks
    /// its own purges only.
    fn servers(&self) -> Option<&crate::store::servers::Servers> {
        Some(self.tenants.servers())
    }

    fn order_key(&self, item: &PurgeItem) -> String {
        match item {
            PurgeItem::Purge(event) => event.organisation_id.clone(),
            PurgeItem::Other { organisation_id } => organisation_id.clone(),
        }
    }

    async fn gate(&self, msgs: &[&Msg<PurgeItem>]) -> Result<Vec<Gate<()>>, StepError> {
        let ends = self.watermark.ends().await?;
        let applied = self.watermark.applied().await?;
        let lifecycle_settled = settled(&applied, &ends);
        Ok(msgs
            .iter()
            .map(|m| match &m.item {
                PurgeItem::Other { .. } => Gate::Skip {
                    reason: SkipReason::Ignored,
                    tenant: None,
                },
                // During a replay the termination it names may not be applied yet.
                PurgeItem::Purge(_) if !lifecycle_settled => Gate::Hold(Wait::Lifecycle),
                PurgeItem::Purge(_) => Gate::Ready(()),
            })
            .collect())
    }

    async fn apply(&self, run: &[(&Msg<PurgeItem>, &())]) -> Result<(), Failed> {
        for (i, (m, _)) in run.iter().enumerate() {
            if let PurgeItem::Purge(event) = &m.item {
                self.purge(event, &m.origin)
                    .await
                    .map_err(|e| Failed::at(i, e))?;
            }
        }
        Ok(())
    }
}

impl Purger {
    /// The home server's pool: locks and `{ns}_platform`.
    fn home(&self) -> &sqlx::MySqlPool {
        self.tenants.servers().home().pool()
    }

    async fn purge(&self, purged: &TenantPurged, origin: &Origin) -> Result<(), StepError> {
        let lock = NamedLock::lifecycle(self.home(), &self.ns, &purged.organisation_id).await?;
        let result = self.purge_locked(purged, origin).await;
        lock.release().await;
        result
    }

    async fn purge_locked(&self, purged: &TenantPurged, origin: &Origin) -> Result<(), StepError> {
        let org = &purged.organisation_id;
        let Some(epoch) = purged.caused_by.clone() else {
            return Err(StepError::reject(
                "TenantPurged without caused_by (the termination it ends)",
            ));
        };
        let row = self.tenants.get(org).await?;
        let current = row
            .as_ref()
            .is_some_and(|r| r.terminated_by_event.as_deref() == Some(epoch.as_str()));
        let row = match row {
            // Redelivered after the purge completed (the name is let go last): nothing to do.
            // The name may be another organisation's by now: never drop under it again.
            Some(r) if current && r.status == Status::Purged && r.database_name.is_none() => {
                tracing::info!(organisation_id = %org, termination = %epoch, "purge already complete");
                return Ok(());
            }
            // Redelivered after the row was marked: finish the removals (all idempotent).
            Some(r) if current && r.status == Status::Purged => r,
            Some(r) if current && r.status == Status::Archived => {
                if let Some(Pending::Restore(by)) = r.pending() {
                    tracing::info!(organisation_id = %org, termination = %epoch, restore = %by,
                        "purge of an archive being restored: skipped");
                    return Ok(());
                }
                let due = r.purge_after.unwrap_or_default();
                if Utc::now() < due {
                    return Err(StepError::reject(format!(
                        "TenantPurged for {org} before its grace period ends ({}): refused, the archive is kept",
                        due.to_rfc3339()
                    )));
                }
                // The row first: a restore arriving from now on is refused, and projectors skip.
                if !self
                    .tenants
                    .mark_purged(org, &epoch, at(purged.occurred_at))
                    .await?
                {
                    return Err(StepError::retry(anyhow::anyhow!(
                        "the tenant row of {org} changed while purging; gating again"
                    )));
                }
                r
            }
            _ => {
                // Not this archive: a restore or a later termination superseded it (skip), or it
                // names a termination that never happened (the lifecycle is caught up: reject).
                if self.tenants.logged(&epoch).await? {
                    tracing::info!(organisation_id = %org, termination = %epoch, "purge of a superseded archive: skipped");
                    return Ok(());
                }
                return Err(StepError::reject(format!(
                    "TenantPurged for {org} names termination {epoch}, which was never applied"
                )));
            }
        };
        let removed = self.remove_everything(&row).await?;
        let audit = Audit {
            actor: Some("purge timer"),
            reason: Some(&purged.reason),
            claimed_at: None,
        };
        self.tenants
            .log(
                &purged.event_id,
                org,
                Logged::Purged,
                at(purged.occurred_at),
                &audit,
            )
            .await?;
        self.tenants.release_name(org).await?;
        metrics::counter!("tenancy_tenants_purged_total").increment(1);
        tracing::info!(tenant = %row.slug, organisation_id = %org, offset = origin.offset,
            removed = %removed.join(", "), "tenant purged: nothing of it left; its slug and hosts are free");
        Ok(())
    }

    /// Removes every trace of the tenant but its audit trail; says what it removed. Each step
    /// is idempotent (a redelivery after a crash finishes the rest).
    async fn remove_everything(&self, row: &TenantRecord) -> Result<Vec<String>, StepError> {
        let org = &row.organisation_id;
        let mut removed = Vec::new();
        // Its own server first: waited for (as the loop waits for a server) if it is down.
        self.tenants.server_of(row)?;
        for (server, db) in existing_databases(&self.ns, &self.tenants, row).await? {
            sqlx::query(&format!("DROP DATABASE IF EXISTS {}", db.quoted()))
                .execute(server.pool())
                .await
                .map_err(|e| {
                    StepError::from(e).context(format!("dropping {db} on {}", server.name()))
                })?;
            removed.push(format!("database {}/{db}", server.name()));
        }
        if let (Some(hooks), OrganisationType::Brand) = (&self.hooks, row.organisation_type) {
            let rows = hooks.brand_purged(org).await.map_err(|e| {
                StepError::retry(e.context("removing supplier copies of the brand"))
            })?;
            removed.push(format!("{rows} supplier copy rows"));
        }
        let platform = self.ns.service_database(ServiceDatabase::Platform).quoted();
        let hosts: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT host FROM {platform}.retailer_domains WHERE retailer_id = ?"
        ))
        .bind(org)
        .fetch_all(self.home())
        .await?;
        // Every platform row naming the tenant, bookkeeping included (its projections' offsets
        // name it: `access_index:{brand}:{supplier}`, `domains_index:{retailer}`).
        for (what, sql) in [
            (
                "grant index rows",
                format!("DELETE FROM {platform}.brand_access WHERE brand_id = ? OR supplier_id = ?"),
            ),
            (
                "custom hosts",
                format!("DELETE FROM {platform}.retailer_domains WHERE retailer_id = ? OR retailer_id = ?"),
            ),
            (
                "host change records",
                format!("DELETE FROM {platform}.domain_changes WHERE retailer_id = ? OR retailer_id = ?"),
            ),
            (
                "kept-copy records",
                format!("DELETE FROM {platform}.kept_copies WHERE organisation_id = ? OR organisation_id = ?"),
            ),
            (
                "rebuild records",
                format!("DELETE FROM {platform}.rebuilds WHERE organisation_id = ? OR organisation_id = ?"),
            ),
            (
                "index offsets",
                format!(
                    "DELETE FROM {platform}.projection_offsets WHERE projection LIKE CONCAT('%', ?, '%') \
                     OR projection LIKE CONCAT('%', ?, '%')"
                ),
            ),
        ] {
            let n = sqlx::query(&sql)
                .bind(org)
                .bind(org)
                .execute(self.home())
                .await?
                .rows_affected();
            if n > 0 {
                removed.push(format!("{n} {what}"));
            }
        }
        let keys = self.redis.forget_tenant(org, &hosts).await?;
        removed.push(format!("{keys} cache keys"));
        Ok(removed)
    }
}

/// The databases of `row`'s tenant that exist now, on every server this process has: its live
/// one, its archive, a rebuild's shadow and kept old tables, and what a killed move left on the
/// server it was leaving. Every name is derived from the validated slug and id; the live name is
/// the tenant's own until the purge lets it go (names are unique over every server), so no other
/// tenant's database can be among them.
pub async fn existing_databases(
    ns: &Namespace,
    tenants: &Tenants,
    row: &TenantRecord,
) -> Result<Vec<(crate::store::servers::Server, crate::tenant::DatabaseName)>, StepError> {
    let (live, archive) = databases(ns, row)?;
    let mut names = vec![live, archive];
    names.extend(ns.shadow_database(&row.organisation_id));
    names.extend(ns.old_database(&row.organisation_id));
    let refs: Vec<&crate::tenant::DatabaseName> = names.iter().collect();
    let mut found = Vec::new();
    for server in tenants.servers().all() {
        let here = crate::store::schema::databases_existing(server.pool(), &refs).await?;
        for db in &names {
            if here.contains(db.as_str()) {
                found.push((server.clone(), db.clone()));
            }
        }
    }
    Ok(found)
}

/// A due archive, and the lifecycle log's ends when it was first seen due.
struct Noted {
    epoch: String,
    ends: Arc<LogEnds>,
}

/// Finds archives past their grace period and publishes TenantPurged for them.
///
/// Two phases, so a restore that was sent in time is never beaten by the timer: a due archive is
/// first noted with the current end offsets of `{ns}.organisations`; it is purged on a later
/// tick only once the provisioner has applied everything up to those offsets (every lifecycle
/// event sent before the decision) and the archive is still the same.
pub struct PurgeTimer {
    pub tenants: Tenants,
    pub outcomes: OutcomePublisher,
    pub watermark: Watermark,
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
                tracing::warn!(error = %e, "purge timer: will retry");
            }
        }
    }

    async fn tick(&self, noted: &mut HashMap<String, Noted>) -> Result<(), StepError> {
        let due = self.tenants.purge_due(Utc::now()).await?;
        noted.retain(|org, _| due.iter().any(|r| &r.organisation_id == org));
        if due.is_empty() {
            return Ok(());
        }
        let applied = self.watermark.applied().await?;
        let mut ends_now: Option<Arc<LogEnds>> = None;
        for row in due {
            let Some(epoch) = row.terminated_by_event.clone() else {
                continue;
            };
            match noted.get(&row.organisation_id) {
                Some(n) if n.epoch == epoch => {
                    if settled(&applied, &n.ends) {
                        self.publish(&row, &epoch).await.map_err(kafka_outage)?;
                        noted.remove(&row.organisation_id);
                    }
                }
                _ => {
                    let ends = match &ends_now {
                        Some(e) => e.clone(),
                        None => ends_now.insert(self.watermark.ends().await?).clone(),
                    };
                    noted.insert(row.organisation_id.clone(), Noted { epoch, ends });
                }
            }
        }
        Ok(())
    }

    async fn publish(&self, row: &TenantRecord, epoch: &str) -> anyhow::Result<()> {
        let purge_after = row.purge_after.unwrap_or_default();
        let event = TenantPurged {
            // One id per archive, whichever worker's timer decides: duplicates dedupe.
            event_id: derived_event_id(epoch, EventKind::TenantPurged),
            occurred_at: purge_after.timestamp_millis(),
            organisation_id: row.organisation_id.clone(),
            organisation_type: row.organisation_type,
            slug: row.slug.clone(),
            database: row.database_name.clone().unwrap_or_default(),
            reason: format!("grace period ended at {}", purge_after.to_rfc3339()),
            caused_by: Some(epoch.to_owned()),
            removes: existing_databases(self.tenants.namespace(), &self.tenants, row)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .into_iter()
                .map(|(server, db)| format!("database {}/{db}", server.name()))
                .chain(
                    [
                        "its grant index rows, custom hosts and their change records",
                        "its kept-copy, rebuild and index bookkeeping",
                        "its cache keys",
                    ]
                    .map(str::to_owned),
                )
                .collect(),
        };
        self.outcomes
            .publish(EventKind::TenantPurged, &row.organisation_id, &event)
            .await?;
        tracing::info!(tenant = %row.slug, organisation_id = %row.organisation_id, "grace period over: TenantPurged published");
        Ok(())
    }
}
