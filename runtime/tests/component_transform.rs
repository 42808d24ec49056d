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

/// The parts of a host that owns a component's memories (see `host_memory`), for cargo's
/// `wordfreq` instrumented.
mod owned {
    pub use stasis_runtime::host_memory::{HostMemory, MemoryRegistry};
    pub use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxView, WasiView};

    pub struct State {
        pub ctx: WasiCtx,
        pub table: ResourceTable,
    }

    impl WasiView for State {
        fn ctx(&mut self) -> WasiCtxView<'_> {
            WasiCtxView { ctx: &mut self.ctx, table: &mut self.table }
        }
    }

    pub fn engine(registry: &MemoryRegistry) -> wasmtime::Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_exceptions(true).epoch_interruption(true);
        config.with_host_memory(std::sync::Arc::new(registry.clone())).memory_init_cow(false);
        wasmtime::Engine::new(&config).unwrap()
    }

    pub fn wordfreq(engine: &wasmtime::Engine) -> wasmtime::component::Component {
        let original = super::guest_bytes("wordfreq.component.wasm");
        let options = stasis_runtime::checkpoint::blocking_imports();
        let bytes = super::instrument_component(&original, &options).unwrap().bytes;
        wasmtime::component::Component::new(engine, &bytes).unwrap()
    }

    /// The control blocks (at the start of each instrumented module's unwind stack).
    pub fn stacks(memories: &[HostMemory]) -> Vec<HostMemory> {
        let max = Some(stasis_runtime::unwind::STACK_MAX_PAGES);
        memories.iter().filter(|m| m.ty().maximum() == max).cloned().collect()
    }

    pub fn word(stack: &HostMemory, at: usize) -> i32 {
        i32::from_le_bytes(stack.read(at, 4).unwrap().try_into().unwrap())
    }

    /// The functions of the frames on `stack`'s unwind stack, outermost first.
    pub fn frames(stack: &HostMemory) -> Vec<u32> {
        use stasis_runtime::unwind::CONTROL_BYTES;
        let sp = (word(stack, 4) + CONTROL_BYTES as i32) as u32;
        let data = stack.read(0, sp as usize).unwrap();
        stasis_runtime::unwind::stack_functions(&data[CONTROL_BYTES as usize..], sp - CONTROL_BYTES).unwrap()
    }
}

/// The host side of a stop, without the debug engine: cargo's `wordfreq`, instrumented,
/// runs on an engine whose memories the host owns (`host_memory`); an epoch callback arms
/// a stop by writing `ARMED` into the control block at the start of the module's unwind
/// stack memory, and the program unwinds out of `wasi:cli/run` to the host, its frames in
/// that memory.
#[tokio::test]
async fn a_running_component_armed_through_its_memory_unwinds_to_the_host() {
    use owned::*;
    use stasis_runtime::unwind::{ARMED, UNWINDING};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};

    let registry = MemoryRegistry;
    let engine = engine(&registry);
    let component = wordfreq(&engine);
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
    let stacks = stacks(&memories);
    assert!(!stacks.is_empty() && stacks.len() < memories.len(), "{} memories", memories.len());
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
    let frames = frames(stack);
    assert!(frames.len() >= 3, "the stack from `run` down to the stop: {frames:?}");
    println!("stopped after {lines} lines with {} frames on the unwind stack", frames.len());
}

/// A stop at a blocking call, the other half of the protocol: the host's
/// `blocking-read` (shadowed, as Stasis's linker would) sees a stop requested, writes
/// `UNWINDING` into the control blocks and returns at once with a result that needs no
/// allocation in the guest (`closed`); the program, which reads stdin line by line, unwinds
/// from that call out of `wasi:cli/run`, its frames in memory, having printed what it had
/// read before.
#[tokio::test]
async fn a_component_blocked_reading_stdin_unwinds_from_the_read() {
    use owned::*;
    use stasis_runtime::unwind::UNWINDING;
    use std::sync::{Arc, Mutex};
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::DynInputStream;
    use wasmtime_wasi::p2::bindings::io::streams::{self, HostInputStream, StreamError};
    use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};

    let registry = MemoryRegistry;
    let engine = engine(&registry);
    let component = wordfreq(&engine);
    let mut linker = wasmtime::component::Linker::<State>::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    // Where the control blocks are, once instantiated; the read unwinds after 3 reads.
    let control: Arc<Mutex<(Vec<HostMemory>, u32)>> = Arc::default();
    let seen = control.clone();
    linker.allow_shadowing(true);
    linker
        .instance("wasi:io/streams@0.2.12")
        .unwrap()
        .func_wrap_async(
            "[method]input-stream.blocking-read",
            move |mut store: wasmtime::StoreContextMut<'_, State>, (stream, len): (Resource<DynInputStream>, u64)| {
                let seen = seen.clone();
                Box::new(async move {
                    {
                        let mut control = seen.lock().unwrap();
                        control.1 += 1;
                        if control.1 > 3 {
                            for stack in &control.0 {
                                assert!(stack.write(0, &UNWINDING.to_le_bytes()));
                            }
                            return Ok((Err(StreamError::Closed),));
                        }
                    }
                    let table = &mut store.data_mut().table;
                    // A dozen bytes per read, so stdin takes several.
                    let result = match HostInputStream::blocking_read(table, stream, len.min(12)).await {
                        Ok(bytes) => Ok(bytes),
                        Err(e) => Err(streams::Host::convert_stream_error(table, e)?),
                    };
                    Ok((result,))
                })
            },
        )
        .unwrap();

    let stdout = MemoryOutputPipe::new(1 << 20);
    let ctx = wasmtime_wasi::WasiCtxBuilder::new()
        .stdin(MemoryInputPipe::new("first line\nsecond line\nthird line\nfourth line\n"))
        .stdout(stdout.clone())
        .env("ROUNDS", "1000")
        .args(&["wordfreq", "/"])
        .build();
    let mut store = wasmtime::Store::new(&engine, State { ctx, table: ResourceTable::new() });
    store.set_epoch_deadline(u64::MAX);
    let (command, memories) = registry
        .collect(wasmtime_wasi::p2::bindings::Command::instantiate_async(&mut store, &component, &linker))
        .await;
    let command = command.unwrap();
    control.lock().unwrap().0 = stacks(&memories);
    let outcome = command.wasi_cli_run().call_run(&mut store).await;
    assert!(outcome.is_ok(), "{outcome:?}");

    let stacks = stacks(&memories);
    let unwound: Vec<_> = stacks.iter().filter(|s| word(s, 4) > 0).collect();
    assert_eq!(unwound.len(), 1, "one module holds frames");
    let frames = frames(unwound[0]);
    assert!(frames.len() >= 3, "the stack from `run` down to the read: {frames:?}");
    let printed = String::from_utf8(stdout.contents().to_vec()).unwrap();
    println!("blocked read after {printed:?}: {} frames", frames.len());
    assert!(!printed.contains("wordfreq:") && !printed.is_empty(), "{printed:?}");
}
