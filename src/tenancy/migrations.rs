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
/// sqlx holds a MySQL named lock per database while migrating, so two workers racing on the
/// same tenant serialise here. A migration left half-applied by a killed worker is detected
/// (`Dirty`) and re-run: every migration is idempotent (see migrations/README.md).
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
    let options = MySqlConnectOptions::from_str(database_url)?
        .database(db.as_str())
        .disable_statement_logging();
    let mut conn = options.connect().await?;
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
    conn.close().await.ok();
    result.map_err(|e| match e {
        MigrateError::Execute(e) => e,
        other => sqlx::Error::Migrate(Box::new(other)),
    })?;
    Ok(latest_version(migrator))
}
