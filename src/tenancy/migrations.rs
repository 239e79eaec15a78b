//! Migrations per database kind, embedded from `migrations/` at build time.

use std::str::FromStr;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::mysql::MySqlConnectOptions;
use sqlx::{ConnectOptions, Connection, MySqlPool, Row};

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
/// this database alone (the shared pool never `USE`s a tenant database, see `store::pools`).
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
    let created = sqlx::query(&crate::store::schema::create_database(db, true))
        .execute(pool)
        .await?
        .rows_affected()
        > 0;
    if created {
        return migrate_fresh(database_url, db, migrator).await;
    }
    migrate(database_url, db, migrator).await
}

/// A new tenant's database: created, migrated and its bookkeeping written by one script on a
/// connection of `ddl` ([`crate::store::pools::ddl_pool`]), one round trip as from the `mysql` client.
///
/// Only for a tenant whose lifecycle lock the caller holds: no one else creates or migrates
/// that database meanwhile (the migration rollout takes the same lock, and a name another
/// organisation holds was refused at the claim), so the migration lock and the check for
/// bookkeeping written by another worker that [`create_and_migrate`] needs are not. If the
/// database exists already (a crash part-way, a redelivery), `CREATE DATABASE` fails before
/// anything else runs, and the ordinary path finishes it.
pub async fn create_and_migrate_tenant(
    ddl: &MySqlPool,
    database_url: &str,
    db: &DatabaseName,
    migrator: &Migrator,
) -> Result<i64, sqlx::Error> {
    let script = format!(
        "{};\nUSE {};\n{}",
        crate::store::schema::create_database(db, false),
        db.quoted(),
        fresh_script(migrator)
    );
    match sqlx::raw_sql(&script).execute(ddl).await {
        Ok(_) => Ok(latest_version(migrator)),
        Err(e) if is_database_exists(&e) => migrate(database_url, db, migrator).await,
        Err(e) => Err(e),
    }
}

/// MySQL's ER_DB_CREATE_EXISTS.
fn is_database_exists(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
        .is_some_and(|m| m.number() == 1007)
}

/// The table as sqlx 0.8 creates it (sqlx-mysql migrate.rs): its later runs (the migration
/// rollout) refuse anything they do not recognise.
const SQLX_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS _sqlx_migrations (\
     version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
     installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL, \
     checksum BLOB NOT NULL, execution_time BIGINT NOT NULL)";

/// Every migration `sqlx` would run on an empty database, then the bookkeeping it would write
/// for them, as one script: the DDL, `_sqlx_migrations`, and one row per migration. Values are
/// literals (a script cannot bind), all from the embedded migrations, never from input.
pub fn fresh_script(migrator: &Migrator) -> String {
    fresh_script_upto(migrator, i64::MAX)
}

/// [`fresh_script`] with the migrations up to `version` only: the schema a backup taken at that
/// version was written from (a restore loads its rows there, then migrates on).
pub fn fresh_script_upto(migrator: &Migrator, version: i64) -> String {
    let mut script = String::new();
    let ups: Vec<_> = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration() && m.version <= version)
        .collect();
    for m in &ups {
        // A trailing `;` would leave an empty statement, which MySQL refuses.
        script.push_str(m.sql.trim_end().trim_end_matches(';'));
        script.push_str(";\n");
    }
    script.push_str(SQLX_MIGRATIONS_TABLE);
    script.push_str(";\n");
    script.push_str(&bookkeeping(&ups));
    script
}

/// The `_sqlx_migrations` rows sqlx would write for `ups`, as one INSERT of literals (all from
/// the embedded migrations, never from input).
fn bookkeeping(ups: &[&sqlx::migrate::Migration]) -> String {
    let rows: Vec<String> = ups
        .iter()
        .map(|m| {
            let description = m.description.replace('\\', "\\\\").replace('\'', "''");
            let checksum: String = m.checksum.iter().map(|b| format!("{b:02x}")).collect();
            format!("({}, '{description}', TRUE, X'{checksum}', -1)", m.version)
        })
        .collect();
    format!(
        "INSERT INTO _sqlx_migrations \
         (version, description, success, checksum, execution_time) VALUES {}",
        rows.join(", ")
    )
}

/// The name of the named lock that serialises migrations of `db` across workers (names are
/// limited to 64 characters; a uuid of the database name fits any name).
pub fn migrate_lock(db: &DatabaseName) -> String {
    format!(
        "migrate:{}",
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, db.as_str().as_bytes())
    )
}

/// Every pending migration of an existing tenant database, on a connection of `ddl` (text
/// protocol only, `USE` first: see [`crate::store::pools::ddl_pool`]): the rollout's path.
///
/// Under the database's migration lock, the applied migrations are read and checked as sqlx
/// checks them (a changed checksum, or a version this binary does not know, is refused with
/// sqlx's own error), then the pending ones and their bookkeeping go as one script: three round
/// trips on a connection already open, where sqlx's run opened one and spent a round trip per
/// check and three commits of bookkeeping per migration (the migrate benchmark). A database
/// sqlx left half-applied, or one without bookkeeping, takes sqlx's own path ([`migrate`]).
/// A crash in the middle of the script leaves the migration unrecorded: it is re-run next time
/// (every migration is safe to re-run).
pub async fn migrate_on(
    ddl: &MySqlPool,
    database_url: &str,
    db: &DatabaseName,
    migrator: &Migrator,
) -> Result<i64, sqlx::Error> {
    let lock = migrate_lock(db);
    let mut conn = ddl.acquire().await?;
    let got: Option<i64> = sqlx::raw_sql(&format!(
        "USE {}; SELECT GET_LOCK('{lock}', 120)",
        db.quoted()
    ))
    .fetch_one(&mut *conn)
    .await?
    .try_get(0)?;
    if got != Some(1) {
        conn.close_on_drop();
        return Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("timed out waiting for another worker migrating {db}"),
        )));
    }
    let result = apply_pending(&mut conn, migrator).await;
    let released = sqlx::raw_sql(&format!("SELECT RELEASE_LOCK('{lock}')"))
        .execute(&mut *conn)
        .await;
    if result.is_err() || released.is_err() {
        // Never hand back a connection that may still hold the lock or be mid-script.
        conn.close_on_drop();
    }
    match result? {
        true => Ok(latest_version(migrator)),
        false => {
            drop(conn);
            migrate(database_url, db, migrator).await
        }
    }
}

/// See [`migrate_on`]: false when sqlx's own path must take over.
async fn apply_pending(
    conn: &mut sqlx::MySqlConnection,
    migrator: &Migrator,
) -> Result<bool, sqlx::Error> {
    let applied = match sqlx::raw_sql("SELECT version, checksum, success FROM _sqlx_migrations")
        .fetch_all(&mut *conn)
        .await
    {
        Ok(rows) => rows,
        // ER_NO_SUCH_TABLE: no bookkeeping at all.
        Err(e)
            if e.as_database_error()
                .and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
                .is_some_and(|m| m.number() == 1146) =>
        {
            return Ok(false)
        }
        Err(e) => return Err(e),
    };
    let ups: Vec<&sqlx::migrate::Migration> = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .collect();
    let mut done = std::collections::HashSet::new();
    for row in &applied {
        let version: i64 = row.try_get(0)?;
        let checksum: Vec<u8> = row.try_get(1)?;
        let success: bool = row.try_get(2)?;
        if !success {
            return Ok(false);
        }
        match ups.iter().find(|m| m.version == version) {
            None => {
                return Err(sqlx::Error::Migrate(Box::new(
                    MigrateError::VersionMissing(version),
                )))
            }
            Some(m) if *m.checksum != *checksum => {
                return Err(sqlx::Error::Migrate(Box::new(
                    MigrateError::VersionMismatch(version),
                )))
            }
            Some(_) => {
                done.insert(version);
            }
        }
    }
    let pending: Vec<&sqlx::migrate::Migration> = ups
        .into_iter()
        .filter(|m| !done.contains(&m.version))
        .collect();
    if pending.is_empty() {
        return Ok(true);
    }
    let mut script = String::new();
    for m in &pending {
        script.push_str(m.sql.trim_end().trim_end_matches(';'));
        script.push_str(";\n");
    }
    script.push_str(&bookkeeping(&pending));
    sqlx::raw_sql(&script).execute(&mut *conn).await?;
    Ok(true)
}

/// A database this call has just created: every migration and its bookkeeping in
/// `_sqlx_migrations`, sent as one multi-statement script ([`fresh_script`]).
///
/// `sqlx` applies each migration on its own with three commits of bookkeeping, which made the
/// migration step four times the DDL it runs (the provisioning benchmark); the bookkeeping then
/// sent as statements of its own and `sqlx`'s check of it still cost seven round trips per
/// tenant. `sqlx` reads the rows back at the next migration rollout (and refuses a checksum it
/// does not recognise). A crash part-way leaves a database that exists with some migrations
/// missing or unrecorded: the next attempt takes the ordinary path, which re-runs them (every
/// migration is idempotent).
async fn migrate_fresh(
    database_url: &str,
    db: &DatabaseName,
    migrator: &Migrator,
) -> Result<i64, sqlx::Error> {
    let mut conn = connect_locked(database_url, db).await?;
    let result = async {
        // Another worker may have taken the lock first and migrated it the ordinary way (a
        // service database two workers start on at once).
        let recorded = sqlx::raw_sql("SHOW TABLES LIKE '\\_sqlx\\_migrations'")
            .fetch_all(&mut conn)
            .await?;
        if !recorded.is_empty() {
            return run_locked(&mut conn, db, migrator).await;
        }
        sqlx::raw_sql(&fresh_script(migrator))
            .execute(&mut conn)
            .await?;
        Ok(())
    }
    .await;
    conn.close().await.ok();
    result?;
    Ok(latest_version(migrator))
}

fn migrate_error(e: MigrateError) -> sqlx::Error {
    match e {
        MigrateError::Execute(e) => e,
        other => sqlx::Error::Migrate(Box::new(other)),
    }
}

/// A connection of its own to `db`, holding the named lock that serialises migrations of that
/// database across workers (closing the connection releases it).
async fn connect_locked(
    database_url: &str,
    db: &DatabaseName,
) -> Result<sqlx::MySqlConnection, sqlx::Error> {
    let options = MySqlConnectOptions::from_str(database_url)?
        .database(db.as_str())
        .disable_statement_logging();
    let mut conn = options.connect().await?;
    let lock = migrate_lock(db);
    // Text protocol (the name is a uuid, safe to inline): on a new connection a prepared
    // statement costs a second round trip.
    let got: Option<i64> = sqlx::raw_sql(&format!("SELECT GET_LOCK('{lock}', 120)"))
        .fetch_one(&mut conn)
        .await?
        .try_get(0)?;
    if got != Some(1) {
        conn.close().await.ok();
        // An I/O-kind error: the caller's retry policy treats it as transient.
        return Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("timed out waiting for another worker migrating {db}"),
        )));
    }
    Ok(conn)
}

/// Every pending migration of an existing database (see [`create_and_migrate`]).
pub async fn migrate(
    database_url: &str,
    db: &DatabaseName,
    migrator: &Migrator,
) -> Result<i64, sqlx::Error> {
    let mut conn = connect_locked(database_url, db).await?;
    let result = run_locked(&mut conn, db, migrator).await;
    // Closing the session releases the named lock too.
    conn.close().await.ok();
    result?;
    Ok(latest_version(migrator))
}

/// Platform migrations rewritten after they shipped, with the SHA-384 checksum of their first
/// form: they guarded `ADD COLUMN` with MariaDB's own existence clause, which MySQL 8.4 refuses, and now add
/// their columns the portable way, as safely re-runnable (see `migrations/platform/0004`). The
/// schema both forms make is the same. A database migrated by the first form holds the old
/// checksum in `_sqlx_migrations`, which sqlx would refuse as a modified migration:
/// [`reconcile_rewritten`] gives such a row the new checksum before the migrator runs.
pub const REWRITTEN: &[(i64, &str)] = &[
    (
        4,
        "1317f79625495d003a03d8dfc7602b9492ac89dda7e904006828ce94ea2bf2a91614340611c0bbf0ef260bcc6228c115",
    ),
    (
        5,
        "3de1ea142b7b0abe5cc4434f9f648293c9af30cfa74a2d9e5d294d610636b441f2a6b977fca935e7f0b45c586f628287",
    ),
    (
        10,
        "d80ffb76c539f26604fb391429307d318c49b8e81f465b989cacb277ad4e4ed9222561d91000100f4d5550c794877efb",
    ),
    (
        11,
        "28aea7ca665e9ce630add475f2f6782e0f7063e703cac88556ce5ce643a7a1549dc64a48773b017596a66e2f0d466b78",
    ),
];

/// See [`REWRITTEN`]: only a row holding exactly a first form's checksum moves; anything else
/// (a fresh database, one already reconciled, one a migration was really changed under) is
/// left for sqlx to judge.
async fn reconcile_rewritten(
    conn: &mut sqlx::MySqlConnection,
    db: &DatabaseName,
    migrator: &Migrator,
) -> Result<(), sqlx::Error> {
    if !std::ptr::eq(migrator, &PLATFORM) {
        return Ok(());
    }
    let recorded = sqlx::raw_sql("SHOW TABLES LIKE '\\_sqlx\\_migrations'")
        .fetch_all(&mut *conn)
        .await?;
    if recorded.is_empty() {
        return Ok(());
    }
    for (version, old) in REWRITTEN {
        let Some(now) = migrator.iter().find(|m| m.version == *version) else {
            continue;
        };
        let old: Vec<u8> = (0..old.len())
            .step_by(2)
            .filter_map(|i| u8::from_str_radix(&old[i..i + 2], 16).ok())
            .collect();
        let moved = sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = ? WHERE version = ? AND checksum = ?",
        )
        .bind(now.checksum.as_ref())
        .bind(version)
        .bind(&old)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if moved > 0 {
            tracing::info!(database = %db, version, "migration rewritten for MySQL: checksum of its first form updated");
        }
    }
    Ok(())
}

/// `sqlx`'s run on a connection holding the migration lock. Under that lock, a migration left
/// half-applied (`Dirty`) can only be a killed worker's, so it is re-run.
async fn run_locked(
    conn: &mut sqlx::MySqlConnection,
    db: &DatabaseName,
    migrator: &Migrator,
) -> Result<(), sqlx::Error> {
    reconcile_rewritten(conn, db, migrator).await?;
    match migrator.run(&mut *conn).await {
        Err(MigrateError::Dirty(version)) => {
            tracing::warn!(database = %db, version, "migration was left half-applied; re-running it");
            sqlx::query("DELETE FROM _sqlx_migrations WHERE version = ? AND success = FALSE")
                .bind(version)
                .execute(&mut *conn)
                .await?;
            migrator.run(&mut *conn).await
        }
        other => other,
    }
    .map_err(migrate_error)
}
