//! Crafted modules against the compile budget and the transform's bounds: each ends in a
//! clear refusal or a bounded fallback, and the host goes on loading and running other
//! programs. Compilation runs in the `stasis-compile` worker, as in the server.

mod common;

use stasis_runtime::{
    Command, CompileBudget, CompileWorker, Error, Host, HostConfig, ProgramRef, Sandbox, SandboxConfig,
};
use std::fmt::Write;
use std::time::{Duration, Instant};

fn budgeted_host(memory: u64, time: Duration, checkpoints: bool) -> Host {
    Host::new(HostConfig {
        max_processes: None,
        checkpoints,
        compile_worker: Some(CompileWorker { program: env!("CARGO_BIN_EXE_stasis-compile").into(), args: vec![] }),
        compile_budget: CompileBudget { memory, time },
        ..HostConfig::default()
    })
    .unwrap()
}

/// A module that makes Cranelift's memory quadratic: `blocks` nested blocks, each with
/// `values` results, so wasmtime declares a variable per result and Cranelift's SSA
/// builder keeps a map as long as the blocks before it for each (a few hundred KB of wasm
/// asks for gigabytes).
fn compiler_bomb(blocks: usize, values: usize) -> Vec<u8> {
    let mut wat = String::from("(module (type $t (func (result");
    for _ in 0..values {
        wat.push_str(" i32");
    }
    wat.push_str("))) (func (export \"_start\")\n");
    for _ in 0..blocks {
        wat.push_str("(block (type $t)\n");
        for v in 0..values {
            let _ = write!(wat, "(i32.const {v})");
        }
        wat.push_str(")\n");
        for _ in 0..values {
            wat.push_str("drop\n");
        }
    }
    wat.push_str("))");
    wat::parse_str(&wat).unwrap()
}

async fn run_hello(host: &Host) {
    let sandbox = Sandbox::create(host, SandboxConfig::default()).unwrap();
    let hello = ProgramRef::Bytes { bytes: common::guest_bytes("hello.wasm"), name: "hello".into() };
    let process = sandbox.spawn(Command::new(hello)).await.unwrap();
    assert!(process.wait().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_blows_up_the_compiler_is_refused_naming_the_budget() {
    let host = budgeted_host(256 << 20, Duration::from_secs(120), false);
    let bomb = compiler_bomb(4000, 200);
    let started = Instant::now();
    let err = host.load_async(bomb.into(), "bomb.wasm".into()).await.err().expect("over budget");
    assert!(matches!(err, Error::CompileRefused { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("bomb.wasm cannot be compiled"), "{message}");
    assert!(message.contains("compile memory budget of 256 MiB"), "{message}");
    println!("refused in {:?}: {message}", started.elapsed());
    // The host is unharmed: it loads and runs the next program.
    run_hello(&host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compilation_past_the_time_budget_is_killed_and_named() {
    let host = budgeted_host(8 << 30, Duration::from_millis(300), false);
    let err = host.load_async(compiler_bomb(4000, 200).into(), "slow.wasm".into()).await.err().expect("too slow");
    let message = err.to_string();
    assert!(message.contains("slow.wasm cannot be compiled"), "{message}");
    assert!(message.contains("compile time budget of 300ms"), "{message}");
    let host = budgeted_host(8 << 30, Duration::from_secs(120), false);
    run_hello(&host).await;
}

/// One function with `locals` i32 locals, all read after `calls` calls of a blocking
/// import: every local is live at every call.
fn live_everywhere(locals: usize, calls: usize) -> Vec<u8> {
    let mut wat = String::from(
        "(module (import \"wasi_snapshot_preview1\" \"fd_read\" (func $read (param i32 i32 i32 i32) (result i32)))\n\
         (memory (export \"memory\") 1)\n(func (export \"_start\")\n",
    );
    let _ = write!(wat, "(local");
    for _ in 0..locals {
        wat.push_str(" i32");
    }
    wat.push_str(")\n");
    for _ in 0..calls {
        wat.push_str("(drop (call $read (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))\n");
    }
    for l in 0..locals {
        let _ = write!(wat, "(drop (local.get {l}))");
    }
    wat.push_str("))");
    wat::parse_str(&wat).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_locals_live_across_fifty_thousand_calls_run_without_checkpoints_and_say_why() {
    let host = budgeted_host(4 << 30, Duration::from_secs(120), true);
    let module = live_everywhere(50_000, 50_000);
    let started = Instant::now();
    let program = host.load_async(module.into(), "crafted.wasm".into()).await.unwrap();
    let took = started.elapsed();
    let why = program.checkpoint_support().expect_err("refused by the transform");
    assert!(why.contains("instrumentation budget"), "{why}");
    println!("loaded without checkpoints in {took:?}: {why}");
    assert!(took < Duration::from_secs(60), "{took:?}");
    // It runs (uninstrumented): its reads of an empty stdin return at once.
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let process = sandbox.spawn(Command::new(ProgramRef::Loaded { program, name: "crafted".into() })).await.unwrap();
    assert!(process.wait().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_blocks_around_a_blocking_call_instrument_and_compile_in_bounded_time() {
    let depth = 10_000;
    let mut wat = String::from(
        "(module (import \"wasi_snapshot_preview1\" \"fd_read\" (func $read (param i32 i32 i32 i32) (result i32)))\n\
         (memory (export \"memory\") 1)\n(func (export \"_start\") (local i32)\n",
    );
    for _ in 0..depth {
        wat.push_str("(block (local.set 0 (i32.add (local.get 0) (i32.const 1)))\n");
    }
    wat.push_str("(drop (call $read (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))");
    for _ in 0..depth {
        wat.push(')');
    }
    wat.push_str("))");
    let module = wat::parse_str(&wat).unwrap();
    let host = budgeted_host(2 << 30, Duration::from_secs(120), true);
    let started = Instant::now();
    let program = host.load_async(module.into(), "nested.wasm".into()).await.unwrap();
    println!("{depth} nested blocks: loaded in {:?}", started.elapsed());
    assert!(program.checkpoint_support().is_ok(), "{:?}", program.checkpoint_support().err());
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let process = sandbox.spawn(Command::new(ProgramRef::Loaded { program, name: "nested".into() })).await.unwrap();
    assert!(process.wait().await.success());
}

/// A module of one function of `bytes` bytes: calls of a blocking import, over and over
/// (about 9 million in 100 MB).
fn one_huge_function(bytes: usize) -> Vec<u8> {
    use wasm_encoder::*;
    let mut module = Module::new();
    let mut types = TypeSection::new();
    types.ty().function([ValType::I32; 4], [ValType::I32]);
    types.ty().function([], []);
    module.section(&types);
    let mut imports = ImportSection::new();
    imports.import("wasi_snapshot_preview1", "fd_read", EntityType::Function(0));
    module.section(&imports);
    let mut functions = FunctionSection::new();
    functions.function(1);
    module.section(&functions);
    let mut memories = MemorySection::new();
    memories.memory(MemoryType { minimum: 1, maximum: None, memory64: false, shared: false, page_size_log2: None });
    module.section(&memories);
    let mut exports = ExportSection::new();
    exports.export("_start", ExportKind::Func, 1);
    exports.export("memory", ExportKind::Memory, 0);
    module.section(&exports);
    // i32.const 0 (x4), call 0, drop
    const CALL: [u8; 11] = [0x41, 0, 0x41, 0, 0x41, 0, 0x41, 0, 0x10, 0, 0x1a];
    let mut body = Vec::with_capacity(bytes + 16);
    while body.len() < bytes {
        body.extend_from_slice(&CALL);
    }
    body.push(0x0b);
    let mut function = Function::new([]);
    function.raw(body);
    let mut code = CodeSection::new();
    code.function(&function);
    module.section(&code);
    module.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabyte_function_is_refused_in_bounded_time_and_memory() {
    let module = one_huge_function(100 << 20);
    assert!(module.len() > 100 << 20);
    let host = budgeted_host(1 << 30, Duration::from_secs(120), true);
    let started = Instant::now();
    let err = host.load_async(module.into(), "huge.wasm".into()).await.err().expect("refused");
    let took = started.elapsed();
    let message = err.to_string();
    // Validation refuses a function body over 7,654,321 bytes (the web's limit) before
    // the transform or the compiler sees it.
    assert!(matches!(err, Error::InvalidProgram { .. }), "{message}");
    assert!(message.contains("huge.wasm is not a valid WebAssembly program"), "{message}");
    assert!(message.contains("function body size"), "{message}");
    println!("refused in {took:?}: {message}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    assert_host_stayed_small();
    run_hello(&host).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seven_megabyte_function_of_calls_runs_without_checkpoints_or_is_refused_by_the_budget() {
    // Just under the body size limit: 680,000 calls, over the transform's 250,000 sites
    // per function.
    let module = one_huge_function(7 << 20);
    let host = budgeted_host(1 << 30, Duration::from_secs(120), true);
    let started = Instant::now();
    let loaded = host.load_async(module.into(), "big.wasm".into()).await;
    let took = started.elapsed();
    match loaded {
        Ok(program) => {
            let why = program.checkpoint_support().expect_err("refused by the transform");
            assert!(why.contains("instrumentation budget"), "{why}");
            println!("loaded without checkpoints in {took:?}: {why}");
        }
        Err(err) => {
            let message = err.to_string();
            assert!(matches!(err, Error::CompileRefused { .. }), "{message}");
            assert!(message.contains("compile memory budget") || message.contains("compile time budget"), "{message}");
            println!("refused in {took:?}: {message}");
        }
    }
    assert!(took < Duration::from_secs(150), "{took:?}");
    assert_host_stayed_small();
    run_hello(&host).await;
}

/// The crafted module never reached planning in this process: the host itself stayed
/// small (the compiler's memory is the worker's, under its budget).
fn assert_host_stayed_small() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let peak = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().to_string();
    let kib: u64 = peak.split_whitespace().nth(1).unwrap().parse().unwrap();
    println!("test process peak RSS: {} MiB", kib >> 10);
    assert!(kib < 2 << 20, "the host's own memory peaked at {} MiB", kib >> 10);
}
