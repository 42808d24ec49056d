//! Shared by the runtime's integration tests: the built guests and a host per test.

#![allow(dead_code)]

use stasis_runtime::{Host, HostConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn guest_path(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/build").join(name);
    assert!(path.exists(), "{} is missing: run guests/build.sh", path.display());
    path
}

pub fn guest_bytes(name: &str) -> Arc<[u8]> {
    std::fs::read(guest_path(name)).unwrap().into()
}

pub fn host() -> Host {
    Host::new(HostConfig::default()).unwrap()
}

pub fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}
