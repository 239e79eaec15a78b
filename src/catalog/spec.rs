//! The declared catalog projection (`projections/brand_catalog.json`), checked against the Avro
//! schema at start-up so a misnamed field fails `tenancy run` before the first event.

use std::collections::BTreeMap;

use apache_avro::types::Value;
use apache_avro::Schema;
use serde::Deserialize;

use crate::log::events::EventKind;

const DECLARED: &str = include_str!("../../projections/brand_catalog.json");

/// What BrandCatalogUpdated does to the brand's and suppliers' tables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogSpec {
    pub projection: String,
    pub event: String,
    pub tenant_field: String,
    pub revision_field: String,
    pub upserts_field: String,
    pub removals_field: String,
    pub key_column: String,
    pub columns: Vec<String>,
    pub brand_table: String,
    pub brand_revision_column: String,
    /// Codes removed from the brand's catalog, with the revision that removed them.
    pub brand_removed_table: String,
    pub supplier_table: String,
    pub supplier_brand_column: String,
    pub requires_permission: String,
    /// Columns copied to a supplier only when it holds the permission (NULL otherwise).
    pub masked_unless: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("projection spec is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("projection spec: {0}")]
    Invalid(String),
}

fn is_sql_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 64
}

fn record_fields(schema: &Schema) -> Option<Vec<(&str, &Schema)>> {
    match schema {
        Schema::Record(r) => Some(
            r.fields
                .iter()
                .map(|f| (f.name.as_str(), &f.schema))
                .collect(),
        ),
        _ => None,
    }
}

impl CatalogSpec {
    /// Position of the key column in [`CatalogSpec::columns`] (checked at load).
    pub fn key_index(&self) -> usize {
        self.columns
            .iter()
            .position(|c| c == &self.key_column)
            .expect("checked at load")
    }

    /// The spec shipped in `projections/`, validated.
    pub fn load() -> Result<CatalogSpec, SpecError> {
        Self::parse(DECLARED)
    }

    pub fn parse(text: &str) -> Result<CatalogSpec, SpecError> {
        let spec: CatalogSpec = serde_json::from_str(text)?;
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::Invalid(m));
        let kind = EventKind::from_name(&self.event)
            .ok_or_else(|| SpecError::Invalid(format!("unknown event {:?}", self.event)))?;
        let top = record_fields(kind.schema()).expect("events are records");
        let field = |name: &str| top.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);
        for name in [&self.tenant_field, &self.revision_field] {
            if field(name).is_none() {
                return bad(format!("{} has no field {name:?}", self.event));
            }
        }
        let items = match field(&self.upserts_field) {
            Some(Schema::Array(a)) => record_fields(&a.items).ok_or_else(|| {
                SpecError::Invalid(format!("{} items are not records", self.upserts_field))
            })?,
            _ => {
                return bad(format!(
                    "{} has no array field {:?}",
                    self.event, self.upserts_field
                ))
            }
        };
        match field(&self.removals_field) {
            Some(Schema::Array(a)) if matches!(*a.items, Schema::String) => {}
            _ => {
                return bad(format!(
                    "{} has no array-of-string field {:?}",
                    self.event, self.removals_field
                ))
            }
        }
        for column in &self.columns {
            if !items.iter().any(|(n, _)| n == column) {
                return bad(format!(
                    "column {column:?} is not a field of {} items",
                    self.upserts_field
                ));
            }
        }
        if !self.columns.contains(&self.key_column) {
            return bad(format!(
                "key column {:?} is not in columns",
                self.key_column
            ));
        }
        for masked in self.masked_unless.values().flatten() {
            if !self.columns.contains(masked) || masked == &self.key_column {
                return bad(format!("masked column {masked:?} must be a non-key column"));
            }
        }
        let identifiers = self.columns.iter().chain([
            &self.brand_table,
            &self.brand_revision_column,
            &self.brand_removed_table,
            &self.supplier_table,
            &self.supplier_brand_column,
            &self.projection,
        ]);
        for id in identifiers {
            if !is_sql_identifier(id) {
                return bad(format!("{id:?} is not a plain SQL identifier"));
            }
        }
        Ok(())
    }

    /// Columns a supplier with `permissions` must not see.
    pub fn hidden_columns(&self, permissions: &[String]) -> Vec<&str> {
        self.masked_unless
            .iter()
            .filter(|(perm, _)| !permissions.contains(perm))
            .flat_map(|(_, cols)| cols.iter().map(String::as_str))
            .collect()
    }
}

/// A column value taken from an Avro record, ready to bind.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Text(String),
    Int(i64),
    Bool(bool),
}

impl Cell {
    pub fn from_avro(v: &Value) -> Cell {
        match v {
            Value::Null => Cell::Null,
            Value::String(s) | Value::Enum(_, s) => Cell::Text(s.clone()),
            Value::Uuid(u) => Cell::Text(u.to_string()),
            Value::Int(i) => Cell::Int(i64::from(*i)),
            Value::Long(i) | Value::TimestampMillis(i) => Cell::Int(*i),
            Value::Boolean(b) => Cell::Bool(*b),
            Value::Union(_, inner) => Cell::from_avro(inner),
            other => Cell::Text(format!("{other:?}")),
        }
    }
}

/// Field of an Avro record by name.
pub fn field<'v>(record: &'v Value, name: &str) -> Option<&'v Value> {
    match record {
        Value::Record(fields) => fields.iter().find(|(n, _)| n == name).map(|(_, v)| v),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_spec_is_valid() {
        let spec = CatalogSpec::load().unwrap();
        assert_eq!(spec.key_column, "code");
        assert_eq!(
            spec.hidden_columns(&["catalog.read".into()]),
            vec!["price_minor", "currency"]
        );
        assert!(spec
            .hidden_columns(&["catalog.read".into(), "pricing.read".into()])
            .is_empty());
    }

    #[test]
    fn a_field_the_schema_lacks_is_a_start_up_error() {
        let text = DECLARED.replace("\"colour\"", "\"color\"");
        let err = CatalogSpec::parse(&text).unwrap_err().to_string();
        assert!(err.contains("\"color\" is not a field"), "{err}");
        let text = DECLARED.replace(
            "\"revision_field\": \"revision\"",
            "\"revision_field\": \"rev\"",
        );
        let err = CatalogSpec::parse(&text).unwrap_err().to_string();
        assert!(err.contains("no field \"rev\""), "{err}");
        let text = DECLARED.replace(
            "\"brand_table\": \"fabrics\"",
            "\"brand_table\": \"fabrics; drop\"",
        );
        assert!(CatalogSpec::parse(&text).is_err());
    }
}
