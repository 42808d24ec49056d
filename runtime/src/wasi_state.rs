//! The host-side WASI state a memory snapshot must carry, and how it is rebuilt.
//!
//! wasmtime-wasi keeps a wasip1 process's descriptor table private, so Stasis keeps its
//! own record of what the guest opened: `path_open` and `fd_renumber` are shadowed in the
//! linker by functions that call the real ones and note the result (path, flags, rights).
//! The real functions are reached through a tiny helper module instantiated in the same
//! store: wiggle's host functions take guest memory from their caller's `memory` export,
//! so a host function cannot call them directly, but a wasm function of the helper can,
//! with the helper's own page as scratch memory. The same helper asks for offsets at
//! capture time (`fd_seek(fd, 0, CUR)`) and replays the opens at restore.
//!
//! Restoring reproduces the descriptor table exactly: the same files under the same
//! numbers at the same offsets, and the same free numbers (wasmtime-wasi hands out the
//! highest freed number first, else one past the highest in use), so the restored guest's
//! next `open` returns the number the original's would have. Files are reopened without
//! `O_CREAT`/`O_TRUNC`/`O_EXCL` (they exist in the restored tree) through WASI itself, so a
//! crafted record cannot reach outside the sandbox. Directory cursors need nothing: wasip1's
//! `fd_readdir` takes the cookie from the guest, whose memory the image holds. Not
//! captured: flags changed later with
//! `fd_fdstat_set_flags`, and preopens the guest renumbered (opens relative to them are
//! replayed relative to the preopen's original number).

use crate::disk_quota::{DiskQuota, ENTRY_BYTES};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use wasmtime::{AsContextMut, Caller, Instance, InstancePre, Linker, Memory, TypedFunc};

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_MFILE: i32 = 33;
const ERRNO_NAMETOOLONG: i32 = 37;
pub(crate) const ERRNO_NOSPC: i32 = 51;
const FDFLAGS_APPEND: u16 = 1;
const OFLAGS_CREAT: u16 = 1;
const OFLAGS_DIRECTORY: u16 = 2;
const OFLAGS_EXCL: u16 = 4;
const OFLAGS_TRUNC: u16 = 8;
const WHENCE_SET: i32 = 0;
const WHENCE_CUR: i32 = 1;
const FILETYPE_REGULAR_FILE: u8 = 4;

/// Where the helper keeps its scratch values: an out-parameter slot, then a path.
const SCRATCH_OUT: u32 = 0;
const SCRATCH_FDSTAT: u32 = 16;
const SCRATCH_FILESTAT: u32 = 64;
const SCRATCH_PATH: u32 = 128;
/// Where a filestat's `size` is (after dev, ino, filetype and nlink).
const FILESTAT_SIZE: u32 = 32;
const HELPER_PAGE: u32 = 65536;

/// How a descriptor was opened, relative to a preopen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRecord {
    /// The preopened directory the path is relative to.
    pub base_fd: u32,
    /// The guest's path, joined onto those of the directories it was opened relative to;
    /// never normalized, so it resolves as the guest's own lookups did.
    pub path: String,
    pub dirflags: u32,
    pub oflags: u16,
    pub rights_base: u64,
    pub rights_inheriting: u64,
    pub fdflags: u16,
}

/// One open descriptor in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdImage {
    pub fd: u32,
    pub open: OpenRecord,
    /// The file offset; `None` for directories.
    pub offset: Option<u64>,
}

/// The descriptor table of a process, as a snapshot stores it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdTableImage {
    pub fds: Vec<FdImage>,
    /// Descriptors the process started with (stdio, preopens) that it has closed.
    pub closed_initial: Vec<u32>,
    /// The highest descriptor number ever in use.
    pub high_water: u32,
}

/// What Stasis knows of a process's descriptors (kept in its store).
#[derive(Default)]
pub(crate) struct FdTracker {
    opened: BTreeMap<u32, OpenRecord>,
    /// Number of descriptors the process started with: stdio and the preopens.
    initial: u32,
    high_water: u32,
    /// Descriptors the guest may have open beyond `initial` (`None`: no bound).
    max_open: Option<u32>,
    /// Descriptors whose position is known to be within their file, with the disk quota's
    /// shrink epoch when that was known: a write there grows the file by at most its
    /// length, so the quota needs no size (see `wasi_disk`). A seek, or a file shrinking
    /// anywhere in the sandbox (a later epoch), ends that.
    within_file: BTreeMap<u32, u64>,
    helper: Option<Helper>,
}

impl FdTracker {
    pub(crate) fn new(initial: u32, max_open: u32) -> Self {
        FdTracker { initial, high_water: initial.saturating_sub(1), max_open: Some(max_open), ..FdTracker::default() }
    }

    /// Notes that `fd`'s position is within its file as of shrink epoch `epoch`.
    pub(crate) fn trust_position(&mut self, fd: u32, epoch: u64) {
        self.within_file.insert(fd, epoch);
    }

    /// Notes that `fd`'s position may be past its file's end (a seek).
    pub(crate) fn distrust_position(&mut self, fd: u32) {
        self.within_file.remove(&fd);
    }

    /// Whether `fd`'s position is known within its file as of shrink epoch `epoch`.
    pub(crate) fn position_trusted(&self, fd: u32, epoch: u64) -> bool {
        self.within_file.get(&fd) == Some(&epoch)
    }

    /// Whether `fd` is a descriptor the guest opened (a file or directory, not stdio or a
    /// preopen). It may have been closed since.
    pub(crate) fn guest_opened(&self, fd: u32) -> bool {
        self.opened.contains_key(&fd)
    }

    /// `opened` keeps descriptors closed since (closes are not shadowed), so it only
    /// bounds the open ones: at the bound, [`prune_closed`] tells.
    fn may_be_at_open_limit(&self) -> bool {
        self.max_open.is_some_and(|max| self.opened.len() >= max as usize)
    }

    fn note_open(&mut self, dirfd: u32, path: &str, mut record: OpenRecord, fd: u32) {
        if let Some(dir) = self.opened.get(&dirfd) {
            record.base_fd = dir.base_fd;
            record.path = format!("{}/{}", dir.path.trim_end_matches('/'), path);
        }
        self.opened.insert(fd, record);
        self.high_water = self.high_water.max(fd);
    }

    fn note_renumber(&mut self, from: u32, to: u32) {
        if from == to {
            return;
        }
        self.opened.remove(&to);
        if let Some(record) = self.opened.remove(&from) {
            self.opened.insert(to, record);
        }
        self.within_file.remove(&to);
        if let Some(epoch) = self.within_file.remove(&from) {
            self.within_file.insert(to, epoch);
        }
        self.high_water = self.high_water.max(to);
    }
}

/// `path_open(dirfd, dirflags, path, path_len, oflags, rights, rights_inheriting, fdflags, fd_out)`.
type PathOpenArgs = (i32, i32, i32, i32, i32, i64, i64, i32, i32);

/// The helper instance's exports.
#[derive(Clone)]
struct Helper {
    memory: Memory,
    path_open: TypedFunc<PathOpenArgs, i32>,
    fd_renumber: TypedFunc<(i32, i32), i32>,
    fd_seek: TypedFunc<(i32, i64, i32, i32), i32>,
    fd_fdstat_get: TypedFunc<(i32, i32), i32>,
    fd_close: TypedFunc<(i32,), i32>,
    fd_filestat_get: TypedFunc<(i32, i32), i32>,
}

pub(crate) const HELPER_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_renumber" (func $fd_renumber (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_seek" (func $fd_seek (param i32 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_fdstat_get" (func $fd_fdstat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_filestat_get" (func $fd_filestat_get (param i32 i32) (result i32)))
  (memory (export "memory") 1 1)
  (func (export "path_open") (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 local.get 4
    local.get 5 local.get 6 local.get 7 local.get 8 call $path_open)
  (func (export "fd_renumber") (param i32 i32) (result i32)
    local.get 0 local.get 1 call $fd_renumber)
  (func (export "fd_seek") (param i32 i64 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $fd_seek)
  (func (export "fd_fdstat_get") (param i32 i32) (result i32)
    local.get 0 local.get 1 call $fd_fdstat_get)
  (func (export "fd_close") (param i32) (result i32)
    local.get 0 call $fd_close)
  (func (export "fd_filestat_get") (param i32 i32) (result i32)
    local.get 0 local.get 1 call $fd_filestat_get))"#;

/// Something whose store holds an [`FdTracker`] (the process state).
pub(crate) trait HasFdTracker: Send + 'static {
    fn fds(&mut self) -> &mut FdTracker;
    /// The disk quota the process's writes are charged to.
    fn disk(&self) -> Option<&DiskQuota>;
}

/// Builds the helper (`module`, compiled from [`HELPER_WAT`]) for a linker that has the
/// real wasip1 functions.
pub(crate) fn helper_pre<T: HasFdTracker>(
    real: &Linker<T>,
    module: &wasmtime::Module,
) -> wasmtime::Result<InstancePre<T>> {
    real.instantiate_pre(module)
}

async fn helper<T: HasFdTracker>(
    mut store: impl AsContextMut<Data = T>,
    pre: &InstancePre<T>,
) -> wasmtime::Result<Helper> {
    if let Some(helper) = store.as_context_mut().data_mut().fds().helper.clone() {
        return Ok(helper);
    }
    let instance: Instance = pre.instantiate_async(&mut store).await?;
    let mut store = store.as_context_mut();
    let helper = Helper {
        memory: instance.get_memory(&mut store, "memory").expect("helper exports memory"),
        path_open: instance.get_typed_func(&mut store, "path_open")?,
        fd_renumber: instance.get_typed_func(&mut store, "fd_renumber")?,
        fd_seek: instance.get_typed_func(&mut store, "fd_seek")?,
        fd_fdstat_get: instance.get_typed_func(&mut store, "fd_fdstat_get")?,
        fd_close: instance.get_typed_func(&mut store, "fd_close")?,
        fd_filestat_get: instance.get_typed_func(&mut store, "fd_filestat_get")?,
    };
    store.data_mut().fds().helper = Some(helper.clone());
    Ok(helper)
}

/// Shadows `path_open` and `fd_renumber` in `linker` (which must allow shadowing) with
/// recording versions that call the real ones through the helper.
pub(crate) fn add_recording_shadows<T: HasFdTracker>(
    linker: &mut Linker<T>,
    pre: InstancePre<T>,
) -> wasmtime::Result<()> {
    let pre = Arc::new(pre);
    let open_pre = pre.clone();
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "path_open",
        move |mut caller: Caller<'_, T>,
              (dirfd, dirflags, path_ptr, path_len, oflags, rights_base, rights_inheriting, fdflags, fd_out): PathOpenArgs| {
            let pre = open_pre.clone();
            Box::new(async move {
                let Some(guest_memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
                    return Ok(ERRNO_FAULT);
                };
                let (path_ptr, path_len, fd_out) =
                    (path_ptr as u32 as usize, path_len as u32 as usize, fd_out as u32 as usize);
                if path_len > (HELPER_PAGE - SCRATCH_PATH) as usize {
                    return Ok(ERRNO_NAMETOOLONG);
                }
                let Some(path) =
                    guest_memory.data(&caller).get(path_ptr..path_ptr.saturating_add(path_len)).map(<[u8]>::to_vec)
                else {
                    return Ok(ERRNO_FAULT);
                };
                if guest_memory.data(&caller).get(fd_out..fd_out.saturating_add(4)).is_none() {
                    return Ok(ERRNO_FAULT);
                }
                let helper = helper(&mut caller, &pre).await?;
                if caller.data_mut().fds().may_be_at_open_limit() {
                    prune_closed(&mut caller, &helper).await?;
                    if caller.data_mut().fds().may_be_at_open_limit() {
                        return Ok(ERRNO_MFILE);
                    }
                }
                helper.memory.data_mut(&mut caller)[SCRATCH_PATH as usize..][..path_len].copy_from_slice(&path);
                // Charged to the disk quota: the entry a create may make (counted even if
                // the file was there, so the count may be high: a refusal walks the tree),
                // and what a truncation frees.
                let mut created = None;
                if let Some(quota) = caller.data().disk().cloned() {
                    if oflags as u16 & OFLAGS_CREAT != 0 {
                        match quota.reserve(ENTRY_BYTES) {
                            Ok(reserved) => created = Some((quota.clone(), reserved)),
                            Err(_) => return Ok(ERRNO_NOSPC),
                        }
                    }
                    if oflags as u16 & OFLAGS_TRUNC != 0 {
                        quota.note_may_have_freed();
                    } else if oflags as u16 & OFLAGS_CREAT != 0 {
                        quota.note_may_be_high();
                    }
                }
                let errno = helper
                    .path_open
                    .call_async(
                        &mut caller,
                        (
                            dirfd,
                            dirflags,
                            SCRATCH_PATH as i32,
                            path_len as i32,
                            oflags,
                            rights_base,
                            rights_inheriting,
                            fdflags,
                            SCRATCH_OUT as i32,
                        ),
                    )
                    .await?;
                if let Some((quota, reserved)) = created {
                    quota.settle(reserved, if errno == ERRNO_SUCCESS { ENTRY_BYTES } else { 0 });
                }
                if errno != ERRNO_SUCCESS {
                    return Ok(errno);
                }
                let fd = read_u32(&helper.memory, &caller, SCRATCH_OUT);
                guest_memory.data_mut(&mut caller)[fd_out..fd_out + 4].copy_from_slice(&fd.to_le_bytes());
                let path = String::from_utf8_lossy(&path).into_owned();
                let record = OpenRecord {
                    base_fd: dirfd as u32,
                    path: path.clone(),
                    dirflags: dirflags as u32,
                    oflags: oflags as u16 & !(OFLAGS_CREAT | OFLAGS_EXCL | OFLAGS_TRUNC),
                    rights_base: rights_base as u64,
                    rights_inheriting: rights_inheriting as u64,
                    fdflags: fdflags as u16,
                };
                let epoch = caller.data().disk().map(DiskQuota::shrink_epoch);
                let fds = caller.data_mut().fds();
                fds.note_open(dirfd as u32, &path, record, fd);
                match epoch {
                    // At offset 0: within any file.
                    Some(epoch) => fds.trust_position(fd, epoch),
                    None => fds.distrust_position(fd),
                }
                Ok(ERRNO_SUCCESS)
            })
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "fd_renumber",
        move |mut caller: Caller<'_, T>, (from, to): (i32, i32)| {
            let pre = pre.clone();
            Box::new(async move {
                let helper = helper(&mut caller, &pre).await?;
                let errno = helper.fd_renumber.call_async(&mut caller, (from, to)).await?;
                if errno == ERRNO_SUCCESS {
                    caller.data_mut().fds().note_renumber(from as u32, to as u32);
                }
                Ok(errno)
            })
        },
    )?;
    Ok(())
}

fn read_u64(memory: &Memory, store: impl wasmtime::AsContext, at: u32) -> u64 {
    let bytes = &memory.data(&store)[at as usize..at as usize + 8];
    u64::from_le_bytes(bytes.try_into().unwrap())
}

fn read_u32(memory: &Memory, store: impl wasmtime::AsContext, at: u32) -> u32 {
    let bytes = &memory.data(&store)[at as usize..at as usize + 4];
    u32::from_le_bytes(bytes.try_into().unwrap())
}

/// What a write to a descriptor needs to know to charge the disk quota.
pub(crate) struct FileFacts {
    pub(crate) size: u64,
    /// Where a `fd_write` lands: the end for an append descriptor.
    pub(crate) write_offset: u64,
}

/// [`FileFacts`] of `fd` if it is an open regular file (`None` for anything else).
pub(crate) async fn file_facts<T: HasFdTracker>(
    mut store: impl AsContextMut<Data = T>,
    pre: &InstancePre<T>,
    fd: i32,
) -> wasmtime::Result<Option<FileFacts>> {
    let helper = helper(&mut store, pre).await?;
    if helper.fd_fdstat_get.call_async(&mut store, (fd, SCRATCH_FDSTAT as i32)).await? != ERRNO_SUCCESS {
        return Ok(None);
    }
    let fdstat = &helper.memory.data(&store)[SCRATCH_FDSTAT as usize..][..4];
    let (filetype, flags) = (fdstat[0], u16::from_le_bytes([fdstat[2], fdstat[3]]));
    if filetype != FILETYPE_REGULAR_FILE {
        return Ok(None);
    }
    let Some(size) = file_size(&mut store, pre, fd).await? else { return Ok(None) };
    let write_offset = if flags & FDFLAGS_APPEND != 0 {
        size
    } else {
        if helper.fd_seek.call_async(&mut store, (fd, 0, WHENCE_CUR, SCRATCH_OUT as i32)).await? != ERRNO_SUCCESS {
            return Ok(None);
        }
        read_u64(&helper.memory, &store, SCRATCH_OUT)
    };
    Ok(Some(FileFacts { size, write_offset }))
}

/// The length of the file open at `fd`.
pub(crate) async fn file_size<T: HasFdTracker>(
    mut store: impl AsContextMut<Data = T>,
    pre: &InstancePre<T>,
    fd: i32,
) -> wasmtime::Result<Option<u64>> {
    let helper = helper(&mut store, pre).await?;
    if helper.fd_filestat_get.call_async(&mut store, (fd, SCRATCH_FILESTAT as i32)).await? != ERRNO_SUCCESS {
        return Ok(None);
    }
    Ok(Some(read_u64(&helper.memory, &store, SCRATCH_FILESTAT + FILESTAT_SIZE)))
}

/// Forgets the descriptors the guest has closed since it opened them.
async fn prune_closed<T: HasFdTracker>(
    mut store: impl AsContextMut<Data = T>,
    helper: &Helper,
) -> wasmtime::Result<()> {
    let fds: Vec<u32> = store.as_context_mut().data_mut().fds().opened.keys().copied().collect();
    for fd in fds {
        if helper.fd_fdstat_get.call_async(&mut store, (fd as i32, SCRATCH_FDSTAT as i32)).await? != ERRNO_SUCCESS {
            store.as_context_mut().data_mut().fds().opened.remove(&fd);
        }
    }
    Ok(())
}

/// Reads the descriptor table of a quiescent process.
pub(crate) async fn capture<T: HasFdTracker>(
    mut store: impl AsContextMut<Data = T>,
    pre: &InstancePre<T>,
) -> wasmtime::Result<FdTableImage> {
    let helper = helper(&mut store, pre).await?;
    prune_closed(&mut store, &helper).await?;
    let mut ctx = store.as_context_mut();
    let tracker = ctx.data_mut().fds();
    let (opened, initial, high_water) = (tracker.opened.clone(), tracker.initial, tracker.high_water);
    let mut image = FdTableImage { high_water, ..FdTableImage::default() };
    for fd in 0..initial {
        if helper.fd_fdstat_get.call_async(&mut store, (fd as i32, SCRATCH_FDSTAT as i32)).await? == ERRNO_BADF {
            image.closed_initial.push(fd);
        }
    }
    for (fd, open) in opened {
        helper.fd_fdstat_get.call_async(&mut store, (fd as i32, SCRATCH_FDSTAT as i32)).await?;
        let filetype = helper.memory.data(&store)[SCRATCH_FDSTAT as usize];
        let offset = if filetype == FILETYPE_REGULAR_FILE {
            let errno = helper.fd_seek.call_async(&mut store, (fd as i32, 0, WHENCE_CUR, SCRATCH_OUT as i32)).await?;
            (errno == ERRNO_SUCCESS).then(|| read_u64(&helper.memory, &store, SCRATCH_OUT))
        } else {
            None
        };
        image.fds.push(FdImage { fd, open, offset });
    }
    Ok(image)
}

/// Why a descriptor table could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum FdRestoreError {
    #[error("descriptor {fd}: cannot reopen `{path}` (WASI errno {errno}); the snapshot's tree does not have it")]
    Reopen { fd: u32, path: String, errno: i32 },
    #[error("descriptor table record is inconsistent: {0}")]
    Inconsistent(String),
}

/// Rebuilds a captured descriptor table in a fresh process (same preopens).
pub(crate) async fn restore<T: HasFdTracker>(
    mut store: impl AsContextMut<Data = T>,
    pre: &InstancePre<T>,
    image: &FdTableImage,
) -> wasmtime::Result<()> {
    let initial = store.as_context_mut().data_mut().fds().initial;
    if image.fds.is_empty() && image.closed_initial.is_empty() && image.high_water < initial {
        // The table a fresh process starts with: nothing to replay (and no helper needed).
        return Ok(());
    }
    let helper = helper(&mut store, pre).await?;
    let wanted: BTreeMap<u32, &FdImage> = image.fds.iter().map(|f| (f.fd, f)).collect();
    if wanted.len() != image.fds.len() || wanted.keys().any(|&fd| fd < initial || fd > image.high_water) {
        return Err(FdRestoreError::Inconsistent(format!(
            "descriptor numbers must be unique and between {initial} and {}",
            image.high_water
        ))
        .into());
    }
    if image.high_water.saturating_sub(initial) > 1 << 16 {
        return Err(FdRestoreError::Inconsistent(format!("{} descriptors is too many", image.high_water)).into());
    }
    // Fresh allocation hands out one past the highest number in use, so opening every
    // number from `initial` to the high-water mark in order lands each file on its own
    // number; the gaps get placeholders that are closed afterwards, leaving exactly the
    // original's free numbers.
    let mut placeholders = Vec::new();
    if image.closed_initial.iter().any(|&fd| fd >= initial) {
        return Err(FdRestoreError::Inconsistent("a closed initial descriptor past the initial ones".into()).into());
    }
    // The first preopen: a directory every placeholder can open as `.`.
    const FIRST_PREOPEN: u32 = 3;
    for fd in initial..=image.high_water {
        let (base_fd, path, dirflags, oflags, rights_base, rights_inheriting, fdflags) = match wanted.get(&fd) {
            Some(f) => (
                f.open.base_fd,
                f.open.path.as_str(),
                f.open.dirflags,
                f.open.oflags & !(OFLAGS_CREAT | OFLAGS_EXCL | OFLAGS_TRUNC),
                f.open.rights_base,
                f.open.rights_inheriting,
                f.open.fdflags,
            ),
            // Placeholders ask for no rights: a directory opened for writing is refused.
            None => (FIRST_PREOPEN, ".", 0, OFLAGS_DIRECTORY, 0, 0, 0),
        };
        if path.len() > (HELPER_PAGE - SCRATCH_PATH) as usize {
            return Err(FdRestoreError::Inconsistent(format!("descriptor {fd}: path too long")).into());
        }
        helper.memory.data_mut(&mut store)[SCRATCH_PATH as usize..][..path.len()].copy_from_slice(path.as_bytes());
        let errno = helper
            .path_open
            .call_async(
                &mut store,
                (
                    base_fd as i32,
                    dirflags as i32,
                    SCRATCH_PATH as i32,
                    path.len() as i32,
                    oflags as i32,
                    rights_base as i64,
                    rights_inheriting as i64,
                    fdflags as i32,
                    SCRATCH_OUT as i32,
                ),
            )
            .await?;
        if errno != ERRNO_SUCCESS {
            return Err(FdRestoreError::Reopen { fd, path: path.to_string(), errno }.into());
        }
        let got = read_u32(&helper.memory, &store, SCRATCH_OUT);
        if got != fd {
            return Err(FdRestoreError::Inconsistent(format!("reopening descriptor {fd} gave {got}")).into());
        }
        match wanted.get(&fd) {
            Some(f) => {
                if let Some(offset) = f.offset {
                    let offset = i64::try_from(offset)
                        .map_err(|_| FdRestoreError::Inconsistent(format!("descriptor {fd}: offset {offset}")))?;
                    helper.fd_seek.call_async(&mut store, (fd as i32, offset, WHENCE_SET, SCRATCH_OUT as i32)).await?;
                }
                store.as_context_mut().data_mut().fds().note_open(u32::MAX, path, f.open.clone(), fd);
            }
            None => placeholders.push(fd),
        }
    }
    for fd in placeholders.into_iter().chain(image.closed_initial.iter().copied()) {
        helper.fd_close.call_async(&mut store, (fd as i32,)).await?;
    }
    let mut ctx = store.as_context_mut();
    let tracker = ctx.data_mut().fds();
    tracker.high_water = tracker.high_water.max(image.high_water);
    Ok(())
}

/// The monotonic clock every process sees: it counts from an origin that a restored
/// process takes from its snapshot, so monotonic time never runs backwards across a
/// restore, on this host or another.
#[derive(Clone)]
pub struct SnapshotClock {
    inner: Arc<ClockInner>,
}

struct ClockInner {
    origin_ns: AtomicU64,
    start: Instant,
}

impl SnapshotClock {
    /// A clock that reads `origin_ns` now.
    pub fn starting_at(origin_ns: u64) -> Self {
        SnapshotClock { inner: Arc::new(ClockInner { origin_ns: AtomicU64::new(origin_ns), start: Instant::now() }) }
    }

    /// Time the host spent on the guest's behalf while no wasm ran (building a resume):
    /// it does not pass for the guest. Monotonic time cannot run backwards by it, since
    /// the guest read nothing during it.
    pub fn hold(&self, spent: std::time::Duration) {
        let spent = u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX);
        let _ =
            self.inner.origin_ns.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| Some(o.saturating_sub(spent)));
    }

    pub fn now_ns(&self) -> u64 {
        let elapsed = u64::try_from(self.inner.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.inner.origin_ns.load(Ordering::Relaxed).saturating_add(elapsed)
    }
}

impl wasmtime_wasi::HostMonotonicClock for SnapshotClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        self.now_ns()
    }
}
