//! Emits an instrumented function from its plan, as one of its two bodies (see [`Body`]).
//!
//! The shape of a full body (a rewind copy):
//! ```text
//! if state == REWINDING { frame = release(); target = frame.site; locals = frame[..] }  ;; prologue
//! block $body (result R)  <original body, instrumented>  end
//! ```
//! An exported lean body's prologue is `if state == REWINDING { return_call_indirect
//! copies[f] }`; other lean bodies have none (rewinding callers enter their copies).
//! At a site, after the call (both bodies): `if state == UNWINDING { save the operands
//! beneath the call; frame = reserve(); frame[slot(l)] = l for each local l live after the
//! site; frame.header = (site, f, size); return <dummy R> }`. Every site of a function uses
//! the same frame layout (one slot per local that is live at some site). In a full body,
//! while rewinding, guards skip the code between sites, open structures are entered only
//! when they hold the target site, and the target site reloads its live locals and
//! operands before calling again.
//!
//! The prologue restores every slot (a site that did not save a local leaves garbage in
//! its slot, which nothing reads before writing it). Restoring only a site's own locals at
//! the site was measured too: the per-site loads made GCC's `cc1` 30% larger and its
//! compile 40% heavier, for no gain in speed. A full body tests the state once before a
//! site (rewinding: skip it, or reload its operands) and once after (unwinding).

use super::plan::{FuncPlan, Site, StructKind};
use super::support::{Helpers, SaveClass, TypeInterner, Var, save_class};
use super::{ARMED, REWINDING, UNWINDING, UnwindError};
use std::collections::HashMap;
use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasm_encoder::{BlockType, Catch, Function, Instruction};
use wasmparser::{FunctionBody, Operator, ValType};

/// Sets of scratch locals. Values the instrumentation moves around a synthetic structure
/// go through locals, never through block parameters or results: wasmtime declares a
/// variable per block parameter, and Cranelift's SSA builder keeps a per-variable map as
/// long as the blocks before it, so typed synthetic blocks made compile memory quadratic in
/// the function's size (GCC's 440 KB `cc1` functions needed over 16 GiB). Pools keep
/// values that are live at the same time apart; outside its own instrumentation sequence
/// a scratch local holds nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pool {
    /// A site's frame (saved values and the call's operands).
    Frame,
    /// A site's call results, while the saved values go back beneath them.
    Results,
    GuardIn,
    GuardOut,
    LoopIn,
    LoopOut,
    /// A structure's results while its spilled values go back beneath them.
    Exit,
}

/// Where an unwind saves a local.
#[derive(Clone, Copy, Debug)]
enum Slot {
    /// At this offset of the function's frame in the unwind memory.
    Memory(u32),
    /// On the reference stack (function references cannot be stored in memory): every
    /// site pushes all of these, in slot order, live or not.
    Reference,
    /// A nullable reference other than `funcref`: only null can be saved, so it is checked
    /// where live and restored as null.
    NullOnly,
}

/// Which of a function's two bodies to emit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// What the module runs: it can unwind, but not rewind. A rewind enters the
    /// function's rewind copy instead (through the copies table: from a rewinding caller,
    /// or, for an export, from its prologue with a tail call), so the normal path carries
    /// no rewind code: no guards, no skipped-structure exits, no joins into every site.
    Lean,
    /// Unwinds and rewinds: the rewind copies, and functions that cannot be copied into
    /// another module (they use data or element segments, which are per module).
    Full,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Frame {
    Original,
    Synthetic,
}

pub(crate) struct Emitter<'a, 'p> {
    plan: &'p FuncPlan,
    helpers: &'p Helpers,
    types: &'p mut TypeInterner,
    func: u32,
    out: Vec<Instruction<'a>>,
    frames: Vec<Frame>,
    /// Every local: the original ones, then those the instrumentation adds.
    locals: Vec<ValType>,
    /// Locals each site saves (sorted), by site id.
    site_saves: Vec<Vec<u32>>,
    /// The unwind frame: where each saved local goes (see [`Slot`]), and its size in bytes.
    slots: std::collections::BTreeMap<u32, Slot>,
    frame_bytes: u32,
    target: u32,
    /// The frame's address, between `reserve`/`release` and the stores or loads.
    base: u32,
    index_local: Option<u32>,
    /// Argument locals of import sites, by type, reused between sites.
    arg_locals: HashMap<ValType, Vec<u32>>,
    /// Spill locals per open structure, bottom first.
    spill_locals: HashMap<usize, Vec<u32>>,
    /// Scratch locals by pool and type (see [`Pool`]).
    scratch: HashMap<(Pool, ValType), Vec<u32>>,
    active_guard: Option<usize>,
    /// Skippable structures just entered whose exit checks are still to be emitted: a
    /// chain of nested blocks (a `switch`) gets one test of the state, not one per level.
    pending_exits: Vec<usize>,
    /// Index in `frames` of each open original structure's frame.
    frame_of: HashMap<usize, usize>,
    loop_site_at: HashMap<usize, usize>,
    else_of: HashMap<usize, usize>,
    results: Vec<ValType>,
    param_count: usize,
    /// Branch hints: (index in `out` of an instrumentation `if`, whether it is taken).
    /// Cranelift lays the unlikely arm out of line, so the normal path stays compact.
    hints: Vec<(usize, bool)>,
    /// The normal-path body only: unwinds, never rewinds (see [`Body`]).
    lean: bool,
    /// A lean body the host may call while rewinding (an export): it keeps the prologue
    /// that hands the rewind to its copy. Other lean bodies are entered only normally: a
    /// rewinding caller enters the callee's copy itself (see [`Emitter::rewind_call`]).
    prologue: bool,
    /// By function index: whether the module runs a lean body for it (its rewind copy is
    /// in the copies table at that index when a rewind needs it).
    lean_funcs: &'p [bool],
    /// Every function's type index.
    func_types: &'p [u32],
    type_index: u32,
    /// Maps function indices of the emitted code (a rewind copy calls the module's
    /// functions through imports).
    remap: Option<&'p dyn Fn(u32) -> u32>,
    /// Save paths shared by the sites that save the same locals (see [`shared_saves`]):
    /// each site's group, and each group's locals (outermost block first).
    site_group: Vec<Option<usize>>,
    groups: Vec<Vec<u32>>,
    /// Where a site that branches to a shared save path leaves its number and the bytes
    /// of its stack entry.
    shared_site: u32,
    shared_entry: u32,
}

fn enc(ty: ValType) -> Result<wasm_encoder::ValType, UnwindError> {
    RoundtripReencoder.val_type(ty).map_err(|e| UnwindError::Encode(format!("{e:?}")))
}

impl<'a, 'p> Emitter<'a, 'p> {
    /// `live`: the original locals live at each site (by site id), from `liveness`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        plan: &'p FuncPlan,
        helpers: &'p Helpers,
        types: &'p mut TypeInterner,
        func: u32,
        params: &[ValType],
        results: &[ValType],
        body: &FunctionBody<'a>,
        live: Vec<Vec<u32>>,
        kind: Body,
        type_index: u32,
        entry: bool,
        lean_funcs: &'p [bool],
        func_types: &'p [u32],
    ) -> Result<Self, UnwindError> {
        let mut locals: Vec<ValType> = params.to_vec();
        for group in body.get_locals_reader()? {
            let (count, ty) = group?;
            locals.extend(std::iter::repeat_n(ty, count as usize));
        }
        let mut emitter = Emitter {
            plan,
            helpers,
            types,
            func,
            out: Vec::new(),
            frames: vec![Frame::Synthetic],
            locals,
            site_saves: live,
            slots: Default::default(),
            frame_bytes: 0,
            target: 0,
            base: 0,
            index_local: None,
            arg_locals: HashMap::new(),
            spill_locals: HashMap::new(),
            scratch: HashMap::new(),
            active_guard: None,
            pending_exits: Vec::new(),
            frame_of: HashMap::new(),
            loop_site_at: plan.sites.iter().enumerate().filter(|(_, s)| s.loop_check).map(|(i, s)| (s.op, i)).collect(),
            else_of: plan.structures.iter().enumerate().filter_map(|(i, s)| Some((s.else_op?, i))).collect(),
            results: results.to_vec(),
            param_count: params.len(),
            hints: Vec::new(),
            lean: kind == Body::Lean,
            prologue: kind == Body::Lean && entry,
            lean_funcs,
            func_types,
            type_index,
            remap: None,
            site_group: Vec::new(),
            groups: Vec::new(),
            shared_site: 0,
            shared_entry: 0,
        };
        if plan.sites.iter().any(|s| s.import_callee) {
            emitter.index_local = Some(emitter.new_local(ValType::I32));
        }
        // In order of first use, so the output (local numbers, hence the saved frame
        // layout) is the same on every host: images move between them.
        let mut needed: Vec<(ValType, usize)> = Vec::new();
        for site in plan.sites.iter().filter(|s| s.repeatable()) {
            let mut counts: Vec<(ValType, usize)> = Vec::new();
            for &ty in &site.params {
                match counts.iter_mut().find(|(t, _)| *t == ty) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((ty, 1)),
                }
            }
            for (ty, n) in counts {
                match needed.iter_mut().find(|(t, _)| *t == ty) {
                    Some((_, most)) => *most = (*most).max(n),
                    None => needed.push((ty, n)),
                }
            }
        }
        for (ty, n) in needed {
            let list: Vec<u32> = (0..n).map(|_| emitter.new_local(ty)).collect();
            emitter.arg_locals.insert(ty, list);
        }
        for (id, st) in plan.structures.iter().enumerate() {
            if st.open() && !st.spill.is_empty() {
                let list = st.spill.iter().map(|&ty| emitter.new_local(ty)).collect();
                emitter.spill_locals.insert(id, list);
            }
        }
        emitter.target = emitter.new_local(ValType::I32);
        emitter.base = emitter.new_local(ValType::I32);
        emitter.add_instrumentation_saves();
        emitter.lay_out_frame()?;
        (emitter.site_group, emitter.groups) = shared_saves(&emitter.site_saves);
        if !emitter.groups.is_empty() {
            emitter.shared_site = emitter.new_local(ValType::I32);
            emitter.shared_entry = emitter.new_local(ValType::I32);
        }
        Ok(emitter)
    }

    /// Adds to each site's saves the locals the instrumentation itself needs there: the
    /// call's index (through a table) or arguments (an import), and the spilled operands
    /// of every open structure around it.
    fn add_instrumentation_saves(&mut self) {
        let plan = self.plan;
        for (id, site) in plan.sites.iter().enumerate() {
            let saves = &mut self.site_saves[id];
            if site.import_callee {
                saves.push(self.index_local.expect("index local"));
            }
            if site.repeatable() {
                let mut used: HashMap<ValType, usize> = HashMap::new();
                for &ty in &site.params {
                    let n = used.entry(ty).or_default();
                    saves.push(self.arg_locals[&ty][*n]);
                    *n += 1;
                }
            }
        }
        for (s, spills) in &self.spill_locals {
            let st = &plan.structures[*s];
            for id in st.first_site..st.site_end {
                self.site_saves[id as usize].extend(spills);
            }
        }
        for saves in &mut self.site_saves {
            saves.sort_unstable();
            saves.dedup();
        }
    }

    /// One slot per local some site saves, in local order (deterministic: images move
    /// between hosts), then the frame's header (see [`HEADER_BYTES`]).
    fn lay_out_frame(&mut self) -> Result<(), UnwindError> {
        let mut offset = 0u32;
        for saves in &self.site_saves {
            for &local in saves {
                if self.slots.contains_key(&local) {
                    continue;
                }
                let ty = self.locals[local as usize];
                let class =
                    save_class(ty).map_err(|feature| UnwindError::Unsupported { feature, func: Some(self.func) })?;
                let slot = match class {
                    SaveClass::Value(super::support::Class::FuncRef) => Slot::Reference,
                    SaveClass::Value(_) => Slot::Memory(0),
                    SaveClass::NullOnly => Slot::NullOnly,
                };
                self.slots.insert(local, slot);
            }
        }
        for (&local, slot) in self.slots.iter_mut() {
            if let Slot::Memory(at) = slot {
                let size = if self.locals[local as usize] == ValType::V128 { 16 } else { 8 };
                offset = offset.next_multiple_of(size);
                *at = offset;
                offset += size;
            }
        }
        self.frame_bytes = offset.next_multiple_of(16) + HEADER_BYTES;
        Ok(())
    }

    /// Offset of the frame's header.
    fn header(&self) -> u32 {
        self.frame_bytes - HEADER_BYTES
    }

    /// Rewind copies call the module's functions under other indices.
    pub(crate) fn with_remap(mut self, remap: &'p dyn Fn(u32) -> u32) -> Self {
        self.remap = Some(remap);
        self
    }

    fn new_local(&mut self, ty: ValType) -> u32 {
        self.locals.push(ty);
        self.locals.len() as u32 - 1
    }

    /// The `n`th scratch local of `ty` in `pool`.
    fn scratch(&mut self, pool: Pool, ty: ValType, n: usize) -> Result<u32, UnwindError> {
        if let ValType::Ref(r) = ty
            && !r.is_nullable()
        {
            // Placeholders (a skipped site's results) would be null.
            return Err(UnwindError::Unsupported {
                feature: "a non-nullable reference live across a suspension point".into(),
                func: Some(self.func),
            });
        }
        while self.scratch.get(&(pool, ty)).map_or(0, Vec::len) <= n {
            let local = self.new_local(ty);
            self.scratch.entry((pool, ty)).or_default().push(local);
        }
        Ok(self.scratch[&(pool, ty)][n])
    }

    /// Scratch locals of `pool` for values of `types` (bottom of the stack first).
    fn scratch_for(&mut self, pool: Pool, types: &[ValType]) -> Result<Vec<u32>, UnwindError> {
        let mut used: HashMap<ValType, usize> = HashMap::new();
        let mut locals = Vec::with_capacity(types.len());
        for &ty in types {
            let n = used.entry(ty).or_default();
            locals.push(self.scratch(pool, ty, *n)?);
            *n += 1;
        }
        Ok(locals)
    }

    /// Pops `types` (top of stack last in the slice) into scratch locals of `pool`,
    /// returned in stack order.
    fn stash(&mut self, pool: Pool, types: &[ValType]) -> Result<Vec<u32>, UnwindError> {
        let locals = self.scratch_for(pool, types)?;
        for &local in locals.iter().rev() {
            self.push(Instruction::LocalSet(local));
        }
        Ok(locals)
    }

    fn push_locals(&mut self, locals: &[u32]) {
        for &local in locals {
            self.push(Instruction::LocalGet(local));
        }
    }

    /// Opens a synthetic `if` without parameters or results (see [`Pool`]).
    fn open_if(&mut self, likely: bool) {
        self.hint(likely);
        self.push(Instruction::If(BlockType::Empty));
        self.frames.push(Frame::Synthetic);
    }

    fn push(&mut self, instruction: Instruction<'a>) {
        self.out.push(instruction);
    }

    /// The next instruction is an instrumentation `if` whose condition is almost always
    /// `taken` (or not) in normal running.
    fn hint(&mut self, taken: bool) {
        self.hints.push((self.out.len(), taken));
    }

    fn block_type(&mut self, params: &[ValType], results: &[ValType]) -> Result<BlockType, UnwindError> {
        Ok(match (params, results) {
            ([], []) => BlockType::Empty,
            ([], [one]) => BlockType::Result(enc(*one)?),
            _ => BlockType::FunctionType(self.types.intern(params, results)?),
        })
    }

    fn close_synthetic(&mut self) {
        self.push(Instruction::End);
        let popped = self.frames.pop();
        debug_assert!(popped == Some(Frame::Synthetic));
    }

    /// Pushes one of the transform's variables (a global, or a word of the control memory).
    fn get(&mut self, var: Var) {
        for i in self.helpers.get(var) {
            self.push(i);
        }
    }

    fn state_is(&mut self, value: i32) {
        self.get(Var::State);
        self.push(Instruction::I32Const(value));
        self.push(Instruction::I32Eq);
    }

    fn dummy(&mut self, ty: ValType) -> Result<(), UnwindError> {
        let instruction = self.dummy_instruction(ty)?;
        self.push(instruction);
        Ok(())
    }

    fn dummy_instruction(&self, ty: ValType) -> Result<Instruction<'a>, UnwindError> {
        Ok(match ty {
            ValType::I32 => Instruction::I32Const(0),
            ValType::I64 => Instruction::I64Const(0),
            ValType::F32 => Instruction::F32Const(0.0f32.into()),
            ValType::F64 => Instruction::F64Const(0.0f64.into()),
            ValType::V128 => Instruction::V128Const(0),
            ValType::Ref(r) if r.is_nullable() => Instruction::RefNull(
                RoundtripReencoder.heap_type(r.heap_type()).map_err(|e| UnwindError::Encode(format!("{e:?}")))?,
            ),
            ValType::Ref(_) => {
                return Err(UnwindError::Unsupported {
                    feature: "a non-nullable reference live across a suspension point".into(),
                    func: Some(self.func),
                });
            }
        })
    }

    /// Pushes the value on top of the operand stack onto the unwind stack.
    fn save_value(&mut self, ty: ValType) -> Result<(), UnwindError> {
        match save_class(ty).map_err(|feature| UnwindError::Unsupported { feature, func: Some(self.func) })? {
            SaveClass::Value(class) => self.push(Instruction::Call(self.helpers.push[class as usize])),
            SaveClass::NullOnly => {
                // Only a null reference can be saved: anything else fails the unwind.
                self.push(Instruction::RefIsNull);
                self.push(Instruction::I32Eqz);
                self.push(Instruction::If(BlockType::Empty));
                self.push(Instruction::Call(self.helpers.fail));
                self.push(Instruction::End);
            }
        }
        Ok(())
    }

    fn restore_value(&mut self, ty: ValType) -> Result<(), UnwindError> {
        match save_class(ty).map_err(|feature| UnwindError::Unsupported { feature, func: Some(self.func) })? {
            SaveClass::Value(class) => self.push(Instruction::Call(self.helpers.pop[class as usize])),
            SaveClass::NullOnly => self.dummy(ty)?,
        }
        Ok(())
    }

    /// Maps a branch depth of the original code to the instrumented code.
    fn map_depth(&self, depth: u32) -> u32 {
        let mut originals = 0;
        for (k, frame) in self.frames.iter().rev().enumerate() {
            if *frame == Frame::Original {
                if originals == depth {
                    return k as u32;
                }
                originals += 1;
            }
        }
        unreachable!("branch depth {depth} beyond the function frame (the validator accepted it)")
    }

    fn relabel(&self, instruction: Instruction<'a>) -> Instruction<'a> {
        use Instruction as I;
        match instruction {
            I::Br(d) => I::Br(self.map_depth(d)),
            I::BrIf(d) => I::BrIf(self.map_depth(d)),
            I::BrOnNull(d) => I::BrOnNull(self.map_depth(d)),
            I::BrOnNonNull(d) => I::BrOnNonNull(self.map_depth(d)),
            I::BrTable(targets, default) => I::BrTable(
                targets.iter().map(|&d| self.map_depth(d)).collect::<Vec<_>>().into(),
                self.map_depth(default),
            ),
            I::BrOnCast { relative_depth, from_ref_type, to_ref_type } => {
                I::BrOnCast { relative_depth: self.map_depth(relative_depth), from_ref_type, to_ref_type }
            }
            I::BrOnCastFail { relative_depth, from_ref_type, to_ref_type } => {
                I::BrOnCastFail { relative_depth: self.map_depth(relative_depth), from_ref_type, to_ref_type }
            }
            I::TryTable(bt, catches) => {
                let catches: Vec<Catch> = catches
                    .iter()
                    .map(|c| match *c {
                        Catch::One { tag, label } => Catch::One { tag, label: self.map_depth(label) },
                        Catch::OneRef { tag, label } => Catch::OneRef { tag, label: self.map_depth(label) },
                        Catch::All { label } => Catch::All { label: self.map_depth(label) },
                        Catch::AllRef { label } => Catch::AllRef { label: self.map_depth(label) },
                    })
                    .collect();
                I::TryTable(bt, catches.into())
            }
            other => other,
        }
    }

    /// The instrumented function and its branch hints (offsets from the body's start).
    pub(crate) fn emit(
        mut self,
        body: &FunctionBody<'a>,
    ) -> Result<(Function, Vec<wasm_encoder::BranchHint>), UnwindError> {
        self.prologue()?;
        let mut open: Vec<Option<usize>> = Vec::new();
        let mut structure_counter = 0usize;
        let mut ops = body.get_operators_reader()?;
        let mut index = 0usize;
        while !ops.eof() {
            let op = ops.read()?;
            if !self.continues_chain(index, &op) {
                self.flush_exits()?;
            }
            self.guard_boundaries(index)?;
            if let Some(&site) = self.plan.site_at.get(&index) {
                self.emit_site(site, Some(&op))?;
            } else {
                match &op {
                    Operator::Block { .. }
                    | Operator::Loop { .. }
                    | Operator::If { .. }
                    | Operator::TryTable { .. } => {
                        let id = structure_counter;
                        structure_counter += 1;
                        open.push(Some(id));
                        if self.plan.structure_at.get(&index) == Some(&id) {
                            self.open_structure(id, op)?;
                        } else {
                            // `try_table` catch labels count frames outside it.
                            let instruction = self.convert(op)?;
                            let instruction = self.relabel(instruction);
                            self.push(instruction);
                            self.frames.push(Frame::Original);
                        }
                    }
                    Operator::Else => {
                        debug_assert!(self.active_guard.is_none() || !self.else_of.contains_key(&index));
                        self.push(Instruction::Else);
                        // Rewinding to a site after the `if` enters its `else` arm: leave it.
                        if let Some(&id) = self.else_of.get(&index)
                            && self.plan.structures[id].skippable
                            && !self.lean
                        {
                            self.pending_exits.push(id);
                        }
                    }
                    Operator::End => match open.pop() {
                        Some(Some(id)) => self.close_structure(id)?,
                        Some(None) => unreachable!(),
                        None => self.epilogue()?,
                    },
                    _ => {
                        let instruction = self.convert(op)?;
                        let instruction = self.relabel(instruction);
                        self.push(instruction);
                    }
                }
            }
            index += 1;
        }
        let mut groups: Vec<(u32, wasm_encoder::ValType)> = Vec::new();
        let params = self.param_count;
        for &ty in &self.locals[params..] {
            let ty = enc(ty)?;
            match groups.last_mut() {
                Some((n, last)) if *last == ty => *n += 1,
                _ => groups.push((1, ty)),
            }
        }
        let mut function = Function::new(groups);
        let mut hints = Vec::with_capacity(self.hints.len());
        let mut next_hint = self.hints.iter().peekable();
        for (i, instruction) in self.out.iter().enumerate() {
            if let Some(&&(at, taken)) = next_hint.peek()
                && at == i
            {
                let offset = function.byte_len() as u32;
                hints.push(wasm_encoder::BranchHint { branch_func_offset: offset, branch_hint_value: taken as u32 });
                next_hint.next();
            }
            match (self.remap, instruction) {
                (Some(remap), Instruction::Call(f)) => function.instruction(&Instruction::Call(remap(*f))),
                (Some(remap), Instruction::ReturnCall(f)) => function.instruction(&Instruction::ReturnCall(remap(*f))),
                (Some(remap), Instruction::RefFunc(f)) => function.instruction(&Instruction::RefFunc(remap(*f))),
                _ => function.instruction(instruction),
            };
        }
        Ok((function, hints))
    }

    fn convert(&self, op: Operator<'a>) -> Result<Instruction<'a>, UnwindError> {
        RoundtripReencoder.instruction(op).map_err(|e| UnwindError::Encode(format!("{e:?}")))
    }

    fn prologue(&mut self) -> Result<(), UnwindError> {
        if self.lean {
            if self.prologue {
                // Rewinding: continue in the rewind copy, in place of this frame.
                self.state_is(REWINDING);
                self.hint(false);
                self.push(Instruction::If(BlockType::Empty));
                for param in 0..self.param_count as u32 {
                    self.push(Instruction::LocalGet(param));
                }
                self.push(Instruction::I32Const(self.func as i32));
                self.push(Instruction::ReturnCallIndirect {
                    type_index: self.type_index,
                    table_index: self.helpers.copies,
                });
                self.push(Instruction::End);
            }
            return self.open_body();
        }
        // Rewinding: pop this function's frame, learn the target site, reload the locals.
        self.state_is(REWINDING);
        self.hint(false);
        self.push(Instruction::If(BlockType::Empty));
        self.push(Instruction::I32Const(self.frame_bytes as i32));
        self.push(Instruction::Call(self.helpers.release));
        self.push(Instruction::LocalTee(self.base));
        self.push(Instruction::I32Load(self.helpers.memarg(self.header(), 2)));
        self.push(Instruction::LocalSet(self.target));
        // A frame of another function means a corrupt image: stop cleanly.
        self.push(Instruction::LocalGet(self.base));
        self.push(Instruction::I32Load(self.helpers.memarg(self.header() + HEADER_FUNC, 2)));
        self.push(Instruction::I32Const(self.func as i32));
        self.push(Instruction::I32Ne);
        self.push(Instruction::If(BlockType::Empty));
        self.push(Instruction::Call(self.helpers.fail));
        self.push(Instruction::End);
        self.restore_frame()?;
        self.push(Instruction::End);
        self.open_body()
    }

    /// One block per shared save path around the block holding the original body.
    fn open_body(&mut self) -> Result<(), UnwindError> {
        for _ in 0..self.groups.len() {
            self.push(Instruction::Block(BlockType::Empty));
            self.frames.push(Frame::Synthetic);
        }
        let results = self.results.clone();
        let bt = self.block_type(&[], &results)?;
        self.push(Instruction::Block(bt));
        self.frames.push(Frame::Original);
        Ok(())
    }

    /// Reloads every slot of the frame at `base`, then the references (pushed after the
    /// operands, so popped before the target site pops those).
    fn restore_frame(&mut self) -> Result<(), UnwindError> {
        let slots: Vec<u32> = self.slots.keys().copied().collect();
        for &local in &slots {
            match self.slots[&local] {
                Slot::Memory(offset) => {
                    self.push(Instruction::LocalGet(self.base));
                    self.push(self.helpers.load(self.class_of(local), offset));
                    self.push(Instruction::LocalSet(local));
                }
                Slot::NullOnly => {
                    self.dummy(self.locals[local as usize])?;
                    self.push(Instruction::LocalSet(local));
                }
                Slot::Reference => {}
            }
        }
        let references: Vec<u32> =
            self.slots.iter().filter(|(_, s)| matches!(s, Slot::Reference)).map(|(&l, _)| l).collect();
        for local in references.into_iter().rev() {
            self.restore_value(self.locals[local as usize])?;
            self.push(Instruction::LocalSet(local));
        }
        Ok(())
    }

    fn epilogue(&mut self) -> Result<(), UnwindError> {
        self.push(Instruction::End);
        self.frames.pop();
        if !self.groups.is_empty() {
            self.push(Instruction::Return);
            // Innermost block first: each save path follows the end of its block.
            for g in (0..self.groups.len()).rev() {
                self.close_synthetic();
                let saves = self.groups[g].clone();
                self.save_frame(&saves, SiteId::Shared)?;
            }
        }
        self.push(Instruction::End);
        Ok(())
    }

    fn class_of(&self, local: u32) -> super::support::Class {
        match save_class(self.locals[local as usize]) {
            Ok(SaveClass::Value(class)) => class,
            _ => unreachable!("memory slots hold plain values"),
        }
    }

    /// The end of an unwind at site `id` (its operands already saved): the frame, then
    /// leave the function; or, when other sites save the same locals, a branch to the
    /// save path they share.
    /// Unwinding at site `id`: saves the values kept beneath it (in `kept_locals`, of the
    /// first types of `frame`), then its frame, and returns.
    fn save_kept_and_unwind(&mut self, id: usize, frame: &[ValType], kept_locals: &[u32]) -> Result<(), UnwindError> {
        for (&local, &ty) in kept_locals.iter().zip(frame).rev() {
            self.push(Instruction::LocalGet(local));
            self.save_value(ty)?;
        }
        let kept_bytes = frame[..kept_locals.len()].iter().map(|&ty| stack_bytes(ty)).sum();
        self.unwind_at(id, kept_bytes)
    }

    fn unwind_at(&mut self, id: usize, kept_bytes: u32) -> Result<(), UnwindError> {
        let entry = (self.frame_bytes + kept_bytes) as i32;
        match self.site_group[id] {
            Some(g) => {
                self.push(Instruction::I32Const(id as i32));
                self.push(Instruction::LocalSet(self.shared_site));
                self.push(Instruction::I32Const(entry));
                self.push(Instruction::LocalSet(self.shared_entry));
                // Group blocks sit right inside the function frame, outermost first.
                let depth = self.frames.len() - 2 - g;
                self.push(Instruction::Br(depth as u32));
                Ok(())
            }
            None => {
                let saves = self.site_saves[id].clone();
                self.save_frame(&saves, SiteId::Const { id: id as u32, entry })
            }
        }
    }

    /// In a full body, the call at a site whose callee may be a lean body: while
    /// rewinding, that callee's frame is the next on the unwind stack, and a lean body
    /// without a prologue cannot rewind, so the call enters its copy (the copies table at
    /// the callee's index: known here for a direct call, read from the frame's header for
    /// a call through a table). Where the table can hold a blocking import
    /// (`import_callee`), an empty unwind stack means the callee is that import: called
    /// as it is, with the index the unwind saved. Answers whether it emitted the call
    /// (with its operands).
    fn rewind_call(
        &mut self,
        call: &Instruction<'a>,
        operands: &[u32],
        results: &[ValType],
        import_callee: bool,
    ) -> Result<bool, UnwindError> {
        let copies = self.helpers.copies;
        // The callee, when the call names it.
        let (type_index, direct) = match *call {
            Instruction::Call(f) if self.lean_funcs.get(f as usize) == Some(&true) => {
                (self.func_types[f as usize], Some(f))
            }
            Instruction::CallIndirect { type_index, .. } => (type_index, None),
            _ => return Ok(false),
        };
        let bt = self.block_type(&[], results)?;
        self.state_is(REWINDING);
        self.hint(false);
        self.push(Instruction::If(bt));
        self.frames.push(Frame::Synthetic);
        if let Some(f) = direct {
            self.push_locals(operands);
            self.push(Instruction::I32Const(f as i32));
            self.push(Instruction::CallIndirect { type_index, table_index: copies });
        } else if !import_callee {
            self.call_copy_of_top_frame(&operands[..operands.len() - 1], type_index);
        } else {
            self.get(Var::Sp);
            self.push(Instruction::I32Const(self.helpers.empty_sp()));
            self.push(Instruction::I32Eq);
            self.push(Instruction::If(bt));
            self.frames.push(Frame::Synthetic);
            self.push_locals(operands);
            self.push(call.clone());
            self.push(Instruction::Else);
            self.call_copy_of_top_frame(&operands[..operands.len() - 1], type_index);
            self.close_synthetic();
        }
        self.push(Instruction::Else);
        self.push_locals(operands);
        self.push(call.clone());
        self.close_synthetic();
        Ok(true)
    }

    /// Calls, with the arguments in `args`, the rewind copy of the function whose frame
    /// is on top of the unwind stack (its header ends the stack).
    fn call_copy_of_top_frame(&mut self, args: &[u32], type_index: u32) {
        self.push_locals(args);
        self.get(Var::Sp);
        self.push(Instruction::I32Const((HEADER_BYTES - HEADER_FUNC) as i32));
        self.push(Instruction::I32Sub);
        self.push(Instruction::I32Load(self.helpers.memarg(0, 2)));
        self.push(Instruction::CallIndirect { type_index, table_index: self.helpers.copies });
    }

    /// Writes the frame of the locals `saves`, then leaves the function.
    fn save_frame(&mut self, saves: &[u32], site: SiteId) -> Result<(), UnwindError> {
        let references: Vec<u32> =
            self.slots.iter().filter(|(_, s)| matches!(s, Slot::Reference)).map(|(&l, _)| l).collect();
        for local in references {
            self.push(Instruction::LocalGet(local));
            self.save_value(self.locals[local as usize])?;
        }
        for &local in saves {
            if let Slot::NullOnly = self.slots[&local] {
                self.push(Instruction::LocalGet(local));
                self.save_value(self.locals[local as usize])?;
            }
        }
        self.push(Instruction::I32Const(self.frame_bytes as i32));
        self.push(Instruction::Call(self.helpers.reserve));
        self.push(Instruction::LocalTee(self.base));
        let func = (self.func as u64) << 32;
        match site {
            SiteId::Const { id, entry } => {
                self.push(Instruction::I64Const((func | id as u64) as i64));
                self.push(Instruction::I64Store(self.helpers.memarg(self.header(), 3)));
                self.push(Instruction::LocalGet(self.base));
                self.push(Instruction::I32Const(entry));
            }
            SiteId::Shared => {
                self.push(Instruction::I64Const(func as i64));
                self.push(Instruction::LocalGet(self.shared_site));
                self.push(Instruction::I64ExtendI32U);
                self.push(Instruction::I64Or);
                self.push(Instruction::I64Store(self.helpers.memarg(self.header(), 3)));
                self.push(Instruction::LocalGet(self.base));
                self.push(Instruction::LocalGet(self.shared_entry));
            }
        }
        self.push(Instruction::I32Store(self.helpers.memarg(self.header() + 8, 2)));
        for &local in saves {
            if let Slot::Memory(offset) = self.slots[&local] {
                self.push(Instruction::LocalGet(self.base));
                self.push(Instruction::LocalGet(local));
                self.push(self.helpers.store(self.class_of(local), offset));
            }
        }
        for ty in self.results.clone() {
            self.dummy(ty)?;
        }
        self.push(Instruction::Return);
        Ok(())
    }

    /// Closes the guard that ends here and opens the one that starts here.
    fn guard_boundaries(&mut self, index: usize) -> Result<(), UnwindError> {
        if let Some(g) = self.active_guard
            && self.plan.guards[g].end == index
        {
            self.close_guard(g)?;
        }
        if let Some(&g) = self.plan.guard_at.get(&index) {
            if self.trivial_guard(g) {
                return Ok(());
            }
            if self.lean {
                self.active_guard = Some(g);
                if self.plan.guards[g].end == index {
                    self.close_guard(g)?;
                }
                return Ok(());
            }
            let params = self.plan.guards[g].params.clone();
            let inputs = self.stash(Pool::GuardIn, &params)?;
            // Runs unless rewinding (state 2): `ARMED` and `NORMAL` both execute it.
            self.get(Var::State);
            self.push(Instruction::I32Const(REWINDING));
            self.push(Instruction::I32Ne);
            self.open_if(true);
            self.push_locals(&inputs);
            self.active_guard = Some(g);
            if self.plan.guards[g].end == index {
                self.close_guard(g)?;
            }
        }
        Ok(())
    }

    /// Ends a guard. Rewinding skipped it: its results are placeholders (whatever the
    /// scratch locals held) that the target site replaces.
    fn close_guard(&mut self, g: usize) -> Result<(), UnwindError> {
        let guard = &self.plan.guards[g];
        let (results, spill_for) = (guard.results.clone(), guard.spill_for);
        if self.lean {
            if let Some(s) = spill_for
                && let Some(spills) = self.spill_locals.get(&s).cloned()
            {
                let outputs = self.stash(Pool::GuardOut, &results)?;
                for &local in spills.iter().rev() {
                    self.push(Instruction::LocalSet(local));
                }
                self.push_locals(&outputs);
            }
            self.active_guard = None;
            return Ok(());
        }
        let outputs = self.stash(Pool::GuardOut, &results)?;
        if let Some(s) = spill_for
            && let Some(spills) = self.spill_locals.get(&s).cloned()
        {
            // Beneath the structure's inputs: the values it must not see, kept in locals.
            for &local in spills.iter().rev() {
                self.push(Instruction::LocalSet(local));
            }
        }
        self.close_synthetic();
        self.push_locals(&outputs);
        self.active_guard = None;
        Ok(())
    }

    fn in_range(&mut self, first: u32, end: u32) {
        self.push(Instruction::LocalGet(self.target));
        self.push(Instruction::I32Const(first as i32));
        self.push(Instruction::I32Sub);
        self.push(Instruction::I32Const((end - first) as i32));
        self.push(Instruction::I32LtU);
    }

    /// Whether operator `index` opens a structure whose exit check can join the pending
    /// ones (so nothing is emitted between them).
    fn continues_chain(&self, index: usize, op: &Operator<'_>) -> bool {
        matches!(op, Operator::Block { .. } | Operator::TryTable { .. })
            && !self.plan.site_at.contains_key(&index)
            && self.plan.structure_at.get(&index).is_some_and(|&id| self.plan.structures[id].skippable)
            && self.active_guard.is_none()
            && self.plan.guard_at.get(&index).is_none_or(|&g| self.trivial_guard(g))
    }

    /// A guard with nothing to skip and nothing to spill: it emits nothing.
    fn trivial_guard(&self, g: usize) -> bool {
        let guard = &self.plan.guards[g];
        let spill = guard.spill_for.map_or(0, |s| self.plan.structures[s].spill.len());
        guard.start == guard.end && spill == 0
    }

    /// Emits the exit checks of the structures just entered: while rewinding to a site
    /// outside one of them, branch out of it (the outermost such one).
    fn flush_exits(&mut self) -> Result<(), UnwindError> {
        if self.pending_exits.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending_exits);
        self.state_is(REWINDING);
        self.hint(false);
        self.push(Instruction::If(BlockType::Empty));
        self.frames.push(Frame::Synthetic);
        for id in pending {
            let st = &self.plan.structures[id];
            let (first, end, results) = (st.first_site, st.site_end, st.results.clone());
            self.in_range(first, end);
            self.push(Instruction::I32Eqz);
            self.push(Instruction::If(BlockType::Empty));
            self.frames.push(Frame::Synthetic);
            for ty in results {
                self.dummy(ty)?;
            }
            let depth = self.frames.len() - 1 - self.frame_of[&id];
            self.push(Instruction::Br(depth as u32));
            self.close_synthetic();
        }
        self.close_synthetic();
        Ok(())
    }

    fn open_structure(&mut self, id: usize, op: Operator<'a>) -> Result<(), UnwindError> {
        let st = &self.plan.structures[id];
        let (kind, first, end, then_end, skippable) =
            (st.kind, st.first_site, st.site_end, st.then_end, st.skippable && !self.lean);
        let inputs = st.inputs.clone();
        // Only loops need a wrapper to be skipped (a branch to a loop's label re-enters
        // it); other structures are left by a branch from inside (`flush_exits`).
        if skippable && kind == StructKind::Loop {
            let entry = self.stash(Pool::LoopIn, &inputs)?;
            // Enter unless rewinding to a site outside.
            self.get(Var::State);
            self.push(Instruction::I32Const(REWINDING));
            self.push(Instruction::I32Ne);
            self.in_range(first, end);
            self.push(Instruction::I32Or);
            self.open_if(true);
            self.push_locals(&entry);
        }
        if kind == StructKind::If && !self.lean {
            // While rewinding, the arm holding the target decides, not the condition.
            // select(condition, target < then_end, state != REWINDING): no block, so no
            // block parameter (see `Pool`).
            self.push(Instruction::LocalGet(self.target));
            self.push(Instruction::I32Const(then_end as i32));
            self.push(Instruction::I32LtU);
            self.get(Var::State);
            self.push(Instruction::I32Const(REWINDING));
            self.push(Instruction::I32Ne);
            self.push(Instruction::Select);
        }
        let instruction = self.convert(op)?;
        let instruction = self.relabel(instruction);
        self.push(instruction);
        self.frames.push(Frame::Original);
        self.frame_of.insert(id, self.frames.len() - 1);
        if skippable && matches!(kind, StructKind::Block | StructKind::TryTable) {
            self.pending_exits.push(id);
        }
        if kind == StructKind::Loop
            && let Some(&site) = self.loop_site_at.get(&self.plan.structures[id].start)
        {
            self.emit_site(site, None)?;
        }
        Ok(())
    }

    fn close_structure(&mut self, id: usize) -> Result<(), UnwindError> {
        self.push(Instruction::End);
        self.frames.pop();
        let st = &self.plan.structures[id];
        if !st.open() {
            return Ok(());
        }
        let (results, skippable) = (st.results.clone(), st.skippable && !self.lean);
        if skippable && st.kind == StructKind::Loop {
            // Skipped while rewinding: its results are placeholders.
            let exit = self.stash(Pool::LoopOut, &results)?;
            self.close_synthetic();
            self.push_locals(&exit);
        }
        if let Some(spills) = self.spill_locals.get(&id).cloned() {
            let temps = self.stash(Pool::Exit, &results)?;
            self.push_locals(&spills);
            self.push_locals(&temps);
        }
        Ok(())
    }

    fn emit_site(&mut self, id: usize, op: Option<&Operator<'a>>) -> Result<(), UnwindError> {
        let site: &Site = &self.plan.sites[id];
        let frame = site.frame.clone();
        let kept = site.saved().len();
        let (params, results) = (site.params.clone(), site.results.clone());
        let (loop_check, skippable, repeatable, tail) =
            (site.loop_check, site.skippable && !self.lean, site.repeatable(), site.tail);
        let keep_index = site.import_callee;
        let lean = self.lean;
        // The whole frame goes to locals: beneath the call (kept) and its operands.
        let frame_locals = self.stash(Pool::Frame, &frame)?;
        let (kept_locals, operands) = frame_locals.split_at(kept);
        let (kept_locals, operands) = (kept_locals.to_vec(), operands.to_vec());
        if loop_check && lean {
            // A lean body never rewinds here, so an armed stop unwinds at once: the yield
            // helper's test inlined, no call on the way out. A call there, however cold,
            // made Cranelift keep what the loop holds across it in stack slots on the hot
            // path too (CPython's dispatch loop: its opcode went through memory).
            self.state_is(ARMED);
            self.open_if(false);
            for i in self.helpers.set_const(Var::State, UNWINDING) {
                self.push(i);
            }
            self.save_kept_and_unwind(id, &frame, &kept_locals)?;
            self.close_synthetic();
            self.push_locals(&kept_locals);
            return Ok(());
        }
        if loop_check {
            // The cheap test every iteration pays: state is 0 unless the host armed a stop.
            self.get(Var::State);
            self.open_if(false);
        }
        if skippable {
            self.push(Instruction::Block(BlockType::Empty));
            self.frames.push(Frame::Synthetic);
        }
        let site_depth = self.frames.len();
        let mut arg_locals = Vec::with_capacity(params.len());
        if repeatable {
            let mut used: HashMap<ValType, usize> = HashMap::new();
            for &ty in &params {
                let n = used.entry(ty).or_default();
                arg_locals.push(self.arg_locals[&ty][*n]);
                *n += 1;
            }
        }
        if !lean && (skippable || kept > 0 || repeatable) {
            // Rewinding: skip this site for a later one, or reload what the unwind saved
            // here (the operands beneath the call, an import's arguments, a table call's
            // index).
            self.state_is(REWINDING);
            self.open_if(false);
            if skippable {
                self.push(Instruction::LocalGet(self.target));
                self.push(Instruction::I32Const(id as i32));
                self.push(Instruction::I32Ne);
                self.push(Instruction::If(BlockType::Empty));
                self.frames.push(Frame::Synthetic);
                let depth = self.frames.len() - site_depth;
                self.push(Instruction::Br(depth as u32));
                self.close_synthetic();
            }
            for (k, &ty) in frame[..kept].iter().enumerate() {
                self.restore_value(ty)?;
                self.push(Instruction::LocalSet(kept_locals[k]));
            }
            for (&arg, &slot) in arg_locals.iter().zip(&operands) {
                self.push(Instruction::LocalGet(arg));
                self.push(Instruction::LocalSet(slot));
            }
            if keep_index {
                self.push(Instruction::LocalGet(self.index_local.expect("index local")));
                self.push(Instruction::LocalSet(*operands.last().expect("index operand")));
            }
            self.close_synthetic();
        }
        for (&arg, &slot) in arg_locals.iter().zip(&operands) {
            self.push(Instruction::LocalGet(slot));
            self.push(Instruction::LocalSet(arg));
        }
        if keep_index {
            self.push(Instruction::LocalGet(*operands.last().expect("index operand")));
            self.push(Instruction::LocalSet(self.index_local.expect("index local")));
        }
        let call = match op {
            None => Instruction::Call(self.helpers.yield_fn),
            Some(Operator::Call { function_index } | Operator::ReturnCall { function_index }) => {
                Instruction::Call(*function_index)
            }
            Some(
                Operator::CallIndirect { type_index, table_index }
                | Operator::ReturnCallIndirect { type_index, table_index },
            ) => Instruction::CallIndirect { type_index: *type_index, table_index: *table_index },
            Some(other) => return Err(UnwindError::Encode(format!("unexpected site operator {other:?}"))),
        };
        if self.lean || !self.rewind_call(&call, &operands, &results, keep_index)? {
            self.push_locals(&operands);
            self.push(call);
        }
        self.state_is(UNWINDING);
        self.open_if(false);
        // The call's results stay beneath this block, unused: the function returns.
        self.save_kept_and_unwind(id, &frame, &kept_locals)?;
        self.close_synthetic();
        if tail {
            // `return_call`: nothing follows in this sequence (the planner saw it unreachable).
            self.push(Instruction::Return);
        }
        let wrapped = skippable || loop_check;
        let result_locals = if !tail && !results.is_empty() && (wrapped || kept > 0) {
            self.stash(Pool::Results, &results)?
        } else {
            Vec::new()
        };
        if skippable {
            self.close_synthetic();
        }
        if loop_check {
            self.close_synthetic();
        }
        if !tail {
            // Skipped while rewinding: placeholders, replaced by the target site's frame.
            self.push_locals(&kept_locals);
            self.push_locals(&result_locals);
        }
        Ok(())
    }
}

/// A frame's header, at its top: the site (`u32`), the function (`u32`), and the bytes
/// of the whole entry (`u32`: the frame and the operands saved beneath it), so the host
/// can walk the unwind stack from its top and learn which functions are on it.
pub(crate) const HEADER_BYTES: u32 = 16;

/// Offset of the function's index in a frame's header.
pub(crate) const HEADER_FUNC: u32 = 4;

/// Bytes a saved operand of `ty` takes on the unwind stack (function references go to
/// the reference stack; other references are not written).
fn stack_bytes(ty: ValType) -> u32 {
    match save_class(ty) {
        Ok(SaveClass::Value(super::support::Class::FuncRef)) | Ok(SaveClass::NullOnly) | Err(_) => 0,
        Ok(SaveClass::Value(super::support::Class::V128)) => 16,
        Ok(SaveClass::Value(_)) => 8,
    }
}

/// How a frame's header learns its site.
#[derive(Clone, Copy)]
enum SiteId {
    Const {
        id: u32,
        entry: i32,
    },
    /// From the locals a site sets before it branches to a shared save path.
    Shared,
}

/// Most save paths a function shares (each is a block around its body).
const MAX_SHARED_SAVES: usize = 1024;

/// Groups the sites that save the same locals, so they share one save path: GCC's `cc1`
/// saves the same dozen locals at each of thousands of sites of a function, and writing
/// them out at every site made its largest function four times its size. A shared path
/// is a join of cold branches only, and each site still passes just the locals it
/// saves, so the normal path and the values live across it do not change. Sets saved
/// at one site only stay inline; answers each site's group and each group's locals.
fn shared_saves(site_saves: &[Vec<u32>]) -> (Vec<Option<usize>>, Vec<Vec<u32>>) {
    let mut counts: HashMap<&[u32], usize> = HashMap::new();
    for saves in site_saves {
        *counts.entry(saves.as_slice()).or_default() += 1;
    }
    let mut shared: Vec<(&[u32], usize)> = counts.into_iter().filter(|&(_, n)| n > 1).collect();
    // Most used first, then by content: the output must not depend on hash order.
    shared.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    shared.truncate(MAX_SHARED_SAVES);
    let groups: Vec<Vec<u32>> = shared.iter().map(|(saves, _)| saves.to_vec()).collect();
    let index: HashMap<&[u32], usize> = groups.iter().enumerate().map(|(g, s)| (s.as_slice(), g)).collect();
    let site_group = site_saves.iter().map(|saves| index.get(saves.as_slice()).copied()).collect();
    (site_group, groups)
}
