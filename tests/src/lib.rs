//! Helpers for end-to-end tests: where the built binary and the built guests are.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The `stasis` binary: `$STASIS_BIN`, else the workspace's release build.
pub fn stasis_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("STASIS_BIN") {
        return bin.into();
    }
    let bin = workspace_root().join("target/release/stasis");
    assert!(bin.exists(), "{} is missing: run `cargo build --release` (or set STASIS_BIN)", bin.display());
    bin
}

/// A built guest, e.g. `guest("hello.wasm")`.
pub fn guest(name: &str) -> PathBuf {
    let path = workspace_root().join("guests/build").join(name);
    assert!(path.exists(), "{} is missing: run guests/build.sh", path.display());
    path
}

/// A `stasis` command with a private code cache, so tests never share state with the user's.
pub fn stasis(cache: &Path) -> Command {
    let mut cmd = Command::new(stasis_bin());
    cmd.env("STASIS_CACHE_DIR", cache).env_remove("STASIS_BACKTRACE");
    cmd
}

/// Runs `cmd` with `stdin` fed to it and returns its output.
pub fn run_with_stdin(mut cmd: Command, stdin: &[u8]) -> Output {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning stasis");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// Runs `cmd` with stdin closed.
pub fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null());
    cmd.output().expect("spawning stasis")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
