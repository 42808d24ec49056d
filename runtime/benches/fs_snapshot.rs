//! Filesystem snapshot figures on a 1 GiB tree of mixed files: cold capture throughput,
//! re-snapshot after a 4 KiB change, restore throughput, stored bytes, and where the time goes.
//!
//! `cargo bench -p stasis-runtime --bench fs_snapshot` (about a minute). The tree is written and
//! synced before measuring, so it is in the page cache and clean, as a live sandbox tree is.
//! `FS_SNAPSHOT_BENCH_MIB=256` makes it smaller; `FS_SNAPSHOT_BENCH_PAUSE=5` waits 5 s before
//! the capture (to attach `perf record -p`); `FS_SNAPSHOT_BENCH_WARM=1` touches 3 GiB of memory
//! first.
//!
//! Reading the figures on the development VM (Firecracker, 2 vCPUs, ext4 without a journal):
//! - Quiet machine, before any of the experiments below: cold capture 349 MB/s (2.94 s; walk
//!   0.1 s, read 0.2 s, hash 0.38 s, compress 2.68 s, write 2.21 s summed over 2 workers),
//!   commit 0.55 s (294 MB/s including durability), re-snapshot 33 ms, restore 270 MB/s, 598 MiB
//!   stored for 1 GiB. "CPU used" is printed too: with other work on the machine the wall times
//!   (and the durations, which include time spent descheduled) swing by 2-3x from run to run;
//!   CPU-seconds per MB moves much less.
//! - Capture is CPU-bound on zstd. Level 1 compresses the text here at ~270-285 MB/s and the
//!   mixed data at ~350-470 MB/s per core (`zstd -b1`), so compression alone is ~2.7 CPU-seconds
//!   per GiB and two cores cap capture near 600 MB/s even with free writes. Measured and not
//!   worth it: negative levels (`--fast=1..5`: same or slower on this data, whose cost is the many
//!   short matches of the text, at 1-4% worse ratio); `mml`/`hlog`/`wlog` tweaks of level 1
//!   (within the noise); sampling a chunk to skip compressing incompressible data (zstd already
//!   passes pure noise at ~2.9 GB/s, and these chunks are half noise, half text, in 16 KiB
//!   blocks, so no sample could skip them).
//! - The write path is the other half: ~2.2 CPU-seconds per 600 MB stored. New page-cache pages
//!   are slow here: the guest returns freed memory to the host (free page reporting), and
//!   touching it again faults into the hypervisor. `dd` of 1 GiB into a new file runs at ~270
//!   MB/s cold and ~3 GB/s right after the same memory was touched. Every chunk written and
//!   every restored file pays this.
//! - Tried (commit 254a2c6, reverted): chunks of 64 KiB and more handed to three I/O threads that
//!   write them with `O_DIRECT`, every chunk an `O_TMPFILE` linked into its `chunks/<2 hex>/`.
//!   It takes the write path out of the workers' CPU profile and makes the commit's `syncfs`
//!   2-3x faster (0.1-0.3 s instead of 0.3-1.3 s), but capture wall time was no better within
//!   the noise (the disk's latency per chunk and the three extra threads eat what the workers
//!   save on two cores), and a restore right after the capture got 25-50% slower, because the
//!   chunks are no longer in the page cache. Synchronous `O_DIRECT` in the workers was clearly
//!   worse (write 4.8-5.9 s summed).
//! - Right after many files were deleted (a previous run's cleanup, or other work on the same
//!   filesystem), ext4 without a journal skips "recently deleted" inodes on every create
//!   (`recently_deleted`, 60 s after the inode table is written back, 360 s while it is dirty):
//!   creates get slow and serialize on the directory lock (up to 4x slower writes in `perf`).
//!   Run `sync`, then wait a minute or more between runs, or point `TMPDIR` at a fresh
//!   filesystem (a new ext4 on `losetup --direct-io=on`) to compare two builds.

use cap_std::ambient_authority;
use cap_std::fs::Dir;
use stasis_runtime::fs_snapshot::{CaptureOptions, CaptureStats, FsSnapshotStore, RestoreOptions, RestoreStats};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn noise(&mut self, out: &mut Vec<u8>, len: usize) {
        let end = out.len() + len;
        while out.len() + 8 <= end {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        while out.len() < end {
            out.push(self.next() as u8);
        }
    }

    fn text(&mut self, out: &mut Vec<u8>, len: usize) {
        const WORDS: [&[u8]; 16] = [
            b"sandbox ",
            b"snapshot ",
            b"restore ",
            b"the ",
            b"of ",
            b"module ",
            b"import ",
            b"def ",
            b"return ",
            b"self.",
            b"value",
            b" = ",
            b"(x, y)",
            b"\n    ",
            b"# comment ",
            b"42",
        ];
        let end = out.len() + len;
        while out.len() < end {
            let mut r = self.next();
            for _ in 0..8 {
                out.extend_from_slice(WORDS[(r & 15) as usize]);
                r >>= 4;
            }
        }
        out.truncate(end);
    }

    /// Half noise, half text, in 16 KiB blocks: compresses to roughly 60%.
    fn mixed(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = (len - out.len()).min(16 << 10);
            if self.next() & 1 == 0 { self.noise(&mut out, n) } else { self.text(&mut out, n) }
        }
        out
    }
}

/// Many small text-like files, some MB-size semi-compressible files, one big file.
fn build_tree(root: &Path, total: u64) -> (u64, usize) {
    let mut rng = Rng(0x5eed_1234_5678_9abc);
    let mut written = 0u64;
    let mut files = 0;
    let small_budget = total / 16;
    let medium_budget = total * 9 / 16;
    let mut d = 0;
    while written < small_budget {
        let dir = root.join(format!("src/pkg{d:03}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..80 {
            let len = 1024 + (rng.next() % (15 << 10)) as usize;
            let mut data = Vec::with_capacity(len);
            rng.text(&mut data, len);
            fs::write(dir.join(format!("module_{f:02}.py")), &data).unwrap();
            written += len as u64;
            files += 1;
        }
        d += 1;
    }
    fs::create_dir_all(root.join("data")).unwrap();
    let mut i = 0;
    while written < small_budget + medium_budget {
        let len = (MIB + rng.next() % (6 * MIB)) as usize;
        fs::write(root.join(format!("data/blob{i:03}.bin")), rng.mixed(len)).unwrap();
        written += len as u64;
        files += 1;
        i += 1;
    }
    let big = total.saturating_sub(written) as usize;
    fs::write(root.join("big.img"), rng.mixed(big)).unwrap();
    (written + big as u64, files + 1)
}

/// Touches and frees `bytes` of memory, so that the page cache pages the next seconds allocate
/// are already backed by the hypervisor (see the notes in `main`).
fn warm_memory(bytes: usize) {
    let mut v = vec![0u8; bytes];
    for i in (0..bytes).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
}

/// CPU time this process has used so far (user, system), from `/proc/self/stat`: unlike wall
/// time, it does not grow when other work on the machine takes the cores.
fn cpu_times() -> (Duration, Duration) {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let field = |i: usize| after_comm.split_whitespace().nth(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, in clock ticks (100 per second on Linux).
    (Duration::from_millis(field(11) * 10), Duration::from_millis(field(12) * 10))
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn capture_breakdown(s: &CaptureStats) {
    println!(
        "    where the time goes (summed over threads): walk/stat {} | read {} | hash {} | compress {} | write {}",
        ms(s.walk),
        ms(s.read),
        ms(s.hash),
        ms(s.compress),
        ms(s.write)
    );
    println!(
        "    files read {} reused {} | chunks new {} existing {} zero {} | {:.1} MiB stored",
        s.files_read,
        s.files_reused,
        s.chunks_new,
        s.chunks_existing,
        s.chunks_zero,
        s.stored_bytes_new as f64 / MIB as f64
    );
}

fn restore_breakdown(s: &RestoreStats) {
    println!(
        "    where the time goes (summed over threads): read {} | decompress {} | hash {} | write {} | sync {}",
        ms(s.read),
        ms(s.decompress),
        ms(s.hash),
        ms(s.write),
        ms(s.sync)
    );
}

fn main() {
    let mib: u64 = std::env::var("FS_SNAPSHOT_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    fs::create_dir(&tree).unwrap();
    let t = Instant::now();
    let (total, files) = build_tree(&tree, mib * MIB);
    rustix::fs::sync();
    println!(
        "tree: {:.0} MiB in {files} files (built and synced in {:.1} s); {} threads",
        total as f64 / MIB as f64,
        t.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );

    if let Some(secs) = std::env::var("FS_SNAPSHOT_BENCH_PAUSE").ok().and_then(|v| v.parse().ok()) {
        eprintln!("pid {}: pausing {secs} s before capturing (attach a profiler now)", std::process::id());
        std::thread::sleep(Duration::from_secs(secs));
    }
    if std::env::var_os("FS_SNAPSHOT_BENCH_WARM").is_some() {
        warm_memory(3 << 30);
    }
    let store = FsSnapshotStore::open(work.path().join("store")).unwrap();
    let dir = Dir::open_ambient_dir(&tree, ambient_authority()).unwrap();

    // Cold capture.
    let (user0, sys0) = cpu_times();
    let t = Instant::now();
    let pending = store.capture(&dir, CaptureOptions::new("bench")).unwrap();
    let capture_time = t.elapsed();
    let (user1, sys1) = cpu_times();
    let stats = pending.stats().clone();
    let t = Instant::now();
    let first = store.commit(pending).unwrap();
    let commit_time = t.elapsed();
    println!("cold capture: {:.0} MB/s ({})", mbps(total, capture_time), ms(capture_time));
    capture_breakdown(&stats);
    let (user, sys) = (user1 - user0, sys1 - sys0);
    println!(
        "    CPU used: {:.2} s user + {:.2} s system = {:.2} cores busy on average; {:.0} MB/s per CPU-second",
        user.as_secs_f64(),
        sys.as_secs_f64(),
        (user + sys).as_secs_f64() / capture_time.as_secs_f64(),
        mbps(total, user + sys)
    );
    println!(
        "  commit (syncfs of the new chunks + manifest): {} -> {:.0} MB/s including durability",
        ms(commit_time),
        mbps(total, capture_time + commit_time)
    );

    // Re-snapshot after one 4 KiB file changed.
    std::thread::sleep(Duration::from_millis(20));
    let victim = tree.join("src/pkg007/module_13.py");
    let mut rng = Rng(99);
    let mut data = Vec::new();
    rng.text(&mut data, 4096);
    fs::write(&victim, &data).unwrap();
    let t = Instant::now();
    let parent = store.get(&first).unwrap();
    let load_time = t.elapsed();
    let t = Instant::now();
    let pending = store.capture(&dir, CaptureOptions::new("bench").parent(&parent)).unwrap();
    let recapture_time = t.elapsed();
    let stats = pending.stats().clone();
    let t = Instant::now();
    let second = store.commit(pending).unwrap();
    let recommit_time = t.elapsed();
    println!(
        "re-snapshot after one 4 KiB change: capture {} + commit {} = {} (parent manifest already in memory; loading it from disk: {})",
        ms(recapture_time),
        ms(recommit_time),
        ms(recapture_time + recommit_time),
        ms(load_time)
    );
    capture_breakdown(&stats);

    // Two-phase, as a pause would use it: warm capture, change, paused capture.
    fs::write(tree.join("src/pkg003/module_01.py"), b"changed again").unwrap();
    let warm = store.capture(&dir, CaptureOptions::new("bench").parent(&parent)).unwrap();
    fs::write(tree.join("src/pkg003/module_02.py"), b"changed while running").unwrap();
    let t = Instant::now();
    let paused = store.capture(&dir, CaptureOptions::new("bench").parent(warm.manifest())).unwrap();
    let phase2 = t.elapsed();
    let t = Instant::now();
    store.commit(paused).unwrap();
    println!("two-phase: paused capture {} (+ commit {} after resuming)", ms(phase2), ms(t.elapsed()));
    drop(warm);

    // Restore.
    let out = work.path().join("restored");
    let t = Instant::now();
    let rstats = store.restore_with(&second, &out, RestoreOptions { durable: false, threads: 0 }).unwrap();
    let restore_time = t.elapsed();
    println!(
        "restore (page cache, not synced): {:.0} MB/s ({}), {} files, {} chunks",
        mbps(total, restore_time),
        ms(restore_time),
        rstats.files,
        rstats.chunks_read
    );
    restore_breakdown(&rstats);
    rustix::fs::sync();
    let t = Instant::now();
    let rstats = store.restore(&second, &work.path().join("restored-durable")).unwrap();
    let restore_time = t.elapsed();
    println!(
        "restore (durable: syncfs before the rename): {:.0} MB/s ({})",
        mbps(total, restore_time),
        ms(restore_time)
    );
    restore_breakdown(&rstats);

    let mut stored = 0u64;
    let mut chunks = 0u64;
    for p in fs::read_dir(work.path().join("store/chunks")).unwrap() {
        for c in fs::read_dir(p.unwrap().path()).unwrap() {
            stored += c.unwrap().metadata().unwrap().len();
            chunks += 1;
        }
    }
    println!(
        "stored: {:.1} MiB in {chunks} chunks for {:.0} MiB logical x 3 snapshots ({:.0}% of one copy)",
        stored as f64 / MIB as f64,
        total as f64 / MIB as f64,
        stored as f64 * 100.0 / total as f64
    );
}
