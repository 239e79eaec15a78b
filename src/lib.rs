//! blindstrader-tenancy: the event-sourced, database-per-tenant core of Blindstrader.
//!
//! Every tenant change is an Avro event in Kafka; stream processors materialise them into one
//! MySQL database per tenant. Kafka is the only source of truth: databases and caches are
//! projections that can be dropped and rebuilt by replaying the topics. See `DESIGN.md` of the
//! project for the names this crate keeps to.
//!
//! # Layout
//!
//! - [`tenant`]: slugs, organisation types, namespaces and the database names built from them.
//! - [`events`]: the Avro events (schemas embedded from `schemas/`), typed views, JSON → Avro.
//! - [`wire`]: Confluent wire format over the schema registry.
//! - [`topics`], [`kafka`]: topic names and creation, producers and operator-side clients.
//! - [`stream`]: the one consumer loop every processor runs (assignment, batching, holding,
//!   error policy, dead letters, offsets, health); processors plug in as small handlers.
//! - [`tenancy`]: the tenants table, migrations, the provisioner, terminate/restore/purge, the
//!   lifecycle watermark and the outcome events.
//! - [`catalog`]: brand catalogs and supplier copies (the catalog processor).
//! - [`access`]: supplier → brand permissions and the Redis permission cache.
//! - [`domains`]: retailers' custom domains (the domains processor) and host validation.
//! - [`offsets`], [`applied`]: `projection_offsets` and `applied_events`, the effectively-once
//!   bookkeeping in each tenant DB (by offset, and by event id).
//! - [`servers`]: the MySQL servers (one pool each) and which one each tenant is placed on.
//! - [`db`], [`caches`]: pool settings, named locks and schema queries; the Redis connection
//!   and key layout.
//! - [`dead_letter`]: reading and replaying `{ns}.dead-letter`.
//! - [`rebuild`]: a tenant's database rebuilt from the topics beside the live one, compared and
//!   swapped in online (`tenancy rebuild`).
//! - [`status`]: what every worker reports, for `tenancy status`.
//! - [`worker`]: one worker's processors, built one way for `run`, benchmarks and tests.
//! - [`registry`]: a Confluent-compatible schema registry subset (`tenancy registry`).
//! - [`emit`]: JSON lines → events (`tenancy emit`).
//! - [`bench`]: the catalog benchmark against a raw MySQL baseline (`tenancy bench catalog`).
//! - [`cli`]: the `tenancy` subcommands; [`config`] and [`telemetry`] for start-up.
//!
//! `stream` knows no processor; `tenancy`, `catalog`, `access` and `domains` use `stream` and the events;
//! `rebuild`, `status`, `bench` and `cli` sit on top.

pub mod access;
pub mod applied;
pub mod bench;
pub mod caches;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod db;
pub mod dead_letter;
pub mod domains;
pub mod emit;
pub mod events;
pub mod kafka;
pub mod offsets;
pub mod rebuild;
pub mod registry;
pub mod serve;
pub mod servers;
pub mod status;
pub mod stream;
pub mod telemetry;
pub mod tenancy;
pub mod tenant;
pub mod topics;
pub mod wire;
pub mod worker;
