//! Copy-on-write restore for components: an image's memories are mapped into a fresh
//! instance, not copied.
//!
//! Core programs get their image as a state module whose data wasmtime maps
//! (`cow_restore`). That cannot work for components: checkpointable ones run on the engine
//! whose memories the host makes (`host_memory`), the others (reactors that cannot be
//! checkpointable) on the guest_debug engine, which deep-copies a compiled artifact, data
//! included, into every store (wasmtime 48, `StoreCode::new`), so data that held the
//! snapshot would be copied at every restore (measured: 64 MiB took 85 ms to instantiate,
//! as long as copying it in). Instead each captured memory is laid out once per opened
//! snapshot in a memfd (its non-zero pages at their offsets, holes elsewhere), and every
//! restore maps that file `MAP_PRIVATE` over the fresh instance's linear memory: the
//! kernel shares the pages between all restores and forks of the snapshot, and copies a
//! page only when one of them writes it ([`MemoryFiles`] for checkpointable components,
//! mapped by `HostMemory::map`; [`ComponentMemories`] on the debug engine).
//!
//! Why mapping over memory wasmtime owns is sound on the debug engine: it allocates on
//! demand (no pooling, see `host::DEBUG_SETTINGS`), so every linear memory is its own mmap
//! reservation, unmapped whole when its instance is dropped, never handed to another
//! instance; the mapping covers exactly the memory's accessible bytes (whole wasm pages,
//! so host-page aligned), and growing the memory later only changes the protection of
//! pages past it. Shared memories are never captured.

use crate::instance_state::{StateError, grow_to_image};
use crate::memory_image::{CoreStateImage, MemoryImage};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use wasmtime::AsContextMut;

/// The memories of one debug-engine component image, each in a file ready to be mapped.
pub(crate) struct ComponentMemories {
    /// By core instance, then memory index (an imported memory shares its exporter's file).
    files: Vec<Vec<Arc<std::fs::File>>>,
}

impl ComponentMemories {
    /// Lays out every memory of `instances` in a memfd; `parts` are the image's
    /// decompressed parts.
    pub(crate) fn prepare(instances: &[CoreStateImage], parts: &[Vec<u8>]) -> std::io::Result<ComponentMemories> {
        let mut layouts = Layouts { parts, laid_out: HashMap::new() };
        let files = instances
            .iter()
            .map(|instance| instance.memories.iter().map(|image| layouts.file(image)).collect())
            .collect::<std::io::Result<_>>()?;
        Ok(ComponentMemories { files })
    }

    /// Maps the image's memories over those of a fresh instance of the component (in
    /// `store`), growing each to its captured size first.
    pub(crate) fn map(&self, mut store: impl AsContextMut, images: &[CoreStateImage]) -> Result<(), StateError> {
        let store = &mut store;
        let instances = store.as_context_mut().debug_all_instances();
        let mut mapped = HashSet::new();
        for (i, ((instance, image), files)) in instances.iter().zip(images).zip(&self.files).enumerate() {
            for (index, (captured, file)) in image.memories.iter().zip(files).enumerate() {
                let what = format!("instance {i} memory {index}");
                let memory = instance
                    .debug_memory(store.as_context_mut(), index as u32)
                    .ok_or_else(|| StateError::Mismatch(format!("{what} does not exist")))?;
                grow_to_image(store, &memory, captured, &what)?;
                let data = memory.data_mut(store.as_context_mut());
                if data.len() as u64 != captured.size_bytes {
                    return Err(StateError::Mismatch(format!("{what} did not grow to the image's size")));
                }
                if !mapped.insert(data.as_ptr() as usize) || data.is_empty() {
                    continue;
                }
                // SAFETY: see the module docs: `data` is the whole accessible part of an
                // unshared linear memory in its own reservation, page-aligned and a whole
                // number of pages long; nothing else refers to its contents now.
                let at = unsafe { crate::host_memory::map_private(data.as_mut_ptr(), data.len(), file) };
                at.map_err(|e| StateError::Write { what: what.clone(), reason: format!("mapping the image: {e}") })?;
            }
        }
        Ok(())
    }
}

/// The memories of a checkpointable component's image (`component_checkpoint`: a stopped
/// command or an idle reactor), in creation order, each in a file its restores map over
/// the memory the host made for it (`HostMemory::map`).
pub(crate) struct MemoryFiles {
    files: Vec<Arc<std::fs::File>>,
}

impl MemoryFiles {
    pub(crate) fn prepare(memories: &[MemoryImage], parts: &[Vec<u8>]) -> std::io::Result<MemoryFiles> {
        let mut layouts = Layouts { parts, laid_out: HashMap::new() };
        let files = memories.iter().map(|image| layouts.file(image)).collect::<std::io::Result<_>>()?;
        Ok(MemoryFiles { files })
    }

    /// The file of the k-th memory.
    pub(crate) fn file(&self, k: usize) -> Option<&std::fs::File> {
        self.files.get(k).map(|file| &**file)
    }
}

/// Memfds of an image's memories, one per part: a memory seen through several instances
/// names one part (validation checked that its views agree), and is laid out once.
struct Layouts<'a> {
    parts: &'a [Vec<u8>],
    laid_out: HashMap<u32, Arc<std::fs::File>>,
}

impl Layouts<'_> {
    fn file(&mut self, image: &MemoryImage) -> std::io::Result<Arc<std::fs::File>> {
        if let Some(file) = self.laid_out.get(&image.part) {
            return Ok(file.clone());
        }
        let bytes = self.parts.get(image.part as usize).map(Vec::as_slice).unwrap_or_default();
        let file = Arc::new(lay_out(image, bytes)?);
        self.laid_out.insert(image.part, file.clone());
        Ok(file)
    }
}

/// A memfd the size of `image`'s memory holding its stored pages at their offsets.
fn lay_out(image: &MemoryImage, bytes: &[u8]) -> std::io::Result<std::fs::File> {
    use crate::memory_image::IMAGE_PAGE;
    let fd = rustix::fs::memfd_create("stasis-memory-image", rustix::fs::MemfdFlags::CLOEXEC)?;
    let file = std::fs::File::from(fd);
    file.set_len(image.size_bytes)?;
    let mut at = 0usize;
    for &(start, count) in &image.runs {
        let len = (count * IMAGE_PAGE) as usize;
        let run =
            bytes.get(at..at + len).ok_or_else(|| std::io::Error::other("a page run is past the stored pages"))?;
        file.write_all_at(run, start * IMAGE_PAGE)?;
        at += len;
    }
    Ok(file)
}
