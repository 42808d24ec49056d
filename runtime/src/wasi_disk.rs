//! The wasip1 functions that can grow a sandbox's tree, shadowed so the tree stays within
//! its disk quota (see `disk_quota`): a write, a resize, a new directory or link first
//! reserves the most it can add, fails with `ENOSPC` when that is past the quota, and
//! settles for what it really added; deletes and renames mark the count as possibly high.
//! (`path_open`'s part, the entry a create makes, is in `wasi_state`'s recording shadow.)
//!
//! The real functions read their arguments from the guest's memory, so they are reached
//! through a gate instance that imports that memory (as `checkpoint`'s gate does); the
//! sizes and offsets the charges need come from `wasi_state`'s helper, which has scratch
//! memory of its own. Without a quota the shadows only forward.

use crate::disk_quota::{DiskQuota, ENTRY_BYTES};
use crate::process::ProcessState;
use crate::wasi_state::{self, ERRNO_NOSPC};

/// `fd_seek`'s whence for "from the current position".
const WHENCE_CUR: i32 = 1;
use std::sync::Arc;
use wasmtime::{Caller, InstancePre, Linker, TypedFunc};

pub(crate) const DISK_GATE_WAT: &str = r#"(module
  (import "guest" "memory" (memory 0))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_pwrite" (func $fd_pwrite (param i32 i32 i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_filestat_set_size" (func $set_size (param i32 i64) (result i32)))
  (import "wasi_snapshot_preview1" "path_create_directory" (func $mkdir (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_symlink" (func $symlink (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_link" (func $link (param i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_unlink_file" (func $unlink (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_remove_directory" (func $rmdir (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_rename" (func $rename (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_seek" (func $seek (param i32 i64 i32 i32) (result i32)))
  (export "memory" (memory 0))
  (func (export "fd_write") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $fd_write)
  (func (export "fd_pwrite") (param i32 i32 i32 i64 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 local.get 4 call $fd_pwrite)
  (func (export "fd_filestat_set_size") (param i32 i64) (result i32)
    local.get 0 local.get 1 call $set_size)
  (func (export "path_create_directory") (param i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 call $mkdir)
  (func (export "path_symlink") (param i32 i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 local.get 4 call $symlink)
  (func (export "path_link") (param i32 i32 i32 i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 local.get 4 local.get 5 local.get 6 call $link)
  (func (export "path_unlink_file") (param i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 call $unlink)
  (func (export "path_remove_directory") (param i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 call $rmdir)
  (func (export "path_rename") (param i32 i32 i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 local.get 4 local.get 5 call $rename)
  (func (export "fd_seek") (param i32 i64 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $seek))"#;

const FORWARDED: [&str; 10] = [
    "fd_write",
    "fd_pwrite",
    "fd_filestat_set_size",
    "path_create_directory",
    "path_symlink",
    "path_link",
    "path_unlink_file",
    "path_remove_directory",
    "path_rename",
    "fd_seek",
];

type PathArgs = (i32, i32, i32);
type SymlinkArgs = (i32, i32, i32, i32, i32);
type LinkArgs = (i32, i32, i32, i32, i32, i32, i32);
type RenameArgs = (i32, i32, i32, i32, i32, i32);

/// A process's gate to the real functions.
#[derive(Clone)]
pub(crate) struct DiskGate {
    fd_write: TypedFunc<(i32, i32, i32, i32), i32>,
    fd_pwrite: TypedFunc<(i32, i32, i32, i64, i32), i32>,
    set_size: TypedFunc<(i32, i64), i32>,
    mkdir: TypedFunc<PathArgs, i32>,
    symlink: TypedFunc<SymlinkArgs, i32>,
    link: TypedFunc<LinkArgs, i32>,
    unlink: TypedFunc<PathArgs, i32>,
    rmdir: TypedFunc<PathArgs, i32>,
    rename: TypedFunc<RenameArgs, i32>,
    seek: TypedFunc<(i32, i64, i32, i32), i32>,
}

struct Source {
    /// The linker with the real functions.
    real: Linker<ProcessState>,
    gate: wasmtime::Module,
    helper: InstancePre<ProcessState>,
}

async fn gate(caller: &mut Caller<'_, ProcessState>, source: &Source) -> wasmtime::Result<DiskGate> {
    if let Some(gate) = caller.data().disk_gate.clone() {
        return Ok(gate);
    }
    let instance = crate::checkpoint::instantiate_gate(caller, &source.real, &source.gate, &FORWARDED).await?;
    let gate = DiskGate {
        fd_write: instance.get_typed_func(&mut *caller, "fd_write")?,
        fd_pwrite: instance.get_typed_func(&mut *caller, "fd_pwrite")?,
        set_size: instance.get_typed_func(&mut *caller, "fd_filestat_set_size")?,
        mkdir: instance.get_typed_func(&mut *caller, "path_create_directory")?,
        symlink: instance.get_typed_func(&mut *caller, "path_symlink")?,
        link: instance.get_typed_func(&mut *caller, "path_link")?,
        unlink: instance.get_typed_func(&mut *caller, "path_unlink_file")?,
        rmdir: instance.get_typed_func(&mut *caller, "path_remove_directory")?,
        rename: instance.get_typed_func(&mut *caller, "path_rename")?,
        seek: instance.get_typed_func(&mut *caller, "fd_seek")?,
    };
    caller.data_mut().disk_gate = Some(gate.clone());
    Ok(gate)
}

/// Bytes the iovecs at `iovs` name, or `None` if they are not all in guest memory (the
/// real function then reports the fault).
fn iovec_bytes(caller: &mut Caller<'_, ProcessState>, iovs: i32, len: i32) -> Option<u64> {
    let memory = caller.get_export("memory")?.into_memory()?;
    let start = iovs as u32 as usize;
    let table = memory.data(&*caller).get(start..start.checked_add((len as u32 as usize).checked_mul(8)?)?)?;
    Some(table.chunks_exact(8).map(|iov| u32::from_le_bytes(iov[4..8].try_into().unwrap()) as u64).sum())
}

/// Runs `call`, a write of the iovecs at `iovs` to `fd`, charged to the quota if `fd` is
/// one the guest opened (stdio and preopens are not files). Where `fd`'s position is known
/// to be within its file (it was opened, or written, and nothing seeked it or shrank a
/// file since), the write grows the file by at most its length and is charged that, with
/// no size or offset asked for: each is a host call on the blocking pool, and asking at
/// every write made small-file writes 1.69x slower. The count may then be high after an
/// overwrite, and a refusal walks the tree first. Elsewhere the write is charged exactly.
async fn counted_write(
    caller: &mut Caller<'_, ProcessState>,
    source: &Source,
    fd: i32,
    iovs: i32,
    len: i32,
    nwritten: i32,
    call: impl AsyncFnOnce(&mut Caller<'_, ProcessState>) -> wasmtime::Result<i32>,
) -> wasmtime::Result<i32> {
    let Some(quota) = caller.data().disk.clone() else { return call(caller).await };
    if !caller.data().fds.guest_opened(fd as u32) {
        return call(caller).await;
    }
    let Some(bytes) = iovec_bytes(caller, iovs, len) else { return call(caller).await };
    let epoch = quota.shrink_epoch();
    if !caller.data().fds.position_trusted(fd as u32, epoch) {
        let Some(facts) = wasi_state::file_facts(&mut *caller, &source.helper, fd).await? else {
            return call(caller).await;
        };
        let end = facts.write_offset.saturating_add(bytes);
        let errno = charged_write(caller, source, quota, fd, facts.size, end, call).await?;
        caller.data_mut().fds.trust_position(fd as u32, epoch);
        return Ok(errno);
    }
    let Ok(reserved) = quota.reserve(bytes) else { return Ok(ERRNO_NOSPC) };
    let errno = call(caller).await?;
    let written = if errno == 0 { guest_u32(caller, nwritten).unwrap_or(0) } else { 0 };
    quota.settle(reserved, written as u64);
    quota.note_may_be_high();
    Ok(errno)
}

/// A u32 of guest memory.
fn guest_u32(caller: &mut Caller<'_, ProcessState>, at: i32) -> Option<u32> {
    let memory = caller.get_export("memory")?.into_memory()?;
    let bytes = memory.data(&*caller).get(at as u32 as usize..)?.get(..4)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// Runs `call`, a resize of `fd` from `size` to `end` bytes, charged to `quota`: refused
/// with `ENOSPC` if the growth does not fit; settled with the real growth.
async fn charged_write(
    caller: &mut Caller<'_, ProcessState>,
    source: &Source,
    quota: DiskQuota,
    fd: i32,
    size: u64,
    end: u64,
    call: impl AsyncFnOnce(&mut Caller<'_, ProcessState>) -> wasmtime::Result<i32>,
) -> wasmtime::Result<i32> {
    let Ok(reserved) = quota.reserve(end.saturating_sub(size)) else { return Ok(ERRNO_NOSPC) };
    let errno = call(caller).await;
    let after = wasi_state::file_size(&mut *caller, &source.helper, fd).await?.unwrap_or(size);
    quota.settle(reserved, after.saturating_sub(size));
    if after < size {
        quota.note_may_have_freed();
    }
    errno
}

/// Runs `call`, which makes one entry (a directory, a link), charged to `quota`.
async fn charged_entry(
    caller: &mut Caller<'_, ProcessState>,
    call: impl AsyncFnOnce(&mut Caller<'_, ProcessState>) -> wasmtime::Result<i32>,
) -> wasmtime::Result<i32> {
    let Some(quota) = caller.data().disk.clone() else { return call(caller).await };
    let Ok(reserved) = quota.reserve(ENTRY_BYTES) else { return Ok(ERRNO_NOSPC) };
    let errno = call(caller).await?;
    quota.settle(reserved, if errno == 0 { ENTRY_BYTES } else { 0 });
    Ok(errno)
}

/// Runs `call`, which may free space (a delete, a rename over an entry).
async fn freeing(
    caller: &mut Caller<'_, ProcessState>,
    call: impl AsyncFnOnce(&mut Caller<'_, ProcessState>) -> wasmtime::Result<i32>,
) -> wasmtime::Result<i32> {
    let errno = call(caller).await?;
    if errno == 0
        && let Some(quota) = &caller.data().disk
    {
        quota.note_may_have_freed();
    }
    Ok(errno)
}

/// Shadows the functions that grow or shrink the tree in `linker` (which must allow
/// shadowing); `real` keeps the real ones, `helper` is `wasi_state`'s.
pub(crate) fn add_disk_shadows(
    linker: &mut Linker<ProcessState>,
    real: Linker<ProcessState>,
    gate_module: wasmtime::Module,
    helper: InstancePre<ProcessState>,
) -> wasmtime::Result<()> {
    let source = Arc::new(Source { real, gate: gate_module, helper });
    const WASI: &str = "wasi_snapshot_preview1";
    let s = source.clone();
    linker.func_wrap_async(
        WASI,
        "fd_write",
        move |mut caller: Caller<'_, ProcessState>, args: (i32, i32, i32, i32)| {
            let source = s.clone();
            Box::new(async move {
                let gate = gate(&mut caller, &source).await?;
                let (fd, iovs, len, nwritten) = args;
                let call = async |c: &mut Caller<'_, ProcessState>| gate.fd_write.call_async(c, args).await;
                counted_write(&mut caller, &source, fd, iovs, len, nwritten, call).await
            })
        },
    )?;
    let s = source.clone();
    linker.func_wrap_async(
        WASI,
        "fd_pwrite",
        move |mut caller: Caller<'_, ProcessState>, args: (i32, i32, i32, i64, i32)| {
            let source = s.clone();
            Box::new(async move {
                let gate = gate(&mut caller, &source).await?;
                let (fd, iovs, len, offset, _) = args;
                if let Some(quota) = caller.data().disk.clone()
                    && caller.data().fds.guest_opened(fd as u32)
                    && let Some(size) = wasi_state::file_size(&mut caller, &source.helper, fd).await?
                    && let Some(bytes) = iovec_bytes(&mut caller, iovs, len)
                {
                    let end = (offset as u64).saturating_add(bytes);
                    let call = async |c: &mut Caller<'_, ProcessState>| gate.fd_pwrite.call_async(c, args).await;
                    return charged_write(&mut caller, &source, quota, fd, size, end, call).await;
                }
                gate.fd_pwrite.call_async(&mut caller, args).await
            })
        },
    )?;
    let s = source.clone();
    linker.func_wrap_async(
        WASI,
        "fd_filestat_set_size",
        move |mut caller: Caller<'_, ProcessState>, args: (i32, i64)| {
            let source = s.clone();
            Box::new(async move {
                let gate = gate(&mut caller, &source).await?;
                let (fd, size) = args;
                if let Some(quota) = caller.data().disk.clone()
                    && let Some(current) = wasi_state::file_size(&mut caller, &source.helper, fd).await?
                {
                    let call = async |c: &mut Caller<'_, ProcessState>| gate.set_size.call_async(c, args).await;
                    return charged_write(&mut caller, &source, quota, fd, current, size as u64, call).await;
                }
                gate.set_size.call_async(&mut caller, args).await
            })
        },
    )?;
    let s = source.clone();
    linker.func_wrap_async(
        WASI,
        "fd_seek",
        move |mut caller: Caller<'_, ProcessState>, args: (i32, i64, i32, i32)| {
            let source = s.clone();
            Box::new(async move {
                let gate = gate(&mut caller, &source).await?;
                let (fd, offset, whence, _) = args;
                let errno = gate.seek.call_async(&mut caller, args).await?;
                // Anything but a tell may put the position past the end: the next write is
                // charged exactly.
                if errno == 0 && !(whence == WHENCE_CUR && offset == 0) {
                    caller.data_mut().fds.distrust_position(fd as u32);
                }
                Ok(errno)
            })
        },
    )?;
    let s = source.clone();
    linker.func_wrap_async(
        WASI,
        "path_create_directory",
        move |mut caller: Caller<'_, ProcessState>, args: PathArgs| {
            let source = s.clone();
            Box::new(async move {
                let gate = gate(&mut caller, &source).await?;
                charged_entry(&mut caller, async |c: &mut Caller<'_, ProcessState>| {
                    gate.mkdir.call_async(c, args).await
                })
                .await
            })
        },
    )?;
    let s = source.clone();
    linker.func_wrap_async(WASI, "path_symlink", move |mut caller: Caller<'_, ProcessState>, args: SymlinkArgs| {
        let source = s.clone();
        Box::new(async move {
            let gate = gate(&mut caller, &source).await?;
            charged_entry(&mut caller, async |c: &mut Caller<'_, ProcessState>| gate.symlink.call_async(c, args).await)
                .await
        })
    })?;
    let s = source.clone();
    linker.func_wrap_async(WASI, "path_link", move |mut caller: Caller<'_, ProcessState>, args: LinkArgs| {
        let source = s.clone();
        Box::new(async move {
            let gate = gate(&mut caller, &source).await?;
            charged_entry(&mut caller, async |c: &mut Caller<'_, ProcessState>| gate.link.call_async(c, args).await)
                .await
        })
    })?;
    let s = source.clone();
    linker.func_wrap_async(WASI, "path_unlink_file", move |mut caller: Caller<'_, ProcessState>, args: PathArgs| {
        let source = s.clone();
        Box::new(async move {
            let gate = gate(&mut caller, &source).await?;
            freeing(&mut caller, async |c: &mut Caller<'_, ProcessState>| gate.unlink.call_async(c, args).await).await
        })
    })?;
    let s = source.clone();
    linker.func_wrap_async(
        WASI,
        "path_remove_directory",
        move |mut caller: Caller<'_, ProcessState>, args: PathArgs| {
            let source = s.clone();
            Box::new(async move {
                let gate = gate(&mut caller, &source).await?;
                freeing(&mut caller, async |c: &mut Caller<'_, ProcessState>| gate.rmdir.call_async(c, args).await)
                    .await
            })
        },
    )?;
    linker.func_wrap_async(WASI, "path_rename", move |mut caller: Caller<'_, ProcessState>, args: RenameArgs| {
        let source = source.clone();
        Box::new(async move {
            let gate = gate(&mut caller, &source).await?;
            freeing(&mut caller, async |c: &mut Caller<'_, ProcessState>| gate.rename.call_async(c, args).await).await
        })
    })?;
    Ok(())
}
