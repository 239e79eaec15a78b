//! Shared test harness: a namespace per test (its own topics, databases and Redis keys), the
//! real `tenancy` binary, and waiting on conditions with deadlines instead of sleeps.
//!
//! The stack must be up (`scripts/test` does it): MariaDB, Redis, Tansu and the registry.
#![allow(dead_code)]

pub mod serve;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blindstrader_tenancy::config::Config;
use blindstrader_tenancy::log::events::{Event, EventKind};
use blindstrader_tenancy::log::topics::Topic;
use blindstrader_tenancy::log::wire::Codec;
use blindstrader_tenancy::tenant::Namespace;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::MySqlPool;

pub const DATABASE_URL: &str = "mysql://root@127.0.0.1:3306";

/// The stack's second MariaDB server (`scripts/stack up` starts it).
pub fn east_url() -> String {
    env_or("EAST_DATABASE_URL", "mysql://root@127.0.0.1:3307")
}

/// An organisation id that rendezvous placement puts on `server` of `servers` (as `tenancy
/// run` would place it with those servers, all open to new tenants).
pub fn id_placed_on(server: &str, servers: &[&str]) -> String {
    use blindstrader_tenancy::store::servers::placement_weight;
    loop {
        let id = new_id();
        let best = servers
            .iter()
            .max_by_key(|s| placement_weight(s, &id))
            .unwrap();
        if *best == server {
            return id;
        }
    }
}

pub fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

/// One test's namespace; its databases are dropped when it goes out of scope.
pub struct TestNs {
    pub ns: Namespace,
    pub config: Config,
    /// Whether dropping it cleans the namespace up (false for a second handle on it).
    owner: bool,
}

impl TestNs {
    pub fn new() -> TestNs {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let ns = Namespace::parse(&format!("t{}", &suffix[..10])).unwrap();
        let config = Config {
            kafka_bootstrap_servers: env_or("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
            schema_registry_url: env_or("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081"),
            database_url: env_or("DATABASE_URL", DATABASE_URL),
            servers: vec![("home".to_owned(), env_or("DATABASE_URL", DATABASE_URL))],
            place_new_on: Vec::new(),
            regions: Vec::new(),
            redis_url: env_or("REDIS_URL", "redis://127.0.0.1:6379"),
            namespace: ns.clone(),
            // Fewer partitions keep Tansu's per-test topic creation quick.
            partitions: 3,
            kafka_options: Vec::new(),
        };
        TestNs {
            ns,
            config,
            owner: true,
        }
    }

    /// A namespace whose tenants are placed over two servers: home (`DATABASE_URL`) and the
    /// stack's second MariaDB, `east` (`EAST_DATABASE_URL`, default 127.0.0.1:3307).
    pub fn with_east() -> TestNs {
        let mut t = TestNs::new();
        t.config.servers.push(("east".to_owned(), east_url()));
        t
    }

    /// A second handle on a namespace another `TestNs` owns (e.g. for a thread): dropping it
    /// cleans nothing up.
    pub fn attach(ns: Namespace, config: Config) -> TestNs {
        TestNs {
            ns,
            config,
            owner: false,
        }
    }

    pub fn topic(&self, t: Topic) -> String {
        t.name(&self.ns)
    }

    /// A `tenancy` command with this namespace's environment.
    pub fn tenancy(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenancy"));
        cmd.env("TENANCY_NAMESPACE", self.ns.as_str())
            .env("TENANCY_PARTITIONS", self.config.partitions.to_string())
            .env(
                "KAFKA_BOOTSTRAP_SERVERS",
                &self.config.kafka_bootstrap_servers,
            )
            .env("SCHEMA_REGISTRY_URL", &self.config.schema_registry_url)
            .env("DATABASE_URL", &self.config.database_url)
            .envs(self.config.servers_env())
            .env("REDIS_URL", &self.config.redis_url)
            .env("RUST_LOG", "info,sqlx=warn,rdkafka=warn");
        cmd
    }

    /// Runs `tenancy emit` on `lines`; returns its output.
    pub fn emit(&self, lines: &[String], extra: &[&str]) -> Output {
        use std::io::Write;
        let mut child = self
            .tenancy()
            .arg("emit")
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tenancy emit");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(lines.join("\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Emits and insists it worked.
    pub fn emit_ok(&self, lines: &[String]) -> String {
        let out = self.emit(lines, &[]);
        assert!(
            out.status.success(),
            "emit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Starts `tenancy run` in the background; logs go to a file named after the namespace.
    pub fn spawn_run(&self, tag: &str) -> Worker {
        self.spawn_run_with(tag, &[])
    }

    pub async fn pool(&self) -> MySqlPool {
        MySqlPool::connect(&self.config.database_url).await.unwrap()
    }

    /// A pool, with the namespace's service databases created and migrated (for tests that
    /// call the library without a worker).
    pub async fn prepared_pool(&self) -> MySqlPool {
        let pool = self.pool().await;
        blindstrader_tenancy::tenancy::provisioning::prepare_service_databases(
            &pool,
            &self.config.database_url,
            &self.ns,
        )
        .await
        .unwrap();
        pool
    }

    /// Every event on `topic` from the beginning, decoded; waits until at least `at_least`.
    pub async fn read_events(
        &self,
        topic: Topic,
        at_least: usize,
        timeout: Duration,
    ) -> Vec<Event> {
        let codec = Codec::new(&self.config.schema_registry_url);
        let raw = self.read_raw(topic, at_least, timeout);
        let mut out = Vec::new();
        for payload in raw {
            out.push(
                codec
                    .decode(payload.as_deref())
                    .await
                    .expect("decodable event"),
            );
        }
        out
    }

    /// Raw payloads of `topic`, all partitions from offset 0, until at least `at_least` arrived
    /// or `timeout` passed.
    pub fn read_raw(
        &self,
        topic: Topic,
        at_least: usize,
        timeout: Duration,
    ) -> Vec<Option<Vec<u8>>> {
        self.read_messages(topic, at_least, timeout)
            .into_iter()
            .map(|m| m.payload)
            .collect()
    }

    /// Messages currently on `topic` (sum of high watermarks), 0 if it does not exist.
    pub fn message_count(&self, topic: Topic) -> i64 {
        let name = self.topic(topic);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.config.kafka_bootstrap_servers)
            .create()
            .unwrap();
        let meta = consumer
            .fetch_metadata(Some(&name), Duration::from_secs(10))
            .unwrap();
        let Some(t) = meta.topics().first() else {
            return 0;
        };
        if t.error().is_some() {
            return 0;
        }
        t.partitions()
            .iter()
            .map(|p| {
                let (lo, hi) = consumer
                    .fetch_watermarks(&name, p.id(), Duration::from_secs(10))
                    .unwrap();
                hi - lo
            })
            .sum()
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        if !self.owner {
            return;
        }
        let _ = delete_redis_keys(&self.config.redis_url, &self.ns);
        // Dropping databases needs async sqlx; a helper thread with its own runtime keeps Drop
        // usable from inside #[tokio::test].
        // On every server the namespace placed tenants on.
        let urls: Vec<String> = self.config.servers.iter().map(|(_, u)| u.clone()).collect();
        let pattern = self.ns.database_like_pattern();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                for url in urls {
                    let pool = MySqlPool::connect(&url).await?;
                    let names: Vec<String> = sqlx::query_scalar(
                        "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE ?",
                    )
                    .bind(&pattern)
                    .fetch_all(&pool)
                    .await?;
                    for n in names {
                        sqlx::query(&format!("DROP DATABASE IF EXISTS `{n}`"))
                            .execute(&pool)
                            .await?;
                    }
                }
                Ok::<_, sqlx::Error>(())
            })
        })
        .join();
    }
}

/// A background `tenancy run`, killed (SIGKILL) when dropped.
pub struct Worker {
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Worker {
    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
        // A failed test says why the worker did not get there: its last log lines go with
        // the panic message (the harness shows a failing test's output only).
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- last {} lines of {} ---\n{}",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

/// Polls `check` until it returns Some or the deadline passes (then panics with `what`).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An OrganisationCreated JSON line.
pub fn created_line(event_id: &str, org: &str, kind: &str, slug: &str) -> String {
    format!(
        r#"{{"type":"OrganisationCreated","event_id":"{event_id}","organisation_id":"{org}","organisation_type":"{kind}","slug":"{slug}","name":"{slug} Ltd"}}"#
    )
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Tenant statuses by organisation id.
pub async fn statuses(pool: &MySqlPool, ns: &Namespace) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as(&format!(
        "SELECT organisation_id, CAST(status AS CHAR), database_name FROM `{ns}_platform`.tenants ORDER BY organisation_id"
    ))
    .fetch_all(pool)
    .await
    .unwrap_or_default()
}

pub fn kinds_of(events: &[Event]) -> Vec<EventKind> {
    events.iter().map(Event::kind).collect()
}

/// Deletes every Redis key of namespace `ns` (`{ns}:*`); returns how many went. Synchronous, so
/// it can run from a `Drop` inside `#[tokio::test]`.
pub fn delete_redis_keys(redis_url: &str, ns: &Namespace) -> redis::RedisResult<usize> {
    let mut conn = redis::Client::open(redis_url)?.get_connection()?;
    let pattern = format!("{ns}:*");
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query(&mut conn)?;
        if !keys.is_empty() {
            let n: usize = redis::cmd("DEL").arg(&keys).query(&mut conn)?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// One message as read from a topic, with its headers.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl RawMessage {
    /// The last value of header `name` as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn key_text(&self) -> Option<String> {
        self.key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    }
}

impl TestNs {
    /// Every message of `topic` (any full topic name) from offset 0 of all partitions, with
    /// headers, sorted by partition and offset; reads until at least `at_least` arrived or
    /// `timeout` passed.
    pub fn read_messages_of(
        &self,
        name: &str,
        at_least: usize,
        timeout: Duration,
    ) -> Vec<RawMessage> {
        use rdkafka::message::Headers;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.config.kafka_bootstrap_servers)
            .set(
                "group.id",
                format!("{}-reader-{}", self.ns, uuid::Uuid::new_v4()),
            )
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.config.partitions {
            tpl.add_partition_offset(name, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => out.push(RawMessage {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers: m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                                .collect()
                        })
                        .unwrap_or_default(),
                }),
                Some(Err(e)) => panic!("reading {name}: {e}"),
                None if out.len() >= at_least => break,
                None => {}
            }
        }
        out.sort_by_key(|m| (m.partition, m.offset));
        out
    }

    /// [`TestNs::read_messages_of`] for one of the namespace's topics.
    pub fn read_messages(
        &self,
        topic: Topic,
        at_least: usize,
        timeout: Duration,
    ) -> Vec<RawMessage> {
        self.read_messages_of(&self.topic(topic), at_least, timeout)
    }

    /// Produces raw bytes (as a foreign or broken client would) with the idempotent producer;
    /// returns the partition and offset the broker acknowledged.
    pub async fn produce_raw(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> (i32, i64) {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::FutureRecord;
        let mut hs = OwnedHeaders::new();
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let producer = blindstrader_tenancy::log::kafka::producer(&self.config).unwrap();
        let mut record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(hs);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        let delivery = producer
            .send(record, Duration::from_secs(30))
            .await
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
        (delivery.partition, delivery.offset)
    }

    /// Runs `tenancy` with `args`; returns (exit code, stdout, stderr).
    pub fn tenancy_output(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = self.tenancy().args(args).output().expect("run tenancy");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl TestNs {
    /// `tenancy run` with extra flags (e.g. `--grace 2s`). Each worker serves health on a port
    /// of its own (recorded in the workers table).
    pub fn spawn_run_with(&self, tag: &str, extra: &[&str]) -> Worker {
        self.spawn_run_env(tag, extra, &[])
    }

    /// [`TestNs::spawn_run_with`] with extra environment (e.g. `RUST_LOG`).
    pub fn spawn_run_env(&self, tag: &str, extra: &[&str], env: &[(&str, &str)]) -> Worker {
        let log = std::env::temp_dir().join(format!("{}-{tag}.log", self.ns));
        let file = std::fs::File::create(&log).unwrap();
        let child = self
            .tenancy()
            .args([
                "run",
                "--session-timeout-ms",
                "6000",
                "--http",
                "127.0.0.1:0",
            ])
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn tenancy run");
        Worker { child, log }
    }

    /// Whether every processor group has committed the end of its topics.
    pub fn all_caught_up(&self) -> bool {
        let out = self.tenancy().args(["topics", "lag"]).output().unwrap();
        out.status.success()
            && String::from_utf8_lossy(&out.stdout)
                .lines()
                .all(|l| l.contains("\t0 event(s) behind"))
    }
}

/// The number of rows of `db`.`table`.
pub async fn row_count(pool: &MySqlPool, db: &str, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM `{db}`.`{table}`"))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// CHECKSUM TABLE of every table of `db`, by table name: equal checksums, equal rows.
pub async fn checksums(pool: &MySqlPool, db: &str) -> Vec<(String, Option<i64>)> {
    let mut tables: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ?",
    )
    .bind(db)
    .fetch_all(pool)
    .await
    .unwrap();
    tables.sort();
    let mut out = Vec::new();
    for t in tables {
        let row: (String, Option<i64>) = sqlx::query_as(&format!("CHECKSUM TABLE `{db}`.`{t}`"))
            .fetch_one(pool)
            .await
            .unwrap();
        out.push((t, row.1));
    }
    out
}

pub async fn database_exists(pool: &MySqlPool, db: &str) -> bool {
    sqlx::query_scalar::<_, String>(
        "SELECT CAST(SCHEMA_NAME AS CHAR) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
    )
    .bind(db)
    .fetch_optional(pool)
    .await
    .unwrap()
    .is_some()
}

pub async fn status_of(pool: &MySqlPool, ns: &Namespace, org: &str) -> Option<String> {
    sqlx::query_scalar(&format!(
        "SELECT CAST(status AS CHAR) FROM `{ns}_platform`.tenants WHERE organisation_id = ?"
    ))
    .bind(org)
    .fetch_optional(pool)
    .await
    .unwrap_or(None)
}

impl TestNs {
    /// `tenancy status --json`.
    pub fn status(&self) -> serde_json::Value {
        let (code, out, err) = self.tenancy_output(&["status", "--json"]);
        assert_eq!(code, Some(0), "tenancy status failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON: {e}: {out}"))
    }

    /// Every dead letter so far (waits until at least `at_least` arrived).
    /// The health and metrics address a worker of this namespace registered (`pid`'s, or any
    /// worker's), waited for: a worker registers it once it has started.
    pub async fn worker_http_addr(&self, pool: &MySqlPool, pid: Option<u32>) -> String {
        wait_for(
            "a worker's health address",
            Duration::from_secs(120),
            || async {
                sqlx::query_scalar::<_, String>(&format!(
                "SELECT http_addr FROM `{}_platform`.workers WHERE ? IS NULL OR pid = ? LIMIT 1",
                self.ns
            ))
                .bind(pid)
                .bind(pid)
                .fetch_optional(pool)
                .await
                .unwrap()
            },
        )
        .await
    }

    pub fn dead_letters(&self, at_least: usize, timeout: Duration) -> Vec<RawMessage> {
        self.read_messages(Topic::DeadLetter, at_least, timeout)
    }

    /// The processors of one worker, in process (for tests that drive them directly).
    pub async fn processors(&self) -> blindstrader_tenancy::worker::Processors {
        blindstrader_tenancy::worker::Processors::build(
            &self.config,
            &blindstrader_tenancy::worker::WorkerOptions::default(),
        )
        .await
        .expect("build processors")
    }
}

/// A message as the loop would hand it to a processor, built by hand.
pub fn message<I>(
    topic: &str,
    partition: i32,
    offset: i64,
    key: &str,
    item: I,
) -> blindstrader_tenancy::stream::Msg<I> {
    use blindstrader_tenancy::stream::{Msg, Origin};
    let raw = rdkafka::message::OwnedMessage::new(
        Some(Vec::new()),
        Some(key.as_bytes().to_vec()),
        topic.to_owned(),
        rdkafka::Timestamp::NotAvailable,
        partition,
        offset,
        None,
    );
    Msg::new(
        Origin {
            topic: topic.to_owned(),
            partition,
            offset,
            key: Some(key.to_owned()),
        },
        item,
        raw,
    )
}

/// JSON lines for `tenancy emit`.
pub mod lines {
    use serde_json::{json, Value};

    pub fn created(org: &str, kind: &str, slug: &str) -> String {
        super::created_line(&super::new_id(), org, kind, slug)
    }

    pub fn terminated(event_id: &str, org: &str, kind: &str, slug: &str) -> String {
        json!({"type": "OrganisationTerminated", "event_id": event_id, "organisation_id": org,
            "organisation_type": kind, "slug": slug, "reason": "test", "terminated_by": "ops"})
        .to_string()
    }

    pub fn restored(event_id: &str, org: &str, kind: &str, slug: &str) -> String {
        json!({"type": "OrganisationRestored", "event_id": event_id, "organisation_id": org,
            "organisation_type": kind, "slug": slug, "restored_by": "ops"})
        .to_string()
    }

    /// The same restore with an explicit occurred_at (epoch ms).
    pub fn restored_at(event_id: &str, org: &str, kind: &str, slug: &str, at: i64) -> String {
        let mut v: Value = serde_json::from_str(&restored(event_id, org, kind, slug)).unwrap();
        v["occurred_at"] = json!(at);
        v.to_string()
    }

    pub fn fabric(code: &str, name: &str) -> Value {
        json!({"code": code, "name": name, "collection": "Aurora", "colour": "White",
            "material": "Blackout", "width_mm": 2000, "price_minor": 1500, "currency": "GBP"})
    }

    /// BrandCatalogUpdated upserting `codes` (named `{code} r{revision}`) and removing `removed`.
    pub fn catalog(brand: &str, revision: i64, codes: &[&str], removed: &[&str]) -> String {
        let upserts: Vec<Value> = codes
            .iter()
            .map(|c| fabric(c, &format!("{c} r{revision}")))
            .collect();
        json!({"type": "BrandCatalogUpdated", "brand_id": brand, "brand_slug": "b",
            "revision": revision, "fabrics_upserted": upserts, "fabrics_removed": removed})
        .to_string()
    }

    pub fn grant(event_id: &str, brand: &str, supplier: &str, permissions: &[&str]) -> String {
        json!({"type": "SupplierBrandAccessGranted", "event_id": event_id, "brand_id": brand,
            "supplier_id": supplier, "permissions": permissions})
        .to_string()
    }

    pub fn domain_assigned(retailer: &str, domain: &str) -> String {
        json!({"type": "RetailerDomainAssigned", "retailer_id": retailer, "domain": domain})
            .to_string()
    }

    pub fn domain_removed(retailer: &str, domain: &str) -> String {
        json!({"type": "RetailerDomainRemoved", "retailer_id": retailer, "domain": domain})
            .to_string()
    }

    pub fn revoke(brand: &str, supplier: &str) -> String {
        json!({"type": "SupplierBrandAccessRevoked", "brand_id": brand, "supplier_id": supplier})
            .to_string()
    }
}

/// `topic/partition/offset` of each line `tenancy emit` printed, in order.
pub fn emitted(stdout: &str) -> Vec<(String, i32, i64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let pos = l.split('\t').next()?;
            let mut parts = pos.rsplitn(3, '/');
            let offset = parts.next()?.parse().ok()?;
            let partition = parts.next()?.parse().ok()?;
            Some((parts.next()?.to_owned(), partition, offset))
        })
        .collect()
}

impl TestNs {
    /// Emits OrganisationCreated for each (organisation id, type, slug) and waits until every
    /// one is active (a worker must be running).
    pub async fn provisioned(&self, pool: &MySqlPool, orgs: &[(&str, &str, &str)]) {
        let lines: Vec<String> = orgs
            .iter()
            .map(|(org, kind, slug)| lines::created(org, kind, slug))
            .collect();
        self.emit_ok(&lines);
        for (org, _, _) in orgs {
            self.wait_status(pool, org, "active").await;
        }
    }

    /// Waits until `org`'s tenant has `status` and no lifecycle step under way.
    ///
    /// Settled too: the status is written before a step's work (an archive marks the row, then
    /// moves the tables), so a test that read the databases on the status alone raced the step.
    pub async fn wait_status(&self, pool: &MySqlPool, org: &str, status: &str) {
        wait_for(
            &format!("{org} to be {status} and settled"),
            Duration::from_secs(120),
            || async {
                let row: Option<(String, Option<String>)> = sqlx::query_as(&format!(
                    "SELECT CAST(status AS CHAR), lifecycle_pending FROM `{}_platform`.tenants \
                     WHERE organisation_id = ?",
                    self.ns
                ))
                .bind(org)
                .fetch_optional(pool)
                .await
                .unwrap_or(None);
                matches!(row, Some((s, None)) if s == status).then_some(())
            },
        )
        .await;
    }

    /// Waits until every processor group has committed the end of its topics.
    pub async fn wait_caught_up(&self) {
        wait_for(
            "every group to commit the end of its topics",
            Duration::from_secs(180),
            || async { self.all_caught_up().then_some(()) },
        )
        .await;
    }

    /// The `holds` every live worker reports for `processor`, as (waiting_for, events).
    pub fn holds(&self, processor: &str) -> Vec<(String, u64)> {
        let status = self.status();
        let mut out = Vec::new();
        for w in status["workers"].as_array().unwrap() {
            if w["live"] != serde_json::Value::Bool(true) {
                continue;
            }
            for p in w["report"]["processors"].as_array().unwrap() {
                if p["processor"] == processor {
                    for h in p["holds"].as_array().unwrap() {
                        out.push((
                            h["waiting_for"].as_str().unwrap().to_owned(),
                            h["events"].as_u64().unwrap(),
                        ));
                    }
                }
            }
        }
        out.sort();
        out
    }
}

/// The domains in a retailer database's `domains` table, in order.
pub async fn domains_of(pool: &MySqlPool, db: &str) -> Vec<String> {
    sqlx::query_scalar(&format!(
        "SELECT domain FROM `{db}`.domains ORDER BY domain"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Fabric rows (code, name, revision) of a brand database, in code order.
/// A running worker with one active brand `slug` and `revisions` catalog events applied.
pub async fn brand_with_catalog(
    t: &TestNs,
    pool: &MySqlPool,
    slug: &str,
    revisions: i64,
) -> (Worker, String, String) {
    let worker = t.spawn_run("w");
    let brand = new_id();
    t.emit_ok(&[lines::created(&brand, "BRAND", slug)]);
    t.wait_status(pool, &brand, "active").await;
    emit_revisions(t, pool, &brand, slug, 1..=revisions).await;
    (worker, brand, format!("{}_brand_{slug}", t.ns))
}

/// Emits catalog revisions (each adds a fabric `R{n}`) and waits until they are applied.
pub async fn emit_revisions(
    t: &TestNs,
    pool: &MySqlPool,
    brand: &str,
    slug: &str,
    revisions: std::ops::RangeInclusive<i64>,
) {
    let last = *revisions.end();
    let events: Vec<String> = revisions
        .map(|r| lines::catalog(brand, r, &["A", "B", &format!("R{r}")], &[]))
        .collect();
    t.emit_ok(&events);
    let db = format!("{}_brand_{slug}", t.ns);
    wait_for("the catalog to apply", Duration::from_secs(60), || async {
        fabric_rows(pool, &db)
            .await
            .iter()
            .any(|(c, _, _)| *c == format!("R{last}"))
            .then_some(())
    })
    .await;
}

/// A supplier's copies: (brand, code, name, price).
pub async fn copy_rows(pool: &MySqlPool, db: &str) -> Vec<(String, String, String, Option<i64>)> {
    sqlx::query_as(&format!(
        "SELECT brand_id, code, name, price_minor FROM `{db}`.brand_fabrics ORDER BY brand_id, code"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

pub async fn fabric_rows(pool: &MySqlPool, db: &str) -> Vec<(String, String, i64)> {
    sqlx::query_as(&format!(
        "SELECT code, name, revision FROM `{db}`.fabrics ORDER BY code"
    ))
    .fetch_all(pool)
    .await
    .unwrap_or_default()
}

/// Every namespace database and its rows (datetime columns left out: they record when a run
/// happened; so is `lifecycle_log.seq`, the order rows were written across organisations, which
/// only within one organisation follows the events), with the namespace normalised. `workers`
/// is left out: it says which processes ran, not what the events made.
pub async fn namespace_state(t: &TestNs, pool: &MySqlPool) -> Vec<(String, Vec<String>)> {
    let ns = t.ns.as_str();
    let mut dbs: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(SCHEMA_NAME AS CHAR) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE ?",
    )
    .bind(t.ns.database_like_pattern())
    .fetch_all(pool)
    .await
    .unwrap();
    dbs.sort();
    let mut out = Vec::new();
    for db in dbs {
        let mut tables: Vec<String> = sqlx::query_scalar(
            "SELECT CAST(TABLE_NAME AS CHAR) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? \
             AND TABLE_NAME NOT IN ('_sqlx_migrations', 'workers')",
        )
        .bind(&db)
        .fetch_all(pool)
        .await
        .unwrap();
        tables.sort();
        out.push((db.replacen(ns, "{ns}", 1), Vec::new()));
        for table in tables {
            let cols: Vec<String> = sqlx::query_scalar(
                "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? \
                 AND TABLE_NAME = ? AND DATA_TYPE NOT IN ('datetime', 'timestamp') \
                 AND NOT (TABLE_NAME = 'lifecycle_log' AND COLUMN_NAME = 'seq') ORDER BY ORDINAL_POSITION",
            )
            .bind(&db)
            .bind(&table)
            .fetch_all(pool)
            .await
            .unwrap();
            let concat = cols
                .iter()
                .map(|c| format!("COALESCE(CAST(`{c}` AS CHAR), '-')"))
                .collect::<Vec<_>>()
                .join(", '|', ");
            let mut rows: Vec<String> =
                sqlx::query_scalar(&format!("SELECT CONCAT({concat}) FROM `{db}`.`{table}`"))
                    .fetch_all(pool)
                    .await
                    .unwrap();
            rows.sort();
            let rows = rows.into_iter().map(|r| r.replace(ns, "{ns}")).collect();
            out.push((format!("{}.{table}", db.replacen(ns, "{ns}", 1)), rows));
        }
    }
    out
}

/// A TCP proxy in front of a real service, to take it away and bring it back (an outage as a
/// worker sees it) without touching the service the other tests share. `freeze` makes it a
/// server that accepts connections and never answers (a storage stall, a SIGSTOPped server).
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    frozen: tokio::sync::watch::Sender<bool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (frozen, thawed) = tokio::sync::watch::channel(false);
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let upstream = upstream.to_owned();
        let (accept_up, accept_conns) = (up.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if !accept_up.load(Ordering::SeqCst) {
                    drop(client); // refused, as a server that is down
                    continue;
                }
                let upstream = upstream.clone();
                let thawed = thawed.clone();
                let task = tokio::spawn(async move {
                    // Frozen: the connection is accepted and nothing answers.
                    if thawed.clone().wait_for(|f| !*f).await.is_err() {
                        return;
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (client_r, client_w) = client.into_split();
                    let (server_r, server_w) = server.into_split();
                    tokio::join!(
                        pump(client_r, server_w, thawed.clone()),
                        pump(server_r, client_w, thawed)
                    );
                });
                accept_conns.lock().unwrap().push(task);
            }
        });
        Proxy {
            addr,
            up,
            frozen,
            connections,
            accept,
        }
    }

    /// Cuts every open connection and refuses new ones.
    pub fn down(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn up(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Holds every byte in both directions, on open connections and new ones alike: the
    /// service behind looks hung.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Lets everything held through, and what follows.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

/// Copies one direction, holding what arrives while the proxy is frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut thawed: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if thawed.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.down();
    }
}
