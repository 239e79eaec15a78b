//! Migrations per database kind, embedded from `migrations/` at build time.

use std::str::FromStr;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::mysql::MySqlConnectOptions;
use sqlx::{ConnectOptions, Connection, MySqlPool};

use crate::tenant::{DatabaseName, OrganisationType, ServiceDatabase};

static BRAND: Migrator = sqlx::migrate!("./migrations/brand");
static SUPPLIER: Migrator = sqlx::migrate!("./migrations/supplier");
static RETAILER: Migrator = sqlx::migrate!("./migrations/retailer");
static PLATFORM: Migrator = sqlx::migrate!("./migrations/platform");
static IDENTITY: Migrator = sqlx::migrate!("./migrations/identity");
static SUPPLY_CHAIN: Migrator = sqlx::migrate!("./migrations/supply_chain");
static PAYMENT: Migrator = sqlx::migrate!("./migrations/payment");
static NOTIFICATION: Migrator = sqlx::migrate!("./migrations/notification");

pub fn for_tenant(kind: OrganisationType) -> &'static Migrator {
    match kind {
        OrganisationType::Brand => &BRAND,
        OrganisationType::Supplier => &SUPPLIER,
        OrganisationType::Retailer => &RETAILER,
    }
}

pub fn for_service(service: ServiceDatabase) -> &'static Migrator {
    match service {
        ServiceDatabase::Platform => &PLATFORM,
        ServiceDatabase::Identity => &IDENTITY,
        ServiceDatabase::SupplyChain => &SUPPLY_CHAIN,
        ServiceDatabase::Payment => &PAYMENT,
        ServiceDatabase::Notification => &NOTIFICATION,
    }
}

/// The version a database of this migrator ends at.
pub fn latest_version(migrator: &Migrator) -> i64 {
    migrator.iter().map(|m| m.version).max().unwrap_or(0)
}

/// `CREATE DATABASE IF NOT EXISTS`, then every pending migration, on a connection opened for
/// this database alone (the shared pool never `USE`s a tenant database, see DESIGN.md).
///
/// Two workers racing on the same tenant serialise on a MySQL named lock per database, taken
/// here with a bounded wait: sqlx's own migration lock uses `GET_LOCK(…, -1)` and ignores the
/// result, which MariaDB does not treat as "wait forever" (a race test saw both apply). Under
/// that lock, a migration left half-applied (`Dirty`) can only be a killed worker's, so it is
/// re-run: every migration is idempotent (see migrations/README.md).
pub async fn create_and_migrate(
    pool: &MySqlPool,
    database_url: &str,
    db: &DatabaseName,
    migrator: &Migrator,
) -> Result<i64, sqlx::Error> {
    sqlx::query(&format!(
        "CREATE DATABASE IF NOT EXISTS {} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
        db.quoted()
    ))
    .execute(pool)
    .await?;
    migrate(database_url, db, migrator).await
}

/// Every pending migration of an existing database (see [`create_and_migrate`]).
pub async fn migrate(
    database_url: &str,
    db: &DatabaseName,
    migrator: &Migrator,
) -> Result<i64, sqlx::Error> {
    let options = MySqlConnectOptions::from_str(database_url)?
        .database(db.as_str())
        .disable_statement_logging();
    let mut conn = options.connect().await?;
    // Lock names are limited to 64 characters; a uuid of the database name fits any name.
    let lock = format!(
        "migrate:{}",
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, db.as_str().as_bytes())
    );
    let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 120)")
        .bind(&lock)
        .fetch_one(&mut conn)
        .await?;
    if got != Some(1) {
        conn.close().await.ok();
        // An I/O-kind error: the caller's retry policy treats it as transient.
        return Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("timed out waiting for another worker migrating {db}"),
        )));
    }
    let result = match migrator.run(&mut conn).await {
        Err(MigrateError::Dirty(version)) => {
            tracing::warn!(database = %db, version, "migration was left half-applied; re-running it");
            sqlx::query("DELETE FROM _sqlx_migrations WHERE version = ? AND success = FALSE")
                .bind(version)
                .execute(&mut conn)
                .await?;
            migrator.run(&mut conn).await
        }
        other => other,
    };
    // Closing the session releases the named lock too.
    conn.close().await.ok();
    result.map_err(|e| match e {
        MigrateError::Execute(e) => e,
        other => sqlx::Error::Migrate(Box::new(other)),
    })?;
    Ok(latest_version(migrator))
}
