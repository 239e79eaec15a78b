//! The tenants table, `{ns}_platform.tenants`: one row per organisation, with its database and
//! lifecycle status, and the lifecycle log beside it. Every query names the platform database
//! explicitly.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{MySqlPool, Row};

use std::collections::{HashMap, HashSet};

use crate::store::servers::{Server, Servers};
use crate::tenant::{DatabaseName, Namespace, OrganisationType, ServiceDatabase, Slug};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Provisioning,
    Active,
    Archived,
    Purged,
    Failed,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Provisioning,
        Status::Active,
        Status::Archived,
        Status::Purged,
        Status::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Provisioning => "provisioning",
            Status::Active => "active",
            Status::Archived => "archived",
            Status::Purged => "purged",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // pad, not write_str: tables format it with a width.
        f.pad(self.as_str())
    }
}

/// What the lifecycle log records about an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logged {
    Created,
    Terminated,
    Restored,
    Purged,
    Refused,
}

impl Logged {
    pub fn as_str(self) -> &'static str {
        match self {
            Logged::Created => "created",
            Logged::Terminated => "terminated",
            Logged::Restored => "restored",
            Logged::Purged => "purged",
            Logged::Refused => "refused",
        }
    }
}

/// Who asked for a lifecycle step and why, as its event says, for the audit trail.
#[derive(Debug, Clone, Default)]
pub struct Audit<'a> {
    pub actor: Option<&'a str>,
    pub reason: Option<&'a str>,
    /// The event's own occurred_at, when it was not believed and the step was placed at the
    /// log's time instead ([`super::clock`]).
    pub claimed_at: Option<DateTime<Utc>>,
}

/// One line of the audit trail.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct LogEntry {
    pub event_id: String,
    pub kind: String,
    /// Where the step is placed in the tenant's lifecycle.
    pub occurred_at: DateTime<Utc>,
    pub actor: Option<String>,
    pub reason: Option<String>,
    /// The time the event claimed, when not believed.
    pub claimed_at: Option<DateTime<Utc>>,
    /// When the platform applied it (empty for steps applied before the audit trail).
    pub applied_at: Option<DateTime<Utc>>,
}

/// A lifecycle step under way, in `tenants.lifecycle_pending`: set when it starts, cleared when
/// it is done, so a crash half-way is finished by the redelivery of the same event, and readers
/// know the tenant is changing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    Terminate(String),
    Restore(String),
}

impl Pending {
    pub fn encode(&self) -> String {
        match self {
            Pending::Terminate(id) => format!("terminate:{id}"),
            Pending::Restore(id) => format!("restore:{id}"),
        }
    }

    pub fn decode(raw: &str) -> Option<Pending> {
        match raw.split_once(':')? {
            ("terminate", id) => Some(Pending::Terminate(id.to_owned())),
            ("restore", id) => Some(Pending::Restore(id.to_owned())),
            _ => None,
        }
    }
}
/// One row of the tenants table.
#[derive(Debug, Clone, Serialize)]
pub struct TenantRecord {
    pub organisation_id: String,
    pub organisation_type: OrganisationType,
    pub slug: String,
    pub name: String,
    pub database_name: Option<String>,
    pub status: Status,
    pub migration_version: Option<i64>,
    pub failure_reason: Option<String>,
    /// Why its database's last migration failed (its events wait until one succeeds:
    /// `tenancy migrate --retry`).
    pub migration_failure: Option<String>,
    pub created_at: DateTime<Utc>,
    pub provisioned_at: Option<DateTime<Utc>>,
    pub archived_at: Option<DateTime<Utc>>,
    pub purge_after: Option<DateTime<Utc>>,
    pub archive_database: Option<String>,
    pub terminated_by_event: Option<String>,
    pub termination_reason: Option<String>,
    pub restored_at: Option<DateTime<Utc>>,
    pub purged_at: Option<DateTime<Utc>>,
    /// A lifecycle step under way (see [`Pending`]).
    pub lifecycle_pending: Option<String>,
    /// occurred_at of the latest termination or restore applied.
    pub lifecycle_at: Option<DateTime<Utc>>,
    /// The MySQL server its database is on ([`crate::store::servers`]).
    pub server: String,
    /// The region its data must stay in (OrganisationCreated's `region`); None: any.
    pub region: Option<String>,
}

impl TenantRecord {
    pub fn pending(&self) -> Option<Pending> {
        self.lifecycle_pending.as_deref().and_then(Pending::decode)
    }
}

/// What the tenants table says about provisioning an organisation into a database.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The row is ours (new, or a retry of an unfinished/finished provisioning): go ahead,
    /// on this server.
    Proceed(Server),
    /// Refused, with the reason for TenantProvisioningFailed.
    Conflict(String),
    /// The organisation was terminated: a stale OrganisationCreated must not resurrect it.
    Terminated(Status),
}

/// A new organisation's first row ([`Tenants::insert_new`]).
pub struct NewTenant<'a> {
    pub organisation_id: &'a str,
    pub kind: OrganisationType,
    pub slug: &'a str,
    pub name: &'a str,
    pub database: &'a DatabaseName,
    pub occurred_at: DateTime<Utc>,
    /// Where it is placed ([`Servers::place_in`]).
    pub server: &'a str,
    /// The region its data must stay in, if it asked for one.
    pub region: Option<&'a str>,
}

/// What a projector needs to know about a tenant before writing to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRef {
    pub organisation_id: String,
    pub kind: OrganisationType,
    pub status: Status,
    /// Re-derived from the validated type and slug, never taken from the row as text.
    pub database: Option<DatabaseName>,
    /// The server its database, archive, shadow and old copy are on.
    pub server: Server,
    /// When it was archived (epoch ms; the OrganisationTerminated's occurred_at).
    pub archived_at: Option<i64>,
    /// Where its tables are while archived.
    pub archive_database: Option<DatabaseName>,
    /// Earlier archived periods `[terminated, restored)` in epoch ms: events that happened
    /// inside one were skipped live, so a replay skips them too.
    pub past_archives: Vec<(i64, i64)>,
    /// A termination or restore is under way: events for it wait until it is done.
    pub changing: bool,
    /// The migration version its database is at (None: never recorded), and whether its last
    /// migration failed: `tenancy::verdict` holds its events while it is behind what this
    /// binary writes for (`tenancy::rollout` brings it up).
    pub migration_version: Option<i64>,
    pub migration_failed: bool,
    /// The region its data must stay in; None: any server.
    pub region: Option<String>,
}

impl TenantRef {
    /// Whether `occurred_at` falls in an earlier archived period.
    pub fn was_archived_at(&self, occurred_at: i64) -> bool {
        self.past_archives
            .iter()
            .any(|(from, to)| (*from..*to).contains(&occurred_at))
    }

    /// The same tenant, addressed at its archive: events that happened before the termination
    /// still belong in its data (a replay may deliver them after the termination).
    pub fn at_archive(&self) -> Option<TenantRef> {
        Some(TenantRef {
            database: Some(self.archive_database.clone()?),
            ..self.clone()
        })
    }
}

/// The tenants table of one namespace.
#[derive(Clone)]
pub struct Tenants {
    /// The home server's pool: the tenants table is in `{ns}_platform`.
    pool: MySqlPool,
    servers: Servers,
    ns: Namespace,
    table: String,
}

const COLUMNS: &str = "organisation_id, CAST(organisation_type AS CHAR) AS organisation_type, slug, \
    name, database_name, CAST(status AS CHAR) AS status, migration_version, failure_reason, migration_failure, created_at, \
    provisioned_at, archived_at, purge_after, archive_database, terminated_by_event, \
    termination_reason, restored_at, purged_at, lifecycle_pending, lifecycle_at, server, region";

impl Tenants {
    /// The tenants of `ns`, each reached on its own server of `servers`.
    pub fn on(servers: Servers, ns: &Namespace) -> Self {
        Tenants {
            pool: servers.home().pool().clone(),
            servers,
            ns: ns.clone(),
            table: format!(
                "{}.tenants",
                ns.service_database(ServiceDatabase::Platform).quoted()
            ),
        }
    }

    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    pub fn servers(&self) -> &Servers {
        &self.servers
    }

    /// The server of a row's `server` column.
    pub fn server_of(&self, record: &TenantRecord) -> Result<&Server, sqlx::Error> {
        self.servers.get(&record.server)
    }

    /// Decides, under row locks, whether `organisation_id` may be provisioned into `db`, and if
    /// so marks it `provisioning` (or keeps it `active`). A new organisation that must stay in
    /// `region` is refused when no server of that region takes new tenants.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim(
        &self,
        organisation_id: &str,
        kind: OrganisationType,
        slug: &str,
        name: &str,
        db: &DatabaseName,
        occurred_at: DateTime<Utc>,
        region: Option<&str>,
    ) -> Result<Claim, sqlx::Error> {
        // The common case, a new organisation into a name nobody holds, is one INSERT: it takes
        // no gap locks. The locking read below takes next-key locks on both indexes even where
        // no row matches, and two claims of neighbouring new rows then deadlocked on each
        // other's gaps (12 per 300 tenants provisioned 4 at a time, each a retry 100 ms later
        // and a step towards the dead-letter topic). Anything the INSERT finds taken (the
        // organisation's own row, or the name under another) is decided under the locks.
        // (The schema catalog is not transactional: read once, its answer serves both paths.)
        // A new organisation goes where placement says; one that has a row stays where it is
        // (read under the row lock below).
        let placed = self.servers.place_in(organisation_id, region);
        let exists = match placed {
            Ok(placed) => crate::store::schema::database_exists(placed.pool(), db).await?,
            Err(_) => false,
        };
        if let (Ok(placed), false) = (&placed, exists) {
            let inserted = self
                .insert_provisioning(
                    &self.pool,
                    organisation_id,
                    kind,
                    slug,
                    name,
                    db,
                    occurred_at,
                    placed.name(),
                    region,
                )
                .await;
            match inserted {
                Ok(()) => return Ok(Claim::Proceed((*placed).clone())),
                Err(e)
                    if e.as_database_error()
                        .is_some_and(|d| d.is_unique_violation()) => {}
                Err(e) => return Err(e),
            }
        }
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT organisation_id, database_name, status, server FROM {} \
             WHERE organisation_id = ? OR database_name = ? FOR UPDATE",
            self.table
        ))
        .bind(organisation_id)
        .bind(db.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let mut own: Option<(Option<String>, Status)> = None;
        let mut own_server: Option<Server> = None;
        for row in &rows {
            let org: String = row.try_get("organisation_id")?;
            let database: Option<String> = row.try_get("database_name")?;
            let status = Status::parse(row.try_get("status")?).unwrap_or(Status::Failed);
            if org != organisation_id {
                return Ok(Claim::Conflict(format!(
                    "database {db} already belongs to organisation {org}"
                )));
            }
            own = Some((database, status));
            own_server = Some(self.servers.get(row.try_get("server")?)?.clone());
        }
        let claim = match own {
            Some((_, status @ (Status::Archived | Status::Purged))) => Claim::Terminated(status),
            Some((Some(existing), _)) if existing != db.as_str() => Claim::Conflict(format!(
                "organisation {organisation_id} is already provisioned as {existing}"
            )),
            Some(_) => {
                sqlx::query(&format!(
                    "UPDATE {} SET database_name = ?, failure_reason = NULL, \
                     status = IF(status = 'active', 'active', 'provisioning') \
                     WHERE organisation_id = ?",
                    self.table
                ))
                .bind(db.as_str())
                .bind(organisation_id)
                .execute(&mut *tx)
                .await?;
                Claim::Proceed(own_server.expect("its own row was read"))
            }
            None => match placed {
                // Its data must stay in a region where no server takes new tenants.
                Err(why) => Claim::Conflict(why),
                // Never adopt a database nobody registered: it may hold someone's data.
                Ok(_) if exists => Claim::Conflict(format!(
                    "database {db} exists but is not registered to any organisation; \
                     refusing to adopt it"
                )),
                Ok(placed) => {
                    self.insert_provisioning(
                        &mut *tx,
                        organisation_id,
                        kind,
                        slug,
                        name,
                        db,
                        occurred_at,
                        placed.name(),
                        region,
                    )
                    .await?;
                    Claim::Proceed(placed.clone())
                }
            },
        };
        tx.commit().await?;
        Ok(claim)
    }

    /// The tenant's first row, `provisioning` into `db`.
    #[allow(clippy::too_many_arguments)]
    async fn insert_provisioning<'e>(
        &self,
        on: impl sqlx::MySqlExecutor<'e>,
        organisation_id: &str,
        kind: OrganisationType,
        slug: &str,
        name: &str,
        db: &DatabaseName,
        occurred_at: DateTime<Utc>,
        server: &str,
        region: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT INTO {} (organisation_id, organisation_type, slug, name, \
             database_name, status, created_at, server, region) \
             VALUES (?, ?, ?, ?, ?, 'provisioning', ?, ?, ?)",
            self.table
        ))
        .bind(organisation_id)
        .bind(kind.symbol())
        .bind(slug)
        .bind(name)
        .bind(db.as_str())
        .bind(occurred_at)
        .bind(server)
        .bind(region)
        .execute(on)
        .await?;
        Ok(())
    }

    /// Among `organisation_ids` and `dbs`: the organisations that have a row, and the
    /// databases some row names (whoever owns it).
    pub async fn rows_naming(
        &self,
        organisation_ids: &[&str],
        dbs: &[&DatabaseName],
    ) -> Result<(HashSet<String>, HashSet<String>), sqlx::Error> {
        // Chunked together: callers pass one database per organisation, in the same order.
        assert_eq!(
            organisation_ids.len(),
            dbs.len(),
            "one database per organisation"
        );
        let (mut orgs, mut names) = (HashSet::new(), HashSet::new());
        for (ids, dbs) in organisation_ids.chunks(500).zip(dbs.chunks(500)) {
            let sql = format!(
                "SELECT organisation_id, database_name FROM {} \
                 WHERE organisation_id IN ({}) OR database_name IN ({})",
                self.table,
                crate::store::schema::placeholders(ids.len()),
                crate::store::schema::placeholders(dbs.len())
            );
            let mut query = sqlx::query_as::<_, (String, Option<String>)>(&sql);
            for id in ids {
                query = query.bind(*id);
            }
            for db in dbs {
                query = query.bind(db.as_str());
            }
            for (org, db) in query.fetch_all(&self.pool).await? {
                orgs.insert(org);
                names.extend(db);
            }
        }
        Ok((orgs, names))
    }

    /// First rows, `provisioning`, for many organisations in one statement, for a caller that
    /// holds their lifecycle locks and found no row for them nor for their databases. A row
    /// whose database another organisation took meanwhile is not inserted (a name is unique);
    /// returns the organisations that got their row. Any other error inserts none of them.
    pub async fn insert_new(&self, rows: &[NewTenant<'_>]) -> Result<HashSet<String>, sqlx::Error> {
        let mut inserted = HashSet::new();
        for chunk in rows.chunks(200) {
            // Not INSERT IGNORE: that would also turn a name too long for its column into a
            // truncated one. A duplicate key changes nothing; any other error fails the whole.
            let sql = format!(
                "INSERT INTO {} (organisation_id, organisation_type, slug, name, \
                 database_name, status, created_at, server, region) VALUES {} \
                 ON DUPLICATE KEY UPDATE organisation_id = organisation_id",
                self.table,
                vec!["(?, ?, ?, ?, ?, 'provisioning', ?, ?, ?)"; chunk.len()].join(", ")
            );
            let mut query = sqlx::query(&sql);
            for r in chunk {
                query = query
                    .bind(r.organisation_id)
                    .bind(r.kind.symbol())
                    .bind(r.slug)
                    .bind(r.name)
                    .bind(r.database.as_str())
                    .bind(r.occurred_at)
                    .bind(r.server)
                    .bind(r.region);
            }
            query.execute(&self.pool).await?;
            let ids: Vec<&str> = chunk.iter().map(|r| r.organisation_id).collect();
            let sql = format!(
                "SELECT organisation_id FROM {} WHERE organisation_id IN ({})",
                self.table,
                crate::store::schema::placeholders(ids.len())
            );
            let mut query = sqlx::query_scalar::<_, String>(&sql);
            for id in &ids {
                query = query.bind(*id);
            }
            inserted.extend(query.fetch_all(&self.pool).await?);
        }
        Ok(inserted)
    }

    /// [`Tenants::activate`] for many tenants at one `version`, in one statement.
    pub async fn activate_all(
        &self,
        organisation_ids: &[&str],
        version: i64,
    ) -> Result<(), sqlx::Error> {
        for chunk in organisation_ids.chunks(500) {
            let sql = format!(
                "UPDATE {} SET status = 'active', migration_version = ?, \
                 provisioned_at = COALESCE(provisioned_at, UTC_TIMESTAMP(3)) \
                 WHERE organisation_id IN ({}) AND status IN ('provisioning', 'active')",
                self.table,
                crate::store::schema::placeholders(chunk.len())
            );
            let mut query = sqlx::query(&sql).bind(version);
            for id in chunk {
                query = query.bind(*id);
            }
            query.execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Marks a claimed tenant active at `version`. Only a `provisioning` or `active` row moves:
    /// a termination processed meanwhile wins.
    pub async fn activate(&self, organisation_id: &str, version: i64) -> Result<(), sqlx::Error> {
        self.activate_all(&[organisation_id], version).await
    }

    /// Records a refused provisioning. A row that already exists keeps its status (a duplicate
    /// or conflicting OrganisationCreated must not break a live tenant); only a `failed` row
    /// gets the new reason.
    pub async fn record_failure(
        &self,
        organisation_id: &str,
        kind: OrganisationType,
        slug: &str,
        name: &str,
        reason: &str,
        occurred_at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT INTO {} (organisation_id, organisation_type, slug, name, database_name, \
             status, failure_reason, created_at) VALUES (?, ?, ?, ?, NULL, 'failed', ?, ?) \
             ON DUPLICATE KEY UPDATE failure_reason = IF(status = 'failed', VALUES(failure_reason), failure_reason)",
            self.table
        ))
        .bind(organisation_id)
        .bind(kind.symbol())
        .bind(slug)
        .bind(name)
        .bind(reason)
        .bind(occurred_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn list(&self, status: Option<Status>) -> Result<Vec<TenantRecord>, sqlx::Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE (? IS NULL OR status = ?) \
             ORDER BY organisation_type, slug, organisation_id",
            self.table
        );
        let status = status.map(Status::as_str);
        let rows = sqlx::query(&sql)
            .bind(status)
            .bind(status)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(record).collect()
    }

    /// By organisation id, or by slug (several types may share a slug: all are returned).
    pub async fn find(&self, id_or_slug: &str) -> Result<Vec<TenantRecord>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM {} WHERE organisation_id = ? OR slug = ? \
             ORDER BY organisation_type",
            self.table
        ))
        .bind(id_or_slug)
        .bind(id_or_slug)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record).collect()
    }

    /// What projectors need to know about `ids` (unknown ids are absent from the map).
    pub async fn lookup(&self, ids: &[&str]) -> Result<HashMap<String, TenantRef>, sqlx::Error> {
        let mut found = HashMap::new();
        for chunk in ids.chunks(500) {
            let placeholders = crate::store::schema::placeholders(chunk.len());
            let sql = format!(
                "SELECT organisation_id, CAST(organisation_type AS CHAR) AS organisation_type, slug, \
                 CAST(status AS CHAR) AS status, database_name, archived_at, lifecycle_pending, server, \
                 migration_version, migration_failure, region \
                 FROM {} WHERE organisation_id IN ({placeholders})",
                self.table
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(*id);
            }
            for row in query.fetch_all(&self.pool).await? {
                let id: String = row.try_get("organisation_id")?;
                let kind_text: String = row.try_get("organisation_type")?;
                let Ok(kind) = OrganisationType::parse(&kind_text) else {
                    continue;
                };
                let status = Status::parse(row.try_get("status")?).unwrap_or(Status::Failed);
                let stored: Option<String> = row.try_get("database_name")?;
                let slug: String = row.try_get("slug")?;
                let database = Slug::parse(&slug)
                    .ok()
                    .and_then(|s| self.ns.tenant_database(kind, &s).ok())
                    .filter(|db| stored.as_deref() == Some(db.as_str()));
                let archived_at: Option<DateTime<Utc>> = row.try_get("archived_at")?;
                let pending: Option<String> = row.try_get("lifecycle_pending")?;
                // Never an error for a server this process was not given: an archived tenant
                // there is skipped without it, an active one is parked by the loop.
                let server = self.servers.named(row.try_get("server")?);
                let failure: Option<String> = row.try_get("migration_failure")?;
                found.insert(
                    id.clone(),
                    TenantRef {
                        archive_database: self.ns.archive_database(&id),
                        organisation_id: id,
                        kind,
                        status,
                        database,
                        server,
                        archived_at: archived_at.map(|t| t.timestamp_millis()),
                        past_archives: Vec::new(),
                        changing: pending.is_some(),
                        migration_version: row.try_get("migration_version")?,
                        migration_failed: failure.is_some(),
                        region: row.try_get("region")?,
                    },
                );
            }
            // Terminations followed by restores, in event time; events stamped in the same
            // millisecond in the order they were applied (`seq`, platform migration 0011).
            let sql = format!(
                "SELECT organisation_id, kind, occurred_at FROM {} WHERE organisation_id IN ({placeholders}) \
                 AND kind IN ('terminated', 'restored') ORDER BY organisation_id, occurred_at, seq",
                self.log_table()
            );
            let mut query = sqlx::query_as::<_, (String, String, DateTime<Utc>)>(&sql);
            for id in chunk {
                query = query.bind(*id);
            }
            let mut open: HashMap<String, i64> = HashMap::new();
            for (id, kind, at) in query.fetch_all(&self.pool).await? {
                let at = at.timestamp_millis();
                if kind == "terminated" {
                    open.insert(id, at);
                } else if let (Some(from), Some(t)) = (open.remove(&id), found.get_mut(&id)) {
                    t.past_archives.push((from, at));
                }
            }
        }
        Ok(found)
    }

    /// The exact row of one organisation.
    pub async fn get(&self, organisation_id: &str) -> Result<Option<TenantRecord>, sqlx::Error> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM {} WHERE organisation_id = ?",
            self.table
        ))
        .bind(organisation_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record).transpose()
    }

    fn log_table(&self) -> String {
        format!(
            "{}.lifecycle_log",
            self.ns.service_database(ServiceDatabase::Platform).quoted()
        )
    }

    /// Whether a lifecycle event (terminate/restore/purge) was already applied.
    pub async fn logged(&self, event_id: &str) -> Result<bool, sqlx::Error> {
        Ok(!self.logged_among(&[event_id]).await?.is_empty())
    }

    /// Which of `event_ids` the lifecycle log holds.
    pub async fn logged_among(&self, event_ids: &[&str]) -> Result<HashSet<String>, sqlx::Error> {
        let mut found = HashSet::new();
        for chunk in event_ids.chunks(500) {
            let sql = format!(
                "SELECT event_id FROM {} WHERE event_id IN ({})",
                self.log_table(),
                crate::store::schema::placeholders(chunk.len())
            );
            let mut query = sqlx::query_scalar::<_, String>(&sql);
            for id in chunk {
                query = query.bind(*id);
            }
            found.extend(query.fetch_all(&self.pool).await?);
        }
        Ok(found)
    }

    /// [`Tenants::log`] for many events of one kind without an actor or reason (creations),
    /// in one statement per 500: `(event_id, organisation_id, occurred_at)`.
    pub async fn log_all(
        &self,
        entries: &[(&str, &str, DateTime<Utc>)],
        kind: Logged,
    ) -> Result<(), sqlx::Error> {
        for chunk in entries.chunks(500) {
            let sql = format!(
                "INSERT IGNORE INTO {} (event_id, organisation_id, kind, outcome, occurred_at, \
                 applied_at) VALUES {}",
                self.log_table(),
                vec!["(?, ?, ?, ?, ?, UTC_TIMESTAMP(3))"; chunk.len()].join(", ")
            );
            let mut query = sqlx::query(&sql);
            for (event_id, org, at) in chunk {
                query = query
                    .bind(*event_id)
                    .bind(*org)
                    .bind(kind.as_str())
                    .bind(kind.as_str())
                    .bind(*at);
            }
            query.execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Records that a lifecycle event was applied (or refused), placed at `occurred_at` (as
    /// [`super::clock`] places it), with who asked for it and why: the audit trail, which stays
    /// after the purge.
    pub async fn log(
        &self,
        event_id: &str,
        organisation_id: &str,
        kind: Logged,
        occurred_at: DateTime<Utc>,
        audit: &Audit<'_>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT IGNORE INTO {} (event_id, organisation_id, kind, outcome, occurred_at, actor, \
             reason, claimed_at, applied_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, UTC_TIMESTAMP(3))",
            self.log_table()
        ))
        .bind(event_id)
        .bind(organisation_id)
        .bind(kind.as_str())
        .bind(kind.as_str())
        .bind(occurred_at)
        .bind(audit.actor)
        .bind(audit.reason)
        .bind(audit.claimed_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// An organisation's lifecycle log in the order it was applied: the audit trail.
    pub async fn history(&self, organisation_id: &str) -> Result<Vec<LogEntry>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT event_id, kind, occurred_at, actor, reason, claimed_at, applied_at FROM {} \
             WHERE organisation_id = ? ORDER BY seq",
            self.log_table()
        ))
        .bind(organisation_id)
        .fetch_all(&self.pool)
        .await
    }

    /// `archived`, for the termination `event_id`, with the termination marked under way.
    /// Leaves a row archived by another termination alone (returns false).
    #[allow(clippy::too_many_arguments)]
    pub async fn mark_archived(
        &self,
        organisation_id: &str,
        event_id: &str,
        archive: &DatabaseName,
        archived_at: DateTime<Utc>,
        purge_after: DateTime<Utc>,
        reason: &str,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(&format!(
            "UPDATE {} SET status = 'archived', archive_database = ?, terminated_by_event = ?, \
             termination_reason = ?, archived_at = ?, purge_after = ?, lifecycle_pending = ?, \
             lifecycle_at = ? \
             WHERE organisation_id = ? AND (status IN ('active', 'provisioning') \
             OR (status = 'archived' AND terminated_by_event = ?))",
            self.table
        ))
        .bind(archive.as_str())
        .bind(event_id)
        .bind(reason)
        .bind(archived_at)
        .bind(purge_after)
        .bind(Pending::Terminate(event_id.to_owned()).encode())
        .bind(archived_at)
        .bind(organisation_id)
        .bind(event_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0
            || self.get(organisation_id).await?.is_some_and(|r| {
                r.status == Status::Archived && r.terminated_by_event.as_deref() == Some(event_id)
            }))
    }

    /// Claims an archived tenant for the restore `event_id` (occurred at `at`). False if it
    /// is not archived or another step is under way: a purge marks the row `purged` first, so
    /// a restore and a purge of one archive never both proceed.
    pub async fn claim_restore(
        &self,
        organisation_id: &str,
        event_id: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, sqlx::Error> {
        let pending = Pending::Restore(event_id.to_owned()).encode();
        let done = sqlx::query(&format!(
            "UPDATE {} SET lifecycle_pending = ?, lifecycle_at = ? \
             WHERE organisation_id = ? AND status = 'archived' \
             AND (lifecycle_pending IS NULL OR lifecycle_pending = ?)",
            self.table
        ))
        .bind(&pending)
        .bind(at)
        .bind(organisation_id)
        .bind(&pending)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Back to `active` after a restore (the step stays marked until [`Tenants::settle`]).
    pub async fn mark_restored(
        &self,
        organisation_id: &str,
        restored_at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "UPDATE {} SET status = 'active', purge_after = NULL, archived_at = NULL, restored_at = ? \
             WHERE organisation_id = ? AND status = 'archived'",
            self.table
        ))
        .bind(restored_at)
        .bind(organisation_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The lifecycle step `pending` is done.
    pub async fn settle(
        &self,
        organisation_id: &str,
        pending: &Pending,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "UPDATE {} SET lifecycle_pending = NULL WHERE organisation_id = ? AND lifecycle_pending = ?",
            self.table
        ))
        .bind(organisation_id)
        .bind(pending.encode())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The purge is complete: the row lets go of its database name (keeping its slug, name,
    /// type and timestamps for the audit trail), so a new organisation may take the slug.
    /// Last of the purge's steps: a row still naming its database is a purge to finish.
    pub async fn release_name(&self, organisation_id: &str) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "UPDATE {} SET database_name = NULL, archive_database = NULL \
             WHERE organisation_id = ? AND status = 'purged'",
            self.table
        ))
        .bind(organisation_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// `purged`, only if still archived by `terminated_by_event` and no restore is under way.
    pub async fn mark_purged(
        &self,
        organisation_id: &str,
        terminated_by_event: &str,
        purged_at: DateTime<Utc>,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(&format!(
            "UPDATE {} SET status = 'purged', purged_at = ? \
             WHERE organisation_id = ? AND status = 'archived' AND terminated_by_event = ? \
             AND lifecycle_pending IS NULL",
            self.table
        ))
        .bind(purged_at)
        .bind(organisation_id)
        .bind(terminated_by_event)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Archived tenants whose grace period ended by `now`.
    pub async fn purge_due(&self, now: DateTime<Utc>) -> Result<Vec<TenantRecord>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM {} WHERE status = 'archived' AND purge_after <= ? ORDER BY purge_after",
            self.table
        ))
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record).collect()
    }

    /// Tenants with a lifecycle step marked under way, oldest event first. A step stays
    /// marked when it was dead-lettered after its retries: `tenancy status` shows them.
    pub async fn under_way(&self) -> Result<Vec<TenantRecord>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM {} WHERE lifecycle_pending IS NOT NULL ORDER BY lifecycle_at",
            self.table
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record).collect()
    }

    /// Points `organisation_id`'s row at server `to`, if it names `from`: the moment a move
    /// (`tenancy rebuild --to-server`) takes effect. Whether it did.
    pub async fn relocate(
        &self,
        organisation_id: &str,
        from: &str,
        to: &str,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(&format!(
            "UPDATE {} SET server = ? WHERE organisation_id = ? AND server = ?",
            self.table
        ))
        .bind(to)
        .bind(organisation_id)
        .bind(from)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A tenant's database is at `version`: its events may apply again.
    pub async fn record_migrated(
        &self,
        organisation_id: &str,
        version: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "UPDATE {} SET migration_version = ?, migration_failure = NULL, \
             migration_failed_at = NULL WHERE organisation_id = ?",
            self.table
        ))
        .bind(version)
        .bind(organisation_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A tenant's migration failed with `reason`: its events wait, the rollout passes it by.
    pub async fn record_migration_failure(
        &self,
        organisation_id: &str,
        reason: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "UPDATE {} SET migration_failure = ?, migration_failed_at = NOW(3) \
             WHERE organisation_id = ?",
            self.table
        ))
        .bind(reason)
        .bind(organisation_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Tenants not purged, per server.
    pub async fn per_server(&self) -> Result<HashMap<String, i64>, sqlx::Error> {
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT server, COUNT(*) FROM {} WHERE status <> 'purged' GROUP BY server",
            self.table
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Tenant counts per status.
    pub async fn counts(&self) -> Result<Vec<(String, i64)>, sqlx::Error> {
        sqlx::query_as(&format!(
            "SELECT CAST(status AS CHAR), COUNT(*) FROM {} GROUP BY status ORDER BY status",
            self.table
        ))
        .fetch_all(&self.pool)
        .await
    }
}

fn record(row: &sqlx::mysql::MySqlRow) -> Result<TenantRecord, sqlx::Error> {
    let decode = |column: &str, e: String| sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: e.into(),
    };
    let kind: String = row.try_get("organisation_type")?;
    let status: String = row.try_get("status")?;
    Ok(TenantRecord {
        organisation_id: row.try_get("organisation_id")?,
        organisation_type: OrganisationType::parse(&kind)
            .map_err(|e| decode("organisation_type", e.to_string()))?,
        slug: row.try_get("slug")?,
        name: row.try_get("name")?,
        database_name: row.try_get("database_name")?,
        status: Status::parse(&status)
            .ok_or_else(|| decode("status", format!("unknown status {status:?}")))?,
        migration_version: row.try_get("migration_version")?,
        failure_reason: row.try_get("failure_reason")?,
        migration_failure: row.try_get("migration_failure")?,
        created_at: row.try_get("created_at")?,
        provisioned_at: row.try_get("provisioned_at")?,
        archived_at: row.try_get("archived_at")?,
        purge_after: row.try_get("purge_after")?,
        archive_database: row.try_get("archive_database")?,
        terminated_by_event: row.try_get("terminated_by_event")?,
        termination_reason: row.try_get("termination_reason")?,
        restored_at: row.try_get("restored_at")?,
        purged_at: row.try_get("purged_at")?,
        lifecycle_pending: row.try_get("lifecycle_pending")?,
        lifecycle_at: row.try_get("lifecycle_at")?,
        server: row.try_get("server")?,
        region: row.try_get("region")?,
    })
}
