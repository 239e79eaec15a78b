//! The dead-letter topic `{ns}.dead-letter`: poison events, byte for byte, with `dlq.*` headers
//! naming why and where they came from, so they can be inspected and replayed.
//!
//! - [`write`]: the processors write them ([`DeadLetters`]); one always fits.
//! - [`replay`]: reading them and sending them back to where they came from
//!   (`tenancy dead-letter list|replay`, [`DeadLetterLog`]).

pub mod replay;
pub mod write;

pub use replay::{
    replay_group, topic_replay_group, DeadLetter, DeadLetterLog, ReplayOptions, ReplayStep,
    ReplaySummary,
};
pub use write::{DeadLetters, SendError};

pub const HEADER_REASON: &str = "dlq.reason";
pub const HEADER_TOPIC: &str = "dlq.source.topic";
pub const HEADER_PARTITION: &str = "dlq.source.partition";
pub const HEADER_OFFSET: &str = "dlq.source.offset";
pub const HEADER_TENANT: &str = "dlq.tenant";
/// The processor that gave up on it.
pub const HEADER_PROCESSOR: &str = "dlq.processor";
/// The original message's log timestamp (epoch ms): a replay keeps it, so the event keeps its
/// place among the changes it races with (see `tenancy::clock`).
pub const HEADER_TIMESTAMP: &str = "dlq.source.timestamp";
/// Set (to the original payload's size in bytes) when the dead letter carries no payload
/// because the original would not fit: a replay fetches it from the source position.
pub const HEADER_PAYLOAD_OMITTED: &str = "dlq.payload-omitted";
/// Set on a replayed copy: the dead letter it came from, as `partition/offset`.
pub const HEADER_REPLAYED_FROM: &str = "dlq.replayed-from";
/// Headers starting with this belong to the dead-letter machinery, not to the original event.
pub const HEADER_PREFIX: &str = "dlq.";
