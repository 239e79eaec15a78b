//! Whether an event about one tenant can apply now, by the tenant's lifecycle: shared by the
//! projectors (catalog, domains), so every projection judges a tenant the same way.

use std::collections::HashMap;

use crate::store::tenants::{Status, TenantRef};
use crate::stream::{Gate, SkipReason, Wait};
use crate::tenant::OrganisationType;

/// Why the tenant `id` names in `field` cannot be judged by its status yet: it does not exist,
/// is not of the `expected` kind, is in the middle of a termination or restore, or its database
/// is not at the migration this binary writes for (behind, or its migration failed). `None`
/// when it can.
fn unsettled(
    tenants: &HashMap<String, TenantRef>,
    id: &str,
    field: &str,
    expected: OrganisationType,
) -> Option<Gate<TenantRef>> {
    let Some(t) = tenants.get(id) else {
        return Some(Gate::Hold(Wait::Tenant(id.to_owned())));
    };
    if t.kind != expected {
        return Some(Gate::Reject(format!(
            "{field} {id} names a {} tenant, not a {expected}",
            t.kind
        )));
    }
    if t.changing {
        return Some(Gate::Hold(Wait::Changing(id.to_owned())));
    }
    behind(t).then(|| Gate::Hold(Wait::Schema(id.to_owned())))
}

/// Whether a live or archived tenant's database is behind the latest migration of its kind
/// this binary knows (a database ahead, migrated by a newer worker, is not), or its last
/// migration failed.
fn behind(t: &TenantRef) -> bool {
    let latest = super::migrations::latest_version(super::migrations::for_tenant(t.kind));
    matches!(t.status, Status::Active | Status::Archived)
        && (t.migration_failed || t.migration_version.is_some_and(|v| v < latest))
}

/// One tenant's verdict for an event placed at `occurred_at` (by [`super::clock`]) that names it
/// in `field`: wait for a tenant not active yet, refuse the wrong kind of tenant, skip an
/// archived period, and address an event from before a termination at the archive.
pub fn verdict(
    tenants: &HashMap<String, TenantRef>,
    id: &str,
    field: &str,
    expected: OrganisationType,
    occurred_at: i64,
) -> Gate<TenantRef> {
    if let Some(gate) = unsettled(tenants, id, field, expected) {
        return gate;
    }
    let t = &tenants[id];
    let skip = || Gate::Skip {
        reason: SkipReason::Terminated,
        tenant: Some(id.to_owned()),
    };
    if t.was_archived_at(occurred_at) {
        return skip();
    }
    match t.status {
        Status::Active => Gate::Ready(t.clone()),
        Status::Provisioning => Gate::Hold(Wait::Tenant(id.to_owned())),
        // Before the termination it still belongs in the (archived) data: a replay, or a late
        // delivery, must end as the live run did.
        Status::Archived if t.archived_at.is_some_and(|a| occurred_at < a) => {
            match t.at_archive() {
                Some(archived) => Gate::Ready(archived),
                None => Gate::Reject(format!("tenant {id} has no archive database")),
            }
        }
        Status::Archived | Status::Purged => skip(),
        Status::Failed => Gate::Reject(format!(
            "tenant {id} failed provisioning; replay this event once it is fixed"
        )),
    }
}

/// A revoke's verdict on one of its tenants: as [`verdict`], except that an archived tenant
/// takes the revoke in its archive whenever it happened, and an earlier archived period does not
/// pass it by. A revoke always wins: what was revoked while either side was archived stays
/// revoked after the restore (the restore rebuilds copies and cache keys from what the archive
/// and the platform's index say), live and in a replay alike. Only a purge ends it: nothing is
/// left to revoke.
pub fn revoke_verdict(
    tenants: &HashMap<String, TenantRef>,
    id: &str,
    field: &str,
    expected: OrganisationType,
) -> Gate<TenantRef> {
    if let Some(gate) = unsettled(tenants, id, field, expected) {
        return gate;
    }
    let t = &tenants[id];
    match t.status {
        Status::Active => Gate::Ready(t.clone()),
        Status::Provisioning => Gate::Hold(Wait::Tenant(id.to_owned())),
        Status::Archived => match t.at_archive() {
            Some(archived) => Gate::Ready(archived),
            None => Gate::Reject(format!("tenant {id} has no archive database")),
        },
        Status::Purged => Gate::Skip {
            reason: SkipReason::Terminated,
            tenant: Some(id.to_owned()),
        },
        Status::Failed => Gate::Reject(format!(
            "tenant {id} failed provisioning; replay this event once it is fixed"
        )),
    }
}
