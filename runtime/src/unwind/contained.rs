//! What a self-contained module gets (`UnwindOptions::self_contained`): a component's
//! core instances export nothing the host can reach but their memories (`host_memory`),
//! so the module must resume from its memories alone.
//! - Every lean function's rewind copy is compiled into the module and put into the
//!   copies table by an element segment (a host cannot build copies that import the
//!   instance's globals and tables, as it does for core modules).
//! - Exports the host calls in the middle of a host call (`realloc`) run held (see
//!   `UnwindOptions::held_exports`).
//! - Two exports, [`SAVE_GLOBALS`] and [`RESTORE_GLOBALS`], push the module's mutable
//!   globals (the C stack pointer, the preview1 adapter's state pointer...) onto the
//!   unwind stack and pop them back: the host calls every module's save once the program
//!   has unwound (whether or not the module is on the stopped stack) and the restores, in
//!   reverse order, before the rewind. A rewind skips the code that set them, so they
//!   must come back as they were at the stop.

use super::support::{Class, Helpers, SaveClass, TypeInterner, Var, save_class};
use super::{Analysis, Scanned, UnwindError, emit};
use wasm_encoder::{BranchHint, Function, Instruction};

/// Export that pushes the module's mutable globals onto the unwind stack.
pub const SAVE_GLOBALS: &str = "stasis:save-globals";
/// Export that pops them back.
pub const RESTORE_GLOBALS: &str = "stasis:restore-globals";

/// The functions appended after the helpers, and what points at them.
pub(super) struct Contained {
    /// (type, body), in index order from the first index after the helpers.
    pub functions: Vec<(u32, Function)>,
    pub hints: Vec<(u32, Vec<BranchHint>)>,
    /// (copies table slot, function) for each copy.
    pub copies: Vec<(u32, u32)>,
    /// Every function export, the module's own and the two above.
    pub exports: Vec<(String, u32)>,
    pub saved_global_bytes: u32,
}

/// Builds the additions for `wasm` (scanned afresh: the instrumented bodies consumed the
/// first scan's validators). `first` is the index of the first function appended.
pub(super) fn build(
    wasm: &[u8],
    analysis: &Analysis,
    types: &mut TypeInterner,
    first: u32,
    defined_globals: usize,
    options: &super::UnwindOptions,
) -> Result<Contained, UnwindError> {
    let mut scanned = super::scan(wasm)?;
    let imports = analysis.imports;
    let mut out = Contained {
        functions: Vec::new(),
        hints: Vec::new(),
        copies: Vec::new(),
        exports: Vec::new(),
        saved_global_bytes: 0,
    };
    for (i, (func, body)) in std::mem::take(&mut scanned.bodies).into_iter().enumerate() {
        if analysis.body_kind(i) != Some(emit::Body::Lean) {
            continue;
        }
        let index = first + out.functions.len() as u32;
        let (function, hints, _) =
            analysis.emit_function(&scanned.info, i, func, &body, types, emit::Body::Full, None)?;
        out.functions.push((scanned.info.func_types[imports + i], function));
        if !hints.is_empty() {
            out.hints.push((index, hints));
        }
        out.copies.push(((imports + i) as u32, index));
    }

    let saved = saved_globals(&scanned, defined_globals)?;
    out.saved_global_bytes = saved.iter().map(|(_, class)| slot_bytes(*class)).sum();
    let helpers = &analysis.helpers;
    for (name, f) in &scanned.func_exports {
        let suspends = analysis.suspension.functions.get(*f as usize).copied().unwrap_or(false);
        let post_return = options.post_return_exports.contains(name);
        if !(post_return || options.held_exports.contains(name) && suspends) {
            out.exports.push((name.clone(), *f));
            continue;
        }
        let ty = scanned.info.type_of_func(*f)?;
        let wrapper = held_wrapper(helpers, *f, ty.params().len() as u32, post_return);
        out.exports.push((name.clone(), first + out.functions.len() as u32));
        out.functions.push((scanned.info.func_types[*f as usize], wrapper));
    }
    let save = first + out.functions.len() as u32;
    let restore = save + 1;
    let no_params = types.intern(&[], &[])?;
    let mut body: Vec<Instruction<'static>> = Vec::new();
    for &(g, class) in &saved {
        body.extend([Instruction::GlobalGet(g), Instruction::Call(helpers.push[class as usize])]);
    }
    out.functions.push((no_params, function(body)));
    let mut body: Vec<Instruction<'static>> = Vec::new();
    for &(g, class) in saved.iter().rev() {
        body.extend([Instruction::Call(helpers.pop[class as usize]), Instruction::GlobalSet(g)]);
    }
    out.functions.push((no_params, function(body)));
    out.exports.push((SAVE_GLOBALS.into(), save));
    out.exports.push((RESTORE_GLOBALS.into(), restore));
    Ok(out)
}

/// The module's own mutable globals, with how each is saved.
fn saved_globals(scanned: &Scanned<'_>, defined: usize) -> Result<Vec<(u32, Class)>, UnwindError> {
    let first_defined = scanned.globals.len() - defined;
    let mut saved = Vec::new();
    for (g, global) in scanned.globals.iter().enumerate().skip(first_defined) {
        if !global.mutable {
            continue;
        }
        match save_class(global.content_type) {
            Ok(SaveClass::Value(class)) if class != Class::FuncRef => saved.push((g as u32, class)),
            _ => {
                return Err(UnwindError::Unsupported {
                    feature: format!("a mutable `{}` global (global {g}) in a component", global.content_type),
                    func: None,
                });
            }
        }
    }
    Ok(saved)
}

fn slot_bytes(class: Class) -> u32 {
    if class == Class::V128 { 16 } else { 8 }
}

/// `f` run in state `HELD`, the state put back after; a `post_return` one not run at all
/// while the program unwinds.
fn held_wrapper(helpers: &Helpers, f: u32, params: u32, post_return: bool) -> Function {
    let old = params;
    let mut body: Vec<Instruction<'static>> = Vec::new();
    if post_return {
        body.extend(helpers.get(Var::State));
        body.extend([
            Instruction::I32Const(super::UNWINDING),
            Instruction::I32Eq,
            Instruction::If(wasm_encoder::BlockType::Empty),
            Instruction::Return,
            Instruction::End,
        ]);
    }
    body.extend(helpers.get(Var::State));
    body.push(Instruction::LocalSet(old));
    body.push(Instruction::I32Const(super::HELD));
    body.extend(helpers.set(Var::State));
    body.extend((0..params).map(Instruction::LocalGet));
    body.push(Instruction::Call(f));
    // The results stay beneath.
    body.push(Instruction::LocalGet(old));
    body.extend(helpers.set(Var::State));
    body.push(Instruction::End);
    let mut function = Function::new([(1, wasm_encoder::ValType::I32)]);
    for i in &body {
        function.instruction(i);
    }
    function
}

fn function(mut body: Vec<Instruction<'static>>) -> Function {
    body.push(Instruction::End);
    let mut function = Function::new([]);
    for i in &body {
        function.instruction(i);
    }
    function
}
