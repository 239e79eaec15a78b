//! What each processor loop is doing, for `/healthz`, `/readyz`, `/metrics` and the workers
//! table behind `tenancy status`.
//!
//! The loops write their state here (assignment, outages waited out, retry loops, held events);
//! readers take a [`Snapshot`]. A std `Mutex`: every critical section is a few assignments, never
//! held across an await.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::error::Service;
use super::hold::HoldSummary;

/// A retry loop older than this makes the worker not ready.
pub const READY_RETRY_THRESHOLD: Duration = Duration::from_secs(60);

#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Mutex<BTreeMap<&'static str, State>>>,
}

#[derive(Default, Clone)]
struct State {
    group: String,
    joined: bool,
    assigned: Vec<String>,
    outage: Option<(Service, Instant, String)>,
    retrying: Option<(Instant, String)>,
    held: usize,
    held_bytes: usize,
    left_in_log: Vec<String>,
    holds: Vec<HoldSummary>,
    /// MySQL servers this processor finds not answering: (since, error).
    servers_down: BTreeMap<String, (Instant, String)>,
}

/// One processor, as reported.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ProcessorSnapshot {
    pub processor: String,
    pub group: String,
    /// Whether the consumer has received its first assignment (possibly empty).
    pub joined: bool,
    /// `topic/partition` this worker owns.
    pub assigned: Vec<String>,
    /// A shared service being waited out: `service: error`, and for how long.
    pub outage: Option<String>,
    pub outage_secs: Option<u64>,
    /// An event being retried (bounded): what, and for how long.
    pub retrying: Option<String>,
    pub retrying_secs: Option<u64>,
    pub held: usize,
    pub held_bytes: usize,
    /// Keys whose later events were left in the log (past the memory bounds), from where:
    /// `key from topic/partition/offset`.
    #[serde(default)]
    pub left_in_log: Vec<String>,
    pub holds: Vec<HoldSummary>,
    /// MySQL servers that do not answer (or are not configured here): `name: error`, with
    /// their tenants' events waiting. The worker stays ready for every other tenant.
    #[serde(default)]
    pub servers_down: Vec<String>,
}

/// Every processor of this worker, and whether it is ready.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Snapshot {
    pub ready: bool,
    /// Why not, one line each.
    pub not_ready: Vec<String>,
    /// Ready, but some tenants wait: the MySQL servers that do not answer, one line each
    /// (`server NAME: error, for Ns`).
    #[serde(default)]
    pub degraded: Vec<String>,
    pub processors: Vec<ProcessorSnapshot>,
}

impl Health {
    /// The handle one processor loop reports through.
    pub fn processor(&self, name: &'static str, group: &str) -> ProcessorHealth {
        self.inner.lock().expect("not poisoned").insert(
            name,
            State {
                group: group.to_owned(),
                ..State::default()
            },
        );
        ProcessorHealth {
            health: self.clone(),
            name,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let states = self.inner.lock().expect("not poisoned").clone();
        let mut not_ready = Vec::new();
        let mut degraded: BTreeMap<String, (Instant, String)> = BTreeMap::new();
        let processors = states
            .into_iter()
            .map(|(name, s)| {
                if !s.joined {
                    not_ready.push(format!("{name}: has not joined group {} yet", s.group));
                }
                if let Some((service, since, error)) = &s.outage {
                    not_ready.push(format!(
                        "{name}: waiting for {service} for {}s: {error}",
                        (now - *since).as_secs()
                    ));
                }
                if let Some((since, what)) = &s.retrying {
                    if now - *since > READY_RETRY_THRESHOLD {
                        not_ready.push(format!(
                            "{name}: retrying for {}s: {what}",
                            (now - *since).as_secs()
                        ));
                    }
                }
                for (server, (since, error)) in &s.servers_down {
                    let line = degraded
                        .entry(server.clone())
                        .or_insert((*since, error.clone()));
                    line.0 = line.0.min(*since);
                }
                ProcessorSnapshot {
                    servers_down: s
                        .servers_down
                        .iter()
                        .map(|(n, (_, e))| format!("{n}: {e}"))
                        .collect(),
                    processor: name.to_owned(),
                    group: s.group,
                    joined: s.joined,
                    assigned: s.assigned,
                    outage_secs: s.outage.as_ref().map(|(_, t, _)| (now - *t).as_secs()),
                    outage: s.outage.map(|(svc, _, e)| format!("{svc}: {e}")),
                    retrying_secs: s.retrying.as_ref().map(|(t, _)| (now - *t).as_secs()),
                    retrying: s.retrying.map(|(_, w)| w),
                    held: s.held,
                    held_bytes: s.held_bytes,
                    left_in_log: s.left_in_log,
                    holds: s.holds,
                }
            })
            .collect::<Vec<_>>();
        // A worker still starting (migrating, connecting) has registered no processor yet: it
        // is not ready, though nothing in it is failing.
        if processors.is_empty() {
            not_ready.push("no processor has started yet".to_owned());
        }
        Snapshot {
            ready: not_ready.is_empty(),
            not_ready,
            degraded: degraded
                .into_iter()
                .map(|(server, (since, error))| {
                    format!("server {server}: {error}, for {}s", (now - since).as_secs())
                })
                .collect(),
            processors,
        }
    }
}

/// One processor's reporting handle.
#[derive(Clone)]
pub struct ProcessorHealth {
    health: Health,
    name: &'static str,
}

impl ProcessorHealth {
    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut states = self.health.inner.lock().expect("not poisoned");
        f(states.entry(self.name).or_default());
    }

    pub fn assigned(&self, partitions: Vec<String>) {
        metrics::gauge!("tenancy_partitions_assigned", "processor" => self.name)
            .set(partitions.len() as f64);
        self.update(|s| {
            s.joined = true;
            s.assigned = partitions;
        });
    }

    pub fn outage(&self, service: Service, error: &str) {
        metrics::gauge!("tenancy_waiting_for_service", "processor" => self.name, "service" => service.as_str())
            .set(1.0);
        self.update(|s| {
            let since = match &s.outage {
                Some((svc, since, _)) if *svc == service => *since,
                _ => Instant::now(),
            };
            s.outage = Some((service, since, error.to_owned()));
        });
    }

    pub fn outage_over(&self) {
        self.update(|s| {
            if let Some((service, since, _)) = s.outage.take() {
                metrics::gauge!("tenancy_waiting_for_service", "processor" => self.name, "service" => service.as_str())
                    .set(0.0);
                tracing::info!(processor = self.name, %service, waited_ms = since.elapsed().as_millis() as u64,
                    "service available again");
            }
        });
    }

    pub fn retrying(&self, what: &str) {
        self.update(|s| {
            let since = s.retrying.as_ref().map_or_else(Instant::now, |(t, _)| *t);
            metrics::gauge!("tenancy_retry_loops", "processor" => self.name).set(1.0);
            metrics::gauge!("tenancy_retry_loop_age_seconds", "processor" => self.name)
                .set(since.elapsed().as_secs_f64());
            s.retrying = Some((since, what.to_owned()));
        });
    }

    pub fn retry_over(&self) {
        self.update(|s| {
            if s.retrying.take().is_some() {
                metrics::gauge!("tenancy_retry_loops", "processor" => self.name).set(0.0);
                metrics::gauge!("tenancy_retry_loop_age_seconds", "processor" => self.name)
                    .set(0.0);
            }
        });
    }

    pub fn holding(
        &self,
        held: usize,
        bytes: usize,
        left_in_log: Vec<String>,
        holds: Vec<HoldSummary>,
    ) {
        metrics::gauge!("tenancy_events_held", "processor" => self.name).set(held as f64);
        metrics::gauge!("tenancy_events_held_bytes", "processor" => self.name).set(bytes as f64);
        metrics::gauge!("tenancy_keys_left_in_log", "processor" => self.name)
            .set(left_in_log.len() as f64);
        self.update(|s| {
            s.held = held;
            s.held_bytes = bytes;
            s.left_in_log = left_in_log;
            s.holds = holds;
        });
    }

    /// A MySQL server does not answer (or is not configured here): its tenants wait; the
    /// worker stays ready for the others and names the server.
    pub fn server_down(&self, server: &str, error: &str) {
        metrics::gauge!("tenancy_mysql_server_down", "processor" => self.name, "server" => server.to_owned())
            .set(1.0);
        self.update(|s| {
            let since = s
                .servers_down
                .get(server)
                .map_or_else(Instant::now, |(t, _)| *t);
            s.servers_down
                .insert(server.to_owned(), (since, error.to_owned()));
        });
    }

    pub fn server_up(&self, server: &str) {
        metrics::gauge!("tenancy_mysql_server_down", "processor" => self.name, "server" => server.to_owned())
            .set(0.0);
        self.update(|s| {
            s.servers_down.remove(server);
        });
    }
}

/// The process-wide Prometheus recorder: installed by the first server that asks, shared by
/// every later one (the worker's health server, `tenancy serve`).
pub fn prometheus() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    static RECORDER: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    if let Some(h) = RECORDER.get() {
        return Ok(h.clone());
    }
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        // Request latencies as histograms (the rest stay summaries): aggregatable across
        // servers, buckets around the 10 ms p99 goal.
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )
        .map_err(|e| anyhow::anyhow!("invalid histogram buckets: {e}"))?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    Ok(RECORDER.get_or_init(|| handle).clone())
}

/// Serves `/healthz` (the process is up), `/readyz` (every processor joined its group, no
/// shared service being waited for, no retry loop older than [`READY_RETRY_THRESHOLD`]; the
/// body names any MySQL server whose tenants wait, under `degraded`) and
/// `/metrics` (Prometheus text) on `addr` until `shutdown`. Returns the bound address (port 0
/// picks one).
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    use axum::http::StatusCode;
    use axum::routing::get;

    let prometheus = prometheus()?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot serve health and metrics on {addr}: {e} (another worker on this host? give each its own --http ADDR, or --http off)"
        )
    })?;
    let bound = listener.local_addr()?;
    let upkeep = prometheus.clone();
    let upkeep_stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = upkeep_stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => upkeep.run_upkeep(),
            }
        }
    });
    let ready = health.clone();
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let snapshot = ready.snapshot();
                async move {
                    let status = if snapshot.ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, axum::Json(snapshot))
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = prometheus.render();
                async move { text }
            }),
        );
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "health endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /healthz, /readyz and /metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_joins_outages_and_old_retry_loops() {
        let health = Health::default();
        assert!(!health.snapshot().ready, "a worker with no processor yet");
        let p = health.processor("catalog", "ns.catalog");
        let s = health.snapshot();
        assert!(!s.ready);
        assert!(s.not_ready[0].contains("has not joined"));
        p.assigned(vec!["ns.brand-catalog/0".into()]);
        assert!(health.snapshot().ready);
        p.outage(Service::Mysql, "connection refused");
        let s = health.snapshot();
        assert!(!s.ready);
        assert!(
            s.not_ready[0].contains("waiting for mysql"),
            "{:?}",
            s.not_ready
        );
        p.outage_over();
        p.retrying("deadlock on brand x");
        // A young retry loop is normal operation.
        assert!(health.snapshot().ready);
        p.retry_over();
        assert_eq!(health.snapshot().processors[0].retrying, None);
        // A server down degrades the worker but keeps it ready for the other tenants.
        p.server_down("east", "no answer within 3s");
        let s = health.snapshot();
        assert!(s.ready);
        assert_eq!(s.degraded.len(), 1);
        assert!(
            s.degraded[0].starts_with("server east: no answer"),
            "{:?}",
            s.degraded
        );
        p.server_up("east");
        assert!(health.snapshot().degraded.is_empty());
    }
}
