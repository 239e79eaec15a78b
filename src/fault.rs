//! Fault injection for crash tests: `--fail-after POINT` makes `tenancy run` or `tenancy rebuild`
//! abort right after a step, as a crash there would. Compiled in only with the cargo feature
//! `fault-injection` (the tests enable it); without it the flag does not exist and
//! [`crash_after`] does nothing, so a release binary has no way to abort itself.

/// Where a crash test may stop a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailPoint {
    /// A termination moved the tables into the archive, nothing after it done.
    Archive,
    /// A restore moved the tables back, before the tenant is active again.
    RestoreMove,
    /// A retailer on another server than home: the host index written, its own row not yet.
    DomainIndex,
    /// A rebuild made its shadow database.
    Shadow,
    /// A rebuild's replay wrote one run's bookkeeping and not its rows.
    HalfRun,
    /// A rebuild's replay caught up once.
    Replay,
    /// A rebuild took the tenant's locks for its swap.
    Locked,
    /// A move copied the tenant to its new server, before the switch.
    Moved,
    /// A move switched the tenant's row to its new server.
    Switched,
}

impl FailPoint {
    /// The point's name as the flag takes it.
    pub fn name(self) -> &'static str {
        match self {
            FailPoint::Archive => "archive",
            FailPoint::RestoreMove => "restore-move",
            FailPoint::DomainIndex => "domain-index",
            FailPoint::Shadow => "shadow",
            FailPoint::HalfRun => "half-run",
            FailPoint::Replay => "replay",
            FailPoint::Locked => "locked",
            FailPoint::Moved => "moved",
            FailPoint::Switched => "switched",
        }
    }
}

/// Where the process is told to stop, if anywhere.
pub type FailAfter = Option<FailPoint>;

/// Aborts the process (no unwinding, no flushing: a crash) if `at` is `point`.
#[cfg(feature = "fault-injection")]
pub fn crash_after(at: FailAfter, point: FailPoint) {
    if at == Some(point) {
        let name = point.name();
        tracing::error!(
            point = name,
            "--fail-after {name}: aborting as a crash would"
        );
        eprintln!("--fail-after {name}: aborting after {name}, as a crash would");
        std::process::abort();
    }
}

/// Without the `fault-injection` feature: never stops anything.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn crash_after(_at: FailAfter, _point: FailPoint) {}
