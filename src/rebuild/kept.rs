//! How long the tables a rebuild replaced are kept (`--keep-old`), and their expiry, run by
//! every worker next to the purge timer.

use std::time::Duration;

use sqlx::MySqlPool;
use tokio_util::sync::CancellationToken;

use crate::store::locks::NamedLock;
use crate::store::tenants::Tenants;
use crate::tenant::{Namespace, ServiceDatabase};

fn table(ns: &Namespace) -> String {
    format!(
        "{}.kept_copies",
        ns.service_database(ServiceDatabase::Platform).quoted()
    )
}

/// Records that `organisation_id`'s old tables are kept for `keep`.
pub async fn keep(
    pool: &MySqlPool,
    ns: &Namespace,
    organisation_id: &str,
    keep: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "REPLACE INTO {} (organisation_id, kept_until) VALUES (?, UTC_TIMESTAMP(3) + INTERVAL ? SECOND)",
        table(ns)
    ))
    .bind(organisation_id)
    .bind(keep.as_secs())
    .execute(pool)
    .await?;
    Ok(())
}

/// Forgets the record (the old tables were dropped or brought back).
pub async fn forget(
    pool: &MySqlPool,
    ns: &Namespace,
    organisation_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "DELETE FROM {} WHERE organisation_id = ?",
        table(ns)
    ))
    .bind(organisation_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Drops every kept copy past its time; returns how many. Each is dropped under the tenant's
/// rebuild claim, so a rollback or rebuild running now is never pulled from under; those are
/// tried again next time.
pub async fn expire(tenants: &Tenants) -> Result<usize, sqlx::Error> {
    let (ns, pool) = (tenants.namespace(), tenants.servers().home().pool());
    let due: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT organisation_id FROM {} WHERE kept_until < UTC_TIMESTAMP(3)",
        table(ns)
    ))
    .fetch_all(pool)
    .await?;
    let mut dropped = 0;
    for org in due {
        // The name is derived from the id, never taken from a row as text.
        let Some(old) = ns.old_database(&org) else {
            forget(pool, ns, &org).await?;
            continue;
        };
        let Some(claim) = NamedLock::rebuild(pool, ns, &org).await? else {
            continue;
        };
        let done = async {
            // On every server: after a move the replaced tables are on the one it left.
            for server in tenants.servers().all() {
                sqlx::query(&format!("DROP DATABASE IF EXISTS {}", old.quoted()))
                    .execute(server.pool())
                    .await?;
            }
            forget(pool, ns, &org).await
        }
        .await;
        claim.release().await;
        done?;
        tracing::info!(organisation_id = %org, database = %old, "kept copy of a rebuilt tenant expired: dropped");
        dropped += 1;
    }
    Ok(dropped)
}

/// [`expire`] every `every` until `shutdown`. Failures are logged and tried again: nothing
/// depends on the old copies going on time.
pub async fn expire_every(tenants: Tenants, every: Duration, shutdown: CancellationToken) {
    loop {
        if let Err(e) = expire(&tenants).await {
            tracing::warn!(error = %e, "cannot expire kept copies of rebuilt tenants");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
