//! `tenancy access`: supplier → brand permissions through the Redis permission cache.

use std::process::ExitCode;

use clap::Subcommand;

use crate::cache::permissions::{
    parse_id, Access, AccessError, PermissionCache, PERMISSION_TTL_SECS,
};
use crate::config::Config;
use crate::store::tenants::Tenants;

/// Exit status of `check` when the answer could not be decided (Redis or MySQL unavailable,
/// inconsistent tenants table). Distinct from 1 so scripts never mistake an outage for "not allowed".
const EXIT_UNDECIDED: u8 = 3;
/// Invalid ids; the same status clap uses for other usage errors.
const EXIT_INVALID: u8 = 2;

#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// May SUPPLIER_ID read BRAND_ID's catalog? Exit 0 if allowed, 1 if not.
    ///
    /// Reads Redis key {ns}:supplier:{SUPPLIER_ID}:brand_access:{BRAND_ID}; on a miss reads the
    /// supplier's brand_access table (through {ns}_platform.tenants) and caches the answer for
    /// 300 s, "no access" included.
    ///
    /// Prints two lines: the permissions as a JSON array (e.g. ["catalog.read","pricing.read"])
    /// or `none`, then `source: cache` or `source: database`. The verdict and its reason go to
    /// stderr.
    ///
    /// Exit status: 0 allowed (holds catalog.read); 1 not allowed (no grant, no catalog.read,
    /// supplier unknown or not active); 2 invalid id; 3 could not decide (Redis or MySQL
    /// unavailable, inconsistent tenants table).
    #[command(verbatim_doc_comment)]
    Check {
        /// Organisation id (uuid) of the supplier tenant.
        #[arg(value_parser = uuid_arg)]
        supplier_id: String,
        /// Organisation id (uuid) of the brand.
        #[arg(value_parser = uuid_arg)]
        brand_id: String,
        /// Print one JSON object instead: supplier_id, brand_id, key, permissions (array or
        /// null), from_cache, catalog_read, pricing_read.
        #[arg(long)]
        json: bool,
    },
    /// Drop the cached permissions of one supplier/brand pair (operator tool).
    ///
    /// Deletes Redis key {ns}:supplier:{SUPPLIER_ID}:brand_access:{BRAND_ID}; the next check
    /// reloads from MySQL. Safe at any time. Exit 0 whether or not the key existed, 2 for an
    /// invalid id, 3 if Redis is unavailable.
    #[command(verbatim_doc_comment)]
    Invalidate {
        /// Organisation id (uuid) of the supplier tenant.
        #[arg(value_parser = uuid_arg)]
        supplier_id: String,
        /// Organisation id (uuid) of the brand.
        #[arg(value_parser = uuid_arg)]
        brand_id: String,
    },
}

/// clap value parser: a uuid, as canonical lower-case hyphenated text. A bad one ends the
/// command with clap's usage error (exit 2) naming the argument and the value.
fn uuid_arg(raw: &str) -> Result<String, String> {
    parse_id(raw)
}

fn undecided(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_UNDECIDED)
}

pub async fn run(config: Config, command: AccessCommand) -> anyhow::Result<ExitCode> {
    let cache = match PermissionCache::connect(&config.redis_url, &config.namespace).await {
        Ok(cache) => cache,
        Err(e) => return Ok(undecided(format!("{e:#}"))),
    };
    match command {
        AccessCommand::Check {
            supplier_id,
            brand_id,
            json,
        } => check(&config, &cache, &supplier_id, &brand_id, json).await,
        AccessCommand::Invalidate {
            supplier_id,
            brand_id,
        } => {
            let key = cache.key(&supplier_id, &brand_id);
            match cache.remove(&supplier_id, &brand_id).await {
                Ok(true) => println!("removed {key}"),
                Ok(false) => println!("not cached: {key}"),
                Err(e) => return Ok(undecided(format!("Redis failed deleting {key}: {e}"))),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn check(
    config: &Config,
    cache: &PermissionCache,
    supplier_id: &str,
    brand_id: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let servers = match crate::store::servers::Servers::connect(config, 2).await {
        Ok(servers) => servers,
        Err(e) => return Ok(undecided(format!("{e:#}"))),
    };
    let key = cache.key(supplier_id, brand_id);
    let access = match cache.permissions(&servers, supplier_id, brand_id).await {
        Ok(access) => access,
        Err(e @ AccessError::InvalidId { .. }) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
        Err(e @ (AccessError::UnknownSupplier { .. } | AccessError::NotASupplier { .. })) => {
            let none = Access {
                permissions: None,
                from_cache: false,
            };
            print_answer(&none, supplier_id, brand_id, &key, json)?;
            eprintln!("not allowed: {e}");
            return Ok(ExitCode::FAILURE);
        }
        Err(e @ AccessError::Database { .. }) if is_missing_table(&e) => {
            return Ok(undecided(format!(
                "{e} (has `tenancy run` started for namespace {}?)",
                config.namespace
            )))
        }
        Err(e) => return Ok(undecided(e)),
    };
    print_answer(&access, supplier_id, brand_id, &key, json)?;
    if access.may_read_catalog() {
        eprintln!("allowed: supplier {supplier_id} may read the catalog of brand {brand_id}");
        return Ok(ExitCode::SUCCESS);
    }
    let why = match &access.permissions {
        Some(_) => "its permissions do not include catalog.read".to_owned(),
        None => no_access_reason(config, &servers, supplier_id, access.from_cache).await,
    };
    eprintln!("not allowed: supplier {supplier_id} may not read brand {brand_id}: {why}");
    Ok(ExitCode::FAILURE)
}

/// MySQL's "table doesn't exist" (1146 / 42S02): the namespace was never set up.
fn is_missing_table(e: &AccessError) -> bool {
    matches!(e, AccessError::Database { cause: sqlx::Error::Database(db), .. }
        if db.code().as_deref() == Some("42S02"))
}

/// Why the answer is "no access", for the operator (best effort; the answer stands anyway).
async fn no_access_reason(
    config: &Config,
    servers: &crate::store::servers::Servers,
    supplier_id: &str,
    from_cache: bool,
) -> String {
    let status = Tenants::on(servers.clone(), &config.namespace)
        .find(supplier_id)
        .await
        .ok()
        .and_then(|rows| {
            rows.into_iter()
                .find(|r| r.organisation_id.eq_ignore_ascii_case(supplier_id))
        })
        .map(|r| r.status);
    match status {
        Some(s) if s != crate::store::tenants::Status::Active => format!("the supplier is {s}"),
        _ if from_cache => format!(
            "no grant (cached answer; it expires within {PERMISSION_TTL_SECS} s, or run \
             `tenancy access invalidate`)"
        ),
        _ => "no grant for this brand in the supplier's brand_access".to_owned(),
    }
}

fn print_answer(
    access: &Access,
    supplier_id: &str,
    brand_id: &str,
    key: &str,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "supplier_id": supplier_id,
                "brand_id": brand_id,
                "key": key,
                "permissions": access.permissions,
                "from_cache": access.from_cache,
                "catalog_read": access.may_read_catalog(),
                "pricing_read": access.may_read_pricing(),
            })
        );
    } else {
        match &access.permissions {
            Some(p) => println!("{}", serde_json::to_string(p)?),
            None => println!("none"),
        }
        println!(
            "source: {}",
            if access.from_cache {
                "cache"
            } else {
                "database"
            }
        );
    }
    Ok(())
}
