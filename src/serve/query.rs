//! The query of a catalog page (`?collection=&colour=&discontinued=&limit=&after=`): what the
//! handler reads and what a cached page is keyed by.

use serde::Deserialize;

use super::error::ApiError;

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FabricQuery {
    pub collection: Option<String>,
    pub colour: Option<String>,
    pub discontinued: Option<bool>,
    pub limit: Option<u32>,
    pub after: Option<String>,
}

impl FabricQuery {
    /// Refuses filters no row could match (longer than their columns) and limits out of range.
    pub(super) fn check(&self) -> Result<u32, ApiError> {
        for (name, value, max) in [
            ("collection", &self.collection, 255),
            ("colour", &self.colour, 128),
            ("after", &self.after, 64),
        ] {
            if value.as_ref().is_some_and(|v| v.chars().count() > max) {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("{name} is longer than {max} characters"),
                ));
            }
        }
        match self.limit.unwrap_or(DEFAULT_LIMIT) {
            0 => Err(ApiError::bad_request(
                "invalid_query",
                "limit must be at least 1",
            )),
            n if n > MAX_LIMIT => Err(ApiError::bad_request(
                "invalid_query",
                format!("limit is at most {MAX_LIMIT}"),
            )),
            n => Ok(n),
        }
    }
}
