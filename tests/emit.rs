//! `tenancy emit` refuses bad input with the line and field, and sends nothing of it.

mod common;

use blindstrader_tenancy::log::topics::Topic;
use common::*;

#[test]
fn bad_lines_are_reported_and_nothing_is_sent() {
    let t = TestNs::new();
    let org = new_id();
    let lines = vec![
        created_line(&new_id(), &org, "BRAND", "goodone"),
        r#"{"type":"OrganisationExploded","organisation_id":"x"}"#.to_string(),
        created_line(&new_id(), &org, "WHOLESALER", "okslug"),
        created_line(&new_id(), &org, "BRAND", "Not A Slug"),
        format!(
            r#"{{"type":"OrganisationCreated","organisation_id":"{org}","organisation_type":"BRAND","slug":"x"}}"#
        ),
        format!(
            r#"{{"type":"OrganisationCreated","organisation_id":"{org}","organisation_type":"BRAND","slug":"x","name":"n","occurred_at":"yesterday"}}"#
        ),
        "{ not json".to_string(),
    ];
    let out = t.emit(&lines, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "line 2: field `type`: unknown event type \"OrganisationExploded\"",
        "line 3: OrganisationCreated field `organisation_type`: \"WHOLESALER\" is not one of BRAND, SUPPLIER, RETAILER",
        "line 4: field `slug`: invalid slug \"Not A Slug\"",
        "line 5: OrganisationCreated field `name`: missing",
        "line 6: OrganisationCreated field `occurred_at`: \"yesterday\" is not an RFC 3339 timestamp",
        "line 7: not valid JSON",
        "6 bad line(s); nothing was sent",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(!err.contains("line 1:"), "line 1 is fine:\n{err}");
    assert!(out.stdout.is_empty());
    assert_eq!(
        t.message_count(Topic::Organisations),
        0,
        "the good line must not be sent either"
    );

    // --dry-run accepts the good line alone and sends nothing.
    let dry = t.emit(&lines[..1], &["--dry-run"]);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert_eq!(t.message_count(Topic::Organisations), 0);

    // And the same good line, sent for real, lands once.
    t.emit_ok(&lines[..1]);
    assert_eq!(t.message_count(Topic::Organisations), 1);
}

#[test]
fn every_subcommand_explains_itself() {
    let t = TestNs::new();
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["emit", "--help"],
        vec!["registry", "--help"],
        vec!["tenants", "list", "--help"],
        vec!["topics", "create", "--help"],
    ] {
        let out = t.tenancy().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: tenancy"), "{args:?}: {text}");
    }
}

/// A termination sent before a grant must be in the log before the grant is stamped: the
/// processors judge the grant by the lifecycle as it stood a moment (`SKEW`) after the grant
/// happened, and a busy broker may take longer than that to append the termination (the chaos
/// test saw grants judged against a supplier whose termination or restore was not in the log
/// yet). The termination's broker here answers 1.5 s late; librdkafka's in-process mock cluster
/// stands in for the broker (the registry is the real one).
#[tokio::test(flavor = "multi_thread")]
async fn an_event_after_a_lifecycle_event_is_stamped_once_that_is_in_the_log() {
    use blindstrader_tenancy::log::emit::{prepare_line, send_all};
    use blindstrader_tenancy::log::events::Event;
    use blindstrader_tenancy::log::wire::Codec;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::FutureProducer;
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    use std::time::Duration;

    let t = TestNs::new();
    let cluster = MockCluster::new(2).unwrap();
    let lifecycle = t.topic(Topic::Organisations);
    let access = t.topic(Topic::BrandAccess);
    for (topic, leader) in [(&lifecycle, 1), (&access, 2)] {
        cluster.create_topic(topic, 1, 1).unwrap();
        cluster.partition_leader(topic, 0, Some(leader)).unwrap();
    }
    cluster
        .broker_round_trip_time(1, Duration::from_millis(1500))
        .unwrap();
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .create()
        .unwrap();
    let supplier = new_id();
    let events = vec![
        prepare_line(
            1,
            &lines::terminated(&new_id(), &supplier, "SUPPLIER", "acme"),
        )
        .unwrap(),
        prepare_line(
            2,
            &lines::grant(&new_id(), &new_id(), &supplier, &["catalog.read"]),
        )
        .unwrap(),
    ];
    let codec = Codec::new(&t.config.schema_registry_url);
    let mut acknowledged = Vec::new();
    send_all(
        events,
        |kind| t.topic(kind.topic()),
        &codec,
        &producer,
        |sent| acknowledged.push((sent.line, chrono::Utc::now().timestamp_millis())),
    )
    .await
    .unwrap();
    assert_eq!(
        acknowledged.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        [1, 2]
    );
    let termination_in_log = acknowledged[0].1;

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", "emit-test")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&access, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let message = consumer
        .poll(Duration::from_secs(10))
        .expect("the grant is in the mock cluster")
        .unwrap()
        .detach();
    let Event::Other { value, .. } = codec.decode(message.payload()).await.unwrap() else {
        panic!("not a grant");
    };
    let apache_avro::types::Value::Record(fields) = value else {
        panic!("not a record: {value:?}");
    };
    let occurred_at = fields
        .iter()
        .find_map(|(name, v)| match v {
            apache_avro::types::Value::Long(ms)
            | apache_avro::types::Value::TimestampMillis(ms)
                if name == "occurred_at" =>
            {
                Some(*ms)
            }
            _ => None,
        })
        .expect("the grant has occurred_at");
    assert!(
        occurred_at >= termination_in_log,
        "the grant was stamped at {occurred_at} ms, before the termination was in the log ({termination_in_log} ms)"
    );
}
