//! Identifiers and secrets: sandbox and snapshot ids, API keys, incident ids.
//!
//! Ids are lowercase letters and digits only, so a sandbox id is also a DNS label (the SDK
//! names a sandbox in a `{id}.local` Host header) and can never name a path.

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the operating system's random source failed");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sb` + 24 hex digits.
pub fn sandbox() -> String {
    format!("sb{}", random_hex(12))
}

/// `snap` + 24 hex digits (distinct from the snapshot store's own `snap_…` ids).
pub fn snapshot() -> String {
    format!("snap{}", random_hex(12))
}

/// Whether `s` has the shape of [`snapshot`]'s ids (so it can name an object key).
pub fn is_snapshot(s: &str) -> bool {
    s.len() == 4 + 24 && s.starts_with("snap") && s[4..].bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// A new API key: `stasis_` + 256 random bits.
pub fn api_key() -> String {
    format!("stasis_{}", random_hex(32))
}

/// Whether `s` has the shape of [`api_key`]'s keys.
pub fn is_api_key(s: &str) -> bool {
    s.strip_prefix("stasis_")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
}

/// Names one logged internal error.
pub fn incident() -> String {
    random_hex(6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_their_shape() {
        let id = sandbox();
        assert_eq!(id.len(), 26);
        assert!(id.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()), "{id} is a DNS label");
        assert!(snapshot().starts_with("snap"));
        assert!(is_snapshot(&snapshot()));
        for bad in
            ["snap", "snap_0123456789abcdef01234567", "snap0123456789abcdef0123456/", "snapABCDEF0123456789abcdef01"]
        {
            assert!(!is_snapshot(bad), "{bad}");
        }
        assert_ne!(sandbox(), sandbox());
        assert_eq!(api_key().len(), 7 + 64);
        assert!(is_api_key(&api_key()));
        assert!(!is_api_key("stasis_") && !is_api_key(&api_key().to_uppercase()));
    }
}
