//! Garbage collection of the bucket, and the leases that keep it away from uploads.
//!
//! Deleting a snapshot removes its descriptor; the chunks and blobs only it used stay until
//! a collection ([`RemoteStore::gc`], `stasis remote gc`) deletes every chunk and blob no
//! descriptor names. Its one danger is an upload in flight: a push that found a chunk in
//! the bucket, skipped it, and has not yet written the descriptor that names it. So pushes
//! and collections exclude each other through two kinds of objects:
//!
//! - a push writes `leases/<random>` first, then looks for `gc/lock`: if a collection holds
//!   it, the push removes its lease and fails ("try again");
//! - a collection writes `gc/lock` first, then lists `leases/`: if any push holds one, it
//!   removes its lock and fails.
//!
//! With read-after-write consistency (S3, Garage), whichever wrote second sees the other's
//! object, so they never overlap (at worst both give way). A push also forgets the chunks
//! it remembers uploading when `gc/epoch` changed since it last looked: a collection may have
//! deleted them. A lease or lock older than [`STALE_AFTER`] is from a crashed node and is
//! ignored; a push that takes longer than [`PUSH_LIMIT`] fails before its descriptor.

use super::{CONCURRENCY, Key, RemoteStore, parse_hex};
use crate::error::{Error, Result};
use crate::fs_snapshot::{FsSnapshotStore, Manifest};
use futures_util::{StreamExt, TryStreamExt};
use object_store::ObjectMeta;
use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

/// A lease or lock older than this belongs to a node that died.
pub const STALE_AFTER: Duration = Duration::from_secs(3600);
/// A push fails rather than write a descriptor after this long (its lease may be stale).
pub const PUSH_LIMIT: Duration = Duration::from_secs(1800);

/// What a collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RemoteGcStats {
    pub snapshots: u64,
    pub chunks_kept: u64,
    pub chunks_deleted: u64,
    pub blobs_kept: u64,
    pub blobs_deleted: u64,
    pub bytes_freed: u64,
}

/// A push's lease, to give back with [`RemoteStore::end_push`].
pub(super) struct Lease {
    key: Key,
    started: Instant,
}

fn fresh(meta: &ObjectMeta) -> bool {
    let now_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    now_ms - meta.last_modified.timestamp_millis() < STALE_AFTER.as_millis() as i64
}

fn random_name() -> Result<String> {
    let mut rnd = [0u8; 16];
    getrandom::fill(&mut rnd).map_err(|e| Error::Remote(format!("cannot get random bytes: {e}")))?;
    Ok(rnd.iter().map(|b| format!("{b:02x}")).collect())
}

impl RemoteStore {
    fn lock_key(&self) -> Key {
        self.key(&["gc", "lock"])
    }

    /// The object at `key` if it is there and not stale.
    async fn fresh_object(&self, key: &Key) -> Result<Option<ObjectMeta>> {
        Ok(self.head(key).await?.filter(fresh))
    }

    /// Takes a lease for one push; fails while a collection runs.
    pub(super) async fn begin_push(&self) -> Result<Lease> {
        let key = self.key(&["leases", &random_name()?]);
        self.put(&key, b"push".to_vec()).await?;
        let lease = Lease { key, started: Instant::now() };
        if self.fresh_object(&self.lock_key()).await?.is_some() {
            self.end_push(lease).await;
            return Err(Error::Remote(format!(
                "{} is being garbage-collected (`gc/lock`); try again when the collection ends",
                self.shown
            )));
        }
        let epoch = match self.get_small(&self.key(&["gc", "epoch"])).await {
            Ok(epoch) => epoch.unwrap_or_default(),
            Err(e) => {
                self.end_push(lease).await;
                return Err(e);
            }
        };
        let mut seen = self.gc_epoch.lock().unwrap();
        if *seen != epoch {
            // A collection ran since: what this node remembers uploading may be gone.
            self.known_chunks.lock().unwrap().clear();
            *seen = epoch;
        }
        Ok(lease)
    }

    /// Fails a push that outlived its lease's guarantee, before it names anything.
    pub(super) fn check_lease(&self, lease: &Lease) -> Result<()> {
        if lease.started.elapsed() > PUSH_LIMIT {
            return Err(Error::Remote(format!(
                "the upload took longer than {} s; a collection may have run meanwhile",
                PUSH_LIMIT.as_secs()
            )));
        }
        Ok(())
    }

    pub(super) async fn end_push(&self, lease: Lease) {
        if let Err(e) = self.remove(&lease.key).await {
            tracing::warn!("cannot remove an upload's lease (it goes stale in an hour): {e}");
        }
    }

    /// Deletes every chunk and blob no snapshot descriptor names. Fails, changing nothing,
    /// while an upload holds a lease or another collection holds the lock, or if any
    /// descriptor or manifest cannot be read (what it names would be unknown).
    pub async fn gc(&self) -> Result<RemoteGcStats> {
        let lock = self.lock_key();
        if self.fresh_object(&lock).await?.is_some() {
            return Err(Error::Remote(format!("another collection of {} is running (`gc/lock`)", self.shown)));
        }
        self.put(&lock, b"gc".to_vec()).await?;
        let result = async {
            let leases: Vec<_> = self.list(&["leases"]).await?.into_iter().filter(fresh).collect();
            if !leases.is_empty() {
                return Err(Error::Remote(format!(
                    "{} upload(s) to {} in progress (`leases/`); try again when they end",
                    leases.len(),
                    self.shown
                )));
            }
            let stats = self.sweep().await?;
            self.put(&self.key(&["gc", "epoch"]), random_name()?.into_bytes()).await?;
            Ok(stats)
        }
        .await;
        self.remove(&lock).await?;
        result
    }

    async fn sweep(&self) -> Result<RemoteGcStats> {
        let mut stats = RemoteGcStats::default();
        let (mut chunks, mut blobs) = (HashSet::new(), HashSet::new());
        for meta in self.list(&["snapshots"]).await? {
            let Some(id) = meta.location.filename().and_then(|n| n.strip_suffix(".json")) else { continue };
            let id = crate::fs_snapshot::SnapshotId::parse(id)
                .map_err(|e| Error::Remote(format!("`{}` in {}: {e}", meta.location, self.shown)))?;
            let d = match self.descriptor(&id).await {
                Ok(d) => d,
                Err(Error::Snapshot(crate::fs_snapshot::SnapshotError::NotFound(_))) => continue, // deleted meanwhile
                Err(e) => return Err(e),
            };
            stats.snapshots += 1;
            if let Some(manifest) = &d.fs_manifest {
                blobs.insert(manifest.blake3.clone());
                let bytes = self.get_blob(&manifest.blake3, Some(manifest.len), "a snapshot's manifest").await?;
                let manifest = Manifest::decode(&bytes)
                    .map_err(|e| Error::Remote(format!("the manifest of {} in {}: {e}", id.as_str(), self.shown)))?;
                chunks.extend(FsSnapshotStore::stored_chunks(&manifest).iter().map(|c| c.hash().to_hex()));
            }
            blobs.extend(d.image.iter().map(|b| b.blake3.clone()));
            blobs.extend(d.programs.iter().cloned());
        }
        let (kept, deleted, freed) = self.delete_unnamed(&["chunks"], &chunks).await?;
        (stats.chunks_kept, stats.chunks_deleted, stats.bytes_freed) = (kept, deleted, freed);
        let (kept, deleted, freed) = self.delete_unnamed(&["blobs"], &blobs).await?;
        (stats.blobs_kept, stats.blobs_deleted) = (kept, deleted);
        stats.bytes_freed += freed;
        Ok(stats)
    }

    /// Deletes the objects under `prefix` whose names (blake3 hex) are not in `named`:
    /// (kept, deleted, bytes freed). Names that are not hashes are not ours and stay.
    async fn delete_unnamed(&self, prefix: &[&str], named: &HashSet<String>) -> Result<(u64, u64, u64)> {
        let all = self.list(prefix).await?;
        let (doomed, kept): (Vec<_>, Vec<_>) = all.into_iter().partition(|m| {
            m.location.filename().is_some_and(|name| parse_hex(name).is_some() && !named.contains(name))
        });
        let freed = doomed.iter().map(|m| m.size).sum();
        let deleted = doomed.len() as u64;
        futures_util::stream::iter(doomed)
            .map(|m| async move { self.remove(&m.location).await })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<()>()
            .await?;
        Ok((kept.len() as u64, deleted, freed))
    }
}
