//! `tenancy restore`: a tenant's database rebuilt from a backup ([`crate::backup`]) and the log
//! since it, beside the live one, and swapped in as a rebuild is.
//!
//! 1. The log must still hold every offset the backup needs (its `log` starts): a log trimmed
//!    past them is refused, naming the partition and the offsets gone. The log's start before
//!    them is not needed: this is how a tenant comes back when the topics no longer reach back
//!    to its creation.
//! 2. The backup is loaded into `{ns}_shadow_{id}` at its own migration version, then migrated.
//! 3. The shadow catches up from the backup's offsets with the live projection code: up to what
//!    the live database holds, or, if the live database is gone (dropped by hand), up to the
//!    log's end; with `--until`, never past the last event logged at or before that moment (a
//!    point-in-time restore of one tenant: a server's binlog cannot tell one tenant's writes
//!    from another's).
//! 4. The swap is the rebuild's, under the tenant's locks after a last catch-up
//!    (`{ns}_old_{id}` keeps the replaced tables for `--rollback` / `--drop-old`). Nothing is
//!    compared first: the live database is what the operator is replacing. `--dry-run` compares
//!    instead of swapping.
//!
//! A supplier's copies of brands are backfilled from the brands' live catalogs, as in a
//! rebuild: `--until` applies to its grants, not to the brands' catalogs.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::compare::Comparison;
use super::fenced::{fingerprint, Fingerprint};
use super::replay::{held_offsets, Replayed};
use super::{converge, refuse_unless_rebuildable, report, Mode, Outcome, Rebuilder};
use crate::backup::{load, Backup};
use crate::config::Config;
use crate::store::schema::{database_exists, tables};
use crate::store::tenants::TenantRef;
use crate::tenancy::migrations;
use crate::tenant::{DatabaseName, OrganisationType};

/// A topic's partitions as the broker has them now: first and next offsets, and with
/// `--until`, the last offset logged at or before it.
#[derive(Debug, Clone, PartialEq)]
pub struct LogView {
    /// partition → (first offset held, next offset to be written)
    pub partitions: BTreeMap<i32, (i64, i64)>,
    /// partition → last offset at or before `until` (-1: none).
    pub until: Option<HashMap<i32, i64>>,
}

impl LogView {
    pub async fn read(config: &Config, topic: &str, until: Option<i64>) -> anyhow::Result<LogView> {
        let consumer: BaseConsumer = config
            .kafka_client_config()
            .set("group.id", format!("{}.restore", config.namespace))
            .create()?;
        let topic = topic.to_owned();
        let (consumer, view) = tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(10);
            let meta = consumer.fetch_metadata(Some(&topic), timeout)?;
            let mut partitions = BTreeMap::new();
            for t in meta.topics() {
                for p in t.partitions() {
                    let (low, high) = consumer.fetch_watermarks(&topic, p.id(), timeout)?;
                    partitions.insert(p.id(), (low, high));
                }
            }
            if partitions.is_empty() {
                anyhow::bail!("topic {topic} has no partitions (does it exist?)");
            }
            let until = match until {
                None => None,
                Some(ms) => {
                    let mut at = TopicPartitionList::new();
                    for p in partitions.keys() {
                        // The first offset logged after `until`: the one before it is the last.
                        at.add_partition_offset(&topic, *p, Offset::Offset(ms + 1))?;
                    }
                    let found = consumer.offsets_for_times(at, timeout)?;
                    let mut caps = HashMap::new();
                    for e in found.elements() {
                        let high = partitions[&e.partition()].1;
                        let cap = match e.offset() {
                            Offset::Offset(o) => o - 1,
                            // Nothing logged after it.
                            _ => high - 1,
                        };
                        caps.insert(e.partition(), cap);
                    }
                    Some(caps)
                }
            };
            anyhow::Ok((consumer, LogView { partitions, until }))
        })
        .await??;
        crate::log::kafka::close_in_background(consumer);
        Ok(view)
    }

    /// The last offset a restore may replay of partition `p`: the log's end, or `--until`'s.
    fn end(&self, p: i32) -> i64 {
        let high = self.partitions.get(&p).map_or(-1, |(_, high)| high - 1);
        match &self.until {
            Some(caps) => caps.get(&p).copied().unwrap_or(-1).min(high),
            None => high,
        }
    }

    /// `upto` held to `--until`.
    fn cap(&self, mut upto: HashMap<i32, i64>) -> HashMap<i32, i64> {
        if self.until.is_some() {
            for (p, o) in upto.iter_mut() {
                *o = (*o).min(self.end(*p));
            }
        }
        upto
    }

    /// The refusal of a backup that needs offsets the log no longer (or never) held: `from`
    /// is where each partition is read from.
    fn refuse_unless_covers(&self, topic: &str, from: &HashMap<i32, i64>) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for (p, (low, high)) in &self.partitions {
            let needed = from.get(p).copied().unwrap_or(0);
            if needed < *low {
                problems.push(format!(
                    "partition {p} now starts at offset {low}, the backup needs it from offset {needed} (offsets {needed}..{} are gone)",
                    low - 1
                ));
            } else if needed > *high {
                problems.push(format!(
                    "partition {p} ends at offset {high}, before the backup's offset {needed}: the topic is not the one the backup was taken from"
                ));
            }
        }
        if !problems.is_empty() {
            anyhow::bail!(
                "{topic} does not hold what this backup needs: {}. Restore a newer backup",
                problems.join("; ")
            );
        }
        Ok(())
    }
}

/// What a restore did, besides what a rebuild reports.
#[derive(Debug)]
pub struct Restored {
    pub outcome: Outcome,
    pub rows_loaded: u64,
    /// How long loading the backup into the shadow took (with its migrations).
    pub load_elapsed: Duration,
    /// The live database did not exist (it was dropped).
    pub live_was_missing: bool,
    /// Whether the shadow was compared with the live database (`--dry-run` only).
    pub compared: bool,
}

impl Rebuilder {
    /// Restores `t` from `backup` (see the module's note); `loaded` is told the rows loaded,
    /// `progress` the replay's progress.
    pub async fn restore(
        &self,
        t: &TenantRef,
        backup: &Backup,
        until: Option<i64>,
        mode: Mode,
        loaded: &(dyn Fn(u64) + Sync),
        mut progress: impl FnMut(&Replayed, &HashMap<i32, i64>),
    ) -> anyhow::Result<Restored> {
        let started = Instant::now();
        let m = &backup.manifest;
        if m.organisation_id != t.organisation_id || m.kind != t.kind.db_word() {
            anyhow::bail!(
                "the backup in {} is of {} {}, not of {} {}",
                backup.dir.display(),
                m.kind,
                m.organisation_id,
                t.kind.db_word(),
                t.organisation_id
            );
        }
        if m.namespace != self.config.namespace.to_string() {
            anyhow::bail!(
                "the backup was taken in namespace {:?}: its offsets are of that namespace's topics, not {:?}'s",
                m.namespace,
                self.config.namespace.to_string()
            );
        }
        if t.status != crate::store::tenants::Status::Active {
            anyhow::bail!(
                "tenant {} is {}: only an active tenant is restored from a backup (a purged one never comes back)",
                t.organisation_id,
                t.status
            );
        }
        let live = refuse_unless_rebuildable(t, false)?;
        let (shadow, old) = self.beside(t)?;
        let db = t.server.pool();
        let topic = match t.kind {
            OrganisationType::Brand => self.topic(),
            _ => self.fenced_topic(t),
        };
        let claim = self.claim(t).await?;
        let mut live_created = false;
        let result = async {
            let mut view = LogView::read(&self.config, &topic, until).await?;
            let from: HashMap<i32, i64> = m
                .log
                .iter()
                .filter(|s| s.topic == topic)
                .map(|s| (s.partition, s.from))
                .collect();
            // A brand's or retailer's events are all on the partition of its key: the one the
            // backup names, or any, if it had none yet. A supplier's grants are on every one.
            if t.kind != OrganisationType::Supplier && !from.is_empty() {
                view.partitions.retain(|p, _| from.contains_key(p));
            }
            view.refuse_unless_covers(&topic, &from)?;
            if mode != Mode::DryRun
                && (!tables(db, &old).await?.is_empty() || self.old_elsewhere(t, &old).await?.is_some())
            {
                anyhow::bail!(
                    "an earlier rebuild's tables are still kept in {old}: `tenancy rebuild {} --drop-old` (or --rollback) first",
                    t.organisation_id
                );
            }
            let live_missing = !database_exists(db, &live).await?;
            if live_missing && mode == Mode::DryRun {
                anyhow::bail!(
                    "tenant {}'s database {live} does not exist: there is nothing to compare with (restore without --dry-run)",
                    t.organisation_id
                );
            }
            sqlx::query(&format!("DROP DATABASE IF EXISTS {}", shadow.quoted()))
                .execute(db)
                .await?;
            let loading = Instant::now();
            load::load(&t.server, &shadow, backup, migrations::for_tenant(t.kind), loaded).await?;
            let load_elapsed = loading.elapsed();
            if mode != Mode::DryRun {
                sqlx::query(&crate::store::schema::create_database(&old, true))
                    .execute(db)
                    .await?;
            }
            let reported = report::Progress::default();
            let converged = match (mode, live_missing) {
                (Mode::DryRun, _) => {
                    self.restore_beside(t, &topic, &view, mode, &live, &shadow, &old, &reported, &mut progress)
                        .await?
                }
                (Mode::Swap { .. }, true) => {
                    tracing::warn!(tenant = %t.organisation_id, database = %live,
                        "the live database does not exist: restoring up to the log's end");
                    sqlx::query(&crate::store::schema::create_database(&live, true))
                        .execute(db)
                        .await?;
                    live_created = true;
                    self.restore_swap(t, &topic, &view, true, &live, &shadow, &old, &mut progress)
                        .await?
                }
                (Mode::Swap { .. }, false) => {
                    self.restore_swap(t, &topic, &view, false, &live, &shadow, &old, &mut progress)
                        .await?
                }
            };
            self.finish(t, &t.server, mode, converged.swapped, &shadow, &old)
                .await?;
            if converged.swapped {
                live_created = false;
            }
            anyhow::Ok(Restored {
                outcome: Outcome {
                    database: live.clone(),
                    replayed: converged.replayed,
                    comparison: converged.comparison,
                    swapped_to: converged.swapped.then(|| old.clone()),
                    copies_refreshed: None,
                    pause: converged.pause,
                    elapsed: started.elapsed(),
                    moved_to: None,
                },
                rows_loaded: m.rows(),
                load_elapsed,
                live_was_missing: live_missing,
                compared: mode == Mode::DryRun,
            })
        }
        .await;
        claim.release().await;
        if result.is_err() {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {}", shadow.quoted()))
                .execute(db)
                .await;
            for made in [Some(&old), live_created.then_some(&live)]
                .into_iter()
                .flatten()
            {
                if tables(db, made).await.is_ok_and(|t| t.is_empty()) {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {}", made.quoted()))
                        .execute(db)
                        .await;
                }
            }
        }
        result
    }

    /// `--dry-run`: the shadow caught up with the live database (held to `--until`) and
    /// compared with it as a rebuild's is ([`converge`](Rebuilder::converge)).
    #[allow(clippy::too_many_arguments)]
    async fn restore_beside(
        &self,
        t: &TenantRef,
        topic: &str,
        view: &LogView,
        mode: Mode,
        live: &DatabaseName,
        shadow: &DatabaseName,
        old: &DatabaseName,
        reported: &report::Progress,
        progress: &mut impl FnMut(&Replayed, &HashMap<i32, i64>),
    ) -> anyhow::Result<converge::Converged> {
        let at = converge::Rebuilding {
            tenant: t,
            target: &t.server,
            mode,
            live,
            shadow,
            old,
        };
        let db = t.server.pool();
        if t.kind == OrganisationType::Brand {
            let replay = self.replay(t, topic, &t.server, true);
            return self
                .converge(
                    at,
                    reported,
                    async || Ok(view.cap(held_offsets(db, live, &self.spec, topic).await?)),
                    async |upto| replay.run(shadow, upto, &mut *progress).await,
                    async || Ok(Some(self.hold_writes(t).await?)),
                )
                .await;
        }
        self.converge(
            at,
            reported,
            async || Ok(cap_fingerprint(fingerprint(db, live).await?, topic, view)),
            async |seen| self.catch_up(t, &t.server, shadow, seen, reported).await,
            async || self.hold_tenant_writes(t, live, &t.server, shadow).await,
        )
        .await
    }

    /// The shadow caught up without holding anyone up, then again under the tenant's locks,
    /// and swapped in: up to what the live database holds, or with `live_missing` up to the
    /// log's end (the live name is then an empty database); either held to `--until`. Nothing
    /// is compared: the live database is what is being replaced (`--dry-run` compares).
    #[allow(clippy::too_many_arguments)]
    async fn restore_swap(
        &self,
        t: &TenantRef,
        topic: &str,
        view: &LogView,
        live_missing: bool,
        live: &DatabaseName,
        shadow: &DatabaseName,
        old: &DatabaseName,
        progress: &mut impl FnMut(&Replayed, &HashMap<i32, i64>),
    ) -> anyhow::Result<converge::Converged> {
        let reported = report::Progress::default();
        let db = t.server.pool();
        // A supplier's writers are named by the brands its copies hold: the live database's,
        // or the shadow's when there is none.
        let named_by = if live_missing { shadow } else { live };
        let mut replayed = Replayed::default();
        for locked in [false, true] {
            let held = match locked {
                false => None,
                true => loop {
                    let hold = match t.kind {
                        OrganisationType::Brand => Some(self.hold_writes(t).await?),
                        _ => {
                            self.hold_tenant_writes(t, named_by, &t.server, shadow)
                                .await?
                        }
                    };
                    if let Some(h) = hold {
                        break Some((h, Instant::now()));
                    }
                },
            };
            let caught_up = async {
                let ends: HashMap<i32, i64> = match live_missing {
                    true => {
                        let mut now = LogView::read(&self.config, topic, None).await?;
                        now.partitions
                            .retain(|p, _| view.partitions.contains_key(p));
                        let now = LogView {
                            partitions: now.partitions,
                            until: view.until.clone(),
                        };
                        now.partitions.keys().map(|p| (*p, now.end(*p))).collect()
                    }
                    false => HashMap::new(),
                };
                let done = match t.kind {
                    OrganisationType::Brand => {
                        let upto = match live_missing {
                            true => ends,
                            false => view.cap(held_offsets(db, live, &self.spec, topic).await?),
                        };
                        let replay = self.replay(t, topic, &t.server, true);
                        replay.run(shadow, &upto, &mut *progress).await?
                    }
                    _ => {
                        let fp = match live_missing {
                            true => self.log_end_fingerprint(t, topic, &ends).await?,
                            false => cap_fingerprint(fingerprint(db, live).await?, topic, view),
                        };
                        self.catch_up(t, &t.server, shadow, &fp, &reported).await?
                    }
                };
                if locked {
                    super::exchange(db, live, shadow, old).await?;
                }
                anyhow::Ok(done)
            }
            .await;
            if let Some(((first, second), since)) = held {
                second.release().await;
                first.release().await;
                replayed += caught_up?;
                return Ok(converge::Converged {
                    replayed,
                    comparison: Comparison::default(),
                    swapped: true,
                    pause: since.elapsed(),
                });
            }
            replayed += caught_up?;
        }
        unreachable!("the second round returns")
    }

    /// What a supplier's or retailer's live database would hold had it applied everything up
    /// to `ends`: the bounds of a catch-up with no live database to follow. A supplier's grants
    /// may come from any brand.
    async fn log_end_fingerprint(
        &self,
        t: &TenantRef,
        topic: &str,
        ends: &HashMap<i32, i64>,
    ) -> anyhow::Result<Fingerprint> {
        let projections: Vec<String> = match t.kind {
            OrganisationType::Retailer => vec![crate::domains::PROJECTION.to_owned()],
            _ => self
                .tenants
                .list(None)
                .await?
                .into_iter()
                .filter(|r| r.organisation_type == OrganisationType::Brand)
                .map(|r| format!("access:{}", r.organisation_id))
                .collect(),
        };
        let mut fp = Vec::new();
        for projection in &projections {
            for (p, end) in ends {
                if *end >= 0 {
                    fp.push((projection.clone(), topic.to_owned(), *p, *end));
                }
            }
        }
        fp.sort();
        Ok(fp)
    }
}

/// A fenced tenant's live fingerprint with its own topic's offsets held to `--until`.
fn cap_fingerprint(mut fp: Fingerprint, topic: &str, view: &LogView) -> Fingerprint {
    if view.until.is_some() {
        for (_, t, p, o) in fp.iter_mut() {
            if t == topic {
                *o = (*o).min(view.end(*p));
            }
        }
    }
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(until: Option<&[(i32, i64)]>) -> LogView {
        LogView {
            partitions: [(0, (0, 10)), (1, (5, 20))].into_iter().collect(),
            until: until.map(|u| u.iter().copied().collect()),
        }
    }

    #[test]
    fn a_backup_needing_offsets_the_log_lost_is_refused_naming_them() {
        let v = view(None);
        v.refuse_unless_covers("t", &[(0, 3), (1, 5)].into_iter().collect())
            .unwrap();
        let refused = v
            .refuse_unless_covers("t", &[(0, 3), (1, 2)].into_iter().collect())
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("partition 1 now starts at offset 5, the backup needs it from offset 2 (offsets 2..4 are gone)"),
            "{refused}"
        );
        // A partition the backup names no offset of is read from 0.
        let refused = v
            .refuse_unless_covers("t", &[(0, 3)].into_iter().collect())
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("partition 1 now starts at offset 5"),
            "{refused}"
        );
        let refused = v
            .refuse_unless_covers("t", &[(0, 11), (1, 6)].into_iter().collect())
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("not the one the backup was taken from"),
            "{refused}"
        );
    }

    /// The watermarks as a restore reads them, from a log whose start is gone.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_trimmed_log_restores_a_backup_it_still_covers_and_refuses_an_older_one() {
        let (_cluster, config) =
            crate::rebuild::mock_log::with_trimmed(&["trimmed"], "trimmed").await;
        let view = LogView::read(&config, "trimmed", None).await.unwrap();
        assert_eq!(view.partitions[&0], (0, 1));
        assert_eq!(view.partitions[&1], (3, 8));
        // Taken after offset 5 was applied: the log still holds 6 on.
        view.refuse_unless_covers("trimmed", &[(0, 1), (1, 6)].into_iter().collect())
            .unwrap();
        let refused = view
            .refuse_unless_covers("trimmed", &[(0, 1), (1, 1)].into_iter().collect())
            .unwrap_err()
            .to_string();
        assert_eq!(
            refused,
            "trimmed does not hold what this backup needs: partition 1 now starts at offset 3, \
             the backup needs it from offset 1 (offsets 1..2 are gone). Restore a newer backup"
        );
    }

    #[test]
    fn until_holds_the_replay_to_the_last_offset_logged_by_then() {
        let v = view(Some(&[(0, 4), (1, -1)]));
        assert_eq!(v.end(0), 4);
        assert_eq!(v.end(1), -1);
        let capped = v.cap([(0, 9), (1, 19)].into_iter().collect());
        assert_eq!(capped, [(0, 4), (1, -1)].into_iter().collect());
        let open = view(None);
        assert_eq!(open.end(1), 19);
        assert_eq!(
            open.cap([(0, 7)].into_iter().collect()),
            [(0, 7)].into_iter().collect()
        );
    }
}
