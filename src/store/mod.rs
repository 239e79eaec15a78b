//! The stores: the MySQL servers and their pools, named locks, what each database's catalog
//! says, the effectively-once bookkeeping every tenant database keeps, and the platform's
//! tenants table.
//!
//! - [`servers`]: the servers tenant databases live on, one pool each, and placement.
//! - [`pools`]: pool settings, statement limits by server flavour, DDL connections.
//! - [`locks`]: named locks, one tenant's work serialised across workers.
//! - [`schema`]: databases and tables that exist; shared SQL pieces.
//! - [`offsets`], [`applied`]: `projection_offsets` and `applied_events` in each tenant database
//!   (by offset, and by event id).
//! - [`tenants`]: `{ns}_platform.tenants` and the lifecycle log beside it.
//! - [`usage`]: each tenant database's size and recent events (`tenancy tenants top`).

pub mod applied;
pub mod locks;
pub mod offsets;
pub mod pools;
pub mod schema;
pub mod servers;
pub mod tenants;
pub mod usage;
