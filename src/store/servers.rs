//! The MySQL servers tenant databases live on, one pool each, and which server a new tenant is
//! placed on.
//!
//! `DATABASE_URL` is the home server: the service databases (`{ns}_platform` and the rest) and
//! every named lock live there, and it holds tenant databases too, as the server named `home`.
//! `TENANCY_SERVERS` adds more (`east=mysql://…`). A tenant is placed once, when its row is
//! first written, and the row's `server` says where its database is from then on (its archive,
//! rebuild shadow and kept old copy are on the same server): adding a server never moves a
//! tenant. New tenants are spread over `TENANCY_PLACE_NEW_ON` (default: every server) by
//! rendezvous hashing of the organisation id, so every worker picks the same server for the same
//! organisation without asking anyone, a retry lands where the first try did, and a server added
//! to the list takes only its share of the new tenants.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::MySqlPool;

use crate::config::Config;

pub use crate::config::{parse_list, valid_name, HOME};

/// Connections per server for reads that feed copies on another server ([`Server::reads`]).
const CROSS_READS: u32 = 4;

/// One MySQL server and its pool.
#[derive(Clone)]
pub struct Server {
    name: Arc<str>,
    url: Arc<str>,
    pool: MySqlPool,
    /// Connections for reading a brand's rows into a copy on another server, kept apart from
    /// `pool`: the copier already holds a connection of the supplier's server, and if it took
    /// this one from the shared pool, two copies going opposite ways with both pools used up
    /// would each wait for the other's. A holder of one of these waits for no pool.
    reads: MySqlPool,
    /// False for a server a tenant row names but this process was not given
    /// ([`Servers::named`]): its pool reaches nothing.
    configured: bool,
}

impl Server {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its URL (no database), for the connections a migration opens on its own.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// Connections for reads that feed a write on another server: a pool of their own, so a
    /// copier holding a connection elsewhere never waits on this server's shared pool.
    pub fn reads(&self) -> &MySqlPool {
        &self.reads
    }

    /// Whether this process was given the server (`TENANCY_SERVERS`).
    pub fn configured(&self) -> bool {
        self.configured
    }

    /// Whether the server answers: a connection of its own (a pool whose connections hang on a
    /// stalled server would wait with them), `SELECT 1`, within `timeout`.
    pub async fn probe(&self, timeout: std::time::Duration) -> Result<(), String> {
        use sqlx::{ConnectOptions, Connection};
        if !self.configured {
            return Err("not configured here (TENANCY_SERVERS)".to_owned());
        }
        let options = connect_options(&self.url).map_err(|e| e.to_string())?;
        let attempt = async {
            let mut conn = options.connect().await?;
            sqlx::query("SELECT 1").execute(&mut conn).await?;
            conn.close().await
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            )),
        }
    }

    /// A stand-in for a server a tenant row names but this process was not given: never
    /// reached (its pool points nowhere), it lets a reader carry the tenant and decide (an
    /// archived tenant needs no server; an active one waits for a worker that has it).
    pub(crate) fn stand_in(name: &str) -> Server {
        let nowhere = MySqlConnectOptions::new().host("unconfigured.invalid");
        let pool = MySqlPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(1))
            .connect_lazy_with(nowhere);
        Server {
            name: name.into(),
            url: "mysql://unconfigured.invalid".into(),
            reads: pool.clone(),
            pool,
            configured: false,
        }
    }

    /// A server that is never reached, for unit tests of code that only carries one. (A pool
    /// starts its maintenance task on a runtime even when it connects lazily: a throwaway one.)
    #[cfg(test)]
    pub(crate) fn unreached(name: &str) -> Server {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let _entered = rt.enter();
        let pool = MySqlPoolOptions::new()
            .connect_lazy("mysql://unreached")
            .expect("lazy pool");
        Server {
            name: name.into(),
            url: "mysql://unreached".into(),
            reads: pool.clone(),
            pool,
            configured: true,
        }
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Server({})", self.name)
    }
}

/// Servers are the same server when they have the same name (one pool per name per process).
impl PartialEq for Server {
    fn eq(&self, other: &Server) -> bool {
        self.name == other.name
    }
}

impl Eq for Server {}

/// A tenant is on a server this process was not given: the error inside the
/// `sqlx::Error::Configuration` that [`Servers::get`] returns, so the stream can tell it from
/// any other configuration error and park the tenant with that server's.
#[derive(Debug, thiserror::Error)]
#[error("MySQL server {server:?} is not configured here (TENANCY_SERVERS gives: {given})")]
pub struct NotConfigured {
    pub server: String,
    given: String,
}

impl NotConfigured {
    /// The server named by `error` if it (or anything in its chain) says the server is not
    /// configured here.
    pub fn in_chain(error: &anyhow::Error) -> Option<&str> {
        error
            .chain()
            .find_map(|e| match e.downcast_ref::<sqlx::Error>() {
                Some(sqlx::Error::Configuration(inner)) => inner
                    .downcast_ref::<NotConfigured>()
                    .map(|n| n.server.as_str()),
                _ => e.downcast_ref::<NotConfigured>().map(|n| n.server.as_str()),
            })
    }
}

/// Every server a process may reach, `home` first.
#[derive(Clone)]
pub struct Servers {
    all: Arc<[Server]>,
    /// Indexes into `all` of the servers new tenants go to.
    place_new_on: Arc<[usize]>,
    /// The region of each server that names one (`TENANCY_SERVER_REGIONS`).
    regions: Arc<std::collections::HashMap<String, String>>,
    /// Stand-ins for servers tenant rows name but this process was not given, one per name
    /// (a std Mutex: taken for a lookup, never across an await).
    unconfigured: Arc<std::sync::Mutex<std::collections::HashMap<String, Server>>>,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.all.iter()).finish()
    }
}

impl Servers {
    /// A pool of at most `connections` per server, in the shared pools' settings
    /// ([`crate::store::pools::pool_options`]). Home is connected now (nothing works without it); the
    /// others on first use, so a server that is down delays only its own tenants.
    pub async fn connect(config: &Config, connections: u32) -> anyhow::Result<Servers> {
        Self::connect_with(config, || crate::store::pools::pool_options(connections)).await
    }

    /// [`Servers::connect`] with the pool settings `options` makes, once per server.
    pub async fn connect_with(
        config: &Config,
        options: impl Fn() -> MySqlPoolOptions,
    ) -> anyhow::Result<Servers> {
        let mut all = Vec::with_capacity(config.servers.len());
        for (i, (name, url)) in config.servers.iter().enumerate() {
            let connect = connect_options(url)?;
            let pool = if i == 0 {
                options()
                    .connect_with(connect.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot connect to MySQL at {url}: {e}"))?
            } else {
                options().connect_lazy_with(connect.clone())
            };
            // Only with several servers is anything read for another one.
            let reads = if config.servers.len() > 1 {
                options()
                    .max_connections(CROSS_READS)
                    .min_connections(0)
                    .connect_lazy_with(connect)
            } else {
                pool.clone()
            };
            all.push(Server {
                name: name.as_str().into(),
                url: url.as_str().into(),
                pool,
                reads,
                configured: true,
            });
        }
        Self::new(all, config)
    }

    /// Pools opened lazily with the settings `options` makes, for work only some processes do
    /// (the provisioner's DDL connections).
    pub fn lazy(
        config: &Config,
        options: impl Fn(MySqlConnectOptions) -> MySqlPool,
    ) -> anyhow::Result<Servers> {
        let mut all = Vec::with_capacity(config.servers.len());
        for (name, url) in &config.servers {
            let pool = options(connect_options(url)?);
            all.push(Server {
                name: name.as_str().into(),
                url: url.as_str().into(),
                reads: pool.clone(),
                pool,
                configured: true,
            });
        }
        Self::new(all, config)
    }

    /// DDL connections ([`crate::store::pools::ddl_pool`]) for every server, opened on first
    /// use: for the provisioner's new databases and the migration rollout.
    pub fn ddl(config: &Config, connections: u32) -> anyhow::Result<Servers> {
        Self::lazy(config, |options| {
            crate::store::pools::ddl_pool_with(options, connections)
        })
    }

    /// Only the home server, on `pool` (tests and tools that never see another server).
    pub fn single(pool: MySqlPool, url: &str) -> Servers {
        Servers {
            all: vec![Server {
                name: HOME.into(),
                url: url.into(),
                reads: pool.clone(),
                pool,
                configured: true,
            }]
            .into(),
            place_new_on: vec![0].into(),
            regions: Arc::default(),
            unconfigured: Arc::default(),
        }
    }

    fn new(all: Vec<Server>, config: &Config) -> anyhow::Result<Servers> {
        let place_new_on = &config.place_new_on;
        let place: Vec<usize> = if place_new_on.is_empty() {
            (0..all.len()).collect()
        } else {
            place_new_on
                .iter()
                .map(|name| {
                    all.iter().position(|s| *s.name == **name).ok_or_else(|| {
                        anyhow::anyhow!(
                            "TENANCY_PLACE_NEW_ON names server {name:?}, which is not in the servers list ({})",
                            all.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
                        )
                    })
                })
                .collect::<anyhow::Result<_>>()?
        };
        Ok(Servers {
            all: all.into(),
            place_new_on: place.into(),
            regions: Arc::new(config.regions.iter().cloned().collect()),
            unconfigured: Arc::default(),
        })
    }

    /// The home server: service databases and named locks.
    pub fn home(&self) -> &Server {
        &self.all[0]
    }

    /// Every server, home first.
    pub fn all(&self) -> &[Server] {
        &self.all
    }

    /// The server named `name`, or an error naming what this process was configured with: a
    /// tenant placed on a server this process does not know cannot be reached, and that is
    /// this process's configuration at fault, not the event's (the loop waits it out).
    pub fn get(&self, name: &str) -> Result<&Server, sqlx::Error> {
        self.all.iter().find(|s| *s.name == *name).ok_or_else(|| {
            sqlx::Error::Configuration(Box::new(NotConfigured {
                server: name.to_owned(),
                given: self
                    .all
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            }))
        })
    }

    /// The server named `name`, or a stand-in that reaches nothing if this process was not
    /// given it ([`Server::configured`] is false): for readers that must carry a tenant on any
    /// server without failing for it, such as the stream's gates. The loop parks an active
    /// tenant on such a server (nothing dead-lettered) and reports the server by name.
    pub fn named(&self, name: &str) -> Server {
        match self.get(name) {
            Ok(s) => s.clone(),
            Err(_) => {
                let mut stand_ins = self.unconfigured.lock().expect("not poisoned");
                stand_ins
                    .entry(name.to_owned())
                    .or_insert_with(|| Server::stand_in(name))
                    .clone()
            }
        }
    }

    /// Whether new tenants may be placed on `server`.
    pub fn takes_new(&self, server: &Server) -> bool {
        self.place_new_on.iter().any(|&i| self.all[i] == *server)
    }

    /// The server a new organisation's database goes to: of the servers new tenants may go to,
    /// the one whose hash with the organisation id is highest (rendezvous hashing).
    pub fn place(&self, organisation_id: &str) -> &Server {
        let best = self
            .place_new_on
            .iter()
            .copied()
            .max_by_key(|&i| placement_weight(self.all[i].name(), organisation_id))
            .unwrap_or(0);
        &self.all[best]
    }

    /// [`Servers::place`] among the servers of `region` only, when the organisation asked for
    /// one: its data never lands outside it. An error, for the provisioning failure, when no
    /// server of that region takes new tenants.
    pub fn place_in(&self, organisation_id: &str, region: Option<&str>) -> Result<&Server, String> {
        let Some(region) = region else {
            return Ok(self.place(organisation_id));
        };
        self.place_new_on
            .iter()
            .copied()
            .filter(|&i| self.region_of(self.all[i].name()) == Some(region))
            .max_by_key(|&i| placement_weight(self.all[i].name(), organisation_id))
            .map(|i| &self.all[i])
            .ok_or_else(|| {
                let known: Vec<String> = self
                    .place_new_on
                    .iter()
                    .map(|&i| {
                        let name = self.all[i].name();
                        format!("{name}={}", self.region_of(name).unwrap_or("(none)"))
                    })
                    .collect();
                format!(
                    "no MySQL server of region {region:?} takes new tenants (servers taking new \
                     tenants, by region: {}; see TENANCY_SERVER_REGIONS)",
                    known.join(", ")
                )
            })
    }

    /// The region `server` keeps its data in, if it names one.
    pub fn region_of(&self, server: &str) -> Option<&str> {
        self.regions.get(server).map(String::as_str)
    }

    /// Whether a tenant that must stay in `region` (None: anywhere) may have its database on
    /// `server`: why not, if it may not.
    pub fn allows(&self, region: Option<&str>, server: &str) -> Result<(), String> {
        match region {
            Some(r) if self.region_of(server) != Some(r) => Err(format!(
                "server {server} is in region {}, and the tenant's data must stay in region {r}",
                self.region_of(server).unwrap_or("(none)")
            )),
            _ => Ok(()),
        }
    }
}

/// The rendezvous weight of `server` for `organisation_id`: the first 8 bytes of a SHA-256 of
/// both (stable across processes, versions and platforms, unlike `std`'s hasher).
pub fn placement_weight(server: &str, organisation_id: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(server.as_bytes())
        .chain_update([0u8])
        .chain_update(organisation_id.as_bytes())
        .finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn connect_options(url: &str) -> anyhow::Result<MySqlConnectOptions> {
    use std::str::FromStr;
    MySqlConnectOptions::from_str(url)
        .map_err(|e| anyhow::anyhow!("bad MySQL server URL {url}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(raw: &[&str]) -> Vec<String> {
        raw.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_list_starts_at_home_and_refuses_what_would_confuse_placement() {
        let home = "mysql://root@127.0.0.1:3306";
        let list = parse_list(home, &entries(&["east=mysql://root@127.0.0.1:3307"])).unwrap();
        assert_eq!(list[0], ("home".to_owned(), home.to_owned()));
        assert_eq!(list[1].0, "east");
        assert_eq!(parse_list(home, &[]).unwrap().len(), 1);
        for bad in [
            "east",                             // no URL
            "East=mysql://x:1",                 // upper case
            "1st=mysql://x:1",                  // digit first
            "east=redis://x:1",                 // not MySQL
            "home=mysql://elsewhere:3306",      // home is DATABASE_URL
            "west=mysql://root@127.0.0.1:3306", // home's URL under another name
        ] {
            assert!(
                parse_list(home, &entries(&[bad])).is_err(),
                "{bad} accepted"
            );
        }
        assert!(parse_list(home, &entries(&["east=mysql://a:1", "east=mysql://b:1"])).is_err());
    }

    #[test]
    fn a_server_not_configured_is_recognised_through_contexts() {
        let servers = Servers {
            all: Vec::new().into(),
            place_new_on: Vec::new().into(),
            regions: Arc::default(),
            unconfigured: Arc::default(),
        };
        let e = anyhow::Error::from(servers.get("east").unwrap_err())
            .context("archiving")
            .context("tenant 42");
        assert_eq!(NotConfigured::in_chain(&e), Some("east"));
        assert!(e.to_string().contains("tenant 42"));
        let other = anyhow::Error::from(sqlx::Error::Configuration("bad url".into()));
        assert_eq!(NotConfigured::in_chain(&other), None);
    }

    #[tokio::test]
    async fn a_region_keeps_placement_and_moves_within_it() {
        let servers = Servers {
            all: vec![
                Server::stand_in("home"),
                Server::stand_in("east"),
                Server::stand_in("west"),
            ]
            .into(),
            place_new_on: vec![0, 1, 2].into(),
            regions: Arc::new(
                [("home", "eu"), ("east", "us"), ("west", "us")]
                    .map(|(s, r)| (s.to_owned(), r.to_owned()))
                    .into_iter()
                    .collect(),
            ),
            unconfigured: Arc::default(),
        };
        let mut us = std::collections::BTreeSet::new();
        let mut any = std::collections::BTreeSet::new();
        for i in 0..200 {
            let id = format!("org-{i}");
            us.insert(servers.place_in(&id, Some("us")).unwrap().name().to_owned());
            assert_eq!(servers.place_in(&id, Some("eu")).unwrap().name(), "home");
            any.insert(servers.place_in(&id, None).unwrap().name().to_owned());
            assert_eq!(
                servers.place_in(&id, None).unwrap().name(),
                servers.place(&id).name()
            );
        }
        assert_eq!(us, ["east", "west"].map(str::to_owned).into());
        assert_eq!(any.len(), 3);
        let refused = servers.place_in("org-1", Some("ap")).unwrap_err();
        assert!(
            refused.contains("no MySQL server of region \"ap\""),
            "{refused}"
        );
        assert!(refused.contains("home=eu, east=us, west=us"), "{refused}");
        assert!(servers.allows(Some("us"), "west").is_ok());
        assert!(servers.allows(None, "home").is_ok());
        let moved = servers.allows(Some("us"), "home").unwrap_err();
        assert!(moved.contains("must stay in region us"), "{moved}");
    }

    #[test]
    fn placement_is_stable_and_spreads() {
        let ids: Vec<String> = (0..1000)
            .map(|i| {
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &[i as u8, (i >> 8) as u8])
                    .to_string()
            })
            .collect();
        fn pick<'a>(servers: &[&'a str], id: &str) -> &'a str {
            servers
                .iter()
                .copied()
                .max_by_key(|s| placement_weight(s, id))
                .unwrap()
        }
        let two: Vec<&str> = ids.iter().map(|id| pick(&["home", "east"], id)).collect();
        let east = two.iter().filter(|s| **s == "east").count();
        assert!((400..=600).contains(&east), "east got {east} of 1000");
        // A third server takes tenants only from the others, never moves one between them.
        for (id, before) in ids.iter().zip(&two) {
            let after = pick(&["home", "east", "west"], id);
            assert!(
                after == *before || after == "west",
                "{id} moved {before} → {after}"
            );
        }
    }
}
