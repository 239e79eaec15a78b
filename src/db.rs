//! MySQL plumbing shared by every processor: the pools' settings (one pool per server, see
//! [`crate::servers`]), and named locks.
//!
//! A pool has no default database: every query names its database explicitly, so a pooled
//! connection can never carry one tenant's `USE` (or a prepared statement cached under it) into
//! another tenant's query. Named locks are always taken on the home server's pool, whichever
//! server the tenant they guard is on: a lock is only a lock among holders on one server.

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::MySqlConnectOptions;
use sqlx::pool::PoolConnection;
use sqlx::ConnectOptions;
use sqlx::{MySql, MySqlPool, Row};

use crate::config::Config;
use crate::servers::Servers;
use crate::stream::StepError;
use crate::tenant::{DatabaseName, Namespace};

/// One pool per MySQL server.
pub async fn connect_pool(config: &Config) -> anyhow::Result<MySqlPool> {
    connect_pool_sized(config, 10).await
}

/// [`connect_pool`] with at most `connections` connections.
pub async fn connect_pool_sized(config: &Config, connections: u32) -> anyhow::Result<MySqlPool> {
    pool_options(connections)
        .connect(&config.database_url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to MySQL at {}: {e}", config.database_url))
}

/// Limits every statement of a processor's connections runs under, so a lock someone else
/// holds, or a statement that runs away, becomes an error about one tenant within seconds
/// instead of a connection that waits for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatementLimits {
    /// Longest a statement may run: MariaDB's `max_statement_time` (every statement), MySQL's
    /// `max_execution_time` (which bounds SELECTs only; writes there are bounded by the lock
    /// waits below and the stream's attempt timeout).
    pub statement: Duration,
    /// Longest a statement waits for a row lock (`innodb_lock_wait_timeout`) or a table's
    /// metadata lock (`lock_wait_timeout`, e.g. behind `LOCK TABLES`).
    pub lock_wait: Duration,
}

impl Default for StatementLimits {
    fn default() -> Self {
        StatementLimits {
            statement: Duration::from_secs(30),
            lock_wait: Duration::from_secs(5),
        }
    }
}

/// The MySQL flavour a server speaks, where their SQL differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    MariaDb,
    MySql,
}

impl Flavour {
    /// From `SELECT VERSION()` (MariaDB's contains `MariaDB`).
    pub fn of_version(version: &str) -> Flavour {
        if version.to_ascii_lowercase().contains("mariadb") {
            Flavour::MariaDb
        } else {
            Flavour::MySql
        }
    }

    /// The `SET SESSION` statement that puts `limits` on a connection.
    pub fn limits_statement(self, limits: &StatementLimits) -> String {
        let lock = limits.lock_wait.as_secs().max(1);
        let time_limit = match self {
            Flavour::MariaDb => format!(
                "max_statement_time = {}",
                limits.statement.as_secs_f64().max(0.001)
            ),
            Flavour::MySql => format!(
                "max_execution_time = {}",
                limits.statement.as_millis().max(1)
            ),
        };
        format!(
            "SET SESSION {time_limit}, innodb_lock_wait_timeout = {lock}, lock_wait_timeout = {lock}"
        )
    }
}

/// [`pool_options`] whose connections run under `limits`. The server's flavour is asked once
/// per pool, on its first connection.
pub fn bounded_pool_options(
    connections: u32,
    limits: StatementLimits,
) -> sqlx::mysql::MySqlPoolOptions {
    let flavour: std::sync::Arc<std::sync::OnceLock<Flavour>> = Default::default();
    pool_options(connections).after_connect(move |conn, _meta| {
        let flavour = flavour.clone();
        Box::pin(async move {
            let f = match flavour.get() {
                Some(f) => *f,
                None => {
                    let version: String = sqlx::query_scalar("SELECT VERSION()")
                        .fetch_one(&mut *conn)
                        .await?;
                    *flavour.get_or_init(|| Flavour::of_version(&version))
                }
            };
            sqlx::query(&f.limits_statement(&limits))
                .execute(&mut *conn)
                .await?;
            Ok(())
        })
    })
}

/// The shared pools' settings (one pool per server, [`crate::servers::Servers`]).
pub fn pool_options(connections: u32) -> sqlx::mysql::MySqlPoolOptions {
    sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(connections.max(2))
        .acquire_timeout(Duration::from_secs(30))
        // No ping before every acquire: it was a round trip per statement (twelve per tenant
        // provisioned). A connection the server dropped fails its next statement with an I/O
        // error instead, which every caller already treats as an outage to retry, and sqlx
        // discards the broken connection.
        .test_before_acquire(false)
}

/// Connections that create and migrate new tenant databases, and do nothing else. A migration
/// file names no database, so their scripts start with `USE` of the database they build: they
/// are kept apart from the shared pool, whose connections never `USE` one, and run as text
/// (no prepared statement to outlive the `USE`). Reusing them spares each new tenant a
/// connection of its own (handshake, session set-up, quit). Opened on first use: only the
/// provisioner needs them.
pub fn ddl_pool(config: &Config, connections: u32) -> anyhow::Result<MySqlPool> {
    let options = MySqlConnectOptions::from_str(&config.database_url)
        .map_err(|e| anyhow::anyhow!("bad DATABASE_URL {}: {e}", config.database_url))?;
    Ok(ddl_pool_with(options, connections))
}

/// [`ddl_pool`] for every server.
pub fn ddl_pools(config: &Config, connections: u32) -> anyhow::Result<Servers> {
    Servers::lazy(config, |options| ddl_pool_with(options, connections))
}

fn ddl_pool_with(options: MySqlConnectOptions, connections: u32) -> MySqlPool {
    sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(connections.max(1))
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(30))
        .test_before_acquire(false)
        .connect_lazy_with(options.disable_statement_logging())
}

/// A MySQL named lock (`GET_LOCK`), held on its own pooled connection.
///
/// Locks serialise work on one tenant across every worker: named locks belong to the server,
/// not to a process, and a killed worker's connection closes and releases them at once.
pub struct NamedLock {
    /// `None` once released.
    conn: Option<PoolConnection<MySql>>,
    /// Every lock held on `conn` (a server holds several per connection).
    names: Vec<String>,
}

/// How long to wait for a named lock before reporting the event as worth retrying (within the
/// statement limit of a processor's connections, so the lock's own answer comes first).
const LOCK_WAIT_SECS: u32 = 20;

impl NamedLock {
    /// Serialises the catalog fan-out, grants and the purge of one brand's copies.
    pub async fn brand(
        pool: &MySqlPool,
        ns: &Namespace,
        brand_id: &str,
    ) -> Result<NamedLock, StepError> {
        Self::acquire(pool, Self::brand_name(ns, brand_id)).await
    }

    /// A tenant's own writes, for the writers no other lock covers: the access projector
    /// (after the brand's lock) for a supplier's database, the domains processor for a
    /// retailer's. `tenancy rebuild` holds it, with the rest, to fence the tenant for its swap.
    pub async fn writes(
        pool: &MySqlPool,
        ns: &Namespace,
        organisation_id: &str,
    ) -> Result<NamedLock, StepError> {
        Self::acquire(pool, Self::writes_name(ns, organisation_id)).await
    }

    pub fn brand_name(ns: &Namespace, brand_id: &str) -> String {
        format!("{ns}:b:{}", compact(brand_id))
    }

    pub fn writes_name(ns: &Namespace, organisation_id: &str) -> String {
        format!("{ns}:w:{}", compact(organisation_id))
    }

    /// Several locks on one connection, taken in the order given (callers sort them the way
    /// every other holder takes them). Released together.
    pub async fn all(pool: &MySqlPool, names: Vec<String>) -> Result<NamedLock, StepError> {
        let mut lock = NamedLock {
            conn: Some(pool.acquire().await?),
            names: Vec::with_capacity(names.len()),
        };
        for name in names {
            let conn = lock.conn.as_mut().expect("held");
            if !Self::get(conn, &name).await? {
                // Dropping `lock` closes its connection, which frees what it took so far.
                return Err(Self::waited(&name));
            }
            lock.names.push(name);
        }
        Ok(lock)
    }

    /// Serialises the lifecycle steps (create, terminate, restore, purge) of one organisation.
    pub async fn lifecycle(
        pool: &MySqlPool,
        ns: &Namespace,
        organisation_id: &str,
    ) -> Result<NamedLock, StepError> {
        Self::acquire(pool, format!("{ns}:l:{}", compact(organisation_id))).await
    }

    /// The lifecycle locks of many organisations, each taken only if free at once, in one
    /// statement on one connection: returns the lock and which of `organisation_ids` it holds.
    /// Never waiting means two holders of overlapping sets cannot deadlock; an organisation
    /// whose lock is busy is left to the caller's ordinary, waiting path.
    pub async fn lifecycles_if_free(
        pool: &MySqlPool,
        ns: &Namespace,
        organisation_ids: &[&str],
    ) -> Result<(NamedLock, Vec<bool>), sqlx::Error> {
        let names: Vec<String> = organisation_ids
            .iter()
            .map(|id| format!("{ns}:l:{}", compact(id)))
            .collect();
        let mut lock = NamedLock {
            conn: Some(pool.acquire().await?),
            names: Vec::new(),
        };
        let mut held = Vec::with_capacity(names.len());
        for chunk in names.chunks(500) {
            let sql = format!("SELECT {}", vec!["GET_LOCK(?, 0)"; chunk.len()].join(", "));
            let mut query = sqlx::query(&sql);
            for name in chunk {
                query = query.bind(name);
            }
            let row = query
                .fetch_one(&mut **lock.conn.as_mut().expect("held"))
                .await?;
            for (i, name) in chunk.iter().enumerate() {
                let got: Option<i64> = row.try_get(i)?;
                if got == Some(1) {
                    lock.names.push(name.clone());
                }
                held.push(got == Some(1));
            }
        }
        Ok((lock, held))
    }

    /// Claims the rebuild of one organisation without waiting: `None` while another rebuild,
    /// in any process on any host, holds it. A killed rebuild's claim goes with its connection.
    pub async fn rebuild(
        pool: &MySqlPool,
        ns: &Namespace,
        organisation_id: &str,
    ) -> Result<Option<NamedLock>, sqlx::Error> {
        let name = Self::rebuild_name(ns, organisation_id);
        let mut conn = pool.acquire().await?;
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 0)")
            .bind(&name)
            .fetch_one(&mut *conn)
            .await?;
        Ok((got == Some(1)).then(|| NamedLock {
            conn: Some(conn),
            names: vec![name],
        }))
    }

    /// The name of an organisation's rebuild claim (`tenancy status` asks whether it is held).
    pub fn rebuild_name(ns: &Namespace, organisation_id: &str) -> String {
        format!("{ns}:r:{}", compact(organisation_id))
    }

    async fn acquire(pool: &MySqlPool, name: String) -> Result<NamedLock, StepError> {
        let mut conn = pool.acquire().await?;
        if Self::get(&mut conn, &name).await? {
            Ok(NamedLock {
                conn: Some(conn),
                names: vec![name],
            })
        } else {
            Err(Self::waited(&name))
        }
    }

    /// GET_LOCK with the usual wait: whether it was granted.
    async fn get(conn: &mut PoolConnection<MySql>, name: &str) -> Result<bool, sqlx::Error> {
        // Names are limited to 64 characters: namespace (<= 24) + 3 + uuid without dashes (32).
        debug_assert!(name.len() <= 64, "lock name {name} too long");
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
            .bind(name)
            .bind(LOCK_WAIT_SECS)
            .fetch_one(&mut **conn)
            .await?;
        Ok(got == Some(1))
    }

    fn waited(name: &str) -> StepError {
        StepError::retry(anyhow::anyhow!(
            "waited {LOCK_WAIT_SECS}s for lock {name}, held by another worker"
        ))
    }

    /// Releases the lock and returns the connection to the pool. A lock dropped without this
    /// (an early return) closes its connection instead, which releases it just as surely.
    pub async fn release(mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // One statement for all of them (a batch of new tenants holds hundreds).
        for chunk in self.names.chunks(500) {
            let sql = format!("SELECT {}", vec!["RELEASE_LOCK(?)"; chunk.len()].join(", "));
            let mut query = sqlx::query(&sql);
            for name in chunk {
                query = query.bind(name);
            }
            if query.execute(&mut *conn).await.is_err() {
                let _ = conn.close().await;
                return;
            }
        }
    }
}

impl Drop for NamedLock {
    fn drop(&mut self) {
        // A pooled connection keeps its named locks: never hand one back still holding it.
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

/// A uuid without dashes (32 characters); other text unchanged.
fn compact(id: &str) -> String {
    id.replace('-', "")
}

/// Whether a database exists.
pub async fn database_exists(pool: &MySqlPool, db: &DatabaseName) -> Result<bool, sqlx::Error> {
    Ok(databases_existing(pool, &[db]).await?.contains(db.as_str()))
}

/// Which of `dbs` exist.
pub async fn databases_existing(
    pool: &MySqlPool,
    dbs: &[&DatabaseName],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let mut found = std::collections::HashSet::new();
    for chunk in dbs.chunks(500) {
        let sql = format!(
            "SELECT CAST(SCHEMA_NAME AS CHAR) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME IN ({})",
            vec!["?"; chunk.len()].join(",")
        );
        let mut query = sqlx::query_scalar::<_, String>(&sql);
        for db in chunk {
            query = query.bind(db.as_str());
        }
        found.extend(query.fetch_all(pool).await?);
    }
    Ok(found)
}

/// Tables of a database, in name order (empty if it does not exist).
pub async fn tables(pool: &MySqlPool, db: &DatabaseName) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? ORDER BY TABLE_NAME",
    )
    .bind(db.as_str())
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_limits_are_said_in_each_flavours_words() {
        let limits = StatementLimits {
            statement: Duration::from_millis(2500),
            lock_wait: Duration::from_secs(5),
        };
        assert_eq!(
            Flavour::of_version("10.11.19-MariaDB-0+deb12u1"),
            Flavour::MariaDb
        );
        assert_eq!(Flavour::of_version("8.4.3"), Flavour::MySql);
        assert_eq!(
            Flavour::MariaDb.limits_statement(&limits),
            "SET SESSION max_statement_time = 2.5, innodb_lock_wait_timeout = 5, lock_wait_timeout = 5"
        );
        assert_eq!(
            Flavour::MySql.limits_statement(&limits),
            "SET SESSION max_execution_time = 2500, innodb_lock_wait_timeout = 5, lock_wait_timeout = 5"
        );
    }
}
