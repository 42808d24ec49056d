//! Spawn-to-exit latency of a small guest with a warm code cache, in process.
//!
//! Prints p50/p90/p99 of `Sandbox::spawn` + `Process::wait` for `hello.wasm` (module and
//! component) and for MicroPython `-c 'print(1)'`. Target (issue 2): hello p50 <= 100 us.
//! Run: `cargo bench -p stasis-runtime --bench spawn` after `guests/build.sh`.

use stasis_runtime::{Command, Host, HostConfig, ProgramRef, Sandbox, SandboxConfig};
use std::path::Path;
use std::time::{Duration, Instant};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn measure(sandbox: &Sandbox, name: &str, args: &[&str], iterations: usize) {
    let bytes: std::sync::Arc<[u8]> =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/build").join(name))
            .unwrap_or_else(|e| panic!("{name}: {e} (run guests/build.sh)"))
            .into();
    let program = sandbox.host().load(&bytes, name).unwrap();
    let command = Command::new(ProgramRef::Loaded { program, name: name.into() }).args(args.iter().copied());
    for _ in 0..20 {
        sandbox.spawn(command.clone()).await.unwrap().wait().await;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        let process = sandbox.spawn(command.clone()).await.unwrap();
        let status = process.wait().await;
        samples.push(started.elapsed());
        assert!(status.success(), "{name}: {status}");
    }
    samples.sort();
    println!(
        "spawn-to-exit {name:<24} {:>5} runs  p50 {:>9.1?}  p90 {:>9.1?}  p99 {:>9.1?}",
        iterations,
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 0.99)
    );
}

async fn measure_all(label: &str, config: HostConfig) {
    println!("-- {label}");
    let host = Host::new(config).unwrap();
    let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
    measure(&sandbox, "hello.wasm", &[], 2000).await;
    measure(&sandbox, "hello.component.wasm", &[], 1000).await;
    measure(&sandbox, "micropython.wasm", &["-c", "print(1)"], 300).await;
}

fn main() {
    let pooled = HostConfig::default();
    let on_demand = HostConfig { max_processes: None, ..HostConfig::default() };
    let current = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let multi = || tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    current().block_on(measure_all("current-thread executor, pooled instances (default)", pooled.clone()));
    current().block_on(measure_all("current-thread executor, on-demand instances", on_demand));
    multi().block_on(measure_all("multi-thread executor (2 workers), pooled instances", pooled));
    println!("target: hello.wasm p50 <= 100us");
}
