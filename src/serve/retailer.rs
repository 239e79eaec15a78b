//! The retailer's own API, resolved from the Host header alone: `{slug}.{base domain}` or a
//! custom domain assigned by RetailerDomainAssigned.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::resolve::{lookup_of_host, Lookup};
use super::Api;
use crate::tenant::OrganisationType;

#[derive(Debug, Serialize, Deserialize)]
pub struct Profile {
    pub organisation_id: String,
    pub slug: String,
    pub name: String,
    /// The host the request came in on, as resolved.
    pub host: String,
    /// The retailer's custom domains, from its own database.
    pub domains: Vec<String>,
}

/// `GET /api/retailer/profile`.
pub async fn profile(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
) -> Result<Json<Profile>, ApiError> {
    let host = api.host(&headers)?;
    let lookup = lookup_of_host(api.resolver.base(), host)?;
    if let Lookup::Brand(_) = lookup {
        return Err(ApiError::not_found(format!(
            "host {host:?} names a brand, not a retailer"
        )));
    }
    let retailer = api
        .resolver
        .resolve(&lookup)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no retailer answers on {host:?}")))?
        .usable()?;
    debug_assert_eq!(retailer.organisation_type, OrganisationType::Retailer);
    let db = retailer.database(&api.ns)?;
    let _slot = api.limits.enter(&retailer.organisation_id).await;
    let mut conn = api.connection(&retailer).await?;
    let domains: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT domain FROM {}.domains ORDER BY domain",
        db.quoted()
    ))
    .fetch_all(&mut *conn)
    .await?;
    conn.finished();
    Ok(Json(Profile {
        organisation_id: retailer.organisation_id,
        slug: retailer.slug,
        name: retailer.name,
        host: api.resolver.cache_host(&lookup),
        domains,
    }))
}
