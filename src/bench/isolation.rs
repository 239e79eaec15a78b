//! `tenancy bench isolation`: the healthy brands' catalog throughput and apply latency while one
//! brand is sick, against the same workload with every brand healthy, in the same run.
//!
//! Each condition has a fresh namespace of `--brands` brands (provisioned through the library)
//! and runs the catalog processor in process, as `tenancy run` does (lanes, statement limits).
//! In the isolated condition, brand 0's `fabrics` table is locked by another session
//! (`LOCK TABLES … WRITE`, held) for the whole run, so each of its attempts waits for the lock
//! until `--lock-wait` and fails. Two phases per condition:
//!
//! - **backlog**: `--events-per-brand` events for every brand produced before the processor
//!   starts; timed from its first applied event to the healthy brands' last: their throughput.
//! - **latency**: one event per brand every `1 / --rounds-per-sec` s for `--seconds`, while the
//!   processor runs; each healthy brand's applied revision polled every 10 ms; the apply latency
//!   of an event is from its acknowledgement by the broker to its revision being seen.
//!
//! The line before its row is `ratio isolated/healthy: X.XX` (the healthy brands' backlog throughput with
//! a sick brand over that without; goal ≥ 0.8, and their p99 latency < 2 s).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;
use sqlx::MySqlPool;

use crate::config::Config;
use crate::log::events::json::record_from_json;
use crate::log::events::EventKind;
use crate::log::topics::Topic;
use crate::log::wire::Codec;
use crate::tenant::{DatabaseName, OrganisationType};

use super::catalog::{fabric_json, provision, Tenant};

#[derive(Debug, Clone, clap::Args)]
pub struct IsolationArgs {
    /// Brands in each condition (brand 0 is the sick one in the isolated condition).
    #[arg(long, default_value_t = 24)]
    pub brands: usize,
    /// Backlog events per brand, produced before the processor starts.
    #[arg(long, default_value_t = 1000)]
    pub events_per_brand: usize,
    /// Fabrics each event upserts.
    #[arg(long, default_value_t = 5)]
    pub fabrics: usize,
    /// Latency phase: rounds (one event per brand) per second.
    #[arg(long, default_value_t = 10)]
    pub rounds_per_sec: u32,
    /// Latency phase: how long.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// How long a statement waits for the sick brand's lock (`tenancy run --lock-wait-timeout`).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub lock_wait: Duration,
    /// Keep the benchmark's databases afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// What one condition measured, over the healthy brands.
struct Measured {
    backlog_events: usize,
    backlog: Duration,
    latencies: Vec<Duration>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.backlog_events as f64 / self.backlog.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[i]
    }
}

pub async fn run(config: Config, args: IsolationArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.brands >= 2, "--brands must be at least 2");
    anyhow::ensure!(
        args.events_per_brand > 0,
        "--events-per-brand must be positive"
    );
    anyhow::ensure!(args.rounds_per_sec > 0, "--rounds-per-sec must be positive");
    let healthy = condition(&config, &args, false).await?;
    super::settle().await;
    let isolated = condition(&config, &args, true).await?;
    let healthy_brands = args.brands - 1;
    println!(
        "isolation benchmark: {} brands over {} partitions, {} backlog events per brand of {} fabrics; latency phase {} s at {} events/s",
        args.brands,
        config.partitions,
        args.events_per_brand,
        args.fabrics,
        args.seconds,
        args.rounds_per_sec as usize * args.brands,
    );
    for (name, m) in [
        ("every brand healthy", &healthy),
        ("brand 0's table locked for the whole run", &isolated),
    ] {
        println!(
            "{name}: the {healthy_brands} other brands' backlog of {} events in {:.2} s = {:.0} events/s; apply latency p50 {} ms, p99 {} ms, max {} ms ({} events)",
            m.backlog_events,
            m.backlog.as_secs_f64(),
            m.rate(),
            m.percentile(0.5).as_millis(),
            m.percentile(0.99).as_millis(),
            m.percentile(1.0).as_millis(),
            m.latencies.len(),
        );
    }
    println!(
        "p99 of the healthy brands with one sick: {} ms (goal < 2000 ms)",
        isolated.percentile(0.99).as_millis()
    );
    let ratio = isolated.rate() / healthy.rate();
    println!("ratio isolated/healthy: {ratio:.2}");
    let p99 = isolated.percentile(0.99);
    super::Row {
        benchmark: "tenancy bench isolation".into(),
        figure: format!(
            "{:.0} events/s, p99 {} ms, one brand locked",
            isolated.rate(),
            p99.as_millis()
        ),
        baseline: format!(
            "{:.0} events/s, p99 {} ms, all healthy",
            healthy.rate(),
            healthy.percentile(0.99).as_millis()
        ),
        ratio: Some(ratio),
        goal: "≥ 0.8, p99 < 2 s".into(),
        met: ratio >= 0.8 && p99 < Duration::from_secs(2),
        peak_rss_mib: Some(super::peak_rss_mib()),
    }
    .print();
    Ok(())
}

/// One condition in a namespace of its own.
async fn condition(config: &Config, args: &IsolationArgs, sick: bool) -> anyhow::Result<Measured> {
    let super::Fresh {
        config,
        pool,
        tenants,
    } = super::fresh_namespace(config, 8).await?;
    let ns = config.namespace.clone();
    eprintln!(
        "{}: namespace {ns}, {} brands",
        if sick { "isolated" } else { "healthy" },
        args.brands
    );
    let mut brands = Vec::with_capacity(args.brands);
    for i in 0..args.brands {
        brands.push(provision(&pool, &tenants, &config, OrganisationType::Brand, i).await?);
    }
    // The sick brand: its table locked by a session of its own for the whole run.
    let mut locker = pool.acquire().await?;
    if sick {
        sqlx::query(&format!(
            "LOCK TABLES {}.fabrics WRITE",
            brands[0].db.quoted()
        ))
        .execute(&mut *locker)
        .await?;
    }
    let feed = Feed::new(&config, &brands, args.fabrics)?;
    let n = args.events_per_brand as i64;
    for revision in 1..=n {
        feed.send_all(revision).await?;
    }
    feed.flush()?;
    let healthy_dbs: Vec<DatabaseName> = brands[1..].iter().map(|b| b.db.clone()).collect();

    let options = crate::worker::WorkerOptions {
        db_connections: 12,
        limits: crate::store::pools::StatementLimits {
            lock_wait: args.lock_wait,
            ..Default::default()
        },
        ..Default::default()
    };
    let work = async {
        // Backlog: from the first applied event to the healthy brands' last.
        let mut first: Option<Instant> = None;
        loop {
            let applied = revisions(&pool, &healthy_dbs).await?;
            if first.is_none() && applied.iter().any(|r| *r > 0) {
                first = Some(Instant::now());
            }
            if applied.iter().all(|r| *r >= n) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let backlog = first.map_or(Duration::ZERO, |f| f.elapsed());
        eprintln!("  backlog applied in {:.2} s", backlog.as_secs_f64());

        // Latency: rounds at a steady rate, each healthy brand's revision watched.
        let rounds = (args.seconds * u64::from(args.rounds_per_sec)) as i64;
        let every = Duration::from_secs_f64(1.0 / f64::from(args.rounds_per_sec));
        // When each (brand, revision) was acknowledged.
        let sent: Arc<std::sync::Mutex<HashMap<(usize, i64), Instant>>> = Arc::default();
        let producing = async {
            let start = Instant::now();
            for k in 1..=rounds {
                let at = start + every * (k - 1) as u32;
                tokio::time::sleep_until(at.into()).await;
                let revision = n + k;
                let acked = feed.send_all(revision).await?;
                let mut sent = sent.lock().expect("not poisoned");
                for (b, at) in acked.into_iter().enumerate() {
                    sent.insert((b, revision), at);
                }
            }
            anyhow::Ok(())
        };
        let watching = async {
            let last = n + rounds;
            let mut seen: Vec<i64> = vec![n; healthy_dbs.len()];
            let mut latencies = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(args.seconds * 4 + 60);
            while seen.iter().any(|r| *r < last) && Instant::now() < deadline {
                let now = Instant::now();
                let applied = revisions(&pool, &healthy_dbs).await?;
                let sent = sent.lock().expect("not poisoned").clone();
                for (h, r) in applied.into_iter().enumerate() {
                    // Healthy brand h is brand h + 1.
                    while seen[h] < r {
                        seen[h] += 1;
                        if let Some(at) = sent.get(&(h + 1, seen[h])) {
                            latencies.push(now.saturating_duration_since(*at));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(latencies)
        };
        let ((), latencies) = tokio::try_join!(producing, watching)?;
        anyhow::Ok(Measured {
            backlog_events: healthy_dbs.len() * args.events_per_brand,
            backlog,
            latencies,
        })
    };
    let measured = super::with_catalog_processor(&config, &options, work).await?;
    if sick {
        sqlx::query("UNLOCK TABLES").execute(&mut *locker).await?;
    }
    drop(locker);
    if !args.keep {
        super::drop_namespace(&config, &pool).await?;
    }
    Ok(measured)
}

/// The latest revision each brand database has applied (its fabrics' highest), in one query.
async fn revisions(pool: &MySqlPool, dbs: &[DatabaseName]) -> anyhow::Result<Vec<i64>> {
    let sql = dbs
        .iter()
        .enumerate()
        .map(|(i, db)| {
            format!(
                "SELECT {i} AS b, COALESCE(MAX(revision), 0) AS r FROM {}.fabrics",
                db.quoted()
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let rows: Vec<(i64, i64)> = sqlx::query_as(&sql).fetch_all(pool).await?;
    let mut out = vec![0; dbs.len()];
    for (b, r) in rows {
        out[b as usize] = r;
    }
    Ok(out)
}

/// Encodes and produces the benchmark's catalog events.
struct Feed {
    codec: Codec,
    producer: FutureProducer,
    topic: String,
    brands: Vec<String>,
    fabrics: usize,
}

impl Feed {
    fn new(config: &Config, brands: &[Tenant], fabrics: usize) -> anyhow::Result<Feed> {
        Ok(Feed {
            codec: Codec::new(&config.schema_registry_url),
            producer: crate::log::kafka::producer_without_linger(config)?,
            topic: Topic::BrandCatalog.name(&config.namespace),
            brands: brands.iter().map(|b| b.id.clone()).collect(),
            fabrics: fabrics.max(1),
        })
    }

    /// Brand `b`'s event at `revision` (its fabrics' prices move with it), acknowledged.
    async fn send(&self, b: usize, revision: i64) -> anyhow::Result<Instant> {
        let fabrics: Vec<serde_json::Value> = (0..self.fabrics)
            .map(|i| fabric_json(i, revision))
            .collect();
        let line = json!({"event_id": uuid::Uuid::new_v4().to_string(),
            "occurred_at": chrono::Utc::now().timestamp_millis(),
            "brand_id": self.brands[b], "brand_slug": format!("brand{b}"), "revision": revision,
            "fabrics_upserted": fabrics, "fabrics_removed": []});
        let value = record_from_json(EventKind::BrandCatalogUpdated.schema(), &line, &[])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let payload = self
            .codec
            .encode(&self.topic, EventKind::BrandCatalogUpdated, value)
            .await
            .map_err(|e| anyhow::anyhow!("encode: {e}"))?;
        self.producer
            .send(
                FutureRecord::to(&self.topic)
                    .key(&self.brands[b])
                    .payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
        Ok(Instant::now())
    }

    /// Every brand's event at `revision`, produced together; when each was acknowledged.
    async fn send_all(&self, revision: i64) -> anyhow::Result<Vec<Instant>> {
        let sends = (0..self.brands.len()).map(|b| self.send(b, revision));
        futures::future::try_join_all(sends).await
    }

    fn flush(&self) -> anyhow::Result<()> {
        self.producer
            .flush(Duration::from_secs(30))
            .map_err(|e| anyhow::anyhow!("flush: {e}"))
    }
}
