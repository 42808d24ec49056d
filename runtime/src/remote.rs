//! Snapshots in object storage, so that any node can restore what another took.
//!
//! The node's own stores (the filesystem snapshot store, the memory image store) stay where
//! captures write and restores read; a [`RemoteStore`] is the shared tier behind them. A
//! snapshot is *pushed* after its local commit and *pulled* into a node's stores before a
//! restore there, after which the local copy is a cache.
//!
//! # Layout (under the URL's path)
//!
//! ```text
//! chunks/<blake3 of raw bytes>      file chunks as the local store keeps them (raw or zstd)
//! blobs/<blake3 of the bytes>       manifests, memory images, programs
//! snapshots/<id>.json               a snapshot's descriptor: which blobs make it
//! records/<namespace>/<name>        what a caller knows the snapshot by (the API's records)
//! ```
//!
//! Everything but descriptors and records is content-addressed, so an upload is
//! incremental by construction (a re-snapshot uploads the chunks that changed and a new
//! manifest) and every download is verified against its name; a chunk or blob that fails
//! is fetched once more, then the pull fails. The descriptor is written after every part
//! it names, and a caller writes its record after the descriptor: a node killed
//! mid-upload leaves parts that nothing names, never a snapshot with missing parts.
//!
//! # Faults
//!
//! Requests are retried a bounded number of times (with backoff) and time out; past that
//! the push or pull fails with the store's error. Credentials come from the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...) and appear in no message: only the
//! URL and endpoint are ever shown.

use crate::error::{Error, Result};
use crate::fs_snapshot::{FsSnapshotStore, ImportStats, SnapshotError, SnapshotId, StoredChunk};
use crate::memory_snapshot::MemorySnapshotStore;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the shared tier is and how patient to be with it.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// `s3://bucket[/prefix]` or `file:///path` (a directory every node mounts).
    pub url: String,
    /// An S3-compatible server's URL (Garage, MinIO, Ceph), instead of AWS's.
    pub endpoint: Option<String>,
    /// The S3 region; S3-compatible servers name their own (Garage: `garage`).
    pub region: Option<String>,
    /// Retries of one failed request (with exponential backoff from 100 ms).
    pub max_retries: usize,
    /// Longest one request may take, retries not counted.
    pub request_timeout: Duration,
}

impl RemoteConfig {
    pub fn new(url: impl Into<String>) -> Self {
        RemoteConfig {
            url: url.into(),
            endpoint: None,
            region: None,
            max_retries: 3,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Requests in flight at once during a push or a pull.
const CONCURRENCY: usize = 16;
/// Objects larger than this are uploaded in parts of `PART_SIZE`.
const MULTIPART_FROM: usize = 16 << 20;
const PART_SIZE: usize = 8 << 20;
/// Largest descriptor or record accepted (they are a few hundred bytes).
const MAX_SMALL_OBJECT: usize = 1 << 20;
const DESCRIPTOR_VERSION: u32 = 1;

/// A content-addressed object: its blake3 and length.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct BlobRef {
    blake3: String,
    len: u64,
}

/// `snapshots/<id>.json`: the parts of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Descriptor {
    version: u32,
    fs_manifest: Option<BlobRef>,
    image: Option<BlobRef>,
    /// The programs the image names (blobs, by blake3).
    programs: Vec<String>,
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

/// The shared tier: an object store through the `object_store` crate.
pub struct RemoteStore {
    store: Arc<dyn ObjectStore>,
    root: Key,
    shown: String,
    /// Chunks known to be in the store (uploaded or seen): a re-snapshot asks about the rest.
    known_chunks: Mutex<HashSet<[u8; 32]>>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore").field("url", &self.shown).finish_non_exhaustive()
    }
}

fn remote_error(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::Remote(format!("{what}: {e}"))
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

fn hex(hash: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*hash).to_hex().to_string()
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    blake3::Hash::from_hex(s).ok().map(|h| *h.as_bytes())
}

impl RemoteStore {
    /// Connects (lazily: no request is made here) to the store `config` names.
    pub fn open(config: &RemoteConfig) -> Result<Self> {
        let bad = |why: String| Error::InvalidArgument(format!("object storage URL `{}`: {why}", config.url));
        let (store, root, shown): (Arc<dyn ObjectStore>, Key, String) =
            if let Some(path) = config.url.strip_prefix("file://") {
                if !path.starts_with('/') {
                    return Err(bad("a file:// URL needs an absolute path".into()));
                }
                std::fs::create_dir_all(path).map_err(|e| bad(format!("cannot create it: {e}")))?;
                let local = object_store::local::LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| bad(e.to_string()))?
                    .with_automatic_cleanup(true);
                (Arc::new(local), Key::default(), config.url.clone())
            } else if let Some(rest) = config.url.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("no bucket named".into()));
                }
                let retry = RetryConfig {
                    max_retries: config.max_retries,
                    retry_timeout: config.request_timeout * (config.max_retries as u32 + 1),
                    ..RetryConfig::default()
                };
                let client = ClientOptions::new()
                    .with_timeout(config.request_timeout)
                    .with_connect_timeout(Duration::from_secs(5).min(config.request_timeout));
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .with_client_options(client);
                if let Some(endpoint) = &config.endpoint {
                    builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
                }
                if let Some(region) = &config.region {
                    builder = builder.with_region(region);
                }
                let s3 = builder.build().map_err(|e| bad(e.to_string()))?;
                let shown = match &config.endpoint {
                    Some(ep) => format!("{} at {ep}", config.url),
                    None => config.url.clone(),
                };
                (Arc::new(s3), Key::from(prefix), shown)
            } else {
                return Err(bad("expected s3://bucket[/prefix] or file:///path".into()));
            };
        Ok(RemoteStore { store, root, shown, known_chunks: Mutex::default() })
    }

    /// The store as messages name it (URL and endpoint; never credentials).
    pub fn describe(&self) -> &str {
        &self.shown
    }

    fn key(&self, parts: &[&str]) -> Key {
        parts.iter().fold(self.root.clone(), |k, p| k.join(*p))
    }

    fn descriptor_key(&self, id: &SnapshotId) -> Key {
        self.key(&["snapshots", &format!("{}.json", id.as_str())])
    }

    async fn put(&self, key: &Key, bytes: Vec<u8>) -> Result<()> {
        let what = || format!("cannot upload `{key}` to {}", self.shown);
        if bytes.len() < MULTIPART_FROM {
            self.store.put(key, PutPayload::from(bytes)).await.map_err(|e| remote_error(what(), e))?;
            return Ok(());
        }
        let upload = self.store.put_multipart(key).await.map_err(|e| remote_error(what(), e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        for part in bytes.chunks(PART_SIZE) {
            writer.wait_for_capacity(4).await.map_err(|e| remote_error(what(), e))?;
            writer.write(part);
        }
        writer.finish().await.map_err(|e| remote_error(what(), e))?;
        Ok(())
    }

    /// The object's bytes, or `None` if there is no such object.
    async fn get(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        let what = || format!("cannot download `{key}` from {}", self.shown);
        let result = match self.store.get(key).await {
            Ok(r) => r,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(remote_error(what(), e)),
        };
        let bytes = result.bytes().await.map_err(|e| remote_error(what(), e))?;
        Ok(Some(bytes.to_vec()))
    }

    async fn get_small(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        let bytes = self.get(key).await?;
        if let Some(b) = &bytes
            && b.len() > MAX_SMALL_OBJECT
        {
            return Err(Error::Remote(format!("`{key}` in {} is {} bytes: not a Stasis object", self.shown, b.len())));
        }
        Ok(bytes)
    }

    async fn exists(&self, key: &Key) -> Result<bool> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(remote_error(format!("cannot check `{key}` in {}", self.shown), e)),
        }
    }

    /// Uploads a content-addressed blob unless it is there already.
    async fn put_blob(&self, bytes: Vec<u8>, stats: &Mutex<PushStats>) -> Result<BlobRef> {
        let blob = BlobRef { blake3: blake3::hash(&bytes).to_hex().to_string(), len: bytes.len() as u64 };
        let key = self.key(&["blobs", &blob.blake3]);
        if !self.exists(&key).await? {
            let n = bytes.len() as u64;
            self.put(&key, bytes).await?;
            let mut s = stats.lock().unwrap();
            s.blobs_uploaded += 1;
            s.bytes_uploaded += n;
        }
        Ok(blob)
    }

    /// A blob's bytes, verified against its name; fetched once more if they are not right.
    async fn get_blob(&self, blob: &BlobRef, what: &str) -> Result<Vec<u8>> {
        let key = self.key(&["blobs", &blob.blake3]);
        for attempt in 0..2 {
            let bytes = self
                .get(&key)
                .await?
                .ok_or_else(|| Error::Remote(format!("{what} (`{key}`) is missing from {}", self.shown)))?;
            if bytes.len() as u64 == blob.len && blake3::hash(&bytes).to_hex().as_str() == blob.blake3 {
                return Ok(bytes);
            }
            tracing::warn!("{what} (`{key}`) from {} failed its hash check (attempt {})", self.shown, attempt + 1);
        }
        Err(Error::Remote(format!("{what} (`{key}`) from {} fails its hash check twice", self.shown)))
    }

    /// Uploads snapshot `id` from this node's stores: the chunks and blobs the store lacks,
    /// then the descriptor. `progress` counts the bytes sent.
    pub async fn push(
        self: &Arc<Self>,
        fs: &Arc<FsSnapshotStore>,
        images: &Arc<MemorySnapshotStore>,
        id: &SnapshotId,
        progress: Option<Arc<AtomicU64>>,
    ) -> Result<PushStats> {
        let started = Instant::now();
        let stats = Mutex::new(PushStats::default());
        let (fs2, images2, id2) = (fs.clone(), images.clone(), id.clone());
        let (manifest, image) = tokio::task::spawn_blocking(move || -> Result<_> {
            let manifest = if fs2.contains(&id2)? { Some(fs2.manifest_bytes(&id2)?) } else { None };
            let image = if images2.contains(&id2) { Some(images2.read_image(&id2)?) } else { None };
            Ok((manifest, image))
        })
        .await
        .map_err(|e| Error::Remote(format!("push task failed: {e}")))??;
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
            self.push_chunks(fs, chunks, &stats, progress.as_deref()).await?;
            descriptor.fs_manifest = Some(self.put_blob(manifest, &stats).await?);
        }
        if let Some(image) = image {
            let programs = MemorySnapshotStore::programs_of(&image)?;
            for hash in &programs {
                let key = self.key(&["blobs", &hex(hash)]);
                if !self.exists(&key).await? {
                    let (images, hash) = (images.clone(), *hash);
                    let bytes = tokio::task::spawn_blocking(move || images.module(&hash))
                        .await
                        .map_err(|e| Error::Remote(format!("push task failed: {e}")))??;
                    self.put_blob(bytes, &stats).await?;
                }
                descriptor.programs.push(hex(hash));
            }
            descriptor.image = Some(self.put_blob(image, &stats).await?);
        }
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
        progress: Option<&AtomicU64>,
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
                    let bytes = tokio::task::spawn_blocking(move || fs.read_stored_chunk(&chunk))
                        .await
                        .map_err(|e| Error::Remote(format!("push task failed: {e}")))?
                        .map_err(Error::Snapshot)?;
                    let n = bytes.len() as u64;
                    self.put(&key, bytes).await?;
                    let mut s = stats.lock().unwrap();
                    s.chunks_uploaded += 1;
                    s.bytes_uploaded += n;
                    if let Some(p) = progress {
                        p.fetch_add(n, Ordering::Relaxed);
                    }
                }
                self.known_chunks.lock().unwrap().insert(hash.0);
                Ok::<(), Error>(())
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<()>()
            .await
    }

    /// Whether snapshot `id` is complete in the store (its descriptor is there).
    pub async fn contains(&self, id: &SnapshotId) -> Result<bool> {
        self.exists(&self.descriptor_key(id)).await
    }

    async fn descriptor(&self, id: &SnapshotId) -> Result<Descriptor> {
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
            let manifest = self.get_blob(blob, "the snapshot's manifest").await?;
            stats.blobs_fetched += 1;
            stats.bytes_fetched += manifest.len() as u64;
            let (this, fs, id2, handle) = (self.clone(), fs.clone(), id.clone(), tokio::runtime::Handle::current());
            let imported = tokio::task::spawn_blocking(move || {
                fs.import(&id2, &manifest, |batch| handle.block_on(this.get_chunks(batch)).map_err(|e| e.to_string()))
            })
            .await
            .map_err(|e| Error::Remote(format!("pull task failed: {e}")))?
            .map_err(Error::Snapshot)?;
            stats.bytes_fetched += imported.bytes_fetched;
            stats.fs = Some(imported);
        }
        if let (Some(blob), false) = (&d.image, have_image) {
            for program in &d.programs {
                let hash = parse_hex(program).expect("checked by descriptor()");
                if !images.has_module(&hash) {
                    let blob = self.blob_ref_of(&hash).await?;
                    let bytes = self.get_blob(&blob, "a program of the image").await?;
                    stats.blobs_fetched += 1;
                    stats.bytes_fetched += bytes.len() as u64;
                    let images = images.clone();
                    tokio::task::spawn_blocking(move || images.put_module_bytes(&hash, &bytes))
                        .await
                        .map_err(|e| Error::Remote(format!("pull task failed: {e}")))??;
                }
            }
            let image = self.get_blob(blob, "the memory image").await?;
            stats.blobs_fetched += 1;
            stats.bytes_fetched += image.len() as u64;
            let (images, id2) = (images.clone(), id.clone());
            tokio::task::spawn_blocking(move || {
                // Another pull of the same snapshot may have written it meanwhile.
                if images.contains(&id2) { Ok(()) } else { images.write_image(&id2, &image) }
            })
            .await
            .map_err(|e| Error::Remote(format!("pull task failed: {e}")))??;
        }
        stats.wall = started.elapsed();
        Ok(stats)
    }

    /// A program's blob: its length comes from the store (programs are named by hash alone).
    async fn blob_ref_of(&self, hash: &[u8; 32]) -> Result<BlobRef> {
        let key = self.key(&["blobs", &hex(hash)]);
        let meta = self.store.head(&key).await.map_err(|e| match is_not_found(&e) {
            true => Error::Remote(format!("program {} is missing from {}", hex(hash), self.shown)),
            false => remote_error(format!("cannot check `{key}` in {}", self.shown), e),
        })?;
        Ok(BlobRef { blake3: hex(hash), len: meta.size })
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
        match self.store.delete(&self.descriptor_key(id)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(remote_error(format!("cannot delete snapshot {} from {}", id.as_str(), self.shown), e)),
        }
    }

    fn record_key(&self, namespace: &str, name: &str) -> Key {
        self.key(&["records", namespace, name])
    }

    /// Writes a caller's record of a snapshot (after [`push`](Self::push): the record is what
    /// makes the snapshot visible).
    pub async fn put_record(&self, namespace: &str, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.put(&self.record_key(namespace, name), bytes).await
    }

    pub async fn record(&self, namespace: &str, name: &str) -> Result<Option<Vec<u8>>> {
        self.get_small(&self.record_key(namespace, name)).await
    }

    /// The names of `namespace`'s records (one listing; records are read one by one with
    /// [`record`](Self::record), and never change once written).
    pub async fn record_names(&self, namespace: &str) -> Result<Vec<String>> {
        let prefix = self.key(&["records", namespace]);
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| remote_error(format!("cannot list `{prefix}` in {}", self.shown), e))?;
        Ok(metas.into_iter().filter_map(|m| m.location.filename().map(String::from)).collect())
    }

    pub async fn delete_record(&self, namespace: &str, name: &str) -> Result<()> {
        let key = self.record_key(namespace, name);
        match self.store.delete(&key).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(remote_error(format!("cannot delete `{key}` from {}", self.shown), e)),
        }
    }
}
