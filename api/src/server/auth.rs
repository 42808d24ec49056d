//! API keys: created by `stasis keys create`, stored as blake3 hashes, checked on every
//! request. A key belongs to one namespace and sees only that namespace's resources.

use super::AppState;
use super::db::Db;
use super::error::ApiError;
use super::extract::Caller;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The stored form of a key.
pub fn hash_key(key: &str) -> String {
    blake3::hash(key.as_bytes()).to_hex().to_string()
}

/// `[A-Za-z0-9._-]{1,64}`: namespaces appear in URL paths.
pub fn validate_namespace(ns: &str) -> Result<(), String> {
    let ok = !ns.is_empty()
        && ns.len() <= 64
        && ns.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && ns != "."
        && ns != "..";
    if ok { Ok(()) } else { Err(format!("invalid namespace `{ns}`: use 1 to 64 letters, digits, `.`, `_` or `-`")) }
}

/// Creates a key for `namespace`; returns the key (shown once, never stored).
pub fn create_key(db: &Db, namespace: &str) -> anyhow::Result<String> {
    validate_namespace(namespace).map_err(anyhow::Error::msg)?;
    let key = super::ids::api_key();
    db.insert_key(&hash_key(&key), namespace, super::time::now_ms())?;
    Ok(key)
}

/// Adds a key made elsewhere (another node's `create_key`) for `namespace`.
pub fn add_key(db: &Db, namespace: &str, key: &str) -> anyhow::Result<()> {
    validate_namespace(namespace).map_err(anyhow::Error::msg)?;
    if !super::ids::is_api_key(key) {
        anyhow::bail!("not a Stasis API key: expected `stasis_` followed by 64 lowercase hex digits");
    }
    db.insert_key(&hash_key(key), namespace, super::time::now_ms())?;
    Ok(())
}

/// Revokes a key (`stasis keys revoke`): a running server on the same database refuses it
/// within [`KEY_RECHECK`]. Errors if no such key exists.
pub fn revoke_key(db: &Db, key: &str) -> anyhow::Result<()> {
    if !db.delete_key(&hash_key(key))? {
        anyhow::bail!("no such key in this data directory (already revoked, or made for another one)");
    }
    Ok(())
}

/// How long a key found valid is believed without asking the database again: a key
/// revoked by `stasis keys revoke` (another process) stops working within this time.
pub const KEY_RECHECK: Duration = Duration::from_millis(500);

/// Known keys, by hash, with when they were last found in the database. Keys created
/// while the server runs (by `stasis keys create` on the same database) are found on
/// their first use; revoked ones are forgotten at their next check.
#[derive(Default)]
pub struct Keys {
    known: Mutex<HashMap<String, (String, Instant)>>,
}

impl Keys {
    fn namespace(&self, db: &Db, key: &str) -> Result<Option<String>, ApiError> {
        let hash = hash_key(key);
        if let Some((ns, checked)) = self.known.lock().unwrap().get(&hash)
            && checked.elapsed() < KEY_RECHECK
        {
            return Ok(Some(ns.clone()));
        }
        let ns = db.key_namespace(&hash)?;
        let mut known = self.known.lock().unwrap();
        match &ns {
            Some(ns) => known.insert(hash, (ns.clone(), Instant::now())),
            None => known.remove(&hash),
        };
        Ok(ns)
    }
}

/// Every request: a valid `Authorization: Bearer KEY`, and on the namespaced paths
/// (`/v1/namespaces/{ns}/...`) the key's own namespace.
pub async fn require_key(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::Unauthorized("missing API key: send `Authorization: Bearer KEY`"))?;
    let key = header
        .to_str()
        .ok()
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
        .filter(|key| !key.is_empty())
        .ok_or(ApiError::Unauthorized("malformed Authorization header: expected `Bearer KEY`"))?;
    let namespace = state.keys.namespace(&state.db, key)?.ok_or(ApiError::Unauthorized("invalid API key"))?;
    if let Some(rest) = req.uri().path().strip_prefix("/v1/namespaces/") {
        let asked = rest.split('/').next().unwrap_or_default();
        if asked != namespace {
            return Err(ApiError::Forbidden(format!("this API key is not valid for namespace `{asked}`")));
        }
    }
    req.extensions_mut().insert(Caller { namespace });
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_path_safe() {
        assert!(validate_namespace("default").is_ok());
        assert!(validate_namespace("team-a.prod_1").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "ü", &"x".repeat(65)] {
            assert!(validate_namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_are_stored_hashed_and_resolve_to_their_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("db")).unwrap();
        let key = create_key(&db, "ns1").unwrap();
        assert!(db.key_namespace(&key).unwrap().is_none(), "the key itself is not stored");
        let keys = Keys::default();
        assert_eq!(keys.namespace(&db, &key).unwrap().as_deref(), Some("ns1"));
        assert_eq!(keys.namespace(&db, "stasis_nope").unwrap(), None);
        // Revoked (by another process: straight in the database), refused after a recheck.
        revoke_key(&db, &key).unwrap();
        assert!(revoke_key(&db, &key).unwrap_err().to_string().contains("no such key"));
        std::thread::sleep(KEY_RECHECK);
        assert_eq!(keys.namespace(&db, &key).unwrap(), None);
    }
}
