//! Linear memories the host can reach, for instances that export none (a component's
//! core instances).
//!
//! A component's core instances export nothing the host could read, and wasmtime only
//! offers their state through `guest_debug` (an engine that runs CPU-bound code 2.8x
//! slower). But an engine can be given a memory creator ([`MemoryRegistry`]): every
//! linear memory its instances define is then allocated here, and the host keeps a handle
//! to it ([`HostMemory`]). Which instantiation a memory belongs to is decided by who is
//! polling: [`MemoryRegistry::collect`] wraps an instantiation's future and attributes to
//! it the memories created while it is polled (memory creation is synchronous inside a
//! poll, on the polling thread, even when wasmtime runs the instantiation on a fiber), in
//! creation order: core instances in instantiation order, each one's defined memories in
//! index order.
//!
//! The cost: an engine with a memory creator cannot initialise memories from
//! copy-on-write images, so data segments are copied at every instantiation (measured on
//! componentize-py's CPython, 12 MB of memory: 10.3 ms against 0.87 ms).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

thread_local! {
    /// The memories of the instantiation being polled on this thread, if one is collected.
    static COLLECTING: RefCell<Option<Arc<Mutex<Collection>>>> = const { RefCell::new(None) };
}

#[derive(Default)]
struct Collection {
    created: Vec<HostMemory>,
    /// Bytes each memory starts with, in creation order, when more than its minimum (a
    /// restore makes memories at their captured size: wasmtime reads a memory's size
    /// from it once, so one cannot be grown behind its back later).
    sizes: Vec<usize>,
}

/// The engine's memory creator (`Config::with_host_memory`); engines using it must turn
/// off `memory_init_cow`.
#[derive(Clone, Default)]
pub struct MemoryRegistry;

impl MemoryRegistry {
    /// Runs `instantiation`, and answers with its output and the memories it created.
    pub async fn collect<F: Future>(&self, instantiation: F) -> (F::Output, Vec<HostMemory>) {
        self.collect_sized(instantiation, Vec::new()).await
    }

    /// [`MemoryRegistry::collect`], the k-th memory created starting with `sizes[k]`
    /// bytes when that is more than its minimum (the caller checks them against its
    /// limits first; past a memory's reservation, creating it fails).
    pub async fn collect_sized<F: Future>(&self, instantiation: F, sizes: Vec<usize>) -> (F::Output, Vec<HostMemory>) {
        let created = Arc::new(Mutex::new(Collection { created: Vec::new(), sizes }));
        let output = Collecting { inner: Box::pin(instantiation), created: created.clone() }.await;
        let memories = std::mem::take(&mut created.lock().unwrap().created);
        (output, memories)
    }
}

struct Collecting<F: Future> {
    inner: Pin<Box<F>>,
    created: Arc<Mutex<Collection>>,
}

impl<F: Future> Future for Collecting<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let previous = COLLECTING.with(|c| c.replace(Some(self.created.clone())));
        let poll = self.inner.as_mut().poll(cx);
        COLLECTING.with(|c| *c.borrow_mut() = previous);
        poll
    }
}

/// One mapping: the reservation and its guard, unmapped when the last of the linear
/// memory and the host's handles is gone.
struct Region {
    ty: MemoryType,
    base: *mut u8,
    reserved: usize,
    /// Bytes accessible now (wasm's size).
    size: AtomicUsize,
}

// The mapping is plain memory; access is coordinated by the store (see `HostMemory`).
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the whole reservation was mapped by `new_memory` and nothing else uses it.
        unsafe {
            let _ = rustix::mm::munmap(self.base.cast(), self.reserved);
        }
    }
}

/// A host handle to a linear memory an instance defined.
#[derive(Clone)]
pub struct HostMemory {
    region: Arc<Region>,
    /// Bytes it was created with.
    initial: usize,
}

impl HostMemory {
    /// The memory's type, as its module declared it.
    pub fn ty(&self) -> &MemoryType {
        &self.region.ty
    }

    /// Bytes the memory was created with (its minimum, or the size a restore asked for).
    pub fn initial_size(&self) -> usize {
        self.initial
    }

    /// Bytes the memory has now.
    pub fn size(&self) -> usize {
        self.region.size.load(Ordering::Acquire)
    }

    /// A copy of `len` bytes at `offset`; `None` past the memory's end.
    ///
    /// Call only while no wasm of its store runs (between calls, or from a host function
    /// or epoch callback of that store): the guest writes the memory without telling.
    pub fn read(&self, offset: usize, len: usize) -> Option<Vec<u8>> {
        let end = offset.checked_add(len).filter(|&end| end <= self.size())?;
        // SAFETY: within the accessible part of a live mapping; see the caller's duty.
        Some(unsafe { std::slice::from_raw_parts(self.region.base.add(offset), end - offset) }.to_vec())
    }

    /// Runs `f` over the whole memory, in place (no copy). Same duty as `read`, for as
    /// long as `f` runs.
    pub fn with_contents<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        // SAFETY: the accessible part of a live mapping; see `read` for who may touch it.
        f(unsafe { std::slice::from_raw_parts(self.region.base, self.size()) })
    }

    /// Writes `bytes` at `offset`; `false` past the memory's end. Same duty as `read`.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> bool {
        let Some(end) = offset.checked_add(bytes.len()).filter(|&end| end <= self.size()) else { return false };
        // SAFETY: within the accessible part of a live mapping; see `read`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.region.base.add(offset), end - offset) };
        true
    }
}

impl HostMemory {
    /// Zeroes the whole memory (its pages go back to the kernel). Same duty as `read`.
    pub fn clear(&self) -> std::io::Result<()> {
        let size = self.size();
        if size == 0 {
            return Ok(());
        }
        // SAFETY: the accessible part of a private anonymous mapping, which reads as zeros
        // once its pages are dropped; see `read` for who may touch it.
        unsafe { rustix::mm::madvise(self.region.base.cast(), size, rustix::mm::Advice::LinuxDontNeed) }?;
        Ok(())
    }
}

impl HostMemory {
    /// Maps `file` (exactly the memory's size) over the whole memory, copy-on-write: its
    /// pages are shared with every other mapping of the file until written. Same duty as
    /// `read`; [`HostMemory::clear`] then brings the file's contents back, not zeros.
    pub fn map(&self, file: &std::fs::File) -> std::io::Result<()> {
        let size = self.size();
        if file.metadata()?.len() != size as u64 {
            return Err(std::io::Error::other("the file is not the memory's size"));
        }
        if size == 0 {
            return Ok(());
        }
        if !size.is_multiple_of(rustix::param::page_size()) {
            return Err(std::io::Error::other("the memory is not a whole number of host pages"));
        }
        // SAFETY: the accessible part of our own reservation, a whole number of host pages
        // from its page-aligned base; nothing holds a reference into its contents.
        unsafe { map_private(self.region.base, size, file) }
    }
}

/// Maps the first `len` bytes of `file` over `at..at + len`, readable, writable and
/// private (a write copies the page; the file never changes).
///
/// # Safety
/// `at..at + len` must be whole host pages of a mapping the caller owns, that nothing
/// else reads or writes while this runs and whose old contents nothing refers to.
pub(crate) unsafe fn map_private(at: *mut u8, len: usize, file: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: the caller's duty above.
    unsafe {
        rustix::mm::mmap(
            at.cast(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::FIXED,
            file,
            0,
        )
    }?;
    Ok(())
}

struct Linear {
    region: Arc<Region>,
    /// Bytes that may ever be accessible (the reservation without the guard).
    capacity: usize,
}

unsafe impl LinearMemory for Linear {
    fn byte_size(&self) -> usize {
        self.region.size.load(Ordering::Acquire)
    }

    fn byte_capacity(&self) -> usize {
        self.capacity
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        if new_size > self.capacity {
            wasmtime::bail!("a memory of {new_size} bytes is past its reservation of {}", self.capacity);
        }
        let old = self.byte_size();
        if new_size > old {
            // SAFETY: pages of our own reservation.
            unsafe {
                rustix::mm::mprotect(
                    self.region.base.add(old).cast(),
                    new_size - old,
                    rustix::mm::MprotectFlags::READ | rustix::mm::MprotectFlags::WRITE,
                )?;
            }
        }
        self.region.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.region.base
    }
}

/// Reservation for a memory wasmtime gives no size for (a 32-bit memory's address space).
const DEFAULT_RESERVATION: usize = 4 << 30;

unsafe impl MemoryCreator for MemoryRegistry {
    fn new_memory(
        &self,
        ty: MemoryType,
        minimum: usize,
        _maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        let capacity = reserved_size_in_bytes.unwrap_or(DEFAULT_RESERVATION);
        let reserved = capacity.checked_add(guard_size_in_bytes).ok_or("a memory reservation overflows")?;
        // SAFETY: a fresh anonymous mapping, inaccessible until grown into.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                reserved,
                rustix::mm::ProtFlags::empty(),
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE,
            )
        }
        .map_err(|e| format!("reserving {reserved} bytes for a linear memory: {e}"))?;
        let declared = ty.maximum().map(|pages| pages.saturating_mul(ty.page_size()));
        let region = Arc::new(Region { ty, base: base.cast(), reserved, size: AtomicUsize::new(0) });
        let mut memory = Linear { region: region.clone(), capacity };
        let collection = COLLECTING.with(|c| c.borrow().clone());
        let planned = collection.as_ref().and_then(|c| {
            let c = c.lock().unwrap();
            c.sizes.get(c.created.len()).copied()
        });
        let size = planned.unwrap_or(0).max(minimum);
        if let Some(max) = declared.filter(|&max| size as u64 > max) {
            return Err(format!("a memory of {size} bytes is past its declared maximum ({max} bytes)"));
        }
        if size > 0 {
            memory.grow_to(size).map_err(|e| format!("{e:#}"))?;
        }
        if let Some(collection) = collection {
            collection.lock().unwrap().created.push(HostMemory { region, initial: size });
        }
        Ok(Box::new(memory))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A file mapped over a memory the host made: the guest reads the file's bytes, its
    /// writes stay private to the memory, and growing past the mapping gives zeros.
    #[tokio::test]
    async fn a_mapped_file_is_the_memory_copy_on_write_and_growth_past_it_is_zeros() {
        let mut config = wasmtime::Config::new();
        config.with_host_memory(Arc::new(MemoryRegistry)).memory_init_cow(false);
        let engine = wasmtime::Engine::new(&config).unwrap();
        let wasm = wat::parse_str(
            r#"(module
                 (memory (export "memory") 2)
                 (func (export "load") (param i32) (result i32) local.get 0 i32.load)
                 (func (export "store") (param i32 i32) local.get 0 local.get 1 i32.store)
                 (func (export "grow") (param i32) (result i32) local.get 0 memory.grow))"#,
        )
        .unwrap();
        let module = wasmtime::Module::new(&engine, wasm).unwrap();
        let mut store = wasmtime::Store::new(&engine, ());
        let (instance, memories) =
            MemoryRegistry.collect(async { wasmtime::Instance::new(&mut store, &module, &[]) }).await;
        let instance = instance.unwrap();
        let [memory] = &memories[..] else { panic!("one memory, got {}", memories.len()) };

        let file = tempfile::tempfile().unwrap();
        file.set_len(2 << 16).unwrap();
        file.write_all_at(&0x1234_5678u32.to_le_bytes(), 100).unwrap();
        file.write_all_at(&7u32.to_le_bytes(), (2 << 16) - 4).unwrap();
        memory.map(&file).unwrap();

        let load = instance.get_typed_func::<i32, i32>(&mut store, "load").unwrap();
        let store_fn = instance.get_typed_func::<(i32, i32), ()>(&mut store, "store").unwrap();
        let grow = instance.get_typed_func::<i32, i32>(&mut store, "grow").unwrap();
        assert_eq!(load.call(&mut store, 100).unwrap(), 0x1234_5678);
        assert_eq!(load.call(&mut store, (2 << 16) - 4).unwrap(), 7);
        store_fn.call(&mut store, (100, 99)).unwrap();
        assert_eq!(load.call(&mut store, 100).unwrap(), 99);
        let mut word = [0u8; 4];
        file.read_exact_at(&mut word, 100).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0x1234_5678, "a guest write reached the file");

        assert_eq!(grow.call(&mut store, 1).unwrap(), 2);
        assert_eq!(load.call(&mut store, 2 << 16).unwrap(), 0);
        store_fn.call(&mut store, ((3 << 16) - 4, 5)).unwrap();
        assert_eq!(load.call(&mut store, (3 << 16) - 4).unwrap(), 5);
        assert_eq!(load.call(&mut store, (2 << 16) - 4).unwrap(), 7);

        // A file of another size is refused, the memory untouched.
        let short = tempfile::tempfile().unwrap();
        short.set_len(1 << 16).unwrap();
        assert!(memory.map(&short).is_err());
        assert_eq!(load.call(&mut store, 100).unwrap(), 99);
    }
}
