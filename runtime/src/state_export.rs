//! The load-time rewrite that makes a core module's whole state reachable from the host.
//!
//! A memory snapshot needs every linear memory, global and table of an instance, exported
//! or not (C's `__stack_pointer` never is). wasmtime 48 reaches non-exported state only
//! through `Config::guest_debug`, which made a CPU-bound C loop 2.8x slower and hello's
//! start 8x slower on this machine (DESIGN.md section 3): too much to pay on every process
//! for the chance of a snapshot. So Stasis rewrites each core module once, when it is
//! loaded, and the rewritten module is what gets compiled and cached:
//! - every memory, global and table is exported under a reserved name (`__stasis_memory_N`,
//!   `__stasis_global_N`, `__stasis_table_N`, N the index in its index space);
//! - every function that can sit in a table (named by an element segment or a `ref.func`
//!   in a global's initializer) is exported as `__stasis_func_N`, so a restored table can
//!   be refilled with the same functions (the unwind transform declares, in such a segment,
//!   the functions its rewind copies call);
//! - every exception tag is exported as `__stasis_tag_N`;
//! - the start function, if any, is no longer run by instantiation but exported as
//!   `__stasis_start`: a fresh process calls it, a restored one must not run it twice.
//!
//! Only the export and start sections change; code and data are copied byte for byte, so
//! the rewrite costs a parse of the section headers and nothing at run time.

use std::ops::Range;
use wasm_encoder::{ExportKind, ExportSection, RawSection};
use wasmparser::{ElementItems, ExternalKind, Operator, Parser, Payload, TypeRef, ValType};

/// Prefix of every export the rewrite adds; a module that already uses it is refused.
pub const RESERVED_PREFIX: &str = "__stasis_";
pub const START_EXPORT: &str = "__stasis_start";
/// Part of the compiled-code cache key and of the engine fingerprint images record:
/// change it whenever the rewrite's output changes.
pub const REWRITE_VERSION: &str = "state-export-2";

pub fn memory_export(index: u32) -> String {
    format!("__stasis_memory_{index}")
}

pub fn global_export(index: u32) -> String {
    format!("__stasis_global_{index}")
}

pub fn table_export(index: u32) -> String {
    format!("__stasis_table_{index}")
}

pub fn func_export(index: u32) -> String {
    format!("__stasis_func_{index}")
}

pub fn tag_export(index: u32) -> String {
    format!("__stasis_tag_{index}")
}

/// What the rewrite learned about a module's state, in index order.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateLayout {
    pub memories: Vec<MemoryInfo>,
    pub globals: Vec<GlobalInfo>,
    pub tables: Vec<TableInfo>,
    /// Functions exported as `__stasis_func_N`, ascending.
    pub table_funcs: Vec<u32>,
    /// The original start function.
    pub start: Option<u32>,
    /// Exception tags, all exported as `__stasis_tag_N` (the unwind transform's rewind
    /// copies throw and catch the instance's own).
    #[serde(default)]
    pub tags: u32,
    /// Byte ranges active data segments initialize, per memory; `None` when an offset is
    /// not a constant (then the whole initial memory counts as initialized).
    pub data_ranges: Option<Vec<(u32, Range<u64>)>>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryInfo {
    pub imported: bool,
    pub memory64: bool,
    pub shared: bool,
    pub minimum_pages: u64,
    pub maximum_pages: Option<u64>,
    pub page_size_log2: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GlobalInfo {
    pub imported: bool,
    pub mutable: bool,
    pub ty: GlobalKind,
}

/// The global types a snapshot can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GlobalKind {
    I32,
    I64,
    F32,
    F64,
    V128,
    /// A reference: only null or a function of this module can be captured.
    FuncRef,
    /// Any other reference type (externref, GC types): capturable only when null.
    OtherRef,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableInfo {
    pub imported: bool,
    pub funcref: bool,
    pub minimum: u64,
    /// Filled by the host, not the guest (the unwind transform's copies table): a
    /// snapshot keeps its size only, and a restore leaves it as instantiated.
    #[serde(default)]
    pub host_owned: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("malformed module: {0}")]
    Malformed(#[from] wasmparser::BinaryReaderError),
    #[error("the module already exports `{0}`, a name Stasis reserves for its snapshot exports")]
    ReservedName(String),
}

/// Rewrites a core module as described in the module docs.
pub fn rewrite(wasm: &[u8]) -> Result<(Vec<u8>, StateLayout), RewriteError> {
    let mut layout = StateLayout { data_ranges: Some(Vec::new()), ..StateLayout::default() };
    let mut exports: Vec<(String, ExternalKind, u32)> = Vec::new();
    let mut table_funcs = std::collections::BTreeSet::new();
    // (section id, byte range) of everything copied unchanged, in order.
    let mut sections: Vec<(u8, Range<usize>)> = Vec::new();

    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload?;
        match &payload {
            Payload::ImportSection(reader) => {
                for import in reader.clone().into_imports() {
                    match import?.ty {
                        TypeRef::Func(_) | TypeRef::FuncExact(_) => {}
                        TypeRef::Tag(_) => layout.tags += 1,
                        TypeRef::Memory(m) => layout.memories.push(memory_info(m, true)),
                        TypeRef::Global(g) => layout.globals.push(global_info(g, true)),
                        TypeRef::Table(t) => layout.tables.push(table_info(t, true)),
                    }
                }
            }
            Payload::MemorySection(reader) => {
                for memory in reader.clone() {
                    layout.memories.push(memory_info(memory?, false));
                }
            }
            Payload::GlobalSection(reader) => {
                for global in reader.clone() {
                    let global = global?;
                    layout.globals.push(global_info(global.ty, false));
                    collect_ref_funcs(&global.init_expr, &mut table_funcs)?;
                }
            }
            Payload::TableSection(reader) => {
                for table in reader.clone() {
                    layout.tables.push(table_info(table?.ty, false));
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader.clone() {
                    let export = export?;
                    if export.name.starts_with(RESERVED_PREFIX) {
                        return Err(RewriteError::ReservedName(export.name.to_string()));
                    }
                    exports.push((export.name.to_string(), export.kind, export.index));
                }
            }
            Payload::StartSection { func, .. } => layout.start = Some(*func),
            Payload::TagSection(reader) => layout.tags += reader.count(),
            Payload::ElementSection(reader) => {
                for element in reader.clone() {
                    match element?.items {
                        ElementItems::Functions(funcs) => {
                            for func in funcs {
                                table_funcs.insert(func?);
                            }
                        }
                        ElementItems::Expressions(_, exprs) => {
                            for expr in exprs {
                                collect_ref_funcs(&expr?, &mut table_funcs)?;
                            }
                        }
                    }
                }
            }
            Payload::DataSection(reader) => {
                for data in reader.clone() {
                    let data = data?;
                    if let wasmparser::DataKind::Active { memory_index, offset_expr } = data.kind {
                        let offset = const_offset(&offset_expr);
                        match (offset, layout.data_ranges.as_mut()) {
                            (Some(start), Some(ranges)) => {
                                ranges.push((memory_index, start..start + data.data.len() as u64))
                            }
                            _ => layout.data_ranges = None,
                        }
                    }
                }
            }
            _ => {}
        }
        // Code is parsed lazily: one section entry, function bodies are skipped below.
        if let Payload::CodeSectionEntry(_) = payload {
            continue;
        }
        if let Some((id, range)) = payload.as_section()
            && id != wasm_encoder::SectionId::Export as u8
            && id != wasm_encoder::SectionId::Start as u8
        {
            sections.push((id, range));
        }
    }
    layout.table_funcs = table_funcs.into_iter().collect();

    let mut export_section = ExportSection::new();
    for (name, kind, index) in &exports {
        export_section.export(name, export_kind(*kind), *index);
    }
    for index in 0..layout.memories.len() as u32 {
        export_section.export(&memory_export(index), ExportKind::Memory, index);
    }
    for index in 0..layout.globals.len() as u32 {
        export_section.export(&global_export(index), ExportKind::Global, index);
    }
    for index in 0..layout.tables.len() as u32 {
        export_section.export(&table_export(index), ExportKind::Table, index);
    }
    for &index in &layout.table_funcs {
        export_section.export(&func_export(index), ExportKind::Func, index);
    }
    for index in 0..layout.tags {
        export_section.export(&tag_export(index), ExportKind::Tag, index);
    }
    if let Some(start) = layout.start {
        export_section.export(START_EXPORT, ExportKind::Func, start);
    }

    let mut module = wasm_encoder::Module::new();
    let mut export_written = false;
    for (id, range) in sections {
        if !export_written && id != 0 && section_rank(id) > section_rank(wasm_encoder::SectionId::Export as u8) {
            module.section(&export_section);
            export_written = true;
        }
        module.section(&RawSection { id, data: &wasm[range] });
    }
    if !export_written {
        module.section(&export_section);
    }
    Ok((module.finish(), layout))
}

/// Where a section goes in a module (the binary format's order, which is not the id order).
pub(crate) fn section_rank(id: u8) -> u8 {
    match id {
        1 => 1,   // type
        2 => 2,   // import
        3 => 3,   // function
        4 => 4,   // table
        5 => 5,   // memory
        13 => 6,  // tag
        6 => 7,   // global
        7 => 8,   // export
        8 => 9,   // start
        9 => 10,  // element
        12 => 11, // data count
        10 => 12, // code
        11 => 13, // data
        _ => 0,
    }
}

fn export_kind(kind: ExternalKind) -> ExportKind {
    match kind {
        ExternalKind::Func | ExternalKind::FuncExact => ExportKind::Func,
        ExternalKind::Table => ExportKind::Table,
        ExternalKind::Memory => ExportKind::Memory,
        ExternalKind::Global => ExportKind::Global,
        ExternalKind::Tag => ExportKind::Tag,
    }
}

fn memory_info(m: wasmparser::MemoryType, imported: bool) -> MemoryInfo {
    MemoryInfo {
        imported,
        memory64: m.memory64,
        shared: m.shared,
        minimum_pages: m.initial,
        maximum_pages: m.maximum,
        page_size_log2: m.page_size_log2,
    }
}

fn global_info(g: wasmparser::GlobalType, imported: bool) -> GlobalInfo {
    let ty = match g.content_type {
        ValType::I32 => GlobalKind::I32,
        ValType::I64 => GlobalKind::I64,
        ValType::F32 => GlobalKind::F32,
        ValType::F64 => GlobalKind::F64,
        ValType::V128 => GlobalKind::V128,
        ValType::Ref(r) if r.is_func_ref() => GlobalKind::FuncRef,
        ValType::Ref(_) => GlobalKind::OtherRef,
    };
    GlobalInfo { imported, mutable: g.mutable, ty }
}

fn table_info(t: wasmparser::TableType, imported: bool) -> TableInfo {
    TableInfo { imported, funcref: t.element_type.is_func_ref(), minimum: t.initial, host_owned: false }
}

pub(crate) fn collect_ref_funcs(
    expr: &wasmparser::ConstExpr<'_>,
    funcs: &mut std::collections::BTreeSet<u32>,
) -> Result<(), wasmparser::BinaryReaderError> {
    for op in expr.get_operators_reader() {
        if let Operator::RefFunc { function_index } = op? {
            funcs.insert(function_index);
        }
    }
    Ok(())
}

fn const_offset(expr: &wasmparser::ConstExpr<'_>) -> Option<u64> {
    let mut reader = expr.get_operators_reader();
    let value = match reader.read().ok()? {
        Operator::I32Const { value } => value as u32 as u64,
        Operator::I64Const { value } => value as u64,
        _ => return None,
    };
    matches!(reader.read().ok()?, Operator::End).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports_of(wasm: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        for payload in Parser::new(0).parse_all(wasm) {
            if let Payload::ExportSection(reader) = payload.unwrap() {
                for export in reader {
                    names.push(export.unwrap().name.to_string());
                }
            }
        }
        names
    }

    #[test]
    fn exports_every_piece_of_state_and_keeps_the_rest() {
        let wasm = wat::parse_str(
            r#"(module
                (import "env" "g" (global $imported i64))
                (memory 1 10)
                (global $sp (mut i32) (i32.const 1024))
                (table 4 funcref)
                (elem (i32.const 1) $f)
                (func $f (result i32) global.get $sp)
                (func $init)
                (start $init)
                (data (i32.const 16) "hello")
                (export "f" (func $f)))"#,
        )
        .unwrap();
        let (rewritten, layout) = rewrite(&wasm).unwrap();
        wasmparser::Validator::new().validate_all(&rewritten).unwrap();
        let names = exports_of(&rewritten);
        for expected in [
            "f",
            "__stasis_memory_0",
            "__stasis_global_0",
            "__stasis_global_1",
            "__stasis_table_0",
            "__stasis_func_0",
            "__stasis_start",
        ] {
            assert!(names.contains(&expected.to_string()), "{expected} missing from {names:?}");
        }
        assert_eq!(layout.globals.len(), 2);
        assert!(layout.globals[0].imported && !layout.globals[0].mutable);
        assert!(layout.globals[1].mutable);
        assert_eq!(layout.table_funcs, vec![0]);
        assert_eq!(layout.start, Some(1));
        assert_eq!(layout.data_ranges, Some(vec![(0, 16..21)]));
        assert_eq!(layout.memories[0].maximum_pages, Some(10));
        // No start section any more: instantiation runs nothing.
        assert!(Parser::new(0).parse_all(&rewritten).all(|p| !matches!(p.unwrap(), Payload::StartSection { .. })));
    }

    #[test]
    fn adds_an_export_section_where_there_was_none() {
        let wasm = wat::parse_str("(module (memory 1) (func) (data (i32.const 0) \"x\"))").unwrap();
        let (rewritten, _) = rewrite(&wasm).unwrap();
        wasmparser::Validator::new().validate_all(&rewritten).unwrap();
        assert_eq!(exports_of(&rewritten), vec!["__stasis_memory_0"]);
    }

    #[test]
    fn refuses_reserved_names_and_garbage() {
        let wasm = wat::parse_str(r#"(module (func (export "__stasis_x")))"#).unwrap();
        assert!(matches!(rewrite(&wasm), Err(RewriteError::ReservedName(n)) if n == "__stasis_x"));
        assert!(matches!(rewrite(b"\0asm\x01\0\0\0\x07\xff"), Err(RewriteError::Malformed(_))));
    }
}
