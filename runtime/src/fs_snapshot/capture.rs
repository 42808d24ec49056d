//! Capture: walk a directory tree through its `Dir` capability and turn it into manifest
//! entries, reading and chunking files on worker threads.
//!
//! The calling thread walks (readdir, `lstat`, open) in sorted order, so entries come out
//! parent-first and deterministic. Files whose contents must be read become jobs of up to
//! [`JOB_CHUNKS`] chunks on a bounded queue (a big file is shared by all workers; the bound caps
//! open descriptors and memory), and the workers read with `pread`, hash, compress and write
//! chunks in parallel. A file is never held in memory whole: each worker owns one chunk buffer.

use super::chunks::{ChunkWriter, Encoder};
use super::manifest::{Chunk, Entry, EntryKind, ManifestParts, display_bytes, ns_from_time};
use super::{CaptureStats, SnapshotError, io_error};
use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt};
use cap_std::fs::{Dir, FileType, Metadata, MetadataExt, OpenOptions, OpenOptionsExt};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Chunks per job: 4 MiB keeps both cores busy on one big file without making the queue
/// chatty for small ones.
const JOB_CHUNKS: u64 = 4;

/// ext4 (and most Linux filesystems) stamp files from a coarse clock that can lag the real
/// time by a scheduler tick; a file written in the same tick as the parent capture started
/// could carry a timestamp just before that start. Anything within this margin counts as racy.
pub(crate) const RACY_MARGIN: Duration = Duration::from_millis(10);

/// The most chunks one capture may list, holes of sparse files included (1 TiB of file
/// length at 1 MiB chunks). A manifest holds one entry per chunk, zero or not, so a guest
/// making a sparse file of 16 TiB would otherwise cost ~640 MiB of memory per capture; at
/// the bound a manifest is ~40 MiB in memory. The tree is refused before that is allocated.
pub const MAX_CAPTURE_CHUNKS: u64 = 1 << 20;

pub(crate) struct CaptureInput<'a> {
    pub(crate) dir: &'a Dir,
    pub(crate) source: String,
    pub(crate) parent: Option<&'a ManifestParts>,
    pub(crate) chunk_size: u32,
    pub(crate) threads: usize,
    pub(crate) started: SystemTime,
    /// Bytes of files read or reused so far (see `CaptureOptions::progress`).
    pub(crate) progress: Option<&'a AtomicU64>,
}

struct Job {
    entry: usize,
    path: Arc<[u8]>,
    file: Arc<File>,
    first: u64,
    count: u64,
    size: u64,
}

struct JobResult {
    entry: usize,
    first: u64,
    chunks: Vec<Chunk>,
}

#[derive(Default)]
struct WorkerOut {
    results: Vec<JobResult>,
    warnings: Vec<String>,
    read: Duration,
    hash: Duration,
    compress: Duration,
    write: Duration,
    bytes_read: u64,
}

pub(crate) fn capture(
    input: CaptureInput<'_>,
    writer: &ChunkWriter<'_>,
) -> Result<(ManifestParts, CaptureStats), SnapshotError> {
    let wall = Instant::now();
    let started_ns = ns_from_time(input.started);
    let chunk_size = u64::from(input.chunk_size);
    let root_meta = input.dir.dir_metadata().map_err(|e| io_error("cannot stat the directory to capture", e))?;

    // Parent entries by path, usable only when they were cut the same way.
    let parent_index: HashMap<&[u8], &Entry> = match input.parent {
        Some(p) if p.chunk_size == input.chunk_size => p.entries.iter().map(|e| (e.path.as_slice(), e)).collect(),
        _ => HashMap::new(),
    };
    let racy_threshold_ns = input
        .parent
        .map(|p| p.capture_started_unix_ns.saturating_sub(RACY_MARGIN.as_nanos() as i64))
        .unwrap_or(i64::MIN);

    let threads = input.threads.max(1);
    let (tx, rx) = sync_channel::<Job>(threads * 4);
    let rx = Mutex::new(rx);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<SnapshotError>> = Mutex::new(None);

    let mut walker = Walker {
        entries: Vec::new(),
        warnings: Vec::new(),
        parent_index,
        racy_threshold_ns,
        chunk_size,
        jobs: Some(tx),
        stop: &stop,
        files_read: 0,
        files_reused: 0,
        chunks_listed: 0,
        hole_chunks: 0,
        walk_time: Duration::ZERO,
        blocked: Duration::ZERO,
        progress: input.progress,
    };

    let outs: Vec<WorkerOut> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let rx = &rx;
                let stop = &stop;
                let first_error = &first_error;
                let progress = input.progress;
                s.spawn(move || worker(rx, writer, chunk_size, stop, first_error, progress))
            })
            .collect();
        if let Err(e) = walker.walk(input.dir) {
            stop.store(true, Ordering::Relaxed);
            first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        }
        walker.jobs = None; // closes the queue: workers drain it and exit
        handles.into_iter().map(|h| h.join().expect("capture worker panicked")).collect()
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }

    let walker_holes = walker.hole_chunks;
    let mut entries = walker.entries;
    let mut warnings = walker.warnings;
    let mut stats = CaptureStats {
        files_read: walker.files_read,
        files_reused: walker.files_reused,
        walk: walker.walk_time,
        ..CaptureStats::default()
    };
    for out in outs {
        for r in out.results {
            if let EntryKind::File { chunks, .. } = &mut entries[r.entry].kind {
                let first = r.first as usize;
                chunks[first..first + r.chunks.len()].copy_from_slice(&r.chunks);
            }
        }
        warnings.extend(out.warnings);
        stats.read += out.read;
        stats.hash += out.hash;
        stats.compress += out.compress;
        stats.write += out.write;
        stats.bytes_read += out.bytes_read;
    }
    let c = &writer.counters;
    stats.chunks_new = c.chunks_new.load(Ordering::Relaxed);
    stats.chunks_existing = c.chunks_existing.load(Ordering::Relaxed);
    stats.chunks_zero = c.chunks_zero.load(Ordering::Relaxed) + walker_holes;
    stats.stored_bytes_new = c.stored_bytes_new.load(Ordering::Relaxed);
    stats.entries = entries.len() as u64;
    for w in &warnings {
        tracing::warn!("capture of {}: {w}", input.source);
    }
    let parts = ManifestParts {
        created_unix_ns: 0, // set by commit
        capture_started_unix_ns: started_ns,
        source: input.source,
        chunk_size: input.chunk_size,
        root_mode: root_meta.mode() & 0o7777,
        root_mtime_ns: mtime_ns(&root_meta),
        entries,
        warnings,
        stored_bytes_new: stats.stored_bytes_new,
    };
    stats.wall = wall.elapsed();
    Ok((parts, stats))
}

struct Walker<'a> {
    entries: Vec<Entry>,
    warnings: Vec<String>,
    parent_index: HashMap<&'a [u8], &'a Entry>,
    racy_threshold_ns: i64,
    chunk_size: u64,
    jobs: Option<SyncSender<Job>>,
    stop: &'a AtomicBool,
    files_read: u64,
    files_reused: u64,
    /// Chunks listed so far (see [`MAX_CAPTURE_CHUNKS`]).
    chunks_listed: u64,
    /// Chunks wholly in holes of sparse files: zero, and never read.
    hole_chunks: u64,
    walk_time: Duration,
    /// Time the walker waited for the workers (queue full): not walking.
    blocked: Duration,
    progress: Option<&'a AtomicU64>,
}

/// One directory being walked: its handle, its path, and its children still to visit.
struct Level {
    dir: Dir,
    prefix: Vec<u8>,
    children: std::vec::IntoIter<(Vec<u8>, cap_std::fs::DirEntry)>,
}

fn mtime_ns(m: &Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec())
}

fn ctime_ns(m: &Metadata) -> i64 {
    m.ctime().saturating_mul(1_000_000_000).saturating_add(m.ctime_nsec())
}

fn special_kind(ft: &FileType) -> &'static str {
    use cap_std::fs::FileTypeExt;
    if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else {
        "file of unknown type"
    }
}

/// Errors that mean "this entry changed under us": the tree is live during a first-phase
/// capture, and the second (paused) phase will see the settled state.
fn vanished(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::NOENT.raw_os_error()
        || code == rustix::io::Errno::LOOP.raw_os_error()
        || code == rustix::io::Errno::NOTDIR.raw_os_error())
}

impl Walker<'_> {
    fn walk(&mut self, root: &Dir) -> Result<(), SnapshotError> {
        let t = Instant::now();
        let mut stack =
            vec![self.open_level(root.try_clone().map_err(|e| io_error("cannot reopen the root", e))?, Vec::new())?];
        while let Some(level) = stack.last_mut() {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let Some((name, dirent)) = level.children.next() else {
                stack.pop();
                continue;
            };
            let mut path = level.prefix.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            if path.len() > super::manifest::MAX_PATH_LEN {
                return Err(SnapshotError::Io {
                    context: format!("cannot capture `{}`", display_bytes(&path)),
                    source: io::Error::other("path longer than 4095 bytes"),
                });
            }
            let name_os = std::ffi::OsStr::from_bytes(&name);
            let meta = match dirent.metadata() {
                Ok(m) => m,
                Err(e) if vanished(&e) => {
                    self.warnings.push(format!("`{}` vanished during capture", display_bytes(&path)));
                    continue;
                }
                Err(e) => return Err(io_error(format!("cannot stat `{}`", display_bytes(&path)), e)),
            };
            let ft = meta.file_type();
            let mut entry = Entry {
                path,
                kind: EntryKind::Dir,
                mode: meta.mode() & 0o7777,
                mtime_ns: mtime_ns(&meta),
                ctime_ns: ctime_ns(&meta),
                inode: meta.ino(),
            };
            if ft.is_dir() {
                let sub = match level.dir.open_dir_nofollow(name_os) {
                    Ok(d) => d,
                    Err(e) if vanished(&e) => {
                        self.warnings.push(format!("`{}` vanished during capture", entry.display_path()));
                        continue;
                    }
                    Err(e) => return Err(io_error(format!("cannot open directory `{}`", entry.display_path()), e)),
                };
                let prefix = entry.path.clone();
                self.entries.push(entry);
                let next = self.open_level(sub, prefix)?;
                stack.push(next);
            } else if ft.is_symlink() {
                match level.dir.read_link_contents(name_os) {
                    Ok(target) => {
                        entry.kind = EntryKind::Symlink { target: target.into_os_string().into_vec() };
                        self.entries.push(entry);
                    }
                    Err(e) if vanished(&e) || e.kind() == io::ErrorKind::InvalidInput => {
                        self.warnings.push(format!("`{}` changed during capture", entry.display_path()));
                    }
                    Err(e) => return Err(io_error(format!("cannot read symlink `{}`", entry.display_path()), e)),
                }
            } else if ft.is_file() {
                let dir = &level.dir;
                self.count_chunks(&entry, meta.len())?;
                if let Some(chunks) = self.reusable(&entry.path, &meta) {
                    entry.kind = EntryKind::File { size: meta.len(), chunks };
                    self.entries.push(entry);
                    self.files_reused += 1;
                    if let Some(progress) = self.progress {
                        progress.fetch_add(meta.len(), Ordering::Relaxed);
                    }
                    continue;
                }
                // O_NOFOLLOW: a file swapped for a link since the lstat is not followed;
                // O_NONBLOCK: one swapped for a fifo does not hang the capture.
                let opened = dir.open_with(
                    name_os,
                    OpenOptions::new()
                        .read(true)
                        .follow(FollowSymlinks::No)
                        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32),
                );
                let file = match opened {
                    Ok(f) => f.into_std(),
                    Err(e) if vanished(&e) => {
                        self.warnings.push(format!("`{}` vanished during capture", entry.display_path()));
                        continue;
                    }
                    Err(e) => return Err(io_error(format!("cannot open `{}`", entry.display_path()), e)),
                };
                // The metadata of what was actually opened is what the entry records.
                let fmeta = Metadata::from_file(&file)
                    .map_err(|e| io_error(format!("cannot stat `{}`", entry.display_path()), e))?;
                if !fmeta.is_file() {
                    self.warnings.push(format!("`{}` changed type during capture", entry.display_path()));
                    continue;
                }
                let size = fmeta.len();
                if size > meta.len() {
                    // Grown since the lstat: count the difference too.
                    self.count_chunks(&entry, size - meta.len())?;
                }
                entry.mode = fmeta.mode() & 0o7777;
                entry.mtime_ns = mtime_ns(&fmeta);
                entry.ctime_ns = ctime_ns(&fmeta);
                entry.inode = fmeta.ino();
                let n = size.div_ceil(self.chunk_size);
                entry.kind = EntryKind::File { size, chunks: vec![Chunk::Zero; n as usize] };
                let index = self.entries.len();
                self.entries.push(entry);
                self.files_read += 1;
                // Only the chunks holding data are read: the rest of a sparse file stays
                // `Chunk::Zero` as listed, without reading its holes.
                let ranges = data_chunks(&file, size, self.chunk_size).map_err(|e| {
                    io_error(format!("cannot find the data of `{}`", self.entries[index].display_path()), e)
                })?;
                let data: u64 = ranges.iter().map(|(a, b)| b - a).sum();
                self.hole_chunks += n - data;
                if let Some(progress) = self.progress {
                    progress.fetch_add(size.saturating_sub(data * self.chunk_size), Ordering::Relaxed);
                }
                let file = Arc::new(file);
                let shared_path: Arc<[u8]> = self.entries[index].path.as_slice().into();
                for (start, end) in ranges {
                    let mut first = start;
                    while first < end {
                        let count = JOB_CHUNKS.min(end - first);
                        let job =
                            Job { entry: index, path: shared_path.clone(), file: file.clone(), first, count, size };
                        let t_send = Instant::now();
                        let sent = self.jobs.as_ref().expect("queue open while walking").send(job);
                        self.blocked += t_send.elapsed();
                        if sent.is_err() {
                            return Ok(()); // every worker stopped: its error is reported
                        }
                        first += count;
                    }
                }
            } else {
                self.warnings.push(format!("skipped {} `{}`", special_kind(&ft), entry.display_path()));
            }
        }
        self.walk_time += t.elapsed().saturating_sub(self.blocked);
        Ok(())
    }

    /// Counts a file's chunks against [`MAX_CAPTURE_CHUNKS`] before any are listed.
    fn count_chunks(&mut self, entry: &Entry, len: u64) -> Result<(), SnapshotError> {
        self.chunks_listed += len.div_ceil(self.chunk_size);
        if self.chunks_listed <= MAX_CAPTURE_CHUNKS {
            return Ok(());
        }
        Err(SnapshotError::TooLarge(format!(
            "cannot capture `{}` ({} bytes long): the files of a snapshot may span at most {} GiB together \
             (holes of sparse files count: a manifest lists every chunk), and this tree is over that limit",
            entry.display_path(),
            len,
            (MAX_CAPTURE_CHUNKS * self.chunk_size) >> 30
        )))
    }

    fn open_level(&self, dir: Dir, prefix: Vec<u8>) -> Result<Level, SnapshotError> {
        let shown = || if prefix.is_empty() { ".".to_string() } else { display_bytes(&prefix) };
        let mut children = Vec::new();
        for entry in dir.entries().map_err(|e| io_error(format!("cannot list `{}`", shown()), e))? {
            let entry = entry.map_err(|e| io_error(format!("cannot list `{}`", shown()), e))?;
            children.push((entry.file_name().into_vec(), entry));
        }
        children.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(Level { dir, prefix, children: children.into_iter() })
    }

    /// The parent's chunks, if the file is certainly unchanged since the parent capture: same
    /// size, mtime, ctime and inode, and neither time "racy" (not older than the parent's
    /// capture start minus [`RACY_MARGIN`]), as git decides whether an index entry is clean.
    fn reusable(&self, path: &[u8], meta: &Metadata) -> Option<Vec<Chunk>> {
        let parent = self.parent_index.get(path)?;
        let EntryKind::File { size, chunks } = &parent.kind else { return None };
        let (mtime, ctime) = (mtime_ns(meta), ctime_ns(meta));
        let same = *size == meta.len()
            && parent.mtime_ns == mtime
            && parent.ctime_ns == ctime
            && parent.ctime_ns != 0
            && parent.inode == meta.ino();
        let settled = mtime < self.racy_threshold_ns && ctime < self.racy_threshold_ns;
        (same && settled).then(|| chunks.clone())
    }
}

fn worker(
    rx: &Mutex<Receiver<Job>>,
    writer: &ChunkWriter<'_>,
    chunk_size: u64,
    stop: &AtomicBool,
    first_error: &Mutex<Option<SnapshotError>>,
    progress: Option<&AtomicU64>,
) -> WorkerOut {
    let mut out = WorkerOut::default();
    let fail = |e: SnapshotError| {
        stop.store(true, Ordering::Relaxed);
        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
    };
    let mut enc = match Encoder::new() {
        Ok(e) => e,
        Err(e) => {
            fail(io_error("cannot start zstd", e));
            return out;
        }
    };
    let mut buf = vec![0u8; chunk_size as usize];
    loop {
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => break, // queue closed and drained
        };
        if stop.load(Ordering::Relaxed) {
            continue; // drain without working, so the walker never blocks on a full queue
        }
        let mut chunks = Vec::with_capacity(job.count as usize);
        let mut shrank = false;
        for i in job.first..job.first + job.count {
            let offset = i * chunk_size;
            let len = (job.size - offset).min(chunk_size) as usize;
            let data = &mut buf[..len];
            let t = Instant::now();
            let got = match read_at_most(&job.file, data, offset) {
                Ok(n) => n,
                Err(e) => {
                    fail(io_error(format!("cannot read `{}`", display_bytes(&job.path)), e));
                    break;
                }
            };
            out.read += t.elapsed();
            out.bytes_read += got as u64;
            if let Some(progress) = progress {
                progress.fetch_add(got as u64, Ordering::Relaxed);
            }
            if got < len {
                // The file shrank after its stat: keep the size the entry records and zero the
                // rest. Its mtime moved past the capture start, so the next capture rereads it.
                data[got..].fill(0);
                shrank = true;
            }
            match writer.put(data, &mut enc) {
                Ok(c) => chunks.push(c),
                Err(e) => {
                    fail(io_error("cannot write a chunk to the snapshot store", e));
                    break;
                }
            }
        }
        if shrank {
            out.warnings.push(format!("`{}` shrank while it was read", display_bytes(&job.path)));
        }
        if chunks.len() as u64 == job.count {
            out.results.push(JobResult { entry: job.entry, first: job.first, chunks });
        }
    }
    out.hash = enc.hash;
    out.compress = enc.compress;
    out.write = enc.write;
    out
}

/// The chunk index ranges `[first, end)` of a file that hold data, found with
/// `SEEK_DATA`/`SEEK_HOLE`: chunks wholly inside holes are not read at all. A filesystem
/// without hole support reports the whole file as data. One `lseek` pair per data range,
/// and a range always ends on a chunk boundary, so a file of tiny alternating holes costs
/// at most one pair per data chunk.
fn data_chunks(file: &File, size: u64, chunk_size: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    let n = size.div_ceil(chunk_size);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // only a hole after `pos`
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) if pos == 0 => return Ok(vec![(0, n)]),
            Err(e) => return Err(e.into()),
        };
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(size),
            Err(rustix::io::Errno::NXIO) => size, // truncated meanwhile
            Err(e) => return Err(e.into()),
        };
        let (first, end) = (data / chunk_size, hole.div_ceil(chunk_size).min(n));
        match ranges.last_mut() {
            Some(last) if last.1 >= first => last.1 = last.1.max(end),
            _ if first < end => ranges.push((first, end)),
            _ => {}
        }
        pos = (end * chunk_size).max(hole).max(data + 1);
    }
    Ok(ranges)
}

/// `pread` until `buf` is full or the file ends.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
