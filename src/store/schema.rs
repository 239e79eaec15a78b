//! What the server's catalog says about databases and tables, and the SQL every creator of a
//! database or writer of an `IN (…)` list shares.

use sqlx::MySqlPool;

use crate::tenant::DatabaseName;

/// `?,?,…`: the placeholders of an `IN (…)` list (or a row) of `n` values.
pub fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

/// The statement creating `db` as every database here is made (utf8mb4, Unicode collation);
/// `IF NOT EXISTS` when `exists_ok`.
pub fn create_database(db: &DatabaseName, exists_ok: bool) -> String {
    format!(
        "CREATE DATABASE {}{} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
        if exists_ok { "IF NOT EXISTS " } else { "" },
        db.quoted()
    )
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
            placeholders(chunk.len())
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
