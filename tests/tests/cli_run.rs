//! `stasis run` end to end: the built binary on real guests, compared with what the
//! wasmtime CLI does for args, env, preopens, exit codes and traps.

use stasis_tests::{guest, run, run_with_stdin, stasis, text};

fn cache() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn version_prints_name_and_semver() {
    let c = cache();
    let mut cmd = stasis(c.path());
    cmd.arg("--version");
    let out = run(cmd);
    assert!(out.status.success());
    let line = text(&out.stdout);
    let version = line.trim().strip_prefix("stasis ").expect("starts with `stasis `");
    assert_eq!(version.split('.').count(), 3, "{line}");
    assert!(version.split('.').all(|n| n.parse::<u32>().is_ok()), "{line}");
}

#[test]
fn hello_args_env_and_exit_code_pass_through() {
    let c = cache();
    // A component's non-zero exit is 1: WASIp2's `exit` carries only success or failure
    // (the same as under `wasmtime run`).
    for (program, code) in [("hello.wasm", 42), ("hello.component.wasm", 1)] {
        let mut cmd = stasis(c.path());
        cmd.args(["run", "--env", "GREETING=hey", "--env", "EXIT_CODE=42"])
            .arg(guest(program))
            .args(["one", "--two", "-3"]);
        let out = run(cmd);
        assert_eq!(out.status.code(), Some(code), "{program}: {}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            "hello from stasis\narg[1]=one\narg[2]=--two\narg[3]=-3\nGREETING=hey\n",
            "{program}"
        );
        assert_eq!(text(&out.stderr), "to stderr\n", "{program}");
    }
}

#[test]
fn env_without_value_inherits_from_the_host() {
    let c = cache();
    let mut cmd = stasis(c.path());
    cmd.env("GREETING", "from-host").args(["run", "--env", "GREETING"]).arg(guest("hello.wasm"));
    assert!(text(&run(cmd).stdout).contains("GREETING=from-host"));
}

#[test]
fn dir_mappings_give_the_guest_host_directories() {
    let c = cache();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), "from the host").unwrap();
    // HOST::GUEST
    let mut cmd = stasis(c.path());
    cmd.args(["run", "--dir"]).arg(format!("{}::/data", dir.path().display())).arg(guest("fileio.wasm"));
    cmd.args(["write", "/data/out.txt", "from the guest"]);
    let out = run(cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(dir.path().join("out.txt")).unwrap(), "from the guest");
    // HOST alone maps to the same path.
    let mut cmd = stasis(c.path());
    let host_path = dir.path().display().to_string();
    cmd.args(["run", "--dir", &host_path]).arg(guest("fileio.wasm")).args(["read", &format!("{host_path}/in.txt")]);
    assert_eq!(text(&run(cmd).stdout), "from the host");
    // Without --dir the guest sees nothing.
    let mut cmd = stasis(c.path());
    cmd.arg("run").arg(guest("fileio.wasm")).args(["read", &format!("{host_path}/in.txt")]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn stdin_is_inherited() {
    let c = cache();
    let mut cmd = stasis(c.path());
    cmd.arg("run").arg(guest("counter.wasm"));
    let out = run_with_stdin(cmd, b"1\n2\n3\n");
    assert_eq!(text(&out.stdout), "total=1\ntotal=3\ntotal=6\nfinal=6\n");
}

#[test]
fn micropython_prints_42() {
    let c = cache();
    let mut cmd = stasis(c.path());
    cmd.arg("run").arg(guest("micropython.wasm")).args(["-c", "print(6*7)"]);
    let out = run(cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "42\n");
}

/// Runs stasis and returns (exit code, stderr), asserting stderr is one line.
fn failure(args: &[&str], guest_args: &[&str], program: Option<&std::path::Path>) -> (i32, String) {
    let c = cache();
    let mut cmd = stasis(c.path());
    cmd.arg("run").args(args);
    if let Some(p) = program {
        cmd.arg(p);
    }
    cmd.args(guest_args);
    let out = run(cmd);
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code().unwrap(), stderr)
}

fn one_line(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("stasis:")).collect();
    assert_eq!(lines.len(), 1, "expected one stasis line: {stderr}");
    lines[0]
}

#[test]
fn traps_exit_134_with_one_line() {
    let (code, stderr) = failure(&[], &[], Some(&guest("trap.wasm")));
    assert_eq!(code, 134);
    assert!(one_line(&stderr).contains("wasm `unreachable` instruction executed"), "{stderr}");
    let (code, stderr) = failure(&[], &["divzero"], Some(&guest("trap.wasm")));
    assert_eq!(code, 134);
    assert!(one_line(&stderr).contains("divide by zero"), "{stderr}");
}

#[test]
fn memory_limit_exits_137() {
    let (code, stderr) = failure(&["--max-memory", "16M"], &["64"], Some(&guest("memhog.wasm")));
    assert_eq!(code, 137, "{stderr}");
    assert!(one_line(&stderr).contains("memory limit exceeded"), "{stderr}");
    assert!(stderr.contains("16777216"), "{stderr}");
}

#[test]
fn timeout_exits_124() {
    let started = std::time::Instant::now();
    let (code, stderr) = failure(&["--timeout", "300ms"], &["100000"], Some(&guest("cpuloop.wasm")));
    assert_eq!(code, 124);
    assert!(one_line(&stderr).contains("timed out after 300ms"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let (code, _) = failure(&["--timeout", "2s"], &["200"], Some(&guest("sleeper.wasm")));
    assert_eq!(code, 0);
}

#[test]
fn bad_input_gets_one_clear_line_and_exit_125() {
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = dir.path().join("script.wasm");
    std::fs::write(&not_wasm, "#!/bin/sh\necho hi\n").unwrap();
    let (code, stderr) = failure(&[], &[], Some(&not_wasm));
    assert_eq!(code, 125);
    assert!(one_line(&stderr).contains("not a WebAssembly module or component"), "{stderr}");

    let truncated = dir.path().join("truncated.wasm");
    let hello = std::fs::read(guest("hello.wasm")).unwrap();
    std::fs::write(&truncated, &hello[..hello.len() / 3]).unwrap();
    let (code, stderr) = failure(&[], &[], Some(&truncated));
    assert_eq!(code, 125);
    assert!(one_line(&stderr).contains("not a valid WebAssembly program"), "{stderr}");

    let unknown_import = dir.path().join("import.wasm");
    std::fs::write(
        &unknown_import,
        wat::parse_str(r#"(module (import "env" "frobnicate" (func)) (func (export "_start")))"#).unwrap(),
    )
    .unwrap();
    let (code, stderr) = failure(&[], &[], Some(&unknown_import));
    assert_eq!(code, 125);
    assert!(one_line(&stderr).contains("env::frobnicate"), "{stderr}");

    let (code, stderr) = failure(&["--dir", "/definitely/not/here"], &[], Some(&guest("hello.wasm")));
    assert_eq!(code, 125);
    assert!(one_line(&stderr).contains("/definitely/not/here"), "{stderr}");

    let (code, stderr) = failure(&[], &[], Some(&dir.path().join("missing.wasm")));
    assert_eq!(code, 125);
    assert!(one_line(&stderr).contains("missing.wasm"), "{stderr}");

    let (code, stderr) = failure(&["--max-memory", "12Q"], &[], Some(&guest("hello.wasm")));
    assert_eq!(code, 2, "clap usage errors exit 2: {stderr}");
    assert!(stderr.contains("unknown unit"), "{stderr}");
}

/// CPU seconds `pid` has used so far (user + system, from `/proc/PID/stat`).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[test]
fn cpus_throttles_a_cpu_bound_guest_to_its_share_of_a_core() {
    let c = cache();
    // Compile first, so the measured run is the guest's loop.
    let mut warm = stasis(c.path());
    warm.args(["run"]).arg(guest("cpuloop.wasm")).arg("1");
    assert!(run(warm).status.success());

    // Unthrottled, it holds a core (less on a machine busy with other tests, but well
    // above the quota).
    for (flags, most, least) in [(&["--cpus", "0.1"][..], 0.2, 0.02), (&[][..], f64::MAX, 0.3)] {
        let mut cmd = stasis(c.path());
        cmd.arg("run").args(flags).args(["--timeout", "3s"]).arg(guest("cpuloop.wasm")).arg("100000");
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let started = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(2500));
        let cores = cpu_seconds(child.id()) / started.elapsed().as_secs_f64();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(124), "{flags:?}: runs to its timeout");
        println!("{flags:?}: {cores:.2} cores");
        assert!(cores < most && cores > least, "{flags:?}: {cores:.2} cores");
    }

    let (code, stderr) = failure(&["--cpus", "0"], &[], Some(&guest("hello.wasm")));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not a positive number of cores"), "{stderr}");
}
