//! `tenancy access` (being written).

use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// May SUPPLIER_ID read BRAND_ID, and with which permissions? Exit 0 if allowed, 1 if not.
    Check { supplier_id: String, brand_id: String },
}

pub async fn run(_config: Config, _command: AccessCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("tenancy access is not implemented yet")
}
