//! The `tenancy` binary: parses the command line and hands over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = blindstrader_tenancy::cli::Cli::parse();
    blindstrader_tenancy::telemetry::init();
    match blindstrader_tenancy::cli::dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
