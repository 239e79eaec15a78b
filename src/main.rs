//! The `tenancy` binary: parses the command line and hands over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = blindstrader_tenancy::cli::Cli::parse();
    if cli.command.is_one_shot() {
        // `tenancy status | head` ends quietly when head has read enough, as a shell tool
        // should, instead of panicking on the closed pipe. (The long-running commands keep
        // Rust's default: a write error, not a signal.)
        #[cfg(unix)]
        // SAFETY: called before any thread is spawned; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    blindstrader_tenancy::telemetry::init();
    match blindstrader_tenancy::cli::dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
