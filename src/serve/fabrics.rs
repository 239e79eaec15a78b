//! The brand federation API: a supplier reads a brand's catalog from `{ns}_brand_{slug}`.
//!
//! Filters `collection`, `colour`, `discontinued`; keyset pagination on the fabric code
//! (`after` = the previous page's `next_after`, `limit` up to [`MAX_LIMIT`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::error::ApiError;
use super::pages::{PageKey, Stamp};
use super::resolve::{lookup_of_host, slug_of_path, Lookup, Tenant};
use super::Api;
use crate::cache::permissions::{AccessError, Prefetched};
use crate::cache::{catalog_version_key, start_counter};
use crate::tenant::{DatabaseName, OrganisationType, Slug};

pub use super::query::{FabricQuery, DEFAULT_LIMIT, MAX_LIMIT};

/// One fabric as served; the price fields only for a supplier holding `pricing.read`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FabricOut {
    pub code: String,
    pub name: String,
    pub collection: String,
    pub colour: String,
    pub material: String,
    pub width_mm: i32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub price_minor: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub currency: Option<String>,
    pub discontinued: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BrandRef {
    pub organisation_id: String,
    pub slug: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FabricsPage {
    pub brand: BrandRef,
    /// Whether prices are included (the supplier holds `pricing.read`).
    pub prices: bool,
    pub fabrics: Vec<FabricOut>,
    /// Pass as `after` for the next page; absent on the last.
    pub next_after: Option<String>,
}

fn query_of(query: Result<Query<FabricQuery>, QueryRejection>) -> Result<FabricQuery, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}

/// `GET /api/brands/{slug}/fabrics`.
pub async fn by_path(
    State(api): State<Arc<Api>>,
    slug: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<FabricQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(raw) = slug.map_err(|e| ApiError::bad_request("invalid_slug", e.body_text()))?;
    let slug = slug_of_path(&raw)?;
    page(&api, slug, &headers, query_of(query)?).await
}

/// `GET /api/fabrics` with Host `{slug}.brand.{base domain}`.
pub async fn by_host(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    query: Result<Query<FabricQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let host = api.host(&headers)?;
    let Lookup::Brand(slug) = lookup_of_host(api.resolver.base(), host)? else {
        return Err(ApiError::not_found(format!(
            "host {host:?} names no brand (expected SLUG.brand.{})",
            api.resolver.base()
        )));
    };
    page(&api, slug, &headers, query_of(query)?).await
}

async fn page(
    api: &Api,
    slug: Slug,
    headers: &HeaderMap,
    query: FabricQuery,
) -> Result<Response, ApiError> {
    let limit = query.check()?;
    let supplier = api.supplier(headers)?;
    // The supplier's permission and the brand's catalog version are read with the brand's
    // resolution, under the id this slug had last in this process; each counts only if the
    // resolution returns that id.
    let guess = api.brand_ids.get(&slug);
    let also: Vec<String> = guess
        .as_deref()
        .into_iter()
        .flat_map(|id| {
            let permission = api.permissions.key_of(&supplier, id);
            permission
                .into_iter()
                .chain([catalog_version_key(&api.ns, id)])
        })
        .collect();
    let resolved = api
        .resolver
        .resolve_with(&Lookup::Brand(slug.clone()), &also)
        .await?;
    let brand = resolved
        .tenant
        .ok_or_else(|| ApiError::not_found(format!("no brand '{slug}'")))?
        .usable()?;
    api.brand_ids.remember(&slug, &brand.organisation_id);
    // Each read counts only under the key the returned id gives (checked by its user).
    let read_under = |key: Option<String>| {
        let key = key?;
        resolved.also.iter().find(|p| p.key == key).cloned()
    };
    let permission = read_under(api.permissions.key_of(&supplier, &brand.organisation_id));
    let version = read_under(Some(catalog_version_key(&api.ns, &brand.organisation_id)));
    let access = api
        .permissions
        .permissions_read(&api.servers, &supplier, &brand.organisation_id, permission)
        .await
        .map_err(|e| refused(e, &brand))?;
    if !access.may_read_catalog() {
        return Err(ApiError::forbidden(format!(
            "supplier {supplier} may not read the catalog of brand '{slug}'"
        )));
    }
    let prices = access.may_read_pricing();
    // A page is kept only under stamps read before its rows (see `pages`).
    let stamp = stamp_of(api, version, resolved.generation).await;
    let key = PageKey::new(&brand.organisation_id, prices, &query, limit);
    if let Some(body) = stamp.as_ref().and_then(|s| api.pages.get(&key, s)) {
        return Ok(json_response(body));
    }
    let _slot = api.limits.enter(&brand.organisation_id).await;
    let fabrics = read(api, &brand, &query, limit + 1).await?;
    let body = Bytes::from(
        serde_json::to_vec(&paginate(brand, prices, fabrics, limit))
            .map_err(|e| ApiError::service("JSON", e))?,
    );
    if let Some(stamp) = stamp {
        api.pages.put(key, stamp, body.clone());
    }
    Ok(json_response(body))
}

/// The stamps a page may be kept or served under: the brand's catalog version as read in the
/// resolution's round trip (under the key of the id it returned) and the domain generation.
/// `None` when either is unknown: a missing version is started for the next request.
async fn stamp_of(api: &Api, version: Option<Prefetched>, generation: String) -> Option<Stamp> {
    let version = version?;
    let Some(catalog_version) = version.value else {
        let mut conn = api.redis.clone();
        if let Err(e) = start_counter(&mut conn, &version.key).await {
            tracing::warn!(key = %version.key, error = %e, "cannot start the brand's catalog version");
        }
        return None;
    };
    (!generation.is_empty()).then_some(Stamp {
        catalog_version,
        domain_generation: generation,
    })
}

fn json_response(body: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// What a permission lookup failure means to the caller.
fn refused(e: AccessError, brand: &Tenant) -> ApiError {
    match e {
        AccessError::UnknownSupplier { supplier_id, .. } => ApiError::forbidden(format!(
            "supplier {supplier_id} is not a tenant and may not read brand {:?}",
            brand.slug
        )),
        AccessError::NotASupplier { supplier_id, .. } => {
            ApiError::forbidden(format!("organisation {supplier_id} is not a supplier"))
        }
        AccessError::InvalidId { .. } => ApiError::unauthorized(e.to_string()),
        AccessError::Redis { .. } => ApiError::service("Redis", e),
        other => ApiError::service("MySQL", other),
    }
}

/// The page's SELECT for a brand database. Its text depends only on which filters are
/// present (values are bound), so each connection prepares a handful of statements per brand.
pub fn statement(db: &DatabaseName, q: &FabricQuery) -> String {
    let mut sql = format!(
        "SELECT code, name, collection, colour, material, width_mm, price_minor, currency, \
         discontinued FROM {}.fabrics WHERE code > ?",
        db.quoted()
    );
    for (present, condition) in [
        (q.collection.is_some(), " AND collection = ?"),
        (q.colour.is_some(), " AND colour = ?"),
        (q.discontinued.is_some(), " AND discontinued = ?"),
    ] {
        if present {
            sql.push_str(condition);
        }
    }
    sql.push_str(" ORDER BY code LIMIT ?");
    sql
}

/// [`statement`] with its values bound; `rows` is the LIMIT.
pub fn query<'q>(
    sql: &'q str,
    q: &'q FabricQuery,
    rows: u32,
) -> sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments> {
    let mut query = sqlx::query(sql).bind(q.after.as_deref().unwrap_or(""));
    if let Some(c) = &q.collection {
        query = query.bind(c);
    }
    if let Some(c) = &q.colour {
        query = query.bind(c);
    }
    if let Some(d) = q.discontinued {
        query = query.bind(d);
    }
    query.bind(rows)
}

/// One row of the page's SELECT.
pub fn fabric_of(r: &sqlx::mysql::MySqlRow) -> Result<FabricOut, sqlx::Error> {
    Ok(FabricOut {
        code: r.try_get("code")?,
        name: r.try_get("name")?,
        collection: r.try_get("collection")?,
        colour: r.try_get("colour")?,
        material: r.try_get("material")?,
        width_mm: r.try_get("width_mm")?,
        price_minor: Some(r.try_get("price_minor")?),
        currency: Some(r.try_get("currency")?),
        discontinued: r.try_get("discontinued")?,
    })
}

/// One page (plus one row, to know whether another page follows) from the brand's database.
async fn read(
    api: &Api,
    brand: &Tenant,
    q: &FabricQuery,
    rows: u32,
) -> Result<Vec<FabricOut>, ApiError> {
    debug_assert_eq!(brand.organisation_type, OrganisationType::Brand);
    let sql = statement(&brand.database(&api.ns)?, q);
    let mut conn = api.connection(brand).await?;
    let found = query(&sql, q, rows).fetch_all(&mut *conn).await?;
    conn.finished();
    found
        .iter()
        .map(fabric_of)
        .collect::<Result<_, sqlx::Error>>()
        .map_err(ApiError::from)
}

fn paginate(brand: Tenant, prices: bool, mut fabrics: Vec<FabricOut>, limit: u32) -> FabricsPage {
    let next_after = if fabrics.len() > limit as usize {
        fabrics.truncate(limit as usize);
        fabrics.last().map(|f| f.code.clone())
    } else {
        None
    };
    if !prices {
        for f in &mut fabrics {
            f.price_minor = None;
            f.currency = None;
        }
    }
    FabricsPage {
        brand: BrandRef {
            organisation_id: brand.organisation_id,
            slug: brand.slug,
        },
        prices,
        fabrics,
        next_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tenants::Status;

    fn fabric(code: &str) -> FabricOut {
        FabricOut {
            code: code.into(),
            name: "n".into(),
            collection: "c".into(),
            colour: "w".into(),
            material: "m".into(),
            width_mm: 1,
            price_minor: Some(100),
            currency: Some("GBP".into()),
            discontinued: false,
        }
    }

    fn brand() -> Tenant {
        Tenant {
            organisation_id: "b".into(),
            organisation_type: OrganisationType::Brand,
            slug: "brand".into(),
            name: String::new(),
            status: Status::Active,
            changing: false,
            server: "home".into(),
        }
    }

    #[test]
    fn a_page_says_where_the_next_starts_and_hides_prices_without_pricing_read() {
        let page = paginate(
            brand(),
            false,
            vec![fabric("a"), fabric("b"), fabric("c")],
            2,
        );
        assert_eq!(page.next_after.as_deref(), Some("b"));
        assert_eq!(page.fabrics.len(), 2);
        assert!(page.fabrics.iter().all(|f| f.price_minor.is_none()));
        let json = serde_json::to_string(&page).unwrap();
        assert!(!json.contains("price_minor"), "{json}");
        let last = paginate(brand(), true, vec![fabric("a")], 2);
        assert_eq!(last.next_after, None);
        assert_eq!(last.fabrics[0].price_minor, Some(100));
    }

    #[test]
    fn limits_and_overlong_filters_are_refused() {
        let q = |limit, colour: &str| FabricQuery {
            limit,
            colour: Some(colour.into()),
            ..Default::default()
        };
        assert_eq!(q(None, "white").check().unwrap(), DEFAULT_LIMIT);
        assert!(q(Some(0), "white").check().is_err());
        assert!(q(Some(MAX_LIMIT + 1), "white").check().is_err());
        assert!(q(Some(5), &"x".repeat(129)).check().is_err());
    }
}
