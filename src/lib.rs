//! blindstrader-tenancy: the event-sourced, database-per-tenant core of Blindstrader.
//!
//! Every tenant change is an Avro event in Kafka; stream processors materialise them into one
//! MySQL database per tenant. Kafka is the only source of truth: databases and caches are
//! projections that can be dropped and rebuilt by replaying the topics. The architecture, the
//! names producers and operators rely on, and what each guarantee rests on are in
//! `docs/architecture.md`.
//!
//! # Layout
//!
//! From the bottom up; a module uses only those above it in this list (no import circles):
//!
//! - [`tenant`]: slugs, organisation types, namespaces and the database names built from them.
//! - [`config`]: configuration, resolved once at start-up (flags > environment > defaults).
//! - [`log`]: the events and their wire format, the topics, Kafka clients, `tenancy emit`, the
//!   dead-letter topic.
//! - [`failure`]: how a step failed, classified once (outage, retry, reject).
//! - [`store`]: the MySQL servers and pools, named locks, catalog queries, the bookkeeping in
//!   every tenant database (offsets, applied event ids), the platform's tenants table.
//! - [`cache`]: the Redis caches (permissions, domains, catalog versions).
//! - [`stream`]: the one consumer loop every processor runs: lanes per tenant, holding,
//!   retries, dead letters, offsets, health.
//! - The processors: [`tenancy`] (provisioning, migrations, termination, restore, purge, the
//!   lifecycle watermark and clock), [`catalog`] (brand catalogs, supplier copies and the
//!   access projection), [`domains`] (retailers' custom hosts).
//! - [`worker`]: one worker's processors, built one way; [`status`]: what workers report.
//! - [`backup`]: per-tenant snapshots that know their place in the log: the format, taking one,
//!   loading one into a database.
//! - [`rebuild`]: a tenant's database rebuilt from the topics beside the live one, compared and
//!   swapped in online, or moved to another server.
//! - [`serve`]: the HTTP API (`tenancy serve`).
//! - [`bench`]: the benchmarks, each against a raw baseline in the same run.
//! - [`cli`]: the `tenancy` subcommands; [`telemetry`] for logging; [`fault`]: crash points for
//!   tests, compiled in only with the `fault-injection` feature.
//!
//! The schema registry (`tenancy registry`) is a crate of its own, `blindstrader-registry`
//! (`crates/registry`): it uses nothing of this one.

pub mod backup;
pub mod bench;
pub mod cache;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod domains;
pub mod failure;
pub mod fault;
pub mod log;
pub mod rebuild;

pub mod serve;
pub mod status;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod tenancy;
pub mod tenant;
pub mod worker;
