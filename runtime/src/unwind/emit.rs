//! Emits an instrumented function from its plan.
//!
//! The shape of every instrumented function:
//! ```text
//! if state == REWINDING { target = pop(); locals = pop()... }     ;; prologue
//! block $unwind
//!   block $body (result R)  <original body, instrumented>  end
//!   return
//! end
//! push(locals...); push(unwind_site); <dummy R>                     ;; unwind tail
//! ```
//! At a site, after the call: `if state == UNWINDING { save the frame's operands; br $unwind }`.
//! While rewinding, guards skip the code between sites, open structures are entered only
//! when they hold the target site, and the target site reloads its operands before
//! calling again.

use super::plan::{FuncPlan, Site, StructKind};
use super::support::{Helpers, SaveClass, TypeInterner, save_class};
use super::{REWINDING, UNWINDING, UnwindError};
use std::collections::HashMap;
use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasm_encoder::{BlockType, Catch, Function, Instruction};
use wasmparser::{FunctionBody, Operator, ValType};

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
    /// Locals a rewind restores, in push order.
    saved: Vec<u32>,
    target: u32,
    unwind_site: u32,
    index_local: Option<u32>,
    /// Argument locals of import sites, by type, reused between sites.
    arg_locals: HashMap<ValType, Vec<u32>>,
    /// Spill locals per open structure, bottom first.
    spill_locals: HashMap<usize, Vec<u32>>,
    scratch: HashMap<ValType, Vec<u32>>,
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
}

fn enc(ty: ValType) -> Result<wasm_encoder::ValType, UnwindError> {
    RoundtripReencoder.val_type(ty).map_err(|e| UnwindError::Encode(format!("{e:?}")))
}

impl<'a, 'p> Emitter<'a, 'p> {
    pub(crate) fn new(
        plan: &'p FuncPlan,
        helpers: &'p Helpers,
        types: &'p mut TypeInterner,
        func: u32,
        params: &[ValType],
        results: &[ValType],
        body: &FunctionBody<'a>,
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
            saved: (0..locals.len() as u32).collect(),
            locals,
            target: 0,
            unwind_site: 0,
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
        };
        for &local in &emitter.saved.clone() {
            save_class(emitter.locals[local as usize])
                .map_err(|feature| UnwindError::Unsupported { feature, func: Some(func) })?;
        }
        // Locals that must survive an unwind are allocated first, so the prologue knows them.
        if plan.sites.iter().any(|s| s.indirect) {
            emitter.index_local = Some(emitter.saved_local(ValType::I32));
        }
        // In order of first use, so the output (local numbers, hence the saved frame
        // layout) is the same on every host: images move between them.
        let mut needed: Vec<(ValType, usize)> = Vec::new();
        for site in plan.sites.iter().filter(|s| s.import) {
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
            let list: Vec<u32> = (0..n).map(|_| emitter.saved_local(ty)).collect();
            emitter.arg_locals.insert(ty, list);
        }
        for (id, st) in plan.structures.iter().enumerate() {
            if st.open() && !st.spill.is_empty() {
                let list = st.spill.iter().map(|&ty| emitter.saved_local(ty)).collect();
                emitter.spill_locals.insert(id, list);
            }
        }
        emitter.target = emitter.new_local(ValType::I32);
        emitter.unwind_site = emitter.new_local(ValType::I32);
        Ok(emitter)
    }

    fn new_local(&mut self, ty: ValType) -> u32 {
        self.locals.push(ty);
        self.locals.len() as u32 - 1
    }

    fn saved_local(&mut self, ty: ValType) -> u32 {
        let local = self.new_local(ty);
        self.saved.push(local);
        local
    }

    /// The `n`th scratch local of `ty`: free between instrumentation sequences.
    fn scratch(&mut self, ty: ValType, n: usize) -> u32 {
        while self.scratch.get(&ty).map_or(0, Vec::len) <= n {
            let local = self.new_local(ty);
            self.scratch.entry(ty).or_default().push(local);
        }
        self.scratch[&ty][n]
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

    fn open_synthetic(
        &mut self,
        kind: fn(BlockType) -> Instruction<'a>,
        params: &[ValType],
        results: &[ValType],
    ) -> Result<(), UnwindError> {
        let bt = self.block_type(params, results)?;
        self.push(kind(bt));
        self.frames.push(Frame::Synthetic);
        Ok(())
    }

    fn close_synthetic(&mut self) {
        self.push(Instruction::End);
        let popped = self.frames.pop();
        debug_assert!(popped == Some(Frame::Synthetic));
    }

    fn state_is(&mut self, value: i32) {
        self.push(Instruction::GlobalGet(self.helpers.state));
        self.push(Instruction::I32Const(value));
        self.push(Instruction::I32Eq);
    }

    fn dummy(&mut self, ty: ValType) -> Result<(), UnwindError> {
        let instruction = match ty {
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
        };
        self.push(instruction);
        Ok(())
    }

    fn drop_n(&mut self, n: usize) {
        for _ in 0..n {
            self.push(Instruction::Drop);
        }
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

    /// Depth of the `$unwind` block from here.
    fn unwind_depth(&self) -> u32 {
        self.frames.len() as u32 - 2
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
            function.instruction(instruction);
        }
        Ok((function, hints))
    }

    fn convert(&self, op: Operator<'a>) -> Result<Instruction<'a>, UnwindError> {
        RoundtripReencoder.instruction(op).map_err(|e| UnwindError::Encode(format!("{e:?}")))
    }

    fn prologue(&mut self) -> Result<(), UnwindError> {
        self.state_is(REWINDING);
        self.hint(false);
        self.push(Instruction::If(BlockType::Empty));
        self.push(Instruction::Call(self.helpers.pop[0]));
        self.push(Instruction::LocalSet(self.target));
        for local in self.saved.clone().into_iter().rev() {
            self.restore_value(self.locals[local as usize])?;
            self.push(Instruction::LocalSet(local));
        }
        self.push(Instruction::End);
        self.push(Instruction::Block(BlockType::Empty));
        self.frames.push(Frame::Synthetic);
        let results = self.results.clone();
        let bt = self.block_type(&[], &results)?;
        self.push(Instruction::Block(bt));
        self.frames.push(Frame::Original);
        Ok(())
    }

    fn epilogue(&mut self) -> Result<(), UnwindError> {
        self.push(Instruction::End);
        self.frames.pop();
        self.push(Instruction::Return);
        self.push(Instruction::End);
        self.frames.pop();
        for local in self.saved.clone() {
            self.push(Instruction::LocalGet(local));
            self.save_value(self.locals[local as usize])?;
        }
        self.push(Instruction::LocalGet(self.unwind_site));
        self.push(Instruction::Call(self.helpers.push[0]));
        for ty in self.results.clone() {
            self.dummy(ty)?;
        }
        self.push(Instruction::End);
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
            let guard = &self.plan.guards[g];
            let (params, results) = (guard.params.clone(), guard.results.clone());
            // Runs unless rewinding (state 2): `ARMED` and `NORMAL` both execute it.
            self.push(Instruction::GlobalGet(self.helpers.state));
            self.push(Instruction::I32Const(REWINDING));
            self.push(Instruction::I32Ne);
            self.hint(true);
            self.open_synthetic(Instruction::If, &params, &results)?;
            self.active_guard = Some(g);
            if guard.end == index {
                self.close_guard(g)?;
            }
        }
        Ok(())
    }

    fn close_guard(&mut self, g: usize) -> Result<(), UnwindError> {
        let guard = &self.plan.guards[g];
        if let Some(s) = guard.spill_for
            && let Some(spills) = self.spill_locals.get(&s).cloned()
        {
            // Stack: [spill..., inputs...]: set the inputs aside, keep the spill in locals.
            let inputs = self.plan.structures[s].inputs.clone();
            let temps = self.stash(&inputs);
            for &local in spills.iter().rev() {
                self.push(Instruction::LocalSet(local));
            }
            for local in temps {
                self.push(Instruction::LocalGet(local));
            }
        }
        let (params, results) = (guard.params.len(), guard.results.clone());
        self.push(Instruction::Else);
        self.drop_n(params);
        for ty in results {
            self.dummy(ty)?;
        }
        self.close_synthetic();
        self.active_guard = None;
        Ok(())
    }

    /// Pops `types` (top of stack last in the slice) into scratch locals, returned in
    /// stack order.
    fn stash(&mut self, types: &[ValType]) -> Vec<u32> {
        let mut used: HashMap<ValType, usize> = HashMap::new();
        let mut temps = Vec::with_capacity(types.len());
        for &ty in types {
            let n = used.entry(ty).or_default();
            temps.push(self.scratch(ty, *n));
            *n += 1;
        }
        for &local in temps.iter().rev() {
            self.push(Instruction::LocalSet(local));
        }
        temps
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
        let (kind, first, end, then_end, skippable) = (st.kind, st.first_site, st.site_end, st.then_end, st.skippable);
        let (inputs, results) = (st.inputs.clone(), st.results.clone());
        // Only loops need a wrapper to be skipped (a branch to a loop's label re-enters
        // it); other structures are left by a branch from inside (`flush_exits`).
        if skippable && kind == StructKind::Loop {
            // Enter unless rewinding to a site outside.
            self.push(Instruction::GlobalGet(self.helpers.state));
            self.push(Instruction::I32Const(REWINDING));
            self.push(Instruction::I32Ne);
            self.in_range(first, end);
            self.push(Instruction::I32Or);
            self.hint(true);
            self.open_synthetic(Instruction::If, &inputs, &results)?;
        }
        if kind == StructKind::If {
            // While rewinding, the arm holding the target decides, not the condition.
            self.state_is(REWINDING);
            self.hint(false);
            self.open_synthetic(Instruction::If, &[ValType::I32], &[ValType::I32])?;
            self.push(Instruction::Drop);
            self.push(Instruction::LocalGet(self.target));
            self.push(Instruction::I32Const(then_end as i32));
            self.push(Instruction::I32LtU);
            self.close_synthetic();
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
        let (inputs, results, skippable) = (st.inputs.len(), st.results.clone(), st.skippable);
        if skippable && st.kind == StructKind::Loop {
            self.push(Instruction::Else);
            self.drop_n(inputs);
            for &ty in &results {
                self.dummy(ty)?;
            }
            self.close_synthetic();
        }
        if let Some(spills) = self.spill_locals.get(&id).cloned() {
            let temps = self.stash(&results);
            for local in spills {
                self.push(Instruction::LocalGet(local));
            }
            for local in temps {
                self.push(Instruction::LocalGet(local));
            }
        }
        Ok(())
    }

    fn emit_site(&mut self, id: usize, op: Option<&Operator<'a>>) -> Result<(), UnwindError> {
        let site: &Site = &self.plan.sites[id];
        let frame = site.frame.clone();
        let saved = site.saved().to_vec();
        let (params, results) = (site.params.clone(), site.results.clone());
        let (loop_check, skippable, indirect, import, tail) =
            (site.loop_check, site.skippable, site.indirect, site.import, site.tail);
        let after: Vec<ValType> = saved.iter().chain(&results).copied().collect();
        if loop_check {
            // The cheap test every iteration pays: state is 0 unless the host armed a stop.
            self.push(Instruction::GlobalGet(self.helpers.state));
            self.hint(false);
            self.open_synthetic(Instruction::If, &frame, &frame)?;
        }
        if skippable {
            self.push(Instruction::GlobalGet(self.helpers.state));
            self.push(Instruction::I32Const(REWINDING));
            self.push(Instruction::I32Ne);
            self.push(Instruction::LocalGet(self.target));
            self.push(Instruction::I32Const(id as i32));
            self.push(Instruction::I32Eq);
            self.push(Instruction::I32Or);
            self.hint(true);
            self.open_synthetic(Instruction::If, &frame, &after)?;
        }
        let mut arg_locals = Vec::with_capacity(params.len());
        if import {
            let mut used: HashMap<ValType, usize> = HashMap::new();
            for &ty in &params {
                let n = used.entry(ty).or_default();
                arg_locals.push(self.arg_locals[&ty][*n]);
                *n += 1;
            }
        }
        if !frame.is_empty() {
            // Rewinding to this site: replace the skipped code's placeholders with the
            // operands saved at the unwind.
            self.state_is(REWINDING);
            self.hint(false);
            self.open_synthetic(Instruction::If, &frame, &frame)?;
            self.drop_n(frame.len());
            for &ty in &saved {
                self.restore_value(ty)?;
            }
            for (k, &ty) in params.iter().enumerate() {
                match arg_locals.get(k) {
                    Some(&local) => self.push(Instruction::LocalGet(local)),
                    None => self.dummy(ty)?,
                }
            }
            if indirect {
                self.push(Instruction::LocalGet(self.index_local.expect("index local")));
            }
            self.close_synthetic();
        }
        for &local in arg_locals.iter().rev() {
            self.push(Instruction::LocalSet(local));
        }
        for &local in &arg_locals {
            self.push(Instruction::LocalGet(local));
        }
        if indirect {
            self.push(Instruction::LocalTee(self.index_local.expect("index local")));
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
        self.push(call);
        self.state_is(UNWINDING);
        self.hint(false);
        self.open_synthetic(Instruction::If, &after, &after)?;
        self.drop_n(results.len());
        for &ty in saved.iter().rev() {
            let temp = self.scratch(ty, 0);
            self.push(Instruction::LocalSet(temp));
            self.push(Instruction::LocalGet(temp));
            self.save_value(ty)?;
        }
        self.push(Instruction::I32Const(id as i32));
        self.push(Instruction::LocalSet(self.unwind_site));
        self.push(Instruction::Br(self.unwind_depth()));
        self.close_synthetic();
        if tail {
            self.push(Instruction::Return);
        }
        if skippable {
            self.push(Instruction::Else);
            self.drop_n(frame.len());
            for &ty in &after {
                self.dummy(ty)?;
            }
            self.close_synthetic();
        }
        if loop_check {
            self.close_synthetic();
        }
        Ok(())
    }
}
