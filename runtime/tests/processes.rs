//! Processes running real guests: stdio, exit codes, traps, limits, kill, concurrency.

mod common;

use common::{guest_bytes, guest_path, host, text};
use stasis_runtime::{
    Command, CpuQuota, Error, ExitStatus, Host, HostConfig, Limits, ProgramRef, Sandbox, SandboxConfig, StdinMode,
};
use std::time::{Duration, Instant};

fn bytes_cmd(name: &str) -> Command {
    Command::new(ProgramRef::Bytes { bytes: guest_bytes(name), name: name.to_string() })
}

fn sandbox(host: &Host, limits: Limits) -> Sandbox {
    Sandbox::create(host, SandboxConfig { limits, ..SandboxConfig::default() }).unwrap()
}

#[tokio::test]
async fn hello_sees_args_env_and_exit_code() {
    let host = host();
    let sb = sandbox(&host, Limits::default());
    let p =
        sb.spawn(bytes_cmd("hello.wasm").args(["a b", "ü"]).env("GREETING", "hi").env("EXIT_CODE", "7")).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(7));
    assert_eq!(text(p.stdout().contents()), "hello from stasis\narg[1]=a b\narg[2]=ü\nGREETING=hi\n");
    assert_eq!(text(p.stderr().contents()), "to stderr\n");
    assert_eq!(p.argv()[0], "hello.wasm");
}

#[tokio::test]
async fn component_hello_runs_like_the_module() {
    let host = host();
    let sb = sandbox(&host, Limits::default());
    let p = sb.spawn(bytes_cmd("hello.component.wasm").arg("x").env("GREETING", "yo")).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0));
    assert_eq!(text(p.stdout().contents()), "hello from stasis\narg[1]=x\nGREETING=yo\n");
    // WASIp2's `exit` carries only success or failure: a component's non-zero exit is 1,
    // as under `wasmtime run`.
    let p = sb.spawn(bytes_cmd("hello.component.wasm").env("EXIT_CODE", "3")).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(1));
}

#[tokio::test]
async fn stdin_pipe_drives_a_stateful_guest_incrementally() {
    let host = host();
    let sb = sandbox(&host, Limits::default());
    for guest in ["counter.wasm", "counter.component.wasm"] {
        let p = sb.spawn(bytes_cmd(guest).stdin(StdinMode::Pipe)).await.unwrap();
        let stdin = p.stdin().unwrap();
        stdin.write(b"5\n").unwrap();
        let first = p.stdout().read_next(0).await;
        assert_eq!(text(first.data), "total=5\n", "{guest}");
        stdin.write(b"10\n-3\n").unwrap();
        stdin.close();
        assert_eq!(p.wait().await, ExitStatus::Exited(0), "{guest}");
        assert_eq!(text(p.stdout().read_from(first.next_offset).data), "total=15\ntotal=12\nfinal=12\n", "{guest}");
    }
}

#[tokio::test]
async fn files_written_under_root_land_in_the_sandbox_tree() {
    let host = host();
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("bin")).unwrap();
    std::fs::copy(guest_path("fileio.wasm"), root.path().join("bin/fileio.wasm")).unwrap();
    let sb =
        Sandbox::create(&host, SandboxConfig { root: Some(root.path().into()), ..SandboxConfig::default() }).unwrap();
    // Resolved through PATH, as `fileio` would be on a Linux box.
    let p = sb.spawn(Command::named("fileio").args(["write", "/notes.txt", "frozen"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0));
    assert_eq!(std::fs::read_to_string(root.path().join("notes.txt")).unwrap(), "frozen");
    let p = sb.spawn(Command::named("/bin/fileio.wasm").args(["read", "/notes.txt"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0));
    assert_eq!(text(p.stdout().contents()), "frozen");
    // `..` cannot leave the preopen.
    let p = sb.spawn(Command::named("fileio").args(["read", "/../../etc/passwd"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(1));
    let err = sb.spawn(Command::named("nonexistent")).await.err().unwrap();
    assert!(matches!(err, Error::CommandNotFound { .. }), "{err}");
    assert!(err.to_string().contains("`nonexistent`"), "{err}");
}

#[tokio::test]
async fn trap_reports_the_trap_and_a_backtrace() {
    let host = host();
    let sb = sandbox(&host, Limits::default());
    let p = sb.spawn(bytes_cmd("trap.wasm")).await.unwrap();
    match p.wait().await {
        ExitStatus::Trapped { trap, backtrace } => {
            assert!(trap.contains("unreachable"), "{trap}");
            assert!(backtrace.contains("0x"), "{backtrace}");
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert_eq!(text(p.stdout().contents()), "about to trap\n");
    // C's stack lives in linear memory: overflowing it runs off the bottom of memory.
    let p = sb.spawn(bytes_cmd("trap.wasm").arg("stackoverflow")).await.unwrap();
    let status = p.wait().await;
    assert!(matches!(&status, ExitStatus::Trapped { trap, .. } if trap.contains("out of bounds")), "{status:?}");
    assert_eq!(status.code(), 134);
    // Unbounded wasm recursion exhausts the engine's call stack.
    let recursion = wat::parse_str(r#"(module (func $f (export "_start") (call $f)))"#).unwrap();
    let p = sb.spawn(Command::new(ProgramRef::Bytes { bytes: recursion.into(), name: "r".into() })).await.unwrap();
    let status = p.wait().await;
    assert!(matches!(&status, ExitStatus::Trapped { trap, .. } if trap.contains("call stack exhausted")), "{status:?}");
}

#[tokio::test]
async fn memory_limit_stops_a_memory_hog() {
    let host = host();
    let sb = sandbox(&host, Limits { max_memory: Some(16 << 20), ..Limits::default() });
    let p = sb.spawn(bytes_cmd("memhog.wasm").arg("64")).await.unwrap();
    let status = p.wait().await;
    match &status {
        ExitStatus::MemoryLimit(e) => assert_eq!(e.limit, 16 << 20),
        other => panic!("expected the memory limit, got {other:?}"),
    }
    assert_eq!(status.code(), 137);
    let p = sb.spawn(bytes_cmd("memhog.wasm").arg("4")).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0));
}

#[tokio::test]
async fn wall_and_cpu_timeouts_stop_an_endless_loop() {
    let host = host();
    let sb = sandbox(&host, Limits { timeout: Some(Duration::from_millis(200)), ..Limits::default() });
    let started = Instant::now();
    let p = sb.spawn(bytes_cmd("cpuloop.wasm").arg("100000")).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::TimedOut { limit: Duration::from_millis(200), cpu: false });
    assert!(started.elapsed() < Duration::from_secs(2));

    let sb = sandbox(&host, Limits { cpu_time: Some(Duration::from_millis(100)), ..Limits::default() });
    // Sleeping costs no CPU time: the sleeper finishes.
    let p = sb.spawn(bytes_cmd("sleeper.wasm").arg("300")).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0));
    let p = sb.spawn(bytes_cmd("cpuloop.wasm").arg("100000")).await.unwrap();
    assert!(matches!(p.wait().await, ExitStatus::TimedOut { cpu: true, .. }));
}

#[tokio::test]
async fn kill_stops_busy_and_blocked_guests() {
    let host = host();
    let sb = sandbox(&host, Limits::default());
    let busy = sb.spawn(bytes_cmd("cpuloop.wasm").arg("100000")).await.unwrap();
    let blocked = sb.spawn(bytes_cmd("counter.wasm").stdin(StdinMode::Pipe)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(busy.status(), None);
    assert_eq!(blocked.status(), None);
    sb.kill_all();
    assert_eq!(busy.wait_timeout(Duration::from_secs(1)).await, Some(ExitStatus::Killed));
    assert_eq!(blocked.wait_timeout(Duration::from_secs(1)).await, Some(ExitStatus::Killed));
}

/// On a single-threaded executor a CPU-bound guest must still let others run.
#[tokio::test(flavor = "current_thread")]
async fn a_busy_guest_never_blocks_the_others() {
    let host = host();
    let sb = sandbox(&host, Limits::default());
    let busy = sb.spawn(bytes_cmd("cpuloop.wasm").arg("100000")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let hello = sb.spawn(bytes_cmd("hello.wasm")).await.unwrap();
    assert_eq!(hello.wait_timeout(Duration::from_secs(2)).await, Some(ExitStatus::Exited(0)));
    assert_eq!(busy.status(), None, "the busy guest is still running");
    busy.kill();
    assert_eq!(busy.wait().await, ExitStatus::Killed);
}

#[tokio::test]
async fn many_concurrent_processes_all_finish() {
    let host = host();
    let sb = sandbox(&host, Limits::default());
    let mut procs = Vec::new();
    for i in 0..50 {
        procs.push(sb.spawn(bytes_cmd("hello.wasm").env("EXIT_CODE", (i % 5).to_string())).await.unwrap());
    }
    for (i, p) in procs.iter().enumerate() {
        assert_eq!(p.wait().await, ExitStatus::Exited((i % 5) as i32));
    }
    assert_eq!(sb.processes().len(), 50);
    for _ in 0..300 {
        sb.spawn(bytes_cmd("hello.wasm")).await.unwrap().wait().await;
    }
    assert!(sb.processes().len() <= stasis_runtime::sandbox::EXITED_PROCESSES_KEPT + 1);
}

#[tokio::test]
async fn progress_output_can_be_followed_live() {
    let host = host();
    let sb = sandbox(&host, Limits::default());
    let p = sb.spawn(bytes_cmd("cpuloop.wasm").args(["3"])).await.unwrap();
    let mut offset = 0;
    let mut lines = Vec::new();
    loop {
        let chunk = p.stdout().read_next(offset).await;
        offset = chunk.next_offset;
        lines.extend(text(chunk.data).lines().map(str::to_string));
        if chunk.eof {
            break;
        }
    }
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines[0].starts_with("progress 1/3"), "{lines:?}");
    assert!(lines[3].starts_with("done hash="), "{lines:?}");
}

#[tokio::test]
async fn a_start_section_runs_before_start() {
    // Prints "start\n" from its start function, then "main\n" from `_start`.
    let wasm = wat::parse_str(
        r#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 16) "start\n")
            (data (i32.const 32) "main\n")
            (func $print (param $at i32) (param $len i32)
                (i32.store (i32.const 0) (local.get $at))
                (i32.store (i32.const 4) (local.get $len))
                (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
            (func $init (call $print (i32.const 16) (i32.const 6)))
            (start $init)
            (func (export "_start") (call $print (i32.const 32) (i32.const 5))))"#,
    )
    .unwrap();
    let host = host();
    let sb = sandbox(&host, Limits::default());
    let p = sb.spawn(Command::new(ProgramRef::Bytes { bytes: wasm.into(), name: "started".into() })).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0));
    assert_eq!(text(p.stdout().contents()), "start\nmain\n");
}

#[tokio::test]
async fn bad_programs_get_clear_errors() {
    let host = host();
    let sb = sandbox(&host, Limits::default());
    let spawn =
        |bytes: Vec<u8>| sb.spawn(Command::new(ProgramRef::Bytes { bytes: bytes.into(), name: "bad.wasm".into() }));

    let err = spawn(b"#!/bin/sh".to_vec()).await.err().unwrap();
    assert!(matches!(err, Error::NotWasm { .. }), "{err}");

    let hello = guest_bytes("hello.wasm");
    let err = spawn(hello[..hello.len() / 2].to_vec()).await.err().unwrap();
    assert!(matches!(err, Error::InvalidProgram { .. }), "{err}");

    let unknown = wat::parse_str(r#"(module (import "env" "mystery" (func)) (func (export "_start")))"#).unwrap();
    let err = spawn(unknown).await.err().unwrap();
    assert!(matches!(err, Error::Link { .. }), "{err}");
    assert!(err.to_string().contains("mystery"), "{err}");

    let reactor = spawn(guest_bytes("reactor.wasm").to_vec()).await.unwrap();
    assert!(matches!(reactor.wait().await, ExitStatus::StartFailed(why) if why.contains("_start")));
}

#[test]
fn compiled_code_is_cached_on_disk_and_a_bad_artifact_is_recompiled() {
    let cache = tempfile::tempdir().unwrap();
    let config = HostConfig { code_cache_dir: Some(cache.path().to_path_buf()), ..HostConfig::default() };
    let bytes = guest_bytes("hello.wasm");
    Host::new(config.clone()).unwrap().load(&bytes, "hello").unwrap();
    // The compiled code, and a note of the rewrites' layouts beside it (the host's own
    // helper modules are cached there too, under their own hashes).
    let hash = blake3::hash(&bytes).to_hex().to_string();
    let artifacts: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&hash))
        .collect();
    assert_eq!(artifacts.len(), 1);

    // A fresh host loads the artifact instead of compiling: much faster.
    let started = Instant::now();
    Host::new(config.clone()).unwrap().load(&bytes, "hello").unwrap();
    let warm = started.elapsed();

    std::fs::write(&artifacts[0], b"garbage").unwrap();
    let program = Host::new(config).unwrap().load(&bytes, "hello").unwrap();
    assert_eq!(program.hash(), blake3::hash(&bytes));
    assert!(std::fs::read(&artifacts[0]).unwrap().len() > 100, "rewritten after the bad load");
    eprintln!("warm load took {warm:?}");
}

/// CPU time this test process has used (user and system).
fn cpu_used() -> Duration {
    // SAFETY: getrusage writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cpu_bound_guests_in_a_half_core_sandbox_share_half_a_core() {
    let host = host();
    let sb = sandbox(&host, Limits { cpus: Some(CpuQuota::new(0.5)), ..Limits::default() });
    let a = sb.spawn(bytes_cmd("cpuloop.wasm").arg("100000")).await.unwrap();
    let b = sb.spawn(bytes_cmd("cpuloop.wasm").arg("100000")).await.unwrap();
    // Past compilation and start-up: both are in their loops.
    for p in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !text(p.stdout().contents()).contains("progress") {
            assert!(Instant::now() < deadline, "no progress");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (cpu, wall) = (cpu_used(), Instant::now());
    let (a0, b0) = (a.stdout().contents().len(), b.stdout().contents().len());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu, wall) = (cpu_used() - cpu, wall.elapsed());
    let (a1, b1) = (a.stdout().contents().len(), b.stdout().contents().len());
    a.kill();
    b.kill();
    let cores = cpu.as_secs_f64() / wall.as_secs_f64();
    println!("two guests under a 0.5-core quota used {cores:.2} cores over {wall:?}");
    // Unthrottled, the two would hold both cores of a 2-core machine.
    assert!(cores < 0.65, "{cores:.2} cores");
    assert!(cores > 0.3, "{cores:.2} cores: the quota starved them");
    assert!(a1 > a0 && b1 > b0, "both make progress: {a0}->{a1}, {b0}->{b1}");
    assert!(matches!(a.wait().await, ExitStatus::Killed));
    assert!(matches!(b.wait().await, ExitStatus::Killed));
}
