//! Rebuilding a retailer's database: its domain events replayed from `{ns}.retailer-domains`
//! with the domains processor's own row writes and bookkeeping.
//!
//! Live, an assignment of a host another retailer holds is refused (dead-lettered). The replay
//! asks the platform index as it is now, so a host refused live that has since been freed would
//! be assigned in the rebuild: the comparison then reports it, and nothing is swapped in without
//! `--accept-differences`. The platform index itself is not rebuilt (it is not the retailer's).
//!
//! For the swap the rebuild holds the retailer's lifecycle lock and its writes lock, which the
//! domains processor takes for each event.

use rdkafka::message::Message;
use std::collections::HashMap;

use super::fenced::{fingerprint, Fingerprint};
use super::replay::{decode_event, Range, Replayed};
use super::Rebuilder;
use crate::db::NamedLock;
use crate::domains::{self, write_retailer_row, PROJECTION};
use crate::stream::Gate;
use crate::tenancy::tenants::TenantRef;
use crate::tenancy::verdict::verdict;
use crate::tenant::{DatabaseName, OrganisationType};
use crate::topics::Topic;
use crate::{applied, offsets};

impl Rebuilder {
    pub(super) fn domains_topic(&self) -> String {
        Topic::RetailerDomains.name(&self.config.namespace)
    }

    /// Brings `target` up to the domain events the live database (at `live`) applied.
    pub(super) async fn replay_domains(
        &self,
        t: &TenantRef,
        target: &DatabaseName,
        live: &Fingerprint,
    ) -> anyhow::Result<Replayed> {
        let topic = self.domains_topic();
        let of = |fp: &Fingerprint| -> HashMap<i32, i64> {
            fp.iter()
                .filter(|(projection, t, _, _)| projection == PROJECTION && *t == topic)
                .map(|(_, _, p, o)| (*p, *o))
                .collect()
        };
        let upto = of(live);
        let held = of(&fingerprint(&self.pool, target).await?);
        let mut done = Replayed::default();
        let from = held.iter().map(|(p, o)| (*p, o + 1)).collect();
        let Some(mut range) = Range::new(&self.config, &topic, &from, upto)? else {
            return Ok(done);
        };
        let tenants = self.tenants.lookup(&[&t.organisation_id]).await?;
        while let Some(m) = range.next().await? {
            let p = m.partition();
            done.read += 1;
            if m.key() != Some(t.organisation_id.as_bytes()) {
                continue;
            }
            let change = decode_event(&self.codec, &topic, m.payload())
                .await?
                .and_then(domains::parse);
            // Undecodable or malformed: dead-lettered live.
            let Ok(c) = change else {
                done.skipped += 1;
                continue;
            };
            let ready = matches!(
                verdict(
                    &tenants,
                    &c.retailer,
                    "retailer_id",
                    OrganisationType::Retailer,
                    c.occurred_at
                ),
                Gate::Ready(_)
            );
            if c.retailer != t.organisation_id || !ready {
                done.skipped += 1;
                continue;
            }
            let mut tx = self.pool.begin().await?;
            if applied::seen(&mut tx, target, PROJECTION, &[&c.event_id])
                .await?
                .is_empty()
            {
                if c.assign {
                    let taken = domains::owner(&mut tx, &self.config.namespace, &c.host, false)
                        .await?
                        .is_some_and(|o| o != c.retailer);
                    if taken {
                        // Refused live: nothing written, no offset moved.
                        done.skipped += 1;
                        continue;
                    }
                }
                write_retailer_row(&mut tx, target, &c).await?;
                done.applied += 1;
            }
            let origin = crate::stream::Origin::of(&m);
            applied::record(&mut tx, target, PROJECTION, &[(&c.event_id, &origin)]).await?;
            offsets::set(&mut tx, target, PROJECTION, &topic, p, m.offset()).await?;
            tx.commit().await?;
        }
        Ok(done)
    }

    /// The retailer's lifecycle lock, then its writes lock (the domains processor's), and a
    /// check that it is still rebuildable under them.
    pub(super) async fn hold_retailer_writes(
        &self,
        t: &TenantRef,
    ) -> anyhow::Result<(NamedLock, NamedLock)> {
        let ns = &self.config.namespace;
        let lifecycle = NamedLock::lifecycle(&self.pool, ns, &t.organisation_id)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let writes = match NamedLock::writes(&self.pool, ns, &t.organisation_id).await {
            Ok(l) => l,
            Err(e) => {
                lifecycle.release().await;
                anyhow::bail!("{e}");
            }
        };
        let now = super::resolve(&self.tenants, &t.organisation_id).await?;
        if let Err(e) = super::refuse_unless_rebuildable(&now, self.archived) {
            writes.release().await;
            lifecycle.release().await;
            return Err(e);
        }
        Ok((lifecycle, writes))
    }
}
