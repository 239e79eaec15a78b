//! Shadow against live: every table's rows, by primary key, with the columns that record when a
//! row was written left out (they differ by construction), and event ids only as far back as
//! the live database keeps them ([`IdWindow`]).

use std::collections::BTreeMap;

use std::fmt;

use sqlx::MySqlPool;

use crate::store::schema::tables;
use crate::tenant::DatabaseName;

/// Columns that say when a row was written, not what it holds.
const WRITE_TIME_COLUMNS: [&str; 2] = ["updated_at", "applied_at"];

/// sqlx's bookkeeping: the same migrations, applied at other times.
const NOT_COMPARED: [&str; 1] = ["_sqlx_migrations"];

/// One row that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub table: String,
    /// The primary key's values, `|`-separated.
    pub key: String,
    pub kind: DifferenceKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DifferenceKind {
    OnlyLive,
    OnlyRebuilt,
    Differs,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            DifferenceKind::OnlyLive => "only in the live database",
            DifferenceKind::OnlyRebuilt => "only in the rebuilt database",
            DifferenceKind::Differs => "differs",
        };
        write!(f, "{} [{}]: {what}", self.table, self.key)
    }
}

/// Rows per table on each side, and what differs.
#[derive(Debug, Default)]
pub struct Comparison {
    /// table → (live rows, rebuilt rows)
    pub counts: BTreeMap<String, (usize, usize)>,
    pub differences: Vec<Difference>,
    /// How long the comparison took (both sides are read at once).
    pub elapsed: std::time::Duration,
}

/// An identifier read from the server's catalog, checked before it is quoted into SQL.
pub(super) fn identifier(name: &str) -> Result<&str, sqlx::Error> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(name)
    } else {
        Err(sqlx::Error::Protocol(format!(
            "unexpected identifier {name:?} in the catalog"
        )))
    }
}

/// The table's compared columns and primary key columns, in order.
async fn columns(
    pool: &MySqlPool,
    db: &DatabaseName,
    table: &str,
) -> Result<(Vec<String>, Vec<String>), sqlx::Error> {
    let all: Vec<(String, String)> = sqlx::query_as(
        "SELECT CAST(COLUMN_NAME AS CHAR), CAST(COLUMN_KEY AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
    )
    .bind(db.as_str())
    .bind(table)
    .fetch_all(pool)
    .await?;
    let compared = all
        .iter()
        .filter(|(c, _)| !WRITE_TIME_COLUMNS.contains(&c.as_str()))
        .map(|(c, _)| c.clone())
        .collect();
    let key = all
        .iter()
        .filter(|(_, k)| k == "PRI")
        .map(|(c, _)| c.clone())
        .collect();
    Ok((compared, key))
}

/// The parts of a table's row query: the key expression, the row's text, and the FROM clause
/// (with the id window for `applied_events`, whose values [`RowSql::bind`] binds).
struct RowSql<'w> {
    key: String,
    row: String,
    from: String,
    window: Option<&'w IdWindow>,
}

impl<'w> RowSql<'w> {
    fn new(
        db: &DatabaseName,
        table: &str,
        compared: &[String],
        key: &[String],
        window: &'w IdWindow,
    ) -> Result<RowSql<'w>, sqlx::Error> {
        let text = |c: &String| -> Result<String, sqlx::Error> {
            // NULL is spelled out, so it differs from an empty string.
            Ok(format!(
                "COALESCE(CAST(t.`{}` AS CHAR), '\\N')",
                identifier(c)?
            ))
        };
        let key_cols = if key.is_empty() { compared } else { key };
        let key_expr = key_cols.iter().map(text).collect::<Result<Vec<_>, _>>()?;
        let row_expr = compared.iter().map(text).collect::<Result<Vec<_>, _>>()?;
        let window = (table == "applied_events").then_some(window);
        let filter = window.map(IdWindow::filter).unwrap_or_default();
        Ok(RowSql {
            key: format!("CONCAT_WS('|', {})", key_expr.join(", ")),
            row: format!("CONCAT_WS(0x1f, {})", row_expr.join(", ")),
            from: format!("{}.`{}` t{filter}", db.quoted(), identifier(table)?),
            window,
        })
    }

    /// `SELECT key, digest` of every row, in byte order of the key (the order Rust compares
    /// strings in), so two sides can be merged as they stream.
    fn rows(&self) -> String {
        format!(
            "SELECT {k} AS k, MD5({}) FROM {} ORDER BY CAST({k} AS BINARY)",
            self.row,
            self.from,
            k = self.key
        )
    }

    /// The table's row count and checksum, in one scan without a sort: the sums of two CRC-32s
    /// of each row's text (each row's includes its key, so no two rows cancel out), one of it
    /// read forwards and one backwards. Each is a different linear function of the row, so a
    /// random change escapes both with a chance of about 2^-64 (one CRC alone: 2^-32); MD5 gave
    /// 128 bits but cost three times as much here (500,000 rows: 0.6–0.9 s a side against 1.6 s).
    /// This finds projection bugs, not forgeries: rows are not adversarial input here.
    fn checksum(&self) -> String {
        format!(
            "SELECT COUNT(*), CAST(COALESCE(SUM(CRC32(r)), 0) AS CHAR), \
             CAST(COALESCE(SUM(CRC32(REVERSE(r))), 0) AS CHAR) FROM (SELECT {} AS r FROM {}) x",
            self.row, self.from
        )
    }

    /// `q` with the id window's values bound, in the order [`IdWindow::filter`] names them.
    fn bind<'q, O>(
        &'q self,
        mut q: sqlx::query::QueryAs<'q, sqlx::MySql, O, sqlx::mysql::MySqlArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::MySql, O, sqlx::mysql::MySqlArguments> {
        for (projection, topic, partition, since) in self.window.map_or(&[][..], |w| &w.since) {
            q = q.bind(projection).bind(topic).bind(partition).bind(since);
        }
        q
    }
}

/// Event ids are kept [`crate::store::applied::WINDOW_DAYS`] days, and the live database prunes the expired
/// ones a few at a time, while a replay records every id afresh. So `applied_events` is
/// compared, on both sides, from the oldest id the live database still keeps unexpired per
/// (projection, topic, partition): ids written in offset order, older ones expired first. The
/// older ids a rebuilt database keeps are harmless (more remembered ids) and age out in turn.
/// Read once per comparison, so both sides are cut at the same offsets (and the live table is
/// not scanned again for each side).
struct IdWindow {
    /// (projection, topic, partition, oldest unexpired offset)
    since: Vec<(String, String, i32, i64)>,
}

impl IdWindow {
    async fn read(pool: &MySqlPool, live: &DatabaseName) -> Result<IdWindow, sqlx::Error> {
        let since = sqlx::query_as(&format!(
            "SELECT CAST(projection AS CHAR), CAST(topic AS CHAR), `partition`, MIN(`offset`) \
             FROM {}.applied_events WHERE applied_at >= UTC_TIMESTAMP(3) - INTERVAL {} DAY \
             GROUP BY projection, topic, `partition`",
            live.quoted(),
            crate::store::applied::WINDOW_DAYS
        ))
        .fetch_all(pool)
        .await?;
        Ok(IdWindow { since })
    }

    /// ` WHERE …` keeping the rows inside the window: four placeholders per (projection,
    /// topic, partition), bound by [`RowSql::bind`].
    fn filter(&self) -> String {
        if self.since.is_empty() {
            return " WHERE FALSE".to_owned();
        }
        let one = "(t.projection = ? AND t.topic = ? AND t.`partition` = ? AND t.`offset` >= ?)";
        format!(" WHERE {}", vec![one; self.since.len()].join(" OR "))
    }
}

/// Compares every table of `live` (on `live_pool`'s server) with `rebuilt` (on
/// `rebuilt_pool`'s: the same server, or the one a move goes to), streaming both sides (memory
/// stays flat however large the tables are).
pub async fn compare(
    live_pool: &MySqlPool,
    rebuilt_pool: &MySqlPool,
    live: &DatabaseName,
    rebuilt: &DatabaseName,
) -> Result<Comparison, sqlx::Error> {
    use futures::TryStreamExt;
    let mut names = tables(live_pool, live).await?;
    names.extend(tables(rebuilt_pool, rebuilt).await?);
    names.sort();
    names.dedup();
    let started = std::time::Instant::now();
    let window = IdWindow::read(live_pool, live).await?;
    let mut out = Comparison::default();
    for table in names.iter().filter(|t| !NOT_COMPARED.contains(&t.as_str())) {
        // The rebuilt side's columns: both ran the same migrations.
        let (compared, key) = columns(rebuilt_pool, rebuilt, table).await?;
        if compared.is_empty() {
            out.differences.push(Difference {
                table: table.clone(),
                key: String::new(),
                kind: DifferenceKind::OnlyLive,
            });
            continue;
        }
        let live_sql = RowSql::new(live, table, &compared, &key, &window)?;
        let rebuilt_sql = RowSql::new(rebuilt, table, &compared, &key, &window)?;
        // Counts and checksums first: equal, the table is equal, and the row-by-row merge
        // (two sorts of every row) is needed only to say which rows differ.
        type Sum = (i64, String, String);
        let (l, r) = (live_sql.checksum(), rebuilt_sql.checksum());
        let (l, r) = tokio::try_join!(
            live_sql
                .bind(sqlx::query_as::<_, Sum>(&l))
                .fetch_one(live_pool),
            rebuilt_sql
                .bind(sqlx::query_as::<_, Sum>(&r))
                .fetch_one(rebuilt_pool),
        )?;
        if l == r {
            out.counts
                .insert(table.clone(), (l.0 as usize, r.0 as usize));
            continue;
        }
        let (live_rows_sql, rebuilt_rows_sql) = (live_sql.rows(), rebuilt_sql.rows());
        let mut a = live_sql
            .bind(sqlx::query_as::<_, (String, String)>(&live_rows_sql))
            .fetch(live_pool);
        let mut b = rebuilt_sql
            .bind(sqlx::query_as::<_, (String, String)>(&rebuilt_rows_sql))
            .fetch(rebuilt_pool);
        let (mut x, mut y) = (a.try_next().await?, b.try_next().await?);
        let (mut live_rows, mut rebuilt_rows) = (0, 0);
        let mut differ = |key: &str, kind| {
            out.differences.push(Difference {
                table: table.clone(),
                key: key.to_owned(),
                kind,
            })
        };
        loop {
            let order = match (&x, &y) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(l), Some(r)) => l.0.as_bytes().cmp(r.0.as_bytes()),
            };
            match order {
                std::cmp::Ordering::Less => {
                    differ(&x.as_ref().expect("live row").0, DifferenceKind::OnlyLive);
                    live_rows += 1;
                    x = a.try_next().await?;
                }
                std::cmp::Ordering::Greater => {
                    differ(
                        &y.as_ref().expect("rebuilt row").0,
                        DifferenceKind::OnlyRebuilt,
                    );
                    rebuilt_rows += 1;
                    y = b.try_next().await?;
                }
                std::cmp::Ordering::Equal => {
                    let (l, r) = (x.as_ref().expect("live"), y.as_ref().expect("rebuilt"));
                    if l.1 != r.1 {
                        differ(&l.0, DifferenceKind::Differs);
                    }
                    live_rows += 1;
                    rebuilt_rows += 1;
                    x = a.try_next().await?;
                    y = b.try_next().await?;
                }
            }
        }
        out.counts.insert(table.clone(), (live_rows, rebuilt_rows));
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_from_the_catalog_are_checked() {
        assert!(identifier("projection_offsets").is_ok());
        assert!(identifier("a`b").is_err());
        assert!(identifier("").is_err());
    }
}
