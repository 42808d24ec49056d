//! Reading a quiescent core instance's memories, globals and tables into image form, and
//! writing them into a fresh instance of the same program.
//!
//! State is reached through the exports the load-time rewrite added (see `state_export`).
//! Function references are stored as function indices: the rewrite exports every function
//! a table or global can hold, and a reference is matched to its index by the identity of
//! its `VMFuncRef` (`Func::to_raw`), which is the one the instance's table entries use.

use crate::memory_image::{GlobalValue, IMAGE_PAGE, MemoryImage, TableImage};
use crate::state_export::{self, GlobalKind, StateLayout};
use std::collections::HashMap;
use wasmtime::{AsContextMut, Func, Instance, Memory, Ref, Table, Val};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the instance does not export its snapshot state (`{0}` missing): it was not loaded by Stasis")]
    MissingExport(String),
    #[error("{0} cannot be captured: it holds a reference that is not a function of the module")]
    ForeignReference(String),
    #[error("the image does not match the program: {0}")]
    Mismatch(String),
    #[error("restoring {what}: {reason}")]
    Write { what: String, reason: String },
}

/// The captured state of one instance; memories as (image without part, non-zero pages).
pub(crate) struct CapturedInstance {
    pub memories: Vec<(MemoryImage, Vec<u8>)>,
    pub globals: Vec<GlobalValue>,
    pub tables: Vec<TableImage>,
}

fn memory(store: &mut impl AsContextMut, instance: &Instance, index: u32) -> Result<Memory, StateError> {
    let name = state_export::memory_export(index);
    instance.get_memory(store.as_context_mut(), &name).ok_or(StateError::MissingExport(name))
}

/// The functions a table or global can hold, by index (the rewrite exports them).
fn table_funcs(store: &mut impl AsContextMut, instance: &Instance, layout: &StateLayout) -> HashMap<u32, Func> {
    let mut funcs = HashMap::with_capacity(layout.table_funcs.len());
    for &index in &layout.table_funcs {
        if let Some(func) = instance.get_func(store.as_context_mut(), &state_export::func_export(index)) {
            funcs.insert(index, func);
        }
    }
    funcs
}

/// Function identity (`Func::to_raw`) -> the number a snapshot stores for it.
pub(crate) fn func_numbers<'a>(
    store: &mut impl AsContextMut,
    funcs: impl IntoIterator<Item = (u32, &'a Func)>,
) -> HashMap<usize, u32> {
    let mut numbers = HashMap::new();
    for (number, func) in funcs {
        numbers.entry(func.to_raw(store.as_context_mut()) as usize).or_insert(number);
    }
    numbers
}

/// A memory's image (its part numbered `part`) and its non-zero pages.
pub(crate) fn memory_image(data: &[u8], part: u32) -> (MemoryImage, Vec<u8>) {
    let (runs, pages) = crate::memory_image::nonzero_pages(data);
    (MemoryImage { size_bytes: data.len() as u64, runs, part }, pages)
}

/// A global's value as stored; a function reference by its number in `numbers`.
pub(crate) fn global_value(
    store: &mut impl AsContextMut,
    value: Val,
    numbers: &HashMap<usize, u32>,
    what: &str,
) -> Result<GlobalValue, StateError> {
    Ok(match value {
        Val::I32(v) => GlobalValue::I32(v),
        Val::I64(v) => GlobalValue::I64(v),
        Val::F32(v) => GlobalValue::F32(v),
        Val::F64(v) => GlobalValue::F64(v),
        Val::V128(v) => GlobalValue::V128(v.as_u128()),
        Val::FuncRef(None) | Val::ExternRef(None) | Val::AnyRef(None) | Val::ExnRef(None) | Val::ContRef(None) => {
            GlobalValue::NullRef
        }
        Val::FuncRef(Some(f)) => {
            let raw = f.to_raw(store.as_context_mut()) as usize;
            GlobalValue::Func(*numbers.get(&raw).ok_or_else(|| StateError::ForeignReference(what.to_string()))?)
        }
        _ => return Err(StateError::ForeignReference(what.to_string())),
    })
}

/// A table's size and non-null elements, functions by their number in `numbers`.
pub(crate) fn table_image(
    store: &mut impl AsContextMut,
    table: &Table,
    numbers: &HashMap<usize, u32>,
    what: &str,
) -> Result<TableImage, StateError> {
    let size = table.size(store.as_context_mut());
    let mut elements = Vec::new();
    for i in 0..size {
        match table.get(store.as_context_mut(), i) {
            Some(Ref::Func(None) | Ref::Extern(None) | Ref::Any(None) | Ref::Exn(None)) | None => {}
            Some(Ref::Func(Some(f))) => {
                let raw = f.to_raw(store.as_context_mut()) as usize;
                let number = numbers.get(&raw).ok_or_else(|| StateError::ForeignReference(what.to_string()))?;
                elements.push((i, *number));
            }
            Some(_) => return Err(StateError::ForeignReference(what.to_string())),
        }
    }
    Ok(TableImage { size, elements })
}

pub(crate) fn capture(
    mut store: impl AsContextMut,
    instance: &Instance,
    layout: &StateLayout,
) -> Result<CapturedInstance, StateError> {
    let store = &mut store;
    let mut memories = Vec::with_capacity(layout.memories.len());
    for index in 0..layout.memories.len() as u32 {
        let memory = memory(store, instance, index)?;
        memories.push(memory_image(memory.data(store.as_context_mut()), index));
    }
    let funcs = table_funcs(store, instance, layout);
    let numbers = func_numbers(store, funcs.iter().map(|(&index, func)| (index, func)));
    let mut globals = Vec::with_capacity(layout.globals.len());
    for index in 0..layout.globals.len() {
        let name = state_export::global_export(index as u32);
        let global = instance.get_global(store.as_context_mut(), &name).ok_or(StateError::MissingExport(name))?;
        let value = global.get(store.as_context_mut());
        globals.push(global_value(store, value, &numbers, &format!("global {index}"))?);
    }
    let mut tables = Vec::with_capacity(layout.tables.len());
    for index in 0..layout.tables.len() as u32 {
        let name = state_export::table_export(index);
        let table = instance.get_table(store.as_context_mut(), &name).ok_or(StateError::MissingExport(name))?;
        if layout.tables[index as usize].host_owned {
            tables.push(TableImage { size: table.size(store.as_context_mut()), elements: Vec::new() });
            continue;
        }
        tables.push(table_image(store, &table, &numbers, &format!("table {index}"))?);
    }
    Ok(CapturedInstance { memories, globals, tables })
}

/// The stored (decompressed) pages of part `index` of an image.
pub(crate) fn part(parts: &[Vec<u8>], index: u32) -> Result<&[u8], StateError> {
    parts.get(index as usize).map(Vec::as_slice).ok_or_else(|| StateError::Mismatch(format!("no part {index}")))
}

/// Writes captured state into a fresh instance of the same program (its start function
/// not run); `parts` are the image's decompressed parts.
pub(crate) fn restore(
    mut store: impl AsContextMut,
    instance: &Instance,
    layout: &StateLayout,
    memories: &[MemoryImage],
    parts: &[Vec<u8>],
    globals: &[GlobalValue],
    tables: &[TableImage],
) -> Result<(), StateError> {
    let store = &mut store;
    if memories.len() != layout.memories.len()
        || globals.len() != layout.globals.len()
        || tables.len() != layout.tables.len()
    {
        return Err(StateError::Mismatch(format!(
            "the image has {} memories, {} globals and {} tables; the program {}, {} and {}",
            memories.len(),
            globals.len(),
            tables.len(),
            layout.memories.len(),
            layout.globals.len(),
            layout.tables.len()
        )));
    }
    for (index, image) in memories.iter().enumerate() {
        let index = index as u32;
        let memory = memory(store, instance, index)?;
        // What instantiation wrote (data segments) must go where the image has zeros.
        let clear = |data: &mut [u8], fresh: usize| match &layout.data_ranges {
            Some(ranges) => {
                for (_, range) in ranges.iter().filter(|(m, _)| *m == index) {
                    let end = (range.end as usize).min(data.len());
                    data[(range.start as usize).min(end)..end].fill(0);
                }
            }
            None => data[..fresh].fill(0),
        };
        write_memory(store, &memory, image, part(parts, image.part)?, &format!("memory {index}"), clear)?;
    }
    let funcs = table_funcs(store, instance, layout);
    let func = |index: u32| func_by_index(&funcs, index);
    for (index, (value, info)) in globals.iter().zip(&layout.globals).enumerate() {
        let name = state_export::global_export(index as u32);
        let global = instance.get_global(store.as_context_mut(), &name).ok_or(StateError::MissingExport(name))?;
        let val = match (*value, info.ty) {
            (GlobalValue::I32(v), GlobalKind::I32) => Val::I32(v),
            (GlobalValue::I64(v), GlobalKind::I64) => Val::I64(v),
            (GlobalValue::F32(v), GlobalKind::F32) => Val::F32(v),
            (GlobalValue::F64(v), GlobalKind::F64) => Val::F64(v),
            (GlobalValue::V128(v), GlobalKind::V128) => Val::V128(v.into()),
            (GlobalValue::NullRef, GlobalKind::FuncRef) => Val::FuncRef(None),
            (GlobalValue::Func(i), GlobalKind::FuncRef) => Val::FuncRef(Some(func(i)?)),
            (GlobalValue::NullRef, GlobalKind::OtherRef) => global.get(store.as_context_mut()),
            (value, ty) => {
                return Err(StateError::Mismatch(format!(
                    "global {index} is {ty:?} in the program, {value:?} in the image"
                )));
            }
        };
        if info.mutable {
            global
                .set(store.as_context_mut(), val)
                .map_err(|e| StateError::Write { what: format!("global {index}"), reason: format!("{e:#}") })?;
        } else if !same_value(&global.get(store.as_context_mut()), &val) {
            return Err(StateError::Mismatch(format!("immutable global {index} differs")));
        }
    }
    restore_tables(store, instance, layout, tables)
}

fn func_by_index(funcs: &HashMap<u32, Func>, index: u32) -> Result<Func, StateError> {
    funcs
        .get(&index)
        .cloned()
        .ok_or_else(|| StateError::Mismatch(format!("function {index} cannot be in a table of this program")))
}

/// Sets every table to its captured contents (growing it first).
pub(crate) fn restore_tables(
    mut store: impl AsContextMut,
    instance: &Instance,
    layout: &StateLayout,
    tables: &[TableImage],
) -> Result<(), StateError> {
    let store = &mut store;
    if tables.len() != layout.tables.len() {
        return Err(StateError::Mismatch(format!(
            "the image has {} tables, the program {}",
            tables.len(),
            layout.tables.len()
        )));
    }
    let funcs = table_funcs(store, instance, layout);
    for (index, image) in tables.iter().enumerate() {
        let name = state_export::table_export(index as u32);
        let table = instance.get_table(store.as_context_mut(), &name).ok_or(StateError::MissingExport(name))?;
        let what = format!("table {index}");
        if layout.tables[index].host_owned {
            continue;
        }
        if !layout.tables[index].funcref {
            // Only null references of other types are ever captured: grow, keep nulls.
            let current = table.size(store.as_context_mut());
            if image.size < current {
                return Err(StateError::Mismatch(format!(
                    "{what} has {} elements in the image, fewer than a fresh instance's {current}",
                    image.size
                )));
            }
            if image.size > current {
                let null = table.get(store.as_context_mut(), 0).unwrap_or(Ref::Extern(None));
                table
                    .grow(store.as_context_mut(), image.size - current, null)
                    .map_err(|e| StateError::Write { what: what.clone(), reason: format!("{e:#}") })?;
            }
            continue;
        }
        write_table(store, &table, image, &what, |i| func_by_index(&funcs, i))?;
    }
    Ok(())
}

/// Grows a fresh instance's memory to the image's size, clears what the fresh instance
/// holds (`clear(data, fresh_len)`: the image's zero pages must read as zeros) and copies
/// the stored pages (`bytes`, in run order) in.
pub(crate) fn write_memory(
    store: &mut impl AsContextMut,
    memory: &Memory,
    image: &MemoryImage,
    bytes: &[u8],
    what: &str,
    clear: impl FnOnce(&mut [u8], usize),
) -> Result<(), StateError> {
    let current = grow_to_image(store, memory, image, what)?;
    let data = memory.data_mut(store.as_context_mut());
    clear(data, current as usize);
    write_runs(data, image, bytes).map_err(|reason| StateError::Write { what: what.to_string(), reason })
}

/// Grows a fresh instance's memory to the image's size; returns the size it had.
pub(crate) fn grow_to_image(
    store: &mut impl AsContextMut,
    memory: &Memory,
    image: &MemoryImage,
    what: &str,
) -> Result<u64, StateError> {
    let current = memory.data_size(store.as_context_mut()) as u64;
    let page_size = memory.page_size(store.as_context_mut());
    if image.size_bytes < current || !image.size_bytes.is_multiple_of(page_size) {
        return Err(StateError::Mismatch(format!(
            "{what} is {} bytes in the image, which a fresh instance ({current} bytes, {page_size}-byte pages) cannot have",
            image.size_bytes
        )));
    }
    if image.size_bytes > current {
        memory.grow(store.as_context_mut(), (image.size_bytes - current) / page_size).map_err(|e| {
            StateError::Mismatch(format!("{what} cannot grow to the image's {} bytes: {e:#}", image.size_bytes))
        })?;
    }
    Ok(current)
}

/// Grows a fresh instance's function table to the image's size and sets every element:
/// the image's functions (`func(number)`) and nulls elsewhere.
pub(crate) fn write_table(
    store: &mut impl AsContextMut,
    table: &Table,
    image: &TableImage,
    what: &str,
    func: impl Fn(u32) -> Result<Func, StateError>,
) -> Result<(), StateError> {
    let write_err = |e: wasmtime::Error| StateError::Write { what: what.to_string(), reason: format!("{e:#}") };
    let current = table.size(store.as_context_mut());
    if image.size < current {
        return Err(StateError::Mismatch(format!(
            "{what} has {} elements in the image, fewer than a fresh instance's {current}",
            image.size
        )));
    }
    if image.size > current {
        table.grow(store.as_context_mut(), image.size - current, Ref::Func(None)).map_err(|e| {
            StateError::Mismatch(format!("{what} cannot grow to the image's {} elements: {e:#}", image.size))
        })?;
    }
    let mut next = image.elements.iter().peekable();
    for i in 0..image.size {
        let value = match next.peek() {
            Some(&&(at, number)) if at == i => {
                next.next();
                Ref::Func(Some(func(number)?))
            }
            _ => Ref::Func(None),
        };
        table.set(store.as_context_mut(), i, value).map_err(write_err)?;
    }
    Ok(())
}

/// Copies a memory's stored pages (`bytes`, in run order) to where its runs say.
pub(crate) fn write_runs(data: &mut [u8], image: &MemoryImage, bytes: &[u8]) -> Result<(), String> {
    let mut at = 0usize;
    for &(start, count) in &image.runs {
        let (from, len) = ((start * IMAGE_PAGE) as usize, (count * IMAGE_PAGE) as usize);
        let (Some(dst), Some(src)) = (data.get_mut(from..from + len), bytes.get(at..at + len)) else {
            return Err("a page run is outside the memory or the stored pages".into());
        };
        dst.copy_from_slice(src);
        at += len;
    }
    Ok(())
}

fn same_value(a: &Val, b: &Val) -> bool {
    match (a, b) {
        (Val::I32(x), Val::I32(y)) => x == y,
        (Val::I64(x), Val::I64(y)) => x == y,
        (Val::F32(x), Val::F32(y)) => x == y,
        (Val::F64(x), Val::F64(y)) => x == y,
        (Val::V128(x), Val::V128(y)) => x.as_u128() == y.as_u128(),
        _ => true,
    }
}
