//! Host names as retailers' custom domains: normalised (lower case, no trailing dot, IDNA to
//! its ASCII form) and validated before they reach SQL or Redis.

use std::fmt;

/// The longest host name DNS allows.
const MAX_HOST: usize = 253;
const MAX_LABEL: usize = 63;

/// A normalised, valid host name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Host(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host {raw:?}: {reason}")]
pub struct HostError {
    pub raw: String,
    pub reason: String,
}

impl Host {
    pub fn parse(raw: &str) -> Result<Host, HostError> {
        let fail = |reason: &str| HostError {
            raw: raw.chars().take(80).collect(),
            reason: reason.to_owned(),
        };
        if raw.len() > 4 * MAX_HOST {
            return Err(fail("too long"));
        }
        let trimmed = raw.strip_suffix('.').unwrap_or(raw);
        if trimmed.is_empty() {
            return Err(fail("empty"));
        }
        // Anything that is not a plain host (ports, paths, escapes, spaces) is refused before
        // IDNA, which would otherwise map some of it.
        if trimmed
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/\\:%@?#[]'\"`;,*".contains(c))
        {
            return Err(fail("may only hold letters, digits, '-' and '.'"));
        }
        let ascii = idna::domain_to_ascii_strict(trimmed)
            .map_err(|_| fail("is not a valid internationalised domain name"))?;
        if ascii.len() > MAX_HOST {
            return Err(fail("is longer than 253 characters"));
        }
        let labels: Vec<&str> = ascii.split('.').collect();
        if labels.len() < 2 {
            return Err(fail("needs at least two labels (e.g. shop.example.com)"));
        }
        for label in &labels {
            if label.is_empty() || label.len() > MAX_LABEL {
                return Err(fail("has an empty label or one over 63 characters"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                || label.starts_with('-')
                || label.ends_with('-')
            {
                return Err(fail(
                    "has a label with characters other than a-z, 0-9 and inner '-'",
                ));
            }
        }
        if labels
            .last()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(fail("is an IP address, not a host name"));
        }
        Ok(Host(ascii))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(
            Host::parse("Shop.Example.COM.").unwrap().as_str(),
            "shop.example.com"
        );
        assert_eq!(
            Host::parse("bücher.example").unwrap().as_str(),
            "xn--bcher-kva.example"
        );
        assert_eq!(
            Host::parse("my-shop.co.uk").unwrap().as_str(),
            "my-shop.co.uk"
        );
    }

    #[test]
    fn bad_hosts_are_refused_with_a_reason() {
        for bad in [
            "",
            ".",
            "localhost",
            "../etc",
            "a b.com",
            "shop.example.com%00",
            "shop.example.com:8080",
            "x'.com",
            "-bad.com",
            "bad-.com",
            "a..com",
            "10.0.0.1",
            "shop.example.com/path",
        ] {
            let e = Host::parse(bad).expect_err(bad);
            assert!(!e.reason.is_empty());
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(Host::parse(&long_label).is_err());
        let long_host = format!("{}com", "abcdefghi.".repeat(26));
        assert!(Host::parse(&long_host).is_err());
    }
}
