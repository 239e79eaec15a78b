//! How big each tenant's database is and how busy: what `tenancy tenants top` ranks, to choose
//! the tenants worth a server of their own (`tenancy rebuild ORG --to-server S`).
//!
//! Sizes are InnoDB's estimates in `information_schema.TABLES` (data and indexes; refreshed by
//! the server's statistics, so a table written a moment ago may not show it yet); events are
//! counted in each database's `applied_events`, which every projection writes once per event
//! it applies and keeps for 35 days.

use std::collections::HashMap;

use futures::StreamExt;
use sqlx::MySqlPool;

use crate::store::tenants::{Status, Tenants};
use crate::tenant::{DatabaseName, OrganisationType, Slug};

/// One tenant's database, its size and its recent events.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Usage {
    pub organisation_id: String,
    pub kind: OrganisationType,
    pub slug: String,
    pub status: Status,
    pub server: String,
    pub region: Option<String>,
    pub database: String,
    /// Data and indexes, bytes (InnoDB's estimate).
    pub bytes: u64,
    /// Rows in all its tables (InnoDB's estimate).
    pub rows: u64,
    /// Events applied in the last 24 hours and the last 7 days; None when its database could
    /// not be read (on a server this process was not given, or missing).
    pub events_last_day: Option<u64>,
    pub events_last_week: Option<u64>,
}

/// What ranks first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    /// Database size.
    Size,
    /// Events applied in the last 7 days.
    Events,
}

/// Every active tenant's database and archived tenant's archive, biggest (or busiest) first.
pub async fn ranked(tenants: &Tenants, by: By) -> anyhow::Result<Vec<Usage>> {
    let mut rows = tenants.list(Some(Status::Active)).await?;
    rows.extend(tenants.list(Some(Status::Archived)).await?);
    let ns = tenants.namespace();
    let mut found: Vec<(Usage, Option<MySqlPool>, DatabaseName)> = Vec::new();
    for t in rows {
        let database = match t.status {
            Status::Active => Slug::parse(&t.slug)
                .ok()
                .and_then(|slug| ns.tenant_database(t.organisation_type, &slug).ok()),
            _ => ns.archive_database(&t.organisation_id),
        };
        let Some(database) = database else { continue };
        let pool = tenants.server_of(&t).ok().map(|s| s.pool().clone());
        found.push((
            Usage {
                organisation_id: t.organisation_id,
                kind: t.organisation_type,
                slug: t.slug,
                status: t.status,
                server: t.server,
                region: t.region,
                database: database.to_string(),
                bytes: 0,
                rows: 0,
                events_last_day: None,
                events_last_week: None,
            },
            pool,
            database,
        ));
    }
    // Sizes: one query per server and 500 databases.
    for server in tenants.servers().all() {
        let names: Vec<&str> = found
            .iter()
            .filter(|(u, _, _)| u.server == server.name())
            .map(|(u, _, _)| u.database.as_str())
            .collect();
        let mut sizes: HashMap<String, (u64, u64)> = HashMap::new();
        for chunk in names.chunks(500) {
            let sql = format!(
                "SELECT TABLE_SCHEMA, CAST(SUM(DATA_LENGTH + INDEX_LENGTH) AS UNSIGNED), \
                 CAST(SUM(TABLE_ROWS) AS UNSIGNED) FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA IN ({}) GROUP BY TABLE_SCHEMA",
                crate::store::schema::placeholders(chunk.len())
            );
            let mut query = sqlx::query_as::<_, (String, Option<u64>, Option<u64>)>(&sql);
            for name in chunk {
                query = query.bind(*name);
            }
            for (schema, bytes, rows) in query.fetch_all(server.pool()).await? {
                sizes.insert(schema, (bytes.unwrap_or(0), rows.unwrap_or(0)));
            }
        }
        for (u, _, _) in found
            .iter_mut()
            .filter(|(u, _, _)| u.server == server.name())
        {
            if let Some((bytes, rows)) = sizes.get(&u.database) {
                (u.bytes, u.rows) = (*bytes, *rows);
            }
        }
    }
    // Events: one query per database, a few at a time.
    let counted: Vec<(usize, Option<(u64, u64)>)> = futures::stream::iter(found.iter().enumerate())
        .map(|(i, (_, pool, db))| async move {
            let Some(pool) = pool else { return (i, None) };
            (i, events(pool, db).await.ok())
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for (i, events) in counted {
        if let Some((day, week)) = events {
            found[i].0.events_last_day = Some(day);
            found[i].0.events_last_week = Some(week);
        }
    }
    let mut out: Vec<Usage> = found.into_iter().map(|(u, _, _)| u).collect();
    match by {
        By::Size => out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.slug.cmp(&b.slug))),
        By::Events => out.sort_by(|a, b| {
            b.events_last_week
                .cmp(&a.events_last_week)
                .then(b.bytes.cmp(&a.bytes))
                .then(a.slug.cmp(&b.slug))
        }),
    }
    Ok(out)
}

/// Events applied to `db` in the last day and the last week.
async fn events(pool: &MySqlPool, db: &DatabaseName) -> Result<(u64, u64), sqlx::Error> {
    let (day, week): (Option<u64>, Option<u64>) = sqlx::query_as(&format!(
        "SELECT CAST(SUM(applied_at >= NOW(3) - INTERVAL 1 DAY) AS UNSIGNED), \
         CAST(COUNT(*) AS UNSIGNED) FROM {}.applied_events \
         WHERE applied_at >= NOW(3) - INTERVAL 7 DAY",
        db.quoted()
    ))
    .fetch_one(pool)
    .await?;
    Ok((day.unwrap_or(0), week.unwrap_or(0)))
}
