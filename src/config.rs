//! Configuration, resolved once at start-up into [`Config`]: flag > environment > default.
//!
//! clap reads the environment for each flag, so `--namespace` beats `TENANCY_NAMESPACE`, which
//! beats the default; nothing below `main` reads the environment again.

use clap::Args;
use rdkafka::ClientConfig;

use crate::tenant::Namespace;

/// Connection flags shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        global = true,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub bootstrap_servers: String,
    /// Confluent-compatible schema registry URL.
    #[arg(
        long,
        global = true,
        env = "SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub schema_registry_url: String,
    /// MySQL server URL, without a database: tenant databases are named per query.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "mysql://root@127.0.0.1:3306"
    )]
    pub database_url: String,
    /// More MySQL servers for tenant databases, NAME=URL, several separated by commas (e.g.
    /// east=mysql://root@10.0.0.2:3306). DATABASE_URL is the server named `home`: it keeps the
    /// service databases and the locks, and tenant databases too. A tenant stays on the server
    /// it was placed on; every process of a namespace needs every server its tenants are on.
    #[arg(
        long,
        global = true,
        env = "TENANCY_SERVERS",
        value_name = "NAME=URL[,NAME=URL…]",
        value_delimiter = ','
    )]
    pub servers: Vec<String>,
    /// The servers new tenants are placed on (by a hash of the organisation id), comma
    /// separated; default every server. Leave a full server out to stop its growth.
    #[arg(
        long,
        global = true,
        env = "TENANCY_PLACE_NEW_ON",
        value_name = "NAME[,NAME…]",
        value_delimiter = ','
    )]
    pub place_new_on: Vec<String>,
    /// The region each server keeps its data in, NAME=REGION comma separated (e.g.
    /// home=eu,east=us). An organisation created with a `region` is placed only on servers of
    /// that region, and `rebuild --to-server` never moves it out; none there: its provisioning
    /// fails with that reason. Organisations without one go anywhere, as before.
    #[arg(
        long,
        global = true,
        env = "TENANCY_SERVER_REGIONS",
        value_name = "NAME=REGION[,NAME=REGION…]",
        value_delimiter = ','
    )]
    pub server_regions: Vec<String>,
    /// Redis URL for the permission and domain caches.
    #[arg(
        long,
        global = true,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Namespace prefixing every database, topic and Redis key.
    #[arg(
        long,
        global = true,
        env = "TENANCY_NAMESPACE",
        default_value = "blindstrader"
    )]
    pub namespace: String,
    /// Partitions for topics this command creates.
    #[arg(long, global = true, env = "TENANCY_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Extra librdkafka settings for every Kafka client, KEY=VALUE, several separated by commas
    /// or the flag repeated: e.g. security.protocol=SASL_PLAINTEXT,sasl.mechanisms=PLAIN, or
    /// debug=cgrp,fetch. A comma starts a new setting only where KEY= follows it, so list
    /// values keep theirs.
    #[arg(long = "kafka-option", global = true, env = "KAFKA_OPTIONS",
        value_name = "KEY=VALUE[,KEY=VALUE…]", value_parser = kafka_options)]
    pub kafka_options: Vec<KafkaOptions>,
}

/// The settings of one `--kafka-option` (or `KAFKA_OPTIONS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaOptions(pub Vec<(String, String)>);

/// Splits `raw` into settings at the commas followed by a setting's name and `=`; any other
/// comma belongs to the value before it (`debug=cgrp,fetch`, `bootstrap.servers=a:9092,b:9092`).
/// clap's own delimiter split every comma, so such values could not be passed at all.
fn kafka_options(raw: &str) -> Result<KafkaOptions, String> {
    let mut settings: Vec<(String, String)> = Vec::new();
    for part in raw.split(',') {
        match part.split_once('=') {
            Some((key, value)) if is_setting_name(key.trim()) => {
                settings.push((key.trim().to_owned(), value.to_owned()))
            }
            _ => match settings.last_mut() {
                Some((_, value)) => {
                    value.push(',');
                    value.push_str(part);
                }
                None => {
                    return Err(format!(
                        "expected KEY=VALUE (a librdkafka setting), got {raw:?}"
                    ))
                }
            },
        }
    }
    Ok(KafkaOptions(settings))
}

/// librdkafka's setting names: lower-case words joined by dots (and underscores).
fn is_setting_name(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_')
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka_bootstrap_servers: String,
    pub schema_registry_url: String,
    /// The home server's URL (the first of `servers`).
    pub database_url: String,
    /// Every MySQL server, `(name, url)`, home first (see `store::servers`).
    pub servers: Vec<(String, String)>,
    /// Servers new tenants go to (empty: all).
    pub place_new_on: Vec<String>,
    /// `(server, region)` for each server that names its region.
    pub regions: Vec<(String, String)>,
    pub redis_url: String,
    pub namespace: Namespace,
    pub partitions: i32,
    /// Extra librdkafka settings for every client (SASL, TLS, debug).
    pub kafka_options: Vec<(String, String)>,
}

impl Config {
    pub fn resolve(args: &ConnectionArgs) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=1000).contains(&args.partitions),
            "--partitions must be between 1 and 1000, got {}",
            args.partitions
        );
        let servers = parse_list(&args.database_url, &args.servers)?;
        let regions = parse_regions(&servers, &args.server_regions)?;
        Ok(Config {
            kafka_bootstrap_servers: args.bootstrap_servers.clone(),
            schema_registry_url: args.schema_registry_url.trim_end_matches('/').to_owned(),
            database_url: args.database_url.clone(),
            servers,
            regions,
            place_new_on: args
                .place_new_on
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            redis_url: args.redis_url.clone(),
            namespace: Namespace::parse(&args.namespace)?,
            partitions: args.partitions,
            kafka_options: args
                .kafka_options
                .iter()
                .flat_map(|o| o.0.iter().cloned())
                .collect(),
        })
    }

    /// Only the home server, and new tenants placed there.
    pub fn home_only(&mut self) {
        self.servers.truncate(1);
        self.place_new_on.clear();
        self.regions.retain(|(server, _)| server == HOME);
    }

    /// `TENANCY_SERVERS`, `TENANCY_PLACE_NEW_ON` and `TENANCY_SERVER_REGIONS` as this
    /// configuration has them, for a child process (which must reach every server its tenants
    /// are on, and place them alike).
    pub fn servers_env(&self) -> [(&'static str, String); 3] {
        let extra: Vec<String> = self.servers[1..]
            .iter()
            .map(|(name, url)| format!("{name}={url}"))
            .collect();
        let regions: Vec<String> = self
            .regions
            .iter()
            .map(|(server, region)| format!("{server}={region}"))
            .collect();
        [
            ("TENANCY_SERVERS", extra.join(",")),
            ("TENANCY_PLACE_NEW_ON", self.place_new_on.join(",")),
            ("TENANCY_SERVER_REGIONS", regions.join(",")),
        ]
    }

    /// Base librdkafka settings every client of ours starts from.
    pub fn kafka_client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.kafka_bootstrap_servers)
            .set("client.id", format!("tenancy-{}", self.namespace));
        for (k, v) in &self.kafka_options {
            c.set(k, v);
        }
        c
    }

    /// Base settings for a client that reads: [`Config::kafka_client_config`] with the fetch
    /// settings for `reads` (a `--kafka-option` still overrides them).
    pub fn kafka_reader_config(&self, reads: Reads) -> ClientConfig {
        let mut c = ClientConfig::new();
        for &(k, v) in reads.fetch_settings() {
            c.set(k, v);
        }
        for (k, v) in self.kafka_client_config().config_map() {
            c.set(k, v);
        }
        // librdkafka refuses a fetch.max.bytes below message.max.bytes: one raised by
        // `--kafka-option` raises the fetch size with it rather than failing every consumer.
        let raised = c
            .get("message.max.bytes")
            .filter(|_| {
                !self
                    .kafka_options
                    .iter()
                    .any(|(k, _)| k == "fetch.max.bytes")
            })
            .map(str::to_owned);
        if let Some(max) = raised {
            c.set("fetch.max.bytes", max);
        }
        c
    }
}

/// How a consumer reads, which decides what it asks of each fetch.
///
/// Why it matters on the local broker (nisshi 0.7.0-pre.2, sqlite storage): a fetch that has
/// not filled its byte budget when its wait (`fetch.wait.max.ms`) runs out carries on with the
/// budget left one record per storage query, each paying the whole query again. With
/// librdkafka's defaults (500 ms, up to 5 MiB granted by the broker) a consumer behind by more
/// than a few thousand records read 4,800 messages/s; with either setting below, 17,800-20,500
/// (`tenancy bench broker`, 100,000 messages of 200 B, docs/benchmarks.md). Harmless on Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// A processor's group consumer: events must arrive soon after they are written, so the
    /// broker's wait stays short and each fetch asks for at most 1 MB (librdkafka's least,
    /// `message.max.bytes`), which the broker fills well within the wait.
    Live,
    /// A replay of a known range (rebuild, restore, a benchmark's plain reader): as much per
    /// fetch as the broker grants, and wait long enough to fill it, since the broker reads
    /// every record to the partition's end for each fetch and fewer, larger fetches read less.
    Replay,
}

impl Reads {
    fn fetch_settings(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Reads::Live => &[("fetch.max.bytes", "1000000")],
            Reads::Replay => &[("fetch.wait.max.ms", "5000")],
        }
    }
}

/// The name of the server `DATABASE_URL` points at.
pub const HOME: &str = "home";

/// A server name: lower-case letters, digits and `_`, a letter first, at most 32 characters
/// (it is stored in `tenants.server` and shown in logs and metrics).
pub fn valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A region name: lower-case letters, digits and `-`, a letter first, at most 32 characters
/// (stored in `tenants.region`).
pub fn valid_region(region: &str) -> bool {
    (1..=32).contains(&region.len())
        && region.starts_with(|c: char| c.is_ascii_lowercase())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Parses `TENANCY_SERVER_REGIONS` entries (`NAME=REGION`), each naming a server of `servers`
/// once.
pub fn parse_regions(
    servers: &[(String, String)],
    entries: &[String],
) -> anyhow::Result<Vec<(String, String)>> {
    let mut regions: Vec<(String, String)> = Vec::new();
    for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let (name, region) = entry.split_once('=').ok_or_else(|| {
            anyhow::anyhow!(
                "TENANCY_SERVER_REGIONS entry {entry:?} is not NAME=REGION (e.g. east=eu)"
            )
        })?;
        let (name, region) = (name.trim(), region.trim());
        anyhow::ensure!(
            servers.iter().any(|(n, _)| n == name),
            "TENANCY_SERVER_REGIONS names server {name:?}, which is not in the servers list ({})",
            servers
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        anyhow::ensure!(
            valid_region(region),
            "region {region:?} of server {name} must be lower-case letters, digits and -, a letter first, at most 32 characters"
        );
        anyhow::ensure!(
            !regions.iter().any(|(n, _)| n == name),
            "TENANCY_SERVER_REGIONS gives server {name:?} twice"
        );
        regions.push((name.to_owned(), region.to_owned()));
    }
    Ok(regions)
}

/// Parses `TENANCY_SERVERS` entries (`NAME=URL`) into the servers list, home first.
pub fn parse_list(database_url: &str, entries: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut list = vec![(HOME.to_owned(), database_url.to_owned())];
    for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let (name, url) = entry.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("TENANCY_SERVERS entry {entry:?} is not NAME=URL (e.g. east=mysql://root@10.0.0.2:3306)")
        })?;
        let (name, url) = (name.trim(), url.trim());
        anyhow::ensure!(
            valid_name(name),
            "server name {name:?} must be lower-case letters, digits and _, a letter first, at most 32 characters"
        );
        anyhow::ensure!(
            name != HOME || url == database_url,
            "server name {HOME:?} is DATABASE_URL's ({database_url}); name {url} otherwise"
        );
        anyhow::ensure!(
            url.starts_with("mysql://") || url.starts_with("mariadb://"),
            "server {name}: {url:?} is not a mysql:// URL"
        );
        if name == HOME {
            continue;
        }
        anyhow::ensure!(
            !list.iter().any(|(n, _)| n == name),
            "server {name:?} is listed twice"
        );
        anyhow::ensure!(
            !list.iter().any(|(_, u)| u == url),
            "server {name:?} has the URL of server {:?}: one server, one name (two pools on one server would split its locks and counts)",
            list.iter().find(|(_, u)| u == url).map(|(n, _)| n.as_str()).unwrap_or_default()
        );
        list.push((name.to_owned(), url.to_owned()));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &str) -> Vec<(String, String)> {
        kafka_options(raw).unwrap().0
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn readers_fetch_what_they_need_and_options_still_win() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            connection: ConnectionArgs,
        }
        let args = <Cli as clap::Parser>::parse_from(["t"]).connection;
        let mut config = Config::resolve(&args).unwrap();
        let live = config.kafka_reader_config(Reads::Live);
        assert_eq!(live.get("fetch.max.bytes"), Some("1000000"));
        let replay = config.kafka_reader_config(Reads::Replay);
        assert_eq!(replay.get("fetch.wait.max.ms"), Some("5000"));
        assert_eq!(replay.get("fetch.max.bytes"), None);
        config.kafka_options = vec![("message.max.bytes".into(), "4000000".into())];
        let live = config.kafka_reader_config(Reads::Live);
        assert_eq!(live.get("fetch.max.bytes"), Some("4000000"));
        config.kafka_options = vec![("fetch.wait.max.ms".into(), "100".into())];
        let replay = config.kafka_reader_config(Reads::Replay);
        assert_eq!(replay.get("fetch.wait.max.ms"), Some("100"));
    }

    #[test]
    fn kafka_options_split_only_where_a_setting_begins() {
        assert_eq!(parsed("debug=cgrp,fetch"), [pair("debug", "cgrp,fetch")]);
        assert_eq!(
            parsed("security.protocol=SASL_SSL,sasl.mechanisms=PLAIN"),
            [
                pair("security.protocol", "SASL_SSL"),
                pair("sasl.mechanisms", "PLAIN")
            ]
        );
        assert_eq!(
            parsed("bootstrap.servers=a:9092,b:9092,debug=eos,broker"),
            [
                pair("bootstrap.servers", "a:9092,b:9092"),
                pair("debug", "eos,broker")
            ]
        );
        // A value may hold `=` (base64 padding): only a setting's name before it starts one.
        assert_eq!(
            parsed("sasl.password=ab==,Cd=x"),
            [pair("sasl.password", "ab==,Cd=x")]
        );
        assert!(kafka_options("broker").is_err());
        assert!(kafka_options("=x").is_err());
    }
}
