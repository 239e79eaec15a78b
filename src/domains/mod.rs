//! Retailer domains: RetailerDomainAssigned/Removed on `{ns}.retailer-domains` into the
//! retailer's `domains` table and the platform-wide index `{ns}_platform.retailer_domains`
//! (host → retailer), effectively once like the catalog (group `{ns}.domains`).
//!
//! A host belongs to one retailer: assigning a host another retailer holds is refused with the
//! reason (dead-lettered, never retried), and a removal only removes the retailer's own
//! assignment. When the retailer's database is on the home server, both are written in one
//! transaction with the retailer's offsets and event ids, so a redelivery changes nothing.
//! When it is on another server, no transaction spans both: the index is written first, in a
//! home transaction with an offset of its own (`domains_index:{retailer}`), then the retailer's
//! row with its offsets and event ids; a redelivery after a crash between the two finds the
//! index step done and finishes the other. Resolution reads the index only, so a removal is in
//! effect once its first step commits.
//!
//! Per host the latest change by occurrence wins, whatever offset it arrives at: the index
//! keeps each host's latest change applied in `domain_changes` (a removal stays as its
//! tombstone), and one placed before it (by [`crate::tenancy::clock`]; ties broken by event id)
//! changes neither the index nor the retailer's row. A purge removes its retailer's rows, so its
//! hosts are free again.

pub mod host;

use std::collections::HashMap;

use sqlx::MySqlPool;

use crate::cache::Redis;
use crate::fault::{crash_after, FailAfter, FailPoint};
use crate::log::events::{Event, EventKind};
use crate::store::applied;
use crate::store::locks::NamedLock;
use crate::store::offsets;
use crate::store::servers::Server;
use crate::store::tenants::{TenantRef, Tenants};
use crate::stream::{Failed, Gate, Msg, Origin, Processor, StepError, Wait};
use crate::tenancy::clock::{change_order, EventTime};
use crate::tenancy::verdict::verdict;
use crate::tenancy::watermark::{settled, Watermark};
use crate::tenant::{DatabaseName, Namespace, OrganisationType, ServiceDatabase};

use host::Host;

/// The projection's name in `projection_offsets` and `applied_events`.
pub const PROJECTION: &str = "domains";

/// One domain change, parsed.
#[derive(Debug, Clone)]
pub struct DomainChange {
    pub event_id: String,
    pub retailer: String,
    pub host: Host,
    pub assign: bool,
    pub occurred_at: i64,
}

/// What a domain event asks, or why it is refused.
pub fn parse(event: Event) -> Result<DomainChange, String> {
    let Event::Other { kind, value } = event else {
        return Err(format!(
            "{} does not belong on the retailer domains topic",
            event.kind().name()
        ));
    };
    let assign = match kind {
        EventKind::RetailerDomainAssigned => true,
        EventKind::RetailerDomainRemoved => false,
        other => {
            return Err(format!(
                "{} does not belong on the retailer domains topic",
                other.name()
            ))
        }
    };
    let apache_avro::types::Value::Record(fields) = &value else {
        return Err(format!("{} is not a record", kind.name()));
    };
    let get = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let text = |name: &str| match get(name) {
        Some(apache_avro::types::Value::String(s)) => Ok(s.clone()),
        Some(apache_avro::types::Value::Uuid(u)) => Ok(u.to_string()),
        _ => Err(format!("{} has no text field {name}", kind.name())),
    };
    let id = |name: &str| {
        let raw = text(name)?;
        uuid::Uuid::parse_str(&raw)
            .map(|u| u.hyphenated().to_string())
            .map_err(|e| format!("{} field {name}: {raw:?} is not a uuid: {e}", kind.name()))
    };
    let occurred_at = match get("occurred_at") {
        Some(
            apache_avro::types::Value::TimestampMillis(t) | apache_avro::types::Value::Long(t),
        ) => *t,
        _ => 0,
    };
    Ok(DomainChange {
        event_id: id("event_id")?,
        retailer: id("retailer_id")?,
        host: Host::parse(&text("domain")?).map_err(|e| format!("{}: {e}", kind.name()))?,
        assign,
        occurred_at,
    })
}

pub struct DomainProcessor {
    pub ns: Namespace,
    /// Also the router: `tenants.servers()`.
    pub tenants: Tenants,
    pub watermark: Watermark,
    /// The domain cache, invalidated after each change (`caches::Redis::domains_changed`).
    pub redis: Redis,
    /// Crash tests only: abort after this step ([`FailPoint::DomainIndex`]).
    pub fail_after: FailAfter,
}

impl DomainProcessor {
    /// The home server's pool: locks and `{ns}_platform`.
    fn home(&self) -> &MySqlPool {
        self.tenants.servers().home().pool()
    }

    /// One event, under the retailer's writes lock (which `tenancy rebuild` holds for its
    /// swap): in one transaction when the retailer is on the home server, else in two steps.
    async fn apply_one(&self, m: &Msg<DomainChange>, to: &Placed) -> Result<(), StepError> {
        let lock = NamedLock::writes(self.home(), &self.ns, &m.item.retailer).await?;
        // The retailer may have moved to another server while we waited (`tenancy rebuild
        // --to-server` holds this lock for its swap): gate the event again, never write the
        // copy it left.
        let now = self.tenants.lookup(&[&m.item.retailer]).await;
        if let Ok(Some(t)) = now.as_ref().map(|found| found.get(&m.item.retailer)) {
            if t.server != to.server {
                lock.release().await;
                return Err(StepError::retry(anyhow::anyhow!(
                    "retailer {} moved to server {} since the event was gated",
                    m.item.retailer,
                    t.server.name()
                )));
            }
        }
        let result = if to.server == *self.tenants.servers().home() {
            self.apply_locked(m, to).await
        } else {
            self.apply_across(m, to).await
        };
        lock.release().await;
        result
    }

    async fn apply_locked(&self, m: &Msg<DomainChange>, to: &Placed) -> Result<(), StepError> {
        let c = &m.item;
        let at = EventTime::new(c.occurred_at, m.logged_at_ms()).effective();
        let o = &m.origin;
        let db = &to.db;
        let mut tx = self.home().begin().await?;
        let done = offsets::get(&mut tx, db, PROJECTION, &o.topic, o.partition).await?;
        if done.is_some_and(|d| o.offset <= d) {
            return Ok(());
        }
        if !applied::seen(&mut tx, db, PROJECTION, &[&c.event_id])
            .await?
            .is_empty()
        {
            applied::duplicate("domains", &c.event_id, o, None);
        } else if index_change(&mut tx, &self.ns, c, at).await? {
            write_retailer_row(&mut tx, db, c).await?;
        }
        applied::record(&mut tx, db, PROJECTION, &[(&c.event_id, o)]).await?;
        offsets::set(&mut tx, db, PROJECTION, &o.topic, o.partition, o.offset).await?;
        tx.commit().await?;
        tracing::info!(processor = "domains", tenant = %c.retailer, host = %c.host,
            assigned = c.assign, "retailer domain applied");
        Ok(())
    }

    /// [`DomainProcessor::apply_locked`] for a retailer on another server than the index: the
    /// index step, then the retailer's, each effectively once by its own offset.
    async fn apply_across(&self, m: &Msg<DomainChange>, to: &Placed) -> Result<(), StepError> {
        let c = &m.item;
        let at = EventTime::new(c.occurred_at, m.logged_at_ms()).effective();
        let o = &m.origin;
        let db = &to.db;
        // Where the retailer stands, read first: an event its database already holds (applied
        // here, or a duplicate applied at another offset) changes nothing in the index either.
        let mut read = to.server.pool().begin().await?;
        let done = offsets::get(&mut read, db, PROJECTION, &o.topic, o.partition).await?;
        let seen = !applied::seen(&mut read, db, PROJECTION, &[&c.event_id])
            .await?
            .is_empty();
        read.commit().await?;
        if done.is_some_and(|d| o.offset <= d) {
            return Ok(());
        }
        let platform = self.ns.service_database(ServiceDatabase::Platform);
        let marker = index_projection(&c.retailer);
        let mut tx = self.home().begin().await?;
        let indexed = offsets::get(&mut tx, &platform, &marker, &o.topic, o.partition).await?;
        if indexed.is_none_or(|d| o.offset > d) {
            if !seen {
                index_change(&mut tx, &self.ns, c, at).await?;
            }
            offsets::set(&mut tx, &platform, &marker, &o.topic, o.partition, o.offset).await?;
        }
        // Whether the index took this change is read back, not remembered: a redelivery after a
        // crash between the two steps decides the second the same way.
        let latest = latest_change(&mut tx, &self.ns, &c.host).await?;
        tx.commit().await?;
        let took = latest.is_some_and(|(_, id, _)| id == c.event_id);
        crash_after(self.fail_after, FailPoint::DomainIndex);
        let mut tx = to.server.pool().begin().await?;
        // Under the retailer's writes lock, as the read above: nothing moved since.
        if seen {
            applied::duplicate("domains", &c.event_id, o, None);
        } else if took {
            write_retailer_row(&mut tx, db, c).await?;
        }
        applied::record(&mut tx, db, PROJECTION, &[(&c.event_id, o)]).await?;
        offsets::set(&mut tx, db, PROJECTION, &o.topic, o.partition, o.offset).await?;
        tx.commit().await?;
        tracing::info!(processor = "domains", tenant = %c.retailer, host = %c.host,
            server = to.server.name(), assigned = c.assign, "retailer domain applied");
        Ok(())
    }
}

/// The platform index's own offsets for one retailer's domain events, used when the retailer
/// is on another server (see the module documentation).
pub fn index_projection(retailer: &str) -> String {
    format!("domains_index:{retailer}")
}

/// The host's latest change applied: (when, event id, whether it assigned the host).
async fn latest_change(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    ns: &Namespace,
    host: &Host,
) -> Result<Option<(i64, String, bool)>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT changed_at, event_id, assigned FROM {} WHERE host = ? AND changed_at >= 0",
        changes_table(ns)
    ))
    .bind(host.as_str())
    .fetch_optional(&mut **tx)
    .await
}

/// The index's part of a change placed at `at`: claim the host (refused if another retailer
/// holds it) or drop the retailer's own assignment of it, and record it as the host's latest
/// change. False (nothing changed) when a later change of the host is applied already.
async fn index_change(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    ns: &Namespace,
    c: &DomainChange,
    at: i64,
) -> Result<bool, StepError> {
    // The host's row of changes, locked (made first if new: a locking read of a missing row
    // would take a gap lock, and neighbouring new hosts would deadlock on each other's gaps).
    sqlx::query(&format!(
        "INSERT INTO {} (host, changed_at, event_id, retailer_id, assigned) \
         VALUES (?, -1, '', '', FALSE) ON DUPLICATE KEY UPDATE host = host",
        changes_table(ns)
    ))
    .bind(c.host.as_str())
    .execute(&mut **tx)
    .await?;
    if let Some((changed_at, event_id, assigned)) = latest_change(tx, ns, &c.host).await? {
        if change_order(changed_at, !assigned, &event_id) > change_order(at, !c.assign, &c.event_id)
        {
            metrics::counter!("tenancy_domain_changes_superseded_total").increment(1);
            tracing::info!(processor = "domains", tenant = %c.retailer, host = %c.host,
                event_id = %c.event_id, "domain change older than the host's latest applied: changes nothing");
            return Ok(false);
        }
    }
    if c.assign {
        if let Some(other) = claim_host(tx, ns, &c.host, &c.retailer, assigned_at(c)).await? {
            return Err(StepError::reject(format!(
                "domain {} is already assigned to retailer {other}; remove it there first",
                c.host
            )));
        }
    } else {
        sqlx::query(&format!(
            "DELETE FROM {} WHERE host = ? AND retailer_id = ?",
            index_table(ns)
        ))
        .bind(c.host.as_str())
        .bind(&c.retailer)
        .execute(&mut **tx)
        .await?;
    }
    sqlx::query(&format!(
        "UPDATE {} SET changed_at = ?, event_id = ?, retailer_id = ?, assigned = ? WHERE host = ?",
        changes_table(ns)
    ))
    .bind(at)
    .bind(&c.event_id)
    .bind(&c.retailer)
    .bind(c.assign)
    .bind(c.host.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// Each host's latest change applied.
fn changes_table(ns: &Namespace) -> String {
    format!(
        "{}.domain_changes",
        ns.service_database(ServiceDatabase::Platform).quoted()
    )
}

/// A retailer's database (live, or its archive) and the server it is on.
#[derive(Debug, Clone)]
pub struct Placed {
    pub server: Server,
    pub db: DatabaseName,
}

fn assigned_at(c: &DomainChange) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(c.occurred_at).unwrap_or_default()
}

/// The platform-wide index of custom hosts.
fn index_table(ns: &Namespace) -> String {
    format!(
        "{}.retailer_domains",
        ns.service_database(ServiceDatabase::Platform).quoted()
    )
}

/// Assigns `host` to `retailer` in the platform index, or returns the other retailer that
/// holds it (nothing changed then). The row is locked until the transaction ends, so two
/// retailers claiming one host serialise.
///
/// The upsert comes first and the locking read after it, when the row exists: a locking read
/// of a host nobody holds takes a gap lock, and two assignments of neighbouring new hosts then
/// deadlocked on each other's gaps (as the tenants claim did), each a retry and a step towards
/// the dead-letter topic.
pub async fn claim_host(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    ns: &Namespace,
    host: &Host,
    retailer: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<Option<String>, sqlx::Error> {
    // Another retailer's row keeps its time: only the holder's own assignment moves it.
    sqlx::query(&format!(
        "INSERT INTO {} (host, retailer_id, assigned_at) VALUES (?, ?, ?) \
         ON DUPLICATE KEY UPDATE \
         assigned_at = IF(retailer_id = VALUES(retailer_id), VALUES(assigned_at), assigned_at)",
        index_table(ns)
    ))
    .bind(host.as_str())
    .bind(retailer)
    .bind(at)
    .execute(&mut **tx)
    .await?;
    Ok(owner(tx, ns, host, true).await?.filter(|o| o != retailer))
}

/// Which retailer the platform index says holds `host` (`for_update` locks the row).
pub async fn owner(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    ns: &Namespace,
    host: &Host,
    for_update: bool,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT retailer_id FROM {} WHERE host = ?{}",
        index_table(ns),
        if for_update { " FOR UPDATE" } else { "" }
    ))
    .bind(host.as_str())
    .fetch_optional(&mut **tx)
    .await
}

/// The change's row in the retailer's own `domains` table. Shared with `tenancy rebuild`.
pub async fn write_retailer_row(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    db: &DatabaseName,
    c: &DomainChange,
) -> Result<(), sqlx::Error> {
    if c.assign {
        sqlx::query(&format!(
            "INSERT INTO {}.domains (domain, assigned_at) VALUES (?, ?) \
             ON DUPLICATE KEY UPDATE assigned_at = VALUES(assigned_at)",
            db.quoted()
        ))
        .bind(c.host.as_str())
        .bind(assigned_at(c))
        .execute(&mut **tx)
        .await?;
    } else {
        sqlx::query(&format!(
            "DELETE FROM {}.domains WHERE domain = ?",
            db.quoted()
        ))
        .bind(c.host.as_str())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// The verdict for one retailer, as every projection judges a tenant ([`verdict`]): an
/// assignment from before a termination applies to the archive, as it did live.
fn check(tenants: &HashMap<String, TenantRef>, c: &DomainChange, at: i64) -> Gate<Placed> {
    match verdict(
        tenants,
        &c.retailer,
        "retailer_id",
        OrganisationType::Retailer,
        at,
    ) {
        Gate::Ready(t) => match t.database {
            Some(db) => Gate::Ready(Placed {
                server: t.server,
                db,
            }),
            None => Gate::Reject(format!("retailer {} has no valid database", c.retailer)),
        },
        Gate::Hold(wait) => Gate::Hold(wait),
        Gate::Skip { reason, tenant } => Gate::Skip { reason, tenant },
        Gate::Reject(reason) => Gate::Reject(reason),
    }
}

impl Processor for DomainProcessor {
    type Item = DomainChange;
    type Target = Placed;

    fn name(&self) -> &'static str {
        "domains"
    }

    fn parse(&self, event: Event, _origin: &Origin) -> Result<DomainChange, String> {
        parse(event)
    }

    fn order_key(&self, item: &DomainChange) -> String {
        item.retailer.clone()
    }

    fn servers(&self) -> Option<&crate::store::servers::Servers> {
        Some(self.tenants.servers())
    }

    fn target_servers<'t>(&self, target: &'t Placed) -> Vec<&'t Server> {
        vec![&target.server]
    }

    async fn gate(&self, msgs: &[&Msg<DomainChange>]) -> Result<Vec<Gate<Placed>>, StepError> {
        let ends = self.watermark.ends().await?;
        let applied = self.watermark.applied().await?;
        let mut ids: Vec<&str> = msgs.iter().map(|m| m.item.retailer.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let tenants = self.tenants.lookup(&ids).await?;
        Ok(msgs
            .iter()
            .map(|m| {
                if !ends.late_enough_for(m.item.occurred_at, m.received_at_ms)
                    || !settled(&applied, &ends)
                {
                    return Gate::Hold(Wait::Lifecycle);
                }
                let at = EventTime::new(m.item.occurred_at, m.logged_at_ms()).placed("domains");
                check(&tenants, &m.item, at)
            })
            .collect())
    }

    async fn apply(&self, run: &[(&Msg<DomainChange>, &Placed)]) -> Result<(), Failed> {
        for (i, (m, to)) in run.iter().enumerate() {
            self.apply_one(m, to).await.map_err(|e| Failed::at(i, e))?;
            // Also for an event found applied already: its first delivery may have committed
            // and then lost Redis before invalidating.
            self.redis
                .domains_changed(&[m.item.host.as_str().to_owned()])
                .await
                .map_err(|e| Failed::at(i, e))?;
        }
        Ok(())
    }
}
