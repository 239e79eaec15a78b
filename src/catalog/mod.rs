//! Brand catalogs and the local copies suppliers keep of the brands they may read.
//!
//! - [`spec`]: the declared projection (`projections/brand_catalog.json`).
//! - [`change`]: the net effect of a run of BrandCatalogUpdated events.
//! - [`store`]: the SQL that writes it to a brand DB and to supplier copies.
//! - [`processor`]: the batch processor over `{ns}.brand-catalog` and `{ns}.brand-access`;
//!   `access` holds its handling of grants and revokes.

mod access;
pub mod change;
pub mod processor;
pub mod spec;
pub mod store;

pub use access::refresh_supplier_copies;
