//! Onboarding: many new organisations provisioned as one unit.
//!
//! A mass onboarding (an import, the lifecycle topic replayed) delivers hundreds of
//! OrganisationCreated at once, each for an organisation of its own. One at a time, each paid
//! around its database's DDL a lock, a look at the log, a claim, an activation, an outcome's ack
//! and a log entry: a quarter of its time in `scripts/bench-provisioning`, which kept the
//! provisioner slower than the same DDL sent serially by one client. Here those steps are done
//! once for a whole batch (the locks in one statement, one look at the log, one multi-row claim,
//! one activation per kind, the outcomes sent together, one log insert) and only the DDL is done
//! per tenant, `concurrency` databases at a time.
//!
//! The steps and their order are those of [`Provisioner::provision`] (claim, create and migrate,
//! activate, publish, log; the offset after), so a crash anywhere leaves each tenant where the
//! ordinary path finishes it. Whatever is not plainly new is left to that path, which knows how
//! to refuse or finish it: an invalid name, a database named twice in the batch, a lock another
//! worker holds, an event already in the log, a row or a database that exists, and any tenant
//! whose step failed here.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};

use super::migrations;
use super::provisioning::{provisioned_outcome, timestamp, Provisioner};
use crate::log::events::{EventKind, OrganisationCreated};
use crate::store::locks::NamedLock;
use crate::store::schema::databases_existing;
use crate::store::servers::Server;
use crate::store::tenants::{Logged, NewTenant};
use crate::tenant::{DatabaseName, Slug};

/// One organisation of the batch on its way.
struct Onboarding<'a> {
    /// Its index in the caller's slice.
    index: usize,
    ev: &'a OrganisationCreated,
    slug: Slug,
    db: DatabaseName,
    /// Once its database is created and migrated: the migration version, and how long its own
    /// DDL took.
    migrated: Option<(i64, Duration)>,
}

impl Onboarding<'_> {
    /// Asked only of the tenants kept after the DDL step, all migrated.
    fn version(&self) -> i64 {
        self.migrated.expect("asked once migrated").0
    }
}

/// Where a new organisation goes: as the one-by-one claim would place it, within its region if
/// it asked for one (`Err`: no server there takes new tenants).
fn placement<'s>(
    servers: &'s crate::store::servers::Servers,
    ev: &OrganisationCreated,
) -> Result<&'s Server, String> {
    servers.place_in(&ev.organisation_id, ev.region.as_deref())
}

impl Provisioner {
    /// Provisions `evs` (OrganisationCreated of distinct organisations) as one unit. Returns,
    /// per event, whether it is done (false: left to the ordinary path, nothing of it lost).
    pub async fn onboard(&self, evs: &[&OrganisationCreated], concurrency: usize) -> Vec<bool> {
        let started = Instant::now();
        let done = self.onboard_batch(evs, concurrency).await;
        // What the fast path left is no error (a redelivery, a refusal to come), but a batch
        // that leaves most of its tenants says onboarding is not doing its job: counted.
        let provisioned = done.iter().filter(|d| **d).count();
        let left = evs.len() - provisioned;
        metrics::counter!("tenancy_onboarding_left_total").increment(left as u64);
        tracing::info!(
            tenants = evs.len(),
            provisioned,
            left,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "batch of new tenants provisioned as one unit; the rest take the one-by-one path"
        );
        done
    }

    /// [`Provisioner::onboard`] up to the count of what it left.
    async fn onboard_batch(&self, evs: &[&OrganisationCreated], concurrency: usize) -> Vec<bool> {
        let mut done = vec![false; evs.len()];
        let mut names = HashSet::new();
        let batch: Vec<Onboarding> = evs
            .iter()
            .enumerate()
            .filter_map(|(index, ev)| {
                let slug = Slug::parse(&ev.slug).ok()?;
                let db = self.ns.tenant_database(ev.organisation_type, &slug).ok()?;
                names.insert(db.as_str().to_owned()).then_some(Onboarding {
                    index,
                    ev,
                    slug,
                    db,
                    migrated: None,
                })
            })
            .collect();
        if batch.len() < 2 {
            return done;
        }
        let ids: Vec<&str> = batch
            .iter()
            .map(|o| o.ev.organisation_id.as_str())
            .collect();
        let (lock, held) = match NamedLock::lifecycles_if_free(self.home(), &self.ns, &ids).await {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!(error = %e, tenants = batch.len(),
                    "cannot lock a batch of new tenants: each takes the ordinary path");
                return done;
            }
        };
        let batch = batch
            .into_iter()
            .zip(held)
            .filter_map(|(o, held)| held.then_some(o))
            .collect();
        if let Err(e) = self.onboard_locked(batch, concurrency, &mut done).await {
            tracing::warn!(error = %format!("{e:#}"),
                "provisioning a batch of new tenants stopped: the rest take the ordinary path");
        }
        lock.release().await;
        done
    }

    /// [`Provisioner::onboard`] for the organisations whose lifecycle locks are held, in
    /// phases: claim what is plainly new, create and migrate (the one step per tenant),
    /// activate, publish, log. What a phase leaves out takes the one-by-one path.
    async fn onboard_locked(
        &self,
        mut batch: Vec<Onboarding<'_>>,
        concurrency: usize,
        done: &mut [bool],
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        self.claim_new(&mut batch).await?;
        let claimed = started.elapsed();
        self.create_databases(&mut batch, concurrency).await;
        let migrated = started.elapsed();
        self.activate_batch(&batch).await?;
        let activated = started.elapsed();
        self.publish_provisioned(&mut batch).await;
        let published = started.elapsed();
        let entries: Vec<(&str, &str, _)> = batch
            .iter()
            .map(|o| {
                (
                    o.ev.event_id.as_str(),
                    o.ev.organisation_id.as_str(),
                    timestamp(o.ev.occurred_at),
                )
            })
            .collect();
        self.tenants.log_all(&entries, Logged::Created).await?;
        let elapsed = started.elapsed();

        // Where the time went: the steps done once are the batch's, the DDL each tenant's own.
        let ms = |d: Duration| d.as_micros() as f64 / 1000.0;
        let tenants = batch.len();
        for o in &batch {
            done[o.index] = true;
            let kind = o.ev.organisation_type;
            metrics::counter!("tenancy_tenants_provisioned_total", "type" => kind.db_word())
                .increment(1);
            metrics::histogram!("tenancy_provisioning_seconds").record(elapsed.as_secs_f64());
            tracing::info!(tenant = %o.slug, organisation_id = %o.ev.organisation_id,
                organisation_type = %kind, database = %o.db, migration_version = o.version(),
                batch = tenants, elapsed_ms = elapsed.as_millis() as u64,
                claim_ms = ms(claimed), migrate_ms = ms(o.migrated.map_or(Duration::ZERO, |(_, took)| took)),
                activate_ms = ms(activated - migrated), publish_ms = ms(published - activated),
                log_ms = ms(elapsed - published), "tenant provisioned");
        }
        Ok(())
    }

    /// Keeps in `batch` only what is plainly new (no log entry, no row naming it or its
    /// database, no database of that name on the server it would be placed on) and inserts their
    /// rows in one statement.
    async fn claim_new(&self, batch: &mut Vec<Onboarding<'_>>) -> anyhow::Result<()> {
        let event_ids: Vec<&str> = batch.iter().map(|o| o.ev.event_id.as_str()).collect();
        let logged = self.tenants.logged_among(&event_ids).await?;
        let ids: Vec<&str> = batch
            .iter()
            .map(|o| o.ev.organisation_id.as_str())
            .collect();
        let dbs: Vec<&DatabaseName> = batch.iter().map(|o| &o.db).collect();
        let (with_rows, named) = self.tenants.rows_naming(&ids, &dbs).await?;
        // Each new organisation's server, as the one-by-one claim would place it; a database of
        // its name is looked for there.
        let servers = self.tenants.servers();
        // One whose region has no server taking new tenants is left to the one-by-one path,
        // which refuses it with the reason.
        let placed: Vec<Option<&Server>> = batch
            .iter()
            .map(|o| placement(servers, o.ev).ok())
            .collect();
        let mut existing = std::collections::HashSet::new();
        for server in servers.all() {
            let here: Vec<&DatabaseName> = dbs
                .iter()
                .zip(&placed)
                .filter(|(_, s)| **s == Some(server))
                .map(|(db, _)| *db)
                .collect();
            if !here.is_empty() {
                existing.extend(databases_existing(server.pool(), &here).await?);
            }
        }
        batch.retain(|o| {
            let why = if placement(servers, o.ev).is_err() {
                "no server of its region takes new tenants"
            } else if logged.contains(&o.ev.event_id) {
                "already applied"
            } else if with_rows.contains(&o.ev.organisation_id) {
                "the organisation has a row"
            } else if named.contains(o.db.as_str()) {
                "its database name is registered"
            } else if existing.contains(o.db.as_str()) {
                "its database exists"
            } else {
                return true;
            };
            tracing::debug!(tenant = %o.slug, organisation_id = %o.ev.organisation_id,
                reason = why, "left to the one-by-one path");
            false
        });
        let rows: Vec<NewTenant> = batch
            .iter()
            .map(|o| NewTenant {
                organisation_id: &o.ev.organisation_id,
                kind: o.ev.organisation_type,
                slug: o.slug.as_str(),
                name: &o.ev.name,
                database: &o.db,
                occurred_at: timestamp(o.ev.occurred_at),
                server: placement(servers, o.ev)
                    .expect("placeable, kept above")
                    .name(),
                region: o.ev.region.as_deref(),
            })
            .collect();
        let inserted = self.tenants.insert_new(&rows).await?;
        batch.retain(|o| inserted.contains(&o.ev.organisation_id));
        Ok(())
    }

    /// Creates and migrates each claimed tenant's database, `concurrency` at a time; keeps in
    /// `batch` those that succeeded (with their version and time).
    async fn create_databases(&self, batch: &mut Vec<Onboarding<'_>>, concurrency: usize) {
        let servers = self.tenants.servers();
        let migrated: Vec<(usize, anyhow::Result<(i64, Duration)>)> =
            stream::iter(batch.iter().enumerate())
                .map(|(i, o)| async move {
                    let began = Instant::now();
                    let version = async {
                        let server = placement(servers, o.ev).map_err(|e| anyhow::anyhow!(e))?;
                        async {
                            migrations::create_and_migrate_tenant(
                                self.ddl.get(server.name())?.pool(),
                                server.url(),
                                &o.db,
                                migrations::for_tenant(o.ev.organisation_type),
                            )
                            .await
                        }
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "creating and migrating {} on {}: {e}",
                                o.db,
                                server.name()
                            )
                        })
                    }
                    .await;
                    (i, version.map(|v| (v, began.elapsed())))
                })
                .buffer_unordered(concurrency.max(1))
                .collect()
                .await;
        for (i, result) in migrated {
            match result {
                Ok(migrated) => batch[i].migrated = Some(migrated),
                Err(e) => tracing::warn!(tenant = %batch[i].slug,
                    organisation_id = %batch[i].ev.organisation_id, error = %format!("{e:#}"),
                    "provisioning left to the ordinary path"),
            }
        }
        batch.retain(|o| o.migrated.is_some());
    }

    /// Marks the batch active, one statement per migration version (per kind).
    async fn activate_batch(&self, batch: &[Onboarding<'_>]) -> anyhow::Result<()> {
        let mut by_version: HashMap<i64, Vec<&str>> = HashMap::new();
        for o in batch {
            by_version
                .entry(o.version())
                .or_default()
                .push(&o.ev.organisation_id);
        }
        for (version, ids) in &by_version {
            self.tenants.activate_all(ids, *version).await?;
        }
        // A request that found no such tenant may have cached that for a few seconds.
        self.redis.domains_changed(&[]).await?;
        Ok(())
    }

    /// Publishes every outcome at once (the producer batches them, one wait for all their
    /// acknowledgements); keeps in `batch` those acknowledged.
    async fn publish_provisioned(&self, batch: &mut Vec<Onboarding<'_>>) {
        let sent = futures::future::join_all(batch.iter().map(|o| {
            let outcome = provisioned_outcome(o.ev, &o.slug, &o.db, o.version());
            async move {
                self.outcomes
                    .publish(
                        EventKind::TenantProvisioned,
                        &o.ev.organisation_id,
                        &outcome,
                    )
                    .await
            }
        }))
        .await;
        let mut sent = sent.into_iter();
        batch.retain(|o| match sent.next() {
            Some(Ok(_)) => true,
            Some(Err(e)) => {
                tracing::warn!(tenant = %o.slug, organisation_id = %o.ev.organisation_id,
                    error = %format!("{e:#}"), "provisioning left to the ordinary path");
                false
            }
            None => false,
        });
    }
}
