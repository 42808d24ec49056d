//! Every per-sandbox limit, one row each: a guest set on exhausting the resource meets a
//! clear refusal, and the sandbox stays usable. (wasi-libc words EMFILE "No file descriptors
//! available".)

mod common;

use common::{guest_bytes, host, text};
use stasis_runtime::{Command, Error, ExitStatus, Limits, ProgramRef, Sandbox, SandboxConfig};

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
