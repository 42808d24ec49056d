//! `stasis run --checkpoint-*` and `stasis resume`: the built binary stops real guests
//! mid-run (on a timer, on SIGUSR1), writes images, and continues them in new processes.

use stasis_tests::{guest, run, run_with_stdin, stasis, text};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn cache() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn a_cpu_bound_guest_stopped_on_a_timer_resumes_twice_with_the_uninterrupted_output() {
    let c = cache();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("loop.img");
    let mut full = stasis(c.path());
    full.arg("run").arg(guest("cpuloop.wasm")).args(["30", "3"]);
    let full = run(full);
    assert!(full.status.success());

    let mut first = stasis(c.path());
    first
        .args(["run", "--checkpoint-after", "150ms", "--checkpoint-out"])
        .arg(&image)
        .arg("--checkpoint-and-stop")
        .arg(guest("cpuloop.wasm"))
        .args(["30", "3"]);
    let first = run(first);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    assert!(text(&first.stderr).contains("checkpoint written to"), "{}", text(&first.stderr));
    assert!(!text(&first.stdout).contains("done"), "the guest finished before the checkpoint: make it longer");

    for _ in 0..2 {
        let mut resume = stasis(c.path());
        resume.arg("resume").arg(&image);
        let rest = run(resume);
        assert_eq!(rest.status.code(), Some(0), "{}", text(&rest.stderr));
        assert_eq!(text(&first.stdout) + &text(&rest.stdout), text(&full.stdout));
    }
}

fn read_line_with_timeout(reader: &mut BufReader<std::process::ChildStdout>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    line
}

#[test]
fn sigusr1_checkpoints_a_guest_blocked_on_stdin_and_it_keeps_running() {
    let c = cache();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("counter.img");
    let mut cmd = stasis(c.path());
    cmd.args(["run", "--checkpoint-on-signal", "--checkpoint-out"]).arg(&image).arg(guest("counter.wasm"));
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdin.write_all(b"5\n").unwrap();
    stdin.flush().unwrap();
    assert_eq!(read_line_with_timeout(&mut stdout), "total=5\n");
    // The guest now waits for its next line: checkpoint it there.
    let signalled = Command::new("kill").args(["-USR1", &child.id().to_string()]).status().unwrap();
    assert!(signalled.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !image.exists() {
        assert!(Instant::now() < deadline, "no image written");
        std::thread::sleep(Duration::from_millis(10));
    }
    // It kept running: it still reads and adds.
    stdin.write_all(b"1\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    assert_eq!(rest, "total=6\nfinal=6\n");

    // The image continues from `total=5`, reading this terminal's (here: a pipe's) stdin.
    let mut resume = stasis(c.path());
    resume.arg("resume").arg(&image);
    let out = run_with_stdin(resume, b"7\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "total=12\nfinal=12\n");
}

#[test]
fn files_opened_under_a_dir_mapping_are_reopened_at_resume() {
    let c = cache();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let image = dir.path().join("py.img");
    // MicroPython opens a file, writes a line, then blocks reading stdin.
    let script = "f = open('/data/log.txt', 'w')\nf.write('before\\n')\nf.flush()\nimport sys\nline = sys.stdin.readline()\nf.write('after ' + line)\nf.close()\nprint('done', line.strip())\n";
    std::fs::write(data.join("main.py"), script).unwrap();
    let mut cmd = stasis(c.path());
    cmd.args(["run", "--checkpoint-after", "400ms", "--checkpoint-and-stop", "--checkpoint-out"])
        .arg(&image)
        .arg("--dir")
        .arg(format!("{}::/data", data.display()))
        .arg(guest("micropython.wasm"))
        .arg("/data/main.py");
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // Stdin stays open (nothing written): the guest blocks on it until the checkpoint.
    let stdin = child.stdin.take().unwrap();
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(data.join("log.txt")).unwrap(), "before\n");

    // No --dir: the mapping recorded in the image is used.
    let mut resume = stasis(c.path());
    resume.arg("resume").arg(&image);
    let out = run_with_stdin(resume, b"xyz\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "done xyz\n");
    assert_eq!(std::fs::read_to_string(data.join("log.txt")).unwrap(), "before\nafter xyz\n");
}

#[test]
fn bad_flags_unsupported_programs_and_corrupt_images_are_clear_errors() {
    let c = cache();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = stasis(c.path());
    cmd.args(["run", "--checkpoint-after", "1s"]).arg(guest("hello.wasm"));
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("need --checkpoint-out"), "{}", text(&out.stderr));

    // A program the transform refuses: it names the feature.
    let shared = dir.path().join("shared.wasm");
    std::fs::write(&shared, wat::parse_str(r#"(module (memory 1 1 shared) (func (export "_start")))"#).unwrap())
        .unwrap();
    let mut cmd = stasis(c.path());
    cmd.args(["run", "--checkpoint-after", "1s", "--checkpoint-out"]).arg(dir.path().join("x.img")).arg(&shared);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("shared memory"), "{}", text(&out.stderr));

    let corrupt = dir.path().join("corrupt.img");
    std::fs::write(&corrupt, b"STASISMI\x01\x00\x01\x00garbage").unwrap();
    let mut cmd = stasis(c.path());
    cmd.arg("resume").arg(&corrupt);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("corrupt.img"), "{}", text(&out.stderr));
}
