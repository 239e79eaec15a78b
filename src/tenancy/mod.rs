//! Tenancy lifecycle: the tenants table (`{ns}_platform.tenants`), migrations per database
//! kind, the provisioner (one organisation at a time, or many new ones as one unit:
//! [`onboarding`]), termination/restore/purge, the lifecycle watermark projectors wait on,
//! and the outcome events on `{ns}.tenancy`. [`clock`] says which time a lifecycle decision
//! trusts; [`rollout`] brings existing tenant databases up to the latest migration.

pub mod clock;
pub mod lifecycle;
pub mod migrations;
pub mod onboarding;
pub mod outcomes;
mod processor;
pub mod provisioning;
pub mod purge;
pub mod rollout;
pub mod verdict;
pub mod watermark;
