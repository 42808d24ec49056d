//! Restore: materialize a validated manifest into an empty directory (the caller's temporary
//! sibling of the target, renamed into place once this succeeded).
//!
//! Never writes through a symlink: the manifest was validated first (every parent of every
//! entry is a directory entry that comes earlier), directories are created before anything in
//! them, files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`, and every operation goes
//! through the target's `Dir` capability. Every chunk's hash is verified before its bytes are
//! written. Files are created at their final size first and only non-zero chunks are written,
//! so holes stay holes. Modes and mtimes are applied last, directories deepest first (writing
//! into a directory changes its mtime; a read-only directory must still be writable while
//! filled).

use super::chunks::{ChunkReadError, ChunkStore, ReadTimes};
use super::manifest::{Chunk, EntryKind, ManifestParts, display_bytes, time_from_ns};
use super::{RestoreStats, SnapshotError, io_error};
use cap_fs_ext::{DirExt, FollowSymlinks, OpenOptionsFollowExt, SystemTimeSpec};
use cap_std::fs::{Dir, OpenOptions, Permissions, PermissionsExt};
use std::ffi::OsStr;
use std::fs::{File, FileTimes};
use std::num::NonZeroU64;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const JOB_CHUNKS: usize = 4;

/// A file being filled by one or more jobs; the job that finishes last applies mode and mtime.
struct Sink {
    file: File,
    path: Arc<[u8]>,
    size: u64,
    mode: u32,
    mtime_ns: i64,
    remaining_jobs: AtomicUsize,
}

struct Job {
    sink: Arc<Sink>,
    chunks: Vec<(u64, Chunk)>,
}

#[derive(Default)]
struct WorkerOut {
    times: ReadTimes,
    write: Duration,
    chunks_read: u64,
    chunks_reflinked: u64,
}

fn finalize(sink: &Sink) -> std::io::Result<()> {
    sink.file.set_permissions(<std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(sink.mode))?;
    sink.file.set_times(FileTimes::new().set_modified(time_from_ns(sink.mtime_ns)))
}

fn mtime_spec(ns: i64) -> Option<SystemTimeSpec> {
    Some(SystemTimeSpec::Absolute(cap_std::time::SystemTime::from_std(time_from_ns(ns))))
}

pub(crate) fn restore_tree(
    store: &ChunkStore,
    parts: &ManifestParts,
    target: &Dir,
    threads: usize,
) -> Result<RestoreStats, SnapshotError> {
    let wall = Instant::now();
    let chunk_size = u64::from(parts.chunk_size);
    let mut stats = RestoreStats::default();
    let threads = threads.max(1);
    let (tx, rx) = sync_channel::<Job>(threads * 4);
    let rx = Mutex::new(rx);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<SnapshotError>> = Mutex::new(None);
    // Cleared at the first filesystem that refuses (ext4, tmpfs): no second attempt per chunk.
    let reflink_ok = AtomicBool::new(true);
    let bytes_written = AtomicU64::new(0);

    let outs = std::thread::scope(|s| -> Result<Vec<WorkerOut>, SnapshotError> {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (rx, stop, first_error, reflink_ok, bytes_written) =
                    (&rx, &stop, &first_error, &reflink_ok, &bytes_written);
                s.spawn(move || worker(store, rx, chunk_size, stop, first_error, reflink_ok, bytes_written))
            })
            .collect();
        let dispatched = dispatch(parts, target, tx, &stop, &mut stats);
        if let Err(e) = dispatched {
            stop.store(true, Ordering::Relaxed);
            first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        }
        Ok(handles.into_iter().map(|h| h.join().expect("restore worker panicked")).collect())
    })?;
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }

    // Directory modes and mtimes, deepest first (children come after parents in the manifest).
    for entry in parts.entries.iter().rev() {
        if let EntryKind::Dir = entry.kind {
            let path = OsStr::from_bytes(&entry.path);
            target
                .set_permissions(path, Permissions::from_mode(entry.mode))
                .and_then(|()| target.set_times(path, None, mtime_spec(entry.mtime_ns)))
                .map_err(|e| io_error(format!("cannot set mode and mtime of `{}`", entry.display_path()), e))?;
        }
    }
    target
        .set_permissions(".", Permissions::from_mode(parts.root_mode))
        .and_then(|()| target.set_times(".", None, mtime_spec(parts.root_mtime_ns)))
        .map_err(|e| io_error("cannot set mode and mtime of the restored root", e))?;

    for out in outs {
        stats.read += out.times.read;
        stats.decompress += out.times.decompress;
        stats.hash += out.times.hash;
        stats.write += out.write;
        stats.chunks_read += out.chunks_read;
        stats.chunks_reflinked += out.chunks_reflinked;
    }
    stats.bytes_written = bytes_written.load(Ordering::Relaxed);
    stats.wall = wall.elapsed();
    Ok(stats)
}

/// Creates directories, symlinks and files in manifest order; queues the chunk writes.
fn dispatch(
    parts: &ManifestParts,
    target: &Dir,
    tx: std::sync::mpsc::SyncSender<Job>,
    stop: &AtomicBool,
    stats: &mut RestoreStats,
) -> Result<(), SnapshotError> {
    for entry in &parts.entries {
        if stop.load(Ordering::Relaxed) {
            return Ok(()); // a worker failed; its error is reported
        }
        let path = OsStr::from_bytes(&entry.path);
        match &entry.kind {
            EntryKind::Dir => {
                target
                    .create_dir(path)
                    .map_err(|e| io_error(format!("cannot create directory `{}`", entry.display_path()), e))?;
                stats.dirs += 1;
            }
            EntryKind::Symlink { target: link } => {
                target
                    .symlink_contents(OsStr::from_bytes(link), path)
                    .and_then(|()| target.set_symlink_times(path, None, mtime_spec(entry.mtime_ns)))
                    .map_err(|e| io_error(format!("cannot create symlink `{}`", entry.display_path()), e))?;
                stats.symlinks += 1;
            }
            EntryKind::File { size, chunks } => {
                let file = target
                    .open_with(path, OpenOptions::new().write(true).create_new(true).follow(FollowSymlinks::No))
                    .map_err(|e| io_error(format!("cannot create `{}`", entry.display_path()), e))?
                    .into_std();
                // The final size first: chunks that are never written (zero) stay holes.
                file.set_len(*size).map_err(|e| io_error(format!("cannot size `{}`", entry.display_path()), e))?;
                stats.files += 1;
                stats.bytes += size;
                let stored: Vec<(u64, Chunk)> = chunks
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| **c != Chunk::Zero)
                    .map(|(i, c)| (i as u64, *c))
                    .collect();
                let jobs = stored.len().div_ceil(JOB_CHUNKS);
                let sink = Arc::new(Sink {
                    file,
                    path: entry.path.as_slice().into(),
                    size: *size,
                    mode: entry.mode,
                    mtime_ns: entry.mtime_ns,
                    remaining_jobs: AtomicUsize::new(jobs),
                });
                if jobs == 0 {
                    finalize(&sink)
                        .map_err(|e| io_error(format!("cannot set mode and mtime of `{}`", entry.display_path()), e))?;
                    continue;
                }
                for group in stored.chunks(JOB_CHUNKS) {
                    if tx.send(Job { sink: sink.clone(), chunks: group.to_vec() }).is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}

fn worker(
    store: &ChunkStore,
    rx: &Mutex<Receiver<Job>>,
    chunk_size: u64,
    stop: &AtomicBool,
    first_error: &Mutex<Option<SnapshotError>>,
    reflink_ok: &AtomicBool,
    bytes_written: &AtomicU64,
) -> WorkerOut {
    let mut out = WorkerOut::default();
    let fail = |e: SnapshotError| {
        stop.store(true, Ordering::Relaxed);
        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
    };
    let mut decompressor = match zstd::bulk::Decompressor::new() {
        Ok(d) => d,
        Err(e) => {
            fail(io_error("cannot start zstd", e));
            return out;
        }
    };
    let (mut data, mut scratch) = (Vec::new(), Vec::new());
    loop {
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => break,
        };
        if stop.load(Ordering::Relaxed) {
            continue;
        }
        let sink = &job.sink;
        let mut ok = true;
        for (index, chunk) in &job.chunks {
            let offset = index * chunk_size;
            let len = (sink.size - offset).min(chunk_size) as usize;
            let raw_file =
                match store.read_verified(chunk, len, &mut data, &mut scratch, &mut decompressor, &mut out.times) {
                    Ok(f) => f,
                    Err(e) => {
                        fail(chunk_error(e, chunk, &sink.path));
                        ok = false;
                        break;
                    }
                };
            out.chunks_read += 1;
            let t = Instant::now();
            // A chunk stored raw can share its blocks with the store where the filesystem
            // supports reflinks (btrfs, XFS); its hash was verified above either way.
            let mut done = false;
            if let (Some(src), true) = (&raw_file, reflink_ok.load(Ordering::Relaxed)) {
                let len = NonZeroU64::new(len as u64).expect("stored chunks are not empty");
                match reflink_copy::ReflinkBlockBuilder::new(src, &sink.file, len).to_offset(offset).reflink_block() {
                    Ok(()) => {
                        done = true;
                        out.chunks_reflinked += 1;
                    }
                    Err(_) => reflink_ok.store(false, Ordering::Relaxed),
                }
            }
            if !done && let Err(e) = sink.file.write_all_at(&data, offset) {
                fail(io_error(format!("cannot write `{}`", display_bytes(&sink.path)), e));
                ok = false;
                break;
            }
            bytes_written.fetch_add(len as u64, Ordering::Relaxed);
            out.write += t.elapsed();
        }
        if ok && sink.remaining_jobs.fetch_sub(1, Ordering::AcqRel) == 1 {
            let t = Instant::now();
            if let Err(e) = finalize(sink) {
                fail(io_error(format!("cannot set mode and mtime of `{}`", display_bytes(&sink.path)), e));
            }
            out.write += t.elapsed();
        }
    }
    out
}

pub(crate) fn chunk_error(e: ChunkReadError, chunk: &Chunk, path: &[u8]) -> SnapshotError {
    let hash = chunk.hash().map(|h| h.to_hex()).unwrap_or_default();
    let path = display_bytes(path);
    match e {
        ChunkReadError::Missing => SnapshotError::ChunkMissing { hash, path },
        ChunkReadError::WrongSize { expected, found } => SnapshotError::ChunkCorrupt {
            hash,
            path,
            reason: format!("{found} bytes stored, expected {expected} (truncated?)"),
        },
        ChunkReadError::Corrupt(reason) => SnapshotError::ChunkCorrupt { hash, path, reason },
        ChunkReadError::HashMismatch { actual } => {
            SnapshotError::ChunkCorrupt { hash, path, reason: format!("its bytes hash to {actual}") }
        }
        ChunkReadError::Io(e) => io_error(format!("cannot read chunk {hash} of `{path}`"), e),
    }
}
