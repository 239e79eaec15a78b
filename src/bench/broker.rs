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

use crate::config::Config;

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

/// Rates of one run.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    pub produce_per_sec: f64,
    pub consume_per_sec: f64,
}

/// Produces `messages` to a fresh topic with our idempotent producer, then reads them all back
/// with a plain consumer (assigned partitions, no group), timing both.
pub async fn measure(config: &Config, args: &BrokerArgs) -> anyhow::Result<Rates> {
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

    let config = config.clone();
    let messages = args.messages;
    let partitions = args.partitions;
    let consume_topic = topic.clone();
    let consume_per_sec = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let consumer: BaseConsumer = config
            .kafka_client_config()
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
    // The topic is left: deleting one topic on the local broker deletes them all
    // (`bench::drop_namespace`).
    Ok(Rates {
        produce_per_sec,
        consume_per_sec,
    })
}

pub async fn run(config: Config, args: BrokerArgs) -> anyhow::Result<()> {
    eprintln!(
        "producing {} messages of {} bytes to a fresh topic of {} partitions, then consuming them",
        args.messages, args.size, args.partitions
    );
    let r = measure(&config, &args).await?;
    println!(
        "broker at {}: produce {:.0} msg/s ({:.1} MB/s), consume {:.0} msg/s ({:.1} MB/s)",
        config.kafka_bootstrap_servers,
        r.produce_per_sec,
        r.produce_per_sec * args.size as f64 / 1e6,
        r.consume_per_sec,
        r.consume_per_sec * args.size as f64 / 1e6
    );
    // The broker is the others' baseline, with none of its own.
    super::Row {
        benchmark: "tenancy bench broker".into(),
        figure: format!(
            "produce {:.0} msg/s, consume {:.0} msg/s ({} B)",
            r.produce_per_sec, r.consume_per_sec, args.size
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
