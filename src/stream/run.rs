//! The loop: receive a batch, take rebalances, decode, gate, hand each key's ready run to its
//! lane, and, while the lanes apply, go on receiving, rechecking held events and storing
//! offsets.
//!
//! **Lanes.** Each order key's ready events are one unit of work, applied in the background
//! (up to `write_concurrency` units at a time per MySQL server) while the loop goes on with
//! other keys. Later events of a key with a unit under way wait behind it, so a key's events
//! still apply in log order. A unit that fails is classified once ([`blame`]):
//!
//! - the key's own failure (a lock wait, a statement time limit, a missing table, a timeout on
//!   a server that answers probes) **parks the key**: its events wait in memory, retried with
//!   backoff, then the failing event is dead-lettered with the reason; every other key goes on.
//! - a MySQL server other than home that does not answer (or is not configured here) parks
//!   every key on it, without trying them, until a probe finds it answering; nothing is
//!   dead-lettered.
//! - what every key needs (the home server, Redis, the broker, the registry) stops the whole
//!   loop until it is back.
//!
//! **The log is the buffer.** Memory holds at most `max_held` events per key (and per tenant
//! waited for) and `max_held_bytes` in all. Past that, a parked key's further events are left
//! in the log: the key is marked as spilled from that offset, and once its held events are
//! applied the partition is read again from there ([`Spill`]), letting through only the
//! spilled keys' events (everything else there was handled already). A flood of events for a
//! tenant that does not exist is a quota, not a brake: past `max_held`, its events are
//! dead-lettered with the reason, and no partition is ever paused for it.
//!
//! **Offsets.** The offset stored for the auto-commit is, per partition, the lowest one not
//! applied, skipped or dead-lettered yet: held, queued, in a unit under way, or left in the log.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use schema_registry_converter::avro_common::AvroSchema;
use tokio_util::sync::CancellationToken;

use super::consumer::{self, describe, GroupConsumer, Partition, Rebalance};
use super::error::{Service, StepError};
use super::health::ProcessorHealth;
use super::hold::HoldQueue;
use super::{Failed, Gate, Msg, Origin, Position, Processor, Settings, SkipReason, Wait};
use crate::log::dead_letters::{DeadLetters, SendError};
use crate::log::wire::{decode_batch, Codec};
use crate::store::servers::{Server, HOME};

/// How long a probe of a MySQL server may take before the server counts as not answering.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The least time a step every key needs (a gate, a dead letter) is given before its service
/// counts as not answering.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the loop walks what it holds (releases, offsets, reports).
const SCAN_EVERY: Duration = Duration::from_millis(50);

/// Runs `processor` over `consumer` until `shutdown`; on the way out the units under way are
/// finished and the stored offsets committed. Returns an error only for what makes the worker
/// unable to go on at all.
pub async fn run<P: Processor>(
    processor: &P,
    consumer: GroupConsumer,
    codec: &Codec,
    dead_letters: &DeadLetters,
    health: ProcessorHealth,
    settings: &Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let leave = settings.leave_group_on_exit;
    let mut l = Loop {
        p: processor,
        name: processor.name(),
        consumer: &consumer,
        codec,
        dead_letters,
        health,
        settings,
        shutdown: &shutdown,
        held: HoldQueue::default(),
        ready: VecDeque::new(),
        busy: HashMap::new(),
        inflight: FuturesUnordered::new(),
        slots: HashMap::new(),
        trouble: HashMap::new(),
        down: HashMap::new(),
        probes: FuturesUnordered::new(),
        spill: Spill::default(),
        released: BTreeSet::new(),
        outage: None,
        assigned: BTreeSet::new(),
        generation: HashMap::new(),
        next_generation: 1,
        seen: HashMap::new(),
        stored: HashMap::new(),
        incoming: Vec::new(),
        batch_started: None,
        skip_logged: HashSet::new(),
        last_recheck: Instant::now(),
        last_scan: Instant::now(),
        stopping: false,
    };
    l.run().await;
    tracing::info!(
        processor = l.name,
        held = l.held.count(),
        "stopping: committing stored offsets"
    );
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(processor = l.name, error = %e,
            "final commit failed; events since the last commit will be redelivered (and skipped)"),
    }
    drop(l);
    let leave = leave || consumer::alone_in_stable_group(&consumer);
    if leave {
        tracing::info!(processor = processor.name(), "leaving the group");
    } else {
        tracing::info!(
            processor = processor.name(),
            "not leaving the group (others in it, or a rebalance under way): its partitions move when the session expires"
        );
    }
    consumer::depart(consumer, leave);
    Ok(())
}

/// One key's ready events with their targets, in log order.
type Run<P> = VecDeque<(Msg<<P as Processor>::Item>, <P as Processor>::Target)>;

/// A unit of work under way: one key's run (or a group of new tenants' runs, for a processor
/// that applies them together), applied off the loop.
type Unit<'a, P> = Pin<Box<dyn Future<Output = Done<P>> + 'a>>;

/// A probe of a server that was down: its name and whether it answers.
type Probe<'a> = Pin<Box<dyn Future<Output = (String, Result<(), String>)> + 'a>>;

/// What a unit did with each of its runs.
struct Done<P: Processor> {
    lane: String,
    runs: Vec<(String, Run<P>, Outcome)>,
}

enum Outcome {
    Applied,
    /// A group unit left it to a unit of its own.
    Left,
    /// The first `applied` events were applied; the next failed.
    Failed {
        applied: usize,
        blame: Blame,
    },
}

/// Whose failure it was, decided once, in the unit (probing servers where that is unclear).
enum Blame {
    /// The key's own tenant: retried with backoff, then the event dead-lettered.
    Key(StepError),
    /// A MySQL server other than home does not answer, or is not configured here: every key
    /// on it waits, nothing is dead-lettered.
    Server { server: Server, error: String },
    /// What every key needs: the whole loop waits.
    Shared { service: Service, error: String },
}

/// Doubling waits up to a ceiling.
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_millis(100),
            max,
        }
    }

    /// The next wait.
    fn step(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// Sleeps; false if shutdown came first.
    async fn sleep(&mut self, shutdown: &CancellationToken) -> bool {
        let wait = self.step();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

/// A key whose attempts fail: how often, and whether to apply its events one at a time to
/// find the culprit. Forgotten once the key has nothing waiting.
struct Trouble {
    attempts: u32,
    backoff: Backoff,
    single: bool,
}

/// A MySQL server that does not answer (or is not configured here).
struct Down {
    server: Server,
    since: Instant,
    error: String,
    next_probe: Instant,
    backoff: Backoff,
    probing: bool,
}

/// The whole loop waiting for a shared service: the failed unit goes first once it is time.
struct Outage {
    next_try: Instant,
    backoff: Backoff,
    trying: bool,
}

/// Keys whose events were left in the log (past the memory bounds), and the partitions being
/// read again for them.
#[derive(Default)]
struct Spill {
    /// Per key: per partition, the offset of its first event left in the log.
    marks: HashMap<String, BTreeMap<Partition, i64>>,
    /// Keys released while spilled: read again from their marks at the next safe point.
    wanted: BTreeSet<String>,
    /// Partitions being read again: below `until`, only the listed keys' events pass, each from
    /// its next offset (everything else there was handled the first time).
    rewinds: HashMap<Partition, Rewind>,
    /// Per partition, the offset after the last message taken from the consumer.
    position: HashMap<Partition, i64>,
}

struct Rewind {
    until: i64,
    next: HashMap<String, i64>,
}

impl Spill {
    fn is_spilled(&self, key: &str, part: &Partition) -> bool {
        self.marks.get(key).is_some_and(|m| m.contains_key(part))
    }

    fn mark(&mut self, key: &str, part: Partition, offset: i64) -> bool {
        let marks = self.marks.entry(key.to_owned()).or_default();
        let first = marks.is_empty();
        marks.entry(part).or_insert(offset);
        first
    }

    /// Whether a message at `offset` of `part` is being read again: (in a rewind's range).
    fn replaying(&self, part: &Partition, offset: i64) -> bool {
        self.rewinds.get(part).is_some_and(|r| offset < r.until)
    }

    /// For a message read again: whether its key asked for it (and it is new to the key).
    fn admit(&mut self, part: &Partition, key: &str, offset: i64) -> bool {
        let Some(next) = self.rewinds.get_mut(part).and_then(|r| r.next.get_mut(key)) else {
            return false;
        };
        if offset < *next {
            return false;
        }
        *next = offset + 1;
        true
    }

    /// A message at `offset` of `part` was taken: a rewind that reached its end is over.
    fn taken(&mut self, part: &Partition, offset: i64) {
        self.position.insert(part.clone(), offset + 1);
        if self
            .rewinds
            .get(part)
            .is_some_and(|r| offset + 1 >= r.until)
        {
            self.rewinds.remove(part);
        }
    }

    /// The lowest offset per partition not read yet for a spilled key.
    fn pins(&self) -> HashMap<Partition, i64> {
        let mut lowest: HashMap<Partition, i64> = HashMap::new();
        let marks = self.marks.values().flat_map(|m| m.iter());
        let nexts = self
            .rewinds
            .iter()
            .flat_map(|(p, r)| r.next.values().map(move |n| (p, n)));
        for (part, offset) in marks.chain(nexts) {
            let entry = lowest.entry(part.clone()).or_insert(i64::MAX);
            *entry = (*entry).min(*offset);
        }
        lowest
    }

    fn forget(&mut self, revoked: &HashSet<Partition>) {
        for marks in self.marks.values_mut() {
            marks.retain(|p, _| !revoked.contains(p));
        }
        self.marks.retain(|_, m| !m.is_empty());
        self.rewinds.retain(|p, _| !revoked.contains(p));
        self.position.retain(|p, _| !revoked.contains(p));
    }
}

/// What woke the loop.
enum Step<P: Processor> {
    Stop,
    Done(Done<P>),
    Probed(String, Result<(), String>),
    Fetched(Option<KafkaError>),
    Tick,
}

struct Loop<'a, P: Processor> {
    p: &'a P,
    name: &'static str,
    consumer: &'a GroupConsumer,
    codec: &'a Codec,
    dead_letters: &'a DeadLetters,
    health: ProcessorHealth,
    settings: &'a Settings,
    shutdown: &'a CancellationToken,
    held: HoldQueue<P::Item>,
    /// Ready runs waiting for a free slot in their lane.
    ready: VecDeque<(String, Run<P>)>,
    /// Keys with a run queued in `ready` or under way, and the lowest offset of that run per
    /// partition (the commit may not pass it).
    busy: HashMap<String, Vec<(Partition, i64)>>,
    inflight: FuturesUnordered<Unit<'a, P>>,
    /// Units under way per lane (the first server a run writes to).
    slots: HashMap<String, usize>,
    trouble: HashMap<String, Trouble>,
    /// Servers that do not answer, by name.
    down: HashMap<String, Down>,
    probes: FuturesUnordered<Probe<'a>>,
    spill: Spill,
    /// Keys whose held events go on at the next step, gated together.
    released: BTreeSet<String>,
    outage: Option<Outage>,
    assigned: BTreeSet<Partition>,
    /// Per owned partition, the assignment it was received under (see [`Msg::generation`]).
    generation: HashMap<Partition, u64>,
    next_generation: u64,
    /// Per partition: the offset after the highest one received.
    seen: HashMap<Partition, i64>,
    /// Per partition: the offset last stored for the auto-commit.
    stored: HashMap<Partition, i64>,
    /// Messages received for the batch being gathered: kept here, so a batch interrupted by a
    /// finished unit loses nothing.
    incoming: Vec<OwnedMessage>,
    batch_started: Option<tokio::time::Instant>,
    skip_logged: HashSet<String>,
    last_recheck: Instant,
    last_scan: Instant,
    stopping: bool,
}

impl<'a, P: Processor> Loop<'a, P> {
    async fn run(&mut self) {
        loop {
            let fetch = self.may_fetch();
            let step: Step<P> = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Step::Stop,
                Some(done) = self.inflight.next(), if !self.inflight.is_empty() => Step::Done(done),
                Some((name, r)) = self.probes.next(), if !self.probes.is_empty() => Step::Probed(name, r),
                e = fill(self.consumer, &mut self.incoming, &mut self.batch_started, self.settings), if fetch => Step::Fetched(e),
                _ = tokio::time::sleep(SCAN_EVERY), if !fetch => Step::Tick,
            };
            let finished = matches!(step, Step::Done(_));
            let go_on = match step {
                Step::Stop => break,
                Step::Done(done) => self.finished(done).await,
                Step::Probed(name, result) => {
                    self.probed(&name, result);
                    true
                }
                Step::Fetched(error) => {
                    if let Some(e) = error {
                        self.consumer_error(&e);
                    }
                    // Rebalance callbacks ran inside recv: act on them before anything else.
                    self.take_rebalances();
                    self.take_batch().await
                }
                Step::Tick => true,
            };
            if !go_on || !self.housekeeping(finished).await {
                break;
            }
        }
        self.drain().await;
    }

    /// Between steps: start units and read again what was left in the log; every
    /// [`SCAN_EVERY`], release what is due, gate what was released, probe servers, store
    /// offsets and report (each of those walks everything held or reads the tenants, so not
    /// after every finished unit).
    async fn housekeeping(&mut self, finished: bool) -> bool {
        let scan = self.last_scan.elapsed() >= SCAN_EVERY;
        if scan {
            self.last_scan = Instant::now();
            if !self.recheck().await {
                return false;
            }
            self.probe_due();
        }
        // Released keys are gated together: once per scan while units are under way (one gate
        // for every key that finished meanwhile), at once when the lanes are idle.
        if (scan || self.inflight.is_empty()) && !self.route_released().await {
            return false;
        }
        // Offsets after every finished unit while little is held (a processor's progress, such
        // as the provisioner's lifecycle watermark, shows at once); else once per scan.
        if scan || (finished && self.held.count() <= 1_000) {
            self.store_offsets().await;
        }
        if scan {
            self.report();
        }
        if self.incoming.is_empty() {
            self.rewind_wanted();
        }
        self.dispatch();
        true
    }

    /// New messages are taken while the lanes keep up (what waits for a lane, queued or behind
    /// a key's unit, is under two batches) and no shared service is down. Events waiting for a
    /// tenant, a retry or a server are not counted: they are parked, not a brake.
    fn may_fetch(&self) -> bool {
        let queued: usize = self.ready.iter().map(|(_, r)| r.len()).sum();
        self.outage.is_none() && queued + self.held.behind() < 2 * self.settings.batch_max.max(1)
    }

    fn consumer_error(&self, e: &KafkaError) {
        metrics::counter!("tenancy_consumer_errors_total", "processor" => self.name).increment(1);
        let broker_down = matches!(
            e.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure)
        );
        if broker_down {
            self.health.outage(Service::Kafka, &e.to_string());
        }
        tracing::warn!(processor = self.name, error = %e, "consumer error; continuing");
    }

    fn take_rebalances(&mut self) {
        let rebalances = self.consumer.context().take_rebalances();
        if rebalances.is_empty() {
            return;
        }
        for r in rebalances {
            match r {
                Rebalance::Assigned(parts) => {
                    for part in parts {
                        self.generation.insert(part.clone(), self.next_generation);
                        self.next_generation += 1;
                        self.assigned.insert(part);
                    }
                }
                Rebalance::Revoked(parts) => {
                    let revoked: HashSet<Partition> = parts.into_iter().collect();
                    self.revoke(&revoked);
                }
                Rebalance::Error(_) => {}
            }
        }
        // What librdkafka holds is the truth; the callbacks only tell when to look.
        let now_assigned = consumer::assignment(self.consumer);
        let gone: HashSet<Partition> = self.assigned.difference(&now_assigned).cloned().collect();
        if !gone.is_empty() {
            self.revoke(&gone);
        }
        for part in &now_assigned {
            if !self.generation.contains_key(part) {
                self.generation.insert(part.clone(), self.next_generation);
                self.next_generation += 1;
            }
        }
        self.assigned = now_assigned;
        self.health.assigned(
            self.assigned
                .iter()
                .map(|(t, p)| format!("{t}/{p}"))
                .collect(),
        );
    }

    /// Forgets everything of partitions this worker no longer owns: their new owner fetches
    /// them again from the committed offset, which never passed anything not applied. Units
    /// under way finish; what they did is kept (applying is idempotent), what they failed is
    /// left to the new owner.
    fn revoke(&mut self, revoked: &HashSet<Partition>) {
        for part in revoked {
            self.assigned.remove(part);
            self.generation.remove(part);
            self.seen.remove(part);
            self.stored.remove(part);
        }
        self.incoming
            .retain(|m| !revoked.contains(&(m.topic().to_owned(), m.partition())));
        let dropped = self.held.drop_partitions(revoked);
        let mut kept = VecDeque::with_capacity(self.ready.len());
        for (key, mut run) in std::mem::take(&mut self.ready) {
            run.retain(|(m, _)| !revoked.contains(&m.partition()));
            if run.is_empty() {
                self.busy.remove(&key);
                // What waited behind it (from another partition) goes on at the next recheck.
                if matches!(self.held.head(&key).map(|h| &h.wait), Some(Wait::Busy)) {
                    let tenant = key.clone();
                    let at = Instant::now();
                    let error = "its partition moved".to_owned();
                    self.held.set_wait(&key, &Wait::Retry { tenant, at, error });
                }
            } else {
                self.busy.insert(key.clone(), pins(&run));
                kept.push_back((key, run));
            }
        }
        self.ready = kept;
        self.spill.forget(revoked);
        if dropped > 0 {
            tracing::info!(processor = self.name, dropped,
                partitions = %describe(&revoked.iter().cloned().collect::<Vec<_>>()),
                "dropped the held events of revoked partitions");
        }
    }

    /// Whether `m` belongs to the current assignment of its partition.
    fn current(&self, m: &Msg<P::Item>) -> bool {
        self.generation.get(&m.partition()) == Some(&m.generation)
    }

    /// Decodes, parses and routes what was received.
    async fn take_batch(&mut self) -> bool {
        self.batch_started = None;
        let batch: Vec<OwnedMessage> = std::mem::take(&mut self.incoming)
            .into_iter()
            .filter(|m| {
                self.assigned
                    .contains(&(m.topic().to_owned(), m.partition()))
            })
            .collect();
        if batch.is_empty() {
            return true;
        }
        let Some(fresh) = self.prepare(batch).await else {
            return false;
        };
        self.route(fresh).await
    }

    /// Decodes and parses a batch; dead-letters what cannot be. What is read again for a
    /// spilled key passes only if it is that key's. `None` on shutdown.
    async fn prepare(&mut self, batch: Vec<OwnedMessage>) -> Option<Vec<Msg<P::Item>>> {
        // Writer schemas first (registry, cached per id), then the bulk Avro decoding on a
        // blocking thread so the runtime keeps serving the lanes.
        let mut schemas: Vec<Result<Arc<AvroSchema>, String>> = Vec::with_capacity(batch.len());
        for m in &batch {
            let schema = self
                .until_done("resolving a writer schema", Service::Registry, || async {
                    match self.codec.writer_schema(m.payload()).await {
                        Ok(s) => Ok(Ok(s)),
                        Err(e) if e.is_transient() => Err(StepError::from(e)),
                        Err(e) => Ok(Err(e.to_string())),
                    }
                })
                .await?;
            schemas.push(schema);
        }
        let owned: Vec<_> = batch
            .iter()
            .zip(&schemas)
            .filter_map(|(m, s)| Some((s.as_ref().ok()?.clone(), m.payload()?.to_vec())))
            .collect();
        let mut decoded = tokio::task::spawn_blocking(move || decode_batch(&owned))
            .await
            .expect("decoding does not panic")
            .into_iter();
        let mut fresh = Vec::with_capacity(batch.len());
        for (raw, schema) in batch.into_iter().zip(schemas) {
            let origin = Origin::of(&raw);
            let part = (origin.topic.clone(), origin.partition);
            let seen = self.seen.entry(part.clone()).or_insert(0);
            *seen = (*seen).max(origin.offset + 1);
            let parsed = match schema {
                Ok(_) if raw.payload().is_none() => Err("empty payload (tombstone)".to_owned()),
                Ok(_) => match decoded.next().expect("one result per decodable message") {
                    Ok(event) => self.p.parse(event, &origin),
                    Err(e) => Err(e.to_string()),
                },
                Err(reason) => Err(reason),
            };
            // Read again for a spilled key: only that key's events pass, and only those it has
            // not had yet; what could not be parsed was dead-lettered when first read.
            let again = self.spill.replaying(&part, origin.offset);
            let admitted = match &parsed {
                Ok(item) if again => {
                    self.spill
                        .admit(&part, &self.p.order_key(item), origin.offset)
                }
                Ok(_) => true,
                Err(_) => !again,
            };
            self.spill.taken(&part, origin.offset);
            if !admitted {
                continue;
            }
            let generation = self.generation.get(&part).copied().unwrap_or(0);
            match parsed {
                Ok(item) => {
                    let mut m = Msg::new(origin, item, raw);
                    m.generation = generation;
                    fresh.push(m);
                }
                Err(reason) => {
                    if !self.dead_letter(&raw, &origin, None, &reason).await {
                        return None;
                    }
                }
            }
        }
        Some(fresh)
    }

    /// Gates `msgs` and queues what is ready, per order key in log order; holds the rest.
    /// False on shutdown.
    async fn route(&mut self, msgs: Vec<Msg<P::Item>>) -> bool {
        if msgs.is_empty() {
            return true;
        }
        let mut keyed: Vec<(String, Vec<Msg<P::Item>>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for m in msgs {
            let key = self.p.order_key(&m.item);
            // Behind a held event of its key, or a run under way: it waits too.
            let behind = match self.held.head(&key) {
                Some(head) => Some(head.wait.clone()),
                None if self.busy.contains_key(&key) => Some(Wait::Busy),
                None => None,
            };
            if let Some(wait) = behind {
                if !self.hold(&key, m, wait).await {
                    return false;
                }
                continue;
            }
            match index.get(&key) {
                Some(&i) => keyed[i].1.push(m),
                None => {
                    index.insert(key.clone(), keyed.len());
                    keyed.push((key, vec![m]));
                }
            }
        }
        let gates = {
            let refs: Vec<&Msg<P::Item>> = keyed.iter().flat_map(|(_, ms)| ms.iter()).collect();
            match self.gate(&refs).await {
                Some(g) => g,
                None => return false,
            }
        };
        let mut gates = gates.into_iter();
        for (key, ms) in keyed {
            let mut ready = VecDeque::new();
            let mut ms = ms.into_iter();
            while let Some(m) = ms.next() {
                match gates.next().expect("one gate per message") {
                    Gate::Ready(target) => ready.push_back((m, target)),
                    Gate::Hold(wait) => {
                        tracing::debug!(
                            processor = self.name,
                            tenant = wait.tenant(),
                            offset = m.origin.offset,
                            "holding"
                        );
                        if !self.hold(&key, m, wait.clone()).await {
                            return false;
                        }
                        for rest in ms.by_ref() {
                            // Their own verdicts are dropped: they are gated again on release.
                            gates.next();
                            if !self.hold(&key, rest, wait.clone()).await {
                                return false;
                            }
                        }
                    }
                    Gate::Skip { reason, tenant } => self.skipped(reason, tenant.as_deref()),
                    Gate::Reject(reason) => {
                        if !self.dead_letter(&m.raw, &m.origin, None, &reason).await {
                            return false;
                        }
                    }
                }
            }
            if !ready.is_empty() {
                self.busy.insert(key.clone(), pins(&ready));
                self.ready.push_back((key, ready));
            }
        }
        true
    }

    /// Keeps `m` behind `key`'s queue, within the memory bounds: past `max_held` for its key
    /// or its tenant, an event waiting for a tenant that does not exist is dead-lettered; any
    /// other event past the bounds is left in the log, to be read again when the key is
    /// released. False on shutdown.
    async fn hold(&mut self, key: &str, m: Msg<P::Item>, wait: Wait) -> bool {
        let part = m.partition();
        if self.spill.is_spilled(key, &part) {
            return true;
        }
        let max = self.settings.max_held;
        let over_key = self.held.len(key) >= max;
        if let Wait::Tenant(tenant) = &wait {
            if over_key || self.held.waiting_for_tenant(tenant) >= max {
                metrics::counter!("tenancy_hold_quota_exceeded_total", "processor" => self.name)
                    .increment(1);
                let reason = format!(
                    "more than {max} events wait for tenant {tenant}, which does not exist or \
                     is not active yet (--max-held); replay this one once it is"
                );
                return self
                    .dead_letter(&m.raw, &m.origin, Some(tenant), &reason)
                    .await;
            }
        }
        if over_key || self.held.bytes() + m.held_bytes() > self.settings.max_held_bytes {
            metrics::counter!("tenancy_events_left_in_log_total", "processor" => self.name)
                .increment(1);
            if self.spill.mark(key, part, m.origin.offset) {
                tracing::info!(processor = self.name, key, topic = %m.origin.topic,
                    partition = m.origin.partition, offset = m.origin.offset,
                    held = self.held.len(key), "holding no more of this key in memory: its \
                     later events stay in the log and are read again when it is released");
            }
            return true;
        }
        self.held.push(key.to_owned(), m, wait);
        true
    }

    /// The lane of a run (its first target server), or the server that keeps it from running.
    fn lane_of(&self, run: &Run<P>) -> Result<String, Server> {
        let Some((_, target)) = run.front() else {
            return Ok("-".to_owned());
        };
        let servers = self.p.target_servers(target);
        if let Some(stuck) = servers
            .iter()
            .find(|s| !s.configured() || self.down.contains_key(s.name()))
        {
            return Err((*stuck).clone());
        }
        Ok(servers.first().map_or("-", |s| s.name()).to_owned())
    }

    /// Starts units while their lanes have room. A run for a server known down is parked
    /// without being tried.
    fn dispatch(&mut self) {
        if let Some(o) = &self.outage {
            if o.trying || Instant::now() < o.next_try {
                return;
            }
        }
        let per_lane = self.settings.write_concurrency.max(1);
        let group = self.p.group_size().max(1);
        let mut i = 0;
        while i < self.ready.len() {
            let lane = match self.lane_of(&self.ready[i].1) {
                Ok(lane) => lane,
                Err(server) => {
                    let (key, run) = self.ready.remove(i).expect("in range");
                    self.busy.remove(&key);
                    if !server.configured() {
                        self.server_down(&server, "not configured here (TENANCY_SERVERS)");
                    }
                    self.park(&key, run, Wait::Server(server.name().to_owned()));
                    continue;
                }
            };
            if self.slots.get(&lane).copied().unwrap_or(0) >= per_lane {
                i += 1;
                continue;
            }
            let (key, run) = self.ready.remove(i).expect("in range");
            let run = self.one_at_a_time(&key, run);
            let mut unit = vec![(key, run)];
            let single = |l: &Self, k: &str| l.trouble.get(k).is_some_and(|t| t.single);
            if group > 1 && !single(self, &unit[0].0) {
                let mut j = i;
                while unit.len() < group && j < self.ready.len() {
                    let fits = !single(self, &self.ready[j].0)
                        && self.lane_of(&self.ready[j].1).as_deref() == Ok(lane.as_str());
                    if fits {
                        unit.push(self.ready.remove(j).expect("in range"));
                    } else {
                        j += 1;
                    }
                }
            }
            self.launch(lane, unit);
            if let Some(o) = &mut self.outage {
                // One unit finds out whether the shared service is back.
                o.trying = true;
                return;
            }
        }
    }

    /// A key whose run failed as a whole is applied one event at a time until it has nothing
    /// left waiting: the rest of its run waits behind the first.
    fn one_at_a_time(&mut self, key: &str, mut run: Run<P>) -> Run<P> {
        if run.len() > 1 && self.trouble.get(key).is_some_and(|t| t.single) {
            let rest: Vec<Msg<P::Item>> = run.split_off(1).into_iter().map(|(m, _)| m).collect();
            self.held.park(key, rest, Wait::Busy);
        }
        run
    }

    /// Applies `runs` off the loop, under the attempt's time limit, and classifies what failed.
    fn launch(&mut self, lane: String, runs: Vec<(String, Run<P>)>) {
        *self.slots.entry(lane.clone()).or_default() += 1;
        for (key, run) in &runs {
            self.busy.insert(key.clone(), pins(run));
        }
        let p = self.p;
        let limit = self.settings.apply_timeout;
        let concurrency = self.settings.write_concurrency.max(1);
        let servers: Vec<Server> = p.servers().map(|s| s.all().to_vec()).unwrap_or_default();
        self.inflight.push(Box::pin(async move {
            let outcomes: Vec<Option<Result<(), Failed>>> = {
                let refs: Vec<super::ReadyRun<'_, P>> = runs
                    .iter()
                    .map(|(_, run)| run.iter().map(|(m, t)| (m, t)).collect())
                    .collect();
                let attempt = async {
                    if refs.len() == 1 {
                        vec![Some(p.apply(&refs[0]).await)]
                    } else {
                        p.apply_keys(&refs, concurrency).await
                    }
                };
                match tokio::time::timeout(limit, attempt).await {
                    Ok(outcomes) => outcomes,
                    // A group's runs are tried again one by one; a single run failed.
                    Err(_) if refs.len() > 1 => refs.iter().map(|_| None).collect(),
                    Err(_) => vec![Some(Err(Failed::at(
                        0,
                        StepError::outage(
                            Service::Mysql,
                            anyhow::anyhow!(
                                "no answer within {} (--apply-timeout)",
                                humantime::format_duration(limit)
                            ),
                        ),
                    )))],
                }
            };
            let mut done = Vec::with_capacity(runs.len());
            for ((key, run), outcome) in runs.into_iter().zip(outcomes) {
                let outcome = match outcome {
                    None => Outcome::Left,
                    Some(Ok(())) => Outcome::Applied,
                    Some(Err(f)) => {
                        let own: Vec<Server> = run
                            .get(f.applied)
                            .or(run.front())
                            .map(|(_, t)| p.target_servers(t).into_iter().cloned().collect())
                            .unwrap_or_default();
                        Outcome::Failed {
                            applied: f.applied,
                            blame: blame(f.error, &own, &servers).await,
                        }
                    }
                };
                done.push((key, run, outcome));
            }
            Done { lane, runs: done }
        }));
    }

    /// Takes a finished unit's outcomes. False on shutdown.
    async fn finished(&mut self, done: Done<P>) -> bool {
        if let Some(n) = self.slots.get_mut(&done.lane) {
            *n = n.saturating_sub(1);
        }
        // The unit that tried a shared service again: unless it failed the same way (which
        // sets the next try), the service is back.
        let trying = self.outage.as_ref().is_some_and(|o| o.trying);
        let go_on = self.finished_runs(done.runs).await;
        if trying && self.outage.as_ref().is_some_and(|o| o.trying) {
            self.outage_over();
        }
        go_on
    }

    async fn finished_runs(&mut self, runs: Vec<(String, Run<P>, Outcome)>) -> bool {
        for (key, mut run, outcome) in runs {
            self.busy.remove(&key);
            if run.iter().any(|(m, _)| !self.current(m)) {
                // Its partition was revoked meanwhile (and maybe assigned again): what is still
                // ours is routed again (applying is idempotent), the rest is the new owner's.
                let mine: Vec<Msg<P::Item>> = run
                    .into_iter()
                    .map(|(m, _)| m)
                    .filter(|m| self.current(m))
                    .collect();
                self.resume(&key, mine);
                continue;
            }
            let applied = match &outcome {
                Outcome::Applied => run.len(),
                Outcome::Left => 0,
                Outcome::Failed { applied, .. } => (*applied).min(run.len()),
            };
            if applied > 0 {
                metrics::counter!("tenancy_events_applied_total", "processor" => self.name)
                    .increment(applied as u64);
                run.drain(..applied);
                if let Some(t) = self.trouble.get_mut(&key) {
                    t.attempts = 0;
                    t.backoff = Backoff::new(self.settings.max_backoff);
                }
                self.outage_over();
            }
            match outcome {
                Outcome::Applied => {}
                Outcome::Left => {
                    self.busy.insert(key.clone(), pins(&run));
                    self.ready.push_front((key, run));
                    continue;
                }
                Outcome::Failed { .. } if run.is_empty() => {}
                Outcome::Failed { blame, .. } if self.stopping => {
                    // Not judged on the way out: the events stay unapplied and uncommitted.
                    drop(blame);
                    self.park(&key, run, Wait::Busy);
                    continue;
                }
                Outcome::Failed { blame, .. } => {
                    if !self.failed(&key, run, blame).await {
                        return false;
                    }
                    continue;
                }
            }
            self.after_key(&key);
        }
        true
    }

    /// A key's run stopped at its first event: park it, dead-letter it, or stop the loop, by
    /// whose failure it was. False on shutdown.
    async fn failed(&mut self, key: &str, mut run: Run<P>, blame: Blame) -> bool {
        let first = run.front().expect("a failed event").0.origin.clone();
        let tenant = first.key.clone().unwrap_or_else(|| key.to_owned());
        match blame {
            Blame::Shared { service, error } => {
                tracing::warn!(processor = self.name, %service, %tenant, topic = %first.topic,
                    partition = first.partition, offset = first.offset, %error,
                    "shared service unavailable: every key waits");
                self.health.outage(service, &error);
                let max = self.settings.max_backoff;
                let o = self.outage.get_or_insert_with(|| Outage {
                    next_try: Instant::now(),
                    backoff: Backoff::new(max),
                    trying: false,
                });
                o.trying = false;
                o.next_try = Instant::now() + o.backoff.step();
                self.busy.insert(key.to_owned(), pins(&run));
                self.ready.push_front((key.to_owned(), run));
                true
            }
            Blame::Server { server, error } => {
                self.server_down(&server, &error);
                tracing::info!(processor = self.name, server = server.name(), %tenant,
                    topic = %first.topic, partition = first.partition, offset = first.offset,
                    "parked until its MySQL server answers");
                self.park(key, run, Wait::Server(server.name().to_owned()));
                true
            }
            Blame::Key(StepError::Retry(e)) => {
                let error = format!("{e:#}");
                metrics::counter!("tenancy_retries_total", "processor" => self.name).increment(1);
                let max_backoff = self.settings.max_backoff;
                let t = self
                    .trouble
                    .entry(key.to_owned())
                    .or_insert_with(|| Trouble {
                        attempts: 0,
                        backoff: Backoff::new(max_backoff),
                        single: false,
                    });
                t.attempts += 1;
                let max = self.settings.max_attempts;
                if t.attempts < max {
                    let wait = t.backoff.step();
                    tracing::warn!(processor = self.name, %tenant, topic = %first.topic,
                        partition = first.partition, offset = first.offset, attempt = t.attempts,
                        max, retry_in_ms = wait.as_millis() as u64, %error,
                        "failed; parked for a retry while other tenants go on");
                    let at = Instant::now() + wait;
                    self.park(key, run, Wait::Retry { tenant, at, error });
                    true
                } else if run.len() > 1 && !t.single {
                    // Find the culprit: one event at a time from now on.
                    t.single = true;
                    t.attempts = 0;
                    let at = Instant::now();
                    self.park(key, run, Wait::Retry { tenant, at, error });
                    true
                } else {
                    let attempts = t.attempts;
                    t.attempts = 0;
                    t.backoff = Backoff::new(max_backoff);
                    let (m, _) = run.pop_front().expect("not empty");
                    let reason = format!("gave up after {attempts} attempts: {error}");
                    if !self.dead_letter(&m.raw, &m.origin, None, &reason).await {
                        return false;
                    }
                    self.resume(key, run.into_iter().map(|(m, _)| m).collect());
                    true
                }
            }
            Blame::Key(e) => {
                // A rejection (an outage is never the key's: see `blame`).
                let reason = e.to_string();
                let single = self.trouble.get(key).is_some_and(|t| t.single);
                if run.len() > 1 && !single {
                    let max_backoff = self.settings.max_backoff;
                    self.trouble
                        .entry(key.to_owned())
                        .or_insert_with(|| Trouble {
                            attempts: 0,
                            backoff: Backoff::new(max_backoff),
                            single: false,
                        })
                        .single = true;
                    self.resume(key, run.into_iter().map(|(m, _)| m).collect());
                    return true;
                }
                let (m, _) = run.pop_front().expect("not empty");
                if !self.dead_letter(&m.raw, &m.origin, None, &reason).await {
                    return false;
                }
                self.resume(key, run.into_iter().map(|(m, _)| m).collect());
                true
            }
        }
    }

    /// Puts a run back in front of its key's queue, waiting for `wait`. A run can be a whole
    /// batch of one key: past `max_held`, its tail is left in the log, to be read again.
    fn park(&mut self, key: &str, run: Run<P>, wait: Wait) {
        self.busy.remove(key);
        self.held
            .park(key, run.into_iter().map(|(m, _)| m).collect(), wait);
        let marks = self.held.spill_tail(key, self.settings.max_held.max(1));
        for (part, offset) in marks {
            self.spill.mark(key, part, offset);
        }
    }

    /// Puts `msgs` (a key's events that go on) back in front of what waited behind them, to be
    /// gated again with them at the next step: the tenant may have changed meanwhile.
    fn resume(&mut self, key: &str, msgs: Vec<Msg<P::Item>>) {
        if msgs.is_empty() && self.held.head(key).is_none() {
            self.after_key(key);
            return;
        }
        self.held.park(key, msgs, Wait::Busy);
        self.released.insert(key.to_owned());
    }

    /// A key's unit is done: what waited behind it goes on at the next step; a key with nothing
    /// left is forgotten, and read again from the log if events were left there.
    fn after_key(&mut self, key: &str) {
        if self.busy.contains_key(key) {
            return;
        }
        match self.held.head(key).map(|h| &h.wait) {
            Some(Wait::Busy) => {
                self.released.insert(key.to_owned());
            }
            Some(_) => {}
            None => {
                self.trouble.remove(key);
                if self.spill.marks.contains_key(key) {
                    self.spill.wanted.insert(key.to_owned());
                }
            }
        }
    }

    /// Gates and queues every released key's events together: one gate (one read of the
    /// tenants and the lifecycle log) for all of them, not one per key. Until then they stay
    /// held, so a key's newer events still line up behind them. False on shutdown.
    async fn route_released(&mut self) -> bool {
        if self.released.is_empty() {
            return true;
        }
        let mut msgs = Vec::new();
        for key in std::mem::take(&mut self.released) {
            if self.busy.contains_key(&key) {
                continue;
            }
            msgs.extend(self.held.take(&key).into_iter().map(|h| h.msg));
        }
        self.route(msgs).await
    }

    /// Seeks back to the first event left in the log of every key released since: only when
    /// nothing received is waiting to be taken, so no fresh message is mistaken for one read
    /// again.
    fn rewind_wanted(&mut self) {
        for key in std::mem::take(&mut self.spill.wanted) {
            let Some(marks) = self.spill.marks.remove(&key) else {
                continue;
            };
            for (part, from) in marks {
                let until = self.seen.get(&part).copied().unwrap_or(from);
                let position = self.spill.position.get(&part).copied().unwrap_or(until);
                let rewind = self.spill.rewinds.entry(part.clone()).or_insert(Rewind {
                    until,
                    next: HashMap::new(),
                });
                rewind.until = rewind.until.max(until);
                rewind.next.insert(key.clone(), from);
                if position <= from {
                    continue;
                }
                match self.consumer.seek(
                    &part.0,
                    part.1,
                    Offset::Offset(from),
                    Duration::from_secs(10),
                ) {
                    Ok(()) => {
                        self.spill.position.insert(part.clone(), from);
                        tracing::info!(processor = self.name, key, topic = %part.0,
                            partition = part.1, from, until = rewind.until,
                            "reading the log again for a released key's events left there");
                    }
                    Err(e) => {
                        // Tried again at the next safe point.
                        tracing::warn!(processor = self.name, key, topic = %part.0,
                            partition = part.1, from, error = %e, "cannot seek back; will retry");
                        let rewind = self.spill.rewinds.get_mut(&part).expect("just made");
                        rewind.next.remove(&key);
                        self.spill
                            .marks
                            .entry(key.clone())
                            .or_default()
                            .insert(part, from);
                        self.spill.wanted.insert(key.clone());
                    }
                }
            }
        }
    }

    /// Releases held keys that are due (a retry's time, a server back) and gates the heads of
    /// those waiting for a tenant or the lifecycle every `recheck_every`; dead-letters what
    /// waited longer than `hold_for` for something that never came. False on shutdown.
    async fn recheck(&mut self) -> bool {
        if self.held.count() == 0 {
            return true;
        }
        let now = Instant::now();
        let gate_due = self.last_recheck.elapsed() >= self.settings.recheck_every;
        let mut release = Vec::new();
        let mut to_gate = Vec::new();
        for key in self.held.keys() {
            let Some(head) = self.held.head(&key) else {
                continue;
            };
            match &head.wait {
                Wait::Retry { at, .. } if *at <= now && !self.busy.contains_key(&key) => {
                    release.push(key)
                }
                Wait::Server(name) if !self.down.contains_key(name) => release.push(key),
                Wait::Tenant(_) | Wait::Lifecycle | Wait::Changing(_) | Wait::Schema(_)
                    if gate_due =>
                {
                    to_gate.push(key)
                }
                _ => {}
            }
        }
        self.released.extend(release);
        if !gate_due {
            return true;
        }
        self.last_recheck = now;
        let hold_for = i64::try_from(self.settings.hold_for.as_millis()).unwrap_or(i64::MAX);
        for chunk in to_gate.chunks(500) {
            let gates = {
                let heads: Vec<&Msg<P::Item>> = chunk
                    .iter()
                    .filter_map(|k| self.held.head(k).map(|h| &h.msg))
                    .collect();
                match self.gate(&heads).await {
                    Some(g) => g,
                    None => return false,
                }
            };
            let now_ms = chrono::Utc::now().timestamp_millis();
            let keys = chunk.iter().filter(|k| self.held.head(k).is_some());
            for (key, gate) in keys.cloned().collect::<Vec<_>>().iter().zip(gates) {
                match gate {
                    Gate::Hold(wait) => {
                        let head = self.held.head(key).expect("a head");
                        let expired = wait.expires() && now_ms - head.msg.logged_at_ms >= hold_for;
                        if !expired {
                            // Now known to wait for a tenant that does not exist: what was
                            // left in the log for this key is read again and meets the quota
                            // (dead-lettered past it) instead of waiting unseen.
                            if matches!(wait, Wait::Tenant(_))
                                && self.spill.marks.contains_key(key.as_str())
                            {
                                self.spill.wanted.insert(key.clone());
                            }
                            self.held.set_wait(key, &wait);
                            continue;
                        }
                        let mut queue = self.held.take(key).into_iter();
                        let msg = queue.next().expect("a head").msg;
                        let waited = humantime::format_duration(self.settings.hold_for);
                        let reason = match &wait {
                            Wait::Changing(t) => format!(
                                "held for {waited} waiting for tenant {t}'s termination or \
                                 restore to finish"
                            ),
                            w => format!(
                                "held for {waited} waiting for tenant {}, which never became active",
                                w.tenant()
                            ),
                        };
                        metrics::counter!("tenancy_hold_expired_total", "processor" => self.name)
                            .increment(1);
                        if !self
                            .dead_letter(&msg.raw, &msg.origin, Some(wait.tenant()), &reason)
                            .await
                        {
                            return false;
                        }
                        let rest: Vec<Msg<P::Item>> = queue.map(|h| h.msg).collect();
                        self.resume(key, rest);
                    }
                    _ => {
                        self.released.insert(key.clone());
                    }
                }
            }
        }
        true
    }

    /// Records a server as down (once) and schedules its probes; one that is not configured
    /// here is never probed (only a restart with the right `TENANCY_SERVERS` brings it).
    fn server_down(&mut self, server: &Server, error: &str) {
        self.health.server_down(server.name(), error);
        if self.down.contains_key(server.name()) {
            return;
        }
        tracing::warn!(processor = self.name, server = server.name(), %error,
            "MySQL server unavailable: its tenants' events wait, every other tenant goes on");
        let mut backoff = Backoff::new(self.settings.max_backoff.max(Duration::from_secs(1)));
        let next_probe = Instant::now() + backoff.step();
        self.down.insert(
            server.name().to_owned(),
            Down {
                server: server.clone(),
                since: Instant::now(),
                error: error.to_owned(),
                next_probe,
                backoff,
                probing: false,
            },
        );
    }

    fn probe_due(&mut self) {
        let now = Instant::now();
        for (name, d) in &mut self.down {
            if d.probing || !d.server.configured() || now < d.next_probe {
                continue;
            }
            d.probing = true;
            let (name, server) = (name.clone(), d.server.clone());
            self.probes.push(Box::pin(async move {
                let r = server.probe(PROBE_TIMEOUT).await;
                (name, r)
            }));
        }
    }

    fn probed(&mut self, name: &str, result: Result<(), String>) {
        let Some(d) = self.down.get_mut(name) else {
            return;
        };
        match result {
            Ok(()) => {
                tracing::info!(
                    processor = self.name,
                    server = name,
                    down_ms = d.since.elapsed().as_millis() as u64,
                    "MySQL server answers again: releasing its tenants"
                );
                self.down.remove(name);
                self.health.server_up(name);
            }
            Err(error) => {
                d.probing = false;
                d.next_probe = Instant::now() + d.backoff.step();
                if error != d.error {
                    d.error = error.clone();
                    self.health.server_down(name, &error);
                }
            }
        }
    }

    fn outage_over(&mut self) {
        if self.outage.take().is_some() {
            self.health.outage_over();
        }
    }

    /// On the way out: the units under way finish, what they applied counts, the rest stays
    /// uncommitted.
    async fn drain(&mut self) {
        self.stopping = true;
        while let Some(done) = self.inflight.next().await {
            self.finished(done).await;
        }
        self.store_offsets().await;
    }

    /// The processor's verdicts, waiting out outages. `None` on shutdown.
    async fn gate(&self, msgs: &[&Msg<P::Item>]) -> Option<Vec<Gate<P::Target>>> {
        if msgs.is_empty() {
            return Some(Vec::new());
        }
        let gates = self
            .until_done("gating events", Service::Mysql, || self.p.gate(msgs))
            .await?;
        assert_eq!(
            gates.len(),
            msgs.len(),
            "{}: one verdict per event",
            self.name
        );
        Some(gates)
    }

    /// Runs `step` until it succeeds. Not about one event (a batch start, a gate, a watermark),
    /// so it is never dead-lettered: an outage is waited out, anything else is logged, reported
    /// (a long one makes the worker not ready) and retried. A step that does not answer within
    /// [`STEP_TIMEOUT`] (or the attempt limit, if longer) counts as an outage of `service`, the
    /// one it asks. `None` on shutdown.
    async fn until_done<T, F, Fut>(&self, what: &str, service: Service, mut step: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StepError>>,
    {
        let mut backoff = Backoff::new(self.settings.max_backoff);
        let mut failing = false;
        let limit = self.settings.apply_timeout.max(STEP_TIMEOUT);
        loop {
            let result = match tokio::time::timeout(limit, step()).await {
                Ok(r) => r,
                Err(_) => Err(StepError::outage(
                    service,
                    anyhow::anyhow!(
                        "{what}: no answer within {}",
                        humantime::format_duration(limit)
                    ),
                )),
            };
            match result {
                Ok(v) => {
                    if failing {
                        self.health.outage_over();
                        self.health.retry_over();
                    }
                    return Some(v);
                }
                Err(StepError::Outage { service, error }) => {
                    let error = format!("{error:#}");
                    tracing::warn!(processor = self.name, %service, %error, "{what}: shared service unavailable; waiting");
                    self.health.outage(service, &error);
                }
                Err(e) => {
                    tracing::error!(processor = self.name, error = %e, "{what} failed; retrying");
                    self.health.retrying(&format!("{what}: {e}"));
                }
            }
            failing = true;
            if !backoff.sleep(self.shutdown).await {
                return None;
            }
        }
    }

    fn skipped(&mut self, reason: SkipReason, tenant: Option<&str>) {
        match reason {
            SkipReason::Terminated => {
                metrics::counter!("tenancy_events_skipped_terminated_total", "processor" => self.name)
                    .increment(1);
                let tenant = tenant.unwrap_or("-");
                if self.skip_logged.len() > 10_000 {
                    self.skip_logged.clear();
                }
                if self.skip_logged.insert(tenant.to_owned()) {
                    tracing::info!(processor = self.name, %tenant,
                        "skipping events for a terminated tenant (logged once per tenant)");
                }
            }
            SkipReason::Ignored => {
                metrics::counter!("tenancy_events_ignored_total", "processor" => self.name)
                    .increment(1);
            }
        }
    }

    /// Sends one message to the dead-letter topic, waiting out a broker outage (a dead letter
    /// is never dropped). False on shutdown: the offset is not stored, so it is redelivered.
    async fn dead_letter(
        &self,
        raw: &OwnedMessage,
        origin: &Origin,
        tenant: Option<&str>,
        reason: &str,
    ) -> bool {
        tracing::error!(processor = self.name, topic = %origin.topic, partition = origin.partition,
            offset = origin.offset, tenant = tenant.or(origin.key.as_deref()).unwrap_or("-"), %reason,
            "sending to dead letters");
        metrics::counter!("tenancy_dead_letters_total", "processor" => self.name).increment(1);
        self.until_done("writing a dead letter", Service::Kafka, || async {
            match self
                .dead_letters
                .send(raw, origin, self.name, tenant, reason)
                .await
            {
                Ok(()) => Ok(()),
                Err(e @ SendError::Unavailable { .. }) => Err(super::error::kafka_outage(e)),
                Err(e @ SendError::Refused { .. }) => {
                    // About this event alone: waiting cannot help, and every other event would
                    // wait with it. The log line names where the event stays.
                    metrics::counter!("tenancy_dead_letters_unwritable_total", "processor" => self.name)
                        .increment(1);
                    tracing::error!(processor = self.name, topic = %origin.topic,
                        partition = origin.partition, offset = origin.offset, error = %e,
                        "cannot write this dead letter at all: passing over the event (it stays \
                         at this position in its topic)");
                    Ok(())
                }
            }
        })
        .await
        .is_some()
    }

    /// Stores, per owned partition, the offset the auto-commit may commit: past everything
    /// received, but never past an event held, queued, under way or left in the log. Tells
    /// the processor the new positions.
    async fn store_offsets(&mut self) {
        let mut lowest = self.held.lowest_offsets();
        let busy = self.busy.values().flatten().map(|(p, o)| (p, o));
        let spilled = self.spill.pins();
        for (part, offset) in busy.chain(spilled.iter()) {
            let entry = lowest.entry(part.clone()).or_insert(i64::MAX);
            *entry = (*entry).min(*offset);
        }
        let mut tpl = TopicPartitionList::new();
        let mut positions = Vec::new();
        for (part, seen) in &self.seen {
            if !self.assigned.contains(part) {
                continue;
            }
            let next = lowest.get(part).copied().unwrap_or(*seen).min(*seen);
            if self.stored.get(part).is_some_and(|s| *s >= next) {
                continue;
            }
            if tpl
                .add_partition_offset(&part.0, part.1, Offset::Offset(next))
                .is_ok()
            {
                positions.push(Position {
                    topic: part.0.clone(),
                    partition: part.1,
                    next,
                });
            }
        }
        if positions.is_empty() {
            return;
        }
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            // Revoked meanwhile: the new owner resumes from the last commit.
            tracing::debug!(processor = self.name, error = %e, "could not store some offsets");
        }
        if let Err(e) = self.p.progressed(&positions).await {
            // Only a watermark: the next batch publishes it again.
            tracing::warn!(processor = self.name, error = %e, "could not record progress; will retry");
            return;
        }
        for p in positions {
            self.stored.insert((p.topic, p.partition), p.next);
        }
    }

    /// What this loop holds, for readiness, `tenancy status` and metrics.
    fn report(&self) {
        let left: Vec<String> = self
            .spill
            .marks
            .iter()
            .flat_map(|(key, marks)| {
                marks
                    .iter()
                    .map(move |((t, p), from)| format!("{key} from {t}/{p}/{from}"))
            })
            .collect();
        self.health.holding(
            self.held.count(),
            self.held.bytes(),
            left,
            self.held.summary(
                chrono::Utc::now().timestamp_millis(),
                self.settings.hold_for,
                20,
            ),
        );
    }
}

/// Gathers a batch into `incoming`: waits for the first message at most `recheck_every` (so
/// held events get rechecked), then takes what arrives within `linger` of it, up to
/// `batch_max`. Everything received is in `incoming` as soon as it arrives, so dropping this
/// future half-way loses nothing. Returns the consumer's error, if one ended the batch.
async fn fill(
    consumer: &GroupConsumer,
    incoming: &mut Vec<OwnedMessage>,
    started: &mut Option<tokio::time::Instant>,
    settings: &Settings,
) -> Option<KafkaError> {
    if incoming.is_empty() {
        match tokio::time::timeout(settings.recheck_every, consumer.recv()).await {
            Ok(Ok(m)) => {
                incoming.push(m.detach());
                *started = Some(tokio::time::Instant::now());
            }
            Ok(Err(e)) => return Some(e),
            // Quiet, and no error: the broker answers.
            Err(_) => return None,
        }
    }
    let deadline = started
        .get_or_insert_with(tokio::time::Instant::now)
        .to_owned()
        + settings.linger;
    while incoming.len() < settings.batch_max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => incoming.push(m.detach()),
            Ok(Err(e)) => return Some(e),
            Err(_) => break,
        }
    }
    None
}

/// The lowest offset of a run per partition.
fn pins<I, T>(run: &VecDeque<(Msg<I>, T)>) -> Vec<(Partition, i64)> {
    let mut lowest: Vec<(Partition, i64)> = Vec::new();
    for (m, _) in run {
        let part = m.partition();
        match lowest.iter_mut().find(|(p, _)| *p == part) {
            Some((_, o)) => *o = (*o).min(m.origin.offset),
            None => lowest.push((part, m.origin.offset)),
        }
    }
    lowest
}

/// Whose failure `error` is. A MySQL outage (or an attempt that did not answer in time) is
/// looked into: the key's own servers are probed, then the others (a copy or a drop on another
/// server may be what failed). The home server not answering is everyone's; another server not
/// answering (or not configured here) is its tenants'; every server answering means the failure
/// was the key's own (a statement that ran too long, a connection that broke).
async fn blame(error: StepError, own: &[Server], all: &[Server]) -> Blame {
    match error {
        StepError::Outage {
            service: Service::Mysql,
            error,
        } if !all.is_empty() => {
            // A tenant on a server this process was not given: that server's, not a probe's.
            if let Some(name) = crate::store::servers::NotConfigured::in_chain(&error) {
                return Blame::Server {
                    server: Server::stand_in(name),
                    error: "not configured here (TENANCY_SERVERS)".to_owned(),
                };
            }
            let error = format!("{error:#}");
            let mut order: Vec<&Server> = own.iter().collect();
            for s in all {
                if !order.contains(&s) {
                    order.push(s);
                }
            }
            for server in order {
                if let Err(e) = server.probe(PROBE_TIMEOUT).await {
                    if server.name() == HOME {
                        return Blame::Shared {
                            service: Service::Mysql,
                            error: format!("{HOME}: {e}"),
                        };
                    }
                    return Blame::Server {
                        server: server.clone(),
                        error: e,
                    };
                }
            }
            Blame::Key(StepError::retry(anyhow::anyhow!(
                "{error} (every MySQL server answers)"
            )))
        }
        StepError::Outage { service, error } => Blame::Shared {
            service,
            error: format!("{error:#}"),
        },
        other => Blame::Key(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(p: i32) -> Partition {
        ("t".to_owned(), p)
    }

    #[test]
    fn a_rewind_lets_through_only_the_spilled_keys_events_it_has_not_had() {
        let mut spill = Spill::default();
        // Key a left events in the log from offset 5 on partition 0; the loop had read up to
        // 20 when a was released.
        assert!(spill.mark("a", part(0), 5));
        assert!(!spill.mark("a", part(0), 9), "the first mark stays");
        assert_eq!(spill.pins()[&part(0)], 5);
        spill.marks.remove("a");
        spill.rewinds.insert(
            part(0),
            Rewind {
                until: 20,
                next: HashMap::from([("a".to_owned(), 5)]),
            },
        );
        assert_eq!(spill.pins()[&part(0)], 5, "still pinned until re-read");
        assert!(spill.replaying(&part(0), 7) && !spill.replaying(&part(0), 20));
        assert!(!spill.replaying(&part(1), 7));
        assert!(
            !spill.admit(&part(0), "b", 7),
            "another key's: handled already"
        );
        assert!(!spill.admit(&part(0), "a", 4), "before its mark");
        assert!(spill.admit(&part(0), "a", 7));
        assert!(!spill.admit(&part(0), "a", 7), "never twice");
        assert_eq!(spill.pins()[&part(0)], 8);
        spill.taken(&part(0), 18);
        assert!(spill.rewinds.contains_key(&part(0)));
        spill.taken(&part(0), 19);
        assert!(spill.rewinds.is_empty(), "over once its end is reached");
        assert!(spill.pins().is_empty());
        assert_eq!(spill.position[&part(0)], 20);
    }

    #[test]
    fn revoked_partitions_forget_their_marks_and_rewinds() {
        let mut spill = Spill::default();
        spill.mark("a", part(0), 5);
        spill.mark("a", part(1), 6);
        spill.rewinds.insert(
            part(0),
            Rewind {
                until: 9,
                next: HashMap::new(),
            },
        );
        spill.forget(&HashSet::from([part(0)]));
        assert!(spill.is_spilled("a", &part(1)) && !spill.is_spilled("a", &part(0)));
        assert!(spill.rewinds.is_empty());
    }
}
