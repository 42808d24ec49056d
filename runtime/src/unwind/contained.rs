//! What a self-contained module gets (`UnwindOptions::self_contained`): a component's
//! core instances export nothing the host can reach but their memories (`host_memory`),
//! so the module must resume from its memories alone.
//! - Every lean function's rewind copy is compiled into the module and put into the
//!   copies table by an element segment (a host cannot build copies that import the
//!   instance's globals and tables, as it does for core modules).
//! - Each exported function that can suspend is entered through a wrapper: once the
//!   program has unwound out of it, the wrapper pushes the module's mutable globals (the
//!   C stack pointer, TLS base...) onto the unwind stack, above the frames; before a
//!   rewind it pops them back. A rewind skips the code that set them, so they must come
//!   back as they were at the stop.

use super::support::{Class, Helpers, SaveClass, TypeInterner, Var, save_class};
use super::{Analysis, Scanned, UnwindError, emit};
use wasm_encoder::{BlockType, BranchHint, Function, Instruction};

/// The functions appended after the helpers, and what points at them.
pub(super) struct Contained {
    /// (type, body), in index order from the first index after the helpers.
    pub functions: Vec<(u32, Function)>,
    pub hints: Vec<(u32, Vec<BranchHint>)>,
    /// (copies table slot, function) for each copy.
    pub copies: Vec<(u32, u32)>,
    /// Every function export, the suspending ones pointed at their wrappers.
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
    for (name, f) in &scanned.func_exports {
        let suspends = analysis.suspension.functions.get(*f as usize).copied().unwrap_or(false);
        if !suspends || (*f as usize) < imports {
            out.exports.push((name.clone(), *f));
            continue;
        }
        let ty = scanned.info.type_of_func(*f)?;
        let wrapper = wrapper(&analysis.helpers, *f, ty.params().len() as u32, &saved);
        out.exports.push((name.clone(), first + out.functions.len() as u32));
        out.functions.push((scanned.info.func_types[*f as usize], wrapper));
    }
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

/// `f`'s wrapper: globals back before a rewind, saved after an unwind.
fn wrapper(helpers: &Helpers, f: u32, params: u32, saved: &[(u32, Class)]) -> Function {
    use Instruction as I;
    let mut body: Vec<Instruction<'static>> = Vec::new();
    let when = |body: &mut Vec<Instruction<'static>>, state: i32| {
        body.extend(helpers.get(Var::State));
        body.extend([I::I32Const(state), I::I32Eq, I::If(BlockType::Empty)]);
    };
    when(&mut body, super::REWINDING);
    for &(g, class) in saved.iter().rev() {
        body.extend([I::Call(helpers.pop[class as usize]), I::GlobalSet(g)]);
    }
    body.push(I::End);
    body.extend((0..params).map(I::LocalGet));
    body.push(I::Call(f));
    // The results stay beneath the test.
    when(&mut body, super::UNWINDING);
    for &(g, class) in saved {
        body.extend([I::GlobalGet(g), I::Call(helpers.push[class as usize])]);
    }
    body.extend([I::End, I::End]);
    let mut function = Function::new([]);
    for i in &body {
        function.instruction(i);
    }
    function
}
