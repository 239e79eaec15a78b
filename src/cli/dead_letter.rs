//! `tenancy dead-letter` (being written).

use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List dead-lettered events with their reason and origin.
    List,
}

pub async fn run(_config: Config, _command: DeadLetterCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("tenancy dead-letter is not implemented yet")
}
