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
    /// Extra librdkafka settings for every Kafka client, KEY=VALUE (repeat the flag, or
    /// comma-separate in the environment): e.g. security.protocol=SASL_PLAINTEXT,
    /// sasl.mechanisms=PLAIN, sasl.username=…, sasl.password=…, or debug=cgrp.
    #[arg(long = "kafka-option", global = true, env = "KAFKA_OPTIONS", value_delimiter = ',',
        value_name = "KEY=VALUE", value_parser = kafka_option)]
    pub kafka_options: Vec<(String, String)>,
}

fn kafka_option(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!(
            "expected KEY=VALUE (a librdkafka setting), got {raw:?}"
        )),
    }
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub kafka_bootstrap_servers: String,
    pub schema_registry_url: String,
    pub database_url: String,
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
        Ok(Config {
            kafka_bootstrap_servers: args.bootstrap_servers.clone(),
            schema_registry_url: args.schema_registry_url.trim_end_matches('/').to_owned(),
            database_url: args.database_url.clone(),
            redis_url: args.redis_url.clone(),
            namespace: Namespace::parse(&args.namespace)?,
            partitions: args.partitions,
            kafka_options: args.kafka_options.clone(),
        })
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
}
