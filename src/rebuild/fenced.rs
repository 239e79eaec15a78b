//! Rebuilding the tenants whose database more than one writer keeps (a supplier's: grants,
//! fan-outs, brands' lifecycles; a retailer's: its domains), so neither a single offset nor a
//! single lock describes it:
//!
//! - what the live database holds is read from all its `projection_offsets` (every writer moves
//!   a row of it in the same transaction as its rows): a comparison made while they did not
//!   move stands;
//! - for the swap, every writer is held off by the locks it takes (see `rebuild::supplier` and
//!   `rebuild::retailer`).

use std::time::Instant;

use sqlx::MySqlPool;

use super::replay::Replayed;
use super::{exchange, report, Mode, Outcome, Rebuilder};
use crate::store::locks::NamedLock;
use crate::store::servers::Server;
use crate::store::tenants::TenantRef;
use crate::tenant::{DatabaseName, OrganisationType};

/// Every row of a database's `projection_offsets`, sorted: it moves whenever a writer commits.
pub(super) type Fingerprint = Vec<(String, String, i32, i64)>;

pub(super) async fn fingerprint(
    pool: &MySqlPool,
    db: &DatabaseName,
) -> Result<Fingerprint, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT projection, topic, `partition`, `offset` FROM {}.projection_offsets \
         ORDER BY projection, topic, `partition`",
        db.quoted()
    ))
    .fetch_all(pool)
    .await
}

impl Rebuilder {
    /// The topic the tenant's own events are replayed from.
    pub(super) fn fenced_topic(&self, t: &TenantRef) -> String {
        match t.kind {
            OrganisationType::Retailer => self.domains_topic(),
            _ => self.access_topic(),
        }
    }

    /// Brings `target` (on `into`) up to what the live database held at `live` (its offsets).
    pub(super) async fn catch_up(
        &self,
        t: &TenantRef,
        into: &Server,
        target: &DatabaseName,
        live: &Fingerprint,
        reported: &report::Progress,
    ) -> anyhow::Result<Replayed> {
        match t.kind {
            OrganisationType::Retailer => self.replay_domains(t, into, target, live).await,
            _ => {
                let topic = self.access_topic();
                let bounds = access_bounds(live, &topic);
                let replayed = self.replay_access(t, into, target, &bounds).await?;
                // An archive keeps no copies (the termination removed them; the restore
                // rebuilds them from the brands).
                if !self.options.archived {
                    reported.phase("copying");
                    self.backfill_copies(into, target).await?;
                }
                Ok(replayed)
            }
        }
    }

    /// Holds every writer of `t`'s live database off; `None` when it has to be tried again.
    /// `other` (on `on`) is the database about to replace it.
    pub(super) async fn hold_tenant_writes(
        &self,
        t: &TenantRef,
        live: &DatabaseName,
        on: &Server,
        other: &DatabaseName,
    ) -> anyhow::Result<Option<(NamedLock, NamedLock)>> {
        match t.kind {
            OrganisationType::Retailer => self.hold_retailer_writes(t).await.map(Some),
            _ => self.hold_supplier_writes(t, live, on, other).await,
        }
    }

    /// Rebuilds `t` (a supplier or a retailer) beside its live database and, as `mode` says,
    /// swaps it in.
    pub(super) async fn rebuild_fenced(
        &self,
        t: &TenantRef,
        target: &Server,
        live: &DatabaseName,
        mode: Mode,
        reported: &report::Progress,
    ) -> anyhow::Result<Outcome> {
        let started = Instant::now();
        let (shadow, old) = self.beside(t)?;
        self.prepare(
            t,
            target,
            &shadow,
            &old,
            mode,
            &self.fenced_topic(t),
            reported,
        )
        .await?;
        let super::converge::Converged {
            replayed,
            comparison,
            swapped,
            pause,
        } = self
            .converge(
                super::converge::Rebuilding {
                    tenant: t,
                    target,
                    mode,
                    live,
                    shadow: &shadow,
                    old: &old,
                },
                reported,
                async || Ok(fingerprint(t.server.pool(), live).await?),
                async |seen| self.catch_up(t, target, &shadow, seen, reported).await,
                async || self.hold_tenant_writes(t, live, target, &shadow).await,
            )
            .await?;
        self.finish(t, target, mode, swapped, &shadow, &old).await?;
        Ok(Outcome {
            database: live.clone(),
            replayed,
            comparison,
            swapped_to: swapped.then(|| old.clone()),
            copies_refreshed: None,
            pause,
            elapsed: started.elapsed(),
            moved_to: (swapped && *target != t.server).then(|| target.name().to_owned()),
        })
    }

    /// The tables a rebuild replaced, live again, with what was applied since the swap
    /// replayed into them (and a supplier's copies backfilled), under the tenant's writes held.
    pub(super) async fn rollback_fenced(
        &self,
        t: &TenantRef,
        live: &DatabaseName,
    ) -> anyhow::Result<Replayed> {
        let (shadow, old) = self.beside(t)?;
        let (lifecycle, writes) = loop {
            if let Some(held) = self.hold_tenant_writes(t, live, &t.server, &old).await? {
                break held;
            }
        };
        let db = t.server.pool();
        let swapped = async {
            let now = fingerprint(db, live).await?;
            let replayed = self
                .catch_up(t, &t.server, &old, &now, &report::Progress::default())
                .await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS {}", shadow.quoted()))
                .execute(db)
                .await?;
            sqlx::query(&crate::store::schema::create_database(&shadow, false))
                .execute(db)
                .await?;
            exchange(db, live, &old, &shadow).await?;
            anyhow::Ok(replayed)
        }
        .await;
        writes.release().await;
        lifecycle.release().await;
        swapped
    }
}

/// The last access event applied per (brand, partition), from a fingerprint.
pub(super) fn access_bounds(
    fp: &Fingerprint,
    topic: &str,
) -> std::collections::HashMap<(String, i32), i64> {
    fp.iter()
        .filter(|(_, t, _, _)| t == topic)
        .filter_map(|(projection, _, p, o)| {
            let brand = projection.strip_prefix("access:")?;
            Some(((brand.to_owned(), *p), *o))
        })
        .collect()
}
