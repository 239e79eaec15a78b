//! Logs: tracing, structured fields, to stderr so stdout stays for command output. (Metrics
//! and health are served by `stream::health`.)

use tracing_subscriber::EnvFilter;

/// Logs at `info` unless `RUST_LOG` says otherwise; librdkafka and sqlx chatter kept at warn.
pub fn init() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,rdkafka=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
