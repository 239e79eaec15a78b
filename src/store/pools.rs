//! The pools' settings (one pool per server, see [`crate::store::servers`]): their size, the
//! limits every processor statement runs under, chosen by the server's flavour, and the DDL
//! connections that create tenant databases.
//!
//! A pool has no default database: every query names its database explicitly, so a pooled
//! connection can never carry one tenant's `USE` (or a prepared statement cached under it) into
//! another tenant's query.

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::MySqlConnectOptions;
use sqlx::ConnectOptions;
use sqlx::MySqlPool;

use crate::config::Config;

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
                "max_statement_time = {}", // mariadb-only: ok (the MariaDB branch)
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

/// The shared pools' settings (one pool per server, [`crate::store::servers::Servers`]).
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

/// [`ddl_pool`]'s settings on `options`' server (see [`crate::store::servers::Servers::ddl`]).
pub(crate) fn ddl_pool_with(options: MySqlConnectOptions, connections: u32) -> MySqlPool {
    sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(connections.max(1))
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(30))
        .test_before_acquire(false)
        .connect_lazy_with(options.disable_statement_logging())
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
            "SET SESSION max_statement_time = 2.5, innodb_lock_wait_timeout = 5, lock_wait_timeout = 5" // mariadb-only: ok
        );
        assert_eq!(
            Flavour::MySql.limits_statement(&limits),
            "SET SESSION max_execution_time = 2500, innodb_lock_wait_timeout = 5, lock_wait_timeout = 5"
        );
    }
}
