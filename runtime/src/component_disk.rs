//! The wasip2 filesystem functions that can grow a sandbox's tree, shadowed so components
//! are held to the disk quota as core modules are (`wasi_disk`): writes, resizes and new
//! entries reserve what they may add and fail with `insufficient-space` past the quota;
//! deletes and renames mark the count as possibly high. A file's output stream
//! (`write-via-stream`, `append-via-stream`, which the preview1 adapter writes through) is
//! wrapped in a [`QuotaStream`] that charges each write before passing it on. The shadows
//! also bound the descriptors a component holds open ([`Limits::max_open_files`]).
//!
//! The real functions are wasmtime-wasi's own `HostDescriptor` implementation, called on
//! the process's filesystem view.
//!
//! [`Limits::max_open_files`]: crate::limits::Limits::max_open_files

use crate::disk_quota::{DiskQuota, ENTRY_BYTES, Reserved};
use crate::process::ProcessState;
use bytes::Bytes;
use std::sync::Arc;
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::filesystem::types::{
    DescriptorFlags, ErrorCode, HostDescriptor, OpenFlags, PathFlags,
};
use wasmtime_wasi::p2::{DynOutputStream, FsResult, OutputStream, Pollable, StreamError, StreamResult};

/// The interface wasmtime-wasi defines (components importing older 0.2 versions link to it).
const FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";

type Answer<T> = wasmtime::Result<(Result<T, ErrorCode>,)>;
type Store<'a> = StoreContextMut<'a, ProcessState>;

/// An error code for the guest, or a trap.
fn answer<T>(result: FsResult<T>) -> Answer<T> {
    Ok((match result {
        Ok(v) => Ok(v),
        Err(e) => Err(e.downcast()?),
    },))
}

/// The file open at `fd`, if it is one and its process has a quota.
pub(crate) fn charged_file(
    state: &mut ProcessState,
    fd: &Resource<Descriptor>,
) -> Option<(DiskQuota, Arc<std::fs::File>)> {
    let quota = state.disk.clone()?;
    match state.ctx().table.get(fd) {
        Ok(Descriptor::File(f)) => Some((quota, f.file.clone())),
        _ => None,
    }
}

fn length(file: &std::fs::File) -> u64 {
    file.metadata().map(|m| m.len()).unwrap_or(0)
}

fn borrowed(fd: &Resource<Descriptor>) -> Resource<Descriptor> {
    Resource::new_borrow(fd.rep())
}

/// Runs a change to the file at `fd` that makes it at most `end` bytes long, charged to the
/// quota (refused past it); settled with what the file really grew by.
async fn resize<T>(
    store: &mut Store<'_>,
    fd: &Resource<Descriptor>,
    end: impl FnOnce(u64) -> u64,
    call: impl AsyncFnOnce(&mut Store<'_>) -> FsResult<T>,
) -> Answer<T> {
    let Some((quota, file)) = charged_file(store.data_mut(), fd) else { return answer(call(store).await) };
    let before = length(&file);
    let Ok(reserved) = quota.reserve(end(before).saturating_sub(before)) else {
        return Ok((Err(ErrorCode::InsufficientSpace),));
    };
    let result = call(store).await;
    let after = length(&file);
    quota.settle(reserved, after.saturating_sub(before));
    if after < before {
        quota.note_may_have_freed();
    }
    answer(result)
}

/// Runs `call`, which makes one entry, charged to the quota.
async fn entry<T>(store: &mut Store<'_>, call: impl AsyncFnOnce(&mut Store<'_>) -> FsResult<T>) -> Answer<T> {
    let Some(quota) = store.data().disk.clone() else { return answer(call(store).await) };
    let Ok(reserved) = quota.reserve(ENTRY_BYTES) else { return Ok((Err(ErrorCode::InsufficientSpace),)) };
    let result = call(store).await;
    quota.settle(reserved, if result.is_ok() { ENTRY_BYTES } else { 0 });
    answer(result)
}

/// Runs `call`, which may free space.
async fn freeing(store: &mut Store<'_>, call: impl AsyncFnOnce(&mut Store<'_>) -> FsResult<()>) -> Answer<()> {
    let result = call(store).await;
    if result.is_ok()
        && let Some(quota) = &store.data().disk
    {
        quota.note_may_have_freed();
    }
    answer(result)
}

/// Wraps a file's new output stream (`file`, from [`charged_file`]) in a [`QuotaStream`]
/// in place; `position`: where it writes, `None` for an append stream.
pub(crate) fn charge_stream(
    state: &mut ProcessState,
    file: Option<(DiskQuota, Arc<std::fs::File>)>,
    position: Option<u64>,
    made: FsResult<Resource<DynOutputStream>>,
) -> FsResult<Resource<DynOutputStream>> {
    let (Ok(stream), Some((quota, file))) = (&made, file) else { return made };
    let entry = state.ctx().table.get_mut(stream)?;
    let inner = std::mem::replace(entry, Box::new(wasmtime_wasi::p2::pipe::SinkOutputStream));
    let epoch = quota.shrink_epoch();
    *entry = Box::new(QuotaStream { inner, file, position, charged_to: 0, epoch, quota });
    made
}

/// What an `open-at` took before it ran: room for the entry a create may make.
pub(crate) struct OpenCharge(Option<(DiskQuota, Reserved)>);

/// Checks an `open-at` against the descriptor bound and the disk quota before it runs;
/// the error the guest gets if it may not.
pub(crate) fn before_open(state: &mut ProcessState, oflags: OpenFlags) -> Result<OpenCharge, ErrorCode> {
    if !may_open(state) {
        return Err(ErrorCode::InsufficientMemory);
    }
    let Some(quota) = state.disk.clone() else { return Ok(OpenCharge(None)) };
    if oflags.contains(OpenFlags::TRUNCATE) {
        quota.note_may_have_freed();
    }
    if !oflags.contains(OpenFlags::CREATE) {
        return Ok(OpenCharge(None));
    }
    let reserved = quota.reserve(ENTRY_BYTES).map_err(|_| ErrorCode::InsufficientSpace)?;
    // Counted as a new entry even when the file was there: the count may be high (a
    // refusal walks the tree first).
    quota.note_may_be_high();
    Ok(OpenCharge(Some((quota, reserved))))
}

/// Settles an `open-at` after it ran (`opened`: the new descriptor's rep, if it opened).
pub(crate) fn after_open(state: &mut ProcessState, charge: OpenCharge, opened: Option<u32>) {
    if let Some((quota, reserved)) = charge.0 {
        quota.settle(reserved, if opened.is_some() { ENTRY_BYTES } else { 0 });
    }
    if let Some(rep) = opened {
        state.component_fds.insert(rep);
    }
}

/// A file's output stream whose writes are charged to a disk quota before they go on.
struct QuotaStream {
    inner: DynOutputStream,
    file: Arc<std::fs::File>,
    /// Where the next write lands; `None`: at the end (an append stream).
    position: Option<u64>,
    /// The end of what this stream has charged: a write still in flight has not grown the
    /// file yet, and must not be charged twice.
    charged_to: u64,
    /// The quota's shrink epoch `charged_to` is from: once something shrank a file, the
    /// file may be shorter than what was charged, and only its length counts.
    epoch: u64,
    quota: DiskQuota,
}

impl QuotaStream {
    fn charge(&mut self, bytes: usize) -> StreamResult<()> {
        let epoch = self.quota.shrink_epoch();
        if epoch != self.epoch {
            (self.charged_to, self.epoch) = (0, epoch);
        }
        let size = length(&self.file);
        let start = self.position.unwrap_or(size.max(self.charged_to));
        let end = start.saturating_add(bytes as u64);
        let growth = end.saturating_sub(size.max(self.charged_to));
        let reserved: Reserved = self.quota.reserve(growth).map_err(|_| {
            StreamError::LastOperationFailed(wasmtime::Error::new(std::io::Error::from_raw_os_error(libc::ENOSPC)))
        })?;
        self.quota.settle(reserved, growth);
        self.charged_to = self.charged_to.max(end);
        if let Some(position) = &mut self.position {
            *position = end;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Pollable for QuotaStream {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

#[async_trait::async_trait]
impl OutputStream for QuotaStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.charge(bytes.len())?;
        self.inner.write(bytes)
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.inner.check_write()
    }

    async fn blocking_write_and_flush(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.charge(bytes.len())?;
        self.inner.blocking_write_and_flush(bytes).await
    }

    fn write_zeroes(&mut self, nelem: usize) -> StreamResult<()> {
        self.charge(nelem)?;
        self.inner.write_zeroes(nelem)
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

/// Whether the process may open one more descriptor: at its bound, the ones it has
/// dropped since are forgotten first.
fn may_open(state: &mut ProcessState) -> bool {
    let max = state.max_open_files as usize;
    if state.component_fds.len() < max {
        return true;
    }
    let table = state.wasi.ctx().table;
    state.component_fds.retain(|&rep| table.get(&Resource::<Descriptor>::new_borrow(rep)).is_ok());
    state.component_fds.len() < max
}

/// Shadows every filesystem function that changes the tree or opens a descriptor in
/// `linker` (command components').
pub(crate) fn add_component_disk_shadows(linker: &mut Linker<ProcessState>) -> wasmtime::Result<()> {
    add_tree_shadows(linker)?;
    linker.allow_shadowing(true);
    let mut types = linker.instance(FILESYSTEM_TYPES)?;
    types.func_wrap_async(
        "[method]descriptor.write-via-stream",
        |mut store: Store<'_>, (fd, offset): (Resource<Descriptor>, u64)| {
            Box::new(async move {
                let state = store.data_mut();
                let file = charged_file(state, &fd);
                let made = HostDescriptor::write_via_stream(&mut state.filesystem(), fd, offset);
                answer(charge_stream(state, file, Some(offset), made))
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.append-via-stream",
        |mut store: Store<'_>, (fd,): (Resource<Descriptor>,)| {
            Box::new(async move {
                let state = store.data_mut();
                let file = charged_file(state, &fd);
                let made = HostDescriptor::append_via_stream(&mut state.filesystem(), fd);
                answer(charge_stream(state, file, None, made))
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store: Store<'_>,
         (fd, path_flags, path, oflags, flags): (
            Resource<Descriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            Box::new(async move {
                let state = store.data_mut();
                let charge = match before_open(state, oflags) {
                    Ok(charge) => charge,
                    Err(code) => return Ok((Err(code),)),
                };
                let opened =
                    HostDescriptor::open_at(&mut state.filesystem(), fd, path_flags, path, oflags, flags).await;
                after_open(state, charge, opened.as_ref().ok().map(Resource::rep));
                answer(opened)
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Shadows the functions that change the tree but make no resource: a linker whose
/// `open-at` and file-stream constructors are shadowed already (reactors', whose shadows
/// record handles) calls [`before_open`], [`after_open`] and [`charge_stream`] from them.
pub(crate) fn add_tree_shadows(linker: &mut Linker<ProcessState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut types = linker.instance(FILESYSTEM_TYPES)?;
    types.func_wrap_async(
        "[method]descriptor.write",
        |mut store: Store<'_>, (fd, buffer, offset): (Resource<Descriptor>, Vec<u8>, u64)| {
            Box::new(async move {
                let end = offset.saturating_add(buffer.len() as u64);
                let b = borrowed(&fd);
                resize(
                    &mut store,
                    &b,
                    |_| end,
                    async |s: &mut Store<'_>| {
                        HostDescriptor::write(&mut s.data_mut().filesystem(), fd, buffer, offset).await
                    },
                )
                .await
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.set-size",
        |mut store: Store<'_>, (fd, size): (Resource<Descriptor>, u64)| {
            Box::new(async move {
                let b = borrowed(&fd);
                resize(
                    &mut store,
                    &b,
                    |_| size,
                    async |s: &mut Store<'_>| HostDescriptor::set_size(&mut s.data_mut().filesystem(), fd, size).await,
                )
                .await
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.create-directory-at",
        |mut store: Store<'_>, (fd, path): (Resource<Descriptor>, String)| {
            Box::new(async move {
                entry(&mut store, async |s: &mut Store<'_>| {
                    HostDescriptor::create_directory_at(&mut s.data_mut().filesystem(), fd, path).await
                })
                .await
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.symlink-at",
        |mut store: Store<'_>, (fd, old, new): (Resource<Descriptor>, String, String)| {
            Box::new(async move {
                entry(&mut store, async |s: &mut Store<'_>| {
                    HostDescriptor::symlink_at(&mut s.data_mut().filesystem(), fd, old, new).await
                })
                .await
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.link-at",
        |mut store: Store<'_>,
         (fd, flags, old, new_fd, new): (Resource<Descriptor>, PathFlags, String, Resource<Descriptor>, String)| {
            Box::new(async move {
                entry(&mut store, async |s: &mut Store<'_>| {
                    HostDescriptor::link_at(&mut s.data_mut().filesystem(), fd, flags, old, new_fd, new).await
                })
                .await
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.unlink-file-at",
        |mut store: Store<'_>, (fd, path): (Resource<Descriptor>, String)| {
            Box::new(async move {
                freeing(&mut store, async |s: &mut Store<'_>| {
                    HostDescriptor::unlink_file_at(&mut s.data_mut().filesystem(), fd, path).await
                })
                .await
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.remove-directory-at",
        |mut store: Store<'_>, (fd, path): (Resource<Descriptor>, String)| {
            Box::new(async move {
                freeing(&mut store, async |s: &mut Store<'_>| {
                    HostDescriptor::remove_directory_at(&mut s.data_mut().filesystem(), fd, path).await
                })
                .await
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.rename-at",
        |mut store: Store<'_>, (fd, old, new_fd, new): (Resource<Descriptor>, String, Resource<Descriptor>, String)| {
            Box::new(async move {
                freeing(&mut store, async |s: &mut Store<'_>| {
                    HostDescriptor::rename_at(&mut s.data_mut().filesystem(), fd, old, new_fd, new).await
                })
                .await
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}
