//! Supplier bearer tokens: `{supplier_id}.{expires}.{signature}`, where `expires` is Unix
//! seconds and `signature` is HMAC-SHA256 over `{supplier_id}.{expires}` with the key in
//! `TENANCY_TOKEN_KEY`, base64url without padding.
//!
//! Stateless on purpose: `tenancy serve` checks a token with no database or Redis round trip,
//! and access itself is decided per request by the permission cache, so a revoked grant takes
//! effect at once whatever tokens are out. A token only says who the caller is; to stop a
//! supplier's tokens before they expire, rotate the key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::cache::permissions::parse_id;

/// The environment variable holding the signing key.
pub const KEY_ENV: &str = "TENANCY_TOKEN_KEY";

/// A key shorter than this is refused: HMAC-SHA256 wants at least its output size.
const MIN_KEY_BYTES: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// The signing key, checked once at start-up.
#[derive(Clone)]
pub struct TokenKey(Vec<u8>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(***)")
    }
}

/// Why a token was not accepted; the text goes back to the caller in a 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not of the form SUPPLIER_ID.EXPIRES.SIGNATURE")]
    Malformed,
    #[error("the token's signature does not match")]
    BadSignature,
    #[error("the token expired at {0} (Unix seconds)")]
    Expired(i64),
}

impl TokenKey {
    /// The key from its text (at least 32 bytes), or why it cannot be used.
    pub fn new(raw: &str) -> anyhow::Result<TokenKey> {
        if raw.len() < MIN_KEY_BYTES {
            anyhow::bail!(
                "{KEY_ENV} is {} bytes; it must be at least {MIN_KEY_BYTES} (e.g. `openssl rand -hex 32`)",
                raw.len()
            );
        }
        Ok(TokenKey(raw.as_bytes().to_vec()))
    }

    /// The key from `TENANCY_TOKEN_KEY`, with a message saying how to set it.
    pub fn from_env() -> anyhow::Result<TokenKey> {
        match std::env::var(KEY_ENV) {
            Ok(raw) => TokenKey::new(&raw),
            Err(_) => anyhow::bail!(
                "{KEY_ENV} is not set: tokens are signed with it; set the same secret (at least \
                 {MIN_KEY_BYTES} bytes, e.g. `openssl rand -hex 32`) for `tenancy serve` and \
                 `tenancy tokens issue`"
            ),
        }
    }

    fn mac(&self, payload: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(payload.as_bytes());
        mac
    }

    /// A token for `supplier_id` (canonicalised) that expires at `expires` (Unix seconds).
    pub fn issue(&self, supplier_id: &str, expires: i64) -> Result<String, String> {
        let supplier = parse_id(supplier_id)?;
        let payload = format!("{supplier}.{expires}");
        let signature = URL_SAFE_NO_PAD.encode(self.mac(&payload).finalize().into_bytes());
        Ok(format!("{payload}.{signature}"))
    }

    /// The supplier id a token names, if it is signed with this key and not expired at `now`.
    pub fn verify(&self, token: &str, now: i64) -> Result<String, TokenError> {
        let mut parts = token.split('.');
        let (Some(supplier), Some(expires), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let expires: i64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        // Constant-time comparison, before anything else is said about the token.
        self.mac(&format!("{supplier}.{expires}"))
            .verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;
        if expires <= now {
            return Err(TokenError::Expired(expires));
        }
        // Signed ids were canonical when issued; parsing again costs little and keeps the
        // rule "ids reach SQL only as canonical uuids" local.
        parse_id(supplier).map_err(|_| TokenError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUPPLIER: &str = "6f1c4b1e-8a43-4c55-9b51-0d8e3f2a9c17";

    fn key(k: &str) -> TokenKey {
        TokenKey::new(k).unwrap()
    }

    #[test]
    fn an_issued_token_names_its_supplier_until_it_expires() {
        let k = key("0123456789abcdef0123456789abcdef");
        let token = k.issue(&SUPPLIER.to_uppercase(), 2_000).unwrap();
        assert!(token.starts_with(SUPPLIER), "canonical id in {token}");
        assert_eq!(k.verify(&token, 1_999).unwrap(), SUPPLIER);
        assert_eq!(k.verify(&token, 2_000), Err(TokenError::Expired(2_000)));
    }

    #[test]
    fn forged_altered_and_malformed_tokens_are_refused() {
        let k = key("0123456789abcdef0123456789abcdef");
        let other = key("fedcba9876543210fedcba9876543210");
        let token = k.issue(SUPPLIER, 2_000).unwrap();
        assert_eq!(
            other.verify(&token, 1),
            Err(TokenError::BadSignature),
            "another key"
        );
        let later = token.replacen(".2000.", ".9999.", 1);
        assert_eq!(k.verify(&later, 1), Err(TokenError::BadSignature));
        let someone_else = token.replacen(SUPPLIER, "0b6f3c1e-3e43-4c55-9d0b-1c1c1c1c1c1c", 1);
        assert_eq!(k.verify(&someone_else, 1), Err(TokenError::BadSignature));
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            &format!("{SUPPLIER}.x.sig"),
            "x.1.!!!",
        ] {
            assert_eq!(k.verify(bad, 1), Err(TokenError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn short_keys_and_non_uuid_suppliers_are_refused() {
        assert!(TokenKey::new("short").is_err());
        assert!(key("0123456789abcdef0123456789abcdef")
            .issue("not-a-uuid", 1)
            .is_err());
    }
}
