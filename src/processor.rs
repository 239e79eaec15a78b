//! The consume → apply → store-offset loop every stream processor runs.
//!
//! One message at a time per processor: decode, hand to the [`Handler`], and only when it
//! returns store the offset (the auto-commit then commits it). Transient failures are retried
//! with backoff on the same message, so the committed offset never passes an unapplied event;
//! permanent ones go to the dead-letter topic with the reason. On shutdown the in-flight message
//! finishes and the stored offsets are committed synchronously.

use std::future::Future;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use tokio_util::sync::CancellationToken;

use crate::dead_letter::DeadLetters;
use crate::events::Event;
use crate::kafka::GroupContext;
use crate::wire::Codec;

/// Where a message came from; named in logs and dead letters.
#[derive(Debug, Clone)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The message key as text (the tenant's organisation id), if any.
    pub key: Option<String>,
}

impl Origin {
    pub fn of(msg: &BorrowedMessage<'_>) -> Origin {
        Origin {
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        }
    }
}

/// How applying an event failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Worth retrying the same event (database or broker unavailable, deadlock).
    #[error("transient: {0:#}")]
    Transient(anyhow::Error),
    /// Retrying will not help: dead-letter it with this reason.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// A stream processor's reaction to one event.
///
/// The future is not required to be `Send`: processors run as futures joined on the task that
/// owns them, and sqlx transaction futures trip the compiler's `Send` inference (rust#100013).
pub trait Handler {
    fn handle(
        &self,
        event: Event,
        origin: &Origin,
    ) -> impl Future<Output = Result<(), HandleError>>;
}

const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Runs `handler` over `consumer` until `shutdown` is cancelled.
pub async fn run<H: Handler + Sync>(
    name: &str,
    consumer: StreamConsumer<GroupContext>,
    codec: &Codec,
    dead_letters: &DeadLetters,
    handler: &H,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = consumer.recv() => m,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(processor = name, error = %e, "consumer error; continuing");
                metrics::counter!("tenancy_consumer_errors_total", "processor" => name.to_owned())
                    .increment(1);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let origin = Origin::of(&msg);
        if !apply_with_retry(name, &msg, &origin, codec, dead_letters, handler, &shutdown).await {
            // Shut down mid-retry: the offset is not stored, so the event is redelivered.
            break;
        }
        if let Err(e) = consumer.store_offset_from_message(&msg) {
            // After a revoke the partition is someone else's; they will redeliver from the
            // last commit, and the handler is idempotent.
            tracing::warn!(processor = name, topic = %origin.topic, partition = origin.partition,
                offset = origin.offset, error = %e, "could not store offset");
        }
        metrics::counter!("tenancy_events_processed_total", "processor" => name.to_owned())
            .increment(1);
    }
    tracing::info!(processor = name, "stopping: committing stored offsets");
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => {}
        // Nothing stored since the last auto-commit.
        Err(rdkafka::error::KafkaError::ConsumerCommit(
            rdkafka::types::RDKafkaErrorCode::NoOffset,
        )) => {}
        Err(e) => {
            tracing::warn!(processor = name, error = %e, "final commit failed; the uncommitted events will be redelivered")
        }
    }
    Ok(())
}

/// Applies one message; returns false when shutdown interrupted a retry loop.
async fn apply_with_retry<H: Handler + Sync>(
    name: &str,
    msg: &BorrowedMessage<'_>,
    origin: &Origin,
    codec: &Codec,
    dead_letters: &DeadLetters,
    handler: &H,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = match codec.decode(msg.payload()).await {
            Ok(event) => handler.handle(event, origin).await,
            Err(e) if e.is_transient() => Err(HandleError::Transient(e.into())),
            Err(e) => Err(HandleError::Permanent(e.to_string())),
        };
        match outcome {
            Ok(()) => return true,
            Err(HandleError::Permanent(reason)) => {
                tracing::error!(processor = name, topic = %origin.topic, partition = origin.partition,
                    offset = origin.offset, tenant = origin.key.as_deref().unwrap_or("-"), %reason,
                    "poison event: sending to dead letters");
                metrics::counter!("tenancy_dead_letters_total", "processor" => name.to_owned())
                    .increment(1);
                // Dead-lettering itself must not lose the event: retry it like any transient step.
                loop {
                    match dead_letters.send(msg, origin, &reason).await {
                        Ok(()) => return true,
                        Err(e) => {
                            tracing::warn!(processor = name, error = %e, "dead-letter produce failed; retrying");
                            if !sleep_or_shutdown(&mut backoff, shutdown).await {
                                return false;
                            }
                        }
                    }
                }
            }
            Err(HandleError::Transient(e)) => {
                tracing::warn!(processor = name, topic = %origin.topic, partition = origin.partition,
                    offset = origin.offset, tenant = origin.key.as_deref().unwrap_or("-"), error = %format!("{e:#}"),
                    retry_in_ms = backoff.as_millis() as u64, "transient failure; retrying");
                metrics::counter!("tenancy_retries_total", "processor" => name.to_owned())
                    .increment(1);
                if !sleep_or_shutdown(&mut backoff, shutdown).await {
                    return false;
                }
            }
        }
    }
}

async fn sleep_or_shutdown(backoff: &mut Duration, shutdown: &CancellationToken) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}
