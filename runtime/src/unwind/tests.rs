//! Unwind then rewind at every suspension point of small hand-written functions, on the
//! same instance and on a fresh one, and compare with an uninterrupted run.

use super::support::Var;
use super::*;
use wasmtime::{AsContextMut, Caller, Config, Engine, Extern, Instance, Linker, Module, Store, Val};

/// Host state of a test run.
#[derive(Default)]
struct Host {
    /// Calls of `env.block` so far (completed ones).
    calls: u32,
    /// Unwind at this call of `env.block` (counting completed calls), once.
    stop_at: Option<u32>,
    /// What the guest logged, in order.
    log: Vec<i64>,
    /// Where the instance keeps its state (host functions are also called from rewind
    /// copies, which do not export it).
    state: Option<Control>,
}

/// The transform's variables as the host reaches them: globals, or words of the control
/// memory (`UnwindOptions::control_in_memory`).
#[derive(Clone, Copy)]
enum Control {
    Globals { state: wasmtime::Global, sp: wasmtime::Global },
    Memory(wasmtime::Memory),
}

impl Control {
    fn of(p: &Prepared, store: &mut Store<Host>, instance: &Instance) -> Control {
        if p.options.control_in_memory {
            let name = crate::state_export::memory_export(p.layout.stack_memory);
            Control::Memory(instance.get_memory(&mut *store, &name).unwrap())
        } else {
            Control::Globals {
                state: global(store, instance, p.layout.state_global),
                sp: global(store, instance, p.layout.sp_global),
            }
        }
    }

    fn get(&self, mut store: impl AsContextMut, var: Var) -> i32 {
        match (self, var) {
            (Control::Globals { state, .. }, Var::State) => state.get(&mut store).unwrap_i32(),
            (Control::Globals { sp, .. }, Var::Sp) => sp.get(&mut store).unwrap_i32(),
            (Control::Globals { .. }, Var::RefSp) => unreachable!("not read by the tests"),
            (Control::Memory(memory), var) => {
                let at = var.address() as usize;
                let word = i32::from_le_bytes(memory.data(&store)[at..at + 4].try_into().unwrap());
                if var == Var::Sp { word + CONTROL_BYTES as i32 } else { word }
            }
        }
    }

    fn set_state(&self, mut store: impl AsContextMut, value: i32) {
        match self {
            Control::Globals { state, .. } => state.set(&mut store, Val::I32(value)).unwrap(),
            Control::Memory(memory) => memory.data_mut(&mut store)[..4].copy_from_slice(&value.to_le_bytes()),
        }
    }
}

fn engine() -> Engine {
    let mut config = Config::new();
    config.wasm_exceptions(true);
    Engine::new(&config).unwrap()
}

fn state_of(caller: &mut Caller<'_, Host>) -> Control {
    caller.data().state.expect("the state")
}

fn linker(engine: &Engine) -> Linker<Host> {
    let mut linker = Linker::new(engine);
    linker
        .func_wrap("env", "block", |mut caller: Caller<'_, Host>, x: i32| -> i32 {
            let state = state_of(&mut caller);
            match state.get(&mut caller, Var::State) {
                REWINDING => state.set_state(&mut caller, NORMAL),
                NORMAL if caller.data().stop_at == Some(caller.data().calls) => {
                    caller.data_mut().stop_at = None;
                    state.set_state(&mut caller, UNWINDING);
                    return -7777; // must never be seen
                }
                _ => {}
            }
            caller.data_mut().calls += 1;
            x.wrapping_mul(3).wrapping_add(1)
        })
        .unwrap();
    linker
        .func_wrap("env", "log", |mut caller: Caller<'_, Host>, x: i64| {
            caller.data_mut().log.push(x);
        })
        .unwrap();
    linker
}

struct Prepared {
    wasm: Vec<u8>,
    options: UnwindOptions,
    engine: Engine,
    module: Module,
    layout: UnwindLayout,
    state_export: crate::state_export::StateLayout,
}

/// Where the transform keeps its variables, and how a resume gets the module's globals.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Globals,
    ControlInMemory,
    /// A component's module (`UnwindOptions::self_contained`): a fresh instance gets only
    /// the memories (the globals come back from the unwind stack), and no copies module.
    SelfContained,
}

const MODES: [Mode; 3] = [Mode::Globals, Mode::ControlInMemory, Mode::SelfContained];

fn prepare_with(wat: &str, preempt: bool, mode: Mode) -> Prepared {
    let wasm = wat::parse_str(wat).unwrap();
    let control_in_memory = mode != Mode::Globals;
    let options = UnwindOptions {
        blocking_imports: vec![("env".into(), "block".into())],
        preempt_loops: preempt,
        control_in_memory,
        self_contained: mode == Mode::SelfContained,
        ..Default::default()
    };
    let (instrumented, layout) = instrument(&wasm, &options).unwrap();
    assert_eq!(layout.saved_global_bytes > 0, options.self_contained && wat.contains("(global $sp (mut"));
    if let Err(e) = wasmparser::Validator::new_with_features(features()).validate_all(&instrumented) {
        let text = wasmprinter::print_bytes(&instrumented).unwrap_or_default();
        panic!("invalid output: {e}\n{text}");
    }
    if control_in_memory {
        // Nothing may use the globals the host could not reach.
        let own = [layout.state_global, layout.sp_global, layout.ref_sp_global];
        for payload in wasmparser::Parser::new(0).parse_all(&instrumented) {
            if let wasmparser::Payload::CodeSectionEntry(body) = payload.unwrap() {
                for op in body.get_operators_reader().unwrap() {
                    if let wasmparser::Operator::GlobalGet { global_index }
                    | wasmparser::Operator::GlobalSet { global_index } = op.unwrap()
                    {
                        assert!(!own.contains(&global_index), "global {global_index} used with the control in memory");
                    }
                }
            }
        }
    }
    let (exported, state_export) = crate::state_export::rewrite(&instrumented).unwrap();
    let engine = engine();
    let module = Module::new(&engine, &exported).unwrap();
    Prepared { wasm, options, engine, module, layout, state_export }
}

fn global(store: &mut Store<Host>, instance: &Instance, index: u32) -> wasmtime::Global {
    instance.get_global(&mut *store, &crate::state_export::global_export(index)).unwrap()
}

/// Runs `run(arg)`; with `stop_at`, unwinds at that blocking call and resumes, on the
/// same instance or (with `fresh`) on a new one given a copy of the state.
fn run(p: &Prepared, arg: i32, stop_at: Option<u32>, fresh: bool) -> (Vec<Val>, Vec<i64>, u32) {
    let linker = linker(&p.engine);
    let mut store = Store::new(&p.engine, Host { stop_at, ..Host::default() });
    let instance = linker.instantiate(&mut store, &p.module).unwrap();
    let state = Control::of(p, &mut store, &instance);
    store.data_mut().state = Some(state);
    let func = instance.get_func(&mut store, "run").unwrap();
    let mut results = vec![Val::I32(0); func.ty(&store).results().len()];
    func.call(&mut store, &[Val::I32(arg)], &mut results).unwrap();
    if stop_at.is_none() {
        assert_eq!(state.get(&mut store, Var::State), NORMAL);
        let log = std::mem::take(&mut store.data_mut().log);
        return (results, log, store.data().calls);
    }
    assert_eq!(state.get(&mut store, Var::State), UNWINDING, "the guest did not unwind at call {stop_at:?}");
    globals(p, &mut store, &instance, SAVE_GLOBALS);
    let (mut store, instance) =
        if fresh { copy_to_fresh(p, &mut store, &instance, &linker) } else { (store, instance) };
    let state = Control::of(p, &mut store, &instance);
    globals(p, &mut store, &instance, RESTORE_GLOBALS);
    state.set_state(&mut store, REWINDING);
    if !p.options.self_contained {
        install_copies(p, &mut store, &instance);
    }
    let func = instance.get_func(&mut store, "run").unwrap();
    // The argument is a placeholder: the rewound frame restores its own locals.
    func.call(&mut store, &[Val::I32(0)], &mut results).unwrap();
    assert_eq!(state.get(&mut store, Var::State), NORMAL);
    let empty = if p.options.control_in_memory { CONTROL_BYTES as i32 } else { 0 };
    assert_eq!(state.get(&mut store, Var::Sp), empty, "the unwind stack is empty after a rewind");
    let log = std::mem::take(&mut store.data_mut().log);
    (results, log, store.data().calls)
}

/// What a component's host does once the program has unwound (`SAVE_GLOBALS`) and
/// before the rewind (`RESTORE_GLOBALS`), for a self-contained module.
fn globals(p: &Prepared, store: &mut Store<Host>, instance: &Instance, export: &str) {
    if p.options.self_contained {
        instance.get_typed_func::<(), ()>(&mut *store, export).unwrap().call(&mut *store, ()).unwrap();
    }
}

/// What the host does before a rewind (`checkpoint::install_rewind_copies`): the rewind
/// copies of the functions on the unwind stack, instantiated next to the instance.
fn install_copies(p: &Prepared, store: &mut Store<Host>, instance: &Instance) {
    let stack = instance.get_memory(&mut *store, &crate::state_export::memory_export(p.layout.stack_memory)).unwrap();
    let sp = Control::of(p, store, instance).get(&mut *store, Var::Sp) as u32;
    // With the control block in memory, the stack starts after it.
    let base = if p.options.control_in_memory { CONTROL_BYTES } else { 0 };
    let funcs = stack_functions(&stack.data(&*store)[base as usize..], sp - base).unwrap();
    assert!(!funcs.is_empty(), "an unwound stack holds frames");
    let Some(copies) = rewind_copies(&p.wasm, &p.options, &funcs).unwrap() else { return };
    if let Err(e) = wasmparser::Validator::new_with_features(features()).validate_all(&copies.wasm) {
        let text = wasmprinter::print_bytes(&copies.wasm).unwrap_or_default();
        panic!("invalid rewind copies: {e}\n{text}");
    }
    let module = Module::new(&p.engine, &copies.wasm).unwrap();
    let imports: Vec<Extern> =
        module.imports().map(|import| instance.get_export(&mut *store, import.name()).unwrap()).collect();
    Instance::new(&mut *store, &module, &imports).unwrap();
}

/// A new instance holding the old one's memories and globals: what a memory snapshot does.
fn copy_to_fresh(
    p: &Prepared,
    old: &mut Store<Host>,
    old_instance: &Instance,
    linker: &Linker<Host>,
) -> (Store<Host>, Instance) {
    let host = std::mem::take(old.data_mut());
    let mut store = Store::new(&p.engine, host);
    let instance = linker.instantiate(&mut store, &p.module).unwrap();
    store.data_mut().state = Some(Control::of(p, &mut store, &instance));
    for index in 0..p.state_export.memories.len() as u32 {
        let name = crate::state_export::memory_export(index);
        let from = old_instance.get_memory(&mut *old, &name).unwrap();
        let to = instance.get_memory(&mut store, &name).unwrap();
        let bytes = from.data(&*old).to_vec();
        let grow = (bytes.len() - to.data_size(&store)) as u64 / 65536;
        to.grow(&mut store, grow).unwrap();
        to.data_mut(&mut store).copy_from_slice(&bytes);
    }
    for (index, info) in p.state_export.globals.iter().enumerate() {
        // A component's host cannot reach them: the module brings its own back.
        if info.mutable && !p.options.self_contained {
            let from = global(old, old_instance, index as u32).get(&mut *old);
            global(&mut store, &instance, index as u32).set(&mut store, from).unwrap();
        }
    }
    (store, instance)
}

/// Checks every stop point of `run(arg)` against the uninterrupted run, with the
/// transform's variables in globals and in the control memory.
fn check_every_stop(wat: &str, arg: i32) -> u32 {
    let mut counted = None;
    for mode in MODES {
        let p = prepare_with(wat, false, mode);
        let (expected, log, calls) = run(&p, arg, None, false);
        assert!(calls > 0, "the test function never blocks");
        for stop in 0..calls {
            for fresh in [false, true] {
                let what = format!("a stop at call {stop} (fresh instance: {fresh}, {mode:?})");
                let (results, got_log, got_calls) = run(&p, arg, Some(stop), fresh);
                let results: Vec<String> = results.iter().map(|v| format!("{v:?}")).collect();
                let expected: Vec<String> = expected.iter().map(|v| format!("{v:?}")).collect();
                assert_eq!(results, expected, "results after {what}");
                assert_eq!(got_log, log, "log after {what}");
                assert_eq!(got_calls, calls);
            }
        }
        assert_eq!(*counted.get_or_insert(calls), calls);
    }
    counted.unwrap_or_default()
}

const IMPORTS: &str = r#"
    (import "env" "block" (func $block (param i32) (result i32)))
    (import "env" "log" (func $log (param i64)))
"#;

#[test]
fn sites_sharing_a_save_path_resume_at_their_own_site() {
    // Four sites that save the same locals ($x, $acc) branch to one save path, which
    // must record which of them unwound.
    let wat = format!(
        r#"(module {IMPORTS}
        (func (export "run") (param $x i32) (result i32)
            (local $acc i32)
            local.get $x call $block local.get $acc i32.add local.set $acc
            local.get $acc i64.extend_i32_s call $log
            local.get $x call $block local.get $acc i32.mul local.set $acc
            local.get $acc i64.extend_i32_s call $log
            local.get $x call $block local.get $acc i32.xor local.set $acc
            local.get $acc i64.extend_i32_s call $log
            local.get $x call $block local.get $acc i32.sub local.set $acc
            local.get $acc local.get $x i32.add))"#
    );
    assert_eq!(check_every_stop(&wat, 7), 4);
}

#[test]
fn straight_line_with_operands_across_calls() {
    let wat = format!(
        r#"(module {IMPORTS}
        (func (export "run") (param $x i32) (result i32)
            (local $y i64)
            i32.const 1000
            local.get $x
            call $block
            i32.add
            f64.const 2.5
            local.get $x
            call $block
            call $block
            f64.convert_i32_s
            f64.mul
            i32.trunc_f64_s
            i32.add
            i64.extend_i32_s
            local.tee $y
            call $log
            local.get $y
            i32.wrap_i64))"#
    );
    assert_eq!(check_every_stop(&wat, 5), 3);
}

#[test]
fn loops_ifs_and_nested_blocks() {
    let wat = format!(
        r#"(module {IMPORTS}
        (func $step (param $i i32) (result i32)
            local.get $i
            i32.const 1
            i32.and
            if (result i32)
                local.get $i
                call $block
            else
                local.get $i
                i32.const 10
                i32.add
                call $block
                call $block
            end)
        (func (export "run") (param $n i32) (result i32)
            (local $i i32) (local $acc i32)
            block $out
                loop $again
                    local.get $i
                    local.get $n
                    i32.ge_s
                    br_if $out
                    local.get $acc
                    local.get $i
                    call $step
                    i32.add
                    local.set $acc
                    local.get $acc
                    i64.extend_i32_u
                    call $log
                    local.get $i
                    i32.const 1
                    i32.add
                    local.set $i
                    br $again
                end
            end
            local.get $acc))"#
    );
    assert_eq!(check_every_stop(&wat, 6), 9);
}

#[test]
fn br_table_multi_value_and_values_under_blocks() {
    let wat = format!(
        r#"(module {IMPORTS}
        (type $pair (func (param i32) (result i32 i64)))
        (func $two (type $pair)
            local.get 0
            call $block
            local.get 0
            i64.extend_i32_u
            i64.const 1000
            i64.mul)
        (func (export "run") (param $x i32) (result i32)
            (local $k i32)
            ;; a value beneath a block that holds a site: it must survive the unwind
            i32.const 7
            block (result i32)
                local.get $x
                call $two
                call $log
            end
            i32.add
            local.set $k
            block $c
                block $b
                    block $a
                        local.get $k
                        i32.const 3
                        i32.rem_u
                        br_table $a $b $c
                    end
                    local.get $k
                    call $block
                    local.set $k
                    br $c
                end
                local.get $k
                call $block
                call $block
                local.set $k
            end
            ;; a block with parameters around a site
            local.get $k
            i32.const 5
            block (param i32 i32) (result i32)
                call $block
                i32.add
            end))"#
    );
    for x in [1, 2, 3] {
        check_every_stop(&wat, x);
    }
}

#[test]
fn calls_through_tables_and_exceptions() {
    let wat = format!(
        r#"(module {IMPORTS}
        (type $un (func (param i32) (result i32)))
        (tag $oops (param i32))
        (table 2 funcref)
        (elem (i32.const 0) $double $thrower)
        (func $double (type $un)
            local.get 0
            call $block
            i32.const 2
            i32.mul)
        (func $thrower (type $un)
            local.get 0
            call $block
            throw $oops)
        (func (export "run") (param $x i32) (result i32)
            (local $r i32)
            local.get $x
            i32.const 0
            call_indirect (type $un)
            local.set $r
            block $caught (result i32)
                try_table (catch $oops $caught)
                    local.get $r
                    i32.const 1
                    call_indirect (type $un)
                    drop
                end
                i32.const -1
                return
            end
            call $block
            local.get $r
            i32.add))"#
    );
    assert_eq!(check_every_stop(&wat, 4), 3);
}

#[test]
fn a_blocking_import_called_through_a_table_is_called_again_on_rewind() {
    // The import stops with no frame of its own: the rewind repeats the call through the
    // table with the index the unwind saved (only such calls keep their index).
    let wat = format!(
        r#"(module {IMPORTS}
        (type $un (func (param i32) (result i32)))
        (table 2 funcref)
        (elem (i32.const 0) $double $block)
        (func $double (type $un)
            local.get 0
            call $block
            i32.const 2
            i32.mul)
        (func (export "run") (param $x i32) (result i32)
            local.get $x
            i32.const 0
            call_indirect (type $un)
            i32.const 1
            call_indirect (type $un)
            i32.const 0
            call_indirect (type $un)))"#
    );
    assert_eq!(check_every_stop(&wat, 5), 3);
}

#[test]
fn preemption_at_loop_headers_of_a_cpu_bound_loop() {
    let wat = format!(
        r#"(module {IMPORTS}
        (func $mix (param $h i32) (param $i i32) (result i32)
            local.get $h
            i32.const 31
            i32.mul
            local.get $i
            i32.xor)
        (func (export "run") (param $n i32) (result i32)
            (local $i i32) (local $h i32)
            ;; A loop that calls something gets a stop check at its header.
            loop $l
                local.get $h
                local.get $i
                call $mix
                local.set $h
                local.get $i
                i32.const 1
                i32.add
                local.tee $i
                local.get $n
                i32.lt_u
                br_if $l
            end
            local.get $h))"#
    );
    for mode in MODES {
        let p = prepare_with(&wat, true, mode);
        let (expected, _, _) = run(&p, 100_000, None, false);
        // Arm the stop from outside mid-run: an epoch callback does this in Stasis; here a
        // fuel-free variant: arm before the call, so the first loop header unwinds.
        let linker = linker(&p.engine);
        let mut store = Store::new(&p.engine, Host::default());
        let instance = linker.instantiate(&mut store, &p.module).unwrap();
        let state = Control::of(&p, &mut store, &instance);
        store.data_mut().state = Some(state);
        state.set_state(&mut store, ARMED);
        let run_fn = instance.get_typed_func::<i32, i32>(&mut store, "run").unwrap();
        run_fn.call(&mut store, 100_000).unwrap();
        assert_eq!(state.get(&mut store, Var::State), UNWINDING, "{mode:?}");
        assert!(state.get(&mut store, Var::Sp) > CONTROL_BYTES as i32, "the frames are on the unwind stack");
        globals(&p, &mut store, &instance, SAVE_GLOBALS);
        globals(&p, &mut store, &instance, RESTORE_GLOBALS);
        state.set_state(&mut store, REWINDING);
        if mode != Mode::SelfContained {
            install_copies(&p, &mut store, &instance);
        }
        let result = run_fn.call(&mut store, 0).unwrap();
        assert_eq!(Val::I32(result).unwrap_i32(), expected[0].unwrap_i32());
    }
}

#[test]
fn untouched_functions_stay_byte_identical_and_refusals_name_the_feature() {
    let wat = format!(
        r#"(module {IMPORTS}
        (func $leaf (param i32) (result i32) local.get 0 i32.const 1 i32.add)
        (func (export "run") (param i32) (result i32) local.get 0 call $leaf call $block))"#
    );
    let wasm = wat::parse_str(&wat).unwrap();
    let options = UnwindOptions {
        blocking_imports: vec![("env".into(), "block".into())],
        preempt_loops: false,
        ..Default::default()
    };
    let (_, layout) = instrument(&wasm, &options).unwrap();
    assert_eq!((layout.instrumented, layout.defined), (1, 2));

    let shared = wat::parse_str("(module (memory 1 1 shared))").unwrap();
    let err = instrument(&shared, &options).unwrap_err().to_string();
    assert!(err.contains("shared memory"), "{err}");
    assert!(matches!(instrument(b"\0asm\x01\0\0\0\x01\xff", &options), Err(UnwindError::Invalid(_))));
}

/// A C-style shadow stack: a mutable global moved before the blocking call and back after
/// it, with a value kept in linear memory under it. Self-contained, the fresh instance
/// gets no globals from the host: the module's `SAVE_GLOBALS` pushed them onto the
/// unwind stack once unwound and its `RESTORE_GLOBALS` pops them back before the rewind.
#[test]
fn a_mutable_global_comes_back_with_the_stack() {
    let wat = format!(
        r#"(module {IMPORTS}
        (memory 1)
        (global $sp (mut i32) (i32.const 4096))
        (global $count (mut i64) (i64.const 0))
        (func $frame (param $x i32) (result i32)
            (local $at i32)
            global.get $sp
            i32.const 16
            i32.sub
            local.tee $at
            global.set $sp
            local.get $at
            local.get $x
            i32.store
            global.get $count
            i64.const 1
            i64.add
            global.set $count
            local.get $x
            call $block
            local.get $at
            i32.load
            i32.add
            global.get $sp
            i32.add
            global.get $count
            call $log
            local.get $at
            i32.const 16
            i32.add
            global.set $sp)
        (func (export "run") (param $x i32) (result i32)
            local.get $x
            call $frame
            local.get $x
            i32.const 1
            i32.add
            call $frame
            i32.add))"#
    );
    assert_eq!(check_every_stop(&wat, 9), 2);
}

#[test]
fn recursion_unwinds_every_frame() {
    let wat = format!(
        r#"(module {IMPORTS}
        (func $fib (param $n i32) (result i32)
            local.get $n
            i32.const 2
            i32.lt_s
            if (result i32)
                local.get $n
                call $block
                drop
                local.get $n
            else
                local.get $n
                i32.const 1
                i32.sub
                call $fib
                local.get $n
                i32.const 2
                i32.sub
                call $fib
                i32.add
            end)
        (func (export "run") (param i32) (result i32) local.get 0 call $fib))"#
    );
    check_every_stop(&wat, 7);
}

#[test]
fn calls_through_tables_follow_only_signatures_that_can_suspend() {
    let wat = format!(
        r#"(module {IMPORTS}
        (type $ii (func (param i32) (result i32)))
        (type $ll (func (param i64) (result i64)))
        (table 2 funcref)
        (elem (i32.const 0) $pure $blocker)
        (func $pure (type $ii) local.get 0 i32.const 1 i32.add)
        (func $blocker (type $ll) local.get 0 i32.wrap_i64 call $block i64.extend_i32_s)
        (func (export "run") (param i32) (result i32) local.get 0 i32.const 0 call_indirect (type $ii))
        (func (export "run64") (param i64) (result i64) local.get 0 i32.const 1 call_indirect (type $ll)))"#
    );
    let wasm = wat::parse_str(&wat).unwrap();
    let options = UnwindOptions {
        blocking_imports: vec![("env".into(), "block".into())],
        preempt_loops: false,
        ..Default::default()
    };
    let (_, layout) = instrument(&wasm, &options).unwrap();
    // $blocker and run64 (its signature reaches $blocker); run's only call cannot suspend.
    assert_eq!((layout.instrumented, layout.sites), (2, 2));
}

#[test]
fn instrumentation_checks_are_hinted_for_the_compiler() {
    let wat = format!(
        r#"(module {IMPORTS}
        (func $leaf (param i32) (result i32) local.get 0)
        (func (export "run") (param i32) (result i32) local.get 0 call $leaf call $block))"#
    );
    let wasm = wat::parse_str(&wat).unwrap();
    let options = UnwindOptions {
        blocking_imports: vec![("env".into(), "block".into())],
        preempt_loops: false,
        ..Default::default()
    };
    let (out, _) = instrument(&wasm, &options).unwrap();
    let mut sections = 0;
    for payload in Parser::new(0).parse_all(&out) {
        if let Payload::CustomSection(reader) = payload.unwrap()
            && let wasmparser::KnownCustom::BranchHints(hints) = reader.as_known()
        {
            sections += 1;
            let functions: Vec<_> = hints.into_iter().map(|f| f.unwrap()).collect();
            assert_eq!(functions.len(), 1, "only the instrumented function has hints");
            let hints: Vec<_> = functions[0].hints.clone().into_iter().map(|h| h.unwrap()).collect();
            assert!(hints.len() >= 2, "prologue and unwind check: {hints:?}");
            assert!(hints.windows(2).all(|w| w[0].func_offset < w[1].func_offset));
        }
    }
    assert_eq!(sections, 1);
}

/// Pins the transform's output: when this fails, bump `TRANSFORM_VERSION` (so that images
/// and compiled code of the old output are not used with the new), then update the hash.
#[test]
fn the_transform_version_names_its_output() {
    let wat = format!(
        r#"(module {IMPORTS}
        (type $un (func (param i32) (result i32)))
        (table 1 funcref)
        (elem (i32.const 0) $f)
        (func $f (type $un) local.get 0 i64.extend_i32_u call $log local.get 0 call $block)
        ;; Two sites saving the same locals: one shared save path.
        (func $g (export "g") (type $un)
            local.get 0 call $block drop local.get 0 call $block drop local.get 0)
        (func (export "run") (param $x i32) (result i32) (local $i i32)
            i32.const 5
            block (result i32)
                loop $l
                    local.get $x
                    i32.const 0
                    call_indirect (type $un)
                    local.set $x
                    local.get $i
                    i32.const 1
                    i32.add
                    local.tee $i
                    i32.const 3
                    i32.lt_u
                    br_if $l
                end
                local.get $x
            end
            i32.add))"#
    );
    let wasm = wat::parse_str(&wat).unwrap();
    // Two blocking imports of different parameter types: their argument locals must be
    // numbered the same way every time.
    let blocking = vec![("env".into(), "block".into()), ("env".into(), "log".into())];
    let options = UnwindOptions { blocking_imports: blocking, preempt_loops: true, ..Default::default() };
    let (out, _) = instrument(&wasm, &options).unwrap();
    let copies = rewind_copies(&wasm, &options, &[4, 3, 2]).unwrap().expect("all are lean");
    assert_eq!(copies.funcs, [2, 3, 4]);
    let hash = blake3::Hasher::new().update(&out).update(&copies.wasm).finalize().to_hex().to_string();
    assert_eq!(
        (TRANSFORM_VERSION, hash.as_str()),
        ("unwind-7", "3c8e99a52dda5a15cc63800d408c86a72294d927da5f28d4c61f5194e1127a35"),
        "the transform's output changed"
    );
}
