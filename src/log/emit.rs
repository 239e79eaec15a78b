//! `tenancy emit`: JSON lines in, Confluent-framed Avro events out.
//!
//! The whole input is validated before anything is sent: a bad line names its line number and
//! field, and then nothing is produced, so fixing the file and running again never doubles the
//! good lines (their generated event ids would differ, and consumers could not dedupe them).

use std::collections::VecDeque;
use std::io::BufRead;
use std::time::Duration;

use apache_avro::types::Value;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use serde_json::Value as Json;

use crate::log::events::json::record_from_json;
use crate::log::events::EventKind;
use crate::log::topics::Topic;
use crate::log::wire::Codec;
use crate::tenant::Slug;

/// One validated input line, ready to encode.
#[derive(Debug, Clone)]
pub struct PreparedEvent {
    pub line: usize,
    pub kind: EventKind,
    pub key: String,
    /// The record as plain Avro binary (no registry framing): every line is kept until all
    /// are valid, and an Avro `Value` tree is about 20 times larger (200,000 catalog events
    /// took 1.7 GiB as values).
    datum: Vec<u8>,
    /// The line had no `occurred_at`: it is stamped again when the event is handed to the
    /// producer ([`send_all`]), not left at the time the line was read.
    stamp_on_send: bool,
}

impl PreparedEvent {
    /// The validated record.
    pub fn value(&self) -> anyhow::Result<Value> {
        apache_avro::reader::datum::GenericDatumReader::builder(self.kind.schema())
            .build()
            .and_then(|reader| reader.read_value(&mut self.datum.as_slice()))
            .map_err(|e| anyhow::anyhow!("line {}: {e}", self.line))
    }
}

/// Why a line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct LineError {
    pub line: usize,
    pub reason: String,
}

/// Fields holding slugs, checked against the slug grammar before anything is sent.
fn slug_fields(kind: EventKind) -> &'static [&'static str] {
    match kind {
        EventKind::OrganisationCreated
        | EventKind::OrganisationTerminated
        | EventKind::OrganisationRestored => &["slug"],
        EventKind::BrandCatalogUpdated => &["brand_slug"],
        _ => &[],
    }
}

/// Validates one JSON line (1-based `line`), filling `event_id` and `occurred_at` if absent.
pub fn prepare_line(line: usize, text: &str) -> Result<PreparedEvent, LineError> {
    let fail = |reason: String| LineError { line, reason };
    let mut json: Json =
        serde_json::from_str(text).map_err(|e| fail(format!("not valid JSON: {e}")))?;
    let object = json
        .as_object_mut()
        .ok_or_else(|| fail("expected a JSON object".into()))?;
    let type_name = match object.get("type") {
        Some(Json::String(t)) => t.clone(),
        Some(_) => return Err(fail("field `type`: expected a string".into())),
        None => {
            return Err(fail(
                "field `type`: missing (e.g. \"OrganisationCreated\")".into(),
            ))
        }
    };
    let kind = EventKind::from_name(&type_name).ok_or_else(|| {
        let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.name()).collect();
        fail(format!(
            "field `type`: unknown event type {type_name:?}; known: {}",
            known.join(", ")
        ))
    })?;
    if kind.topic() == crate::log::topics::Topic::Tenancy {
        return Err(fail(format!(
            "field `type`: {} is an outcome event; only the processors publish those (emit \
             the input event instead: OrganisationCreated, OrganisationTerminated, …)",
            kind.name()
        )));
    }
    object
        .entry("event_id")
        .or_insert_with(|| Json::String(uuid::Uuid::new_v4().to_string()));
    let stamp_on_send = !object.contains_key("occurred_at");
    object
        .entry("occurred_at")
        .or_insert_with(|| Json::from(chrono::Utc::now().timestamp_millis()));
    for field in slug_fields(kind) {
        if let Some(Json::String(s)) = object.get(*field) {
            Slug::parse(s).map_err(|e| fail(format!("field `{field}`: {e}")))?;
        }
    }
    let key = match object.get(kind.key_field()) {
        Some(Json::String(k)) => k.clone(),
        _ => String::new(), // reported below as a missing/mistyped field
    };
    let value = record_from_json(kind.schema(), &json, &["type"])
        .map_err(|e| fail(format!("{} {e}", kind.name())))?;
    let datum = apache_avro::writer::datum::GenericDatumWriter::builder(kind.schema())
        .build()
        .and_then(|writer| writer.write_value_to_vec(value))
        .map_err(|e| fail(format!("{} {e}", kind.name())))?;
    Ok(PreparedEvent {
        line,
        kind,
        key,
        datum,
        stamp_on_send,
    })
}

/// Reads and validates every line; blank lines and `#` comments are skipped.
pub fn prepare_all(input: impl BufRead) -> Result<Vec<PreparedEvent>, Vec<LineError>> {
    let mut events = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line_no = i + 1;
        let text = match line {
            Ok(t) => t,
            Err(e) => {
                errors.push(LineError {
                    line: line_no,
                    reason: format!("cannot read: {e}"),
                });
                break;
            }
        };
        let trimmed = text.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match prepare_line(line_no, trimmed) {
            Ok(ev) => events.push(ev),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(events)
    } else {
        Err(errors)
    }
}

/// Validates one JSON line as `tenancy emit` does and produces it to its topic in `config`'s
/// namespace, creating missing topics: for commands that send a single event.
pub async fn send_line(config: &crate::config::Config, line: &Json) -> anyhow::Result<Sent> {
    let event = prepare_line(1, &line.to_string())?;
    crate::log::topics::ensure_topics(config).await?;
    let codec = Codec::new(&config.schema_registry_url);
    let producer = crate::log::kafka::producer(config)?;
    let ns = config.namespace.clone();
    let mut sent = None;
    send_all(
        vec![event],
        |k| k.topic().name(&ns),
        &codec,
        &producer,
        |s| sent = Some(s),
    )
    .await?;
    sent.ok_or_else(|| anyhow::anyhow!("the event was not sent"))
}

/// Where one event landed.
#[derive(Debug, Clone)]
pub struct Sent {
    pub line: usize,
    pub kind: EventKind,
    pub key: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Sets a record's `occurred_at` to `now`. An event emitted without one happened when it is
/// sent, not when its line was read: the processors judge it against the lifecycle log as it
/// stood a second after its `occurred_at` (the lifecycle skew), so a stamp taken before a slow
/// start (the producer's id, the topics, the registry: over a second under load) could let an
/// event be judged before a termination sent just ahead of it had arrived. [`send_all`] also
/// waits for such a termination to be acknowledged before it stamps what follows.
fn restamp(value: &mut Value, now: i64) {
    if let Value::Record(fields) = value {
        for (name, field) in fields.iter_mut() {
            if name == "occurred_at" {
                *field = match field {
                    Value::TimestampMillis(_) => Value::TimestampMillis(now),
                    _ => Value::Long(now),
                };
            }
        }
    }
}

/// Encodes and produces `events` in input order (so one key's events keep their order), calling
/// `on_sent` for each acknowledged event, in order.
pub async fn send_all(
    events: Vec<PreparedEvent>,
    topic_of: impl Fn(EventKind) -> String,
    codec: &Codec,
    producer: &FutureProducer,
    mut on_sent: impl FnMut(Sent),
) -> anyhow::Result<()> {
    let mut in_flight: VecDeque<(PreparedEvent, String, DeliveryFuture)> = VecDeque::new();
    async fn settle(
        (ev, topic, fut): (PreparedEvent, String, DeliveryFuture),
    ) -> anyhow::Result<Sent> {
        let delivery = fut
            .await
            .map_err(|_| anyhow::anyhow!("line {}: producer dropped the message", ev.line))?
            .map_err(|(e, _)| anyhow::anyhow!("line {}: not delivered to {topic}: {e}", ev.line))?;
        Ok(Sent {
            line: ev.line,
            kind: ev.kind,
            key: ev.key,
            topic,
            partition: delivery.partition,
            offset: delivery.offset,
        })
    }
    let lifecycle = |kind: EventKind| kind.topic() == Topic::Organisations;
    // Events handed to the producer so far, and the number of the last lifecycle event handed
    // over; those still in flight are the last `in_flight.len()` of them.
    let mut handed = 0usize;
    let mut last_lifecycle: Option<usize> = None;
    for ev in events {
        // The processors judge an event by the lifecycle as it stood a moment after the event
        // happened (`tenancy::watermark::SKEW`): a termination or restore sent before it must
        // be in the log by then. A busy broker can take longer than that to append one, and
        // the two land on different topics, so nothing else orders them: an event that follows
        // lifecycle events waits until they are acknowledged, and only then is it stamped.
        // (Counted, not searched for: the queue can hold many thousands of events.)
        if !lifecycle(ev.kind) {
            while last_lifecycle.is_some_and(|n| handed - in_flight.len() <= n) {
                let oldest = in_flight
                    .pop_front()
                    .expect("a lifecycle event is in flight");
                on_sent(settle(oldest).await?);
            }
        }
        let topic = topic_of(ev.kind);
        let mut value = ev.value()?;
        if ev.stamp_on_send {
            restamp(&mut value, chrono::Utc::now().timestamp_millis());
        }
        let payload = codec.encode(&topic, ev.kind, value).await.map_err(|e| {
            anyhow::anyhow!("line {}: cannot encode {}: {e}", ev.line, ev.kind.name())
        })?;
        loop {
            // send_result enqueues synchronously, which is what keeps input order per key.
            let record = FutureRecord::to(&topic).key(&ev.key).payload(&payload);
            match producer.send_result(record) {
                Ok(fut) => {
                    if lifecycle(ev.kind) {
                        last_lifecycle = Some(handed);
                    }
                    handed += 1;
                    in_flight.push_back((ev, topic, fut));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    match in_flight.pop_front() {
                        Some(oldest) => on_sent(settle(oldest).await?),
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((e, _)) => anyhow::bail!("line {}: cannot produce to {topic}: {e}", ev.line),
            }
        }
    }
    while let Some(next) = in_flight.pop_front() {
        on_sent(settle(next).await?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORG: &str = "0b6f3c1e-3e43-4c55-9d0b-1c1c1c1c1c1c";

    #[test]
    fn ids_and_times_are_generated_and_keys_follow_the_design() {
        let ev = prepare_line(
            1,
            &format!(r#"{{"type":"OrganisationCreated","organisation_id":"{ORG}","organisation_type":"BRAND","slug":"louvolite","name":"Louvolite"}}"#),
        )
        .unwrap();
        assert_eq!(ev.kind, EventKind::OrganisationCreated);
        assert_eq!(ev.key, ORG);
        let Value::Record(fields) = ev.value().unwrap() else {
            panic!()
        };
        assert!(matches!(fields[0].1, Value::Uuid(_)));
        assert!(matches!(fields[1].1, Value::TimestampMillis(t) if t > 1_700_000_000_000));
    }

    #[test]
    fn bad_lines_name_line_and_field() {
        let good = format!(
            r#"{{"type":"OrganisationCreated","organisation_id":"{ORG}","organisation_type":"BRAND","slug":"ok","name":"n"}}"#
        );
        let unknown = r#"{"type":"OrganisationExploded"}"#;
        let bad_slug = format!(
            r#"{{"type":"OrganisationCreated","organisation_id":"{ORG}","organisation_type":"BRAND","slug":"Bad-Slug","name":"n"}}"#
        );
        let no_name = format!(
            r#"{{"type":"OrganisationCreated","organisation_id":"{ORG}","organisation_type":"BRAND","slug":"ok"}}"#
        );
        let input = format!("{good}\n\n# comment\n{unknown}\n{bad_slug}\n{no_name}\nnot json\n");
        let errors = prepare_all(input.as_bytes()).unwrap_err();
        let summary: Vec<(usize, bool)> = errors
            .iter()
            .map(|e| (e.line, e.reason.contains("field `")))
            .collect();
        assert_eq!(summary, vec![(4, true), (5, true), (6, true), (7, false)]);
        assert!(
            errors[0].reason.contains("unknown event type"),
            "{}",
            errors[0]
        );
        assert!(errors[1].reason.contains("`slug`"), "{}", errors[1]);
        assert!(
            errors[2].reason.contains("`name`: missing"),
            "{}",
            errors[2]
        );
    }

    fn occurred_at(ev: &PreparedEvent, stamped: Option<i64>) -> i64 {
        let mut value = ev.value().unwrap();
        if let Some(now) = stamped.filter(|_| ev.stamp_on_send) {
            restamp(&mut value, now);
        }
        let Value::Record(fields) = value else {
            panic!()
        };
        match fields.iter().find(|(n, _)| n == "occurred_at").unwrap().1 {
            Value::TimestampMillis(t) | Value::Long(t) => t,
            ref other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_missing_occurred_at_is_stamped_when_sent_a_given_one_is_kept() {
        let missing = prepare_line(
            1,
            &format!(r#"{{"type":"SupplierBrandAccessRevoked","brand_id":"{ORG}","supplier_id":"{ORG}"}}"#),
        )
        .unwrap();
        assert!(missing.stamp_on_send);
        assert_eq!(occurred_at(&missing, Some(42)), 42);
        let given = prepare_line(
            2,
            &format!(r#"{{"type":"SupplierBrandAccessRevoked","brand_id":"{ORG}","supplier_id":"{ORG}","occurred_at":1700000000000}}"#),
        )
        .unwrap();
        assert!(!given.stamp_on_send);
        assert_eq!(occurred_at(&given, Some(42)), 1_700_000_000_000);
    }
}
