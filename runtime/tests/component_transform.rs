//! Components with every core module through the unwind transform run exactly as the
//! originals: the adapter-made `counter` fed through a stdin pipe, cargo's wasm32-wasip2
//! `wordfreq` writing a file, and componentize-py's CPython (`pysum`). Nothing stops them
//! (a stop that crosses modules is not built yet): this pins that the instrumented code,
//! on its normal path, is the program it was.

mod common;

use common::{guest_bytes, host, text};
use stasis_runtime::unwind::instrument_component;
use stasis_runtime::{Command, ExitStatus, Host, ProgramRef, Sandbox, SandboxConfig, StdinMode};

/// Runs `guest` (or its instrumented form) in a fresh sandbox with `stdin`; returns the
/// exit status, stdout, stderr and the files it left in `/`.
async fn run(
    host: &Host,
    guest: &str,
    instrumented: bool,
    args: &[&str],
    stdin: &[u8],
) -> (ExitStatus, String, String, Vec<(String, Vec<u8>)>) {
    let original = guest_bytes(guest);
    let bytes: std::sync::Arc<[u8]> = if instrumented {
        instrument_component(&original, &stasis_runtime::checkpoint::blocking_imports()).unwrap().bytes.into()
    } else {
        original
    };
    let root = tempfile::tempdir().unwrap();
    let sb =
        Sandbox::create(host, SandboxConfig { root: Some(root.path().into()), ..SandboxConfig::default() }).unwrap();
    let mut command = Command::new(ProgramRef::Bytes { bytes, name: guest.to_string() }).args(args.iter().copied());
    command = command.env("ROUNDS", "3000").stdin(StdinMode::Pipe);
    let p = sb.spawn(command).await.unwrap();
    let pipe = p.stdin().unwrap();
    pipe.write(stdin).unwrap();
    pipe.close();
    let status = p.wait().await;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root.path()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            files.push((entry.file_name().to_string_lossy().into_owned(), std::fs::read(entry.path()).unwrap()));
        }
    }
    files.sort();
    (status, text(p.stdout().contents()), text(p.stderr().contents()), files)
}

#[tokio::test]
async fn instrumented_components_run_as_the_originals() {
    let host = host();
    let cases: [(&str, &[&str], &[u8]); 4] = [
        ("counter.component.wasm", &[], b"5\n10\n-3\n"),
        ("hello.component.wasm", &["x"], b""),
        ("wordfreq.component.wasm", &["/"], b"the cat\nThe dog\n"),
        ("pysum.component.wasm", &[], b"1 2\n30\n"),
    ];
    for (guest, args, stdin) in cases {
        let plain = run(&host, guest, false, args, stdin).await;
        let instrumented = run(&host, guest, true, args, stdin).await;
        assert_eq!(plain.0, ExitStatus::Exited(0), "{guest}: {plain:?}");
        assert!(!plain.1.is_empty(), "{guest} printed nothing");
        assert_eq!(instrumented, plain, "{guest}");
    }
}

/// The host side of a stop, without the debug engine: cargo's `wordfreq`, instrumented,
/// runs on an engine whose memories the host owns (`host_memory`); an epoch callback arms
/// a stop by writing `ARMED` into the control block at the start of the module's unwind
/// stack memory, and the program unwinds out of `wasi:cli/run` to the host, its frames in
/// that memory. (Resuming such a stack is not built yet.)
#[tokio::test]
async fn a_running_component_armed_through_its_memory_unwinds_to_the_host() {
    use stasis_runtime::host_memory::MemoryRegistry;
    use stasis_runtime::unwind::{ARMED, CONTROL_BYTES, UNWINDING, stack_functions};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
    use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxView, WasiView};

    struct State {
        ctx: WasiCtx,
        table: ResourceTable,
    }
    impl WasiView for State {
        fn ctx(&mut self) -> WasiCtxView<'_> {
            WasiCtxView { ctx: &mut self.ctx, table: &mut self.table }
        }
    }

    let registry = MemoryRegistry;
    let mut config = wasmtime::Config::new();
    config.wasm_exceptions(true).epoch_interruption(true);
    config.with_host_memory(Arc::new(registry.clone())).memory_init_cow(false);
    let engine = wasmtime::Engine::new(&config).unwrap();
    let original = guest_bytes("wordfreq.component.wasm");
    let bytes = instrument_component(&original, &stasis_runtime::checkpoint::blocking_imports()).unwrap().bytes;
    let component = wasmtime::component::Component::new(&engine, &bytes).unwrap();
    let mut linker = wasmtime::component::Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();

    // 200 lines, each followed by a CPU stretch of a few milliseconds.
    let input: String = (0..200).map(|i| format!("word{i} and more words\n")).collect();
    let stdout = MemoryOutputPipe::new(1 << 20);
    let ctx = wasmtime_wasi::WasiCtxBuilder::new()
        .stdin(MemoryInputPipe::new(input))
        .stdout(stdout.clone())
        .env("ROUNDS", "2000000")
        .args(&["wordfreq", "/"])
        .build();
    let mut store = wasmtime::Store::new(&engine, State { ctx, table: ResourceTable::new() });
    store.set_epoch_deadline(1);
    let (command, memories) = registry
        .collect(wasmtime_wasi::p2::bindings::Command::instantiate_async(&mut store, &component, &linker))
        .await;
    let command = command.unwrap();
    // The unwind stacks (with their control blocks) of the instrumented modules: the
    // program's, and the shim's when its calls through its table count as stop points.
    let stacks: Vec<_> = memories
        .iter()
        .filter(|m| m.ty().maximum() == Some(stasis_runtime::unwind::STACK_MAX_PAGES))
        .cloned()
        .collect();
    assert!(!stacks.is_empty() && stacks.len() < memories.len(), "{} memories", memories.len());
    let word = |stack: &stasis_runtime::host_memory::HostMemory, at: usize| {
        i32::from_le_bytes(stack.read(at, 4).unwrap().try_into().unwrap())
    };
    assert!(stacks.iter().all(|s| word(s, 0) == 0), "a fresh control block is NORMAL");

    // Arm the stop once the program has run for a while (an epoch tick every 5 ms).
    let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let armed = stacks.clone();
    let seen = ticks.clone();
    store.epoch_deadline_callback(move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) == 10 {
            for stack in &armed {
                assert!(stack.write(0, &ARMED.to_le_bytes()));
            }
        }
        Ok(wasmtime::UpdateDeadline::Continue(1))
    });
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (engine, stop) = (engine.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(5));
                engine.increment_epoch();
            }
        })
    };
    let outcome = command.wasi_cli_run().call_run(&mut store).await;
    stop.store(true, Ordering::SeqCst);
    ticker.join().unwrap();

    // `run` returned because the program unwound, not because it finished.
    assert!(outcome.is_ok(), "{outcome:?}");
    let unwound: Vec<_> = stacks.iter().filter(|s| word(s, 0) == UNWINDING).collect();
    assert_eq!(unwound.len(), 1, "one module's control block says it unwound");
    let stack = unwound[0];
    let printed = String::from_utf8(stdout.contents().to_vec()).unwrap();
    let lines = printed.lines().count();
    assert!(lines < 200, "it stopped before the end of its input ({lines} lines printed)");
    let sp = (word(stack, 4) + CONTROL_BYTES as i32) as u32;
    assert!(sp > CONTROL_BYTES, "frames on the unwind stack");
    let data = stack.read(0, sp as usize).unwrap();
    let frames = stack_functions(&data[CONTROL_BYTES as usize..], sp - CONTROL_BYTES).unwrap();
    assert!(frames.len() >= 3, "the stack from `run` down to the stop: {frames:?}");
    println!("stopped after {lines} lines with {} frames on the unwind stack ({sp} bytes)", frames.len());
}
