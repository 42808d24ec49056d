//! Mid-execution snapshot figures (issue 6), side by side in one process:
//! - the unwind transform's time and code-size growth on hello, MicroPython and (when
//!   `WASI_PYTHON_WASM` names its `python.wasm`) CPython;
//! - the normal-speed tax: the same CPU-bound guests on the same engine configuration,
//!   loaded plain and through the transform;
//! - the idle MicroPython REPL (it has run `x = 6*7` and waits for its next line):
//!   snapshot p50, image size, warm restore p50, and the memory of 1,000 idle forks.
//!
//! - command components (cargo's `wordfreq`, componentize-py's CPython `pysum`): plain vs
//!   checkpointable spawn-to-exit, snapshot and restore p50 idle, 1,000 idle forks (their
//!   memory read once it stops growing: a restore returns before its process instantiates).
//!
//! Run: `cargo bench -p stasis-runtime --bench checkpoint` after `guests/build.sh`.
//! `CHECKPOINT_BENCH_FORKS=200` makes the fork runs smaller; `CHECKPOINT_BENCH=components`
//! runs only the components' figures.
//!
//! Figures on the development VM (2 vCPUs), 2026-12-06 (timings vary by ±10% run to run):
//! - transform: hello 23 -> 39 KiB (+66%) in 6.2 ms; MicroPython 362 -> 643 KiB (+78%)
//!   in 89 ms, 998 of 1,486 functions instrumented, 4,073 sites. A code cache keeps the
//!   result: later loads skip the transform.
//! - tax: cpuloop (C, CPU-bound) -0.1% (553 -> 552 ms); MicroPython running a Python loop
//!   +7.6% (64.6 -> 69.5 ms, start-up included).
//! - idle REPL: snapshot p50 1.0 ms, image 48 KiB (96 KiB of non-zero memory); warm
//!   restore p50 12 µs; restore to the answer of `print(x)` 0.86 ms; 1,000 idle forks
//!   idle after 0.8 s, RSS +200 MiB (0.20 MiB each).
//! - components: spawn to exit, `wordfreq` 199 -> 219 ms (+9.8%; -1.8% and +1.0% in the
//!   two runs before), adapter-made `cpuloop` +1.0%; `wordfreq` idle (728 KiB non-zero):
//!   snapshot p50 2.9 ms, restore to its answer 0.34 ms, forks 0.01-0.05 MiB each;
//!   `pysum` idle (11 MiB non-zero): snapshot p50 31-49 ms, restore to its answer
//!   7.4-11 ms, forks 0.82-0.84 MiB each.

mod common;

use common::{memory_mib, ms, percentile, us};
use stasis_runtime::unwind::instrument;
use stasis_runtime::{
    Command, Host, HostConfig, MemorySnapshot, MemorySnapshotStore, Process, ProgramRef, Sandbox, SandboxConfig,
    StdinMode,
};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn guest(name: &str) -> Arc<[u8]> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/build").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run guests/build.sh)", path.display())).into()
}

fn transform_figures() {
    println!("## transform: time and code size");
    let mut programs: Vec<(String, Arc<[u8]>)> =
        vec![("hello".into(), guest("hello.wasm")), ("micropython".into(), guest("micropython.wasm"))];
    match std::env::var("WASI_PYTHON_WASM") {
        Ok(path) => programs.push(("wasi-python".into(), std::fs::read(&path).expect("WASI_PYTHON_WASM").into())),
        Err(_) => println!("(CPython skipped: set WASI_PYTHON_WASM to the wasi-python package's python.wasm)"),
    }
    for (name, bytes) in programs {
        let start = Instant::now();
        let (out, layout) = instrument(&bytes, &stasis_runtime::checkpoint::blocking_imports()).unwrap();
        let took = start.elapsed();
        println!(
            "{name}: {:.1} MB/s, {} for {} KiB -> {} KiB (+{:.0}%), {}/{} functions instrumented, {} sites",
            bytes.len() as f64 / took.as_secs_f64() / 1e6,
            ms(took),
            bytes.len() / 1024,
            out.len() / 1024,
            (out.len() as f64 / bytes.len() as f64 - 1.0) * 100.0,
            layout.instrumented,
            layout.defined,
            layout.sites
        );
    }
}

async fn run_to_end(host: &Host, program: &str, args: &[&str]) -> Duration {
    let sandbox = Sandbox::create(host, SandboxConfig::default()).unwrap();
    let command =
        Command::new(ProgramRef::Bytes { bytes: guest(program), name: program.into() }).args(args.iter().copied());
    let start = Instant::now();
    let process = sandbox.spawn(command).await.unwrap();
    let status = process.wait().await;
    assert!(status.success(), "{program}: {status}");
    start.elapsed()
}

async fn tax_figures(plain: &Host, checkpoints: &Host) {
    println!("\n## normal-speed tax (same engine configuration, median of 7 runs, alternating)");
    let loop_py = "i = 0\nh = 0\nwhile i < 300000:\n    h = (h * 31 + i) % 1000003\n    i += 1\nprint(h)";
    let cases: [(&str, &[&str]); 2] = [("cpuloop.wasm", &["20", "100"]), ("micropython.wasm", &["-c", loop_py])];
    for (program, args) in cases {
        // Load (and compile) both first.
        run_to_end(plain, program, args).await;
        run_to_end(checkpoints, program, args).await;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..7 {
            a.push(run_to_end(plain, program, args).await);
            b.push(run_to_end(checkpoints, program, args).await);
        }
        let (a, b) = (percentile(&mut a, 0.5), percentile(&mut b, 0.5));
        println!(
            "{program}: plain {}, with the transform {}: {:+.1}%",
            ms(a),
            ms(b),
            (b.as_secs_f64() / a.as_secs_f64() - 1.0) * 100.0
        );
    }
}

async fn wait_for(process: &Process, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&process.stdout().contents()).contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} from the REPL");
        tokio::task::yield_now().await;
    }
}

async fn repl_figures(host: &Host) {
    println!("\n## idle MicroPython REPL (after `x = 6*7`, waiting for its next line)");
    let sandbox = Sandbox::create(host, SandboxConfig::default()).unwrap();
    let command = Command::new(ProgramRef::Bytes { bytes: guest("micropython.wasm"), name: "micropython".into() })
        .args(["-i"])
        .stdin(StdinMode::Pipe);
    let cold = Instant::now();
    let process = sandbox.spawn(command).await.unwrap();
    process.stdin().unwrap().write(b"x = 6*7\nprint('ready')\n").unwrap();
    wait_for(&process, "ready").await;
    let cold = cold.elapsed();
    println!("a cold start to `ready`: {}", ms(cold));
    idle_figures(host, &sandbox, 50, b"print(x)\n", "42").await;
}

/// The figures of a sandbox whose process is idle, waiting for its next line: snapshot
/// p50 (of `samples`), image size, restore p50 and restore to the process's answer to
/// `next` (it prints `answer`), and the memory of idle forks.
async fn idle_figures(host: &Host, sandbox: &Sandbox, samples: usize, next: &[u8], answer: &str) {
    tokio::time::sleep(Duration::from_millis(50)).await;
    let tmp = tempfile::tempdir().unwrap();
    let images = MemorySnapshotStore::open(tmp.path()).unwrap();
    let mut taken = Vec::new();
    let mut last = None;
    for _ in 0..samples {
        let start = Instant::now();
        let report = sandbox.snapshot_memory(None, &images).await.unwrap();
        taken.push(start.elapsed());
        if let Some(old) = last.replace(report.clone()) {
            images.delete(&old.id).unwrap();
        }
    }
    let report = last.unwrap();
    println!(
        "snapshot p50 {} (p99 {}): stop and capture {}, encode {}, durable write {}; image {} KiB ({} KiB of non-zero memory)",
        ms(percentile(&mut taken, 0.5)),
        ms(percentile(&mut taken, 0.99)),
        ms(report.hold),
        ms(report.encode),
        ms(report.write),
        report.image_bytes / 1024,
        report.memory_bytes / 1024
    );

    let opening = Instant::now();
    let snapshot = MemorySnapshot::open(host, &images, &report.id).unwrap();
    println!("opening the snapshot (verify, decompress): {}", ms(opening.elapsed()));
    let (mut restore, mut respond) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let start = Instant::now();
        let restored = snapshot.restore(host, SandboxConfig::default(), None).await.unwrap();
        restore.push(start.elapsed());
        let p = restored.processes().into_iter().find(|p| p.status().is_none()).unwrap();
        p.stdin().unwrap().write(next).unwrap();
        wait_for(&p, answer).await;
        respond.push(start.elapsed());
        p.kill();
    }
    println!(
        "warm restore p50 {} (p99 {}); restore to its answer to the next line p50 {}",
        us(percentile(&mut restore, 0.5)),
        us(percentile(&mut restore, 0.99)),
        ms(percentile(&mut respond, 0.5))
    );

    let forks: usize = std::env::var("CHECKPOINT_BENCH_FORKS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let (rss0, pss0) = memory_mib();
    let start = Instant::now();
    let mut kept = Vec::with_capacity(forks);
    for _ in 0..forks {
        kept.push(snapshot.restore(host, SandboxConfig::default(), None).await.unwrap());
    }
    let made = start.elapsed();
    // A restore returns before its process has instantiated and rewound to its blocked
    // read: wait until the forks' memory stops growing (a quarter second without 1 MiB).
    let mut last = memory_mib().0;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = memory_mib().0;
        if (now - last).abs() < 1.0 {
            break;
        }
        last = now;
    }
    let took = start.elapsed();
    let (rss1, pss1) = memory_mib();
    println!(
        "{forks} idle forks: restored in {}, all idle after {} ({} each), RSS +{:.0} MiB, PSS +{:.0} MiB ({:.2} MiB RSS each)",
        ms(made),
        ms(took),
        us(took / forks as u32),
        rss1 - rss0,
        pss1 - pss0,
        (rss1 - rss0) / forks as f64
    );
    let answering = kept[forks / 2].processes().into_iter().find(|p| p.status().is_none()).unwrap();
    answering.stdin().unwrap().write(next).unwrap();
    wait_for(&answering, answer).await;
    for sandbox in kept {
        sandbox.kill_all();
    }
}

/// Command components (issue 15): cargo's `wordfreq` plain (normal engine, original
/// bytes) and checkpointable (the self-contained transform, on the engine whose memories
/// the host makes), then idle with about 1 MiB of memory touched (it has counted a 96 KiB
/// line of distinct words into its map and waits for its next line): snapshot and restore
/// p50, and the memory of idle forks; the same for componentize-py's CPython.
async fn component_figures(plain: &Host, checkpoints: &Host) {
    println!("\n## command components: cargo's wasm32-wasip2 `wordfreq`");
    let lines: String = (0..40).map(|i| format!("w{i} x{} y{}\n", i % 7, i % 3)).collect();
    let root = tempfile::tempdir().unwrap();
    let command = |program: &str| Command::new(ProgramRef::Bytes { bytes: guest(program), name: program.into() });
    let cases = [
        (
            command("wordfreq.component.wasm")
                .args(["/"])
                .env("ROUNDS", "2000000")
                .stdin(StdinMode::Bytes(lines.into_bytes())),
            "wordfreq, 40 lines with a 2M-round loop each",
        ),
        (
            command("cpuloop.component.wasm").args(["20", "100"]),
            "cpuloop (C under the preview1 adapter, two instrumented modules)",
        ),
    ];
    for (command, what) in cases {
        let run = async |host: &Host| {
            let config = SandboxConfig { root: Some(root.path().into()), ..SandboxConfig::default() };
            let sandbox = Sandbox::create(host, config).unwrap();
            let command = command.clone();
            let start = Instant::now();
            let process = sandbox.spawn(command).await.unwrap();
            let status = process.wait().await;
            assert!(status.success(), "{status}: {}", String::from_utf8_lossy(&process.stderr().contents()));
            start.elapsed()
        };
        run(plain).await;
        run(checkpoints).await;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..7 {
            a.push(run(plain).await);
            b.push(run(checkpoints).await);
        }
        let (a, b) = (percentile(&mut a, 0.5), percentile(&mut b, 0.5));
        println!(
            "{what}, spawn to exit: plain {}, checkpointable {}: {:+.1}%",
            ms(a),
            ms(b),
            (b.as_secs_f64() / a.as_secs_f64() - 1.0) * 100.0
        );
    }

    let sandbox = Sandbox::create(checkpoints, SandboxConfig::default()).unwrap();
    let wordfreq = command("wordfreq.component.wasm").args(["/"]).env("ROUNDS", "1000").stdin(StdinMode::Pipe);
    let process = sandbox.spawn(wordfreq).await.unwrap();
    let mut big = String::new();
    let mut i = 0;
    while big.len() < 96 << 10 {
        big += &format!("word{i} ");
        i += 1;
    }
    big.push('\n');
    process.stdin().unwrap().write(big.as_bytes()).unwrap();
    wait_for(&process, "line 1:").await;
    println!("idle after a {} KiB line ({i} words):", big.len() / 1024);
    idle_figures(checkpoints, &sandbox, 30, b"one more\n", "line 2:").await;

    // CPython: 14 dynamically linked modules, 12 MB of memory.
    println!("\n## componentize-py's CPython (`pysum`), idle on its second line");
    let sandbox = Sandbox::create(checkpoints, SandboxConfig::default()).unwrap();
    let process =
        sandbox.spawn(command("pysum.component.wasm").env("ROUNDS", "1000").stdin(StdinMode::Pipe)).await.unwrap();
    process.stdin().unwrap().write(b"1 2 3\n").unwrap();
    wait_for(&process, "line 1:").await;
    idle_figures(checkpoints, &sandbox, 20, b"40\n", "line 2:").await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        if std::env::var("CHECKPOINT_BENCH").as_deref() != Ok("components") {
            transform_figures();
        }
        let plain = Host::new(HostConfig { max_processes: None, ..HostConfig::default() }).unwrap();
        let checkpoints =
            Host::new(HostConfig { max_processes: None, checkpoints: true, ..HostConfig::default() }).unwrap();
        if std::env::var("CHECKPOINT_BENCH").as_deref() != Ok("components") {
            tax_figures(&plain, &checkpoints).await;
            repl_figures(&checkpoints).await;
        }
        component_figures(&plain, &checkpoints).await;
    });
}
