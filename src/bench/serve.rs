//! `tenancy bench serve`: `GET /api/brands/{slug}/fabrics` over many brands with warm caches,
//! from a `tenancy serve` child process, next to a raw baseline in the same run: the same
//! SELECT sent straight to MariaDB by the same number of concurrent clients over a pool of the
//! same size. Both sides decode every row; the HTTP side also checks tokens, resolves the
//! brand and the supplier's permissions in Redis, and writes JSON. The HTTP side runs twice:
//! as configured by default (warm pages answered from its page cache, see `serve::pages`) and
//! with the page cache off, so the figures say what the cache is worth.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;

use super::catalog::{fabric_json, provision, Tenant};
use crate::config::Config;
use crate::serve::fabrics::{fabric_of, query, statement, FabricQuery, MAX_LIMIT};
use crate::serve::token::{TokenKey, KEY_ENV};
use crate::tenant::{Namespace, OrganisationType, ServiceDatabase};

#[derive(Debug, Clone, clap::Args)]
pub struct ServeBenchArgs {
    /// Brands, each with its own database.
    #[arg(long, default_value_t = 100)]
    pub brands: usize,
    /// Fabrics per brand, at most 1,000 (every request reads them all: one page of that size).
    #[arg(long, default_value_t = 50)]
    pub fabrics: usize,
    /// Concurrent clients, on both sides.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// MySQL connections, on both sides (`tenancy serve --pool-size`).
    #[arg(long, default_value_t = 16)]
    pub connections: u32,
    /// How long each side is measured, after a warm-up.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Keep the benchmark's databases afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// Requests/s and latency percentiles of one side.
struct Figures {
    requests: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn line(&self, what: &str) -> String {
        format!(
            "{what:<6} {:>9.0} requests/s   p50 {:>6.2} ms   p99 {:>6.2} ms   ({} requests in {:.1} s)",
            self.rate(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.requests,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Runs `clients` loops of `one(i)` (i counting up per client, spread over brands) for
/// `duration`; every call must succeed.
async fn drive<F, Fut>(clients: usize, duration: Duration, one: F) -> anyhow::Result<Figures>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let one = Arc::new(one);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let one = one.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = c * 7919;
            while started.elapsed() < duration {
                let t = Instant::now();
                one(i).await?;
                latencies.push(t.elapsed());
                i += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    anyhow::ensure!(!all.is_empty(), "no request finished");
    Ok(Figures {
        requests: all.len(),
        elapsed,
        p50: at(0.50),
        p99: at(0.99),
    })
}

pub async fn run(config: Config, args: ServeBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.brands > 0 && args.fabrics > 0 && args.clients > 0,
        "--brands, --fabrics and --clients must be positive"
    );
    anyhow::ensure!(
        args.fabrics <= MAX_LIMIT as usize,
        "--fabrics is at most {MAX_LIMIT}: every request reads one whole page"
    );
    let super::Fresh {
        config,
        pool,
        tenants,
    } = super::fresh_namespace(&config, 8).await?;
    let ns = config.namespace.clone();
    eprintln!(
        "namespace {ns}: {} brands of {} fabrics, one supplier granted them all",
        args.brands, args.fabrics
    );
    let supplier = provision(&pool, &tenants, &config, OrganisationType::Supplier, 0).await?;
    let mut brands: Vec<Tenant> = Vec::new();
    for b in 0..args.brands {
        let brand = provision(&pool, &tenants, &config, OrganisationType::Brand, b).await?;
        seed_brand(&pool, &brand, &supplier, &ns, args.fabrics).await?;
        brands.push(brand);
        if (b + 1) % 25 == 0 {
            eprintln!("  {} brands ready", b + 1);
        }
    }
    let result = measure(&config, &args, &pool, &brands, &supplier).await;
    if !args.keep {
        super::drop_namespace(&config, &pool).await?;
    }
    result
}

/// Catalog rows straight into the brand's database, and the supplier's grant with prices in
/// the platform index and its own database (what the access projector would have written).
async fn seed_brand(
    pool: &sqlx::MySqlPool,
    brand: &Tenant,
    supplier: &Tenant,
    ns: &Namespace,
    fabrics: usize,
) -> anyhow::Result<()> {
    let mut sql = format!(
        "INSERT INTO {}.fabrics (code, name, collection, colour, material, width_mm, price_minor, \
         currency, revision) VALUES ",
        brand.db.quoted()
    );
    sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?, ?, 1)"; fabrics].join(", "));
    let mut insert = sqlx::query(&sql);
    for i in 0..fabrics {
        let f = fabric_json(i, 1);
        insert = insert
            .bind(f["code"].as_str().map(str::to_owned))
            .bind(format!(
                "{} {}",
                brand.db,
                f["name"].as_str().unwrap_or_default()
            ))
            .bind(f["collection"].as_str().map(str::to_owned))
            .bind(f["colour"].as_str().map(str::to_owned))
            .bind(f["material"].as_str().map(str::to_owned))
            .bind(f["width_mm"].as_i64())
            .bind(f["price_minor"].as_i64())
            .bind(f["currency"].as_str().map(str::to_owned));
    }
    insert.execute(pool).await?;
    let permissions = r#"["catalog.read","pricing.read"]"#;
    sqlx::query(&format!(
        "INSERT INTO {}.brand_access (brand_id, supplier_id, permissions) VALUES (?, ?, ?)",
        ns.service_database(ServiceDatabase::Platform).quoted()
    ))
    .bind(&brand.id)
    .bind(&supplier.id)
    .bind(permissions)
    .execute(pool)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO {}.brand_access (brand_id, permissions, granted_at) VALUES (?, ?, UTC_TIMESTAMP(3))",
        supplier.db.quoted()
    ))
    .bind(&brand.id)
    .bind(permissions)
    .execute(pool)
    .await?;
    Ok(())
}

/// One `tenancy serve` side of the run: its figures, the statements MySQL ran for it, what its
/// `/metrics` said at the end, and its peak RSS (MiB).
struct Served {
    figures: Figures,
    statements: f64,
    metrics: String,
    rss: f64,
}

/// Starts `tenancy serve` with `extra` arguments, warms it up, measures it, stops it.
async fn measure_serve(
    config: &Config,
    args: &ServeBenchArgs,
    pool: &sqlx::MySqlPool,
    secret: &str,
    token: &str,
    brands: usize,
    extra: &[&str],
) -> anyhow::Result<Served> {
    let mut child = super::tenancy_command(config)?
        .args(["serve", "--listen", "127.0.0.1:0", "--pool-size"])
        .arg(args.connections.to_string())
        // One tenant may use every connection: the benchmark spreads load evenly anyway.
        .args(["--tenant-concurrency"])
        .arg(args.connections.to_string())
        .args(extra)
        .env(KEY_ENV, secret)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let server_rss_watch = super::watch_peak_rss(child.id());
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("tenancy serve did not start within 30 s"))??
        .unwrap_or_default();
    let base = first
        .strip_prefix("listening on ")
        .ok_or_else(|| anyhow::anyhow!("unexpected first line from tenancy serve: {first:?}"))?
        .to_owned();

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .build()?;
    let slugs: Arc<Vec<String>> = Arc::new((0..brands).map(|b| format!("brand{b}")).collect());
    let expected = args.fabrics;
    let http = {
        let (client, base, token, slugs) = (
            client.clone(),
            base.clone(),
            token.to_owned(),
            slugs.clone(),
        );
        move |i: usize| {
            let url = format!(
                "{base}/api/brands/{}/fabrics?limit={expected}",
                slugs[i % slugs.len()]
            );
            let request = client.get(url).bearer_auth(&token).send();
            async move {
                let response = request.await?;
                anyhow::ensure!(
                    response.status() == reqwest::StatusCode::OK,
                    "HTTP {}",
                    response.status()
                );
                let body = response.bytes().await?;
                anyhow::ensure!(
                    body.len() > expected * 100,
                    "short page: {} bytes",
                    body.len()
                );
                Ok(())
            }
        }
    };
    let warm = Duration::from_secs(2).min(args.duration);
    drive(args.clients, warm, http.clone()).await?;
    let before = statements_run(pool).await?;
    let figures = drive(args.clients, args.duration, http).await?;
    let statements = statements_run(pool).await? - before;
    // What the server says about its caches: the run only means "warm" if they hit.
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let _ = child.kill().await;
    let rss = server_rss_watch.await?;
    Ok(Served {
        figures,
        statements,
        metrics,
        rss,
    })
}

async fn measure(
    config: &Config,
    args: &ServeBenchArgs,
    pool: &sqlx::MySqlPool,
    brands: &[Tenant],
    supplier: &Tenant,
) -> anyhow::Result<()> {
    // A key for this run only.
    let secret = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let key = TokenKey::new(&secret)?;
    let token = key
        .issue(&supplier.id, chrono::Utc::now().timestamp() + 3600)
        .map_err(|e| anyhow::anyhow!(e))?;
    let warm = Duration::from_secs(2).min(args.duration);
    eprintln!(
        "each side: {} s of warm-up, then {} s measured, {} clients; serve with its page cache, \
         serve without it, then the raw query",
        warm.as_secs(),
        args.duration.as_secs(),
        args.clients
    );
    let n = brands.len();
    let served = measure_serve(config, args, pool, &secret, &token, n, &[]).await?;
    let uncached = measure_serve(
        config,
        args,
        pool,
        &secret,
        &token,
        n,
        &["--page-cache-ttl", "0s"],
    )
    .await?;

    let raw_pool = crate::store::pools::connect_pool_sized(config, args.connections).await?;
    let statements: Arc<Vec<String>> = Arc::new(
        brands
            .iter()
            .map(|b| statement(&b.db, &FabricQuery::default()))
            .collect(),
    );
    let expected = args.fabrics;
    let raw = {
        // As the server asks: the page and one row more, to know whether another follows.
        let rows = expected as u32 + 1;
        move |i: usize| {
            let (pool, statements) = (raw_pool.clone(), statements.clone());
            async move {
                let sql = &statements[i % statements.len()];
                let q = FabricQuery::default();
                let found = query(sql, &q, rows).fetch_all(&pool).await?;
                let fabrics = found.iter().map(fabric_of).collect::<Result<Vec<_>, _>>()?;
                anyhow::ensure!(fabrics.len() == expected, "{} rows", fabrics.len());
                Ok(())
            }
        }
    };
    drive(args.clients, warm, raw.clone()).await?;
    let before = statements_run(pool).await?;
    let direct = drive(args.clients, args.duration, raw).await?;
    let direct_statements = statements_run(pool).await? - before;

    println!(
        "GET /api/brands/{{slug}}/fabrics over {} brands ({} fabrics each, with prices), {} clients, {} MySQL connections",
        brands.len(),
        args.fabrics,
        args.clients,
        args.connections
    );
    println!("{}", served.figures.line("serve"));
    println!(
        "{}   (--page-cache-ttl 0s: every request runs its query)",
        uncached.figures.line("serve*")
    );
    println!("{}", direct.line("raw"));
    let per_request = |statements: f64, figures: &Figures| statements / figures.requests as f64;
    println!(
        "MySQL statements per request: serve {:.2}, serve* {:.2}, raw {:.2}",
        per_request(served.statements, &served.figures),
        per_request(uncached.statements, &uncached.figures),
        per_request(direct_statements, &direct)
    );
    for cache in ["domain", "permission", "page"] {
        let count = |result: &str| {
            counter(
                &served.metrics,
                &format!("tenancy_{cache}_cache_lookups_total"),
                result,
            )
        };
        println!(
            "{cache} cache (serve, warm-up included): {:.0} hits, {:.0} misses",
            count("hit"),
            count("miss")
        );
    }
    println!(
        "tenancy serve peak RSS: {:.0} MiB (serve*: {:.0} MiB)",
        served.rss, uncached.rss
    );
    println!(
        "ratio serve*/raw (no page cache): {:.2}",
        uncached.figures.rate() / direct.rate()
    );
    let ratio = served.figures.rate() / direct.rate();
    println!("ratio serve/raw: {ratio:.2}");
    let figures = |f: &Figures| {
        format!(
            "{:.0} requests/s, p99 {:.1} ms",
            f.rate(),
            f.p99.as_secs_f64() * 1e3
        )
    };
    super::Row {
        benchmark: "tenancy bench serve".into(),
        figure: figures(&served.figures),
        baseline: figures(&direct),
        ratio: Some(ratio),
        goal: "≥ 0.8, p99 < 10 ms".into(),
        met: ratio >= 0.8 && served.figures.p99 < Duration::from_millis(10),
        peak_rss_mib: Some(served.rss),
    }
    .print();
    Ok(())
}

/// Statements the MySQL server has run (prepared or not), from its global counters.
async fn statements_run(pool: &sqlx::MySqlPool) -> anyhow::Result<f64> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SHOW GLOBAL STATUS WHERE Variable_name IN ('Com_select', 'Com_stmt_execute', 'Com_stmt_prepare')",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().filter_map(|(_, v)| v.parse::<f64>().ok()).sum())
}

/// A counter's value for one `result` label in Prometheus text.
fn counter(text: &str, name: &str, result: &str) -> f64 {
    let label = format!("result=\"{result}\"");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
