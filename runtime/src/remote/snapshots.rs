//! Snapshots in the bucket: the descriptor that names a snapshot's parts, the push that
//! uploads what the bucket lacks, the pull that brings a snapshot into a node's stores.

use super::{CONCURRENCY, Key, RemoteStore, blocking, hex, parse_hex};
use crate::error::{Error, Result};
use crate::fs_snapshot::{FsSnapshotStore, ImportStats, SnapshotError, SnapshotId, StoredChunk};
use crate::memory_snapshot::MemorySnapshotStore;
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DESCRIPTOR_VERSION: u32 = 1;

/// A content-addressed object: its blake3 and length.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct BlobRef {
    pub(super) blake3: String,
    pub(super) len: u64,
}

/// `snapshots/<id>.json`: the parts of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Descriptor {
    version: u32,
    pub(super) fs_manifest: Option<BlobRef>,
    pub(super) image: Option<BlobRef>,
    /// The programs the image names (blobs, by blake3).
    pub(super) programs: Vec<String>,
}

/// What a push did.
#[derive(Clone, Debug, Default)]
pub struct PushStats {
    pub chunks: u64,
    pub chunks_uploaded: u64,
    pub blobs_uploaded: u64,
    /// Bytes sent, all objects included.
    pub bytes_uploaded: u64,
    pub wall: Duration,
}

/// What a pull did.
#[derive(Clone, Debug, Default)]
pub struct PullStats {
    pub fs: Option<ImportStats>,
    pub blobs_fetched: u64,
    /// Bytes received, chunks included.
    pub bytes_fetched: u64,
    /// Everything was already in the local stores.
    pub already_local: bool,
    pub wall: Duration,
}

impl RemoteStore {
    fn blob_key(&self, blake3: &str) -> Key {
        self.key(&["blobs", blake3])
    }

    /// Uploads a content-addressed blob unless it is there already.
    async fn put_blob(&self, bytes: Vec<u8>, stats: &Mutex<PushStats>) -> Result<BlobRef> {
        let blob = BlobRef { blake3: blake3::hash(&bytes).to_hex().to_string(), len: bytes.len() as u64 };
        let key = self.blob_key(&blob.blake3);
        if !self.exists(&key).await? {
            self.upload_blob(&key, bytes, stats).await?;
        }
        Ok(blob)
    }

    async fn upload_blob(&self, key: &Key, bytes: Vec<u8>, stats: &Mutex<PushStats>) -> Result<()> {
        let n = bytes.len() as u64;
        self.put(key, bytes).await?;
        let mut s = stats.lock().unwrap();
        s.blobs_uploaded += 1;
        s.bytes_uploaded += n;
        Ok(())
    }

    /// Blob `blake3`'s bytes (of length `len`, when the descriptor says), verified against
    /// its name; fetched once more if they are not right.
    pub(super) async fn get_blob(&self, blake3: &str, len: Option<u64>, what: &str) -> Result<Vec<u8>> {
        let key = self.blob_key(blake3);
        for attempt in 0..2 {
            let bytes = self
                .get(&key)
                .await?
                .ok_or_else(|| Error::Remote(format!("{what} (`{key}`) is missing from {}", self.shown)))?;
            let len_ok = len.is_none_or(|len| bytes.len() as u64 == len);
            if len_ok && blake3::hash(&bytes).to_hex().as_str() == blake3 {
                return Ok(bytes);
            }
            tracing::warn!("{what} (`{key}`) from {} failed its hash check (attempt {})", self.shown, attempt + 1);
        }
        Err(Error::Remote(format!("{what} (`{key}`) from {} fails its hash check twice", self.shown)))
    }

    /// Uploads snapshot `id` from this node's stores: the chunks and blobs the store lacks,
    /// then the descriptor.
    pub async fn push(
        self: &Arc<Self>,
        fs: &Arc<FsSnapshotStore>,
        images: &Arc<MemorySnapshotStore>,
        id: &SnapshotId,
    ) -> Result<PushStats> {
        let lease = self.begin_push().await?;
        let result = self.push_leased(fs, images, id, &lease).await;
        self.end_push(lease).await;
        result
    }

    async fn push_leased(
        self: &Arc<Self>,
        fs: &Arc<FsSnapshotStore>,
        images: &Arc<MemorySnapshotStore>,
        id: &SnapshotId,
        lease: &super::gc::Lease,
    ) -> Result<PushStats> {
        let started = Instant::now();
        let stats = Mutex::new(PushStats::default());
        let (fs2, images2, id2) = (fs.clone(), images.clone(), id.clone());
        let (manifest, image) = blocking(move || {
            let manifest = if fs2.contains(&id2)? { Some(fs2.manifest_bytes(&id2)?) } else { None };
            let image = if images2.contains(&id2) { Some(images2.read_image(&id2)?) } else { None };
            Ok((manifest, image))
        })
        .await?;
        if manifest.is_none() && image.is_none() {
            return Err(Error::Snapshot(SnapshotError::NotFound(id.clone())));
        }
        let mut descriptor =
            Descriptor { version: DESCRIPTOR_VERSION, fs_manifest: None, image: None, programs: Vec::new() };
        if let Some(manifest) = manifest {
            let decoded = crate::fs_snapshot::Manifest::decode(&manifest)
                .map_err(|e| Error::Snapshot(SnapshotError::Manifest { id: id.to_string(), source: e }))?;
            let chunks = FsSnapshotStore::stored_chunks(&decoded);
            stats.lock().unwrap().chunks = chunks.len() as u64;
            self.push_chunks(fs, chunks, &stats).await?;
            descriptor.fs_manifest = Some(self.put_blob(manifest, &stats).await?);
        }
        if let Some(image) = image {
            let programs = MemorySnapshotStore::programs_of(&image)?;
            for hash in &programs {
                // Checked before the program is read from disk (a large one is shared by many
                // snapshots, and usually uploaded already).
                let key = self.blob_key(&hex(hash));
                if !self.exists(&key).await? {
                    let (images, hash) = (images.clone(), *hash);
                    let bytes = blocking(move || images.module(&hash)).await?;
                    self.upload_blob(&key, bytes, &stats).await?;
                }
                descriptor.programs.push(hex(hash));
            }
            descriptor.image = Some(self.put_blob(image, &stats).await?);
        }
        self.check_lease(lease)?;
        let json = serde_json::to_vec(&descriptor).expect("a descriptor serializes");
        self.put(&self.descriptor_key(id), json).await?;
        let mut stats = stats.into_inner().unwrap();
        stats.wall = started.elapsed();
        Ok(stats)
    }

    async fn push_chunks(
        self: &Arc<Self>,
        fs: &Arc<FsSnapshotStore>,
        chunks: Vec<StoredChunk>,
        stats: &Mutex<PushStats>,
    ) -> Result<()> {
        let unknown: Vec<StoredChunk> = {
            let known = self.known_chunks.lock().unwrap();
            chunks.into_iter().filter(|c| !known.contains(&c.hash().0)).collect()
        };
        futures_util::stream::iter(unknown)
            .map(|chunk| async move {
                let hash = chunk.hash();
                let key = self.key(&["chunks", &hash.to_hex()]);
                if !self.exists(&key).await? {
                    let fs = fs.clone();
                    let bytes = blocking(move || fs.read_stored_chunk(&chunk).map_err(Error::Snapshot)).await?;
                    let n = bytes.len() as u64;
                    self.put(&key, bytes).await?;
                    let mut s = stats.lock().unwrap();
                    s.chunks_uploaded += 1;
                    s.bytes_uploaded += n;
                }
                self.known_chunks.lock().unwrap().insert(hash.0);
                Ok::<(), Error>(())
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<()>()
            .await
    }

    pub(super) async fn descriptor(&self, id: &SnapshotId) -> Result<Descriptor> {
        let key = self.descriptor_key(id);
        let bytes = self.get_small(&key).await?.ok_or_else(|| Error::Snapshot(SnapshotError::NotFound(id.clone())))?;
        let d: Descriptor = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Remote(format!("`{key}` in {} is not a snapshot descriptor: {e}", self.shown)))?;
        if d.version != DESCRIPTOR_VERSION {
            return Err(Error::Remote(format!(
                "`{key}` in {} has descriptor version {}; this node reads version {DESCRIPTOR_VERSION}",
                self.shown, d.version
            )));
        }
        let well_formed = |b: &BlobRef| parse_hex(&b.blake3).is_some();
        if !d.fs_manifest.iter().chain(&d.image).all(well_formed) || !d.programs.iter().all(|p| parse_hex(p).is_some())
        {
            return Err(Error::Remote(format!("`{key}` in {} names a blob by a malformed hash", self.shown)));
        }
        Ok(d)
    }

    /// Brings snapshot `id` into this node's stores (what they lack of it), verifying every
    /// part. Afterwards the snapshot restores here like one taken here. A snapshot the store
    /// does not have (never shared, or deleted) is `SnapshotError::NotFound`.
    pub async fn pull(
        self: &Arc<Self>,
        fs: &Arc<FsSnapshotStore>,
        images: &Arc<MemorySnapshotStore>,
        id: &SnapshotId,
    ) -> Result<PullStats> {
        let started = Instant::now();
        let mut stats = PullStats::default();
        let d = self.descriptor(id).await?;
        let have_tree = match &d.fs_manifest {
            None => true,
            Some(_) => fs.contains(id).map_err(Error::Snapshot)?,
        };
        let have_image = d.image.is_none() || images.contains(id);
        if have_tree && have_image {
            stats.already_local = true;
            stats.wall = started.elapsed();
            return Ok(stats);
        }
        if let (Some(blob), false) = (&d.fs_manifest, have_tree) {
            let manifest = self.get_blob(&blob.blake3, Some(blob.len), "the snapshot's manifest").await?;
            stats.blobs_fetched += 1;
            stats.bytes_fetched += manifest.len() as u64;
            let (this, fs, id2, handle) = (self.clone(), fs.clone(), id.clone(), tokio::runtime::Handle::current());
            let imported = blocking(move || {
                fs.import(&id2, &manifest, |batch| handle.block_on(this.get_chunks(batch)).map_err(|e| e.to_string()))
                    .map_err(Error::Snapshot)
            })
            .await?;
            stats.bytes_fetched += imported.bytes_fetched;
            stats.fs = Some(imported);
        }
        if let (Some(blob), false) = (&d.image, have_image) {
            for program in &d.programs {
                let hash = parse_hex(program).expect("checked by descriptor()");
                if !images.has_module(&hash) {
                    let bytes = self.get_blob(program, None, "a program of the image").await?;
                    stats.blobs_fetched += 1;
                    stats.bytes_fetched += bytes.len() as u64;
                    let images = images.clone();
                    blocking(move || images.put_module_bytes(&hash, &bytes)).await?;
                }
            }
            let image = self.get_blob(&blob.blake3, Some(blob.len), "the memory image").await?;
            stats.blobs_fetched += 1;
            stats.bytes_fetched += image.len() as u64;
            let (images, id2) = (images.clone(), id.clone());
            blocking(move || {
                // Another pull of the same snapshot may have written it meanwhile.
                if images.contains(&id2) { Ok(()) } else { images.write_image(&id2, &image) }
            })
            .await?;
        }
        stats.wall = started.elapsed();
        Ok(stats)
    }

    /// The stored bytes of `batch`, in order, fetched concurrently.
    async fn get_chunks(&self, batch: &[StoredChunk]) -> Result<Vec<Vec<u8>>> {
        let got: Vec<Vec<u8>> = futures_util::stream::iter(batch)
            .map(|chunk| async move {
                let key = self.key(&["chunks", &chunk.hash().to_hex()]);
                self.get(&key)
                    .await?
                    .ok_or_else(|| Error::Remote(format!("chunk `{key}` is missing from {}", self.shown)))
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
        let mut known = self.known_chunks.lock().unwrap();
        known.extend(batch.iter().map(|c| c.hash().0));
        Ok(got)
    }

    /// Removes snapshot `id`'s descriptor: no node can pull it any more. Its chunks and
    /// blobs stay (other snapshots may share them).
    pub async fn delete(&self, id: &SnapshotId) -> Result<()> {
        self.remove(&self.descriptor_key(id)).await
    }
}
