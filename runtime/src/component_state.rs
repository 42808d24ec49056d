//! Reading and writing the state of every core instance inside a component.
//!
//! A component's core instances (its module, the preview1 adapter, the shims that tie
//! them) export nothing the host can reach, so reactor components run on the host's debug
//! engine (see `host::DEBUG_SETTINGS`) and their state is read with `Store::debug_all_instances`
//! and the `debug_memory`/`debug_global`/`debug_table`/`debug_function` accessors. A fresh
//! instance of the same component has the same core instances in the same order, which is
//! what a restore writes into.
//!
//! Function references (in tables: the adapter's and shims' indirect calls) are numbered
//! across the component: every function index space of every instance, in order, and a
//! reference is matched by the identity of its `VMFuncRef` (`Func::to_raw`).

use crate::instance_state::{
    StateError, func_numbers, global_value, memory_image, part, table_image, write_memory, write_table,
};
use crate::memory_image::{CoreStateImage, GlobalValue, MemoryImage};
use std::collections::{HashMap, HashSet};
use wasmtime::{AsContextMut, Func, Instance, Mutability, Val};

/// Every function of every instance, in numbering order.
fn all_functions(store: &mut impl AsContextMut, instances: &[Instance]) -> Vec<Func> {
    let mut funcs = Vec::new();
    for instance in instances {
        let mut index = 0;
        while let Some(func) = instance.debug_function(store.as_context_mut(), index) {
            funcs.push(func);
            index += 1;
        }
    }
    funcs
}

/// The captured state of every core instance, and each memory's non-zero pages (in
/// instance, then memory order; `part` numbers follow from `first_part`).
pub(crate) fn capture(
    mut store: impl AsContextMut,
    first_part: u32,
) -> Result<(Vec<CoreStateImage>, Vec<Vec<u8>>), StateError> {
    let store = &mut store;
    let instances = store.as_context_mut().debug_all_instances();
    let funcs = all_functions(store, &instances);
    let numbers = func_numbers(store, funcs.iter().enumerate().map(|(n, func)| (n as u32, func)));
    let mut images = Vec::with_capacity(instances.len());
    let mut pages = Vec::new();
    // A memory one instance exports and others import is captured once; every instance's
    // image of it names the same part.
    let mut captured: HashMap<u64, MemoryImage> = HashMap::new();
    for (i, instance) in instances.iter().enumerate() {
        let mut state = CoreStateImage { memories: Vec::new(), globals: Vec::new(), tables: Vec::new() };
        let mut index = 0;
        loop {
            if instance.debug_shared_memory(store.as_context_mut(), index).is_some() {
                return Err(StateError::ForeignReference(format!("instance {i}: shared memory {index}")));
            }
            let Some(memory) = instance.debug_memory(store.as_context_mut(), index) else { break };
            let image = match captured.get(&memory.debug_index_in_store()) {
                Some(image) => image.clone(),
                None => {
                    let (image, bytes) =
                        memory_image(memory.data(store.as_context_mut()), first_part + pages.len() as u32);
                    pages.push(bytes);
                    captured.insert(memory.debug_index_in_store(), image.clone());
                    image
                }
            };
            state.memories.push(image);
            index += 1;
        }
        let mut index = 0;
        while let Some(global) = instance.debug_global(store.as_context_mut(), index) {
            let value = global.get(store.as_context_mut());
            state.globals.push(global_value(store, value, &numbers, &format!("instance {i} global {index}"))?);
            index += 1;
        }
        let mut index = 0;
        while let Some(table) = instance.debug_table(store.as_context_mut(), index) {
            state.tables.push(table_image(store, &table, &numbers, &format!("instance {i} table {index}"))?);
            index += 1;
        }
        images.push(state);
    }
    Ok((images, pages))
}

/// Writes captured state into a fresh instance of the same component; `parts` are the
/// image's decompressed parts. Memories are written only when `memories` is set (a
/// copy-on-write restore instantiated them with the image's contents already).
pub(crate) fn restore(
    mut store: impl AsContextMut,
    images: &[CoreStateImage],
    parts: &[Vec<u8>],
    memories: bool,
) -> Result<(), StateError> {
    let store = &mut store;
    let instances = store.as_context_mut().debug_all_instances();
    // Images from before the handle exports (format 1.1) lack their instance, which is
    // last and has no state.
    let surplus_has_state = instances.get(images.len()..).is_none_or(|surplus| {
        surplus.iter().any(|i| {
            i.debug_memory(store.as_context_mut(), 0).is_some()
                || i.debug_global(store.as_context_mut(), 0).is_some()
                || i.debug_table(store.as_context_mut(), 0).is_some()
        })
    });
    if surplus_has_state {
        return Err(StateError::Mismatch(format!(
            "the image has {} core instances, the component {}",
            images.len(),
            instances.len()
        )));
    }
    let funcs = all_functions(store, &instances);
    let func = |n: u32| {
        funcs.get(n as usize).cloned().ok_or_else(|| StateError::Mismatch(format!("no function {n} in the component")))
    };
    let mut written = HashSet::new();
    for (i, (instance, image)) in instances.iter().zip(images).enumerate() {
        for (index, captured) in image.memories.iter().enumerate().filter(|_| memories) {
            let what = format!("instance {i} memory {index}");
            let memory = instance
                .debug_memory(store.as_context_mut(), index as u32)
                .ok_or_else(|| StateError::Mismatch(format!("{what} does not exist")))?;
            if !written.insert(memory.debug_index_in_store()) {
                continue;
            }
            let bytes = part(parts, captured.part)?;
            // Only what the fresh instance had can be non-zero: grown pages start zeroed.
            write_memory(store, &memory, captured, bytes, &what, |data, fresh| data[..fresh].fill(0))?;
        }
        for (index, value) in image.globals.iter().enumerate() {
            let what = format!("instance {i} global {index}");
            let global = instance
                .debug_global(store.as_context_mut(), index as u32)
                .ok_or_else(|| StateError::Mismatch(format!("{what} does not exist")))?;
            if global.ty(store.as_context_mut()).mutability() == Mutability::Const {
                continue;
            }
            let val = match *value {
                GlobalValue::I32(v) => Val::I32(v),
                GlobalValue::I64(v) => Val::I64(v),
                GlobalValue::F32(v) => Val::F32(v),
                GlobalValue::F64(v) => Val::F64(v),
                GlobalValue::V128(v) => Val::V128(v.into()),
                GlobalValue::NullRef => Val::FuncRef(None),
                GlobalValue::Func(n) => Val::FuncRef(Some(func(n)?)),
            };
            global.set(store.as_context_mut(), val).map_err(|e| StateError::Mismatch(format!("{what}: {e:#}")))?;
        }
        for (index, captured) in image.tables.iter().enumerate() {
            let what = format!("instance {i} table {index}");
            let table = instance
                .debug_table(store.as_context_mut(), index as u32)
                .ok_or_else(|| StateError::Mismatch(format!("{what} does not exist")))?;
            write_table(store, &table, captured, &what, func)?;
        }
    }
    Ok(())
}
