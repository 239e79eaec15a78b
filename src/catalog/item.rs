//! What the catalog processor reads from an event on `{ns}.brand-catalog` or `{ns}.brand-access`.

use apache_avro::types::Value;

use super::spec::{field, Cell};
use crate::log::events::{Event, EventKind};

/// What an event asks of the projection.
#[derive(Debug, Clone)]
pub enum Change {
    Catalog(Value),
    Grant {
        supplier: String,
        permissions: Vec<String>,
    },
    Revoke {
        supplier: String,
    },
}

/// One catalog or access event, parsed.
#[derive(Debug, Clone)]
pub struct Item {
    /// The event's own id: an event applied once is skipped if it comes again at another
    /// offset.
    pub event_id: String,
    /// The brand's organisation id (canonical uuid text).
    pub brand: String,
    /// The event's occurred_at (epoch ms): where it falls in the tenants' lifecycles.
    pub occurred_at: i64,
    pub change: Change,
}

impl Item {
    pub fn supplier(&self) -> Option<&str> {
        match &self.change {
            Change::Grant { supplier, .. } | Change::Revoke { supplier } => Some(supplier),
            Change::Catalog(_) => None,
        }
    }

    /// Catalog events of a brand apply in order; access events in order per (brand, supplier),
    /// so a grant waiting for a supplier that does not exist yet never holds up the brand's own
    /// catalog or its grants to other suppliers.
    pub fn order_key(&self) -> String {
        match self.supplier() {
            None => self.brand.clone(),
            Some(s) => format!("{}/{s}", self.brand),
        }
    }
}

/// Reads what the projection needs from a decoded event; `Err` is the dead-letter reason.
pub fn parse(event: Event) -> Result<Item, String> {
    let Event::Other { kind, value } = event else {
        return Err(format!(
            "{} does not belong on the catalog topics",
            event.kind().name()
        ));
    };
    let text = |name: &str| match field(&value, name).map(Cell::from_avro) {
        Some(Cell::Text(s)) => Ok(s),
        _ => Err(format!("{} has no text field {name}", kind.name())),
    };
    // Ids key the tenants table and Redis: a foreign producer's malformed id is refused here
    // rather than held waiting for a tenant that cannot exist.
    let id = |name: &str| {
        let raw = text(name)?;
        uuid::Uuid::parse_str(&raw)
            .map(|u| u.hyphenated().to_string())
            .map_err(|e| format!("{} field {name}: {raw:?} is not a uuid: {e}", kind.name()))
    };
    let brand = id("brand_id")?;
    let event_id = id("event_id")?;
    let occurred_at = match field(&value, "occurred_at").map(Cell::from_avro) {
        Some(Cell::Int(t)) => t,
        _ => 0,
    };
    let change = match kind {
        EventKind::BrandCatalogUpdated => Change::Catalog(value),
        EventKind::SupplierBrandAccessGranted => {
            let permissions = match field(&value, "permissions") {
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(|v| match v {
                        Value::String(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let supplier = id("supplier_id")?;
            if supplier == brand {
                return Err(format!(
                    "{} grants brand {brand} access to itself",
                    kind.name()
                ));
            }
            Change::Grant {
                supplier,
                permissions,
            }
        }
        EventKind::SupplierBrandAccessRevoked => Change::Revoke {
            supplier: id("supplier_id")?,
        },
        other => {
            return Err(format!(
                "{} does not belong on the catalog topics",
                other.name()
            ))
        }
    };
    Ok(Item {
        event_id,
        brand,
        occurred_at,
        change,
    })
}
