//! The loop: receive a batch, take rebalances, decode, gate, apply (with the error policy of
//! [`super::error`]), recheck held events, store offsets, apply backpressure, report.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use schema_registry_converter::avro_common::AvroSchema;
use tokio_util::sync::CancellationToken;

use super::consumer::{self, describe, GroupConsumer, Partition, Rebalance};
use super::dead_letters::DeadLetters;
use super::error::{Service, StepError};
use super::health::ProcessorHealth;
use super::hold::{Held, HoldQueue};
use super::{Gate, Msg, Origin, Position, Processor, Settings, SkipReason, Wait};
use crate::wire::{decode_batch, Codec};

/// Runs `processor` over `consumer` until `shutdown`; on the way out the stored offsets are
/// committed. Returns an error only for what makes the worker unable to go on at all.
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
        assigned: BTreeSet::new(),
        seen: HashMap::new(),
        stored: HashMap::new(),
        paused: HashSet::new(),
        skip_logged: HashSet::new(),
        last_recheck: Instant::now(),
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
    consumer::depart(consumer, leave);
    Ok(())
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
    assigned: BTreeSet<Partition>,
    /// Per partition: the offset after the highest one received.
    seen: HashMap<Partition, i64>,
    /// Per partition: the offset last stored for the auto-commit.
    stored: HashMap<Partition, i64>,
    paused: HashSet<Partition>,
    skip_logged: HashSet<String>,
    last_recheck: Instant,
}

/// One key's ready events with their targets, in log order.
type Run<P> = VecDeque<(Msg<<P as Processor>::Item>, <P as Processor>::Target)>;

/// Doubling waits up to a ceiling.
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

    /// Sleeps; false if shutdown came first.
    async fn sleep(&mut self, shutdown: &CancellationToken) -> bool {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

impl<'a, P: Processor> Loop<'a, P> {
    async fn run(&mut self) {
        loop {
            let batch = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                b = self.next_batch() => b,
            };
            // Rebalance callbacks ran inside recv: act on them before anything is applied.
            self.take_rebalances();
            let batch: Vec<OwnedMessage> = batch
                .into_iter()
                .filter(|m| {
                    self.assigned
                        .contains(&(m.topic().to_owned(), m.partition()))
                })
                .collect();
            if !batch.is_empty() {
                let Some(fresh) = self.prepare(batch).await else {
                    return;
                };
                if !self.route(fresh).await {
                    return;
                }
            }
            if self.held.count() > 0 && self.last_recheck.elapsed() >= self.settings.recheck_every {
                self.last_recheck = Instant::now();
                if !self.recheck().await {
                    return;
                }
            }
            self.store_offsets().await;
            self.backpressure();
            self.health.holding(
                self.held.count(),
                self.held.bytes(),
                self.paused
                    .iter()
                    .map(|(t, p)| format!("{t}/{p}"))
                    .collect(),
                self.held.summary(Instant::now(), 20),
            );
        }
    }

    /// Up to `batch_max` messages: waits for the first at most `recheck_every` (so held events
    /// get rechecked), then takes what arrives within `linger`.
    async fn next_batch(&self) -> Vec<OwnedMessage> {
        let mut batch = Vec::new();
        let first = tokio::time::timeout(self.settings.recheck_every, self.consumer.recv()).await;
        match first {
            Ok(Ok(m)) => batch.push(m.detach()),
            Ok(Err(e)) => {
                self.consumer_error(&e);
                return batch;
            }
            // Quiet, and no error: the broker answers.
            Err(_) => return batch,
        }
        let deadline = tokio::time::Instant::now() + self.settings.linger;
        while batch.len() < self.settings.batch_max {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m.detach()),
                Ok(Err(e)) => {
                    self.consumer_error(&e);
                    break;
                }
                Err(_) => break,
            }
        }
        batch
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
                Rebalance::Assigned(parts) => self.assigned.extend(parts),
                Rebalance::Revoked(parts) => {
                    let revoked: HashSet<Partition> = parts.into_iter().collect();
                    for part in &revoked {
                        self.assigned.remove(part);
                        self.seen.remove(part);
                        self.stored.remove(part);
                        self.paused.remove(part);
                    }
                    // Their new owner fetches them again from the committed offset, which never
                    // passed a held event.
                    let dropped = self.held.drop_partitions(&revoked);
                    if dropped > 0 {
                        tracing::info!(processor = self.name, dropped,
                            partitions = %describe(&revoked.into_iter().collect::<Vec<_>>()),
                            "dropped the held events of revoked partitions");
                    }
                }
                Rebalance::Error(_) => {}
            }
        }
        // What librdkafka holds is the truth; the callbacks only tell when to look.
        self.assigned = consumer::assignment(self.consumer);
        self.health.assigned(
            self.assigned
                .iter()
                .map(|(t, p)| format!("{t}/{p}"))
                .collect(),
        );
    }

    /// Decodes and parses a batch; dead-letters what cannot be. `None` on shutdown.
    async fn prepare(&mut self, batch: Vec<OwnedMessage>) -> Option<Vec<Msg<P::Item>>> {
        for m in &batch {
            let next = self
                .seen
                .entry((m.topic().to_owned(), m.partition()))
                .or_insert(0);
            *next = (*next).max(m.offset() + 1);
        }
        // Writer schemas first (registry, cached per id), then the bulk Avro decoding on a
        // blocking thread so the runtime keeps serving the other loops.
        let mut schemas: Vec<Result<Arc<AvroSchema>, String>> = Vec::with_capacity(batch.len());
        for m in &batch {
            let schema = self
                .until_done("resolving a writer schema", || async {
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
            let parsed = match schema {
                Ok(_) if raw.payload().is_none() => Err("empty payload (tombstone)".to_owned()),
                Ok(_) => match decoded.next().expect("one result per decodable message") {
                    Ok(event) => self.p.parse(event, &origin),
                    Err(e) => Err(e.to_string()),
                },
                Err(reason) => Err(reason),
            };
            match parsed {
                Ok(item) => fresh.push(Msg::new(origin, item, raw)),
                Err(reason) => {
                    if !self.dead_letter(&raw, &origin, None, &reason).await {
                        return None;
                    }
                }
            }
        }
        Some(fresh)
    }

    /// Gates `msgs` and applies what is ready, per order key in log order. False on shutdown.
    async fn route(&mut self, msgs: Vec<Msg<P::Item>>) -> bool {
        if msgs.is_empty() {
            return true;
        }
        let now = Instant::now();
        let mut keyed: Vec<(String, Vec<Msg<P::Item>>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for m in msgs {
            let key = self.p.order_key(&m.item);
            if let Some(head) = self.held.head(&key) {
                // Behind a held event of its key: it waits too, whatever its own gate says.
                let wait = head.wait.clone();
                self.held.push(key, m, wait, now);
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
        let mut ready_keys: Vec<(String, Run<P>)> = Vec::new();
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
                        self.held.push(key.clone(), m, wait.clone(), now);
                        for rest in ms.by_ref() {
                            // Their own verdicts are dropped: they are gated again on release.
                            gates.next();
                            self.held.push(key.clone(), rest, wait.clone(), now);
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
                ready_keys.push((key, ready));
            }
        }
        self.apply_keys(ready_keys).await
    }

    /// Applies the ready runs of many keys: a first attempt at all of them by the processor
    /// ([`Processor::apply_keys`]: by default up to `write_concurrency` keys at a time), then
    /// the retry policy of [`Loop::apply_key`], one key at a time, for the runs that failed or
    /// were left. Order within a key is kept: a key's run is one unit in either path.
    async fn apply_keys(&mut self, keys: Vec<(String, Run<P>)>) -> bool {
        let concurrency = self.settings.write_concurrency.max(1);
        let mut outcomes: HashMap<usize, Result<(), super::Failed>> = if keys.len() < 2 {
            HashMap::new()
        } else {
            let runs: Vec<super::ReadyRun<'_, P>> = keys
                .iter()
                .map(|(_, run)| run.iter().map(|(m, t)| (m, t)).collect())
                .collect();
            self.p
                .apply_keys(&runs, concurrency)
                .await
                .into_iter()
                .enumerate()
                .filter_map(|(i, outcome)| Some((i, outcome?)))
                .collect()
        };
        for (i, (key, mut run)) in keys.into_iter().enumerate() {
            match outcomes.remove(&i) {
                Some(Ok(())) => {
                    metrics::counter!("tenancy_events_applied_total", "processor" => self.name)
                        .increment(run.len() as u64);
                    self.health.outage_over();
                    continue;
                }
                Some(Err(failed)) => {
                    // What the first attempt applied stays applied; the rest takes the slow path.
                    let done = failed.applied.min(run.len());
                    if done > 0 {
                        metrics::counter!("tenancy_events_applied_total", "processor" => self.name)
                            .increment(done as u64);
                    }
                    run.drain(..done);
                }
                None => {}
            }
            if !run.is_empty() && !self.apply_key(&key, run).await {
                return false;
            }
        }
        true
    }

    /// Applies one key's ready events with the error policy: outages waited out, errors that
    /// may heal retried `max_attempts` times, then (or on a rejection) the event dead-lettered.
    /// A multi-event unit that fails is retried one event at a time to find the culprit.
    async fn apply_key(
        &mut self,
        key: &str,
        mut pending: VecDeque<(Msg<P::Item>, P::Target)>,
    ) -> bool {
        let mut single = false;
        let mut attempts = 0u32;
        let mut backoff = Backoff::new(self.settings.max_backoff);
        while !pending.is_empty() {
            let n = if single { 1 } else { pending.len() };
            let result = {
                let run: Vec<(&Msg<P::Item>, &P::Target)> =
                    pending.iter().take(n).map(|(m, t)| (m, t)).collect();
                self.p.apply(&run).await
            };
            let (done, error) = match result {
                Ok(()) => (n, None),
                Err(f) => (f.applied.min(n), Some(f.error)),
            };
            if done > 0 {
                metrics::counter!("tenancy_events_applied_total", "processor" => self.name)
                    .increment(done as u64);
                pending.drain(..done);
                attempts = 0;
                backoff = Backoff::new(self.settings.max_backoff);
                self.health.retry_over();
            }
            let Some(error) = error else {
                self.health.outage_over();
                continue;
            };
            if pending.is_empty() {
                continue;
            }
            let multi = n - done > 1;
            let first = &pending[0].0.origin;
            let tenant = first.key.clone().unwrap_or_default();
            match error {
                StepError::Outage { service, error } => {
                    let error = format!("{error:#}");
                    tracing::warn!(processor = self.name, %service, %tenant, topic = %first.topic,
                        partition = first.partition, offset = first.offset, %error,
                        "shared service unavailable: waiting");
                    self.health.outage(service, &error);
                    if !backoff.sleep(self.shutdown).await {
                        return false;
                    }
                }
                StepError::Retry(e) => {
                    attempts += 1;
                    metrics::counter!("tenancy_retries_total", "processor" => self.name)
                        .increment(1);
                    let error = format!("{e:#}");
                    if attempts < self.settings.max_attempts {
                        tracing::warn!(processor = self.name, %tenant, topic = %first.topic,
                            partition = first.partition, offset = first.offset, attempt = attempts,
                            max = self.settings.max_attempts, %error, "failed; retrying");
                        self.health.retrying(&format!(
                            "{tenant} at {}/{}/{}: {error}",
                            first.topic, first.partition, first.offset
                        ));
                        if !backoff.sleep(self.shutdown).await {
                            return false;
                        }
                    } else if multi {
                        single = true;
                        attempts = 0;
                    } else {
                        let (m, _) = pending.pop_front().expect("not empty");
                        let reason = format!("gave up after {attempts} attempts: {error}");
                        if !self.dead_letter(&m.raw, &m.origin, None, &reason).await {
                            return false;
                        }
                        attempts = 0;
                        self.health.retry_over();
                    }
                }
                StepError::Reject(reason) => {
                    if multi {
                        single = true;
                    } else {
                        let (m, _) = pending.pop_front().expect("not empty");
                        if !self.dead_letter(&m.raw, &m.origin, None, &reason).await {
                            return false;
                        }
                    }
                }
            }
            // The tenant may have been archived or restored meanwhile: gate what is left again.
            if !pending.is_empty() && !self.regate(key, &mut pending).await {
                return false;
            }
        }
        true
    }

    /// Gates `pending` again in place: verdicts may have changed since they were first given.
    async fn regate(
        &mut self,
        key: &str,
        pending: &mut VecDeque<(Msg<P::Item>, P::Target)>,
    ) -> bool {
        let gates = {
            let refs: Vec<&Msg<P::Item>> = pending.iter().map(|(m, _)| m).collect();
            match self.gate(&refs).await {
                Some(g) => g,
                None => return false,
            }
        };
        let now = Instant::now();
        let mut kept = VecDeque::with_capacity(pending.len());
        let mut holding: Option<Wait> = None;
        for ((m, _), gate) in std::mem::take(pending).into_iter().zip(gates) {
            if let Some(wait) = &holding {
                self.held.push(key.to_owned(), m, wait.clone(), now);
                continue;
            }
            match gate {
                Gate::Ready(target) => kept.push_back((m, target)),
                Gate::Hold(wait) => {
                    self.held.push(key.to_owned(), m, wait.clone(), now);
                    holding = Some(wait);
                }
                Gate::Skip { reason, tenant } => self.skipped(reason, tenant.as_deref()),
                Gate::Reject(reason) => {
                    if !self.dead_letter(&m.raw, &m.origin, None, &reason).await {
                        return false;
                    }
                }
            }
        }
        *pending = kept;
        true
    }

    /// Gates the heads of the held queues; releases what is ready or settled, dead-letters
    /// what waited longer than `hold_for` for a tenant that never came.
    async fn recheck(&mut self) -> bool {
        let keys = self.held.keys();
        for chunk in keys.chunks(500) {
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
            let now = Instant::now();
            for (key, gate) in chunk.iter().zip(gates) {
                let expired = match &gate {
                    Gate::Hold(Wait::Tenant(_)) => self.held.head(key).is_some_and(|h| {
                        h.msg
                            .held_since
                            .is_some_and(|s| now - s >= self.settings.hold_for)
                    }),
                    _ => false,
                };
                match gate {
                    Gate::Hold(wait) if !expired => self.held.set_wait(key, &wait),
                    Gate::Hold(wait) => {
                        let mut queue = self.held.take(key).into_iter();
                        let Held { msg, .. } = queue.next().expect("a head");
                        let reason = format!(
                            "held for {} waiting for tenant {}, which never became active",
                            humantime::format_duration(self.settings.hold_for),
                            wait.tenant()
                        );
                        metrics::counter!("tenancy_hold_expired_total", "processor" => self.name)
                            .increment(1);
                        if !self
                            .dead_letter(&msg.raw, &msg.origin, Some(wait.tenant()), &reason)
                            .await
                        {
                            return false;
                        }
                        if !self.route(queue.map(|h| h.msg).collect()).await {
                            return false;
                        }
                    }
                    _ => {
                        let queue = self.held.take(key);
                        if !self.route(queue.into_iter().map(|h| h.msg).collect()).await {
                            return false;
                        }
                    }
                }
            }
        }
        true
    }

    /// The processor's verdicts, waiting out outages. `None` on shutdown.
    async fn gate(&self, msgs: &[&Msg<P::Item>]) -> Option<Vec<Gate<P::Target>>> {
        if msgs.is_empty() {
            return Some(Vec::new());
        }
        let gates = self
            .until_done("gating events", || self.p.gate(msgs))
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
    /// (a long one makes the worker not ready) and retried. `None` on shutdown.
    async fn until_done<T, F, Fut>(&self, what: &str, mut step: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StepError>>,
    {
        let mut backoff = Backoff::new(self.settings.max_backoff);
        let mut failing = false;
        loop {
            match step().await {
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
        self.until_done("writing a dead letter", || async {
            self.dead_letters
                .send(raw, origin, self.name, tenant, reason)
                .await
                .map_err(super::error::kafka_outage)
        })
        .await
        .is_some()
    }

    /// Stores, per owned partition, the offset the auto-commit may commit: past everything
    /// received, but never past a held event. Tells the processor the new positions.
    async fn store_offsets(&mut self) {
        let lowest_held = self.held.lowest_offsets();
        let mut tpl = TopicPartitionList::new();
        let mut positions = Vec::new();
        for (part, seen) in &self.seen {
            if !self.assigned.contains(part) {
                continue;
            }
            let next = lowest_held.get(part).copied().unwrap_or(*seen).min(*seen);
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

    /// Pauses the partitions holding events once too many (or too large) are held; resumes
    /// them below half.
    fn backpressure(&mut self) {
        let s = self.settings;
        let over = self.held.count() > s.max_held || self.held.bytes() > s.max_held_bytes;
        if over {
            let holding = self.held.partitions();
            let mut tpl = TopicPartitionList::new();
            for (t, p) in holding.difference(&self.paused) {
                tpl.add_partition(t, *p);
            }
            if tpl.count() > 0 && self.consumer.pause(&tpl).is_ok() {
                tracing::warn!(
                    processor = self.name,
                    held = self.held.count(),
                    bytes = self.held.bytes(),
                    max = s.max_held,
                    max_bytes = s.max_held_bytes,
                    "too many events waiting: pausing the partitions holding them"
                );
                self.paused.extend(holding);
            }
        } else if !self.paused.is_empty()
            && self.held.count() <= s.max_held / 2
            && self.held.bytes() <= s.max_held_bytes / 2
        {
            let mut tpl = TopicPartitionList::new();
            for (t, p) in &self.paused {
                tpl.add_partition(t, *p);
            }
            if self.consumer.resume(&tpl).is_ok() {
                tracing::info!(
                    processor = self.name,
                    held = self.held.count(),
                    "resuming paused partitions"
                );
                self.paused.clear();
            }
        }
    }
}
