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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
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
    /// `O_TMPFILE` + `linkat` did not work here (old kernel, filesystem without it, no
    /// `/proc`): chunks go through `tmp/` and a rename instead.
    no_tmpfile: AtomicBool,
    /// `O_DIRECT` did not work here: chunk data goes through the page cache.
    no_direct: AtomicBool,
}

/// Alignment of buffer addresses, file offsets and lengths for `O_DIRECT` (the largest
/// logical block size in common use).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// A zeroed byte buffer whose start is aligned to [`DIRECT_ALIGN`], so that chunk data read
/// into it (or compressed into it) can be written with `O_DIRECT`.
pub(crate) struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { storage, start, len }
    }

    /// At least `len` bytes (the contents are not kept when it grows).
    pub(crate) fn ensure(&mut self, len: usize) {
        if self.len < len {
            *self = AlignedBuf::new(len);
        }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
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
            no_tmpfile: AtomicBool::new(false),
            no_direct: AtomicBool::new(false),
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

    /// Writes a chunk and gives it its name only once all its bytes are written (replacing a
    /// damaged copy, if any).
    ///
    /// The usual way is an unnamed `O_TMPFILE` inode in the chunk's own `chunks/<2 hex>/`,
    /// linked to its name when written: unlike a file in `tmp/` renamed across directories, it
    /// takes no lock on a directory shared by all workers while the inode is allocated, nor the
    /// filesystem-wide cross-directory rename lock. Its data goes with `O_DIRECT` when the
    /// buffer is aligned: straight to the disk, without allocating (and faulting in) page cache
    /// pages for data nobody reads soon, and without leaving it to `commit`'s `syncfs` to write.
    /// `syncfs` still makes the data (disk cache flush) and the new inodes and names durable. A
    /// name that exists already (a damaged copy, or a concurrent writer of the same chunk) is
    /// replaced by the `tmp/` + rename path, as is everything where `O_TMPFILE` is unsupported.
    pub(crate) fn write(&self, hash: &ChunkHash, bytes: &[u8], direct: bool) -> io::Result<()> {
        if !self.no_tmpfile.load(Ordering::Relaxed) {
            match self.write_linked(hash, bytes, direct) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) if tmpfile_unsupported(&e) => self.no_tmpfile.store(true, Ordering::Relaxed),
                Err(e) => return Err(e),
            }
        }
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

    /// The `O_TMPFILE` path of [`Self::write`]. `Ok(false)`: the name exists already.
    fn write_linked(&self, hash: &ChunkHash, bytes: &[u8], direct: bool) -> io::Result<bool> {
        use rustix::fs::{AtFlags, Mode, OFlags};
        let dir = self.subdir(hash.0[0])?;
        let base = OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC;
        let mode = Mode::from_raw_mode(0o666); // less the umask, as for any new file
        let mut direct = direct
            && !self.no_direct.load(Ordering::Relaxed)
            && bytes.len() >= DIRECT_ALIGN
            && (bytes.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN);
        let fd = if direct {
            match rustix::fs::openat(dir, ".", base | OFlags::DIRECT, mode) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::INVAL) => {
                    self.no_direct.store(true, Ordering::Relaxed);
                    direct = false;
                    rustix::fs::openat(dir, ".", base, mode)?
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            rustix::fs::openat(dir, ".", base, mode)?
        };
        let mut written = 0;
        while written < bytes.len() {
            let rest = &bytes[written..];
            // O_DIRECT for whole aligned blocks; the tail (and anything after a short write
            // that broke the alignment) through the page cache.
            let aligned = rest.len() & !(DIRECT_ALIGN - 1);
            if direct && (aligned == 0 || !written.is_multiple_of(DIRECT_ALIGN)) {
                rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
                direct = false;
            }
            let part = if direct { &rest[..aligned] } else { rest };
            match rustix::io::pwrite(&fd, part, written as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::INVAL) if direct => {
                    // Stricter alignment than ours: the page cache from now on.
                    self.no_direct.store(true, Ordering::Relaxed);
                    rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
                    direct = false;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        match rustix::fs::linkat(rustix::fs::CWD, proc_path, dir, Self::file_name(hash), AtFlags::SYMLINK_FOLLOW) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::EXIST) => Ok(false),
            Err(e) => Err(e.into()),
        }
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
        let (hash, expected) = match chunk {
            Chunk::Zero => {
                out.clear();
                out.resize(logical_len, 0);
                return Ok(None);
            }
            Chunk::Raw(h) => (h, logical_len as u64),
            Chunk::Zstd { hash, stored_len } => (hash, u64::from(*stored_len)),
        };
        let t = Instant::now();
        let mut file = match self.open_chunk(hash) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ChunkReadError::Missing),
            Err(e) => return Err(ChunkReadError::Io(e)),
        };
        let found = file.metadata().map_err(ChunkReadError::Io)?.len();
        if found != expected {
            return Err(ChunkReadError::WrongSize { expected, found });
        }
        let buf = if matches!(chunk, Chunk::Raw(_)) { &mut *out } else { &mut *scratch };
        buf.clear();
        buf.reserve(expected as usize);
        (&mut file).take(expected).read_to_end(buf).map_err(ChunkReadError::Io)?;
        if buf.len() as u64 != expected {
            return Err(ChunkReadError::WrongSize { expected, found: buf.len() as u64 });
        }
        times.read += t.elapsed();
        if let Chunk::Zstd { .. } = chunk {
            let t = Instant::now();
            out.clear();
            out.reserve_exact(logical_len);
            // The capacity bounds the output: a crafted frame cannot make it grow.
            let n = decompressor
                .decompress_to_buffer(&scratch[..], out)
                .map_err(|e| ChunkReadError::Corrupt(format!("zstd: {e}")))?;
            if n != logical_len {
                return Err(ChunkReadError::Corrupt(format!("decompresses to {n} bytes, expected {logical_len}")));
            }
            times.decompress += t.elapsed();
        }
        let t = Instant::now();
        let actual = ChunkHash::of(out);
        times.hash += t.elapsed();
        if actual != *hash {
            return Err(ChunkReadError::HashMismatch { actual });
        }
        Ok(if matches!(chunk, Chunk::Raw(_)) { Some(file.into_std()) } else { None })
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

/// Chunks at least this long are handed to the I/O threads of an [`AsyncWrites`] (when the
/// encoder has one) and written with `O_DIRECT`; shorter ones are written in place through the
/// page cache, where a direct write's round trip to the disk would cost more than the copy.
const ASYNC_MIN_LEN: usize = 64 << 10;

/// A chunk on its way to an I/O thread.
pub(crate) struct WriteJob {
    hash: ChunkHash,
    buf: AlignedBuf,
    len: usize,
}

/// The hand-off from the workers that hash and compress to the I/O threads that write big
/// chunks with `O_DIRECT`: while an I/O thread waits for the disk, the cores keep compressing.
/// Buffers travel with the jobs and come back through `free`, so no chunk is copied (except a
/// raw one, out of the worker's read buffer) and no new memory is touched after the first few.
pub(crate) struct AsyncWrites {
    tx: SyncSender<WriteJob>,
    free: Arc<Mutex<Vec<AlignedBuf>>>,
}

impl AsyncWrites {
    pub(crate) fn new(tx: SyncSender<WriteJob>, free: Arc<Mutex<Vec<AlignedBuf>>>) -> Self {
        AsyncWrites { tx, free }
    }
}

/// What one I/O thread did.
#[derive(Default)]
pub(crate) struct IoOut {
    pub(crate) write: Duration,
    pub(crate) error: Option<io::Error>,
}

/// An I/O thread: writes chunks until every sender is gone. After an error it keeps taking jobs
/// (so that no worker blocks on a full queue) without writing them.
pub(crate) fn io_thread(
    store: &ChunkStore,
    rx: &Mutex<Receiver<WriteJob>>,
    free: &Mutex<Vec<AlignedBuf>>,
    stop: &AtomicBool,
) -> IoOut {
    let mut out = IoOut::default();
    loop {
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return out,
        };
        let mut buf = job.buf;
        if out.error.is_none() {
            let t = Instant::now();
            if let Err(e) = store.write(&job.hash, &buf.as_mut_slice()[..job.len], true) {
                stop.store(true, Ordering::Relaxed); // the workers stop early; the capture fails
                out.error = Some(e);
            }
            out.write += t.elapsed();
        }
        free.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
    }
}

/// Per-thread state for [`ChunkWriter::put`].
pub(crate) struct Encoder {
    compressor: zstd::bulk::Compressor<'static>,
    /// Where big chunks go to be written, if anywhere: else they are written in place.
    sink: Option<AsyncWrites>,
    /// Aligned, so that compressed chunks can be written with `O_DIRECT`.
    out: AlignedBuf,
    pub(crate) hash: Duration,
    pub(crate) compress: Duration,
    pub(crate) write: Duration,
}

impl Encoder {
    pub(crate) fn new(sink: Option<AsyncWrites>) -> io::Result<Self> {
        Ok(Encoder {
            compressor: zstd::bulk::Compressor::new(ZSTD_LEVEL)?,
            sink,
            out: AlignedBuf::new(0),
            hash: Duration::ZERO,
            compress: Duration::ZERO,
            write: Duration::ZERO,
        })
    }
}

/// Errors that say `O_TMPFILE` or linking it through `/proc/self/fd` is not available here.
fn tmpfile_unsupported(e: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(e.raw_os_error(), Some(code) if [Errno::OPNOTSUPP, Errno::ISDIR, Errno::INVAL, Errno::NOENT, Errno::NOSYS, Errno::PERM, Errno::ACCESS, Errno::XDEV]
        .iter()
        .any(|e| e.raw_os_error() == code))
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
        enc.out.ensure(zstd::zstd_safe::compress_bound(data.len()));
        let out = enc.out.as_mut_slice();
        let compressed = match enc.compressor.compress_to_buffer(data, out) {
            Ok(n) if n < data.len() - data.len() / MIN_SAVING_DIVISOR && n < data.len() => Some(n),
            _ => None, // no gain worth keeping (or none at all): store raw
        };
        enc.compress += t.elapsed();
        let stored_len = compressed.unwrap_or(data.len());
        let chunk = match compressed {
            Some(n) => Chunk::Zstd { hash, stored_len: n as u32 },
            None => Chunk::Raw(hash),
        };
        let t = Instant::now();
        self.marker.ensure()?;
        match enc.sink.as_ref() {
            Some(sink) if stored_len >= ASYNC_MIN_LEN => {
                // The chunk is named once the I/O thread has written it; until then only this
                // capture refers to it, and the capture does not end before its I/O threads.
                let mut buf =
                    sink.free.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_else(|| AlignedBuf::new(0));
                if compressed.is_some() {
                    std::mem::swap(&mut buf, &mut enc.out);
                } else {
                    // As big as a compression buffer, so that buffers are interchangeable.
                    buf.ensure(zstd::zstd_safe::compress_bound(data.len()));
                    buf.as_mut_slice()[..data.len()].copy_from_slice(data);
                }
                let job = WriteJob { hash, buf, len: stored_len };
                sink.tx.send(job).map_err(|_| io::Error::other("the chunk writing threads stopped"))?;
            }
            _ => {
                let bytes = if compressed.is_some() { &enc.out.as_mut_slice()[..stored_len] } else { data };
                self.store.write(&hash, bytes, false)?;
            }
        }
        enc.write += t.elapsed();
        if self.seen.lock().unwrap_or_else(|p| p.into_inner()).insert(hash, chunk).is_none() {
            c.chunks_new.fetch_add(1, Ordering::Relaxed);
            c.stored_bytes_new.fetch_add(stored_len as u64, Ordering::Relaxed);
        } else {
            c.chunks_existing.fetch_add(1, Ordering::Relaxed);
        }
        Ok(chunk)
    }
}
