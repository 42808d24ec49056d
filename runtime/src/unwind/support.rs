//! What the transform adds next to the instrumented functions: the unwind stack (its own
//! memory, and a table for function references), the state globals, new function types,
//! and the small functions that push and pop values, reserve and release frames, and
//! answer preemption checks.

use super::{ARMED, FAILED, NORMAL, REWINDING, UNWINDING, UnwindError};
use std::collections::HashMap;
use wasm_encoder::{BlockType, Function, Instruction, MemArg};
use wasmparser::{RefType, ValType};

/// Largest unwind stack, in 64 KiB pages (so `memory.size << 16` never overflows).
pub(crate) const STACK_MAX_PAGES: u64 = 16_384;

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
}

impl Helpers {
    /// Lays the additions out after the module's own functions, globals, memories, tables.
    pub fn new(functions: u32, globals: u32, memories: u32, tables: u32) -> Self {
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
        }
    }

    /// Number of helper functions, appended after the module's own.
    pub const COUNT: u32 = 16;

    /// The helper functions' signatures, in index order.
    pub fn signatures() -> Vec<(Vec<ValType>, Vec<ValType>)> {
        let mut out = vec![(vec![], vec![]), (vec![], vec![])];
        for class in CLASSES {
            out.push((vec![class_type(class)], vec![]));
        }
        for class in CLASSES {
            out.push((vec![], vec![class_type(class)]));
        }
        out.push((vec![ValType::I32], vec![ValType::I32]));
        out.push((vec![ValType::I32], vec![ValType::I32]));
        out
    }

    /// The helper functions, in index order, with their types.
    pub fn functions(&self, types: &mut TypeInterner) -> Result<Vec<(u32, Function)>, UnwindError> {
        let mut bodies = vec![self.yield_body(), self.fail_body()];
        bodies.extend(CLASSES.map(|class| self.push_body(class)));
        bodies.extend(CLASSES.map(|class| self.pop_body(class)));
        bodies.extend([self.reserve_body(), self.release_body()]);
        Self::signatures()
            .iter()
            .zip(bodies)
            .map(|((params, results), body)| Ok((types.intern(params, results)?, body)))
            .collect()
    }

    fn yield_body(&self) -> Function {
        use Instruction as I;
        let mut f = Function::new([]);
        for i in [
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
        ] {
            f.instruction(&i);
        }
        f
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
        let mut f = Function::new([]);
        for i in &body {
            f.instruction(i);
        }
        f
    }

    fn release_body(&self) -> Function {
        use Instruction as I;
        let mut f = Function::new([]);
        for i in [
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
        ] {
            f.instruction(&i);
        }
        f
    }

    fn fail_body(&self) -> Function {
        let mut f = Function::new([]);
        for i in [
            Instruction::I32Const(FAILED),
            Instruction::GlobalSet(self.state),
            Instruction::Unreachable,
            Instruction::End,
        ] {
            f.instruction(&i);
        }
        f
    }

    fn push_body(&self, class: Class) -> Function {
        use Instruction as I;
        let mut f = Function::new([]);
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
        for i in &body {
            f.instruction(i);
        }
        f
    }

    fn pop_body(&self, class: Class) -> Function {
        use Instruction as I;
        let mut f = Function::new([]);
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
        for i in &body {
            f.instruction(i);
        }
        f
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
