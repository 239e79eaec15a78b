//! The net effect of consecutive catalog events of one brand: per fabric code the highest
//! revision wins (a later event at the same revision too), so a batch is written as one
//! multi-row upsert and one delete, and an event older than what a code already holds changes
//! nothing, whatever order it arrives in.

use std::collections::BTreeMap;

use apache_avro::types::Value;

use super::spec::{field, CatalogSpec, Cell};

/// Rows to upsert (cells in `spec.columns` order, then the revision) and codes to delete (with
/// the revision that removed them).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NetChange {
    pub upserts: Vec<Vec<Cell>>,
    pub removals: Vec<(String, i64)>,
}

impl NetChange {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }

    /// Every code the change touches.
    pub fn codes(&self, spec: &CatalogSpec) -> Vec<String> {
        let key = spec.key_index();
        let mut codes: Vec<String> = self
            .upserts
            .iter()
            .filter_map(|r| match &r[key] {
                Cell::Text(c) => Some(c.clone()),
                _ => None,
            })
            .chain(self.removals.iter().map(|(c, _)| c.clone()))
            .collect();
        codes.sort_unstable();
        codes
    }

    /// Drops the codes whose stored revision (row or removal) is newer than the change's.
    pub fn without_stale(
        self,
        spec: &CatalogSpec,
        stored: &std::collections::HashMap<String, i64>,
    ) -> (NetChange, usize) {
        let key = spec.key_index();
        let newer = |code: &str, revision: i64| stored.get(code).is_some_and(|s| *s > revision);
        let before = self.upserts.len() + self.removals.len();
        let upserts: Vec<Vec<Cell>> = self
            .upserts
            .into_iter()
            .filter(|r| match (&r[key], r.last()) {
                (Cell::Text(code), Some(Cell::Int(rev))) => !newer(code, *rev),
                _ => true,
            })
            .collect();
        let removals: Vec<(String, i64)> = self
            .removals
            .into_iter()
            .filter(|(code, rev)| !newer(code, *rev))
            .collect();
        let kept = upserts.len() + removals.len();
        (NetChange { upserts, removals }, before - kept)
    }

    /// Folds `events` (BrandCatalogUpdated records, in log order).
    pub fn of(spec: &CatalogSpec, events: &[&Value]) -> NetChange {
        let key_index = spec.key_index();
        // BTreeMap: a deterministic statement order, so concurrent writers lock rows in the same order.
        let mut net: BTreeMap<String, (i64, Option<Vec<Cell>>)> = BTreeMap::new();
        let mut put = |code: &str, revision: i64, row: Option<Vec<Cell>>| match net.get(code) {
            Some((held, _)) if *held > revision => {}
            _ => {
                net.insert(code.to_owned(), (revision, row));
            }
        };
        for event in events {
            let revision = match field(event, &spec.revision_field).map(Cell::from_avro) {
                Some(Cell::Int(r)) => r,
                _ => 0,
            };
            if let Some(Value::Array(items)) = field(event, &spec.upserts_field) {
                for item in items {
                    let mut row: Vec<Cell> = spec
                        .columns
                        .iter()
                        .map(|c| field(item, c).map(Cell::from_avro).unwrap_or(Cell::Null))
                        .collect();
                    row.push(Cell::Int(revision));
                    if let Cell::Text(code) = row[key_index].clone() {
                        put(&code, revision, Some(row));
                    }
                }
            }
            if let Some(Value::Array(codes)) = field(event, &spec.removals_field) {
                for code in codes {
                    if let Value::String(code) = code {
                        put(code, revision, None);
                    }
                }
            }
        }
        let mut change = NetChange::default();
        for (code, (revision, row)) in net {
            match row {
                Some(row) => change.upserts.push(row),
                None => change.removals.push((code, revision)),
            }
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::events::json::record_from_json;
    use crate::log::events::EventKind;
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
        assert_eq!(net.removals, vec![("C".to_string(), 3)]);
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

    #[test]
    fn an_older_revision_never_wins_whatever_its_place_in_the_log() {
        let spec = CatalogSpec::load().unwrap();
        let new = event(5, &["A"], &["B"]);
        let old = event(3, &["B"], &["A"]);
        let net = NetChange::of(&spec, &[&new, &old]);
        assert_eq!(net.removals, vec![("B".to_string(), 5)]);
        assert_eq!(net.upserts.len(), 1);
        assert_eq!(net.upserts[0][1], Cell::Text("A r5".into()));

        // Against stored state: a code held at revision 7 keeps it.
        let stored = std::collections::HashMap::from([("A".to_string(), 7), ("B".to_string(), 5)]);
        let (kept, dropped) = net.without_stale(&spec, &stored);
        assert_eq!(dropped, 1);
        assert!(kept.upserts.is_empty());
        assert_eq!(kept.removals, vec![("B".to_string(), 5)]);
    }
}
