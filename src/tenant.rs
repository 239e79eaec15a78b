//! Tenant identity: organisation types, slugs and the database names derived from them.
//!
//! Every identifier that ends up inside SQL text (database names) is built here from validated
//! parts only, so the rest of the crate can interpolate a [`DatabaseName`] without re-checking.

use std::fmt;

use serde::{Deserialize, Serialize};

/// MySQL/MariaDB limit on identifier length, database names included.
pub const MAX_DATABASE_NAME: usize = 64;

/// Why a slug, namespace or database name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid slug {0:?}: must match ^[a-z][a-z0-9_]{{0,47}}$ (lower-case letter first, then up to 47 lower-case letters, digits or underscores)")]
    Slug(String),
    #[error("invalid namespace {0:?}: must match ^[a-z][a-z0-9_]{{0,23}}$")]
    Namespace(String),
    #[error("database name {name:?} is {len} characters, over the MySQL limit of {MAX_DATABASE_NAME}; choose a shorter slug")]
    TooLong { name: String, len: usize },
    #[error("unknown organisation type {0:?}: expected BRAND, SUPPLIER or RETAILER")]
    OrganisationType(String),
}

/// `^[a-z][a-z0-9_]{0,max_rest}$`, checked by hand: it is the whole grammar and keeps the regex
/// crate out of the build.
fn is_identifier(s: &str, max_rest: usize) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_lowercase() => {}
        _ => return false,
    }
    s.len() <= max_rest + 1
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A tenant slug that matched `^[a-z][a-z0-9_]{0,47}$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Slug(String);

impl Slug {
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        if is_identifier(raw, 47) {
            Ok(Slug(raw.to_owned()))
        } else {
            Err(NameError::Slug(raw.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Slug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The deployment namespace (`TENANCY_NAMESPACE`): prefix of every database, topic and Redis key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Namespace(String);

impl Namespace {
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        if is_identifier(raw, 23) {
            Ok(Namespace(raw.to_owned()))
        } else {
            Err(NameError::Namespace(raw.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A service database such as `{ns}_platform`.
    pub fn service_database(&self, service: ServiceDatabase) -> DatabaseName {
        DatabaseName(format!("{}_{}", self.0, service.suffix()))
    }

    /// `{ns}_{type}_{slug}`, refused when longer than MySQL allows.
    pub fn tenant_database(
        &self,
        kind: OrganisationType,
        slug: &Slug,
    ) -> Result<DatabaseName, NameError> {
        let name = format!("{}_{}_{}", self.0, kind.db_word(), slug);
        if name.len() > MAX_DATABASE_NAME {
            return Err(NameError::TooLong {
                len: name.len(),
                name,
            });
        }
        Ok(DatabaseName(name))
    }

    /// Where an organisation's tables wait while it is archived: `{ns}_arc_{uuid without dashes}`
    /// (at most 24 + 5 + 32 = 61 characters, whatever the slug). `None` for a non-uuid id.
    pub fn archive_database(&self, organisation_id: &str) -> Option<DatabaseName> {
        let id = uuid::Uuid::parse_str(organisation_id).ok()?;
        Some(DatabaseName(format!("{}_arc_{}", self.0, id.simple())))
    }

    /// Where `tenancy rebuild` builds an organisation's database beside the live one:
    /// `{ns}_shadow_{uuid without dashes}` (at most 24 + 8 + 32 = 64 characters).
    pub fn shadow_database(&self, organisation_id: &str) -> Option<DatabaseName> {
        let id = uuid::Uuid::parse_str(organisation_id).ok()?;
        Some(DatabaseName(format!("{}_shadow_{}", self.0, id.simple())))
    }

    /// Where `tenancy rebuild` keeps the replaced tables until `--drop-old` (and from where
    /// `--rollback` brings them back): `{ns}_old_{uuid without dashes}`.
    pub fn old_database(&self, organisation_id: &str) -> Option<DatabaseName> {
        let id = uuid::Uuid::parse_str(organisation_id).ok()?;
        Some(DatabaseName(format!("{}_old_{}", self.0, id.simple())))
    }

    /// The `LIKE` pattern matching every database of this namespace (`_` escaped).
    pub fn database_like_pattern(&self) -> String {
        format!("{}\\_%", self.0.replace('_', "\\_"))
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A database name built from a validated namespace and slug: safe to quote into SQL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct DatabaseName(String);

impl DatabaseName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Back-quoted for SQL text. Safe because the name only holds `[a-z0-9_]`.
    pub fn quoted(&self) -> String {
        format!("`{}`", self.0)
    }
}

impl fmt::Display for DatabaseName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The three kinds of tenant organisation; the Avro enum `OrganisationType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrganisationType {
    Brand,
    Supplier,
    Retailer,
}

impl OrganisationType {
    pub const ALL: [OrganisationType; 3] = [Self::Brand, Self::Supplier, Self::Retailer];

    /// The word used in database names and the `migrations/` folder.
    pub fn db_word(self) -> &'static str {
        match self {
            Self::Brand => "brand",
            Self::Supplier => "supplier",
            Self::Retailer => "retailer",
        }
    }

    /// The Avro enum symbol, also stored in `tenants.organisation_type`.
    pub fn symbol(self) -> &'static str {
        match self {
            Self::Brand => "BRAND",
            Self::Supplier => "SUPPLIER",
            Self::Retailer => "RETAILER",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, NameError> {
        Self::ALL
            .into_iter()
            .find(|t| t.symbol().eq_ignore_ascii_case(raw))
            .ok_or_else(|| NameError::OrganisationType(raw.to_owned()))
    }
}

impl fmt::Display for OrganisationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // pad, not write_str: tables format it with a width.
        f.pad(self.symbol())
    }
}

/// The service-level (not per-tenant) databases of the seed design.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceDatabase {
    Identity,
    SupplyChain,
    Payment,
    Platform,
    Notification,
}

impl ServiceDatabase {
    pub const ALL: [ServiceDatabase; 5] = [
        Self::Identity,
        Self::SupplyChain,
        Self::Payment,
        Self::Platform,
        Self::Notification,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::SupplyChain => "supply_chain",
            Self::Payment => "payment",
            Self::Platform => "platform",
            Self::Notification => "notification",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_follow_the_contract() {
        for ok in [
            "louvolite",
            "a",
            "cassidy_2",
            &format!("a{}", "b".repeat(47)),
        ] {
            assert!(Slug::parse(ok).is_ok(), "{ok} should be accepted");
        }
        for bad in [
            "",
            "1abc",
            "_abc",
            "Abc",
            "ab-c",
            "ab c",
            "x`; DROP DATABASE y; --",
            "é",
            &format!("a{}", "b".repeat(48)),
        ] {
            assert_eq!(Slug::parse(bad), Err(NameError::Slug(bad.to_owned())));
        }
    }

    #[test]
    fn database_names_follow_the_design() {
        let ns = Namespace::parse("blindstrader").unwrap();
        let slug = Slug::parse("louvolite").unwrap();
        assert_eq!(
            ns.tenant_database(OrganisationType::Brand, &slug)
                .unwrap()
                .as_str(),
            "blindstrader_brand_louvolite"
        );
        assert_eq!(
            ns.service_database(ServiceDatabase::SupplyChain).as_str(),
            "blindstrader_supply_chain"
        );
        assert_eq!(ns.database_like_pattern(), "blindstrader\\_%");
    }

    #[test]
    fn archive_names_fit_whatever_the_namespace() {
        let ns = Namespace::parse(&format!("a{}", "b".repeat(23))).unwrap();
        let db = ns
            .archive_database("0B6F3C1E-3E43-4C55-9D0B-1C1C1C1C1C1C")
            .unwrap();
        assert_eq!(
            db.as_str(),
            format!("{ns}_arc_0b6f3c1e3e434c559d0b1c1c1c1c1c1c")
        );
        assert!(db.as_str().len() <= MAX_DATABASE_NAME);
        assert!(ns.archive_database("x`; drop").is_none());
    }

    #[test]
    fn over_long_database_names_are_refused() {
        let ns = Namespace::parse("blindstrader").unwrap();
        let slug = Slug::parse(&format!("a{}", "b".repeat(47))).unwrap();
        let err = ns
            .tenant_database(OrganisationType::Supplier, &slug)
            .unwrap_err();
        assert!(matches!(err, NameError::TooLong { len: 70, .. }), "{err}");
    }

    #[test]
    fn organisation_types_parse_by_symbol() {
        assert_eq!(
            OrganisationType::parse("RETAILER"),
            Ok(OrganisationType::Retailer)
        );
        assert!(OrganisationType::parse("SHOP").is_err());
    }
}
