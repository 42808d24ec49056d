//! Every per-sandbox limit, one row each: a guest set on exhausting the resource meets a
//! clear refusal, and the sandbox stays usable. (wasi-libc words EMFILE "No file descriptors
//! available".)

mod common;

use common::{guest_bytes, host, text};
use stasis_runtime::disk_quota::{ENTRY_BYTES, tree_bytes};
use stasis_runtime::{Command, DiskQuota, Error, ExitStatus, Limits, ProgramRef, Sandbox, SandboxConfig};

fn hostile(args: &[&str]) -> Command {
    Command::new(ProgramRef::Bytes { bytes: guest_bytes("hostile.wasm"), name: "hostile".into() }).args(args.to_vec())
}

fn sandbox_in(dir: &std::path::Path, limits: Limits) -> Sandbox {
    Sandbox::create(&host(), SandboxConfig { root: Some(dir.to_path_buf()), limits, ..SandboxConfig::default() })
        .unwrap()
}

#[tokio::test]
async fn open_files_past_the_limit_fail_with_emfile_and_closing_frees_them() {
    let tmp = tempfile::tempdir().unwrap();
    let sb = sandbox_in(tmp.path(), Limits { max_open_files: 40, ..Limits::default() });
    let p = sb.spawn(hostile(&["openall", "/f"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0), "{}", text(p.stderr().contents()));
    assert_eq!(text(p.stdout().contents()), "opened 40: No file descriptors available\nreopened\n");
}

#[tokio::test]
async fn the_default_open_file_limit_holds_a_guest_far_below_the_hosts() {
    let tmp = tempfile::tempdir().unwrap();
    let sb = sandbox_in(tmp.path(), Limits::default());
    let p = sb.spawn(hostile(&["openall", "/f"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0), "{}", text(p.stderr().contents()));
    let expected =
        format!("opened {}: No file descriptors available\nreopened\n", stasis_runtime::limits::DEFAULT_MAX_OPEN_FILES);
    assert_eq!(text(p.stdout().contents()), expected);
}

#[tokio::test]
async fn processes_past_the_limit_are_refused_and_an_exit_frees_a_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let sb = sandbox_in(tmp.path(), Limits { max_processes: 2, ..Limits::default() });
    let a = sb.spawn(hostile(&["spin"])).await.unwrap();
    let b = sb.spawn(hostile(&["spin"])).await.unwrap();
    let refused = sb.spawn(hostile(&["spin"])).await.err().expect("a third process is refused");
    assert!(matches!(refused, Error::TooManyProcesses { limit: 2 }), "{refused}");
    assert!(refused.to_string().contains("already runs 2 processes"), "{refused}");
    a.kill();
    assert_eq!(a.wait().await, ExitStatus::Killed);
    let c = sb.spawn(hostile(&["spin"])).await.expect("a slot is free again");
    for p in [&b, &c] {
        p.kill();
        assert_eq!(p.wait().await, ExitStatus::Killed);
    }
}

fn disk_sandbox(dir: &std::path::Path, bytes: u64) -> Sandbox {
    sandbox_in(dir, Limits { disk: Some(DiskQuota::new(dir, bytes)), ..Limits::default() })
}

#[tokio::test]
async fn writes_past_the_disk_quota_fail_with_enospc_and_deleting_frees_the_space() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("already-there"), vec![7u8; 100_000]).unwrap();
    let sb = disk_sandbox(tmp.path(), 1 << 20);
    let p = sb.spawn(hostile(&["fill", "/f"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0), "{}", text(p.stderr().contents()));
    let out = text(p.stdout().contents());
    // 64 KiB blocks: as many as fit beside the 100,000 bytes already there.
    let fit = ((1u64 << 20) - 100_000 - 2 * ENTRY_BYTES) / 65536 * 65536;
    assert_eq!(out, format!("filled {fit}: No space left on device\nrewrote\n"));
    assert!(tree_bytes(tmp.path()).unwrap() <= 1 << 20);
}

#[tokio::test]
async fn a_sparse_file_past_the_quota_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let sb = disk_sandbox(tmp.path(), 1 << 20);
    let p = sb.spawn(hostile(&["sparse", "/s", "1000000000"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(1));
    assert_eq!(text(p.stderr().contents()), "error: No space left on device ftruncate\n");
    let p = sb.spawn(hostile(&["sparse", "/s", "500000", "499990", "tail"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0), "{}", text(p.stderr().contents()));
    assert_eq!(std::fs::metadata(tmp.path().join("s")).unwrap().len(), 500_000);
    // pwrite past the quota.
    let p = sb.spawn(hostile(&["sparse", "/t", "0", "2000000", "x"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(1));
    assert_eq!(text(p.stderr().contents()), "error: No space left on device pwrite\n");
}

#[tokio::test]
async fn empty_files_and_directories_count_against_the_quota() {
    let tmp = tempfile::tempdir().unwrap();
    // Room for about 20 entries.
    let sb = disk_sandbox(tmp.path(), 20 * ENTRY_BYTES + 100);
    let p = sb.spawn(hostile(&["openall", "/f"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0));
    let p = sb
        .spawn(Command::new(ProgramRef::Bytes { bytes: guest_bytes("micropython.wasm"), name: "mp".into() }).args([
            "-c",
            "import os\nn=0\ntry:\n  while True:\n    os.mkdir('/d%d' % n); n+=1\nexcept OSError as e:\n  print(n, e.errno)",
        ]))
        .await
        .unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0), "{}", text(p.stderr().contents()));
    // 20 entries fit: the file and 19 directories; then ENOSPC (MicroPython shows WASI's
    // errno as is: 51).
    assert_eq!(text(p.stdout().contents()), "19 51\n");
}

// The same attacks from a component (the C guest through the preview1 adapter): its
// WASIp2 filesystem calls are held to the same limits.

fn hostile_component(args: &[&str]) -> Command {
    let bytes = guest_bytes("hostile.component.wasm");
    Command::new(ProgramRef::Bytes { bytes, name: "hostile".into() }).args(args.to_vec())
}

#[tokio::test]
async fn a_components_writes_past_the_disk_quota_fail_with_enospc() {
    let tmp = tempfile::tempdir().unwrap();
    let sb = disk_sandbox(tmp.path(), 1 << 20);
    let p = sb.spawn(hostile_component(&["fill", "/f"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0), "{}", text(p.stderr().contents()));
    let fit = ((1u64 << 20) - ENTRY_BYTES) / 65536 * 65536;
    assert_eq!(text(p.stdout().contents()), format!("filled {fit}: No space left on device\nrewrote\n"));
    assert!(tree_bytes(tmp.path()).unwrap() <= 1 << 20);
    let p = sb.spawn(hostile_component(&["sparse", "/s", "1000000000"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(1));
    assert_eq!(text(p.stderr().contents()), "error: No space left on device ftruncate\n");
    let p = sb.spawn(hostile_component(&["sparse", "/t", "0", "2000000", "x"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(1));
    assert_eq!(text(p.stderr().contents()), "error: No space left on device pwrite\n");
}

#[tokio::test]
async fn a_components_open_descriptors_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let sb = sandbox_in(tmp.path(), Limits { max_open_files: 40, ..Limits::default() });
    let p = sb.spawn(hostile_component(&["openall", "/f"])).await.unwrap();
    assert_eq!(p.wait().await, ExitStatus::Exited(0), "{}", text(p.stderr().contents()));
    // WASIp2 has no "too many open files": the host answers insufficient-memory, which
    // the adapter reports as ENOMEM.
    assert_eq!(text(p.stdout().contents()), "opened 40: Out of memory\nreopened\n");
}

#[tokio::test]
async fn a_reactor_components_writes_are_held_to_the_disk_quota() {
    let tmp = tempfile::tempdir().unwrap();
    // Room for the log file's entry and 100 bytes.
    let sb = disk_sandbox(tmp.path(), ENTRY_BYTES + 100);
    let bytes = guest_bytes("tally.component.wasm");
    let tally = sb.instantiate(Command::new(ProgramRef::Bytes { bytes, name: "tally".into() })).await.unwrap();
    assert!(tally.call_i32("log-open", &[]).await.unwrap() >= 0);
    let mut written = 0;
    for n in 1000..1100 {
        match tally.call_i32("log-write", &[n]).await.unwrap() {
            5 => written += 5,
            -1 => break,
            other => panic!("log-write answered {other}"),
        }
    }
    assert_eq!(written, 100, "20 lines of 5 bytes fit, the 21st is refused");
    assert_eq!(std::fs::metadata(tmp.path().join("tally.log")).unwrap().len(), 100);
}

#[tokio::test]
async fn holes_made_by_seeking_or_by_another_descriptor_truncating_are_charged() {
    for (kind, guest) in [("module", hostile as fn(&[&str]) -> Command), ("component", hostile_component)] {
        let tmp = tempfile::tempdir().unwrap();
        let sb = disk_sandbox(tmp.path(), 1 << 20);
        let p = sb.spawn(guest(&["seekwrite", "/s", "2000000"])).await.unwrap();
        assert_eq!(p.wait().await, ExitStatus::Exited(1));
        assert_eq!(text(p.stderr().contents()), "error: No space left on device write\n");
        let p = sb.spawn(guest(&["seekwrite", "/s", "500000"])).await.unwrap();
        assert_eq!(p.wait().await, ExitStatus::Exited(0), "{}", text(p.stderr().contents()));
        std::fs::remove_file(tmp.path().join("s")).unwrap();
        let p = sb.spawn(guest(&["shrinkwrite", "/f", "/g", "400000"])).await.unwrap();
        assert_eq!(p.wait().await, ExitStatus::Exited(0), "{}", text(p.stderr().contents()));
        for name in ["f", "g"] {
            std::fs::remove_file(tmp.path().join(name)).unwrap();
        }
        // 700,000 bytes in g beside f's 700,001 would be past the quota.
        let p = sb.spawn(guest(&["shrinkwrite", "/f", "/g", "700000"])).await.unwrap();
        assert_eq!(p.wait().await, ExitStatus::Exited(1), "{kind}");
        assert_eq!(text(p.stderr().contents()), "error: No space left on device shrinkwrite\n");
        assert!(tree_bytes(tmp.path()).unwrap() <= 1 << 20);
    }
}
