//! A small Confluent Schema Registry compatible server (Avro only).
//!
//! Blindstrader's event topics carry Confluent-framed Avro, so every producer and consumer
//! needs a schema registry. Running Confluent's JVM registry just for local development and
//! tests is heavy; this module serves the subset of its REST API that Avro serdes and schema
//! tooling use — registration, lookup, fetch by id, versions, compatibility checks and
//! compatibility configuration — with the same ids, status codes and error bodies, so clients
//! cannot tell the difference.
//!
//! * `store` — subjects, versions, global ids and configuration, persisted to `data_dir`;
//! * `compatibility` — what each compatibility level checks, via apache-avro;
//! * `schema` — parsing submissions and deciding when two are "the same schema";
//! * `snapshot` — crash-safe persistence of the state file;
//! * `http` — the REST routes and Confluent error bodies.

#[cfg(test)]
mod client_compat;
mod compatibility;
mod error;
mod http;
mod schema;
mod snapshot;
mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use compatibility::CompatibilityLevel;
pub use error::RegistryError;
pub use http::CONTENT_TYPE;
pub use schema::ParsedSchema;
pub use store::{Store, SubjectVersion, VersionSelector};

/// A registry whose store has been opened, ready to serve.
///
/// [`serve`] is the usual entry point; this type exists for callers that want the store (for
/// example to pre-register schemas, or to inspect it in tests) as well as the server.
#[derive(Debug, Clone)]
pub struct RegistryServer {
    store: Arc<Store>,
}

impl RegistryServer {
    /// Opens (or creates) the store in `data_dir`. Blocking (file I/O).
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        // Logged absolute: a registry started from another directory with a relative path
        // serves other schemas, and every worker would dead-letter what it cannot decode.
        let shown = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        let store = Store::open(data_dir)
            .with_context(|| format!("opening schema registry store in {}", shown.display()))?;
        tracing::info!(data_dir = %shown.display(), "schema registry store opened (locked for this process)");
        Ok(Self {
            store: Arc::new(store),
        })
    }

    /// The store this server serves.
    pub fn store(&self) -> Arc<Store> {
        Arc::clone(&self.store)
    }

    /// The HTTP router over this server's store.
    pub fn router(&self) -> axum::Router {
        router(self.store())
    }

    /// Serves on `listener` until `shutdown` is cancelled, then finishes in-flight requests.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let address = listener.local_addr().ok();
        tracing::info!(?address, "schema registry listening");
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("schema registry server failed")?;
        tracing::info!(?address, "schema registry stopped");
        Ok(())
    }
}

/// Opens (or creates) the store in `data_dir` (schemas survive restarts) and serves until
/// `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    data_dir: PathBuf,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let server = tokio::task::spawn_blocking(move || RegistryServer::open(&data_dir))
        .await
        .context("opening schema registry store")??;
    server.run(listener, shutdown).await
}

/// The axum router over a store, for in-process tests.
pub fn router(store: Arc<Store>) -> axum::Router {
    http::router(store)
}
