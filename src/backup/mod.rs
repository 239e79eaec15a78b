//! Per-tenant backups: one consistent snapshot of a tenant database that knows its place in the
//! log, so a restore is the snapshot plus the log since then (`tenancy restore`, in
//! [`crate::rebuild::restore`]): a restore to now, or to any moment after the snapshot.
//!
//! # Format (version 1)
//!
//! A backup is a directory, `{kind}_{slug}_{UTC time}`, written as `….partial` and renamed when
//! complete (a directory without the suffix is a whole backup):
//!
//! - `manifest.json`: [`Manifest`]: the tenant, its kind, server and database, the migration
//!   version the tables are at, where the log must be read from to bring them up to date
//!   (`log`), the database's `projection_offsets` (`offsets`), and per table its columns, row
//!   count, file and SHA-256.
//! - `tables/{table}.jsonl`: one JSON array per row, in primary-key order, one element per
//!   column of the manifest: `null`, or the value as MySQL prints it as text (`CAST(… AS
//!   CHAR)`: numbers, dates as `YYYY-MM-DD hh:mm:ss[.ffffff]`, JSON documents as text); binary
//!   columns as upper-case hex. Readable with any JSON tool, loadable into MySQL or MariaDB by
//!   anything that can bind strings.
//!
//! Sqlx's `_sqlx_migrations` is not copied: the version is in the manifest, and a restore
//! recreates the bookkeeping of exactly those migrations before loading the rows.

pub mod load;
pub mod take;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What [`Manifest::format`] holds.
pub const FORMAT: &str = "blindstrader-tenancy-backup";
/// The version of the format this binary writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The file in a backup directory that describes it.
pub const MANIFEST: &str = "manifest.json";

/// The description of one backup (`manifest.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub organisation_id: String,
    /// `brand`, `supplier` or `retailer`.
    pub kind: String,
    pub slug: String,
    pub namespace: String,
    /// The MySQL server and database it was taken from.
    pub server: String,
    pub database: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The highest migration applied to the tables (of the tenant's kind).
    pub migration_version: i64,
    /// When the snapshot's transaction began (RFC 3339, UTC).
    pub taken_at: String,
    /// The `tenancy` version that wrote it.
    pub written_by: String,
    /// Where a restore starts reading each partition that holds the tenant's own events: every
    /// event of the tenant below these offsets is in the snapshot.
    pub log: Vec<LogStart>,
    /// The snapshot's `projection_offsets`, for reading (they are in its table too).
    pub offsets: Vec<Offset>,
    pub tables: Vec<Table>,
}

/// A partition and the first offset a restore reads of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogStart {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Offset {
    pub projection: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// One table of the snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub columns: Vec<Column>,
    pub rows: u64,
    /// Relative to the backup directory.
    pub file: String,
    /// Of the file's bytes, lower-case hex.
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// Stored as hex (BINARY, VARBINARY, BLOB types).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub binary: bool,
}

impl Manifest {
    pub fn rows(&self) -> u64 {
        self.tables.iter().map(|t| t.rows).sum()
    }
}

/// A backup on disk: its directory and manifest, read and checked for a format this binary
/// reads.
#[derive(Debug, Clone)]
pub struct Backup {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Backup {
    /// Reads `dir/manifest.json`. Table files are checked against their checksums as they are
    /// loaded.
    pub fn open(dir: &Path) -> anyhow::Result<Backup> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (a backup is a directory holding {MANIFEST})",
                path.display()
            )
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a backup manifest: {e}", path.display()))?;
        if manifest.format != FORMAT {
            anyhow::bail!(
                "{}: format {:?}, not {FORMAT:?}",
                path.display(),
                manifest.format
            );
        }
        if manifest.format_version > FORMAT_VERSION {
            anyhow::bail!(
                "{}: format version {} is newer than this tenancy reads ({FORMAT_VERSION}): restore it with a newer one",
                path.display(),
                manifest.format_version
            );
        }
        for t in &manifest.tables {
            // Names go into SQL and paths: only what our migrations create.
            if !is_identifier(&t.name) || t.columns.iter().any(|c| !is_identifier(&c.name)) {
                anyhow::bail!(
                    "{}: table {:?} has a name that is not a plain identifier",
                    path.display(),
                    t.name
                );
            }
            if t.file != table_file(&t.name) {
                anyhow::bail!(
                    "{}: table {} is said to be in {:?}, not {:?}",
                    path.display(),
                    t.name,
                    t.file,
                    table_file(&t.name)
                );
            }
        }
        Ok(Backup {
            dir: dir.to_owned(),
            manifest,
        })
    }
}

/// Where a table's rows are, relative to the backup directory.
pub fn table_file(table: &str) -> String {
    format!("tables/{table}.jsonl")
}

/// ASCII letters, digits and `_`, not starting with a digit, at most 64 bytes: the names our
/// migrations give tables and columns, safe to quote with backticks and to use as a file name.
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_plain_names_only() {
        for ok in ["fabrics", "projection_offsets", "_sqlx_migrations", "t2"] {
            assert!(is_identifier(ok), "{ok}");
        }
        for bad in ["", "2t", "a`b", "a b", "../x", "é", &"x".repeat(65)] {
            assert!(!is_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn a_manifest_naming_a_file_elsewhere_is_refused() {
        let dir = std::env::temp_dir().join(format!("backup-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            organisation_id: uuid::Uuid::new_v4().to_string(),
            kind: "brand".into(),
            slug: "acme".into(),
            namespace: "t".into(),
            server: "home".into(),
            database: "t_brand_acme".into(),
            region: None,
            migration_version: 4,
            taken_at: "2026-12-07T00:00:00Z".into(),
            written_by: "test".into(),
            log: vec![],
            offsets: vec![],
            tables: vec![Table {
                name: "fabrics".into(),
                columns: vec![Column {
                    name: "code".into(),
                    binary: false,
                }],
                rows: 0,
                file: table_file("fabrics"),
                sha256: String::new(),
            }],
        };
        std::fs::write(dir.join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(Backup::open(&dir).unwrap().manifest, m);
        m.tables[0].file = "../../etc/passwd".into();
        std::fs::write(dir.join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
        let refused = Backup::open(&dir).unwrap_err().to_string();
        assert!(refused.contains("is said to be in"), "{refused}");
        m.tables[0].file = table_file("fabrics");
        m.format_version = FORMAT_VERSION + 1;
        std::fs::write(dir.join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
        let refused = Backup::open(&dir).unwrap_err().to_string();
        assert!(
            refused.contains("newer than this tenancy reads"),
            "{refused}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
