//! Taking a backup: every table of a tenant database read in one consistent-snapshot
//! transaction, so its rows, its `projection_offsets` and its `applied_events` describe the
//! same moment. InnoDB serves the snapshot from its undo log: the tenant's writers are not
//! blocked. The tenant's migration lock is held meanwhile, so no rollout changes the tables
//! under the snapshot (it passes the tenant by and comes back on its next pass).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use sha2::{Digest, Sha256};
use sqlx::mysql::MySqlConnectOptions;
use sqlx::{ConnectOptions, Connection, MySqlConnection, Row};

use super::{is_identifier, table_file, Column, LogStart, Manifest, Offset, Table};
use crate::config::Config;
use crate::log::topics::Topic;
use crate::store::servers::Server;
use crate::store::tenants::{Status, TenantRef};
use crate::tenancy::migrations::migrate_lock;
use crate::tenant::{DatabaseName, OrganisationType};

/// How long a backup waits for a migration of the tenant under way to end.
const MIGRATION_WAIT_S: u32 = 30;

/// A backup written.
#[derive(Debug)]
pub struct Taken {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub elapsed: Duration,
}

/// The directory a backup of `t` taken now goes to under `to`.
fn directory(to: &Path, t: &TenantRef, slug: &str) -> PathBuf {
    to.join(format!(
        "{}_{}_{}",
        t.kind.db_word(),
        slug,
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
    ))
}

/// A connection of its own to the tenant's server: timestamps read and written in UTC (a
/// backup loaded where the session time zone differs must mean the same instants), lock waits
/// bounded.
pub(super) async fn connect(server: &Server) -> anyhow::Result<MySqlConnection> {
    let mut conn = MySqlConnectOptions::from_str(server.url())?
        .connect()
        .await?;
    sqlx::raw_sql("SET time_zone = '+00:00', SESSION lock_wait_timeout = 60")
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

/// Writes a backup of `t` (whose slug is `slug`) into a new directory under `to`; `rows` is
/// told the rows written so far.
pub async fn take(
    config: &Config,
    t: &TenantRef,
    slug: &str,
    to: &Path,
    rows: &(dyn Fn(u64) + Sync),
) -> anyhow::Result<Taken> {
    let started = Instant::now();
    let db = match (t.status, &t.database) {
        (Status::Active, Some(db)) if !t.changing => db.clone(),
        (Status::Active, Some(_)) => anyhow::bail!(
            "tenant {} is in the middle of a lifecycle step: back it up when it is done",
            t.organisation_id
        ),
        (status, _) => anyhow::bail!(
            "tenant {} is {status}: only an active tenant's database is backed up",
            t.organisation_id
        ),
    };
    // A supplier's grants come from many brands' keys, applied out of log order: where its
    // processor's group has committed is where the log holds everything not yet applied. Read
    // before the snapshot begins, so all below it is in the snapshot.
    let committed = match t.kind {
        OrganisationType::Supplier => Some(group_positions(config, Topic::BrandAccess).await?),
        _ => None,
    };
    let dir = directory(to, t, slug);
    // (Not with_extension: the name's time has a `.` of its own.)
    let mut partial = dir.clone().into_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    std::fs::create_dir_all(partial.join("tables"))
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", partial.display()))?;
    let written = async {
        let mut conn = connect(&t.server).await?;
        let lock = migrate_lock(&db);
        let got: Option<i64> =
            sqlx::query_scalar(&format!("SELECT GET_LOCK(?, {MIGRATION_WAIT_S})"))
                .bind(&lock)
                .fetch_one(&mut conn)
                .await?;
        if got != Some(1) {
            anyhow::bail!(
                "tenant {}'s database {db} has been migrating for {MIGRATION_WAIT_S} s: try again when `tenancy status` shows it done",
                t.organisation_id
            );
        }
        let result = snapshot(&mut conn, t, slug, &db, &partial, rows).await;
        // Closing the session releases the lock and ends the transaction.
        conn.close().await.ok();
        result
    }
    .await;
    let mut manifest = match written {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    manifest.namespace = config.namespace.to_string();
    manifest.log = log_starts(config, t.kind, &manifest.offsets, committed);
    let text = serde_json::to_string_pretty(&manifest)?;
    let mut file = std::fs::File::create(partial.join(super::MANIFEST))?;
    file.write_all((text + "\n").as_bytes())?;
    file.sync_all()?;
    // The manifest on disk before the name says the backup is whole, and the new name with it.
    std::fs::rename(&partial, &dir)?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    std::fs::File::open(parent.unwrap_or(Path::new(".")))?.sync_all()?;
    tracing::info!(tenant = %t.organisation_id, database = %db, dir = %dir.display(),
        rows = manifest.rows(), "backed up");
    Ok(Taken {
        dir,
        manifest,
        elapsed: started.elapsed(),
    })
}

/// The snapshot itself, on `conn` holding the tenant's migration lock.
async fn snapshot(
    conn: &mut MySqlConnection,
    t: &TenantRef,
    slug: &str,
    db: &DatabaseName,
    dir: &Path,
    rows: &(dyn Fn(u64) + Sync),
) -> anyhow::Result<Manifest> {
    let exists: Option<String> = sqlx::query_scalar(
        "SELECT CAST(SCHEMA_NAME AS CHAR) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
    )
    .bind(db.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    if exists.is_none() {
        anyhow::bail!(
            "tenant {}'s database {db} does not exist on server {}",
            t.organisation_id,
            t.server.name()
        );
    }
    sqlx::raw_sql("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *conn)
        .await?;
    sqlx::raw_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        .execute(&mut *conn)
        .await?;
    let taken_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let migration_version: i64 = sqlx::query_scalar(&format!(
        "SELECT CAST(COALESCE(MAX(version), 0) AS SIGNED) FROM {}._sqlx_migrations WHERE success",
        db.quoted()
    ))
    .fetch_one(&mut *conn)
    .await?;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = ? AND TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_NAME",
    )
    .bind(db.as_str())
    .fetch_all(&mut *conn)
    .await?;
    let mut tables = Vec::new();
    let mut total = 0u64;
    for name in names.into_iter().filter(|n| n != "_sqlx_migrations") {
        if !is_identifier(&name) {
            anyhow::bail!("{db} holds a table named {name:?}, which no migration of ours makes");
        }
        let table = dump_table(conn, db, &name, dir, &mut |n| rows(total + n)).await?;
        total += table.rows;
        tables.push(table);
    }
    let offsets = sqlx::query(&format!(
        "SELECT CAST(projection AS CHAR), CAST(topic AS CHAR), `partition`, `offset` \
         FROM {}.projection_offsets ORDER BY 1, 2, 3",
        db.quoted()
    ))
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(|r| {
        Ok(Offset {
            projection: r.try_get(0)?,
            topic: r.try_get(1)?,
            partition: r.try_get(2)?,
            offset: r.try_get(3)?,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    sqlx::raw_sql("COMMIT").execute(&mut *conn).await?;
    Ok(Manifest {
        format: super::FORMAT.into(),
        format_version: super::FORMAT_VERSION,
        organisation_id: t.organisation_id.clone(),
        kind: t.kind.db_word().to_owned(),
        slug: slug.to_owned(),
        namespace: String::new(),
        server: t.server.name().to_owned(),
        database: db.to_string(),
        region: t.region.clone(),
        migration_version,
        taken_at,
        written_by: format!("tenancy {}", env!("CARGO_PKG_VERSION")),
        log: Vec::new(),
        offsets,
        tables,
    })
}

/// One table's rows into `dir/tables/{name}.jsonl`, in primary-key order, hashed as written.
async fn dump_table(
    conn: &mut MySqlConnection,
    db: &DatabaseName,
    name: &str,
    dir: &Path,
    rows: &mut (dyn FnMut(u64) + Send),
) -> anyhow::Result<Table> {
    // Generated columns are computed again on load; inserting into them is refused.
    let described = sqlx::query(
        "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), CAST(COLUMN_KEY AS CHAR) \
         FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
         AND EXTRA NOT LIKE '%GENERATED%' ORDER BY ORDINAL_POSITION",
    )
    .bind(db.as_str())
    .bind(name)
    .fetch_all(&mut *conn)
    .await?;
    let mut columns = Vec::new();
    for r in &described {
        let column: String = r.try_get(0)?;
        let data_type: String = r.try_get(1)?;
        if !is_identifier(&column) {
            anyhow::bail!(
                "{db}.{name} has a column named {column:?}, which no migration of ours makes"
            );
        }
        let binary = matches!(
            data_type.to_ascii_lowercase().as_str(),
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" | "bit"
        );
        columns.push(Column {
            name: column,
            binary,
        });
    }
    let primary: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.KEY_COLUMN_USAGE \
         WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' \
         ORDER BY ORDINAL_POSITION",
    )
    .bind(db.as_str())
    .bind(name)
    .fetch_all(&mut *conn)
    .await?;
    let select: Vec<String> = columns
        .iter()
        .map(|c| match c.binary {
            true => format!("HEX(`{}`)", c.name),
            // The text protocol sends every value as MySQL prints it: no conversion asked of
            // the server (a CAST per value made the backup twice mariadb-dump's time).
            false => format!("`{}`", c.name),
        })
        .collect();
    let order = match primary.iter().all(|c| is_identifier(c)) && !primary.is_empty() {
        true => format!(
            " ORDER BY {}",
            primary
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        false => String::new(),
    };
    let sql = format!(
        "SELECT {} FROM {}.`{name}`{order}",
        select.join(", "),
        db.quoted()
    );
    let file = table_file(name);
    let mut out = Hashing::new(std::fs::File::create(dir.join(&file))?);
    let mut count = 0u64;
    let mut line = Vec::with_capacity(512);
    let mut stream = sqlx::raw_sql(&sql).fetch(&mut *conn);
    while let Some(row) = stream.try_next().await? {
        line.clear();
        line.push(b'[');
        for i in 0..columns.len() {
            if i > 0 {
                line.push(b',');
            }
            // As text whatever the column's type (the text protocol's bytes, checked as UTF-8),
            // borrowed from the row: no allocation per value.
            let value: Option<&str> = row.try_get_unchecked(i)?;
            match value {
                Some(v) => serde_json::to_writer(&mut line, &v)?,
                None => line.extend_from_slice(b"null"),
            }
        }
        line.extend_from_slice(b"]\n");
        out.write_all(&line)?;
        count += 1;
        if count.is_multiple_of(10_000) {
            rows(count);
        }
    }
    drop(stream);
    rows(count);
    let sha256 = out.finish()?;
    Ok(Table {
        name: name.to_owned(),
        columns,
        rows: count,
        file,
        sha256,
    })
}

/// A buffered file writer that hashes what it writes. The file is synced as it grows, on a
/// thread of its own, so the sync at the end (a backup not on disk is not one) finds little
/// left to write.
struct Hashing {
    file: std::io::BufWriter<std::fs::File>,
    hash: Sha256,
    unsynced: usize,
    syncs: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

/// Bytes written between two background syncs.
const SYNC_EVERY: usize = 16 << 20;

impl Hashing {
    fn new(file: std::fs::File) -> Hashing {
        Hashing {
            file: std::io::BufWriter::with_capacity(1 << 20, file),
            hash: Sha256::new(),
            unsynced: 0,
            syncs: Vec::new(),
        }
    }

    /// Flushes and syncs the file; returns the hash of its bytes.
    fn finish(mut self) -> std::io::Result<String> {
        self.file.flush()?;
        for sync in self.syncs.drain(..) {
            sync.join().expect("a sync thread does not panic")?;
        }
        self.file.get_ref().sync_all()?;
        Ok(format!("{:x}", self.hash.finalize()))
    }
}

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hash.update(&buf[..n]);
        self.unsynced += n;
        if self.unsynced >= SYNC_EVERY {
            self.unsynced = 0;
            self.file.flush()?;
            let file = self.file.get_ref().try_clone()?;
            self.syncs
                .push(std::thread::spawn(move || file.sync_data()));
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Where a restore reads the log from: a brand's or retailer's own events are one key, applied
/// in log order, so the offset after the last applied is exact; a supplier's grants are read
/// from where its processor's group had committed (`committed`, read before the snapshot).
fn log_starts(
    config: &Config,
    kind: OrganisationType,
    offsets: &[Offset],
    committed: Option<Vec<(i32, i64)>>,
) -> Vec<LogStart> {
    let ns = &config.namespace;
    if let Some(committed) = committed {
        let topic = Topic::BrandAccess.name(ns);
        return committed
            .into_iter()
            .map(|(partition, from)| LogStart {
                topic: topic.clone(),
                partition,
                from,
            })
            .collect();
    }
    let topic = match kind {
        OrganisationType::Retailer => Topic::RetailerDomains.name(ns),
        _ => Topic::BrandCatalog.name(ns),
    };
    let mut starts: Vec<LogStart> = offsets
        .iter()
        .filter(|o| o.topic == topic)
        .map(|o| LogStart {
            topic: topic.clone(),
            partition: o.partition,
            from: o.offset + 1,
        })
        .collect();
    starts.sort_by_key(|s| s.partition);
    starts.dedup_by_key(|s| s.partition);
    starts
}

/// Where the catalog processor's group (which applies grants) has committed, per partition of
/// `topic` (0 where it has not).
async fn group_positions(config: &Config, topic: Topic) -> anyhow::Result<Vec<(i32, i64)>> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let group = format!("{}.catalog", config.namespace);
        let positions =
            crate::log::kafka::group_lag(&config, &group, &[topic.name(&config.namespace)])?;
        Ok(positions
            .into_iter()
            .map(|p| (p.partition, p.committed.unwrap_or(0).max(0)))
            .collect())
    })
    .await?
}
