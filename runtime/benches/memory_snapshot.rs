//! Memory-snapshot figures (issue 4): snapshot time and image size of the C reactor holding
//! 1 MiB and 64 MiB of touched memory, warm restore p50, 1,000 forks, and the memory 1,000
//! idle forks take, each for the copy-on-write restore and the copying one side by side.
//!
//! Run: `cargo bench -p stasis-runtime --bench memory_snapshot` after `guests/build.sh`.
//! `MEMORY_BENCH_FORKS=200` makes the fork runs smaller; `MEMORY_BENCH=components` runs
//! only the reactor component's rows.
//!
//! Figures on the development VM (2 vCPUs, load ~1), 2026-11-29, pages filled with
//! half-text half-noise bytes (they compress to 85%):
//! - 1 MiB touched: snapshot p50 3.5 ms (capture 0.23, compress 1.56, durable write
//!   1.33); image 877 KiB = zstd of the touched pages alone; copy-on-write restore p50
//!   22 µs (p99 85), copying restore p50 255 µs; 1,000 forks 55 ms (CoW) against 956 ms
//!   (copying); the 1,000 idle forks add 18 MiB RSS (CoW) against 1,011 MiB (copying).
//! - 64 MiB touched: snapshot p50 530 ms (most of it compressing and writing 55 MiB);
//!   CoW restore p50 17 µs against 94 ms copying. Opening the snapshot (verifying,
//!   decompressing, compiling the state module) costs 60 ms (1 MiB) to 450 ms (64 MiB)
//!   once; every restore and fork after it is a mapping.
//! - The reactor component (tally, holding 3 host resources), checkpointable (2026-12-06,
//!   its memories the host's): call p50 2.5 µs; a CPU-bound call (`crunch`, 50M rounds)
//!   108 ms; snapshot p50 0.59 ms, 0.95 ms holding 1 MiB more, 37 ms holding 64 MiB more
//!   (its pages are uniform bytes: images of 2-5 KiB); restore p50 0.13 ms whatever it
//!   holds (copy-on-write), against 0.38 ms (1 MiB) and 23.5 ms (64 MiB) copying; 1,000
//!   idle forks +34 MiB RSS (+55 MiB copying).
//!   The same on the guest_debug engine (`HostConfig::debug_engine_reactors`, as before
//!   format 1.4): `crunch` 433 ms (4.0x), restore p50 0.44-0.46 ms, 1,000 idle forks
//!   +1,113 MiB RSS (wasmtime 48 deep-copies a component's compiled code into every store
//!   there).

mod common;

use common::{memory_mib, percentile, us};
use stasis_runtime::memory_image::{self, ProcessStateImage};
use stasis_runtime::{
    Command, Host, HostConfig, MemorySnapshot, MemorySnapshotStore, ProgramRef, Sandbox, SandboxConfig,
};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rounds of tally's CPU-bound `crunch` a call is timed over.
const CRUNCH_ROUNDS: i32 = 50_000_000;

fn reactor_bytes() -> Arc<[u8]> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/build/reactor.wasm");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run guests/build.sh)", path.display())).into()
}

struct Taken {
    snapshot_p50: Duration,
    image_bytes: u64,
    touched_zstd: u64,
    touched: u64,
    id: stasis_runtime::fs_snapshot::SnapshotId,
}

async fn take(host: &Host, images: &MemorySnapshotStore, kib: i32, runs: usize) -> Taken {
    let sandbox = Sandbox::create(host, SandboxConfig::default()).unwrap();
    let reactor = sandbox
        .instantiate(Command::new(ProgramRef::Bytes { bytes: reactor_bytes(), name: "reactor".into() }))
        .await
        .unwrap();
    reactor.call_i32("add", &[1]).await.unwrap();
    assert_eq!(reactor.call_i32("touch_noise", &[kib]).await.unwrap(), 0);
    let mut times = Vec::new();
    let mut phases = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        let report = sandbox.snapshot_memory(None, images).await.unwrap();
        times.push(started.elapsed());
        phases.push((report.hold, report.encode, report.write));
        last = Some(report);
    }
    let report = last.unwrap();
    phases.sort();
    let (hold, encode, write) = phases[phases.len() / 2];
    println!(
        "  where the time goes (median-hold run): capture {:.2} ms, compress+encode {:.2} ms, durable write {:.2} ms",
        hold.as_secs_f64() * 1e3,
        encode.as_secs_f64() * 1e3,
        write.as_secs_f64() * 1e3
    );
    // What the touched pages alone compress to, for the image-size comparison.
    let bytes = images.read_image(&report.id).unwrap();
    let image = memory_image::decode(&bytes).unwrap();
    let mut touched = Vec::new();
    for p in &image.header.processes {
        if let ProcessStateImage::Idle(instance) = &p.state {
            for m in &instance.memories {
                touched.extend(image.part(m.part).unwrap());
            }
        }
    }
    let touched_zstd = zstd::bulk::compress(&touched, 1).unwrap().len() as u64;
    Taken {
        snapshot_p50: percentile(&mut times, 0.5),
        image_bytes: report.image_bytes,
        touched_zstd,
        touched: touched.len() as u64,
        id: report.id,
    }
}

async fn restores(host: &Host, snapshot: &MemorySnapshot, n: usize) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let sandbox = snapshot.restore(host, SandboxConfig::default(), None).await.unwrap();
        times.push(started.elapsed());
        drop(sandbox);
    }
    (percentile(&mut times, 0.5), percentile(&mut times, 0.99))
}

/// `forks` forks of `snapshot`, timed, with the memory they take printed; also returns
/// the process's RSS and PSS (MiB) from before.
async fn forked(host: &Host, snapshot: &MemorySnapshot, forks: usize) -> (Vec<Sandbox>, (f64, f64)) {
    let (rss0, pss0) = memory_mib();
    let started = Instant::now();
    let sandboxes = snapshot.fork(host, forks, |_| SandboxConfig::default(), None).await.unwrap();
    let took = started.elapsed();
    let (rss1, pss1) = memory_mib();
    println!(
        "  {forks} forks: {:.1} ms in total ({} each); memory of the idle forks: RSS +{:.0} MiB, PSS +{:.0} MiB",
        took.as_secs_f64() * 1e3,
        us(took / forks as u32),
        rss1 - rss0,
        pss1 - pss0
    );
    (sandboxes, (rss0, pss0))
}

fn main() {
    let forks: usize = std::env::var("MEMORY_BENCH_FORKS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let images = MemorySnapshotStore::open(dir.path()).unwrap();
        component(&images, forks).await;
        if std::env::var("MEMORY_BENCH").is_ok_and(|only| only == "components") {
            return;
        }
        for cow in [true, false] {
            let label = if cow { "copy-on-write restore" } else { "copying restore" };
            // Room for every fork alive at once: a state instance (with the memory) and the
            // program's instance each.
            let host = Host::new(HostConfig {
                max_processes: Some(forks as u32 + 100),
                copy_on_write_restore: cow,
                ..HostConfig::default()
            })
            .unwrap();
            println!("== {label}");
            for (kib, runs) in [(1024, 50), (65536, 5)] {
                let taken = take(&host, &images, kib, runs).await;
                println!(
                    "reactor holding {} MiB touched: snapshot p50 {:.2} ms; image {} KiB (touched pages {} KiB, zstd of them alone {} KiB)",
                    kib / 1024,
                    taken.snapshot_p50.as_secs_f64() * 1e3,
                    taken.image_bytes / 1024,
                    taken.touched / 1024,
                    taken.touched_zstd / 1024
                );
                let started = Instant::now();
                let snapshot = MemorySnapshot::open(&host, &images, &taken.id).unwrap();
                let open = started.elapsed();
                let (p50, p99) = restores(&host, &snapshot, if kib == 1024 { 500 } else { 20 }).await;
                println!(
                    "  open (read, verify, decompress, build the state module) {:.2} ms; warm restore p50 {} p99 {}",
                    open.as_secs_f64() * 1e3,
                    us(p50),
                    us(p99)
                );
                if kib != 1024 {
                    continue;
                }
                let (sandboxes, (rss0, pss0)) = forked(&host, &snapshot, forks).await;
                // Each fork diverges: one call each, then check two of them.
                for (i, sandbox) in sandboxes.iter().enumerate() {
                    sandbox.reactors()[0].call_i32("add", &[i as i32]).await.unwrap();
                }
                assert_eq!(sandboxes[forks - 1].reactors()[0].call_i32("get", &[]).await.unwrap(), forks as i32);
                let (rss2, pss2) = memory_mib();
                println!("  after one call in each fork: RSS +{:.0} MiB, PSS +{:.0} MiB", rss2 - rss0, pss2 - pss0);
                drop(sandboxes);
            }
        }
    });
}

/// The reactor component (guests/build/tally.component.wasm), checkpointable (its memories
/// the host's, `component_checkpoint`) with the copy-on-write restore and the copying one,
/// and on the guest_debug engine it used to need (`HostConfig::debug_engine_reactors`)
/// side by side. It holds host resources (stdout, the preopens) when captured, and is
/// measured small and holding 64 MiB.
async fn component(images: &MemorySnapshotStore, forks: usize) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/build/tally.component.wasm");
    let bytes: Arc<[u8]> = std::fs::read(&path).unwrap().into();
    for (debug, cow) in [(false, true), (false, false), (true, true)] {
        let host = Host::new(HostConfig {
            max_processes: Some(forks as u32 + 100),
            copy_on_write_restore: cow,
            debug_engine_reactors: debug,
            ..HostConfig::default()
        })
        .unwrap();
        let sandbox = Sandbox::create(&host, SandboxConfig::default()).unwrap();
        let command = Command::new(ProgramRef::Bytes { bytes: bytes.clone(), name: "tally".into() });
        let tally = sandbox.instantiate(command).await.unwrap();
        let mut calls = Vec::new();
        for _ in 0..1000 {
            let started = Instant::now();
            tally.call_i32("add", &[1]).await.unwrap();
            calls.push(started.elapsed());
        }
        let mut crunches = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            tally.call_i32("crunch", &[CRUNCH_ROUNDS]).await.unwrap();
            crunches.push(started.elapsed());
        }
        tally.call_i32("say", &[1]).await.unwrap();
        let engine = if debug { "the guest_debug engine" } else { "checkpointable" };
        let label = if cow { "copy-on-write restore" } else { "copying restore" };
        println!(
            "== reactor component (tally), {engine}, {label}: call p50 {}; crunch({CRUNCH_ROUNDS}) p50 {:.1} ms",
            us(percentile(&mut calls, 0.5)),
            percentile(&mut crunches, 0.5).as_secs_f64() * 1e3
        );
        let mut held = 0;
        for mib in [0, 1, 64] {
            if mib > held {
                assert_eq!(tally.call_i32("touch", &[(mib - held) * 1024]).await.unwrap(), 0);
                held = mib;
            }
            let mut times = Vec::new();
            let mut taken = None;
            for _ in 0..if mib <= 1 { 50 } else { 3 } {
                let started = Instant::now();
                taken = Some(sandbox.snapshot_memory(None, images).await.unwrap());
                times.push(started.elapsed());
            }
            let taken = taken.unwrap();
            let started = Instant::now();
            let snapshot = MemorySnapshot::open(&host, images, &taken.id).unwrap();
            let open = started.elapsed();
            assert_eq!(snapshot.copy_on_write(), cow);
            let (p50, p99) = restores(&host, &snapshot, if mib <= 1 { 200 } else { 20 }).await;
            println!(
                "  holding {mib} MiB more ({} memories, {} handles): snapshot p50 {:.2} ms, image {} KiB; open (with compiling the image's component) {:.1} ms; restore p50 {} p99 {}",
                match &snapshot.header().processes[0].state {
                    ProcessStateImage::IdleComponentMemories(c) => c.memories.len(),
                    ProcessStateImage::IdleComponent(c) => c.instances.iter().map(|i| i.memories.len()).sum(),
                    _ => 0,
                },
                match &snapshot.header().processes[0].state {
                    ProcessStateImage::IdleComponentMemories(c) => c.handles.len(),
                    ProcessStateImage::IdleComponent(c) => c.handles.len(),
                    _ => 0,
                },
                percentile(&mut times, 0.5).as_secs_f64() * 1e3,
                taken.image_bytes / 1024,
                open.as_secs_f64() * 1e3,
                us(p50),
                us(p99)
            );
            if mib == 0 {
                drop(forked(&host, &snapshot, forks).await);
            }
        }
    }
}
