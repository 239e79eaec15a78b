//! SQL for the catalog projection: multi-row statements against explicitly named databases.
//! Table and column names come from the validated [`CatalogSpec`], database names from
//! [`DatabaseName`]; every value is a bound parameter.

use sqlx::mysql::MySqlArguments;
use sqlx::query::Query;
use sqlx::{MySql, Transaction};

use futures::TryStreamExt;

use super::change::NetChange;
use super::spec::{CatalogSpec, Cell};
use crate::store::servers::Server;
use crate::tenant::DatabaseName;

/// The projection name of a supplier's copy of one brand, in the supplier's bookkeeping.
pub(crate) fn copy_projection(brand_id: &str) -> String {
    format!("copy:{brand_id}")
}

/// Offsets and event ids of a brand's access events in a supplier's database (per brand, so
/// purging a brand can take its grants' bookkeeping with it).
pub(crate) fn access_projection(brand_id: &str) -> String {
    format!("access:{brand_id}")
}

/// Where a copy reads a brand's catalog from: the brand's database and the server it is on.
#[derive(Clone, Copy)]
pub struct BrandSource<'a> {
    pub db: &'a DatabaseName,
    pub server: &'a Server,
}

/// Rows per INSERT: 500 × 11 parameters stays far below MySQL's 65,535-placeholder limit.
const ROWS_PER_STATEMENT: usize = 500;

type Q<'q> = Query<'q, MySql, MySqlArguments>;

fn bind_cell<'q>(q: Q<'q>, cell: &Cell) -> Q<'q> {
    match cell {
        Cell::Null => q.bind(None::<String>),
        Cell::Text(s) => q.bind(s.clone()),
        Cell::Int(i) => q.bind(*i),
        Cell::Bool(b) => q.bind(*b),
    }
}

fn placeholders(n: usize) -> String {
    format!("({})", crate::store::schema::placeholders(n))
}

/// Upserts and removals into the brand's own table.
///
/// `removed` are the codes with a removal marker (from [`stored_revisions`]): only those are
/// cleared when they come back, so a batch without returning codes sends no delete at all.
pub async fn write_brand(
    tx: &mut Transaction<'_, MySql>,
    db: &DatabaseName,
    spec: &CatalogSpec,
    change: &NetChange,
    removed: &Removed,
) -> Result<(), sqlx::Error> {
    let mut columns: Vec<&str> = spec.columns.iter().map(String::as_str).collect();
    columns.push(&spec.brand_revision_column);
    for chunk in change.upserts.chunks(ROWS_PER_STATEMENT) {
        let sql = upsert_sql(
            db,
            &spec.brand_table,
            &columns,
            &spec.key_column,
            chunk.len(),
        );
        let mut q = sqlx::query(&sql);
        for row in chunk {
            for cell in row {
                q = bind_cell(q, cell);
            }
        }
        q.execute(&mut **tx).await?;
        // A code back in the catalog is no longer removed: the table then holds each code's
        // latest change only, whichever way a run happened to batch its events.
        let key = spec.key_index();
        let back: Vec<&Cell> = chunk
            .iter()
            .map(|row| &row[key])
            .filter(|c| match c {
                Cell::Text(code) => removed.contains(code),
                Cell::Int(code) => removed.contains(&code.to_string()),
                _ => false,
            })
            .collect();
        if !back.is_empty() {
            let sql = format!(
                "DELETE FROM {}.`{}` WHERE `{}` IN ({})",
                db.quoted(),
                spec.brand_removed_table,
                spec.key_column,
                crate::store::schema::placeholders(back.len())
            );
            let mut q = sqlx::query(&sql);
            for cell in back {
                q = bind_cell(q, cell);
            }
            q.execute(&mut **tx).await?;
        }
    }
    for chunk in change.removals.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "DELETE FROM {}.`{}` WHERE `{}` IN ({})",
            db.quoted(),
            spec.brand_table,
            spec.key_column,
            crate::store::schema::placeholders(chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for (code, _) in chunk {
            q = q.bind(code.clone());
        }
        q.execute(&mut **tx).await?;
        // The removal's revision stays, so an older event cannot bring the code back.
        let sql = format!(
            "INSERT INTO {}.`{}` (`{}`, `{}`) VALUES {} \
             ON DUPLICATE KEY UPDATE `{rev}` = GREATEST(`{rev}`, VALUES(`{rev}`))",
            db.quoted(),
            spec.brand_removed_table,
            spec.key_column,
            spec.brand_revision_column,
            vec!["(?,?)"; chunk.len()].join(","),
            rev = spec.brand_revision_column,
        );
        let mut q = sqlx::query(&sql);
        for (code, revision) in chunk {
            q = q.bind(code.clone()).bind(*revision);
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// The newest revision the brand holds for each of `codes` (its row's, or the removal's), and
/// which of them have a removal marker.
pub async fn stored_revisions(
    tx: &mut Transaction<'_, MySql>,
    db: &DatabaseName,
    spec: &CatalogSpec,
    codes: &[String],
) -> Result<(std::collections::HashMap<String, i64>, Removed), sqlx::Error> {
    let mut stored = std::collections::HashMap::new();
    let mut removed = Removed::new();
    for chunk in codes.chunks(ROWS_PER_STATEMENT) {
        let list = crate::store::schema::placeholders(chunk.len());
        let sql = format!(
            "SELECT `{key}`, `{rev}`, 0 FROM {db}.`{rows}` WHERE `{key}` IN ({list}) \
             UNION ALL SELECT `{key}`, `{rev}`, 1 FROM {db}.`{removed}` WHERE `{key}` IN ({list})",
            key = spec.key_column,
            rev = spec.brand_revision_column,
            db = db.quoted(),
            rows = spec.brand_table,
            removed = spec.brand_removed_table,
        );
        let mut q = sqlx::query_as::<_, (String, i64, i32)>(&sql);
        for _ in 0..2 {
            for code in chunk {
                q = q.bind(code);
            }
        }
        for (code, revision, marker) in q.fetch_all(&mut **tx).await? {
            if marker == 1 {
                removed.insert(code.clone());
            }
            let entry = stored.entry(code).or_insert(revision);
            *entry = (*entry).max(revision);
        }
    }
    Ok((stored, removed))
}

/// Codes that have a removal marker in the brand's database.
pub type Removed = std::collections::HashSet<String>;

fn upsert_sql(db: &DatabaseName, table: &str, columns: &[&str], key: &str, rows: usize) -> String {
    let quoted: Vec<String> = columns.iter().map(|c| format!("`{c}`")).collect();
    let updates: Vec<String> = columns
        .iter()
        .filter(|c| **c != key)
        .map(|c| format!("`{c}` = VALUES(`{c}`)"))
        .collect();
    format!(
        "INSERT INTO {}.`{table}` ({}) VALUES {} ON DUPLICATE KEY UPDATE {}",
        db.quoted(),
        quoted.join(","),
        vec![placeholders(columns.len()); rows].join(","),
        updates.join(",")
    )
}

/// The same change in a supplier's copy, with `hidden` columns NULL.
pub async fn write_copy(
    tx: &mut Transaction<'_, MySql>,
    supplier_db: &DatabaseName,
    spec: &CatalogSpec,
    brand_id: &str,
    change: &NetChange,
    hidden: &[&str],
) -> Result<(), sqlx::Error> {
    let mut columns: Vec<&str> = vec![&spec.supplier_brand_column];
    columns.extend(spec.columns.iter().map(String::as_str));
    for chunk in change.upserts.chunks(ROWS_PER_STATEMENT) {
        let sql = upsert_sql(
            supplier_db,
            &spec.supplier_table,
            &columns,
            &spec.key_column,
            chunk.len(),
        );
        let mut q = sqlx::query(&sql);
        for row in chunk {
            q = q.bind(brand_id.to_owned());
            // The row carries the revision last; the copy does not.
            for (column, cell) in spec.columns.iter().zip(row) {
                q = if hidden.contains(&column.as_str()) {
                    bind_cell(q, &Cell::Null)
                } else {
                    bind_cell(q, cell)
                };
            }
        }
        q.execute(&mut **tx).await?;
    }
    for chunk in change.removals.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "DELETE FROM {}.`{}` WHERE `{}` = ? AND `{}` IN ({})",
            supplier_db.quoted(),
            spec.supplier_table,
            spec.supplier_brand_column,
            spec.key_column,
            crate::store::schema::placeholders(chunk.len())
        );
        let mut q = sqlx::query(&sql).bind(brand_id.to_owned());
        for (code, _) in chunk {
            q = q.bind(code.clone());
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Removes one brand's rows from a supplier's copy.
pub async fn drop_copy(
    tx: &mut Transaction<'_, MySql>,
    supplier_db: &DatabaseName,
    spec: &CatalogSpec,
    brand_id: &str,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(&format!(
        "DELETE FROM {}.`{}` WHERE `{}` = ?",
        supplier_db.quoted(),
        spec.supplier_table,
        spec.supplier_brand_column
    ))
    .bind(brand_id)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}

/// Replaces a supplier's copy of one brand with the brand's current projection: the
/// permission-checked read of the brand DB (the caller passes the supplier's permissions as
/// `hidden` columns; no other brand is touched). `tx` is on the `into` server.
pub async fn rebuild_copy(
    tx: &mut Transaction<'_, MySql>,
    into: &Server,
    supplier_db: &DatabaseName,
    brand: BrandSource<'_>,
    spec: &CatalogSpec,
    brand_id: &str,
    hidden: &[&str],
) -> Result<u64, sqlx::Error> {
    drop_copy(tx, supplier_db, spec, brand_id).await?;
    Ok(
        insert_copy(tx, into, supplier_db, brand, spec, brand_id, hidden)
            .await?
            .0,
    )
}

/// A brand's offsets of its projection, `(topic, partition, offset)`.
pub type BrandOffsets = Vec<(String, i32, i64)>;

/// [`rebuild_copy`] into a copy known to be empty: no DELETE, so none of its gap locks, and
/// copies of several brands can be filled at once. On one server, one INSERT … SELECT; from
/// a brand on another server, the rows pass through this process ([`copy_across`]).
///
/// Returns the rows copied and the brand's offsets, read right after its rows in the same
/// snapshot, so they describe them even with the brand's writers running: in `tx` when both
/// are on one server, else in the read transaction on the brand's server.
pub async fn insert_copy(
    tx: &mut Transaction<'_, MySql>,
    into: &Server,
    supplier_db: &DatabaseName,
    brand: BrandSource<'_>,
    spec: &CatalogSpec,
    brand_id: &str,
    hidden: &[&str],
) -> Result<(u64, BrandOffsets), sqlx::Error> {
    if into != brand.server {
        let mut read = brand.server.reads().begin().await?;
        let rows =
            copy_across(&mut read, brand.db, tx, supplier_db, spec, brand_id, hidden).await?;
        let offsets = crate::store::offsets::all(&mut read, brand.db, &spec.projection).await?;
        read.commit().await?;
        return Ok((rows, offsets));
    }
    let brand_db = brand.db;
    let target: Vec<String> = std::iter::once(&spec.supplier_brand_column)
        .chain(&spec.columns)
        .map(|c| format!("`{c}`"))
        .collect();
    let source = copied_columns(spec, hidden, |c| format!("`{c}`"));
    let done = sqlx::query(&format!(
        "INSERT INTO {}.`{}` ({}) SELECT ?, {} FROM {}.`{}`",
        supplier_db.quoted(),
        spec.supplier_table,
        target.join(","),
        source.join(","),
        brand_db.quoted(),
        spec.brand_table
    ))
    .bind(brand_id)
    .execute(&mut **tx)
    .await?;
    let offsets = crate::store::offsets::all(tx, brand_db, &spec.projection).await?;
    Ok((done.rows_affected(), offsets))
}

/// [`insert_copy`] from a brand on another server: the brand's rows are read in `read` (a
/// transaction on the brand's server, in which the offsets they reflect are read next) and written into the copy in `tx`, [`ROWS_PER_STATEMENT`] rows a statement,
/// never all of them in memory. Values travel as text, as a client's literals would, and
/// MySQL converts them back to the copy's column types (`tests/placement.rs` checks the result
/// equals an INSERT … SELECT's, column for column).
async fn copy_across(
    read: &mut Transaction<'_, MySql>,
    brand_db: &DatabaseName,
    tx: &mut Transaction<'_, MySql>,
    supplier_db: &DatabaseName,
    spec: &CatalogSpec,
    brand_id: &str,
    hidden: &[&str],
) -> Result<u64, sqlx::Error> {
    let source = copied_columns(spec, hidden, |c| format!("CAST(`{c}` AS CHAR)"));
    let select = format!(
        "SELECT {} FROM {}.`{}`",
        source.join(","),
        brand_db.quoted(),
        spec.brand_table
    );
    let mut columns: Vec<&str> = vec![&spec.supplier_brand_column];
    columns.extend(spec.columns.iter().map(String::as_str));
    let quoted: Vec<String> = columns.iter().map(|c| format!("`{c}`")).collect();
    let mut batch: Vec<Vec<Option<String>>> = Vec::with_capacity(ROWS_PER_STATEMENT);
    let mut written = 0;
    let mut rows = sqlx::query(&select).fetch(&mut **read);
    loop {
        let next = rows.try_next().await?;
        if let Some(row) = &next {
            use sqlx::Row;
            batch.push(
                (0..spec.columns.len())
                    .map(|i| row.try_get::<Option<String>, _>(i))
                    .collect::<Result<_, _>>()?,
            );
        }
        if batch.len() == ROWS_PER_STATEMENT || (next.is_none() && !batch.is_empty()) {
            let sql = format!(
                "INSERT INTO {}.`{}` ({}) VALUES {}",
                supplier_db.quoted(),
                spec.supplier_table,
                quoted.join(","),
                vec![placeholders(columns.len()); batch.len()].join(",")
            );
            let mut q = sqlx::query(&sql);
            for row in batch.drain(..) {
                q = q.bind(brand_id.to_owned());
                for cell in row {
                    q = q.bind(cell);
                }
            }
            written += q.execute(&mut **tx).await?.rows_affected();
        }
        if next.is_none() {
            return Ok(written);
        }
    }
}

/// What a copy takes of each catalog column, in order: NULL where the supplier may not see it
/// (`hidden`), else `shown(column)`.
fn copied_columns(
    spec: &CatalogSpec,
    hidden: &[&str],
    shown: impl Fn(&str) -> String,
) -> Vec<String> {
    spec.columns
        .iter()
        .map(|c| match hidden.contains(&c.as_str()) {
            true => "NULL".to_owned(),
            false => shown(c),
        })
        .collect()
}

/// Suppliers per UNION query: keeps statements short.
const SUPPLIERS_PER_QUERY: usize = 100;

/// One value per database, in order (`None` where its `select` finds no row): one `UNION ALL`
/// query per hundred databases instead of one query each. `select(db)` is that database's
/// `SELECT` of one column; `params` are bound to each database's part.
async fn per_database<T>(
    pool: &sqlx::MySqlPool,
    dbs: &[&DatabaseName],
    select: impl Fn(&DatabaseName) -> String,
    params: &[&str],
) -> Result<Vec<Option<T>>, sqlx::Error>
where
    T: for<'r> sqlx::Decode<'r, MySql> + sqlx::Type<MySql> + Send + Unpin,
{
    let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(dbs.len()).collect();
    for (chunk_no, chunk) in dbs.chunks(SUPPLIERS_PER_QUERY).enumerate() {
        let sql = chunk
            .iter()
            .enumerate()
            .map(|(i, db)| format!("SELECT {i} AS n, v FROM ({}) AS one_{i}", select(db)))
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let mut q = sqlx::query_as::<_, (i64, T)>(&sql);
        for _ in chunk {
            for p in params {
                q = q.bind(*p);
            }
        }
        for (n, value) in q.fetch_all(pool).await? {
            out[chunk_no * SUPPLIERS_PER_QUERY + n as usize] = Some(value);
        }
    }
    Ok(out)
}

/// Each supplier database's permissions on `brand_id` (`None` without a grant row), in order.
pub async fn permissions_of(
    pool: &sqlx::MySqlPool,
    dbs: &[&DatabaseName],
    brand_id: &str,
) -> Result<Vec<Option<Vec<String>>>, sqlx::Error> {
    let json: Vec<Option<String>> = per_database(
        pool,
        dbs,
        |db| {
            format!(
                "SELECT CAST(permissions AS CHAR) AS v FROM {}.brand_access WHERE brand_id = ?",
                db.quoted()
            )
        },
        &[brand_id],
    )
    .await?;
    Ok(json
        .into_iter()
        .map(|j| j.and_then(|j| serde_json::from_str(&j).ok()))
        .collect())
}

/// Each database's offset for `projection` on one partition, in order.
pub async fn offsets_of(
    pool: &sqlx::MySqlPool,
    dbs: &[&DatabaseName],
    projection: &str,
    topic: &str,
    partition: i32,
) -> Result<Vec<Option<i64>>, sqlx::Error> {
    per_database(
        pool,
        dbs,
        // The partition is an integer: written into the text, not bound.
        |db| {
            format!(
                "SELECT `offset` AS v FROM {}.projection_offsets \
                 WHERE projection = ? AND topic = ? AND `partition` = {partition}",
                db.quoted()
            )
        },
        &[projection, topic],
    )
    .await
}
