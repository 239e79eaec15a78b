//! How a step of the consumer loop failed, classified once, here.
//!
//! Three answers, three reactions (Kafka Connect's `errors.tolerance` split):
//!
//! - [`StepError::Outage`]: a shared service (MySQL, Redis, the broker, the schema registry) is
//!   down or unreachable. Nothing is wrong with the event; the loop waits with backoff for as
//!   long as it takes, and readiness and metrics say which service it is waiting for.
//! - [`StepError::Retry`]: something about *this* event may heal (deadlock, lock wait timeout,
//!   a table moved by a lifecycle step). Retried a bounded number of times, then dead-lettered
//!   with the last error as the reason.
//! - [`StepError::Reject`]: retrying cannot help. Dead-lettered at once with the reason.

use std::fmt;

use sqlx::mysql::MySqlDatabaseError;

/// A service every event depends on; its outage is waited out, never blamed on an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    Mysql,
    Redis,
    Kafka,
    Registry,
}

impl Service {
    pub const ALL: [Service; 4] = [
        Service::Mysql,
        Service::Redis,
        Service::Kafka,
        Service::Registry,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Service::Mysql => "mysql",
            Service::Redis => "redis",
            Service::Kafka => "kafka",
            Service::Registry => "registry",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a step failed; see the module documentation for what the loop does with each.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("{service} unavailable: {error:#}")]
    Outage {
        service: Service,
        error: anyhow::Error,
    },
    #[error("{0:#}")]
    Retry(anyhow::Error),
    #[error("{0}")]
    Reject(String),
}

impl StepError {
    pub fn outage(service: Service, error: impl Into<anyhow::Error>) -> StepError {
        StepError::Outage {
            service,
            error: error.into(),
        }
    }

    pub fn retry(error: impl Into<anyhow::Error>) -> StepError {
        StepError::Retry(error.into())
    }

    pub fn reject(reason: impl Into<String>) -> StepError {
        StepError::Reject(reason.into())
    }

    /// The same error with `what` in front of its message (e.g. the tenant and step).
    pub fn context(self, what: impl fmt::Display) -> StepError {
        match self {
            StepError::Outage { service, error } => StepError::Outage {
                service,
                error: error.context(what.to_string()),
            },
            StepError::Retry(e) => StepError::Retry(e.context(what.to_string())),
            StepError::Reject(reason) => StepError::Reject(format!("{what}: {reason}")),
        }
    }

    /// A short label for metrics.
    pub fn class(&self) -> &'static str {
        match self {
            StepError::Outage { .. } => "outage",
            StepError::Retry(_) => "retry",
            StepError::Reject(_) => "reject",
        }
    }
}

/// What a MySQL error means for the event being applied. The one place error codes are read.
pub fn mysql_class(e: &sqlx::Error) -> MysqlClass {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        // A tenant on a server this process was not given (`TENANCY_SERVERS`): this process's
        // configuration is at fault, not the event; it waits, saying so, until restarted right.
        | sqlx::Error::Configuration(_) => MysqlClass::Outage,
        sqlx::Error::Database(db) => match db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(|m| m.number())
        {
            // too many connections, server gone away / lost, shutting down, connection killed
            Some(1040 | 2002 | 2003 | 2006 | 2013 | 1053 | 1927 | 1077 | 1081) => {
                MysqlClass::Outage
            }
            // deadlock, lock wait timeout (row or metadata), query interrupted, a statement over
            // its time limit (MariaDB 1969, MySQL 3024), unknown database/table (a lifecycle
            // step moved it; the retry gates the event again)
            Some(1213 | 1205 | 1317 | 1969 | 3024 | 1049 | 1146) => MysqlClass::Retry,
            _ => MysqlClass::Reject,
        },
        _ => MysqlClass::Reject,
    }
}

/// See [`mysql_class`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MysqlClass {
    Outage,
    Retry,
    Reject,
}

impl From<sqlx::Error> for StepError {
    fn from(e: sqlx::Error) -> Self {
        match mysql_class(&e) {
            MysqlClass::Outage => StepError::outage(Service::Mysql, e),
            MysqlClass::Retry => StepError::retry(e),
            MysqlClass::Reject => StepError::Reject(format!("SQL failed: {e}")),
        }
    }
}

impl From<redis::RedisError> for StepError {
    fn from(e: redis::RedisError) -> Self {
        // A client-side refusal (an id that cannot form a key) is about the event; anything
        // else from Redis is the server or the connection.
        if e.kind() == redis::ErrorKind::Client {
            StepError::Reject(format!("Redis refused: {e}"))
        } else {
            StepError::outage(Service::Redis, e)
        }
    }
}

impl From<crate::log::wire::DecodeError> for StepError {
    fn from(e: crate::log::wire::DecodeError) -> Self {
        if e.is_transient() {
            StepError::outage(Service::Registry, e)
        } else {
            StepError::Reject(e.to_string())
        }
    }
}

/// Producing to the broker failed: the broker is the shared service at fault.
pub fn kafka_outage(e: impl Into<anyhow::Error>) -> StepError {
    StepError::outage(Service::Kafka, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_and_io_failures_are_outages_not_the_events_fault() {
        assert_eq!(mysql_class(&sqlx::Error::PoolTimedOut), MysqlClass::Outage);
        let io = sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(matches!(
            StepError::from(io),
            StepError::Outage {
                service: Service::Mysql,
                ..
            }
        ));
        assert!(matches!(
            StepError::from(sqlx::Error::RowNotFound),
            StepError::Reject(_)
        ));
    }

    #[test]
    fn context_keeps_the_class() {
        let e = StepError::reject("no such brand").context("tenant 42");
        assert_eq!(e.to_string(), "tenant 42: no such brand");
        assert_eq!(
            StepError::retry(anyhow::anyhow!("deadlock"))
                .context("x")
                .class(),
            "retry"
        );
    }
}
