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
//! - [`topics`], [`kafka`]: topic names and creation, producer and consumer settings.
//! - [`processor`]: the consume → apply → store-offset loop; [`dead_letter`] for poison events.
//! - [`catalog`]: brand catalogs and supplier copies (the catalog processor).
//! - [`offsets`]: `projection_offsets`, the effectively-once bookkeeping in each tenant DB.
//! - [`access`]: supplier → brand permissions and the Redis permission cache.
//! - [`tenancy`]: the tenant registry, migrations, the provisioner and its outcome events.
//! - [`registry`]: a Confluent-compatible schema registry subset (`tenancy registry`).
//! - [`emit`]: JSON lines → events (`tenancy emit`).
//! - [`bench`]: the catalog benchmark against a raw MySQL baseline (`tenancy bench catalog`).
//! - [`cli`]: the `tenancy` subcommands; [`config`] and [`telemetry`] for start-up.

pub mod access;
pub mod bench;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod dead_letter;
pub mod emit;
pub mod events;
pub mod kafka;
pub mod offsets;
pub mod processor;
pub mod registry;
pub mod telemetry;
pub mod tenancy;
pub mod tenant;
pub mod topics;
pub mod wire;
