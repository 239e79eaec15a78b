//! What `tenancy serve` answers when it cannot answer: a status, a stable machine-readable
//! code and a sentence, as `{"error": {"code": …, "message": …}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Seconds a client is told to wait on a 503.
pub const RETRY_AFTER_SECS: u64 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable for clients to match on, e.g. `invalid_slug`, `no_access`.
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_token", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "no_access", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "unknown_tenant", message)
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GONE, "tenant_archived", message)
    }

    /// 503 with `Retry-After`: the tenant is changing, busy, or a shared service is down.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// A shared service (MySQL, Redis) failed: logged with the detail, answered as a 503.
    pub fn service(what: &str, detail: impl std::fmt::Display) -> Self {
        tracing::warn!(service = what, error = %detail, "request failed on a shared service");
        Self::unavailable(
            "service_unavailable",
            format!("{what} is not answering; try again shortly"),
        )
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        // The server-side bounds set on every connection (`serve::Api::connect`): lock wait
        // timeout, MariaDB's max_statement_time, MySQL's max_execution_time.
        const TIMED_OUT: [u16; 3] = [1205, 1969, 3024];
        let number = e
            .as_database_error()
            .and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
            .map(|m| m.number());
        match e {
            sqlx::Error::PoolTimedOut => ApiError::unavailable(
                "pool_exhausted",
                "every database connection is busy; try again shortly",
            ),
            _ if number.is_some_and(|n| TIMED_OUT.contains(&n)) => ApiError::unavailable(
                "timeout",
                "the tenant's database did not answer in time; try again shortly",
            ),
            // Unknown database or table: a lifecycle step or a move (`tenancy rebuild
            // --to-server`) took the tables from where this request was sent, in the instant
            // before its resolution was refreshed. The next request resolves afresh.
            _ if number.is_some_and(|n| n == 1049 || n == 1146) => ApiError::unavailable(
                "tenant_changing",
                "the tenant's database is being moved, archived or restored; try again shortly",
            ),
            other => ApiError::service("MySQL", other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}
