//! Poison events end to end against Tansu, the schema registry and MariaDB: `tenancy run`
//! dead-letters what it cannot decode and carries on; `tenancy dead-letter list` shows them and
//! `replay` sends each back once.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use blindstrader_tenancy::log::dead_letters::{
    HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON, HEADER_REPLAYED_FROM, HEADER_TENANT,
    HEADER_TOPIC,
};
use blindstrader_tenancy::log::events::{EventKind, OrganisationCreated};
use blindstrader_tenancy::log::topics::Topic;
use blindstrader_tenancy::log::wire::Codec;
use blindstrader_tenancy::tenant::OrganisationType;
use common::*;

const SETTLE: Duration = Duration::from_secs(90);
const READ: Duration = Duration::from_secs(30);

/// A poison event produced straight to `{ns}.organisations`.
struct Poison {
    what: &'static str,
    org: String,
    payload: Vec<u8>,
    reason_contains: String,
    headers: Vec<(&'static str, &'static str)>,
    partition: i32,
    offset: i64,
}

/// A real schema id of OrganisationCreated on the organisations topic, registering it if needed.
async fn organisation_created_schema_id(t: &TestNs) -> u32 {
    let event = OrganisationCreated {
        event_id: new_id(),
        occurred_at: 1_795_946_400_000,
        organisation_id: new_id(),
        organisation_type: OrganisationType::Brand,
        slug: "unused".into(),
        name: "Unused".into(),
        region: None,
    };
    let value =
        blindstrader_tenancy::log::events::to_avro(EventKind::OrganisationCreated, &event).unwrap();
    let framed = Codec::new(&t.config.schema_registry_url)
        .encode(
            &t.topic(Topic::Organisations),
            EventKind::OrganisationCreated,
            value,
        )
        .await
        .unwrap();
    assert_eq!(framed[0], 0);
    u32::from_be_bytes(framed[1..5].try_into().unwrap())
}

/// `topic/partition/offset` of each line `tenancy emit` printed, by key.
fn emitted_positions(out: &str) -> HashMap<String, (String, i32, i64)> {
    out.lines()
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            let mut pos = cols[0].rsplitn(3, '/');
            let offset: i64 = pos.next().unwrap().parse().unwrap();
            let partition: i32 = pos.next().unwrap().parse().unwrap();
            let topic = pos.next().unwrap().to_owned();
            (cols[2].to_owned(), (topic, partition, offset))
        })
        .collect()
}

/// Data lines of `dead-letter list` (the first line is the header).
fn list_rows(stdout: &str) -> Vec<String> {
    let mut lines = stdout.lines();
    let header = lines.next().expect("a header line");
    assert!(header.starts_with("DEAD-LETTER"), "{stdout}");
    lines.map(str::to_owned).collect()
}

/// Non-empty stdout lines of `dead-letter replay`.
fn replay_lines(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_events_are_dead_lettered_listed_and_replayed_once() {
    let t = TestNs::new();
    blindstrader_tenancy::log::topics::ensure_topics(&t.config)
        .await
        .unwrap();
    let orgs_topic = t.topic(Topic::Organisations);
    let schema_id = organisation_created_schema_id(&t).await;

    let mut unknown_schema = vec![0u8];
    unknown_schema.extend_from_slice(&999_999u32.to_be_bytes());
    unknown_schema.extend_from_slice(b"\x02\x04\x06");
    let mut undecodable = vec![0u8];
    undecodable.extend_from_slice(&schema_id.to_be_bytes());
    // A string of length 3 with only one byte behind it.
    undecodable.extend_from_slice(b"\x06a");
    let mut poisons = vec![
        Poison {
            what: "garbage",
            org: new_id(),
            payload: b"definitely not an event".to_vec(),
            reason_contains: "magic byte is 0x64".into(),
            headers: vec![("trace-id", "trace-garbage")],
            partition: -1,
            offset: -1,
        },
        Poison {
            what: "wrong magic byte",
            org: new_id(),
            payload: vec![0x01, 0, 0, 0, 1, 0x02, 0x61],
            reason_contains: "magic byte is 0x01".into(),
            headers: vec![],
            partition: -1,
            offset: -1,
        },
        Poison {
            what: "unknown schema id",
            org: new_id(),
            payload: unknown_schema,
            reason_contains: "schema id 999999".into(),
            headers: vec![],
            partition: -1,
            offset: -1,
        },
        Poison {
            what: "body not matching its schema",
            org: new_id(),
            payload: undecodable,
            reason_contains: format!("does not decode with schema id {schema_id}"),
            headers: vec![],
            partition: -1,
            offset: -1,
        },
    ];
    for p in &mut poisons {
        let (partition, offset) = t
            .produce_raw(&orgs_topic, None, &p.org, &p.payload, &p.headers)
            .await;
        p.partition = partition;
        p.offset = offset;
    }
    // Then a good OrganisationCreated per organisation: same key, so behind its poison.
    let lines: Vec<String> = poisons
        .iter()
        .enumerate()
        .map(|(i, p)| created_line(&new_id(), &p.org, "BRAND", &format!("afterpoison{i}")))
        .collect();
    let emitted = emitted_positions(&t.emit_ok(&lines));
    for p in &poisons {
        let (topic, partition, offset) = &emitted[&p.org];
        assert_eq!(topic, &orgs_topic);
        assert_eq!(
            *partition, p.partition,
            "{}: same key, same partition",
            p.what
        );
        assert!(
            *offset > p.offset,
            "{}: good event after the poison",
            p.what
        );
    }
    assert_eq!(t.message_count(Topic::Organisations), 8);

    let mut worker = t.spawn_run("poison");
    let pool = t.pool().await;
    // Each good event sits behind its poison in the partition: all active means the worker got
    // past every poison.
    let rows = wait_for("4 tenants active behind the poison", SETTLE, || async {
        let rows = statuses(&pool, &t.ns).await;
        (rows.len() == 4 && rows.iter().all(|(_, s, _)| s == "active")).then_some(rows)
    })
    .await;
    for p in &poisons {
        assert!(
            rows.iter().any(|(o, s, _)| o == &p.org && s == "active"),
            "{}: {rows:?}",
            p.what
        );
    }

    // Exactly the four poisons were dead-lettered, byte for byte, with their origin.
    assert_eq!(
        t.message_count(Topic::DeadLetter),
        4,
        "{}",
        worker.log_text()
    );
    let dead = t.read_messages(Topic::DeadLetter, 4, READ);
    assert_eq!(dead.len(), 4);
    let by_tenant: HashMap<String, &RawMessage> = dead
        .iter()
        .map(|m| (m.header(HEADER_TENANT).unwrap(), m))
        .collect();
    for p in &poisons {
        let m = by_tenant
            .get(&p.org)
            .unwrap_or_else(|| panic!("{} not dead-lettered: {dead:?}", p.what));
        let reason = m.header(HEADER_REASON).unwrap();
        assert!(
            reason.contains(&p.reason_contains),
            "{}: reason {reason:?} lacks {:?}",
            p.what,
            p.reason_contains
        );
        assert_eq!(m.header(HEADER_TOPIC).as_deref(), Some(orgs_topic.as_str()));
        assert_eq!(
            m.header(HEADER_PARTITION),
            Some(p.partition.to_string()),
            "{}",
            p.what
        );
        assert_eq!(
            m.header(HEADER_OFFSET),
            Some(p.offset.to_string()),
            "{}",
            p.what
        );
        assert_eq!(
            m.payload.as_deref(),
            Some(p.payload.as_slice()),
            "{}",
            p.what
        );
        assert_eq!(m.key_text().as_deref(), Some(p.org.as_str()));
        for (k, v) in &p.headers {
            assert_eq!(m.header(k).as_deref(), Some(*v), "original header {k} kept");
        }
        assert_eq!(m.header(HEADER_REPLAYED_FROM), None);
    }
    let dl_pos = |p: &Poison| {
        let m = by_tenant[&p.org];
        format!("{}/{}", m.partition, m.offset)
    };

    // Stop the worker so the replayed copies wait on the topic until it is restarted.
    assert!(worker.terminate().success(), "{}", worker.log_text());

    // `list`: one row per dead letter, all pending.
    let (code, out, err) = t.tenancy_output(&["dead-letter", "list"]);
    assert_eq!(code, Some(0), "{err}");
    let rows = list_rows(&out);
    assert_eq!(rows.len(), 4, "{out}");
    for p in &poisons {
        let row = rows
            .iter()
            .find(|r| r.contains(&p.org))
            .unwrap_or_else(|| panic!("{} not listed: {out}", p.what));
        assert!(row.starts_with(&format!("{} ", dl_pos(p))), "{row}");
        assert!(
            row.contains(&format!("{orgs_topic}/{}/{}", p.partition, p.offset)),
            "{row}"
        );
        assert!(row.contains(" pending "), "{row}");
        assert!(row.contains(&p.reason_contains), "{row}");
        assert!(
            row.contains(&format!(" {} ", p.payload.len())),
            "size in {row}"
        );
    }
    let (code, out, err) = t.tenancy_output(&["dead-letter", "list", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let listed: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 4, "{out}");
    for p in &poisons {
        let v = listed
            .iter()
            .find(|v| v["tenant"] == p.org.as_str())
            .unwrap();
        assert_eq!(v["source_topic"], orgs_topic.as_str());
        assert_eq!(v["source_partition"], p.partition);
        assert_eq!(v["source_offset"], p.offset);
        assert_eq!(v["payload_bytes"], p.payload.len());
        assert_eq!(v["replayed"], false);
        assert!(v["reason"].as_str().unwrap().contains(&p.reason_contains));
    }

    // A dry run sends nothing.
    let (code, out, err) = t.tenancy_output(&["dead-letter", "replay", "--dry-run"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(replay_lines(&out).len(), 4, "{out}");
    assert!(err.contains("would replay 4"), "{err}");
    assert_eq!(t.message_count(Topic::Organisations), 8);

    // The replay: four copies back to where each came from.
    let (code, out, err) = t.tenancy_output(&["dead-letter", "replay"]);
    assert_eq!(code, Some(0), "{err}");
    let sent = replay_lines(&out);
    assert_eq!(sent.len(), 4, "{out}\n{err}");
    assert_eq!(t.message_count(Topic::Organisations), 12);
    let mut copy_offsets: HashMap<String, i64> = HashMap::new();
    for p in &poisons {
        let line = sent
            .iter()
            .find(|l| l.starts_with(&format!("{}\t", dl_pos(p))))
            .unwrap_or_else(|| panic!("{} not replayed: {out}", p.what));
        let target = line.split('\t').nth(1).unwrap();
        let prefix = format!("{orgs_topic}/{}/", p.partition);
        assert!(target.starts_with(&prefix), "{line}");
        let offset: i64 = target[prefix.len()..].parse().unwrap();
        assert!(
            offset > emitted[&p.org].2,
            "copy after the good event: {line}"
        );
        copy_offsets.insert(p.org.clone(), offset);
    }
    let orgs = t.read_messages(Topic::Organisations, 12, READ);
    assert_eq!(orgs.len(), 12);
    let copies: Vec<&RawMessage> = orgs
        .iter()
        .filter(|m| m.header(HEADER_REPLAYED_FROM).is_some())
        .collect();
    assert_eq!(copies.len(), 4);
    for p in &poisons {
        let c = copies
            .iter()
            .find(|m| m.key_text().as_deref() == Some(p.org.as_str()))
            .unwrap_or_else(|| panic!("no copy of {}", p.what));
        assert_eq!(c.payload.as_deref(), Some(p.payload.as_slice()));
        assert_eq!((c.partition, c.offset), (p.partition, copy_offsets[&p.org]));
        assert_eq!(c.header(HEADER_REPLAYED_FROM), Some(dl_pos(p)));
        assert_eq!(c.header(HEADER_REASON), None, "dlq.* headers stripped");
        assert_eq!(c.header(HEADER_TOPIC), None, "dlq.* headers stripped");
        for (k, v) in &p.headers {
            assert_eq!(c.header(k).as_deref(), Some(*v), "original header {k} kept");
        }
    }

    // Progress is recorded: `list` says replayed; a second replay (and dry run) sends nothing.
    let (_, out, _) = t.tenancy_output(&["dead-letter", "list"]);
    let rows = list_rows(&out);
    assert_eq!(rows.len(), 4, "{out}");
    assert!(rows.iter().all(|r| r.contains(" replayed ")), "{out}");
    let (code, out, err) = t.tenancy_output(&["dead-letter", "replay"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(replay_lines(&out), Vec::<String>::new(), "{err}");
    assert!(err.contains("replayed 0"), "{err}");
    let (_, out, _) = t.tenancy_output(&["dead-letter", "replay", "--dry-run"]);
    assert_eq!(replay_lines(&out), Vec::<String>::new());
    assert_eq!(t.message_count(Topic::Organisations), 12);

    // Still poison: the worker dead-letters each copy again, naming the copy and what it was.
    let worker = t.spawn_run("poison-again");
    wait_for("replayed copies dead-lettered again", SETTLE, || async {
        (t.message_count(Topic::DeadLetter) >= 8).then_some(())
    })
    .await;
    let dead = t.read_messages(Topic::DeadLetter, 8, READ);
    assert_eq!(dead.len(), 8, "{}", worker.log_text());
    let again: Vec<&RawMessage> = dead
        .iter()
        .filter(|m| m.header(HEADER_REPLAYED_FROM).is_some())
        .collect();
    assert_eq!(again.len(), 4);
    for p in &poisons {
        let m = again
            .iter()
            .find(|m| m.header(HEADER_TENANT).as_deref() == Some(p.org.as_str()))
            .unwrap();
        assert_eq!(m.header(HEADER_REPLAYED_FROM), Some(dl_pos(p)));
        assert_eq!(
            m.header(HEADER_OFFSET),
            Some(copy_offsets[&p.org].to_string())
        );
        assert!(m
            .header(HEADER_REASON)
            .unwrap()
            .contains(&p.reason_contains));
        assert_eq!(m.payload.as_deref(), Some(p.payload.as_slice()));
    }
    // The new ones are pending; --all would send all eight; another topic's filter none.
    let (_, out, _) = t.tenancy_output(&["dead-letter", "list"]);
    let rows = list_rows(&out);
    assert_eq!(rows.len(), 8, "{out}");
    assert_eq!(
        rows.iter()
            .filter(|r| r.contains(" pending,replay-of:"))
            .count(),
        4,
        "{out}"
    );
    let (_, out, _) = t.tenancy_output(&["dead-letter", "replay", "--dry-run"]);
    assert_eq!(replay_lines(&out).len(), 4, "{out}");
    let (_, out, _) = t.tenancy_output(&["dead-letter", "replay", "--dry-run", "--all"]);
    assert_eq!(replay_lines(&out).len(), 8, "{out}");
    let (_, out, err) = t.tenancy_output(&[
        "dead-letter",
        "replay",
        "--dry-run",
        "--source-topic",
        "brand-catalog",
    ]);
    assert_eq!(replay_lines(&out), Vec::<String>::new(), "{err}");
    assert!(err.contains("4 from other topics"), "{err}");
    // Nothing but the four tenants came of it.
    assert_eq!(statuses(&pool, &t.ns).await.len(), 4);
}

/// A dead letter as the processor writes it, produced straight to the dead-letter topic.
async fn dead_letter(
    t: &TestNs,
    source: &str,
    source_offset: i64,
    key: &str,
    body: &str,
) -> String {
    let offset = source_offset.to_string();
    let (p, o) = t
        .produce_raw(
            &t.topic(Topic::DeadLetter),
            Some(0),
            key,
            body.as_bytes(),
            &[
                (HEADER_REASON, "test poison"),
                (HEADER_TOPIC, source),
                (HEADER_PARTITION, "1"),
                (HEADER_OFFSET, &offset),
                (HEADER_TENANT, key),
            ],
        )
        .await;
    format!("{p}/{o}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_filtered_replay_is_not_repeated_by_a_full_one() {
    let t = TestNs::new();
    blindstrader_tenancy::log::topics::ensure_topics(&t.config)
        .await
        .unwrap();
    let orgs = t.topic(Topic::Organisations);
    let catalog = t.topic(Topic::BrandCatalog);
    // Interleaved on one dead-letter partition: org, catalog, org, catalog, and one whose
    // headers do not say where it came from.
    let o1 = dead_letter(&t, &orgs, 10, "k-o1", "org one").await;
    let c1 = dead_letter(&t, &catalog, 11, "k-c1", "catalog one").await;
    let o2 = dead_letter(&t, &orgs, 12, "k-o2", "org two").await;
    let c2 = dead_letter(&t, &catalog, 13, "k-c2", "catalog two").await;
    let (p, o) = t
        .produce_raw(
            &t.topic(Topic::DeadLetter),
            Some(0),
            "k-x",
            b"no origin",
            &[(HEADER_REASON, "test")],
        )
        .await;
    let no_origin = format!("{p}/{o}");

    // Catalog only: two copies to brand-catalog partition 1, none to organisations.
    let (code, out, err) =
        t.tenancy_output(&["dead-letter", "replay", "--source-topic", "brand-catalog"]);
    assert_eq!(code, Some(0), "{err}");
    let sent = replay_lines(&out);
    assert_eq!(sent.len(), 2, "{out}\n{err}");
    assert!(sent[0].starts_with(&format!("{c1}\t{catalog}/1/")), "{out}");
    assert!(sent[1].starts_with(&format!("{c2}\t{catalog}/1/")), "{out}");
    assert!(err.contains("3 from other topics"), "{err}");
    assert_eq!(t.message_count(Topic::BrandCatalog), 2);
    assert_eq!(t.message_count(Topic::Organisations), 0);
    let copies = t.read_messages(Topic::BrandCatalog, 2, READ);
    assert_eq!(
        copies
            .iter()
            .map(|m| m.payload.clone().unwrap())
            .collect::<Vec<_>>(),
        vec![b"catalog one".to_vec(), b"catalog two".to_vec()]
    );
    assert!(copies.iter().all(|m| m.partition == 1));

    // `list` knows the catalog ones are replayed, the others not.
    let (_, out, _) = t.tenancy_output(&["dead-letter", "list", "--json"]);
    let states: HashMap<String, bool> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                format!("{}/{}", v["partition"], v["offset"]),
                v["replayed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(states.len(), 5, "{out}");
    let expected: HashMap<String, bool> = [
        (o1.clone(), false),
        (c1.clone(), true),
        (o2.clone(), false),
        (c2.clone(), true),
        (no_origin.clone(), false),
    ]
    .into_iter()
    .collect();
    assert_eq!(states, expected, "{out}");

    // A full replay sends the organisation ones, not the catalog ones again, and skips the one
    // without an origin.
    let (code, out, err) = t.tenancy_output(&["dead-letter", "replay"]);
    assert_eq!(code, Some(0), "{err}");
    let sent = replay_lines(&out);
    assert_eq!(sent.len(), 2, "{out}\n{err}");
    assert!(sent[0].starts_with(&format!("{o1}\t{orgs}/1/")), "{out}");
    assert!(sent[1].starts_with(&format!("{o2}\t{orgs}/1/")), "{out}");
    assert!(err.contains("no dlq.source.topic header"), "{err}");
    assert!(err.contains("2 replayed before"), "{err}");
    assert_eq!(t.message_count(Topic::BrandCatalog), 2);
    assert_eq!(t.message_count(Topic::Organisations), 2);

    // Nothing is left, filtered or not; --all sends the four replayable ones again.
    for args in [
        &["dead-letter", "replay"][..],
        &["dead-letter", "replay", "--source-topic", catalog.as_str()][..],
        &["dead-letter", "replay", "--source-topic", "organisations"][..],
    ] {
        let (code, out, err) = t.tenancy_output(args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert_eq!(replay_lines(&out), Vec::<String>::new(), "{args:?}: {err}");
    }
    let (code, out, err) = t.tenancy_output(&["dead-letter", "replay", "--all"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(replay_lines(&out).len(), 4, "{out}");
    assert_eq!(t.message_count(Topic::BrandCatalog), 4);
    assert_eq!(t.message_count(Topic::Organisations), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_topics_are_named_and_nothing_is_sent() {
    let t = TestNs::new();
    // No topics yet in this namespace.
    let dl = t.topic(Topic::DeadLetter);
    for args in [&["dead-letter", "list"][..], &["dead-letter", "replay"][..]] {
        let (code, _, err) = t.tenancy_output(args);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(
            err.contains(&format!("topic {dl} does not exist")),
            "{args:?}: {err}"
        );
    }

    blindstrader_tenancy::log::topics::ensure_topics(&t.config)
        .await
        .unwrap();
    let (code, out, err) = t.tenancy_output(&["dead-letter", "list"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(list_rows(&out), Vec::<String>::new());
    assert!(err.contains("0 dead letter(s)"), "{err}");

    // One replayable dead letter before one from a topic that does not exist: the replay refuses
    // up front, so not even the first is sent.
    let orgs = t.topic(Topic::Organisations);
    let good = dead_letter(&t, &orgs, 0, "k-good", "fine").await;
    let gone = format!("{}.no-such-topic", t.ns);
    let bad = dead_letter(&t, &gone, 0, "k-bad", "lost").await;
    let (code, out, err) = t.tenancy_output(&["dead-letter", "replay"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        err.contains(&format!(
            "dead letter {bad} came from topic {gone}, which does not exist"
        )),
        "{err}"
    );
    assert_eq!(replay_lines(&out), Vec::<String>::new());
    assert_eq!(t.message_count(Topic::Organisations), 0);
    // A dry run fails the same way.
    let (code, _, err) = t.tenancy_output(&["dead-letter", "replay", "--dry-run"]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("came from topic {gone}")), "{err}");
    // Filtering to the topic that exists works, and records progress for that topic only.
    let (code, out, err) =
        t.tenancy_output(&["dead-letter", "replay", "--source-topic", "organisations"]);
    assert_eq!(code, Some(0), "{err}");
    let sent = replay_lines(&out);
    assert_eq!(sent.len(), 1, "{out}");
    assert!(sent[0].starts_with(&format!("{good}\t{orgs}/1/")), "{out}");
    assert_eq!(t.message_count(Topic::Organisations), 1);
}

#[test]
fn help_explains_each_command() {
    let t = TestNs::new();
    let (code, out, _) = t.tenancy_output(&["dead-letter", "--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("list") && out.contains("replay"), "{out}");
    let (code, out, _) = t.tenancy_output(&["dead-letter", "list", "--help"]);
    assert_eq!(code, Some(0));
    for word in ["--json", "from the beginning", "replayed", "pending"] {
        assert!(out.contains(word), "{word} in {out}");
    }
    let (code, out, _) = t.tenancy_output(&["dead-letter", "replay", "--help"]);
    assert_eq!(code, Some(0));
    for word in [
        "--source-topic",
        "--dry-run",
        "--all",
        "dead-letter-replay",
        "dlq.replayed-from",
        "idempotent",
    ] {
        assert!(out.contains(word), "{word} in {out}");
    }
}
