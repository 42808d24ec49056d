//! Copy-on-write restore: the snapshot's memory becomes a module's data, mapped, not copied.
//!
//! Copying a 64 MiB memory into a fresh instance takes ~32 ms here; wasmtime instead maps
//! a module's data segments copy-on-write from a memory image, in microseconds, and
//! instances of the same module share the unchanged pages (DESIGN.md section 3). So each
//! process of an image becomes two modules, as Wizer does for its snapshots:
//! - a **state module**, generated per image: it defines the process's memories (its
//!   non-zero pages as data segments), globals (the captured values as initializers) and
//!   tables, and exports them; it has no code, so compiling it is cheap, and compiling it
//!   once per opened snapshot makes every restore and fork a mapping;
//! - the program's **resume variant**, generated once per program: the rewritten module
//!   (see `state_export`) with every memory, global and table turned into an import from
//!   the state module (indices are kept: they are appended after the original imports, in
//!   order), and its active data segments emptied so instantiation does not write over the
//!   snapshot. An emptied active segment becomes an empty passive one, which `memory.init`
//!   treats as the dropped segment it would have been.
//!
//! Programs this cannot express fall back to the copying restore (`instance_state`):
//! imported memories, globals or tables, shared or custom-page-size memories, and
//! non-null reference globals (a state module has no functions to point at).

use crate::memory_image::{GlobalValue, IMAGE_PAGE, InstanceImage, MemoryImage};
use crate::state_export::StateLayout;
use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasm_encoder::{
    ConstExpr, DataSection, EntityType, ExportKind, ExportSection, GlobalSection, GlobalType, ImportSection,
    MemorySection, MemoryType, RawSection, TableSection, TableType, ValType,
};
use wasmparser::{Parser, Payload};

/// Module name of the state imports.
pub const STATE_MODULE: &str = "stasis:state";

pub fn memory_import(index: u32) -> String {
    format!("memory{index}")
}

pub fn global_import(index: u32) -> String {
    format!("global{index}")
}

pub fn table_import(index: u32) -> String {
    format!("table{index}")
}

/// Whether a program's state can be restored copy-on-write.
pub fn supported(layout: &StateLayout) -> bool {
    layout.memories.iter().all(|m| !m.imported && !m.shared && m.page_size_log2.is_none())
        && layout.globals.iter().all(|g| !g.imported)
        && layout.tables.iter().all(|t| !t.imported)
}

/// The types of a program's state, as the state module must declare them.
#[derive(Debug, Clone, Default)]
pub struct StateShape {
    pub memories: Vec<MemoryType>,
    pub globals: Vec<GlobalType>,
    pub tables: Vec<TableType>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("malformed module: {0}")]
    Malformed(#[from] wasmparser::BinaryReaderError),
    #[error("cannot re-encode the module: {0}")]
    Reencode(#[from] wasm_encoder::reencode::Error),
}

/// The resume variant of a module already rewritten by `state_export` (see module docs),
/// and the shape of its state; the caller has checked [`supported`].
pub fn resume_variant(rewritten: &[u8]) -> Result<(Vec<u8>, StateShape), ResumeError> {
    let mut reencoder = RoundtripReencoder;
    // Definitions come after the import section, but their imports go into it.
    let mut shape = StateShape::default();
    for payload in Parser::new(0).parse_all(rewritten) {
        match payload? {
            Payload::TableSection(reader) => {
                for table in reader {
                    shape.tables.push(reencoder.table_type(table?.ty)?);
                }
            }
            Payload::MemorySection(reader) => {
                for memory in reader {
                    shape.memories.push(reencoder.memory_type(memory?)?);
                }
            }
            Payload::GlobalSection(reader) => {
                for global in reader {
                    shape.globals.push(reencoder.global_type(global?.ty)?);
                }
            }
            _ => {}
        }
    }
    let mut state_imports: Vec<(String, EntityType)> = Vec::new();
    state_imports.extend(shape.tables.iter().enumerate().map(|(i, t)| (table_import(i as u32), EntityType::Table(*t))));
    state_imports
        .extend(shape.memories.iter().enumerate().map(|(i, m)| (memory_import(i as u32), EntityType::Memory(*m))));
    state_imports
        .extend(shape.globals.iter().enumerate().map(|(i, g)| (global_import(i as u32), EntityType::Global(*g))));
    let write_imports = |module: &mut wasm_encoder::Module, mut imports: ImportSection| {
        for (name, ty) in &state_imports {
            imports.import(STATE_MODULE, name, *ty);
        }
        module.section(&imports);
    };

    let mut module = wasm_encoder::Module::new();
    let mut imports_written = false;
    for payload in Parser::new(0).parse_all(rewritten) {
        let payload = payload?;
        let Some((id, range)) = payload.as_section() else { continue };
        if !imports_written && id != 0 && id != 1 && !matches!(payload, Payload::ImportSection(_)) {
            // The module imports nothing: the state imports get a section of their own.
            write_imports(&mut module, ImportSection::new());
            imports_written = true;
        }
        match payload {
            Payload::ImportSection(reader) => {
                let mut imports = ImportSection::new();
                for import in reader.into_imports() {
                    let import = import?;
                    imports.import(import.module, import.name, reencoder.entity_type(import.ty)?);
                }
                write_imports(&mut module, imports);
                imports_written = true;
            }
            Payload::TableSection(_) | Payload::MemorySection(_) | Payload::GlobalSection(_) => {}
            Payload::DataSection(reader) => {
                module.section(&emptied_data(reader)?);
            }
            _ => {
                module.section(&RawSection { id, data: &rewritten[range] });
            }
        }
    }
    if !imports_written {
        write_imports(&mut module, ImportSection::new());
    }
    Ok((module.finish(), shape))
}

/// The state module of one captured instance; `None` when the captured state cannot be
/// expressed as one (then the copying restore is used). `parts` are the image's
/// decompressed parts (a memory's stored pages in run order).
pub fn state_module(
    shape: &StateShape,
    layout: &StateLayout,
    image: &InstanceImage,
    parts: &[Vec<u8>],
) -> Option<Vec<u8>> {
    if image.memories.len() != shape.memories.len()
        || image.globals.len() != shape.globals.len()
        || image.tables.len() != shape.tables.len()
        || !supported(layout)
    {
        return None;
    }
    const WASM_PAGE: u64 = 65536;
    let mut module = wasm_encoder::Module::new();
    let mut exports = ExportSection::new();
    let mut tables = TableSection::new();
    for (i, (ty, captured)) in shape.tables.iter().zip(&image.tables).enumerate() {
        if ty.maximum.is_some_and(|max| captured.size > max) {
            return None;
        }
        tables.table(TableType { minimum: captured.size, ..*ty });
        exports.export(&table_import(i as u32), ExportKind::Table, i as u32);
    }
    let mut memories = MemorySection::new();
    for (i, (ty, captured)) in shape.memories.iter().zip(&image.memories).enumerate() {
        let pages = captured.size_bytes / WASM_PAGE;
        if !captured.size_bytes.is_multiple_of(WASM_PAGE) || ty.maximum.is_some_and(|max| pages > max) {
            return None;
        }
        memories.memory(MemoryType { minimum: pages, ..*ty });
        exports.export(&memory_import(i as u32), ExportKind::Memory, i as u32);
    }
    let mut globals = GlobalSection::new();
    for (i, (ty, value)) in shape.globals.iter().zip(&image.globals).enumerate() {
        let init = match (value, ty.val_type) {
            (GlobalValue::I32(v), ValType::I32) => ConstExpr::i32_const(*v),
            (GlobalValue::I64(v), ValType::I64) => ConstExpr::i64_const(*v),
            (GlobalValue::F32(v), ValType::F32) => ConstExpr::f32_const(f32::from_bits(*v).into()),
            (GlobalValue::F64(v), ValType::F64) => ConstExpr::f64_const(f64::from_bits(*v).into()),
            (GlobalValue::V128(v), ValType::V128) => ConstExpr::v128_const(*v as i128),
            (GlobalValue::NullRef, ValType::Ref(r)) => ConstExpr::ref_null(r.heap_type),
            _ => return None,
        };
        globals.global(*ty, &init);
        exports.export(&global_import(i as u32), ExportKind::Global, i as u32);
    }
    let mut data = DataSection::new();
    for (i, captured) in image.memories.iter().enumerate() {
        snapshot_segments(&mut data, i as u32, shape.memories[i].memory64, captured, parts)?;
    }
    module.section(&tables).section(&memories).section(&globals).section(&exports).section(&data);
    Some(module.finish())
}

/// A module's data section with every active segment turned into an empty passive one
/// (which `memory.init` treats as the dropped segment it would have been) and passive
/// ones kept: segment indices are unchanged, and instantiation writes nothing.
fn emptied_data(reader: wasmparser::DataSectionReader) -> Result<DataSection, ResumeError> {
    let mut data = DataSection::new();
    for segment in reader {
        let segment = segment?;
        match segment.kind {
            wasmparser::DataKind::Active { .. } => data.passive(Vec::<u8>::new()),
            wasmparser::DataKind::Passive => data.passive(segment.data.to_vec()),
        };
    }
    Ok(data)
}

/// Appends to `data` one active segment per run of a captured memory's stored pages;
/// `None` when the image's part is missing or short.
fn snapshot_segments(
    data: &mut DataSection,
    memory: u32,
    memory64: bool,
    captured: &MemoryImage,
    parts: &[Vec<u8>],
) -> Option<()> {
    let bytes = parts.get(captured.part as usize)?;
    let mut at = 0usize;
    for &(start, count) in &captured.runs {
        let len = (count * IMAGE_PAGE) as usize;
        let run = bytes.get(at..at + len)?;
        let offset = start * IMAGE_PAGE;
        let offset = if memory64 { ConstExpr::i64_const(offset as i64) } else { ConstExpr::i32_const(offset as i32) };
        data.active(memory, &offset, run.iter().copied());
        at += len;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resume_variant_imports_its_state_and_writes_no_data() {
        let wasm = wat::parse_str(
            r#"(module
                (import "env" "f" (func $f))
                (memory 1 10)
                (global $sp (mut i32) (i32.const 1024))
                (table 2 funcref)
                (elem (i32.const 0) $g)
                (func $g (result i32) global.get $sp i32.load)
                (data (i32.const 16) "hello")
                (data "passive")
                (export "g" (func $g)))"#,
        )
        .unwrap();
        let (rewritten, layout) = crate::state_export::rewrite(&wasm).unwrap();
        assert!(supported(&layout));
        let (variant, shape) = resume_variant(&rewritten).unwrap();
        wasmparser::Validator::new().validate_all(&variant).unwrap();
        assert_eq!((shape.memories.len(), shape.globals.len(), shape.tables.len()), (1, 1, 1));
        let mut imports = Vec::new();
        let mut active_data = 0;
        for payload in Parser::new(0).parse_all(&variant) {
            match payload.unwrap() {
                Payload::ImportSection(reader) => {
                    for import in reader.into_imports() {
                        let import = import.unwrap();
                        imports.push(format!("{}.{}", import.module, import.name));
                    }
                }
                Payload::DataSection(reader) => {
                    for segment in reader {
                        if matches!(segment.unwrap().kind, wasmparser::DataKind::Active { .. }) {
                            active_data += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        assert_eq!(imports, ["env.f", "stasis:state.table0", "stasis:state.memory0", "stasis:state.global0"]);
        assert_eq!(active_data, 0);
    }
}
