//! What enforcing a sandbox's limits costs a guest: `writer` (three small files written
//! through wasi-libc's stdio at every step, so mostly `path_open`, `fd_write`, `fd_close`)
//! and `cpuloop` (pure wasm), each run unlimited and under the limits every API sandbox
//! has (a disk quota and a CPU share of 1 core), interleaved, median of 7.
//! Run: `cargo bench -p stasis-runtime --bench limits` after `guests/build.sh`.
//! Measured: writer 1.05x (the disk quota alone 0.99x; charging each write's size and
//! offset, as a first version did, made it 1.69x), cpuloop 1.006x.

use stasis_runtime::{Command, CpuQuota, DiskQuota, Host, HostConfig, Limits, ProgramRef, Sandbox, SandboxConfig};
use std::path::Path;
use std::time::{Duration, Instant};

const RUNS: usize = 7;

async fn run(host: &Host, root: &Path, limited: bool, name: &str, args: &[&str]) -> Duration {
    let limits = if limited {
        Limits { disk: Some(DiskQuota::new(root, 1 << 30)), cpus: Some(CpuQuota::new(1.0)), ..Limits::default() }
    } else {
        Limits::default()
    };
    let sandbox =
        Sandbox::create(host, SandboxConfig { root: Some(root.to_path_buf()), limits, ..SandboxConfig::default() })
            .unwrap();
    let bytes: std::sync::Arc<[u8]> =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/build").join(name)).unwrap().into();
    let command = Command::new(ProgramRef::Bytes { bytes, name: name.into() }).args(args.iter().copied());
    let started = Instant::now();
    let status = sandbox.spawn(command).await.unwrap().wait().await;
    assert!(status.success(), "{name}: {status}");
    started.elapsed()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

async fn compare(host: &Host, name: &str, args: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("w")).unwrap();
    run(host, tmp.path(), false, name, args).await;
    let (mut plain, mut limited) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        plain.push(run(host, tmp.path(), false, name, args).await);
        limited.push(run(host, tmp.path(), true, name, args).await);
    }
    let (plain, limited) = (median(plain), median(limited));
    println!(
        "{name} {}: unlimited {plain:.1?}, with disk quota + cpus 1.0 {limited:.1?}, ratio {:.3}",
        args.join(" "),
        limited.as_secs_f64() / plain.as_secs_f64()
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let host = Host::new(HostConfig::default()).unwrap();
        compare(&host, "writer.wasm", &["/w", "3000"]).await;
        compare(&host, "cpuloop.wasm", &["20"]).await;
    });
}
