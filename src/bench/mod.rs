//! Benchmarks (`tenancy bench …`): each measures a path of ours next to a raw baseline in the
//! same run and prints both. Figures only mean something from a `--release` build.
//!
//! - [`catalog`]: the catalog processor against plain multi-row upserts.
//! - [`broker`]: the broker's own produce and consume rates, the ceiling every processor sits
//!   under.
//! - [`e2e`]: `tenancy emit` to the last event applied, against the broker's consume rate.

pub mod broker;
pub mod catalog;
pub mod e2e;

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

/// Drops every database of a benchmark's namespace.
pub(crate) async fn drop_namespace(
    pool: &sqlx::MySqlPool,
    ns: &crate::tenant::Namespace,
) -> Result<(), sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(SCHEMA_NAME AS CHAR) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE ?",
    )
    .bind(ns.database_like_pattern())
    .fetch_all(pool)
    .await?;
    for name in names {
        // Names come from the server and match our validated namespace pattern.
        sqlx::query(&format!("DROP DATABASE `{name}`"))
            .execute(pool)
            .await?;
    }
    Ok(())
}
