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

/// A new API key: `stasis_` + 256 random bits.
pub fn api_key() -> String {
    format!("stasis_{}", random_hex(32))
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
        assert_ne!(sandbox(), sandbox());
        assert_eq!(api_key().len(), 7 + 64);
    }
}
