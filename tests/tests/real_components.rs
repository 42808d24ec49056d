//! Real wasip2 components nobody here assembled, run by `stasis run` and in a sandbox over
//! REST: a Rust program built by cargo for its own `wasm32-wasip2` target
//! (`wordfreq.component.wasm`: one core module calling WASI p2 directly, no adapter), and
//! a Python program made a component by componentize-py (`pysum.component.wasm`: CPython
//! 3.14 as a dozen dynamically linked core modules and nested components, 18 MB).
//! Their output is checked against what the programs compute, worked out here.
//!
//! Both, running, are captured and continued (CLI and REST).

use serde_json::json;
use stasis_tests::{TestServer, guest, run, run_with_stdin, stasis, text};
use std::collections::BTreeMap;
use std::time::Duration;

const TEXT: &str = "The cat sat\non the mat\n\nthe CAT ran\n";

/// wordfreq's CPU stretch (`checksum` in guests/rust/wordfreq).
fn wordfreq_mix(rounds: u64) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(i);
    }
    x
}

/// What wordfreq prints for `input`, and the report file it writes.
fn wordfreq_expected(input: &str, rounds: u64) -> (String, String) {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut stdout = String::new();
    for (n, line) in input.lines().enumerate() {
        for word in line.split_whitespace() {
            *counts.entry(word.to_lowercase()).or_default() += 1;
        }
        stdout += &format!("line {}: {} words so far, mix {:016x}\n", n + 1, counts.len(), wordfreq_mix(rounds));
    }
    let report = counts.iter().map(|(word, n)| format!("{n} {word}\n")).collect();
    (stdout, report)
}

/// pysum's CPU stretch (`mix` in guests/python/pysum/app.py).
fn pysum_mix(rounds: u64) -> u64 {
    let mut x: u64 = 0x9E37_79B9;
    for i in 0..rounds {
        x = (x * 1_103_515_245 + 12_345 + i) & 0xFFFF_FFFF;
    }
    x
}

#[test]
fn a_cargo_built_wasip2_program_reads_stdin_writes_files_and_exits() {
    let cache = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut cmd = stasis(cache.path());
    cmd.args(["run", "--env", "ROUNDS=5000", "--dir"])
        .arg(format!("{}::/out", out.path().display()))
        .arg(guest("wordfreq.component.wasm"))
        .arg("/out");
    let result = run_with_stdin(cmd, TEXT.as_bytes());
    assert_eq!(result.status.code(), Some(0), "{}", text(&result.stderr));
    let (stdout, report) = wordfreq_expected(TEXT, 5000);
    assert_eq!(text(&result.stdout), stdout);
    assert_eq!(text(&result.stderr), "wordfreq: 4 lines, 6 distinct words, wrote /out/wordfreq.txt\n");
    assert_eq!(std::fs::read_to_string(out.path().join("wordfreq.txt")).unwrap(), report);

    // No words: its own failure status (a component's non-zero exit is 1).
    let mut cmd = stasis(cache.path());
    cmd.arg("run").arg("--dir").arg(format!("{}::/out", out.path().display()));
    cmd.arg(guest("wordfreq.component.wasm")).arg("/out");
    let result = run(cmd);
    assert_eq!(result.status.code(), Some(1), "{}", text(&result.stderr));
}

#[test]
fn a_componentize_py_program_runs_cpython_inside_a_component() {
    let cache = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut cmd = stasis(cache.path());
    cmd.args(["run", "--env", "ROUNDS=20000", "--dir"])
        .arg(format!("{}::/", root.path().display()))
        .arg(guest("pysum.component.wasm"));
    let result = run_with_stdin(cmd, b"1 2 3\n40\n-7 100\n");
    assert_eq!(result.status.code(), Some(0), "{}", text(&result.stderr));
    let mix = pysum_mix(20_000);
    assert_eq!(
        text(&result.stdout),
        format!("line 1: total 6, mix {mix:08x}\nline 2: total 46, mix {mix:08x}\nline 3: total 139, mix {mix:08x}\n")
    );
    assert_eq!(text(&result.stderr), "pysum: 3 lines\n");
    assert_eq!(std::fs::read_to_string(root.path().join("sum.txt")).unwrap(), "139\n");

    // A Python exception ends it as a trap, with Python's traceback on stderr.
    let mut cmd = stasis(cache.path());
    cmd.arg("run").arg("--dir").arg(format!("{}::/", root.path().display())).arg(guest("pysum.component.wasm"));
    let result = run_with_stdin(cmd, b"1 two\n");
    assert_ne!(result.status.code(), Some(0));
    let stderr = text(&result.stderr);
    assert!(stderr.contains("ValueError: invalid literal for int()"), "{stderr}");
}

/// `stasis run --checkpoint-on-signal` on cargo's `wordfreq`, blocked reading its third
/// line: the image is written and the program goes on; `stasis resume` continues the image
/// in a new process, from the third line, with the same output and the same report file.
#[test]
fn sigusr1_checkpoints_a_running_cargo_component_and_resume_continues_it() {
    use std::io::{BufRead, BufReader, Write};
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let image = dir.path().join("wordfreq.img");
    let mut cmd = stasis(cache.path());
    cmd.args(["run", "--checkpoint-on-signal", "--checkpoint-out"])
        .arg(&image)
        .arg("--dir")
        .arg(format!("{}::/out", out.display()))
        .args(["--env", "ROUNDS=1000"])
        .arg(guest("wordfreq.component.wasm"))
        .arg("/out");
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (expected, report) = wordfreq_expected(TEXT, 1000);
    let expected: Vec<&str> = expected.lines().collect();
    let lines: Vec<&str> = TEXT.lines().collect();
    for (line, printed) in lines[..2].iter().zip(&expected) {
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
        let mut got = String::new();
        stdout.read_line(&mut got).unwrap();
        assert_eq!(got.trim_end(), *printed);
    }
    // Blocked on its third line: checkpoint it there.
    assert!(std::process::Command::new("kill").args(["-USR1", &child.id().to_string()]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !image.exists() {
        assert!(std::time::Instant::now() < deadline, "no image written");
        std::thread::sleep(Duration::from_millis(10));
    }
    // It kept running.
    let rest: String = lines[2..].iter().map(|l| format!("{l}\n")).collect();
    stdin.write_all(rest.as_bytes()).unwrap();
    drop(stdin);
    let mut tail = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut tail).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(tail.lines().collect::<Vec<_>>(), expected[2..]);
    assert_eq!(std::fs::read_to_string(out.join("wordfreq.txt")).unwrap(), report);

    // The image continues from the third line, in a new process, reading this pipe.
    std::fs::remove_file(out.join("wordfreq.txt")).unwrap();
    let mut resume = stasis(cache.path());
    resume.arg("resume").arg(&image);
    let resumed = run_with_stdin(resume, rest.as_bytes());
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed.stderr));
    assert_eq!(text(&resumed.stdout).lines().collect::<Vec<_>>(), expected[2..]);
    assert_eq!(std::fs::read_to_string(out.join("wordfreq.txt")).unwrap(), report);
}

/// componentize-py's CPython (a dozen dynamically linked core modules sharing one
/// memory, table, stack pointer and GOT) stopped in its interpreter loop by
/// `--checkpoint-after ... --checkpoint-and-stop`; `stasis resume` finishes it with the
/// lines it had not printed, its stderr and its file.
#[test]
fn a_componentize_py_program_stopped_mid_loop_is_finished_by_resume() {
    let cache = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let image = cache.path().join("pysum.img");
    let input = b"1 2 3\n40\n-7 100\n";
    let mut cmd = stasis(cache.path());
    cmd.args(["run", "--env", "ROUNDS=4000000", "--checkpoint-after", "1s", "--checkpoint-and-stop"])
        .arg("--checkpoint-out")
        .arg(&image)
        .arg("--dir")
        .arg(format!("{}::/", root.path().display()))
        .arg(guest("pysum.component.wasm"));
    let stopped = run_with_stdin(cmd, input);
    assert_eq!(stopped.status.code(), Some(0), "{}", text(&stopped.stderr));
    assert!(text(&stopped.stderr).contains("stopped at a checkpoint"), "{}", text(&stopped.stderr));
    let before = text(&stopped.stdout);
    assert!(before.lines().count() < 3, "it finished before the checkpoint: {before}");
    assert!(!root.path().join("sum.txt").exists());

    let mut resume = stasis(cache.path());
    resume.arg("resume").arg(&image);
    let resumed = run(resume);
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed.stderr));
    let mix = pysum_mix(4_000_000);
    assert_eq!(
        before + &text(&resumed.stdout),
        format!("line 1: total 6, mix {mix:08x}\nline 2: total 46, mix {mix:08x}\nline 3: total 139, mix {mix:08x}\n")
    );
    assert_eq!(text(&resumed.stderr), "pysum: 3 lines\n");
    assert_eq!(std::fs::read_to_string(root.path().join("sum.txt")).unwrap(), "139\n");
}

/// A program running in a sandbox over REST, blocked on stdin after its first line.
struct RunningComponent {
    guest: &'static str,
    args: serde_json::Value,
    env: serde_json::Value,
    /// Its stdin, the first line given before the snapshot.
    input: &'static str,
    expected_stdout: Vec<String>,
    /// A file it writes at the end, and what it holds.
    file: (&'static str, String),
}

/// A `memory` snapshot of the sandbox completes; the sandbox restored from it continues
/// the program, which finishes with the uninterrupted output and file, while the
/// original goes on too.
fn memory_snapshot_continues_in_the_restored_sandbox(program: RunningComponent) {
    let server = TestServer::start();
    let api = server.client(&server.key("team"));
    let id = api.create_sandbox(json!({}));
    let sb = api.sandbox(&id);
    let wasm = std::fs::read(guest(program.guest)).unwrap();
    sb.put("/api/v1/files?path=/home/user/program.wasm", &wasm).expect(204);
    let started = sb
        .post(
            "/api/v1/processes",
            json!({"command": "/home/user/program.wasm", "args": program.args,
                   "env": program.env, "stdin_mode": "pipe"}),
        )
        .expect(200)
        .json();
    let pid = started["pid"].as_u64().unwrap();
    let (first, rest) = program.input.split_once('\n').unwrap();
    sb.request("POST", &format!("/api/v1/processes/{pid}/stdin"), format!("{first}\n").as_bytes()).expect(200);
    sb.wait_for_line(pid, &program.expected_stdout[0]);

    let snap = api.snapshot(&id, json!({"snapshot_type": "memory"}));
    assert_eq!(snap["status"].as_str(), Some("completed"), "{snap}");

    for (sandbox, pid) in [(sb, pid), {
        let restored = api.create_sandbox(json!({"snapshot_id": snap["id"]}));
        (api.sandbox(&restored), pid)
    }] {
        sandbox.request("POST", &format!("/api/v1/processes/{pid}/stdin"), rest.as_bytes()).expect(200);
        sandbox.request("POST", &format!("/api/v1/processes/{pid}/stdin/close"), b"").expect(200);
        let ended = sandbox.wait_for_exit(pid, Duration::from_secs(120));
        assert_eq!(ended["exit_code"].as_i64(), Some(0), "{}: {ended}", program.guest);
        let lines = sandbox.get(&format!("/api/v1/processes/{pid}/stdout")).expect(200).json();
        assert_eq!(lines["lines"], json!(program.expected_stdout), "{}", program.guest);
        let (path, contents) = &program.file;
        assert_eq!(sandbox.get(&format!("/api/v1/files?path={path}")).expect(200).body, contents.as_bytes());
    }
}

#[test]
fn a_memory_snapshot_of_a_sandbox_running_a_component_continues_in_the_restored_sandbox() {
    let (stdout, report) = wordfreq_expected(TEXT, 1000);
    memory_snapshot_continues_in_the_restored_sandbox(RunningComponent {
        guest: "wordfreq.component.wasm",
        args: json!(["/home/user"]),
        env: json!({"ROUNDS": "1000"}),
        input: TEXT,
        expected_stdout: stdout.lines().map(String::from).collect(),
        file: ("/home/user/wordfreq.txt", report),
    });
}

#[test]
fn a_memory_snapshot_of_a_sandbox_running_componentize_py_continues_in_the_restored_sandbox() {
    let mix = pysum_mix(1000);
    memory_snapshot_continues_in_the_restored_sandbox(RunningComponent {
        guest: "pysum.component.wasm",
        args: json!([]),
        env: json!({"ROUNDS": "1000"}),
        input: "1 2 3\n40\n-7 100\n",
        expected_stdout: [6, 46, 139]
            .iter()
            .enumerate()
            .map(|(i, t)| format!("line {}: total {t}, mix {mix:08x}", i + 1))
            .collect(),
        file: ("/sum.txt", "139\n".into()),
    });
}

/// An uppercasing echo server on loopback: answers each connection with what it sent,
/// uppercased, and counts the connections it accepted.
fn echo_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut got = Vec::new();
            if stream.read_to_end(&mut got).is_ok() {
                let _ = stream.write_all(&got.to_ascii_uppercase());
            }
        }
    });
    (port, accepted)
}

#[test]
fn inherit_network_lets_a_component_reach_a_loopback_server_and_nothing_does_without_it() {
    let cache = tempfile::tempdir().unwrap();
    let (port, accepted) = echo_server();
    for address in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let mut cmd = stasis(cache.path());
        cmd.args(["run", "--inherit-network"]).arg(guest("netcat.component.wasm")).arg(&address);
        let out = run_with_stdin(cmd, b"frozen and thawed\n");
        assert_eq!(out.status.code(), Some(0), "{address}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "FROZEN AND THAWED\n", "{address}");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);

    // Without the flag: no TCP, no name lookup, and the server never hears of it.
    for (address, why) in
        [(format!("127.0.0.1:{port}"), "Permission denied"), (format!("localhost:{port}"), "lookup address")]
    {
        let mut cmd = stasis(cache.path());
        cmd.arg("run").arg(guest("netcat.component.wasm")).arg(&address);
        let out = run_with_stdin(cmd, b"x\n");
        assert_eq!(out.status.code(), Some(1), "{address}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(why), "{address}: {}", text(&out.stderr));
        assert!(out.stdout.is_empty());
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}
