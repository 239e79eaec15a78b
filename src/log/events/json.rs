//! JSON → Avro for `tenancy emit`: a JSON object is checked against an event schema field by
//! field, so a bad line is refused with the path of the field at fault.
//!
//! Conventions (docs/architecture.md, "Events"): timestamps as epoch milliseconds or RFC 3339, enums by symbol,
//! uuids as their text, nested records and arrays as JSON objects and arrays; a field the schema
//! gives a default may be left out; a field the schema lacks is an error (likely a typo).

use apache_avro::schema::{RecordSchema, UuidSchema};
use apache_avro::types::Value;
use apache_avro::Schema;
use serde_json::Value as Json;

/// A field that does not fit its schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{path}`: {reason}")]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

fn err(path: &str, reason: impl Into<String>) -> FieldError {
    FieldError {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Converts a JSON object into a record of `schema`. `skip` names fields to ignore (e.g. the
/// `type` discriminator of an emit line).
pub fn record_from_json(schema: &Schema, json: &Json, skip: &[&str]) -> Result<Value, FieldError> {
    match schema {
        Schema::Record(record) => convert_record(record, json, "", skip),
        _ => Err(err("", "schema is not a record")),
    }
}

fn convert_record(
    record: &RecordSchema,
    json: &Json,
    path: &str,
    skip: &[&str],
) -> Result<Value, FieldError> {
    let Json::Object(map) = json else {
        return Err(err(
            path,
            format!("expected an object, got {}", json_kind(json)),
        ));
    };
    let join = |name: &str| {
        if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    };
    if let Some(unknown) = map
        .keys()
        .find(|k| !skip.contains(&k.as_str()) && !record.lookup.contains_key(k.as_str()))
    {
        return Err(err(
            &join(unknown),
            format!("not a field of {}", record.name.fullname(None)),
        ));
    }
    let mut fields = Vec::with_capacity(record.fields.len());
    for field in &record.fields {
        let field_path = join(&field.name);
        let value = match map.get(&field.name) {
            Some(v) => convert(&field.schema, v, &field_path)?,
            None => match &field.default {
                Some(default) => convert(&field.schema, default, &field_path)?,
                None => return Err(err(&field_path, "missing (required, no default)")),
            },
        };
        fields.push((field.name.clone(), value));
    }
    Ok(Value::Record(fields))
}

fn convert(schema: &Schema, json: &Json, path: &str) -> Result<Value, FieldError> {
    let wrong = || {
        err(
            path,
            format!("expected {}, got {}", describe(schema), json_kind(json)),
        )
    };
    Ok(match schema {
        Schema::Null => match json {
            Json::Null => Value::Null,
            _ => return Err(wrong()),
        },
        Schema::Boolean => Value::Boolean(json.as_bool().ok_or_else(wrong)?),
        Schema::Int => {
            let n = json.as_i64().ok_or_else(wrong)?;
            Value::Int(i32::try_from(n).map_err(|_| err(path, format!("{n} does not fit an int")))?)
        }
        Schema::Long => Value::Long(json.as_i64().ok_or_else(wrong)?),
        Schema::Float => Value::Float(json.as_f64().ok_or_else(wrong)? as f32),
        Schema::Double => Value::Double(json.as_f64().ok_or_else(wrong)?),
        Schema::String => Value::String(json.as_str().ok_or_else(wrong)?.to_owned()),
        Schema::Bytes => Value::Bytes(json.as_str().ok_or_else(wrong)?.as_bytes().to_vec()),
        Schema::Uuid(UuidSchema::String) => {
            let text = json.as_str().ok_or_else(wrong)?;
            Value::Uuid(
                uuid::Uuid::parse_str(text)
                    .map_err(|e| err(path, format!("{text:?} is not a uuid: {e}")))?,
            )
        }
        Schema::TimestampMillis => Value::TimestampMillis(timestamp_millis(json, path)?),
        Schema::Enum(e) => {
            let symbol = json.as_str().ok_or_else(wrong)?;
            let index = e.symbols.iter().position(|s| s == symbol).ok_or_else(|| {
                err(
                    path,
                    format!("{symbol:?} is not one of {}", e.symbols.join(", ")),
                )
            })?;
            Value::Enum(index as u32, symbol.to_owned())
        }
        Schema::Array(array) => {
            let items = json.as_array().ok_or_else(wrong)?;
            Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| convert(&array.items, item, &format!("{path}[{i}]")))
                    .collect::<Result<_, _>>()?,
            )
        }
        Schema::Map(map) => {
            let object = json.as_object().ok_or_else(wrong)?;
            Value::Map(
                object
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), convert(&map.types, v, &format!("{path}.{k}"))?)))
                    .collect::<Result<_, FieldError>>()?,
            )
        }
        Schema::Record(record) => convert_record(record, json, path, &[])?,
        Schema::Union(union) => {
            // The first branch that accepts the value wins, as in Avro's JSON encoding of a
            // union with a plain (untagged) value; null only matches JSON null.
            let branch = union
                .variants()
                .iter()
                .enumerate()
                .find_map(|(i, s)| convert(s, json, path).ok().map(|v| (i, v)));
            match branch {
                Some((i, v)) => Value::Union(i as u32, Box::new(v)),
                None => return Err(wrong()),
            }
        }
        other => {
            return Err(err(
                path,
                format!("schema type {other:?} is not supported by emit"),
            ))
        }
    })
}

fn describe(schema: &Schema) -> String {
    match schema {
        Schema::Null => "null".into(),
        Schema::Boolean => "a boolean".into(),
        Schema::Int | Schema::Long => "an integer".into(),
        Schema::Float | Schema::Double => "a number".into(),
        Schema::String | Schema::Bytes => "a string".into(),
        Schema::Uuid(_) => "a uuid string".into(),
        Schema::TimestampMillis => "epoch milliseconds or an RFC 3339 timestamp".into(),
        Schema::Enum(e) => format!("one of {}", e.symbols.join(", ")),
        Schema::Array(_) => "an array".into(),
        Schema::Map(_) | Schema::Record(_) => "an object".into(),
        Schema::Union(u) => u
            .variants()
            .iter()
            .map(describe)
            .collect::<Vec<_>>()
            .join(" or "),
        other => format!("{other:?}"),
    }
}

fn timestamp_millis(json: &Json, path: &str) -> Result<i64, FieldError> {
    match json {
        Json::Number(n) => n
            .as_i64()
            .ok_or_else(|| err(path, format!("{n} is not whole epoch milliseconds"))),
        Json::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .map_err(|e| err(path, format!("{s:?} is not an RFC 3339 timestamp: {e}"))),
        other => Err(err(
            path,
            format!(
                "expected epoch milliseconds or an RFC 3339 timestamp, got {}",
                json_kind(other)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::events::EventKind;
    use serde_json::json;

    fn created(extra: Json) -> Json {
        let mut base = json!({
            "type": "OrganisationCreated",
            "event_id": "6f1c1a56-6d0e-4a47-9a43-2a4a8f1f7c11",
            "occurred_at": "2026-11-29T10:00:00Z",
            "organisation_id": "0b6f3c1e-3e43-4c55-9d0b-1c1c1c1c1c1c",
            "organisation_type": "BRAND",
            "slug": "louvolite",
            "name": "Louvolite"
        });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                base.as_object_mut().unwrap().remove(k);
            } else {
                base[k] = v.clone();
            }
        }
        base
    }

    fn convert_created(j: &Json) -> Result<Value, FieldError> {
        record_from_json(EventKind::OrganisationCreated.schema(), j, &["type"])
    }

    #[test]
    fn a_valid_line_encodes() {
        let value = convert_created(&created(json!({}))).unwrap();
        let Value::Record(fields) = &value else {
            panic!("not a record")
        };
        assert_eq!(
            fields[1],
            (
                "occurred_at".into(),
                Value::TimestampMillis(1_795_946_400_000)
            )
        );
        assert_eq!(
            fields[3],
            ("organisation_type".into(), Value::Enum(0, "BRAND".into()))
        );
        crate::log::events::encode_datum(EventKind::OrganisationCreated, value).unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"name": null}), "name", "missing"),
            (
                json!({"organisation_type": "SHOP"}),
                "organisation_type",
                "not one of",
            ),
            (
                json!({"occurred_at": true}),
                "occurred_at",
                "epoch milliseconds",
            ),
            (
                json!({"organisation_id": "nope"}),
                "organisation_id",
                "not a uuid",
            ),
            (json!({"slug": 7}), "slug", "expected a string"),
            (json!({"colour": "red"}), "colour", "not a field"),
        ];
        for (change, field, reason) in cases {
            let e = convert_created(&created(change)).unwrap_err();
            assert_eq!(e.path, field, "{e}");
            assert!(e.reason.contains(reason), "{e}");
        }
    }

    #[test]
    fn nested_records_and_defaults() {
        let line = json!({
            "event_id": "6f1c1a56-6d0e-4a47-9a43-2a4a8f1f7c11",
            "occurred_at": 1,
            "brand_id": "0b6f3c1e-3e43-4c55-9d0b-1c1c1c1c1c1c",
            "brand_slug": "louvolite",
            "revision": 3,
            "fabrics_upserted": [{"code": "A1", "name": "n", "collection": "c", "colour": "red",
                "material": "m", "width_mm": "wide", "price_minor": 100, "currency": "GBP"}]
        });
        let e = record_from_json(EventKind::BrandCatalogUpdated.schema(), &line, &[]).unwrap_err();
        assert_eq!(e.path, "fabrics_upserted[0].width_mm");
        let mut fixed = line.clone();
        fixed["fabrics_upserted"][0]["width_mm"] = json!(2000);
        let v = record_from_json(EventKind::BrandCatalogUpdated.schema(), &fixed, &[]).unwrap();
        // fabrics_removed and discontinued took their defaults.
        crate::log::events::encode_datum(EventKind::BrandCatalogUpdated, v).unwrap();
    }
}
