//! What the transform adds next to the instrumented functions: the unwind stack (its own
//! memory, and a table for function references), the state globals, new function types,
//! and the small functions that push and pop values, reserve and release frames, and
//! answer preemption checks.

use super::{ARMED, FAILED, NORMAL, REWINDING, UNWINDING, UnwindError};
use std::collections::HashMap;
use wasm_encoder::{BlockType, Function, Instruction, MemArg};
use wasmparser::{RefType, ValType};

/// Largest unwind stack, in 64 KiB pages (so `memory.size << 16` never overflows).
pub const STACK_MAX_PAGES: u64 = 16_384;

/// Value classes the unwind stack holds, in the order of `Helpers::push`/`pop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    I32 = 0,
    I64 = 1,
    F32 = 2,
    F64 = 3,
    V128 = 4,
    FuncRef = 5,
}

const CLASSES: [Class; 6] = [Class::I32, Class::I64, Class::F32, Class::F64, Class::V128, Class::FuncRef];

pub(crate) enum SaveClass {
    Value(Class),
    /// A reference that cannot be written out: saved only when null (as `exnref` between
    /// a `catch_ref` and its `throw_ref`, which is never live at a blocking call in practice).
    NullOnly,
}

pub(crate) fn save_class(ty: ValType) -> Result<SaveClass, String> {
    Ok(match ty {
        ValType::I32 => SaveClass::Value(Class::I32),
        ValType::I64 => SaveClass::Value(Class::I64),
        ValType::F32 => SaveClass::Value(Class::F32),
        ValType::F64 => SaveClass::Value(Class::F64),
        ValType::V128 => SaveClass::Value(Class::V128),
        ValType::Ref(r) if r == RefType::FUNCREF => SaveClass::Value(Class::FuncRef),
        ValType::Ref(r) if r.is_nullable() => SaveClass::NullOnly,
        ValType::Ref(r) => return Err(format!("a non-nullable `{r}` local or operand")),
    })
}

fn class_type(class: Class) -> ValType {
    match class {
        Class::I32 => ValType::I32,
        Class::I64 => ValType::I64,
        Class::F32 => ValType::F32,
        Class::F64 => ValType::F64,
        Class::V128 => ValType::V128,
        Class::FuncRef => ValType::Ref(RefType::FUNCREF),
    }
}

/// Indices of everything the transform adds.
#[derive(Debug, Clone)]
pub(crate) struct Helpers {
    pub state: u32,
    pub sp: u32,
    pub ref_sp: u32,
    pub memory: u32,
    pub table: u32,
    /// The copies table: at index `f`, function `f`'s rewind copy, once the host has
    /// instantiated it (lean bodies hand rewinds to it).
    pub copies: u32,
    pub yield_fn: u32,
    pub fail: u32,
    pub push: [u32; 6],
    pub pop: [u32; 6],
    /// `reserve(bytes) -> address`: room for a frame on the unwind stack.
    pub reserve: u32,
    /// `release(bytes) -> address`: the frame on top of the unwind stack, popped.
    pub release: u32,
    /// With the control block in memory (`UnwindOptions::control_in_memory`): the unwind
    /// stack's memory, whose first [`CONTROL_BYTES`] hold `state`, `sp` and `ref_sp`
    /// ([`Var::address`]); they are set through helpers `set_state`, `set_sp`,
    /// `set_ref_sp` (after `release`).
    pub control: Option<u32>,
}

/// The transform's own variables (in this order: their setters' order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Var {
    State = 0,
    Sp = 1,
    RefSp = 2,
}

/// Bytes at the start of the unwind stack's memory that hold the control block, when it
/// is kept in memory; the stack starts after them. Its `sp` word holds `sp - CONTROL_BYTES`,
/// so a fresh (zeroed) memory means an empty stack.
pub const CONTROL_BYTES: u32 = 16;

impl Var {
    const ALL: [Var; 3] = [Var::State, Var::Sp, Var::RefSp];

    /// Where it lives in the unwind stack's memory, when it lives there.
    pub const fn address(self) -> i32 {
        match self {
            Var::State => 0,
            Var::Sp => 4,
            Var::RefSp => 8,
        }
    }
}

impl Helpers {
    /// Lays the additions out after the module's own functions, globals, memories, tables.
    pub fn new(functions: u32, globals: u32, memories: u32, tables: u32, control_in_memory: bool) -> Self {
        let push = std::array::from_fn(|i| functions + 2 + i as u32);
        let pop = std::array::from_fn(|i| functions + 8 + i as u32);
        Helpers {
            state: globals,
            sp: globals + 1,
            ref_sp: globals + 2,
            memory: memories,
            table: tables,
            copies: tables + 1,
            yield_fn: functions,
            fail: functions + 1,
            push,
            pop,
            reserve: functions + 14,
            release: functions + 15,
            control: control_in_memory.then_some(memories),
        }
    }

    /// Number of helper functions, appended after the module's own: 16, and a setter per
    /// variable with the control block in memory.
    pub fn count(&self) -> u32 {
        16 + if self.control.is_some() { Var::ALL.len() as u32 } else { 0 }
    }

    /// The global that holds `var` when the control block is in globals.
    fn global(&self, var: Var) -> u32 {
        match var {
            Var::State => self.state,
            Var::Sp => self.sp,
            Var::RefSp => self.ref_sp,
        }
    }

    /// Instructions that push `var`.
    pub fn get(&self, var: Var) -> Vec<Instruction<'static>> {
        let Some(memory) = self.control else { return vec![Instruction::GlobalGet(self.global(var))] };
        let mut get = vec![
            Instruction::I32Const(var.address()),
            Instruction::I32Load(MemArg { offset: 0, align: 2, memory_index: memory }),
        ];
        if var == Var::Sp {
            get.extend([Instruction::I32Const(CONTROL_BYTES as i32), Instruction::I32Add]);
        }
        get
    }

    /// What `sp` reads when the unwind stack is empty: in a memory, the stack starts after
    /// the control block.
    pub fn empty_sp(&self) -> i32 {
        if self.control.is_some() { CONTROL_BYTES as i32 } else { 0 }
    }

    /// Instructions that set `var` to `value` (no helper call: in a memory, a store).
    pub fn set_const(&self, var: Var, value: i32) -> Vec<Instruction<'static>> {
        match self.control {
            None => vec![Instruction::I32Const(value), Instruction::GlobalSet(self.global(var))],
            Some(memory) => vec![
                Instruction::I32Const(var.address()),
                Instruction::I32Const(value),
                Instruction::I32Store(MemArg { offset: 0, align: 2, memory_index: memory }),
            ],
        }
    }

    /// Instructions that pop a value into `var`.
    pub fn set(&self, var: Var) -> Vec<Instruction<'static>> {
        match self.control {
            None => vec![Instruction::GlobalSet(self.global(var))],
            Some(_) => vec![Instruction::Call(self.release + 1 + var as u32)],
        }
    }

    /// The helper functions' signatures, in index order.
    pub fn signatures(&self) -> Vec<(Vec<ValType>, Vec<ValType>)> {
        let mut out = vec![(vec![], vec![]), (vec![], vec![])];
        for class in CLASSES {
            out.push((vec![class_type(class)], vec![]));
        }
        for class in CLASSES {
            out.push((vec![], vec![class_type(class)]));
        }
        out.push((vec![ValType::I32], vec![ValType::I32]));
        out.push((vec![ValType::I32], vec![ValType::I32]));
        if self.control.is_some() {
            out.extend(Var::ALL.map(|_| (vec![ValType::I32], vec![])));
        }
        out
    }

    /// The helper functions, in index order, with their types.
    pub fn functions(&self, types: &mut TypeInterner) -> Result<Vec<(u32, Function)>, UnwindError> {
        let mut bodies = vec![self.yield_body(), self.fail_body()];
        bodies.extend(CLASSES.map(|class| self.push_body(class)));
        bodies.extend(CLASSES.map(|class| self.pop_body(class)));
        bodies.extend([self.reserve_body(), self.release_body()]);
        if let Some(memory) = self.control {
            bodies.extend(Var::ALL.map(|var| Self::setter_body(memory, var)));
        }
        self.signatures()
            .iter()
            .zip(bodies)
            .map(|((params, results), body)| Ok((types.intern(params, results)?, body)))
            .collect()
    }

    fn setter_body(memory: u32, var: Var) -> Function {
        let mut body = vec![Instruction::I32Const(var.address()), Instruction::LocalGet(0)];
        if var == Var::Sp {
            body.extend([Instruction::I32Const(CONTROL_BYTES as i32), Instruction::I32Sub]);
        }
        body.extend([Instruction::I32Store(MemArg { offset: 0, align: 2, memory_index: memory }), Instruction::End]);
        let mut f = Function::new([]);
        for i in &body {
            f.instruction(i);
        }
        f
    }

    /// `body` with every `global.get`/`global.set` of the transform's variables as
    /// `get`/`set` say (identity with the control block in globals).
    fn body(&self, body: &[Instruction<'static>]) -> Function {
        let mut f = Function::new([]);
        for i in body {
            let var = Var::ALL
                .into_iter()
                .find(|&v| matches!(i, Instruction::GlobalGet(g) | Instruction::GlobalSet(g) if *g == self.global(v)));
            match (var, i) {
                (Some(var), Instruction::GlobalGet(_)) => self.get(var).iter().for_each(|i| {
                    f.instruction(i);
                }),
                (Some(var), _) => self.set(var).iter().for_each(|i| {
                    f.instruction(i);
                }),
                (None, i) => {
                    f.instruction(i);
                }
            }
        }
        f
    }

    fn yield_body(&self) -> Function {
        use Instruction as I;
        self.body(&[
            // Rewinding arrived at the innermost frame: carry on from here.
            I::GlobalGet(self.state),
            I::I32Const(REWINDING),
            I::I32Eq,
            I::If(BlockType::Empty),
            I::I32Const(NORMAL),
            I::GlobalSet(self.state),
            I::Return,
            I::End,
            // The host armed a stop: unwind from here.
            I::GlobalGet(self.state),
            I::I32Const(ARMED),
            I::I32Eq,
            I::If(BlockType::Empty),
            I::I32Const(UNWINDING),
            I::GlobalSet(self.state),
            I::End,
            I::End,
        ])
    }

    /// After a `memory.grow`/`table.grow`: a stack that cannot grow fails the unwind.
    fn fail_if_grow_failed(&self) -> [Instruction<'static>; 5] {
        use Instruction as I;
        [I::I32Const(-1), I::I32Eq, I::If(BlockType::Empty), I::Call(self.fail), I::End]
    }

    fn reserve_body(&self) -> Function {
        use Instruction as I;
        // The stack is at most STACK_MAX_PAGES (1 GiB) and a frame at most 50,000 locals
        // of 16 bytes: `sp + bytes` cannot overflow.
        let end = [I::GlobalGet(self.sp), I::LocalGet(0), I::I32Add];
        let capacity = [I::MemorySize(self.memory), I::I32Const(16), I::I32Shl];
        let mut body = Vec::new();
        body.extend(end.clone());
        body.extend(capacity.clone());
        body.push(I::I32GtU);
        body.push(I::If(BlockType::Empty));
        // Pages missing: (end - capacity + 65535) >> 16.
        body.extend(end.clone());
        body.extend(capacity);
        body.extend([
            I::I32Sub,
            I::I32Const(65535),
            I::I32Add,
            I::I32Const(16),
            I::I32ShrU,
            I::MemoryGrow(self.memory),
        ]);
        body.extend(self.fail_if_grow_failed());
        body.extend([I::End, I::GlobalGet(self.sp)]);
        body.extend(end);
        body.extend([I::GlobalSet(self.sp), I::End]);
        self.body(&body)
    }

    fn release_body(&self) -> Function {
        use Instruction as I;
        self.body(&[
            // A stack emptier than the frames expect means a corrupt image: stop cleanly.
            I::GlobalGet(self.sp),
            I::LocalGet(0),
            I::I32LtU,
            I::If(BlockType::Empty),
            I::Call(self.fail),
            I::End,
            I::GlobalGet(self.sp),
            I::LocalGet(0),
            I::I32Sub,
            I::GlobalSet(self.sp),
            I::GlobalGet(self.sp),
            I::End,
        ])
    }

    fn fail_body(&self) -> Function {
        self.body(&[
            Instruction::I32Const(FAILED),
            Instruction::GlobalSet(self.state),
            Instruction::Unreachable,
            Instruction::End,
        ])
    }

    fn push_body(&self, class: Class) -> Function {
        use Instruction as I;
        let mut body = Vec::new();
        if class == Class::FuncRef {
            body.extend([
                I::GlobalGet(self.ref_sp),
                I::TableSize(self.table),
                I::I32GeU,
                I::If(BlockType::Empty),
                I::RefNull(wasm_encoder::HeapType::FUNC),
                I::I32Const(64),
                I::TableGrow(self.table),
            ]);
            body.extend(self.fail_if_grow_failed());
            body.extend([
                I::End,
                I::GlobalGet(self.ref_sp),
                I::LocalGet(0),
                I::TableSet(self.table),
                I::GlobalGet(self.ref_sp),
                I::I32Const(1),
                I::I32Add,
                I::GlobalSet(self.ref_sp),
            ]);
        } else {
            let slot = if class == Class::V128 { 16 } else { 8 };
            body.extend([
                I::GlobalGet(self.sp),
                I::I32Const(16),
                I::I32Add,
                I::MemorySize(self.memory),
                I::I32Const(16),
                I::I32Shl,
                I::I32GtU,
                I::If(BlockType::Empty),
                I::I32Const(1),
                I::MemoryGrow(self.memory),
            ]);
            body.extend(self.fail_if_grow_failed());
            body.extend([
                I::End,
                I::GlobalGet(self.sp),
                I::LocalGet(0),
                self.store(class, 0),
                I::GlobalGet(self.sp),
                I::I32Const(slot),
                I::I32Add,
                I::GlobalSet(self.sp),
            ]);
        }
        body.push(I::End);
        self.body(&body)
    }

    fn pop_body(&self, class: Class) -> Function {
        use Instruction as I;
        let (sp, slot) = match class {
            Class::FuncRef => (self.ref_sp, 1),
            Class::V128 => (self.sp, 16),
            _ => (self.sp, 8),
        };
        let mut body = vec![
            // A stack emptier than the frames expect means a corrupt image: stop cleanly.
            I::GlobalGet(sp),
            I::I32Const(slot),
            I::I32LtU,
            I::If(BlockType::Empty),
            I::Call(self.fail),
            I::End,
            I::GlobalGet(sp),
            I::I32Const(slot),
            I::I32Sub,
            I::GlobalSet(sp),
            I::GlobalGet(sp),
        ];
        if class == Class::FuncRef {
            body.push(I::TableGet(self.table));
        } else {
            body.push(self.load(class, 0));
        }
        body.push(I::End);
        self.body(&body)
    }

    pub(crate) fn memarg(&self, offset: u32, align: u32) -> MemArg {
        MemArg { offset: offset.into(), align, memory_index: self.memory }
    }

    /// A store of `class` to the unwind memory at `address + offset` (address, value on the stack).
    pub(crate) fn store(&self, class: Class, offset: u32) -> Instruction<'static> {
        match class {
            Class::I32 => Instruction::I32Store(self.memarg(offset, 2)),
            Class::I64 => Instruction::I64Store(self.memarg(offset, 3)),
            Class::F32 => Instruction::F32Store(self.memarg(offset, 2)),
            Class::F64 => Instruction::F64Store(self.memarg(offset, 3)),
            Class::V128 => Instruction::V128Store(self.memarg(offset, 4)),
            Class::FuncRef => unreachable!("function references go to the table"),
        }
    }

    pub(crate) fn load(&self, class: Class, offset: u32) -> Instruction<'static> {
        match class {
            Class::I32 => Instruction::I32Load(self.memarg(offset, 2)),
            Class::I64 => Instruction::I64Load(self.memarg(offset, 3)),
            Class::F32 => Instruction::F32Load(self.memarg(offset, 2)),
            Class::F64 => Instruction::F64Load(self.memarg(offset, 3)),
            Class::V128 => Instruction::V128Load(self.memarg(offset, 4)),
            Class::FuncRef => unreachable!("function references come from the table"),
        }
    }
}

/// Function types the instrumentation needs beyond the module's own, appended to its
/// type section (each in a rec group of its own, so existing indices do not move).
pub(crate) struct TypeInterner {
    first: u32,
    added: Vec<(Vec<ValType>, Vec<ValType>)>,
    index: HashMap<(Vec<ValType>, Vec<ValType>), u32>,
}

impl TypeInterner {
    pub fn new(existing: u32) -> Self {
        TypeInterner { first: existing, added: Vec::new(), index: HashMap::new() }
    }

    pub fn intern(&mut self, params: &[ValType], results: &[ValType]) -> Result<u32, UnwindError> {
        let key = (params.to_vec(), results.to_vec());
        if let Some(&index) = self.index.get(&key) {
            return Ok(index);
        }
        let index = self.first + self.added.len() as u32;
        self.added.push(key.clone());
        self.index.insert(key, index);
        Ok(index)
    }

    pub fn encode_into(&self, section: &mut wasm_encoder::TypeSection) -> Result<(), UnwindError> {
        use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
        let enc = |t: &ValType| RoundtripReencoder.val_type(*t).map_err(|e| UnwindError::Encode(format!("{e:?}")));
        for (params, results) in &self.added {
            let params = params.iter().map(enc).collect::<Result<Vec<_>, _>>()?;
            let results = results.iter().map(enc).collect::<Result<Vec<_>, _>>()?;
            section.ty().function(params, results);
        }
        Ok(())
    }
}
