//! Registry errors and their Confluent error codes.
//!
//! Confluent clients (Java serdes, `schema_registry_converter`, kcat, ...) branch on the numeric
//! `error_code` in the body rather than on the message, so every failure the store can produce is
//! a variant here with a fixed code. The HTTP status is always the first three digits of the code
//! (40401 → 404, 42201 → 422, 409 → 409), which is the convention Confluent itself follows; the
//! mapping lives in one place so the HTTP layer cannot drift from it.

/// Everything that can go wrong while serving a registry request.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// 40401: the subject has no (live) versions.
    #[error("Subject '{0}' not found.")]
    SubjectNotFound(String),
    /// 40402: the subject exists but the requested version does not.
    #[error("Version {version} not found.")]
    VersionNotFound {
        /// Requested version, as the client spelled it.
        version: String,
    },
    /// 40403: no schema with this id, or the schema is not registered under the subject.
    #[error("Schema not found")]
    SchemaNotFound,
    /// 40408: the subject has no compatibility level of its own.
    #[error("Subject '{0}' does not have subject-level compatibility configured")]
    SubjectLevelCompatibilityNotConfigured(String),
    /// 40405: a permanent delete was asked for a subject that was not soft-deleted first.
    #[error("Subject '{0}' was not deleted first before being permanently deleted")]
    SubjectNotSoftDeleted(String),
    /// 409: the schema fails the subject's compatibility level.
    #[error(
        "Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{}]",
        .details.join(", ")
    )]
    Incompatible {
        /// Subject the registration was attempted under.
        subject: String,
        /// Human-readable incompatibilities, one per failed check.
        details: Vec<String>,
    },
    /// 42201: the schema does not parse, or is not an Avro schema we can handle.
    #[error("Invalid schema {0}")]
    InvalidSchema(String),
    /// 42202: the version is neither a positive number, `latest` nor `-1`.
    #[error(
        "The specified version '{0}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
    )]
    InvalidVersion(String),
    /// 42203: the compatibility level is not one of the known names.
    #[error("Invalid compatibility level. Valid values are none, backward, forward, full, backward_transitive, forward_transitive, and full_transitive")]
    InvalidCompatibilityLevel,
    /// 400: the request body is not the JSON we expect.
    #[error("{0}")]
    BadRequest(String),
    /// 50001: the store could not persist or load its state.
    #[error("Error in the backend data store - {0}")]
    Storage(String),
}

impl RegistryError {
    /// The Confluent `error_code` for this error.
    pub fn error_code(&self) -> u32 {
        match self {
            Self::SubjectNotFound(_) => 40401,
            Self::VersionNotFound { .. } => 40402,
            Self::SchemaNotFound => 40403,
            Self::SubjectNotSoftDeleted(_) => 40405,
            Self::SubjectLevelCompatibilityNotConfigured(_) => 40408,
            Self::Incompatible { .. } => 409,
            Self::InvalidSchema(_) => 42201,
            Self::InvalidVersion(_) => 42202,
            Self::InvalidCompatibilityLevel => 42203,
            Self::BadRequest(_) => 400,
            Self::Storage(_) => 50001,
        }
    }

    /// The HTTP status for this error: the first three digits of [`Self::error_code`].
    pub fn http_status(&self) -> u16 {
        status_of(self.error_code())
    }
}

/// First three digits of a Confluent error code (codes are either 3 or 5 digits long).
pub(crate) fn status_of(code: u32) -> u16 {
    let mut status = code;
    while status >= 1000 {
        status /= 10;
    }
    u16::try_from(status).unwrap_or(500)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_first_three_digits_of_code() {
        assert_eq!(status_of(40401), 404);
        assert_eq!(status_of(42201), 422);
        assert_eq!(status_of(409), 409);
        assert_eq!(status_of(50001), 500);
        assert_eq!(RegistryError::SchemaNotFound.http_status(), 404);
        assert_eq!(
            RegistryError::Incompatible {
                subject: "s".into(),
                details: vec![]
            }
            .http_status(),
            409
        );
    }

    #[test]
    fn incompatible_message_names_subject_and_details() {
        let err = RegistryError::Incompatible {
            subject: "orders-value".into(),
            details: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            err.to_string(),
            "Schema being registered is incompatible with an earlier schema for subject \"orders-value\", details: [a, b]"
        );
    }
}
