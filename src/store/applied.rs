//! `applied_events`: the ids of the events a projection applied, kept in the tenant database and
//! written in the same transaction as the rows they produced.
//!
//! Offsets (`projection_offsets`) make a redelivery harmless. The same event can also come back
//! at a new offset: a producer retrying without idempotence, `tenancy emit` run again on a file,
//! a dead-letter replay, a mirror. Its `event_id` is what identifies it then: an id already
//! applied by a projection in that database is skipped, at any offset.
//!
//! Ids are kept [`WINDOW_DAYS`] days after they were applied (longer than the 30-day grace, the
//! 3-day hold and any retry or replay path); each write prunes a few expired ones, so the table
//! stays bounded without a separate job. A row costs about 150 bytes with its index entries.

use std::collections::HashSet;

use sqlx::{MySql, Transaction};

use crate::log::Origin;
use crate::tenant::DatabaseName;

/// How long an applied id is remembered.
pub const WINDOW_DAYS: u32 = 35;

/// Expired ids deleted per write (amortised pruning).
const PRUNE_PER_WRITE: u32 = 200;

/// Ids per statement.
const CHUNK: usize = 500;

/// Which of `ids` `projection` has already applied in `db` (locks nothing: callers hold the
/// tenant's named lock, under which no other writer runs).
pub async fn seen(
    tx: &mut Transaction<'_, MySql>,
    db: &DatabaseName,
    projection: &str,
    ids: &[&str],
) -> Result<HashSet<String>, sqlx::Error> {
    let mut found = HashSet::new();
    for chunk in ids.chunks(CHUNK) {
        let sql = format!(
            "SELECT event_id FROM {}.applied_events WHERE projection = ? AND event_id IN ({})",
            db.quoted(),
            crate::store::schema::placeholders(chunk.len())
        );
        let mut q = sqlx::query_scalar::<_, String>(&sql).bind(projection);
        for id in chunk {
            q = q.bind(*id);
        }
        found.extend(q.fetch_all(&mut **tx).await?);
    }
    Ok(found)
}

/// Where `projection` first applied `event_id` in `db`, if it did.
pub async fn first_applied(
    tx: &mut Transaction<'_, MySql>,
    db: &DatabaseName,
    projection: &str,
    event_id: &str,
) -> Result<Option<(String, i32, i64)>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT topic, `partition`, `offset` FROM {}.applied_events WHERE projection = ? AND event_id = ?",
        db.quoted()
    ))
    .bind(projection)
    .bind(event_id)
    .fetch_optional(&mut **tx)
    .await
}

/// Records that `projection` applied these events, and prunes a few expired records.
pub async fn record(
    tx: &mut Transaction<'_, MySql>,
    db: &DatabaseName,
    projection: &str,
    events: &[(&str, &Origin)],
) -> Result<(), sqlx::Error> {
    for chunk in events.chunks(CHUNK) {
        let sql = format!(
            "INSERT IGNORE INTO {}.applied_events (event_id, projection, topic, `partition`, `offset`, applied_at) VALUES {}",
            db.quoted(),
            vec!["(?,?,?,?,?,UTC_TIMESTAMP(3))"; chunk.len()].join(",")
        );
        let mut q = sqlx::query(&sql);
        for (id, origin) in chunk {
            q = q
                .bind(*id)
                .bind(projection)
                .bind(&origin.topic)
                .bind(origin.partition)
                .bind(origin.offset);
        }
        q.execute(&mut **tx).await?;
    }
    if !events.is_empty() {
        sqlx::query(&format!(
            "DELETE FROM {}.applied_events WHERE applied_at < UTC_TIMESTAMP(3) - INTERVAL {WINDOW_DAYS} DAY LIMIT {PRUNE_PER_WRITE}",
            db.quoted()
        ))
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Forgets every id `projection` recorded in `db` (its rows went, e.g. a purged brand's).
pub async fn forget(
    tx: &mut Transaction<'_, MySql>,
    db: &DatabaseName,
    projection: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "DELETE FROM {}.applied_events WHERE projection = ?",
        db.quoted()
    ))
    .bind(projection)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Counts and logs a duplicate: the event `event_id` at `origin`, first applied at `first`.
pub fn duplicate(
    processor: &'static str,
    event_id: &str,
    origin: &Origin,
    first: Option<&(String, i32, i64)>,
) {
    metrics::counter!("tenancy_events_duplicate_total", "processor" => processor).increment(1);
    tracing::debug!(processor, event_id, topic = %origin.topic, partition = origin.partition,
        offset = origin.offset, first = ?first, tenant = origin.key.as_deref().unwrap_or("-"),
        "event already applied (by its id): skipped");
}
