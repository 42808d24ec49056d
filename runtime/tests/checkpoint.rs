//! Mid-execution snapshots of real guests: a C program blocked reading stdin, one
//! sleeping, a CPU-bound loop and the MicroPython REPL, captured while running and
//! continued on fresh instances with the same output as an uninterrupted run.

mod common;

use common::guest_bytes;
use stasis_runtime::{
    AfterCheckpoint, Command, ExitStatus, Host, HostConfig, MemorySnapshot, MemorySnapshotStore, Process, ProgramRef,
    Sandbox, SandboxConfig, StdinMode,
};
use std::time::{Duration, Instant};

fn checkpoint_host() -> Host {
    Host::new(HostConfig { checkpoints: true, ..HostConfig::default() }).unwrap()
}

fn command(guest: &str, args: &[&str]) -> Command {
    let name = guest.trim_end_matches(".wasm").to_string();
    Command::new(ProgramRef::Bytes { bytes: guest_bytes(guest), name }).args(args.iter().copied())
}

async fn wait_for_output(process: &Process, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&process.stdout().contents()).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no `{needle}` in {:?}",
            String::from_utf8_lossy(&process.stdout().contents())
        );
        assert!(process.status().is_none(), "ended early: {:?}", process.status());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Snapshots the sandbox (its running process included) and restores it on a fresh
/// sandbox of the same host; the restored process continues.
async fn snapshot_and_restore(host: &Host, sandbox: &Sandbox) -> (Sandbox, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let images = MemorySnapshotStore::open(tmp.path().join("memory")).unwrap();
    let report = sandbox.snapshot_memory(None, &images).await.unwrap();
    let snapshot = MemorySnapshot::open(host, &images, &report.id).unwrap();
    let restored = snapshot.restore(host, SandboxConfig::default(), None).await.unwrap();
    (restored, tmp)
}

fn only_process(sandbox: &Sandbox) -> Process {
    let processes = sandbox.processes();
    assert_eq!(processes.len(), 1);
    processes[0].clone()
}

#[tokio::test]
async fn a_stdin_counter_blocked_in_a_read_continues_on_a_fresh_instance() {
    let host = checkpoint_host();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let process = sandbox.spawn(command("counter.wasm", &[]).stdin(StdinMode::Pipe)).await.unwrap();
    assert!(process.checkpointable());
    process.stdin().unwrap().write(b"5\n").unwrap();
    wait_for_output(&process, "total=5").await;

    let (restored, _tmp) = snapshot_and_restore(&host, &sandbox).await;
    // The original keeps running too: two independent continuations.
    process.stdin().unwrap().write(b"1\n").unwrap();
    process.stdin().unwrap().close();
    assert_eq!(process.wait().await, ExitStatus::Exited(0));
    assert_eq!(common::text(process.stdout().contents()), "total=5\ntotal=6\nfinal=6\n");

    let resumed = only_process(&restored);
    assert!(resumed.status().is_none(), "the restored process is running");
    let stdin = resumed.stdin().expect("a restored process has a stdin pipe");
    stdin.write(b"7\n").unwrap();
    stdin.close();
    assert_eq!(resumed.wait().await, ExitStatus::Exited(0));
    assert_eq!(common::text(resumed.stdout().contents()), "total=5\ntotal=12\nfinal=12\n");
}

#[tokio::test]
async fn a_cpu_bound_loop_stopped_anywhere_prints_what_an_uninterrupted_run_prints() {
    let host = checkpoint_host();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let uninterrupted = sandbox.spawn(command("cpuloop.wasm", &["12"])).await.unwrap();
    assert_eq!(uninterrupted.wait().await, ExitStatus::Exited(0));
    let expected = uninterrupted.stdout().contents();

    // Stopped twice in place (it rewinds and goes on), then once for good and resumed
    // on a fresh instance.
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let process = sandbox.spawn(command("cpuloop.wasm", &["12"])).await.unwrap();
    wait_for_output(&process, "progress 2/12").await;
    let checkpoint = process.checkpoint(AfterCheckpoint::Continue).await.unwrap();
    assert!(!checkpoint.parts.is_empty());
    wait_for_output(&process, "progress 4/12").await;
    process.checkpoint(AfterCheckpoint::Continue).await.unwrap();
    wait_for_output(&process, "progress 6/12").await;
    let (restored, _tmp) = snapshot_and_restore(&host, &sandbox).await;
    assert_eq!(process.wait().await, ExitStatus::Exited(0));
    assert_eq!(process.stdout().contents(), expected);

    let resumed = only_process(&restored);
    assert_eq!(resumed.wait().await, ExitStatus::Exited(0));
    assert_eq!(common::text(resumed.stdout().contents()), common::text(expected));
}

#[tokio::test]
async fn a_sleep_interrupted_by_a_checkpoint_sleeps_what_was_left() {
    let host = checkpoint_host();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let process = sandbox.spawn(command("sleeper.wasm", &["600"])).await.unwrap();
    wait_for_output(&process, "sleeping").await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let checkpoint = process.checkpoint(AfterCheckpoint::Stop).await.unwrap();
    assert_eq!(process.wait().await, ExitStatus::Checkpointed);
    assert!(started.elapsed() < Duration::from_millis(500), "the checkpoint waited for the sleep");

    let tmp = tempfile::tempdir().unwrap();
    let images = MemorySnapshotStore::open(tmp.path()).unwrap();
    let bytes = stasis_runtime::checkpoint::encode_standalone(
        host.engine_fingerprint(),
        &checkpoint,
        &guest_bytes("sleeper.wasm"),
        vec![],
    );
    let id = stasis_runtime::fs_snapshot::SnapshotId::generate(std::time::SystemTime::now()).unwrap();
    images.write_image(&id, &bytes).unwrap();
    let snapshot = MemorySnapshot::open(&host, &images, &id).unwrap();
    // The first restore of a stack builds its rewind copies (time the guest does not
    // see, but the wall clock here would): time a second one.
    let warm_up = snapshot.restore(&host, SandboxConfig::default(), None).await.unwrap();
    assert_eq!(only_process(&warm_up).wait().await, ExitStatus::Exited(0));
    let resumed_at = Instant::now();
    let restored = snapshot.restore(&host, SandboxConfig::default(), None).await.unwrap();
    let resumed = only_process(&restored);
    assert_eq!(resumed.wait().await, ExitStatus::Exited(0));
    let slept = resumed_at.elapsed();
    assert_eq!(common::text(resumed.stdout().contents()), "sleeping\nawake\n");
    // About 400 ms were left of the 600 ms sleep: not the whole sleep again, not nothing.
    assert!(
        slept >= Duration::from_millis(300) && slept < Duration::from_millis(580),
        "slept {slept:?} after the restore"
    );
}

#[tokio::test]
async fn the_micropython_repl_remembers_x_across_a_restore() {
    let host = checkpoint_host();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let process = sandbox.spawn(command("micropython.wasm", &["-i"]).stdin(StdinMode::Pipe)).await.unwrap();
    assert!(process.checkpointable(), "MicroPython goes through the transform");
    process.stdin().unwrap().write(b"x = 6*7\n").unwrap();
    // Let the REPL take the line and block on the next read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (restored, _tmp) = snapshot_and_restore(&host, &sandbox).await;
    process.kill();

    let resumed = only_process(&restored);
    let stdin = resumed.stdin().unwrap();
    stdin.write(b"print(x)\n").unwrap();
    stdin.close();
    let status = resumed.wait().await;
    let out = common::text(resumed.stdout().contents());
    assert!(
        out.contains("42"),
        "stdout {out:?}, status {status:?}, stderr {:?}",
        String::from_utf8_lossy(&resumed.stderr().contents())
    );
}

#[tokio::test]
async fn a_sandbox_with_a_tree_is_captured_with_its_running_processes() {
    use stasis_runtime::fs_snapshot::FsSnapshotStore;
    let host = checkpoint_host();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let fs = std::sync::Arc::new(FsSnapshotStore::open(tmp.path().join("fs")).unwrap());
    let images = MemorySnapshotStore::open(tmp.path().join("memory")).unwrap();
    let sandbox = Sandbox::create(&host, SandboxConfig { root: Some(root), ..SandboxConfig::default() }).unwrap();
    let process = sandbox.spawn(command("counter.wasm", &[]).stdin(StdinMode::Pipe)).await.unwrap();
    process.stdin().unwrap().write(b"5\n").unwrap();
    wait_for_output(&process, "total=5").await;
    let sleeper = sandbox.spawn(command("sleeper.wasm", &["60000"])).await.unwrap();
    wait_for_output(&sleeper, "sleeping").await;
    let report = tokio::time::timeout(Duration::from_secs(20), sandbox.snapshot_memory(Some(fs.clone()), &images))
        .await
        .expect("the snapshot finishes")
        .unwrap();
    let snapshot = MemorySnapshot::open(&host, &images, &report.id).unwrap();
    let config = SandboxConfig { root: Some(tmp.path().join("restored")), ..SandboxConfig::default() };
    let restored = snapshot.restore(&host, config, Some(&fs)).await.unwrap();
    let running: Vec<Process> = restored.processes().into_iter().filter(|p| p.status().is_none()).collect();
    assert_eq!(running.len(), 2);
    sleeper.kill();
    process.kill();
    for p in running {
        p.kill();
    }
}

#[tokio::test]
async fn a_second_host_on_the_same_code_cache_skips_the_transform_and_still_checkpoints() {
    let cache = tempfile::tempdir().unwrap();
    let config =
        || HostConfig { checkpoints: true, code_cache_dir: Some(cache.path().to_path_buf()), ..HostConfig::default() };
    let first = Host::new(config()).unwrap();
    first.load(&guest_bytes("counter.wasm"), "counter").unwrap();
    let notes = std::fs::read_dir(cache.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "note"))
        .count();
    assert_eq!(notes, 1, "the layouts are stored next to the compiled code");

    let second = Host::new(config()).unwrap();
    let sandbox = Sandbox::create(&second, SandboxConfig::default()).unwrap();
    let process = sandbox.spawn(command("counter.wasm", &[]).stdin(StdinMode::Pipe)).await.unwrap();
    assert!(process.program().unwrap().checkpoint_support().is_ok());
    process.stdin().unwrap().write(b"2\n").unwrap();
    wait_for_output(&process, "total=2").await;
    process.checkpoint(AfterCheckpoint::Continue).await.unwrap();
    process.stdin().unwrap().write(b"3\n").unwrap();
    process.stdin().unwrap().close();
    assert_eq!(process.wait().await, ExitStatus::Exited(0));
    assert_eq!(common::text(process.stdout().contents()), "total=2\ntotal=5\nfinal=5\n");
}

/// A crafted image whose unwind stack is garbage (its checksums made to match) restores
/// into a process that fails inside its sandbox, never the host.
#[tokio::test]
async fn a_crafted_unwind_stack_fails_the_guest_not_the_host() {
    use stasis_runtime::memory_image::ProcessStateImage;
    let host = checkpoint_host();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let process = sandbox.spawn(command("counter.wasm", &[]).stdin(StdinMode::Pipe)).await.unwrap();
    process.stdin().unwrap().write(b"5\n").unwrap();
    wait_for_output(&process, "total=5").await;
    let mut checkpoint = process.checkpoint(AfterCheckpoint::Stop).await.unwrap();
    let ProcessStateImage::Suspended(state) = &checkpoint.image.state else { panic!("not suspended") };
    let layout = process.program().unwrap().checkpoint_support().unwrap().clone();
    let part = state.instance.memories[layout.stack_memory as usize].part as usize;
    let mut seed = 0x9E3779B97F4A7C15u64;
    for byte in checkpoint.parts[part].iter_mut() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *byte = seed as u8;
    }
    let bytes = stasis_runtime::checkpoint::encode_standalone(
        host.engine_fingerprint(),
        &checkpoint,
        &guest_bytes("counter.wasm"),
        vec![],
    );
    let snapshot = MemorySnapshot::from_standalone(&host, &bytes).unwrap();
    let restored = snapshot.restore(&host, SandboxConfig::default(), None).await.unwrap();
    let resumed = only_process(&restored);
    if let Some(stdin) = resumed.stdin() {
        stdin.close();
    }
    let status = tokio::time::timeout(Duration::from_secs(20), resumed.wait()).await.expect("it ends");
    assert!(!status.success() || !common::text(resumed.stdout().contents()).contains("final=5"), "{status}");
    // The host goes on: a fresh process runs normally.
    let again = sandbox.spawn(command("counter.wasm", &[]).stdin(StdinMode::Bytes(b"1\n".to_vec()))).await.unwrap();
    assert_eq!(again.wait().await, ExitStatus::Exited(0));
}

/// A call-free loop in a program that can also block is not a stop point (see `unwind`):
/// a checkpoint waits for it, and one given up on is withdrawn rather than left pending.
#[tokio::test]
async fn a_checkpoint_given_up_on_is_withdrawn() {
    let wat = r#"(module
        (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (func (export "reader") (result i32) i32.const 0 i32.const 0 i32.const 0 i32.const 0 call $read)
        (func $spin loop br 0 end)
        (func (export "_start") call $spin))"#;
    let host = checkpoint_host();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    let bytes: std::sync::Arc<[u8]> = wat::parse_str(wat).unwrap().into();
    let process = sandbox.spawn(Command::new(ProgramRef::Bytes { bytes, name: "spin".into() })).await.unwrap();
    for _ in 0..2 {
        let attempt = tokio::time::timeout(Duration::from_millis(200), process.checkpoint(AfterCheckpoint::Continue));
        assert!(attempt.await.is_err(), "the spinning loop has no stop point");
    }
    assert!(process.status().is_none());
    process.kill();
    assert_eq!(process.wait().await, ExitStatus::Killed);
}
