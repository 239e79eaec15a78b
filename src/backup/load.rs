//! Loading a backup into a database of our choosing (a restore's shadow): the schema of the
//! backup's migration version, its rows (each file checked against the manifest's SHA-256 as
//! it is read), then every later migration, so the result is what this binary writes for.

use std::io::BufRead;

use sha2::{Digest, Sha256};
use sqlx::migrate::Migrator;
use sqlx::MySqlConnection;

use super::{Backup, Table};
use crate::store::servers::Server;
use crate::tenancy::migrations;
use crate::tenant::DatabaseName;

/// Rows per INSERT (fewer for wide tables: a statement binds at most 65,535 values).
const ROWS_PER_INSERT: usize = 1000;
/// Rows per transaction.
const ROWS_PER_COMMIT: u64 = 20_000;

/// Creates `db` on `server` (it must not exist) from `backup`, migrated to the latest version
/// of `migrator`; `rows` is told the rows loaded so far. On error the caller drops `db`.
pub async fn load(
    server: &Server,
    db: &DatabaseName,
    backup: &Backup,
    migrator: &Migrator,
    rows: &(dyn Fn(u64) + Sync),
) -> anyhow::Result<()> {
    let m = &backup.manifest;
    let latest = migrations::latest_version(migrator);
    if m.migration_version > latest {
        anyhow::bail!(
            "the backup is at migration {} of a {}, newer than this tenancy knows ({latest}): restore it with the tenancy that took it or a newer one",
            m.migration_version,
            m.kind
        );
    }
    if !migrator.iter().any(|x| x.version == m.migration_version) {
        anyhow::bail!(
            "the backup is at migration {}, which no {} migration of this tenancy has",
            m.migration_version,
            m.kind
        );
    }
    let mut conn = super::take::connect(server).await?;
    let schema = format!(
        "{};\nUSE {};\n{}",
        crate::store::schema::create_database(db, false),
        db.quoted(),
        migrations::fresh_script_upto(migrator, m.migration_version)
    );
    sqlx::raw_sql(&schema).execute(&mut conn).await?;
    let mut total = 0u64;
    for table in &m.tables {
        let n = load_table(&mut conn, db, backup, table, &mut |n| rows(total + n)).await?;
        total += n;
    }
    drop(conn);
    if m.migration_version < latest {
        migrations::migrate(server.url(), db, migrator).await?;
    }
    Ok(())
}

/// One table's file into `db`, in transactions of [`ROWS_PER_COMMIT`] rows. Returns its rows.
async fn load_table(
    conn: &mut MySqlConnection,
    db: &DatabaseName,
    backup: &Backup,
    table: &Table,
    rows: &mut (dyn FnMut(u64) + Send),
) -> anyhow::Result<u64> {
    let path = backup.dir.join(&table.file);
    let file = std::fs::File::open(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e} (the backup is incomplete)", path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let width = table.columns.len();
    let per_insert = ROWS_PER_INSERT.min(60_000 / width.max(1)).max(1);
    let row_sql = format!(
        "({})",
        table
            .columns
            .iter()
            .map(|c| if c.binary { "UNHEX(?)" } else { "?" })
            .collect::<Vec<_>>()
            .join(",")
    );
    let head = format!(
        "INSERT INTO {}.`{}` ({}) VALUES ",
        db.quoted(),
        table.name,
        table
            .columns
            .iter()
            .map(|c| format!("`{}`", c.name))
            .collect::<Vec<_>>()
            .join(",")
    );
    let full = format!("{head}{}", vec![row_sql.as_str(); per_insert].join(","));
    let mut hash = Sha256::new();
    let mut batch: Vec<Vec<Option<String>>> = Vec::with_capacity(per_insert);
    let mut count = 0u64;
    let mut line = Vec::new();
    let mut line_no = 0u64;
    sqlx::raw_sql("START TRANSACTION")
        .execute(&mut *conn)
        .await?;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        line_no += 1;
        hash.update(&line);
        let values: Vec<Option<String>> = serde_json::from_slice(&line)
            .map_err(|e| anyhow::anyhow!("{} line {line_no}: not a row: {e}", path.display()))?;
        if values.len() != width {
            anyhow::bail!(
                "{} line {line_no}: {} values for {width} columns",
                path.display(),
                values.len()
            );
        }
        batch.push(values);
        if batch.len() == per_insert {
            insert(&mut *conn, &full, &mut batch).await?;
            count += per_insert as u64;
            if count % ROWS_PER_COMMIT < per_insert as u64 {
                sqlx::raw_sql("COMMIT; START TRANSACTION")
                    .execute(&mut *conn)
                    .await?;
                rows(count);
            }
        }
    }
    if !batch.is_empty() {
        count += batch.len() as u64;
        let last = format!("{head}{}", vec![row_sql.as_str(); batch.len()].join(","));
        insert(&mut *conn, &last, &mut batch).await?;
    }
    let sha256 = format!("{:x}", hash.finalize());
    if sha256 != table.sha256 || count != table.rows {
        sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await?;
        anyhow::bail!(
            "{}: {count} rows with SHA-256 {sha256}, but the manifest says {} rows with {}: the backup is damaged",
            path.display(),
            table.rows,
            table.sha256
        );
    }
    sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
    rows(count);
    Ok(count)
}

async fn insert(
    conn: &mut MySqlConnection,
    sql: &str,
    batch: &mut Vec<Vec<Option<String>>>,
) -> Result<(), sqlx::Error> {
    let mut query = sqlx::query(sql);
    for row in batch.drain(..) {
        for value in row {
            query = query.bind(value);
        }
    }
    query.execute(conn).await?;
    Ok(())
}
