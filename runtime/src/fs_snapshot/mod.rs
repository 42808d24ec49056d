//! Filesystem snapshots: capture a directory tree into a content-addressed store, restore it
//! into a new tree exactly like it, export and import standard tar archives.
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cap_std::{ambient_authority, fs::Dir};
//! use stasis_runtime::fs_snapshot::{CaptureOptions, FsSnapshotStore};
//!
//! let store = FsSnapshotStore::open("/var/lib/stasis/snapshots/fs")?;
//! let tree = Dir::open_ambient_dir("/srv/sandboxes/demo/root", ambient_authority())?;
//!
//! // Two phases keep the pause short: a full capture while the guests run...
//! let warm = store.capture(&tree, CaptureOptions::new("/srv/sandboxes/demo/root"))?;
//! // ...then, with the guests paused, one that only stats what did not change.
//! let pending = store.capture(&tree, CaptureOptions::new("/srv/sandboxes/demo/root").parent(warm.manifest()))?;
//! // (resume the guests here)
//! let id = store.commit(pending)?; // durable and listed from here on
//! drop(warm);
//!
//! store.restore(&id, "/srv/sandboxes/fork/root".as_ref())?;
//! # Ok(()) }
//! ```
//!
//! # Store layout
//!
//! ```text
//! <store>/lock                       flock: shared for capture/commit/restore/export,
//!                                    exclusive for delete/gc and crash cleanup
//! <store>/chunks/<2 hex>/<64 hex>    content-addressed chunks (see `chunks`)
//! <store>/snapshots/<id>.manifest    committed snapshots (see `manifest`)
//! <store>/tmp/                       temp files and crash markers of unfinished captures
//! ```
//!
//! # Concurrency
//!
//! Captures (from their start until commit or drop of the [`PendingSnapshot`]), restores and
//! exports hold the lock shared; `delete` and `gc` take it exclusively, so chunks are never
//! swept while a capture may still refer to them, whether that capture runs in another thread
//! or in another process. As a second fence, a sweep never deletes a chunk whose mtime is not
//! older than the sweep's start. `open` cleans up after crashed runs only when it can take the
//! lock exclusively without waiting (nobody else is using the store).
//!
//! Within one process, `delete`/`gc` while this store has a live [`PendingSnapshot`] would
//! wait for itself; they return [`SnapshotError::Busy`] instead.

mod archive;
mod capture;
mod chunks;
pub mod manifest;
mod restore;
mod transfer;

pub use capture::MAX_CAPTURE_CHUNKS;
pub use chunks::ReadTimes;
pub use manifest::{Chunk, ChunkHash, Entry, EntryKind, Manifest, ManifestError, ManifestParts};
pub use transfer::{ImportStats, StoredChunk};

use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions};
use chunks::{ChunkStore, ChunkWriter, Marker};
use manifest::{EntryKind as Kind, Origin, ns_from_time};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

/// Files are cut into chunks of this size (the last one shorter).
///
/// 1 MiB: large enough that the fixed cost of a chunk (a hash lookup, a file create, a rename,
/// ~30 µs) stays under 2% of the ~2 ms it takes to hash and compress it, that a 1 GiB file is
/// only 1024 manifest entries (33 KiB), and that zstd sees enough context to compress well;
/// small enough that a small change in a big file re-stores only 1 MiB, that each worker's
/// buffers stay in cache, and that holes in sparse files are found at a useful granularity.
/// Fixed-size rather than content-defined chunking: sandbox files are rewritten in place or
/// appended to far more often than bytes are inserted in the middle, and fixed offsets let
/// restore write every chunk independently (and reflink it) at a known, aligned position.
pub const CHUNK_SIZE: u32 = 1 << 20;

/// Everything that can go wrong with the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("invalid snapshot id `{0}`: expected `snap_` followed by 28 lowercase hex digits")]
    InvalidId(String),
    #[error("snapshot {0} not found")]
    NotFound(SnapshotId),
    #[error("snapshot {id}: {source}")]
    Manifest { id: String, source: ManifestError },
    #[error("chunk {hash} of `{path}` is missing from the store")]
    ChunkMissing { hash: String, path: String },
    #[error("chunk {hash} of `{path}` is corrupt: {reason}")]
    ChunkCorrupt { hash: String, path: String, reason: String },
    #[error("cannot restore into `{0}`: it exists and is not an empty directory")]
    TargetExists(String),
    #[error("the parent snapshot's chunks are no longer in the store ({0}); capture without a parent")]
    ParentGone(String),
    #[error("the snapshot store is busy: {0}")]
    Busy(String),
    /// A tree beyond what one snapshot may hold (see `capture::MAX_CAPTURE_CHUNKS`).
    #[error("{0}")]
    TooLarge(String),
    #[error("invalid tar archive: {0}")]
    InvalidArchive(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Fetching a snapshot's parts from elsewhere (object storage) failed.
    #[error("{0}")]
    Transfer(String),
}

pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;

pub(crate) fn io_error(context: impl Into<String>, source: io::Error) -> SnapshotError {
    SnapshotError::Io { context: context.into(), source }
}

/// A snapshot's id: `snap_` + 12 hex digits of milliseconds since the Unix epoch + 16 random
/// hex digits. Ids sort by creation time and cannot be guessed; only this exact spelling is
/// accepted, so an id can never name a path outside the store.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId(String);

impl SnapshotId {
    const PREFIX: &'static str = "snap_";
    const LEN: usize = 5 + 12 + 16;

    pub fn parse(s: &str) -> Result<Self> {
        let ok = s.len() == Self::LEN
            && s.starts_with(Self::PREFIX)
            && s.as_bytes()[Self::PREFIX.len()..].iter().all(|&c| manifest::hex_digit(c).is_some());
        if ok { Ok(SnapshotId(s.to_string())) } else { Err(SnapshotError::InvalidId(s.escape_debug().to_string())) }
    }

    pub fn generate(at: SystemTime) -> Result<Self> {
        let ms = at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).map_err(|e| io_error("cannot get random bytes", io::Error::other(e)))?;
        Ok(SnapshotId(format!("{}{:012x}{}", Self::PREFIX, ms & 0xffff_ffff_ffff, manifest::hex(&rnd))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn file_name(&self) -> String {
        format!("{}.manifest", self.0)
    }

    fn bytes(&self) -> [u8; 33] {
        self.0.as_bytes().try_into().expect("validated length")
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SnapshotId {
    type Err = SnapshotError;
    fn from_str(s: &str) -> Result<Self> {
        SnapshotId::parse(s)
    }
}

/// One line of [`FsSnapshotStore::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub created: SystemTime,
    pub source: String,
    /// Sum of file sizes (logical: holes count).
    pub bytes: u64,
    pub entries: u64,
    /// Bytes of chunk files this snapshot added to the store when it was taken.
    pub stored_bytes_new: u64,
}

/// What to capture and how.
#[derive(Clone, Debug, Default)]
pub struct CaptureOptions<'a> {
    /// A label for where the tree came from (the CLI uses the directory's absolute path).
    pub source: String,
    /// A previous capture of the same tree: files whose size, mtime, ctime and inode are
    /// unchanged (and not "racy") reuse its chunks without being read. A committed snapshot
    /// ([`FsSnapshotStore::get`]) or a live [`PendingSnapshot`]'s manifest is trusted as is;
    /// any other manifest (decoded from bytes, cloned) is checked chunk by chunk first.
    pub parent: Option<&'a Manifest>,
    /// Worker threads for reading, hashing and compressing; 0 = one per core.
    pub threads: usize,
    /// Progress for an observer: the capture adds the bytes of every file it has read or
    /// reused as it goes (at the end, the tree's logical size).
    pub progress: Option<Arc<AtomicU64>>,
}

impl<'a> CaptureOptions<'a> {
    pub fn new(source: impl Into<String>) -> Self {
        CaptureOptions { source: source.into(), parent: None, threads: 0, progress: None }
    }

    pub fn progress(mut self, progress: Arc<AtomicU64>) -> Self {
        self.progress = Some(progress);
        self
    }

    pub fn parent(mut self, parent: &'a Manifest) -> Self {
        self.parent = Some(parent);
        self
    }
}

/// What a capture did, and where its time went. Durations of the worker phases (read, hash,
/// compress, write) are summed over the worker threads.
#[derive(Clone, Debug, Default)]
pub struct CaptureStats {
    pub entries: u64,
    pub files_read: u64,
    /// Files whose chunks were taken from the parent without reading them.
    pub files_reused: u64,
    pub bytes_read: u64,
    pub chunks_new: u64,
    pub chunks_existing: u64,
    pub chunks_zero: u64,
    pub stored_bytes_new: u64,
    pub wall: Duration,
    /// The walking thread: readdir, lstat, open, fstat.
    pub walk: Duration,
    pub read: Duration,
    pub hash: Duration,
    pub compress: Duration,
    /// Chunk existence checks, temp file writes, renames (and the first marker's fsync).
    pub write: Duration,
}

/// How to restore.
#[derive(Clone, Copy, Debug)]
pub struct RestoreOptions {
    /// `syncfs` the new tree before renaming it into place, so that after a power failure the
    /// target either does not exist or is complete. Off for throwaway trees (forks for tests).
    pub durable: bool,
    /// Worker threads; 0 = one per core.
    pub threads: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions { durable: true, threads: 0 }
    }
}

/// What a restore did; worker durations are summed over threads.
#[derive(Clone, Debug, Default)]
pub struct RestoreStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Logical bytes (holes included).
    pub bytes: u64,
    /// Bytes actually written or reflinked.
    pub bytes_written: u64,
    pub chunks_read: u64,
    pub chunks_reflinked: u64,
    pub wall: Duration,
    pub read: Duration,
    pub decompress: Duration,
    pub hash: Duration,
    pub write: Duration,
    pub sync: Duration,
}

/// What a sweep freed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub chunks_deleted: u64,
    pub bytes_freed: u64,
    pub chunks_kept: u64,
}

/// A captured tree whose chunks are in the store but which is not yet a snapshot: pass it to
/// [`FsSnapshotStore::commit`], or drop it. While it lives it holds the store's lock shared,
/// so its chunks cannot be swept; use its [`manifest`](Self::manifest) as the parent of the
/// next capture.
pub struct PendingSnapshot {
    manifest: Manifest,
    stats: CaptureStats,
    marker: Option<String>,
    store: u64,
    _lock: StoreLock,
    _pending: PendingGuard,
}

impl PendingSnapshot {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn stats(&self) -> &CaptureStats {
        &self.stats
    }
}

impl fmt::Debug for PendingSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingSnapshot").field("source", &self.manifest.source()).field("stats", &self.stats).finish()
    }
}

/// A held flock; released when dropped (the descriptor closes).
struct StoreLock {
    _file: std::fs::File,
}

#[derive(Clone, Copy)]
enum LockKind {
    Shared,
    Exclusive,
}

/// Counts this store's live pending snapshots.
struct PendingGuard(Arc<AtomicUsize>);

impl PendingGuard {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        PendingGuard(counter.clone())
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A local directory of filesystem snapshots. Cheap to share by reference between threads.
pub struct FsSnapshotStore {
    root: Dir,
    snapshots: Dir,
    chunks: ChunkStore,
    /// Random per open store: tells this store's pending/committed manifests from others'.
    nonce: u64,
    pending: Arc<AtomicUsize>,
}

impl fmt::Debug for FsSnapshotStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FsSnapshotStore").finish_non_exhaustive()
    }
}

/// A readable descriptor for `dir` itself: cap-std holds directories as `O_PATH`
/// descriptors, which `fsync` and `syncfs` refuse.
fn readable(dir: &Dir) -> io::Result<rustix::fd::OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    Ok(rustix::fs::openat(dir, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

/// fsync of a directory (its entries: creations, renames, removals).
pub(crate) fn fsync_dir(dir: &Dir) -> io::Result<()> {
    Ok(rustix::fs::fsync(readable(dir)?)?)
}

/// syncfs of the filesystem holding `dir`: every dirty page and inode on it.
fn syncfs_dir(dir: &Dir) -> io::Result<()> {
    Ok(rustix::fs::syncfs(readable(dir)?)?)
}

fn available_threads(requested: usize) -> usize {
    if requested > 0 { requested } else { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) }
}

fn open_or_create_dir(parent: &Dir, name: &str) -> io::Result<Dir> {
    match parent.create_dir(name) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    parent.open_dir(name)
}

impl FsSnapshotStore {
    /// Opens (creating it if needed) the store at `store_dir`, and cleans up after a crashed
    /// run if nobody else is using the store. This is the one place that turns a host path
    /// into authority; [`open_dir`](Self::open_dir) takes the capability itself.
    pub fn open(store_dir: impl AsRef<Path>) -> Result<Self> {
        let path = store_dir.as_ref();
        let ctx = || format!("cannot open the snapshot store `{}`", path.display());
        std::fs::create_dir_all(path).map_err(|e| io_error(ctx(), e))?;
        let dir = Dir::open_ambient_dir(path, ambient_authority()).map_err(|e| io_error(ctx(), e))?;
        Self::open_dir(dir)
    }

    /// Opens the store rooted at `root`.
    pub fn open_dir(root: Dir) -> Result<Self> {
        let ctx = |e| io_error("cannot open the snapshot store", e);
        let snapshots = open_or_create_dir(&root, "snapshots").map_err(ctx)?;
        let chunks = open_or_create_dir(&root, "chunks").map_err(ctx)?;
        let tmp = open_or_create_dir(&root, "tmp").map_err(ctx)?;
        let mut n = [0u8; 8];
        getrandom::fill(&mut n).map_err(|e| ctx(io::Error::other(e)))?;
        let nonce = u64::from_le_bytes(n);
        let store = FsSnapshotStore {
            root,
            snapshots,
            chunks: ChunkStore::new(chunks, tmp, nonce),
            nonce,
            pending: Arc::new(AtomicUsize::new(0)),
        };
        store.recover()?;
        Ok(store)
    }

    fn lock(&self, kind: LockKind, wait: bool) -> Result<Option<StoreLock>> {
        use rustix::fs::FlockOperation as Op;
        let file = self
            .root
            .open_with("lock", OpenOptions::new().read(true).write(true).create(true))
            .map_err(|e| io_error("cannot open the store's lock file", e))?
            .into_std();
        let op = match (kind, wait) {
            (LockKind::Shared, true) => Op::LockShared,
            (LockKind::Shared, false) => Op::NonBlockingLockShared,
            (LockKind::Exclusive, true) => Op::LockExclusive,
            (LockKind::Exclusive, false) => Op::NonBlockingLockExclusive,
        };
        loop {
            match rustix::fs::flock(&file, op) {
                Ok(()) => return Ok(Some(StoreLock { _file: file })),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::WOULDBLOCK) if !wait => return Ok(None),
                Err(e) => return Err(io_error("cannot lock the snapshot store", e.into())),
            }
        }
    }

    fn shared_lock(&self) -> Result<StoreLock> {
        Ok(self.lock(LockKind::Shared, true)?.expect("blocking lock"))
    }

    /// After a crash: temp files and markers left in `tmp/`. If any capture marker is there,
    /// sweep unreferenced chunks (they may be incomplete, see `chunks`). Only when nobody else
    /// holds the lock.
    fn recover(&self) -> Result<()> {
        let Some(_lock) = self.lock(LockKind::Exclusive, false)? else { return Ok(()) };
        let names = self.tmp_names()?;
        if names.is_empty() {
            return Ok(());
        }
        if names.iter().any(|n| n.ends_with(".marker")) {
            let stats = self.sweep_locked(SystemTime::now())?;
            tracing::info!(
                "snapshot store: recovered from an unfinished capture: {} unreferenced chunk(s), {} bytes freed",
                stats.chunks_deleted,
                stats.bytes_freed
            );
        }
        self.clear_tmp(&names)
    }

    fn tmp_names(&self) -> Result<Vec<String>> {
        let ctx = |e| io_error("cannot list the store's tmp directory", e);
        let mut names = Vec::new();
        for entry in self.chunks.tmp().entries().map_err(ctx)? {
            names.push(entry.map_err(ctx)?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn clear_tmp(&self, names: &[String]) -> Result<()> {
        for name in names {
            match self.chunks.tmp().remove_file(name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(format!("cannot remove tmp/{name}"), e)),
            }
        }
        Ok(())
    }

    /// Captures the tree below `dir` (which is not itself followed if it is reached through a
    /// link; nothing inside is ever followed). Chunks are written to the store; the snapshot
    /// exists once [`commit`](Self::commit)ted.
    pub fn capture(&self, dir: &Dir, options: CaptureOptions<'_>) -> Result<PendingSnapshot> {
        let lock = self.shared_lock()?;
        let guard = PendingGuard::new(&self.pending);
        if let Some(parent) = options.parent {
            self.check_parent(parent)?;
        }
        let started = SystemTime::now();
        let marker = match options.parent {
            Some(Manifest { origin: Origin::Pending { store }, marker: Some(name), .. }) if *store == self.nonce => {
                Marker::inherited(self.chunks.tmp(), self.nonce, name)
            }
            _ => Marker::new(self.chunks.tmp(), self.nonce),
        };
        let writer = ChunkWriter::new(&self.chunks, marker);
        let result = capture::capture(
            capture::CaptureInput {
                dir,
                source: options.source,
                parent: options.parent.map(|m| m.parts()),
                chunk_size: CHUNK_SIZE,
                threads: available_threads(options.threads),
                started,
                progress: options.progress.as_deref(),
            },
            &writer,
        );
        // On failure the marker (if any) stays: the next sweep removes what was written.
        let marker = writer.marker.take();
        let (parts, stats) = result?;
        parts.validate().map_err(|e| SnapshotError::Manifest { id: "(new capture)".into(), source: e })?;
        let mut manifest = Manifest::new_unchecked(parts, Origin::Pending { store: self.nonce });
        manifest.marker = marker.as_deref().map(Into::into);
        Ok(PendingSnapshot { manifest, stats, marker, store: self.nonce, _lock: lock, _pending: guard })
    }

    /// The parent's chunks must still be in the store for their reuse to be sound.
    fn check_parent(&self, parent: &Manifest) -> Result<()> {
        match parent.origin {
            Origin::Pending { store } if store == self.nonce => Ok(()),
            Origin::Committed { store, id } if store == self.nonce => {
                let id = String::from_utf8_lossy(&id).into_owned();
                match self.snapshots.symlink_metadata(format!("{id}.manifest")) {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        Err(SnapshotError::ParentGone(format!("{id} was deleted")))
                    }
                    Err(e) => Err(io_error("cannot check the parent snapshot", e)),
                }
            }
            _ => {
                let mut checked = HashSet::new();
                for entry in parent.entries() {
                    if let Kind::File { chunks, .. } = &entry.kind {
                        for hash in chunks.iter().filter_map(|c| c.hash()) {
                            if checked.insert(hash)
                                && self
                                    .chunks
                                    .stored_len(&hash)
                                    .map_err(|e| io_error("cannot check a chunk", e))?
                                    .is_none()
                            {
                                return Err(SnapshotError::ParentGone(format!("chunk {hash} is missing")));
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Makes a pending capture a durable, listed snapshot: the manifest to a temp name, `syncfs`
    /// (the manifest and every chunk on disk), rename into `snapshots/`, fsync the directory.
    pub fn commit(&self, pending: PendingSnapshot) -> Result<SnapshotId> {
        if pending.store != self.nonce {
            return Err(SnapshotError::InvalidArgument("the pending snapshot belongs to another store".into()));
        }
        let PendingSnapshot { mut manifest, marker, _lock, .. } = pending;
        let now = SystemTime::now();
        let id = SnapshotId::generate(now)?;
        manifest.parts_mut().created_unix_ns = ns_from_time(now);
        self.write_manifest(&id, &manifest.encode())?;
        // Every chunk written before this point is now durable, so the crash marker has done
        // its job (also for a first-phase capture that shared it).
        if let Some(marker) = marker {
            let _ = self.chunks.tmp().remove_file(marker);
        }
        Ok(id)
    }

    /// The manifest under a temp name, then one `syncfs` that makes it and every chunk durable,
    /// then the rename that lists it, then an fsync of `snapshots/` that makes the rename
    /// durable. Two flushes in all.
    fn write_manifest(&self, id: &SnapshotId, bytes: &[u8]) -> Result<()> {
        let tmp = self.chunks.tmp();
        let tmp_name = format!("{}.tmp", id.file_name());
        let ctx = |e| io_error(format!("cannot write the manifest of {id}"), e);
        let mut f = tmp.open_with(&tmp_name, OpenOptions::new().write(true).create_new(true)).map_err(ctx)?;
        f.write_all(bytes).map_err(ctx)?;
        drop(f);
        syncfs_dir(&self.root).map_err(|e| io_error("cannot sync the snapshot store", e))?;
        tmp.rename(&tmp_name, &self.snapshots, id.file_name()).map_err(ctx)?;
        fsync_dir(&self.snapshots).map_err(ctx)
    }

    /// Committed snapshot ids, oldest first.
    fn ids(&self) -> Result<Vec<SnapshotId>> {
        let ctx = |e| io_error("cannot list snapshots", e);
        let mut ids = Vec::new();
        for entry in self.snapshots.entries().map_err(ctx)? {
            let name = entry.map_err(ctx)?.file_name();
            if let Some(id) =
                name.to_str().and_then(|n| n.strip_suffix(".manifest")).and_then(|n| SnapshotId::parse(n).ok())
            {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    fn read_manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        let file = match self.snapshots.open(id.file_name()) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(SnapshotError::NotFound(id.clone())),
            Err(e) => return Err(io_error(format!("cannot open the manifest of {id}"), e)),
        };
        let mut m = Manifest::read_from(io::BufReader::with_capacity(1 << 16, file))
            .map_err(|e| SnapshotError::Manifest { id: id.to_string(), source: e })?;
        m.origin = Origin::Committed { store: self.nonce, id: id.bytes() };
        Ok(m)
    }

    /// Every committed snapshot, oldest first. A manifest that cannot be read is skipped with
    /// a warning (and remains deletable).
    pub fn list(&self) -> Result<Vec<SnapshotInfo>> {
        let mut out = Vec::new();
        for id in self.ids()? {
            match self.read_manifest(&id) {
                Ok(m) => out.push(SnapshotInfo {
                    id,
                    created: m.created(),
                    source: m.source().to_string(),
                    bytes: m.logical_bytes(),
                    entries: m.entries().len() as u64,
                    stored_bytes_new: m.parts().stored_bytes_new,
                }),
                Err(SnapshotError::NotFound(_)) => {} // deleted meanwhile
                Err(e) => tracing::warn!("skipping unreadable snapshot: {e}"),
            }
        }
        Ok(out)
    }

    /// The newest snapshot taken from `source`.
    pub fn latest_for_source(&self, source: &str) -> Result<Option<SnapshotId>> {
        Ok(self.latest_with_manifest(source)?.map(|(id, _)| id))
    }

    /// The newest snapshot taken from `source`, with its manifest (ready to be a parent).
    pub fn latest_with_manifest(&self, source: &str) -> Result<Option<(SnapshotId, Manifest)>> {
        for id in self.ids()?.into_iter().rev() {
            match self.read_manifest(&id) {
                Ok(m) if m.source() == source => return Ok(Some((id, m))),
                _ => {}
            }
        }
        Ok(None)
    }

    /// A committed snapshot's manifest (usable as a capture's parent).
    pub fn get(&self, id: &SnapshotId) -> Result<Manifest> {
        self.read_manifest(id)
    }

    /// Restores snapshot `id` as a new directory `into`, which must not exist or be an empty
    /// directory. The tree is built in a temporary sibling and renamed into place: a failure
    /// leaves no partial tree. `into`'s parent is opened with ambient authority; use
    /// [`restore_in`](Self::restore_in) to pass a capability instead.
    pub fn restore(&self, id: &SnapshotId, into: &Path) -> Result<RestoreStats> {
        self.restore_with(id, into, RestoreOptions::default())
    }

    pub fn restore_with(&self, id: &SnapshotId, into: &Path, options: RestoreOptions) -> Result<RestoreStats> {
        let name = into.file_name().ok_or_else(|| {
            SnapshotError::InvalidArgument(format!("`{}` does not end in a directory name", into.display()))
        })?;
        let parent_path = match into.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let parent = Dir::open_ambient_dir(parent_path, ambient_authority())
            .map_err(|e| io_error(format!("cannot open `{}`", parent_path.display()), e))?;
        self.restore_in(id, &parent, name, options)
    }

    /// Restores snapshot `id` as the new directory `name` inside `parent`.
    pub fn restore_in(
        &self,
        id: &SnapshotId,
        parent: &Dir,
        name: &OsStr,
        options: RestoreOptions,
    ) -> Result<RestoreStats> {
        if name.is_empty() || name == "." || name == ".." || name.as_encoded_bytes().contains(&b'/') {
            return Err(SnapshotError::InvalidArgument(format!("`{}` is not a directory name", name.display())));
        }
        let _lock = self.shared_lock()?;
        let manifest = self.read_manifest(id)?;
        let shown = || name.to_string_lossy().into_owned();
        match parent.symlink_metadata(name) {
            Ok(m) if m.is_dir() => {
                let mut it = parent.read_dir(name).map_err(|e| io_error(format!("cannot list `{}`", shown()), e))?;
                if it.next().is_some() {
                    return Err(SnapshotError::TargetExists(shown()));
                }
            }
            Ok(_) => return Err(SnapshotError::TargetExists(shown())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(format!("cannot check `{}`", shown()), e)),
        }
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).map_err(|e| io_error("cannot get random bytes", io::Error::other(e)))?;
        let tmp_name = format!(".stasis-restore-{}", manifest::hex(&rnd));
        parent.create_dir(&tmp_name).map_err(|e| io_error("cannot create the restore's temporary directory", e))?;
        let result = (|| {
            let tmp = parent.open_dir(&tmp_name).map_err(|e| io_error("cannot open the temporary directory", e))?;
            let mut stats =
                restore::restore_tree(&self.chunks, manifest.parts(), &tmp, available_threads(options.threads))?;
            if options.durable {
                let t = std::time::Instant::now();
                syncfs_dir(&tmp).map_err(|e| io_error("cannot sync the restored tree", e))?;
                stats.sync = t.elapsed();
            }
            parent.rename(&tmp_name, parent, name).map_err(|e| match e.raw_os_error() {
                Some(c)
                    if c == rustix::io::Errno::NOTEMPTY.raw_os_error()
                        || c == rustix::io::Errno::EXIST.raw_os_error() =>
                {
                    SnapshotError::TargetExists(shown())
                }
                _ => io_error(format!("cannot move the restored tree to `{}`", shown()), e),
            })?;
            if options.durable {
                fsync_dir(parent).map_err(|e| io_error("cannot sync the target's parent directory", e))?;
            }
            Ok(stats)
        })();
        if result.is_err() {
            let _ = parent.remove_dir_all(&tmp_name);
        }
        result
    }

    /// Deletes a snapshot and frees the chunks no other snapshot uses. Waits for running
    /// captures (in any process) to commit or drop.
    pub fn delete(&self, id: &SnapshotId) -> Result<GcStats> {
        let _lock = self.exclusive_lock()?;
        match self.snapshots.symlink_metadata(id.file_name()) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(SnapshotError::NotFound(id.clone())),
            Err(e) => return Err(io_error(format!("cannot check {id}"), e)),
        }
        let started = SystemTime::now();
        // A durable marker first: if we crash between removing the manifest and sweeping, the
        // next open finishes the sweep.
        let marker = Marker::new(self.chunks.tmp(), self.nonce);
        marker.ensure().map_err(|e| io_error("cannot write a marker", e))?;
        self.snapshots.remove_file(id.file_name()).map_err(|e| io_error(format!("cannot delete {id}"), e))?;
        fsync_dir(&self.snapshots).map_err(|e| io_error("cannot sync the snapshot directory", e))?;
        let stats = self.sweep_locked(started)?;
        self.clear_tmp(&self.tmp_names()?)?;
        Ok(stats)
    }

    /// Unlists snapshot `id` at once without freeing its chunks; the next [`gc`](Self::gc)
    /// frees those no other snapshot uses. Unlike [`delete`](Self::delete) this takes the
    /// lock shared: it neither waits for captures in flight nor holds them up (a capture
    /// that read this snapshot as its parent keeps its chunks: they stay until a `gc`,
    /// which waits for that capture). A durable marker is left first, so that after a crash
    /// before the `gc` the next `open` sweeps.
    pub fn unlist(&self, id: &SnapshotId) -> Result<()> {
        let _lock = self.shared_lock()?;
        match self.snapshots.symlink_metadata(id.file_name()) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(SnapshotError::NotFound(id.clone())),
            Err(e) => return Err(io_error(format!("cannot check {id}"), e)),
        }
        let marker = Marker::new(self.chunks.tmp(), self.nonce);
        marker.ensure().map_err(|e| io_error("cannot write a marker", e))?;
        // Left in `tmp/` on purpose: `gc` clears it once the chunks are swept.
        let _ = marker.take();
        self.snapshots.remove_file(id.file_name()).map_err(|e| io_error(format!("cannot delete {id}"), e))?;
        fsync_dir(&self.snapshots).map_err(|e| io_error("cannot sync the snapshot directory", e))
    }

    /// Frees every chunk no snapshot refers to (and clears temp files of crashed runs).
    pub fn gc(&self) -> Result<GcStats> {
        let _lock = self.exclusive_lock()?;
        let stats = self.sweep_locked(SystemTime::now())?;
        self.clear_tmp(&self.tmp_names()?)?;
        Ok(stats)
    }

    fn exclusive_lock(&self) -> Result<StoreLock> {
        if self.pending.load(Ordering::SeqCst) > 0 {
            return Err(SnapshotError::Busy(
                "this process holds an uncommitted capture; commit or drop it before deleting".into(),
            ));
        }
        Ok(self.lock(LockKind::Exclusive, true)?.expect("blocking lock"))
    }

    /// Deletes unreferenced chunks older than `started` (minus the coarse-clock margin). The
    /// caller holds the exclusive lock. Refuses to delete anything if a manifest is unreadable.
    fn sweep_locked(&self, started: SystemTime) -> Result<GcStats> {
        let mut referenced = HashSet::new();
        for id in self.ids()? {
            let m = match self.read_manifest(&id) {
                Ok(m) => m,
                Err(SnapshotError::NotFound(_)) => continue,
                Err(e) => {
                    return Err(SnapshotError::Busy(format!(
                        "not sweeping chunks while a manifest is unreadable ({e}); delete that snapshot first"
                    )));
                }
            };
            for e in m.entries() {
                if let Kind::File { chunks, .. } = &e.kind {
                    referenced.extend(chunks.iter().filter_map(|c| c.hash()));
                }
            }
        }
        let keep_from = ns_from_time(started) - capture::RACY_MARGIN.as_nanos() as i64 * 2;
        let mut stats = GcStats::default();
        self.chunks
            .for_each_chunk(|dir, name, hash, meta| {
                use cap_std::fs::MetadataExt;
                let mtime = meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec());
                if referenced.contains(&hash) || mtime >= keep_from {
                    stats.chunks_kept += 1;
                    return Ok(());
                }
                match dir.remove_file(name) {
                    Ok(()) => {
                        stats.chunks_deleted += 1;
                        stats.bytes_freed += meta.len();
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                Ok(())
            })
            .map_err(|e| io_error("cannot sweep chunks", e))?;
        Ok(stats)
    }

    /// Writes snapshot `id` as a tar archive (GNU format; PAX records carry nanosecond mtimes).
    pub fn export_tar(&self, id: &SnapshotId, out: impl Write) -> Result<()> {
        let _lock = self.shared_lock()?;
        let manifest = self.read_manifest(id)?;
        archive::export(&self.chunks, manifest.parts(), out)
    }

    /// Reads a tar archive into a new, committed snapshot.
    pub fn import_tar(&self, input: impl Read, source: impl Into<String>) -> Result<SnapshotId> {
        let lock = self.shared_lock()?;
        let guard = PendingGuard::new(&self.pending);
        let started = SystemTime::now();
        let writer = ChunkWriter::new(&self.chunks, Marker::new(self.chunks.tmp(), self.nonce));
        let result = archive::import(&writer, CHUNK_SIZE, input, source.into(), started);
        let marker = writer.marker.take();
        let parts = result?;
        let pending = PendingSnapshot {
            manifest: Manifest::new_unchecked(parts, Origin::Pending { store: self.nonce }),
            stats: CaptureStats::default(),
            marker,
            store: self.nonce,
            _lock: lock,
            _pending: guard,
        };
        self.commit(pending)
    }
}

/// Formats a time as `YYYY-MM-DD HH:MM:SS` UTC (for listings).
pub fn format_utc(t: SystemTime) -> String {
    let p = crate::civil_time::utc_parts(ns_from_time(t).div_euclid(1_000_000_000));
    format!("{:04}-{:02}-{:02} {:02}:{:02}:{:02}", p.year, p.month, p.day, p.hour, p.minute, p.second)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated_strictly() {
        let id = SnapshotId::generate(SystemTime::now()).unwrap();
        assert_eq!(SnapshotId::parse(id.as_str()).unwrap(), id);
        for bad in [
            "",
            "snap_",
            "../../etc/passwd",
            "snap_0123456789ab0123456789abcdeF",
            "snap_0123456789ab0123456789abcde/",
            "snap_0123456789ab0123456789abcdef0",
            "snap_0123456789ab0123456789abcde",
            "SNAP_0123456789ab0123456789abcdef",
            "snap_../../../../../../../../../x",
        ] {
            assert!(matches!(SnapshotId::parse(bad), Err(SnapshotError::InvalidId(_))), "{bad:?} accepted");
        }
    }

    #[test]
    fn ids_sort_by_time() {
        let a = SnapshotId::generate(SystemTime::UNIX_EPOCH + Duration::from_millis(1000)).unwrap();
        let b = SnapshotId::generate(SystemTime::UNIX_EPOCH + Duration::from_millis(1001)).unwrap();
        assert!(a < b);
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00");
        assert_eq!(format_utc(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)), "2023-11-14 22:13:20");
        assert_eq!(format_utc(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29 00:00:00");
    }
}
