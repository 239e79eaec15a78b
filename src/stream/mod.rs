//! The one consumer loop every stream processor runs.
//!
//! A processor (provisioner, purger, catalog) says what an event means and how to apply it; this
//! module owns everything else, once:
//!
//! - **assignment**: rebalance callbacks become typed events ([`consumer`]) handled by the loop
//!   between steps. On revoke, everything held or queued for the revoked partitions is dropped,
//!   so nothing more is started for a partition this worker no longer owns; the new owner
//!   fetches them again from the committed offset.
//! - **batching and decoding**: up to `batch_max` messages, writer schemas resolved once per
//!   schema id, Avro decoded on a blocking thread.
//! - **lanes** ([`run`]): each order key's ready events are applied as one unit in the
//!   background, up to `write_concurrency` units per MySQL server, while the loop goes on; a
//!   key's later events wait behind its unit, so its events apply in log order, and no other
//!   key ever waits for it.
//! - **gating and holding** ([`hold`]): the processor gates each event (ready, hold, skip,
//!   reject). Held events wait per *order key*, bounded in memory per key and per tenant; an
//!   event waiting for a tenant that never comes is dead-lettered after `hold_for` (counted
//!   from its time in the log), and past the per-tenant quota at once, naming the tenant.
//! - **errors** ([`error`]): a failure of one tenant parks its key (retried with backoff, then
//!   dead-lettered); a MySQL server that does not answer parks its own tenants until a probe
//!   finds it back; an outage of what every tenant needs is waited out by the whole loop,
//!   reported by readiness and metrics; a rejection is dead-lettered at once.
//! - **offsets**: the offset stored for the auto-commit is, per partition, the lowest one not
//!   yet applied, skipped or dead-lettered (a held, queued or parked event pins it, and so does
//!   one left in the log). Effectively-once application is the processors' part: each writes
//!   the offsets it applied in the same MySQL transaction as the rows, which also fences a stale
//!   owner of a partition.
//!
//! Processors never see Kafka.

pub mod consumer;
pub mod health;
mod hold;
mod run;

use std::future::Future;
use std::time::{Duration, Instant};

use rdkafka::message::{Message, OwnedMessage};

/// The one classification of failures ([`crate::failure`]), where the loop and processors
/// name it.
pub use crate::failure as error;
pub use crate::failure::{Service, StepError};
pub use crate::log::{logged_at, Origin};
pub use consumer::GroupConsumer;
pub use hold::HoldSummary;
pub use run::run;

use crate::log::events::Event;
use crate::store::servers::{Server, Servers};

/// One consumed event as a processor sees it: where it came from and what it means.
pub struct Msg<I> {
    pub origin: Origin,
    pub item: I,
    /// When this worker received it (epoch ms, wall clock).
    pub received_at_ms: i64,
    /// The message as received: what a dead letter copies, byte for byte.
    raw: OwnedMessage,
    /// When it entered the log (the broker's timestamp, epoch ms; the receipt time if the
    /// broker gives none). A hold's deadline counts from here, so a restart or a rebalance
    /// never starts it again.
    logged_at_ms: i64,
    /// The assignment of its partition it was received under: what a revoked and reassigned
    /// partition's new fetch delivers is not confused with what was in flight before.
    generation: u64,
}

impl<I> Msg<I> {
    /// A message built outside the loop (tests, benchmarks).
    pub fn new(origin: Origin, item: I, raw: OwnedMessage) -> Msg<I> {
        let received_at_ms = chrono::Utc::now().timestamp_millis();
        let logged_at_ms = logged_at(&raw);
        Msg {
            origin,
            item,
            raw,
            received_at_ms,
            logged_at_ms,
            generation: 0,
        }
    }

    /// When the log has it: the broker's timestamp (epoch ms), or the receipt time if it gives
    /// none.
    pub fn logged_at_ms(&self) -> i64 {
        self.logged_at_ms
    }

    fn partition(&self) -> consumer::Partition {
        (self.origin.topic.clone(), self.origin.partition)
    }

    /// Bytes it occupies while held (payload, key and bookkeeping).
    fn held_bytes(&self) -> usize {
        self.raw.payload().map_or(0, <[u8]>::len)
            + self.raw.key().map_or(0, <[u8]>::len)
            + self.origin.topic.len()
            + 256
    }
}

/// What a held event waits for. The first three are a processor's verdicts ([`Gate::Hold`]);
/// the others are the loop's own, for a key it parked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// A tenant that does not exist or is not active yet (its organisation id). Dead-lettered
    /// after `hold_for` if it never becomes active.
    Tenant(String),
    /// The organisation lifecycle: a termination or restore that was in the log when this event
    /// arrived is not applied yet. Waits as long as it takes (the provisioner is a shared
    /// service), so the event is judged against the lifecycle a replay would see.
    Lifecycle,
    /// A tenant in the middle of a termination or restore (its organisation id). Dead-lettered
    /// after `hold_for` if the step never finishes.
    Changing(String),
    /// The key's last attempt failed for a reason of its own tenant (a lock wait, a statement
    /// time limit, a missing table): tried again at `at`, while every other key goes on.
    Retry {
        tenant: String,
        at: Instant,
        error: String,
    },
    /// A tenant whose database is behind the latest migration of its kind, or whose migration
    /// failed (its organisation id): waits, never dead-lettered, until the rollout (a worker's
    /// or `tenancy migrate`'s) brings it up. Its backlog waits in the log past `max_held`.
    Schema(String),
    /// The MySQL server the key's tenant is on does not answer, or is not configured here:
    /// released when a probe finds it answering again.
    Server(String),
    /// Behind an attempt of the same key still under way.
    Busy,
}

impl Wait {
    /// The tenant (or server) named in status output and dead letters.
    pub fn tenant(&self) -> &str {
        match self {
            Wait::Tenant(t)
            | Wait::Changing(t)
            | Wait::Schema(t)
            | Wait::Retry { tenant: t, .. } => t,
            Wait::Lifecycle => "(lifecycle)",
            Wait::Server(_) => "(server)",
            Wait::Busy => "(applying)",
        }
    }

    /// Why, in a few words, for `tenancy status`.
    pub fn why(&self) -> String {
        match self {
            Wait::Tenant(_) => "tenant not active yet".to_owned(),
            Wait::Lifecycle => "lifecycle log not applied yet".to_owned(),
            Wait::Changing(_) => "tenant being terminated or restored".to_owned(),
            Wait::Schema(_) => {
                "tenant database behind its migrations or its migration failed (tenancy migrate)"
                    .to_owned()
            }
            Wait::Retry { error, .. } => format!("retrying: {error}"),
            Wait::Server(name) => format!("MySQL server {name} unavailable"),
            Wait::Busy => "behind an attempt under way".to_owned(),
        }
    }

    /// Whether `hold_for` applies: a wait for something that may never happen.
    fn expires(&self) -> bool {
        matches!(self, Wait::Tenant(_) | Wait::Changing(_))
    }
}

/// Why an event is passed over without being applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Its tenant is archived or purged (counted in `tenancy_events_skipped_terminated_total`).
    Terminated,
    /// Not addressed to this processor (e.g. outcome events the purger has no use for).
    Ignored,
}

/// A processor's verdict on one event.
#[derive(Debug)]
pub enum Gate<T> {
    /// Apply it, with this target (which database, which tenant).
    Ready(T),
    /// Not yet: keep it (and every later event with its order key) until this settles.
    Hold(Wait),
    /// Pass over it; `tenant` is logged once per tenant.
    Skip {
        reason: SkipReason,
        tenant: Option<String>,
    },
    /// Dead-letter it with this reason.
    Reject(String),
}

/// Applying a run of events failed after its first `applied` events were durably applied.
#[derive(Debug)]
pub struct Failed {
    pub applied: usize,
    pub error: StepError,
}

impl Failed {
    pub fn at(applied: usize, error: impl Into<StepError>) -> Failed {
        Failed {
            applied,
            error: error.into(),
        }
    }
}

impl From<StepError> for Failed {
    fn from(error: StepError) -> Self {
        Failed { applied: 0, error }
    }
}

impl From<sqlx::Error> for Failed {
    fn from(e: sqlx::Error) -> Self {
        Failed::at(0, e)
    }
}

/// A partition position: everything before `next` on it has been handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub next: i64,
}

/// A stream processor: what events mean and how they are applied. The loop ([`run`]) does the
/// rest.
///
/// The futures need not be `Send`: every loop of a worker is joined on the task that owns it,
/// and sqlx transaction futures trip the compiler's `Send` inference (rust#100013).
pub trait Processor {
    /// What the processor reads from an event.
    type Item;
    /// Where a ready event goes (e.g. the tenant database it is written to).
    type Target;

    /// `provisioner`, `catalog`, …: names logs, metrics and dead letters.
    fn name(&self) -> &'static str;

    /// What a decoded event means to this processor; `Err(reason)` dead-letters it.
    fn parse(&self, event: Event, origin: &Origin) -> Result<Self::Item, String>;

    /// Events with equal keys are applied in log order, and one held event holds the later ones
    /// with its key. Events with different keys never wait for each other.
    fn order_key(&self, item: &Self::Item) -> String;

    /// One verdict per message, in order. Called for fresh batches, for held events when they
    /// are rechecked, and again before an event is retried.
    fn gate(
        &self,
        msgs: &[&Msg<Self::Item>],
    ) -> impl Future<Output = Result<Vec<Gate<Self::Target>>, StepError>>;

    /// Applies ready events that share one order key, in log order. Must be idempotent: a
    /// redelivered or concurrently applied event (a partition briefly owned by two workers)
    /// changes nothing the second time.
    fn apply(
        &self,
        run: &[(&Msg<Self::Item>, &Self::Target)],
    ) -> impl Future<Output = Result<(), Failed>>;

    /// The first attempt at the ready runs of many keys (one run per key, each in log order):
    /// one outcome per run, `None` for a run left to the loop's per-key path (which retries and
    /// dead-letters). The default applies up to `concurrency` runs at a time with
    /// [`Processor::apply`] ([`apply_each`]); a processor that does many keys' work better as
    /// one unit (the provisioner: many new tenants at once) overrides it.
    fn apply_keys(
        &self,
        runs: &[ReadyRun<'_, Self>],
        concurrency: usize,
    ) -> impl Future<Output = Vec<Option<Result<(), Failed>>>> {
        apply_each(self, runs, concurrency)
    }

    /// Called after the loop stored new commit positions (e.g. to publish a watermark).
    fn progressed(&self, _positions: &[Position]) -> impl Future<Output = Result<(), StepError>> {
        async { Ok(()) }
    }

    /// Ready runs of different keys applied as one [`Processor::apply_keys`] unit at most
    /// (the provisioner onboards new tenants together); 1: each key is a unit of its own.
    fn group_size(&self) -> usize {
        1
    }

    /// The MySQL servers this processor writes tenant databases on. `None`: it writes none,
    /// and a MySQL outage waits with the whole loop.
    fn servers(&self) -> Option<&Servers> {
        None
    }

    /// The servers applying to `target` writes to, its tenant's first: the key's lane. A key
    /// whose server is known down is parked without being tried.
    fn target_servers<'t>(&self, _target: &'t Self::Target) -> Vec<&'t Server> {
        Vec::new()
    }
}

/// One key's ready events, in log order, with their targets.
pub type ReadyRun<'a, P> = Vec<(
    &'a Msg<<P as Processor>::Item>,
    &'a <P as Processor>::Target,
)>;

/// Up to `concurrency` runs at a time, each with [`Processor::apply`] (different keys are
/// different tenants, or touch them under their own locks). With a concurrency of 1 nothing is
/// attempted: the per-key path does it, with its retries.
pub async fn apply_each<P: Processor + ?Sized>(
    p: &P,
    runs: &[ReadyRun<'_, P>],
    concurrency: usize,
) -> Vec<Option<Result<(), Failed>>> {
    use futures::stream::{self, StreamExt};
    let mut outcomes: Vec<Option<Result<(), Failed>>> = runs.iter().map(|_| None).collect();
    if concurrency <= 1 || runs.len() < 2 {
        return outcomes;
    }
    let done: Vec<(usize, Result<(), Failed>)> = stream::iter(runs.iter().enumerate())
        .map(|(i, run)| async move { (i, p.apply(run).await) })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    for (i, outcome) in done {
        outcomes[i] = Some(outcome);
    }
    outcomes
}

/// Tunables of the loop, shared by every processor of a worker.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Most messages taken into one batch.
    pub batch_max: usize,
    /// How long to wait for more messages once a batch has started.
    pub linger: Duration,
    /// How often held events are gated again.
    pub recheck_every: Duration,
    /// Events held in memory per order key (and per tenant waited for). Past it, events
    /// waiting for a tenant that does not exist are dead-lettered with the reason; events of
    /// a parked key are left in the log and read again when the key is released.
    pub max_held: usize,
    /// Held events (bytes) in memory in all: past it, further events are left in the log and
    /// read again when their key is released.
    pub max_held_bytes: usize,
    /// How long an event may wait for a tenant before it is dead-lettered.
    pub hold_for: Duration,
    /// Attempts at an event whose error may heal, before it is dead-lettered.
    pub max_attempts: u32,
    /// Longest wait between two attempts (backoff doubles up to it).
    pub max_backoff: Duration,
    /// Send LeaveGroup when stopping (see [`consumer::depart`]).
    pub leave_group_on_exit: bool,
    /// Keys (tenants) applied at the same time, per MySQL server.
    pub write_concurrency: usize,
    /// Longest a key's attempt may take before it counts as failed (the server's own
    /// statement and lock-wait limits normally answer first; this catches a server that does
    /// not answer at all).
    pub apply_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            batch_max: 1000,
            linger: Duration::from_millis(20),
            recheck_every: Duration::from_millis(300),
            max_held: 10_000,
            max_held_bytes: 64 << 20,
            hold_for: Duration::from_secs(3 * 24 * 3600),
            max_attempts: 8,
            max_backoff: Duration::from_secs(5),
            leave_group_on_exit: false,
            write_concurrency: 4,
            apply_timeout: Duration::from_secs(30),
        }
    }
}
