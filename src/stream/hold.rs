//! Events waiting for something (a tenant, the lifecycle), queued per order key in log order.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::consumer::Partition;
use super::{Msg, Wait};

/// A held event and what it waits for.
pub(super) struct Held<I> {
    pub msg: Msg<I>,
    pub wait: Wait,
}

/// One line of `tenancy status`: what waits for one tenant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HoldSummary {
    /// The organisation id waited for, or `(lifecycle)`.
    pub waiting_for: String,
    pub events: usize,
    /// Seconds since the oldest of them was first held.
    pub oldest_age_secs: u64,
    /// `topic/partition/offset` of the oldest.
    pub oldest: String,
}

pub(super) struct HoldQueue<I> {
    queues: HashMap<String, VecDeque<Held<I>>>,
    count: usize,
    bytes: usize,
}

impl<I> Default for HoldQueue<I> {
    fn default() -> Self {
        HoldQueue {
            queues: HashMap::new(),
            count: 0,
            bytes: 0,
        }
    }
}

impl<I> HoldQueue<I> {
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends to `key`'s queue; the deadline clock starts on first hold and keeps running
    /// when an event is released and held again.
    pub fn push(&mut self, key: String, mut msg: Msg<I>, wait: Wait, now: Instant) {
        msg.held_since.get_or_insert(now);
        self.count += 1;
        self.bytes += msg.held_bytes();
        self.queues
            .entry(key)
            .or_default()
            .push_back(Held { msg, wait });
    }

    /// Removes and returns `key`'s queue.
    pub fn take(&mut self, key: &str) -> Vec<Held<I>> {
        let queue = self.queues.remove(key).unwrap_or_default();
        for h in &queue {
            self.count -= 1;
            self.bytes -= h.msg.held_bytes();
        }
        queue.into()
    }

    /// Every key with held events, oldest first-held head first.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<(&String, Option<Instant>)> = self
            .queues
            .iter()
            .map(|(k, q)| (k, q.front().and_then(|h| h.msg.held_since)))
            .collect();
        keys.sort_by_key(|(_, since)| *since);
        keys.into_iter().map(|(k, _)| k.clone()).collect()
    }

    pub fn head(&self, key: &str) -> Option<&Held<I>> {
        self.queues.get(key).and_then(VecDeque::front)
    }

    /// What `key`'s queue waits for now (a wait can change: first the lifecycle, then a
    /// tenant that does not exist yet).
    pub fn set_wait(&mut self, key: &str, wait: &Wait) {
        for h in self.queues.get_mut(key).into_iter().flatten() {
            if h.wait != *wait {
                h.wait = wait.clone();
            }
        }
    }

    /// Drops everything held from `revoked` partitions; returns how many went.
    pub fn drop_partitions(&mut self, revoked: &HashSet<Partition>) -> usize {
        let mut dropped = 0;
        let mut bytes = 0;
        self.queues.retain(|_, queue| {
            queue.retain(|h| {
                let gone = revoked.contains(&(h.msg.origin.topic.clone(), h.msg.origin.partition));
                if gone {
                    dropped += 1;
                    bytes += h.msg.held_bytes();
                }
                !gone
            });
            !queue.is_empty()
        });
        self.count -= dropped;
        self.bytes -= bytes;
        dropped
    }

    /// The lowest held offset per partition: the commit may not pass it.
    pub fn lowest_offsets(&self) -> HashMap<Partition, i64> {
        let mut lowest: HashMap<Partition, i64> = HashMap::new();
        for h in self.queues.values().flatten() {
            let key = (h.msg.origin.topic.clone(), h.msg.origin.partition);
            let entry = lowest.entry(key).or_insert(i64::MAX);
            *entry = (*entry).min(h.msg.origin.offset);
        }
        lowest
    }

    /// What waits for whom, most events first (for status output).
    pub fn summary(&self, now: Instant, limit: usize) -> Vec<HoldSummary> {
        let mut by_wait: BTreeMap<String, (usize, Duration, String)> = BTreeMap::new();
        for h in self.queues.values().flatten() {
            let age = h.msg.held_since.map_or(Duration::ZERO, |s| now - s);
            let o = &h.msg.origin;
            let entry = by_wait.entry(h.wait.tenant().to_owned()).or_insert((
                0,
                Duration::ZERO,
                String::new(),
            ));
            entry.0 += 1;
            if age >= entry.1 {
                entry.1 = age;
                entry.2 = format!("{}/{}/{}", o.topic, o.partition, o.offset);
            }
        }
        let mut out: Vec<HoldSummary> = by_wait
            .into_iter()
            .map(|(waiting_for, (events, age, oldest))| HoldSummary {
                waiting_for,
                events,
                oldest_age_secs: age.as_secs(),
                oldest,
            })
            .collect();
        out.sort_by(|a, b| {
            b.events
                .cmp(&a.events)
                .then(a.waiting_for.cmp(&b.waiting_for))
        });
        out.truncate(limit);
        out
    }

    /// Partitions that currently hold something.
    pub fn partitions(&self) -> HashSet<Partition> {
        self.queues
            .values()
            .flatten()
            .map(|h| (h.msg.origin.topic.clone(), h.msg.origin.partition))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::Origin;
    use rdkafka::message::{OwnedMessage, Timestamp};

    fn msg(partition: i32, offset: i64) -> Msg<()> {
        let raw = OwnedMessage::new(
            Some(vec![0; 100]),
            Some(b"k".to_vec()),
            "t".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        );
        Msg::new(
            Origin {
                topic: "t".into(),
                partition,
                offset,
                key: None,
            },
            (),
            raw,
        )
    }

    #[test]
    fn counts_bytes_and_lowest_offsets_follow_pushes_takes_and_revokes() {
        let now = Instant::now();
        let mut q = HoldQueue::default();
        q.push("a".into(), msg(0, 7), Wait::Tenant("s1".into()), now);
        q.push("a".into(), msg(0, 9), Wait::Tenant("s1".into()), now);
        q.push("b".into(), msg(1, 3), Wait::Lifecycle, now);
        assert_eq!(q.count(), 3);
        let per = msg(0, 0).held_bytes();
        assert_eq!(q.bytes(), 3 * per);
        assert_eq!(q.lowest_offsets()[&("t".to_owned(), 0)], 7);
        let summary = q.summary(now, 10);
        assert_eq!(summary[0].waiting_for, "s1");
        assert_eq!(summary[0].events, 2);

        let dropped = q.drop_partitions(&HashSet::from([("t".to_owned(), 0)]));
        assert_eq!((dropped, q.count(), q.bytes()), (2, 1, per));
        assert!(q.head("a").is_none());
        let taken = q.take("b");
        assert_eq!(taken.len(), 1);
        assert_eq!((q.count(), q.bytes()), (0, 0));
        assert!(taken[0].msg.held_since.is_some());
    }

    #[test]
    fn a_queue_reports_what_it_waits_for_now() {
        let now = Instant::now();
        let mut q = HoldQueue::default();
        q.push("k".into(), msg(0, 1), Wait::Lifecycle, now);
        q.push("k".into(), msg(0, 2), Wait::Lifecycle, now);
        assert_eq!(q.summary(now, 5)[0].waiting_for, "(lifecycle)");
        q.set_wait("k", &Wait::Tenant("s9".into()));
        let summary = q.summary(now, 5);
        assert_eq!(summary.len(), 1);
        assert_eq!(
            (summary[0].waiting_for.as_str(), summary[0].events),
            ("s9", 2)
        );
    }
}
