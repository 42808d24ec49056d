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
fn charged_file(store: &mut Store<'_>, fd: &Resource<Descriptor>) -> Option<(DiskQuota, Arc<std::fs::File>)> {
    let quota = store.data().disk.clone()?;
    match store.data_mut().ctx().table.get(fd) {
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
    let Some((quota, file)) = charged_file(store, fd) else { return answer(call(store).await) };
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

/// Wraps a file's new output stream in a [`QuotaStream`] when its process has a quota.
fn charge_stream(
    store: &mut Store<'_>,
    file: Option<(DiskQuota, Arc<std::fs::File>)>,
    position: Option<u64>,
    result: FsResult<Resource<DynOutputStream>>,
) -> Answer<Resource<DynOutputStream>> {
    match (result, file) {
        (Ok(stream), Some((quota, file))) => {
            let table = store.data_mut().ctx().table;
            let inner = table.delete(stream)?;
            let charged_to = position.unwrap_or(0);
            let wrapped: DynOutputStream = Box::new(QuotaStream { inner, file, position, charged_to, quota });
            Ok((Ok(table.push(wrapped)?),))
        }
        (result, _) => answer(result),
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
    quota: DiskQuota,
}

impl QuotaStream {
    fn charge(&mut self, bytes: usize) -> StreamResult<()> {
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
fn may_open(store: &mut Store<'_>) -> bool {
    let state = store.data_mut();
    let max = state.max_open_files as usize;
    if state.component_fds.len() < max {
        return true;
    }
    let table = state.wasi.ctx().table;
    state.component_fds.retain(|&rep| table.get(&Resource::<Descriptor>::new_borrow(rep)).is_ok());
    state.component_fds.len() < max
}

/// Shadows the filesystem functions that change the tree in `linker`.
pub(crate) fn add_component_disk_shadows(linker: &mut Linker<ProcessState>) -> wasmtime::Result<()> {
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
        "[method]descriptor.write-via-stream",
        |mut store: Store<'_>, (fd, offset): (Resource<Descriptor>, u64)| {
            Box::new(async move {
                let file = charged_file(&mut store, &fd);
                let result = HostDescriptor::write_via_stream(&mut store.data_mut().filesystem(), fd, offset);
                charge_stream(&mut store, file, Some(offset), result)
            })
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.append-via-stream",
        |mut store: Store<'_>, (fd,): (Resource<Descriptor>,)| {
            Box::new(async move {
                let file = charged_file(&mut store, &fd);
                let result = HostDescriptor::append_via_stream(&mut store.data_mut().filesystem(), fd);
                charge_stream(&mut store, file, None, result)
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
                if !may_open(&mut store) {
                    return Ok((Err(ErrorCode::InsufficientMemory),));
                }
                if oflags.contains(OpenFlags::TRUNCATE)
                    && let Some(quota) = &store.data().disk
                {
                    quota.note_may_have_freed();
                }
                let open = async |s: &mut Store<'_>| {
                    HostDescriptor::open_at(&mut s.data_mut().filesystem(), fd, path_flags, path, oflags, flags).await
                };
                let (result,) = if oflags.contains(OpenFlags::CREATE) {
                    // Counted as a new entry even when the file was there (the count may
                    // be high: a refusal walks the tree first).
                    let charged = entry(&mut store, open).await?;
                    if let Some(quota) = &store.data().disk {
                        quota.note_may_have_freed();
                    }
                    charged
                } else {
                    answer(open(&mut store).await)?
                };
                if let Ok(opened) = &result {
                    store.data_mut().component_fds.insert(opened.rep());
                }
                Ok((result,))
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
