//! `tenancy serve` and `tenancy tokens issue`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;
use crate::domains::host::Host;
use crate::serve::token::TokenKey;
use crate::serve::ServeOptions;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Brands answer on SLUG.brand.BASE, retailers on SLUG.BASE (a slug's `_` is `-` in a
    /// host name); other hosts are looked up as retailers' custom domains.
    #[arg(long, env = "TENANCY_BASE_DOMAIN", default_value = "blindstrader.localhost",
        value_parser = base_domain)]
    pub base_domain: Host,
    /// Connections to the MySQL server, shared by every tenant (one pool per server, never
    /// one per tenant).
    #[arg(long, default_value_t = 16)]
    pub pool_size: u32,
    /// Requests of one tenant holding a connection at once: a slow tenant queues behind
    /// itself, not in front of the others.
    #[arg(long, default_value_t = 4)]
    pub tenant_concurrency: usize,
    /// Every request is answered within this time (503 with Retry-After if not).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// A catalog page is answered from memory, without its query, while the brand's catalog
    /// version and the domain generation in Redis are those it was read under (every commit to
    /// the brand's catalog, archive, restore and domain change moves one on), and for at most
    /// this long. The TTL bounds what those stamps cannot see: a rebuild's swap with accepted
    /// differences or a rollback, a catalog worker that could not reach Redis. 0 turns the page
    /// cache off. Permissions and the tenant's status are checked on every request regardless.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub page_cache_ttl: Duration,
    /// Memory for cached catalog pages, in MiB (the least recently useful go first).
    #[arg(long, default_value_t = 64)]
    pub page_cache_mib: u64,
}

fn base_domain(raw: &str) -> Result<Host, String> {
    Host::parse(raw).map_err(|e| e.to_string())
}

#[derive(Debug, clap::Subcommand)]
pub enum TokensCommand {
    /// Print a bearer token for a supplier, signed with TENANCY_TOKEN_KEY.
    ///
    /// The token says who the caller is; what it may read is decided per request by the
    /// supplier's grants, so a revoke takes effect at once. To stop every token before it
    /// expires, change TENANCY_TOKEN_KEY.
    Issue {
        /// The supplier's organisation id (a uuid).
        supplier_id: String,
        /// How long the token is valid, e.g. 1h, 30d.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

pub async fn serve(config: Config, args: ServeArgs) -> anyhow::Result<ExitCode> {
    let key = TokenKey::from_env()?;
    let options = ServeOptions {
        listen: args.listen,
        base_domain: args.base_domain,
        pool_size: args.pool_size,
        tenant_concurrency: args.tenant_concurrency,
        request_timeout: args.request_timeout,
        page_cache_ttl: args.page_cache_ttl,
        page_cache_bytes: args.page_cache_mib.saturating_mul(1 << 20),
    };
    let shutdown = super::shutdown_on_signal();
    let (bound, task) = crate::serve::serve(&config, &options, key, shutdown).await?;
    // On stdout, alone on its line, for scripts and tests that asked for port 0.
    println!("listening on http://{bound}");
    tracing::info!(addr = %bound, namespace = %config.namespace, base_domain = %options.base_domain,
        pool = options.pool_size, tenant_concurrency = options.tenant_concurrency,
        page_cache_ttl = ?options.page_cache_ttl,
        "serving the tenant API");
    task.await?;
    Ok(ExitCode::SUCCESS)
}

pub fn tokens(command: TokensCommand) -> anyhow::Result<ExitCode> {
    match command {
        TokensCommand::Issue { supplier_id, ttl } => {
            let key = TokenKey::from_env()?;
            let ttl =
                i64::try_from(ttl.as_secs()).map_err(|_| anyhow::anyhow!("--ttl is too long"))?;
            let expires = chrono::Utc::now().timestamp().saturating_add(ttl);
            let token = key
                .issue(&supplier_id, expires)
                .map_err(|e| anyhow::anyhow!("supplier id {supplier_id:?}: {e}"))?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
    }
}
