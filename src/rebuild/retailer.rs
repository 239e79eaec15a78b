//! Rebuilding a retailer's database: its domain events replayed from `{ns}.retailer-domains`
//! with the domains processor's own row writes and bookkeeping.
//!
//! Live, an assignment of a host another retailer holds is refused (dead-lettered). Whether it
//! was depends on who held the host at that moment, which the index as it is now cannot say (the
//! host may have moved since, even to this retailer: asking it made rebuilds report differences
//! that were not there). The replay skips what the dead-letter topic says the live projector
//! dead-lettered. The platform index itself is not rebuilt (it is not the retailer's).
//!
//! For the swap the rebuild holds the retailer's lifecycle lock and its writes lock, which the
//! domains processor takes for each event.

use rdkafka::message::Message;
use std::collections::{HashMap, HashSet};

use super::fenced::{fingerprint, Fingerprint};
use super::replay::{decode_event, Range, Replayed};
use super::Rebuilder;
use crate::domains::{self, write_retailer_row, PROJECTION};
use crate::log::topics::Topic;
use crate::store::locks::NamedLock;
use crate::store::servers::Server;
use crate::store::tenants::TenantRef;
use crate::store::{applied, offsets};
use crate::stream::Gate;
use crate::tenancy::clock::{change_order, EventTime};
use crate::tenancy::verdict::verdict;
use crate::tenant::{DatabaseName, OrganisationType};

impl Rebuilder {
    pub(super) fn domains_topic(&self) -> String {
        Topic::RetailerDomains.name(&self.config.namespace)
    }

    /// Brings `target` up to the domain events the live database (at `live`) applied.
    pub(super) async fn replay_domains(
        &self,
        t: &TenantRef,
        into: &Server,
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
        let held = of(&fingerprint(into.pool(), target).await?);
        let mut done = Replayed::default();
        let from = held.iter().map(|(p, o)| (*p, o + 1)).collect();
        let Some(mut range) = Range::new(&self.config, &topic, &from, upto)? else {
            return Ok(done);
        };
        let tenants = self.tenants.lookup(&[&t.organisation_id]).await?;
        let dead = self.dead_lettered(&topic).await?;
        let codec = self.codec.get().await;
        // Per host, the latest change replayed so far, as the live index orders them: one
        // placed before it (a dead letter replayed late) changed nothing live either. (A host's
        // changes by other retailers are not replayed here: one of those superseding this
        // retailer's change is not seen.)
        let mut latest: HashMap<String, (i64, String, bool)> = HashMap::new();
        while let Some(m) = range.next().await? {
            let p = m.partition();
            done.read += 1;
            if m.key() != Some(t.organisation_id.as_bytes()) {
                continue;
            }
            let change = decode_event(&codec, &topic, m.payload())
                .await?
                .and_then(domains::parse);
            // Undecodable or malformed: dead-lettered live.
            let Ok(c) = change else {
                done.skipped += 1;
                continue;
            };
            let at = EventTime::new(c.occurred_at, crate::stream::logged_at(&m)).effective();
            let ready = matches!(
                verdict(
                    &tenants,
                    &c.retailer,
                    "retailer_id",
                    OrganisationType::Retailer,
                    at
                ),
                Gate::Ready(_)
            );
            // Refused live (a host another retailer held then), or failed for good: nothing
            // was written, no offset moved.
            if c.retailer != t.organisation_id || !ready || dead.contains(&(p, m.offset())) {
                done.skipped += 1;
                continue;
            }
            let older = latest
                .get(c.host.as_str())
                .is_some_and(|(when, id, assigned)| {
                    change_order(*when, !assigned, id) > change_order(at, !c.assign, &c.event_id)
                });
            let mut tx = into.pool().begin().await?;
            if older {
                done.skipped += 1;
            } else if applied::seen(&mut tx, target, PROJECTION, &[&c.event_id])
                .await?
                .is_empty()
            {
                write_retailer_row(&mut tx, target, &c).await?;
                latest.insert(
                    c.host.as_str().to_owned(),
                    (at, c.event_id.clone(), c.assign),
                );
                done.applied += 1;
            }
            let origin = crate::stream::Origin::of(&m);
            applied::record(&mut tx, target, PROJECTION, &[(&c.event_id, &origin)]).await?;
            offsets::set(&mut tx, target, PROJECTION, &topic, p, m.offset()).await?;
            tx.commit().await?;
        }
        Ok(done)
    }

    /// The positions of `topic` whose events the live projector dead-lettered. Whether an
    /// assignment was refused depends on which retailer held the host when it was applied,
    /// which the index as it is now cannot say (the host may have moved since, even to this
    /// retailer); the dead-letter topic records the decision itself.
    pub(super) async fn dead_lettered(&self, topic: &str) -> anyhow::Result<HashSet<(i32, i64)>> {
        let (config, topic) = (self.config.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            let letters = crate::log::dead_letters::DeadLetterLog::open(&config)?.list()?;
            Ok(letters
                .into_iter()
                .filter(|d| d.source_topic.as_deref() == Some(topic.as_str()))
                .filter_map(|d| Some((d.source_partition?, d.source_offset?)))
                .collect())
        })
        .await?
    }

    /// The retailer's lifecycle lock, then its writes lock (the domains processor's), and a
    /// check that it is still rebuildable under them.
    pub(super) async fn hold_retailer_writes(
        &self,
        t: &TenantRef,
    ) -> anyhow::Result<(NamedLock, NamedLock)> {
        let ns = &self.config.namespace;
        let lifecycle = NamedLock::lifecycle(&self.home, ns, &t.organisation_id)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let writes = match NamedLock::writes(&self.home, ns, &t.organisation_id).await {
            Ok(l) => l,
            Err(e) => {
                lifecycle.release().await;
                anyhow::bail!("{e}");
            }
        };
        let now = super::resolve(&self.tenants, &t.organisation_id).await?;
        if let Err(e) = super::refuse_unless_rebuildable(&now, self.options.archived) {
            writes.release().await;
            lifecycle.release().await;
            return Err(e);
        }
        Ok((lifecycle, writes))
    }
}
