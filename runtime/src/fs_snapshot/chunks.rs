//! The content-addressed chunk store: `chunks/<first 2 hex>/<64 hex blake3 of the raw bytes>`.
//!
//! A chunk file is either the raw bytes or one zstd frame, and which one it is follows from its
//! length alone: compressed chunks are only kept when they are strictly shorter than the raw
//! bytes, so "file length == raw length" means raw. The manifest records the same thing
//! ([`Chunk::Raw`] / [`Chunk::Zstd`]) and restore checks that the two agree before it reads.
//!
//! # Durability
//!
//! Chunks are written without fsync: to `tmp/`, then renamed into `chunks/` (so a reader never
//! sees a half-written chunk under its final name, even while the writer is being killed). Why
//! that is safe:
//! - Nothing refers to a new chunk until a manifest does. `FsSnapshotStore::commit` writes the
//!   manifest under a temporary name, calls `syncfs` on the store's filesystem, and only then
//!   renames the manifest into `snapshots/` (and fsyncs that directory). `syncfs` flushes every
//!   dirty page and inode of the filesystem, so every chunk the manifest names, including
//!   chunks it reused from another capture still in flight in another process, is on disk
//!   before the manifest can be listed. One `syncfs` per snapshot replaces thousands of
//!   per-chunk fsyncs.
//! - A power failure before that `syncfs` can leave a chunk under its final name with its data
//!   lost (the rename may persist without the delayed-allocation data). Such a chunk is
//!   unreferenced, but a later capture would find it by name and reuse it. To prevent that, the
//!   first time a capture is about to rename a chunk into `chunks/` it creates a marker file in
//!   `tmp/` and fsyncs it and `tmp/`. The marker is removed only after a commit (when the
//!   chunks are durable). After a crash the marker is still there, and the next
//!   `FsSnapshotStore::open` (which gets the exclusive lock, since nobody else can be running
//!   after a reboot) deletes every chunk no committed manifest refers to before any capture
//!   can run. A capture whose parent is a live pending capture shares that capture's marker,
//!   so the second, paused phase of a two-phase snapshot pays no fsync at all.

use super::manifest::{Chunk, ChunkHash};
use cap_std::fs::{Dir, File, OpenOptions};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Chunks are kept only if zstd saves at least 1/16 of the bytes: below that, decompressing on
/// every restore (and losing the reflink path) costs more than the disk it saves.
const MIN_SAVING_DIVISOR: usize = 16;
/// zstd level 1: the fastest standard level, ~2x faster than the default 3 on this machine's
/// cores for a few percent of ratio; capture speed is what keeps the pause short.
pub(crate) const ZSTD_LEVEL: i32 = 1;

pub(crate) struct ChunkStore {
    chunks: Dir,
    tmp: Dir,
    subdirs: Vec<OnceLock<Dir>>,
    /// Unique temp names across threads and processes.
    nonce: u64,
    counter: AtomicU64,
}

/// Why a chunk could not be read back.
#[derive(Debug)]
pub(crate) enum ChunkReadError {
    Missing,
    WrongSize { expected: u64, found: u64 },
    Corrupt(String),
    HashMismatch { actual: ChunkHash },
    Io(io::Error),
}

impl ChunkStore {
    pub(crate) fn new(chunks: Dir, tmp: Dir, nonce: u64) -> Self {
        ChunkStore {
            chunks,
            tmp,
            subdirs: (0..256).map(|_| OnceLock::new()).collect(),
            nonce,
            counter: AtomicU64::new(0),
        }
    }

    pub(crate) fn tmp(&self) -> &Dir {
        &self.tmp
    }

    pub(crate) fn file_name(hash: &ChunkHash) -> String {
        hash.to_hex()
    }

    /// `chunks/<2 hex>`, created on first use.
    pub(crate) fn subdir(&self, prefix: u8) -> io::Result<&Dir> {
        if let Some(d) = self.subdirs[prefix as usize].get() {
            return Ok(d);
        }
        let name = format!("{prefix:02x}");
        let dir = match self.chunks.open_dir(&name) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match self.chunks.create_dir(&name) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                self.chunks.open_dir(&name)?
            }
            Err(e) => return Err(e),
        };
        Ok(self.subdirs[prefix as usize].get_or_init(|| dir))
    }

    /// The stored length of a chunk, or `None` if it is not in the store.
    pub(crate) fn stored_len(&self, hash: &ChunkHash) -> io::Result<Option<u64>> {
        match self.subdir(hash.0[0])?.symlink_metadata(Self::file_name(hash)) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a chunk under a temporary name, then renames it into place (replacing a damaged
    /// copy, if any).
    fn write(&self, hash: &ChunkHash, bytes: &[u8]) -> io::Result<()> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp_name = format!("chunk-{:016x}-{n}.tmp", self.nonce);
        let mut f = self.tmp.open_with(&tmp_name, OpenOptions::new().write(true).create_new(true))?;
        let result = f.write_all(bytes).and_then(|()| {
            drop(f);
            self.tmp.rename(&tmp_name, self.subdir(hash.0[0])?, Self::file_name(hash))
        });
        if result.is_err() {
            let _ = self.tmp.remove_file(&tmp_name);
        }
        result
    }

    /// A chunk file's bytes, as stored.
    pub(crate) fn read_stored(&self, hash: &ChunkHash) -> io::Result<Vec<u8>> {
        self.subdir(hash.0[0])?.read(Self::file_name(hash))
    }

    pub(crate) fn open_chunk(&self, hash: &ChunkHash) -> io::Result<File> {
        self.subdir(hash.0[0])?.open(Self::file_name(hash))
    }

    /// Reads a chunk of `logical_len` raw bytes into `out` and verifies its hash. Returns the
    /// open chunk file when it is stored raw (restore may reflink from it).
    pub(crate) fn read_verified(
        &self,
        chunk: &Chunk,
        logical_len: usize,
        out: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
        decompressor: &mut zstd::bulk::Decompressor<'static>,
        times: &mut ReadTimes,
    ) -> Result<Option<std::fs::File>, ChunkReadError> {
        let Some(hash) = chunk.hash() else {
            out.clear();
            out.resize(logical_len, 0);
            return Ok(None);
        };
        let expected = chunk.stored_len(logical_len as u64);
        let t = Instant::now();
        let mut file = match self.open_chunk(&hash) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ChunkReadError::Missing),
            Err(e) => return Err(ChunkReadError::Io(e)),
        };
        let found = file.metadata().map_err(ChunkReadError::Io)?.len();
        if found != expected {
            return Err(ChunkReadError::WrongSize { expected, found });
        }
        // A raw chunk is read straight into `out`; a compressed one into `scratch`, then
        // decompressed into `out`.
        let raw = matches!(chunk, Chunk::Raw(_));
        let (stored, decoded) = if raw { (out, scratch) } else { (scratch, out) };
        stored.clear();
        stored.reserve(expected as usize);
        (&mut file).take(expected).read_to_end(stored).map_err(ChunkReadError::Io)?;
        if stored.len() as u64 != expected {
            return Err(ChunkReadError::WrongSize { expected, found: stored.len() as u64 });
        }
        times.read += t.elapsed();
        verify_stored(chunk, logical_len, stored, decoded, decompressor, times)?;
        Ok(if raw { Some(file.into_std()) } else { None })
    }

    /// Checks a chunk's stored bytes (from elsewhere: another host's store) against what the
    /// manifest says of it, then writes it under its name.
    pub(crate) fn put_verified(
        &self,
        chunk: &Chunk,
        logical_len: usize,
        stored: &[u8],
        marker: &Marker<'_>,
        decompressor: &mut zstd::bulk::Decompressor<'static>,
    ) -> Result<(), ChunkReadError> {
        let Some(hash) = chunk.hash() else { return Ok(()) };
        let expected = chunk.stored_len(logical_len as u64);
        if stored.len() as u64 != expected {
            return Err(ChunkReadError::WrongSize { expected, found: stored.len() as u64 });
        }
        verify_stored(chunk, logical_len, stored, &mut Vec::new(), decompressor, &mut ReadTimes::default())?;
        marker.ensure().map_err(ChunkReadError::Io)?;
        self.write(&hash, stored).map_err(ChunkReadError::Io)
    }

    /// Every chunk file: (prefix dir, file name, hash, metadata). Names that are not chunk names
    /// are not ours and are skipped.
    pub(crate) fn for_each_chunk(
        &self,
        mut f: impl FnMut(&Dir, &str, ChunkHash, &cap_std::fs::Metadata) -> io::Result<()>,
    ) -> io::Result<()> {
        for prefix in 0..=255u8 {
            let dir = match self.chunks.open_dir(format!("{prefix:02x}")) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in dir.entries()? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let Some(hash) = ChunkHash::from_hex(name) else { continue };
                if hash.0[0] != prefix {
                    continue;
                }
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                f(&dir, name, hash, &meta)?;
            }
        }
        Ok(())
    }
}

/// Checks a chunk's stored bytes: a raw chunk's hash as they are; a zstd chunk is
/// decompressed into `decoded` (exactly `logical_len` bytes) and those are hashed.
fn verify_stored(
    chunk: &Chunk,
    logical_len: usize,
    stored: &[u8],
    decoded: &mut Vec<u8>,
    decompressor: &mut zstd::bulk::Decompressor<'static>,
    times: &mut ReadTimes,
) -> Result<(), ChunkReadError> {
    let Some(hash) = chunk.hash() else { return Ok(()) };
    let raw = if let Chunk::Zstd { .. } = chunk {
        let t = Instant::now();
        decoded.clear();
        decoded.reserve_exact(logical_len);
        // The capacity bounds the output: a crafted frame cannot make it grow.
        let n = decompressor
            .decompress_to_buffer(stored, decoded)
            .map_err(|e| ChunkReadError::Corrupt(format!("zstd: {e}")))?;
        if n != logical_len {
            return Err(ChunkReadError::Corrupt(format!("decompresses to {n} bytes, expected {logical_len}")));
        }
        times.decompress += t.elapsed();
        &decoded[..]
    } else {
        stored
    };
    let t = Instant::now();
    let actual = ChunkHash::of(raw);
    times.hash += t.elapsed();
    if actual != hash {
        return Err(ChunkReadError::HashMismatch { actual });
    }
    Ok(())
}

/// Where restore's time goes.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadTimes {
    pub read: Duration,
    pub decompress: Duration,
    pub hash: Duration,
}

/// The marker that tells the next exclusive opener to sweep unreferenced chunks (see the
/// module docs). Created, durably, just before the first chunk is renamed into `chunks/`.
pub(crate) struct Marker<'a> {
    tmp: &'a Dir,
    name: Mutex<Option<String>>,
    nonce: u64,
}

impl<'a> Marker<'a> {
    pub(crate) fn new(tmp: &'a Dir, nonce: u64) -> Self {
        Marker { tmp, name: Mutex::new(None), nonce }
    }

    /// Shares a live pending capture's marker (already durable): the capture that pauses the
    /// guests then writes its chunks without an fsync of its own.
    pub(crate) fn inherited(tmp: &'a Dir, nonce: u64, name: &str) -> Self {
        Marker { tmp, name: Mutex::new(Some(name.to_string())), nonce }
    }

    pub(crate) fn ensure(&self) -> io::Result<()> {
        let mut name = self.name.lock().unwrap_or_else(|p| p.into_inner());
        if name.is_some() {
            return Ok(());
        }
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).map_err(io::Error::other)?;
        let n = format!("capture-{:016x}-{}.marker", self.nonce, super::manifest::hex(&rnd));
        let f = self.tmp.open_with(&n, OpenOptions::new().write(true).create_new(true))?;
        f.sync_all()?;
        super::fsync_dir(self.tmp)?;
        *name = Some(n);
        Ok(())
    }

    /// The marker's file name, if one was created.
    pub(crate) fn take(self) -> Option<String> {
        self.name.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counters shared by the threads that add chunks during one capture or import.
#[derive(Default)]
pub(crate) struct WriteCounters {
    pub(crate) chunks_new: AtomicU64,
    pub(crate) chunks_existing: AtomicU64,
    pub(crate) chunks_zero: AtomicU64,
    pub(crate) stored_bytes_new: AtomicU64,
}

/// Adds chunks to the store for one capture or import: deduplicates within the capture and
/// against the store, compresses, writes.
pub(crate) struct ChunkWriter<'a> {
    pub(crate) store: &'a ChunkStore,
    pub(crate) marker: Marker<'a>,
    seen: Mutex<HashMap<ChunkHash, Chunk>>,
    pub(crate) counters: WriteCounters,
}

/// Per-thread state for [`ChunkWriter::put`].
pub(crate) struct Encoder {
    compressor: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
    pub(crate) hash: Duration,
    pub(crate) compress: Duration,
    pub(crate) write: Duration,
}

impl Encoder {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Encoder {
            compressor: zstd::bulk::Compressor::new(ZSTD_LEVEL)?,
            out: Vec::new(),
            hash: Duration::ZERO,
            compress: Duration::ZERO,
            write: Duration::ZERO,
        })
    }
}

pub(crate) fn is_zero(data: &[u8]) -> bool {
    // OR-folding a block vectorizes; blocks let non-zero data bail out early.
    data.chunks(4096).all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

impl<'a> ChunkWriter<'a> {
    pub(crate) fn new(store: &'a ChunkStore, marker: Marker<'a>) -> Self {
        ChunkWriter { store, marker, seen: Mutex::new(HashMap::new()), counters: WriteCounters::default() }
    }

    /// Stores one chunk's raw bytes (unless the store already has them) and says how.
    pub(crate) fn put(&self, data: &[u8], enc: &mut Encoder) -> io::Result<Chunk> {
        let c = &self.counters;
        if is_zero(data) {
            c.chunks_zero.fetch_add(1, Ordering::Relaxed);
            return Ok(Chunk::Zero);
        }
        let t = Instant::now();
        let hash = ChunkHash::of(data);
        enc.hash += t.elapsed();
        if let Some(chunk) = self.seen.lock().unwrap_or_else(|p| p.into_inner()).get(&hash) {
            c.chunks_existing.fetch_add(1, Ordering::Relaxed);
            return Ok(*chunk);
        }
        let t = Instant::now();
        let existing = self.store.stored_len(&hash)?;
        enc.write += t.elapsed();
        if let Some(len) = existing {
            let chunk = if len == data.len() as u64 {
                Some(Chunk::Raw(hash))
            } else if len > 0 && len < data.len() as u64 {
                Some(Chunk::Zstd { hash, stored_len: len as u32 })
            } else {
                None // damaged (empty or too long): write it again below
            };
            if let Some(chunk) = chunk {
                c.chunks_existing.fetch_add(1, Ordering::Relaxed);
                self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(hash, chunk);
                return Ok(chunk);
            }
        }
        let t = Instant::now();
        enc.out.clear();
        enc.out.reserve(zstd::zstd_safe::compress_bound(data.len()));
        let compressed = match enc.compressor.compress_to_buffer(data, &mut enc.out) {
            Ok(n) => n < data.len() - data.len() / MIN_SAVING_DIVISOR && n < data.len(),
            Err(_) => false, // e.g. no gain at all: store raw
        };
        enc.compress += t.elapsed();
        let (chunk, bytes): (Chunk, &[u8]) = if compressed {
            (Chunk::Zstd { hash, stored_len: enc.out.len() as u32 }, &enc.out)
        } else {
            (Chunk::Raw(hash), data)
        };
        let t = Instant::now();
        self.marker.ensure()?;
        self.store.write(&hash, bytes)?;
        enc.write += t.elapsed();
        if self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(hash, chunk).is_none() {
            c.chunks_new.fetch_add(1, Ordering::Relaxed);
            c.stored_bytes_new.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        } else {
            c.chunks_existing.fetch_add(1, Ordering::Relaxed);
        }
        Ok(chunk)
    }
}
