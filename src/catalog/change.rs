//! The net effect of consecutive catalog events of one brand: later events win per fabric code,
//! so a batch is written as one multi-row upsert and one delete.

use std::collections::BTreeMap;

use apache_avro::types::Value;

use super::spec::{field, CatalogSpec, Cell};

/// Rows to upsert (cells in `spec.columns` order, then the revision) and codes to delete.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NetChange {
    pub upserts: Vec<Vec<Cell>>,
    pub removals: Vec<String>,
}

impl NetChange {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }

    /// Folds `events` (BrandCatalogUpdated records, in log order).
    pub fn of(spec: &CatalogSpec, events: &[&Value]) -> NetChange {
        let key_index = spec
            .columns
            .iter()
            .position(|c| c == &spec.key_column)
            .expect("checked at load");
        // BTreeMap: a deterministic statement order, so concurrent writers lock rows in the same order.
        let mut net: BTreeMap<String, Option<Vec<Cell>>> = BTreeMap::new();
        for event in events {
            let revision = field(event, &spec.revision_field)
                .map(Cell::from_avro)
                .unwrap_or(Cell::Null);
            if let Some(Value::Array(items)) = field(event, &spec.upserts_field) {
                for item in items {
                    let mut row: Vec<Cell> = spec
                        .columns
                        .iter()
                        .map(|c| field(item, c).map(Cell::from_avro).unwrap_or(Cell::Null))
                        .collect();
                    row.push(revision.clone());
                    if let Cell::Text(code) = &row[key_index] {
                        net.insert(code.clone(), Some(row));
                    }
                }
            }
            if let Some(Value::Array(codes)) = field(event, &spec.removals_field) {
                for code in codes {
                    if let Value::String(code) = code {
                        net.insert(code.clone(), None);
                    }
                }
            }
        }
        let mut change = NetChange::default();
        for (code, row) in net {
            match row {
                Some(row) => change.upserts.push(row),
                None => change.removals.push(code),
            }
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::json::record_from_json;
    use crate::events::EventKind;
    use serde_json::json;

    fn event(revision: i64, upserts: &[&str], removed: &[&str]) -> Value {
        let fabrics: Vec<_> = upserts
            .iter()
            .map(|code| {
                json!({"code": code, "name": format!("{code} r{revision}"), "collection": "c",
                "colour": "white", "material": "polyester", "width_mm": 2000, "price_minor": 1234,
                "currency": "GBP"})
            })
            .collect();
        record_from_json(
            EventKind::BrandCatalogUpdated.schema(),
            &json!({"event_id": "6f1c1a56-6d0e-4a47-9a43-2a4a8f1f7c11", "occurred_at": 1,
                "brand_id": "0b6f3c1e-3e43-4c55-9d0b-1c1c1c1c1c1c", "brand_slug": "b",
                "revision": revision, "fabrics_upserted": fabrics, "fabrics_removed": removed}),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn later_events_win_per_code() {
        let spec = CatalogSpec::load().unwrap();
        let e1 = event(1, &["A", "B", "C"], &[]);
        let e2 = event(2, &["B"], &["A"]);
        let e3 = event(3, &["A"], &["C"]);
        let net = NetChange::of(&spec, &[&e1, &e2, &e3]);
        assert_eq!(net.removals, vec!["C".to_string()]);
        let names: Vec<(Cell, Cell)> = net
            .upserts
            .iter()
            .map(|r| (r[1].clone(), r.last().unwrap().clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                (Cell::Text("A r3".into()), Cell::Int(3)),
                (Cell::Text("B r2".into()), Cell::Int(2))
            ]
        );
    }
}
