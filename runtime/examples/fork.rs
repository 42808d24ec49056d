//! Fork many runs from one warm state: the C reactor from `guests/` is warmed up, memory
//! snapshotted, and forked; every fork continues from the same total, independently.
//!
//! `cargo run --release -p stasis-runtime --example fork [N]` after `guests/build.sh`.

use stasis_runtime::{
    Command, Host, HostConfig, MemorySnapshot, MemorySnapshotStore, ProgramRef, Sandbox, SandboxConfig,
};
use std::time::Instant;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let forks: usize = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(100);
    let wasm = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../guests/build/reactor.wasm"))
        .map_err(|e| format!("guests/build/reactor.wasm: {e} (run guests/build.sh)"))?;
    let host = Host::new(HostConfig { max_processes: Some(forks as u32 + 10), ..HostConfig::default() })?;
    let store_dir = tempfile::tempdir()?;
    let images = MemorySnapshotStore::open(store_dir.path())?;

    // Warm up: 1 MiB of heap and a total of 41.
    let sandbox = Sandbox::create(&host, SandboxConfig::default())?;
    let reactor =
        sandbox.instantiate(Command::new(ProgramRef::Bytes { bytes: wasm.into(), name: "reactor".into() })).await?;
    reactor.call_i32("touch", &[1024]).await?;
    reactor.call_i32("add", &[41]).await?;
    let report = sandbox.snapshot_memory(None, &images).await?;
    println!(
        "snapshot {}: {} bytes of image for {} bytes of memory",
        report.id.as_str(),
        report.image_bytes,
        report.memory_bytes
    );

    let snapshot = MemorySnapshot::open(&host, &images, &report.id)?;
    let started = Instant::now();
    let sandboxes = snapshot.fork(&host, forks, |_| SandboxConfig::default(), None).await?;
    let took = started.elapsed();
    for (i, fork) in sandboxes.iter().enumerate() {
        let total = fork.reactors()[0].call_i32("add", &[i as i32]).await?;
        assert_eq!(total, 41 + i as i32, "every fork starts from 41 and goes its own way");
    }
    println!("{forks} forks in {took:?} ({:?} each), each continued from 41 on its own", took / forks as u32);
    Ok(())
}
