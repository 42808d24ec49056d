//! The host's loaded programs are bounded (issue 17, item 9): a tenant running ever new
//! programs cannot grow them without end; the least recently used are dropped first.

use stasis_runtime::{Host, HostConfig};
use std::sync::Arc;

/// A distinct (by its bytes) WASI command.
fn program(n: u32) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module (memory (export "memory") 1) (func (export "_start")) (global i32 (i32.const {n})))"#
    ))
    .unwrap()
}

#[test]
fn loaded_programs_are_bounded_least_recently_used_first() {
    let host = Host::new(HostConfig { max_loaded_programs: 3, max_processes: None, ..HostConfig::default() }).unwrap();
    let first = host.load(&program(0), "p0").unwrap();
    let p1 = Arc::downgrade(&host.load(&program(1), "p1").unwrap());
    for n in 2..10 {
        host.load(&program(n), &format!("p{n}")).unwrap();
        // Keep `p0` in use: it stays loaded while the others come and go.
        assert!(Arc::ptr_eq(&first, &host.load(&program(0), "p0").unwrap()));
        assert!(host.loaded_programs() <= 3, "{} loaded", host.loaded_programs());
    }
    assert_eq!(host.loaded_programs(), 3);
    // `p1` was dropped long ago (and nothing else holds it): its memory is freed.
    assert!(p1.upgrade().is_none(), "an evicted program is still alive");
    host.load(&program(1), "p1").unwrap();
    assert_eq!(host.loaded_programs(), 3);
}
