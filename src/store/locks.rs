//! MySQL named locks (`GET_LOCK`): what serialises work on one tenant across every worker.
//!
//! Named locks are always taken on the home server's pool, whichever server the tenant they
//! guard is on: a lock is only a lock among holders on one server.

use sqlx::pool::PoolConnection;
use sqlx::{MySql, MySqlPool, Row};

use crate::failure::StepError;
use crate::tenant::Namespace;

/// A MySQL named lock (`GET_LOCK`), held on its own pooled connection.
///
/// Locks serialise work on one tenant across every worker: named locks belong to the server,
/// not to a process, and a killed worker's connection closes and releases them at once.
pub struct NamedLock {
    /// `None` once released.
    conn: Option<PoolConnection<MySql>>,
    /// Every lock held on `conn` (a server holds several per connection).
    names: Vec<String>,
}

/// How long to wait for a named lock before reporting the event as worth retrying (within the
/// statement limit of a processor's connections, so the lock's own answer comes first).
const LOCK_WAIT_SECS: u32 = 20;

impl NamedLock {
    /// Serialises the catalog fan-out, grants and the purge of one brand's copies.
    pub async fn brand(
        pool: &MySqlPool,
        ns: &Namespace,
        brand_id: &str,
    ) -> Result<NamedLock, StepError> {
        Self::acquire(pool, Self::brand_name(ns, brand_id)).await
    }

    /// A tenant's own writes, for the writers no other lock covers: the access projector
    /// (after the brand's lock) for a supplier's database, the domains processor for a
    /// retailer's. `tenancy rebuild` holds it, with the rest, to fence the tenant for its swap.
    pub async fn writes(
        pool: &MySqlPool,
        ns: &Namespace,
        organisation_id: &str,
    ) -> Result<NamedLock, StepError> {
        Self::acquire(pool, Self::writes_name(ns, organisation_id)).await
    }

    pub fn brand_name(ns: &Namespace, brand_id: &str) -> String {
        format!("{ns}:b:{}", compact(brand_id))
    }

    pub fn writes_name(ns: &Namespace, organisation_id: &str) -> String {
        format!("{ns}:w:{}", compact(organisation_id))
    }

    /// Several locks on one connection, taken in the order given (callers sort them the way
    /// every other holder takes them). Released together.
    pub async fn all(pool: &MySqlPool, names: Vec<String>) -> Result<NamedLock, StepError> {
        let mut lock = NamedLock {
            conn: Some(pool.acquire().await?),
            names: Vec::with_capacity(names.len()),
        };
        for name in names {
            let conn = lock.conn.as_mut().expect("held");
            if !Self::get(conn, &name).await? {
                // Dropping `lock` closes its connection, which frees what it took so far.
                return Err(Self::waited(&name));
            }
            lock.names.push(name);
        }
        Ok(lock)
    }

    /// Serialises the lifecycle steps (create, terminate, restore, purge) of one organisation.
    pub async fn lifecycle(
        pool: &MySqlPool,
        ns: &Namespace,
        organisation_id: &str,
    ) -> Result<NamedLock, StepError> {
        Self::acquire(pool, format!("{ns}:l:{}", compact(organisation_id))).await
    }

    /// The lifecycle locks of many organisations, each taken only if free at once, in one
    /// statement on one connection: returns the lock and which of `organisation_ids` it holds.
    /// Never waiting means two holders of overlapping sets cannot deadlock; an organisation
    /// whose lock is busy is left to the caller's ordinary, waiting path.
    pub async fn lifecycles_if_free(
        pool: &MySqlPool,
        ns: &Namespace,
        organisation_ids: &[&str],
    ) -> Result<(NamedLock, Vec<bool>), sqlx::Error> {
        let names: Vec<String> = organisation_ids
            .iter()
            .map(|id| format!("{ns}:l:{}", compact(id)))
            .collect();
        let mut lock = NamedLock {
            conn: Some(pool.acquire().await?),
            names: Vec::new(),
        };
        let mut held = Vec::with_capacity(names.len());
        for chunk in names.chunks(500) {
            let sql = format!("SELECT {}", vec!["GET_LOCK(?, 0)"; chunk.len()].join(", "));
            let mut query = sqlx::query(&sql);
            for name in chunk {
                query = query.bind(name);
            }
            let row = query
                .fetch_one(&mut **lock.conn.as_mut().expect("held"))
                .await?;
            for (i, name) in chunk.iter().enumerate() {
                let got: Option<i64> = row.try_get(i)?;
                if got == Some(1) {
                    lock.names.push(name.clone());
                }
                held.push(got == Some(1));
            }
        }
        Ok((lock, held))
    }

    /// Claims the rebuild of one organisation without waiting: `None` while another rebuild,
    /// in any process on any host, holds it. A killed rebuild's claim goes with its connection.
    pub async fn rebuild(
        pool: &MySqlPool,
        ns: &Namespace,
        organisation_id: &str,
    ) -> Result<Option<NamedLock>, sqlx::Error> {
        let name = Self::rebuild_name(ns, organisation_id);
        let mut conn = pool.acquire().await?;
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 0)")
            .bind(&name)
            .fetch_one(&mut *conn)
            .await?;
        Ok((got == Some(1)).then(|| NamedLock {
            conn: Some(conn),
            names: vec![name],
        }))
    }

    /// The name of an organisation's rebuild claim (`tenancy status` asks whether it is held).
    pub fn rebuild_name(ns: &Namespace, organisation_id: &str) -> String {
        format!("{ns}:r:{}", compact(organisation_id))
    }

    async fn acquire(pool: &MySqlPool, name: String) -> Result<NamedLock, StepError> {
        let mut conn = pool.acquire().await?;
        if Self::get(&mut conn, &name).await? {
            Ok(NamedLock {
                conn: Some(conn),
                names: vec![name],
            })
        } else {
            Err(Self::waited(&name))
        }
    }

    /// GET_LOCK with the usual wait: whether it was granted.
    async fn get(conn: &mut PoolConnection<MySql>, name: &str) -> Result<bool, sqlx::Error> {
        // Names are limited to 64 characters: namespace (<= 24) + 3 + uuid without dashes (32).
        debug_assert!(name.len() <= 64, "lock name {name} too long");
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
            .bind(name)
            .bind(LOCK_WAIT_SECS)
            .fetch_one(&mut **conn)
            .await?;
        Ok(got == Some(1))
    }

    fn waited(name: &str) -> StepError {
        StepError::retry(anyhow::anyhow!(
            "waited {LOCK_WAIT_SECS}s for lock {name}, held by another worker"
        ))
    }

    /// Releases the lock and returns the connection to the pool. A lock dropped without this
    /// (an early return) closes its connection instead, which releases it just as surely.
    pub async fn release(mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // One statement for all of them (a batch of new tenants holds hundreds).
        for chunk in self.names.chunks(500) {
            let sql = format!("SELECT {}", vec!["RELEASE_LOCK(?)"; chunk.len()].join(", "));
            let mut query = sqlx::query(&sql);
            for name in chunk {
                query = query.bind(name);
            }
            if query.execute(&mut *conn).await.is_err() {
                let _ = conn.close().await;
                return;
            }
        }
    }
}

impl Drop for NamedLock {
    fn drop(&mut self) {
        // A pooled connection keeps its named locks: never hand one back still holding it.
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

/// A uuid without dashes (32 characters); other text unchanged.
fn compact(id: &str) -> String {
    id.replace('-', "")
}
