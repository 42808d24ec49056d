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

mod gc;
mod snapshots;

pub use gc::{PUSH_LIMIT, RemoteGcStats, STALE_AFTER};
pub use snapshots::{PullStats, PushStats};

use crate::error::{Error, Result};
use crate::fs_snapshot::SnapshotId;
use futures_util::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// The shared tier: an object store through the `object_store` crate.
pub struct RemoteStore {
    store: Arc<dyn ObjectStore>,
    root: Key,
    shown: String,
    /// Chunks known to be in the store (uploaded or seen): a re-snapshot asks about the rest.
    known_chunks: Mutex<HashSet<[u8; 32]>>,
    /// `gc/epoch` when this client last looked (see `gc`).
    gc_epoch: Mutex<Vec<u8>>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore").field("url", &self.shown).finish_non_exhaustive()
    }
}

/// Runs `f` (local store I/O) on a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Remote(format!("a store task failed: {e}")))?
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
        Ok(RemoteStore { store, root, shown, known_chunks: Mutex::default(), gc_epoch: Mutex::default() })
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

    /// The object's metadata, or `None` if there is no such object.
    async fn head(&self, key: &Key) -> Result<Option<ObjectMeta>> {
        match self.store.head(key).await {
            Ok(meta) => Ok(Some(meta)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(remote_error(format!("cannot check `{key}` in {}", self.shown), e)),
        }
    }

    async fn exists(&self, key: &Key) -> Result<bool> {
        Ok(self.head(key).await?.is_some())
    }

    /// Every object under `prefix`.
    async fn list(&self, prefix: &[&str]) -> Result<Vec<ObjectMeta>> {
        let prefix = self.key(prefix);
        self.store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| remote_error(format!("cannot list `{prefix}` in {}", self.shown), e))
    }

    /// Deletes the object; one already gone is fine.
    async fn remove(&self, key: &Key) -> Result<()> {
        match self.store.delete(key).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(remote_error(format!("cannot delete `{key}` from {}", self.shown), e)),
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
        let metas = self.list(&["records", namespace]).await?;
        Ok(metas.into_iter().filter_map(|m| m.location.filename().map(String::from)).collect())
    }

    pub async fn delete_record(&self, namespace: &str, name: &str) -> Result<()> {
        self.remove(&self.record_key(namespace, name)).await
    }
}
