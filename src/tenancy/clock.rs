//! Which clock a lifecycle decision trusts: the event's own `occurred_at`, said by its producer,
//! or the log's timestamp of the message, set when it was produced (a replayed dead letter keeps
//! its original's).
//!
//! A producer's clock is believed only within bounds of the log's: at most [`AHEAD`] in the
//! future (clock skew) and at most [`BEHIND`] in the past (an outbox that waited). Past either,
//! `occurred_at` is kept for the record but the log's time is used, logged and counted
//! (`tenancy_untrusted_timestamps_total`). A termination sent with seconds for milliseconds
//! (1970) or stamped a year ahead is therefore placed where the log has it: it cannot skip a
//! grace period, nor hide the restores that follow it.
//!
//! And a grace never starts before the log has the event ([`EventTime::counted_from`]): the
//! purge is due no sooner than the termination's log time plus the grace, whatever it claims.
//! The log's time is the same on every replay, so a rebuild reaches the same decisions.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

/// Epoch milliseconds as a time (the epoch for what no time has).
pub fn at(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or_default()
}

/// How far ahead of the log's time an `occurred_at` is still believed.
/// Where a change of one thing (a brand and supplier pair's access, a custom host) falls among
/// the thing's changes: by when it happened; in the same millisecond, a change that takes away
/// (a revoke, a removal) after one that gives, so taking away wins a tie; then by event id, the
/// same in every replay. A change ordered before the one recorded changes nothing.
pub fn change_order(at: i64, takes_away: bool, event_id: &str) -> (i64, bool, &str) {
    (at, takes_away, event_id)
}

pub const AHEAD: Duration = Duration::from_secs(60);
/// How far behind the log's time an `occurred_at` is still believed.
pub const BEHIND: Duration = Duration::from_secs(24 * 3600);

/// An event's two times, epoch milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTime {
    /// What the event says.
    pub occurred_at: i64,
    /// When the log has it (the message's timestamp).
    pub logged_at: i64,
}

impl EventTime {
    pub fn new(occurred_at: i64, logged_at: i64) -> EventTime {
        EventTime {
            occurred_at,
            logged_at,
        }
    }

    /// Whether `occurred_at` is within the bounds of the log's time.
    pub fn trusted(&self) -> bool {
        let ahead = i64::try_from(AHEAD.as_millis()).unwrap_or(i64::MAX);
        let behind = i64::try_from(BEHIND.as_millis()).unwrap_or(i64::MAX);
        self.occurred_at <= self.logged_at.saturating_add(ahead)
            && self.occurred_at >= self.logged_at.saturating_sub(behind)
    }

    /// The time the event is placed at, in a tenant's lifecycle and in the order of changes:
    /// `occurred_at` if trusted, else the log's time.
    pub fn effective(&self) -> i64 {
        if self.trusted() {
            self.occurred_at
        } else {
            self.logged_at
        }
    }

    /// From when an effect that lasts (a grace period) counts: never before the log had it.
    pub fn counted_from(&self) -> i64 {
        self.effective().max(self.logged_at)
    }

    /// [`EventTime::effective`], counting an `occurred_at` not believed (for the many events
    /// of the projectors: a line each would flood the log).
    pub fn placed(&self, processor: &'static str) -> i64 {
        if !self.trusted() {
            metrics::counter!("tenancy_untrusted_timestamps_total", "processor" => processor)
                .increment(1);
        }
        self.effective()
    }

    /// [`EventTime::effective`], logging and counting an `occurred_at` not believed.
    pub fn judged(&self, processor: &'static str, what: &str, tenant: &str) -> i64 {
        if !self.trusted() {
            metrics::counter!("tenancy_untrusted_timestamps_total", "processor" => processor)
                .increment(1);
            tracing::warn!(processor, tenant, event = what,
                occurred_at = %at(self.occurred_at).to_rfc3339(),
                logged_at = %at(self.logged_at).to_rfc3339(),
                "occurred_at too far from the log's time: placed at the log's time instead");
        }
        self.effective()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_796_000_000_000; // 2026-11-30

    #[test]
    fn a_producer_clock_is_believed_within_bounds_only() {
        let t = EventTime::new(NOW - 5_000, NOW);
        assert!(t.trusted());
        assert_eq!(t.effective(), NOW - 5_000);
        assert_eq!(
            t.counted_from(),
            NOW,
            "a grace never starts before the log has it"
        );
        // Seconds sent as milliseconds: 1970.
        let seconds = EventTime::new(NOW / 1000, NOW);
        assert!(!seconds.trusted());
        assert_eq!((seconds.effective(), seconds.counted_from()), (NOW, NOW));
        // A year ahead.
        let ahead = EventTime::new(NOW + 365 * 24 * 3600 * 1000, NOW);
        assert!(!ahead.trusted());
        assert_eq!(ahead.effective(), NOW);
        // Within a minute ahead (clock skew), a day behind (an outbox that waited).
        assert!(EventTime::new(NOW + 59_000, NOW).trusted());
        assert!(!EventTime::new(NOW + 61_000, NOW).trusted());
        assert!(EventTime::new(NOW - 23 * 3600 * 1000, NOW).trusted());
        assert!(!EventTime::new(NOW - 25 * 3600 * 1000, NOW).trusted());
    }
}
