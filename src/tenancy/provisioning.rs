//! The provisioner: OrganisationCreated → `{ns}_{type}_{slug}` created and migrated, registered
//! in `{ns}_platform.tenants`, and TenantProvisioned published.
//!
//! Each step is idempotent and the order makes any crash recoverable by redelivery: claim the
//! registry row first (so the database is ours before it exists), then create and migrate, then
//! mark active, then publish with a derived id, and only then does the processor store the
//! offset. Refusals (bad slug, name taken) end in TenantProvisioningFailed, never a retry loop.

use chrono::{DateTime, TimeZone, Utc};
use sqlx::MySqlPool;

use super::migrations;
use super::outcomes::{derived_event_id, OutcomePublisher};
use super::tenants::{Claim, Tenants};
use super::{db_error, transient};
use crate::events::{
    Event, EventKind, OrganisationCreated, TenantProvisioned, TenantProvisioningFailed,
};
use crate::processor::{HandleError, Handler, Origin};
use crate::tenant::{Namespace, ServiceDatabase, Slug};

pub struct Provisioner {
    pub ns: Namespace,
    pub pool: MySqlPool,
    pub database_url: String,
    pub tenants: Tenants,
    pub outcomes: OutcomePublisher,
    /// Caches to clear when a tenant is archived.
    pub cache: crate::access::cache::PermissionCache,
    /// How long an archived tenant can be restored.
    pub grace: chrono::Duration,
    /// Crash tests only: abort after this lifecycle step.
    pub fail_after: Option<String>,
}

fn timestamp(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or_else(Utc::now)
}

/// Creates and migrates the namespace's service databases (run at start-up).
pub async fn prepare_service_databases(
    pool: &MySqlPool,
    database_url: &str,
    ns: &Namespace,
) -> anyhow::Result<()> {
    for service in ServiceDatabase::ALL {
        let db = ns.service_database(service);
        let version = migrations::create_and_migrate(
            pool,
            database_url,
            &db,
            migrations::for_service(service),
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot migrate service database {db}: {e}"))?;
        tracing::debug!(database = %db, version, "service database ready");
    }
    Ok(())
}

impl Provisioner {
    async fn provision(
        &self,
        ev: &OrganisationCreated,
        origin: &Origin,
    ) -> Result<(), HandleError> {
        let kind = ev.organisation_type;
        let started = std::time::Instant::now();
        let slug = match Slug::parse(&ev.slug) {
            Ok(s) => s,
            Err(e) => return self.refuse(ev, None, e.to_string()).await,
        };
        let db = match self.ns.tenant_database(kind, &slug) {
            Ok(db) => db,
            Err(e) => return self.refuse(ev, None, e.to_string()).await,
        };
        let claim = self
            .tenants
            .claim(
                &ev.organisation_id,
                kind,
                slug.as_str(),
                &ev.name,
                &db,
                timestamp(ev.occurred_at),
            )
            .await
            .map_err(|e| db_error("claiming the tenant registry row", e))?;
        match claim {
            Claim::Proceed => {}
            Claim::Conflict(reason) => return self.refuse(ev, Some(db.to_string()), reason).await,
            Claim::Terminated(status) => {
                tracing::info!(tenant = %slug, organisation_id = %ev.organisation_id, status = status.as_str(),
                    offset = origin.offset, "OrganisationCreated for a terminated tenant: skipped");
                metrics::counter!("tenancy_events_skipped_terminated_total", "processor" => "provisioner").increment(1);
                return Ok(());
            }
        }
        let version = migrations::create_and_migrate(
            &self.pool,
            &self.database_url,
            &db,
            migrations::for_tenant(kind),
        )
        .await
        .map_err(|e| db_error(&format!("creating and migrating {db}"), e))?;
        self.tenants
            .activate(&ev.organisation_id, version)
            .await
            .map_err(|e| db_error("marking the tenant active", e))?;
        let outcome = TenantProvisioned {
            event_id: derived_event_id(&ev.event_id, EventKind::TenantProvisioned),
            occurred_at: Utc::now().timestamp_millis(),
            organisation_id: ev.organisation_id.clone(),
            organisation_type: kind,
            slug: slug.to_string(),
            database: db.to_string(),
            migration_version: version,
            caused_by: Some(ev.event_id.clone()),
        };
        self.outcomes
            .publish(EventKind::TenantProvisioned, &ev.organisation_id, &outcome)
            .await
            .map_err(transient)?;
        let elapsed = started.elapsed();
        metrics::counter!("tenancy_tenants_provisioned_total", "type" => kind.db_word())
            .increment(1);
        metrics::histogram!("tenancy_provisioning_seconds").record(elapsed.as_secs_f64());
        tracing::info!(tenant = %slug, organisation_id = %ev.organisation_id, organisation_type = %kind,
            database = %db, migration_version = version, elapsed_ms = elapsed.as_millis() as u64,
            "tenant provisioned");
        Ok(())
    }

    /// Records and announces a refusal. Nothing was created for it.
    async fn refuse(
        &self,
        ev: &OrganisationCreated,
        database: Option<String>,
        reason: String,
    ) -> Result<(), HandleError> {
        tracing::warn!(tenant = %ev.slug, organisation_id = %ev.organisation_id, %reason, "provisioning refused");
        metrics::counter!("tenancy_provisioning_failed_total").increment(1);
        self.tenants
            .record_failure(
                &ev.organisation_id,
                ev.organisation_type,
                &ev.slug,
                &ev.name,
                &reason,
                timestamp(ev.occurred_at),
            )
            .await
            .map_err(|e| db_error("recording the failure", e))?;
        let outcome = TenantProvisioningFailed {
            event_id: derived_event_id(&ev.event_id, EventKind::TenantProvisioningFailed),
            occurred_at: Utc::now().timestamp_millis(),
            organisation_id: ev.organisation_id.clone(),
            organisation_type: ev.organisation_type,
            slug: ev.slug.clone(),
            database,
            reason,
            caused_by: Some(ev.event_id.clone()),
        };
        self.outcomes
            .publish(
                EventKind::TenantProvisioningFailed,
                &ev.organisation_id,
                &outcome,
            )
            .await
            .map_err(transient)?;
        Ok(())
    }
}

impl Handler for Provisioner {
    async fn handle(&self, event: Event, origin: &Origin) -> Result<(), HandleError> {
        match event {
            Event::OrganisationCreated(ev) => self.provision(&ev, origin).await,
            // On the same topic and key as the creation, so one organisation's lifecycle is
            // applied in order (see tenancy::lifecycle).
            Event::OrganisationTerminated(ev) => self.terminate(&ev, origin).await,
            Event::OrganisationRestored(ev) => self.restore(&ev, origin).await,
            other => Err(HandleError::Permanent(format!(
                "{} does not belong on {}",
                other.kind().name(),
                origin.topic
            ))),
        }
    }
}
