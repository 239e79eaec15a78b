//! Turning a client's schema submission into something the store can compare and check.
//!
//! Clients send the schema as a JSON *string* inside the request body, formatted however their
//! tooling likes. Two submissions must count as "the same schema" when they differ only in
//! whitespace or key order, otherwise re-registering on every producer start would mint new
//! versions. The store therefore keys schemas on an *identity*: the schema as apache-avro parsed
//! and re-serialised it.
//!
//! The identity is deliberately not Avro's Parsing Canonical Form
//! ([`Schema::canonical_form`]): that form strips `default`, `doc` and `aliases`, so two schemas
//! that differ only in a field default would collapse onto one id, and the second one's default
//! would silently be lost — yet defaults are exactly what decides backward compatibility. The
//! re-serialised form keeps them, which matches Confluent (it compares Avro's full
//! `Schema.toString()`, not the parsing canonical form).

use apache_avro::Schema;

use super::error::RegistryError;

/// The only schema type this registry supports.
pub const AVRO: &str = "AVRO";

/// A validated Avro schema submission.
#[derive(Clone, Debug)]
pub struct ParsedSchema {
    /// The schema text exactly as the client sent it (trimmed); this is what is stored and
    /// served back, so nothing apache-avro does not model (e.g. unknown properties) is lost.
    pub raw: String,
    /// The parsed schema, used for compatibility checks.
    pub schema: Schema,
    /// Whitespace- and key-order-independent form used to decide whether two submissions are
    /// the same schema.
    pub identity: String,
}

impl ParsedSchema {
    /// Parses a submission. `schema_type` is the optional `schemaType` field (absent means
    /// AVRO); `reference_count` is the length of the optional `references` array, which this
    /// registry does not support.
    pub fn parse(
        raw: &str,
        schema_type: Option<&str>,
        reference_count: usize,
    ) -> Result<Self, RegistryError> {
        if let Some(kind) = schema_type {
            if !kind.eq_ignore_ascii_case(AVRO) {
                return Err(RegistryError::InvalidSchema(format!(
                    "of type {kind}: only AVRO schemas are supported by this registry"
                )));
            }
        }
        if reference_count > 0 {
            return Err(RegistryError::InvalidSchema(
                "with references: schema references are not supported by this registry".into(),
            ));
        }
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(RegistryError::InvalidSchema("(empty schema)".into()));
        }
        let schema = Schema::parse_str(raw)
            .map_err(|err| RegistryError::InvalidSchema(format!("{raw}, details: {err}")))?;
        let identity = identity_of(&schema)?;
        Ok(Self {
            raw: raw.to_owned(),
            schema,
            identity,
        })
    }

    /// Re-parses a schema that was accepted earlier (from the store's own state).
    pub(crate) fn reparse(raw: &str) -> Result<Self, RegistryError> {
        Self::parse(raw, None, 0)
            .map_err(|err| RegistryError::Storage(format!("stored schema no longer parses: {err}")))
    }
}

fn identity_of(schema: &Schema) -> Result<String, RegistryError> {
    serde_json::to_string(schema)
        .map_err(|err| RegistryError::InvalidSchema(format!("that cannot be serialised: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORD: &str =
        r#"{"type":"record","name":"A","fields":[{"name":"x","type":"int","default":1}]}"#;

    #[test]
    fn identity_ignores_whitespace_and_key_order() {
        let a = ParsedSchema::parse(RECORD, None, 0).unwrap();
        let b = ParsedSchema::parse(
            r#"
            { "fields": [ { "default": 1, "type": "int", "name": "x" } ],
              "name": "A", "type": "record" }
            "#,
            Some("AVRO"),
            0,
        )
        .unwrap();
        assert_eq!(a.identity, b.identity);
        assert_ne!(a.raw, b.raw);
    }

    #[test]
    fn identity_keeps_defaults_unlike_canonical_form() {
        let a = ParsedSchema::parse(RECORD, None, 0).unwrap();
        let b = ParsedSchema::parse(&RECORD.replace(r#""default":1"#, r#""default":2"#), None, 0)
            .unwrap();
        assert_eq!(a.schema.canonical_form(), b.schema.canonical_form());
        assert_ne!(a.identity, b.identity);
    }

    #[test]
    fn rejects_invalid_and_unsupported_schemas() {
        for (raw, kind, refs) in [
            ("{not json", None, 0),
            (r#"{"type":"record","name":"A"}"#, None, 0),
            ("", None, 0),
            (RECORD, Some("PROTOBUF"), 0),
            (RECORD, Some("JSON"), 0),
            (RECORD, None, 1),
        ] {
            let err = ParsedSchema::parse(raw, kind, refs).unwrap_err();
            assert_eq!(err.error_code(), 42201, "{raw:?} {kind:?} {refs}: {err}");
        }
    }

    #[test]
    fn accepts_primitive_schemas_and_lowercase_type() {
        let parsed = ParsedSchema::parse(r#""string""#, Some("avro"), 0).unwrap();
        assert_eq!(parsed.schema, Schema::String);
    }
}
