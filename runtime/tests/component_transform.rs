//! Components with every core module through the unwind transform run exactly as the
//! originals: the adapter-made `counter` fed through a stdin pipe, cargo's wasm32-wasip2
//! `wordfreq` writing a file, and componentize-py's CPython (`pysum`). Nothing stops them
//! (a stop that crosses modules is not built yet): this pins that the instrumented code,
//! on its normal path, is the program it was.

mod common;

use common::{guest_bytes, host, text};
use stasis_runtime::unwind::instrument_component;
use stasis_runtime::{Command, ExitStatus, Host, ProgramRef, Sandbox, SandboxConfig, StdinMode};

/// Runs `guest` (or its instrumented form) in a fresh sandbox with `stdin`; returns the
/// exit status, stdout, stderr and the files it left in `/`.
async fn run(
    host: &Host,
    guest: &str,
    instrumented: bool,
    args: &[&str],
    stdin: &[u8],
) -> (ExitStatus, String, String, Vec<(String, Vec<u8>)>) {
    let original = guest_bytes(guest);
    let bytes: std::sync::Arc<[u8]> = if instrumented {
        instrument_component(&original, &stasis_runtime::checkpoint::blocking_imports()).unwrap().bytes.into()
    } else {
        original
    };
    let root = tempfile::tempdir().unwrap();
    let sb =
        Sandbox::create(host, SandboxConfig { root: Some(root.path().into()), ..SandboxConfig::default() }).unwrap();
    let mut command = Command::new(ProgramRef::Bytes { bytes, name: guest.to_string() }).args(args.iter().copied());
    command = command.env("ROUNDS", "3000").stdin(StdinMode::Pipe);
    let p = sb.spawn(command).await.unwrap();
    let pipe = p.stdin().unwrap();
    pipe.write(stdin).unwrap();
    pipe.close();
    let status = p.wait().await;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root.path()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            files.push((entry.file_name().to_string_lossy().into_owned(), std::fs::read(entry.path()).unwrap()));
        }
    }
    files.sort();
    (status, text(p.stdout().contents()), text(p.stderr().contents()), files)
}

#[tokio::test]
async fn instrumented_components_run_as_the_originals() {
    let host = host();
    let cases: [(&str, &[&str], &[u8]); 4] = [
        ("counter.component.wasm", &[], b"5\n10\n-3\n"),
        ("hello.component.wasm", &["x"], b""),
        ("wordfreq.component.wasm", &["/"], b"the cat\nThe dog\n"),
        ("pysum.component.wasm", &[], b"1 2\n30\n"),
    ];
    for (guest, args, stdin) in cases {
        let plain = run(&host, guest, false, args, stdin).await;
        let instrumented = run(&host, guest, true, args, stdin).await;
        assert_eq!(plain.0, ExitStatus::Exited(0), "{guest}: {plain:?}");
        assert!(!plain.1.is_empty(), "{guest} printed nothing");
        assert_eq!(instrumented, plain, "{guest}");
    }
}
