//! `tenancy bench broker`: how fast the broker takes and gives plain messages, with no
//! processing at all. Every processor sits under this ceiling; the other benchmarks compare
//! against it.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{Config, Reads};

#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// Messages to produce and then consume.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Partitions of the benchmark's topic.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
}

/// Figures of one run.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    /// Records the broker held before the run (every topic), and in how many topics.
    pub log_records: i64,
    pub log_topics: usize,
    pub produce_per_sec: f64,
    pub consume_per_sec: f64,
    /// From a new consumer group's subscribe to its first message, as a worker's group joins.
    pub first_message: Duration,
}

/// How many records the broker holds: the sum of every partition's high watermark (the log is
/// kept forever, so every offset below it is a record).
fn log_size(config: &Config) -> anyhow::Result<(i64, usize)> {
    let consumer: BaseConsumer = config.kafka_client_config().create()?;
    let meta = consumer.fetch_metadata(None, Duration::from_secs(30))?;
    let mut records = 0;
    for t in meta.topics() {
        for p in t.partitions() {
            let (_, high) = consumer.fetch_watermarks(t.name(), p.id(), Duration::from_secs(10))?;
            records += high;
        }
    }
    Ok((records, meta.topics().len()))
}

/// Produces `messages` to a fresh topic with our idempotent producer, then reads them all back
/// with a plain consumer (assigned partitions, no group), timing both; then times a new group's
/// first message from that topic.
pub async fn measure(config: &Config, args: &BrokerArgs) -> anyhow::Result<Rates> {
    let (log_records, log_topics) = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || log_size(&config)).await??
    };
    eprintln!("the broker holds {log_records} records in {log_topics} topics");
    let topic = format!(
        "{}.bench-broker-{}",
        config.namespace,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let admin: AdminClient<DefaultClientContext> = config.kafka_client_config().create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                args.partitions,
                TopicReplication::Fixed(1),
            )],
            &options,
        )
        .await?
    {
        if let Err((t, code)) = result {
            anyhow::bail!("cannot create {t}: {code}");
        }
    }
    let producer = crate::log::kafka::producer(config)?;
    let payload = vec![b'x'; args.size];
    let keys: Vec<String> = (0..64).map(|k| format!("key-{k}")).collect();
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(args.messages);
    for i in 0..args.messages {
        loop {
            let record = FutureRecord::to(&topic)
                .key(&keys[i % keys.len()])
                .payload(&payload);
            match producer.send_result(record) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => anyhow::bail!("producing to {topic}: {e}"),
            }
        }
    }
    for d in deliveries {
        d.await?
            .map_err(|(e, _)| anyhow::anyhow!("delivery to {topic}: {e}"))?;
    }
    producer.flush(Duration::from_secs(30))?;
    let produce_per_sec = args.messages as f64 / started.elapsed().as_secs_f64();

    let reader_config = config.clone();
    let messages = args.messages;
    let partitions = args.partitions;
    let consume_topic = topic.clone();
    let consume_per_sec = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let config = reader_config;
        let consumer: BaseConsumer = config
            .kafka_reader_config(Reads::Replay)
            .set("group.id", format!("{}.bench-broker", config.namespace))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&consume_topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let started = Instant::now();
        let deadline = started + Duration::from_secs(600);
        let mut read = 0;
        while read < messages {
            anyhow::ensure!(
                Instant::now() < deadline,
                "read {read} of {messages} in 600 s"
            );
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(_)) => read += 1,
                Some(Err(e)) => anyhow::bail!("consuming {consume_topic}: {e}"),
                None => {}
            }
        }
        Ok(messages as f64 / started.elapsed().as_secs_f64())
    })
    .await??;
    let first_message = first_message(config, &topic).await?;
    // The topic is left: deleting one topic on the local broker deletes them all
    // (`bench::drop_namespace`).
    Ok(Rates {
        log_records,
        log_topics,
        produce_per_sec,
        consume_per_sec,
        first_message,
    })
}

/// A new group joins the way a worker's does (`stream::consumer::join`, the default session
/// timeout and assignor) and waits for its first message.
async fn first_message(config: &Config, topic: &str) -> anyhow::Result<Duration> {
    use crate::stream::consumer::{join, Assignor, Membership, DEFAULT_SESSION_TIMEOUT_MS};
    let group = format!(
        "{}.bench-first-{}",
        config.namespace,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let membership = Membership {
        session_timeout: Duration::from_millis(DEFAULT_SESSION_TIMEOUT_MS),
        assignor: Assignor::CooperativeSticky,
    };
    let started = Instant::now();
    let consumer = join(config, "bench", &group, &[topic.to_owned()], &membership)?;
    match tokio::time::timeout(Duration::from_secs(120), consumer.recv()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => anyhow::bail!("group {group} reading {topic}: {e}"),
        Err(_) => anyhow::bail!("group {group} had no message from {topic} within 120 s"),
    }
    let elapsed = started.elapsed();
    crate::stream::consumer::depart(consumer, true);
    Ok(elapsed)
}

pub async fn run(config: Config, args: BrokerArgs) -> anyhow::Result<()> {
    eprintln!(
        "producing {} messages of {} bytes to a fresh topic of {} partitions, then consuming them",
        args.messages, args.size, args.partitions
    );
    let r = measure(&config, &args).await?;
    println!(
        "broker at {} holding {} records: produce {:.0} msg/s ({:.1} MB/s), consume {:.0} msg/s ({:.1} MB/s), a new group's first message {:.1} s",
        config.kafka_bootstrap_servers,
        r.log_records,
        r.produce_per_sec,
        r.produce_per_sec * args.size as f64 / 1e6,
        r.consume_per_sec,
        r.consume_per_sec * args.size as f64 / 1e6,
        r.first_message.as_secs_f64()
    );
    // The broker is the others' baseline, with none of its own.
    // One row for a young log and one for a big one: the broker's reads slow as it grows.
    let benchmark = if r.log_records >= 2_000_000 {
        "tenancy bench broker, on a log of 2 million records or more"
    } else {
        "tenancy bench broker"
    };
    super::Row {
        benchmark: benchmark.into(),
        figure: format!(
            "produce {:.0} msg/s, consume {:.0} msg/s ({} B), new group's first message {:.1} s; log of {} records",
            r.produce_per_sec,
            r.consume_per_sec,
            args.size,
            r.first_message.as_secs_f64(),
            r.log_records
        ),
        baseline: "none: the ceiling of the others".into(),
        ratio: None,
        goal: "none".into(),
        met: true,
        peak_rss_mib: None,
    }
    .print();
    Ok(())
}
