//! The `tenancy` binary: parses the command line and hands over to the library.

use clap::Parser;

/// glibc's allocator was a third of a rebuild's replay CPU (malloc, free and their
/// consolidation, on the task that feeds MySQL); with mimalloc it is under a tenth, and the
/// wide catalog benchmark's peak RSS fell from 235 to 119 MiB. Every command and worker uses it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
