//! The pause a running guest sees while its sandbox's filesystem snapshot is taken.
//!
//! Builds a 512 MiB tree (4,096 files of 4-256 KiB and eight 32 MiB files), starts the
//! `writer` guest rewriting files in it, then takes snapshots and prints, for each, the
//! warm capture time (guests running) and the pause (guests stopped at a safe point).
//! Run: `cargo bench -p stasis-runtime --bench snapshot_pause` after `guests/build.sh`.

use stasis_runtime::fs_snapshot::FsSnapshotStore;
use stasis_runtime::{Command, Host, HostConfig, ProgramRef, Sandbox, SandboxConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn fill(root: &Path) -> u64 {
    let mut total = 0u64;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|i| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                // Half text-like, half noise: compressible but not trivially.
                if i % 2 == 0 { b'a' + (seed % 16) as u8 } else { seed as u8 }
            })
            .collect()
    };
    for d in 0..64 {
        let dir = root.join(format!("dir{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..64 {
            let size = 4096 << ((d + f) % 7);
            std::fs::write(dir.join(format!("f{f:02}.dat")), bytes(size)).unwrap();
            total += size as u64;
        }
    }
    for b in 0..8 {
        std::fs::write(root.join(format!("big{b}.bin")), bytes(32 << 20)).unwrap();
        total += 32 << 20;
    }
    total
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let data = tempfile::tempdir().unwrap();
        let root = data.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let bytes = fill(&root);
        let store = Arc::new(FsSnapshotStore::open(data.path().join("store")).unwrap());
        let host = Host::new(HostConfig::default()).unwrap();
        let sandbox = Sandbox::create(&host, SandboxConfig { root: Some(root), ..SandboxConfig::default() }).unwrap();
        let writer = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/build/writer.wasm"))
            .expect("run guests/build.sh");
        let process =
            sandbox.spawn(Command::new(ProgramRef::Bytes { bytes: writer.into(), name: "writer".into() }).arg("/")).await.unwrap();
        process.stdout().read_next(0).await;
        println!("tree: {} MiB, writer guest running", bytes >> 20);
        let mut pauses = Vec::new();
        for i in 0..5 {
            let started = Instant::now();
            let report = sandbox.snapshot_filesystem(store.clone(), "bench".into()).await.unwrap();
            let total = started.elapsed();
            println!(
                "snapshot {i}: total {total:>9.1?}  warm capture {:>9.1?} ({} files read)  pause {:>8.2?} ({} files re-read)",
                report.warm.wall, report.warm.files_read, report.pause, report.paused.files_read
            );
            pauses.push(report.pause);
        }
        pauses.sort();
        println!("pause p50 {:?}  max {:?}", pauses[pauses.len() / 2], pauses.last().unwrap());
        process.kill();
        assert_ne!(process.wait_timeout(Duration::from_secs(5)).await, None);
    });
}
