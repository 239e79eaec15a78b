//! The provisioner: OrganisationCreated → `{ns}_{type}_{slug}` created and migrated, recorded in
//! `{ns}_platform.tenants`, and TenantProvisioned published.
//!
//! Each step is idempotent and the order makes any crash recoverable by redelivery: claim the
//! tenant's row first (so the database is ours before it exists), then create and migrate, then
//! mark active, then publish with a derived id, and only then does the loop store the offset.
//! Refusals (bad slug, name taken) end in TenantProvisioningFailed, never a retry loop. Every
//! lifecycle step of one organisation holds its lifecycle lock, so two workers briefly sharing a
//! partition apply each step once.

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use futures::future::LocalBoxFuture;
use sqlx::MySqlPool;

use super::migrations;
use super::outcomes::{derived_event_id, OutcomePublisher};
use super::watermark::Watermark;
use crate::cache::Redis;
use crate::log::events::{
    EventKind, OrganisationCreated, TenantProvisioned, TenantProvisioningFailed,
};
use crate::store::locks::NamedLock;
use crate::store::servers::{Server, Servers};
use crate::store::tenants::{Claim, Logged, Status, Tenants};
use crate::stream::{error::kafka_outage, Origin, StepError};
use crate::tenant::{DatabaseName, Namespace, OrganisationType, ServiceDatabase, Slug};

/// What other projections do when a tenant's lifecycle moves; wired by `tenancy run`, so the
/// lifecycle does not depend on the catalog.
pub trait LifecycleHooks {
    /// A tenant is marked archived and its tables are still in `database`: remove what others'
    /// projections derive from it or it derives from others (copies), before the tables move.
    fn before_archive<'a>(
        &'a self,
        organisation_id: &'a str,
        kind: OrganisationType,
        server: &'a Server,
        database: &'a DatabaseName,
    ) -> LocalBoxFuture<'a, anyhow::Result<()>>;

    /// A tenant's tables are back in `database`, before it is marked active: bring what it
    /// copies from others up to date, so `active` means caught up.
    fn before_reactivation<'a>(
        &'a self,
        organisation_id: &'a str,
        kind: OrganisationType,
        server: &'a Server,
        database: &'a DatabaseName,
    ) -> LocalBoxFuture<'a, anyhow::Result<()>>;

    /// The tenant is active again (its step still marked under way): finish what depends on
    /// its being active, and publish again what its termination took out of caches.
    fn after_reactivation<'a>(
        &'a self,
        organisation_id: &'a str,
        kind: OrganisationType,
        server: &'a Server,
        database: &'a DatabaseName,
    ) -> LocalBoxFuture<'a, anyhow::Result<()>>;

    /// A brand was purged: its catalog leaves every supplier's copy. Returns the rows removed.
    fn brand_purged<'a>(&'a self, brand_id: &'a str) -> LocalBoxFuture<'a, anyhow::Result<usize>>;
}

pub struct Provisioner {
    pub ns: Namespace,
    /// Where new tenant databases are created and migrated, per server
    /// ([`crate::store::servers::Servers::ddl`]).
    pub ddl: Servers,
    /// Also the router: `tenants.servers()`.
    pub tenants: Tenants,
    pub outcomes: OutcomePublisher,
    /// Caches to clear when a tenant is archived.
    pub redis: Redis,
    /// How long an archived tenant can be restored.
    pub grace: chrono::Duration,
    /// Where the provisioner records how far it has applied the lifecycle log.
    pub watermark: Watermark,
    pub hooks: Option<Arc<dyn LifecycleHooks>>,
    /// Crash tests only: abort after this lifecycle step.
    pub fail_after: crate::fault::FailAfter,
}

pub(super) fn timestamp(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or_else(Utc::now)
}

/// The TenantProvisioned caused by `ev`, with the id derived from it (the same on every retry).
pub(super) fn provisioned_outcome(
    ev: &OrganisationCreated,
    slug: &Slug,
    db: &DatabaseName,
    version: i64,
) -> TenantProvisioned {
    TenantProvisioned {
        event_id: derived_event_id(&ev.event_id, EventKind::TenantProvisioned),
        occurred_at: Utc::now().timestamp_millis(),
        organisation_id: ev.organisation_id.clone(),
        organisation_type: ev.organisation_type,
        slug: slug.to_string(),
        database: db.to_string(),
        migration_version: version,
        caused_by: Some(ev.event_id.clone()),
    }
}

/// Creates and migrates the namespace's service databases (run at start-up).
pub async fn prepare_service_databases(
    pool: &MySqlPool,
    database_url: &str,
    ns: &Namespace,
) -> anyhow::Result<()> {
    // All at once: each is a few round trips on a connection of its own, checked at the start
    // of every command; one after another they took 10–20 ms of every `tenancy` run.
    futures::future::try_join_all(ServiceDatabase::ALL.into_iter().map(|service| async move {
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
        anyhow::Ok(())
    }))
    .await?;
    Ok(())
}

/// Refuses to start a worker not given a server its active tenants are on: it would hold their
/// events for ever. It says which server to add instead. (Archives on such a server wait for a
/// worker that has it.) Bringing tenant databases up to the latest migration is the rollout's
/// job ([`super::rollout`]), in the background, so a worker starts consuming whatever the
/// fleet's size.
pub async fn check_servers(tenants: &Tenants) -> anyhow::Result<()> {
    for t in tenants.list(Some(Status::Active)).await? {
        if tenants.server_of(&t).is_err() {
            anyhow::bail!(
                "tenant {} ({} {}) is on MySQL server {:?}, which this worker was not given: \
                 add it to TENANCY_SERVERS ({}=mysql://…) and start again",
                t.organisation_id,
                t.organisation_type.db_word(),
                t.slug,
                t.server,
                t.server
            );
        }
    }
    Ok(())
}

impl Provisioner {
    /// The home server's pool: locks and `{ns}_platform`.
    pub(super) fn home(&self) -> &MySqlPool {
        self.tenants.servers().home().pool()
    }

    pub(super) async fn lock(&self, organisation_id: &str) -> Result<NamedLock, StepError> {
        NamedLock::lifecycle(self.home(), &self.ns, organisation_id).await
    }

    pub(super) async fn provision(
        &self,
        ev: &OrganisationCreated,
        origin: &Origin,
    ) -> Result<(), StepError> {
        let lock = self.lock(&ev.organisation_id).await?;
        let result = self.provision_locked(ev, origin).await;
        lock.release().await;
        result
    }

    async fn provision_locked(
        &self,
        ev: &OrganisationCreated,
        origin: &Origin,
    ) -> Result<(), StepError> {
        let kind = ev.organisation_type;
        let started = std::time::Instant::now();
        // Applied before (at another offset: a producer retry, a re-run of emit): nothing to do,
        // and no outcome to publish again.
        if self.tenants.logged(&ev.event_id).await? {
            metrics::counter!("tenancy_events_duplicate_total", "processor" => "provisioner")
                .increment(1);
            tracing::info!(tenant = %ev.slug, organisation_id = %ev.organisation_id, event_id = %ev.event_id,
                offset = origin.offset, "OrganisationCreated already applied: ignored");
            return Ok(());
        }
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
                ev.region.as_deref(),
            )
            .await
            .map_err(|e| StepError::from(e).context("claiming the tenant's row"))?;
        let server = match claim {
            Claim::Proceed(server) => server,
            Claim::Conflict(reason) => return self.refuse(ev, Some(db.to_string()), reason).await,
            Claim::Terminated(status) => {
                tracing::info!(tenant = %slug, organisation_id = %ev.organisation_id, %status,
                    offset = origin.offset, "OrganisationCreated for a terminated tenant: skipped");
                metrics::counter!("tenancy_events_skipped_terminated_total", "processor" => "provisioner").increment(1);
                return Ok(());
            }
        };
        let claimed = started.elapsed();
        let version = migrations::create_and_migrate_tenant(
            self.ddl.get(server.name())?.pool(),
            server.url(),
            &db,
            migrations::for_tenant(kind),
        )
        .await
        .map_err(|e| StepError::from(e).context(format!("creating and migrating {db}")))?;
        let migrated = started.elapsed();
        self.tenants
            .activate(&ev.organisation_id, version)
            .await
            .map_err(|e| StepError::from(e).context("marking the tenant active"))?;
        // A request that found no such tenant may have cached that for a few seconds.
        self.redis.domains_changed(&[]).await?;
        let activated = started.elapsed();
        let outcome = provisioned_outcome(ev, &slug, &db, version);
        self.outcomes
            .publish(EventKind::TenantProvisioned, &ev.organisation_id, &outcome)
            .await
            .map_err(kafka_outage)?;
        let published = started.elapsed();
        self.tenants
            .log(
                &ev.event_id,
                &ev.organisation_id,
                Logged::Created,
                timestamp(ev.occurred_at),
                &Default::default(),
            )
            .await?;
        let elapsed = started.elapsed();
        // Where the time went, step by step (the provisioning benchmark reads these).
        let ms = |d: std::time::Duration| d.as_micros() as f64 / 1000.0;
        metrics::counter!("tenancy_tenants_provisioned_total", "type" => kind.db_word())
            .increment(1);
        metrics::histogram!("tenancy_provisioning_seconds").record(elapsed.as_secs_f64());
        tracing::info!(tenant = %slug, organisation_id = %ev.organisation_id, organisation_type = %kind,
            database = %db, server = server.name(), migration_version = version, elapsed_ms = elapsed.as_millis() as u64,
            claim_ms = ms(claimed), migrate_ms = ms(migrated - claimed),
            activate_ms = ms(activated - migrated), publish_ms = ms(published - activated),
            log_ms = ms(elapsed - published), "tenant provisioned");
        Ok(())
    }

    /// Records and announces a refusal. Nothing was created for it.
    async fn refuse(
        &self,
        ev: &OrganisationCreated,
        database: Option<String>,
        reason: String,
    ) -> Result<(), StepError> {
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
            .map_err(|e| StepError::from(e).context("recording the failure"))?;
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
            .map_err(kafka_outage)?;
        self.tenants
            .log(
                &ev.event_id,
                &ev.organisation_id,
                Logged::Created,
                timestamp(ev.occurred_at),
                &Default::default(),
            )
            .await?;
        Ok(())
    }

    /// A refused lifecycle request: logged, and announced as TenantProvisioningFailed.
    pub(super) async fn refuse_lifecycle(
        &self,
        kind: OrganisationType,
        org: &str,
        slug: &str,
        event_id: &str,
        reason: String,
    ) -> Result<(), StepError> {
        tracing::warn!(tenant = %slug, organisation_id = %org, %reason, "lifecycle request refused");
        let audit = crate::store::tenants::Audit {
            reason: Some(&reason),
            ..Default::default()
        };
        self.tenants
            .log(
                event_id,
                org,
                crate::store::tenants::Logged::Refused,
                Utc::now(),
                &audit,
            )
            .await
            .map_err(|e| StepError::from(e).context("logging the refusal"))?;
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
            .map_err(kafka_outage)?;
        Ok(())
    }
}
