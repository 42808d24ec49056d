//! What the transform must do to each function, found before anything is emitted.
//!
//! Three passes: a call-graph scan decides which functions can be on the stack at a
//! suspension (`may_suspend`); a structural pass over each of those finds its sites and
//! which control structures contain one ("open" structures); a pass under wasmparser's
//! validator records the operand-stack types at every place the emitter needs them.

use super::UnwindError;
use std::collections::HashMap;
use wasmparser::{BlockType, FuncType, FunctionBody, Operator, ValType};

/// Facts about the module the passes need.
pub(crate) struct ModuleInfo {
    /// Function types by type index (`None` for struct/array types).
    pub types: Vec<Option<FuncType>>,
    /// Type index of every function, imports first.
    pub func_types: Vec<u32>,
    /// `(module, name)` of every imported function.
    pub func_imports: Vec<(String, String)>,
}

impl ModuleInfo {
    pub fn func_type(&self, type_index: u32) -> Result<&FuncType, UnwindError> {
        self.types.get(type_index as usize).and_then(Option::as_ref).ok_or_else(|| UnwindError::Unsupported {
            feature: format!("type {type_index} is not a function type"),
            func: None,
        })
    }

    pub fn type_of_func(&self, func: u32) -> Result<&FuncType, UnwindError> {
        self.func_type(self.func_types[func as usize])
    }

    pub fn block_signature(&self, ty: BlockType) -> Result<(Vec<ValType>, Vec<ValType>), UnwindError> {
        Ok(match ty {
            BlockType::Empty => (vec![], vec![]),
            BlockType::Type(t) => (vec![], vec![t]),
            BlockType::FuncType(index) => {
                let f = self.func_type(index)?;
                (f.params().to_vec(), f.results().to_vec())
            }
        })
    }
}

/// Call-graph summary of one defined function.
#[derive(Default)]
pub(crate) struct CallSummary {
    pub direct_callees: Vec<u32>,
    /// Type indices of its calls through tables.
    pub indirect_types: Vec<u32>,
    /// It calls a function reference (any candidate might be the callee).
    pub call_ref: bool,
    /// Functions it takes references to (they can end up in a table).
    pub ref_funcs: Vec<u32>,
    /// Operator indices of its loops that contain a call. Only those get a stop check: a
    /// loop without calls ends on its own (`strlen`, a checksum), and checking it would
    /// instrument every leaf with a loop for a stop that comes a moment later anyway.
    pub calling_loops: std::collections::BTreeSet<usize>,
    /// It reads or drops a data or element segment: segments belong to a module, so its
    /// code cannot move to another (a rewind copy).
    pub uses_segments: bool,
}

pub(crate) fn summarize(body: &FunctionBody<'_>) -> Result<CallSummary, UnwindError> {
    let mut summary = CallSummary::default();
    let mut ops = body.get_operators_reader()?;
    // Open structures: the loop's operator index, or `None` for other structures.
    let mut open: Vec<Option<usize>> = Vec::new();
    let mut index = 0usize;
    while !ops.eof() {
        let op = ops.read()?;
        let is_call = matches!(
            op,
            Operator::Call { .. }
                | Operator::CallIndirect { .. }
                | Operator::CallRef { .. }
                | Operator::ReturnCall { .. }
                | Operator::ReturnCallIndirect { .. }
                | Operator::ReturnCallRef { .. }
        );
        if is_call {
            summary.calling_loops.extend(open.iter().flatten());
        }
        match op {
            Operator::Loop { .. } => open.push(Some(index)),
            Operator::Block { .. } | Operator::If { .. } | Operator::TryTable { .. } | Operator::Try { .. } => {
                open.push(None)
            }
            Operator::End => {
                open.pop();
            }
            _ => {}
        }
        index += 1;
        match op {
            Operator::Call { function_index } | Operator::ReturnCall { function_index } => {
                summary.direct_callees.push(function_index)
            }
            Operator::CallIndirect { type_index, .. } | Operator::ReturnCallIndirect { type_index, .. } => {
                summary.indirect_types.push(type_index)
            }
            Operator::CallRef { .. } | Operator::ReturnCallRef { .. } => summary.call_ref = true,
            Operator::RefFunc { function_index } => summary.ref_funcs.push(function_index),
            Operator::MemoryInit { .. }
            | Operator::DataDrop { .. }
            | Operator::TableInit { .. }
            | Operator::ElemDrop { .. }
            | Operator::ArrayNewData { .. }
            | Operator::ArrayNewElem { .. }
            | Operator::ArrayInitData { .. }
            | Operator::ArrayInitElem { .. } => summary.uses_segments = true,
            _ => {}
        }
    }
    Ok(summary)
}

/// Which functions can be on the stack when the guest suspends: blocking imports, loops
/// (when preemption is on), and their callers, direct or through a table. A call through a
/// table can only reach a function that can be in one (element segments, `ref.func`) and
/// has the call's signature, so only those are followed.
pub(crate) struct Suspension {
    pub functions: Vec<bool>,
    /// Signatures of table-reachable functions that can suspend.
    signatures: std::collections::HashSet<FuncType>,
    /// Of those, the signatures of blocking imports: a call through a table with one of
    /// them may stop in the import itself, with no frame of the callee on the unwind stack.
    import_signatures: std::collections::HashSet<FuncType>,
    any_reference: bool,
    /// See `UnwindOptions::foreign_signatures`.
    foreign: std::collections::HashSet<FuncType>,
}

impl Suspension {
    pub fn compute(
        info: &ModuleInfo,
        blocking_import: impl Fn(usize) -> bool,
        summaries: &[CallSummary],
        table_funcs: &std::collections::BTreeSet<u32>,
        options: &super::UnwindOptions,
    ) -> Suspension {
        let foreign = &options.foreign_signatures;
        let imports = info.func_imports.len();
        let total = imports + summaries.len();
        let functions: Vec<bool> = (0..total).map(|f| f < imports && blocking_import(f)).collect();
        let mut candidates: Vec<u32> = table_funcs.iter().copied().filter(|&f| (f as usize) < total).collect();
        for s in summaries {
            candidates.extend(s.ref_funcs.iter().copied().filter(|&f| (f as usize) < total));
        }
        candidates.sort_unstable();
        candidates.dedup();
        let mut result = Self::propagate(info, summaries, &candidates, functions, foreign);
        // Loops become stop points of their own only in a program that cannot otherwise
        // stop: where blocking calls are reachable, the functions on their way (an
        // interpreter's dispatch loop, a `main` loop that reads) get loop checks anyway,
        // and making every loop a root would instrument nearly every function (MicroPython
        // ran 2x slower). A call-free loop elsewhere then runs to its end before the stop.
        let blocking_reachable = result.functions[imports..].iter().any(|&f| f);
        if options.preempt_loops && !options.no_loop_roots && !blocking_reachable {
            let mut functions = result.functions;
            for (i, s) in summaries.iter().enumerate() {
                functions[imports + i] |= !s.calling_loops.is_empty();
            }
            result = Self::propagate(info, summaries, &candidates, functions, foreign);
        }
        result
    }

    fn propagate(
        info: &ModuleInfo,
        summaries: &[CallSummary],
        candidates: &[u32],
        functions: Vec<bool>,
        foreign: &std::collections::HashSet<FuncType>,
    ) -> Suspension {
        let imports = info.func_imports.len();
        let signature = |f: u32| info.type_of_func(f).ok().cloned();
        let import_signatures = candidates
            .iter()
            .filter(|&&f| (f as usize) < imports && functions[f as usize])
            .filter_map(|&f| signature(f))
            .collect();
        let mut result = Suspension {
            functions,
            signatures: Default::default(),
            import_signatures,
            any_reference: false,
            foreign: foreign.clone(),
        };
        loop {
            result.signatures =
                candidates.iter().filter(|&&f| result.functions[f as usize]).filter_map(|&f| signature(f)).collect();
            result.any_reference = !result.signatures.is_empty() || !result.foreign.is_empty();
            let mut changed = false;
            for (i, s) in summaries.iter().enumerate() {
                let f = imports + i;
                if result.functions[f] {
                    continue;
                }
                let suspends =
                    s.direct_callees.iter().any(|&c| result.functions.get(c as usize).copied().unwrap_or(false))
                        || s.indirect_types.iter().any(|&t| result.indirect(info, t))
                        || (s.call_ref && result.any_reference);
                if suspends {
                    result.functions[f] = true;
                    changed = true;
                }
            }
            if !changed {
                return result;
            }
        }
    }

    /// Whether a call through a table with this type can reach a function that suspends.
    pub fn indirect(&self, info: &ModuleInfo, type_index: u32) -> bool {
        info.func_type(type_index).map_or(true, |t| self.signatures.contains(t) || self.foreign.contains(t))
    }

    /// Whether a call through a table with this type can reach a blocking import (another
    /// module's function, in a shared table, may be one).
    pub fn indirect_import(&self, info: &ModuleInfo, type_index: u32) -> bool {
        info.func_type(type_index).map_or(true, |t| self.import_signatures.contains(t) || self.foreign.contains(t))
    }
}

/// A sequence of instructions: the function body, or one arm of a structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SeqId {
    /// Index into `FuncPlan::structures`, or `None` for the function body.
    pub structure: Option<usize>,
    /// 1 for the `else` arm of an `if`.
    pub arm: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StructKind {
    Block,
    Loop,
    If,
    TryTable,
}

/// A suspension point.
#[derive(Debug)]
pub(crate) struct Site {
    /// Operator index: the call, or the `loop` whose header holds a preemption check.
    pub op: usize,
    pub loop_check: bool,
    pub seq: SeqId,
    /// Whether other sites follow in the same sequence (then the site is skipped while
    /// rewinding to a later one).
    pub skippable: bool,
    /// The current frame's operand stack before the call (arguments included), or the
    /// loop's parameters for a preemption check.
    pub frame: Vec<ValType>,
    /// Arguments and results of the callee (empty for a preemption check).
    pub params: Vec<ValType>,
    pub results: Vec<ValType>,
    /// A call through a table: its index operand sits above the arguments.
    pub indirect: bool,
    /// A call through a table that may reach a blocking import: the unwind saves the
    /// table index, so a rewind that finds no frame of the callee on the stack (the
    /// import stopped) can repeat the call. Every other callee leaves a frame naming its
    /// function, which a rewind calls instead; keeping the index alive across every call
    /// through a table only for this cost CPython 7 points of its tax.
    pub import_callee: bool,
    /// A host import: its arguments are kept in locals so a rewind can repeat the call.
    pub import: bool,
    /// `return_call*`: emitted as a call followed by `return`.
    pub tail: bool,
}

impl Site {
    /// Whether a rewind may repeat the call into a blocking import itself: then its
    /// arguments (and, through a table, its index) are saved with the frame.
    pub fn repeatable(&self) -> bool {
        self.import || self.import_callee
    }

    /// The values below the call's operands: what must be saved and restored around it.
    pub fn saved(&self) -> &[ValType] {
        let operands = self.params.len() + self.indirect as usize;
        &self.frame[..self.frame.len() - operands]
    }
}

/// A control structure of the original function.
#[derive(Debug)]
pub(crate) struct Structure {
    pub kind: StructKind,
    pub start: usize,
    pub else_op: Option<usize>,
    pub end: usize,
    pub seq: SeqId,
    /// Ids of the sites inside (a structure with any is "open").
    pub first_site: u32,
    pub site_end: u32,
    /// First site id after the `then` arm.
    pub then_end: u32,
    /// Other sites follow in the enclosing sequence: skip the structure while rewinding to them.
    pub skippable: bool,
    /// Block parameters (plus the condition, for `if`) and results.
    pub inputs: Vec<ValType>,
    pub results: Vec<ValType>,
    /// Values of the enclosing frame below the inputs, bottom first: kept in locals
    /// while the structure runs, so that every site sees only its own frame.
    pub spill: Vec<ValType>,
}

impl Structure {
    pub fn open(&self) -> bool {
        self.site_end > self.first_site
    }
}

/// Instructions between two items of a sequence that a rewind must skip.
#[derive(Debug)]
pub(crate) struct Guard {
    pub start: usize,
    pub end: usize,
    pub params: Vec<ValType>,
    pub results: Vec<ValType>,
    /// The open structure that follows, whose spilled values the guard stores.
    pub spill_for: Option<usize>,
}

#[derive(Debug, Default)]
pub(crate) struct FuncPlan {
    pub sites: Vec<Site>,
    pub structures: Vec<Structure>,
    pub site_at: HashMap<usize, usize>,
    pub structure_at: HashMap<usize, usize>,
    pub guards: Vec<Guard>,
    pub guard_at: HashMap<usize, usize>,
    /// Number of operators in the body.
    pub ops: usize,
}

/// The structural pass: sites, structures, sequences, guards (types come later).
pub(crate) fn plan_function(
    info: &ModuleInfo,
    body: &FunctionBody<'_>,
    func: u32,
    suspension: &Suspension,
    blocking_imports: usize,
    preempt_loops: bool,
    calling_loops: &std::collections::BTreeSet<usize>,
) -> Result<FuncPlan, UnwindError> {
    let suspends = &suspension.functions;
    struct Frame {
        structure: Option<usize>,
        arm: u8,
        reachable: bool,
        entered_reachable: bool,
    }
    let unsupported = |feature: &str| UnwindError::Unsupported { feature: feature.into(), func: Some(func) };
    let mut plan = FuncPlan::default();
    let mut frames = vec![Frame { structure: None, arm: 0, reachable: true, entered_reachable: true }];
    let mut ops = body.get_operators_reader()?;
    let mut index = 0usize;
    let seq_of = |frames: &[Frame]| {
        let top = frames.last().expect("frame");
        SeqId { structure: top.structure, arm: top.arm }
    };
    while !ops.eof() {
        let op = ops.read()?;
        let reachable = frames.last().is_some_and(|f| f.reachable);
        let call_site = |plan: &mut FuncPlan,
                         callee_type: &FuncType,
                         indirect: bool,
                         import_callee: bool,
                         import: bool,
                         tail: bool| {
            let id = plan.sites.len();
            plan.site_at.insert(index, id);
            plan.sites.push(Site {
                op: index,
                loop_check: false,
                seq: seq_of(&frames),
                skippable: false,
                frame: vec![],
                params: callee_type.params().to_vec(),
                results: callee_type.results().to_vec(),
                indirect,
                import_callee,
                import,
                tail,
            });
        };
        match op {
            Operator::Block { blockty } | Operator::Loop { blockty } | Operator::If { blockty } => {
                let kind = match op {
                    Operator::Block { .. } => StructKind::Block,
                    Operator::Loop { .. } => StructKind::Loop,
                    _ => StructKind::If,
                };
                open_structure(&mut plan, info, kind, blockty, index, seq_of(&frames))?;
                frames.push(Frame {
                    structure: Some(plan.structures.len() - 1),
                    arm: 0,
                    reachable,
                    entered_reachable: reachable,
                });
                if kind == StructKind::Loop && preempt_loops && reachable && calling_loops.contains(&index) {
                    let id = plan.sites.len();
                    plan.sites.push(Site {
                        op: index,
                        loop_check: true,
                        seq: seq_of(&frames),
                        skippable: false,
                        frame: vec![],
                        params: vec![],
                        results: vec![],
                        indirect: false,
                        import_callee: false,
                        import: false,
                        tail: false,
                    });
                    let _ = id;
                }
            }
            Operator::TryTable { try_table } => {
                open_structure(&mut plan, info, StructKind::TryTable, try_table.ty, index, seq_of(&frames))?;
                frames.push(Frame {
                    structure: Some(plan.structures.len() - 1),
                    arm: 0,
                    reachable,
                    entered_reachable: reachable,
                });
            }
            Operator::Else => {
                let top = frames.last_mut().expect("if frame");
                let s = top.structure.expect("else inside if");
                plan.structures[s].else_op = Some(index);
                plan.structures[s].then_end = plan.sites.len() as u32;
                top.arm = 1;
                top.reachable = top.entered_reachable;
            }
            Operator::End => {
                let top = frames.pop().expect("frame");
                if let Some(s) = top.structure {
                    let st = &mut plan.structures[s];
                    st.end = index;
                    st.site_end = plan.sites.len() as u32;
                    if st.else_op.is_none() {
                        st.then_end = st.site_end;
                    }
                    if let Some(parent) = frames.last_mut() {
                        parent.reachable = top.entered_reachable;
                    }
                }
            }
            Operator::Call { function_index } | Operator::ReturnCall { function_index } if reachable => {
                if suspends[function_index as usize] {
                    let ty = info.type_of_func(function_index)?.clone();
                    let import = (function_index as usize) < blocking_imports;
                    call_site(&mut plan, &ty, false, false, import, matches!(op, Operator::ReturnCall { .. }));
                }
                if matches!(op, Operator::ReturnCall { .. }) {
                    frames.last_mut().expect("frame").reachable = false;
                }
            }
            Operator::CallIndirect { type_index, .. } | Operator::ReturnCallIndirect { type_index, .. }
                if reachable =>
            {
                if suspension.indirect(info, type_index) {
                    let ty = info.func_type(type_index)?.clone();
                    let import_callee = suspension.indirect_import(info, type_index);
                    let tail = matches!(op, Operator::ReturnCallIndirect { .. });
                    call_site(&mut plan, &ty, true, import_callee, false, tail);
                }
                if matches!(op, Operator::ReturnCallIndirect { .. }) {
                    frames.last_mut().expect("frame").reachable = false;
                }
            }
            Operator::CallRef { .. } | Operator::ReturnCallRef { .. } if reachable && suspension.any_reference => {
                return Err(unsupported("`call_ref` in a function that can suspend"));
            }
            Operator::Try { .. }
            | Operator::Catch { .. }
            | Operator::CatchAll
            | Operator::Delegate { .. }
            | Operator::Rethrow { .. } => {
                return Err(unsupported("legacy exception handling (`try`/`catch`/`delegate`)"));
            }
            Operator::Br { .. }
            | Operator::BrTable { .. }
            | Operator::Return
            | Operator::Unreachable
            | Operator::Throw { .. }
            | Operator::ThrowRef
            | Operator::ReturnCall { .. }
            | Operator::ReturnCallIndirect { .. }
            | Operator::ReturnCallRef { .. } => frames.last_mut().expect("frame").reachable = false,
            _ => {}
        }
        index += 1;
    }
    plan.ops = index;
    // Site ids are textual order; structures learnt their ranges as they closed. Loop
    // checks were numbered when their loop opened, which is textual order too.
    for (id, site) in plan.sites.iter().enumerate() {
        if !site.loop_check {
            debug_assert_eq!(plan.site_at[&site.op], id);
        }
    }
    mark_sequences(&mut plan);
    Ok(plan)
}

fn open_structure(
    plan: &mut FuncPlan,
    info: &ModuleInfo,
    kind: StructKind,
    blockty: BlockType,
    index: usize,
    seq: SeqId,
) -> Result<(), UnwindError> {
    let (mut inputs, results) = info.block_signature(blockty)?;
    if kind == StructKind::If {
        inputs.push(ValType::I32);
    }
    let first = plan.sites.len() as u32;
    plan.structures.push(Structure {
        kind,
        start: index,
        else_op: None,
        end: 0,
        seq,
        first_site: first,
        site_end: first,
        then_end: first,
        skippable: false,
        inputs,
        results,
        spill: vec![],
    });
    Ok(())
}

/// An item of a sequence: a site or an open structure, with the operator range it covers.
#[derive(Clone, Copy)]
struct Item {
    start: usize,
    resume: usize,
    site: Option<usize>,
    structure: Option<usize>,
}

/// Decides which items are skippable and where guards go, sequence by sequence.
fn mark_sequences(plan: &mut FuncPlan) {
    let mut items: HashMap<SeqId, Vec<Item>> = HashMap::new();
    for (id, site) in plan.sites.iter().enumerate() {
        // A preemption check sits right after its `loop`, before the loop's first operator.
        let (start, resume) = if site.loop_check { (site.op + 1, site.op + 1) } else { (site.op, site.op + 1) };
        items.entry(site.seq).or_default().push(Item { start, resume, site: Some(id), structure: None });
    }
    for (id, st) in plan.structures.iter().enumerate() {
        if st.open() {
            items.entry(st.seq).or_default().push(Item {
                start: st.start,
                resume: st.end + 1,
                site: None,
                structure: Some(id),
            });
        }
    }
    for (seq, mut list) in items {
        // Loop checks come before anything else at their position.
        list.sort_by_key(|item| (item.start, item.site.is_none() as u8));
        let seq_start = match seq.structure {
            None => 0,
            Some(s) if seq.arm == 1 => plan.structures[s].else_op.expect("else arm") + 1,
            Some(s) => plan.structures[s].start + 1,
        };
        let mut cursor = seq_start;
        let last = list.len() - 1;
        for (n, item) in list.iter().enumerate() {
            if let Some(site) = item.site {
                plan.sites[site].skippable = n < last;
            }
            if let Some(s) = item.structure {
                plan.structures[s].skippable = n < last;
            }
            if item.start > cursor || item.structure.is_some() {
                plan.guard_at.insert(cursor, plan.guards.len());
                plan.guards.push(Guard {
                    start: cursor,
                    end: item.start,
                    params: vec![],
                    results: vec![],
                    spill_for: item.structure,
                });
            }
            if let Some(s) = item.structure {
                plan.structure_at.insert(plan.structures[s].start, s);
            }
            cursor = item.resume;
        }
    }
}

/// Operand-stack types of the current frame before each operator in `at`.
pub(crate) fn frame_types_at(
    validator: &mut wasmparser::FuncValidator<wasmparser::ValidatorResources>,
    body: &FunctionBody<'_>,
    at: &std::collections::BTreeSet<usize>,
    func: u32,
) -> Result<HashMap<usize, Vec<ValType>>, UnwindError> {
    let mut reader = body.get_binary_reader();
    validator.read_locals(&mut reader)?;
    let mut ops = body.get_operators_reader()?;
    let mut found = HashMap::new();
    let mut index = 0usize;
    while !ops.eof() {
        let (op, offset) = ops.read_with_offset()?;
        if at.contains(&index) {
            let height = validator.operand_stack_height() as usize;
            let base = validator.get_control_frame(0).map(|f| f.height).unwrap_or(0);
            let mut types = Vec::with_capacity(height - base);
            for depth in (0..height - base).rev() {
                match validator.get_operand_type(depth) {
                    Some(Some(ty)) => types.push(ty),
                    _ => {
                        return Err(UnwindError::Unsupported {
                            feature: "a suspension point in unreachable code".into(),
                            func: Some(func),
                        });
                    }
                }
            }
            found.insert(index, types);
        }
        validator.op(offset, &op)?;
        index += 1;
    }
    Ok(found)
}

/// Fills in the types of sites, structures and guards.
pub(crate) fn type_plan(plan: &mut FuncPlan, types: &HashMap<usize, Vec<ValType>>) {
    for site in &mut plan.sites {
        let at = if site.loop_check { site.op + 1 } else { site.op };
        site.frame = types[&at].clone();
    }
    for st in &mut plan.structures {
        if st.open() {
            let frame = &types[&st.start];
            st.spill = frame[..frame.len() - st.inputs.len()].to_vec();
        }
    }
    for guard in &mut plan.guards {
        guard.params = types[&guard.start].clone();
        guard.results = match guard.spill_for {
            Some(s) => plan.structures[s].inputs.clone(),
            None => types[&guard.end].clone(),
        };
    }
}

/// Operators whose frame types `type_plan` needs.
pub(crate) fn typed_positions(plan: &FuncPlan) -> std::collections::BTreeSet<usize> {
    let mut at = std::collections::BTreeSet::new();
    for site in &plan.sites {
        at.insert(if site.loop_check { site.op + 1 } else { site.op });
    }
    for st in plan.structures.iter().filter(|s| s.open()) {
        at.insert(st.start);
    }
    for guard in &plan.guards {
        at.insert(guard.start);
        at.insert(guard.end);
    }
    at
}
