//! `tenancy serve`: the request side of the platform.
//!
//! - `GET /api/brands/{slug}/fabrics`, or `GET /api/fabrics` with Host
//!   `{slug}.brand.{base domain}`: a brand's catalog, for a supplier named by a bearer token
//!   (see [`token`]), answered only if the permission cache says that supplier may read that
//!   brand; prices only with `pricing.read`.
//! - `GET /api/retailer/profile`: the retailer named by Host (`{slug}.{base domain}` or a
//!   custom domain of the domains projection).
//! - `/healthz` (the process is up), `/readyz` (MySQL and Redis answer), `/metrics`.
//!
//! One connection pool per MySQL server (`DATABASE_URL` as `home`, and `TENANCY_SERVERS`),
//! never one per tenant: a tenant's queries go to the pool of the server its row names, and
//! every query names its tenant database, never `USE`. A tenant holds at most
//! `--tenant-concurrency` connections at once, and every request ends within
//! `--request-timeout` (503 with `Retry-After` otherwise). A catalog page read once is answered
//! from memory while the brand's catalog version and the domain generation hold ([`pages`]).

pub mod error;
pub mod fabrics;
pub mod limits;
pub mod pages;
pub mod query;
pub mod resolve;
pub mod retailer;
pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sqlx::pool::PoolConnection;
use sqlx::MySql;
use tokio_util::sync::CancellationToken;

use crate::cache::permissions::PermissionCache;
use crate::cache::Redis;
use crate::config::Config;
use crate::domains::host::Host;
use crate::store::servers::Servers;
use crate::tenant::Namespace;

use error::ApiError;
use limits::TenantLimits;
use pages::Pages;
use resolve::{Resolver, Tenant};
use token::TokenKey;

/// How `tenancy serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// Brands answer on `{slug}.brand.{base}`, retailers on `{slug}.{base}`.
    pub base_domain: Host,
    /// Connections to each MySQL server, shared by every tenant on it.
    pub pool_size: u32,
    pub tenant_concurrency: usize,
    pub request_timeout: Duration,
    /// How long a page of a catalog may be answered from memory at most (zero: never).
    pub page_cache_ttl: Duration,
    /// Memory for those pages, in bytes (zero: none).
    pub page_cache_bytes: u64,
}

/// What every handler shares.
pub struct Api {
    pub ns: Namespace,
    /// One pool per server, home first.
    pub servers: Servers,
    pub resolver: Resolver,
    pub permissions: PermissionCache,
    pub key: TokenKey,
    pub limits: TenantLimits,
    pub timeout: Duration,
    /// Each brand slug's last organisation id, for reading its permission early.
    pub brand_ids: resolve::RecentIds,
    /// Catalog pages answered without their query while their stamps hold.
    pub pages: Pages,
    /// For `/readyz` and the catalog versions.
    pub redis: redis::aio::ConnectionManager,
}

impl Api {
    pub async fn connect(
        config: &Config,
        options: &ServeOptions,
        key: TokenKey,
    ) -> anyhow::Result<Api> {
        // A request that timed out drops its query, but the server would go on waiting (on a
        // held lock, say) with the connection still out of the pool: every statement is bounded
        // on the server too, by the request's timeout, so the connection comes back.
        let limit = options.request_timeout.max(Duration::from_secs(1));
        let limits = crate::store::pools::StatementLimits {
            statement: limit,
            lock_wait: limit,
        };
        let servers = Servers::connect_with(config, || {
            crate::store::pools::bounded_pool_options(options.pool_size.max(1), limits)
                // Bounded by the request's own timeout, which answers first.
                .acquire_timeout(options.request_timeout + Duration::from_secs(1))
        })
        .await?;
        let redis = Redis::connect(&config.redis_url, &config.namespace).await?;
        Ok(Api {
            ns: config.namespace.clone(),
            resolver: Resolver::new(
                &config.namespace,
                options.base_domain.clone(),
                servers.home().pool().clone(),
                redis.conn(),
            ),
            permissions: PermissionCache::on(&redis),
            servers,
            key,
            limits: TenantLimits::new(options.tenant_concurrency),
            timeout: options.request_timeout,
            brand_ids: resolve::RecentIds::default(),
            pages: Pages::new(options.page_cache_ttl, options.page_cache_bytes),
            redis: redis.conn(),
        })
    }

    /// A pooled connection to the server `tenant` is on, with the wait recorded
    /// (`tenancy_pool_wait_seconds`); see [`Held`].
    pub async fn connection(&self, tenant: &Tenant) -> Result<Held, ApiError> {
        let server = self
            .servers
            .get(&tenant.server)
            .map_err(|e| ApiError::service("the servers list", e))?;
        let started = Instant::now();
        let conn = server.pool().acquire().await;
        metrics::histogram!("tenancy_pool_wait_seconds").record(started.elapsed().as_secs_f64());
        Ok(Held {
            conn: conn?,
            finished: false,
        })
    }

    /// The supplier a request's `Authorization: Bearer …` names, or a 401 saying why not.
    pub fn supplier(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let raw = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "missing Authorization: Bearer TOKEN (see `tenancy tokens issue`)",
                )
            })?
            .to_str()
            .map_err(|_| ApiError::unauthorized("the Authorization header is not text"))?;
        let token = raw
            .strip_prefix("Bearer ")
            .ok_or_else(|| ApiError::unauthorized("expected Authorization: Bearer TOKEN"))?;
        self.key
            .verify(token.trim(), chrono::Utc::now().timestamp())
            .map_err(|e| ApiError::unauthorized(e.to_string()))
    }

    /// The Host header's text, or a 400.
    pub fn host<'h>(&self, headers: &'h HeaderMap) -> Result<&'h str, ApiError> {
        headers
            .get(header::HOST)
            .ok_or_else(|| ApiError::bad_request("invalid_host", "no Host header"))?
            .to_str()
            .map_err(|_| ApiError::bad_request("invalid_host", "the Host header is not text"))
    }
}

/// A request's connection, closed instead of returned to the pool if the request is dropped
/// before [`Held::finished`] (it timed out mid-query): the server goes on with the abandoned
/// statement until its own time limit, and the next request handed that connection would wait
/// for it; a slow tenant's timeouts then slowed other tenants' requests (a test saw one take the
/// full timeout).
pub struct Held {
    conn: PoolConnection<MySql>,
    finished: bool,
}

impl Held {
    /// The request's queries are done: the connection may go back to the pool.
    pub fn finished(mut self) {
        self.finished = true;
    }
}

impl std::ops::Deref for Held {
    type Target = sqlx::MySqlConnection;
    fn deref(&self) -> &Self::Target {
        &self.conn
    }
}

impl std::ops::DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.conn
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.close_on_drop();
        }
    }
}

/// Times out, counts and times every routed request. Labels are the route template and the
/// status, never a tenant, so the series stay few.
async fn observe(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let response = match tokio::time::timeout(api.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::unavailable(
            "timeout",
            format!(
                "no answer within {} ms; try again shortly",
                api.timeout.as_millis()
            ),
        )
        .into_response(),
    };
    let status = response.status().as_u16().to_string();
    metrics::counter!("tenancy_http_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("tenancy_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// `/readyz`: whether the home MySQL server (tenants, domains, permissions are read there) and
/// Redis answer now, each within a second: 503 names what does not, so a load balancer stops
/// sending requests that could only fail. Another server not answering leaves the API ready for
/// every tenant that is not on it: 200, naming it under `degraded` (its tenants' requests get
/// 503 meanwhile). The gauges `tenancy_serve_dependency_up{service}` and
/// `tenancy_serve_mysql_up{server}` say the same to monitoring.
async fn ready(State(api): State<Arc<Api>>) -> Response {
    let wait = Duration::from_secs(1);
    let probes = api.servers.all().iter().map(|server| async move {
        let up = tokio::time::timeout(wait, sqlx::query("SELECT 1").execute(server.pool()))
            .await
            .is_ok_and(|r| r.is_ok());
        (server.name().to_owned(), up)
    });
    let answers = futures::future::join_all(probes).await;
    let mut servers = serde_json::Map::new();
    let mut degraded = Vec::new();
    let mut home = true;
    for (name, up) in answers {
        metrics::gauge!("tenancy_serve_mysql_up", "server" => name.clone()).set(if up {
            1.0
        } else {
            0.0
        });
        if name == crate::store::servers::HOME {
            home = up;
        } else if !up {
            degraded.push(serde_json::Value::from(format!(
                "server {name} does not answer: its tenants' requests get 503"
            )));
        }
        servers.insert(name, (if up { "up" } else { "down" }).into());
    }
    let mut conn = api.redis.clone();
    let redis = tokio::time::timeout(wait, redis::cmd("PING").query_async::<String>(&mut conn))
        .await
        .is_ok_and(|r| r.is_ok());
    let mut body = serde_json::Map::new();
    for (service, up) in [("mysql", home), ("redis", redis)] {
        metrics::gauge!("tenancy_serve_dependency_up", "service" => service).set(if up {
            1.0
        } else {
            0.0
        });
        body.insert(service.into(), (if up { "up" } else { "down" }).into());
    }
    body.insert("mysql_servers".into(), serde_json::Value::Object(servers));
    body.insert("degraded".into(), serde_json::Value::Array(degraded));
    let status = if home && redis {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(serde_json::Value::Object(body))).into_response()
}

/// The API's routes (without `/metrics`, which needs the process's recorder).
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/api/brands/{slug}/fabrics", get(fabrics::by_path))
        .route("/api/fabrics", get(fabrics::by_host))
        .route("/api/retailer/profile", get(retailer::profile))
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), observe))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "no_route",
                "no such route; see /api/brands/{slug}/fabrics, /api/fabrics, /api/retailer/profile",
            )
        })
        .with_state(api)
}

/// Serves until `shutdown`; returns the bound address once listening (port 0 picks one).
pub async fn serve(
    config: &Config,
    options: &ServeOptions,
    key: TokenKey,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let prometheus = crate::stream::health::prometheus()?;
    let api = Arc::new(Api::connect(config, options, key).await?);
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", options.listen))?;
    let bound = listener.local_addr()?;
    let app = router(api).route(
        "/metrics",
        get(move || {
            prometheus.run_upkeep();
            let text = prometheus.render();
            async move { text }
        }),
    );
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the API server stopped");
        }
    });
    Ok((bound, task))
}
