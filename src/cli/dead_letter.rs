//! `tenancy dead-letter list|replay`: inspect poison events and send them back once fixed.

use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;
use crate::log::dead_letters::{
    replay_group, topic_replay_group, DeadLetter, DeadLetterLog, ReplayOptions, ReplayStep,
};
use crate::log::topics::Topic;

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List dead-lettered events with their reason and origin.
    ///
    /// Reads {ns}.dead-letter from the beginning of every partition up to the end it has when
    /// the command starts, then exits. One line per dead letter: its partition/offset, the
    /// topic/partition/offset it came from, tenant (message key), payload size, state and reason.
    /// State is `replayed` once `tenancy dead-letter replay` has sent it back, else `pending`; a
    /// dead letter that is itself a failed replay says which one (`replay-of P/O`).
    List {
        /// JSON lines instead of a table (fields: partition, offset, timestamp_ms, key,
        /// source_topic, source_partition, source_offset, tenant, reason, replayed_from,
        /// payload_bytes, replayed).
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to the topic and partition they came from.
    ///
    /// Each is re-produced with its original key, payload and headers (without the dlq.* ones)
    /// plus `dlq.replayed-from: P/O`, in dead-letter order, with the idempotent producer, to the
    /// partition it was read from, so a tenant's events stay in one partition. The processors then
    /// handle it again; they are idempotent. An event that is still poison is dead-lettered again.
    ///
    /// Each dead letter is replayed once: progress is committed in the consumer group
    /// {ns}.dead-letter-replay after the broker acknowledges each copy (with --source-topic T, in
    /// {ns}.dead-letter-replay.T). Prints one line per event sent: dead-letter partition/offset,
    /// then topic/partition/offset of the copy, tenant and reason. Concurrent replays of one
    /// namespace are not coordinated; run one at a time.
    Replay {
        /// Only dead letters from this topic: a full name, or a topic of the namespace by its
        /// suffix (e.g. `organisations`).
        #[arg(long, value_name = "TOPIC")]
        source_topic: Option<String>,
        /// Print what would be sent; send and record nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replay every dead letter, including those replayed before (recorded progress is
        /// ignored, never rewound).
        #[arg(long)]
        all: bool,
    },
}

pub async fn run(config: Config, command: DeadLetterCommand) -> anyhow::Result<ExitCode> {
    // rdkafka's consumer and commit calls block; keep them off the async workers.
    tokio::task::spawn_blocking(move || match command {
        DeadLetterCommand::List { json } => list(&config, json),
        DeadLetterCommand::Replay {
            source_topic,
            dry_run,
            all,
        } => {
            let source_topic = source_topic.map(|t| resolve_topic(&config, &t));
            replay(
                &config,
                &ReplayOptions {
                    source_topic,
                    dry_run,
                    all,
                },
            )
        }
    })
    .await?
}

/// `organisations` → `{ns}.organisations`; anything else is taken as a full topic name.
fn resolve_topic(config: &Config, name: &str) -> String {
    Topic::ALL
        .into_iter()
        .find(|t| t.suffix() == name)
        .map_or_else(|| name.to_owned(), |t| t.name(&config.namespace))
}

fn list(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let log = DeadLetterLog::open(config)?;
    let letters = log.list()?;
    let mut out = std::io::stdout().lock();
    if json {
        for l in &letters {
            writeln!(out, "{}", serde_json::to_string(l)?)?;
        }
    } else {
        writeln!(
            out,
            "{:<14} {:<48} {:<36} {:>8} {:<26} REASON",
            "DEAD-LETTER", "SOURCE", "TENANT", "BYTES", "STATE"
        )?;
        for l in &letters {
            writeln!(
                out,
                "{:<14} {:<48} {:<36} {:>8} {:<26} {}",
                l.position(),
                l.source(),
                l.tenant.as_deref().unwrap_or("-"),
                l.payload_bytes,
                state(l),
                one_line(l.reason.as_deref().unwrap_or("-")),
            )?;
        }
    }
    out.flush()?;
    let replayed = letters.iter().filter(|l| l.replayed).count();
    eprintln!(
        "{} dead letter(s) in {}, {replayed} replayed (group {})",
        letters.len(),
        log.topic(),
        replay_group(&config.namespace)
    );
    Ok(ExitCode::SUCCESS)
}

fn state(l: &DeadLetter) -> String {
    let base = if l.replayed { "replayed" } else { "pending" };
    match &l.replayed_from {
        Some(from) => format!("{base},replay-of:{from}"),
        None => base.to_owned(),
    }
}

/// Reasons may carry the decoder's multi-line messages; a table row stays one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn replay(config: &Config, options: &ReplayOptions) -> anyhow::Result<ExitCode> {
    let log = DeadLetterLog::open(config)?;
    let mut out = std::io::stdout().lock();
    let result = log.replay(options, |step| {
        let line = match step {
            ReplayStep::Sent {
                letter,
                topic,
                partition,
                offset,
            } => format!(
                "{}\t{topic}/{partition}/{offset}\t{}\t{}",
                letter.position(),
                letter.tenant.as_deref().unwrap_or("-"),
                one_line(letter.reason.as_deref().unwrap_or("-"))
            ),
            ReplayStep::WouldSend {
                letter,
                topic,
                partition,
            } => format!(
                "{}\t{topic}/{partition}/-\t{}\t{}",
                letter.position(),
                letter.tenant.as_deref().unwrap_or("-"),
                one_line(letter.reason.as_deref().unwrap_or("-"))
            ),
            ReplayStep::Unreplayable { letter, why } => {
                eprintln!(
                    "skipped dead letter {} of {}: {why}; it cannot be replayed",
                    letter.position(),
                    log.topic()
                );
                return;
            }
        };
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    });
    let summary = result?;
    let group = match &options.source_topic {
        Some(t) => topic_replay_group(&config.namespace, t),
        None => replay_group(&config.namespace),
    };
    let verb = if options.dry_run {
        "would replay"
    } else {
        "replayed"
    };
    let mut notes = Vec::new();
    if summary.already_replayed > 0 {
        notes.push(format!(
            "{} replayed before (--all sends them again)",
            summary.already_replayed
        ));
    }
    if summary.other_topics > 0 {
        notes.push(format!("{} from other topics", summary.other_topics));
    }
    if summary.unreplayable > 0 {
        notes.push(format!("{} unreplayable", summary.unreplayable));
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!("; {}", notes.join(", "))
    };
    let progress = if options.dry_run {
        "dry run: nothing sent or recorded".to_owned()
    } else {
        format!("progress in group {group}")
    };
    eprintln!(
        "{verb} {} dead letter(s) from {}{notes} ({progress})",
        summary.sent,
        log.topic()
    );
    Ok(ExitCode::SUCCESS)
}
