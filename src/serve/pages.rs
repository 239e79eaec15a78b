//! Pages of brand catalogs kept in this process, so a warm catalog is answered without its
//! query.
//!
//! A page is served only while two stamps read in the request's one Redis round trip still
//! hold: the brand's catalog version (`{ns}:catalog-version:{brand_id}`, moved on by the
//! catalog processor after every commit to the brand's database) and the domain generation
//! (moved on by every archive, restore, purge and domain change). Both are read *before* a page
//! is loaded, so a page can only be newer than its stamps, never older: a commit after the
//! read moves the version on and the page stops being served. Permissions and the tenant's
//! status are checked on every request before a page is looked at; the cache holds a page's
//! JSON body only, keyed by brand id, query and whether prices are shown. Each `tenancy serve`
//! keeps its own pages; the stamps they are checked against are shared, so several servers
//! behind a load balancer stop serving a page at the same change.
//!
//! What the stamps do not see is bounded by `--page-cache-ttl`: a rebuild's swap (a rebuild
//! never writes Redis; its swapped-in database equals the live one unless the operator accepted
//! differences or rolled back), a catalog processor that could not reach Redis after its commit,
//! and the moment between a commit and its version increment.

use std::time::{Duration, Instant};

use axum::body::Bytes;

use super::query::FabricQuery;

/// What a page is stored under: the brand, whether prices are shown, and the query.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PageKey {
    pub brand_id: String,
    pub prices: bool,
    pub collection: Option<String>,
    pub colour: Option<String>,
    pub discontinued: Option<bool>,
    pub limit: u32,
    pub after: Option<String>,
}

impl PageKey {
    pub fn new(brand_id: &str, prices: bool, q: &FabricQuery, limit: u32) -> PageKey {
        PageKey {
            brand_id: brand_id.to_owned(),
            prices,
            collection: q.collection.clone(),
            colour: q.colour.clone(),
            discontinued: q.discontinued,
            limit,
            after: q.after.clone(),
        }
    }
}

/// The stamps a page was read under; it is served only to a request that read the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub catalog_version: String,
    pub domain_generation: String,
}

#[derive(Clone)]
struct Page {
    stamp: Stamp,
    stored: Instant,
    body: Bytes,
}

/// Pages weigh their body and key text, so the capacity is about their memory.
#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<PageKey, Page> for Weight {
    fn weight(&self, key: &PageKey, page: &Page) -> u64 {
        (page.body.len()
            + key.brand_id.len()
            + page.stamp.catalog_version.len()
            + page.stamp.domain_generation.len()
            + 128) as u64
    }
}

pub struct Pages {
    cache: Option<quick_cache::sync::Cache<PageKey, Page, Weight>>,
    ttl: Duration,
}

impl Pages {
    /// Up to `capacity_bytes` of pages, each served for at most `ttl`; a zero for either turns
    /// the cache off (every request runs its query).
    pub fn new(ttl: Duration, capacity_bytes: u64) -> Pages {
        let on = !ttl.is_zero() && capacity_bytes > 0;
        Pages {
            cache: on.then(|| {
                // The estimate only sizes the table up front: pages of ~10 KiB.
                let estimated = (capacity_bytes / 10_240).clamp(16, 100_000) as usize;
                quick_cache::sync::Cache::with_weighter(estimated, capacity_bytes, Weight)
            }),
            ttl,
        }
    }

    /// The page stored under `key`, if it was read under `stamp` and within the TTL.
    pub fn get(&self, key: &PageKey, stamp: &Stamp) -> Option<Bytes> {
        let cache = self.cache.as_ref()?;
        let found = cache
            .get(key)
            .filter(|page| page.stamp == *stamp && page.stored.elapsed() < self.ttl)
            .map(|page| page.body);
        let result = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!("tenancy_page_cache_lookups_total", "result" => result).increment(1);
        found
    }

    /// Stores a page read after its stamps were.
    pub fn put(&self, key: PageKey, stamp: Stamp, body: Bytes) {
        if let Some(cache) = &self.cache {
            cache.insert(
                key,
                Page {
                    stamp,
                    stored: Instant::now(),
                    body,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(prices: bool, colour: Option<&str>) -> PageKey {
        let q = FabricQuery {
            colour: colour.map(str::to_owned),
            ..Default::default()
        };
        PageKey::new("b", prices, &q, 100)
    }

    fn stamp(version: &str) -> Stamp {
        Stamp {
            catalog_version: version.into(),
            domain_generation: "g".into(),
        }
    }

    #[test]
    fn a_page_is_served_only_under_its_own_stamps_key_and_ttl() {
        let pages = Pages::new(Duration::from_secs(60), 1 << 20);
        pages.put(key(true, None), stamp("1"), Bytes::from_static(b"priced"));
        assert_eq!(
            pages.get(&key(true, None), &stamp("1")).as_deref(),
            Some(&b"priced"[..])
        );
        assert_eq!(
            pages.get(&key(true, None), &stamp("2")),
            None,
            "version moved"
        );
        let moved = Stamp {
            domain_generation: "h".into(),
            ..stamp("1")
        };
        assert_eq!(
            pages.get(&key(true, None), &moved),
            None,
            "generation moved"
        );
        assert_eq!(pages.get(&key(false, None), &stamp("1")), None, "no prices");
        assert_eq!(pages.get(&key(true, Some("White")), &stamp("1")), None);

        let expiring = Pages::new(Duration::from_millis(30), 1 << 20);
        expiring.put(key(true, None), stamp("1"), Bytes::from_static(b"p"));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(expiring.get(&key(true, None), &stamp("1")), None, "ttl");

        let off = Pages::new(Duration::ZERO, 1 << 20);
        off.put(key(true, None), stamp("1"), Bytes::from_static(b"p"));
        assert_eq!(off.get(&key(true, None), &stamp("1")), None);
    }
}
