//! Brand catalogs and the local copies suppliers keep of the brands they may read: the catalog
//! processor over `{ns}.brand-catalog` and `{ns}.brand-access` (group `{ns}.catalog`).
//!
//! - [`spec`]: the declared projection (`projections/brand_catalog.json`).
//! - [`item`]: what an event asks of the projection, and its order key.
//! - [`gate`]: whether it can be applied now, and to which databases.
//! - [`change`]: the net effect of a run of BrandCatalogUpdated events.
//! - [`store`]: the SQL that writes it to a brand DB and to supplier copies.
//! - [`shadow`]: what a replay knows of the brand database it alone writes.
//! - `apply`: catalog events into the brand, then the fan-out to supplier copies.
//! - `grants`: grants and revokes, and the permission cache written from the database.
//! - [`copies`]: whole-copy work for the lifecycle (restore refresh, purge removal).
//!
//! The consumer loop itself (batching, holding, retries, dead letters, offsets, rebalances) is
//! [`crate::stream`].

pub(crate) mod access;
pub(crate) mod apply;
pub mod change;
pub mod copies;
pub mod gate;
pub mod item;
pub mod shadow;
pub mod spec;
pub mod store;

use sqlx::MySqlPool;

use crate::cache::permissions::PermissionCache;
use crate::cache::Redis;
use crate::log::events::Event;
use crate::store::servers::{Server, Servers};
use crate::store::tenants::Tenants;
use crate::stream::{Failed, Gate, Msg, Origin, Processor, StepError};
use crate::tenancy::clock::EventTime;
use crate::tenancy::watermark::Watermark;
use crate::tenant::{DatabaseName, Namespace, ServiceDatabase};

pub use copies::CatalogHooks;
use gate::Target;
use item::{Change, Item};
use spec::CatalogSpec;

pub struct CatalogProcessor {
    pub ns: Namespace,
    pub spec: CatalogSpec,
    /// Also the router: `tenants.servers()`.
    pub tenants: Tenants,
    pub cache: PermissionCache,
    /// For the brand's catalog version (`caches::catalog_version_key`).
    pub redis: Redis,
    pub watermark: Watermark,
    /// Skip events applied before at another offset (by `event_id`); off only to measure
    /// what the id records cost (`tenancy bench catalog`).
    pub dedupe: bool,
}

impl CatalogProcessor {
    /// The home server's pool: locks and `{ns}_platform`.
    fn home(&self) -> &MySqlPool {
        self.tenants.servers().home().pool()
    }

    fn platform(&self) -> DatabaseName {
        self.ns.service_database(ServiceDatabase::Platform)
    }
}

impl Processor for CatalogProcessor {
    type Item = Item;
    type Target = Target;

    fn name(&self) -> &'static str {
        "catalog"
    }

    fn parse(&self, event: Event, _origin: &Origin) -> Result<Item, String> {
        item::parse(event)
    }

    fn order_key(&self, item: &Item) -> String {
        item.order_key()
    }

    fn servers(&self) -> Option<&Servers> {
        Some(self.tenants.servers())
    }

    /// The brand's server, and for an access event the supplier's.
    fn target_servers<'t>(&self, target: &'t Target) -> Vec<&'t Server> {
        std::iter::once(&target.brand.server)
            .chain(target.supplier.as_ref().map(|s| &s.server))
            .collect()
    }

    /// One read of the lifecycle log's ends, one of the watermark and one of the tenants table
    /// for the whole set.
    async fn gate(&self, msgs: &[&Msg<Item>]) -> Result<Vec<Gate<Target>>, StepError> {
        // The ends first: read after every event here arrived.
        let ends = self.watermark.ends().await?;
        let applied = self.watermark.applied().await?;
        let lifecycle = gate::Lifecycle {
            ends: &ends,
            applied: &applied,
        };
        let mut ids: Vec<&str> = msgs
            .iter()
            .flat_map(|m| std::iter::once(m.item.brand.as_str()).chain(m.item.supplier()))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let tenants = self.tenants.lookup(&ids).await?;
        Ok(msgs
            .iter()
            .map(|m| {
                let at = EventTime::new(m.item.occurred_at, m.logged_at_ms()).placed("catalog");
                gate::gate(&m.item, m.received_at_ms, at, &lifecycle, &tenants)
            })
            .collect())
    }

    async fn apply(&self, run: &[(&Msg<Item>, &Target)]) -> Result<(), Failed> {
        if matches!(run[0].0.item.change, Change::Catalog(_)) {
            // One brand key holds catalog events only; they go together, all or nothing, per
            // target database (live, or the archive for events before a termination).
            let mut start = 0;
            while start < run.len() {
                let db = &run[start].1.brand.database;
                let end = start
                    + run[start..]
                        .iter()
                        .take_while(|(_, t)| &t.brand.database == db)
                        .count();
                self.apply_catalog(&run[start..end])
                    .await
                    .map_err(|e| Failed::at(start, e))?;
                start = end;
            }
            return Ok(());
        }
        for (i, (m, target)) in run.iter().enumerate() {
            self.apply_access(m, target)
                .await
                .map_err(|e| Failed::at(i, e))?;
        }
        Ok(())
    }
}
