//! Events waiting for something (a tenant, the lifecycle, a retry, a server), queued per order
//! key in log order.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use super::consumer::Partition;
use super::{Msg, Wait};

/// A held event and what it waits for.
pub(super) struct Held<I> {
    pub msg: Msg<I>,
    pub wait: Wait,
}

/// One line of `tenancy status`: what waits for one tenant (or server).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HoldSummary {
    /// The organisation id waited for, `(lifecycle)`, or `server NAME`.
    pub waiting_for: String,
    pub events: usize,
    /// Seconds since the oldest of them entered the log.
    pub oldest_age_secs: u64,
    /// `topic/partition/offset` of the oldest.
    pub oldest: String,
    /// Why they wait, in a few words (the last error of a key being retried).
    #[serde(default)]
    pub why: String,
    /// Seconds until the oldest is dead-lettered for waiting too long, for waits that end so.
    #[serde(default)]
    pub deadline_secs: Option<u64>,
}

pub(super) struct HoldQueue<I> {
    queues: HashMap<String, VecDeque<Held<I>>>,
    /// Events waiting for each tenant that does not exist yet, over every key.
    per_tenant: HashMap<String, usize>,
    /// Events behind a unit under way (`Wait::Busy`): the loop's own queue, not a wait.
    behind: usize,
    count: usize,
    bytes: usize,
}

impl<I> Default for HoldQueue<I> {
    fn default() -> Self {
        HoldQueue {
            queues: HashMap::new(),
            per_tenant: HashMap::new(),
            behind: 0,
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

    /// Events waiting only behind a unit of their key under way.
    pub fn behind(&self) -> usize {
        self.behind
    }

    /// Events held for `key`.
    pub fn len(&self, key: &str) -> usize {
        self.queues.get(key).map_or(0, VecDeque::len)
    }

    /// Events held, over every key, waiting for tenant `id` to exist.
    pub fn waiting_for_tenant(&self, id: &str) -> usize {
        self.per_tenant.get(id).copied().unwrap_or(0)
    }

    fn added(&mut self, h: &Held<I>) {
        self.count += 1;
        self.bytes += h.msg.held_bytes();
        match &h.wait {
            Wait::Tenant(t) => *self.per_tenant.entry(t.clone()).or_default() += 1,
            Wait::Busy => self.behind += 1,
            _ => {}
        }
    }

    fn removed(&mut self, h: &Held<I>) {
        self.count -= 1;
        self.bytes -= h.msg.held_bytes();
        match &h.wait {
            Wait::Tenant(t) => {
                if let Some(n) = self.per_tenant.get_mut(t) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_tenant.remove(t);
                    }
                }
            }
            Wait::Busy => self.behind -= 1,
            _ => {}
        }
    }

    /// Appends to `key`'s queue.
    pub fn push(&mut self, key: String, msg: Msg<I>, wait: Wait) {
        let held = Held { msg, wait };
        self.added(&held);
        self.queues.entry(key).or_default().push_back(held);
    }

    /// Puts `msgs` (in log order) in front of `key`'s queue and makes the whole queue wait for
    /// `wait`: a parked key's failed run goes back ahead of what arrived behind it.
    pub fn park(&mut self, key: &str, msgs: Vec<Msg<I>>, wait: Wait) {
        let rest = self.take(key);
        for msg in msgs.into_iter().chain(rest.into_iter().map(|h| h.msg)) {
            self.push(key.to_owned(), msg, wait.clone());
        }
    }

    /// Keeps the first `keep` events of `key`'s queue and drops the rest, to be read again from
    /// the log: returns, per partition, the offset to read again from (its first dropped
    /// event). A kept event past that offset is dropped too, so nothing is delivered twice.
    pub fn spill_tail(&mut self, key: &str, keep: usize) -> Vec<(Partition, i64)> {
        if self.len(key) <= keep {
            return Vec::new();
        }
        let queue = self.take(key);
        let mut marks: Vec<(Partition, i64)> = Vec::new();
        for h in &queue[keep..] {
            let part = h.msg.partition();
            match marks.iter_mut().find(|(p, _)| *p == part) {
                Some((_, o)) => *o = (*o).min(h.msg.origin.offset),
                None => marks.push((part, h.msg.origin.offset)),
            }
        }
        for h in queue.into_iter().take(keep) {
            let part = h.msg.partition();
            let past = marks
                .iter()
                .any(|(p, o)| *p == part && h.msg.origin.offset >= *o);
            if !past {
                self.push(key.to_owned(), h.msg, h.wait);
            }
        }
        marks
    }

    /// Removes and returns `key`'s queue.
    pub fn take(&mut self, key: &str) -> Vec<Held<I>> {
        let queue = self.queues.remove(key).unwrap_or_default();
        for h in &queue {
            self.removed(h);
        }
        queue.into()
    }

    /// Every key with held events, oldest head first.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<(&String, i64)> = self
            .queues
            .iter()
            .map(|(k, q)| (k, q.front().map_or(0, |h| h.msg.logged_at_ms)))
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
        let Some(queue) = self.queues.remove(key) else {
            return;
        };
        for h in queue {
            self.removed(&h);
            self.push(
                key.to_owned(),
                h.msg,
                if h.wait == *wait {
                    h.wait
                } else {
                    wait.clone()
                },
            );
        }
    }

    /// Drops everything held from `revoked` partitions; returns how many went.
    pub fn drop_partitions(&mut self, revoked: &HashSet<Partition>) -> usize {
        let keys: Vec<String> = self.queues.keys().cloned().collect();
        let mut dropped = 0;
        for key in keys {
            let queue = self.take(&key);
            for h in queue {
                if revoked.contains(&h.msg.partition()) {
                    dropped += 1;
                } else {
                    self.push(key.clone(), h.msg, h.wait);
                }
            }
        }
        dropped
    }

    /// The lowest held offset per partition: the commit may not pass it.
    pub fn lowest_offsets(&self) -> HashMap<Partition, i64> {
        let mut lowest: HashMap<Partition, i64> = HashMap::new();
        for h in self.queues.values().flatten() {
            let entry = lowest.entry(h.msg.partition()).or_insert(i64::MAX);
            *entry = (*entry).min(h.msg.origin.offset);
        }
        lowest
    }

    /// What waits for whom, most events first (for status output). `now_ms` is the wall
    /// clock; `hold_for` the deadline of the waits that have one.
    pub fn summary(&self, now_ms: i64, hold_for: Duration, limit: usize) -> Vec<HoldSummary> {
        struct Line {
            events: usize,
            oldest_ms: i64,
            oldest: String,
            why: String,
            expires: bool,
        }
        let mut by_wait: BTreeMap<String, Line> = BTreeMap::new();
        for queue in self.queues.values() {
            let Some(head) = queue.front() else { continue };
            let label = match &head.wait {
                Wait::Server(name) => format!("server {name}"),
                w => w.tenant().to_owned(),
            };
            let line = by_wait.entry(label).or_insert(Line {
                events: 0,
                oldest_ms: i64::MAX,
                oldest: String::new(),
                why: head.wait.why(),
                expires: head.wait.expires(),
            });
            line.events += queue.len();
            if head.msg.logged_at_ms < line.oldest_ms {
                let o = &head.msg.origin;
                line.oldest_ms = head.msg.logged_at_ms;
                line.oldest = format!("{}/{}/{}", o.topic, o.partition, o.offset);
                line.why = head.wait.why();
            }
        }
        let hold_for_ms = i64::try_from(hold_for.as_millis()).unwrap_or(i64::MAX);
        let mut out: Vec<HoldSummary> = by_wait
            .into_iter()
            .map(|(waiting_for, l)| HoldSummary {
                waiting_for,
                events: l.events,
                oldest_age_secs: (now_ms - l.oldest_ms).max(0) as u64 / 1000,
                oldest: l.oldest,
                why: l.why,
                deadline_secs: l.expires.then(|| {
                    (l.oldest_ms.saturating_add(hold_for_ms) - now_ms).max(0) as u64 / 1000
                }),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::Origin;
    use rdkafka::message::{OwnedMessage, Timestamp};

    /// A message logged at `at` (epoch ms).
    fn msg(partition: i32, offset: i64, at: i64) -> Msg<()> {
        let raw = OwnedMessage::new(
            Some(vec![0; 100]),
            Some(b"k".to_vec()),
            "t".into(),
            Timestamp::CreateTime(at),
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
        let mut q = HoldQueue::default();
        q.push("a".into(), msg(0, 7, 1_000), Wait::Tenant("s1".into()));
        q.push("a".into(), msg(0, 9, 1_000), Wait::Tenant("s1".into()));
        q.push("b".into(), msg(1, 3, 1_000), Wait::Lifecycle);
        assert_eq!(q.count(), 3);
        assert_eq!((q.len("a"), q.waiting_for_tenant("s1")), (2, 2));
        let per = msg(0, 0, 0).held_bytes();
        assert_eq!(q.bytes(), 3 * per);
        assert_eq!(q.lowest_offsets()[&("t".to_owned(), 0)], 7);
        let summary = q.summary(61_000, Duration::from_secs(100), 10);
        assert_eq!(summary[0].waiting_for, "s1");
        assert_eq!(summary[0].events, 2);
        // Ages and deadlines count from the log's time, not from when this worker held them.
        assert_eq!(summary[0].oldest_age_secs, 60);
        assert_eq!(summary[0].deadline_secs, Some(40));
        assert_eq!(
            summary[1].deadline_secs, None,
            "the lifecycle log has no deadline"
        );

        let dropped = q.drop_partitions(&HashSet::from([("t".to_owned(), 0)]));
        assert_eq!((dropped, q.count(), q.bytes()), (2, 1, per));
        assert_eq!(q.waiting_for_tenant("s1"), 0);
        assert!(q.head("a").is_none());
        let taken = q.take("b");
        assert_eq!(taken.len(), 1);
        assert_eq!((q.count(), q.bytes()), (0, 0));
    }

    #[test]
    fn a_queue_reports_what_it_waits_for_now() {
        let mut q = HoldQueue::default();
        q.push("k".into(), msg(0, 1, 0), Wait::Lifecycle);
        q.push("k".into(), msg(0, 2, 0), Wait::Lifecycle);
        assert_eq!(
            q.summary(0, Duration::ZERO, 5)[0].waiting_for,
            "(lifecycle)"
        );
        q.set_wait("k", &Wait::Tenant("s9".into()));
        let summary = q.summary(0, Duration::ZERO, 5);
        assert_eq!(summary.len(), 1);
        assert_eq!(
            (summary[0].waiting_for.as_str(), summary[0].events),
            ("s9", 2)
        );
        assert_eq!(q.waiting_for_tenant("s9"), 2);
    }

    #[test]
    fn a_long_queue_keeps_its_head_and_says_where_to_read_the_rest_again() {
        let mut q = HoldQueue::default();
        for offset in [10, 11, 12, 13, 14] {
            q.push("k".into(), msg(0, offset, 0), Wait::Busy);
        }
        q.push("k".into(), msg(1, 3, 0), Wait::Busy);
        assert!(q.spill_tail("k", 6).is_empty(), "within bounds");
        let marks = q.spill_tail("k", 2);
        assert_eq!(marks, [(("t".to_owned(), 0), 12), (("t".to_owned(), 1), 3)]);
        let kept: Vec<i64> = q.take("k").iter().map(|h| h.msg.origin.offset).collect();
        assert_eq!(kept, [10, 11]);
        assert_eq!((q.count(), q.bytes()), (0, 0));
    }

    #[test]
    fn a_parked_run_goes_back_in_front_of_what_arrived_behind_it() {
        let mut q = HoldQueue::default();
        q.push("k".into(), msg(0, 5, 0), Wait::Busy);
        q.park(
            "k",
            vec![msg(0, 3, 0), msg(0, 4, 0)],
            Wait::Server("east".into()),
        );
        let offsets: Vec<i64> = q.take("k").iter().map(|h| h.msg.origin.offset).collect();
        assert_eq!(offsets, [3, 4, 5]);
        q.park("k", vec![msg(0, 3, 0)], Wait::Server("east".into()));
        assert_eq!(
            q.summary(0, Duration::ZERO, 5)[0].waiting_for,
            "server east"
        );
    }
}
