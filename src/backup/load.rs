//! Loading a backup into a database of our choosing (a restore's shadow): the schema of the
//! backup's migration version, its rows (each file checked against the manifest's SHA-256 as
//! it is read), then every later migration, so the result is what this binary writes for.

use std::io::BufRead;

use sha2::{Digest, Sha256};
use sqlx::migrate::Migrator;
use sqlx::Connection;

use super::{Backup, Table};
use crate::store::servers::Server;
use crate::tenancy::migrations;
use crate::tenant::DatabaseName;

/// Rows per INSERT (fewer for wide tables: a statement binds at most 65,535 values).
const ROWS_PER_INSERT: usize = 1000;
/// INSERTs per transaction of each writer.
const INSERTS_PER_COMMIT: usize = 20;
/// Connections inserting one table's rows at once: the file is read, checked and parsed on a
/// thread of its own while they write, so MySQL is kept busy on both cores.
const WRITERS: usize = 2;

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
    drop(conn);
    let loaded = std::sync::atomic::AtomicU64::new(0);
    for table in &m.tables {
        load_table(server, db, backup, table, &|n| {
            let total = loaded.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
            rows(total);
        })
        .await?;
    }
    if m.migration_version < latest {
        migrations::migrate(server.url(), db, migrator).await?;
    }
    Ok(())
}

/// A batch of rows, parsed.
type Batch = Vec<Vec<Option<String>>>;

/// One table's file into `db`: read, hashed and parsed on a blocking thread, inserted by
/// [`WRITERS`] connections in transactions of [`INSERTS_PER_COMMIT`] statements. The rows
/// are checked against the manifest's count and SHA-256 once the file is read; a mismatch
/// fails the load (the caller drops the database). `rows` is told each batch written.
async fn load_table(
    server: &Server,
    db: &DatabaseName,
    backup: &Backup,
    table: &Table,
    rows: &(dyn Fn(u64) + Sync),
) -> anyhow::Result<u64> {
    let path = backup.dir.join(&table.file);
    let file = std::fs::File::open(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e} (the backup is incomplete)", path.display()))?;
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
    let (feed, batches) = tokio::sync::mpsc::channel::<Batch>(2 * WRITERS);
    let reader_path = path.clone();
    let reader = tokio::task::spawn_blocking(move || {
        read_batches(file, &reader_path, width, per_insert, feed)
    });
    let batches = tokio::sync::Mutex::new(batches);
    let write = async || -> anyhow::Result<()> {
        let mut conn = super::take::connect(server).await?;
        let mut statements = 0;
        sqlx::raw_sql("START TRANSACTION")
            .execute(&mut conn)
            .await?;
        loop {
            let Some(batch) = batches.lock().await.recv().await else {
                break;
            };
            let n = batch.len();
            let partial;
            let sql = match n == per_insert {
                true => &full,
                false => {
                    partial = format!("{head}{}", vec![row_sql.as_str(); n].join(","));
                    &partial
                }
            };
            let mut query = sqlx::query(sql);
            for row in batch {
                for value in row {
                    query = query.bind(value);
                }
            }
            query.execute(&mut conn).await?;
            rows(n as u64);
            statements += 1;
            if statements % INSERTS_PER_COMMIT == 0 {
                sqlx::raw_sql("COMMIT; START TRANSACTION")
                    .execute(&mut conn)
                    .await?;
            }
        }
        sqlx::raw_sql("COMMIT").execute(&mut conn).await?;
        conn.close().await.ok();
        Ok(())
    };
    let writers = async {
        let written = futures::future::try_join_all((0..WRITERS).map(|_| write())).await;
        // After a writer failed, the reader's next send fails and it stops.
        batches.lock().await.close();
        written
    };
    let (written, read) = tokio::join!(writers, reader);
    let (count, sha256) = read??;
    written?;
    if sha256 != table.sha256 || count != table.rows {
        anyhow::bail!(
            "{}: {count} rows with SHA-256 {sha256}, but the manifest says {} rows with {}: the backup is damaged",
            path.display(),
            table.rows,
            table.sha256
        );
    }
    Ok(count)
}

/// Reads `file` line by line, hashing every byte, and sends its rows in batches of
/// `per_insert`; returns the rows read and the file's SHA-256. Stops early (with an error) on
/// a line that is not a row of `width` values, or when the writers are gone.
fn read_batches(
    file: std::fs::File,
    path: &std::path::Path,
    width: usize,
    per_insert: usize,
    feed: tokio::sync::mpsc::Sender<Batch>,
) -> anyhow::Result<(u64, String)> {
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut hash = Sha256::new();
    let mut batch: Batch = Vec::with_capacity(per_insert);
    let mut line = Vec::new();
    let mut count = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        count += 1;
        hash.update(&line);
        let values: Vec<Option<String>> = serde_json::from_slice(&line)
            .map_err(|e| anyhow::anyhow!("{} line {count}: not a row: {e}", path.display()))?;
        if values.len() != width {
            anyhow::bail!(
                "{} line {count}: {} values for {width} columns",
                path.display(),
                values.len()
            );
        }
        batch.push(values);
        if batch.len() == per_insert {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(per_insert));
            if feed.blocking_send(full).is_err() {
                anyhow::bail!("loading {} stopped", path.display());
            }
        }
    }
    if !batch.is_empty() && feed.blocking_send(batch).is_err() {
        anyhow::bail!("loading {} stopped", path.display());
    }
    Ok((count, format!("{:x}", hash.finalize())))
}
