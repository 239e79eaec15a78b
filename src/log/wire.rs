//! Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro binary) over the
//! schema registry, via `schema_registry_converter`.
//!
//! Both directions cache per subject / per schema id inside the converter, so the registry is
//! asked once per schema, not once per message.
//!
//! A registry cannot quietly empty the log: an id it does not know is remembered as unknown for
//! [`NOT_FOUND_TTL`] at most (the converter's own cache would keep that answer for the life of
//! the process), and it counts as the event's fault only while the registry is otherwise
//! sound. A registry that holds none of the project's subjects (started on an empty or wrong
//! data directory) is unavailable: the loop waits for it instead of dead-lettering every event.
//! (A schema resolved once is kept for the life of the process, so an id decoded before is never
//! asked again.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use futures::future::{BoxFuture, FutureExt, Shared};
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::avro_common::AvroSchema;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};

use crate::log::events::{Event, EventError, EventKind};

/// Why a payload could not be turned into an [`Event`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty payload (tombstone or null value)")]
    Empty,
    #[error("not Confluent wire format: {0}")]
    WireFormat(String),
    #[error("schema id {id} could not be resolved: {cause}")]
    UnknownSchema { id: u32, cause: String },
    /// The registry could not be reached: worth retrying, not dead-lettering.
    #[error("schema registry unavailable while resolving schema id {id}: {cause}")]
    RegistryUnavailable { id: u32, cause: String },
    #[error("payload does not decode with schema id {id}: {cause}")]
    Undecodable { id: u32, cause: String },
    #[error(transparent)]
    Event(#[from] EventError),
}

impl DecodeError {
    /// Whether waiting and retrying the same message may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, DecodeError::RegistryUnavailable { .. })
    }
}

/// Splits a Confluent-framed payload into schema id and Avro body.
pub fn split_frame(payload: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    match payload {
        [] => Err(DecodeError::Empty),
        [magic, ..] if *magic != 0 => Err(DecodeError::WireFormat(format!(
            "magic byte is {magic:#04x}, expected 0x00"
        ))),
        [0, a, b, c, d, body @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), body)),
        short => Err(DecodeError::WireFormat(format!(
            "{} bytes, shorter than the 5-byte header",
            short.len()
        ))),
    }
}

/// A [`Codec`] being built on a blocking thread, for a short command to overlap with its
/// connections and first queries: the registry client's TLS set-up reads the system's CA
/// bundle (about 40 ms of CPU, a sixth of a small supplier's rebuild), whether or not the
/// registry is reached over TLS.
#[derive(Clone)]
pub struct PendingCodec(Shared<BoxFuture<'static, Arc<Codec>>>);

impl PendingCodec {
    /// Starts building it.
    pub fn start(schema_registry_url: &str) -> PendingCodec {
        let url = schema_registry_url.to_owned();
        let built = tokio::task::spawn_blocking(move || Arc::new(Codec::new(&url)));
        PendingCodec(
            built
                .map(|r| match r {
                    Ok(codec) => codec,
                    // Building it does not fail; a panic there is passed on, not hidden.
                    Err(e) => std::panic::resume_unwind(e.into_panic()),
                })
                .boxed()
                .shared(),
        )
    }

    /// The codec, once built.
    pub async fn get(&self) -> Arc<Codec> {
        self.0.clone().await
    }
}

/// How long a schema id the registry answered "not found" for is taken as unknown before the
/// registry is asked again; also how long an answer about the registry's subjects is kept.
pub const NOT_FOUND_TTL: Duration = Duration::from_secs(10);

/// Encoder and decoder sharing one registry configuration.
pub struct Codec {
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    url: String,
    /// Ids answered "not found", and when.
    not_found: Mutex<HashMap<u32, (Instant, String)>>,
    /// Whether the registry held any of the project's subjects, and when that was asked.
    holds_project: Mutex<Option<(Instant, bool)>>,
}

impl Codec {
    pub fn new(schema_registry_url: &str) -> Self {
        let settings = SrSettings::new(schema_registry_url.to_owned());
        Codec {
            encoder: AvroEncoder::new(settings.clone()),
            decoder: AvroDecoder::new(settings),
            url: schema_registry_url.trim_end_matches('/').to_owned(),
            not_found: Mutex::default(),
            holds_project: Mutex::default(),
        }
    }

    /// Registers (once, then cached) the event's schema under its TopicRecordNameStrategy subject
    /// and returns the framed bytes.
    pub async fn encode(
        &self,
        topic_name: &str,
        kind: EventKind,
        value: Value,
    ) -> Result<Vec<u8>, SRCError> {
        let strategy = SubjectNameStrategy::TopicRecordNameStrategyWithSchema(
            topic_name.to_owned(),
            SuppliedSchema::new(
                Some(kind.full_name()),
                SchemaType::Avro,
                kind.schema_json().to_owned(),
            ),
        );
        self.encoder.encode_value(value, &strategy).await
    }

    /// Decodes a framed payload with the writer's schema (fetched by id, cached) and maps it onto
    /// our reader schema.
    pub async fn decode(&self, payload: Option<&[u8]>) -> Result<Event, DecodeError> {
        let schema = self.writer_schema(payload).await?;
        decode_with(&schema, payload.unwrap_or_default())
    }

    /// The writer's schema of a framed payload: the registry is asked once per schema id. Split
    /// from [`decode_with`] so bulk decoding can run off the async runtime.
    pub async fn writer_schema(
        &self,
        payload: Option<&[u8]>,
    ) -> Result<Arc<AvroSchema>, DecodeError> {
        let payload = payload.ok_or(DecodeError::Empty)?;
        let (id, _) = split_frame(payload)?;
        let recent = {
            let mut not_found = self.not_found.lock().expect("not poisoned");
            not_found.retain(|_, (at, _)| at.elapsed() < NOT_FOUND_TTL);
            not_found.get(&id).map(|(_, cause)| cause.clone())
        };
        let cause = match recent {
            Some(cause) => cause,
            None => match self.decoder.get_schema(id).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    // The converter keeps every error for the life of the process: an answer
                    // given while the registry was down or empty must not outlive it.
                    self.decoder.remove_errors_from_cache();
                    if e.retriable {
                        return Err(DecodeError::RegistryUnavailable {
                            id,
                            cause: e.to_string(),
                        });
                    }
                    let cause = e.to_string();
                    self.not_found
                        .lock()
                        .expect("not poisoned")
                        .insert(id, (Instant::now(), cause.clone()));
                    cause
                }
            },
        };
        match self.registry_holds_project().await {
            Ok(true) => Err(DecodeError::UnknownSchema { id, cause }),
            Ok(false) => Err(DecodeError::RegistryUnavailable {
                id,
                cause: format!(
                    "the registry at {} holds none of this project's subjects (empty, or started \
                     on the wrong data directory?)",
                    self.url
                ),
            }),
            Err(e) => Err(DecodeError::RegistryUnavailable { id, cause: e }),
        }
    }

    /// Whether the registry has any subject of this project's events (`…-{record full name}`,
    /// TopicRecordNameStrategy), asked at most once per [`NOT_FOUND_TTL`].
    async fn registry_holds_project(&self) -> Result<bool, String> {
        if let Some((at, holds)) = *self.holds_project.lock().expect("not poisoned") {
            if at.elapsed() < NOT_FOUND_TTL {
                return Ok(holds);
            }
        }
        let url = format!("{}/subjects", self.url);
        let subjects: Vec<String> = async {
            reqwest::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(10))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await
        }
        .await
        .map_err(|e: reqwest::Error| {
            format!("cannot list the registry's subjects at {url}: {e}")
        })?;
        let names: Vec<String> = EventKind::ALL
            .iter()
            .map(|k| format!("-{}", k.full_name()))
            .collect();
        let holds = subjects
            .iter()
            .any(|s| names.iter().any(|n| s.ends_with(n.as_str())));
        *self.holds_project.lock().expect("not poisoned") = Some((Instant::now(), holds));
        Ok(holds)
    }
}

/// What decoding with one writer schema needs, worked out once per schema id: the reader, the
/// record's full name (`None` if the writer schema is no record), and whether values need
/// resolving onto ours (not when the writer's schema is exactly ours).
struct WriterSchema<'a> {
    reader: apache_avro::reader::datum::GenericDatumReader<'a>,
    record: Option<String>,
    resolve: bool,
}

impl WriterSchema<'_> {
    fn of(schema: &AvroSchema) -> Result<WriterSchema<'_>, String> {
        let record = match &schema.parsed {
            apache_avro::Schema::Record(r) => Some(r.name.fullname(None)),
            _ => None,
        };
        let ours = record
            .as_deref()
            .and_then(EventKind::from_name)
            .is_some_and(|k| k.is_our_schema(&schema.parsed));
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema.parsed)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(WriterSchema {
            reader,
            record,
            resolve: !ours,
        })
    }

    fn decode(&self, payload: &[u8]) -> Result<Event, DecodeError> {
        let (id, mut body) = split_frame(payload)?;
        let undecodable = |cause: String| DecodeError::Undecodable { id, cause };
        let value = self
            .reader
            .read_value(&mut body)
            .map_err(|e| undecodable(e.to_string()))?;
        if !body.is_empty() {
            return Err(undecodable(format!(
                "{} bytes left after the record",
                body.len()
            )));
        }
        let Some(name) = &self.record else {
            return Err(undecodable("writer schema is not a record".into()));
        };
        Ok(Event::from_writer_value(name, value, self.resolve)?)
    }
}

/// Decodes a framed payload with its writer's schema and maps it onto our reader schema. Pure
/// CPU: safe to call from `spawn_blocking`.
pub fn decode_with(schema: &AvroSchema, payload: &[u8]) -> Result<Event, DecodeError> {
    WriterSchema::of(schema)
        .map_err(|cause| DecodeError::UnknownSchema {
            id: schema.id,
            cause,
        })?
        .decode(payload)
}

/// Decodes many payloads, working out each writer schema once (reader, record name, whether
/// to resolve), not per message. Pure CPU: meant for `spawn_blocking`.
pub fn decode_batch(items: &[(Arc<AvroSchema>, Vec<u8>)]) -> Vec<Result<Event, DecodeError>> {
    let mut writers: std::collections::HashMap<u32, Result<WriterSchema<'_>, String>> =
        std::collections::HashMap::new();
    items
        .iter()
        .map(|(schema, payload)| {
            match writers
                .entry(schema.id)
                .or_insert_with(|| WriterSchema::of(schema))
            {
                Ok(writer) => writer.decode(payload),
                Err(cause) => Err(DecodeError::UnknownSchema {
                    id: schema.id,
                    cause: cause.clone(),
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_checked() {
        assert!(matches!(split_frame(&[]), Err(DecodeError::Empty)));
        assert!(matches!(
            split_frame(&[1, 0, 0, 0, 1, 2]),
            Err(DecodeError::WireFormat(m)) if m.contains("magic byte is 0x01")
        ));
        assert!(matches!(
            split_frame(&[0, 0, 0]),
            Err(DecodeError::WireFormat(m)) if m.contains("3 bytes")
        ));
        let (id, body) = split_frame(&[0, 0, 0, 1, 2, 42]).unwrap();
        assert_eq!((id, body), (258, &[42u8][..]));
    }
}
