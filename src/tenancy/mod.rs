//! Tenancy lifecycle: the tenant registry (`{ns}_platform.tenants`), migrations per database
//! kind, the provisioner, termination/restore/purge, and the outcome events on `{ns}.tenancy`.

pub mod lifecycle;
pub mod migrations;
pub mod outcomes;
pub mod provisioning;
pub mod tenants;

use sqlx::mysql::MySqlDatabaseError;

/// Whether a MySQL error is worth retrying (server gone, lock contention) rather than a fact
/// about the input. The one place MySQL error codes are interpreted.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(|m| {
                matches!(
                    m.number(),
                    // deadlock, lock wait timeout, too many connections, server gone/shutting down,
                    // query interrupted
                    1213 | 1205 | 1040 | 2006 | 2013 | 1053 | 1317 | 1927
                )
            })
            .unwrap_or(false),
        _ => false,
    }
}

/// A failure worth retrying, for a processor handler.
pub(crate) fn transient(e: impl Into<anyhow::Error>) -> crate::processor::HandleError {
    crate::processor::HandleError::Transient(e.into())
}

/// Database errors for a processor handler: retry the transient ones, dead-letter the rest.
pub(crate) fn db_error(context: &str, e: sqlx::Error) -> crate::processor::HandleError {
    use crate::processor::HandleError;
    if is_transient(&e) {
        HandleError::Transient(anyhow::Error::new(e).context(context.to_owned()))
    } else {
        HandleError::Permanent(format!("{context}: {e}"))
    }
}
