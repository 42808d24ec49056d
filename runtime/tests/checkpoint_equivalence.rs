//! The equivalence test of mid-execution snapshots: every guest of the corpus runs once
//! uninterrupted and once stopped again and again (at its blocking calls, and at random
//! moments while it computes), each time snapshotted with its sandbox tree and continued
//! on a fresh instance in a fresh tree. Stdout, stderr, exit status and the files it
//! wrote must be the same.

mod common;

use common::guest_bytes;
use stasis_runtime::fs_snapshot::FsSnapshotStore;
use stasis_runtime::{
    Command, ExitStatus, Host, HostConfig, MemorySnapshot, MemorySnapshotStore, Process, ProgramRef, Sandbox,
    SandboxConfig, StdinMode,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

struct Scenario {
    guest: &'static str,
    args: &'static [&'static str],
    /// Fed one line at a time, with a snapshot before each; then stdin is closed.
    stdin: &'static [&'static str],
    /// Snapshots taken at random moments while it runs (after the stdin lines).
    random_stops: usize,
    env: &'static [(&'static str, &'static str)],
}

const MICROPYTHON_SCRIPT: &str = "\
import sys
total = 0
for i in range(20000):
    total = (total * 31 + i) % 1000003
    if i % 5000 == 0:
        print('progress', i, total)
        with open('/progress.txt', 'a') as f:
            f.write('%d %d\\n' % (i, total))
for line in sys.stdin:
    total += int(line)
    print('total', total)
print('done', total)
";

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario { guest: "hello.wasm", args: &["a", "b c"], stdin: &[], random_stops: 1, env: &[] },
        Scenario {
            guest: "counter.wasm",
            args: &[],
            stdin: &["1\n", "2\n", "oops\n", "39\n"],
            random_stops: 0,
            env: &[],
        },
        Scenario { guest: "cpuloop.wasm", args: &["8", "1"], stdin: &[], random_stops: 6, env: &[] },
        Scenario { guest: "sleeper.wasm", args: &["150"], stdin: &[], random_stops: 2, env: &[] },
        Scenario { guest: "writer.wasm", args: &["/", "4000"], stdin: &[], random_stops: 5, env: &[] },
        Scenario {
            guest: "fileio.wasm",
            args: &["append", "/out.txt", "appended"],
            stdin: &[],
            random_stops: 1,
            env: &[],
        },
        Scenario { guest: "memhog.wasm", args: &["48"], stdin: &[], random_stops: 3, env: &[] },
        Scenario { guest: "trap.wasm", args: &["divzero"], stdin: &[], random_stops: 1, env: &[] },
        Scenario { guest: "micropython.wasm", args: &["/main.py"], stdin: &["5\n", "-3\n"], random_stops: 4, env: &[] },
    ]
}

#[derive(Debug, PartialEq)]
struct Outcome {
    stdout: String,
    stderr: String,
    status: String,
    /// File name -> (length, blake3), so that a mismatch prints in a few lines.
    files: BTreeMap<String, (usize, String)>,
}

struct World {
    host: Host,
    tmp: tempfile::TempDir,
    fs: Arc<FsSnapshotStore>,
    images: MemorySnapshotStore,
    trees: usize,
}

impl World {
    fn new() -> World {
        World::on(HostConfig { checkpoints: true, ..HostConfig::default() })
    }

    fn on(config: HostConfig) -> World {
        let host = Host::new(config).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let fs = Arc::new(FsSnapshotStore::open(tmp.path().join("fs")).unwrap());
        let images = MemorySnapshotStore::open(tmp.path().join("memory")).unwrap();
        World { host, tmp, fs, images, trees: 0 }
    }

    fn fresh_root(&mut self) -> PathBuf {
        self.trees += 1;
        self.tmp.path().join(format!("tree{}", self.trees))
    }

    fn sandbox(&mut self) -> (Sandbox, PathBuf) {
        let root = self.fresh_root();
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("main.py"), MICROPYTHON_SCRIPT).unwrap();
        std::fs::write(root.join("out.txt"), "start\n").unwrap();
        let config = SandboxConfig { root: Some(root.clone()), ..SandboxConfig::default() };
        (Sandbox::create(&self.host, config).unwrap(), root)
    }

    /// Snapshots `sandbox` and continues it in a fresh tree; `None` if its process ended
    /// first.
    async fn stop_and_continue(&mut self, sandbox: &Sandbox, process: &Process) -> Option<(Sandbox, PathBuf, Process)> {
        let report = match sandbox.snapshot_memory(Some(self.fs.clone()), &self.images).await {
            Ok(report) => report,
            Err(e) => {
                assert!(process.status().is_some(), "snapshot failed while the process runs: {e}");
                return None;
            }
        };
        let snapshot = MemorySnapshot::open(&self.host, &self.images, &report.id).unwrap();
        let (restored, root, continued) = self.restore(&snapshot).await;
        // The original would go on too; the run continues in the copy.
        process.kill();
        if continued.status().is_some() {
            return None; // it had ended by the snapshot: nothing more to stop
        }
        Some((restored, root, continued))
    }

    /// `snapshot` restored in a fresh tree, with its newest process.
    async fn restore(&mut self, snapshot: &MemorySnapshot) -> (Sandbox, PathBuf, Process) {
        let root = self.fresh_root();
        let config = SandboxConfig { root: Some(root.clone()), ..SandboxConfig::default() };
        let restored = snapshot.restore(&self.host, config, Some(&self.fs)).await.unwrap();
        let continued = restored.processes().into_iter().max_by_key(|p| p.pid()).expect("the process came back");
        (restored, root, continued)
    }
}

fn files_of(root: &Path) -> BTreeMap<String, (usize, String)> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            let digest = blake3::hash(&bytes).to_hex()[..16].to_string();
            files.insert(entry.file_name().to_string_lossy().into_owned(), (bytes.len(), digest));
        }
    }
    files
}

fn status_text(status: &ExitStatus) -> String {
    match status {
        // The trap's backtrace differs with the instrumentation; the trap does not.
        ExitStatus::Trapped { trap, .. } => format!("trapped: {trap}"),
        other => format!("{other}"),
    }
}

fn command(s: &Scenario) -> Command {
    let name = s.guest.trim_end_matches(".wasm").to_string();
    let mut command = Command::new(ProgramRef::Bytes { bytes: guest_bytes(s.guest), name })
        .args(s.args.iter().copied())
        .stdin(StdinMode::Pipe);
    for (key, value) in s.env {
        command = command.env(*key, *value);
    }
    command
}

async fn finish(process: &Process, root: &Path) -> Outcome {
    let status = tokio::time::timeout(Duration::from_secs(60), process.wait()).await.expect("the guest finishes");
    Outcome {
        stdout: String::from_utf8_lossy(&process.stdout().contents()).into_owned(),
        stderr: String::from_utf8_lossy(&process.stderr().contents()).into_owned(),
        status: status_text(&status),
        files: files_of(root),
    }
}

async fn uninterrupted(world: &mut World, s: &Scenario) -> Outcome {
    let (sandbox, root) = world.sandbox();
    let process = sandbox.spawn(command(s)).await.unwrap();
    let stdin = process.stdin().unwrap();
    for line in s.stdin {
        stdin.write(line.as_bytes()).unwrap();
    }
    stdin.close();
    finish(&process, &root).await
}

async fn interrupted(world: &mut World, s: &Scenario, seed: u64) -> (Outcome, usize) {
    let (sandbox, root) = world.sandbox();
    let process = sandbox.spawn(command(s)).await.unwrap();
    let (mut sandbox, mut root, mut process) = (sandbox, root, process);
    let mut stops = 0;
    let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let stop = async |world: &mut World, sandbox: &mut Sandbox, root: &mut PathBuf, process: &mut Process| match world
        .stop_and_continue(sandbox, process)
        .await
    {
        Some((s, r, p)) => {
            (*sandbox, *root, *process) = (s, r, p);
            true
        }
        None => false,
    };
    for line in s.stdin {
        // Blocked waiting for this line: stop there, then give it the line.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if stop(world, &mut sandbox, &mut root, &mut process).await {
            stops += 1;
        }
        process.stdin().expect("stdin").write(line.as_bytes()).unwrap();
    }
    process.stdin().expect("stdin").close();
    for _ in 0..s.random_stops {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_micros((rng >> 33) % 40_000)).await;
        if process.status().is_some() || !stop(world, &mut sandbox, &mut root, &mut process).await {
            break;
        }
        stops += 1;
        // A restored process's stdin pipe starts open unless the original's was closed.
        if let Some(stdin) = process.stdin() {
            stdin.close();
        }
    }
    (finish(&process, &root).await, stops)
}

/// Command components, run checkpointable on the engine whose memories the host owns:
/// cargo's wasm32-wasip2 `wordfreq` (reads stdin line by line, a CPU loop per line, a
/// file at the end), componentize-py's `pysum` (the same in Python), and adapter-made C
/// programs (the preview1 adapter and the program are two instrumented modules sharing
/// one unwind stack: a stop blocked in `fd_read` crosses from the adapter into the
/// program; a CPU loop stops at its loop headers), each stopped blocked on each line and
/// at random moments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_print_and_write_the_same_when_stopped_and_continued_on_fresh_instances() {
    let mut world = World::new();
    let words = &["the cat sat\n", "on The mat\n", "a cat, a hat\n", "and THE end\n", "of it\n", "cat\n"];
    let scenarios = [
        Scenario {
            guest: "wordfreq.component.wasm",
            args: &["/"],
            stdin: words,
            random_stops: 6,
            env: &[("ROUNDS", "20000000")],
        },
        Scenario {
            guest: "counter.component.wasm",
            args: &[],
            stdin: &["1\n", "2\n", "oops\n", "39\n"],
            random_stops: 0,
            env: &[],
        },
        Scenario { guest: "cpuloop.component.wasm", args: &["8", "1"], stdin: &[], random_stops: 6, env: &[] },
        Scenario { guest: "writer.component.wasm", args: &["/", "4000"], stdin: &[], random_stops: 5, env: &[] },
        // componentize-py: CPython as a dozen dynamically linked modules (one memory,
        // table, stack pointer and GOT shared among them), stopped in `poll` and in its
        // interpreter loop.
        Scenario {
            guest: "pysum.component.wasm",
            args: &[],
            stdin: &["1 2 3\n", "40\n", "-7 100\n"],
            random_stops: 4,
            env: &[("ROUNDS", "200000")],
        },
    ];
    for s in &scenarios {
        let expected = uninterrupted(&mut world, s).await;
        let (got, stops) = interrupted(&mut world, s, 7).await;
        assert_eq!(got, expected, "{} after {stops} stops", s.guest);
        println!("{}: {stops} stops, same output, status and files", s.guest);
        assert!(stops >= s.stdin.len().max(1), "{}: only {stops} stops happened", s.guest);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_guest_prints_and_writes_the_same_when_stopped_and_continued_on_fresh_instances() {
    let mut world = World::new();
    let mut total_stops = 0;
    for (i, s) in scenarios().iter().enumerate() {
        let expected = uninterrupted(&mut world, s).await;
        let (got, stops) = interrupted(&mut world, s, i as u64 + 1).await;
        assert_eq!(got, expected, "{} {:?} after {stops} stops", s.guest, s.args);
        println!("{} {:?}: {stops} stops, same output, status and files", s.guest, s.args);
        total_stops += stops;
    }
    assert!(total_stops >= 15, "only {total_stops} stops happened: the guests ended too fast");
}

/// Input written and closed while the program computes, before it reads any: the stop
/// finds it unread in a closed pipe, and the continued program reads all of it, then
/// end of file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_written_and_closed_before_a_stop_is_read_after_it() {
    const LATE_READER: &str = "\
import sys
x = 0
for i in range(1000000):
    x = (x * 31 + i) % 1000003
total = 0
for line in sys.stdin:
    total += int(line)
print('sum', total, 'mix', x)
";
    let mut world = World::new();
    let (sandbox, root) = world.sandbox();
    std::fs::write(root.join("late.py"), LATE_READER).unwrap();
    let late_reader =
        Scenario { guest: "micropython.wasm", args: &["/late.py"], stdin: &[], random_stops: 0, env: &[] };
    let process = sandbox.spawn(command(&late_reader)).await.unwrap();
    let stdin = process.stdin().unwrap();
    stdin.write(b"5\n7\n").unwrap();
    stdin.close();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_restored, root, continued) =
        world.stop_and_continue(&sandbox, &process).await.expect("stopped in its loop, before reading");
    let got = finish(&continued, &root).await;
    assert_eq!(got.status, "exited with code 0", "{}", got.stderr);
    let mut x = 0u64;
    for i in 0..1_000_000u64 {
        x = (x * 31 + i) % 1_000_003;
    }
    assert_eq!(got.stdout, format!("sum 12 mix {x}\n"));
}

/// Forks of a running component from one snapshot (cargo's `wordfreq`, blocked on its
/// second line) go their own ways, whether the restores map its memories copy-on-write
/// or copy them: each is given its own next line and prints and writes what an
/// uninterrupted run on the same input does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_of_a_running_component_diverge_whether_mapped_or_copied() {
    let wordfreq = Scenario {
        guest: "wordfreq.component.wasm",
        args: &["/"],
        stdin: &[],
        random_stops: 0,
        env: &[("ROUNDS", "1000")],
    };
    let endings = ["a b c\n", "dog\n", "the cat again\n"];
    for cow in [true, false] {
        let mut world =
            World::on(HostConfig { checkpoints: true, copy_on_write_restore: cow, ..HostConfig::default() });
        let mut expected = Vec::new();
        for ending in endings {
            let (sandbox, root) = world.sandbox();
            let process = sandbox.spawn(command(&wordfreq)).await.unwrap();
            process.stdin().unwrap().write(format!("the cat\n{ending}").as_bytes()).unwrap();
            process.stdin().unwrap().close();
            expected.push(finish(&process, &root).await);
        }

        let (sandbox, _root) = world.sandbox();
        let process = sandbox.spawn(command(&wordfreq)).await.unwrap();
        process.stdin().unwrap().write(b"the cat\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !process.stdout().contents().contains(&b'\n') {
            assert!(std::time::Instant::now() < deadline, "no first line");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let report = sandbox.snapshot_memory(Some(world.fs.clone()), &world.images).await.unwrap();
        process.kill();
        let snapshot = MemorySnapshot::open(&world.host, &world.images, &report.id).unwrap();
        assert_eq!(snapshot.copy_on_write(), cow);
        let mut forks = Vec::new();
        for ending in endings {
            let (fork, root, continued) = world.restore(&snapshot).await;
            continued.stdin().unwrap().write(ending.as_bytes()).unwrap();
            continued.stdin().unwrap().close();
            forks.push((fork, root, continued));
        }
        for ((_fork, root, continued), expected) in forks.iter().zip(&expected) {
            assert_eq!(&finish(continued, root).await, expected, "cow={cow}");
        }
    }
}
