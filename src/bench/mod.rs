//! Benchmarks (`tenancy bench …`): each measures a path of ours next to a raw baseline in the
//! same run and prints both. Figures only mean something from a `--release` build.
//!
//! - [`catalog`]: the catalog processor against plain multi-row upserts.
//! - [`broker`]: the broker's own produce and consume rates, the ceiling every processor sits
//!   under.

pub mod broker;
pub mod catalog;

/// Peak resident memory of this process so far (VmHWM), in MiB.
pub(crate) fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}
