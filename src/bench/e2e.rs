//! `tenancy bench e2e`: the whole path, from `tenancy emit` of N catalog events (validated,
//! encoded, produced) to the last one applied in MySQL by the catalog processor, next to the
//! broker's own consume rate for the same messages (a plain consumer reading them back) in the
//! same run. The ratio says how close the system comes to the broker's ceiling.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;

use super::catalog::{fabric_json, provision, Tenant};
use super::peak_rss_mib;
use crate::config::{Config, Reads};
use crate::log::topics::{ensure_topics, Topic};
use crate::store::tenants::Tenants;
use crate::stream::Settings;
use crate::tenancy::provisioning::prepare_service_databases;
use crate::tenant::{DatabaseName, Namespace, OrganisationType};

#[derive(Debug, Clone, clap::Args)]
pub struct E2eArgs {
    /// BrandCatalogUpdated events emitted.
    #[arg(long, default_value_t = 200_000)]
    pub events: usize,
    /// Fabrics per event.
    #[arg(long, default_value_t = 5)]
    pub per_event: usize,
    #[arg(long, default_value_t = 20)]
    pub brands: usize,
    /// Keep the benchmark's databases afterwards.
    #[arg(long)]
    pub keep: bool,
}

pub async fn run(mut config: Config, args: E2eArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.events > 0 && args.brands > 0,
        "--events and --brands must be positive"
    );
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    config.namespace = Namespace::parse(&format!("bench{}", &suffix[..6]))?;
    let ns = config.namespace.clone();
    let settings = Settings::default();
    let pool = crate::store::pools::connect_pool_sized(
        &config,
        (2 * settings.write_concurrency + 4) as u32,
    )
    .await?;
    ensure_topics(&config).await?;
    prepare_service_databases(&pool, &config.database_url, &ns).await?;
    let tenants = Tenants::on(
        crate::store::servers::Servers::single(pool.clone(), &config.database_url),
        &ns,
    );
    let mut brands: Vec<Tenant> = Vec::new();
    for i in 0..args.brands {
        brands.push(provision(&pool, &tenants, &config, OrganisationType::Brand, i).await?);
    }
    // The JSON lines an operator would give `tenancy emit`, written to a file as they are made
    // (nothing is held in memory); event k for brand k % brands.
    let input = std::env::temp_dir().join(format!("tenancy-bench-e2e-{suffix}.jsonl"));
    eprintln!(
        "namespace {ns}: {} brands; writing {} events to {}",
        args.brands,
        args.events,
        input.display()
    );
    {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&input)?);
        for k in 0..args.events {
            let b = k % args.brands;
            let n = k / args.brands;
            let fabrics: Vec<serde_json::Value> = (0..args.per_event)
                .map(|j| fabric_json((n * args.per_event + j) % 1000, n as i64))
                .collect();
            let line = json!({"type": "BrandCatalogUpdated", "brand_id": brands[b].id,
                "brand_slug": format!("brand{b}"), "revision": n, "fabrics_upserted": fabrics,
                "fabrics_removed": []});
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }

    // The processor runs from the start; the clock runs from starting `tenancy emit`.
    let topic = Topic::BrandCatalog.name(&ns);
    let brand_dbs: Vec<DatabaseName> = brands.iter().map(|b| b.db.clone()).collect();
    let started = Instant::now();
    let timed = super::with_catalog_processor(&config, &Default::default(), async {
        let (last, emit_rss) = emit(&config, &input).await?;
        let emitted = started.elapsed();
        super::wait_applied(&pool, &brand_dbs, &last).await?;
        anyhow::Ok((emitted, started.elapsed(), emit_rss))
    })
    .await;
    let _ = std::fs::remove_file(&input);
    let (emitted, applied, emit_rss) = timed?;
    let rss_peak = peak_rss_mib();
    let system_eps = args.events as f64 / applied.as_secs_f64();

    // The broker's own rate for the same messages.
    let broker_eps = plain_consume(&config, &topic, args.events).await?;
    // The projector's own rate for the same messages: already in the log, the brands' databases
    // empty again and the group rewound, so nothing but reading and applying them is timed.
    let projector_eps = replay_through_projector(
        &config,
        &pool,
        &brand_dbs,
        &last_of(&pool, &brand_dbs, &topic).await?,
    )
    .await?;
    let slower = broker_eps.min(projector_eps);
    println!(
        "end to end: {} catalog events of {} fabrics for {} brands: emitted in {:.1} s, all applied {:.1} s after the first was emitted = {system_eps:.0} events/s",
        args.events,
        args.per_event,
        args.brands,
        emitted.as_secs_f64(),
        applied.as_secs_f64()
    );
    println!(
        "broker: a plain consumer reads the same {} messages at {broker_eps:.0} events/s",
        args.events
    );
    println!(
        "peak RSS: the processor (this process) {rss_peak:.0} MiB; `tenancy emit` {emit_rss:.0} MiB"
    );
    println!(
        "projector: the catalog processor applies the same {} messages, already in the log, into empty databases at {projector_eps:.0} events/s",
        args.events
    );
    println!(
        "ratio system/broker consume: {:.2}",
        system_eps / broker_eps
    );
    let ratio = system_eps / slower;
    println!("ratio e2e/slower-of(read, write): {ratio:.2}");
    super::Row {
        benchmark: "tenancy bench e2e".into(),
        figure: format!("{system_eps:.0} events/s emitted to applied"),
        baseline: format!(
            "{slower:.0} events/s, the slower of a plain consumer ({broker_eps:.0}) and the projector alone ({projector_eps:.0})"
        ),
        ratio: Some(ratio),
        goal: "≥ 0.7".into(),
        met: ratio >= 0.7,
        peak_rss_mib: Some(rss_peak),
    }
    .print();
    if !args.keep {
        super::drop_namespace(&config, &pool).await?;
    }
    Ok(())
}

/// The catalog offsets the brands hold now (every partition's last applied).
async fn last_of(
    pool: &sqlx::MySqlPool,
    brands: &[DatabaseName],
    topic: &str,
) -> anyhow::Result<HashMap<i32, i64>> {
    let spec = crate::catalog::spec::CatalogSpec::load()?;
    let mut last: HashMap<i32, i64> = HashMap::new();
    for db in brands {
        for (p, o) in crate::rebuild::replay::held_offsets(pool, db, &spec, topic).await? {
            let e = last.entry(p).or_insert(-1);
            *e = (*e).max(o);
        }
    }
    Ok(last)
}

/// The brands' databases dropped and made again empty, the catalog group rewound to the
/// start, and the catalog processor run until it has applied `last` again: events/s.
async fn replay_through_projector(
    config: &Config,
    pool: &sqlx::MySqlPool,
    brands: &[DatabaseName],
    last: &HashMap<i32, i64>,
) -> anyhow::Result<f64> {
    use crate::tenancy::migrations;
    for db in brands {
        sqlx::query(&format!("DROP DATABASE {}", db.quoted()))
            .execute(pool)
            .await?;
        migrations::create_and_migrate(
            pool,
            &config.database_url,
            db,
            migrations::for_tenant(OrganisationType::Brand),
        )
        .await?;
    }
    let ns = &config.namespace;
    let (group, topics) = (
        format!("{ns}.catalog"),
        vec![Topic::BrandCatalog.name(ns), Topic::BrandAccess.name(ns)],
    );
    let rewound = config.clone();
    tokio::task::spawn_blocking(move || {
        crate::log::kafka::rewind_group(&rewound, &group, &topics, Duration::from_secs(60))
    })
    .await??;
    let events: i64 = last.values().map(|o| o + 1).sum();
    super::settle().await;
    let started = Instant::now();
    super::with_catalog_processor(config, &Default::default(), async {
        super::wait_applied(pool, brands, last).await
    })
    .await?;
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// Runs `tenancy emit FILE` (this binary) for the bench's namespace; returns the last offset
/// it reports per partition, and its peak RSS in MiB.
async fn emit(
    config: &Config,
    input: &std::path::Path,
) -> anyhow::Result<(HashMap<i32, i64>, f64)> {
    use tokio::io::AsyncBufReadExt;
    let mut command = super::tenancy_command(config)?;
    let mut child = command
        .arg("emit")
        .arg(input)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let rss = super::watch_peak_rss(child.id());
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut last: HashMap<i32, i64> = HashMap::new();
    // Each line: `topic/partition/offset<TAB>kind<TAB>key`.
    while let Some(line) = lines.next_line().await? {
        let place = line.split('\t').next().unwrap_or_default();
        let mut parts = place.rsplitn(3, '/');
        let (Some(offset), Some(partition)) = (parts.next(), parts.next()) else {
            anyhow::bail!("unexpected output of tenancy emit: {line}");
        };
        let e = last.entry(partition.parse()?).or_insert(-1);
        *e = (*e).max(offset.parse()?);
    }
    let status = child.wait().await?;
    anyhow::ensure!(status.success(), "tenancy emit failed: {status}");
    Ok((last, rss.await?))
}

/// Reads `count` messages of `topic` from the start with a plain consumer; messages/s.
async fn plain_consume(config: &Config, topic: &str, count: usize) -> anyhow::Result<f64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let config = config.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config
            .kafka_reader_config(Reads::Replay)
            .set("group.id", format!("{}.bench-plain", config.namespace))
            .set("enable.auto.commit", "false")
            .create()?;
        let meta = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut tpl = TopicPartitionList::new();
        for t in meta.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        let started = Instant::now();
        let mut read = 0;
        while read < count {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(900),
                "read {read} of {count}"
            );
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(_)) => read += 1,
                Some(Err(e)) => anyhow::bail!("consuming {topic}: {e}"),
                None => {}
            }
        }
        Ok(count as f64 / started.elapsed().as_secs_f64())
    })
    .await?
}
