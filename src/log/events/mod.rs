//! The Avro events (docs/architecture.md, "Events"): their schemas (`schemas/*.avsc`, embedded at build time),
//! which topic each lives on, how it is keyed, and typed views of the ones we consume.
//!
//! Schemas are parsed once per process ([`EventKind::schema`]); decoded values are resolved
//! against our reader schema so events written with an older or newer compatible schema by any
//! Confluent client still map onto the structs below.

pub mod json;

use std::collections::HashMap;
use std::sync::OnceLock;

use apache_avro::types::Value;
use apache_avro::Schema;
use serde::{Deserialize, Serialize};

use crate::log::topics::Topic;
use crate::tenant::OrganisationType;

/// Avro namespace of every record we define.
pub const AVRO_NAMESPACE: &str = "blindstrader.events";

macro_rules! event_kinds {
    ($($kind:ident => $topic:ident, $key:literal;)*) => {
        /// Every event type of the platform.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventKind { $($kind,)* }

        impl EventKind {
            pub const ALL: &'static [EventKind] = &[$(EventKind::$kind,)*];

            /// The record name, also the `"type"` of an `emit` JSON line.
            pub fn name(self) -> &'static str {
                match self { $(EventKind::$kind => stringify!($kind),)* }
            }

            pub fn topic(self) -> Topic {
                match self { $(EventKind::$kind => Topic::$topic,)* }
            }

            /// The field whose value is the Kafka message key, so one tenant's events stay
            /// ordered in one partition.
            pub fn key_field(self) -> &'static str {
                match self { $(EventKind::$kind => $key,)* }
            }

            fn schema_text(self) -> &'static str {
                match self {
                    $(EventKind::$kind => include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/", stringify!($kind), ".avsc")),)*
                }
            }
        }
    };
}

event_kinds! {
    OrganisationCreated => Organisations, "organisation_id";
    OrganisationTerminated => Organisations, "organisation_id";
    OrganisationRestored => Organisations, "organisation_id";
    TenantProvisioned => Tenancy, "organisation_id";
    TenantProvisioningFailed => Tenancy, "organisation_id";
    TenantArchived => Tenancy, "organisation_id";
    TenantRestored => Tenancy, "organisation_id";
    TenantPurged => Tenancy, "organisation_id";
    BrandCatalogUpdated => BrandCatalog, "brand_id";
    SupplierBrandAccessGranted => BrandAccess, "brand_id";
    SupplierBrandAccessRevoked => BrandAccess, "brand_id";
    RetailerDomainAssigned => RetailerDomains, "retailer_id";
    RetailerDomainRemoved => RetailerDomains, "retailer_id";
}

impl EventKind {
    pub fn from_name(name: &str) -> Option<EventKind> {
        // Accept the bare record name and the full name a Confluent client reports.
        let bare = name
            .strip_prefix(AVRO_NAMESPACE)
            .and_then(|n| n.strip_prefix('.'))
            .unwrap_or(name);
        Self::ALL.iter().copied().find(|k| k.name() == bare)
    }

    pub fn full_name(self) -> String {
        format!("{AVRO_NAMESPACE}.{}", self.name())
    }

    /// The JSON text of the schema as shipped in `schemas/`.
    pub fn schema_json(self) -> &'static str {
        self.schema_text()
    }

    /// The parsed schema, parsed once per process.
    pub fn schema(self) -> &'static Schema {
        static SCHEMAS: OnceLock<HashMap<EventKind, Schema>> = OnceLock::new();
        &SCHEMAS.get_or_init(|| {
            EventKind::ALL
                .iter()
                .map(|k| {
                    let schema = Schema::parse_str(k.schema_text())
                        .unwrap_or_else(|e| panic!("schemas/{}.avsc is invalid: {e}", k.name()));
                    (*k, schema)
                })
                .collect()
        })[&self]
    }

    /// Whether `writer` is exactly this event's schema (as JSON, logical types and defaults
    /// included), so a value written with it needs no resolution.
    pub fn is_our_schema(self, writer: &Schema) -> bool {
        static OURS: OnceLock<HashMap<EventKind, serde_json::Value>> = OnceLock::new();
        let ours = &OURS.get_or_init(|| {
            EventKind::ALL
                .iter()
                .map(|k| (*k, serde_json::to_value(k.schema()).unwrap_or_default()))
                .collect()
        })[&self];
        serde_json::to_value(writer).is_ok_and(|w| w == *ours)
    }

    /// Subject under TopicRecordNameStrategy: `{topic}-{record full name}`.
    pub fn subject(self, topic_name: &str) -> String {
        format!("{topic_name}-{}", self.full_name())
    }
}

/// Fields every event carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: String,
    pub occurred_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrganisationCreated {
    pub event_id: String,
    pub occurred_at: i64,
    pub organisation_id: String,
    pub organisation_type: OrganisationType,
    pub slug: String,
    pub name: String,
    /// The region its data must stay in (`TENANCY_SERVER_REGIONS`); None: any server. A field
    /// added after the first version, with a default: older events have none.
    #[serde(default)]
    pub region: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrganisationTerminated {
    pub event_id: String,
    pub occurred_at: i64,
    pub organisation_id: String,
    pub organisation_type: OrganisationType,
    pub slug: String,
    pub reason: String,
    pub terminated_by: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrganisationRestored {
    pub event_id: String,
    pub occurred_at: i64,
    pub organisation_id: String,
    pub organisation_type: OrganisationType,
    pub slug: String,
    pub restored_by: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantProvisioned {
    pub event_id: String,
    pub occurred_at: i64,
    pub organisation_id: String,
    pub organisation_type: OrganisationType,
    pub slug: String,
    pub database: String,
    pub migration_version: i64,
    pub caused_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantProvisioningFailed {
    pub event_id: String,
    pub occurred_at: i64,
    pub organisation_id: String,
    pub organisation_type: OrganisationType,
    pub slug: String,
    pub database: Option<String>,
    pub reason: String,
    pub caused_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantArchived {
    pub event_id: String,
    pub occurred_at: i64,
    pub organisation_id: String,
    pub organisation_type: OrganisationType,
    pub slug: String,
    pub database: String,
    pub archive_database: String,
    pub purge_after: i64,
    pub reason: String,
    pub caused_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRestored {
    pub event_id: String,
    pub occurred_at: i64,
    pub organisation_id: String,
    pub organisation_type: OrganisationType,
    pub slug: String,
    pub database: String,
    pub caused_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantPurged {
    pub event_id: String,
    pub occurred_at: i64,
    pub organisation_id: String,
    pub organisation_type: OrganisationType,
    pub slug: String,
    pub database: String,
    pub reason: String,
    pub caused_by: Option<String>,
    /// What the purge removes (databases by server/name, then kinds of rows and keys).
    #[serde(default)]
    pub removes: Vec<String>,
}

/// A consumed event, decoded and mapped onto our reader schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    OrganisationCreated(OrganisationCreated),
    OrganisationTerminated(OrganisationTerminated),
    OrganisationRestored(OrganisationRestored),
    TenantProvisioned(TenantProvisioned),
    TenantProvisioningFailed(TenantProvisioningFailed),
    /// A known event this build has no typed view of yet; kept whole so nothing is lost.
    Other {
        kind: EventKind,
        value: Value,
    },
}

/// Why a decoded Avro value could not become an [`Event`].
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("record {0:?} is not an event this platform knows")]
    UnknownRecord(String),
    #[error("{kind:?} does not match our reader schema: {source}")]
    Resolve {
        kind: EventKind,
        #[source]
        source: Box<apache_avro::Error>,
    },
}

impl Event {
    /// Maps a value decoded with the writer's schema onto our reader schema for `record_name`.
    pub fn from_avro(record_name: &str, value: Value) -> Result<Event, EventError> {
        Event::from_writer_value(record_name, value, true)
    }

    /// As [`Event::from_avro`]; `resolve: false` when the writer's schema is exactly ours
    /// ([`EventKind::is_our_schema`]), where resolution would change nothing and costs more
    /// than the decoding itself.
    pub fn from_writer_value(
        record_name: &str,
        value: Value,
        resolve: bool,
    ) -> Result<Event, EventError> {
        let kind = EventKind::from_name(record_name)
            .ok_or_else(|| EventError::UnknownRecord(record_name.to_owned()))?;
        let resolve_err = |e: apache_avro::Error| EventError::Resolve {
            kind,
            source: Box::new(e),
        };
        // Resolution fills defaults for fields the writer lacked and drops ones it added.
        let value = match resolve {
            true => value.resolve(kind.schema()).map_err(resolve_err)?,
            false => value,
        };
        let typed = match kind {
            EventKind::OrganisationCreated => {
                Event::OrganisationCreated(apache_avro::from_value(&value).map_err(resolve_err)?)
            }
            EventKind::OrganisationTerminated => {
                Event::OrganisationTerminated(apache_avro::from_value(&value).map_err(resolve_err)?)
            }
            EventKind::OrganisationRestored => {
                Event::OrganisationRestored(apache_avro::from_value(&value).map_err(resolve_err)?)
            }
            EventKind::TenantProvisioned => {
                Event::TenantProvisioned(apache_avro::from_value(&value).map_err(resolve_err)?)
            }
            EventKind::TenantProvisioningFailed => Event::TenantProvisioningFailed(
                apache_avro::from_value(&value).map_err(resolve_err)?,
            ),
            _ => Event::Other { kind, value },
        };
        Ok(typed)
    }

    pub fn kind(&self) -> EventKind {
        match self {
            Event::OrganisationCreated(_) => EventKind::OrganisationCreated,
            Event::OrganisationTerminated(_) => EventKind::OrganisationTerminated,
            Event::OrganisationRestored(_) => EventKind::OrganisationRestored,
            Event::TenantProvisioned(_) => EventKind::TenantProvisioned,
            Event::TenantProvisioningFailed(_) => EventKind::TenantProvisioningFailed,
            Event::Other { kind, .. } => *kind,
        }
    }
}

/// Avro binary of `value` under `kind`'s schema (no wire-format header).
pub fn encode_datum(kind: EventKind, value: Value) -> apache_avro::AvroResult<Vec<u8>> {
    apache_avro::writer::datum::GenericDatumWriter::builder(kind.schema())
        .build()?
        .write_value_to_vec(value)
}

/// Reads Avro binary written with `kind`'s schema.
pub fn decode_datum(kind: EventKind, bytes: &[u8]) -> apache_avro::AvroResult<Value> {
    apache_avro::reader::datum::GenericDatumReader::builder(kind.schema())
        .build()?
        .read_value(&mut &bytes[..])
}

/// Serialises a typed event into an Avro value of its schema (logical types included).
pub fn to_avro<T: Serialize>(kind: EventKind, event: &T) -> anyhow::Result<Value> {
    let value = apache_avro::to_value(event)?;
    // `to_value` yields plain strings/longs; resolving turns them into the schema's uuid,
    // timestamp-millis and enum values so encoding validates.
    Ok(value.resolve(kind.schema())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a writer schema equal to ours skips resolution: one with a field more (a newer
    /// producer), or another event's, is still resolved onto ours.
    #[test]
    fn only_our_exact_schema_skips_resolution() {
        let kind = EventKind::BrandCatalogUpdated;
        assert!(kind.is_our_schema(&Schema::parse_str(kind.schema_text()).unwrap()));
        let mut json: serde_json::Value = serde_json::from_str(kind.schema_text()).unwrap();
        json["fields"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "extra", "type": "string", "default": ""}));
        let newer = Schema::parse_str(&json.to_string()).unwrap();
        assert!(!kind.is_our_schema(&newer));
        assert!(!EventKind::OrganisationCreated.is_our_schema(kind.schema()));
    }

    #[test]
    fn every_schema_parses_and_names_its_record() {
        for kind in EventKind::ALL {
            match kind.schema() {
                Schema::Record(r) => assert_eq!(r.name.fullname(None), kind.full_name()),
                other => panic!("{kind:?} is not a record: {other:?}"),
            }
        }
    }

    /// An OrganisationCreated of the first version (no `region`) still decodes, as one that
    /// asked for no region: old producers are unaffected.
    #[test]
    fn an_organisation_created_without_region_decodes_with_none() {
        let first = Value::Record(vec![
            (
                "event_id".into(),
                Value::String("6f1c1a56-6d0e-4a47-9a43-2a4a8f1f7c11".into()),
            ),
            (
                "occurred_at".into(),
                Value::TimestampMillis(1_700_000_000_000),
            ),
            (
                "organisation_id".into(),
                Value::String("0b6f3c1e-3e43-4c55-9d0b-1c1c1c1c1c1c".into()),
            ),
            ("organisation_type".into(), Value::Enum(0, "BRAND".into())),
            ("slug".into(), Value::String("louvolite".into())),
            ("name".into(), Value::String("Louvolite".into())),
        ]);
        match Event::from_writer_value("blindstrader.events.OrganisationCreated", first, true) {
            Ok(Event::OrganisationCreated(c)) => {
                assert_eq!(c.slug, "louvolite");
                assert_eq!(c.region, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn typed_events_round_trip_through_avro() {
        let created = OrganisationCreated {
            event_id: "6f1c1a56-6d0e-4a47-9a43-2a4a8f1f7c11".into(),
            occurred_at: 1_700_000_000_000,
            organisation_id: "0b6f3c1e-3e43-4c55-9d0b-1c1c1c1c1c1c".into(),
            organisation_type: OrganisationType::Brand,
            slug: "louvolite".into(),
            name: "Louvolite".into(),
            region: Some("eu".into()),
        };
        let value = to_avro(EventKind::OrganisationCreated, &created).unwrap();
        let bytes = encode_datum(EventKind::OrganisationCreated, value).expect("encodes");
        let decoded = decode_datum(EventKind::OrganisationCreated, &bytes).unwrap();
        let event = Event::from_avro("blindstrader.events.OrganisationCreated", decoded).unwrap();
        assert_eq!(event, Event::OrganisationCreated(created));
    }

    #[test]
    fn unknown_records_are_refused() {
        let err = Event::from_avro("com.example.Nope", Value::Null).unwrap_err();
        assert!(matches!(err, EventError::UnknownRecord(_)));
    }
}
