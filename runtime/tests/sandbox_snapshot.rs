//! Filesystem snapshots of a running sandbox: one consistent moment, a short pause, and a
//! restore that a fresh sandbox runs from cold.

mod common;

use common::{guest_bytes, guest_path, host, text};
use stasis_runtime::fs_snapshot::FsSnapshotStore;
use stasis_runtime::{Command, ExitStatus, ProgramRef, Sandbox, SandboxConfig};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_while_a_guest_writes_is_one_moment_and_restores_cold() {
    let host = host();
    let data = tempfile::tempdir().unwrap();
    let store = Arc::new(FsSnapshotStore::open(data.path().join("store")).unwrap());
    let root = data.path().join("root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(guest_path("fileio.wasm"), root.join("bin/fileio.wasm")).unwrap();
    std::fs::write(root.join("big.bin"), vec![7u8; 8 << 20]).unwrap();
    let sb = Sandbox::create(&host, SandboxConfig { root: Some(root.clone()), ..SandboxConfig::default() }).unwrap();
    let writer = sb
        .spawn(Command::new(ProgramRef::Bytes { bytes: guest_bytes("writer.wasm"), name: "writer".into() }).arg("/"))
        .await
        .unwrap();
    writer.stdout().read_next(0).await;

    let mut longest = Duration::ZERO;
    let mut last_id = None;
    for _ in 0..3 {
        let report = sb.snapshot_filesystem(store.clone(), "test".into()).await.unwrap();
        longest = longest.max(report.pause);
        assert!(report.paused.files_reused >= 1, "the paused capture reuses the warm one: {:?}", report.paused);
        last_id = Some(report.id);
    }
    assert_eq!(writer.status(), None, "the guest keeps running after a snapshot");
    eprintln!("longest pause: {longest:?}");
    assert!(longest < Duration::from_millis(500), "pause {longest:?}");

    let restored = data.path().join("restored");
    store.restore(last_id.as_ref().unwrap(), &restored).unwrap();
    let num = |f: &str| std::fs::read_to_string(restored.join(f)).unwrap().trim().parse::<i64>().unwrap_or(0);
    let (a, b) = (num("a"), num("b"));
    assert!(a == 0 || b == 0 || (b <= a && a <= b + 1), "a={a} b={b}: not one moment");
    assert_eq!(std::fs::read(restored.join("big.bin")).unwrap(), vec![7u8; 8 << 20]);

    // The restored tree is a sandbox of its own; its programs start cold.
    let fresh = Sandbox::create(&host, SandboxConfig { root: Some(restored), ..SandboxConfig::default() }).unwrap();
    let p = fresh.spawn(Command::named("fileio").args(["read", "/b"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0));
    assert_eq!(text(p.stdout().contents()).trim().parse::<i64>().unwrap_or(0), b);
    sb.kill_all();
    writer.wait().await;
}
