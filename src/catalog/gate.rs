//! Whether a catalog or access event can be applied now, and where.
//!
//! Checked before any SQL: the lifecycle log was applied as far as it stood when the event
//! arrived (see `tenancy::watermark`); `brand_id` names a BRAND and `supplier_id` a SUPPLIER
//! (otherwise the event is dead-lettered with the reason, never retried); neither tenant is in
//! the middle of a termination or restore. Then the tenant's lifecycle decides by the event's
//! time: before a termination it still belongs in the (archived) data, inside an archived period
//! or after a purge it is skipped, a tenant not active yet is waited for.

use std::collections::HashMap;

use super::item::{Change, Item};
use crate::store::tenants::TenantRef;
use crate::stream::{Gate, Wait};
use crate::tenancy::verdict::{revoke_verdict, verdict};
use crate::tenancy::watermark::{settled, LogEnds};
use crate::tenant::OrganisationType;

/// Where a ready event is applied: the brand (and for access events the supplier), each
/// addressed at its live database or, for an event that predates its termination, its archive.
#[derive(Debug, Clone)]
pub struct Target {
    pub brand: TenantRef,
    pub supplier: Option<TenantRef>,
}

/// The lifecycle log as far as it matters: its ends when read, and what the provisioner has
/// applied of it.
pub struct Lifecycle<'a> {
    pub ends: &'a LogEnds,
    pub applied: &'a HashMap<i32, i64>,
}

/// Each tenant's own verdict on an event, by its lifecycle at the event's time `at` (as
/// [`crate::tenancy::clock`] places it): the brand's, and for an access event the supplier's; a
/// revoke as [`revoke_verdict`] judges it. (`tenancy rebuild` of a supplier asks it too.)
pub fn verdicts(
    item: &Item,
    at: i64,
    tenants: &HashMap<String, TenantRef>,
) -> (Gate<TenantRef>, Option<Gate<TenantRef>>) {
    let revoke = matches!(item.change, Change::Revoke { .. });
    let one = |id: &str, field: &str, kind: OrganisationType| {
        if revoke {
            revoke_verdict(tenants, id, field, kind)
        } else {
            verdict(tenants, id, field, kind, at)
        }
    };
    let brand = one(&item.brand, "brand_id", OrganisationType::Brand);
    let supplier = item
        .supplier()
        .map(|s| one(s, "supplier_id", OrganisationType::Supplier));
    (brand, supplier)
}

/// The verdict on one event (received at `received_at`, placed at `at`, epoch ms), given the
/// lifecycle log and the tenants table. A rejection beats a skip, which beats a hold: an event
/// that can never apply is not kept.
pub fn gate(
    item: &Item,
    received_at: i64,
    at: i64,
    lifecycle: &Lifecycle<'_>,
    tenants: &HashMap<String, TenantRef>,
) -> Gate<Target> {
    if !lifecycle
        .ends
        .late_enough_for(item.occurred_at, received_at)
        || !settled(lifecycle.applied, lifecycle.ends)
    {
        return Gate::Hold(Wait::Lifecycle);
    }
    let (brand, supplier) = verdicts(item, at, tenants);
    let verdicts = std::iter::once(&brand).chain(supplier.as_ref());
    let mut hold = None;
    for v in verdicts {
        match v {
            Gate::Reject(reason) => return Gate::Reject(reason.clone()),
            Gate::Hold(w) if hold.is_none() => hold = Some(w.clone()),
            _ => {}
        }
    }
    let all = std::iter::once(&brand).chain(supplier.as_ref());
    for v in all {
        if let Gate::Skip { reason, tenant } = v {
            return Gate::Skip {
                reason: *reason,
                tenant: tenant.clone(),
            };
        }
    }
    if let Some(w) = hold {
        return Gate::Hold(w);
    }
    match (brand, supplier) {
        (Gate::Ready(b), None) => Gate::Ready(Target {
            brand: b,
            supplier: None,
        }),
        (Gate::Ready(b), Some(Gate::Ready(s))) => Gate::Ready(Target {
            brand: b,
            supplier: Some(s),
        }),
        _ => unreachable!("every other verdict returned above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::item::Change;
    use crate::store::tenants::Status;

    fn tenant(id: &str, kind: OrganisationType, status: Status) -> TenantRef {
        TenantRef {
            organisation_id: id.into(),
            kind,
            status,
            database: None,
            server: crate::store::servers::Server::unreached("home"),
            archived_at: Some(100),
            archive_database: None,
            past_archives: vec![(10, 20)],
            changing: false,
            migration_version: None,
            migration_failed: false,
            region: None,
        }
    }

    fn grant(at: i64) -> Item {
        Item {
            event_id: "e".into(),
            brand: "b".into(),
            occurred_at: at,
            change: Change::Grant {
                supplier: "s".into(),
                permissions: vec![],
            },
        }
    }

    const ENDS: LogEnds = LogEnds {
        ends: Vec::new(),
        read_at_ms: 1_000_000,
    };

    fn verdict(
        item: &Item,
        applied: &HashMap<i32, i64>,
        tenants: &HashMap<String, TenantRef>,
    ) -> Gate<Target> {
        let ends = LogEnds {
            ends: vec![(0, 3)],
            ..ENDS
        };
        gate(
            item,
            0,
            item.occurred_at,
            &Lifecycle {
                ends: &ends,
                applied,
            },
            tenants,
        )
    }

    #[test]
    fn a_tenant_behind_its_migrations_is_waited_for_and_only_it() {
        let applied = HashMap::from([(0, 2)]);
        let mut tenants = HashMap::from([
            (
                "b".to_string(),
                tenant("b", OrganisationType::Brand, Status::Active),
            ),
            (
                "s".to_string(),
                tenant("s", OrganisationType::Supplier, Status::Active),
            ),
        ]);
        assert!(matches!(
            verdict(&grant(50), &applied, &tenants),
            Gate::Ready(_)
        ));
        tenants.get_mut("s").unwrap().migration_failed = true;
        assert!(
            matches!(verdict(&grant(50), &applied, &tenants), Gate::Hold(Wait::Schema(t)) if t == "s")
        );
        tenants.get_mut("s").unwrap().migration_failed = false;
        // One migration behind the brand migrations this binary knows.
        let latest = crate::tenancy::migrations::latest_version(
            crate::tenancy::migrations::for_tenant(OrganisationType::Brand),
        );
        tenants.get_mut("b").unwrap().migration_version = Some(latest - 1);
        assert!(
            matches!(verdict(&grant(50), &applied, &tenants), Gate::Hold(Wait::Schema(t)) if t == "b")
        );
        // Ahead (a newer worker migrated it): applied.
        tenants.get_mut("b").unwrap().migration_version = Some(latest + 1);
        assert!(matches!(
            verdict(&grant(50), &applied, &tenants),
            Gate::Ready(_)
        ));
    }

    #[test]
    fn wrong_kinds_are_rejected_before_any_sql_and_missing_tenants_are_waited_for() {
        let applied = HashMap::from([(0, 2)]);
        let mut tenants = HashMap::from([
            (
                "b".to_string(),
                tenant("b", OrganisationType::Brand, Status::Active),
            ),
            (
                "s".to_string(),
                tenant("s", OrganisationType::Retailer, Status::Active),
            ),
        ]);
        match verdict(&grant(50), &applied, &tenants) {
            Gate::Reject(r) => assert!(r.contains("supplier_id s names a RETAILER"), "{r}"),
            other => panic!("{other:?}"),
        }
        tenants.remove("s");
        assert!(
            matches!(verdict(&grant(50), &applied, &tenants), Gate::Hold(Wait::Tenant(t)) if t == "s")
        );
        // The lifecycle log not applied as far as it stood: wait, whatever the table says.
        assert!(matches!(
            verdict(&grant(50), &HashMap::from([(0, 1)]), &tenants),
            Gate::Hold(Wait::Lifecycle)
        ));
        // Ends read within the skew of the event: it waits, whatever they say.
        let fresh = LogEnds {
            ends: vec![],
            read_at_ms: 50,
        };
        assert!(matches!(
            gate(
                &grant(50),
                60,
                50,
                &Lifecycle {
                    ends: &fresh,
                    applied: &applied
                },
                &tenants
            ),
            Gate::Hold(Wait::Lifecycle)
        ));
    }

    #[test]
    fn the_lifecycle_decides_by_event_time() {
        let applied = HashMap::from([(0, 2)]);
        let mut brand = tenant("b", OrganisationType::Brand, Status::Archived);
        brand.archive_database = crate::tenant::Namespace::parse("ns")
            .unwrap()
            .archive_database("6f1c4b1e-8a43-4c55-9b51-0d8e3f2a9c17");
        let supplier = tenant("s", OrganisationType::Supplier, Status::Active);
        let tenants = HashMap::from([("b".to_string(), brand), ("s".to_string(), supplier)]);
        // Before the termination (100): applied to the archive.
        match verdict(&grant(50), &applied, &tenants) {
            Gate::Ready(t) => assert!(t.brand.database.unwrap().as_str().starts_with("ns_arc_")),
            other => panic!("{other:?}"),
        }
        // After it, or inside an earlier archived period: skipped.
        assert!(matches!(
            verdict(&grant(150), &applied, &tenants),
            Gate::Skip { .. }
        ));
        assert!(matches!(
            verdict(&grant(15), &applied, &tenants),
            Gate::Skip { .. }
        ));
    }

    #[test]
    fn a_revoke_reaches_an_archived_side_at_its_archive_whenever_it_happened() {
        let applied = HashMap::from([(0, 2)]);
        let mut supplier = tenant("s", OrganisationType::Supplier, Status::Archived);
        supplier.archive_database = crate::tenant::Namespace::parse("ns")
            .unwrap()
            .archive_database("6f1c4b1e-8a43-4c55-9b51-0d8e3f2a9c17");
        let brand = tenant("b", OrganisationType::Brand, Status::Active);
        let tenants = HashMap::from([("b".to_string(), brand), ("s".to_string(), supplier)]);
        let revoke = |at: i64| Item {
            event_id: "r".into(),
            brand: "b".into(),
            occurred_at: at,
            change: Change::Revoke {
                supplier: "s".into(),
            },
        };
        // After the supplier's termination (100), and inside an earlier archived period.
        for at in [150, 15] {
            match verdict(&revoke(at), &applied, &tenants) {
                Gate::Ready(t) => {
                    let s = t.supplier.expect("a supplier target");
                    assert!(s.database.unwrap().as_str().starts_with("ns_arc_"));
                }
                other => panic!("revoke at {at}: {other:?}"),
            }
        }
        // A grant then is passed by, as before.
        assert!(matches!(
            verdict(&grant(150), &applied, &tenants),
            Gate::Skip { .. }
        ));
    }
}
