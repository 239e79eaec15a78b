//! `tenancy emit`: validate JSON lines, then produce them.

use std::io::{BufReader, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;
use crate::log::emit::{prepare_all, send_all};
use crate::log::wire::Codec;
use crate::log::{kafka, topics};

#[derive(Debug, clap::Args)]
pub struct EmitArgs {
    /// JSON-lines file; `-` or nothing reads standard input.
    pub file: Option<PathBuf>,
    /// Validate only; send nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn emit(config: Config, args: EmitArgs) -> anyhow::Result<ExitCode> {
    let prepared = match &args.file {
        Some(path) if path.as_os_str() != "-" => {
            let file = std::fs::File::open(path)
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
            prepare_all(BufReader::new(file))
        }
        _ => prepare_all(std::io::stdin().lock()),
    };
    let events = match prepared {
        Ok(events) => events,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{} bad line(s); nothing was sent", errors.len());
            return Ok(ExitCode::FAILURE);
        }
    };
    if args.dry_run {
        eprintln!("{} event(s) valid; dry run, nothing sent", events.len());
        return Ok(ExitCode::SUCCESS);
    }
    // First: the producer gets its id from the broker while the topics are checked.
    let producer = kafka::producer(&config)?;
    topics::ensure_topics(&config).await?;
    let codec = Codec::new(&config.schema_registry_url);
    let total = events.len();
    let progress = if std::io::stderr().is_terminal() && total > 1 {
        ProgressBar::new(total as u64).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} eta {eta}")
                .expect("valid template"),
        )
    } else {
        ProgressBar::hidden()
    };
    let mut stdout = std::io::stdout().lock();
    let ns = config.namespace.clone();
    send_all(
        events,
        |k| k.topic().name(&ns),
        &codec,
        &producer,
        |sent| {
            let _ = writeln!(
                stdout,
                "{}/{}/{}\t{}\t{}",
                sent.topic,
                sent.partition,
                sent.offset,
                sent.kind.name(),
                sent.key
            );
            progress.inc(1);
        },
    )
    .await?;
    progress.finish_and_clear();
    eprintln!("{total} event(s) sent");
    Ok(ExitCode::SUCCESS)
}
