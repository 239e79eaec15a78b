//! Whether an event about one tenant can apply now, by the tenant's lifecycle: shared by the
//! projectors (catalog, domains), so every projection judges a tenant the same way.

use std::collections::HashMap;

use super::tenants::{Status, TenantRef};
use crate::stream::{Gate, SkipReason, Wait};
use crate::tenant::OrganisationType;

/// One tenant's verdict for an event that happened at `occurred_at` and names it in `field`:
/// wait for a tenant not active yet, refuse the wrong kind of tenant, skip an archived period,
/// and address an event from before a termination at the archive.
pub fn verdict(
    tenants: &HashMap<String, TenantRef>,
    id: &str,
    field: &str,
    expected: OrganisationType,
    occurred_at: i64,
) -> Gate<TenantRef> {
    let Some(t) = tenants.get(id) else {
        return Gate::Hold(Wait::Tenant(id.to_owned()));
    };
    if t.kind != expected {
        return Gate::Reject(format!(
            "{field} {id} names a {} tenant, not a {expected}",
            t.kind
        ));
    }
    if t.changing {
        return Gate::Hold(Wait::Changing(id.to_owned()));
    }
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
