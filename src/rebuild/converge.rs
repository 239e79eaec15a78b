//! The end of every rebuild, whatever the tenant's kind: catch the shadow up with the live
//! database and compare them without holding anyone up; then, under the tenant's locks, the
//! comparison stands if the live database has not moved since it began (every live write moves
//! its offsets in the same transaction as its rows). If it keeps moving, the last attempt
//! catches up and compares under the locks. Then the swap, as the mode says.
//!
//! What differs by kind comes in as three functions: where the live database stands (a
//! brand's catalog offsets; a supplier's or retailer's whole `projection_offsets`), how to
//! bring the shadow there, and which locks hold its writers off.

use std::time::{Duration, Instant};

use super::compare::{self, Comparison};
use super::replay::Replayed;
use super::{report, Mode, Rebuilder, ATTEMPTS_BEFORE_LOCKED_COMPARE};
use crate::fault::{crash_after, FailPoint};
use crate::store::locks::NamedLock;
use crate::store::servers::Server;
use crate::store::tenants::TenantRef;
use crate::tenant::DatabaseName;

/// How a rebuild ended.
pub(super) struct Converged {
    pub replayed: Replayed,
    pub comparison: Comparison,
    pub swapped: bool,
    /// How long the tenant's writes were held for the last catch-up, compare and swap.
    pub pause: Duration,
}

/// The tenant rebuilt, how, its live database, the shadow beside it, and where the replaced
/// tables go.
pub(super) struct Rebuilding<'a> {
    pub tenant: &'a TenantRef,
    /// Where the shadow is: the tenant's own server, or the one it moves to.
    pub target: &'a Server,
    pub mode: Mode,
    pub live: &'a DatabaseName,
    pub shadow: &'a DatabaseName,
    pub old: &'a DatabaseName,
}

impl Rebuilder {
    /// See the module's note. `hold` returns the two locks that hold the tenant's writers
    /// off (released in reverse order), or `None` to try the whole round again.
    pub(super) async fn converge<P: PartialEq>(
        &self,
        at: Rebuilding<'_>,
        reported: &report::Progress,
        position: impl AsyncFn() -> anyhow::Result<P>,
        mut catch_up: impl AsyncFnMut(&P) -> anyhow::Result<Replayed>,
        hold: impl AsyncFn() -> anyhow::Result<Option<(NamedLock, NamedLock)>>,
    ) -> anyhow::Result<Converged> {
        let Rebuilding {
            tenant: t,
            target,
            mode,
            live,
            shadow,
            old,
        } = at;
        let mut replayed = Replayed::default();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last_attempt = attempt >= ATTEMPTS_BEFORE_LOCKED_COMPARE;
            reported.phase("replaying");
            let seen = position().await?;
            replayed += catch_up(&seen).await?;
            reported.counts(replayed.read, replayed.applied);
            crash_after(self.options.fail_after, FailPoint::Replay);
            reported.phase("comparing");
            let unlocked = if last_attempt {
                None
            } else {
                Some(compare::compare(t.server.pool(), target.pool(), live, shadow).await?)
            };
            reported.phase("holding writes");
            let Some((first, second)) = hold().await? else {
                continue;
            };
            let held_from = Instant::now();
            let under_lock = async {
                crash_after(self.options.fail_after, FailPoint::Locked);
                let now = position().await?;
                let comparison = match unlocked {
                    Some(c) if now == seen => c,
                    Some(_) => return Ok(None),
                    None => {
                        replayed += catch_up(&now).await?;
                        compare::compare(t.server.pool(), target.pool(), live, shadow).await?
                    }
                };
                let swapped = self
                    .swap_if_chosen(t, target, mode, &comparison, live, shadow, old)
                    .await?;
                anyhow::Ok(Some((comparison, swapped)))
            }
            .await;
            second.release().await;
            first.release().await;
            let pause = held_from.elapsed();
            if let Some((comparison, swapped)) = under_lock? {
                return Ok(Converged {
                    replayed,
                    comparison,
                    swapped,
                    pause,
                });
            }
            tracing::info!(tenant = %t.organisation_id, attempt,
                "the live database changed during the comparison: catching up again");
        }
    }
}
