//! Snapshots shared between nodes through object storage (`stasis serve --remote URL`).
//!
//! Every node keeps its own database and stores; what they share is the object store (see
//! `stasis_runtime::remote` for its layout). Metadata is shared the same way, not through a
//! database server: a completed snapshot's record is a small JSON object at
//! `records/<namespace>/<snapshot id>`, so a deployment needs nothing but the bucket.
//!
//! - **Publish.** A capture commits locally, pushes what the object store lacks (only new
//!   chunks: the store is content-addressed), writes the record, and only then marks the
//!   snapshot `completed`. A push that fails (after bounded retries) fails the snapshot with
//!   the store's error; the sandbox is not touched. A node killed mid-push leaves parts that
//!   no record names, never a record whose parts are missing.
//! - **Find.** A node asked for a snapshot it has no record of reads the shared record and
//!   keeps a copy in its database; listings show the namespace's shared records too.
//! - **Restore.** Before a restore, the snapshot is pulled into this node's stores if they
//!   lack it (every chunk and blob verified, a bad one fetched once more); afterwards the
//!   local copy is a cache: a repeated restore reads nothing remote.
//! - **Bookkeeping**: `shared_snapshots` lists the snapshots whose record is in the bucket
//!   (what tells a shared snapshot deleted elsewhere from one this node never shared);
//!   `cached_snapshots` the local copies of shared snapshots, with size and last use.
//! - **Cache bound.** With `cache_size`, local copies of shared snapshots past the bound are
//!   dropped, least recently used first (sizes as the records give them: logical bytes, so
//!   the bound is conservative), and then the programs no remaining image names; a later
//!   restore pulls them again.
//! - **Delete** removes the record and the descriptor from the bucket; chunks and blobs,
//!   which other snapshots may share, stay. Another node forgets its record and copy of the
//!   snapshot when it next lists the namespace's snapshots, or when a restore finds neither a
//!   copy nor the descriptor (404). Until then a node with a local copy still restores it:
//!   restores of a cached copy ask the bucket nothing.
//! - Snapshots a node took before it had a shared store stay on that node, as before.

use super::AppState;
use super::db::{Resources, SnapshotRow, SnapshotStatus};
use super::error::{ApiError, ApiResult};
use super::time::now_ms;
use serde::{Deserialize, Serialize};
use stasis_runtime::RemoteStore;
use stasis_runtime::fs_snapshot::{SnapshotError, SnapshotId};
use std::sync::Arc;

const RECORD_VERSION: u32 = 1;

/// What other nodes know of a completed snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SharedRecord {
    version: u32,
    id: String,
    namespace: String,
    sandbox_id: String,
    snapshot_type: String,
    store_id: String,
    size_bytes: i64,
    base_image: Option<String>,
    cpus: f64,
    memory_mb: i64,
    disk_mb: i64,
    created_at: i64,
    completed_at: i64,
}

impl SharedRecord {
    fn of(row: &SnapshotRow, store_id: &SnapshotId, size_bytes: i64, completed_at: i64) -> Self {
        SharedRecord {
            version: RECORD_VERSION,
            id: row.id.clone(),
            namespace: row.namespace.clone(),
            sandbox_id: row.sandbox_id.clone(),
            snapshot_type: row.snapshot_type.clone(),
            store_id: store_id.as_str().to_string(),
            size_bytes,
            base_image: row.base_image.clone(),
            cpus: row.resources.cpus,
            memory_mb: row.resources.memory_mb,
            disk_mb: row.resources.disk_mb,
            created_at: row.created_at,
            completed_at,
        }
    }

    /// A record read from the bucket: anything in it is checked before it is believed.
    fn parse(bytes: &[u8], namespace: &str, id: &str) -> Result<Self, String> {
        let r: SharedRecord = serde_json::from_slice(bytes).map_err(|e| format!("not a snapshot record: {e}"))?;
        if r.id != id {
            return Err(format!("the record of `{id}` describes `{}`", r.id.escape_debug()));
        }
        if r.version != RECORD_VERSION {
            return Err(format!("record version {}; this node reads version {RECORD_VERSION}", r.version));
        }
        if r.namespace != namespace {
            return Err(format!("a record of namespace `{}` filed under `{namespace}`", r.namespace));
        }
        if !super::ids::is_snapshot(&r.id) {
            return Err(format!("malformed snapshot id `{}`", r.id.escape_debug()));
        }
        SnapshotId::parse(&r.store_id).map_err(|e| e.to_string())?;
        if !matches!(r.snapshot_type.as_str(), "filesystem" | "memory") {
            return Err(format!("unknown snapshot type `{}`", r.snapshot_type.escape_debug()));
        }
        if let Some(image) = &r.base_image {
            super::images::validate_name(image)?;
        }
        Ok(r)
    }

    fn into_row(self) -> SnapshotRow {
        SnapshotRow {
            id: self.id,
            namespace: self.namespace,
            sandbox_id: self.sandbox_id,
            snapshot_type: self.snapshot_type,
            status: SnapshotStatus::Completed,
            error: None,
            store_id: Some(self.store_id),
            size_bytes: Some(self.size_bytes),
            base_image: self.base_image,
            resources: Resources { cpus: self.cpus, memory_mb: self.memory_mb, disk_mb: self.disk_mb },
            created_at: self.created_at,
            completed_at: Some(self.completed_at),
        }
    }
}

/// After a restart: a snapshot interrupted after its record reached the bucket (the node
/// died between the two writes) is complete for every other node, so it is here too.
/// Returns how many were.
pub async fn reconcile_interrupted(db: &super::db::Db, shared: &Shared, recovered_at: i64) -> anyhow::Result<usize> {
    let mut completed = 0;
    for row in db.interrupted_at(recovered_at)? {
        let Some(bytes) = shared.remote.record(&row.namespace, &row.id).await? else { continue };
        let record = SharedRecord::parse(&bytes, &row.namespace, &row.id).map_err(anyhow::Error::msg)?;
        db.complete_interrupted(&row.id, &record.store_id, record.size_bytes, record.completed_at)?;
        db.mark_shared(&row.id)?;
        db.touch_cached(&record.store_id, record.size_bytes, recovered_at)?;
        completed += 1;
    }
    Ok(completed)
}

/// This node's link to the shared tier.
pub struct Shared {
    pub remote: Arc<RemoteStore>,
    cache_bytes: Option<u64>,
    /// One pull of a snapshot at a time (two restores of it must not import it twice);
    /// other snapshots' restores do not wait. Entries go when nobody waits on them.
    pulls: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Shared {
    pub fn new(remote: RemoteStore, cache_bytes: Option<u64>) -> Self {
        Shared { remote: Arc::new(remote), cache_bytes, pulls: Default::default() }
    }
}

impl AppState {
    fn unavailable(&self, what: &str, e: stasis_runtime::Error) -> ApiError {
        tracing::warn!("{what}: {e}");
        ApiError::Unavailable(super::snapshots::public_error(self, what, &e))
    }

    fn shared(&self) -> Option<&Shared> {
        self.snapshots.shared.as_ref()
    }

    /// Pushes a committed snapshot and writes its record. `Ok` when there is no shared
    /// tier; the error is the client's message.
    pub(super) async fn publish(
        self: &Arc<Self>,
        row: &SnapshotRow,
        store_id: &SnapshotId,
        size_bytes: i64,
        completed_at: i64,
    ) -> Result<(), String> {
        let Some(shared) = self.shared() else { return Ok(()) };
        let failed = |e: stasis_runtime::Error| format!("upload to {} failed: {e}", shared.remote.describe());
        let stats =
            shared.remote.push(&self.snapshots.store, &self.snapshots.images, store_id).await.map_err(failed)?;
        let record = SharedRecord::of(row, store_id, size_bytes, completed_at);
        let json = serde_json::to_vec(&record).expect("a record serializes");
        shared.remote.put_record(&row.namespace, &row.id, json).await.map_err(failed)?;
        if let Err(e) = self.db.mark_shared(&row.id) {
            tracing::warn!(snapshot = %row.id, "cannot note that the snapshot is shared: {e}");
        }
        tracing::info!(
            snapshot = %row.id,
            chunks = stats.chunks,
            chunks_uploaded = stats.chunks_uploaded,
            blobs_uploaded = stats.blobs_uploaded,
            bytes_uploaded = stats.bytes_uploaded,
            ms = stats.wall.as_millis() as u64,
            "snapshot shared"
        );
        self.cached(store_id.as_str(), size_bytes);
        Ok(())
    }

    /// A snapshot's record: this node's, else the shared one (kept in this node's database
    /// from then on).
    pub(super) async fn find_snapshot(&self, namespace: &str, id: &str) -> ApiResult<Option<SnapshotRow>> {
        if let Some(row) = self.db.snapshot(namespace, id)? {
            return Ok(Some(row));
        }
        let Some(shared) = self.shared() else { return Ok(None) };
        if !super::ids::is_snapshot(id) {
            return Ok(None);
        }
        let Some(bytes) =
            shared.remote.record(namespace, id).await.map_err(|e| self.unavailable("reading the shared records", e))?
        else {
            return Ok(None);
        };
        let row = SharedRecord::parse(&bytes, namespace, id)
            .map_err(|e| ApiError::internal(anyhow::anyhow!("the shared record of snapshot `{id}`: {e}")))?
            .into_row();
        if let Err(e) = self.db.insert_snapshot(&row) {
            // Another request kept it first.
            tracing::debug!("keeping the shared record of {id}: {e}");
        }
        self.db.mark_shared(id)?;
        Ok(self.db.snapshot(namespace, id)?)
    }

    /// Brings this node's records of the namespace's snapshots in line with the shared
    /// store: records of snapshots taken elsewhere are read (once: they never change) and
    /// kept; shared snapshots whose record is gone (deleted elsewhere) are forgotten, with
    /// their local copy. Snapshots this node never shared are left alone.
    pub(super) async fn sync_shared(self: &Arc<Self>, namespace: &str) -> ApiResult<()> {
        let Some(shared) = self.shared() else { return Ok(()) };
        let names = shared
            .remote
            .record_names(namespace)
            .await
            .map_err(|e| self.unavailable("listing the shared records", e))?;
        let names: std::collections::HashSet<String> = names.into_iter().collect();
        for name in &names {
            // Reads the record only if this node has none.
            self.find_snapshot(namespace, name).await?;
        }
        for (id, store_id) in self.db.shared_snapshots(namespace)? {
            if !names.contains(&id)
                && let Some(store_id) = store_id
            {
                tracing::info!(snapshot = %id, "deleted on another node: forgotten here");
                self.forget(&store_id)?;
            }
        }
        Ok(())
    }

    /// Makes sure this node's stores hold snapshot `store_id` (with its memory image if
    /// `memory`), pulling what they lack; a local copy is used without asking the shared
    /// store anything. The caller uses the stores (`store_gate`), so nothing is evicted
    /// meanwhile.
    pub(super) async fn ensure_local(
        self: &Arc<Self>,
        store_id: &SnapshotId,
        memory: bool,
        size_bytes: i64,
    ) -> ApiResult<()> {
        let Some(shared) = self.shared() else { return Ok(()) };
        let key = store_id.as_str();
        let gate = shared.pulls.lock().unwrap().entry(key.to_string()).or_default().clone();
        let held = gate.clone().lock_owned().await;
        let result = self.ensure_local_gated(shared, store_id, memory, size_bytes).await;
        drop(held);
        let mut pulls = shared.pulls.lock().unwrap();
        // The map's reference and `gate`: nobody else waits.
        if Arc::strong_count(&gate) == 2 {
            pulls.remove(key);
        }
        result
    }

    async fn ensure_local_gated(
        self: &Arc<Self>,
        shared: &Shared,
        store_id: &SnapshotId,
        memory: bool,
        size_bytes: i64,
    ) -> ApiResult<()> {
        let (store, images, id) = (self.snapshots.store.clone(), self.snapshots.images.clone(), store_id.clone());
        let local = tokio::task::spawn_blocking(move || {
            store.contains(&id).unwrap_or(false) && (!memory || images.contains(&id))
        });
        if local.await? {
            self.cached(store_id.as_str(), size_bytes);
            return Ok(());
        }
        let stats = match shared.remote.pull(&self.snapshots.store, &self.snapshots.images, store_id).await {
            Ok(stats) => stats,
            Err(stasis_runtime::Error::Snapshot(SnapshotError::NotFound(_))) => {
                return self.not_shared(store_id);
            }
            Err(e) => {
                let what = format!("fetching snapshot {} from the shared store", store_id.as_str());
                return Err(self.unavailable(&what, e));
            }
        };
        if !stats.already_local {
            tracing::info!(
                store_id = store_id.as_str(),
                bytes_fetched = stats.bytes_fetched,
                ms = stats.wall.as_millis() as u64,
                "shared snapshot fetched"
            );
        }
        self.cached(store_id.as_str(), size_bytes);
        Ok(())
    }

    /// A snapshot the shared store does not have (and this node has no copy of): deleted on
    /// another node. Its record goes too.
    fn not_shared(self: &Arc<Self>, store_id: &SnapshotId) -> ApiResult<()> {
        self.forget(store_id.as_str())?;
        Err(ApiError::NotFound("the snapshot is no longer in the shared store (deleted on another node)".into()))
    }

    /// Drops this node's record and local copy of a shared snapshot deleted elsewhere.
    fn forget(self: &Arc<Self>, store_id: &str) -> ApiResult<()> {
        self.db.drop_cached(store_id)?;
        self.db.delete_snapshots_of_store(store_id)?;
        // In a task: the caller may be using the stores.
        let (state, id) = (self.clone(), store_id.to_string());
        tokio::spawn(async move {
            if let Err(e) = state.snapshots.delete_stored(&id).await {
                tracing::warn!("cannot drop the local copy of a deleted snapshot: {e:?}");
            }
        });
        Ok(())
    }

    /// Removes a snapshot from the shared tier (record first: no node finds it afterwards).
    pub(super) async fn unpublish(&self, row: &SnapshotRow) -> ApiResult<()> {
        let Some(shared) = self.shared() else { return Ok(()) };
        let what = "deleting the snapshot from the shared store";
        shared.remote.delete_record(&row.namespace, &row.id).await.map_err(|e| self.unavailable(what, e))?;
        if let Some(store_id) = &row.store_id {
            let id = SnapshotId::parse(store_id).map_err(ApiError::internal)?;
            shared.remote.delete(&id).await.map_err(|e| self.unavailable(what, e))?;
            self.db.drop_cached(store_id)?;
        }
        Ok(())
    }

    /// Notes a use of a shared snapshot's local copy, then trims the cache to its bound (in
    /// a task of its own: eviction waits until nothing uses the stores, the caller included).
    fn cached(self: &Arc<Self>, store_id: &str, size_bytes: i64) {
        let Some(shared) = self.shared() else { return };
        // Recorded even without a bound, so that a bound set at a later start knows the
        // copies already here and their order of use.
        if let Err(e) = self.db.touch_cached(store_id, size_bytes.max(0), now_ms()) {
            tracing::warn!("cannot record a cache use: {e}");
            return;
        }
        let Some(limit) = shared.cache_bytes else { return };
        let state = self.clone();
        let keep = store_id.to_string();
        tokio::spawn(async move { state.evict(limit, &keep).await });
    }

    /// Drops local copies of shared snapshots, least recently used first, until the rest fit
    /// in `limit` bytes; `keep` (just used) stays.
    async fn evict(&self, limit: u64, keep: &str) {
        let entries = match self.db.cached_by_use() {
            Ok(e) => e,
            Err(e) => return tracing::warn!("cannot read the cache records: {e}"),
        };
        let mut total: u64 = entries.iter().map(|(_, bytes)| *bytes as u64).sum();
        if total <= limit {
            return;
        }
        // Alone with the stores, as a sweep: a restore in progress never loses its snapshot.
        // Waiting for that moment holds no one else up (see `store_gate`).
        let sweeping = self.snapshots.gate.sweep().await;
        for (store_id, bytes) in entries {
            if total <= limit {
                break;
            }
            if store_id == keep {
                continue;
            }
            match self.snapshots.unlist(&store_id).await {
                Ok(()) => {
                    let _ = self.db.drop_cached(&store_id);
                    total = total.saturating_sub(bytes as u64);
                    tracing::info!(store_id, bytes, "dropped a shared snapshot's local copy (cache full)");
                }
                Err(e) => tracing::warn!(store_id, "cannot drop a cached snapshot: {e:?}"),
            }
        }
        drop(sweeping);
        // The sweep frees the chunks, and the programs no image names any more.
        self.snapshots.request_sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SharedRecord {
        SharedRecord {
            version: RECORD_VERSION,
            id: "snap0123456789abcdef01234567".into(),
            namespace: "team".into(),
            sandbox_id: "sb0123456789abcdef01234567".into(),
            snapshot_type: "memory".into(),
            store_id: "snap_0123456789ab0123456789abcdef".into(),
            size_bytes: 10,
            base_image: Some("default".into()),
            cpus: 1.0,
            memory_mb: 512,
            disk_mb: 1024,
            created_at: 1,
            completed_at: 2,
        }
    }

    #[test]
    fn records_from_the_bucket_are_checked_before_they_are_believed() {
        let id = "snap0123456789abcdef01234567";
        let ok = serde_json::to_vec(&record()).unwrap();
        assert_eq!(SharedRecord::parse(&ok, "team", id).unwrap(), record());
        let crafted = |f: fn(&mut SharedRecord)| {
            let mut r = record();
            f(&mut r);
            serde_json::to_vec(&r).unwrap()
        };
        for (bytes, namespace, expect) in [
            (ok.clone(), "other", "filed under `other`"),
            (crafted(|r| r.version = 2), "team", "record version 2"),
            (crafted(|r| r.id = "snap0000000000000000000000ff".into()), "team", "describes"),
            (crafted(|r| r.store_id = "../../etc".into()), "team", "invalid snapshot id"),
            (crafted(|r| r.snapshot_type = "disk".into()), "team", "unknown snapshot type"),
            (crafted(|r| r.base_image = Some("../x".into())), "team", "image"),
            (b"{\"version\":1}".to_vec(), "team", "not a snapshot record"),
        ] {
            let e = SharedRecord::parse(&bytes, namespace, id).unwrap_err();
            assert!(e.contains(expect), "{e} (wanted `{expect}`)");
        }
    }
}
