//! Scaling under churn: three `tenancy run` workers in one group, a random one `kill -9`ed every
//! few seconds and a replacement started at once, while a mixed workload streams in. At the end
//! every tenant database, supplier copy and permission key must equal what one clean worker
//! builds from the same topics, no event applied twice, every partition owned once. And adding
//! workers to a running one must not stop the partitions that stay where they are.
//!
//! `CHAOS_EVENTS` (default 10,000) and `CHAOS_KILLS` (default 8) size the run; `scripts/soak`
//! runs it at 50,000 events. Each run draws a new seed for the workload and the kills and
//! prints it; `CHAOS_SEED` replays one.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::lines;
use common::*;
use sqlx::MySqlPool;

const SETTLE: Duration = Duration::from_secs(600);
/// Catalog apply lines at debug level, so the logs can be counted for doubles.
const LOG: (&str, &str) = (
    "RUST_LOG",
    "info,sqlx=warn,rdkafka=warn,blindstrader_tenancy::catalog=debug",
);

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64: a seeded, repeatable stream (no dependency for a test's dice).
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

struct Org {
    id: String,
    kind: &'static str,
    slug: String,
    archived: bool,
}

/// The workload in waves: organisations (a fifth of them created only after events for them
/// were sent), catalogs with rising revisions, grants and revokes, terminations and restores
/// within the grace period.
fn workload(total: usize, waves: usize, dice: &mut Dice) -> Vec<Vec<String>> {
    let mut orgs: Vec<Org> = Vec::new();
    for (kind, n) in [("BRAND", 12), ("SUPPLIER", 16), ("RETAILER", 4)] {
        for i in 0..n {
            orgs.push(Org {
                id: new_id(),
                kind,
                slug: format!("{}{i}", kind.to_lowercase()),
                archived: false,
            });
        }
    }
    let late: BTreeSet<usize> = (0..orgs.len()).filter(|i| i % 5 == 4).collect();
    let brands: Vec<usize> = (0..orgs.len())
        .filter(|i| orgs[*i].kind == "BRAND")
        .collect();
    let suppliers: Vec<usize> = (0..orgs.len())
        .filter(|i| orgs[*i].kind == "SUPPLIER")
        .collect();
    let mut revision: HashMap<usize, i64> = HashMap::new();
    let mut out: Vec<Vec<String>> = vec![Vec::new(); waves];
    out[0].extend(
        orgs.iter()
            .enumerate()
            .filter(|(i, _)| !late.contains(i))
            .map(|(_, o)| lines::created(&o.id, o.kind, &o.slug)),
    );
    // The late ones arrive in the third wave, after events naming them.
    out[2.min(waves - 1)].extend(
        late.iter()
            .map(|i| lines::created(&orgs[*i].id, orgs[*i].kind, &orgs[*i].slug)),
    );
    let per_wave = total / waves;
    for wave in out.iter_mut() {
        for _ in 0..per_wave {
            let roll = dice.below(1000);
            let b = brands[dice.below(brands.len() as u64) as usize];
            let s = suppliers[dice.below(suppliers.len() as u64) as usize];
            if roll < 800 {
                let r = revision.entry(b).or_insert(0);
                *r += 1;
                let codes: Vec<String> =
                    (0..3).map(|_| format!("F{:02}", dice.below(40))).collect();
                let codes: Vec<&str> = codes.iter().map(String::as_str).collect();
                let removed = format!("F{:02}", dice.below(40));
                let removed: Vec<&str> = if dice.below(5) == 0 {
                    vec![&removed]
                } else {
                    vec![]
                };
                wave.push(lines::catalog(&orgs[b].id, *r, &codes, &removed));
            } else if roll < 900 {
                let permissions: &[&str] = match dice.below(3) {
                    0 => &["catalog.read"],
                    1 => &["catalog.read", "pricing.read"],
                    _ => &["pricing.read"],
                };
                wave.push(lines::grant(
                    &new_id(),
                    &orgs[b].id,
                    &orgs[s].id,
                    permissions,
                ));
            } else if roll < 990 {
                wave.push(lines::revoke(&orgs[b].id, &orgs[s].id));
            } else {
                // A termination, or the restore of an archived tenant, of a brand or supplier
                // created up front.
                let pick = if dice.below(2) == 0 { b } else { s };
                if late.contains(&pick) {
                    continue;
                }
                let o = &mut orgs[pick];
                let line = if o.archived {
                    lines::restored(&new_id(), &o.id, o.kind, &o.slug)
                } else {
                    lines::terminated(&new_id(), &o.id, o.kind, &o.slug)
                };
                o.archived = !o.archived;
                wave.push(line);
            }
        }
    }
    out
}

/// Every `{ns}:*` key of Redis with its value, but the stamps that only have to move and differ
/// in every run: the domain cache's generation and the brands' catalog versions.
fn redis_state(t: &TestNs) -> BTreeMap<String, String> {
    let mut conn = redis::Client::open(t.config.redis_url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", t.ns))
        .query(&mut conn)
        .unwrap();
    let generation = blindstrader_tenancy::cache::domain_generation_key(&t.ns);
    let versions = blindstrader_tenancy::cache::catalog_version_key(&t.ns, "");
    keys.into_iter()
        .filter(|k| *k != generation && !k.starts_with(&versions))
        .map(|k| {
            let v: String = redis::cmd("GET").arg(&k).query(&mut conn).unwrap();
            (k, v)
        })
        .collect()
}

/// Catalog events the workers' logs say were applied (`catalog applied … events=N`).
fn applied_in_logs(workers: &[&Worker]) -> u64 {
    workers
        .iter()
        .flat_map(|w| {
            w.log_text()
                .lines()
                .filter(|l| l.contains("catalog applied"))
                .filter_map(|l| {
                    l.split_whitespace()
                        .find_map(|f| f.strip_prefix("events="))
                        .and_then(|n| n.parse::<u64>().ok())
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Every group at the end of its topics, nothing held by any live worker.
async fn settled(t: &TestNs) {
    wait_for(
        "every group caught up with nothing held",
        SETTLE,
        || async {
            (t.all_caught_up() && t.holds("catalog").is_empty() && t.holds("purger").is_empty())
                .then_some(())
        },
    )
    .await;
}

/// Every table that differs (up to ten), each with a few of its differing rows: the first
/// alone seldom says what went wrong.
fn differences(a: &[(String, Vec<String>)], b: &[(String, Vec<String>)]) -> Option<String> {
    let (ma, mb): (BTreeMap<_, _>, BTreeMap<_, _>) =
        (a.iter().cloned().collect(), b.iter().cloned().collect());
    let mut found = Vec::new();
    for key in ma.keys().chain(mb.keys()).collect::<BTreeSet<_>>() {
        let (ra, rb) = (ma.get(key), mb.get(key));
        if ra.is_none() || rb.is_none() {
            let side = if ra.is_none() { "clean" } else { "chaos" };
            found.push(format!("{key} exists only in the {side} run"));
        } else if ra != rb {
            let (ra, rb) = (
                ra.cloned().unwrap_or_default(),
                rb.cloned().unwrap_or_default(),
            );
            let only_a: Vec<&String> = ra.iter().filter(|r| !rb.contains(r)).take(3).collect();
            let only_b: Vec<&String> = rb.iter().filter(|r| !ra.contains(r)).take(3).collect();
            found.push(format!(
                "{key}: {} rows under chaos, {} clean; only under chaos {only_a:?}; only clean {only_b:?}",
                ra.len(),
                rb.len()
            ));
        }
    }
    let total = found.len();
    found.truncate(10);
    (total > 0).then(|| format!("{total} table(s) differ:\n{}", found.join("\n")))
}

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_killed_at_random_end_as_one_clean_worker_does() {
    let events = env_usize("CHAOS_EVENTS", 10_000);
    let kills = env_usize("CHAOS_KILLS", 8);
    let t = TestNs::new();
    let pool = t.pool().await;
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("chaos: seed {seed} (CHAOS_SEED={seed} replays this run)");
    let mut dice = Dice(seed);
    let waves = workload(events, 10, &mut dice);
    let flags = ["--grace", "1h"];
    let mut generation = 0;
    let mut spawn = |t: &TestNs| {
        generation += 1;
        t.spawn_run_env(&format!("chaos-{generation}"), &flags, &[LOG])
    };
    let mut workers: Vec<Worker> = (0..3).map(|_| spawn(&t)).collect();
    let mut dead: Vec<Worker> = Vec::new();

    // The workload streams in, a wave every second, while workers die.
    let emitter = {
        let config = t.config.clone();
        let ns = t.ns.clone();
        std::thread::spawn(move || {
            let t = TestNs::attach(ns, config);
            for wave in waves {
                t.emit_ok(&wave);
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let started = Instant::now();
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(1000 + dice.below(3000))).await;
        let victim = dice.below(3) as usize;
        let mut w = std::mem::replace(&mut workers[victim], spawn(&t));
        w.kill9();
        eprintln!(
            "chaos: kill {}/{kills} of worker {victim} at {:.1}s",
            k + 1,
            started.elapsed().as_secs_f64()
        );
        dead.push(w);
    }
    emitter.join().expect("the workload was emitted");
    settled(&t).await;
    let converged = started.elapsed();
    // Every partition of every group owned by exactly one live worker.
    let status = t.status();
    for p in status["partitions"].as_array().unwrap() {
        assert_eq!(
            p["owners"].as_array().unwrap().len(),
            1,
            "partition not owned exactly once: {p}"
        );
    }
    let chaos_state = namespace_state(&t, &pool).await;
    let chaos_keys = redis_state(&t);
    let chaos_applied = {
        let all: Vec<&Worker> = dead.iter().chain(workers.iter()).collect();
        applied_in_logs(&all)
    };
    assert_eq!(
        t.message_count(blindstrader_tenancy::log::topics::Topic::DeadLetter),
        0
    );
    for w in &mut workers {
        w.terminate();
    }
    eprintln!(
        "chaos: {events} events, {kills} kills, converged {:.1}s after the first worker started",
        converged.as_secs_f64()
    );

    // The same topics, replayed from the start by one clean worker.
    drop_namespace(&t, &pool).await;
    delete_redis_keys(&t.config.redis_url, &t.ns).unwrap();
    for processor in ["provisioner", "catalog", "purger"] {
        let (code, _, err) = t.tenancy_output(&["topics", "rewind", processor]);
        assert_eq!(code, Some(0), "{err}");
    }
    let clean = t.spawn_run_env("clean", &flags, &[LOG]);
    settled(&t).await;
    let clean_state = namespace_state(&t, &pool).await;
    let clean_keys = redis_state(&t);
    let clean_applied = applied_in_logs(&[&clean]);

    let tables: usize = chaos_state.iter().map(|(_, rows)| rows.len()).sum();
    eprintln!(
        "chaos: {} tables, {tables} rows, {} permission keys; catalog events applied: {chaos_applied} under chaos, {clean_applied} clean",
        chaos_state.len(),
        chaos_keys.len()
    );
    assert!(tables > 1000, "a meaningful state: {tables} rows");
    if let Some(diff) = differences(&chaos_state, &clean_state) {
        panic!("the chaos run differs from one clean worker: {diff}");
    }
    assert_eq!(chaos_state.len(), clean_state.len());
    // Keys live 300 s: a run longer than that may have lost early ones to their TTL.
    if converged < Duration::from_secs(280) {
        assert_eq!(chaos_keys, clean_keys, "permission keys differ");
    } else {
        for (k, v) in &chaos_keys {
            assert_eq!(clean_keys.get(k), Some(v), "permission key {k}");
        }
    }
    // A log line is written right after each commit, so a kill may lose one (with all the
    // events of its batch), never add one: more applications under chaos than clean would be
    // an event applied twice. (That the rest were applied is what the state comparison shows.)
    assert!(
        chaos_applied <= clean_applied,
        "{chaos_applied} applications under chaos, {clean_applied} by one clean worker"
    );
}

async fn drop_namespace(t: &TestNs, pool: &MySqlPool) {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(SCHEMA_NAME AS CHAR) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE ?",
    )
    .bind(t.ns.database_like_pattern())
    .fetch_all(pool)
    .await
    .unwrap();
    for n in names {
        sqlx::query(&format!("DROP DATABASE `{n}`"))
            .execute(pool)
            .await
            .unwrap();
    }
}

/// Adding a second and a third worker to a running one: partitions that stay with the first
/// keep flowing; the pause each brand saw is printed.
#[tokio::test(flavor = "multi_thread")]
async fn adding_workers_moves_partitions_without_pausing_the_others() {
    use blindstrader_tenancy::log::events::{json::record_from_json, EventKind};
    use blindstrader_tenancy::log::topics::Topic;
    use rdkafka::producer::FutureRecord;

    let t = TestNs::new();
    let pool = t.pool().await;
    let first = t.spawn_run("scale-1");
    let brands: Vec<String> = (0..6).map(|_| new_id()).collect();
    let lines: Vec<String> = brands
        .iter()
        .enumerate()
        .map(|(i, b)| lines::created(b, "BRAND", &format!("scale{i}")))
        .collect();
    t.emit_ok(&lines);
    for b in &brands {
        t.wait_status(&pool, b, "active").await;
    }
    // Brands' partitions on the catalog topic, from one event each.
    let out = t.emit_ok(
        &brands
            .iter()
            .map(|b| lines::catalog(b, 0, &["X"], &[]))
            .collect::<Vec<_>>(),
    );
    let partition_of: Vec<i32> = emitted(&out).into_iter().map(|(_, p, _)| p).collect();

    let codec = blindstrader_tenancy::log::wire::Codec::new(&t.config.schema_registry_url);
    let producer = blindstrader_tenancy::log::kafka::producer(&t.config).unwrap();
    let topic = t.topic(Topic::BrandCatalog);
    let mut sent: Vec<(usize, i64, Instant)> = Vec::new();
    let mut seen: HashMap<(usize, i64), Instant> = HashMap::new();
    let mut last_seen: Vec<i64> = vec![0; brands.len()];
    let started = Instant::now();
    let (mut second, mut third) = (None, None);
    let mut revision = 0;
    let dbs: Vec<String> = (0..brands.len())
        .map(|i| format!("{}_brand_scale{i}", t.ns))
        .collect();
    while started.elapsed() < Duration::from_secs(24) {
        revision += 1;
        for (i, b) in brands.iter().enumerate() {
            let mut line: serde_json::Value =
                serde_json::from_str(&lines::catalog(b, revision, &["A"], &[])).unwrap();
            let fields = line.as_object_mut().unwrap();
            fields.remove("type");
            fields.insert("event_id".into(), new_id().into());
            fields.insert(
                "occurred_at".into(),
                chrono::Utc::now().timestamp_millis().into(),
            );
            let value =
                record_from_json(EventKind::BrandCatalogUpdated.schema(), &line, &[]).unwrap();
            let payload = codec
                .encode(&topic, EventKind::BrandCatalogUpdated, value)
                .await
                .unwrap();
            producer
                .send(
                    FutureRecord::to(&topic).key(b).payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
            sent.push((i, revision, Instant::now()));
        }
        for (i, db) in dbs.iter().enumerate() {
            let max: Option<i64> =
                sqlx::query_scalar(&format!("SELECT MAX(revision) FROM `{db}`.fabrics"))
                    .fetch_one(&pool)
                    .await
                    .unwrap_or(None);
            let max = max.unwrap_or(0);
            for r in last_seen[i] + 1..=max {
                seen.insert((i, r), Instant::now());
            }
            last_seen[i] = last_seen[i].max(max);
        }
        if second.is_none() && started.elapsed() > Duration::from_secs(6) {
            second = Some(t.spawn_run("scale-2"));
        }
        if third.is_none() && started.elapsed() > Duration::from_secs(12) {
            third = Some(t.spawn_run("scale-3"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + SETTLE;
    loop {
        let mut all = true;
        for (i, db) in dbs.iter().enumerate() {
            let max: Option<i64> =
                sqlx::query_scalar(&format!("SELECT MAX(revision) FROM `{db}`.fabrics"))
                    .fetch_one(&pool)
                    .await
                    .unwrap_or(None);
            let max = max.unwrap_or(0);
            for r in last_seen[i] + 1..=max {
                seen.insert((i, r), Instant::now());
            }
            last_seen[i] = last_seen[i].max(max);
            all &= max == revision;
        }
        if all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every revision applied in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Which catalog partitions the first worker gave away.
    let revoked: BTreeSet<i32> = first
        .log_text()
        .lines()
        .filter(|l| l.contains("partitions revoked") && l.contains("processor=\"catalog\""))
        .flat_map(|l| {
            l.split(&format!("{topic}/"))
                .skip(1)
                .filter_map(|rest| {
                    rest.split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse()
                        .ok()
                })
                .collect::<Vec<i32>>()
        })
        .collect();
    // Latency of each event (sent → visible in MySQL): its steady-state value is the lifecycle
    // skew plus a batch; a pause shows as the worst one.
    let mut worst: Vec<Duration> = vec![Duration::ZERO; brands.len()];
    let mut steady: Vec<Duration> = vec![Duration::ZERO; brands.len()];
    for (i, r, at) in &sent {
        let latency = seen[&(*i, *r)].saturating_duration_since(*at);
        worst[*i] = worst[*i].max(latency);
        if at.duration_since(started) < Duration::from_secs(5) {
            steady[*i] = steady[*i].max(latency);
        }
    }
    let mut kept_worst = Duration::ZERO;
    for i in 0..brands.len() {
        let moved = revoked.contains(&partition_of[i]);
        eprintln!(
            "scale-out: brand {i} on {topic}/{}: {}; steady worst {} ms, worst during scale-out {} ms, pause {} ms",
            partition_of[i],
            if moved { "moved" } else { "stayed" },
            steady[i].as_millis(),
            worst[i].as_millis(),
            worst[i].saturating_sub(steady[i]).as_millis(),
        );
        if !moved {
            kept_worst = kept_worst.max(worst[i].saturating_sub(steady[i]));
        }
    }
    eprintln!(
        "scale-out: worst extra latency of a partition that stayed: {} ms",
        kept_worst.as_millis()
    );
    assert!(
        kept_worst < Duration::from_secs(3),
        "a partition that did not move was paused for {kept_worst:?}"
    );
}
