//! Per-tenant concurrency: at most `--tenant-concurrency` requests of one tenant hold a
//! database connection at once, so a tenant whose queries are slow (a held lock, a huge
//! catalog) queues behind itself instead of taking every connection of the shared pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct TenantLimits {
    per_tenant: usize,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl TenantLimits {
    pub fn new(per_tenant: usize) -> Self {
        TenantLimits {
            per_tenant: per_tenant.max(1),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for one of the tenant's slots (the request's timeout bounds the wait). One
    /// semaphore per tenant ever seen: a few bytes each, bounded by the tenants table.
    pub async fn enter(&self, organisation_id: &str) -> OwnedSemaphorePermit {
        let semaphore = {
            let mut slots = self.slots.lock().expect("no panics while holding the map");
            slots
                .entry(organisation_id.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_tenant)))
                .clone()
        };
        semaphore
            .acquire_owned()
            .await
            .expect("tenant semaphores are never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_tenant_queues_behind_itself_not_others() {
        let limits = TenantLimits::new(2);
        let _a1 = limits.enter("a").await;
        let _a2 = limits.enter("a").await;
        let third = tokio::time::timeout(Duration::from_millis(50), limits.enter("a")).await;
        assert!(third.is_err(), "a third request of tenant a must wait");
        let other = tokio::time::timeout(Duration::from_millis(50), limits.enter("b")).await;
        assert!(other.is_ok(), "tenant b is not held up by a");
        drop(_a1);
        let after = tokio::time::timeout(Duration::from_millis(50), limits.enter("a")).await;
        assert!(after.is_ok(), "a slot freed is taken");
    }
}
