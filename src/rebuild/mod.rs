//! `tenancy rebuild`: a tenant's database rebuilt from the topics beside the live one, compared
//! with it, and swapped in atomically while the processors keep running.
//!
//! 1. Claim the organisation's rebuild (a MySQL named lock: one rebuild per tenant across every
//!    host; a killed rebuild's claim ends with its connection).
//! 2. Create `{ns}_shadow_{id}`, run the migrations, and replay every event of the tenant from
//!    offset 0 up to what the live database holds ([`replay`]), with the live projection code.
//! 3. Take the tenant's lifecycle and brand locks (the live catalog writes the brand under the
//!    latter), replay the few events applied meanwhile, compare every table ([`compare`]).
//! 4. Unless `--dry-run` or differences without `--accept-differences`: one `RENAME TABLE`
//!    moves the live tables to `{ns}_old_{id}` and the shadow's into the live database, so a
//!    reader sees the old tables or the new ones, never none. The locks are held from step 3
//!    to here only: that is the swap pause.
//!
//! The live database is only ever touched by that rename. A rebuild publishes nothing and
//! writes no Redis key. `--rollback` brings the old tables back the same way (after replaying
//! into them what the live database applied since the swap); `--drop-old` drops them.
//!
//! `--to-server S` moves the tenant: the shadow is built on S and compared there with the live
//! database, and the swap ([`Rebuilder::relocate`]) renames it into the live name on S, points
//! the tenant's row at S, and moves the live tables to `{ns}_old_{id}` on the server left. A
//! move moves the domain generation on (the one Redis write a rebuild makes): `tenancy serve`'s
//! cached resolutions name the server.
//!
//! Brands; suppliers ([`supplier`]: grants replayed, copies backfilled from the brands) and
//! retailers ([`retailer`]: domain events replayed), both through [`fenced`]. Suppliers'
//! copies of a rebuilt brand keep what the old tables fanned out to them unless
//! `--refresh-copies` rebuilds them from the swapped-in tables.

pub mod compare;
mod converge;
mod fenced;
pub mod kept;
pub mod replay;
pub mod report;
pub mod restore;
mod retailer;
mod supplier;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::MySqlPool;

use crate::catalog::spec::CatalogSpec;
use crate::config::Config;
use crate::log::topics::Topic;
use crate::log::wire::PendingCodec;
use crate::store::locks::NamedLock;
use crate::store::schema::{database_exists, tables};
use crate::store::servers::Server;
use crate::store::tenants::{Status, TenantRef, Tenants};
use crate::tenancy::migrations;
use crate::tenant::{DatabaseName, OrganisationType};

use compare::Comparison;
use replay::{held_offsets, Replay, Replayed};

/// What to do once the shadow has caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Compare and report; change nothing.
    DryRun,
    /// Swap in when equal (or, with `accept_differences`, whatever the differences).
    Swap { accept_differences: bool },
}

impl Mode {
    /// Whether a rebuild that compared as `comparison` is swapped in.
    fn swaps(self, comparison: &Comparison) -> bool {
        match self {
            Mode::DryRun => false,
            Mode::Swap { accept_differences } => {
                comparison.differences.is_empty() || accept_differences
            }
        }
    }
}

/// How a rebuild ended.
#[derive(Debug)]
pub struct Outcome {
    pub database: DatabaseName,
    pub replayed: Replayed,
    pub comparison: Comparison,
    /// Where the replaced tables are, when swapped.
    pub swapped_to: Option<DatabaseName>,
    /// Supplier copies of the brand rebuilt from the swapped-in tables (`--refresh-copies`).
    pub copies_refreshed: Option<usize>,
    /// How long the tenant's writes were held for the final catch-up, compare and swap.
    pub pause: Duration,
    pub elapsed: Duration,
    /// The server the tenant was moved to (`--to-server`), when swapped there.
    pub moved_to: Option<String>,
}

/// Comparisons made before taking the tenant's locks, before one is made under them.
const ATTEMPTS_BEFORE_LOCKED_COMPARE: u32 = 4;

pub use crate::fault::FailAfter;
use crate::fault::{crash_after, FailPoint};

/// Finds the one tenant `name` means: an organisation id, or `brand/slug` (also `supplier/…`,
/// `retailer/…`).
pub async fn resolve(tenants: &Tenants, name: &str) -> anyhow::Result<TenantRef> {
    let (kind, key) = match name.split_once('/') {
        Some((kind, slug)) => (Some(OrganisationType::parse(&kind.to_uppercase())?), slug),
        None => (None, name),
    };
    let rows: Vec<_> = tenants
        .find(key)
        .await?
        .into_iter()
        .filter(|r| kind.is_none_or(|k| r.organisation_type == k))
        .collect();
    let record = match rows.as_slice() {
        [] => anyhow::bail!("unknown tenant {name:?}: no organisation has that id or slug"),
        [one] => one,
        many => anyhow::bail!(
            "{name:?} names {} tenants ({}): give the organisation id or type/slug",
            many.len(),
            many.iter()
                .map(|r| format!("{}/{}", r.organisation_type.db_word(), r.slug))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let found = tenants.lookup(&[&record.organisation_id]).await?;
    found
        .get(&record.organisation_id)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("tenant {name:?} vanished while looking it up"))
}

/// The checks before anything is created: what is rebuilt, and whether it can be. The
/// database rebuilt is the live one, or with `archived` the archive of an archived tenant.
fn refuse_unless_rebuildable(t: &TenantRef, archived: bool) -> anyhow::Result<DatabaseName> {
    if t.changing {
        anyhow::bail!(
            "tenant {} is {}, in the middle of a lifecycle step: try again when it is done",
            t.organisation_id,
            t.status
        );
    }
    match (t.status, archived) {
        (Status::Active, false) => t
            .database
            .clone()
            .ok_or_else(|| anyhow::anyhow!("tenant {} has no database", t.organisation_id)),
        (Status::Archived, true) => t
            .archive_database
            .clone()
            .ok_or_else(|| anyhow::anyhow!("tenant {} has no archive database", t.organisation_id)),
        (Status::Archived, false) => anyhow::bail!(
            "tenant {} is archived: its archive is rebuilt only with --archived",
            t.organisation_id
        ),
        (Status::Active, true) => anyhow::bail!(
            "tenant {} is active, not archived: rebuild it without --archived",
            t.organisation_id
        ),
        (status, _) => anyhow::bail!(
            "tenant {} is {status}: it has no database to rebuild",
            t.organisation_id
        ),
    }
}

/// Every partition of `topic` must still start at offset 0: a rebuild from a log whose start
/// was deleted would silently lose those events.
async fn refuse_unless_log_complete(config: &Config, topic: &str) -> anyhow::Result<()> {
    let consumer: BaseConsumer = config
        .kafka_client_config()
        .set("group.id", format!("{}.rebuild", config.namespace))
        .create()?;
    let topic = topic.to_owned();
    // Blocking requests: off the runtime's threads.
    let (consumer, gone, topic) = tokio::task::spawn_blocking(move || {
        let meta = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut first = TopicPartitionList::new();
        for t in meta.topics() {
            for p in t.partitions() {
                // The "timestamp" -2 asks for each partition's first offset: one request for
                // every partition (two per partition with fetch_watermarks).
                first.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
            }
        }
        let found = consumer.offsets_for_times(first, Duration::from_secs(10))?;
        let mut gone = Vec::new();
        for e in found.elements() {
            let low = match e.offset() {
                Offset::Offset(low) => low,
                other => anyhow::bail!(
                    "cannot tell where partition {} of {topic} starts (the broker answered {other:?})",
                    e.partition()
                ),
            };
            if low > 0 {
                gone.push(format!("partition {} lost offsets 0..{}", e.partition(), low - 1));
            }
        }
        anyhow::Ok((consumer, gone, topic))
    })
    .await??;
    // It joined no group: nothing waits for its close (100 ms).
    crate::log::kafka::close_in_background(consumer);
    if !gone.is_empty() {
        anyhow::bail!(
            "{topic} no longer holds its whole history ({}): a rebuild would miss those events",
            gone.join("; ")
        );
    }
    Ok(())
}

/// One atomic `RENAME TABLE`: `live`'s tables to `out`, then `incoming`'s into `live`. Table
/// names come from the server's catalog and are checked before they are quoted.
async fn exchange(
    pool: &MySqlPool,
    live: &DatabaseName,
    incoming: &DatabaseName,
    out: &DatabaseName,
) -> anyhow::Result<()> {
    let mut moves = Vec::new();
    for t in tables(pool, live).await? {
        compare::identifier(&t)?;
        moves.push(format!("{}.`{t}` TO {}.`{t}`", live.quoted(), out.quoted()));
    }
    for t in tables(pool, incoming).await? {
        compare::identifier(&t)?;
        moves.push(format!(
            "{}.`{t}` TO {}.`{t}`",
            incoming.quoted(),
            live.quoted()
        ));
    }
    sqlx::query(&format!("RENAME TABLE {}", moves.join(", ")))
        .execute(pool)
        .await?;
    Ok(())
}

/// Everything a rebuild needs, built once.
pub struct Rebuilder {
    pub config: Config,
    /// The home server's pool: locks, claims and `{ns}_platform`. A tenant's own databases
    /// (live, shadow, old) are reached through its `TenantRef::server`.
    pub home: MySqlPool,
    /// Also the router: `tenants.servers()`.
    pub tenants: Tenants,
    /// Shared with a replay's reader, which runs as a task of its own.
    pub codec: PendingCodec,
    pub spec: CatalogSpec,
    options: Options,
}

/// How rebuilds run: what `tenancy rebuild`'s flags say, given once to [`Rebuilder::new`].
#[derive(Debug, Clone)]
pub struct Options {
    /// How long the replaced tables are kept after a swap (`--keep-old`).
    pub keep_old: Duration,
    /// After a swap or rollback, rebuild every active supplier's copy of the brand from the
    /// tables now live (`--refresh-copies`). Off by default: a rebuild touches no other tenant
    /// unless asked.
    pub refresh_copies: bool,
    /// Rebuild archived tenants' archives instead of active tenants' live databases
    /// (`--archived`).
    pub archived: bool,
    /// Move the tenant to this server (`--to-server`): the shadow is built there, and the swap
    /// makes it the live database there and points the tenant's row at it.
    pub to_server: Option<String>,
    /// Rebuilds run at once (`--parallel`): sizes the connection pools.
    pub parallel: usize,
    /// A brand's events applied per transaction ([`replay::BATCH`]; tests make it small).
    pub replay_batch: usize,
    /// Tests only: wait this long, holding the tenant's writes, between the decision to swap
    /// and the swap itself, so a test can show that no write slips in there.
    pub pause_before_swap: Option<Duration>,
    /// Crash tests only: where to abort (the `fault-injection` feature).
    pub fail_after: FailAfter,
    /// Where a supplier's grants are read from, per partition of `{ns}.brand-access`: from 0
    /// for a rebuild; from a backup's offsets for a restore (the log before them may be gone).
    pub access_from: std::collections::HashMap<i32, i64>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            keep_old: Duration::from_secs(7 * 24 * 3600),
            refresh_copies: false,
            archived: false,
            to_server: None,
            parallel: 1,
            replay_batch: replay::BATCH,
            pause_before_swap: None,
            fail_after: None,
            access_from: Default::default(),
        }
    }
}

impl Rebuilder {
    /// For up to `options.parallel` rebuilds at once: each holds up to three connections for
    /// its claim and locks, two for its queries (a shadow's two writers, the two sides of a
    /// comparison, a supplier's copies), one for the replay's lookups and one for its progress
    /// report. Refuses a `to_server` that is not configured.
    pub async fn new(config: &Config, options: Options) -> anyhow::Result<Rebuilder> {
        // Built while the connections are made and the shadow prepared (see PendingCodec).
        let codec = PendingCodec::start(&config.schema_registry_url);
        let servers = crate::store::servers::Servers::connect(
            config,
            (7 * options.parallel.max(1) + 2) as u32,
        )
        .await?;
        if let Some(name) = &options.to_server {
            servers.get(name).map_err(|_| {
                let configured: Vec<&str> = servers.all().iter().map(|s| s.name()).collect();
                anyhow::anyhow!(
                    "--to-server {name}: no such server (configured: {}; add it to TENANCY_SERVERS)",
                    configured.join(", ")
                )
            })?;
        }
        let home = servers.home().pool().clone();
        // The rebuilds table may be newer than the workers that migrated the platform.
        crate::tenancy::provisioning::prepare_service_databases(
            &home,
            &config.database_url,
            &config.namespace,
        )
        .await?;
        Ok(Rebuilder {
            tenants: Tenants::on(servers, &config.namespace),
            codec,
            spec: CatalogSpec::load()?,
            config: config.clone(),
            home,
            options,
        })
    }

    /// Whether this rebuilder works on archives (`--archived`).
    pub fn archived(&self) -> bool {
        self.options.archived
    }

    fn topic(&self) -> String {
        Topic::BrandCatalog.name(&self.config.namespace)
    }

    /// The server `t`'s rebuilt database is built on: its own, or `--to-server`'s, which must
    /// be in the tenant's region if it has one (its data never leaves it).
    fn target_of(&self, t: &TenantRef) -> anyhow::Result<Server> {
        match &self.options.to_server {
            None => Ok(t.server.clone()),
            Some(name) => {
                let servers = self.tenants.servers();
                servers
                    .allows(t.region.as_deref(), name)
                    .map_err(|why| anyhow::anyhow!("--to-server {name} refused: {why}"))?;
                Ok(servers.get(name)?.clone())
            }
        }
    }

    /// A replay of `brand`'s events into a database on `on`; `shadow` when that database is a
    /// shadow (see [`Replay::split_writes`]).
    fn replay<'a>(
        &'a self,
        brand: &'a TenantRef,
        topic: &'a str,
        on: &'a Server,
        shadow: bool,
    ) -> Replay<'a> {
        Replay {
            config: &self.config,
            pool: on.pool(),
            codec: &self.codec,
            spec: &self.spec,
            brand,
            topic,
            batch: self.options.replay_batch,
            split_writes: shadow,
            fail_after: &self.options.fail_after,
            known: Default::default(),
        }
    }

    /// The shadow and old databases of `t`.
    fn beside(&self, t: &TenantRef) -> anyhow::Result<(DatabaseName, DatabaseName)> {
        let ns = &self.config.namespace;
        ns.shadow_database(&t.organisation_id)
            .zip(ns.old_database(&t.organisation_id))
            .ok_or_else(|| anyhow::anyhow!("organisation id {} is not a uuid", t.organisation_id))
    }

    async fn claim(&self, t: &TenantRef) -> anyhow::Result<NamedLock> {
        NamedLock::rebuild(&self.home, &self.config.namespace, &t.organisation_id)
            .await?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "another rebuild of tenant {} is running; wait for it to end",
                    t.organisation_id
                )
            })
    }

    /// Holds the tenant's lifecycle and brand locks (in the order the lifecycle takes them),
    /// and checks it is still active under them.
    async fn hold_writes(&self, t: &TenantRef) -> anyhow::Result<(NamedLock, NamedLock)> {
        let ns = &self.config.namespace;
        let lifecycle = NamedLock::lifecycle(&self.home, ns, &t.organisation_id)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let brand = NamedLock::brand(&self.home, ns, &t.organisation_id)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let now = resolve(&self.tenants, &t.organisation_id).await?;
        if let Err(e) = refuse_unless_rebuildable(&now, self.options.archived) {
            brand.release().await;
            lifecycle.release().await;
            return Err(e);
        }
        Ok((lifecycle, brand))
    }

    /// Rebuilds `t` beside its live database and, as `mode` says, swaps it in.
    pub async fn rebuild(
        &self,
        t: &TenantRef,
        mode: Mode,
        progress: impl FnMut(&Replayed, &std::collections::HashMap<i32, i64>),
    ) -> anyhow::Result<Outcome> {
        let started = Instant::now();
        let live = refuse_unless_rebuildable(t, self.options.archived)?;
        let (shadow, old) = self.beside(t)?;
        // The shadow on the server the rebuilt database goes to (the tenant's own, unless it
        // moves), the replaced tables beside the live ones: each swap is a RENAME TABLE on one
        // server.
        let target = self.target_of(t)?;
        let db = t.server.pool();
        let claim = self.claim(t).await?;
        let reported = Arc::new(report::Progress::default());
        let reporter = report::Reporter::start(
            self.home.clone(),
            self.config.namespace.clone(),
            t.organisation_id.clone(),
            reported.clone(),
        );
        let mut progress = progress;
        let mut progress = |done: &Replayed, at: &std::collections::HashMap<i32, i64>| {
            reported.counts(done.read, done.applied);
            progress(done, at);
        };
        let result = async {
            if t.kind != OrganisationType::Brand {
                return self
                    .rebuild_fenced(t, &target, &live, mode, &reported)
                    .await;
            }
            let topic = self.topic();
            self.prepare(t, &target, &shadow, &old, mode, &topic, &reported)
                .await?;
            let replay = self.replay(t, &topic, &target, true);
            let converge::Converged {
                replayed,
                comparison,
                swapped,
                pause,
            } = self
                .converge(
                    converge::Rebuilding {
                        tenant: t,
                        target: &target,
                        mode,
                        live: &live,
                        shadow: &shadow,
                        old: &old,
                    },
                    &reported,
                    async || Ok(held_offsets(db, &live, &self.spec, &topic).await?),
                    async |upto| replay.run(&shadow, upto, &mut progress).await,
                    async || Ok(Some(self.hold_writes(t).await?)),
                )
                .await?;
            self.finish(t, &target, mode, swapped, &shadow, &old)
                .await?;
            let now = TenantRef {
                server: if swapped {
                    target.clone()
                } else {
                    t.server.clone()
                },
                ..t.clone()
            };
            let copies_refreshed =
                match swapped && self.options.refresh_copies && !self.options.archived {
                    true => Some(self.refresh_supplier_copies(&now, &live).await?),
                    false => None,
                };
            Ok(Outcome {
                database: live.clone(),
                replayed,
                comparison,
                swapped_to: swapped.then(|| old.clone()),
                copies_refreshed,
                pause,
                elapsed: started.elapsed(),
                moved_to: (swapped && target != t.server).then(|| target.name().to_owned()),
            })
        }
        .await;
        reporter.finish().await;
        claim.release().await;
        if result.is_err() {
            // Leave nothing half-built behind; the live database was not touched.
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {}", shadow.quoted()))
                .execute(target.pool())
                .await;
            if tables(db, &old).await.is_ok_and(|t| t.is_empty()) {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {}", old.quoted()))
                    .execute(db)
                    .await;
            }
        }
        result
    }

    /// Brings the tables a rebuild replaced back into the live database, after replaying into
    /// them what the live database applied since the swap. Returns the events replayed.
    pub async fn rollback(&self, t: &TenantRef) -> anyhow::Result<Replayed> {
        let live = refuse_unless_rebuildable(t, self.options.archived)?;
        let (shadow, old) = self.beside(t)?;
        let db = t.server.pool();
        let claim = self.claim(t).await?;
        let result = async {
            if tables(db, &old).await?.is_empty() {
                if let Some(elsewhere) = self.old_elsewhere(t, &old).await? {
                    anyhow::bail!(
                        "tenant {} was moved from server {elsewhere} (its replaced tables are there): \
                         move it back with --to-server {elsewhere} instead of --rollback",
                        t.organisation_id
                    );
                }
                anyhow::bail!(
                    "no earlier copy of tenant {} to roll back to ({old} is missing or empty)",
                    t.organisation_id
                );
            }
            if t.kind != OrganisationType::Brand {
                let replayed = self.rollback_fenced(t, &live).await?;
                for gone in [&shadow, &old] {
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {}", gone.quoted()))
                        .execute(db)
                        .await?;
                }
                kept::forget(&self.home, &self.config.namespace, &t.organisation_id).await?;
                return Ok(replayed);
            }
            let topic = self.topic();
            let replay = self.replay(t, &topic, &t.server, false);
            let upto = held_offsets(db, &live, &self.spec, &topic).await?;
            let mut replayed = replay.run(&old, &upto, |_, _| {}).await?;
            let (lifecycle, brand) = self.hold_writes(t).await?;
            let swapped = async {
                let upto = held_offsets(db, &live, &self.spec, &topic).await?;
                replayed += replay.run(&old, &upto, |_, _| {}).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {}", shadow.quoted()))
                    .execute(db)
                    .await?;
                sqlx::query(&crate::store::schema::create_database(&shadow, false))
                .execute(db)
                .await?;
                exchange(db, &live, &old, &shadow).await
            }
            .await;
            brand.release().await;
            lifecycle.release().await;
            swapped?;
            for gone in [&shadow, &old] {
                sqlx::query(&format!("DROP DATABASE IF EXISTS {}", gone.quoted()))
                    .execute(db)
                    .await?;
            }
            kept::forget(&self.home, &self.config.namespace, &t.organisation_id).await?;
            if self.options.refresh_copies && !self.options.archived {
                let n = self.refresh_supplier_copies(t, &live).await?;
                tracing::info!(tenant = %t.organisation_id, copies = n, "supplier copies refreshed");
            }
            Ok(replayed)
        }
        .await;
        claim.release().await;
        result
    }

    /// Before any replay: the old tables of an earlier rebuild must be gone (unless this is a
    /// dry run), the log must be whole, and the shadow is created afresh (one left by a killed
    /// rebuild is ours now: we hold the claim); the database for the replaced tables too.
    #[allow(clippy::too_many_arguments)]
    async fn prepare(
        &self,
        t: &TenantRef,
        target: &Server,
        shadow: &DatabaseName,
        old: &DatabaseName,
        mode: Mode,
        topic: &str,
        reported: &report::Progress,
    ) -> anyhow::Result<()> {
        reported.phase("preparing");
        let db = t.server.pool();
        // (An empty one is a killed rebuild's, about to swap: it is reused. After a move the
        // replaced tables are on the server it left.)
        if mode != Mode::DryRun
            && (!tables(db, old).await?.is_empty() || self.old_elsewhere(t, old).await?.is_some())
        {
            anyhow::bail!(
                "an earlier rebuild's tables are still kept in {old}: `tenancy rebuild {} --drop-old` (or --rollback) first",
                t.organisation_id
            );
        }
        // The log's check (a Kafka client's start and two requests) while the shadow is made,
        // 10 to 50 ms of a small rebuild each: a refusal from either cancels the other, and
        // `rebuild` drops the shadow of any rebuild that fails.
        let shadow_made = async {
            if *target != t.server {
                // A move: the target must not hold the live name. A move killed after its first
                // step leaves one there, which `--drop-old` clears; anything else of that name is
                // not ours to drop (as provisioning never adopts a database nobody registered).
                let live = refuse_unless_rebuildable(t, self.options.archived)?;
                if database_exists(target.pool(), &live).await? {
                    anyhow::bail!(
                        "database {live} already exists on server {}: if a move of tenant {} was \
                         killed there, `tenancy rebuild {} --drop-old` clears it; otherwise it \
                         is not this tenant's, and the move is refused",
                        target.name(),
                        t.organisation_id,
                        t.organisation_id
                    );
                }
            }
            sqlx::query(&format!("DROP DATABASE IF EXISTS {}", shadow.quoted()))
                .execute(target.pool())
                .await?;
            migrations::create_and_migrate(
                target.pool(),
                target.url(),
                shadow,
                migrations::for_tenant(t.kind),
            )
            .await?;
            anyhow::Ok(())
        };
        tokio::try_join!(refuse_unless_log_complete(&self.config, topic), shadow_made)?;
        crash_after(self.options.fail_after, FailPoint::Shadow);
        if mode != Mode::DryRun {
            sqlx::query(&crate::store::schema::create_database(old, true))
                .execute(db)
                .await?;
        }
        Ok(())
    }

    /// After the swap (or the decision not to): the replaced tables' expiry recorded, or
    /// their empty database dropped; the shadow dropped.
    async fn finish(
        &self,
        t: &TenantRef,
        target: &Server,
        mode: Mode,
        swapped: bool,
        shadow: &DatabaseName,
        old: &DatabaseName,
    ) -> anyhow::Result<()> {
        if swapped {
            // The swap is done: failing to record the expiry must not make it look failed.
            if let Err(e) = kept::keep(
                &self.home,
                &self.config.namespace,
                &t.organisation_id,
                self.options.keep_old,
            )
            .await
            {
                tracing::warn!(tenant = %t.organisation_id, database = %old, error = %e,
                    "cannot record when the old tables expire; drop them with --drop-old");
            }
            // The swapped-in tables were made by this binary's migrations: the tenant is at
            // its latest version now (a tenant held as behind, or failed, is served again).
            let latest = migrations::latest_version(migrations::for_tenant(t.kind));
            if let Err(e) = self
                .tenants
                .record_migrated(&t.organisation_id, latest)
                .await
            {
                tracing::warn!(tenant = %t.organisation_id, error = %e,
                    "cannot record the migration version of the swapped-in tables; the next rollout will");
            }
        }
        let db = t.server.pool();
        if mode != Mode::DryRun && !swapped {
            sqlx::query(&format!("DROP DATABASE IF EXISTS {}", old.quoted()))
                .execute(db)
                .await?;
        }
        sqlx::query(&format!("DROP DATABASE IF EXISTS {}", shadow.quoted()))
            .execute(target.pool())
            .await?;
        Ok(())
    }

    /// Swaps `shadow` in (the live tables to `old`) if `mode` chooses to for `comparison`.
    #[allow(clippy::too_many_arguments)]
    async fn swap_if_chosen(
        &self,
        t: &TenantRef,
        target: &Server,
        mode: Mode,
        comparison: &Comparison,
        live: &DatabaseName,
        shadow: &DatabaseName,
        old: &DatabaseName,
    ) -> anyhow::Result<bool> {
        let swap = mode.swaps(comparison);
        if swap {
            self.pause_before_swap().await;
            if *target == t.server {
                exchange(target.pool(), live, shadow, old).await?;
            } else {
                self.relocate(t, target, live, shadow, old).await?;
            }
        }
        Ok(swap)
    }

    /// The swap of a move, under the tenant's locks, in steps each safe to stop after: the
    /// shadow's tables become the live database on `to` (a move killed here leaves that copy
    /// unused, and `--drop-old` clears it); the tenant's row names `to` (the moment the move
    /// takes effect: writers read the row after our locks, and one that read it before finds
    /// the old live database gone and gates its event again; killed here, the old copy stays
    /// until `--drop-old`); the domain generation moves on, so `tenancy serve` stops answering
    /// from resolutions that name the old server; the live tables on the old server go to
    /// `old` beside them.
    async fn relocate(
        &self,
        t: &TenantRef,
        to: &Server,
        live: &DatabaseName,
        shadow: &DatabaseName,
        old: &DatabaseName,
    ) -> anyhow::Result<()> {
        let from = &t.server;
        sqlx::query(&crate::store::schema::create_database(live, true))
            .execute(to.pool())
            .await?;
        // (The live name there is new and empty: only the shadow's tables move.)
        exchange(to.pool(), live, shadow, shadow).await?;
        crash_after(self.options.fail_after, FailPoint::Moved);
        if !self
            .tenants
            .relocate(&t.organisation_id, from.name(), to.name())
            .await?
        {
            anyhow::bail!(
                "tenant {} is no longer on server {}: not moved",
                t.organisation_id,
                from.name()
            );
        }
        crash_after(self.options.fail_after, FailPoint::Switched);
        let redis =
            crate::cache::Redis::connect(&self.config.redis_url, &self.config.namespace).await;
        if let Err(e) = match redis {
            Ok(r) => r.domains_changed(&[]).await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        } {
            tracing::warn!(tenant = %t.organisation_id, error = %e,
                "moved, but cannot move the domain generation on: `tenancy serve` may look for \
                 the tenant on its old server until its cached resolutions expire (300 s)");
        }
        // Only now: a request resolved before the generation moved on still finds the tables
        // it was sent to (the same rows: the tenant's writes are held).
        // (No shadow on the old server: only the live tables move, to `old`.)
        exchange(from.pool(), live, shadow, old).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {}", live.quoted()))
            .execute(from.pool())
            .await?;
        tracing::info!(tenant = %t.organisation_id, from = from.name(), to = to.name(),
            "tenant moved");
        Ok(())
    }

    /// The server other than `t`'s that holds `old`, if one does (the tenant was moved).
    async fn old_elsewhere(
        &self,
        t: &TenantRef,
        old: &DatabaseName,
    ) -> anyhow::Result<Option<String>> {
        for server in self.tenants.servers().all() {
            if *server != t.server && !tables(server.pool(), old).await?.is_empty() {
                return Ok(Some(server.name().to_owned()));
            }
        }
        Ok(None)
    }

    async fn pause_before_swap(&self) {
        if let Some(pause) = self.options.pause_before_swap {
            tracing::warn!(?pause, "--pause-before-swap: holding the tenant's writes");
            tokio::time::sleep(pause).await;
        }
    }

    /// Every active supplier's copy of brand `t`, rebuilt from `live` (what a grant's backfill
    /// does, one supplier at a time under the brand's lock, so the fan-out carries on from
    /// there). Returns how many copies were rebuilt.
    async fn refresh_supplier_copies(
        &self,
        t: &TenantRef,
        live: &DatabaseName,
    ) -> anyhow::Result<usize> {
        // The hooks carry a permission cache for other steps; this one writes no Redis key.
        let redis =
            crate::cache::Redis::connect(&self.config.redis_url, &self.config.namespace).await?;
        let hooks = crate::catalog::copies::CatalogHooks {
            ns: self.config.namespace.clone(),
            tenants: self.tenants.clone(),
            spec: self.spec.clone(),
            cache: crate::cache::permissions::PermissionCache::on(&redis),
        };
        let brand = crate::catalog::store::BrandSource {
            db: live,
            server: &t.server,
        };
        hooks.rebuild_brand_copies(&t.organisation_id, brand).await
    }

    /// Drops the tables an earlier rebuild replaced. Returns whether there were any.
    pub async fn drop_old(&self, t: &TenantRef) -> anyhow::Result<bool> {
        let (_, old) = self.beside(t)?;
        let claim = self.claim(t).await?;
        // On every server: after a move, the replaced tables are on the one it left. A move
        // killed after the tenant's row changed leaves the live database it moved away from
        // under its name there too: stale, the row names the other server; it goes as well.
        let live = t.database.clone();
        let mut stale_dropped = false;
        let dropped = async {
            let mut existed = false;
            for server in self.tenants.servers().all() {
                existed |= database_exists(server.pool(), &old).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {}", old.quoted()))
                    .execute(server.pool())
                    .await?;
                if let (Some(live), false) = (&live, *server == t.server) {
                    if database_exists(server.pool(), live).await? {
                        tracing::warn!(tenant = %t.organisation_id, database = %live,
                            server = server.name(), "dropping the copy a killed move left behind");
                        existed = true;
                        sqlx::query(&format!("DROP DATABASE IF EXISTS {}", live.quoted()))
                            .execute(server.pool())
                            .await?;
                        stale_dropped = true;
                    }
                }
            }
            kept::forget(&self.home, &self.config.namespace, &t.organisation_id).await?;
            Ok::<_, sqlx::Error>(existed)
        }
        .await;
        claim.release().await;
        if stale_dropped {
            // `tenancy serve` may still resolve the tenant to the server it left (the killed
            // move did not get to tell it).
            let redis =
                crate::cache::Redis::connect(&self.config.redis_url, &self.config.namespace)
                    .await?;
            redis.domains_changed(&[]).await?;
        }
        Ok(dropped?)
    }
}

/// A log whose start is gone, for the tests of the refusals that need one. The local broker
/// cannot delete records (its SQLite storage's DeleteRecords is `todo!()`), but librdkafka's
/// mock broker keeps at most 5 MiB a partition and drops the oldest messages beyond that, as
/// retention would.
#[cfg(test)]
pub(crate) mod mock_log {
    use std::time::Duration;

    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
    use rdkafka::ClientConfig;

    use crate::config::Config;
    use crate::tenant::Namespace;

    /// A mock cluster holding `topics` of 2 partitions each; `trimmed`'s partition 1 has lost
    /// its offsets 0 to 2 (it keeps 3 to 7) and its partition 0 holds one message; every
    /// other topic holds one message in each partition. Also a Config that reaches it.
    pub async fn with_trimmed(
        topics: &[&str],
        trimmed: &str,
    ) -> (MockCluster<'static, DefaultProducerContext>, Config) {
        let cluster = MockCluster::new(1).unwrap();
        for topic in topics {
            cluster.create_topic(topic, 2, 1).unwrap();
        }
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create()
            .unwrap();
        let send = async |topic: &str, partition: i32, payload: Vec<u8>| {
            producer
                .send(
                    FutureRecord::to(topic)
                        .partition(partition)
                        .key("k")
                        .payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        };
        for topic in topics.iter().filter(|t| **t != trimmed) {
            for p in 0..2 {
                send(topic, p, b"small".to_vec()).await;
            }
        }
        send(trimmed, 0, b"small".to_vec()).await;
        // One at a time, so each is a message set of its own: 8 x 900 KiB, of which the mock
        // keeps the last 5.
        for _ in 0..8 {
            send(trimmed, 1, vec![b'x'; 900 * 1024]).await;
        }
        let config = Config {
            kafka_bootstrap_servers: cluster.bootstrap_servers(),
            schema_registry_url: String::new(),
            database_url: String::new(),
            servers: Vec::new(),
            place_new_on: Vec::new(),
            regions: Vec::new(),
            redis_url: String::new(),
            namespace: Namespace::parse("mock").unwrap(),
            partitions: 2,
            kafka_options: Vec::new(),
        };
        (cluster, config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_log_whose_start_is_gone_is_refused_naming_the_partition_and_offsets() {
        let (_cluster, config) = mock_log::with_trimmed(&["whole", "trimmed"], "trimmed").await;
        refuse_unless_log_complete(&config, "whole").await.unwrap();
        let refused = refuse_unless_log_complete(&config, "trimmed")
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            refused,
            "trimmed no longer holds its whole history (partition 1 lost offsets 0..2): a \
             rebuild would miss those events"
        );
    }
}
