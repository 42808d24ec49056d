//! The on-disk code cache stays within its bound: past it, the least recently used
//! artifacts are deleted, and a program whose artifact went is compiled again.

mod common;

use stasis_runtime::{Host, HostConfig};

fn cache_bytes(dir: &std::path::Path) -> (u64, usize) {
    let files: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().filter(|e| e.path().is_file()).collect();
    (files.iter().map(|e| e.metadata().unwrap().len()).sum(), files.len())
}

#[test]
fn the_least_recently_used_artifacts_go_once_the_cache_is_over_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let unbounded =
        Host::new(HostConfig { code_cache_dir: Some(dir.path().into()), max_processes: None, ..Default::default() })
            .unwrap();
    unbounded.load(&common::guest_bytes("hello.wasm"), "hello").unwrap();
    let (one, _) = cache_bytes(dir.path());
    unbounded.load(&common::guest_bytes("cpuloop.wasm"), "cpuloop").unwrap();
    let (two, files) = cache_bytes(dir.path());
    assert!(two > one && files >= 2, "{one} then {two} bytes in {files} files");

    // A bound that holds about one program: loading a third evicts the oldest.
    let bound = two - one / 2;
    let dir = tempfile::tempdir().unwrap();
    let config = || HostConfig {
        code_cache_dir: Some(dir.path().into()),
        code_cache_max_bytes: Some(bound),
        max_processes: None,
        ..Default::default()
    };
    for name in ["hello.wasm", "cpuloop.wasm", "counter.wasm", "sleeper.wasm"] {
        Host::new(config()).unwrap().load(&common::guest_bytes(name), name).unwrap();
        let (bytes, _) = cache_bytes(dir.path());
        assert!(bytes <= bound + (64 << 10), "{bytes} bytes over a bound of {bound} after {name}");
    }
    // The newest is still cached; programs evicted load again (compiled anew).
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let sleeper = blake3::hash(&common::guest_bytes("sleeper.wasm")).to_hex().to_string();
    assert!(names.iter().any(|n| n.starts_with(&sleeper) && n.ends_with(".cwasm")), "{names:?}");
    let hello = blake3::hash(&common::guest_bytes("hello.wasm")).to_hex().to_string();
    assert!(!names.iter().any(|n| n.starts_with(&hello) && n.ends_with(".cwasm")), "{names:?}");
    Host::new(config()).unwrap().load(&common::guest_bytes("hello.wasm"), "hello").unwrap();
}
