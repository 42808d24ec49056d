//! Reading and writing the state of every core instance inside a component.
//!
//! A component's core instances (its module, the preview1 adapter, the shims that tie
//! them) export nothing the host can reach, so reactor components run on the host's debug
//! engine (see `host::DebugEngine`) and their state is read with `Store::debug_all_instances`
//! and the `debug_memory`/`debug_global`/`debug_table`/`debug_function` accessors. A fresh
//! instance of the same component has the same core instances in the same order, which is
//! what a restore writes into.
//!
//! Function references (in tables: the adapter's and shims' indirect calls) are numbered
//! across the component: every function index space of every instance, in order, and a
//! reference is matched by the identity of its `VMFuncRef` (`Func::to_raw`).

use crate::instance_state::{StateError, write_runs};
use crate::memory_image::{CoreStateImage, GlobalValue, MemoryImage, TableImage};
use std::collections::HashMap;
use wasmtime::{AsContextMut, Func, Instance, Mutability, Ref, Val};

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
    let mut numbers: HashMap<usize, u32> = HashMap::new();
    for (n, func) in all_functions(store, &instances).iter().enumerate() {
        numbers.entry(func.to_raw(store.as_context_mut()) as usize).or_insert(n as u32);
    }
    let mut images = Vec::with_capacity(instances.len());
    let mut pages = Vec::new();
    for (i, instance) in instances.iter().enumerate() {
        let mut state = CoreStateImage { memories: Vec::new(), globals: Vec::new(), tables: Vec::new() };
        let mut index = 0;
        loop {
            if instance.debug_shared_memory(store.as_context_mut(), index).is_some() {
                return Err(StateError::ForeignReference(format!("instance {i}: shared memory {index}")));
            }
            let Some(memory) = instance.debug_memory(store.as_context_mut(), index) else { break };
            let data = memory.data(store.as_context_mut());
            let (runs, bytes) = crate::memory_image::nonzero_pages(data);
            state.memories.push(MemoryImage {
                size_bytes: data.len() as u64,
                runs,
                part: first_part + pages.len() as u32,
            });
            pages.push(bytes);
            index += 1;
        }
        let mut index = 0;
        while let Some(global) = instance.debug_global(store.as_context_mut(), index) {
            let what = || format!("instance {i} global {index}");
            state.globals.push(match global.get(store.as_context_mut()) {
                Val::I32(v) => GlobalValue::I32(v),
                Val::I64(v) => GlobalValue::I64(v),
                Val::F32(v) => GlobalValue::F32(v),
                Val::F64(v) => GlobalValue::F64(v),
                Val::V128(v) => GlobalValue::V128(v.as_u128()),
                Val::FuncRef(None) | Val::ExternRef(None) | Val::AnyRef(None) | Val::ExnRef(None) => {
                    GlobalValue::NullRef
                }
                Val::FuncRef(Some(f)) => {
                    let raw = f.to_raw(store.as_context_mut()) as usize;
                    GlobalValue::Func(*numbers.get(&raw).ok_or_else(|| StateError::ForeignReference(what()))?)
                }
                _ => return Err(StateError::ForeignReference(what())),
            });
            index += 1;
        }
        let mut index = 0;
        while let Some(table) = instance.debug_table(store.as_context_mut(), index) {
            let size = table.size(store.as_context_mut());
            let mut elements = Vec::new();
            for e in 0..size {
                match table.get(store.as_context_mut(), e) {
                    None | Some(Ref::Func(None) | Ref::Extern(None) | Ref::Any(None) | Ref::Exn(None)) => {}
                    Some(Ref::Func(Some(f))) => {
                        let raw = f.to_raw(store.as_context_mut()) as usize;
                        let number = numbers
                            .get(&raw)
                            .ok_or_else(|| StateError::ForeignReference(format!("instance {i} table {index}")))?;
                        elements.push((e, *number));
                    }
                    Some(_) => return Err(StateError::ForeignReference(format!("instance {i} table {index}"))),
                }
            }
            state.tables.push(TableImage { size, elements });
            index += 1;
        }
        images.push(state);
    }
    Ok((images, pages))
}

/// Writes captured state into a fresh instance of the same component.
pub(crate) fn restore(
    mut store: impl AsContextMut,
    images: &[CoreStateImage],
    pages: &(dyn Fn(u32) -> Result<Vec<u8>, StateError> + Sync),
) -> Result<(), StateError> {
    let store = &mut store;
    let instances = store.as_context_mut().debug_all_instances();
    if instances.len() != images.len() {
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
    for (i, (instance, image)) in instances.iter().zip(images).enumerate() {
        for (index, captured) in image.memories.iter().enumerate() {
            let what = format!("instance {i} memory {index}");
            let memory = instance
                .debug_memory(store.as_context_mut(), index as u32)
                .ok_or_else(|| StateError::Mismatch(format!("{what} does not exist")))?;
            let current = memory.data_size(store.as_context_mut()) as u64;
            let page_size = memory.page_size(store.as_context_mut());
            if captured.size_bytes < current || !captured.size_bytes.is_multiple_of(page_size) {
                return Err(StateError::Mismatch(format!("{what}: {} bytes in the image", captured.size_bytes)));
            }
            if captured.size_bytes > current {
                memory
                    .grow(store.as_context_mut(), (captured.size_bytes - current) / page_size)
                    .map_err(|e| StateError::Mismatch(format!("{what} cannot grow: {e:#}")))?;
            }
            let data = memory.data_mut(store.as_context_mut());
            data.fill(0);
            write_runs(data, captured, &pages(captured.part)?).map_err(|reason| StateError::Write { what, reason })?;
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
            let current = table.size(store.as_context_mut());
            if captured.size > current {
                table
                    .grow(store.as_context_mut(), captured.size - current, Ref::Func(None))
                    .map_err(|e| StateError::Mismatch(format!("{what} cannot grow: {e:#}")))?;
            }
            let mut next = captured.elements.iter().peekable();
            for e in 0..captured.size {
                let value = match next.peek() {
                    Some(&&(at, n)) if at == e => {
                        next.next();
                        Ref::Func(Some(func(n)?))
                    }
                    _ => Ref::Func(None),
                };
                table
                    .set(store.as_context_mut(), e, value)
                    .map_err(|err| StateError::Write { what: what.clone(), reason: format!("{err:#}") })?;
            }
        }
    }
    Ok(())
}
